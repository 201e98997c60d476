"""Experiment 3: the paper's recipe against llmembed's defaults, one factor at a time.

1. Pooling (our own forward pass over the packaged SmolLM2 with transformers, since llmembed stores
   only mask-aware poolings): mask-aware mean (llmembed) vs the mean over a fixed padded length
   (the paper's code: right padding to max_length, pads in the mean); SmolLM2's tokenizer adds no
   BOS, so a BOS is put in front to measure the paper's situation: mean with the BOS state vs
   without it, and the paper's full recipe (BOS and padding in the mean). Each variant: logistic
   regression on the paper's mean of the last five layers, and on the best single layer (chosen per
   split on validation among `results.recipe.layers`). Where the paper's code has the data set
   (`results.recipe.paper_pad`: MR), its own pad lengths on a subset of rows, paired with the same
   rows at `pad_to` and under llmembed's pooling. The largest dimension of the raw states per layer
   is recorded (a head on raw inputs meets it).
2. Layers: the paper's last five (mean, and concatenated) through llmembed; experiment 2's layers
   chosen on validation are read from fusion.json by the page.
3. Heads (`results.recipe.heads`): the paper's head as its code has it (raw inputs, the encoder
   unprojected at a common width, fixed epochs, softmax before the loss) and llmembed's, on the
   paper's features (SmolLM2 last five + MiniLM), σ chosen on validation for each.

    .venv/bin/python -m scripts.experiments.recipe [hydra overrides]   # conf/experiment/results_recipe.yaml

Estimated time (measured per unit on a loaded 2-core machine): per set two padded passes (MR 10,566 x
64 tokens ~26 min, TREC 5,381 x 32 ~6 min, BBC 2,125 x 512 ~59 min of one CPU core), the paper's
MR lengths on 200 rows ~52 min, 425 logistic regressions a few minutes, 20 head fits 10-25 min;
minutes on a GPU (the passes move to CUDA by themselves).

Writes <results.out_dir>/recipe.json.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from llmembed.classify.heads import LogRegHead
from llmembed.classify.train import check_head, seeds_of
from scripts.experiments.common import (
    SPLIT_CODES,
    Scores,
    backbone_path,
    choose,
    chosen_test,
    classify,
    continue_result,
    experiment_cfgs,
    finish,
    head_config,
    head_threads,
    header,
    load_model,
    load_tokenizer,
    log,
    metered,
    pre_extract,
    resolve_compute_dtype,
    run_main,
    selection,
    setup_logging,
    split_datasets,
    summary_of,
    with_changes,
    write_json,
)

EXPERIMENT, MODULE = "results_recipe", "scripts.experiments.recipe"


@torch.inference_mode()
def pooled_variants(
    model,
    texts: list[str],
    tok,
    *,
    pad_to: int,
    pad_id: int,
    bos_id: int | None,
    layers: list[int],
    token_budget: int = 1024,
) -> dict[str, np.ndarray]:
    """Mean-pooled hidden states of `layers` for every text, right-padded to `pad_to` tokens.

    Returns {variant: (texts, layers, hidden) float32}. Without `bos_id`: "masked" (mean over the
    real tokens, llmembed's rule) and "padded" (mean over all `pad_to` positions, pads included, the
    paper's). With `bos_id` in front of every text: "masked_bos" (BOS state in the mean),
    "masked_nobos" (BOS position left out), "padded_bos" (the paper's full recipe: BOS and pads)
    and "padded_nobos". Under right padding a causal model's real positions never see the pads, so
    the masked variants equal those of an unpadded forward pass."""
    ids = tok(texts, add_special_tokens=False, truncation=False)["input_ids"]
    room = pad_to - (bos_id is not None)
    seqs = [([bos_id] if bos_id is not None else []) + s[:room] for s in ids]
    n, batch = len(seqs), max(1, token_budget // pad_to)
    names = (
        ["masked_bos", "masked_nobos", "padded_bos", "padded_nobos"]
        if bos_id is not None
        else ["masked", "padded"]
    )
    hidden = model.config.get_text_config().hidden_size
    out = {k: np.zeros((n, len(layers), hidden), dtype=np.float32) for k in names}
    for start in range(0, n, batch):
        chunk = seqs[start : start + batch]
        x = torch.full((len(chunk), pad_to), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), pad_to), dtype=torch.long)
        for i, s in enumerate(chunk):
            x[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        dev = model.device
        states = model(
            input_ids=x.to(dev), attention_mask=mask.to(dev), output_hidden_states=True
        ).hidden_states
        # Pooled where the states are (a GPU's host copy of every state cost more than the pass).
        h = torch.stack([states[j] for j in layers], dim=1).float()  # (B, L, T, H)
        m = mask[:, None, :, None].float().to(dev)  # (B, 1, T, 1)
        sl = slice(start, start + len(chunk))
        pooled = {}
        if bos_id is None:
            pooled["masked"] = (h * m).sum(2) / m.sum(2)
            pooled["padded"] = h.mean(2)
        else:
            nobos = m.clone()
            nobos[:, :, 0] = 0
            pooled["masked_bos"] = (h * m).sum(2) / m.sum(2)
            pooled["masked_nobos"] = (h * nobos).sum(2) / nobos.sum(2).clamp(min=1)
            pooled["padded_bos"] = h.mean(2)
            pooled["padded_nobos"] = h[:, :, 1:].mean(2)
        for k, v in pooled.items():
            out[k][sl] = v.cpu().numpy()
    return out


VARIANTS = {  # variant -> (forward pass, what the page calls it)
    "masked": ("plain", "mask-aware mean, no BOS (llmembed)"),
    "padded": ("plain", "mean over the padded length, no BOS"),
    "masked_bos": ("bos", "BOS in front, mask-aware mean with the BOS state"),
    "masked_nobos": ("bos", "BOS in front, mask-aware mean without the BOS state"),
    "padded_bos": ("bos", "BOS in front, mean over the padded length (the paper's code)"),
}


def forward_settings(cfg, pad_to: int) -> tuple[str, object, int, int, dict]:
    """(model path, tokenizer, pad id, BOS id, what changes the numbers) of our own forward pass."""
    r = cfg.results.recipe
    path = backbone_path("smollm2")
    tok = load_tokenizer(path)
    pad_id = (
        tok.convert_tokens_to_ids(r.pad_token)
        if r.pad_token
        else (tok.unk_token_id if tok.unk_token_id is not None else tok.pad_token_id)
    )
    bos_id = tok.convert_tokens_to_ids(r.bos_token) if r.bos_token else tok.bos_token_id
    info = {
        "pad_to": pad_to,
        "pad_token": tok.convert_ids_to_tokens(pad_id),
        "bos_token": tok.convert_ids_to_tokens(bos_id),
        "layers": [int(x) for x in r.layers],
        "tokenizer_adds_bos": tok("good")["input_ids"][0] == tok.bos_token_id,
        "dtype": str(resolve_compute_dtype(r.dtype)).removeprefix("torch."),
    }
    return path, tok, pad_id, bos_id, info


def stored_states(
    cfg, texts: list[str], tag: str, pad_to: int, bos_options: tuple
) -> tuple[dict[str, np.ndarray], dict]:
    """Every pooled variant of the forward passes `bos_options` (None: no BOS; "bos": one in
    front) for `texts`, padded to `pad_to`, computed once and kept in results.work_dir under a
    name that every setting changing the numbers (and the texts) goes into."""
    r = cfg.results.recipe
    path, tok, pad_id, bos_id, info = forward_settings(cfg, pad_to)
    settings = {"info": info, "model": path, "passes": [str(b) for b in bos_options]}
    key = hashlib.sha256(
        json.dumps(settings, sort_keys=True).encode() + "\n".join(texts).encode()
    ).hexdigest()
    work = Path(cfg.results.work_dir).expanduser() / f"{tag}-pad{pad_to}-{key[:10]}"
    info["work_dir"] = str(work)
    if (work / "info.json").is_file():  # written last: its presence means every file is there
        saved = json.loads((work / "info.json").read_text())
        return {k: load_file(str(work / f"{k}.safetensors"))["x"] for k in saved["variants"]}, saved
    model = load_model(path, "base", resolve_compute_dtype(r.dtype))
    out, cost = {}, {}
    for bos in bos_options:
        with metered() as meter:
            out.update(
                pooled_variants(
                    model,
                    texts,
                    tok,
                    pad_to=pad_to,
                    pad_id=pad_id,
                    bos_id=bos_id if bos else None,
                    layers=info["layers"],
                    token_budget=max(int(r.token_budget), pad_to),
                )
            )
        cost["bos" if bos else "plain"] = {
            **meter.figures(),
            "texts": len(texts),
            "padded_tokens": len(texts) * pad_to,
        }
        log.info("padded forward pass (%s BOS, %d tokens): %.1f s", bos, pad_to, meter.wall)
    work.mkdir(parents=True, exist_ok=True)
    for k, x in out.items():  # float16 halves the disk unless a value is beyond its range
        wide = np.abs(x).max() >= 6e4
        save_file(
            {"x": np.ascontiguousarray(x, np.float32 if wide else np.float16)},
            str(work / f"{k}.safetensors"),
        )
    info |= {"cost": cost, "variants": sorted(out)}
    (work / "info.json").write_text(json.dumps(info, indent=1))
    return out, info


def custom_states(cfg, ds) -> tuple[dict[str, np.ndarray], dict]:
    """Every variant of VARIANTS for the data set's rows, at the data set's `pad_to`."""
    pad_to = int(cfg.results.recipe.pad_to[cfg.dataset.name])
    states, info = stored_states(cfg, ds.texts, ds.name, pad_to, (None, "bos"))
    return {k: states[k].astype(np.float32) for k in VARIANTS}, info


def massive_dimensions(X: np.ndarray, layers: list[int]) -> dict[str, dict]:
    """Per stored layer of pooled states `X` (texts, layers, hidden): the dimension with the largest
    mean magnitude over the texts and how many times the median dimension's magnitude it is. Raw
    (unstandardized) inputs to a head are dominated by such dimensions."""
    mag = np.abs(X.astype(np.float32)).mean(axis=0)  # (layers, hidden)
    return {
        str(layer): {
            "dimension": int(mag[j].argmax()),
            "times_median": round(float(mag[j].max() / np.median(mag[j])), 1),
        }
        for j, layer in enumerate(layers)
    }


def logreg_scores(
    name: str, X: np.ndarray, splits: dict, cfg, rows: np.ndarray | None = None
) -> Scores:
    """LogRegHead (C chosen on validation, as llmembed's logreg) on our own features, per split;
    with `rows`, on those rows of every split only (X then holds one row per entry of `rows`, or
    per split a matrix of its own: {seed: X})."""
    from sklearn.metrics import accuracy_score, f1_score

    per, fit_s = {}, 0.0
    for seed, ds in splits.items():
        split, labels = ds.split, ds.labels
        if rows is not None:
            split, labels = split[rows], labels[rows]
        Xs = X[seed] if isinstance(X, dict) else X
        tr, va, te = (split == SPLIT_CODES[p] for p in ("train", "validation", "test"))
        t = time.perf_counter()
        head = LogRegHead(
            Cs=tuple(cfg.head.params.Cs), max_iter=int(cfg.head.params.max_iter), random_state=seed
        )
        with head_threads(cfg):
            head.fit(Xs[tr], labels[tr], validation=(Xs[va], labels[va]))
        fit_s += time.perf_counter() - t
        per[seed] = {}
        for part, mask in (("validation", va), ("test", te)):
            pred = head.predict(Xs[mask])
            per[seed][part] = {
                "accuracy": float(accuracy_score(labels[mask], pred)),
                "macro_f1": float(f1_score(labels[mask], pred, average="macro", zero_division=0)),
            }
    scores = Scores(name, per, {"fit_s": round(fit_s, 2)})
    log.info(
        "%s: validation %.4f test %.4f (%.1f s)",
        name,
        summary_of(scores, "validation")["accuracy"]["mean"],
        summary_of(scores)["accuracy"]["mean"],
        fit_s,
    )
    return scores


def run_dataset(cfg) -> dict:
    r = cfg.results.recipe
    seeds = seeds_of(cfg)
    splits = split_datasets(cfg)
    states, info = custom_states(cfg, next(iter(splits.values())))
    layers = [int(x) for x in r.layers]
    last_idx = [layers.index(int(x)) for x in r.last]
    info["massive_dimensions"] = massive_dimensions(states["masked"], layers)
    rows: dict[str, dict] = {}
    for variant, (_, label) in VARIANTS.items():
        X = states[variant]
        last5 = logreg_scores(f"{variant}:last5-mean", X[:, last_idx].mean(1), splits, cfg)
        singles = [
            logreg_scores(f"{variant}:L{layer}", X[:, j], splits, cfg)
            for j, layer in enumerate(layers)
        ]
        picks = {s: choose(singles, s) for s in seeds}
        rows[f"pooling: {label}; last five layers, mean"] = {
            "test": summary_of(last5),
            "validation": summary_of(last5, "validation"),
            "variant": variant,
            "fit_s": last5.info["fit_s"],
        }
        rows[f"pooling: {label}; best single layer on validation"] = {
            "test": chosen_test(picks),
            "variant": variant,
            "chosen_per_split": {s: picks[s].name for s in seeds},
            "candidates": len(singles),
            "fit_s": round(sum(x.info["fit_s"] for x in singles), 2),
        }
    rows.update(paper_length_rows(cfg, splits, states, last_idx))

    run_dir = Path(cfg.results.run_dir) / "recipe" / cfg.dataset.name
    smol_last = {
        "backbone": "smollm2",
        "layers": [int(x) for x in r.last],
        "pooling": "mean",
        "role": "llm",
    }
    for fusion, label in (
        ("mean", "the paper's last five layers, mean"),
        ("concat", "the paper's last five layers, concatenated"),
    ):
        c = with_changes(cfg, **{"features.sources": [smol_last], "features.fusion": fusion})
        s = classify(c, run_dir / f"last5-{fusion}", label)
        rows[f"layers: {label} (llmembed, logreg)"] = {
            "test": summary_of(s),
            "validation": summary_of(s, "validation"),
            "info": s.info,
        }

    rows.update(head_rows(cfg, seeds, run_dir, smol_last))
    return {"dataset": cfg.dataset.name, "rows": rows, "custom_extraction": info}


def paper_length_rows(cfg, splits: dict, states: dict, last_idx: list[int]) -> dict[str, dict]:
    """The paper's code at its own pad lengths (`results.recipe.paper_pad`, e.g. MR: training
    rows padded to 3,000 tokens, test rows to 1,500; validation rows, which it has none of, as
    test), BOS in front and pads in the mean, last five layers averaged. A pass over 3,000
    positions costs about 50 MR snippets' worth, so it runs on a seeded subset of `rows` rows; the
    same rows under the data set's `pad_to` and under llmembed's pooling are scored beside it, on
    every split, so the three are paired."""
    spec = cfg.results.recipe.paper_pad.get(cfg.dataset.name)
    if not spec:
        return {}
    ds = next(iter(splits.values()))
    n = min(int(spec.rows), len(ds))
    subset = np.sort(np.random.default_rng(0).choice(len(ds), size=n, replace=False))
    texts = [ds.texts[i] for i in subset]
    long = {
        part: stored_states(cfg, texts, f"{ds.name}-subset{n}", int(spec[part]), ("bos",))[0][
            "padded_bos"
        ][:, last_idx]
        .astype(np.float32)
        .mean(1)
        for part in ("train", "test")
    }
    X = {  # per split: training rows at the training length, the others at the test length
        seed: np.where(
            (d.split[subset] == SPLIT_CODES["train"])[:, None], long["train"], long["test"]
        )
        for seed, d in splits.items()
    }
    where = f"a {n:,}-row subset (the same rows in every split)"
    out = {}
    for label, features in (
        (
            f"BOS in front, mean over the paper's padded lengths (training {spec.train}, "
            f"validation and test {spec.test} tokens)",
            X,
        ),
        (
            "BOS in front, mean over the padded length (the paper's code) at "
            f"{int(cfg.results.recipe.pad_to[ds.name])} tokens",
            states["padded_bos"][subset][:, last_idx].mean(1),
        ),
        ("mask-aware mean, no BOS (llmembed)", states["masked"][subset][:, last_idx].mean(1)),
    ):
        s = logreg_scores(f"paper lengths: {label}", features, splits, cfg, rows=subset)
        out[f"pooling on {where}: {label}; last five layers, mean"] = {
            "test": summary_of(s),
            "validation": summary_of(s, "validation"),
            "rows": n,
            "fit_s": s.info["fit_s"],
        }
    return out


def head_rows(cfg, seeds: list[int], run_dir: Path, smol_last: dict) -> dict[str, dict]:
    """The co-occurrence heads of `results.recipe.heads` on the paper's features, σ chosen on
    validation per split for each. Each fit is a finished run in `run_dir` that any later process
    reuses, so a second process may fit the splits from the other end (`seeds` reversed) to share
    the work."""
    r, rows = cfg.results.recipe, {}
    sources = [smol_last, {**dict(r.encoder), "role": "encoder"}]
    for tag, spec in r.heads.items():
        params = {f"head.params.{k}": v for k, v in spec.params.items()}
        picks, looked_at = {}, {}
        for seed in seeds:
            cands = []
            for sigma in r.sigmas:
                c = with_changes(
                    cfg,
                    **{
                        "seeds": [seed],
                        "head": head_config("llmembed"),
                        "features.sources": sources,
                        "features.fusion": "cooccurrence",
                        "head.params.sigma": float(sigma),
                        **params,
                    },
                )
                cands.append(
                    classify(c, run_dir / f"s{seed}" / f"head-{tag}-s{sigma}", f"{tag} σ={sigma}")
                )
            picks[seed], looked_at[seed] = choose(cands, seed), cands
        rows[f"head: {spec.label}, σ on validation; SmolLM2 last five + MiniLM L6"] = {
            "test": chosen_test(picks),
            "chosen_per_split": {s: picks[s].name for s in seeds},
            "info": {s: picks[s].info for s in seeds},
            "candidates": len(r.sigmas),
            "selection": {s: selection(looked_at[s]) for s in seeds},
        }
    return rows


def main(argv: list[str]) -> None:
    setup_logging()
    cfgs = experiment_cfgs(EXPERIMENT, argv)
    out_dir = Path(cfgs[0].results.out_dir)
    result = {**header(cfgs[0], EXPERIMENT, MODULE, argv), "datasets": {}}
    result = continue_result(out_dir / "recipe.json", result)
    for cfg in cfgs:  # the logistic regressions below are built from head.params
        check_head(cfg.head.params, seeds_of(cfg))
    for cfg in cfgs:
        pre_extract(cfg, argv, ["smollm2", "minilm"])
        result["datasets"][cfg.dataset.name] = run_dataset(cfg)
        write_json(out_dir / "recipe.json", finish(result))


if __name__ == "__main__":
    run_main(main)
