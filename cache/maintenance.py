"""Listing, verifying and cleaning a cache root (`llmembed-cache ls | verify | gc`)."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
from filelock import Timeout

from llmembed.cache.keys import file_sha256
from llmembed.cache.store import Cache, Entry, key_lock, shard_name

log = logging.getLogger(__name__)


@dataclass
class EntryRow:
    path: Path
    dataset: str
    backbone: str
    rows: int | None
    layers: str
    poolings: str
    size_mb: float
    created: str
    status: str  # "complete" or "incomplete (k/n shards)"


def _layer_span(layers: list[int]) -> str:
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def describe(entry: Entry) -> EntryRow:
    about = entry.about
    size = entry.size_bytes() / 2**20
    if entry.complete:
        m = entry.manifest
        return EntryRow(
            entry.path,
            m["dataset"]["name"],
            m["backbone"]["name"],
            m["rows"],
            _layer_span(m["layers"]),
            ",".join(sorted(m["poolings"])),
            size,
            m["created"][:16].replace("T", " "),
            "complete",
        )
    plan = entry.path / "plan.json"
    total = len(json.loads(plan.read_text())["shards"]) if plan.is_file() else 0
    done = len(list(entry.path.glob("shard-*.json")))
    return EntryRow(
        entry.path,
        about.get("dataset", "?"),
        about.get("backbone", "?"),
        None,
        "?",
        "?",
        size,
        "",
        f"incomplete ({done}/{total} shards)",
    )


def format_table(rows: list[EntryRow], root: Path) -> str:
    head = ("entry", "dataset", "backbone", "rows", "layers", "poolings", "MB", "created", "status")
    body = [
        (
            str(r.path.relative_to(root)),
            r.dataset,
            r.backbone,
            "" if r.rows is None else str(r.rows),
            r.layers,
            r.poolings,
            f"{r.size_mb:.1f}",
            r.created,
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


def verify_entry(entry: Entry) -> list[str]:
    """Problems of a complete entry, each naming a file; empty when every shard matches."""
    m = entry.manifest
    problems = []
    for shard in entry.shards():
        path = entry.path / shard.file
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        if path.stat().st_size != shard.bytes:
            problems.append(f"{path}: {path.stat().st_size} bytes, the manifest says {shard.bytes}")
            continue
        if file_sha256(path) != shard.sha256:
            problems.append(f"{path}: checksum mismatch (the file changed after it was written)")
            continue
        try:
            with h5py.File(path, "r") as f:
                rows = shard.stop - shard.start
                for name in ("row_id", "label", "split"):
                    if f[name].shape != (rows,):
                        problems.append(
                            f"{path}: {name} has shape {f[name].shape}, expected ({rows},)"
                        )
                for pooling, spec in m["poolings"].items():
                    want = (rows, len(spec["layers"]), m["hidden_size"])
                    got = f["emb"][pooling].shape
                    if got != want:
                        problems.append(f"{path}: emb/{pooling} has shape {got}, expected {want}")
        except (OSError, KeyError) as err:
            problems.append(f"{path}: unreadable ({err})")
    return problems


def remove_shard(entry: Entry, index: int) -> None:
    """Drop one shard and the manifest, so that the next run recomputes just that shard."""
    for suffix in (".h5", ".json"):
        (entry.path / (shard_name(index) + suffix)).unlink(missing_ok=True)
    entry.manifest_path.unlink(missing_ok=True)


def gc(cache: Cache, *, dry_run: bool = False) -> list[Path]:
    """Remove incomplete entries no running job holds, and leftover temporary files."""
    removed = []
    for entry in cache.entries():
        if entry.complete:
            for tmp in entry.path.glob(".*.tmp"):
                removed.append(tmp)
                if not dry_run:
                    tmp.unlink(missing_ok=True)
            continue
        lock = key_lock(entry.path.parent)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("%s is being written by a running job: kept", entry.path)
            continue
        try:
            removed.append(entry.path)
            if not dry_run:
                shutil.rmtree(entry.path)
        finally:
            lock.release()
    return removed
