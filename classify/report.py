"""`llmembed-report`: a table and plots from the metrics.json files of classify runs.

Runs are grouped by the identity of their data (name, file, subset, split seed, fingerprint), not
the data set's name alone, so a quick `dataset.limit` run never sits beside a full one unmarked.
Hydra job folders without a metrics.json (a crash, a kill, a full disk) are listed, not skipped.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import defaultdict
from pathlib import Path

import yaml

FAILED = "failed or interrupted"

COLUMNS = (
    "status",
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
    "test_accuracy_ci_lo",
    "test_accuracy_ci_hi",
    "test_accuracy_std",
    "test_macro_f1",
    "test_macro_f1_absent_labels",
    "test_micro_f1",
    "seeds",
    "fit_s",
    "total_s",
    "data_fingerprint",
    "overrides",
    "run",
)


def collect(folders: list[Path]) -> list[dict]:
    """One row per run under the folders: finished runs (status "ok", best validation accuracy
    first within each data set) then failed or interrupted ones."""
    done, failed, seen = [], [], set()
    for folder in folders:
        for path in sorted(Path(folder).rglob("metrics.json")):
            if path.resolve() in seen:  # nested or repeated folders list a run once
                continue
            seen.add(path.resolve())
            try:
                done.append(read_run(path))
            except (json.JSONDecodeError, KeyError, TypeError) as e:  # cut short while writing
                failed.append(failed_row(path.parent, f"unreadable metrics.json ({e!r})"))
        failed += [r for r in failed_jobs(Path(folder)) if Path(r["run"]).resolve() not in seen]
        seen.update(Path(r["run"]).resolve() for r in failed)
    if not done and not failed:
        raise SystemExit(f"no metrics.json under {', '.join(map(str, folders))}")
    label_data(done)
    done.sort(key=lambda r: (r["dataset"], -r["val_accuracy"], -r["test_accuracy"]))
    return done + failed


def read_run(path: Path) -> dict:
    m = json.loads(path.read_text())
    test_acc = m["test"]["accuracy"]
    ci = test_acc.get("ci") or [None, None]  # older metrics.json: no interval
    data = data_fields(m)
    line, layer = plot_position(m)
    return {
        "status": "ok",
        "dataset": data["label"],
        "head": m["head"],
        "fusion": m["fusion"],
        "features": " + ".join(m["features"]),
        "val_accuracy": m["validation"]["accuracy"]["mean"],
        "test_accuracy": test_acc["mean"],
        "test_accuracy_ci_lo": ci[0],
        "test_accuracy_ci_hi": ci[1],
        "test_accuracy_std": test_acc["std"],
        "test_macro_f1": m["test"]["macro_f1"]["mean"],
        **macro_f1_coverage(m),
        "test_micro_f1": m["test"]["micro_f1"]["mean"],
        "seeds": len(m["seeds"]),
        "fit_s": m["timings"]["fit_s"],
        "total_s": m["timings"]["total_s"],
        "data_fingerprint": data["fingerprint"],
        "run": str(path.parent),
        **costs(m),
        # internal: data grouping and the plot
        "_data": data,
        "line": line,
        "layer": layer,
    }


def plot_position(m: dict) -> tuple[str | None, int | None]:
    """(line, layer) for a single-layer run: one line per (backbone, pooling) over the resolved
    layer index. Fused runs, and a negative layer whose resolution is unknown, are (None, None):
    the plot shows them as levels, never at x = -1."""
    if len(m["features"]) != 1:
        return None, None
    src = m["sources"][0]
    layer = src["layers"][0]
    if "requested_layers" not in src and layer < 0:  # older file: layers are as written
        named = re.search(r":L(\d+)$", m["features"][0])  # its block name holds the resolved one
        layer = int(named.group(1)) if named else None
    if layer is None:
        return None, None
    return f"{src['backbone']} {src['pooling']}", layer


def data_fields(m: dict) -> dict:
    """The data identity of a run: a key (every recorded field) and a readable label (name, file,
    subset). Files without `data` (older llmembed) fall back to the data set's name."""
    d = m.get("data")
    if not d:
        return {
            "key": f"name:{m['dataset']}",
            "label": m["dataset"],
            "seed": None,
            "fingerprint": None,
        }
    parts = [d.get("name") or m["dataset"]]
    if d.get("path") and Path(d["path"]).stem != parts[0]:
        parts.append(Path(d["path"]).name)
    if d.get("limit") is not None:
        parts.append(f"limit={d['limit']}")
    # The rows themselves tell one data set from another: the same file written relative or
    # absolute is one data set (and seeds of one file split it differently).
    same = {k: d.get(k) for k in ("name", "fingerprint", "seed")} if d.get("fingerprint") else d
    return {
        "key": json.dumps(same, sort_keys=True),
        "label": " ".join(parts),
        "seed": d.get("seed"),
        "fingerprint": d.get("fingerprint"),
    }


