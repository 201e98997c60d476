"""Listing, verifying, repairing and cleaning a cache root (`llmembed-cache ls | verify | gc | rm`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import Timeout

from llmembed.cache.entry import Entry
from llmembed.cache.files import FileCheckError, build_index, open_shard, seal_of, sha256_hex
from llmembed.cache.format import (
    CacheError,
    CacheRootError,
    IndexInfo,
    Manifest,
    ManifestError,
    PoolingInfo,
    shard_name,
)
from llmembed.cache.keys import (
    EscapeError,
    file_sha256,
    fsync_dir,
    inside,
    short_identity,
    write_bytes_atomic,
    write_json_atomic,
)
from llmembed.cache.lock import key_lock, lock_is_held
from llmembed.cache.root import Cache, not_writable, writable
from llmembed.cache.usage import parse_stamp, read_usage
from llmembed.extract.converted import stale_copies

log = logging.getLogger(__name__)


@dataclass
class EntryRow:
    path: Path
    backbone: str
    model: str  # the backbone's path or hub id when it was extracted
    identity: str  # what pins its weights: commit, sha256, or a hash over its files' hashes
    hidden: int | None  # hidden size
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
            entry.path, "?", "?", "?", None, "?", None, "?", "?", 0.0, "", "",
            f"unreadable: {err.strerror}",
        )  # fmt: skip


def _describe(entry: Entry) -> EntryRow:
    usage = read_usage(entry.root, entry.file("usage.json"))
    try:
        s = entry.spec
        settings = f"{s.compute_dtype}/{s.store_dtype} len {s.max_length} {s.truncation_side}"
        if s.prompt != "{text}":
            settings += f" prompt {s.prompt!r}"
        identity = short_identity(s.backbone)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, CacheError):
        settings = identity = "?"
    datasets = ",".join(sorted(usage.datasets))
    note = f"; usage.json damaged: {usage.damage}" if usage.damage else ""
    if entry.complete:
        try:
            m = entry.manifest
        except CacheError as err:  # one damaged entry is named, the others are listed
            return EntryRow(
                entry.path, "?", "?", identity, None, settings, None, "?", "?",
                entry.size_bytes() / 2**20, "", datasets, f"damaged: {err}",
            )  # fmt: skip
        pending = (entry.path / "pending.h5").is_file()
        return EntryRow(
            entry.path,
            m.backbone["name"],
            str(m.backbone.get("path", "?")),
            identity,
            m.hidden_size,
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
        entry.path, "?", "?", identity, None, settings, None, "?", "?",
        entry.size_bytes() / 2**20, "", datasets, f"incomplete ({done} shards, resumable){note}",
    )  # fmt: skip


def describe_old(kdir: Path) -> EntryRow:
    return EntryRow(
        kdir, "?", "?", "?", None, "?", None, "?", "?", _folder_mb(kdir), "", "",
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
        "entry", "backbone", "model", "identity", "hidden", "settings", "texts", "layers",
        "poolings", "MB", "last used", "data sets", "status",
    )  # fmt: skip
    body = [
        (
            str(r.path.relative_to(root)),
            r.backbone,
            r.model,
            r.identity,
            "" if r.hidden is None else str(r.hidden),
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
    # shard: missing | size | checksum | unreadable | hashes | foreign | link (dropped) |
    # record (intact, the manifest's record or fields wrong: rebuilt from the shard) |
    # redundant (every text also in an earlier shard: dropped) | duplicate (some: kept)
    # entry: index (rebuilt from the shards) | unreadable-manifest (a shard listed twice is listed
    # once, else removed: the entry becomes incomplete) | spec (the key is removed)
    kind: str
    detail: str

    @property
    def file(self) -> Path:
        if self.kind == "spec":
            return self.entry.parent / "spec.json"
        if self.shard is None or self.kind == "record":
            return self.entry / "manifest.json"
        return self.entry / (shard_name(self.shard) + ".h5")

    def __str__(self) -> str:
        return f"{self.file}: {self.detail}"


def verify_entry(entry: Entry) -> list[Damage]:
    """Problems of a complete entry, each naming a file; empty when everything matches: the spec
    hashes to the key, the manifest parses and is this entry's, every shard has its recorded size,
    sha256 and seal, this entry's key, its own index, the manifest's rows, shapes and layers, and
    every chunk its recorded sha256; no text is stored twice; each hash index is the one recorded
    and lists exactly the shards' rows."""
    try:
        entry.spec  # noqa: B018  (spec.json must still hash to the key)
    except CacheError as err:
        return [Damage(entry.path, None, "spec", str(err))]
    try:
        m = entry.manifest
    except ManifestError as err:
        return [Damage(entry.path, None, "unreadable-manifest", str(err))]
    out: list[Damage] = []
    stored: list[np.ndarray] = []  # each healthy shard's text hashes
    for shard in m.shards:
        damage = _verify_shard(entry, shard, stored)
        if damage is not None:
            out.append(Damage(entry.path, shard.index, *damage))
    if not out:
        try:
            idx = entry.index()
        except CacheError as err:
            return [Damage(entry.path, None, "index", str(err))]
        every = np.sort(np.concatenate(stored)) if stored else idx.sorted_hashes[:0]
        if not np.array_equal(np.sort(idx.sorted_hashes), every):
            return [
                Damage(entry.path, None, "index", "the hash index does not list the shards' rows")
            ]
    return out


