"""`train(cfg, out_dir)`: features from the cache, a head per seed, metrics, a saved model.

Called by `llmembed-classify` (a thin Hydra shell) and directly by tests; returns the metrics that a
sweep optimizes.
"""

from __future__ import annotations

import csv
import inspect
import logging
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from llmembed.cache.format import SPLITS
from llmembed.cache.keys import fingerprint, text_hashes, write_json_atomic
from llmembed.cache.root import Cache
from llmembed.classify.heads import ParamError
from llmembed.classify.metrics import evaluate, summarize
from llmembed.classify.saved import save_trained
from llmembed.data.datasets import TextDataset, load_dataset, resplit
from llmembed.errors import UserError
from llmembed.extract.command import extract_command
from llmembed.extract.pipeline import ExtractResult, extract_texts
from llmembed.extract.plan import LayerRangeError, make_plan
from llmembed.fuse.features import (
    Source,
    block_roles,
    load_features,
    parse_sources,
    resolve_fusion,
)
from llmembed.meter import Meter

log = logging.getLogger(__name__)


ENTRY_COST = ("rows_computed", "wall_s", "cpu_s", "energy_j", "energy_note", "device")


def build_head(cfg: DictConfig, feats, seed: int):
    """The head `head.params` describes, built by Hydra's `instantiate` from its `_target_`: a
    scikit-learn estimator of your own is a config file (conf/head/*.yaml), not a code change.
    What depends on the features (the paper's head's block sizes and declared block roles) and the
    seed are given to estimators whose constructor takes them."""
    accepted = inspect.signature(head_class(cfg.head.params._target_)).parameters
    extra = {"random_state": seed}
    if "block_sizes" in accepted:
        extra["block_sizes"] = tuple(feats.block_sizes)
    if "block_roles" in accepted:
        extra["block_roles"] = block_roles(feats.sources, feats.source_of_block)
    head = instantiate(
        cfg.head.params, _convert_="all", **{k: v for k, v in extra.items() if k in accepted}
    )
    log.info("head: %r", head)
    return head


FILLED = ("block_sizes", "block_roles", "random_state")  # given by build_head, not by head.params


def check_head(params: DictConfig, seeds: list[int]) -> None:
    """`head.params` that could not build or train the head, refused before any work: a class
    that is not an estimator, a parameter it does not take, a value its own checks refuse (our
    heads' `check_params`, a scikit-learn estimator's parameter constraints)."""
    target = params.get("_target_")
    if not target:
        raise UserError("head.params._target_ must name the estimator class (see conf/head/)")
    cls = head_class(target)
    accepted = inspect.signature(cls).parameters
    given = [k for k in params if not (k.startswith("_") and k.endswith("_"))]  # Hydra's keys
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        unknown = [k for k in given if k not in accepted]
        if unknown:
            takes = ", ".join(k for k in accepted if k not in FILLED)
            raise UserError(
                f"head.params.{unknown[0]}: {target} takes no parameter {', '.join(unknown)}; "
                f"it takes {takes} (see conf/head/*.yaml)"
            )
    # built as build_head builds it (the blocks' values are known only once the features are read)
    filled = {"random_state": seeds[0], "block_sizes": (), "block_roles": ()}
    try:
        head = instantiate(
            params, _convert_="all", **{k: v for k, v in filled.items() if k in accepted}
        )
    except InstantiationException as err:  # the user's own class refused its arguments
        cause = err.__cause__ or err
        raise UserError(
            f"head.params do not build {target} ({type(cause).__name__}: {cause}); "
            "see conf/head/*.yaml for the parameters"
        ) from None
    check = getattr(head, "check_params", None)
    if check is None and hasattr(cls, "_parameter_constraints"):  # scikit-learn's own estimators
        check = head._validate_params
    if check is not None:
        try:
            check()
        except (ValueError, TypeError) as err:  # scikit-learn's InvalidParameterError is both
            named = isinstance(err, ParamError)  # ours start with the parameter's name
            raise UserError(f"head.params{'.' if named else ': '}{err}") from None


