"""`llmembed-report`: a table and plots from the metrics.json files of classify runs."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

COLUMNS = (
    "extract_s_per_1k",
    "extract_j_per_1k",
    "train_s_per_1k",
    "train_j_per_1k",
    "dataset",
    "head",
    "fusion",
    "features",
    "val_accuracy",
    "test_accuracy",
    "test_accuracy_std",
    "test_macro_f1",
    "test_micro_f1",
    "seeds",
    "fit_s",
    "total_s",
    "run",
)


def collect(folders: list[Path]) -> list[dict]:
    rows = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("metrics.json")):
            m = json.loads(path.read_text())
            single = len(m["features"]) == 1
            rows.append(
                {
                    "dataset": m["dataset"],
                    "head": m["head"],
                    "fusion": m["fusion"],
                    "features": " + ".join(m["features"]),
                    "val_accuracy": m["validation"]["accuracy"]["mean"],
                    "test_accuracy": m["test"]["accuracy"]["mean"],
                    "test_accuracy_std": m["test"]["accuracy"]["std"],
                    "test_macro_f1": m["test"]["macro_f1"]["mean"],
                    "test_micro_f1": m["test"]["micro_f1"]["mean"],
                    "seeds": len(m["seeds"]),
                    "fit_s": m["timings"]["fit_s"],
                    "total_s": m["timings"]["total_s"],
                    "run": str(path.parent),
                    **costs(m),
                    # for the plot: one (backbone, pooling) line over layers, fused runs as levels
                    "line": f"{m['sources'][0]['backbone']} {m['sources'][0]['pooling']}"
                    if single
                    else None,
                    "layer": m["sources"][0]["layers"][0] if single else None,
                }
            )
    if not rows:
        raise SystemExit(f"no metrics.json under {', '.join(map(str, folders))}")
    return sorted(rows, key=lambda r: (-r["val_accuracy"], -r["test_accuracy"]))


def _per_1k(amount, rows):
    return None if amount is None or not rows else round(1000 * amount / rows, 3)


def costs(m: dict) -> dict:
    """Seconds and joules per 1,000 texts: making each source's cache entry (from its manifest,
    summed over sources) and this training run. Unknown figures are None, shown as n/a: energy the
    hardware did not tell, or an entry made by an older llmembed or resumed with nothing left."""
    made = [e.get("entry_cost", {}) for e in m.get("extraction", [])]
    secs = [_per_1k(c.get("wall_s"), c.get("rows_computed")) for c in made]
    joules = [_per_1k(c.get("energy_j"), c.get("rows_computed")) for c in made]
    res, n = m.get("resources", {}), sum(m["rows"].values())
    return {
        "extract_s_per_1k": round(sum(secs), 3) if made and None not in secs else None,
        "extract_j_per_1k": round(sum(joules), 3) if made and None not in joules else None,
        "train_s_per_1k": _per_1k(res.get("wall_s"), n),
        "train_j_per_1k": _per_1k(res.get("energy_j"), n),
    }


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def markdown(rows: list[dict]) -> str:
    head = (
        "| dataset | head | features | val acc | test acc | test macro-F1 | test micro-F1 | seeds | fit s "
        "| extract s/1k texts | extract J/1k | train s/1k | train J/1k |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        std = f" ± {r['test_accuracy_std']:.4f}" if r["seeds"] > 1 else ""
        lines.append(
            f"| {r['dataset']} | {r['head']} | {r['features']} | {r['val_accuracy']:.4f} | "
            f"{r['test_accuracy']:.4f}{std} | {r['test_macro_f1']:.4f} | {r['test_micro_f1']:.4f} | "
            f"{r['seeds']} | {r['fit_s']:.1f} | {_fmt(r['extract_s_per_1k'])} | "
            f"{_fmt(r['extract_j_per_1k'])} | {_fmt(r['train_s_per_1k'])} | {_fmt(r['train_j_per_1k'])} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> list[Path]:
    """Test accuracy against layer, one line per (backbone, pooling); fused runs as dashed levels.
    One figure per (data set, head)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["head"])].append(r)
    written = []
    for (dataset, head), members in groups.items():
        lines = defaultdict(list)
        for r in members:
            if r["line"] is not None:
                lines[r["line"]].append((r["layer"], r["test_accuracy"], r["test_accuracy_std"]))
        fused = [r for r in members if r["line"] is None]
        if not lines and not fused:
            continue
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name, points in sorted(lines.items()):
            points.sort()
            xs, ys, es = zip(*points, strict=True)
            ax.errorbar(
                xs, ys, yerr=es if any(es) else None, marker="o", ms=3, capsize=2, label=name
            )
        for i, r in enumerate(fused):
            ax.axhline(
                r["test_accuracy"],
                ls="--",
                lw=1,
                color=f"C{(len(lines) + i) % 10}",
                label=f"fused: {_short(r['features'])}",
            )
        ax.set_xlabel("layer (hidden state index; 0 = embeddings)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{dataset}: {head} head")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = out / f"accuracy_vs_layer_{dataset}_{head}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def _short(features: str, limit: int = 60) -> str:
    return features if len(features) <= limit else features[: limit - 3] + "..."


def write_report(folders: list[Path], out: Path) -> str:
    rows = collect(folders)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    table = markdown(rows)
    (out / "results.md").write_text(table + "\n")
    plots = plot(rows, out)
    return (
        table
        + f"\n\nwritten: {out / 'results.csv'}, {out / 'results.md'}"
        + "".join(f", {p}" for p in plots)
    )
