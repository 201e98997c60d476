"""Experiment 4: counterparts at the same scale, on the same five splits as llmembed's runs (full
run ~1.2 h on 2 idle CPU cores, 5-10x under load; minutes on a GPU).

(a) Prompting SmolLM2-135M-Instruct (its causal LM head, loaded from the packaged GGUF with
    transformers): every class scored by the log-probability of its label word after a fixed
    template (conf/experiment/results_counterparts.yaml); zero-shot (each test text scored once,
    whatever split it falls in) and few-shot (`shots` demonstrations per class drawn from each
    split's training rows). Nothing is chosen, so validation is not used.
(b) Fine-tuning MiniLM end to end: encoder + mean pooling + linear layer, AdamW, at most
    `max_epochs` epochs with early stopping on validation accuracy; test scored once per split.

    .venv/bin/python -m scripts.experiments.counterparts [hydra overrides]
    # config: conf/experiment/results_counterparts.yaml

Estimated full run: zero-shot scores the union of the five test splits once (~0.7M tokens),
few-shot 5 x (2,113 + 1,076 + 425) prompts with demonstrations (~3.5M tokens): ~30 min at ~2,500
tokens/s on two idle CPU cores; fine-tuning MiniLM (at most 4 epochs x 5 splits, float32) ~45
min: about 1.2 h idle, 5-10x that on the loaded shared machine (see the session report for the
pilot's figures); minutes on a GPU (models move to CUDA by themselves).

Writes <results.out_dir>/counterparts.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from scripts.experiments.common import (
    SPLIT_CODES,
    backbone_path,
    continue_result,
    experiment_cfgs,
    header,
    load_model,
    load_tokenizer,
    log,
    metered,
    resolve_compute_dtype,
    scores_from_predictions,
    setup_logging,
    split_datasets,
    summary_of,
    write_json,
)
from scripts.experiments.finetune import FineTuneConfig, fine_tune, predict
from scripts.experiments.prompting import (
    PromptScorer,
    draw_shots,
    few_shot_prefix,
    render,
    truncate,
)

EXPERIMENT, MODULE = "results_counterparts", "scripts.experiments.counterparts"


def per_1000(figures: dict, texts: int) -> dict:
    k = 1000 / max(texts, 1)
    e = figures.get("energy_j")
    return {
        "texts": texts,
        "seconds": round(figures["wall_s"] * k, 3),
        "cpu_seconds": round(figures["cpu_s"] * k, 3),
        "joules": None if e is None else round(e * k, 3),
        "energy_note": figures.get("energy_note"),
    }


def run_prompting(cfg, splits) -> dict:
    p = cfg.results.counterparts.prompting
    spec = p.templates[cfg.dataset.name]
    ds0 = next(iter(splits.values()))
    words = [spec.words[name] for name in ds0.label_names]
    path = backbone_path(p.backbone)
    tok = load_tokenizer(path)
    dtype = resolve_compute_dtype(cfg.results.counterparts.dtype)
    with metered() as load_meter:
        model = load_model(path, "causal", dtype)
    scorer = PromptScorer(model, tok, words, token_budget=int(p.token_budget))
    texts = [truncate(tok, t, int(p.max_text_tokens)) for t in ds0.texts]
    out = {
        "template": spec.template,
        "words": dict(zip(ds0.label_names, words, strict=True)),
        "model_load": load_meter.figures(),
        "dtype": str(dtype).removeprefix("torch."),
    }

    # Zero-shot: a text's score does not depend on the split, so each test text is scored once.
    rows = np.unique(
        np.concatenate([np.flatnonzero(d.split == SPLIT_CODES["test"]) for d in splits.values()])
    )
    with metered() as meter:
        pred_rows = scorer.predict([render(spec.template, texts[i]) for i in rows])
    pred = np.full(len(texts), -1)
    pred[rows] = pred_rows
    zero = scores_from_predictions("zero-shot", splits, lambda s, idx: pred[idx], parts=("test",))
    out["zero_shot"] = {
        "test": summary_of(zero),
        "cost_per_1000": per_1000(meter.figures(), len(rows)),
        "params_trained": 0,
    }
    log.info(
        "%s zero-shot: test accuracy %.4f",
        cfg.dataset.name,
        out["zero_shot"]["test"]["accuracy"]["mean"],
    )

    few_pred, cost, shots_used = {}, [], {}
    for seed, ds in splits.items():
        train_rows = np.flatnonzero(ds.split == SPLIT_CODES["train"])
        shots = draw_shots(ds.labels, train_rows, int(p.shots), seed)
        shots_used[seed] = [int(ds.row_ids[i]) for i in shots]
        prefix = few_shot_prefix(
            tok,
            spec.template,
            words,
            [(ds.texts[i], int(ds.labels[i])) for i in shots],
            int(p.max_shot_tokens),
        )
        test = np.flatnonzero(ds.split == SPLIT_CODES["test"])
        with metered() as meter:
            few_pred[seed] = dict(
                zip(
                    test.tolist(),
                    scorer.predict([prefix + render(spec.template, texts[i]) for i in test]),
                    strict=True,
                )
            )
        cost.append(per_1000(meter.figures(), len(test)))
    few = scores_from_predictions(
        "few-shot", splits, lambda s, idx: np.array([few_pred[s][i] for i in idx]), parts=("test",)
    )
    out["few_shot"] = {
        "test": summary_of(few),
        "shots_per_class": int(p.shots),
        "shot_row_ids": shots_used,
        "cost_per_1000": average(cost),
        "params_trained": 0,
    }
    log.info(
        "%s few-shot: test accuracy %.4f",
        cfg.dataset.name,
        out["few_shot"]["test"]["accuracy"]["mean"],
    )
    return out


def average(costs: list[dict]) -> dict:
    out = dict(costs[0])
    for k in ("seconds", "cpu_seconds", "joules"):
        vals = [c[k] for c in costs]
        out[k] = None if any(v is None for v in vals) else round(float(np.mean(vals)), 3)
    out["texts"] = int(np.mean([c["texts"] for c in costs]))
    return out


def run_finetuning(cfg, splits) -> dict:
    f = cfg.results.counterparts.finetuning
    path = backbone_path(f.backbone)
    tok = load_tokenizer(path)
    ftc = dict(OmegaConf.to_container(f, resolve=True))
    ftc.pop("backbone")
    ftc["max_length"] = int(ftc["max_length"][cfg.dataset.name])
    preds, runs, train_cost, infer_cost = {}, {}, [], []
    for seed, ds in splits.items():
        c = FineTuneConfig(**ftc, seed=seed)
        tr, va, te = (
            np.flatnonzero(ds.split == SPLIT_CODES[p]) for p in ("train", "validation", "test")
        )
        encoder = load_model(path, "base", torch.float32)
        with metered() as meter:
            res = fine_tune(encoder, tok, ds.texts, ds.labels, tr, va, len(ds.label_names), c)
        train_cost.append(per_1000(meter.figures(), len(tr)))
        with metered() as meter:
            pred = predict(res.model, tok, [ds.texts[i] for i in te], c)
        infer_cost.append(per_1000(meter.figures(), len(te)))
        preds[seed] = dict(zip(te.tolist(), pred, strict=True))
        runs[seed] = {
            "best_epoch": res.best_epoch,
            "history": res.history,
            "params_trained": res.params_trained,
        }
        log.info(
            "%s fine-tuning split %d: best epoch %d, test accuracy %.4f",
            cfg.dataset.name,
            seed,
            res.best_epoch,
            float((pred == ds.labels[te]).mean()),
        )
    scores = scores_from_predictions(
        "fine-tuning", splits, lambda s, idx: np.array([preds[s][i] for i in idx]), parts=("test",)
    )
    return {
        "test": summary_of(scores),
        "config": ftc,
        "runs": runs,
        "params_trained": runs[min(runs)]["params_trained"],
        "train_cost_per_1000": average(train_cost),
        "inference_cost_per_1000": average(infer_cost),
    }


def main(argv: list[str]) -> None:
    setup_logging()
    cfgs = experiment_cfgs(EXPERIMENT, argv)
    out_dir = Path(cfgs[0].results.out_dir)
    path = out_dir / "counterparts.json"
    result = {**header(cfgs[0], EXPERIMENT, MODULE, argv), "datasets": {}}
    result = continue_result(path, result)
    threads = cfgs[0].results.counterparts.torch_threads
    if threads:
        torch.set_num_threads(int(threads))
    for cfg in cfgs:
        splits = split_datasets(cfg)
        r = result["datasets"].setdefault(cfg.dataset.name, {"dataset": cfg.dataset.name})
        if "prompting" in cfg.results.counterparts.run:
            r["prompting"] = run_prompting(cfg, splits)
            write_json(path, result)
        if "finetuning" in cfg.results.counterparts.run:
            r["finetuning"] = run_finetuning(cfg, splits)
            write_json(path, result)


if __name__ == "__main__":
    main(sys.argv[1:])
