"""A trained model as a folder: `model.json` (head parameters, feature spec, label names, backbone
identities and extraction settings), `head.safetensors` (weights) and `README.md` (a model card).
Nothing is pickled.

`head.safetensors` also carries, in its metadata, the part of model.json that gives its weights a
meaning (label names, sources, fusion, head parameters): a model.json edited afterwards (labels
swapped, layers changed) no longer matches its weights and is refused instead of predicting wrongly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from llmembed.cache.keys import short_identity
from llmembed.classify.heads import HEADS
from llmembed.errors import UserError

# 2: sources record the backbone's identity, its conf name and role; the weights carry the contract.
# 3: the contract covers each source's backbone name, config name and padding side as well.
FORMAT = 3
# What of a source's backbone decides the computation (its path and revision may differ per
# machine: the identity, checked before use, pins the weights).
CONTRACT_BACKBONE = ("name", "conf", "padding_side")
CONTRACT_KEY = "llmembed.contract"


class SavedModelError(UserError):
    """A model folder cannot be used as it is; the message says why and what to do."""


def _contract(meta: dict) -> dict:
    """What the weights mean: everything that decides the computation, but the backbones'
    locations, which may differ per machine."""
    return {
        "head": meta["head"],
        "params": meta["params"],
        "label_names": meta["label_names"],
        "fusion": meta["fusion"],
        "sources": [
            {
                **{k: s[k] for k in ("identity", "role", "layers", "pooling", "spec")},
                "backbone": {k: s["backbone"].get(k) for k in CONTRACT_BACKBONE},
            }
            for s in meta["sources"]
        ],
    }


def save_trained(
    folder: Path,
    head,
    *,
    head_name: str,
    info: dict,
    metrics: dict | None = None,
    group_writable: bool = False,
) -> Path:
    """Write the model folder; with the run's `metrics`, its model card (README.md) as well."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = json.loads(
        json.dumps(
            {"format": FORMAT, "head": head_name, "params": head.get_params(), **info},
            default=_jsonable,
        )
    )
    state = {k: np.ascontiguousarray(v) for k, v in head.state().items()}
    contract = json.dumps(_contract(meta), sort_keys=True)
    save_file(state, str(folder / "head.safetensors"), metadata={CONTRACT_KEY: contract})
    (folder / "model.json").write_text(json.dumps(meta, indent=2))
    written = [folder / "head.safetensors", folder / "model.json"]
    if metrics is not None:
        written.append(write_model_card(folder, meta, metrics))
    # Readable by whoever the model is handed to (safetensors writes 0600); on a shared node with
    # `cache.group_writable`, writable by the group as well.
    mode = 0o664 if group_writable else 0o644
    for path in written:
        path.chmod(mode)
    return folder


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot save {type(value).__name__} in model.json")


def load_trained(folder: Path, device: str = "cpu"):
    """(head, meta) from a folder written by `save_trained`, after checking that model.json still
    matches the weights. A torch head runs on `device`, not on the one it was trained on: where a
    model runs is the loader's choice (a model trained on a GPU node predicts on a laptop)."""
    folder = Path(folder)
    meta_path, weights = folder / "model.json", folder / "head.safetensors"
    if not meta_path.is_file():
        raise SavedModelError(f"{folder} is not a saved llmembed model (no model.json)")
    if not weights.is_file():
        raise SavedModelError(f"{folder} has no head.safetensors; copy the whole folder")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # not JSON, not UTF-8, nested beyond reason
        what = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise SavedModelError(
            f"{meta_path} is not valid JSON ({what}); copy the folder again"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise SavedModelError(
            f"{folder}: model format {found}, this llmembed reads format {FORMAT}; "
            "train the model again with this version"
        )
    check_contract(meta, weights)
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["params"].items()}
    if "device" in params:  # loaded on the CPU first: a failure then is the weights', not the GPU's
        params["device"] = "cpu"
    try:
        head = HEADS[meta["head"]](**params).load_state(load_file(str(weights)))
    except (KeyError, ValueError, RuntimeError, TypeError, SafetensorError) as err:
        raise SavedModelError(f"{weights} does not fit the head in {meta_path} ({err})") from None
    if "device" in params and device != "cpu":
        try:
            head.moved_to(device)
        except RuntimeError as err:  # a GPU out of memory, or gone since it was checked
            raise SavedModelError(
                f"the head in {folder} could not move to {device} ({err})"
            ) from None
    n_classes = len(meta["label_names"])
    if len(set(meta["label_names"])) != n_classes or not np.all(
        (head.classes_ >= 0) & (head.classes_ < n_classes)
    ):
        raise SavedModelError(
            f"{meta_path}: label_names {meta['label_names']} do not fit the head's classes "
            f"{head.classes_.tolist()}"
        )
    return head, meta


