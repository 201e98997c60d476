"""Experiment 5 (seconds: it reads experiments 1-4): what every method costs end to end, its own
choices included, beside its accuracy; and the paper's cost claim in its own form.

    .venv/bin/python -m scripts.experiments.cost [hydra overrides]   # conf/experiment/results_cost.yaml

Runs no model: it reads what experiments 1-4 measured (llmembed's `metrics.json` figures kept in
the result files, experiment 1's record of each backbone's extraction of each data set, the
counterparts' own meters).

Per data set and method, all on one machine (a section says which):
- one-time: embedding every row of the data set once with every backbone the method's choice
  looks at (llmembed; the cache then serves every split, layer, pooling and head);
- per split: the selection, every fit the method makes to choose (every layer of experiment 1's
  sweep that a choice ranks or picks from, every concatenation or σ candidate), or, for a
  counterpart, every validation prompt it scores and every training run of its sweep; then its
  test predictions (a logistic regression's are too cheap to meter and count as zero);
- total: one-time + the per-split costs of every split (the mean per split times the splits).
Rows written before selection was recorded (the first run's fusion.json) get their candidates'
fits from experiment 1's sweep (measured) and, for the concatenation and σ candidates of which
only the chosen fit was kept, the chosen one's seconds times their number: `estimated` says so.

The paper's claim (LLMEmbed at 4% of the parameters, 1.8% of the electricity, 1.5% of the
runtime) sets LLaMA-2-7B's embeddings against prompting much larger LLMs. Here both sides use the
same 135M decoder, so the parameters used are ~100% by construction; the runtime is compared in
the claim's own form: the cheapest llmembed method at or above a counterpart's mean accuracy,
total against total (every test row of every split prompted; llmembed's extraction of every row
once, selection and training). Seconds of different machines are never added: on the GPU section
llmembed's fits are the CPU's and the row says so. Energy: NVML on NVIDIA GPUs, RAPL on CPUs;
where none is readable the joules are null and the reason is kept. Estimated run: seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llmembed.errors import UserError
from scripts.experiments.common import (
    entry_mb,
    experiment_cfgs,
    header,
    machines_of,
    read_json,
    run_main,
    setup_logging,
    write_json,
)
from scripts.experiments.stats import common_splits, paired

EXPERIMENT, MODULE = "results_cost", "scripts.experiments.cost"
BACKBONE_PARAMS = {
    "smollm2": 134_515_008,
    "minilm": 22_713_216,
}  # counted from the packaged weights


# --- extraction records ---------------------------------------------------------------------------
def summed(records: list[dict], *, without_load: bool = False) -> dict:
    """Extraction records (a cache manifest's) of one data set and backbone taken together."""
    energy = [r["energy_j"] for r in records]
    load = [r.get("load_seconds", 0.0) if without_load else 0.0 for r in records]
    return {
        "rows_computed": sum(r["rows_computed"] for r in records),
        "wall_s": sum(r["wall_s"] for r in records) - sum(load),
        "energy_j": None if None in energy else sum(energy),
        "energy_note": records[0].get("energy_note"),
        "device": records[0]["device"],
    }


def dataset_cost(e: dict, dataset: str) -> dict:
    """What making `dataset`'s rows of one cache entry cost, from the entry's manifest where it is
    on this machine: llmembed's `entry_cost` sums every data set the entry has taken in so far
    (short MR snippets and long BBC articles alike), so it depends on the order of the runs."""
    path = Path(e["entry"]) / "manifest.json"
    if path.is_file():
        records = [
            r
            for r in json.loads(path.read_text())["extractions"]
            if r["dataset"] == dataset and r["rows_computed"]
        ]
        if records:
            return summed(records)
    return e["entry_cost"]


def extraction_per_1000(c: dict, n: int) -> dict:
    """One backbone's extraction figures `c` (for `n` texts) per 1,000 texts."""
    return {
        "seconds_per_1000": None if not n else c["wall_s"] * 1000 / n,
        "joules_per_1000": None
        if (not n or c.get("energy_j") is None)
        else c["energy_j"] * 1000 / n,
        "energy_note": c.get("energy_note"),
        "device": c.get("device"),
    }


def on_gpu(extraction: dict, records: dict, dataset: str) -> dict:
    """Each backbone's extraction of `extraction` replaced by its GPU record of `dataset`
    (scripts/experiments/gpu_run.sh's extraction.json). The model's load is left out of the
    seconds, as it is of the counterparts' (on a fresh GPU machine it is GGUF's first
    de-quantization, longer than the forward passes); NVML's joules cover the whole run."""
    out = {}
    for b in extraction:
        runs = [
            r
            for r in records.get(b, [])
            if r["dataset"] == dataset and r["device"].startswith("cuda") and r["rows_computed"]
        ]
        if not runs:
            raise UserError(
                f"docs/results/gpu/extraction.json has no GPU extraction of {dataset} with {b}: "
                f"run scripts/experiments/gpu_run.sh for it, or drop {dataset} from "
                "results.gpu_cost_datasets"
            )
        r = summed(runs, without_load=True)
        r["energy_note"] = r["energy_note"] or "joules include the model's load"
        out[b] = extraction_per_1000(r, r["rows_computed"])
    return out


# --- llmembed's methods ---------------------------------------------------------------------------
def sweep_fits(layers_ds: dict, backbones: list[str]) -> tuple[int, float]:
    """(fits, seconds per split) of experiment 1's sweep over every layer and pooling of
    `backbones` (each run fitted every split: a split's share is the mean)."""
    points = [
        p
        for key, curve in layers_ds["curves"].items()
        if key.split(":")[0] in backbones
        for p in curve
    ]
    return len(points), sum(p["info"]["timings"]["fit_s"] / p["info"]["n_seeds"] for p in points)


def fit_s(info: dict) -> float:
    """One split's fitting seconds of a run (a run over several splits: its mean)."""
    return info["timings"]["fit_s"] / max(info.get("n_seeds", 1), 1)


def selection_of(name: str, row: dict, layers_ds: dict) -> dict:
    """Per split: the fits the row's choice made, their seconds, the backbones they read."""
    seeds = sorted(row["info"], key=int)
    chosen = {b for s in seeds for b in (e["backbone"] for e in row["info"][s]["extraction"])}
    if "selection" in row:
        sel = row["selection"]
        backbones = sorted(chosen.union(*(set(sel[s].get("backbones", [])) for s in sel)))
        fits = [sel[s]["fits"] for s in sel]
        return {
            "fits": int(np.mean(fits)),
            "fit_s": float(np.mean([sel[s]["fit_s"] for s in sel])),
            "estimated": False,
            "backbones": backbones,
        }
    # Written before selection was recorded: the sweep is measured, the rest estimated.
    sweep = ["smollm2", "minilm"] if ("MiniLM" in name) else ["smollm2"]
    own = float(np.mean([fit_s(row["info"][s]) for s in seeds]))
    if "best single layer" in name:
        n, sec = sweep_fits(layers_ds, sweep)
        return {"fits": n, "fit_s": sec, "estimated": False, "backbones": sorted(set(sweep))}
    if "concatenation" in name:
        n, sec = sweep_fits(layers_ds, sweep)
        k = int(row["candidates"])
        return {
            "fits": n + k,
            "fit_s": sec + k * own,
            "estimated": True,
            "backbones": sorted(set(sweep) | chosen),
        }
    k = int(row.get("candidates", 1))
    return {"fits": k, "fit_s": k * own, "estimated": k > 1, "backbones": sorted(chosen)}


def llmembed_method(name: str, row: dict, layers_ds: dict, extraction: dict) -> dict:
    """Cost of one llmembed method (a row of fusion.json or recipe.json) on one data set."""
    infos = [row["info"][s] for s in sorted(row["info"], key=int)]
    first = infos[0]
    sel = selection_of(name, row, layers_ds)
    n_all = sum(first["rows"].values())
    ext = {b: extraction[b] for b in sel["backbones"]}
    one_time = sum(e["seconds_per_1000"] * n_all / 1000 for e in ext.values())
    joules = [e["joules_per_1000"] for e in ext.values()]
    splits = len(infos)
    return {
        "kind": "llmembed",
        "test": row["test"],
        "extraction": ext,
        "one_time_s": one_time,
        "one_time_j": None if None in joules else sum(j * n_all / 1000 for j in joules),
        "selection_fits_per_split": sel["fits"],
        "per_split_s": sel["fit_s"],
        "estimated": sel["estimated"],
        "splits": splits,
        "total_s": one_time + splits * sel["fit_s"],
        "fit_s_per_1000_train": float(
            np.mean([fit_s(i) / i["rows"]["train"] * 1000 for i in infos])
        ),
        # The entries' size on disk, where they are on this machine (null: not all are here).
        "cache_mb_entries": sum(entry_mb(e["entry"]) for e in first["extraction"])
        if all(Path(e["entry"]).is_dir() for e in first["extraction"])
        else None,
        "cache_mb_read": n_all * first["n_features"] * 2 / 2**20,  # float16 storage
        "params_trained": first["params_trained"],
        "params_used": first["params_trained"] + sum(BACKBONE_PARAMS.get(b, 0) for b in ext),
        "rows": first["rows"],
    }


# --- counterparts ---------------------------------------------------------------------------------
def counterpart_rows(cp: dict) -> dict[str, dict]:
    """Every row of every setup of counterparts.json for one data set, with its kind."""
    out = {}
    for kind in ("prompting", "finetuning"):
        for setup in cp.get(kind, {}).values():
            for name, row in setup["rows"].items():
                settings = setup["settings"]
                out[name] = {
                    **row,
                    "kind": kind,
                    "backbone": settings.get("backbone"),
                    "method": settings.get("method", "full") if kind == "finetuning" else kind,
                }
    return out


def counterpart_method(row: dict, rows: dict, splits: int) -> dict:
    """Per split: selection (validation prompts of every candidate, every training run of the
    sweep) and test predictions, as metered per split; rows of the first run, which kept only a
    rate per 1,000 texts and made no choice, from that rate. The total is for the protocol's
    `splits` (a row run on fewer is scaled up from its mean per split, and says so)."""
    c = row["cost"]
    if "per_split" in c:
        per = list(c["per_split"].values())
        sel = float(np.mean([p.get("selection_s", 0.0) for p in per]))
        test = float(np.mean([p.get("test_s", 0.0) for p in per]))
        jj = [[p[k] for k in ("selection_j", "test_j") if k in p] for p in per]
        joules = None if any(None in j for j in jj) else float(np.mean([sum(j) for j in jj]))
    else:  # the first run: a rate per 1,000 texts, no choice
        rate = c["per_1000"]
        sel = 0.0
        test = rate["test"]["seconds"] * rows["test"] / 1000
        if "train" in rate:
            test += rate["train"]["seconds"] * rows["train"] / 1000
        joules = None
    ran = row["test"]["accuracy"]["n"]
    params = row["params_trained"]
    backbone = BACKBONE_PARAMS[row.get("backbone") or "smollm2"]
    # Prompting runs the model; fine-tuning trains all of it (+ a classifier); LoRA adds adapters.
    used = {"prompting": backbone, "full": params, "lora": backbone + params}[row["method"]]
    return {
        "kind": row["kind"],
        "test": row["test"],
        "one_time_s": 0.0,
        "per_split_s": sel + test,
        "selection_s_per_split": sel,
        "joules_per_split": joules,
        "estimated": ran < splits,  # the total scaled up from fewer splits
        "splits": splits,
        "total_s": splits * (sel + test),
        "params_trained": params,
        "params_used": used,
        "machines": machines_of(row),  # more than one: its mean seconds mix their splits'
    }


# --- the claim's form -----------------------------------------------------------------------------
def claim(methods: dict, rows: dict) -> list[dict]:
    """For each counterpart: the cheapest llmembed method (total seconds) whose mean test
    accuracy is at least the counterpart's, its quotient of total seconds, and the paired test."""
    n_train, n_test = rows["train"] + rows["validation"], rows["test"]
    ours = sorted(
        ((n, m) for n, m in methods.items() if m["kind"] == "llmembed"),
        key=lambda x: x[1]["total_s"],
    )
    out = []
    for name, m in methods.items():
        if m["kind"] == "llmembed":
            continue
        target = m["test"]["accuracy"]
        found = next(
            ((n, o) for n, o in ours if o["test"]["accuracy"]["mean"] >= target["mean"]), None
        )
        if found is None:
            out.append({"counterpart": name, "llmembed": None})
            continue
        n, o = found
        a, b = common_splits(o["test"]["accuracy"], target)
        test = paired(a, b, n_train=n_train, n_test=n_test) if len(a) > 1 else None
        out.append(
            {
                "counterpart": name,
                "counterpart_accuracy": target["mean"],
                "counterpart_total_s": m["total_s"],
                "llmembed": n,
                "llmembed_accuracy": o["test"]["accuracy"]["mean"],
                "llmembed_total_s": o["total_s"],
                # unrounded: the page rounds once, as the comparisons' table does for the same pair
                "runtime": o["total_s"] / m["total_s"] if m["total_s"] else None,
                "params_used": o["params_used"] / m["params_used"],
                "difference": None if test is None else test.diff,
                "p": None if test is None else test.p,
                "splits": len(a),
                "estimated": o["estimated"],
                "counterpart_estimated": m["estimated"],
                "counterpart_machines": m["machines"],
            }
        )
    return out


def run_dataset(
    cfg, layers_ds: dict, llm_rows: dict, cp: dict | None, extraction: dict, device: dict
) -> dict:
    methods = {n: llmembed_method(n, r, layers_ds, extraction) for n, r in llm_rows.items()}
    rows = next(iter(methods.values()))["rows"]
    splits = max(m["splits"] for m in methods.values())
    for name, row in counterpart_rows(cp or {}).items():
        methods[name] = counterpart_method(row, rows, splits)
    return {
        "dataset": layers_ds["dataset"],
        "rows": rows,
        "device": device,
        "methods": methods,
        "claim": claim(methods, rows),
    }


def llmembed_rows(fusion_ds: dict, recipe_ds: dict | None) -> dict:
    """The methods costed: every row of experiment 2, and experiment 3's co-occurrence heads."""
    out = dict(fusion_ds["rows"])
    for name, row in (recipe_ds or {}).get("rows", {}).items():
        if name.startswith("head: ") and "info" in row:
            out[name] = row
    return out


def main(argv: list[str]) -> None:
    setup_logging()
    cfgs = experiment_cfgs(EXPERIMENT, argv)
    out_dir = Path(cfgs[0].results.out_dir)
    need = "experiment 5 (cost)"
    layers = read_json(out_dir / "layers.json", need)
    fusion = read_json(out_dir / "fusion.json", need)
    optional = {
        n: read_json(out_dir / f"{n}.json", need) if (out_dir / f"{n}.json").is_file() else None
        for n in ("recipe", "counterparts")
    }
    result = header(cfgs[0], EXPERIMENT, MODULE, argv)
    # Its seconds are the experiments' (this command runs no model): their machine is the page's.
    result |= {
        "machine": layers["machine"],
        "written_on": result["machine"],
        "paper_ratios": dict(cfgs[0].results.paper_ratios),
        "datasets": {},
    }
    cpu = {"extraction": "cpu", "fits": "cpu", "counterparts": "cpu"}
    for cfg in cfgs:
        ds = cfg.dataset.name
        if ds not in fusion["datasets"] or ds not in layers["datasets"]:
            continue
        rows = llmembed_rows(
            fusion["datasets"][ds], (optional["recipe"] or {"datasets": {}})["datasets"].get(ds)
        )
        cp = (optional["counterparts"] or {"datasets": {}})["datasets"].get(ds)
        result["datasets"][ds] = run_dataset(
            cfg, layers["datasets"][ds], rows, cp, layers["datasets"][ds]["extraction"], cpu
        )
    gpu_dir = out_dir / "gpu"  # scripts/experiments/gpu_run.sh's results, merged
    if (gpu_dir / "counterparts.json").is_file() and (gpu_dir / "extraction.json").is_file():
        gpu_cp = read_json(gpu_dir / "counterparts.json", need)
        records = read_json(gpu_dir / "extraction.json", need)
        mixed = {"extraction": "gpu", "fits": "cpu", "counterparts": "gpu"}
        result["gpu"] = {"machine": gpu_cp["machine"], "datasets": {}}
        for cfg in cfgs:
            ds = cfg.dataset.name
            if ds not in cfgs[0].results.gpu_cost_datasets or ds not in gpu_cp["datasets"]:
                continue
            ext = on_gpu(layers["datasets"][ds]["extraction"], records, ds)
            rows = llmembed_rows(fusion["datasets"][ds], None)
            result["gpu"]["datasets"][ds] = run_dataset(
                cfg, layers["datasets"][ds], rows, gpu_cp["datasets"][ds], ext, mixed
            )
    write_json(out_dir / "cost.json", result)


if __name__ == "__main__":
    run_main(main)
