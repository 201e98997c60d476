"""The HDF5 files of an entry, built in memory and read back with checks: shards, hash indexes and
pending plans. Only this module calls h5py.

A shard holds `text_sha256` (rows, 32) and `emb/<pooling>` (rows, layers, hidden), one chunk per
layer (so reading a layer is one contiguous read), written as raw chunks without HDF5 filters: each
chunk's sha256 is an attribute, and the shard's *seal* (a sha256 over every attribute, chunk hashes
included) is recorded in the manifest. A reader checks the seal when it opens a shard and each
chunk's hash when it reads it, so a changed value, a permuted row, a swapped hash column or an
attribute edited with h5py fails the read; Fletcher-32 caught only some of these.

Files are built in memory (`io.BytesIO`) and handed over as bytes: the writer hashes and writes them
without holding the GIL and without reading them back.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass

import h5py
import numpy as np

from llmembed.cache.format import HASH_BYTES, PlannedShard, as_bytes, from_bytes
from llmembed.cache.keys import FORMAT_VERSION


class FileCheckError(ValueError):
    """A file's contents do not match what was recorded when it was written."""


def sha256_hex(data) -> str:
    return hashlib.sha256(data).hexdigest()  # hashlib releases the GIL on large buffers


# --- shards ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardImage:
    data: memoryview  # the file's bytes
    sha256: str
    seal: str
    wide: tuple[str, ...]  # poolings stored in float32 (values beyond the store dtype's range)


def seal_of(attrs: dict) -> str:
    """The seal of a shard: sha256 of its attributes as canonical JSON."""
    return sha256_hex(json.dumps(attrs, sort_keys=True, separators=(",", ":")).encode())


def build_shard(
    *,
    key: str,
    index: int,
    num_layers: int,
    hidden_size: int,
    hashes: np.ndarray,
    emb: dict[str, np.ndarray],
    layers: dict[str, Sequence[int]],
) -> ShardImage:
    """A shard file's bytes. `emb[p]` is layer-major, (len(layers[p]), rows, hidden_size), in its
    stored dtype: each layer's rows are then one contiguous chunk, written without a copy."""
    rows = len(hashes)
    attrs = {
        "key": key,
        "index": int(index),
        "format_version": FORMAT_VERSION,
        "rows": rows,
        "num_layers": int(num_layers),
        "hidden_size": int(hidden_size),
        "datasets": {},
    }
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        raw = as_bytes(hashes)
        ds = f.create_dataset("text_sha256", shape=raw.shape, dtype=np.uint8, chunks=raw.shape)
        attrs["datasets"]["text_sha256"] = _write_chunks(ds, [raw])
        group = f.create_group("emb")
        for pooling, arr in emb.items():
            n_layers, n, hidden = arr.shape  # (layers, rows, hidden)
            assert n == rows and n_layers == len(layers[pooling]) and hidden == hidden_size
            # Stored (rows, layers, hidden), one chunk per layer: its bytes are that layer's rows.
            shape = (n, n_layers, hidden)
            ds = group.create_dataset(pooling, shape=shape, dtype=arr.dtype, chunks=(n, 1, hidden))
            record = _write_chunks(ds, [np.ascontiguousarray(arr[j]) for j in range(n_layers)])
            record["layers"] = [int(x) for x in layers[pooling]]
            attrs["datasets"]["emb/" + pooling] = record
        for name, record in attrs["datasets"].items():
            f[name].attrs["llmembed"] = json.dumps(record, sort_keys=True)
        for name in ("key", "index", "format_version", "rows", "num_layers", "hidden_size"):
            f.attrs[name] = attrs[name]
    data = buf.getbuffer()
    wide = tuple(sorted(p for p, arr in emb.items() if arr.dtype == np.float32))
    return ShardImage(data, sha256_hex(data), seal_of(attrs), wide)


def _write_chunks(ds, chunks: list[np.ndarray]) -> dict:
    digests = []
    for j, chunk in enumerate(chunks):
        digests.append(sha256_hex(chunk))
        ds.id.write_direct_chunk((0, j, 0) if ds.ndim == 3 else (0, 0), chunk)
    # The dtype with its byte order ("<f2"): a dataset rewritten big-endian over the same bytes
    # would otherwise decode to other numbers under the same chunk hashes.
    return {"dtype": ds.dtype.str, "shape": list(ds.shape), "chunks": digests}


