"""The embedding cache on disk: entries, shards, manifests, locks. Only this module knows HDF5.

Layout under the cache root::

    <key>/spec.json                 readable spec that hashes to <key> (model, tokenizer, dtype, data, ...)
    <key>/.lock                     one writer per key (flock: the kernel frees it when a process dies)
    <key>/<sel>/plan.json           which rows go to which shard (fixed at the first start: resumable)
    <key>/<sel>/shard-00000.h5      a contiguous block of rows, one dataset per pooling
    <key>/<sel>/shard-00000.json    written after the shard: its rows, bytes and sha256
    <key>/<sel>/manifest.json       written last, by atomic rename: the entry is complete

`<sel>` names which layers and poolings an entry stores. Any complete entry under `<key>` whose
selection covers a request serves it; the model runs only when none does.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from filelock import FileLock, Timeout

from llmembed.cache.keys import file_sha256, fingerprint, write_json_atomic
from llmembed.errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")  # stored as int8 codes 0, 1, 2
STORE_DTYPES = {"float16": np.float16, "float32": np.float32}


class CacheError(UserError, RuntimeError):
    """A cache entry is damaged or does not match its manifest; the message names the file and the fix."""


class CacheRootError(UserError, PermissionError):
    """The cache root cannot take new entries; the message says how to point elsewhere."""


def selection_name(layers: Sequence[int], poolings: Sequence[str]) -> str:
    return "sel-" + fingerprint({"layers": sorted(layers), "poolings": sorted(poolings)}, length=12)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def disk_full(err: BaseException) -> bool:
    """ENOSPC, as an OSError or as HDF5 reports it from a flush (a RuntimeError naming errno 28)."""
    return getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err)


@dataclass(frozen=True)
class ShardInfo:
    index: int
    start: int  # first row (position in dataset order) held by this shard
    stop: int
    bytes: int
    sha256: str

    @property
    def file(self) -> str:
        return shard_name(self.index) + ".h5"


class Entry:
    """One stored (key, selection): complete when its manifest exists."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def key(self) -> str:
        return self.path.parent.name

    @property
    def spec(self) -> dict:
        return json.loads((self.path.parent / "spec.json").read_text())

    @property
    def about(self) -> dict:
        """Names for people (data set, backbone); not part of the key."""
        try:
            return json.loads((self.path / "about.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def complete(self) -> bool:
        return self.manifest_path.is_file()

    @property
    def manifest(self) -> dict:
        try:
            return json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            raise CacheError(
                f"{self.path} is incomplete (no manifest.json); rerun the extraction to finish it "
                "or remove it with `llmembed-cache gc`"
            ) from None

    def covers(self, layers: Sequence[int], poolings: Sequence[str]) -> bool:
        m = self.manifest
        # The pooler exists for the last layer only: it is covered when stored at all.
        return set(layers) <= set(m["layers"]) and all(p in m["poolings"] for p in poolings)

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    def shards(self) -> list[ShardInfo]:
        return [ShardInfo(**s) for s in self.manifest["shards"]]

    # --- reading -------------------------------------------------------------------------------
    def _open(self, shard: ShardInfo) -> h5py.File:
        path = self.path / shard.file
        try:
            return h5py.File(path, "r")
        except FileNotFoundError:
            raise CacheError(
                f"{path} is missing; run `llmembed-cache verify --repair` and rerun the extraction"
            ) from None
        except OSError as err:
            raise CacheError(
                f"{path} cannot be read as HDF5 ({err}); run `llmembed-cache verify --repair` "
                "and rerun the extraction to recompute it"
            ) from None

    def column(self, name: str) -> np.ndarray:
        """`row_id`, `label` or `split` for every row, in dataset order."""
        parts = []
        for shard in self.shards():
            with self._open(shard) as f:
                parts.append(self._load(shard, lambda f=f: f[name][:]))
                self._check_rows(shard, len(parts[-1]))
        return np.concatenate(parts)

    def read(self, pooling: str, layers: Sequence[int]) -> np.ndarray:
        """Embeddings `(rows, len(layers), hidden)` as float32, reading only the requested layers."""
        m = self.manifest
        if pooling not in m["poolings"]:
            raise KeyError(
                f"pooling {pooling!r} is not stored in {self.path}; stored: {sorted(m['poolings'])}"
            )
        stored = m["poolings"][pooling]["layers"]
        missing = [layer for layer in layers if layer not in stored]
        if missing:
            raise KeyError(f"layers {missing} are not stored for {pooling!r}; stored: {stored}")
        # h5py wants increasing indices; read in that order, then put back the order asked for.
        idx = [stored.index(layer) for layer in layers]
        order = sorted(set(idx))
        out = np.empty((m["rows"], len(layers), m["hidden_size"]), dtype=np.float32)
        for shard in self.shards():
            with self._open(shard) as f:
                ds = self._load(shard, lambda f=f: f["emb"][pooling])
                expected = (shard.stop - shard.start, len(stored), m["hidden_size"])
                if ds.shape != expected:
                    raise CacheError(
                        f"{self.path / shard.file}: emb/{pooling} has shape {ds.shape}, the manifest "
                        f"says {expected}; run `llmembed-cache verify --repair` and rerun the extraction"
                    )
                block = self._load(shard, lambda ds=ds: ds[:, order, :])
            out[shard.start : shard.stop] = block[:, [order.index(i) for i in idx], :]
        return out

    def _load(self, shard: ShardInfo, read):
        try:
            return read()
        except (OSError, KeyError) as err:  # a chunk checksum, a truncated or missing dataset
            raise CacheError(
                f"{self.path / shard.file} is damaged ({err}); run `llmembed-cache verify --repair` "
                "and rerun the extraction to recompute it"
            ) from None

    def _check_rows(self, shard: ShardInfo, n: int) -> None:
        if n != shard.stop - shard.start:
            raise CacheError(
                f"{self.path / shard.file} holds {n} rows, the manifest says "
                f"{shard.stop - shard.start}; run `llmembed-cache verify --repair`"
            )


class EntryWriter:
    """Writes one entry shard by shard. Each shard appears under its final name only when complete,
    so a crash at any moment leaves finished shards (kept on resume) and at most a temporary file."""

    def __init__(self, entry: Entry, plan: list[tuple[int, int]], *, store_dtype: str):
        self.entry = entry
        self.store_dtype = STORE_DTYPES[store_dtype]
        entry.path.mkdir(parents=True, exist_ok=True)
        plan_path = entry.path / "plan.json"
        if plan_path.is_file():  # a resumed run keeps the first run's shard boundaries
            self.plan = [tuple(p) for p in json.loads(plan_path.read_text())["shards"]]
        else:
            self.plan = [tuple(p) for p in plan]
            write_json_atomic(plan_path, {"shards": self.plan})

    def discard_leftovers(self) -> None:
        """Remove temporary files of killed runs; only for the holder of the key's lock, before
        any process of its job writes."""
        for tmp in self.entry.path.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def done(self) -> dict[int, ShardInfo]:
        """Shards already complete on disk (a sidecar and a file of the recorded size)."""
        out = {}
        for i, (start, stop) in enumerate(self.plan):
            side = self.entry.path / (shard_name(i) + ".json")
            if not side.is_file():
                continue
            info = ShardInfo(**json.loads(side.read_text()))
            data = self.entry.path / info.file
            same_rows = (info.start, info.stop) == (start, stop)
            if same_rows and data.is_file() and data.stat().st_size == info.bytes:
                out[i] = info
                continue
            log.warning("shard %s is damaged or stale; it will be recomputed", data)
        return out

    def write_shard(
        self,
        index: int,
        *,
        row_id: np.ndarray,
        label: np.ndarray,
        split: np.ndarray,
        emb: dict[str, np.ndarray],
        layers: dict[str, list[int]],
    ) -> ShardInfo:
        start, stop = self.plan[index]
        n = stop - start
        assert len(row_id) == len(label) == len(split) == n
        final = self.entry.path / (shard_name(index) + ".h5")
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        try:
            self._write_file(
                tmp, n, row_id=row_id, label=label, split=split, emb=emb, layers=layers
            )
            # A sidecar from an earlier, damaged copy must not vouch for the new file.
            final.with_suffix(".json").unlink(missing_ok=True)
            os.replace(tmp, final)
            info = ShardInfo(
                index=index,
                start=start,
                stop=stop,
                bytes=final.stat().st_size,
                sha256=file_sha256(final),
            )
            write_json_atomic(final.with_suffix(".json"), info.__dict__)  # now the shard counts
        except BaseException as err:  # an interrupt included: a half-written shard never stays
            tmp.unlink(missing_ok=True)
            if disk_full(err):
                raise CacheError(
                    f"no space left on the device while writing {final}; free space (or move "
                    f"cache.root) and rerun the same command: the {len(self.done())} finished "
                    "shards are kept and only the rest is computed"
                ) from err
            raise
        return info

    def _write_file(self, tmp: Path, n: int, *, row_id, label, split, emb, layers) -> None:
        # fletcher32: HDF5 checks every chunk as it is read, so flipped bytes fail any read.
        checked = {"chunks": True, "fletcher32": True}
        with h5py.File(tmp, "w") as f:
            f.create_dataset("row_id", data=row_id.astype(np.int64), **checked)
            f.create_dataset("label", data=label.astype(np.int64), **checked)
            f.create_dataset("split", data=split.astype(np.int8), **checked)
            group = f.create_group("emb")
            for pooling, arr in emb.items():
                rows, n_layers, hidden = arr.shape  # (rows, layers, hidden)
                assert rows == n and n_layers == len(layers[pooling])
                # An array handed in wider than the store dtype holds values beyond its range
                # (the extractor widened it): stored as it is, losslessly, never clipped.
                wide = arr.dtype.itemsize > np.dtype(self.store_dtype).itemsize
                values = arr.astype(np.float32 if wide else self.store_dtype, copy=False)
                if not np.isfinite(values).all():
                    raise OverflowError(
                        f"{pooling} embeddings hold NaN or values beyond {values.dtype.name}'s "
                        "range: the model's own computation overflowed; extract with "
                        "`extract.dtype=float32` and `extract.store_dtype=float32`"
                    )
                # One chunk per (shard, layer): reading a layer is one contiguous read per shard.
                ds = group.create_dataset(
                    pooling, data=values, chunks=(rows, 1, hidden), fletcher32=True
                )
                ds.attrs["layers"] = np.asarray(layers[pooling], dtype=np.int64)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())

    def finish(self, manifest: dict) -> Entry:
        """Write the manifest last: from this moment on the entry is complete."""
        shards = self.done()
        missing = [i for i in range(len(self.plan)) if i not in shards]
        assert not missing, f"finish() before shards {missing} were written"
        manifest = {**manifest, "shards": [shards[i].__dict__ for i in range(len(self.plan))]}
        write_json_atomic(self.entry.manifest_path, manifest)
        return self.entry


def key_lock(kdir: Path, mode: int = -1) -> FileLock:
    """The key's lock: flock, which the kernel releases when its process dies, so a killed job never
    blocks the next. Never the soft (file-exists) fallback: a stale soft lock would block forever."""
    return FileLock(kdir / ".lock", mode=mode, fallback_to_soft=False)


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
        path.mkdir(parents=True, exist_ok=True)
        if self.group_writable:
            path.chmod(path.stat().st_mode | stat.S_IRWXG | stat.S_ISGID)

    def key_dir(self, key: str) -> Path:
        if not key or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"cache key must be lowercase hex, got {key!r}")
        return self.root / key

    def hash_memo(self) -> Path:
        """Remembered file hashes and model shapes (see `JsonMemo`)."""
        return self.root / "memo.json"

    def find(self, key: str, layers: Sequence[int], poolings: Sequence[str]) -> Entry | None:
        """A complete entry under `key` that stores all the requested layers and poolings."""
        kdir = self.key_dir(key)
        if not kdir.is_dir():
            return None
        for sel in sorted(kdir.iterdir()):
            entry = Entry(sel)
            if sel.is_dir() and entry.complete and entry.covers(layers, poolings):
                return entry
        return None

    def prepare(
        self, key: str, spec: dict, layers: Sequence[int], poolings: Sequence[str], *, about: dict
    ) -> Entry:
        """The (possibly half-written) entry for a selection; `about` names it for people."""
        kdir = self.key_dir(key)
        self._make_dir(kdir)
        spec_path = kdir / "spec.json"
        if not spec_path.is_file():
            write_json_atomic(spec_path, spec)
        entry = Entry(kdir / selection_name(layers, poolings))
        self._make_dir(entry.path)
        write_json_atomic(entry.path / "about.json", about)
        return entry

    def check_writable(self) -> None:
        """Fail before any work when the root cannot take new entries."""
        try:
            self._make_dir(self.root)
            probe = self.root / f".write-probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as err:
            raise CacheRootError(
                f"cache root {self.root} is not writable ({err.strerror}); set cache.root=... or "
                "LLMEMBED_CACHE to a folder you can write"
            ) from None

    @contextmanager
    def lock(self, key: str, *, poll_log_s: float = 30.0) -> Iterator[None]:
        """Hold the key's lock; while waiting, say who holds it."""
        kdir = self.key_dir(key)
        self._make_dir(kdir)
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
            )
            yield
        finally:
            lock.release()

    def entries(self) -> list[Entry]:
        if not self.root.is_dir():
            return []
        return [
            Entry(sel)
            for kdir in sorted(self.root.iterdir())
            if kdir.is_dir() and (kdir / "spec.json").is_file()
            for sel in sorted(kdir.iterdir())
            if sel.is_dir()
        ]