def head_class(target) -> type:
    """The estimator class `head.params._target_` names: it must import and have `fit`."""
    example = "e.g. head.params._target_=sklearn.linear_model.LogisticRegression"
    try:
        cls = get_class(str(target))
    except Exception as err:  # ImportError, AttributeError, ValueError (not a class), ...
        cause = err.__cause__ or err
        raise UserError(
            f"head.params._target_={target}: no such class ({type(cause).__name__}: {cause}); "
            f"name an estimator class, {example}"
        ) from None
    if not callable(getattr(cls, "fit", None)):
        raise UserError(
            f"head.params._target_={target} is not an estimator (it has no fit method); {example}"
        )
    return cls


def fit_head(head, X, y, validation) -> None:
    """Our heads take the validation split for early stopping and model choice; others get none."""
    if "validation" in inspect.signature(head.fit).parameters:
        head.fit(X, y, validation=validation)
    else:
        head.fit(X, y)


def probabilities(head, X: np.ndarray, n_classes: int) -> np.ndarray:
    if hasattr(head, "predict_proba"):
        return head.predict_proba(X)
    return np.eye(n_classes)[head.predict(X)]  # predictions are label indices


def stored_rows(cfg: DictConfig, src: Source, ds: TextDataset) -> ExtractResult:
    """The cache entry holding a source's layers for the data set's texts. The policy lives here:
    with `extract_missing` the extraction stage computes what the cache lacks (only those texts);
    without, a miss fails at once with the `llmembed-extract` command that fills it."""
    try:
        plan = make_plan(
            cfg.extract, src.backbone, cfg.cache, need=(list(src.layers), [src.pooling])
        )
    except LayerRangeError as err:
        # A single-layer feature set takes its layer from the top-level key (default 20, a
        # SmolLM2 layer): name that key, not the feature set's list the user never wrote.
        if "${layer}" not in str(OmegaConf.to_container(cfg.features, resolve=False)):
            raise
        n = err.num_layers
        raise UserError(
            f"layer={cfg.layer}: {src.backbone.name} has hidden states 0-{n} (0 = embeddings, "
            f"{n} = last layer), and this feature set takes its layer from the top-level key: "
            f"give layer=0 to layer={n}"
        ) from None
    command = None
    if not cfg.extract_missing:
        section = {"dataset": cfg.dataset, "backbone": src.backbone}
        command = extract_command(
            OmegaConf.create({**section, "extract": cfg.extract, "cache": cfg.cache})
        )
    if cfg.extract_missing and (missing := missing_texts(plan, ds.texts)):
        log.info(
            "%d texts of %s are not in the cache: extracting them with %s (%s)",
            missing,
            ds.name,
            plan.backbone.name,
            plan.backbone.path,
        )
    return extract_texts(
        plan, ds.texts, name=ds.name, allow_extract=cfg.extract_missing, fill_command=command
    )


def missing_texts(plan, texts: list[str]) -> int:
    """How many distinct texts no cache entry that could serve the plan holds: what the extraction
    stage will compute (the entry holding most of them takes the rest)."""
    hashes = np.unique(text_hashes(texts))
    cache = Cache(plan.cache_root)
    held = [
        int(entry.holds(hashes).sum())
        for spec in plan.read_specs
        for entry in cache.selections(spec.key, plan.need_layers, plan.need_poolings)
    ]
    return len(hashes) - max(held, default=0)


def data_identity(cfg: DictConfig, ds: TextDataset) -> dict:
    """What tells this run's data apart from another's under the same name: the report never
    merges runs on different files or subsets."""
    d = cfg.dataset
    return {
        "name": ds.name,
        "source": d.source,
        "path": d.get("path"),
        "limit": d.get("limit"),
        "seed": d.seed,
        "rows": len(ds),
        "duplicates_dropped": int(getattr(ds, "duplicates_dropped", 0)),
        # The rows themselves (texts, labels), not the split: seeds of one data set share it.
        "fingerprint": fingerprint(
            {"texts": ds.texts, "labels": ds.labels, "names": ds.label_names}, length=12
        ),
    }


