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
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

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


def backbone_names() -> list[str]:
    """The backbones shipped in conf/backbone/ (`local` takes a path)."""
    folder = files("llmembed.conf") / "backbone"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _backbone(backbone: str | Mapping | os.PathLike, settings: dict):
    """A backbone config: a conf/backbone/ name, an inline mapping ({name, path, ...}), a model
    folder, a .gguf file or a hub id (anything with a `/`)."""
    from omegaconf import OmegaConf

    base = _conf("backbone", "local.yaml")
    if isinstance(backbone, Mapping):
        cfg = OmegaConf.merge(base, dict(backbone))
    elif isinstance(backbone, (str, os.PathLike)):
        ref = os.fspath(backbone)
        if ref in backbone_names() and ref != "local":
            cfg = _conf("backbone", f"{ref}.yaml")
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


def _texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise SettingsError("texts must be a list of strings, got one str; pass [text]")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise SettingsError(
            f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}"
        )
    return texts


def _layer_list(layers) -> list[int]:
    if isinstance(layers, (int, np.integer)):
        return [int(layers)]
    layers = [int(x) for x in layers]
    if not layers:
        raise SettingsError("layers is empty: name at least one layer, e.g. layers=[-1]")
    return layers


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

    `backbone`: a conf/backbone/ name, a model folder, a GGUF file, a hub id or a mapping
    ({name, path, ...}). `layers`: hidden states (0 = embeddings; negative count from the end).
    `pooling`: mean, last, first or pooler. `settings`: extraction settings by name (`SETTINGS`:
    dtype, max_length, prompt, store_dtype, truncation_side, device, token_budget, cache_root, ...).
    With `cache=True` the cache of the command lines is read and filled (only missing texts run the
    model); `cache=False` computes in memory. `show_progress_bar`: None shows it on a terminal."""
    texts = _texts(texts)
    layers = _layer_list(layers)
    if show_progress_bar is None:
        show_progress_bar = sys.stderr.isatty() and len(texts) > 256
    plan = make_api_plan(backbone, layers, pooling, settings, progress=bool(show_progress_bar))
    wanted = absolute_layers(layers, plan.info.num_layers)
    if pooling == "pooler" and wanted != [plan.info.num_layers] * len(wanted):
        raise SettingsError(
            f"the pooler exists for the last layer only ({plan.info.num_layers}); use layers=[-1]"
        )
    if not texts:
        return np.zeros((0, len(wanted), plan.info.hidden_size), dtype=np.float32)
    if cache:
        from llmembed.extract.pipeline import extract_texts

        return extract_texts(plan, texts, name="llmembed.encode").read(pooling, wanted)
    return _encode_in_memory(plan, texts, wanted, pooling, bool(show_progress_bar))


def _encode_in_memory(plan, texts, wanted, pooling, progress: bool) -> np.ndarray:
    from tqdm.auto import tqdm

    from llmembed.extract.embed import load_embedder
    from llmembed.extract.plan import resolve_device

    stored = sorted(set(wanted))
    plan = plan.storing(stored, [pooling])
    extractor, _ = load_embedder(plan, resolve_device(plan.device))
    with tqdm(total=len(texts), unit="text", disable=not progress) as bar:
        emb, _ = extractor.embed(texts, lambda n, _tokens: bar.update(n))
    values = emb[pooling]  # (n, stored layers, hidden)
    if pooling == "pooler":
        values = values[:, -1:]
        return np.repeat(values, len(wanted), axis=1).astype(np.float32)
    return values[:, [stored.index(x) for x in wanted]].astype(np.float32)


# Reading what the cache holds.


def default_root() -> Path:
    """`$LLMEMBED_CACHE`, else ~/.cache/llmembed (as conf/cache/default.yaml)."""
    return Path(os.environ.get("LLMEMBED_CACHE", "~/.cache/llmembed")).expanduser()


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

        return self.entry.holds(text_hashes(_texts(texts)))

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
            hashes = text_hashes(_texts(texts))
        wanted = absolute_layers(_layer_list(layers), self.entry.manifest.num_layers)
        return self.entry.read(pooling, wanted, hashes)

    def __repr__(self) -> str:
        return (
            f"CachedEntry({self.backbone}, rows={self.rows}, layers={self.layers}, "
            f"poolings={self.poolings}, path={str(self.path)!r})"
        )


class Cache:
    """The embedding cache under `root` (default: `$LLMEMBED_CACHE`, else ~/.cache/llmembed)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()

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
