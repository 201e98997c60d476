"""Write docs/RESULTS.md, the Results section of README.md (between its `results:begin` and
`results:end` markers) and docs/results/summary.csv from the result files of experiments 1-5.

    .venv/bin/python -m scripts.experiments.write_results [--results docs/results] [--out docs/RESULTS.md] [--readme README.md]

Every figure on the page comes from a JSON file in the results folder, written by a runner whose
command (and committed config) the page prints beside it; the paired tests and corrected intervals
are computed here from the per-split scores those files keep (scripts/experiments/stats.py). The
readings beside the figures are written by hand (docs/results/reading_<experiment>.md); every
number a reading quotes must be a number of the result files or of the generated page
(scripts/experiments/readings.py, checked by the tests). A missing file leaves its section saying which
command fills it. Estimated run: seconds.
"""

# ruff: noqa: E501  (the page's prose lives in long f-strings; wrapping them would not read better)
from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from llmembed.errors import UserError
from scripts.experiments.common import (
    commands_of,
    machine,
    machines_of,
    per_dataset,
    read_json,
    run_main,
    split_machines,
)
from scripts.experiments.comparisons import (
    BEST,
    CONCAT,
    comparisons,
    headline_rows,
    labels,
)
from scripts.experiments.readings import page_without_readings, unsupported_figures
from scripts.experiments.stats import common_splits, interval, p_text, paired

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


# --- figures --------------------------------------------------------------------------------------
class Page:
    """The figures found in the results folder, and how the page prints them."""

    def __init__(self, rows: dict[str, dict], splits: int | None = None):
        self.rows = rows  # per data set: training, validation and test rows of one split
        self.splits = splits  # the protocol's number of splits: a row on fewer says so
        self.found: dict[tuple[str, str, str], dict] = {}  # (experiment, data set, row) -> test

    def add(self, exp: str, ds: str, method: str, test: dict) -> None:
        self.found[exp, ds, method] = test

    def sizes(self, ds: str) -> dict | None:
        r = self.rows.get(ds)
        return None if r is None else {"n_train": r["train"] + r["validation"], "n_test": r["test"]}

    def cell(self, s: dict | None, ds: str, digits: int = 3) -> str:
        """`mean [plain 95% t-interval] ⟨corrected interval⟩`, † on an interval cut at 0 or 1."""
        if not s:
            return "–"
        f = f"{{:.{digits}f}}"
        values = s.get("values")
        if values and len(values) == 1:  # one split has no spread to build an interval from
            return f"{f.format(s['mean'])} (1 split, no interval)"
        if not values:
            return f"{f.format(s['mean'])} [{f.format(s['ci'][0])}, {f.format(s['ci'][1])}]"
        plain = interval(values)
        text = f"{f.format(s['mean'])} [{f.format(plain.lo)}, {f.format(plain.hi)}]{'†' if plain.clipped else ''}"
        sizes = self.sizes(ds)
        if sizes:
            c = interval(values, **sizes)
            text += f" ⟨{f.format(c.lo)}, {f.format(c.hi)}⟩{'†' if c.clipped else ''}"
        if self.splits and len(values) < self.splits:
            text += f" ({len(values)} splits)"
        return text

    def delta(self, a: dict | None, b: dict | None, ds: str) -> str:
        """A - B over their common splits: difference ⟨corrected interval⟩, corrected p."""
        test = self.test(a, b, ds)
        if test is None:
            return "–"
        return (
            f"{signed(test.diff)} ⟨{signed(test.ci.lo)}, {signed(test.ci.hi)}⟩, p {p_text(test.p)}"
        )

    def test(self, a: dict | None, b: dict | None, ds: str):
        sizes = self.sizes(ds)
        if not a or not b or not sizes or not a.get("values") or not b.get("values"):
            return None
        x, y = common_splits(a, b)
        return paired(x, y, **sizes) if len(x) > 1 else None

    def comparison_table(
        self, items: list[tuple[str, tuple, tuple]], sets: Iterable[str]
    ) -> list[str]:
        out = []
        for what, (ea, ka), (eb, kb) in items:
            for ds in sets:
                a, b = self.found.get((ea, ds, ka)), self.found.get((eb, ds, kb))
                t = self.test(a and a["accuracy"], b and b["accuracy"], ds)
                if t is None:
                    continue
                out.append(
                    [
                        what,
                        ds,
                        signed(t.diff),
                        f"⟨{signed(t.ci.lo)}, {signed(t.ci.hi)}⟩",
                        p_text(t.p),
                        p_text(t.p_plain),
                        str(t.n),
                    ]
                )
        if not out:
            return []
        return [
            table(
                [
                    "comparison (test accuracy, A − B)",
                    "data set",
                    "difference",
                    "corrected 95% interval",
                    "p (corrected)",
                    "p (plain paired t)",
                    "splits",
                ],
                out,
            ),
            "",
        ]


