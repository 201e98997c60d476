"""Would `torch.compile` speed up extraction here? The same extractor over the same MR texts, eager
and with every transformer block compiled (inductor, dynamic shapes; llmembed's pooling hooks stay
outside the compiled code), timed alternately, best of `--repeats`; the compile time is reported
apart. Inductor's CPU backend builds C++ kernels, so the probe first says whether a C++ compiler
is on PATH.

    .venv/bin/python benchmarks/compile_probe.py [--backbone minilm] [--texts 512] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract_bench import load_texts

from llmembed.api import make_api_plan
from llmembed.extract.embed import load_embedder
from llmembed.extract.embedder import layer_stack


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--texts", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    print(f"C++ compiler: {compiler or 'none on PATH: torch.compile cannot build CPU kernels'}")
    if compiler is None:
        return
    texts = load_texts(args.texts)
    plan = make_api_plan(args.backbone, None, None, {"dtype": args.dtype})
    eager, _ = load_embedder(plan, "cpu")
    compiled, _ = load_embedder(plan, "cpu")
    for block in layer_stack(compiled.model):
        block.forward = torch.compile(block.forward, dynamic=True)
    warm = timed(lambda: compiled.embed(texts))  # compiles for the shapes it meets
    eager.embed(texts[:64])
    runs = {"eager": [], "compiled": []}
    for _ in range(args.repeats):
        runs["eager"].append(timed(lambda: eager.embed(texts)))
        runs["compiled"].append(timed(lambda: compiled.embed(texts)))
    best = {k: min(v) for k, v in runs.items()}
    a, b = eager.embed(texts[:32])[0], compiled.embed(texts[:32])[0]
    worst = max(float(abs(a[k].astype("float32") - b[k].astype("float32")).max()) for k in a)
    print(
        f"{args.backbone} {args.dtype}, {len(texts)} texts, all layers and poolings, best of "
        f"{args.repeats}: eager {best['eager']:.2f} s, compiled {best['compiled']:.2f} s "
        f"({best['eager'] / best['compiled']:.2f}x); first compiled pass (compiling) {warm:.1f} s; "
        f"largest difference of a stored value {worst:.2e}"
    )


if __name__ == "__main__":
    main()