def test_set_intervals(summary: dict, runs: list[dict]) -> None:
    """On one fixed test split, seeds only move the head (logistic regression not at all), so an
    interval over seeds would claim a precision the test set does not have: there the interval is
    the hull of the runs' own test-set intervals (Wilson for accuracy, bootstrap for macro-F1)."""
    for metric in ("accuracy", "macro_f1"):
        own = [r[f"{metric}_ci"] for r in runs]
        summary[metric]["ci"] = [min(lo for lo, _ in own), max(hi for _, hi in own)]
        summary[metric]["ci_kind"] = "test set"


def splits_per_seed(cfg: DictConfig, ds: TextDataset, seeds: list[int]) -> dict[int, np.ndarray]:
    """The data set's split for every seed, or with `resplit` one stratified split drawn per seed
    (no forward pass: the features of every row are already there)."""
    if not cfg.get("resplit", False):
        return {seed: ds.split for seed in seeds}
    return {seed: resplit(ds, seed).split for seed in seeds}


def seeds_of(cfg: DictConfig) -> list[int]:
    """`seeds` as the list of integers it must be (one run, or one split, per seed)."""
    seeds = cfg.seeds
    if (
        not OmegaConf.is_list(seeds)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    ):
        raise UserError(
            f"seeds must be a list of integers, 0 or more, e.g. seeds='[0,1,2]'; got {seeds!r}"
        )
    return [int(s) for s in seeds]


def train(cfg: DictConfig, out_dir: Path) -> dict:
    seeds = seeds_of(cfg)
    check_head(cfg.head.params, seeds)  # before any work
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with Meter([torch.cuda.current_device()] if torch.cuda.is_available() else []) as meter:
        sources = parse_sources(cfg.features)
        fusion = resolve_fusion(cfg.features.fusion, cfg.head.name)
        ds = load_dataset(cfg.dataset)
        feats = load_features(sources, [stored_rows(cfg, src, ds) for src in sources], ds)
        t_features = time.perf_counter() - t0
        X = feats.fuse(fusion)
        y = feats.labels
        splits = splits_per_seed(cfg, ds, seeds)

        runs, heads, t_fit = [], [], 0.0
        for seed in seeds:
            tr, va, te = (splits[seed] == code for code in range(3))
            head = build_head(cfg, feats, seed)
            t = time.perf_counter()
            fit_head(head, X[tr], y[tr], (X[va], y[va]))
            t_fit += time.perf_counter() - t
            runs.append(
                {
                    "seed": seed,
                    "rows": {
                        "train": int(tr.sum()),
                        "validation": int(va.sum()),
                        "test": int(te.sum()),
                    },
                    "validation": evaluate(y[va], head.predict(X[va]), feats.label_names),
                    "test": evaluate(y[te], head.predict(X[te]), feats.label_names),
                }
            )
            heads.append(head)
            log.info(
                "seed %d: validation accuracy %.4f, test accuracy %.4f",
                seed,
                runs[-1]["validation"]["accuracy"],
                runs[-1]["test"]["accuracy"],
            )

    test = summarize([r["test"] for r in runs])
    if not cfg.get("resplit", False):
        test_set_intervals(test, [r["test"] for r in runs])
    metrics = {
        "dataset": ds.name,
        "data": data_identity(cfg, ds),
        "resplit": bool(cfg.get("resplit", False)),
        "rows": runs[0]["rows"],
        "sources": [
            {
                "backbone": s.backbone.name,
                "layers": feats.layers[i],  # resolved: -1 is the last hidden state's index
                "requested_layers": list(s.layers),
                "pooling": s.pooling,
                "role": s.role,
            }
            for i, s in enumerate(sources)
        ],
        "features": feats.block_names,
        "n_features": int(X.shape[1]),
        "fusion": fusion,
        "head": cfg.head.name,
        "seeds": seeds,
        "test": test,
        "validation": summarize([r["validation"] for r in runs]),
        "runs": runs,
        # This run's share (zero on a hit) and what making each entry cost, from its manifest.
        "extraction": [
            {
                "backbone": s.backbone.name,
                "entry": str(r.entry.path),
                "hit": r.hit,
                "seconds": r.stats.seconds,
                "texts": r.stats.texts,
                "entry_cost": entry_cost(r.entry.manifest),
            }
            for s, r in zip(sources, feats.entries, strict=True)
        ],
        "resources": meter.figures(),  # features and fitting: wall, CPU, memory, energy
        "timings": {
            "features_s": round(t_features, 3),
            "fit_s": round(t_fit, 3),
            "total_s": round(time.perf_counter() - t0, 3),
        },
        "config": OmegaConf.to_container(cfg, resolve=True),
        "versions": library_versions(),
    }
    if cfg.save_model and not hasattr(heads[0], "state"):
        log.warning("%s has no state() to save as safetensors: no model saved", type(heads[0]))
    elif cfg.save_model:
        save_trained(
            out_dir / "model",
            heads[0],
            head_name=cfg.head.name,
            info={
                "label_names": feats.label_names,
                # what llmembed-predict reads from a table by default
                "data": {
                    "text_column": cfg.dataset.get("text_column"),
                    "label_column": cfg.dataset.get("label_column"),
                },
                "versions": metrics["versions"],
                "fusion": fusion,
                "sources": [
                    saved_source(s, feats.layers[i], r.entry)
                    for i, (s, r) in enumerate(zip(sources, feats.entries, strict=True))
                ],
            },
            metrics=metrics,
            group_writable=cfg.cache.get("group_writable", False),
        )
    write_json_atomic(out_dir / "metrics.json", metrics)  # a killed run leaves none, not half
    proba = probabilities(heads[0], X, len(feats.label_names))
    write_predictions(out_dir / "predictions.csv", ds, splits[seeds[0]], proba)
    lo, hi = test["accuracy"]["ci"]
    log.info(
        "%s on %s: test accuracy %.4f (95%% CI %.4f-%.4f), macro-F1 %.4f (%d seeds)",
        cfg.head.name,
        ",".join(feats.block_names),
        test["accuracy"]["mean"],
        lo,
        hi,
        test["macro_f1"]["mean"],
        len(seeds),
    )
    return metrics


