"""How much a text's stored vector depends on the texts extracted with it.

    .venv/bin/python benchmarks/batch_dependence.py [--backbone smollm2] [--texts 300]

The same `--texts` MR snippets are extracted alone, then among half as many others (so batch
composition and padding change), in bfloat16 and in float32 compute, float16 storage; every layer and
pooling of each text is compared between the two entries. Prints (and appends to
benchmarks/RESULTS.md with `--results`) how many texts differ at all, the largest difference and the
lowest cosine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_module

from llmembed.extract.pipeline import extract_texts
from llmembed.extract.plan import plan_from_config


def entry_of(root: Path, backbone: str, dtype: str, texts: list[str]):
    overrides = [f"backbone={backbone}", f"cache.root={root}", f"extract.dtype={dtype}",
                 "extract.progress=false"]  # fmt: skip
    with initialize_config_module("llmembed.conf", version_base=None):
        plan = plan_from_config(compose("extract", overrides))
    return extract_texts(plan, texts)


def compare(a, b, hashes) -> str:
    m = a.entry.manifest
    differ, worst, lowest = np.zeros(len(hashes), bool), 0.0, 1.0
    for pooling in m.poolings:
        x = a.entry.read(pooling, m.layers, hashes).astype(np.float64)
        y = b.entry.read(pooling, m.layers, hashes).astype(np.float64)
        differ |= (x != y).any(axis=(1, 2))
        # Per stored vector (text, layer): the difference's norm against the vector's.
        relative = np.linalg.norm(x - y, axis=-1) / np.linalg.norm(x, axis=-1)
        worst = max(worst, float(np.nanmax(relative)))
        cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
        lowest = min(lowest, float(np.nanmin(cos)))
    return (f"{int(differ.sum())} of {len(hashes)} texts differ in some layer or pooling, by at "
            f"most {worst:.2e} of a vector's norm; lowest cosine {lowest:.6f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="smollm2")
    parser.add_argument("--texts", type=int, default=300)
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    from llmembed.data.datasets import dataset_texts

    with initialize_config_module("llmembed.conf", version_base=None):
        _, texts = dataset_texts(compose("extract", ["dataset=mr"]).dataset)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(texts), size=args.texts + args.texts // 2, replace=False)
    alone = [texts[i] for i in pick[: args.texts]]
    among = [texts[i] for i in pick]
    lines = [f"## {time.strftime('%Y-%m-%d %H:%M')}: batch dependence, {args.backbone}", ""]
    for dtype in ("bfloat16", "float32"):
        with tempfile.TemporaryDirectory() as tmp:
            a = entry_of(Path(tmp) / "a", args.backbone, dtype, alone)
            b = entry_of(Path(tmp) / "b", args.backbone, dtype, among)
            lines.append(f"- {dtype} compute, float16 storage: " + compare(a, b, a.hashes))
    lines.append(f"\n{args.texts} MR snippets extracted alone and among {args.texts // 2} others "
                 "(`python benchmarks/batch_dependence.py`).\n")  # fmt: skip
    print("\n".join(lines))
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