def check_contract(meta: dict, weights: Path) -> None:
    """model.json must say what the weights were trained with."""
    try:
        with safe_open(str(weights), framework="numpy") as f:
            stored = (f.metadata() or {}).get(CONTRACT_KEY)
        written = _contract(meta)
        stored = None if stored is None else json.loads(stored)
    except (
        OSError,
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
        RecursionError,
        SafetensorError,
    ) as err:
        # an unreadable, empty or truncated file, a link to something else, a missing field
        raise SavedModelError(
            f"{weights.parent} is damaged or incomplete ({type(err).__name__}: {err}); copy the "
            "whole folder again or train the model again"
        ) from None
    if stored is None:
        raise SavedModelError(f"{weights} carries no llmembed contract; train the model again")
    if stored != written:
        changed = [
            k for k in written if not isinstance(stored, dict) or stored.get(k) != written[k]
        ]
        raise SavedModelError(
            f"{weights.parent / 'model.json'} was edited after training: {changed} no longer match "
            "the weights in head.safetensors; restore the original model.json"
        )


def write_model_card(folder: Path, meta: dict, metrics: dict) -> Path:
    """README.md beside the weights: what the model is, how well it did, how to run it."""
    data = metrics["data"]
    test = metrics["test"]
    acc, f1 = test["accuracy"], test["macro_f1"]
    lines = [
        # The hub reads this header: what library and task the repo is, and its headline scores.
        "---",
        "library_name: llmembed",
        "pipeline_tag: text-classification",
        "tags: [llmembed, text-classification, frozen-backbone]",
        "model-index:",
        f"- name: {json.dumps(data['name'] + ' ' + meta['head'])}",
        "  results:",
        "  - task: {type: text-classification}",
        f"    dataset: {{name: {json.dumps(data['name'])}, type: {json.dumps(data['name'])}}}",
        "    metrics:",
        f"    - {{type: accuracy, value: {acc['mean']:.4f}}}",
        f"    - {{type: f1, name: macro-F1, value: {f1['mean']:.4f}}}",
        "---",
        "",
        f"# llmembed model: {data['name']}",
        "",
        f"A `{meta['head']}` head on frozen-backbone features ({meta['fusion']} fusion), trained "
        "with llmembed (LLMEmbed, ACL 2024).",
        "",
        "| backbone | model (path or hub id) | identity | hidden | role | layers | pooling |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in meta["sources"]:
        bb = s["backbone"]
        lines.append(
            f"| {bb['name']} | `{bb.get('path')}` | {short_identity(s['identity'])} | "
            f"{s.get('hidden_size', '?')} | {s['role'] or '-'} | {s['layers']} | {s['pooling']} |"
        )
    lo, hi = acc["ci"]
    lines += [
        "",
        f"Data: `{data['name']}`"
        + (f" ({data['path']})" if data.get("path") else "")
        + f", {data['rows']} rows after dropping {data['duplicates_dropped']} duplicates; "
        f"labels {meta['label_names']}; split rows {metrics['rows']}.",
        "",
        f"Test accuracy **{acc['mean']:.4f}** (95% CI {lo:.4f}-{hi:.4f}), macro-F1 "
        f"{f1['mean']:.4f}, over {acc['n']} run(s) (seeds {metrics['seeds']}).",
        "",
        "Predict:",
        "",
        "```bash",
        "llmembed-predict path/to/this/folder texts.txt   # or .csv/.tsv/.jsonl/.parquet tables",
        "llmembed-predict owner/name texts.txt            # this folder pushed to the hub",
        "```",
        "",
        "A backbone not found at its recorded path is given with `--backbone-path NAME=PATH`; its "
        "weights are checked against the identity above before use.",
        "",
    ]
    path = Path(folder) / "README.md"
    path.write_text("\n".join(lines))
    return path
