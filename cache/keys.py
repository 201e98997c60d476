"""Deterministic fingerprints: the cache is addressed by a hash of everything that changes its numbers.

Hashing is type-tagged and order-independent for mappings, so `{"a": 1, "b": 2}` and `{"b": 2, "a": 1}`
hash alike while `1`, `1.0`, `"1"` and `True` do not. A value that cannot be hashed is an error, never a
random fingerprint: a cache that silently misses forever is worse than one that refuses.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path

import numpy as np

from llmembed.errors import UserError

# Bump when the stored numbers or the on-disk layout change: old entries then simply miss (and
# `llmembed-cache ls` reports them, `gc` removes them). 2: entries keyed by the computation only, rows
# addressed by text hash, shards appended over time. 3: a sha256 per chunk and a seal per shard
# checked by every read (no Fletcher-32), binary plans and per-commit hash indexes.
FORMAT_VERSION = 3


def _feed(h: hashlib._Hash, value: object) -> None:
    if value is None:
        h.update(b"N")
    elif isinstance(value, bool):
        h.update(b"B1" if value else b"B0")
    elif isinstance(value, int):
        h.update(b"I" + str(value).encode() + b";")
    elif isinstance(value, float):
        h.update(b"F" + value.hex().encode() + b";")
    elif isinstance(value, str):
        data = value.encode("utf-8")
        h.update(b"S" + str(len(data)).encode() + b":" + data)
    elif isinstance(value, bytes):
        h.update(b"Y" + str(len(value)).encode() + b":" + value)
    elif isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value)
        if arr.dtype == object:
            raise TypeError("cannot fingerprint an object array; convert it to a list of str first")
        h.update(b"A" + arr.dtype.str.encode() + repr(arr.shape).encode())
        h.update(arr.tobytes())
    elif isinstance(value, Mapping):
        h.update(b"M" + str(len(value)).encode() + b"{")
        for key in sorted(value, key=str):
            if not isinstance(key, str):
                raise TypeError(f"cannot fingerprint a mapping with non-str key {key!r}")
            _feed(h, key)
            _feed(h, value[key])
        h.update(b"}")
    elif isinstance(value, Sequence):
        h.update(b"L" + str(len(value)).encode() + b"[")
        for item in value:
            _feed(h, item)
        h.update(b"]")
    else:
        raise TypeError(
            f"cannot fingerprint a value of type {type(value).__name__}: {value!r}; "
            "cache keys accept None, bool, int, float, str, bytes, numpy arrays, lists and dicts"
        )


def fingerprint(value: object, *, length: int = 32) -> str:
    """Hex digest of `value`, stable across processes, machines and Python versions."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()[:length]


def short_identity(identity: Mapping) -> str:
    """A backbone identity (`EntrySpec.backbone`) in a few characters, for listings and model
    cards: a hub commit, a GGUF file's sha256, or a hash over a local folder's file hashes (two
    copies of the same weights read alike), with the tokenizer's when another one is set."""
    if "commit" in identity:
        text = f"commit {str(identity['commit'])[:12]}"
    elif "gguf_sha256" in identity:
        text = f"sha256 {str(identity['gguf_sha256'])[:12]}"
    elif "files" in identity:
        text = f"files {fingerprint(identity['files'], length=12)}"
    else:
        text = fingerprint(dict(identity), length=12)
    if isinstance(identity.get("tokenizer"), Mapping):
        text += f" + tokenizer {short_identity(identity['tokenizer'])}"
    return text


def text_hashes(texts: Sequence[str]) -> np.ndarray:
    """(n,) `S32`: the sha256 digest of each text's UTF-8 bytes, exactly as given (before any prompt
    template is applied; the template is part of the entry's key instead). This is how rows are
    addressed inside a cache entry: the same string is the same row in every data set."""
    return np.array([hashlib.sha256(t.encode("utf-8")).digest() for t in texts], dtype="S32")


# Set by `memo_read_only`: memos are read but never written (`llmembed.encode(cache=False)`).
_MEMO_READ_ONLY: ContextVar[bool] = ContextVar("llmembed_memo_read_only", default=False)


@contextlib.contextmanager
def memo_read_only() -> Iterator[None]:
    """Inside, `JsonMemo.put` writes nothing: what runs there leaves the cache root untouched."""
    token = _MEMO_READ_ONLY.set(True)
    try:
        yield
    finally:
        _MEMO_READ_ONLY.reset(token)


