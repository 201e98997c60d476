"""The key's lock: one writer per key, released by the kernel when its process dies."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from contextlib import suppress
from pathlib import Path

from filelock import Timeout

from llmembed.cache.keys import (
    EscapeError,
)


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
