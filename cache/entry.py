"""`Entry`: one stored (key, selection) and the only reader of its shards."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from llmembed.cache.format import (
    HASH_BYTES,
    CacheError,
    EntrySpec,
    Manifest,
    ManifestError,
    ShardInfo,
    from_bytes,
)
from llmembed.cache.keys import (
    FORMAT_VERSION,
    EscapeError,
    inside,
    write_json_atomic,
)

log = logging.getLogger(__name__)


@dataclass
class _Index:
    """Where each stored text lives: sorted hashes with their shard and row."""

    shards: tuple[ShardInfo, ...]
    sorted_hashes: np.ndarray  # (n,) S32
    shard_pos: np.ndarray  # (n,) position into `shards`
    row: np.ndarray  # (n,) row inside that shard
    all_hashes: np.ndarray = field(repr=False)  # (n,) S32 in stored order


class Entry:
    """One stored (key, selection): complete when its manifest exists."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._index: _Index | None = None

    @property
    def key(self) -> str:
        return self.path.parent.name

    @property
    def root(self) -> Path:
        return self.path.parent.parent

    def file(self, name: str) -> Path:
        """A file of this entry, checked to stay inside the cache root (no symbolic link on the way
        leads out of it): every path the store opens, writes or removes comes from here."""
        return inside(self.root, inside(self.root, self.path) / name)

    @property
    def spec(self) -> EntrySpec:
        """The computation this entry holds; it must still hash to the entry's key."""
        path = self.path.parent / "spec.json"
        try:
            inside(self.root, path, follow=True)
            spec = EntrySpec.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CacheError(f"{path} cannot be read ({err}); remove {self.path.parent}") from None
        if spec.key != self.key:
            raise CacheError(
                f"{path} no longer hashes to the key {self.key} (it was changed); remove "
                f"{self.path.parent} with `llmembed-cache rm {self.key}`"
            )
        return spec

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def complete(self) -> bool:
        return self.manifest_path.is_file()

    @property
    def manifest(self) -> Manifest:
        path = self.file("manifest.json")
        try:
            inside(self.root, path, follow=True)
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CacheError(
                f"{self.path} is incomplete (no manifest.json); rerun the extraction to finish it "
                "or remove it with `llmembed-cache gc`"
            ) from None
        except (OSError, ValueError) as err:  # a link out of the root (EscapeError) included
            raise ManifestError(
                f"{path} cannot be read ({err}); run `llmembed-cache verify --repair` (it removes "
                "the manifest, so the entry becomes incomplete and the next extraction recomputes it)"
            ) from None
        if not isinstance(raw, dict):
            raise ManifestError(
                f"{path} is not a manifest (a JSON {type(raw).__name__}, not an object); run "
                "`llmembed-cache verify --repair` (it removes the manifest, so the entry becomes "
                "incomplete and the next extraction recomputes it)"
            )
        if raw.get("format_version") != FORMAT_VERSION:
            got = raw.get("format_version")
            raise CacheError(
                f"{self.path} has cache format {got}, this llmembed reads "
                f"{FORMAT_VERSION}; remove old entries with `llmembed-cache gc`"
            )
        try:
            m = Manifest.from_json(raw)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ManifestError(
                f"{path} is not a valid manifest ({type(err).__name__}: {err}); run "
                "`llmembed-cache verify --repair` (it removes the manifest, so the entry becomes "
                "incomplete and the next extraction recomputes it)"
            ) from None
        if m.key != self.key:
            raise ManifestError(
                f"{path} belongs to entry {m.key}, not to {self.key} (copied in from another "
                "entry); run `llmembed-cache verify --repair` and rerun the extraction"
            )
        return m

    @property
    def usage(self) -> dict:
        """{"datasets": {name: last use}, "last_used": ...}; best effort, for people and gc."""
        try:
            path = inside(self.root, self.file("usage.json"), follow=True)
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return raw if isinstance(raw, dict) else {}

    def touch(self, dataset: str | None) -> None:
        """Note a use (by a data set, when named). Lost updates between processes cost nothing but
        a date; a read-only cache just does not remember."""
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        usage = self.usage
        usage["last_used"] = now
        if dataset:
            usage.setdefault("datasets", {})[dataset] = now
        with suppress(OSError):
            write_json_atomic(self.file("usage.json"), usage, root=self.root)

    def covers(self, layers: Sequence[int], poolings: Sequence[str]) -> bool:
        m = self.manifest
        # The pooler exists for the last layer only: it is covered when stored at all.
        return set(layers) <= set(m.layers) and all(p in m.poolings for p in poolings)

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    def shards(self) -> list[ShardInfo]:
        return list(self.manifest.shards)

    # --- reading -------------------------------------------------------------------------------
    def _open(self, shard: ShardInfo) -> h5py.File:
        path = self.file(shard.file)
        try:
            inside(self.root, path, follow=True)
            f = h5py.File(path, "r")
        except FileNotFoundError:
            raise CacheError(
                f"{path} is missing; run `llmembed-cache verify --repair` and rerun the extraction"
            ) from None
        except EscapeError as err:
            raise CacheError(f"{err}; then run `llmembed-cache verify --repair`") from None
        except OSError as err:
            raise CacheError(
                f"{path} cannot be read as HDF5 ({err}); run `llmembed-cache verify --repair` "
                "and rerun the extraction to recompute it"
            ) from None
        # Two attributes, checked at every open: a shard copied in from another entry, or renamed
        # within this one, fails here instead of serving another text's numbers.
        key, index = f.attrs.get("key"), f.attrs.get("index")
        if key != self.key or index != shard.index:
            f.close()
            raise CacheError(
                f"{path} belongs to entry {key} shard {index}, not to {self.key} shard "
                f"{shard.index}; run `llmembed-cache verify --repair` and rerun the extraction"
            )
        return f

    def index(self) -> _Index:
        """The hash index of the stored rows (read once per manifest version)."""
        shards = self.manifest.shards
        if self._index is not None and self._index.shards == shards:
            return self._index
        self.spec  # noqa: B018  (checks that spec.json still hashes to the key)
        parts = []
        for shard in shards:
            with self._open(shard) as f:
                raw = self._load(shard, lambda f=f: f["text_sha256"][:])
            self._check_rows(shard, len(raw))
            parts.append(from_bytes(raw))
        hashes = np.concatenate(parts) if parts else np.empty(0, dtype=f"S{HASH_BYTES}")
        shard_pos = np.repeat(np.arange(len(shards)), [s.rows for s in shards])
        row = np.concatenate([np.arange(s.rows) for s in shards]) if shards else np.empty(0, int)
        order = np.argsort(hashes, kind="stable")
        self._index = _Index(shards, hashes[order], shard_pos[order], row[order], hashes)
        return self._index

    def hashes(self) -> np.ndarray:
        """(rows,) S32 text hashes of every stored row, in stored order."""
        return self.index().all_hashes

    @staticmethod
    def _find(idx: _Index, hashes: np.ndarray) -> np.ndarray:
        """Positions of `hashes` in the sorted index; -1 where not stored."""
        if not len(idx.sorted_hashes):
            return np.full(len(hashes), -1, dtype=np.int64)
        at = np.searchsorted(idx.sorted_hashes, hashes).clip(max=len(idx.sorted_hashes) - 1)
        return np.where(idx.sorted_hashes[at] == hashes, at, -1)

    def holds(self, hashes: np.ndarray) -> np.ndarray:
        """(n,) bool: which of `hashes` the entry stores."""
        return self._find(self.index(), hashes) >= 0

    def read(
        self, pooling: str, layers: Sequence[int], hashes: np.ndarray | None = None
    ) -> np.ndarray:
        """Embeddings `(rows, len(layers), hidden)` as float32, reading only the requested layers;
        rows in the order of `hashes` (text hashes, see `text_hashes`), else in stored order."""
        m = self.manifest
        if pooling not in m.poolings:
            raise KeyError(
                f"pooling {pooling!r} is not stored in {self.path}; stored: {sorted(m.poolings)}"
            )
        stored = list(m.poolings[pooling].layers)
        missing = [layer for layer in layers if layer not in stored]
        if missing:
            raise KeyError(f"layers {missing} are not stored for {pooling!r}; stored: {stored}")
        idx = self.index()
        if hashes is None:
            # Every stored row, in stored order.
            where_shard = np.repeat(np.arange(len(idx.shards)), [s.rows for s in idx.shards])
            where_row = np.concatenate([np.arange(s.rows) for s in idx.shards] or [[]]).astype(int)
        else:
            hashes = np.asarray(hashes, dtype=f"S{HASH_BYTES}")
            at = self._find(idx, hashes)
            if (at < 0).any():
                raise KeyError(
                    f"{int((at < 0).sum())} of {len(hashes)} requested texts are not stored in "
                    f"{self.path}; rerun the extraction to add them"
                )
            where_shard, where_row = idx.shard_pos[at], idx.row[at]
        # h5py wants increasing indices; read in that order, then put back the order asked for.
        col = [stored.index(layer) for layer in layers]
        order = sorted(set(col))
        back = [order.index(i) for i in col]
        # Read the needed shards' layers whole (one contiguous chunk per shard and layer), then pick
        # the rows in memory: one gather in the stored dtype, one conversion to float32.
        blocks, offset = [], np.zeros(len(idx.shards), dtype=np.int64)
        needed = np.bincount(where_shard, minlength=len(idx.shards)) > 0
        total = 0
        for s, shard in enumerate(idx.shards):
            if not needed[s]:
                continue
            with self._open(shard) as f:
                ds = self._load(shard, lambda f=f: f["emb"][pooling])
                self.check_layers(shard, pooling, ds, stored)
                expected = (shard.rows, len(stored), m.hidden_size)
                if ds.shape != expected:
                    raise CacheError(
                        f"{self.path / shard.file}: emb/{pooling} has shape {ds.shape}, the manifest "
                        f"says {expected}; run `llmembed-cache verify --repair` and rerun the extraction"
                    )
                blocks.append(self._load(shard, lambda ds=ds: ds[:, order, :]))  # (rows, k, hidden)
            offset[s], total = total, total + shard.rows
        if not blocks:
            return np.empty((0, len(layers), m.hidden_size), dtype=np.float32)
        stacked = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
        picked = np.take(stacked, offset[where_shard] + where_row, axis=0)  # (n, k, hidden)
        if back != list(range(len(order))):
            picked = picked[:, back, :]
        return picked.astype(np.float32)

    def _load(self, shard: ShardInfo, read):
        try:
            return read()
        except (OSError, KeyError) as err:  # a chunk checksum, a truncated or missing dataset
            raise CacheError(
                f"{self.path / shard.file} is damaged ({err}); run `llmembed-cache verify --repair` "
                "and rerun the extraction to recompute it"
            ) from None

    def check_layers(self, shard: ShardInfo, pooling: str, ds, stored: Sequence[int]) -> None:
        """The shard's own record of which hidden states `emb/<pooling>` holds must be the
        manifest's: a manifest whose layer list was edited (reversed, shifted) must not serve one
        layer's vectors for another."""
        own = ds.attrs.get("layers")
        if own is None or [int(x) for x in own] != [int(x) for x in stored]:
            raise CacheError(
                f"{self.path / shard.file}: emb/{pooling} holds layers "
                f"{None if own is None else [int(x) for x in own]}, the manifest "
                f"{self.manifest_path} says {list(stored)}; run `llmembed-cache verify --repair` "
                "and rerun the extraction"
            )

    def _check_rows(self, shard: ShardInfo, n: int) -> None:
        if n != shard.rows:
            raise CacheError(
                f"{self.path / shard.file} holds {n} rows, the manifest says "
                f"{shard.rows}; run `llmembed-cache verify --repair`"
            )
