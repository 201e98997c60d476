"""Label new texts with a saved model: run the needed extraction in memory, fuse, predict.

A model folder may come from a colleague's machine: every backbone is found on this machine (a
shipped one by its conf name, any other by its recorded path or `--backbone-path NAME=PATH`) and its
weights are checked against the identity recorded at training time before they are used. Code
shipped with a model runs only when the user passes `--trust-remote-code`, never because
model.json says so.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llmembed.cache.format import EntrySpec
from llmembed.cache.root import Cache
from llmembed.classify.saved import SavedModelError, load_trained
from llmembed.configs import ConfigNameError, is_name, named_backbone
from llmembed.extract.backbones import BackboneError, BackboneInfo, inspect_backbone, resolve_source
from llmembed.extract.embed import embed_texts
from llmembed.extract.plan import BackboneRef, ExtractPlan, check_device, resolve_device
from llmembed.fuse.features import fuse_blocks

log = logging.getLogger(__name__)


def default_memo() -> Path:
    """Remembered weight hashes of the user's cache root, so that checking a big local model's
    identity reads its files once, not at every prediction."""
    return Cache(os.environ.get("LLMEMBED_CACHE", "~/.cache/llmembed")).hash_memo()


def resolve_backbone(source: dict, *, paths: dict[str, str], trust_remote_code: bool) -> DictConfig:
    """The backbone config of a saved source on this machine."""
    bb = dict(source["backbone"])
    name = bb["name"]
    if name in paths:
        bb["path"] = paths[name]
    elif bb.get("conf") is not None:
        if not is_name(bb["conf"]):
            raise SavedModelError(
                f"model.json names backbone {name!r}'s config {bb['conf']!r}, which is not a "
                "config name (a path is never read from a model); restore the original "
                f"model.json, or pass --backbone-path {name}=PATH"
            )
        try:
            bb["path"] = str(named_backbone(bb["conf"]).path)
        except (ConfigNameError, FileNotFoundError, OmegaConfBaseException) as err:
            raise SavedModelError(
                f"backbone {name!r} (conf {bb['conf']!r}) is not available here ({err}); "
                f"pass --backbone-path {name}=PATH"
            ) from None
    if bb.get("trust_remote_code") and not trust_remote_code:
        raise SavedModelError(
            f"backbone {name!r} was trained with trust_remote_code, which runs the Python files "
            f"shipped with the model at {bb['path']}{_python_files(bb['path'])}. Read them, then "
            "pass --trust-remote-code if you trust them"
        )
    bb["trust_remote_code"] = trust_remote_code
    bb.pop("conf", None)
    return OmegaConf.create(bb)


def _python_files(path: str) -> str:
    folder = Path(path).expanduser()
    found = sorted(p.name for p in folder.glob("*.py")) if folder.is_dir() else []
    return f" ({', '.join(found)})" if found else ""


def check_identity(name: str, path: str, saved: dict, found: dict) -> None:
    """Refuse weights other than those the model was trained on."""
    if saved == found:
        return
    if "files" in saved and "files" in found:
        changed = sorted(
            f
            for f in set(saved["files"]) | set(found["files"])
            if saved["files"].get(f) != found["files"].get(f)
        )
        what = f"files that differ: {changed[:5]}"
    else:
        what = f"trained on {saved}, found {found}"
    raise SavedModelError(
        f"backbone {name!r} at {path} is not the one this model was trained on ({what}); point "
        f"--backbone-path {name}=PATH at the original weights, or pass --allow-other-weights to "
        "predict with these anyway (predictions may be wrong)"
    )


def inspect_source(source: dict, bb: DictConfig, *, allow_other_weights: bool) -> BackboneInfo:
    """The backbone of a saved source on this machine, checked against what model.json asks of it
    (its weights, layers, pooling) before any weights are loaded."""
    try:
        resolve_source(bb.path)
    except BackboneError as err:
        raise SavedModelError(
            f"{err}; on this machine, pass --backbone-path {bb.name}=PATH"
        ) from None
    info = inspect_backbone(bb, default_memo())
    if not allow_other_weights:
        check_identity(bb.name, bb.path, source["identity"], info.identity)
    layers, pooling = source["layers"], source["pooling"]
    bad = [x for x in layers if not isinstance(x, int) or not 0 <= x <= info.num_layers]
    if not layers or bad or pooling not in info.poolings:
        raise SavedModelError(
            f"model.json asks {bb.name} for layers {layers} and pooling {pooling!r}, but it has "
            f"hidden states 0-{info.num_layers} and poolings {list(info.poolings)}"
        )
    return info


def source_plan(source: dict, bb: DictConfig, info: BackboneInfo, device: str) -> ExtractPlan:
    """The plan that computes a saved source's layers as training read them from the cache (the
    entry spec: dtypes, max length, prompt, storage rounding), storing only its layers and pooling."""
    spec = EntrySpec.from_dict(source["spec"])
    layers, pooling = tuple(source["layers"]), source["pooling"]
    return ExtractPlan(
        backbone=BackboneRef.from_config(bb),
        info=info,
        spec=spec,
        read_specs=(spec,),
        layers=layers,
        poolings=(pooling,),
        need_layers=layers,
        need_poolings=(pooling,),
        device=device,
        token_budget="auto",
        shard_mb=64.0,
        progress=False,
        # Predict computes in memory; the cache root only keeps a GGUF backbone's converted copy.
        cache_root=default_memo().parent,
    )


def embed_source(
    source: dict, texts: list[str], device: str, bb: DictConfig, info: BackboneInfo
) -> list[np.ndarray]:
    """One block (n, hidden) per layer of a saved source, computed exactly as the cache did."""
    emb, _ = embed_texts(source_plan(source, bb, info, device), texts, device)
    values = emb[source["pooling"]].astype(np.float32)  # (n, layers, hidden)
    return [values[:, j] for j in range(values.shape[1])]


def expected_features(meta: dict, infos: list[BackboneInfo]) -> int:
    """The width of the fused features the sources give, as the head must have been trained on."""
    widths = [
        info.hidden_size * (1 if meta["fusion"] == "mean" else len(s["layers"]))
        for s, info in zip(meta["sources"], infos, strict=True)
    ]
    return sum(widths)


def predict_texts(
    model_dir: Path,
    texts: list[str],
    *,
    device: str = "auto",
    backbone_paths: dict[str, str] | None = None,
    trust_remote_code: bool = False,
    allow_other_weights: bool = False,
) -> tuple[list[str], np.ndarray, list[str]]:
    """(predicted label names, class probabilities (n, classes), label names)."""
    device = resolve_device(check_device(device, "device"))
    head, meta = load_trained(model_dir, device)
    names = [s["backbone"]["name"] for s in meta["sources"]]
    stray = sorted(set(backbone_paths or {}) - set(names))
    if stray:  # a misspelled NAME would leave the model's backbone at its recorded path
        raise SavedModelError(
            f"--backbone-path {stray[0]}=...: the model has no backbone {stray[0]!r}; "
            f"its backbones: {', '.join(names)}"
        )
    # Every backbone is found and checked before the first model is loaded.
    backbones = [
        resolve_backbone(s, paths=backbone_paths or {}, trust_remote_code=trust_remote_code)
        for s in meta["sources"]
    ]
    infos = [
        inspect_source(s, bb, allow_other_weights=allow_other_weights)
        for s, bb in zip(meta["sources"], backbones, strict=True)
    ]
    width = expected_features(meta, infos)
    if width != head.n_features_in_:
        raise SavedModelError(
            f"{model_dir}: its sources give {width} features but the head takes "
            f"{head.n_features_in_}; the backbones differ from training (check --backbone-path)"
        )
    blocks, owners = [], []
    with torch.inference_mode():
        for i, (source, bb, info) in enumerate(zip(meta["sources"], backbones, infos, strict=True)):
            new = embed_source(source, texts, device, bb, info)
            blocks += new
            owners += [i] * len(new)
    proba = head.predict_proba(fuse_blocks(blocks, owners, meta["fusion"]))
    names = meta["label_names"]
    # head.classes_ are label indices seen in training; map columns back to names.
    columns = [names[int(c)] for c in head.classes_]
    return [columns[i] for i in proba.argmax(axis=1)], proba, columns
