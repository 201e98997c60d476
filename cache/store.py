"""The embedding cache on disk: entries, shards, manifests, locks. Only this module knows HDF5.

Layout under the cache root::

    <key>/spec.json                 the computation that hashes to <key> (`EntrySpec`): backbone,
                                    tokenizer, dtypes, max length, truncation side, prompt, format
    <key>/.lock                     one writer per key (flock: the kernel frees it when a process dies)
    <key>/<sel>/shard-00000.h5      a block of rows: emb/<pooling> [rows, layers, hidden] and
                                    text_sha256 [rows, 32]; attributes `key` and `index`
    <key>/<sel>/shard-00000.json    written after the shard: its rows, bytes and sha256
    <key>/<sel>/pending.json        an append in progress: which texts go to which new shard
    <key>/<sel>/manifest.json       written last, by atomic rename: the shards that count
    <key>/<sel>/usage.json          which data sets used the entry, and when (best effort)

The data set is not in the key: rows are addressed by the sha256 of their text (`text_hashes`), so
any split, subset, relabelled or extended file, or plain list of texts is served from what exists,
and a request computes only the texts an entry lacks, appended as new shards. Labels, splits and
ids belong to the data set and are joined at read time by text hash.

`<sel>` names which layers and poolings an entry stores. Any complete entry under `<key>` whose
selection covers a request's layers and poolings serves it; a request for layers or poolings that
no selection stores makes a new selection (with the configured layers and poolings as well), so a
sweep over layers after one full extraction never runs the model.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from filelock import Timeout

from llmembed.cache.keys import (
    FORMAT_VERSION,
    EscapeError,
    create_exclusive,
    file_sha256,
    fingerprint,
    inside,
    memo_path,
    write_json_atomic,
)
from llmembed.errors import UserError

log = logging.getLogger(__name__)

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


class EntryWriter:
    """Appends shards to one entry; only the holder of the key's lock makes one.

    Each shard appears under its final name only when complete, its sidecar after it; the append's
    plan (`pending.json`) is written before any shard, the manifest last. A crash at any moment
    leaves the entry as it was (its manifest lists only shards that were complete before), finished
    new shards (adopted by the next append) and at most a temporary file. Listed shards are never
    rewritten or removed by an append, so a reader holding the previous manifest reads on."""

    def __init__(self, entry: Entry, *, key: str):
        self.entry = entry
        self.key = key
        inside(entry.root, entry.path).mkdir(parents=True, exist_ok=True)

    @property
    def _pending_path(self) -> Path:
        return self.entry.file("pending.json")

    def pending(self) -> list[PlannedShard]:
        """The plan of an append that did not finish (empty when none)."""
        try:
            path = inside(self.entry.root, self._pending_path, follow=True)
            raw = json.loads(path.read_text())
            return [PlannedShard(s["index"], tuple(s["hashes"])) for s in raw["shards"]]
        except (OSError, ValueError, KeyError, TypeError):
            return []  # none, or damaged: the append is planned again

    def set_pending(self, shards: list[PlannedShard]) -> None:
        write_json_atomic(
            self._pending_path,
            {"shards": [{"index": s.index, "hashes": list(s.hashes)} for s in shards]},
            root=self.entry.root,
        )

    def listed(self) -> list[ShardInfo]:
        return list(self.entry.manifest.shards) if self.entry.complete else []

    def discard_leftovers(self) -> None:
        """Remove temporary files of killed runs and shard files that neither the manifest nor the
        pending append names; only for the holder of the key's lock, before anyone of its job writes."""
        folder = inside(self.entry.root, self.entry.path)
        self.entry.file("x")  # the folder itself must not lead out of the root
        for tmp in folder.glob(".*.tmp"):
            inside(self.entry.root, tmp).unlink(missing_ok=True)  # a link is removed, not followed
        keep = {s.index for s in self.listed()} | {s.index for s in self.pending()}
        for f in folder.glob("shard-*.*"):
            if int(f.stem.split("-")[1]) not in keep:
                inside(self.entry.root, f).unlink(missing_ok=True)

    def done(self) -> dict[int, ShardInfo]:
        """Shards of the pending append already complete on disk (a sidecar and a file of the
        recorded size)."""
        out = {}
        for planned in self.pending():
            side = self.entry.file(shard_name(planned.index) + ".json")
            if not side.is_file() or side.is_symlink():
                continue
            try:
                info = ShardInfo(
                    **json.loads(inside(self.entry.root, side, follow=True).read_text())
                )
            except (OSError, ValueError, TypeError) as err:
                log.warning("sidecar %s is damaged (%s); its shard will be recomputed", side, err)
                continue
            data = self.entry.file(info.file)
            if (
                info.rows == len(planned.hashes)
                and data.is_file()
                and data.stat().st_size == info.bytes
            ):
                out[planned.index] = info
                continue
            log.warning("shard %s is damaged or stale; it will be recomputed", data)
        return out

    def write_shard(
        self,
        index: int,
        *,
        hashes: np.ndarray,
        emb: dict[str, np.ndarray],
        layers: dict[str, list[int]],
    ) -> ShardInfo:
        n = len(hashes)
        final = self.entry.file(shard_name(index) + ".h5")
        side = self.entry.file(shard_name(index) + ".json")
        tmp = None
        try:
            fd, tmp = create_exclusive(final)  # random name, O_EXCL|O_NOFOLLOW
            self._write_file(fd, index, n, hashes=hashes, emb=emb, layers=layers)
            # A sidecar from an earlier, damaged copy must not vouch for the new file.
            side.unlink(missing_ok=True)
            os.replace(tmp, final)  # a link planted at the final name is replaced, not followed
            info = ShardInfo(
                index=index, rows=n, bytes=final.stat().st_size, sha256=file_sha256(final)
            )
            write_json_atomic(side, info.__dict__, root=self.entry.root)  # now the shard counts
        except BaseException as err:  # an interrupt included: a half-written shard never stays
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            if disk_full(err):
                raise CacheError(
                    f"no space left on the device while writing {final}; free space (or move "
                    f"cache.root) and rerun the same command: the {len(self.done())} finished "
                    "shards are kept and only the rest is computed"
                ) from err
            raise
        return info

    def _write_file(self, fd: int, index: int, n: int, *, hashes, emb, layers) -> None:
        # HDF5 builds the file in memory (it never opens a name on disk); its bytes go through the
        # descriptor that was created exclusively. A shard is held in memory anyway, and a full disk
        # is an ordinary OSError from the write.
        # fletcher32: HDF5 checks every chunk as it is read, so flipped bytes fail any read.
        with os.fdopen(fd, "wb") as fh:  # closed on any error too
            name = f"shard-{index}-{os.getpid()}.h5"  # in memory only
            with h5py.File(name, "w", driver="core", backing_store=False) as f:
                self._fill(f, index, n, hashes=hashes, emb=emb, layers=layers)
                f.flush()
                image = f.id.get_file_image()
            fh.write(image)
            fh.flush()
            os.fsync(fh.fileno())

    def _fill(self, f: h5py.File, index: int, n: int, *, hashes, emb, layers) -> None:
        f.attrs["key"] = self.key
        f.attrs["index"] = index
        f.attrs["format_version"] = FORMAT_VERSION
        f.create_dataset("text_sha256", data=as_bytes(hashes), chunks=True, fletcher32=True)
        group = f.create_group("emb")
        for pooling, arr in emb.items():
            rows, n_layers, hidden = arr.shape  # (rows, layers, hidden)
            assert rows == n and n_layers == len(layers[pooling])
            # Each pooling is written in its own array's dtype: the store dtype, or float32
            # where the extractor widened it for values beyond the store dtype's range.
            if not np.isfinite(arr).all():
                raise OverflowError(
                    f"{pooling} embeddings hold NaN or values beyond {arr.dtype}'s range: the "
                    "model's own computation overflowed; extract with `extract.dtype=float32` "
                    "and `extract.store_dtype=float32`"
                )
            # One chunk per (shard, layer): reading a layer is one contiguous read per shard.
            ds = group.create_dataset(pooling, data=arr, chunks=(rows, 1, hidden), fletcher32=True)
            ds.attrs["layers"] = np.asarray(layers[pooling], dtype=np.int64)

    def commit(self, *, base: Manifest | None, fields: dict, extraction: dict) -> Entry:
        """Write the manifest last: the shards listed before plus every finished pending shard. From
        this moment on the new rows count; the pending plan is then dropped."""
        done = self.done()
        missing = [s.index for s in self.pending() if s.index not in done]
        assert not missing, f"commit() before shards {missing} were written"
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        old = list(base.shards) if base else []
        manifest = Manifest(
            key=self.key,
            shards=tuple(old + [done[i] for i in sorted(done)]),
            created=base.created if base else now,
            updated=now,
            extractions=(*(base.extractions if base else ()), extraction),
            **fields,
        )
        write_json_atomic(
            self.entry.file("manifest.json"), manifest.to_json(), root=self.entry.root
        )
        self._pending_path.unlink(missing_ok=True)
        return self.entry


