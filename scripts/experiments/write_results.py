"""Write docs/RESULTS.md (and docs/results/summary.csv) from the result files of experiments 1-5.

    .venv/bin/python -m scripts.experiments.write_results [--results docs/results] [--out docs/RESULTS.md]

Every figure on the page comes from a JSON file in the results folder, written by a runner whose
command (and committed config) the page prints beside it. A missing file leaves its section saying
which command fills it. Estimated run: seconds.
"""

# ruff: noqa: E501  (the page's prose lives in long f-strings; wrapping them would not read better)
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from scripts.experiments.common import commands_of, machine

EXPERIMENTS = [  # (file, title, runner module, config)
    ("layers", "1. Layer curves", "scripts.experiments.layers", "results_layers"),
    ("fusion", "2. Fusion", "scripts.experiments.fusion", "results_fusion"),
    (
        "recipe",
        "3. The paper's recipe against llmembed's defaults",
        "scripts.experiments.recipe",
        "results_recipe",
    ),
    (
        "counterparts",
        "4. Counterparts at the same scale",
        "scripts.experiments.counterparts",
        "results_counterparts",
    ),
    ("cost", "5. Cost", "scripts.experiments.cost", "results_cost"),
]

DATASETS = {
    "mr": "packaged `mr`: 10,566 movie-review snippets (2 repeated ones dropped) labelled by the sign of "
    "Hutto & Gilbert's (2014) crowd-rated valence. They are **not** Pang & Lee's MR labels, so no figure "
    "here is comparable with published MR results.",
    "trec": "packaged `trec`: 5,381 unique questions (1 repeat dropped), 6 coarse question types.",
    "bbc": "packaged `bbc`: 2,125 BBC News articles after dropping 100 repeated ones, 5 topics; long "
    "documents, truncated at 512 tokens by llmembed (`extract.max_length`).",
}