class JsonMemo:
    """A small JSON file of remembered facts (file hashes, model shapes), shared by one user's
    processes.

    A lost update between two processes costs only a recomputation, so no lock is taken. The file is
    trusted only when it is a regular file (not a link) owned by the user who reads it: in a shared
    root another user's memo could name any hash for any file, and so any cache key.
    """

    def __init__(self, path: Path | None):
        self.path = path

    def _load(self) -> dict:
        if self.path is None:
            return {}
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return {}  # absent, or a link: nothing remembered
        try:
            with os.fdopen(fd, "r") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                    return {}
                raw = json.load(f)
            return raw if isinstance(raw, dict) else {}
        except (OSError, ValueError):
            return {}  # a damaged memo only costs a recomputation

    def get(self, key: str):
        return self._load().get(key)

    def put(self, key: str, value) -> None:
        if self.path is None or _MEMO_READ_ONLY.get():
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, {**self._load(), key: value})
        except OSError:
            pass  # a read-only cache (a reader on a shared node) just does not remember


REHASH_ENV = "LLMEMBED_REHASH"  # set to 1: hash every weight file again, ignoring the memo


def memo_path(root: Path) -> Path:
    """The hash memo of the user running llmembed, in a cache root: one per user, since a memo is
    trusted only by its owner."""
    return Path(root) / f"memo-{os.geteuid()}.json"


def file_stamp(path: Path) -> str:
    """What the hash memo trusts about a file: its resolved path, size, mtime, inode and ctime. An
    in-place write or a rename over the file changes ctime (which users cannot set) or the inode, so
    weights replaced with the same size and mtime are hashed again."""
    st = path.stat()
    return f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}"


def file_sha256(path: Path, *, memo: Path | None = None) -> str:
    """sha256 of a file's bytes; with `memo`, remembered per `file_stamp` (path, size, mtime, inode,
    ctime) so that a big weight file is read once, not at every run. `LLMEMBED_REHASH=1` ignores
    what the memo remembers."""
    path = Path(path).resolve()
    stamp = file_stamp(path)
    known = JsonMemo(memo)
    digest = None if os.environ.get(REHASH_ENV, "") not in ("", "0") else known.get(stamp)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        digest = h.hexdigest()
        known.put(stamp, digest)
    return digest


class EscapeError(UserError, PermissionError):
    """A path inside the cache root resolves outside it (a planted symbolic link, a `..` name)."""


def inside(root: Path, path: Path, *, follow: bool = False) -> Path:
    """`path`, after checking that it stays inside `root` once every symbolic link on the way to it
    is resolved. The last component is not followed unless `follow` (for reading): a link there is
    replaced or removed as a link, never through it. Raises `EscapeError` naming both."""
    root, path = Path(root), Path(path)
    real_root = os.path.realpath(root)
    real = os.path.join(os.path.realpath(path.parent), path.name)
    if follow:
        real = os.path.realpath(path)
    if path.name in ("", ".", "..") or not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise EscapeError(
            f"{path} leads outside the cache root {root} (a symbolic link or `..` on the way "
            f"resolves to {real}); llmembed never reads, writes or removes through such a path: "
            "remove the link"
        )
    return path


def open_folder(parent: int, name: str, *, shown: Path, mode: int | None = None) -> int:
    """A descriptor of the folder `name` inside the folder open as `parent`, made first (with
    `mode`, less the umask) when missing and `mode` is given. Never through a symbolic link: it is
    opened relative to its parent's descriptor with O_NOFOLLOW, so a link planted at `name`, or
    swapped in for the folder meanwhile, is refused (EscapeError naming `shown`), never followed."""
    if mode is not None:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, mode, dir_fd=parent)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(name, flags, dir_fd=parent)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise EscapeError(
                f"{shown} is a symbolic link or not a folder; llmembed never follows one: remove it"
            ) from None
        raise


def create_exclusive(target: Path) -> tuple[int, Path]:
    """A new temporary file beside `target`, for writing and then renaming over it: a random name,
    created with O_CREAT|O_EXCL|O_NOFOLLOW, so that nothing planted at a predictable name (a symbolic
    link to someone's file) is ever opened. Returns the open descriptor and the name."""
    target = Path(target)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


def write_json_atomic(path: Path, data: object, *, root: Path | None = None) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one (see
    `write_bytes_atomic`)."""
    write_bytes_atomic(path, json_bytes(data), root=root)


def json_bytes(data: object) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True).encode()


def write_bytes_atomic(path: Path, data, *, root: Path | None = None) -> None:
    """Write bytes so that readers see the old file or the new one, never half of one. The temporary
    file is created exclusively (see `create_exclusive`) and fsynced before the rename; with `root`,
    `path` must stay inside it. The folder is not fsynced here: whoever makes a set of files count
    (the manifest's writer) fsyncs it once."""
    path = Path(path)
    if root is not None:
        inside(root, path)
    fd, tmp = create_exclusive(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # replaces a link planted at `path` itself, never its target
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def fsync_dir(path: Path) -> None:
    """Make the names created, renamed or removed in a folder durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