def label_data(rows: list[dict]) -> None:
    """Make labels unique per data identity: where two identities share a label, add the split
    seed when that tells them apart, then a short fingerprint."""
    for extra in (_seed_suffix, _fingerprint_suffix):
        shared = defaultdict(list)
        for r in rows:
            shared[r["dataset"]].append(r)
        for members in shared.values():
            if len({r["_data"]["key"] for r in members}) > 1:
                suffixes = [extra(r, members) for r in members]  # all first: labels change below
                for r, suffix in zip(members, suffixes, strict=True):
                    r["dataset"] = f"{r['dataset']} {suffix}".rstrip()


def _seed_suffix(row: dict, members: list[dict]) -> str:
    seeds = {r["_data"]["seed"] for r in members}
    seed = row["_data"]["seed"]
    return f"seed={seed}" if len(seeds) > 1 and seed is not None else ""


def _fingerprint_suffix(row: dict, members: list[dict]) -> str:
    data = row["_data"]
    if data["fingerprint"] is None and data["key"].startswith("name:"):
        return "(data not recorded)"
    keys = {r["_data"]["key"] for r in members}
    if data["fingerprint"] and len({r["_data"]["fingerprint"] for r in members}) == len(keys):
        return f"#{data['fingerprint'][:8]}"
    return "#" + hashlib.sha256(data["key"].encode()).hexdigest()[:8]  # same rows, other fields


def macro_f1_coverage(m: dict) -> dict:
    """Labels of the data set that no run's test split held or predicted (union over runs): macro-F1
    averages over the others. Older files averaged them in as F1 = 0; their confusion matrices
    tell which."""
    absent, older = set(), False
    for run in m.get("runs", []):
        t = run["test"]
        if "absent_labels" in t:
            absent.update(t["absent_labels"])
        elif "confusion_matrix" in t:
            older = True
            cm, names = t["confusion_matrix"], list(t.get("per_class", {}))
            absent.update(
                names[i]
                for i in range(len(cm))
                if i < len(names) and sum(cm[i]) + sum(row[i] for row in cm) == 0
            )
    runs = m.get("runs") or [{}]
    n_labels = len(runs[0].get("test", {}).get("per_class", {}))
    return {
        "test_macro_f1_absent_labels": " ".join(sorted(absent)),
        "_absent": len(absent),
        "_labels": n_labels,
        "_absent_counted_as_zero": older,
    }


def failed_jobs(folder: Path) -> list[dict]:
    """Hydra job folders of llmembed-classify (a `.hydra/` with a classify config) that hold no
    metrics.json."""
    rows = []
    for hydra in sorted(folder.rglob(".hydra")):
        job = hydra.parent
        if (job / "metrics.json").exists() or not hydra.is_dir():
            continue
        config = _yaml(hydra / "config.yaml") or {}
        if not isinstance(config, dict) or "head" not in config or "features" not in config:
            continue  # another tool's job (llmembed-extract): it writes no metrics.json
        rows.append(failed_row(job, None, config))
    return rows


def failed_row(job: Path, note: str | None, config: dict | None = None) -> dict:
    if config is None:
        config = _yaml(job / ".hydra" / "config.yaml") or {}
    overrides = _yaml(job / ".hydra" / "overrides.yaml") or []
    head = config.get("head") if isinstance(config, dict) else None
    data = config.get("dataset") if isinstance(config, dict) else None
    return {
        "status": FAILED if note is None else f"{FAILED}: {note}",
        "dataset": data.get("name") if isinstance(data, dict) else None,
        "head": head.get("name") if isinstance(head, dict) else None,
        "overrides": " ".join(map(str, overrides)) if isinstance(overrides, list) else "",
        "run": str(job),
    }


def _yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


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


def _accuracy_cell(r: dict) -> str:
    """Mean and its 95% interval; an older file without one shows the std over seeds, marked."""
    if r["test_accuracy_ci_lo"] is not None:
        return (
            f"{r['test_accuracy']:.4f} [{r['test_accuracy_ci_lo']:.4f}, "
            f"{r['test_accuracy_ci_hi']:.4f}]"
        )
    std = f" (std {r['test_accuracy_std']:.4f})" if r["seeds"] > 1 else ""
    return f"{r['test_accuracy']:.4f}{std}"


def _macro_f1_cell(r: dict) -> str:
    if not r["_absent"]:
        return f"{r['test_macro_f1']:.4f}"
    if r["_absent_counted_as_zero"]:
        return f"{r['test_macro_f1']:.4f} ({r['_absent']} absent label(s) counted as 0)"
    return f"{r['test_macro_f1']:.4f} (over {r['_labels'] - r['_absent']} of {r['_labels']} labels)"


