"""The padding cap and token budget of extraction's plan, timed against each other in one run.

    .venv/bin/python benchmarks/padding_bench.py                     # CPU, about 20 minutes
    .venv/bin/python benchmarks/padding_bench.py --caps 0.05 0.1 --budgets 1024 --rounds 5

`extract()` of the same MR texts into a fresh cache per run (timed as `extract_bench.py` times it:
from after the model load to the manifest) for each padding cap (`MAX_PADDING` in
extract/batching.py: the share of a batch's padded tokens that may be padding) and token budget.
The settings take turns within each round, so that a slow spell of the machine hits all of them;
medians over the rounds and ratios against the first setting are printed and, with `--results`,
appended to benchmarks/RESULTS.md. Beside each time, the batches its run made, read from the
entry's manifest (count, rows per batch, padded over real tokens): so the table shows that the cap
reached the extraction.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from extract_bench import (
    load_texts,
    machine,
    matmul_peak,
    refuse_unknown_models,
    run_llmembed,
    table,
)

from llmembed.extract import batching, pipeline, stream


def use_cap(cap: float) -> None:
    """Every plan of this process uses `cap` as its padding limit (the benchmark's only lever on
    a constant that users do not set)."""

    def planned(lengths, budget, _max_padding):
        return batching.plan_batches(lengths, budget, cap)

    pipeline.plan_batches = stream.plan_batches = planned


def plan_facts(res: dict) -> str:
    """The batches the run made, from its manifest (so the cap is seen to have applied)."""
    rows = res["rows"] / res["forward_calls"]
    padding = res["padded_tokens"] / res["tokens"]
    return f"{res['forward_calls']} batches of {rows:.1f} rows, {padding:.3f}x padding"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--texts", type=int, default=512, help="MR texts")
    p.add_argument("--models", nargs="+", default=["smollm2", "minilm"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--caps", nargs="+", type=float, default=[0.05, 0.10, 0.20, 1.0])
    p.add_argument("--budgets", nargs="+", type=int, default=[1024])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--results", type=Path, help="append a section to this file (RESULTS.md)")
    args = p.parse_args()
    if not all(0 <= c <= 1 for c in args.caps):
        p.error("--caps are shares of a batch's padded tokens: each between 0 and 1")
    refuse_unknown_models(p, args.models)
    texts = load_texts(args.texts)
    peaks = [matmul_peak(torch.bfloat16, args.device)]
    settings = [
        (model, dtype, budget, cap)
        for model in args.models
        for dtype in args.dtypes
        for budget in args.budgets
        for cap in args.caps
    ]
    times: dict[tuple, list[float]] = {s: [] for s in settings}
    plans: dict[tuple, str] = {}
    keep = Path(tempfile.mkdtemp(prefix="llmembed-padding-bench-"))
    for r in range(args.rounds):
        for s in settings:
            model, dtype, budget, cap = s
            use_cap(cap)
            res = run_llmembed(
                model, len(texts), 1, dtype, args.device, keep, f"extract.token_budget={budget}"
            )
            times[s] += res["seconds"]
            plans[s] = plan_facts({**res, "rows": len(texts)})
            print(
                f"round {r + 1}: {model} {dtype} budget {budget} cap {cap}: {res['seconds'][0]:.2f} s",
                flush=True,
            )
    peaks.append(matmul_peak(torch.bfloat16, args.device))
    shutil.rmtree(keep, ignore_errors=True)
    rows, base = [], {}
    for s in settings:
        model, dtype, budget, cap = s
        med = statistics.median(times[s])
        base.setdefault((model, dtype), med)
        rows.append(
            [
                model,
                dtype,
                str(budget),
                f"{cap:g}",
                plans[s],
                f"{med:.2f}",
                f"{min(times[s]):.2f}-{max(times[s]):.2f}",
                f"{base[(model, dtype)] / med:.3f}x",
            ]
        )
    header = [
        "model",
        "dtype",
        "token budget",
        "padding cap",
        "plan",
        "median s",
        "range s",
        "speed vs first setting",
    ]
    stamp = time.strftime("%Y-%m-%d %H:%M")
    text = (
        f"### {stamp}: padding cap and token budget, {len(texts)} MR texts, median of "
        f"{args.rounds} alternating rounds\n\n"
        f"Machine: {machine(args.device)}. bfloat16 matmul peak before / after: "
        f"{peaks[0]:.0f} / {peaks[1]:.0f} GFLOP/s.\n"
        f"Command: `python benchmarks/padding_bench.py --models {' '.join(args.models)} "
        f"--dtypes {' '.join(args.dtypes)} "
        f"--caps {' '.join(f'{c:g}' for c in args.caps)} "
        f"--budgets {' '.join(map(str, args.budgets))} --rounds {args.rounds}`\n\n"
        + table(header, rows)
        + "\n"
    )
    print(text)
    if args.results:
        with args.results.open("a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