def library_versions() -> dict[str, str]:
    """The versions that made the numbers: llmembed, torch, transformers, scikit-learn."""
    return {p: version(p) for p in ("llmembed", "torch", "transformers", "scikit-learn")}


def entry_cost(manifest) -> dict:
    """What making an entry cost, summed over its appends (wall, CPU, energy; rows computed)."""
    records = manifest.extractions
    out = {}
    for k in ENTRY_COST:
        values = [r.get(k) for r in records]
        if k in ("energy_note", "device"):
            out[k] = values[-1] if values else None
        else:
            out[k] = None if not values or None in values else round(sum(values), 3)
    return out


def saved_source(source, layers: list[int], entry) -> dict:
    """How a saved model finds and checks one source's backbone on another machine: a named
    backbone by its config name, any other by its path (overridable with --backbone-path), and the
    weights' identity (hub commit or content hashes), which predict checks before using them."""
    backbone = OmegaConf.to_container(source.backbone, resolve=True)
    backbone["conf"] = source.conf_name
    spec = entry.spec.as_dict()
    return {
        "backbone": backbone,
        "identity": spec["backbone"],
        "role": source.role,
        "layers": layers,
        "pooling": source.pooling,
        "spec": spec,  # the computation to reproduce: dtypes, max length, prompt, ...
        "hidden_size": entry.manifest.hidden_size,
    }


def write_predictions(path: Path, ds: TextDataset, split: np.ndarray, proba: np.ndarray) -> None:
    """Every row's id, split, true label, predicted label, class probabilities (first seed's head)
    and text."""
    names = ds.label_names
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row_id", "split", "label", "predicted", *[f"p_{n}" for n in names], "text"])
        rows = zip(ds.row_ids, split, ds.labels, proba, ds.texts, strict=True)
        for rid, sp, y, p, text in rows:
            w.writerow([rid, SPLITS[sp], names[y], names[int(p.argmax())], *np.round(p, 6), text])
