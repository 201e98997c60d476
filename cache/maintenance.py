"""Listing, verifying, repairing and cleaning a cache root (`llmembed-cache ls | verify | gc | rm`)."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from filelock import Timeout

from llmembed.cache.entry import Entry
from llmembed.cache.format import (
    HASH_BYTES,
    CacheError,
    CacheRootError,
    ManifestError,
    shard_name,
)
from llmembed.cache.keys import EscapeError, file_sha256, inside, write_json_atomic
from llmembed.cache.lock import key_lock, lock_is_held
from llmembed.cache.root import Cache, not_writable, writable
from llmembed.cache.usage import parse_stamp, read_usage

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
    """The `ls` row of an entry; one that cannot be read (another user's private folder) or whose
    usage record is damaged is named as such, and the other entries are listed as usual."""
    try:
        return _describe(entry)
    except OSError as err:
        return EntryRow(
            entry.path, "?", "?", None, "?", "?", 0.0, "", "", f"unreadable: {err.strerror}"
        )


def _describe(entry: Entry) -> EntryRow:
    usage = read_usage(entry.root, entry.file("usage.json"))
    try:
        s = entry.spec
        settings = f"{s.compute_dtype}/{s.store_dtype} len {s.max_length} {s.truncation_side}"
        if s.prompt != "{text}":
            settings += f" prompt {s.prompt!r}"
    except (OSError, ValueError, KeyError, CacheError):
        settings = "?"
    datasets = ",".join(sorted(usage.datasets))
    note = f"; usage.json damaged: {usage.damage}" if usage.damage else ""
    if entry.complete:
        try:
            m = entry.manifest
        except CacheError as err:  # one damaged entry is named, the others are listed
            return EntryRow(
                entry.path, "?", settings, None, "?", "?", entry.size_bytes() / 2**20, "",
                datasets, f"damaged: {err}",
            )  # fmt: skip
        pending = (entry.path / "pending.json").is_file()
        return EntryRow(
            entry.path,
            m.backbone["name"],
            settings,
            m.rows,
            _layer_span(m.layers),
            ",".join(sorted(m.poolings)),
            entry.size_bytes() / 2**20,
            str(usage.last_used or m.updated)[:16].replace("T", " "),
            datasets,
            ("complete, append pending (resumable)" if pending else "complete") + note,
        )
    done = len(list(entry.path.glob("shard-*.json")))
    return EntryRow(
        entry.path, "?", settings, None, "?", "?", entry.size_bytes() / 2**20, "", datasets,
        f"incomplete ({done} shards, resumable){note}",
    )  # fmt: skip


def describe_old(kdir: Path) -> EntryRow:
    return EntryRow(
        kdir, "?", "?", None, "?", "?", _folder_mb(kdir), "", "",
        "old format: ignored, `llmembed-cache gc` removes it",
    )  # fmt: skip


def describe_link(path: Path) -> str:
    """A symbolic link where a key or selection folder belongs: reported, never followed."""
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return (
        f"{path}: a symbolic link (to {target}), not an entry: llmembed never follows or removes "
        "it; remove the link yourself if it is not meant to be there"
    )


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
    # shard: missing | size | checksum | unreadable | shape | layers | hashes | foreign | link
    # entry: manifest (disagrees with every shard: reset) | unreadable-manifest (removed: the entry
    # becomes incomplete) | spec (spec.json no longer hashes to the key: the key is removed)
    kind: str
    detail: str

    @property
    def file(self) -> Path:
        if self.kind == "spec":
            return self.entry.parent / "spec.json"
        if self.shard is None:
            return self.entry / "manifest.json"
        return self.entry / (shard_name(self.shard) + ".h5")

    def __str__(self) -> str:
        return f"{self.file}: {self.detail}"


def verify_entry(entry: Entry) -> list[Damage]:
    """Problems of a complete entry, each naming a file; empty when every shard matches: the spec
    hashes to the key, the manifest parses and is this entry's, and every shard has its recorded
    size and sha256, this entry's key and its own index, the manifest's shapes and layers, and
    text hashes that no other shard holds."""
    try:
        entry.spec  # noqa: B018  (spec.json must still hash to the key)
    except CacheError as err:
        return [Damage(entry.path, None, "spec", str(err))]
    try:
        m = entry.manifest
    except ManifestError as err:
        return [Damage(entry.path, None, "unreadable-manifest", str(err))]
    out = []
    seen: set[bytes] = set()
    for shard in m.shards:
        path = entry.path / shard.file

        def bad(kind: str, detail: str, shard=shard) -> None:
            out.append(Damage(entry.path, shard.index, kind, detail))

        if path.is_symlink():
            bad("link", f"a symbolic link (to {os.readlink(path)}), not a shard written here")
            continue
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
                if f["text_sha256"].shape != (shard.rows, HASH_BYTES):
                    bad(
                        "shape",
                        f"text_sha256 has shape {f['text_sha256'].shape}, expected ({shard.rows}, 32)",
                    )
                    continue
                hashes = {r.tobytes() for r in np.asarray(f["text_sha256"][:])}
                if len(hashes) != shard.rows or hashes & seen:
                    bad("hashes", "holds text hashes twice, or ones another shard holds")
                seen |= hashes
                for pooling, info in m.poolings.items():
                    want = (shard.rows, len(info.layers), m.hidden_size)
                    ds = f["emb"][pooling]
                    if ds.shape != want:
                        bad("shape", f"emb/{pooling} has shape {ds.shape}, expected {want}")
                        continue
                    own = [int(x) for x in ds.attrs.get("layers", [])]
                    if own != list(info.layers):
                        bad(
                            "layers",
                            f"emb/{pooling} holds layers {own}, the manifest says {list(info.layers)}",
                        )
        except (OSError, KeyError) as err:
            bad("unreadable", f"unreadable ({err})")
    # Every shard disagreeing in shape or layers with the manifest: the manifest is what is wrong.
    shaped = {d.shard for d in out if d.kind in ("shape", "layers")}
    if m.shards and shaped == {s.index for s in m.shards}:
        out = [
            Damage(
                entry.path,
                None,
                "manifest",
                "the manifest disagrees with every shard's shapes or layers; "
                "`llmembed-cache verify --repair` resets the entry",
            )
        ]
    return out


@contextmanager
def _holding(kdir: Path, *, wait: bool) -> Iterator[bool]:
    """The key's lock (yields False, holding nothing, when busy and not `wait`)."""
    inside(kdir.parent, kdir / ".lock")
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
    root = entry.root
    with _holding(entry.path.parent, wait=True):
        kinds = {d.kind for d in damage if d.shard is None}
        if "spec" in kinds:  # every selection of the key was filed under a spec that is not its own
            _remove_tree(root, entry.path.parent)
            return
        if "unreadable-manifest" in kinds:  # the entry becomes incomplete, resumable
            entry.file("manifest.json").unlink(missing_ok=True)
            return
        if kinds:
            _remove_tree(root, entry.path)
            return
        bad = {d.shard for d in damage}
        m = entry.manifest
        kept = dataclasses.replace(m, shards=tuple(s for s in m.shards if s.index not in bad))
        # first: readers stop using them
        write_json_atomic(entry.file("manifest.json"), kept.to_json(), root=root)
        for index in bad:
            for suffix in (".h5", ".json"):
                entry.file(shard_name(index) + suffix).unlink(missing_ok=True)


def repair_key(cache: Cache, kdir: Path) -> None:
    """Remove a key folder whose spec.json cannot be read, under the key's lock."""
    with _holding(kdir, wait=True):
        _remove_tree(cache.root, kdir)


def _remove_tree(root: Path, path: Path) -> None:
    """Remove a folder inside `root`, never through a symbolic link (rmtree removes links inside
    it as links)."""
    inside(root, path)
    if path.is_symlink():
        raise EscapeError(f"{path} is a symbolic link; llmembed does not remove through links")
    shutil.rmtree(path)


# --- gc and rm -----------------------------------------------------------------------------------
def _last_use(entry: Entry) -> float | None:
    """When the entry was last used: its usage record, else (none, or damaged) its manifest's
    date."""
    usage = read_usage(entry.root, entry.file("usage.json"))
    if usage.damage:
        log.info(
            "%s: damaged (%s); its last use is taken from the manifest",
            entry.file("usage.json"),
            usage.damage,
        )
    stamp = usage.last_used or (entry.manifest.updated if entry.complete else None)
    return parse_stamp(stamp)


def _removable(entry: Entry, cutoff: float | None) -> bool:
    """Incomplete, or (with a cutoff) complete and unused since it; a damaged manifest is kept for
    `verify --repair` to judge."""
    if not entry.complete:
        return True
    if cutoff is None:
        return False
    try:
        used = _last_use(entry)
    except CacheError:
        return False
    return used is not None and used < cutoff


def gc(cache: Cache, *, dry_run: bool = False, older_than_days: float | None = None) -> list[Path]:
    """Remove incomplete entries and entries of an old format that no running job holds, leftover
    temporary files and, with `older_than_days`, complete entries unused for that long.

    Symbolic links where key or selection folders belong are never followed or removed (`ls` and
    `gc` report them); nothing outside the root is removed. Whether an entry may go is decided again
    once its key's lock is held, so a job that finishes meanwhile keeps its entry. `dry_run` only
    looks: it creates nothing, no lock file either."""
    removed = []

    def free(kdir: Path):
        if dry_run:
            return nullcontext(not lock_is_held(kdir))
        return _holding(kdir, wait=False)

    for kdir in cache.old_format():
        if _kept_for_rights(kdir):
            continue
        with free(kdir) as held:
            if held and kdir in cache.old_format():
                removed.append(kdir)
                if not dry_run:
                    _remove_tree(cache.root, kdir)
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    for entry in cache.entries():
        try:
            temps = list(entry.path.glob(".*.tmp")) if entry.complete else []
            if not temps and not _removable(entry, cutoff):
                continue
        except OSError as err:  # another user's private folder
            log.info("kept %s: it cannot be read (%s)", entry.path, err.strerror)
            continue
        if _kept_for_rights(entry.path):
            continue
        with free(entry.path.parent) as held:
            if not held:
                log.info("%s is being written by a running job: kept", entry.path)
                continue
            # A temporary file of no running job (the key's lock is free) is a leftover.
            for tmp in entry.path.glob(".*.tmp") if entry.complete else ():
                removed.append(tmp)
                if not dry_run:
                    cache.inside(tmp).unlink(missing_ok=True)  # a link itself, never its target
            # Decided again under the lock: a job may have completed the entry meanwhile.
            if not _removable(entry, cutoff):
                continue
            removed.append(entry.path)
            if not dry_run:
                _remove_tree(cache.root, entry.path)
    return removed


def _refusal(path: Path) -> CacheRootError | None:
    """Why this user may not remove the folder `path` with all it holds (None: they may). That
    takes write access to its parent and to every folder inside it; checked before anything is
    removed, so that an entry is never left half removed for lack of rights."""
    folders, unlisted = [path.parent], []
    for folder, _, _ in os.walk(path, onerror=lambda err: unlisted.append(Path(err.filename))):
        folders.append(Path(folder))
    blocked = unlisted + [f for f in folders if not writable(f)]  # cannot be listed, or written
    return not_writable(blocked[0], "remove anything in") if blocked else None


def _kept_for_rights(path: Path) -> bool:
    """True (and says so) when this user may not remove `path`: `gc` keeps it and goes on."""
    refused = _refusal(path)
    if refused is not None:
        log.info("kept %s: %s", path, refused)
    return refused is not None


def rm(cache: Cache, name: str) -> list[Path]:
    """Remove the entries named `name` (as `ls` shows it: `<key>/<sel>`, or a key or a prefix of
    one for all its selections), each with its key's lock held: a running writer finishes first."""
    if not name.strip("/") or ".." in Path(name).parts:
        raise LookupError(
            f"{name!r} is not an entry name; give one as `llmembed-cache ls` shows it"
        )
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
    for path in targets:
        if (refused := _refusal(path)) is not None:
            raise refused
    with _holding(targets[0].parent, wait=True):
        for path in targets:
            _remove_tree(cache.root, path)
    return targets