class ShardFile:
    """An open shard and its attributes; `check_seal` compares them with the seal the manifest
    recorded, after which every chunk it hands out is checked against its recorded sha256."""

    def __init__(self, f: h5py.File):
        self.f = f
        try:
            self.attrs = {name: _plain(f.attrs[name]) for name in _FILE_ATTRS}
            self.attrs["datasets"] = {
                name: json.loads(f[name].attrs["llmembed"]) for name in _dataset_names(f)
            }
        except (KeyError, ValueError, TypeError, OSError) as err:
            raise FileCheckError(f"its attributes cannot be read ({err})") from None

    def check_seal(self, seal: str) -> None:
        if seal_of(self.attrs) != seal:
            raise FileCheckError(
                "its attributes (key, index, rows, layers, chunk hashes) are not those it was "
                "written with (its seal does not match the manifest)"
            )
        for name, record in self.attrs["datasets"].items():
            ds = self.f[name]
            if ds.dtype.str != record["dtype"] or list(ds.shape) != record["shape"]:
                raise FileCheckError(
                    f"{name} has dtype {ds.dtype.str} and shape {ds.shape}, it was written with "
                    f"{record['dtype']} and {record['shape']}"
                )

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> ShardFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def wide(self) -> tuple[str, ...]:
        """The poolings this shard stores in float32."""
        return tuple(
            sorted(
                name.removeprefix("emb/")
                for name, record in self.attrs["datasets"].items()
                if name.startswith("emb/") and np.dtype(record["dtype"]) == np.float32
            )
        )

    @property
    def poolings(self) -> dict[str, list[int]]:
        return {
            name.removeprefix("emb/"): record["layers"]
            for name, record in self.attrs["datasets"].items()
            if name.startswith("emb/")
        }

    def text_hashes(self) -> np.ndarray:
        """(rows,) S32."""
        raw = self._chunk("text_sha256", 0).reshape(-1, HASH_BYTES)
        return from_bytes(raw)

    def layer(self, pooling: str, j: int) -> np.ndarray:
        """(rows, hidden) of the j-th stored layer of `pooling`, in its stored dtype."""
        record = self.attrs["datasets"]["emb/" + pooling]
        rows, _, hidden = record["shape"]
        return self._chunk("emb/" + pooling, j).reshape(rows, hidden)

    def _chunk(self, name: str, j: int) -> np.ndarray:
        ds = self.f[name]
        record = self.attrs["datasets"][name]
        offset = (0, j, 0) if ds.ndim == 3 else (0, 0)
        try:
            _, data = ds.id.read_direct_chunk(offset)
        except (OSError, KeyError, ValueError) as err:
            raise FileCheckError(f"chunk {j} of {name} cannot be read ({err})") from None
        if sha256_hex(data) != record["chunks"][j]:
            raise FileCheckError(f"chunk {j} of {name} does not match its recorded sha256")
        return np.frombuffer(data, dtype=np.dtype(record["dtype"]))


_FILE_ATTRS = ("key", "index", "format_version", "rows", "num_layers", "hidden_size")


def _plain(value):
    """An HDF5 attribute as the JSON value it was written from."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _dataset_names(f: h5py.File) -> list[str]:
    names = ["text_sha256"] if "text_sha256" in f else []
    if "emb" in f:
        names += ["emb/" + p for p in f["emb"]]
    return names


def open_shard(path) -> ShardFile:
    """Raises OSError (not HDF5, unreadable) or FileCheckError (attributes unreadable)."""
    f = h5py.File(path, "r")
    try:
        return ShardFile(f)
    except BaseException:
        f.close()
        raise


# --- hash indexes and pending plans ----------------------------------------------------------------
def _image(fill) -> memoryview:
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        fill(f)
    return buf.getbuffer()


def build_index(shards: Sequence[tuple[int, np.ndarray]]) -> memoryview:
    """A hash index over (shard index, its rows' hashes in row order): hashes sorted, each with its
    shard index and row."""
    hashes = np.concatenate([h for _, h in shards]) if shards else np.empty(0, f"S{HASH_BYTES}")
    shard = np.concatenate([np.full(len(h), i, dtype=np.int64) for i, h in shards] or [[]])
    row = np.concatenate([np.arange(len(h), dtype=np.int64) for _, h in shards] or [[]])
    order = np.argsort(hashes, kind="stable")

    def fill(f):
        f.attrs["format_version"] = FORMAT_VERSION
        f.create_dataset("text_sha256", data=as_bytes(hashes[order]))
        f.create_dataset("shard", data=shard[order].astype(np.int64))
        f.create_dataset("row", data=row[order].astype(np.int64))

    return _image(fill)


def read_index(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted hashes (n,) S32, shard index (n,), row (n,)) from an index file's bytes."""
    with h5py.File(io.BytesIO(data), "r") as f:
        return from_bytes(f["text_sha256"][:]), f["shard"][:], f["row"][:]


def build_plan(key: str, shards: Sequence[PlannedShard]) -> memoryview:
    """An append's plan: per shard its index, rows and batches; every row's text hash."""

    def fill(f):
        f.attrs["key"] = key
        f.attrs["format_version"] = FORMAT_VERSION
        f.create_dataset("index", data=np.array([s.index for s in shards], dtype=np.int64))
        f.create_dataset("batches_per_shard", data=np.array([len(s.batches) for s in shards]))
        f.create_dataset(
            "batch_rows", data=np.array([b for s in shards for b in s.batches], dtype=np.int64)
        )
        hashes = np.concatenate([s.hashes for s in shards]) if shards else np.empty(0, "S32")
        f.create_dataset("text_sha256", data=as_bytes(hashes))

    return _image(fill)


def read_plan(path, key: str) -> list[PlannedShard]:
    """Raises OSError, KeyError or ValueError where the file is not a plan of this key."""
    with h5py.File(path, "r") as f:
        if _plain(f.attrs["key"]) != key or _plain(f.attrs["format_version"]) != FORMAT_VERSION:
            raise ValueError("a plan of another entry or format")
        index, per_shard = f["index"][:], f["batches_per_shard"][:]
        batch_rows, hashes = f["batch_rows"][:], from_bytes(f["text_sha256"][:])
    out, b, r = [], 0, 0
    for i, k in zip(index, per_shard, strict=True):
        batches = tuple(int(x) for x in batch_rows[b : b + k])
        rows = sum(batches)
        out.append(PlannedShard(int(i), hashes[r : r + rows], batches))
        b, r = b + k, r + rows
    if r != len(hashes) or b != len(batch_rows):
        raise ValueError("rows and batches do not add up")
    return out
