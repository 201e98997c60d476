"""Backbones: where a model comes from, what identifies its weights, and loading it for extraction.

A backbone path is a Hugging Face hub id, a local model folder, or a GGUF file. Its identity (the part
of the cache key) is the hub id with a resolved commit, or a content hash of the local files, so a
cache entry can never be served for different weights that happen to share a name.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llmembed.cache.keys import JsonMemo, file_sha256, fingerprint
from llmembed.errors import UserError
from llmembed.extract.converted import kept_copy

if TYPE_CHECKING:
    import torch

# torch and transformers are imported where a model or tokenizer is touched: what a cache hit needs
# (identities, and facts remembered in the memo) is read without them, in a fraction of a second.

log = logging.getLogger(__name__)

POOLINGS = ("mean", "last", "first", "pooler")
# Bump when the facts `inspect_backbone` remembers change meaning, so old memos are not trusted.
_FACTS_VERSION = 3
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# Files that define a local model's numbers: weights, config, tokenizer, custom code.
_MODEL_FILES = (".safetensors", ".bin", ".json", ".model", ".txt", ".tiktoken", ".py", ".gguf")


class BackboneError(UserError, ValueError):
    """The backbone cannot be used as configured; the message says what to change."""


@dataclass(frozen=True)
class Source:
    kind: str  # "hub", "local" or "gguf"
    location: str  # hub id, or folder holding the model / the GGUF file
    gguf_file: str | None = None

    def load_kwargs(self, revision: str | None, trust_remote_code: bool) -> dict:
        kw: dict = {"trust_remote_code": trust_remote_code}
        if self.kind == "gguf":
            kw["gguf_file"] = self.gguf_file
        if self.kind == "hub" and revision:
            kw["revision"] = revision
        return kw


def resolve_source(path: str) -> Source:
    """Tell a hub id from a local folder or GGUF file; a local-looking path must exist."""
    p = Path(path).expanduser()
    looks_local = path.startswith(("/", "./", "../", "~")) or p.suffix == ".gguf" or p.exists()
    if not looks_local and valid_repo_id(path):
        return Source("hub", path)
    if not p.exists():  # e.g. checkpoints/run1/final, typed from another folder
        raise BackboneError(
            f"model path {p} does not exist; set backbone.path to a model folder, a .gguf file "
            "or a Hugging Face hub id like meta-llama/Llama-2-7b-chat-hf"
        )
    if p.is_file():
        if p.suffix != ".gguf":
            raise BackboneError(f"{p} is a file but not a .gguf model; give its folder instead")
        return Source("gguf", str(p.parent.resolve()), p.name)
    if not (p / "config.json").is_file():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return Source("gguf", str(p.resolve()), ggufs[0].name)
        raise BackboneError(
            f"{p} holds no config.json (nor a single .gguf file): not a model folder"
        )
    return Source("local", str(p.resolve()))


def valid_repo_id(name: str) -> bool:
    """Whether `name` can be a hub repo id, by the hub's own rule (owner/name of letters, digits,
    -, _, .; no `--`, no leading `-`, at most 96 characters, ...)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _require_gguf(source: Source) -> None:
    if source.kind == "gguf":
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise BackboneError(
                f"{source.gguf_file} is a GGUF model, which needs the gguf package: "
                "pip install 'llmembed[gguf]'"
            ) from None


def identity(source: Source, revision: str | None, memo: Path | None) -> dict:
    """What pins the weights and tokenizer: a commit for hub models, file hashes for local ones."""
    if source.kind == "gguf":
        return {"gguf_sha256": file_sha256(Path(source.location) / source.gguf_file, memo=memo)}
    if source.kind == "local":
        root = Path(source.location)
        files = sorted(
            f
            for f in root.rglob("*")
            if f.is_file() and f.suffix in _MODEL_FILES and not _hidden(f, root)
        )
        return {"files": {str(f.relative_to(root)): file_sha256(f, memo=memo) for f in files}}
    return {"hub_id": source.location, "commit": hub_commit(source.location, revision)}


def _hidden(f: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in f.relative_to(root).parts)


def hub_commit(repo_id: str, revision: str | None) -> str:
    """The commit a hub revision points at: from the local hub cache, else by asking the hub."""
    if revision and _COMMIT.match(revision):
        return revision
    from huggingface_hub import HfApi, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision or "main")
    if isinstance(cached, str):
        return Path(cached).parent.name  # .../snapshots/<commit>/config.json
    try:
        return HfApi().model_info(repo_id, revision=revision).sha
    except Exception as err:
        raise BackboneError(
            f"cannot resolve {repo_id}@{revision or 'main'} to a commit ({type(err).__name__}: "
            f"{err}); download it once with network access, or set backbone.path to a local folder"
        ) from None


@dataclass(frozen=True)
class BackboneInfo:
    """What is known about a backbone without loading its weights."""

    source: Source
    identity: dict
    model_type: str
    num_layers: int  # L: hidden states 0..L
    hidden_size: int
    max_positions: int | None
    poolings: tuple[str, ...]  # the poolings this model supports
    # A causal model whose tokenizer puts the same special token (BOS) before every text: its
    # `first` state has seen only that token, so it is one vector for all texts; not offered.
    constant_first: bool = False
    # Each token sees only those before it (a decoder): its `first` state is the first token's alone,
    # so `poolings: all` leaves it out (it may still be asked for by name, unless constant).
    causal: bool = False


