"""Listing, verifying, repairing and cleaning a cache root (`llmembed-cache ls | verify | gc | rm`)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import h5py
from filelock import Timeout

from llmembed.cache.keys import file_sha256, write_json_atomic
from llmembed.cache.store import Cache, Entry, key_lock, shard_name

log = logging.getLogger(__name__)


@dataclass
class EntryRow:
    path: Path
    backbone: str
    settings: str  # compute/store dtype, max length, prompt
    rows: int | None  # texts stored
    layers: str
    poolings: str
    size_mb: float
    last_used: str
    datasets: str  # which data sets used the entry
    status: str  # "complete", "complete, append pending", "incomplete", "old format"


def _layer_span(layers) -> str:
    layers = list(layers)
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def _folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def describe(entry: Entry) -> EntryRow:
    usage = entry.usage
    try:
        s = entry.spec
        settings = f"{s.compute_dtype}/{s.store_dtype} len {s.max_length} {s.truncation_side}"
        if s.prompt != "{text}":
            settings += f" prompt {s.prompt!r}"
    except (OSError, ValueError, KeyError):
        settings = "?"
    datasets = ",".join(sorted(usage.get("datasets", {})))
    if entry.complete:
        m = entry.manifest
        pending = (entry.path / "pending.json").is_file()
        return EntryRow(
            entry.path,
            m.backbone["name"],
            settings,
            m.rows,
            _layer_span(m.layers),
            ",".join(sorted(m.poolings)),
            entry.size_bytes() / 2**20,
            usage.get("last_used", m.updated)[:16].replace("T", " "),
            datasets,
            "complete, append pending (resumable)" if pending else "complete",
        )
    done = len(list(entry.path.glob("shard-*.json")))
    return EntryRow(
        entry.path, "?", settings, None, "?", "?", entry.size_bytes() / 2**20, "", datasets,
        f"incomplete ({done} shards, resumable)",
    )  # fmt: skip


def describe_old(kdir: Path) -> EntryRow:
    return EntryRow(
        kdir, "?", "?", None, "?", "?", _folder_mb(kdir), "", "",
        "old format: ignored, `llmembed-cache gc` removes it",
    )  # fmt: skip


def format_table(rows: list[EntryRow], root: Path) -> str:
    head = (
        "entry", "backbone", "settings", "texts", "layers", "poolings", "MB", "last used",
        "data sets", "status",
    )  # fmt: skip
    body = [
        (
            str(r.path.relative_to(root)),
            r.backbone,
            r.settings,
            "" if r.rows is None else str(r.rows),
            r.layers,
            r.poolings,
            f"{r.size_mb:.1f}",
            r.last_used,
            r.datasets,
            r.status,
        )
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    lines = [
        "  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)) for line in (head, *body)
    ]
    total = sum(r.size_mb for r in rows)
    lines.append(f"{len(rows)} entries, {total:.1f} MB in {root}")
    return "\n".join(lines)


# --- verify and repair ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Damage:
    """One problem of a complete entry. `shard` is None when the manifest itself is wrong (then the
    whole entry is recomputed); repair decides from `shard` and `kind`, never from the message."""

    entry: Path
    shard: int | None
    kind: str  # missing | size | checksum | unreadable | shape | foreign | manifest
    detail: str

    @property
    def file(self) -> Path:
        if self.shard is None:
            return self.entry / "manifest.json"
        return self.entry / (shard_name(self.shard) + ".h5")

    def __str__(self) -> str:
        return f"{self.file}: {self.detail}"


def verify_entry(entry: Entry) -> list[Damage]:
    """Problems of a complete entry, each naming a file; empty when every shard matches."""
    m = entry.manifest
    out = []
    for shard in m.shards:
        path = entry.path / shard.file

        def bad(kind: str, detail: str, shard=shard) -> None:
            out.append(Damage(entry.path, shard.index, kind, detail))

        if not path.is_file():
            bad("missing", "missing")
            continue
        if path.stat().st_size != shard.bytes:
            bad("size", f"{path.stat().st_size} bytes, the manifest says {shard.bytes}")
            continue
        if file_sha256(path) != shard.sha256:
            bad("checksum", "checksum mismatch (the file changed after it was written)")
            continue
        try:
            with h5py.File(path, "r") as f:
                if (f.attrs.get("key"), f.attrs.get("index")) != (entry.key, shard.index):
                    bad(
                        "foreign",
                        f"belongs to entry {f.attrs.get('key')} shard {f.attrs.get('index')}",
                    )
                    continue
                if f["text_sha256"].shape != (shard.rows, 32):
                    bad(
                        "shape",
                        f"text_sha256 has shape {f['text_sha256'].shape}, expected ({shard.rows}, 32)",
                    )
                for pooling, info in m.poolings.items():
                    want = (shard.rows, len(info.layers), m.hidden_size)
                    got = f["emb"][pooling].shape
                    if got != want:
                        bad("shape", f"emb/{pooling} has shape {got}, expected {want}")
        except (OSError, KeyError) as err:
            bad("unreadable", f"unreadable ({err})")
    # Every shard disagreeing in shape with the manifest: the manifest is what is wrong.
    shaped = {d.shard for d in out if d.kind == "shape"}
    if m.shards and shaped == {s.index for s in m.shards}:
        out = [
            Damage(entry.path, None, "manifest", "the manifest disagrees with every shard's shapes")
        ]
    return out


@contextmanager
def _holding(kdir: Path, *, wait: bool) -> Iterator[bool]:
    """The key's lock (yields False, holding nothing, when busy and not `wait`)."""
    lock = key_lock(kdir)
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def repair(entry: Entry, damage: list[Damage]) -> None:
    """Under the key's lock: drop damaged shards from the manifest (the entry stays complete for
    the other texts; the next extraction recomputes just those), or, where the manifest itself is
    wrong, reset the entry."""
    if not damage:
        return
    with _holding(entry.path.parent, wait=True):
        if any(d.shard is None for d in damage):
            shutil.rmtree(entry.path)
            return
        bad = {d.shard for d in damage}
        m = entry.manifest
        kept = dataclasses.replace(m, shards=tuple(s for s in m.shards if s.index not in bad))
        write_json_atomic(entry.manifest_path, kept.to_json())  # first: readers stop using them
        for index in bad:
            for suffix in (".h5", ".json"):
                (entry.path / (shard_name(index) + suffix)).unlink(missing_ok=True)


