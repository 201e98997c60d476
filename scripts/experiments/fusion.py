"""Experiment 2: fusion (full run ~45 min on 2 idle CPU cores, 5-10x under load).

Per split, for SmolLM2 alone and SmolLM2 + MiniLM:

- best single layer: the (layer, pooling) with the best validation accuracy (from experiment 1);
- last layer: SmolLM2 hidden state 30, mean pooling (from experiment 1);
- concatenation: the k best SmolLM2 layers on validation of one pooling (k from
  `results.fusion.ks`, k and pooling chosen on validation; + MiniLM adds that split's best MiniLM
  layer and pooling), logistic regression;
- llmembed's co-occurrence head (`head=llmembed`: standardized inputs, every block projected,
  early stopping, batch 256; experiment 3 has the paper's head as its code has it) on the paper's
  last five layers (+ MiniLM L6) and, with `results.fusion.cooc_on_chosen=true`, on the layers the
  concatenation chose (for the feature sets of `results.fusion.cooc_on_chosen`); σ from
  `results.fusion.sigmas` chosen on validation.

Every row records what its choice cost per split (`selection`): the fits of every candidate it
looked at, experiment 1's sweep included where it ranks or picks layers from it.

    .venv/bin/python -m scripts.experiments.fusion [hydra overrides]    # conf/experiment/results_fusion.yaml

Needs <results.out_dir>/layers.json (experiment 1). Per set: 5 splits x 2 feature sets x (4
concatenations x 2 poolings) = 80 logreg fits, and 5 x 2 x len(sigmas) co-occurrence head fits on
the paper's layers, 5 x len(sigmas) more per feature set of `cooc_on_chosen`. A head fit took
~70 s on MR, ~75 on TREC, ~42 on BBC (the first run, one thread of a loaded 2-core CPU): ~3.4 h in all.

Writes <results.out_dir>/fusion.json.
"""

from __future__ import annotations

from pathlib import Path

from llmembed.classify.train import seeds_of
from llmembed.errors import UserError
from scripts.experiments.common import (
    Scores,
    choose,
    chosen_test,
    classify,
    continue_result,
    experiment_cfgs,
    finish,
    head_config,
    header,
    pre_extract,
    read_json,
    run_main,
    selection,
    setup_logging,
    with_changes,
    write_json,
)

EXPERIMENT, MODULE = "results_fusion", "scripts.experiments.fusion"


def from_layers(curves: dict, key: str) -> list[Scores]:
    """Experiment 1's scores of one (backbone, pooling) curve, one Scores per layer."""
    return [
        Scores(
            f"{key}:L{p['layer']}",
            {int(s): v for s, v in p["per_split"].items()},
            p["info"],
        )
        for p in curves[key]
    ]


def ranked_layers(curve: list[Scores], seed: int) -> list[int]:
    """Layers of one curve from best to worst validation accuracy on split `seed` (ties: lower layer)."""
    order = sorted(range(len(curve)), key=lambda i: (-curve[i].validation(seed), i))
    return [int(curve[i].name.rsplit(":L", 1)[1]) for i in order]


def one_split(cfg, seed: int):
    return with_changes(cfg, seeds=[seed])


