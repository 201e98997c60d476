"""`EntryWriter`: appends shards to an entry, crash-safe; only the holder of the key's lock makes one."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import h5py
import numpy as np

from llmembed.cache.entry import Entry
from llmembed.cache.format import (
    CacheError,
    Manifest,
    PlannedShard,
    ShardInfo,
    as_bytes,
    disk_full,
    shard_name,
)
from llmembed.cache.keys import (
    FORMAT_VERSION,
    create_exclusive,
    file_sha256,
    inside,
    write_json_atomic,
)

log = logging.getLogger(__name__)


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