def markdown(rows: list[dict]) -> str:
    """The finished runs' table, then (if any) the failed or interrupted runs with overrides."""
    done = [r for r in rows if r["status"] == "ok"]
    head = (
        "| data | head | features | val acc | test acc [95% CI] | test macro-F1 | test micro-F1 "
        "| seeds | fit s | extract s/1k texts | extract J/1k | train s/1k | train J/1k |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in done:
        lines.append(
            f"| {r['dataset']} | {r['head']} | {r['features']} | {r['val_accuracy']:.4f} | "
            f"{_accuracy_cell(r)} | {_macro_f1_cell(r)} | {r['test_micro_f1']:.4f} | "
            f"{r['seeds']} | {r['fit_s']:.1f} | {_fmt(r['extract_s_per_1k'])} | "
            f"{_fmt(r['extract_j_per_1k'])} | {_fmt(r['train_s_per_1k'])} | {_fmt(r['train_j_per_1k'])} |"
        )
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["", "| status | data | head | overrides | run |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['status']} | {r['dataset'] or '?'} | {r['head'] or '?'} | "
            f"{r['overrides'] or '(none)'} | {r['run']} |"
            for r in failed
        ]
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def _yerr(points: list[tuple]) -> list[list[float]] | None:
    """Asymmetric error bars from (layer, mean, lo, hi); None where no point has an interval."""
    if all(lo is None for _, _, lo, _ in points):
        return None
    below = [0.0 if lo is None else y - lo for _, y, lo, _ in points]
    above = [0.0 if hi is None else hi - y for _, y, _, hi in points]
    return [below, above]


def plot(rows: list[dict], out: Path) -> list[Path]:
    """Test accuracy against the resolved layer index, one line per (backbone, pooling), with 95%
    intervals as error bars; fused runs as dashed levels with their interval shaded. One figure per
    (data identity, head)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(list)
    for r in rows:
        if r["status"] == "ok":
            groups[(r["dataset"], r["head"])].append(r)
    written = []
    for (dataset, head), members in groups.items():
        fig = figure(dataset, head, members)
        path = out / f"accuracy_vs_layer_{_slug(dataset)}_{_slug(head)}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


# How far apart the lines' points at one layer are drawn, so that every error bar shows.
LINE_SPREAD = 0.3


def figure(dataset: str, head: str, members: list[dict]):
    """One data identity and head: a line per (backbone, pooling) over integer layer ticks, each
    line's points shifted a little sideways so that intervals at one layer do not hide each other;
    fused runs as dashed levels."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    lines = defaultdict(list)
    for r in members:
        if r["line"] is not None:
            lines[r["line"]].append(
                (r["layer"], r["test_accuracy"], r["test_accuracy_ci_lo"], r["test_accuracy_ci_hi"])
            )
    levels = [r for r in members if r["line"] is None]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    step = LINE_SPREAD / (len(lines) - 1) if len(lines) > 1 else 0.0
    for i, (name, points) in enumerate(sorted(lines.items())):
        points.sort(key=lambda p: p[0])
        shift = (i - (len(lines) - 1) / 2) * step
        xs, ys = [p[0] + shift for p in points], [p[1] for p in points]
        ax.errorbar(xs, ys, yerr=_yerr(points), marker="o", ms=3, capsize=2, label=name)
    for i, r in enumerate(levels):
        color = f"C{(len(lines) + i) % 10}"
        ax.axhline(r["test_accuracy"], ls="--", lw=1, color=color, label=_short(r["features"]))
        if r["test_accuracy_ci_lo"] is not None:
            ax.axhspan(r["test_accuracy_ci_lo"], r["test_accuracy_ci_hi"], color=color, alpha=0.1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (hidden state index; 0 = embeddings)")
    ax.set_ylabel("test accuracy (95% CI)")
    ax.set_title(f"{dataset}: {head} head")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def _short(features: str, limit: int = 60) -> str:
    return features if len(features) <= limit else features[: limit - 3] + "..."


def write_report(folders: list[Path], out: Path) -> str:
    """results.csv, results.md and the plots; returns the table and a summary for the CLI."""
    rows = collect(folders)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    table = markdown(rows)
    (out / "results.md").write_text(table + "\n")
    plots = plot(rows, out)
    n_failed = sum(r["status"] != "ok" for r in rows)
    return (
        table
        + f"\n\n{len(rows) - n_failed} finished run(s), {n_failed} {FAILED}"
        + (" (listed with their overrides)" if n_failed else "")
        + ". test acc: mean [95% CI]: Wilson over the test rows for one run, the hull of the"
        " runs' test-set intervals over seeds on one split, t over repeated splits (resplit=true)."
        + f"\nwritten: {out / 'results.csv'}, {out / 'results.md'}"
        + "".join(f", {p}" for p in plots)
    )
