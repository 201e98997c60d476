"""Where extraction time goes: tokenizer, model (matmuls, attention, element-wise ops, the rest),
pooling, HDF5 write. Prints a markdown table; the figures back the MFU discussion in RESULTS.md.

    .venv/bin/python benchmarks/profile_extract.py [--backbone smollm2] [--texts 512] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import bisect
import tempfile
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import llmembed.extract.embedder as embedder
from llmembed.cache.format import EntrySpec
from llmembed.cache.keys import text_hashes
from llmembed.cache.root import Cache
from llmembed.cache.writer import EntryWriter
from llmembed.data.datasets import load_dataset
from llmembed.extract.backbones import inspect_backbone, load_model, load_tokenizer
from llmembed.extract.pooling import LayerPooler

# aten ops by what they do in a transformer block.
GROUPS = {
    "matmul (linear layers)": ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention kernel": ("aten::_scaled_dot_product", "aten::_softmax", "aten::baddbmm"),
}


def group_of(op: str) -> str:
    for group, prefixes in GROUPS.items():
        if op.startswith(prefixes):
            return group
    return "element-wise, norms, copies"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backbone", default="smollm2")
    p.add_argument("--texts", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--token-budget", type=int, default=1024)
    args = p.parse_args()

    from hydra import compose, initialize_config_module

    with initialize_config_module("llmembed.conf", version_base=None):
        cfg = compose("extract", [f"backbone={args.backbone}", "dataset=mr"])
    texts = load_dataset(cfg.dataset).texts[: args.texts]
    info = inspect_backbone(cfg.backbone, None)
    model = load_model(
        cfg.backbone, info, depth=info.num_layers, dtype=getattr(torch, args.dtype), device="cpu"
    )
    ex = embedder.Extractor(
        model,
        load_tokenizer(cfg.backbone, info),
        layers=list(range(info.num_layers + 1)),
        poolings=["mean", "last", "first"],
        max_length=512,
        token_budget=args.token_budget,
        out_dtype=torch.float16,
    )
    ex.embed(texts[:32])  # warm-up: kernel selection for the first shapes

    # Label the stages; the model's own ops are grouped by the profiler's op names.
    # Pooling runs inside the forward pass (layer hooks call LayerPooler.add): its time is taken
    # out of the forward's below.
    wrap = {"model forward": (model, "forward"), "pooling": (LayerPooler, "add")}
    for label, (owner, name) in wrap.items():
        real = getattr(owner, name)

        def labelled(*a, _real=real, _label=label, **k):
            with record_function(_label):
                return _real(*a, **k)

        setattr(owner, name, labelled)

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        with record_function("tokenizer"):
            ex.tokenize(texts)
        emb, stats = ex.embed(texts)
        with tempfile.TemporaryDirectory() as root, record_function("HDF5 write"):
            spec = EntrySpec({}, "profile", "float32", "float16", 512, "right", "{text}")
            entry = Cache(root).prepare(spec, ex.layers, ex.poolings)
            EntryWriter(entry, key=spec.key).write_shard(
                0,
                hashes=text_hashes(texts),
                emb={q: a.transpose(1, 0, 2) for q, a in emb.items()},  # layer-major
                layers={q: ex.layers for q in emb},
                num_layers=info.num_layers,
            )
        wall = time.perf_counter() - start

    events = prof.events()
    stages = defaultdict(float)
    for e in events:
        if e.name in ("tokenizer", "model forward", "pooling", "HDF5 write"):
            stages[e.name] += e.cpu_time_total / 1e6
    # The model's own ops: those inside a forward pass, grouped by name (self time).
    spans = sorted(
        (e.time_range.start, e.time_range.end) for e in events if e.name == "model forward"
    )
    starts = [a for a, _ in spans]
    pools = sorted((e.time_range.start, e.time_range.end) for e in events if e.name == "pooling")
    pool_starts = [a for a, _ in pools]

    def in_pooling(e) -> bool:
        j = bisect.bisect_right(pool_starts, e.time_range.start) - 1
        return j >= 0 and e.time_range.end <= pools[j][1]

    ops = defaultdict(float)
    for e in events:
        if e.name.startswith("aten::") and not in_pooling(e):
            i = bisect.bisect_right(starts, e.time_range.start) - 1
            if i >= 0 and e.time_range.end <= spans[i][1]:
                ops[group_of(e.name)] += e.self_cpu_time_total / 1e6
    forward = stages["model forward"] - stages["pooling"]
    ops["Python and framework overhead"] = max(0.0, forward - sum(ops.values()))
    rows = [
        ("tokenizer", stages["tokenizer"]),
        ("model forward", forward),
        *sorted(((f"  {g}", t) for g, t in ops.items()), key=lambda r: -r[1]),
        ("pooling (every layer, 3 poolings)", stages["pooling"]),
        ("HDF5 write (float16, checksums, fsync)", stages["HDF5 write"]),
    ]
    print(
        f"{args.backbone}, {args.dtype}, {len(texts)} MR texts, {stats.tokens} tokens, {wall:.2f} s"
    )
    print("| stage | s | share |\n|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.2f} | {100 * t / wall:.0f}% |")


if __name__ == "__main__":
    main()
