"""`Entry`: one stored (key, selection) and the only reader of its shards."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmembed.cache.files import FileCheckError, ShardFile, open_shard, read_index, sha256_hex
from llmembed.cache.format import (
    HASH_BYTES,
    CacheError,
    EntrySpec,
    Manifest,
    ManifestError,
    ShardInfo,
)
from llmembed.cache.keys import (
    FORMAT_VERSION,
    EscapeError,
    inside,
    write_json_atomic,
)
from llmembed.cache.usage import STAMP, Usage, read_usage

log = logging.getLogger(__name__)


@dataclass
class _Index:
    """Where each stored text lives: sorted hashes with their shard and row."""

    shards: tuple[ShardInfo, ...]
    sorted_hashes: np.ndarray  # (n,) S32
    shard_pos: np.ndarray  # (n,) position into `shards`
    row: np.ndarray  # (n,) row inside that shard


class Entry:
    """One stored (key, selection): complete when its manifest exists."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._index: _Index | None = None
        self._manifest: tuple[tuple, Manifest] | None = None

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
        """The parsed manifest, read again only when the file changed (its inode, size or mtime)."""
        path = self.file("manifest.json")
        try:
            inside(self.root, path, follow=True)
            st = path.stat()
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if self._manifest is not None and self._manifest[0] == stamp:
                return self._manifest[1]
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
                "`llmembed-cache verify --repair` (it lists a shard listed twice once; any other "
                "damage removes the manifest, so the entry becomes incomplete and the next "
                "extraction recomputes it)"
            ) from None
        if m.key != self.key:
            raise ManifestError(
                f"{path} belongs to entry {m.key}, not to {self.key} (copied in from another "
                "entry); run `llmembed-cache verify --repair` and rerun the extraction"
            )
        self._manifest = (stamp, m)
        return m

    @property
    def usage(self) -> Usage:
        """Which data sets used the entry, and when; best effort, for people and gc."""
        return read_usage(self.root, self.file("usage.json"))

    def touch(self, dataset: str | None) -> None:
        """Note a use (by a data set, when named). Lost updates between processes cost nothing but
        a date; a damaged record starts afresh; a read-only cache just does not remember."""
        now = time.strftime(STAMP)
        datasets = {**self.usage.datasets, **({dataset: now} if dataset else {})}
        with suppress(OSError):
            write_json_atomic(
                self.file("usage.json"), {"datasets": datasets, "last_used": now}, root=self.root
            )

    def covers(self, layers: Sequence[int], poolings: Sequence[str]) -> bool:
        m = self.manifest
        # The pooler exists for the last layer only: it is covered when stored at all.
        return set(layers) <= set(m.layers) and all(p in m.poolings for p in poolings)

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    def shards(self) -> list[ShardInfo]:
        return list(self.manifest.shards)

    # --- reading -------------------------------------------------------------------------------
    def _open(self, shard: ShardInfo) -> ShardFile:
        """A shard, its seal checked against the manifest's record, and what the manifest says of it
        (rows, hidden size, number of layers, stored layers) checked against the shard's own
        sealed attributes: a shard copied in from another entry or renamed within this one, an
        attribute edited with h5py or an edited manifest fail here, before any value is served."""
        path = self.file(shard.file)
        try:
            inside(self.root, path, follow=True)
            f = open_shard(path)
        except FileNotFoundError:
            raise CacheError(
                f"{path} is missing; run `llmembed-cache verify --repair` and rerun the extraction"
            ) from None
        except EscapeError as err:
            raise CacheError(f"{err}; then run `llmembed-cache verify --repair`") from None
        except (OSError, FileCheckError) as err:
            raise self._damaged(path, err) from None
        try:
            wrong = self.mismatch(shard, f)
            if {"key", "index"} & set(wrong):
                raise CacheError(
                    f"{path} belongs to entry {f.attrs.get('key')} shard {f.attrs.get('index')}, "
                    f"not to {self.key} shard {shard.index}; run `llmembed-cache verify --repair` "
                    "and rerun the extraction"
                )
            if wrong:
                raise CacheError(
                    f"{path} records {wrong}, which the manifest {self.manifest_path} contradicts: "
                    "one of them was changed; run `llmembed-cache verify --repair` and rerun the "
                    "extraction"
                )
            f.check_seal(shard.seal)
        except FileCheckError as err:
            f.close()
            raise self._damaged(path, err) from None
        except BaseException:
            f.close()
            raise
        return f

    def mismatch(self, shard: ShardInfo, f: ShardFile) -> dict:
        """What an open shard records (key, index, rows, hidden size, number of layers, layers per
        pooling) where the manifest says otherwise: {name: the shard's value}."""
        m = self.manifest
        expected = {
            "key": self.key,
            "index": shard.index,
            "rows": shard.rows,
            "num_layers": m.num_layers,
            "hidden_size": m.hidden_size,
        }
        wrong = {k: f.attrs.get(k) for k, v in expected.items() if f.attrs.get(k) != v}
        stored = f.poolings
        for pooling, info in m.poolings.items():
            if stored.get(pooling) != list(info.layers):
                wrong[f"layers of {pooling}"] = stored.get(pooling)
        return wrong

    def _damaged(self, path: Path, err: BaseException) -> CacheError:
        return CacheError(
            f"{path} is damaged ({err}); run `llmembed-cache verify --repair` and rerun the "
            "extraction to recompute it"
        )

    def index(self) -> _Index:
        """The hash index of the stored rows: one file per commit, each checked against the sha256
        the manifest records (read once per manifest version)."""
        m = self.manifest
        if self._index is not None and self._index.shards == m.shards:
            return self._index
        self.spec  # noqa: B018  (checks that spec.json still hashes to the key)
        numbers = np.array([s.index for s in m.shards], dtype=np.int64)
        by_number = np.argsort(numbers)  # shard number -> its position in the manifest, vectorized
        parts = []
        for info in m.indexes:
            path = self.file(info.file)
            try:
                data = inside(self.root, path, follow=True).read_bytes()
                if sha256_hex(data) != info.sha256:
                    raise FileCheckError("its sha256 does not match the manifest")
                hashes, shard, row = read_index(data)
            except FileNotFoundError:
                raise CacheError(
                    f"{path} is missing; run `llmembed-cache verify --repair` and rerun the "
                    "extraction"
                ) from None
            except (OSError, ValueError, KeyError) as err:
                raise self._damaged(path, err) from None
            at = by_number[np.searchsorted(numbers[by_number], shard).clip(max=len(numbers) - 1)]
            if len(hashes) != info.rows or (len(shard) and not (numbers[at] == shard).all()):
                raise self._damaged(path, "its rows are not the manifest's shards")
            parts.append((hashes, at, row))
        if parts:
            hashes = np.concatenate([p[0] for p in parts])
            shard_pos = np.concatenate([p[1] for p in parts])
            row = np.concatenate([p[2] for p in parts])
        else:
            hashes, shard_pos, row = (
                np.empty(0, f"S{HASH_BYTES}"),
                np.empty(0, int),
                np.empty(0, int),
            )
        order = np.argsort(hashes, kind="stable") if len(parts) > 1 else np.arange(len(hashes))
        self._index = _Index(m.shards, hashes[order], shard_pos[order], row[order])
        return self._index

    def hashes(self) -> np.ndarray:
        """(rows,) S32 text hashes of every stored row, in stored order (shard by shard)."""
        idx = self.index()
        order = np.lexsort((idx.row, idx.shard_pos))
        return idx.sorted_hashes[order]

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
        """Embeddings `(rows, len(layers), hidden)` as float32, reading only the requested layers'
        chunks (each checked against its sha256); rows in the order of `hashes` (text hashes, see
        `text_hashes`), else in stored order. The shards' own hash columns are checked against the
        index, so a row is never served under another text's hash."""
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
            at = np.lexsort((idx.row, idx.shard_pos))  # every stored row, in stored order
        else:
            hashes = np.asarray(hashes, dtype=f"S{HASH_BYTES}")
            at = self._find(idx, hashes)
            if (at < 0).any():
                raise KeyError(
                    f"{int((at < 0).sum())} of {len(hashes)} requested texts are not stored in "
                    f"{self.path}; rerun the extraction to add them"
                )
        where_shard, where_row = idx.shard_pos[at], idx.row[at]
        out = np.empty((len(at), len(layers), m.hidden_size), dtype=np.float32)
        cols = [stored.index(layer) for layer in layers]
        for s in np.unique(where_shard):
            shard = idx.shards[s]
            mine = np.flatnonzero(where_shard == s)
            rows = where_row[mine]
            with self._open(shard) as f:
                try:
                    if not (f.text_hashes()[rows] == idx.sorted_hashes[at[mine]]).all():
                        raise FileCheckError("its rows are not where the hash index says")
                    for k, j in enumerate(cols):
                        out[mine, k] = f.layer(pooling, j)[rows]
                except FileCheckError as err:
                    raise self._damaged(self.file(shard.file), err) from None
        return out
