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


def hashes_to_hex(hashes: np.ndarray) -> list[str]:
    return [row.tobytes().hex() for row in as_bytes(hashes)]


def hex_to_hashes(values: Sequence[str]) -> np.ndarray:
    return np.array([bytes.fromhex(v) for v in values], dtype=f"S{HASH_BYTES}").reshape(-1)


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


@dataclass(frozen=True)
class ShardInfo:
    index: int
    rows: int
    bytes: int
    sha256: str

    def __post_init__(self):
        if not all(_is_count(v) for v in (self.index, self.rows, self.bytes)) or not isinstance(
            self.sha256, str
        ):
            raise ValueError(f"not a shard record: {self}")

    @property
    def file(self) -> str:
        return shard_name(self.index) + ".h5"


@dataclass(frozen=True)
class PoolingInfo:
    layers: tuple[int, ...]  # hidden-state indices stored for this pooling
    dtype: str  # stored dtype of emb/<pooling> (float16 by default)


@dataclass(frozen=True)
class Manifest:
    """What a complete entry holds; `manifest.json`, rewritten (atomically, last) at every append."""

    key: str
    hidden_size: int
    num_layers: int
    layers: tuple[int, ...]
    poolings: dict[str, PoolingInfo]
    shards: tuple[ShardInfo, ...]
    backbone: dict  # name, path, model_type: for people
    created: str
    updated: str
    versions: dict
    extractions: tuple[dict, ...] = ()  # one record per append: rows, tokens, seconds, energy, ...
    format_version: int = FORMAT_VERSION

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["rows"] = self.rows
        return d

    @classmethod
    def from_json(cls, d: dict) -> Manifest:
        return cls(
            key=d["key"],
            hidden_size=d["hidden_size"],
            num_layers=d["num_layers"],
            layers=tuple(d["layers"]),
            poolings={
                p: PoolingInfo(tuple(v["layers"]), v["dtype"]) for p, v in d["poolings"].items()
            },
            shards=tuple(ShardInfo(**s) for s in d["shards"]),
            backbone=d["backbone"],
            created=d["created"],
            updated=d["updated"],
            versions=d["versions"],
            extractions=tuple(d.get("extractions", ())),
            format_version=d["format_version"],
        )


@dataclass(frozen=True)
class PlannedShard:
    """A shard of an append in progress: its index and the hashes of the texts it will hold."""

    index: int
    hashes: tuple[str, ...]  # hex

    def __post_init__(self):
        if not _is_count(self.index) or not all(isinstance(h, str) for h in self.hashes):
            raise ValueError(f"not a planned shard: {self.index!r}")