def is_causal(config) -> bool:
    """Whether each token sees only those before it: a decoder config, or a model type with a
    causal-LM class and no masked-LM class (BERT and RoBERTa have both: they are encoders)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_decoder", False):
        return True
    causal_lm = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    masked_lm = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if causal_lm or masked_lm:
        return causal_lm and not masked_lm
    # A type transformers does not know (remote code): its declared classes tell.
    heads = getattr(config, "architectures", None) or []
    return any(h.endswith("ForCausalLM") for h in heads) and not any(
        h.endswith("ForMaskedLM") for h in heads
    )


def adds_fixed_first_token(tokenizer) -> bool:
    """Whether the tokenizer puts the same special token (BOS, CLS) in front of every text."""
    a, b = (tokenizer(t)["input_ids"] for t in ("good", "The end."))
    return bool(a and b) and a[0] == b[0] and a[0] in tokenizer.all_special_ids


def inspect_backbone(cfg, memo: Path | None) -> BackboneInfo:
    """Identity, depth, width and poolings of a backbone, without loading its weights. The facts
    are remembered in `memo` by identity: reading a GGUF header, or converting its tokenizer,
    takes seconds."""
    source = resolve_source(cfg.path)
    _require_gguf(source)
    ident = identity(source, cfg.get("revision"), memo)
    if cfg.get("tokenizer"):
        ident = {**ident, "tokenizer": identity(resolve_source(cfg.tokenizer), None, memo)}
    trust = bool(cfg.get("trust_remote_code", False))
    facts = JsonMemo(memo)
    key = "info:" + fingerprint(
        {"identity": ident, "trust_remote_code": trust, "version": _FACTS_VERSION}
    )
    known = facts.get(key)
    if known is None:
        import torch
        from transformers import AutoConfig, AutoModel

        kw = source.load_kwargs(ident.get("commit"), trust)
        config = AutoConfig.from_pretrained(source.location, **kw)
        text = config.get_text_config()
        # A model built on the meta device costs no memory and tells whether it has a pooler.
        with torch.device("meta"):
            skeleton = AutoModel.from_config(config, trust_remote_code=trust)
        has_pooler = getattr(skeleton, "pooler", None) is not None
        causal = is_causal(config)
        constant_first = causal and adds_fixed_first_token(
            _tokenizer(cfg, source, ident.get("commit"))
        )
        known = {
            "model_type": config.model_type,
            "num_layers": int(text.num_hidden_layers),
            "hidden_size": int(text.hidden_size),
            "max_positions": getattr(text, "max_position_embeddings", None),
            "poolings": [
                p
                for p in POOLINGS
                if (p != "pooler" or has_pooler) and (p != "first" or not constant_first)
            ],
            "constant_first": constant_first,
            "causal": causal,
        }
        facts.put(key, known)
    return BackboneInfo(
        source=source, identity=ident, **{**known, "poolings": tuple(known["poolings"])}
    )


def _tokenizer(cfg, source: Source, commit: str | None):
    from transformers import AutoTokenizer

    src = resolve_source(cfg.tokenizer) if cfg.get("tokenizer") else source
    kw = src.load_kwargs(commit, cfg.get("trust_remote_code", False))
    return AutoTokenizer.from_pretrained(src.location, **kw)


def load_tokenizer(
    cfg, info: BackboneInfo, *, cache_root: Path | None = None, group_writable: bool = False
):
    """The backbone's tokenizer, with a pad token. `cache_root`: as for `load_model`; a GGUF
    vocabulary is then read from the converted copy (converting it takes seconds)."""
    from transformers import AutoTokenizer

    root = None if cfg.get("tokenizer") else cache_root
    with kept_copy(cfg, info, root, group_writable=group_writable, make=False) as copy:
        if copy is not None:
            tok = AutoTokenizer.from_pretrained(copy)
        else:
            tok = _tokenizer(cfg, info.source, info.identity.get("commit"))
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise BackboneError(f"the tokenizer of {cfg.path} has neither a pad nor an EOS token")
        log.info("tokenizer of %s has no pad token: padding with EOS (%r)", cfg.name, tok.eos_token)
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    cfg,
    info: BackboneInfo,
    *,
    depth: int,
    dtype: torch.dtype,
    device: str,
    cache_root: Path | None = None,
    group_writable: bool = False,
):
    """The base model (no LM head) with only its first `depth` layers built and loaded.

    `cache_root`: a GGUF backbone is de-quantized once and kept there, private to this user and
    checked before every load (see `extract.converted`); later loads read that copy (about 1 s
    instead of 11-20 s for SmolLM2). None: de-quantize the GGUF file on every load."""
    from transformers import AutoModel

    # Load the commit the cache key names, not whatever a branch points at by now.
    kw = info.source.load_kwargs(info.identity.get("commit"), cfg.get("trust_remote_code", False))
    if depth < info.num_layers:
        kw["num_hidden_layers"] = depth
    if cfg.get("device_map"):  # e.g. "auto": accelerate spreads a model too big for one device
        kw["device_map"] = cfg.device_map
    with kept_copy(cfg, info, cache_root, group_writable=group_writable) as copy:
        if copy is not None:
            kw.pop("gguf_file")
        model = AutoModel.from_pretrained(copy or info.source.location, dtype=dtype, **kw)
    if depth < info.num_layers:
        # Transformers replaces the last hidden state by the final-normed one; a cut model's last
        # layer is not the model's last, so keep it raw to match the full model's hidden_states.
        model.config.tie_last_hidden_states = False
    return (model if cfg.get("device_map") else model.to(device)).eval()
