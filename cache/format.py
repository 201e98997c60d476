"""What a cache entry is on disk, as types: its spec (what hashes to the key), manifest, shards and
pending plan, and the errors every cache module raises. The layout is described in `llmembed.cache`."""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llmembed.cache.keys import (
    FORMAT_VERSION,
    fingerprint,
)
from llmembed.errors import UserError

SPLITS = ("train", "validation", "test")  # data-set split codes 0, 1, 2 (never stored in shards)
STORE_DTYPES = {"float16": np.float16, "float32": np.float32}
HASH_BYTES = 32  # sha256 digest per row


class CacheError(UserError, RuntimeError):
    """A cache entry is damaged or does not match its manifest; the message names the file and the fix."""


class ManifestError(CacheError):
    """A manifest that cannot be parsed or belongs to another entry: repair removes it."""


class CacheRootError(UserError, PermissionError):
    """The cache root cannot take new entries; the message says how to point elsewhere."""


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def selection_name(layers: Sequence[int], poolings: Sequence[str]) -> str:
    return "sel-" + fingerprint({"layers": sorted(layers), "poolings": sorted(poolings)}, length=12)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def disk_full(err: BaseException) -> bool:
    """ENOSPC, as an OSError or as HDF5 reports it from a flush (a RuntimeError naming errno 28)."""
    return getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err)


def as_bytes(hashes: np.ndarray) -> np.ndarray:
    """(n, 32) uint8 view of (n,) S32 hashes (what a shard stores)."""
    return (
        np.ascontiguousarray(hashes, dtype=f"S{HASH_BYTES}").view(np.uint8).reshape(-1, HASH_BYTES)
    )


def from_bytes(raw: np.ndarray) -> np.ndarray:
    """(n,) S32 from a shard's (n, 32) uint8."""
    return np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1).view(f"S{HASH_BYTES}")


# --- types: what an entry is, what its manifest says ---------------------------------------------
@dataclass(frozen=True)
class EntrySpec:
    """Everything that changes a text's stored vectors, and nothing else: it hashes to the key."""

    backbone: dict  # identity of weights and tokenizer (hub commit, or content hashes)
    model_type: str
    compute_dtype: str
    store_dtype: str
    max_length: int
    truncation_side: str
    prompt: str
    format_version: int = FORMAT_VERSION

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def key(self) -> str:
        return fingerprint(self.as_dict())

    @classmethod
    def from_dict(cls, d: dict) -> EntrySpec:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def _check(ok: bool, what: str, value) -> None:
    if not ok:
        raise ValueError(f"{what} is not valid: {value!r}")


def _is_hex(value, length: int = 64) -> bool:
    return (
        isinstance(value, str)
        and len(value) == length
        and all(c in "0123456789abcdef" for c in value)
    )


@dataclass(frozen=True)
class ShardInfo:
    """A finished shard as the manifest (and its sidecar) records it."""

    index: int
    rows: int
    bytes: int
    sha256: str  # of the whole file (`verify`)
    seal: str  # of the shard's attributes, its chunk hashes among them (every read checks it)
    # Poolings this shard stores in float32 (values beyond the store dtype's range in its batches).
    wide: tuple[str, ...] = ()

    def __post_init__(self):
        _check(all(_is_count(v) for v in (self.index, self.rows, self.bytes)), "shard record", self)
        _check(_is_hex(self.sha256) and _is_hex(self.seal), "shard record", self)
        object.__setattr__(self, "wide", tuple(self.wide))
        _check(all(isinstance(p, str) for p in self.wide), "shard record", self)

    @property
    def file(self) -> str:
        return shard_name(self.index) + ".h5"


@dataclass(frozen=True)
class IndexInfo:
    """The hash index of one commit's shards: every row's text hash, sorted, with its shard and row,
    so that finding texts reads one small binary file per commit, not every shard."""

    file: str
    rows: int
    sha256: str

    def __post_init__(self):
        ok = isinstance(self.file, str) and self.file.startswith("index-") and "/" not in self.file
        _check(ok and _is_count(self.rows) and _is_hex(self.sha256), "index record", self)


