"""Experiment 1: layer curves (full run ~45 min on 2 idle CPU cores, 5-10x under load).

A logistic-regression probe (C chosen on validation) on every hidden state of SmolLM2 (0-30; mean
and last-token pooling) and MiniLM (0-6; mean and first-token pooling), on five repeated splits
of each data set; one plot per data set with 95% intervals.

    .venv/bin/python -m scripts.experiments.layers [hydra overrides]     # conf/experiment/results_layers.yaml

Estimated full run (three sets, 76 configurations x 5 splits each): about 45 min on two idle CPU
cores (extraction of SmolLM2 and MiniLM ~15 min at llmembed's README rates, BBC's 512-token
articles the most; logistic regression ~30 min at ~2 s per MR fit); 5-10x that on the shared,
loaded 2-core machine of 2026-11-27 (the pilot: TREC + MR with dataset.limit=600 and 2 splits took
3 min 44 s, of which ~2.5 min extraction at ~5 texts/s); minutes of extraction on a GPU, where
llmembed extracts on CUDA by itself.

Writes <results.out_dir>/layers.json (every configuration's validation and test scores per split,
the layer chosen on validation per split) and layers_<dataset>.png.
"""

from __future__ import annotations

from pathlib import Path

from llmembed.classify.train import seeds_of
from scripts.experiments.common import (
    Scores,
    choose,
    chosen_test,
    classify,
    continue_result,
    experiment_cfgs,
    finish,
    header,
    pre_extract,
    run_main,
    setup_logging,
    summary_of,
    with_changes,
    write_json,
)
from scripts.experiments.cost import dataset_cost, extraction_per_1000

EXPERIMENT, MODULE = "results_layers", "scripts.experiments.layers"
FEATURES = {"smollm2": "smollm2_layer", "minilm": "minilm_layer"}
ROLES = {"smollm2": "llm", "minilm": "encoder"}


def layer_sources(backbone: str, layer: int, pooling: str) -> list[dict]:
    return [{"backbone": backbone, "layers": [layer], "pooling": pooling, "role": ROLES[backbone]}]


def sweep(cfg, backbone: str, n_layers: int, pooling: str, run_dir: Path) -> list[Scores]:
    out = []
    for layer in range(n_layers):
        c = with_changes(cfg, **{"features.sources": layer_sources(backbone, layer, pooling)})
        name = f"{backbone}:{pooling}:L{layer}"
        out.append(classify(c, run_dir / f"{backbone}-{pooling}-L{layer:02d}", name))
    return out


def run_dataset(cfg, argv) -> dict:
    pre_extract(cfg, argv, list(cfg.results.backbones))
    run_dir = Path(cfg.results.run_dir) / "layers" / cfg.dataset.name
    seeds = seeds_of(cfg)
    curves, chosen, extraction = {}, {}, {}
    for backbone, spec in cfg.results.backbones.items():
        every = []
        for pooling in spec.poolings:
            scores = sweep(cfg, backbone, int(spec.layers), pooling, run_dir)
            every += scores
            curves[f"{backbone}:{pooling}"] = [
                {
                    "layer": layer,
                    "validation": summary_of(s, "validation"),
                    "test": summary_of(s, "test"),  # the curve itself, shown; never used to choose
                    "per_split": s.per_split,
                    "info": s.info,
                }
                for layer, s in enumerate(scores)
            ]
        # Per split: the (layer, pooling) with the best validation accuracy; its test score only.
        picks = {seed: choose(every, seed) for seed in seeds}
        chosen[backbone] = {
            "per_split": {seed: picks[seed].name for seed in seeds},
            "test": chosen_test(picks),
        }
        # What embedding this data set's rows cost, from the entry's manifest while it is here
        # (experiment 5 reads it from this file, on any machine).
        entry = every[0].info["extraction"][0]
        extraction[backbone] = extraction_per_1000(
            record := dataset_cost(entry, cfg.dataset.name), record.get("rows_computed") or 0
        )
    return {
        "dataset": cfg.dataset.name,
        "curves": curves,
        "chosen_on_validation": chosen,
        "extraction": extraction,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, backbone in zip(axes, ("smollm2", "minilm"), strict=True):
        for key, curve in result["curves"].items():
            if not key.startswith(backbone + ":"):
                continue
            xs = [p["layer"] for p in curve]
            mean = [p["test"]["accuracy"]["mean"] for p in curve]
            lo = [p["test"]["accuracy"]["ci"][0] for p in curve]
            hi = [p["test"]["accuracy"]["ci"][1] for p in curve]
            line = ax.plot(xs, mean, marker=".", label=key.split(":")[1])[0]
            ax.fill_between(xs, lo, hi, alpha=0.2, color=line.get_color())
        ax.set_title(f"{backbone}")
        ax.set_xlabel("hidden state (0 = embeddings)")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("test accuracy (mean over splits, 95% CI)")
    fig.suptitle(f"{result['dataset']}: logistic-regression probe per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    setup_logging()
    cfgs = experiment_cfgs(EXPERIMENT, argv)
    out_dir = Path(cfgs[0].results.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {**header(cfgs[0], EXPERIMENT, MODULE, argv), "datasets": {}}
    result = continue_result(out_dir / "layers.json", result)
    for cfg in cfgs:
        result["datasets"][cfg.dataset.name] = r = run_dataset(cfg, argv)
        plot(r, out_dir / f"layers_{cfg.dataset.name}.png")
        write_json(
            out_dir / "layers.json", finish(result)
        )  # after every set: a stopped run keeps the rest


if __name__ == "__main__":
    run_main(main)