def signed(x: float) -> str:
    """+0.012 / -0.012; a difference that rounds to zero prints as 0.000, not -0.000."""
    text = f"{x:+.3f}"
    return "0.000" if text in ("+0.000", "-0.000") else text


def num(x, fmt: str = "{:,.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def load(results: Path, name: str) -> dict | None:
    p = results / f"{name}.json"
    return read_json(p, "the results page") if p.is_file() else None


def split_rows(found: dict) -> dict[str, dict]:
    """Rows of one split per data set, from any llmembed run the result files hold."""
    out = {}
    for name in ("layers", "fusion", "recipe"):
        for ds, d in ((found.get(name) or {}).get("datasets") or {}).items():
            if ds in out:
                continue
            infos = [p["info"] for c in d.get("curves", {}).values() for p in c]
            infos += [i for r in d.get("rows", {}).values() for i in (r.get("info") or {}).values()]
            infos = [i for i in infos if isinstance(i, dict) and "rows" in i]
            if infos:
                out[ds] = infos[0]["rows"]
    return out


# --- sections -------------------------------------------------------------------------------------
def sec_layers(r: dict, rel: str, page: Page) -> list[str]:
    out = []
    for ds, d in r["datasets"].items():
        rows = []
        for backbone, c in d["chosen_on_validation"].items():
            picks = sorted(set(c["per_split"].values()))
            rows.append(
                [
                    backbone,
                    ", ".join(picks),
                    page.cell(c["test"]["accuracy"], ds),
                    page.cell(c["test"]["macro_f1"], ds),
                ]
            )
            page.add("layers", ds, f"{backbone} best (layer, pooling) on validation", c["test"])
        for key, curve in d["curves"].items():
            last = curve[-1]
            rows.append(
                [
                    f"{key} last layer (L{last['layer']})",
                    "fixed",
                    page.cell(last["test"]["accuracy"], ds),
                    page.cell(last["test"]["macro_f1"], ds),
                ]
            )
            page.add("layers", ds, f"{key} L{last['layer']}", last["test"])
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
        for key, curve in d["curves"].items():  # the full curve, compactly
            out.append(
                f"- {key}: "
                + " ".join(f"L{p['layer']} {p['test']['accuracy']['mean']:.3f}" for p in curve)
            )
        out.append("")
    return out


def sec_rows(r: dict, name: str, page: Page, reference, against: str, extra=None) -> list[str]:
    """An experiment whose result is a table of rows per data set (experiments 2 and 3), each row
    beside its paired difference from `reference(ds, row name)` (experiment, row) or None."""
    out = []
    for ds, d in r["datasets"].items():
        for method, row in d["rows"].items():
            page.add(name, ds, method, row["test"])
    for ds, d in r["datasets"].items():
        rows = []
        for method, row in d["rows"].items():
            chosen = row.get("chosen_per_split")
            chosen = (
                "; ".join(f"{s}: {v.split(': ', 1)[0]}" for s, v in chosen.items())
                if chosen
                else "fixed"
            )
            ref = reference(ds, method)
            ref_row = page.found.get((ref[0], ds, ref[1])) if ref else None
            vs = (
                page.delta(row["test"]["accuracy"], ref_row and ref_row["accuracy"], ds)
                if ref and ref[1] != method
                else ""
            )
            rows.append(
                [
                    method,
                    page.cell(row["test"]["accuracy"], ds),
                    page.cell(row["test"]["macro_f1"], ds),
                    vs,
                    chosen,
                ]
            )
        out += [
            f"**{ds}**",
            "",
            table(
                [
                    "features and head",
                    "test accuracy",
                    "test macro-F1",
                    f"accuracy − {against} ⟨corrected 95%⟩, p",
                    "chosen per split (validation)",
                ],
                rows,
            ),
            "",
        ]
        if extra:
            out += extra(d)
    return out


def fusion_reference(ds: str, method: str) -> tuple[str, str]:
    return ("fusion", BEST)


def recipe_reference(lab: dict[str, str]):
    """Each recipe row against llmembed's own way of doing the same thing."""

    def ref(ds: str, method: str) -> tuple[str, str] | None:
        if method.startswith("head: "):
            return ("recipe", lab["head.llmembed"])
        if method.startswith("layers: "):
            return ("fusion", CONCAT)
        if method.startswith(
            "pooling on "
        ):  # the paper's lengths: against llmembed's on the same rows
            head = method.split(": ", 1)[0]
            return ("recipe", f"{head}: mask-aware mean, no BOS (llmembed); last five layers, mean")
        rule = method.rsplit("; ", 1)[1]
        return ("recipe", f"pooling: mask-aware mean, no BOS (llmembed); {rule}")

    return ref


def recipe_extra(d: dict) -> list[str]:
    i = d.get("custom_extraction", {})
    out = [
        f"Our own forward pass: padded to {i.get('pad_to')} tokens with `{i.get('pad_token')}`, BOS `{i.get('bos_token')}` "
        f"(SmolLM2's tokenizer adds a BOS itself: {i.get('tokenizer_adds_bos')}), {i.get('dtype', 'cached')} compute.",
        "",
    ]
    big = i.get("massive_dimensions")
    if big:
        out += [
            "Largest dimension of SmolLM2's raw mask-aware mean states per layer (mean magnitude over the texts, times the median dimension's): "
            + "; ".join(
                f"L{layer} dimension {v['dimension']} ({v['times_median']:g}x)"
                for layer, v in big.items()
            )
            + ".",
            "",
        ]
    return out


def counterpart_rows(d: dict) -> list[tuple[str, dict]]:
    """(row name, row) of every setup of one data set, prompting first."""
    return [
        (name, row)
        for kind in ("prompting", "finetuning")
        for setup in d.get(kind, {}).values()
        for name, row in setup["rows"].items()
    ]


def splits_of(row: dict, every: list[int]) -> list[int]:
    """The splits a row holds: as its summary records them, else its per-split records; a first
    run's row recorded neither and ran them all."""
    per_split = row.get("runs") or row["cost"].get("per_split") or {}
    return row["test"]["accuracy"].get("seeds") or [int(s) for s in per_split] or every


MIXED = "‡ "  # a mean over splits that ran on different machines


def mixed(machines: list[str] | None) -> str:
    return MIXED if len(machines or []) > 1 else ""


def ran_on(setup: dict) -> str:
    """Which splits ran on which machine, where a setup's splits ran on more than one."""
    where: dict[str, list[int]] = {}
    for row in setup["rows"].values():
        for s, r in row.get("runs", {}).items():
            for m in split_machines(r):
                where.setdefault(m, []).append(int(s))
    if len(where) < 2:
        return ""
    parts = [
        f"splits {sorted(set(s))} on {m}" for m, s in sorted(where.items(), key=lambda x: min(x[1]))
    ]
    return f"; {', '.join(parts)} ({MIXED.strip()} its mean seconds mix the machines)"


def sec_counterparts(r: dict, page: Page, into: dict) -> list[str]:
    out = []
    for ds, d in r["datasets"].items():
        rows = []
        for name, row in counterpart_rows(d):
            into[ds, name] = row["test"]
            best = page.found.get(("fusion", ds, BEST))
            c = row["cost"]
            if "per_split" in c:
                per = list(c["per_split"].values())
                sec = (
                    mixed(machines_of(row))
                    + num(float(np.mean([p.get("selection_s", 0.0) for p in per])), "{:,.1f}")
                    + " + "
                    + num(float(np.mean([p.get("test_s", 0.0) for p in per])), "{:,.1f}")
                )
            else:
                rate = c["per_1000"]
                sec = f"rate only: {num(rate['test']['seconds'])} s / 1,000 test texts" + (
                    f", {num(rate['train']['seconds'])} s / 1,000 training rows"
                    if "train" in rate
                    else ""
                )
            chosen = row.get("chosen_per_split")
            rows.append(
                [
                    name,
                    page.cell(row["test"]["accuracy"], ds),
                    page.cell(row["test"]["macro_f1"], ds),
                    page.delta(row["test"]["accuracy"], best and best["accuracy"], ds),
                    sec,
                    f"{row['params_trained']:,}",
                    "; ".join(f"{s}: {v}" for s, v in chosen.items()) if chosen else "fixed",
                ]
            )
        out += [
            f"**{ds}**",
            "",
            table(
                [
                    "method",
                    "test accuracy",
                    "test macro-F1",
                    f"accuracy − {BEST} ⟨corrected 95%⟩, p",
                    "seconds per split: selection + test",
                    "parameters trained",
                    "chosen per split (validation)",
                ],
                rows,
            ),
            "",
        ]
        for name, setup in d.get("prompting", {}).items():
            st = setup["settings"]
            how = (
                f"chat template, instruction `{json.dumps(setup['instruction'])[1:-1]}`"
                if st.get("chat")
                else f"template `{json.dumps(setup['template'])[1:-1]}`"
            )
            out += [
                f"Prompting setup `{name}`: {how}; label words {', '.join(f'{k} → {v}' for k, v in setup['words'].items())}; "
                f"{'calibrated on content-free inputs' if st.get('calibrate') else 'uncalibrated'}; demonstrations per class {per_dataset(st.get('shots'), ds)}"
                f"{' (chosen on validation)' if st.get('choose_shots') else ''}; texts cut to {per_dataset(st.get('max_text_tokens'), ds)} tokens, demonstrations to {per_dataset(st.get('max_shot_tokens'), ds)}.",
                "",
            ]
        all_splits = sorted(r.get("seeds") or [])
        for name, setup in d.get("finetuning", {}).items():
            st = setup["settings"]
            # The splits the rows hold, not the setting: a run over fewer seeds skipped some of those.
            ran = sorted({s for row in setup["rows"].values() for s in splits_of(row, all_splits)})
            epochs = (
                "one epoch"
                if st.get("max_epochs") == 1
                else f"at most {st.get('max_epochs')} epochs (early stopping on validation)"
            )
            out += [
                f"Fine-tuning setup `{name}`: {st.get('backbone')}, {st.get('method')}"
                + (f" (LoRA {st['lora']})" if st.get("lora") else "")
                + f", learning rates {st.get('lrs')}, batch {st.get('batch_size')}, {epochs}, texts cut to {per_dataset(st.get('max_length'), ds)} tokens"
                + (f", splits {ran} only" if ran != all_splits else "")
                + ran_on(setup)
                + ".",
                "",
            ]
    return out


def sec_cost(r: dict, page: Page, where: str) -> list[str]:
    out = []
    for ds, d in r["datasets"].items():
        rows = []
        for name, m in d["methods"].items():
            approx = ("≈ " if m.get("estimated") else "") + mixed(m.get("machines"))
            one = (
                "–"
                if m["kind"] != "llmembed"
                else f"{num(m['one_time_s'])} ({', '.join(m['extraction'])})"
            )
            fits = str(m["selection_fits_per_split"]) if m["kind"] == "llmembed" else "–"
            rows.append(
                [
                    name,
                    f"{m['test']['accuracy']['mean']:.3f}",
                    one,
                    fits,
                    approx + num(m["per_split_s"]),
                    approx + num(m["total_s"]),
                    f"{m['params_used']:,}",
                    f"{m['params_trained']:,}",
                ]
            )
        out += [
            f"**{ds}** ({d['rows']['train']:,} training, {d['rows']['validation']:,} validation, {d['rows']['test']:,} test rows per split; {where})",
            "",
            table(
                [
                    "method",
                    "test accuracy",
                    "one-time: extraction of every row, s (backbones)",
                    "fits to choose, per split",
                    "per split: selection + test, s",
                    "total, all splits, s",
                    "parameters used",
                    "parameters trained",
                ],
                rows,
            ),
            "",
        ]
        claims = [c for c in d["claim"] if c.get("llmembed")]
        if claims:
            out += [
                table(
                    [
                        "counterpart",
                        "its accuracy",
                        "its total, s",
                        "cheapest llmembed method at or above it",
                        "its accuracy",
                        "difference, p (corrected)",
                        "its total, s",
                        "runtime quotient",
                        "parameters used quotient",
                    ],
                    [
                        [
                            c["counterpart"],
                            f"{c['counterpart_accuracy']:.3f}",
                            ("≈ " if c.get("counterpart_estimated") else "")
                            + mixed(c.get("counterpart_machines"))
                            + num(c["counterpart_total_s"]),
                            c["llmembed"],
                            f"{c['llmembed_accuracy']:.3f}",
                            "–"
                            if c["p"] is None
                            else f"{signed(c['difference'])}, p {p_text(c['p'])}",
                            ("≈ " if c["estimated"] else "") + num(c["llmembed_total_s"]),
                            num(c["runtime"], "{:.1%}"),
                            num(c["params_used"], "{:.1%}"),
                        ]
                        for c in claims
                    ],
                ),
                "",
            ]
        none = [c["counterpart"] for c in d["claim"] if not c.get("llmembed")]
        if none:
            out += [f"No llmembed method reaches the mean accuracy of: {'; '.join(none)}.", ""]
    return out


def cost_notes(r: dict) -> list[str]:
    p = r["paper_ratios"]
    sections = [r, *([r["gpu"]] if r.get("gpu") else [])]
    methods = [m for x in sections for d in x["datasets"].values() for m in d["methods"].values()]
    marks = []  # each mark explained only where the tables show one
    if any(m.get("estimated") for m in methods):
        marks.append(
            "≈ marks a figure that includes candidates of which an earlier run kept only the chosen fit (each counted at the chosen one's seconds; experiment 1's sweep is measured), "
            "or a counterpart run on fewer splits whose total is its mean per split times the protocol's splits"
        )
    if any(mixed(m.get("machines")) for m in methods):
        marks.append(
            f"{MIXED.strip()} marks a counterpart whose splits ran on different machines (its setup's description in experiment 4 says which), so its mean mixes their seconds"
        )
    return [
        "; ".join(["Seconds per split are the mean over the splits", *marks])
        + ". A logistic regression's test predictions are too cheap to meter and count as zero.",
        "",
        f"The paper reports LLMEmbed at {p['parameters']:.0%} of the parameters, {p['electricity']:.1%} of the electricity and {p['runtime']:.1%} of the runtime "
        "of its prompt-based counterparts: LLaMA-2-7B's embeddings against prompting much larger LLMs. Here both sides run the same 135M decoder, so the "
        "parameters used are about 100% by construction (more with MiniLM beside it), and those quotients cannot be reproduced at this scale. What can be measured is the claim's own form: "
        "the runtime quotient above sets the cheapest llmembed method whose mean accuracy is at least the counterpart's (extraction of every row once, then every fit its "
        "choice needs on every split) against the counterpart over every split (every test row prompted, its own selection included).",
        "",
    ]


# --- reproducibility ------------------------------------------------------------------------------
def sec_reproducibility(found: dict, results: Path, page: Page) -> list[str]:
    out = [
        "## Reproducibility",
        "",
        "What is bitwise and what is not:",
        "",
        "- **The splits** are drawn from a seed by a stratified rule (`resplit=true`): the same rows on any machine.",
        "- **A head fitted on a given cache entry** repeats its figures exactly on the same machine, threads and library versions: "
        "logistic regression with one BLAS thread, the torch heads seeded (`results.head_threads` torch threads).",
        "- **The cache entries are not bitwise across runs**: SmolLM2's forward pass runs in bfloat16 on this CPU, and its rounding depends on the thread count "
        "and on which texts share a batch (an extraction batches the texts it has to compute, sorted by length, so a fresh cache filled in another order "
        "batches them differently). A rerun from a clean cache therefore moves single per-split scores; the run-to-run variation below measures by how much, "
        "beside the interval over splits.",
        "- **Finished runs are reused**: with `results.resume=true` (the committed configs), a runner takes any finished llmembed run of the same "
        "configuration from `results.run_dir` instead of fitting it again, and experiment 4 any finished fine-tuning run of the same split, "
        "learning rate and settings (a record per split and rate in `results.run_dir/finetuning/`, with the figures, machine and command of "
        "the process that fitted it). Every command printed on this page names `results.run_dir` and "
        "`results.resume` where its result file recorded them; a clean rerun needs a fresh `results.run_dir` (and, to redo the extraction, a fresh `LLMEMBED_CACHE`).",
        "",
    ]
    counted = []
    for name, title, *_ in EXPERIMENTS:
        for run in (found.get(name) or {}).get("runs", []):
            counted.append([title, f"`{run['command']}`", str(run["fitted"]), str(run["reused"])])
    if counted:
        out += [
            table(
                ["experiment", "command", "runs fitted", "reused from results.run_dir"],
                counted,
            ),
            "",
        ]
    else:
        out += [
            "The committed result files predate this count: how many of their runs were reused from earlier ones is not recorded.",
            "",
        ]
    rerun = results / "rerun" / "layers.json"
    if rerun.is_file() and found.get("layers"):
        out += rerun_variation(found["layers"], json.loads(rerun.read_text()), page)
    else:
        out += [
            "Run-to-run variation: not measured in these files. It is measured by rerunning experiment 1 from an empty cache and run folder into "
            "`docs/results/rerun/` (`LLMEMBED_CACHE=$(mktemp -d) .venv/bin/python -m scripts.experiments.layers results.datasets=[trec] "
            "results.out_dir=docs/results/rerun results.run_dir=outputs/rerun`); this section then compares it with the committed run.",
            "",
        ]
    return out


def rerun_variation(first: dict, again: dict, page: Page) -> list[str]:
    """Per data set both runs hold: how many per-split test accuracies are equal, the largest
    change of one, the largest change of a curve point's mean, beside the interval over splits."""
    rows, best = [], []
    for ds, d in again["datasets"].items():
        if ds not in first["datasets"]:
            continue
        for backbone, c in d["chosen_on_validation"].items():
            was = first["datasets"][ds]["chosen_on_validation"][backbone]
            a, b = was["test"]["accuracy"], c["test"]["accuracy"]
            same = sum(was["per_split"][k] == v for k, v in c["per_split"].items())
            best.append(
                [
                    ds,
                    f"{backbone} best (layer, pooling) on validation",
                    page.cell(a, ds),
                    page.cell(b, ds),
                    f"{b['mean'] - a['mean']:+.3f}",
                    f"{same} of {len(c['per_split'])}",
                ]
            )
        cells, means, widths = [], [], []
        for key, curve in d["curves"].items():
            for p, q in zip(first["datasets"][ds]["curves"][key], curve, strict=True):
                a, b = p["test"]["accuracy"], q["test"]["accuracy"]
                cells += [abs(x - y) for x, y in zip(a["values"], b["values"], strict=True)]
                means.append(abs(a["mean"] - b["mean"]))
                widths.append(a["ci"][1] - a["ci"][0])
        rows.append(
            [
                ds,
                f"{sum(c == 0 for c in cells)} of {len(cells)}",
                f"{max(cells):.3f}",
                f"{max(means):.3f}",
                f"{np.median(widths) / 2:.3f}",
            ]
        )
    return [
        f"Run-to-run variation: experiment 1 rerun from an empty cache and run folder (`{'` then `'.join(commands_of(again))}`), against the committed run:",
        "",
        table(
            [
                "data set",
                "per-split test accuracies equal",
                "largest change of one",
                "largest change of a curve point's mean",
                "median half-width of the interval over splits",
            ],
            rows,
        ),
        "",
        "The figures the page quotes from experiment 1, in both runs:",
        "",
        table(
            ["data set", "probe", "committed run", "rerun", "difference", "same pick per split"],
            best,
        ),
        "",
    ]


# --- the headline and the README ------------------------------------------------------------------
def plot_headline(page: Page, heads: list, sets: list[str], path: Path) -> None:
    """The headline as bars: one panel per data set, each method's mean with its corrected interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [h for h in heads if any((h[1], ds, h[2]) in page.found for ds in sets)]
    fig, axes = plt.subplots(
        1, len(sets), figsize=(4 * len(sets) + 6, 0.45 * len(shown) + 2), sharey=True
    )
    for ax, ds in zip(np.atleast_1d(axes), sets, strict=True):
        for y, (_, exp, method) in enumerate(shown[::-1]):
            t = page.found.get((exp, ds, method))
            if t is None:
                continue
            a = t["accuracy"]
            sizes = page.sizes(ds)
            lo, hi = (
                a["ci"]
                if not sizes or len(a.get("values", [])) < 2
                else (lambda c: (c.lo, c.hi))(interval(a["values"], **sizes))
            )
            ax.barh(
                y, a["mean"], color="tab:gray" if exp == "counterparts" else "tab:blue", alpha=0.8
            )
            ax.errorbar(
                a["mean"], y, xerr=[[a["mean"] - lo], [hi - a["mean"]]], color="black", capsize=3
            )
        ax.set_title(ds)
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel("test accuracy (corrected 95% interval)")
        ax.grid(axis="x", alpha=0.3)
    ax0 = np.atleast_1d(axes)[0]
    ax0.set_yticks(range(len(shown)), [h[0][:70] for h in shown[::-1]], fontsize=7)
    fig.suptitle(
        "llmembed (blue) against its counterparts (gray), five splits unless the table says fewer"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def headline(page: Page, lab: dict, results: Path, rel: str) -> tuple[list[str], list[str]]:
    """(the page's headline section, the README's Results block)."""
    sets = list(dict.fromkeys([*DATASETS, *(ds for _, ds, _ in page.found)]))
    heads = headline_rows(lab)
    plot_headline(page, heads, sets, results / "headline.png")
    rows = [
        [
            label,
            *(
                page.cell(page.found[exp, ds, method]["accuracy"], ds)
                if (exp, ds, method) in page.found
                else "not run"
                for ds in sets
            ),
        ]
        for label, exp, method in heads
    ]
    intro = (
        "Test accuracy, mean over the five splits (a cell on fewer says so), its plain 95% t-interval in [ ] and Nadeau and Bengio's corrected interval in ⟨ ⟩ "
        "(the plain one treats the five overlapping resplits as independent and is optimistic; † marks an interval cut at 0 or 1); "
        "every choice made on validation. A counterpart run on both machines shows the GPU run's figure. "
        "`not run`: a row that a committed config runs but the committed result files do not hold yet."
    )
    body = [intro, "", table(["method", *sets], rows), ""]
    cmp = page.comparison_table(comparisons(lab)["headline"], sets)
    body += (
        ["Paired comparisons (the same splits; corrected resampled t-test):", "", *cmp]
        if cmp
        else []
    )
    section = [
        "## Headline",
        "",
        *body,
        f"![headline bars]({rel}/headline.png)",
        "",
        *reading(results, "headline"),
    ]
    return section, body


def reading(results: Path, name: str) -> list[str]:
    """The person's reading of an experiment's figures, kept beside its JSON as reading_<name>.md
    (written by hand after a full run; the generator only places it)."""
    path = results / f"reading_{name}.md"
    if not path.is_file():
        return [f"_Reading: not written yet ({path.name})._", ""]
    return ["**Reading.** " + path.read_text().strip(), ""]


README_BEGIN = "<!-- results:begin (generated by scripts.experiments.write_results from docs/results; do not edit by hand) -->"
README_END = "<!-- results:end -->"


def readme_text(readme: Path) -> str:
    """The README whose Results block is to be rewritten, refused before anything is written."""
    fix = "or give --readme '' to leave every README alone"
    if not readme.is_file():
        raise UserError(f"--readme {readme} is not a file: give the README to write into, {fix}")
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise UserError(
            f"{readme} has no {README_BEGIN} ... {README_END} block to write the results into: "
            f"add the two lines where they go, {fix}"
        )
    return text


def write_readme(readme: Path, text: str, body: list[str], results: Path) -> None:
    """Replace the README's generated Results block (between its markers) with the headline, its
    comparisons and its reading (docs/results/reading_headline.md)."""
    rel = "docs/results"
    block = [
        README_BEGIN,
        "",
        *body,
        f"![headline bars]({rel}/headline.png)",
        "",
        *[line for line in reading(results, "headline") if not line.startswith("_Reading")],
        README_END,
    ]
    before, rest = text.split(README_BEGIN, 1)
    after = rest.split(README_END, 1)[1]
    text = before + "\n".join(block).replace("**Reading.** ", "") + after
    readme.write_text(text)


def machine_text(m: dict) -> str:
    return f"{m['cpu']}, {m['cores']} cores, GPU: {m.get('gpu') or 'none'}; torch {m.get('torch')}, {m.get('torch_threads')} threads"


def write(results: Path, out: Path, readme: Path | None = None) -> str:
    rel = (
        str(results.relative_to(out.parent)) if results.is_relative_to(out.parent) else str(results)
    )
    # An experiment run only on the GPU (scripts/experiments/gpu_run.sh) is read from results/gpu/.
    here = {name: load(results, name) for name, *_ in EXPERIMENTS}
    on_gpu = {name: load(results / "gpu", name) for name, *_ in EXPERIMENTS}
    found = {name: here[name] or on_gpu[name] for name in here}
    any_result = next((v for v in found.values() if v), None)
    m = (any_result or {}).get("machine") or machine()
    lab = labels()
    page = Page(split_rows(found), len((any_result or {}).get("seeds") or []) or None)
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
        "Finished runs in `results.run_dir` (default `outputs/results`: llmembed's, and experiment 4's fine-tuning runs, one per split and learning rate) are reused (`results.resume=true`): a clean rerun "
        "gives a fresh `results.run_dir=DIR` (and `LLMEMBED_CACHE=DIR` for a fresh extraction). "
        "Data sets may run in separate processes or machines (`'results.datasets=[mr]' results.out_dir=DIR`; "
        "give each process `OMP_NUM_THREADS=1` where their threads together would outnumber the cores: "
        "a torch thread waiting for a busy core spins), and so may a fine-tuning setup's splits "
        "(`results.counterparts.finetuning.setups.NAME.splits.mr=[0]`; `...NAME.micro_batch=4` takes the same steps in less memory, with other dropout masks) "
        "and its learning rates (`...NAME.lrs=[1e-4]`, the same `results.run_dir`: the full command then reuses their records and trains nothing); "
        "`.venv/bin/python -m scripts.experiments.merge DIR1 DIR2 --into docs/results` then joins their result files before experiment 5 and the page "
        "(each fine-tuning split keeps the machine it ran on: a setup whose splits ran on different machines says which, and its mean seconds are marked ‡).",
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
        "demonstrations, learning rates, fine-tuning epochs) is made on the validation rows of each split; a method's figure is the test score of the "
        "configuration chosen on that split. Test scores of other candidates are kept for reading, never for choosing: the layer curves show every layer's, "
        "and each fine-tuning run's record in `results.run_dir` holds its own (so that a sweep run in parts is complete), unread by the page.",
        "- Figures: mean over the splits with two 95% intervals, `mean [plain] ⟨corrected⟩`. The plain t-interval treats the five splits as independent samples; "
        "they are not (any two training sets share most of their rows), so it is optimistic. The corrected interval is Nadeau and Bengio's (2003) for "
        "repeated random splits: variance (1/J + n_test/n_train)·s² over J splits, n_train the rows a method learns from (training and validation), "
        "n_test the test rows. Scores live in [0, 1]: † marks an interval cut there.",
        "- Comparisons: every difference the readings discuss is tested on the same splits (paired), by the corrected resampled t-test (4 degrees of freedom "
        "over five splits); the plain paired t-test's p-value is shown beside it. Tables give each row's difference from a reference row, its corrected "
        "interval and p (scripts/experiments/stats.py).",
        f"- Machine: {machine_text(m)}, unless a section names another. Shared with other work while measuring: timings are indicative.",
        "",
    ]
    lines += sec_reproducibility(found, results, page)
    lines += ["## Data", "", *[f"- {v}" for v in DATASETS.values()], ""]
    cmps = comparisons(lab)
    sections: dict[str, list[str]] = {}
    for name, title, module, config in EXPERIMENTS:
        r, sec = found[name], []
        cmds = commands_of(r) if r else [f".venv/bin/python -m {module}"]
        sec += [
            f"Command: {' then '.join(f'`{c}`' for c in cmds)} (config `conf/experiment/{config}.yaml`).",
            "",
        ]
        if not r:
            sections[name] = [f"## {title}", "", *sec, "_Not run yet._", ""]
            continue
        if r.get("machine") and r["machine"] != m:
            sec += [f"Machine: {machine_text(r['machine'])}.", ""]
        if name == "layers":
            sec += sec_layers(r, rel, page)
        elif name == "fusion":
            sec += sec_rows(r, name, page, fusion_reference, "SmolLM2 best single layer")
        elif name == "recipe":
            sec += sec_rows(
                r,
                name,
                page,
                recipe_reference(lab),
                "llmembed's way (mask-aware mean with the same layer rule; experiment 2's SmolLM2 concatenation; llmembed's head)",
                recipe_extra,
            )
        elif name == "counterparts":
            cpu_rows, gpu_rows = {}, {}
            if here[name] and on_gpu[name]:
                g = on_gpu[name]
                sec += [
                    f"On the GPU ({machine_text(g['machine'])}): `bash scripts/experiments/gpu_run.sh OUT_DIR`, "
                    f"which runs `{'` then `'.join(commands_of(g))}` (the reading says which timings are cost figures):",
                    "",
                ]
                sec += sec_counterparts(g, page, gpu_rows)
                sec += ["On the CPU of the other experiments:", ""]
            sec += sec_counterparts(r, page, cpu_rows)
            for (ds, method), t in {
                **cpu_rows,
                **gpu_rows,
            }.items():  # the GPU's run where it has one
                page.add("counterparts", ds, method, t)
        else:
            sec += sec_cost(r, page, "seconds on the machine above, shared and loaded: indicative")
            if r.get("gpu"):
                g = r["gpu"]
                sec += [
                    f"On the GPU ({machine_text(g['machine'])}): extraction and counterparts on the GPU; llmembed's fits are the CPU's above, so its totals add GPU seconds (extraction) and CPU seconds (fits):",
                    "",
                ]
                sec += sec_cost(g, page, "mixed: GPU extraction and counterparts, CPU fits")
            sec += cost_notes(r)
        sections[name] = [f"## {title}", "", *sec]
    sets = list(dict.fromkeys([*DATASETS, *(ds for _, ds, _ in page.found)]))
    for name, *_ in EXPERIMENTS:
        lines += sections[name]
        if found[name]:
            cmp = page.comparison_table(cmps.get(name, []), sets)
            lines += (
                ["Paired comparisons (the same splits; corrected resampled t-test):", "", *cmp]
                if cmp
                else []
            )
            lines += reading(results, name)
    # The README is checked before anything is written (the headline's plot included).
    old_readme = readme_text(readme) if readme is not None and page.found else None
    section, readme_body = headline(page, lab, results, rel) if page.found else ([], [])
    lines[top:top] = section
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if old_readme is not None:
        write_readme(readme, old_readme, readme_body, results)
    if page.found:
        write_summary(page, results / "summary.csv")
    return text


def write_summary(page: Page, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "experiment",
                "dataset",
                "method",
                "accuracy",
                "accuracy_lo",
                "accuracy_hi",
                "accuracy_corrected_lo",
                "accuracy_corrected_hi",
                "macro_f1",
                "macro_f1_lo",
                "macro_f1_hi",
                "splits",
            ]
        )
        for (exp, ds, method), t in page.found.items():
            a, f1 = t["accuracy"], t["macro_f1"]
            sizes = page.sizes(ds)
            c = interval(a["values"], **sizes) if sizes and len(a.get("values", [])) > 1 else None
            w.writerow(
                [
                    exp,
                    ds,
                    method,
                    a["mean"],
                    *a["ci"],
                    *((c.lo, c.hi) if c else ("", "")),
                    f1["mean"],
                    *f1["ci"],
                    a["n"],
                ]
            )


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path("docs/results"))
    ap.add_argument("--out", type=Path, default=Path("docs/RESULTS.md"))
    ap.add_argument(
        "--readme",
        default="README.md",
        help="the README whose Results block is rewritten ('' to leave every README alone)",
    )
    a = ap.parse_args(argv)
    if not a.results.is_dir():
        ap.error(f"--results {a.results} is not a folder; give the experiments' results folder")
    readme = Path(a.readme).resolve() if a.readme else None
    text = write(a.results.resolve(), a.out.resolve(), readme)
    bare = page_without_readings(text)
    for path in sorted(a.results.glob("reading_*.md")):
        bad = unsupported_figures(path.read_text(), bare, a.results.resolve())
        if bad:
            print(
                f"warning: {path} quotes figures found neither in the result files nor on the page: {', '.join(bad)}"
            )
    summary = a.results / "summary.csv"
    print(
        f"wrote {a.out}"
        + (f", {a.readme}'s Results" if readme else "")
        + (f" and {summary}" if summary.is_file() else "")
    )


if __name__ == "__main__":
    run_main(main)