# --- gc and rm -----------------------------------------------------------------------------------
def _last_use(entry: Entry) -> float | None:
    stamp = entry.usage.get("last_used") or (entry.manifest.updated if entry.complete else None)
    if not stamp:
        return None
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z").timestamp()


def gc(cache: Cache, *, dry_run: bool = False, older_than_days: float | None = None) -> list[Path]:
    """Remove incomplete entries and entries of an old format that no running job holds, leftover
    temporary files and, with `older_than_days`, complete entries unused for that long."""
    removed = []
    for kdir in cache.old_format():
        with _holding(kdir, wait=False) as held:
            if held:
                removed.append(kdir)
                if not dry_run:
                    shutil.rmtree(kdir)
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    for entry in cache.entries():
        if entry.complete:
            for tmp in entry.path.glob(".*.tmp"):
                removed.append(tmp)
                if not dry_run:
                    tmp.unlink(missing_ok=True)
            used = _last_use(entry)
            if cutoff is None or used is None or used >= cutoff:
                continue
        with _holding(entry.path.parent, wait=False) as held:
            if not held:
                log.info("%s is being written by a running job: kept", entry.path)
                continue
            removed.append(entry.path)
            if not dry_run:
                shutil.rmtree(entry.path)
    return removed


def rm(cache: Cache, name: str) -> list[Path]:
    """Remove the entries named `name` (as `ls` shows it: `<key>/<sel>`, or a key or a prefix of
    one for all its selections), each with its key's lock held: a running writer finishes first."""
    targets = [
        e.path
        for e in cache.entries()
        if str(e.path.relative_to(cache.root)) == name.rstrip("/") or e.key.startswith(name)
    ]
    if not targets or len({p.parent for p in targets}) > 1:
        raise LookupError(
            f"{name!r} names {'no' if not targets else 'more than one'} cache key under "
            f"{cache.root}; give an entry as `llmembed-cache ls` shows it"
        )
    with _holding(targets[0].parent, wait=True):
        for path in targets:
            shutil.rmtree(path)
    return targets