def ci(s: dict | None, digits: int = 3) -> str:
    """`mean [lo, hi]` of a summary over splits."""
    if not s:
        return "–"
    lo, hi = s["ci"]
    return f"{s['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def num(x, fmt: str = "{:,.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def load(results: Path, name: str) -> dict | None:
    p = results / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def sec_layers(r: dict, rel: str, summary: list) -> list[str]:
    out = []
    for ds, d in r["datasets"].items():
        rows = []
        for backbone, c in d["chosen_on_validation"].items():
            picks = sorted(set(c["per_split"].values()))
            rows.append(
                [backbone, ", ".join(picks), ci(c["test"]["accuracy"]), ci(c["test"]["macro_f1"])]
            )
            summary.append(
                ["layers", ds, f"{backbone} best (layer, pooling) on validation", c["test"]]
            )
        for key, curve in d["curves"].items():
            last = curve[-1]
            rows.append(
                [
                    f"{key} last layer (L{last['layer']})",
                    "fixed",
                    ci(last["test"]["accuracy"]),
                    ci(last["test"]["macro_f1"]),
                ]
            )
            summary.append(["layers", ds, f"{key} L{last['layer']}", last["test"]])
        out += [
            f"**{ds}**",
            "",
            table(
                ["probe", "chosen per split (validation)", "test accuracy", "test macro-F1"], rows
            ),
            "",
            f"![{ds} layer curves]({rel}/layers_{ds}.png)",
            "",
        ]
        # the full curve, compactly
        for key, curve in d["curves"].items():
            out.append(
                f"- {key}: "
                + " ".join(f"L{p['layer']} {p['test']['accuracy']['mean']:.3f}" for p in curve)
            )
        out.append("")
    return out


def sec_rows(r: dict, name: str, summary: list, extra=None) -> list[str]:
    out = []
    for ds, d in r["datasets"].items():
        rows = []
        for method, row in d["rows"].items():
            chosen = row.get("chosen_per_split")
            chosen = (
                "; ".join(f"{s}: {v.split(': ', 1)[0]}" for s, v in chosen.items())
                if chosen
                else "fixed"
            )
            rows.append([method, ci(row["test"]["accuracy"]), ci(row["test"]["macro_f1"]), chosen])
            summary.append([name, ds, method, row["test"]])
        out += [
            f"**{ds}**",
            "",
            table(
                [
                    "features and head",
                    "test accuracy",
                    "test macro-F1",
                    "chosen per split (validation)",
                ],
                rows,
            ),
            "",
        ]
        if extra:
            out += extra(d)
    return out


def recipe_extra(d: dict) -> list[str]:
    i = d.get("custom_extraction", {})
    return [
        f"Our own forward pass: padded to {i.get('pad_to')} tokens with `{i.get('pad_token')}`, BOS `{i.get('bos_token')}` "
        f"(SmolLM2's tokenizer adds a BOS itself: {i.get('tokenizer_adds_bos')}), {i.get('dtype', 'cached')} compute.",
        "",
    ]


def sec_counterparts(r: dict, summary: list) -> list[str]:
    out = []
    for ds, d in r["datasets"].items():
        rows = []
        p = d.get("prompting")
        if p:
            for shot in ("zero_shot", "few_shot"):
                c = p[shot]["cost_per_1000"]
                rows.append(
                    [
                        f"prompting SmolLM2, {shot.replace('_', '-')}",
                        ci(p[shot]["test"]["accuracy"]),
                        ci(p[shot]["test"]["macro_f1"]),
                        num(c["seconds"]),
                        num(c["joules"]),
                        "0",
                    ]
                )
                summary.append(["counterparts", ds, f"prompting {shot}", p[shot]["test"]])
        f = d.get("finetuning")
        if f:
            c = f["train_cost_per_1000"]
            rows.append(
                [
                    "fine-tuning MiniLM",
                    ci(f["test"]["accuracy"]),
                    ci(f["test"]["macro_f1"]),
                    num(c["seconds"]) + " (training)",
                    num(c["joules"]),
                    f"{f['params_trained']:,}",
                ]
            )
            summary.append(["counterparts", ds, "fine-tuning MiniLM", f["test"]])
        out += [
            f"**{ds}**",
            "",
            table(
                [
                    "method",
                    "test accuracy",
                    "test macro-F1",
                    "seconds / 1,000 texts",
                    "joules / 1,000 texts",
                    "parameters trained",
                ],
                rows,
            ),
            "",
        ]
        if p:
            out += [
                f"Template: `{json.dumps(p['template'])[1:-1]}`, label words: {', '.join(f'{k} → {v}' for k, v in p['words'].items())}; "
                f"{p['few_shot']['shots_per_class']} demonstration(s) per class in few-shot.",
                "",
            ]
    return out


def energy_notes(m: dict) -> set[str]:
    """What the meters said of the energy behind one method's figures."""
    c = m["cost"]
    parts = [c, *c.get("extraction", {}).values(), c.get("train", {}), c.get("inference", {})]
    notes = {p.get("energy_note") for p in parts} | {c.get("training_energy_note")}
    return notes - {None}


def sec_cost(r: dict) -> list[str]:
    out = []
    for ds, d in r["datasets"].items():
        rows = []
        for name, m in d["methods"].items():
            c = m["cost"]
            if m["kind"] == "llmembed":
                ext = num(c["extraction_seconds_per_1000"])
                train, params, cache = (
                    num(c["training_seconds_per_1000"], "{:,.2f}"),
                    f"{c['params_trained']:,}",
                    f"{num(c['cache_mb_entries'])} ({num(c['cache_mb_read'])} read)",
                )
                joules = num(c["extraction_joules_per_1000"])
            elif m["kind"] == "prompting":
                ext, train, params, cache, joules = (
                    "–",
                    "– (scoring: " + num(c["seconds"]) + ")",
                    "0",
                    "–",
                    num(c["joules"]),
                )
            else:
                ext, train, params, cache = (
                    "–",
                    num(c["train"]["seconds"]),
                    f"{c['params_trained']:,}",
                    "–",
                )
                joules = num(c["train"]["joules"])
            rows.append(
                [
                    name,
                    f"{m['test']['accuracy']['mean']:.3f}",
                    ext,
                    train,
                    joules,
                    cache,
                    params,
                    num(m["end_to_end_seconds"]),
                ]
            )
        out += [
            f"**{ds}** ({d['rows']['train']:,} training, {d['rows']['validation']:,} validation, {d['rows']['test']:,} test rows per split)",
            "",
            table(
                [
                    "method",
                    "test accuracy",
                    "extraction s / 1k texts",
                    "training s / 1k training rows",
                    "joules / 1k",
                    "cache MB",
                    "parameters trained",
                    "end to end, s",
                ],
                rows,
            ),
            "",
        ]
        if d["ratios"]:
            rr = [
                [
                    x["llmembed"],
                    x["counterpart"],
                    num(x["runtime"], "{:.1%}"),
                    num(x["electricity"], "{:.1%}"),
                    num(x["params_used"], "{:.1%}"),
                    num(x["params_trained"], "{:.2%}"),
                    f"{x['accuracy_difference']:+.3f}",
                ]
                for x in d["ratios"]
            ]
            out += [
                table(
                    [
                        "llmembed method",
                        "counterpart",
                        "runtime",
                        "electricity",
                        "parameters used",
                        "parameters trained",
                        "accuracy difference",
                    ],
                    rr,
                ),
                "",
            ]
    notes = sorted(
        {n for d in r["datasets"].values() for m in d["methods"].values() for n in energy_notes(m)}
    )
    if notes:
        out += [f"Where joules are missing or partial: {'; '.join(notes)}.", ""]
    p = r["paper_ratios"]
    out += [
        f"The paper reports LLMEmbed at {p['parameters']:.0%} of the parameters, {p['electricity']:.1%} of the electricity and "
        f"{p['runtime']:.1%} of the runtime of its prompt-based counterparts; the ratios above are the same quotients at this scale "
        "(end to end: the labelled set to one split's test predictions; definitions in `scripts/experiments/cost.py`).",
        "",
    ]
    return out


# The page's first table (and the README's): each method's test accuracy per data set, as the
# experiments' own tables report it.
HEADLINE = [
    (
        "SmolLM2, best single layer and pooling (validation)",
        "fusion",
        "SmolLM2 best single layer (validation), logreg",
    ),
    ("SmolLM2, last layer, mean", "fusion", "SmolLM2 last layer (L30, mean), logreg"),
    (
        "SmolLM2, layers concatenated (validation)",
        "fusion",
        "SmolLM2 concatenation of layers chosen on validation, logreg",
    ),
    (
        "SmolLM2 + MiniLM, layers concatenated (validation)",
        "fusion",
        "SmolLM2 + MiniLM concatenation of layers chosen on validation, logreg",
    ),
    (
        "SmolLM2 + MiniLM, the paper's co-occurrence head, its last five layers",
        "fusion",
        "SmolLM2 + MiniLM co-occurrence head, paper's last five layers (σ on validation)",
    ),
    (
        "MiniLM, best single layer and pooling (validation)",
        "layers",
        "minilm best (layer, pooling) on validation",
    ),
    ("prompting SmolLM2, zero-shot", "counterparts", "prompting zero_shot"),
    ("prompting SmolLM2, few-shot", "counterparts", "prompting few_shot"),
    ("fine-tuning MiniLM end to end", "counterparts", "fine-tuning MiniLM"),
]


def plot_headline(found: dict, sets: list[str], path: Path) -> None:
    """The headline as bars: one panel per data set, each method's mean with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, *_ in HEADLINE][::-1]  # first row on top
    fig, axes = plt.subplots(1, len(sets), figsize=(4 * len(sets) + 4, 5), sharey=True)
    for ax, ds in zip(np.atleast_1d(axes), sets, strict=True):
        for y, (_, exp, method) in enumerate(HEADLINE[::-1]):
            t = found.get((exp, method, ds))
            if t is None:
                continue
            a = t["accuracy"]
            color = "tab:gray" if exp == "counterparts" else "tab:blue"
            ax.barh(y, a["mean"], color=color, alpha=0.8)
            ax.errorbar(
                a["mean"],
                y,
                xerr=[[a["mean"] - a["ci"][0]], [a["ci"][1] - a["mean"]]],
                color="black",
                capsize=3,
            )
        ax.set_title(ds)
        ax.set_xlim(0.2, 1.0)
        ax.set_xlabel("test accuracy (95% interval)")
        ax.grid(axis="x", alpha=0.3)
    ax0 = np.atleast_1d(axes)[0]
    ax0.set_yticks(range(len(labels)), labels, fontsize=8)
    fig.suptitle("llmembed (blue) against its counterparts (gray), five splits")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def headline(summary: list, results: Path, rel: str) -> list[str]:
    found = {(exp, method, ds): t for exp, ds, method, t in summary}
    sets = list(dict.fromkeys([*DATASETS, *(ds for _, ds, _, _ in summary)]))
    plot_headline(found, sets, results / "headline.png")
    rows = [
        [
            label,
            *(
                ci(found[exp, method, ds]["accuracy"]) if (exp, method, ds) in found else "not run"
                for ds in sets
            ),
        ]
        for label, exp, method in HEADLINE
    ]
    return [
        "## Headline",
        "",
        "Test accuracy, mean over the five splits [95% interval]; every choice made on validation. "
        "A counterpart run on both machines shows the GPU run's figure (experiment 4 has both).",
        "",
        table(["method", *sets], rows),
        "",
        f"![headline bars]({rel}/headline.png)",
        "",
    ]


def reading(results: Path, name: str) -> list[str]:
    """The person's reading of an experiment's figures, kept beside its JSON as reading_<name>.md
    (written by hand after a full run; the generator only places it)."""
    path = results / f"reading_{name}.md"
    if not path.is_file():
        return [f"_Reading: not written yet ({path.name})._", ""]
    return ["**Reading.** " + path.read_text().strip(), ""]


def machine_text(m: dict) -> str:
    return (
        f"{m['cpu']}, {m['cores']} cores, GPU: {m.get('gpu') or 'none'}; "
        f"torch {m.get('torch')}, {m.get('torch_threads')} threads"
    )


def write(results: Path, out: Path) -> str:
    rel = (
        str(results.relative_to(out.parent)) if results.is_relative_to(out.parent) else str(results)
    )
    # An experiment run only on the GPU (scripts/experiments/gpu_run.sh) is read from results/gpu/.
    here = {name: load(results, name) for name, *_ in EXPERIMENTS}
    on_gpu = {name: load(results / "gpu", name) for name, *_ in EXPERIMENTS}
    found = {name: here[name] or on_gpu[name] for name in here}
    any_result = next((v for v in found.values() if v), None)
    m = (any_result or {}).get("machine") or machine()
    lines = [
        "# Results: the paper's findings and their counterparts, measured with llmembed",
        "",
        "Generated by `.venv/bin/python -m scripts.experiments.write_results` from the JSON files in "
        f"`{rel}/`; do not edit by hand. Each section names the command and the committed config that made its figures.",
        "",
    ]
    limits = {v.get("dataset_limit") for v in found.values() if v}
    if limits - {None}:
        lines += [
            f"> **Pilot figures**: runs on a subsample (`dataset.limit={sorted(limits - {None})}`), not the full sets.",
            "",
        ]
    top = len(lines)  # where the headline goes, once every section has given its figures
    lines += [
        "## Reproduce",
        "",
        "From the repository root, after `bash scripts/setup.sh`, in this order (experiment 2 reads experiment 1's "
        "validation scores, experiment 5 reads 1-4); each command composes its committed config "
        "(`conf/experiment/results_*.yaml`, whose first lines repeat the command) and takes Hydra overrides:",
        "",
        "```bash",
        "export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1",
        *[f".venv/bin/python -m {module}" for _, _, module, _ in EXPERIMENTS],
        ".venv/bin/python -m scripts.experiments.write_results",
        "```",
        "",
        "Data sets may run in separate processes or machines (`'results.datasets=[mr]' "
        "results.out_dir=DIR`; finished runs are reused by any later command); "
        "`.venv/bin/python -m scripts.experiments.merge DIR1 DIR2 --into docs/results` then joins "
        "their result files before experiment 5 and the page.",
        "",
        "On a machine with an NVIDIA GPU, `bash scripts/experiments/gpu_run.sh OUT_DIR` runs experiment 4 and "
        "llmembed's extraction of MR one job at a time, each metered (NVML joules); merged into "
        "`docs/results/gpu/` as its first lines say, experiment 4 and experiment 5 show it beside the CPU's figures.",
        "",
        "## Protocol",
        "",
        "- Five repeated stratified train / validation / test splits per data set (70 / 10 / 20): "
        "`seeds='[0,1,2,3,4]' resplit=true`; every split reads the same cache entry, so no forward pass is repeated.",
        "- Every choice (C of logistic regression, epochs of the torch heads, layers, pooling, σ, fusion layers, "
        "fine-tuning epochs) is made on the validation rows of each split; the test rows of a split are scored once, "
        "for the configuration chosen on that split. Layer curves show test scores of every layer for reading, never for choosing.",
        "- Figures: mean over the five splits and its 95% t-interval, `mean [low, high]`, for accuracy and macro-F1.",
        f"- Machine: {machine_text(m)}, unless a section names another. "
        "Shared with other work while measuring: timings are indicative.",
        "",
        "## Data",
        "",
        *[f"- {v}" for v in DATASETS.values()],
        "",
    ]
    summary: list = []
    for name, title, module, config in EXPERIMENTS:
        r = found[name]
        lines += [f"## {title}", ""]
        cmds = commands_of(r) if r else [f".venv/bin/python -m {module}"]
        lines += [
            f"Command: {' then '.join(f'`{c}`' for c in cmds)} (config `conf/experiment/{config}.yaml`).",
            "",
        ]
        if not r:
            lines += ["_Not run yet._", ""]
            continue
        if r.get("machine") and r["machine"] != m:
            lines += [f"Machine: {machine_text(r['machine'])}.", ""]
        if name == "layers":
            lines += sec_layers(r, rel, summary)
        elif name == "fusion":
            lines += sec_rows(r, name, summary)
        elif name == "recipe":
            lines += sec_rows(r, name, summary, recipe_extra)
        elif name == "counterparts" and here[name] and on_gpu[name]:
            # Both machines: the GPU's run (every set) first, then the CPU's, for comparison.
            g, from_gpu = on_gpu[name], []
            lines += [
                f"On the GPU ({machine_text(g['machine'])}): `bash scripts/experiments/gpu_run.sh OUT_DIR`, "
                f"which runs `{'` then `'.join(commands_of(g))}` (the reading says which timings are cost figures):",
                "",
            ]
            lines += sec_counterparts(g, from_gpu)
            lines += ["On the CPU of the other experiments:", ""]
            lines += sec_counterparts(r, summary)
            # One row per method and set: the GPU run's where it has one (it covers every set).
            gpu_rows = {(exp, ds, method) for exp, ds, method, _ in from_gpu}
            summary[:] = [x for x in summary if tuple(x[:3]) not in gpu_rows] + from_gpu
        elif name == "counterparts":
            lines += sec_counterparts(r, summary)
        else:
            lines += sec_cost(r)
            if r.get("gpu"):
                lines += [f"On the GPU ({machine_text(r['gpu']['machine'])}):", ""]
                lines += sec_cost(r["gpu"])
        lines += reading(results, name)
    if summary:
        lines[top:top] = headline(summary, results, rel)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    if not summary:
        return "\n".join(lines)
    with open(results / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "experiment",
                "dataset",
                "method",
                "accuracy",
                "accuracy_lo",
                "accuracy_hi",
                "macro_f1",
                "macro_f1_lo",
                "macro_f1_hi",
                "splits",
            ]
        )
        for exp, ds, method, t in summary:
            a, f1 = t["accuracy"], t["macro_f1"]
            w.writerow([exp, ds, method, a["mean"], *a["ci"], f1["mean"], *f1["ci"], a["n"]])
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path("docs/results"))
    ap.add_argument("--out", type=Path, default=Path("docs/RESULTS.md"))
    a = ap.parse_args()
    if not a.results.is_dir():
        ap.error(f"--results {a.results} is not a folder; give the experiments' results folder")
    write(a.results.resolve(), a.out.resolve())
    summary = a.results / "summary.csv"
    print(f"wrote {a.out}" + (f" and {summary}" if summary.is_file() else ""))


if __name__ == "__main__":
    main()
