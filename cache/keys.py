"""Deterministic fingerprints: the cache is addressed by a hash of everything that changes its numbers.

Hashing is type-tagged and order-independent for mappings, so `{"a": 1, "b": 2}` and `{"b": 2, "a": 1}`
hash alike while `1`, `1.0`, `"1"` and `True` do not. A value that cannot be hashed is an error, never a
random fingerprint: a cache that silently misses forever is worse than one that refuses.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

# Bump when the stored numbers or the on-disk layout change: old entries then simply miss (and
# `llmembed-cache ls` reports them, `gc` removes them). 2: entries keyed by the computation only, rows
# addressed by text hash, shards appended over time.
FORMAT_VERSION = 2


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


def text_hashes(texts: Sequence[str]) -> np.ndarray:
    """(n,) `S32`: the sha256 digest of each text's UTF-8 bytes, exactly as given (before any prompt
    template is applied; the template is part of the entry's key instead). This is how rows are
    addressed inside a cache entry: the same string is the same row in every data set."""
    return np.array([hashlib.sha256(t.encode("utf-8")).digest() for t in texts], dtype="S32")


class JsonMemo:
    """A small JSON file of remembered facts (file hashes, model shapes), shared by processes.

    A lost update between two processes costs only a recomputation, so no lock is taken.
    """

    def __init__(self, path: Path | None):
        self.path = path

    def _load(self) -> dict:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}  # a damaged memo only costs a recomputation

    def get(self, key: str):
        return self._load().get(key)

    def put(self, key: str, value) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, {**self._load(), key: value})
        except OSError:
            pass  # a read-only cache (a reader on a shared node) just does not remember


def file_sha256(path: Path, *, memo: Path | None = None) -> str:
    """sha256 of a file's bytes; with `memo`, remembered per (path, size, mtime) so that a big weight
    file is read once, not at every run."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    known = JsonMemo(memo)
    digest = known.get(stamp)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        digest = h.hexdigest()
        known.put(stamp, digest)
    return digest


def write_json_atomic(path: Path, data: object) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
