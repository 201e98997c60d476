"""Command-line entry points of the training stage.

llmembed-classify dataset=mr features=smollm2_l20 head=logreg
llmembed-classify -m features=smollm2_layer layer='range(0,31)'   # a sweep over all layers
llmembed-report multirun/classify/2026-11-26/10-00-00
llmembed-predict outputs/classify/.../model texts.txt
"""

from __future__ import annotations

import argparse
import csv
import sys
from contextlib import nullcontext
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base=None, config_path="../conf", config_name="classify")
def classify_main(cfg: DictConfig) -> float:
    from llmembed.classify.train import train

    metrics = train(cfg, Path(HydraConfig.get().runtime.output_dir))
    acc, f1 = metrics["test"]["accuracy"], metrics["test"]["macro_f1"]
    print(
        f"{metrics['head']} on {' + '.join(metrics['features'])}: test accuracy {acc['mean']:.4f}"
        f" ± {acc['std']:.4f}, macro-F1 {f1['mean']:.4f} ({len(metrics['seeds'])} seed(s), "
        f"{metrics['timings']['total_s']:.1f} s)"
    )
    return metrics["validation"]["accuracy"][
        "mean"
    ]  # what a sweeper maximizes: never the test score


def read_texts(path: Path, column: str | None) -> list[str]:
    """Texts from a .txt file (one per line) or a CSV/TSV/JSONL file's text column."""
    from llmembed.extract.datasets import read_table

    if path.suffix.lower() in (".csv", ".tsv", ".jsonl", ".json"):
        rows = read_table(path)
        column = column or "text"
        if rows and column not in rows[0]:
            raise SystemExit(
                f"{path} has no column {column!r}; its columns: {list(rows[0])}. Use --text-column"
            )
        return [r[column] for r in rows]
    return [
        line.rstrip("\n")
        for line in path.read_text(encoding="utf-8-sig").splitlines()
        if line.strip()
    ]


def predict_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llmembed-predict", description="Label new texts with a saved model."
    )
    parser.add_argument("model", type=Path, help="a model folder written by llmembed-classify")
    parser.add_argument("texts", type=Path, help=".txt (one text per line) or .csv/.tsv/.jsonl")
    parser.add_argument("--text-column", help="column holding the texts (default: text)")
    parser.add_argument("--output", type=Path, help="write a CSV here instead of printing it")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    from llmembed.classify.predict import predict_texts

    texts = read_texts(args.texts, args.text_column)
    labels, proba, names = predict_texts(args.model, texts, device=args.device)
    with open(args.output, "w", newline="") if args.output else nullcontext(sys.stdout) as out:
        w = csv.writer(out)
        w.writerow(["label", *[f"p_{n}" for n in names], "text"])
        for text, label, p in zip(texts, labels, proba, strict=True):
            w.writerow([label, *[f"{x:.6f}" for x in p], text])
    if args.output:
        print(f"{len(texts)} predictions written to {args.output}", file=sys.stderr)
    return 0


def report_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llmembed-report", description="Tables and plots of classify runs."
    )
    parser.add_argument(
        "runs", type=Path, nargs="+", help="multirun (or run) folders holding metrics.json files"
    )
    parser.add_argument(
        "--out", type=Path, help="where to write results.* and plots (default: the first folder)"
    )
    args = parser.parse_args(argv)
    from llmembed.classify.report import write_report

    table = write_report(args.runs, args.out or args.runs[0])
    print(table)
    return 0


if __name__ == "__main__":
    classify_main()
