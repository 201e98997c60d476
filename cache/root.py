"""`Cache`: a cache root; finds, locks, creates and lists entries."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from filelock import Timeout

from llmembed.cache.entry import Entry
from llmembed.cache.format import (
    CacheRootError,
    EntrySpec,
    ManifestError,
    selection_name,
)
from llmembed.cache.keys import (
    FORMAT_VERSION,
    EscapeError,
    create_exclusive,
    inside,
    memo_path,
    write_json_atomic,
)
from llmembed.cache.lock import key_lock
from llmembed.errors import Interrupted, UserError

log = logging.getLogger(__name__)


KEY_NAME = re.compile(r"[0-9a-f]{8,64}")  # a key folder's name: a hex digest (cache.keys)


def root_path(value) -> Path:
    """A cache root setting as a folder. An empty one (LLMEMBED_CACHE set to '') or null is
    refused: read as a path it would be the current folder, which `gc` would then clean."""
    if value is None or not str(value).strip():
        raise UserError(
            f"the cache root is {'null' if value is None else 'empty'} (LLMEMBED_CACHE set to '' "
            "or cache.root=null): unset LLMEMBED_CACHE (~/.cache/llmembed) or name a folder"
        )
    return Path(str(value)).expanduser()


def writable(path: Path) -> bool:
    """Whether this process may create and remove names in the folder `path`."""
    return os.access(path, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids)


def _listing(folder: Path) -> list[Path]:
    """The names in a folder, sorted; none where it is missing or another user keeps it private."""
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


def not_writable(path: Path, doing: str) -> CacheRootError:
    """The one-line refusal for a folder of a shared root this user may not write."""
    try:
        st = path.stat()
        whose = f"it belongs to uid {st.st_uid} (group {st.st_gid}, {stat.filemode(st.st_mode)})"
    except OSError as err:
        whose = f"it cannot be read ({err.strerror})"
    return CacheRootError(
        f"cannot {doing} {path}: {whose} and you (uid {os.geteuid()}) may not write it; a "
        "user may read a shared entry, but append to it, gc or rm it only with write access "
        "(its group's members, when it was made with cache.group_writable=true): ask its owner, "
        "or set cache.root to a folder of your own"
    )


class Cache:
    """A cache root: find, lock, create and list entries."""

    def __init__(self, root: str | Path, *, group_writable: bool = False):
        self.root = root_path(root)
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
        try:
            path.mkdir(parents=True, exist_ok=True)
        except PermissionError:
            raise not_writable(path.parent, f"create {path.name} in") from None
        if path != self.root and path.is_symlink():
            raise EscapeError(f"{path} is a symbolic link; llmembed never follows one: remove it")
        # Only the owner may change a folder's mode; another member's folders are already shared.
        if self.group_writable and path.stat().st_uid == os.geteuid():
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
        removed by llmembed (`ls` and `gc` report them). Only where a key's name is: another
        folder under the root is not the cache's to report."""
        out = []
        for kdir in _listing(self.root):
            if not KEY_NAME.fullmatch(kdir.name):
                continue
            if kdir.is_symlink():
                out.append(kdir)
            elif kdir.is_dir():
                out += [s for s in _listing(kdir) if s.is_symlink()]
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
        for sel in _listing(kdir):
            entry = Entry(sel)
            try:
                real = sel.is_dir() and not sel.is_symlink()
                if real and entry.complete and entry.covers(layers, poolings):
                    out.append(entry)
            except ManifestError as err:  # one damaged entry does not stop the others
                log.warning("skipped: %s", err)
            except OSError as err:  # a folder another user keeps private (umask 077)
                log.info("skipped %s: it cannot be read (%s)", sel, err.strerror)
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
        if not writable(kdir):  # another user's key, private (umask 077) or not shared
            raise not_writable(kdir, "append to the cache entries of")
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
        """Hold the key's lock, to write under the key; while waiting, say who holds it. Ctrl-C or
        SIGTERM, as the running command takes note of them (`lock.waits_stop_on`), end the wait at
        once with `Interrupted`, before anything of this job is computed."""
        kdir = self.inside(self.key_dir(key))
        self._make_dir(kdir)
        self.inside(kdir / ".lock")
        if not writable(kdir):  # before the model loads: a shared entry another user made
            raise not_writable(kdir, "append to the cache entries of")
        lock = key_lock(kdir, mode=0o664 if self.group_writable else -1)
        waited = 0.0
        while True:
            try:
                lock.acquire(timeout=poll_log_s if waited else 0.5)
                break
            except Timeout:
                waited += poll_log_s if waited else 0.5
                log.info("waiting for cache key %s, %s", key[:12], lock.holder())
            except KeyboardInterrupt as err:
                raise Interrupted(
                    f"interrupted ({getattr(err, 'signal_name', 'SIGINT')}) while waiting for "
                    f"cache key {key[:12]} ({lock.holder()}): nothing was computed; rerun the same "
                    "command to resume",
                    getattr(err, "signal_number", signal.SIGINT),
                ) from None
        try:
            yield
        finally:
            lock.release()

    def _key_dirs(self) -> list[Path]:
        """Key folders: named as keys are (another folder under a root set by mistake to a
        project's is never taken for one, nor removed by `gc`), holding a spec.json."""
        return [
            k
            for k in _listing(self.root)
            if KEY_NAME.fullmatch(k.name)
            and k.is_dir()
            and not k.is_symlink()
            and os.path.exists(k / "spec.json")
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
            for sel in _listing(kdir)
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
