"""Reading cached rows by text hash against reading them as one contiguous block.

    .venv/bin/python benchmarks/read_bench.py [--rows 10000] [--layers 13] [--hidden 768]

Writes a synthetic entry (float16, 64 MB shards, as the extraction writes them), then times reading
one layer of every row addressed by text hash, in a shuffled order (what training on a data set's
rows does), against reading the same values as one contiguous (rows, hidden) block from a single
HDF5 dataset. Prints both medians and their ratio (the design's target: within 2x).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from llmembed.cache.format import EntrySpec, PlannedShard, PoolingInfo
from llmembed.cache.keys import text_hashes
from llmembed.cache.root import Cache
from llmembed.cache.writer import EntryWriter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10000)
    ap.add_argument("--layers", type=int, default=13)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    texts = [f"text number {i}" for i in range(args.rows)]
    hashes = text_hashes(texts)
    layers = list(range(args.layers))
    with tempfile.TemporaryDirectory() as root:
        spec = EntrySpec({"bench": 1}, "bench", "float32", "float16", 512, "right", "{text}")
        entry = Cache(root).prepare(spec, layers, ["mean"])
        writer = EntryWriter(entry, key=spec.key)
        per_shard = max(1, (64 << 20) // (args.layers * args.hidden * 2))
        starts = list(range(0, args.rows, per_shard))
        chunks = [hashes[s : s + per_shard] for s in starts]
        writer.set_pending([PlannedShard(i, h, (len(h),)) for i, h in enumerate(chunks)])
        for i, h in enumerate(chunks):
            emb = rng.standard_normal((args.layers, len(h), args.hidden)).astype(np.float16)
            writer.write_shard(
                i, hashes=h, emb={"mean": emb}, layers={"mean": layers}, num_layers=args.layers - 1
            )
        fields = {
            "hidden_size": args.hidden,
            "num_layers": args.layers - 1,
            "layers": tuple(layers),
            "poolings": {"mean": PoolingInfo(tuple(layers), "float16")},
            "backbone": {"name": "bench"},
            "versions": {},
        }
        writer.commit(base=None, fields=fields, extraction={})
        block = Path(root) / "block.h5"
        with h5py.File(block, "w") as f:  # the same layer's values as one contiguous block
            f.create_dataset(
                "x", data=entry.read("mean", [args.layers // 2])[:, 0].astype(np.float16)
            )

        order = rng.permutation(args.rows)
        wanted = hashes[order]

        def by_hash_cold():
            fresh = type(entry)(entry.path)  # a new reader: its hash index is read too
            return fresh.read("mean", [args.layers // 2], wanted)

        warm = type(entry)(entry.path)
        warm.index()  # a reader that has read its index once (a sweep reads many layers)

        def by_hash():
            return warm.read("mean", [args.layers // 2], wanted)

        def contiguous():
            with h5py.File(block, "r") as f:
                return f["x"][:].astype(np.float32)

        def medians(*fns):
            """Median seconds of each, the calls interleaved so that load and caches hit all alike."""
            times = [[] for _ in fns]
            for _ in range(args.repeats):
                for fn, t in zip(fns, times, strict=True):
                    start = time.perf_counter()
                    fn()
                    t.append(time.perf_counter() - start)
            return [statistics.median(t) for t in times]

        np.testing.assert_array_equal(by_hash_cold()[:, 0], contiguous()[order])
        b, a, cold = medians(contiguous, by_hash, by_hash_cold)
        print(
            f"{args.rows} rows, one of {args.layers} layers x {args.hidden} (float16, "
            f"{len(starts)} shards): contiguous block {1000 * b:.1f} ms; by text hash "
            f"{1000 * a:.1f} ms ({a / b:.2f}x), with a new reader reading its hash index "
            f"{1000 * cold:.1f} ms ({cold / b:.2f}x)"
        )


if __name__ == "__main__":
    main()
