"""Experiment 4: counterparts at the same scale, on the same five splits as llmembed's runs, each at
its best documented setting and each with its own choices made on validation (and their cost).

(a) Prompting SmolLM2-135M-Instruct (its causal LM head, from the packaged GGUF with transformers):
    every class scored by the log-probability of its label word. A setup of
    `results.counterparts.prompting.setups` says how: the plain template or the model's chat
    template; contextual calibration or none; the numbers of demonstrations per class (drawn from
    each split's training rows), either each reported or chosen per split on validation; texts cut
    to `max_text_tokens` (llmembed's 512 where the best setting is asked for).
(b) Fine-tuning end to end or with LoRA adapters (`results.counterparts.finetuning.setups`): the
    model + a pooling + a linear layer, AdamW, early stopping on validation accuracy; with several
    learning rates, the one with the best validation accuracy per split, and only its test
    accuracy reported. Each rate's run on each split is a record in `results.run_dir`, reused by
    a later command (`results.resume=true`): a stopped sweep resumes per split and rate. MiniLM
    end to end, and SmolLM2 through LoRA (lora.py): the counterpart that adapts the same decoder
    llmembed reads.

    .venv/bin/python -m scripts.experiments.counterparts [hydra overrides]
    # config: conf/experiment/results_counterparts.yaml; one part: 'results.counterparts.run=[prompting.chat]'

Cost: every row records per split the seconds (and joules where metered) of its selection (the
validation rows scored for every candidate, every training run of the sweep) and of its test
predictions; experiment 5 reads them. The config's comments give the measured rates.

Writes <results.out_dir>/counterparts.json: per data set, `prompting` and `finetuning`, one entry
per setup, each with its rows (a row per method the page shows).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from llmembed.classify.heads import is_whole
from llmembed.classify.train import seeds_of
from scripts.experiments.common import (
    RUNS,
    SPLIT_CODES,
    backbone_path,
    backbone_spec,
    command_line,
    continue_result,
    device_name,
    experiment_cfgs,
    finish,
    header,
    load_model,
    load_tokenizer,
    log,
    machine,
    metered,
    over_splits,
    per_dataset,
    resolve_compute_dtype,
    run_main,
    setup_logging,
    split_datasets,
    write_json,
)
from scripts.experiments.finetune import (
    FineTuneConfig,
    SettingError,
    fine_tune,
    predict,
    whole,
)
from scripts.experiments.lora import add_lora
from scripts.experiments.prompting import (
    PromptScorer,
    calibrated,
    chat_prompt,
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


def rows_of(ds, part: str) -> np.ndarray:
    return np.flatnonzero(ds.split == SPLIT_CODES[part])


def scored(y: np.ndarray, pred: np.ndarray) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
    }


def summary(per_split: dict[int, dict], part: str) -> dict:
    seeds = sorted(per_split)
    return {
        k: over_splits([per_split[s][part][k] for s in seeds], seeds)
        for k in ("accuracy", "macro_f1")
    }


class Timed:
    """Seconds (and joules where metered) of scoring or training, kept per split and per part."""

    def __init__(self):
        self.per_split: dict[int, dict[str, float | None]] = {}

    def add(self, seed: int, part: str, figures: dict, share: float = 1.0) -> None:
        d = self.per_split.setdefault(seed, {})
        d[f"{part}_s"] = round(d.get(f"{part}_s", 0.0) + figures["wall_s"] * share, 3)
        e, had = figures.get("energy_j"), d.get(f"{part}_j", 0.0)
        d[f"{part}_j"] = None if e is None or had is None else round(had + e * share, 3)


# --- prompting ------------------------------------------------------------------------------------
def run_prompting(cfg, splits, name: str, setup) -> dict:
    """One prompting setup on every split: its rows (zero-shot; each k, or the k chosen on
    validation), each with per-split test scores and what they cost."""
    p, dsname = cfg.results.counterparts.prompting, cfg.dataset.name
    spec = p.templates[dsname]
    ds0 = next(iter(splits.values()))
    words = [spec.words[n] for n in ds0.label_names]
    path = backbone_path(p.backbone)
    tok = load_tokenizer(path)
    dtype = resolve_compute_dtype(cfg.results.counterparts.dtype)
    with metered() as load_meter:
        model = load_model(path, "causal", dtype)
    chat, calibrate = bool(setup.chat), bool(setup.calibrate)
    scorer = PromptScorer(
        model,
        tok,
        words,
        token_budget=int(p.token_budget),
        word_prefix="" if chat else " ",
        add_special_tokens=not chat,
    )
    texts = [truncate(tok, t, int(per_dataset(setup.max_text_tokens, dsname))) for t in ds0.texts]
    shot_tokens = int(per_dataset(setup.max_shot_tokens, dsname))
    ks = [int(k) for k in per_dataset(setup.shots, dsname)]
    choose_k = bool(setup.choose_shots)

    def prompt(text: str, shots: list[tuple[str, int]]) -> str:
        if chat:
            demos = [(truncate(tok, t, shot_tokens), words[y]) for t, y in shots]
            return chat_prompt(tok, spec.instruction, text, demos)
        return few_shot_prefix(tok, spec.template, words, shots, shot_tokens) + render(
            spec.template, text
        )

    def predictions(prompts: list[str], shots) -> tuple[np.ndarray, dict]:
        with metered() as meter:
            s = scorer.scores(prompts)
            if calibrate:
                s = calibrated(s, scorer.scores([prompt(cf, shots) for cf in p.content_free]))
        return s.argmax(1), meter.figures()

    # Zero-shot scores do not depend on the split: every row any split needs is scored once.
    parts = ["test", *(["validation"] if choose_k else [])]
    need = np.unique(np.concatenate([rows_of(d, q) for d in splits.values() for q in parts]))
    zero = np.full(len(texts), -1)
    zero_rate = {}  # seconds and joules per zero-shot prompt: each split's rows are its share
    if 0 in ks:
        zero[need], f = predictions([prompt(texts[i], []) for i in need], [])
        e = f.get("energy_j")
        zero_rate = {
            "wall_s": f["wall_s"] / len(need),
            "energy_j": None if e is None else e / len(need),
        }

    per_k: dict[int, dict[int, dict]] = {k: {} for k in ks}  # k -> seed -> {validation, test}
    cost = {k: Timed() for k in ks}
    chosen, chosen_cost, shot_ids = {}, Timed(), {}
    for seed, ds in splits.items():
        val, test = rows_of(ds, "validation"), rows_of(ds, "test")
        drawn = {}
        for k in ks:
            if k == 0:
                for part, idx in (("validation", val), ("test", test)):
                    if part in parts:
                        per_k[0].setdefault(seed, {})[part] = scored(ds.labels[idx], zero[idx])
                        cost[0].add(seed, part, zero_rate, share=len(idx))
                continue
            picked = draw_shots(ds.labels, rows_of(ds, "train"), k, seed)
            drawn[k] = [(ds.texts[i], int(ds.labels[i])) for i in picked]
            shot_ids.setdefault(k, {})[seed] = [int(ds.row_ids[i]) for i in picked]
            if choose_k:
                pred, figures = predictions([prompt(texts[i], drawn[k]) for i in val], drawn[k])
                per_k[k].setdefault(seed, {})["validation"] = scored(ds.labels[val], pred)
                cost[k].add(seed, "validation", figures)
        if choose_k:  # ties to the fewer demonstrations: the cheaper prompt
            best = max(ks, key=lambda k: (per_k[k][seed]["validation"]["accuracy"], -k))
            chosen[seed] = best
            for k in ks:  # choosing scored the validation rows of every candidate
                spent = cost[k].per_split[seed]
                chosen_cost.add(
                    seed,
                    "selection",
                    {"wall_s": spent["validation_s"], "energy_j": spent["validation_j"]},
                )
        for k in ks if not choose_k else [chosen[seed]]:
            if k == 0:
                if choose_k:
                    chosen_cost.add(seed, "test", zero_rate, share=len(test))
                continue
            pred, figures = predictions([prompt(texts[i], drawn[k]) for i in test], drawn[k])
            per_k[k].setdefault(seed, {})["test"] = scored(ds.labels[test], pred)
            cost[k].add(seed, "test", figures)
            if choose_k:
                chosen_cost.add(seed, "test", figures)
        log.info("%s %s split %d done", dsname, name, seed)

    described = ", ".join(
        [
            "prompting SmolLM2",
            "chat template" if chat else "plain template",
            "calibrated" if calibrate else "uncalibrated",
        ]
    )
    rows = {}

    def row(per_split: dict, timed: Timed, **extra) -> dict:
        """A row's scores and cost: a fixed k's row costs its test prompts (the validation
        prompts scored for the choice are the chosen row's selection)."""
        spent = {
            seed: {k: v for k, v in d.items() if not k.startswith("validation")}
            for seed, d in timed.per_split.items()
        }
        return {
            "test": summary(per_split, "test"),
            "cost": {"per_split": spent},
            "params_trained": 0,
            **extra,
        }

    for k in ks if not choose_k else [0]:
        label = "zero-shot" if k == 0 else f"{k} demonstration{'s' if k > 1 else ''} per class"
        rows[f"{described}, {label}"] = row(
            per_k[k], cost[k], **({"shot_row_ids": shot_ids[k]} if k else {})
        )
    if choose_k:
        per_split = {s: {"test": per_k[chosen[s]][s]["test"]} for s in splits}
        rows[f"{described}, demonstrations per class chosen on validation"] = row(
            per_split,
            chosen_cost,
            candidates=ks,
            chosen_per_split={s: f"k={chosen[s]}" for s in splits},
            validation={k: summary(per_k[k], "validation") for k in ks},
        )
    for r in rows.values():
        log.info("%s %s: test accuracy %.4f", dsname, name, r["test"]["accuracy"]["mean"])
    return {
        "settings": OmegaConf.to_container(setup, resolve=True),
        "template": spec.template,
        "instruction": spec.instruction if chat else None,
        "words": dict(zip(ds0.label_names, words, strict=True)),
        "model_load": load_meter.figures(),
        "dtype": str(dtype).removeprefix("torch."),
        "rows": rows,
    }


# --- fine-tuning ----------------------------------------------------------------------------------
def run_finetuning(cfg, splits, name: str, setup) -> dict | None:
    """One fine-tuning setup on every split of `splits` (all, or its own, per data set; none:
    not run there): every learning rate of `lrs` trained (early stopping on validation), the best
    on validation kept and its test accuracy reported."""
    dsname = cfg.dataset.name
    path = backbone_path(setup.backbone)
    tok = load_tokenizer(path)
    configs = finetune_configs(setup, dsname)
    seeds = own_splits(setup, dsname, list(splits))
    if not seeds:
        log.info(
            "%s %s: no splits on this data set (results.counterparts.finetuning)", dsname, name
        )
        return None
    build = backbone_builder(setup, path)
    per_split, runs, timed, chosen = {}, {}, Timed(), {}
    for seed in seeds:
        ds = splits[seed]
        tried = [
            trained_rate(cfg, name, setup, seed, replace(c, seed=seed), ds, build, tok)
            for c in configs
        ]
        for t in tried:
            timed.add(seed, "selection", t["train"])
        best = max(tried, key=lambda t: (t["val_accuracy"], -t["lr"]))  # ties: smaller lr
        timed.add(seed, "test", best["inference"])  # only the choice's test scoring is its cost
        per_split[seed] = {"test": best["test"]}
        chosen[seed] = f"lr={best['lr']:g}"
        runs[seed] = {
            "lrs": [
                {k: t[k] for k in ("lr", "best_epoch", "history")}
                | {"train_s": t["train"]["wall_s"]}
                for t in tried
            ],
            # how it ran: merge may join splits run otherwise
            "micro_batch": configs[0].micro_batch,
            # where its rates ran: one machine, or several (records reused from elsewhere), whose
            # seconds the split's selection then adds up, and the page marks
            **where_ran(tried),
            "train_per_1000": per_1000(best["train"], len(rows_of(ds, "train"))),
            "inference_per_1000": per_1000(best["inference"], len(rows_of(ds, "test"))),
        }
        log.info(
            "%s %s split %d: %s, test accuracy %.4f",
            dsname,
            name,
            seed,
            chosen[seed],
            per_split[seed]["test"]["accuracy"],
        )
    row = {
        "test": summary(per_split, "test"),
        "chosen_per_split": chosen,
        "runs": runs,
        "params_trained": best["params_trained"],
        "cost": {"per_split": timed.per_split},
    }
    return {
        "settings": OmegaConf.to_container(setup, resolve=True),
        "rows": {str(setup.label): row},
    }


def where_ran(tried: list[dict]) -> dict:
    machines = sorted({t["machine"] for t in tried})
    return (
        {"machine": machines[0]} if len(machines) == 1 else {"machine": None, "machines": machines}
    )


def trained_rate(cfg, name: str, setup, seed: int, c: FineTuneConfig, ds, build, tok) -> dict:
    """One learning rate of a fine-tuning setup on one split: trained (early stopping on
    validation), its best epoch scored on test, the record kept in `results.run_dir`. A finished
    record of the same computation is reused unless `results.resume=false`, so a stopped sweep
    resumes per split and rate (an hour on a CPU) and one may be run in parts, by processes or
    machines of their own. Test is scored for every rate so that a record is complete; only the
    rate chosen on validation is reported, and only its test scoring is counted as its cost."""
    key = json.loads(json.dumps({
        "dataset": cfg.dataset.name,
        "data": ds.fingerprint(),  # the split's rows themselves: texts, labels, split codes
        "split": seed,
        "backbone": backbone_spec(setup.backbone),
        "method": setup.method,
        "lora": OmegaConf.to_container(setup.lora) if setup.get("lora") else None,
        "finetune": asdict(c),
    }))  # fmt: skip
    path = Path(
        cfg.results.run_dir, "finetuning", cfg.dataset.name, name, f"split{seed}-lr{c.lr!r}.json"
    )
    earlier = finished_record(path) if cfg.results.get("resume", True) else None
    if earlier is not None and earlier.get("key") == key:
        RUNS["reused"] += 1
        log.info("%s: reused (%s, on %s)", path, earlier["command"], earlier["machine"])
        return earlier
    tr, va, te = (rows_of(ds, q) for q in ("train", "validation", "test"))
    torch.manual_seed(c.seed)  # LoRA's adapters start from it, not from what ran before
    with metered() as meter:
        res = fine_tune(build(), tok, ds.texts, ds.labels, tr, va, len(ds.label_names), c)
    train = meter.figures()
    with metered() as meter:
        pred = predict(res.model, tok, [ds.texts[i] for i in te], c)
    record = {
        "key": key,
        "lr": c.lr,
        "best_epoch": res.best_epoch,
        "val_accuracy": res.history[res.best_epoch]["val_accuracy"],
        "history": res.history,
        "params_trained": res.params_trained,
        "test": scored(ds.labels[te], pred),
        "train": train,
        "inference": meter.figures(),
        "machine": device_name(machine()),
        "command": command_line(MODULE, sys.argv[1:], cfg),
    }
    write_json(path, record)
    RUNS["fitted"] += 1
    log.info(
        "%s %s split %d lr %g: validation accuracy %.4f",
        cfg.dataset.name,
        name,
        seed,
        c.lr,
        record["val_accuracy"],
    )
    return record


def finished_record(path: Path) -> dict | None:
    """A fine-tuning record written earlier, or None (none there, or not readable: fitted again)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        log.warning("%s is not a fine-tuning record (%s): fitting it again", path, e)
        return None


def backbone_builder(setup, path: str) -> Callable[[], torch.nn.Module]:
    """A fresh copy of the model for each training run: all of it trains, or (method: lora) only
    LoRA adapters on `setup.lora.targets`. float32: training in bfloat16 on a CPU loses the small
    updates."""

    def build():
        model = load_model(path, "base", torch.float32)
        if setup.method == "lora":
            lo = setup.lora
            add_lora(
                model,
                list(lo.targets),
                rank=int(lo.rank),
                alpha=float(lo.alpha),
                dropout=float(lo.dropout),
            )
        return model

    return build


def finetune_configs(setup, dataset: str) -> list[FineTuneConfig]:
    """One FineTuneConfig per learning rate of a fine-tuning setup, on `dataset` (seed 0)."""
    fix = "give a list of one or more positive learning rates, e.g. [5e-5]"
    try:
        rates = [float(lr) for lr in setup.lrs] if OmegaConf.is_list(setup.lrs) else []
    except (TypeError, ValueError):
        rates = []
    if not rates:
        raise SettingError("lrs", setup.lrs, fix)
    base = {
        k: setup[k]
        for k in ("weight_decay", "batch_size", "max_epochs", "patience", "warmup", "pooling")
    }
    base |= {k: per_dataset(setup.get(k), dataset) for k in ("max_length", "micro_batch")}
    try:
        return [FineTuneConfig(**base, lr=r) for r in rates]
    except SettingError as err:  # FineTuneConfig's rule for one rate, said of the list as typed
        if err.field != "lr":
            raise
        raise SettingError("lrs", setup.lrs, fix) from None


def own_splits(setup, dataset: str, seeds: list[int]) -> list[int]:
    """The splits (by seed) a fine-tuning setup runs on `dataset`: all (`splits` null), or those
    of its own that were drawn (`seeds`; [] : none). A list that names none of them is refused:
    it would run nothing without a word."""
    own = per_dataset(setup.get("splits"), dataset)
    if own is None:
        return seeds
    fix = f"give a list of the splits to run, from the seeds {seeds}, [] for none or null for all"
    if not OmegaConf.is_list(own) or any(
        isinstance(x, bool) or not isinstance(x, int) for x in own
    ):
        raise SettingError("splits", own, fix)
    run = [s for s in seeds if s in own]
    if own and not run:
        raise SettingError("splits", own, fix)
    return run


def setup_problems(c, kind: str, name: str, dataset: str, seeds: list[int]) -> list[str]:
    """Settings that would fail, or silently train nothing, minutes or hours into a run, each
    one message (none: it can run). A setting given per data set must name this one; prompting
    needs its template."""
    key = f"results.counterparts.{kind}.setups.{name}"
    setup = c[kind].setups[name]
    per_set = ("max_length", "micro_batch", "splits", "shots", "max_text_tokens", "max_shot_tokens")
    problems = [
        f"error: {key}.{k} names no {dataset!r}: give one value or one per data set"
        for k in per_set
        if OmegaConf.is_dict(setup.get(k)) and dataset not in setup[k]
    ]
    if kind == "prompting" and dataset not in c.prompting.templates:
        problems.append(
            f"error: results.counterparts.prompting.templates has no {dataset!r}: add its "
            "template, instruction and label words"
        )
    if kind == "finetuning" and setup.method not in ("full", "lora"):
        problems.append(f"error: {key}.method={setup.method!r}: use full or lora")
    if problems:
        return problems
    try:
        if kind == "prompting":
            for k in ("max_text_tokens", "max_shot_tokens"):
                whole(k, per_dataset(setup[k], dataset))
            shots = per_dataset(setup.shots, dataset)
            if not (OmegaConf.is_list(shots) and shots and all(is_whole(k, 0) for k in shots)):
                fix = "give a list of demonstrations per class, 0 or more each, e.g. [0, 1]"
                raise SettingError("shots", shots, fix)
        else:
            finetune_configs(setup, dataset)
            own_splits(setup, dataset, seeds)
    except SettingError as err:
        at = f"{err.field}.{dataset}" if OmegaConf.is_dict(setup.get(err.field)) else err.field
        return [f"error: {key}.{at}={err.value!r}: {err.fix}"]
    return []


def check_setups(cfgs, todo: list[list[str]]) -> None:
    """Every setup to run on every data set checked before any runs: one message for them all,
    so that a new data set's missing settings come out in one try, not one per try."""
    problems = [
        p
        for cfg in cfgs
        for kind, name in todo
        for p in setup_problems(
            cfg.results.counterparts, kind, name, cfg.dataset.name, seeds_of(cfg)
        )
    ]
    if problems:
        raise SystemExit("\n".join(problems))


RUNNERS = {"prompting": run_prompting, "finetuning": run_finetuning}


def main(argv: list[str]) -> None:
    setup_logging()
    cfgs = experiment_cfgs(EXPERIMENT, argv)
    c0 = cfgs[0].results.counterparts
    todo = [str(x).split(".", 1) for x in c0.run]
    for entry in todo:
        if len(entry) != 2 or entry[0] not in RUNNERS or entry[1] not in c0[entry[0]].setups:
            known = [f"{k}.{s}" for k in RUNNERS for s in c0[k].setups]
            raise SystemExit(
                f"error: results.counterparts.run has {'.'.join(entry)!r}; known: {known}"
            )
    check_setups(cfgs, todo)
    out_dir = Path(cfgs[0].results.out_dir)
    path = out_dir / "counterparts.json"
    result = {**header(cfgs[0], EXPERIMENT, MODULE, argv), "datasets": {}}
    result = continue_result(path, result)
    threads = c0.torch_threads
    if threads:
        torch.set_num_threads(int(threads))
    for cfg in cfgs:
        splits = split_datasets(cfg)
        r = result["datasets"].setdefault(cfg.dataset.name, {"dataset": cfg.dataset.name})
        for kind, name in todo:
            setup = cfg.results.counterparts[kind].setups[name]
            done = RUNNERS[kind](cfg, splits, name, setup)
            if done is not None:
                r.setdefault(kind, {})[name] = done
                write_json(path, finish(result))


if __name__ == "__main__":
    run_main(main)