def _verify_shard(entry: Entry, shard, stored: list[np.ndarray]) -> tuple[str, str] | None:
    """(kind, detail) of one listed shard's damage, or None; a healthy shard's text hashes are
    appended to `stored`."""
    path = entry.path / shard.file
    if path.is_symlink():
        return "link", f"a symbolic link (to {os.readlink(path)}), not a shard written here"
    if not path.is_file():
        return "missing", "missing"
    if path.stat().st_size != shard.bytes:
        return "size", f"{path.stat().st_size} bytes, the manifest says {shard.bytes}"
    if file_sha256(path) != shard.sha256:
        return "checksum", "checksum mismatch (the file changed after it was written)"
    # The bytes are those written: whatever disagrees now is the manifest's record of the shard.
    try:
        with open_shard(path) as f:
            wrong = entry.mismatch(shard, f)
            if {"key", "index"} & set(wrong):
                return (
                    "foreign",
                    f"belongs to entry {f.attrs.get('key')} shard {f.attrs.get('index')}",
                )
            if wrong or seal_of(f.attrs) != shard.seal:
                said = f"records {wrong}" if wrong else "has another seal"
                return (
                    "record",
                    f"its record of {path}, whose bytes are intact, is wrong: it {said}",
                )
            f.check_seal(shard.seal)
            hashes = f.text_hashes()
            for pooling, layers in f.poolings.items():
                for j in range(len(layers)):
                    f.layer(pooling, j)  # checks the chunk's sha256
    except (OSError, FileCheckError) as err:
        return "unreadable", f"unreadable ({err})"
    ours = set(hashes.tolist())
    if len(ours) != shard.rows:
        return "hashes", "holds a text hash twice"
    earlier = {h for part in stored for h in part.tolist()}
    if ours <= earlier:
        return "redundant", "every one of its texts is stored in an earlier shard too"
    if ours & earlier:
        return "duplicate", f"{len(ours & earlier)} of its texts are stored in an earlier shard too"
    stored.append(hashes)
    return None


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
    the other texts; the next extraction recomputes just those), and rebuild the manifest's record
    of every shard that stays, and its hash index and fields (layers, hidden size, dtypes), from the
    shards themselves. A shard whose bytes match their recorded sha256 is never deleted unless every
    one of its texts is stored in another shard; an entry whose remaining shards disagree with each
    other is reset."""
    if not damage:
        return
    root = entry.root
    with _holding(entry.path.parent, wait=True):
        kinds = {d.kind for d in damage if d.shard is None}
        if "spec" in kinds:  # every selection of the key was filed under a spec that is not its own
            _remove_tree(root, entry.path.parent)
            return
        if "unreadable-manifest" in kinds:
            if (fixed := _deduplicated(entry)) is not None:  # a shard listed twice: list it once
                write_json_atomic(entry.file("manifest.json"), fixed.to_json(), root=root)
            else:  # the entry becomes incomplete, resumable
                entry.file("manifest.json").unlink(missing_ok=True)
            return
        m = entry.manifest
        # A duplicate shard's other texts are stored nowhere else, a record is fixed: they stay.
        bad = {d.shard for d in damage if d.kind not in ("duplicate", "record", "index")}
        fixed = _rebuilt(entry, m, [s for s in m.shards if s.index not in bad])
        if fixed is None:  # the shards disagree with each other: nothing to rebuild from
            _remove_tree(root, entry.path)
            return
        manifest, index_name, data = fixed
        write_bytes_atomic(entry.file(index_name), data, root=root)
        fsync_dir(entry.path)
        # first: readers stop using the dropped shards
        write_json_atomic(entry.file("manifest.json"), manifest.to_json(), root=root)
        for info in m.indexes:
            if info.file != index_name:
                entry.file(info.file).unlink(missing_ok=True)
        for index in bad:
            for suffix in (".h5", ".json"):
                entry.file(shard_name(index) + suffix).unlink(missing_ok=True)


def _rebuilt(entry: Entry, m: Manifest, kept: list):
    """(the manifest listing `kept` as the shards record themselves, its index's name and bytes),
    or None where the shards disagree on what the entry stores."""
    records, hashes, facts = [], [], set()
    for shard in kept:
        with open_shard(entry.path / shard.file) as f:
            seal = seal_of(f.attrs)
            f.check_seal(seal)  # the chunks are checked against the shard's own record
            records.append(dataclasses.replace(shard, rows=f.attrs["rows"], seal=seal, wide=f.wide))
            hashes.append((shard.index, f.text_hashes()))
            pooled = tuple(sorted((p, tuple(v)) for p, v in f.poolings.items()))
            facts.add((f.attrs["num_layers"], f.attrs["hidden_size"], pooled))
    if len(facts) > 1:
        return None
    fields = {}
    if facts:
        num_layers, hidden_size, pooled = facts.pop()
        wide = {p for r in records for p in r.wide} | {
            p for p, info in m.poolings.items() if info.dtype == "float32"
        }
        store = entry.spec.store_dtype
        fields = {
            "num_layers": num_layers,
            "hidden_size": hidden_size,
            "poolings": {p: PoolingInfo(v, "float32" if p in wide else store) for p, v in pooled},
            "layers": next((v for p, v in pooled if p != "pooler"), m.layers),
        }
    name = f"index-{max([s.index for s in kept], default=0):05d}r.h5"
    data = build_index(hashes)
    manifest = dataclasses.replace(
        m,
        shards=tuple(records),
        indexes=(IndexInfo(name, sum(r.rows for r in records), sha256_hex(data)),),
        **fields,
    )
    return manifest, name, data


def _deduplicated(entry: Entry):
    """The manifest with each shard listed once, where listing one twice is all that is wrong."""
    try:
        raw = json.loads(entry.file("manifest.json").read_text())
        seen, shards = set(), []
        for s in raw["shards"]:
            if s["index"] not in seen:
                seen.add(s["index"])
                shards.append(s)
        if len(shards) == len(raw["shards"]):
            return None
        fixed = Manifest.from_json({**raw, "shards": shards})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return fixed if fixed.key == entry.key else None


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
    for copy in stale_copies(cache.root):  # GGUF conversions of an older layout: never read
        if not _kept_for_rights(copy):
            removed.append(copy)
            if not dry_run:
                _remove_tree(cache.root, copy)
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
