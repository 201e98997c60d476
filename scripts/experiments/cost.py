"""Experiment 5 (seconds: it reads experiments 1-4): cost per 1,000 texts of every method,
beside its accuracy, and the paper's cost ratios (LLMEmbed against prompt-based counterparts)
recomputed at this scale. Runs no model: it reads what experiments 1-4 measured (llmembed's
`metrics.json` figures, the cache manifests' cost of making each entry, the counterparts' own
meters).

    .venv/bin/python -m scripts.experiments.cost [hydra overrides]   # conf/experiment/results_cost.yaml

With docs/results/gpu/ (scripts/experiments/gpu_run.sh, merged), the same figures on the GPU for
`results.gpu_cost_datasets` (the sets it ran alone on the machine): llmembed's extraction and the
counterparts measured there, llmembed's training as on the CPU.

Seconds. Energy: llmembed and the counterparts read the same counters (NVML on NVIDIA GPUs, RAPL
under /sys/class/powercap on CPUs); where none is readable the joules are null and the reason is
kept. Estimated run: seconds.

Definitions (per data set, all per 1,000 texts):
- extraction: embedding the data set's rows with each backbone (all layers and poolings; one forward
  pass per text), from the cache manifest's records of that data set, per 1,000 texts embedded;
- training: fitting the chosen configuration on one split, per 1,000 training rows (the
  validation search trains every candidate: `candidates` says how many);
- prompting: scoring, per 1,000 texts scored; fine-tuning: training per 1,000 training rows and
  inference per 1,000 test texts;
- cache MB: the entry's size on disk (every layer and pooling) and what the method reads of it.
- end to end (the ratios): what it costs to go from the labelled set to the test predictions of
  one split: llmembed = extraction of every row + training; prompting = scoring the test rows;
  fine-tuning = training + scoring the test rows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from scripts.experiments.common import (
    entry_mb,
    experiment_cfgs,
    header,
    read_json,
    setup_logging,
    write_json,
)

EXPERIMENT, MODULE = "results_cost", "scripts.experiments.cost"
BACKBONE_PARAMS = {
    "smollm2": 134_515_008,
    "minilm": 22_713_216,
}  # counted from the packaged weights


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
        "seconds_per_1000": None if not n else round(c["wall_s"] * 1000 / n, 3),
        "joules_per_1000": None
        if (not n or c.get("energy_j") is None)
        else round(c["energy_j"] * 1000 / n, 3),
        "energy_note": c.get("energy_note"),
        "device": c.get("device"),
    }


def extraction_totals(extraction: dict) -> dict:
    """The extraction of every backbone a method reads, per 1,000 texts."""
    joules = [v["joules_per_1000"] for v in extraction.values()]
    return {
        "extraction_seconds_per_1000": sum(v["seconds_per_1000"] or 0 for v in extraction.values()),
        "extraction_joules_per_1000": None if None in joules else sum(joules),
    }


def llmembed_cost(row: dict, dataset: str) -> dict:
    """Cost figures of one llmembed method (a row of fusion.json / recipe.json) on `dataset`."""
    infos = list(row["info"].values())  # one per split: llmembed's figures of the chosen candidate
    first = infos[0]
    extraction, entries = {}, []
    for e in first["extraction"]:
        c = dataset_cost(e, dataset)
        extraction[e["backbone"]] = extraction_per_1000(
            c, c.get("rows_computed") or e.get("texts") or 0
        )
        entries.append(e["entry"])
    fit = [
        i["timings"]["fit_s"] / max(i.get("n_seeds", 1), 1) / i["rows"]["train"] * 1000
        for i in infos
    ]
    energy = [i["resources"].get("energy_j") for i in infos]
    rows_total = sum(first["rows"].values())
    return {
        "extraction": extraction,
        **extraction_totals(extraction),
        "training_seconds_per_1000": round(float(np.mean(fit)), 3),
        "training_joules": None
        if any(e is None for e in energy)
        else round(float(np.mean(energy)), 3),
        "training_energy_note": first["resources"].get("energy_note"),
        "cache_mb_entries": round(sum(entry_mb(p) for p in entries if Path(p).exists()), 1),
        "cache_mb_read": round(rows_total * first["n_features"] * 2 / 2**20, 2),  # float16 storage
        "params_trained": first["params_trained"],
        "params_used": first["params_trained"] + sum(BACKBONE_PARAMS.get(b, 0) for b in extraction),
        "rows": first["rows"],
    }


def end_to_end(c: dict, kind: str, rows: dict) -> tuple[float, float | None]:
    """(seconds, joules or None) from the labelled set to one split's test predictions (see the
    module docstring)."""
    n_all, n_train, n_test = sum(rows.values()), rows["train"], rows["test"]
    if kind == "llmembed":
        s = (
            c["extraction_seconds_per_1000"] * n_all / 1000
            + c["training_seconds_per_1000"] * n_train / 1000
        )
        e = c["extraction_joules_per_1000"]
        j = (
            None
            if e is None or c["training_joules"] is None
            else e * n_all / 1000 + c["training_joules"]
        )
        return s, j
    if kind == "prompting":
        return c["seconds"] * n_test / 1000, None if c["joules"] is None else c[
            "joules"
        ] * n_test / 1000
    s = c["train"]["seconds"] * n_train / 1000 + c["inference"]["seconds"] * n_test / 1000
    tj, ij = c["train"]["joules"], c["inference"]["joules"]
    return s, None if tj is None or ij is None else tj * n_train / 1000 + ij * n_test / 1000


def on_gpu(c: dict, records: dict, dataset: str) -> dict:
    """llmembed's cost `c` with each backbone's extraction replaced by its GPU record of `dataset`
    (scripts/experiments/gpu_run.sh's extraction.json). The model's load is left out of the seconds,
    as it is of the counterparts' (on a fresh GPU machine it is GGUF's first de-quantization, longer
    than the forward passes); NVML's joules cover the whole run, load included. Training stays as
    measured on the CPU (a logistic regression runs there on any machine): its seconds count, its
    energy is not metered."""
    c = {**c, "extraction": dict(c["extraction"])}
    for b in c["extraction"]:
        runs = [
            r
            for r in records.get(b, [])
            if r["dataset"] == dataset and r["device"].startswith("cuda") and r["rows_computed"]
        ]
        if not runs:
            raise SystemExit(
                f"docs/results/gpu/extraction.json has no GPU extraction of {dataset} with {b}: "
                f"run scripts/experiments/gpu_run.sh for it, or drop {dataset} from "
                "results.gpu_cost_datasets"
            )
        r = summed(runs, without_load=True)
        r["energy_note"] = r["energy_note"] or "joules include the model's load"
        c["extraction"][b] = extraction_per_1000(r, r["rows_computed"])
    c.update(extraction_totals(c["extraction"]))
    c["training_joules"] = None
    c["training_energy_note"] = "llmembed's training runs on the CPU: not metered"
    return c


def run_dataset(cfg, fusion: dict, counterparts: dict, gpu_records: dict | None = None) -> dict:
    """Cost and ratios of one data set; with `gpu_records`, llmembed's extraction is the GPU's."""
    methods, rows = {}, None
    for name, row in fusion["rows"].items():
        c = llmembed_cost(row, fusion["dataset"])
        if gpu_records is not None:
            c = on_gpu(c, gpu_records, fusion["dataset"])
        rows = rows or c["rows"]
        methods[name] = {
            "kind": "llmembed",
            "test": row["test"],
            "cost": c,
            "candidates": row.get("candidates", 1),
        }
    cp = counterparts or {}
    if "prompting" in cp:
        for shot in ("zero_shot", "few_shot"):
            r = cp["prompting"][shot]
            methods[f"prompting SmolLM2, {shot.replace('_', '-')}"] = {
                "kind": "prompting",
                "test": r["test"],
                "cost": {
                    **r["cost_per_1000"],
                    "params_trained": 0,
                    "params_used": BACKBONE_PARAMS["smollm2"],
                },
            }
    if "finetuning" in cp:
        r = cp["finetuning"]
        methods["fine-tuning MiniLM"] = {
            "kind": "finetuning",
            "test": r["test"],
            "cost": {
                "train": r["train_cost_per_1000"],
                "inference": r["inference_cost_per_1000"],
                "params_trained": r["params_trained"],
                "params_used": r["params_trained"],
            },
        }
    for m in methods.values():
        sec, joules = end_to_end(m["cost"], m["kind"], rows)
        m["end_to_end_seconds"], m["end_to_end_joules"] = round(sec, 2), joules
    ratios = []
    for name in cfg.results.llmembed_methods:
        if name not in methods:
            continue
        ours = methods[name]
        for other, theirs in methods.items():
            if theirs["kind"] == "llmembed":
                continue
            ratios.append(
                {
                    "llmembed": name,
                    "counterpart": other,
                    "runtime": round(ours["end_to_end_seconds"] / theirs["end_to_end_seconds"], 4)
                    if theirs["end_to_end_seconds"]
                    else None,
                    "params_used": round(
                        ours["cost"]["params_used"] / theirs["cost"]["params_used"], 4
                    ),
                    "params_trained": None
                    if not theirs["cost"]["params_trained"]
                    else round(
                        ours["cost"]["params_trained"] / theirs["cost"]["params_trained"], 4
                    ),
                    "electricity": None
                    if ours["end_to_end_joules"] is None or not theirs["end_to_end_joules"]
                    else round(ours["end_to_end_joules"] / theirs["end_to_end_joules"], 4),
                    "accuracy_difference": round(
                        ours["test"]["accuracy"]["mean"] - theirs["test"]["accuracy"]["mean"], 4
                    ),
                }
            )
    return {"dataset": fusion["dataset"], "rows": rows, "methods": methods, "ratios": ratios}


def main(argv: list[str]) -> None:
    setup_logging()
    cfgs = experiment_cfgs(EXPERIMENT, argv)
    out_dir = Path(cfgs[0].results.out_dir)
    fusion = read_json(out_dir / "fusion.json", "experiment 5 (cost)")
    cp_path = out_dir / "counterparts.json"
    counterparts = (
        read_json(cp_path, "experiment 5 (cost)") if cp_path.is_file() else {"datasets": {}}
    )
    result = {
        **header(cfgs[0], EXPERIMENT, MODULE, argv),
        "paper_ratios": dict(cfgs[0].results.paper_ratios),
        "datasets": {},
    }
    for cfg in cfgs:
        if cfg.dataset.name not in fusion["datasets"]:
            continue
        result["datasets"][cfg.dataset.name] = run_dataset(
            cfg,
            fusion["datasets"][cfg.dataset.name],
            counterparts["datasets"].get(cfg.dataset.name),
        )
    gpu_dir = out_dir / "gpu"  # scripts/experiments/gpu_run.sh's results, merged
    if (gpu_dir / "counterparts.json").is_file() and (gpu_dir / "extraction.json").is_file():
        gpu_cp = read_json(gpu_dir / "counterparts.json", "experiment 5 (cost)")
        records = read_json(gpu_dir / "extraction.json", "experiment 5 (cost)")
        result["gpu"] = {
            "machine": gpu_cp["machine"],
            "paper_ratios": result["paper_ratios"],
            "datasets": {
                ds: run_dataset(cfg, fusion["datasets"][ds], gpu_cp["datasets"][ds], records)
                for cfg in cfgs
                if (ds := cfg.dataset.name) in cfgs[0].results.gpu_cost_datasets
                and ds in fusion["datasets"]
                and ds in gpu_cp["datasets"]
            },
        }
    write_json(out_dir / "cost.json", result)


if __name__ == "__main__":
    main(sys.argv[1:])