def run_dataset(cfg, layers_result: dict) -> dict:
    fcfg = cfg.results.fusion
    seeds = seeds_of(cfg)
    curves = layers_result["curves"]
    smol_mean = from_layers(curves, "smollm2:mean")
    smol_poolings = [k.split(":")[1] for k in curves if k.startswith("smollm2:")]
    smol_all = [s for k in curves if k.startswith("smollm2:") for s in from_layers(curves, k)]
    mini_all = [s for k in curves if k.startswith("minilm:") for s in from_layers(curves, k)]
    missing = set(seeds) - set(smol_mean[0].per_split)
    if missing:
        raise UserError(
            f"layers.json has no scores for splits {sorted(missing)}; rerun experiment 1"
        )
    run_dir = Path(cfg.results.run_dir) / "fusion" / cfg.dataset.name
    paper_head = {f"head.params.{k}": v for k, v in fcfg.head.items()}
    rows: dict[str, dict] = {}

    def report(name: str, picks: dict[int, Scores], looked_at: dict[int, list[Scores]]) -> None:
        """`looked_at[seed]`: every candidate fitted on that split to make the choice."""
        rows[name] = {
            "candidates": len(looked_at[seeds[0]]),  # configurations fitted per split to choose
            "test": chosen_test(picks),
            "chosen_per_split": {s: picks[s].name for s in seeds},
            "info": {s: picks[s].info for s in seeds},
            "selection": {s: selection(looked_at[s]) for s in seeds},
        }

    last = smol_mean[-1]
    report(
        "SmolLM2 last layer (L30, mean), logreg",
        {s: last for s in seeds},
        {s: [last] for s in seeds},
    )
    report(
        "SmolLM2 best single layer (validation), logreg",
        {s: choose(smol_all, s) for s in seeds},
        {s: smol_all for s in seeds},
    )
    both_single = smol_all + mini_all
    report(
        "SmolLM2 or MiniLM best single layer (validation), logreg",
        {s: choose(both_single, s) for s in seeds},
        {s: both_single for s in seeds},
    )

    chosen_layers: dict[str, dict[int, list[dict]]] = {"smollm2": {}, "smollm2+minilm": {}}
    for combo in ("smollm2", "smollm2+minilm"):
        concat_picks, cooc_picks, paper_picks = {}, {}, {}
        # What each choice fitted, per split: the layer sweep it ranks layers from, then its own.
        sweep = smol_all if combo == "smollm2" else both_single
        concat_seen, cooc_seen, paper_seen = {}, {}, {}
        for seed in seeds:
            mini_pick = choose(mini_all, seed).name  # e.g. "minilm:mean:L4"
            _, mini_pooling, mini_layer = mini_pick.split(":")
            cands = []
            for pooling in smol_poolings:
                ranked = ranked_layers(from_layers(curves, f"smollm2:{pooling}"), seed)
                for k in fcfg.ks:
                    sources = [
                        {
                            "backbone": "smollm2",
                            "layers": sorted(ranked[:k]),
                            "pooling": pooling,
                            "role": "llm",
                        }
                    ]
                    if combo == "smollm2+minilm":
                        sources.append(
                            {
                                "backbone": "minilm",
                                "layers": [int(mini_layer[1:])],
                                "pooling": mini_pooling,
                                "role": "encoder",
                            }
                        )
                    c = with_changes(
                        one_split(cfg, seed),
                        **{"features.sources": sources, "features.fusion": "concat"},
                    )
                    name = f"{combo} concat {pooling} k={k}: " + describe(sources)
                    out = run_dir / f"s{seed}" / f"{combo}-concat-{pooling}-k{k}"
                    cands.append(classify(c, out, name))
                    cands[-1].info["sources"] = sources
            concat_picks[seed] = choose(cands, seed)
            concat_seen[seed] = sweep + cands
            chosen_layers[combo][seed] = concat_picks[seed].info["sources"]

            # The paper's head: on the paper's layers and on the layers the concatenation chose.
            paper_sources = [
                {
                    "backbone": "smollm2",
                    "layers": list(fcfg.paper_layers),
                    "pooling": "mean",
                    "role": "llm",
                }
            ]
            if combo == "smollm2+minilm":
                paper_sources.append({**dict(fcfg.encoder_paper), "role": "encoder"})
            variants = [("paper layers", paper_sources, paper_picks, paper_seen, [])]
            if combo in fcfg.cooc_on_chosen:
                variants.append(
                    (
                        "chosen layers",
                        chosen_layers[combo][seed],
                        cooc_picks,
                        cooc_seen,
                        concat_seen[seed],
                    )
                )
            for label, sources, store, seen, before in variants:
                cands = []
                for sigma in fcfg.sigmas:
                    c = with_changes(
                        one_split(cfg, seed),
                        **{
                            "head": head_config("llmembed"),
                            "features.sources": sources,
                            "features.fusion": "cooccurrence",
                            "head.params.sigma": float(sigma),
                            **paper_head,
                        },
                    )
                    name = f"{combo} co-occurrence σ={sigma} ({label}): " + describe(sources)
                    tag = label.replace(" ", "-")
                    cands.append(
                        classify(c, run_dir / f"s{seed}" / f"{combo}-cooc-{tag}-s{sigma}", name)
                    )
                store[seed] = choose(cands, seed)
                seen[seed] = before + cands
        what = "SmolLM2" if combo == "smollm2" else "SmolLM2 + MiniLM"
        report(
            f"{what} concatenation of layers chosen on validation, logreg",
            concat_picks,
            concat_seen,
        )
        report(
            f"{what}, {COOC}, paper's last five layers (σ on validation)", paper_picks, paper_seen
        )
        if combo in fcfg.cooc_on_chosen:
            report(
                f"{what}, {COOC}, layers chosen on validation (σ on validation)",
                cooc_picks,
                cooc_seen,
            )
    return {"dataset": cfg.dataset.name, "rows": rows, "chosen_layers": chosen_layers}


# What ran under `head=llmembed` with this experiment's settings: not the paper's head as its code
# has it (raw inputs, no early stopping, ...), which experiment 3 runs.
COOC = "llmembed's co-occurrence head (standardized inputs, every block projected, early stopping, batch 256)"


def describe(sources: list[dict]) -> str:
    return " + ".join(
        f"{s['backbone']} L{','.join(map(str, s['layers']))} ({s['pooling']})" for s in sources
    )


def main(argv: list[str]) -> None:
    setup_logging()
    cfgs = experiment_cfgs(EXPERIMENT, argv)
    out_dir = Path(cfgs[0].results.out_dir)
    layers = read_json(out_dir / "layers.json", "experiment 2 (fusion)")
    result = {**header(cfgs[0], EXPERIMENT, MODULE, argv), "datasets": {}}
    result = continue_result(out_dir / "fusion.json", result)
    for cfg in cfgs:
        if cfg.dataset.name not in layers["datasets"]:
            raise UserError(f"layers.json has no {cfg.dataset.name}: run experiment 1 on it first")
        pre_extract(cfg, argv, ["smollm2", "minilm"])
        result["datasets"][cfg.dataset.name] = run_dataset(
            cfg, layers["datasets"][cfg.dataset.name]
        )
        write_json(out_dir / "fusion.json", finish(result))


if __name__ == "__main__":
    run_main(main)
