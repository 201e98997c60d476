"""The Python API: `encode` texts into per-layer embeddings, and read what the cache holds.

    import llmembed
    x = llmembed.encode(["a fine film", "a dull one"], backbone="minilm", layers=[4, -1])
    x.shape  # (2, 2, 384) float32, in the order of the texts

`encode` builds the same `ExtractPlan` as `llmembed-extract` from the same YAML defaults
(conf/extract/default.yaml, conf/cache/default.yaml, conf/backbone/), so both read and fill the same
cache entries. torch and transformers are imported when `encode` first runs, not at `import llmembed`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

from llmembed.configs import backbone_names, named_backbone
from llmembed.data.tables import lone_surrogate
from llmembed.errors import UserError

# Extraction settings `encode` and `Cache.find` take by name: conf/extract/default.yaml's fields
# (layers and poolings are `encode`'s own arguments) plus the cache's and the backbone's.
EXTRACT_SETTINGS = (
    "dtype",
    "store_dtype",
    "device",
    "max_length",
    "truncation_side",
    "prompt",
    "token_budget",
    "shard_mb",
)
CACHE_SETTINGS = {"cache_root": "root", "group_writable": "group_writable"}
BACKBONE_SETTINGS = ("revision", "tokenizer", "padding_side", "device_map", "trust_remote_code")
SETTINGS = (*EXTRACT_SETTINGS, *CACHE_SETTINGS, *BACKBONE_SETTINGS)


class SettingsError(UserError, TypeError):
    """An unknown setting name or a bad argument; the message names the valid ones."""


class BackboneNotFoundError(UserError, LookupError):
    """A backbone is neither a conf name, a model folder, a GGUF file nor a hub id."""


def _conf(*parts: str):
    from omegaconf import OmegaConf

    from llmembed.resolvers import register_resolvers

    register_resolvers()  # the shipped YAML uses them
    return OmegaConf.load(str(files("llmembed.conf").joinpath(*parts)))


def _backbone(backbone: str | Mapping | os.PathLike, settings: dict):
    """A backbone config: a config name (conf/backbone/ or $LLMEMBED_CONFIG_DIR/backbone/, as for
    the command lines), an inline mapping ({name, path, ...}), a model folder, a .gguf file or a
    hub id (anything with a `/`)."""
    from omegaconf import OmegaConf

    base = _conf("backbone", "local.yaml")
    if isinstance(backbone, Mapping):
        cfg = OmegaConf.merge(base, dict(backbone))
    elif isinstance(backbone, (str, os.PathLike)):
        ref = os.fspath(backbone)
        if ref in backbone_names():
            cfg = named_backbone(ref)
        elif ref.startswith(("/", ".", "~")) and not Path(ref).expanduser().exists():
            raise BackboneNotFoundError(
                f"backbone {ref!r}: no such model folder or .gguf file; check the path"
            )
        elif Path(ref).expanduser().exists() or "/" in ref:
            path = Path(ref).expanduser()
            local = path.exists()
            name = (path.stem if path.suffix == ".gguf" else path.name) if local else ref
            cfg = OmegaConf.merge(base, {"name": name, "path": str(path) if local else ref})
        else:
            raise BackboneNotFoundError(
                f"backbone {ref!r} is not a conf name ({', '.join(backbone_names())}), an existing "
                "model folder or .gguf file, nor a hub id (owner/name); pass one of those"
            )
    else:
        raise SettingsError(
            f"backbone must be a name, a path or a mapping, got {type(backbone).__name__}"
        )
    for k in BACKBONE_SETTINGS:
        if k in settings:
            cfg[k] = settings[k]
    return cfg


def check_settings(settings: Mapping[str, Any]) -> None:
    """Fail on an unknown setting name, suggesting the closest valid one."""
    for name in settings:
        if name not in SETTINGS:
            close = difflib.get_close_matches(name, SETTINGS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise SettingsError(
                f"unknown setting {name!r}; {hint}valid settings: {', '.join(SETTINGS)}"
            )


def make_api_plan(
    backbone,
    layers: Sequence[int] | None,
    pooling: str | None,
    settings: Mapping[str, Any],
    *,
    progress: bool = False,
):
    """The `ExtractPlan` the CLIs would build for this backbone and settings; `layers` and
    `pooling` (when given) are what an entry must store to serve the request."""
    from llmembed.extract.plan import make_plan

    check_settings(settings)
    settings = dict(settings)
    ex = _conf("extract", "default.yaml")
    for k in EXTRACT_SETTINGS:
        if k in settings:
            ex[k] = settings[k]
    ex.progress = progress
    cache = _conf("cache", "default.yaml")
    for k, field in CACHE_SETTINGS.items():
        if k in settings and settings[k] is not None:
            cache[field] = str(settings[k]) if k == "cache_root" else settings[k]
    need = None if layers is None else (list(layers), [pooling])
    return make_plan(ex, _backbone(backbone, settings), cache, need=need)


def check_texts(texts) -> list[str]:
    """`texts` as a list of strings, each valid Unicode (a lone surrogate such as "\\ud800" has
    no UTF-8 form, so it cannot be hashed, tokenized or stored)."""
    if isinstance(texts, str):
        raise SettingsError("texts must be a list of strings, got one str; pass [text]")
    if texts is None or isinstance(texts, (bytes, Mapping)) or not hasattr(texts, "__iter__"):
        raise SettingsError(
            f"texts must be a list of strings, got {type(texts).__name__}; e.g. encode(['a text'])"
        )
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise SettingsError(f"texts must be strings; item {i} is {type(t).__name__}")
        if (at := lone_surrogate(t)) is not None:
            raise SettingsError(
                f"text {i} holds a lone surrogate (U+{ord(t[at]):04X} at character {at}), which "
                "is not Unicode text; decode its source with errors='replace' or remove it"
            )
    return texts


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def layer_list(layers) -> list[int]:
    """`layers` as a non-empty list of layer indices: an integer or a list of integers. A float
    (1.5), a bool, a string ("46" is not [4, 6]) or None is refused, never truncated or split."""
    if _is_int(layers):
        return [int(layers)]
    example = "e.g. layers=[4, -1] (negative count from the end)"
    if (
        layers is None
        or isinstance(layers, (str, bytes, float, bool, Mapping))
        or not hasattr(layers, "__iter__")
    ):
        raise SettingsError(
            f"layers must be an integer or a list of integers, got {layers!r}; {example}"
        )
    layers = list(layers)
    odd = [x for x in layers if not _is_int(x)]
    if odd:
        raise SettingsError(
            f"layers must be whole layer indices; {odd[0]!r} in {layers} is not; {example}"
        )
    if not layers:
        raise SettingsError("layers is empty: name at least one layer, e.g. layers=[-1]")
    return [int(x) for x in layers]


def absolute_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """Negative layers counted from the end (-1 = the last of hidden states 0..num_layers)."""
    return [x + num_layers + 1 if x < 0 else x for x in layers]


def encode(
    texts: Sequence[str],
    backbone: str | Mapping | os.PathLike = "minilm",
    layers: Sequence[int] | int = (4, 6),
    pooling: str = "mean",
    *,
    cache: bool = True,
    show_progress_bar: bool | None = None,
    **settings: Any,
) -> np.ndarray:
    """Embeddings `(len(texts), len(layers), hidden)` float32, in the order of `texts`.

    One call of `llmembed.Encoder(backbone, layers, pooling, cache=..., **settings)`, which keeps
    its model loaded between calls: use it to encode many times. `backbone`: a config name, a model
    folder, a GGUF file, a hub id or a mapping ({name, path, ...}). `layers`: hidden states (0 =
    embeddings; negative count from the end). `pooling`: mean, last, first or pooler. `settings`:
    extraction settings by name (`SETTINGS`: dtype, max_length, prompt, store_dtype,
    truncation_side, device, token_budget, cache_root, ...). With `cache=True` the cache of the
    command lines is read and filled (only missing texts run the model); `cache=False` computes in
    memory and writes nothing. `show_progress_bar`: None shows it on a terminal."""
    from llmembed.encoder import Encoder

    texts = check_texts(texts)
    encoder = Encoder(
        backbone, layers, pooling, cache=cache, show_progress_bar=show_progress_bar, **settings
    )
    return encoder.encode(texts)


# Reading what the cache holds.


def default_root() -> Path:
    """`$LLMEMBED_CACHE`, else ~/.cache/llmembed (as conf/cache/default.yaml)."""
    from llmembed.cache.root import root_path

    return root_path(os.environ.get("LLMEMBED_CACHE", "~/.cache/llmembed"))


@dataclass(frozen=True)
class CachedEntry:
    """One cache entry (a computation and a selection of layers and poolings), read by text."""

    entry: Any  # llmembed.cache.entry.Entry

    @property
    def path(self) -> Path:
        return self.entry.path

    @property
    def backbone(self) -> str:
        return self.entry.manifest.backbone["name"]

    @property
    def model(self) -> str:
        """The backbone's path or hub id when it was extracted."""
        return str(self.entry.manifest.backbone.get("path"))

    @property
    def identity(self) -> dict:
        """What pins the backbone's weights: a hub commit, or the sha256 of its files."""
        return dict(self.entry.spec.backbone)

    @property
    def hidden_size(self) -> int:
        return self.entry.manifest.hidden_size

    @property
    def spec(self) -> dict:
        return self.entry.spec.as_dict()

    @property
    def layers(self) -> list[int]:
        return list(self.entry.manifest.layers)

    @property
    def poolings(self) -> list[str]:
        return sorted(self.entry.manifest.poolings)

    @property
    def rows(self) -> int:
        return self.entry.manifest.rows

    def holds(self, texts: Sequence[str]) -> np.ndarray:
        """(n,) bool: which texts the entry stores."""
        from llmembed.cache.keys import text_hashes

        return self.entry.holds(text_hashes(check_texts(texts)))

    def read(
        self,
        texts: Sequence[str] | np.ndarray | None = None,
        *,
        layers: Sequence[int] | int = (-1,),
        pooling: str = "mean",
    ) -> np.ndarray:
        """`(rows, len(layers), hidden)` float32 for `texts` (strings, in their order) or text
        hashes (an `S32` array from `llmembed.cache.keys.text_hashes`), or every stored row when
        None. Negative layers count from the end. A text the entry lacks is a KeyError."""
        from llmembed.cache.keys import text_hashes

        if texts is None:
            hashes = None
        elif isinstance(texts, np.ndarray) and texts.dtype.kind == "S":
            hashes = texts
        else:
            hashes = text_hashes(check_texts(texts))
        wanted = absolute_layers(layer_list(layers), self.entry.manifest.num_layers)
        return self.entry.read(pooling, wanted, hashes)

    def __repr__(self) -> str:
        from llmembed.cache.keys import short_identity

        return (
            f"CachedEntry({self.backbone}, model={self.model!r}, identity="
            f"{short_identity(self.identity)!r}, hidden_size={self.hidden_size}, rows={self.rows}, "
            f"layers={self.layers}, poolings={self.poolings}, path={str(self.path)!r})"
        )


class Cache:
    """The embedding cache under `root` (default: `$LLMEMBED_CACHE`, else ~/.cache/llmembed)."""

    def __init__(self, root: str | os.PathLike | None = None):
        from llmembed.cache.root import root_path

        self.root = root_path(root) if root is not None else default_root()

    def entries(self) -> list[CachedEntry]:
        """Every complete entry, of any backbone."""
        from llmembed.cache.root import Cache as Store

        return [CachedEntry(e) for e in Store(self.root).entries() if e.complete]

    def find(self, backbone: str | Mapping | os.PathLike, **settings: Any) -> list[CachedEntry]:
        """The complete entries of this computation (backbone and keyed settings, as `encode`
        takes them), largest first; empty when nothing was extracted yet. With `dtype="auto"` (the
        default) entries of either compute dtype count, as for the command lines."""
        from llmembed.cache.root import Cache as Store

        plan = make_api_plan(backbone, None, None, {**settings, "cache_root": self.root})
        store = Store(self.root)
        found = [e for spec in plan.read_specs for e in store.selections(spec.key, [], [])]
        return sorted((CachedEntry(e) for e in found), key=lambda e: -e.rows)

    def __repr__(self) -> str:
        return f"Cache({str(self.root)!r})"