class KeyLock:
    """The key's lock: flock, which the kernel releases when its process dies, so a killed job never
    blocks the next (never a soft, file-exists lock: a stale one would block forever). The lock file
    is opened with O_NOFOLLOW and never truncated: a symbolic link planted at `.lock` is refused
    instead of creating or emptying the file it points to."""

    def __init__(self, path: Path, mode: int = 0o644):
        self.path = Path(path)
        self.mode = mode
        self._fd: int | None = None

    def acquire(self, timeout: float = -1, poll: float = 0.05) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags, self.mode)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise EscapeError(
                    f"{self.path} is a symbolic link; llmembed never opens a lock through a link: "
                    "remove it"
                ) from None
            raise
        with suppress(OSError):
            if os.fstat(fd).st_uid == os.geteuid():
                os.fchmod(fd, self.mode)
        deadline = None if timeout < 0 else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                return
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    os.close(fd)
                    raise Timeout(str(self.path)) from None
                time.sleep(poll)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def key_lock(kdir: Path, mode: int = -1) -> KeyLock:
    """The lock of the key folder `kdir`."""
    return KeyLock(kdir / ".lock", mode=0o644 if mode == -1 else mode)


def lock_is_held(kdir: Path) -> bool:
    """Whether a running job holds the key's lock, creating nothing (for `gc --dry-run`): a lock
    file that does not exist is not held."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(kdir / ".lock", flags)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # a link or an unreadable lock: not ours to judge, keep the entry
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


class Cache:
    """A cache root: find, lock, create and list entries."""

    def __init__(self, root: str | Path, *, group_writable: bool = False):
        self.root = Path(root).expanduser()
        self.group_writable = group_writable

    @contextmanager
    def creating(self) -> Iterator[None]:
        """While writing: with `group_writable`, everything created is group-writable and folders
        pass their group on (setgid), so that every member of a shared node's group can finish or
        repair what another started."""
        if not self.group_writable:
            yield
            return
        old = os.umask(0o002)
        try:
            yield
        finally:
            os.umask(old)

    def _make_dir(self, path: Path) -> None:
        if path != self.root:
            self.inside(path / "x")  # neither it nor a folder on the way leads out of the root
        path.mkdir(parents=True, exist_ok=True)
        if path != self.root and path.is_symlink():
            raise EscapeError(f"{path} is a symbolic link; llmembed never follows one: remove it")
        if self.group_writable:
            path.chmod(path.stat().st_mode | stat.S_IRWXG | stat.S_ISGID)

    def key_dir(self, key: str) -> Path:
        if not key or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"cache key must be lowercase hex, got {key!r}")
        return self.root / key

    def inside(self, path: Path) -> Path:
        """`path`, checked not to lead out of the root (see `keys.inside`)."""
        return inside(self.root, path)

    def links(self) -> list[Path]:
        """Key and selection folders that are symbolic links: never entries, never followed, never
        removed by llmembed (`ls` and `gc` report them)."""
        if not self.root.is_dir():
            return []
        out = [k for k in sorted(self.root.iterdir()) if k.is_symlink()]
        for kdir in sorted(self.root.iterdir()):
            if kdir.is_dir() and not kdir.is_symlink():
                out += [s for s in sorted(kdir.iterdir()) if s.is_symlink()]
        return out

    def hash_memo(self) -> Path:
        """Remembered file hashes and model shapes (see `JsonMemo`), one file per user."""
        return memo_path(self.root)

    def selections(self, key: str, layers: Sequence[int], poolings: Sequence[str]) -> list[Entry]:
        """Complete entries under `key` that store all the requested layers and poolings."""
        kdir = self.key_dir(key)
        if not kdir.is_dir() or kdir.is_symlink():
            return []
        out = []
        for sel in sorted(kdir.iterdir()):
            entry = Entry(sel)
            if not sel.is_dir() or sel.is_symlink() or not entry.complete:
                continue
            try:
                if entry.covers(layers, poolings):
                    out.append(entry)
            except ManifestError as err:  # one damaged entry does not stop the others
                log.warning("skipped: %s", err)
        return out

    def find(
        self, key: str, layers: Sequence[int], poolings: Sequence[str], hashes: np.ndarray
    ) -> Entry | None:
        """A complete entry under `key` that stores the layers and poolings and every text."""
        for entry in self.selections(key, layers, poolings):
            if entry.holds(hashes).all():
                return entry
        return None

    def prepare(self, spec: EntrySpec, layers: Sequence[int], poolings: Sequence[str]) -> Entry:
        """The (possibly new or half-written) entry for a selection."""
        kdir = self.inside(self.key_dir(spec.key))
        self._make_dir(kdir)
        spec_path = self.inside(kdir / "spec.json")
        if not spec_path.is_file():
            write_json_atomic(spec_path, spec.as_dict(), root=self.root)
        entry = Entry(kdir / selection_name(layers, poolings))
        self._make_dir(self.inside(entry.path))
        entry.file("manifest.json")  # the selection folder itself stays inside the root
        return entry

    def check_writable(self) -> None:
        """Fail before any work when the root cannot take new entries."""
        try:
            self._make_dir(self.root)
            fd, probe = create_exclusive(self.root / ".write-probe")
            os.close(fd)
            probe.unlink()
        except OSError as err:
            raise CacheRootError(
                f"cache root {self.root} is not writable ({err.strerror}); set cache.root=... or "
                "LLMEMBED_CACHE to a folder you can write"
            ) from None

    @contextmanager
    def lock(self, key: str, *, poll_log_s: float = 30.0) -> Iterator[None]:
        """Hold the key's lock; while waiting, say who holds it."""
        kdir = self.inside(self.key_dir(key))
        self._make_dir(kdir)
        self.inside(kdir / ".lock")
        lock = key_lock(kdir, mode=0o664 if self.group_writable else -1)
        owner = kdir / ".lock.owner.json"
        waited = 0.0
        while True:
            try:
                lock.acquire(timeout=poll_log_s if waited else 0.5)
                break
            except Timeout:
                waited += poll_log_s if waited else 0.5
                try:
                    who = json.loads(owner.read_text())
                except (OSError, json.JSONDecodeError):
                    who = {}
                log.info(
                    "waiting for cache key %s, held by pid %s on %s since %s",
                    key[:12],
                    who.get("pid", "?"),
                    who.get("host", "?"),
                    who.get("since", "?"),
                )
        try:
            write_json_atomic(
                owner,
                {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%c")},
                root=self.root,
            )
            yield
        finally:
            lock.release()

    def _key_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [
            k
            for k in sorted(self.root.iterdir())
            if k.is_dir() and not k.is_symlink() and (k / "spec.json").exists()
        ]

    @staticmethod
    def _format_of(kdir: Path) -> int | str | None:
        """The key's cache format; "damaged" where its spec.json cannot be read."""
        try:
            raw = json.loads((kdir / "spec.json").read_text())
        except (OSError, ValueError):
            return "damaged"
        return raw.get("format_version") if isinstance(raw, dict) else "damaged"

    def entries(self) -> list[Entry]:
        """Entries of this llmembed's format (complete or not); symbolic links are not entries."""
        return [
            Entry(sel)
            for kdir in self._key_dirs()
            if self._format_of(kdir) == FORMAT_VERSION
            for sel in sorted(kdir.iterdir())
            if sel.is_dir() and not sel.is_symlink()
        ]

    def old_format(self) -> list[Path]:
        """Key folders of another cache format: never read, listed by `ls`, removed by `gc`."""
        return [
            k for k in self._key_dirs() if self._format_of(k) not in (FORMAT_VERSION, "damaged")
        ]

    def damaged_keys(self) -> list[Path]:
        """Key folders whose spec.json cannot be read: `verify` names them, `--repair` removes them."""
        return [k for k in self._key_dirs() if self._format_of(k) == "damaged"]
