"""The key's lock: one writer per key, released by the kernel when its process dies; who holds it, and
how a wait for it ends on Ctrl-C or SIGTERM."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from pathlib import Path

from filelock import Timeout

from llmembed.cache.keys import EscapeError

# Never through a link; O_NONBLOCK: a FIFO planted at the name must not block the open.
_NOFOLLOW = os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)

# The running command's stop check (`extract.cli.stop_on_signals` registers one): its handlers only
# take note of a signal, so a wait that never calls the check would outlive SIGTERM.
_stop_check: ContextVar[Callable[[], None] | None] = ContextVar("llmembed_stop", default=None)


@contextmanager
def waits_stop_on(check: Callable[[], None]) -> Iterator[None]:
    """While inside: every wait for a key's lock calls `check` at each poll, so that a signal the
    command took note of ends the wait at once (`check` raises KeyboardInterrupt)."""
    token = _stop_check.set(check)
    try:
        yield
    finally:
        _stop_check.reset(token)


class KeyLock:
    """The key's lock: flock, which the kernel releases when its process dies, so a killed job never
    blocks the next (never a soft, file-exists lock: a stale one would block forever).

    The lock file is opened with O_NOFOLLOW and never truncated on open: a symbolic link planted at
    `.lock` is refused instead of creating or emptying the file it points to. Its holder writes who
    it is into it (and empties it on release), only through the descriptor it locked and only when
    that is a regular file with one link, so a hard link planted there is never written through.
    flock needs no write access: a user who cannot write the file still takes the lock."""

    def __init__(self, path: Path, mode: int = 0o644):
        self.path = Path(path)
        self.mode = mode
        self._fd: int | None = None
        self._writable = False

    def _open(self) -> tuple[int, bool]:
        try:
            try:
                fd, writable = (
                    os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, self.mode),
                    True,
                )
            except PermissionError:  # another user's lock file: locked for reading, not written
                fd, writable = os.open(self.path, os.O_RDONLY | _NOFOLLOW), False
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise EscapeError(
                    f"{self.path} is a symbolic link; llmembed never opens a lock through a link: "
                    "remove it"
                ) from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise EscapeError(f"{self.path} is not a regular file; remove it")
        if writable and st.st_uid == os.geteuid() and st.st_nlink == 1:
            with suppress(OSError):
                os.fchmod(fd, self.mode)
        return fd, writable and st.st_nlink == 1

    def acquire(
        self, timeout: float = -1, poll: float = 0.05, check: Callable[[], None] | None = None
    ) -> None:
        """Wait for the lock (`timeout` seconds at most, -1: for ever); `check` (default: the
        running command's stop check) is called at every poll and may raise to end the wait."""
        check = check or _stop_check.get()
        fd, writable = self._open()
        deadline = None if timeout < 0 else time.monotonic() + timeout
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if check is not None:
                        check()
                    if deadline is not None and time.monotonic() >= deadline:
                        raise Timeout(str(self.path)) from None
                    time.sleep(poll)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._writable = fd, writable
        self._announce()

    def _announce(self) -> None:
        """Say who holds the lock, for those who wait: best effort (a full disk must not stop a
        job that would otherwise report it properly)."""
        if not self._writable:
            return
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python",
        }
        with suppress(OSError):
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps(me).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            if self._writable:
                with suppress(OSError):
                    os.ftruncate(fd, 0)  # the next waiter must not name a holder that left
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def holder(self) -> str:
        """Who holds the lock now, as a waiter says it: the live holder's pid from the kernel's
        lock table where it can be read (Linux), with what the holder wrote about itself."""
        try:
            fd = os.open(self.path, os.O_RDONLY | _NOFOLLOW)
        except OSError:
            return "held by a process that cannot be named"
        try:
            said = _said(fd)
            live = _flock_holders(os.fstat(fd))
        finally:
            os.close(fd)
        here = socket.gethostname()
        if live and said.get("pid") not in live:
            said = {}  # written by an earlier holder: not the one that holds it now
        pid = said.get("pid", live[0] if live else "?")
        host = said.get("host", here if live else "?")
        out = f"held by pid {pid} on {host}"
        if said.get("since"):
            out += f" since {said['since']}"
        if said.get("command"):
            out += f" ({said['command']})"
        return out


def _said(fd: int) -> dict:
    """What the holder wrote about itself; {} when nothing readable."""
    try:
        raw = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError, RecursionError):  # anyone may have written it
        return {}
    return raw if isinstance(raw, dict) else {}


def _flock_holders(st: os.stat_result) -> list[int]:
    """Pids holding a flock on the file `st` describes, from /proc/locks (empty elsewhere)."""
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        fields = line.split()
        if "->" in fields:  # a process blocked waiting, not a holder
            continue
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == want:
            with suppress(ValueError):
                out.append(int(fields[4]))
    return out


def key_lock(kdir: Path, mode: int = -1) -> KeyLock:
    """The lock of the key folder `kdir`."""
    return KeyLock(kdir / ".lock", mode=0o644 if mode == -1 else mode)


def lock_is_held(kdir: Path) -> bool:
    """Whether a running job holds the key's lock, creating nothing (for `gc --dry-run`): a lock
    file that does not exist is not held."""
    try:
        fd = os.open(kdir / ".lock", os.O_RDONLY | _NOFOLLOW)
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