@dataclass(frozen=True)
class PoolingInfo:
    layers: tuple[int, ...]  # hidden-state indices stored for this pooling
    dtype: str  # stored dtype of emb/<pooling> (float16 by default)

    def __post_init__(self):
        ok = all(_is_count(x) for x in self.layers) and len(set(self.layers)) == len(self.layers)
        _check(ok and self.layers and self.dtype in STORE_DTYPES, "pooling record", self)


@dataclass(frozen=True)
class Manifest:
    """What a complete entry holds; `manifest.json`, rewritten (atomically, last) at every append.

    Every field a reader uses is checked against what the shards themselves record (their sealed
    attributes: rows, hidden size, number of layers, stored layers), so an edited manifest fails
    reads instead of changing what a layer index means."""

    key: str
    hidden_size: int
    num_layers: int
    layers: tuple[int, ...]
    poolings: dict[str, PoolingInfo]
    shards: tuple[ShardInfo, ...]
    indexes: tuple[IndexInfo, ...]
    backbone: dict  # name, path, model_type: for people
    created: str
    updated: str
    versions: dict
    extractions: tuple[dict, ...] = ()  # one record per append: rows, tokens, seconds, energy, ...
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        _check(_is_hex(self.key, len(self.key)) and self.key, "key", self.key)
        _check(
            _is_count(self.hidden_size) and self.hidden_size > 0, "hidden_size", self.hidden_size
        )
        _check(_is_count(self.num_layers), "num_layers", self.num_layers)
        _check(
            all(_is_count(x) and x <= self.num_layers for x in self.layers), "layers", self.layers
        )
        _check(isinstance(self.poolings, dict) and self.poolings, "poolings", self.poolings)
        indices = [s.index for s in self.shards]
        _check(len(set(indices)) == len(indices), "shard list (a shard listed twice)", indices)
        files = [i.file for i in self.indexes]
        _check(len(set(files)) == len(files), "index list (an index listed twice)", files)
        _check(
            sum(i.rows for i in self.indexes) == self.rows,
            "index rows",
            [i.rows for i in self.indexes],
        )
        for name in ("backbone", "versions"):
            _check(isinstance(getattr(self, name), dict), name, getattr(self, name))
        for name in ("created", "updated"):
            _check(isinstance(getattr(self, name), str), name, getattr(self, name))
        _check(all(isinstance(e, dict) for e in self.extractions), "extractions", "...")

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["rows"] = self.rows
        return d

    @classmethod
    def from_json(cls, d: dict) -> Manifest:
        """Raises ValueError, TypeError, KeyError or AttributeError on anything malformed."""
        _check(isinstance(d.get("poolings"), dict), "poolings", d.get("poolings"))
        return cls(
            key=d["key"],
            hidden_size=d["hidden_size"],
            num_layers=d["num_layers"],
            layers=tuple(d["layers"]),
            poolings={
                p: PoolingInfo(tuple(v["layers"]), v["dtype"]) for p, v in d["poolings"].items()
            },
            shards=tuple(ShardInfo(**s) for s in d["shards"]),
            indexes=tuple(IndexInfo(**i) for i in d["indexes"]),
            backbone=d["backbone"],
            created=d["created"],
            updated=d["updated"],
            versions=d["versions"],
            extractions=tuple(d.get("extractions", ())),
            format_version=d["format_version"],
        )


@dataclass(frozen=True, eq=False)
class PlannedShard:
    """A shard of an append in progress: its index, the hashes of its texts in row order, and how
    those rows are batched for the forward pass (row counts, in order). The batches are part of the
    plan, so a resumed run computes every row in the same batch as an uninterrupted one."""

    index: int
    hashes: np.ndarray  # (rows,) S32
    batches: tuple[int, ...]  # rows per forward batch; they sum to `rows`

    def __post_init__(self):
        ok = _is_count(self.index) and all(_is_count(b) and b > 0 for b in self.batches)
        _check(ok and sum(self.batches) == len(self.hashes), "planned shard", self.index)

    @property
    def rows(self) -> int:
        return len(self.hashes)

    def spans(self) -> list[slice]:
        """The rows of each batch."""
        ends = np.cumsum(self.batches)
        return [slice(int(e - b), int(e)) for b, e in zip(self.batches, ends, strict=True)]
