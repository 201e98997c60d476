"""`EntryWriter`: appends shards to an entry, crash-safe; only the holder of the key's lock makes one."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from llmembed.cache.entry import Entry
from llmembed.cache.files import build_index, build_plan, build_shard, read_plan, sha256_hex
from llmembed.cache.format import (
    CacheError,
    IndexInfo,
    Manifest,
    PlannedShard,
    ShardInfo,
    disk_full,
    shard_name,
)
from llmembed.cache.keys import (
    fsync_dir,
    inside,
    json_bytes,
    write_bytes_atomic,
    write_json_atomic,
)

log = logging.getLogger(__name__)


class EntryWriter:
    """Appends shards to one entry; only the holder of the key's lock makes one.

    The append's plan (`pending.h5`: every new shard's texts and forward batches) is written before
    any shard; each shard appears under its final name only when complete, its sidecar after it;
    then the commit writes the new shards' hash index, fsyncs the folder and writes the manifest
    last. A crash at any moment leaves the entry as it was (its manifest lists only shards that
    were complete before), finished new shards (adopted by the next append) and at most a temporary
    file. Listed shards are never rewritten or removed by an append, so a reader holding the
    previous manifest reads on."""

    def __init__(self, entry: Entry, *, key: str):
        self.entry = entry
        self.key = key
        inside(entry.root, entry.path).mkdir(parents=True, exist_ok=True)

    @property
    def _pending_path(self) -> Path:
        return self.entry.file("pending.h5")

    def pending(self) -> list[PlannedShard]:
        """The plan of an append that did not finish (empty when none)."""
        try:
            path = inside(self.entry.root, self._pending_path, follow=True)
            if not path.is_file():
                return []
            return read_plan(path, self.key)
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning(
                "the pending plan %s is damaged (%s): planning again", self._pending_path, err
            )
            return []

    def set_pending(self, shards: list[PlannedShard]) -> None:
        self._write(self._pending_path, build_plan(self.key, shards))

    def listed(self) -> list[ShardInfo]:
        return list(self.entry.manifest.shards) if self.entry.complete else []

    def settle(self) -> None:
        """Finish what a killed commit left: a pending plan whose shards the manifest already lists
        was committed (the job died before removing it), so it is dropped, not appended again."""
        pending = self.pending()
        listed = {s.index for s in self.listed()}
        if pending and all(s.index in listed for s in pending):
            self._pending_path.unlink(missing_ok=True)
            log.info("%s: the last append was committed; its plan is removed", self.entry.path)

    def discard_leftovers(self) -> None:
        """Remove temporary files of killed runs, and shard and index files that neither the manifest
        nor the pending append names; only for the holder of the key's lock, before anyone of its
        job writes."""
        self.settle()
        folder = inside(self.entry.root, self.entry.path)
        self.entry.file("x")  # the folder itself must not lead out of the root
        for tmp in folder.glob(".*.tmp"):
            inside(self.entry.root, tmp).unlink(missing_ok=True)  # a link is removed, not followed
        keep = {s.index for s in self.listed()} | {s.index for s in self.pending()}
        for f in folder.glob("shard-*.*"):
            if _number(f.name, "shard-") not in keep:
                inside(self.entry.root, f).unlink(missing_ok=True)
        indexes = {i.file for i in self.entry.manifest.indexes} if self.entry.complete else set()
        for f in folder.glob("index-*.h5"):
            if f.name not in indexes:
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
                info.index == planned.index
                and info.rows == planned.rows
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
        num_layers: int,
    ) -> ShardInfo:
        """Write one shard from rows already checked (finite, in their store dtype), each pooling's
        array layer-major (layers, rows, hidden). The file is built in memory, hashed there and
        written through a descriptor created exclusively."""
        final = self.entry.file(shard_name(index) + ".h5")
        side = self.entry.file(shard_name(index) + ".json")
        try:
            hidden = next(iter(emb.values())).shape[-1]
            image = build_shard(
                key=self.key,
                index=index,
                num_layers=num_layers,
                hidden_size=hidden,
                hashes=hashes,
                emb=emb,
                layers=layers,
            )
            # A sidecar from an earlier, damaged copy must not vouch for the new file.
            side.unlink(missing_ok=True)
            self._write(final, image.data)
            info = ShardInfo(
                index=index,
                rows=len(hashes),
                bytes=len(image.data),
                sha256=image.sha256,
                seal=image.seal,
                wide=image.wide,
            )
            write_json_atomic(side, info.__dict__, root=self.entry.root)  # now the shard counts
        except BaseException as err:
            if disk_full(err):
                raise CacheError(
                    f"no space left on the device while writing {final}; free space (or move "
                    f"cache.root) and rerun the same command: the {len(self.done())} finished "
                    "shards are kept and only the rest is computed"
                ) from err
            raise
        return info

    def _write(self, path: Path, data) -> None:
        try:
            write_bytes_atomic(path, data, root=self.entry.root)
        except OSError as err:
            if disk_full(err):
                raise CacheError(
                    f"no space left on the device while writing {path}; free space (or move "
                    "cache.root) and rerun the same command: finished shards are kept"
                ) from err
            raise

    def commit(self, *, base: Manifest | None, fields: dict, extraction: dict) -> Entry:
        """Make the finished pending shards count: write their hash index, fsync the folder (so that
        every shard the manifest will name is on disk), then the manifest, last. Shards the base
        manifest already lists are never added twice. The pending plan is then dropped."""
        pending, done = self.pending(), self.done()
        missing = [s.index for s in pending if s.index not in done]
        assert not missing, f"commit() before shards {missing} were written"
        listed = {s.index for s in base.shards} if base else set()
        new = [s for s in pending if s.index not in listed]
        old_indexes = list(base.indexes) if base else []
        if new:
            name = f"index-{new[0].index:05d}.h5"
            data = build_index([(s.index, s.hashes) for s in new])
            self._write(self.entry.file(name), data)
            old_indexes.append(IndexInfo(name, sum(s.rows for s in new), sha256_hex(data)))
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        manifest = Manifest(
            key=self.key,
            shards=(*(base.shards if base else ()), *(done[s.index] for s in new)),
            indexes=tuple(old_indexes),
            created=base.created if base else now,
            updated=now,
            extractions=(*(base.extractions if base else ()), extraction),
            **fields,
        )
        folder = inside(self.entry.root, self.entry.path)
        fsync_dir(folder)
        self._write(self.entry.file("manifest.json"), json_bytes(manifest.to_json()))
        self._pending_path.unlink(missing_ok=True)
        fsync_dir(folder)
        return self.entry


def _number(name: str, prefix: str) -> int | None:
    """The number in `shard-00012.h5` and its sidecar; None for any other name."""
    digits = name.removeprefix(prefix).split(".", 1)[0]
    return int(digits) if name.startswith(prefix) and digits.isdigit() else None
