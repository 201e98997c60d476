"""Label new texts with a saved model: embed them exactly as the cache did, fuse, predict."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from llmembed.cache.store import EntrySpec
from llmembed.classify.saved import load_trained
from llmembed.extract.backbones import inspect_backbone
from llmembed.extract.embed import embed_texts
from llmembed.extract.plan import BackboneRef, ExtractPlan, resolve_device
from llmembed.fuse.features import fuse_blocks

log = logging.getLogger(__name__)


class ModelMismatchError(ValueError):
    """The backbone a saved model names is no longer the one it was trained on."""


def source_plan(source: dict, device: str = "auto") -> ExtractPlan:
    """The plan that computes a saved source's layers: the entry spec it was trained on (weights'
    identity, dtypes, max length, prompt, storage rounding), storing only its layers and pooling."""
    ref = BackboneRef.from_config(source["backbone"])
    spec = EntrySpec.from_dict(source["spec"])
    info = inspect_backbone(ref, None)
    if info.identity != spec.backbone:
        raise ModelMismatchError(
            f"the weights at {ref.path} are not those the model was trained on (their hashes "
            "differ); point the saved model.json's backbone path at the original weights"
        )
    layers, pooling = tuple(source["layers"]), source["pooling"]
    return ExtractPlan(
        backbone=ref,
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
        cache_root=Path("."),  # predict computes in memory and never touches the cache
    )


def embed_source(source: dict, texts: list[str], device: str) -> list[np.ndarray]:
    """One block (n, hidden) per layer of a saved source, computed exactly as the cache did."""
    plan = source_plan(source, device)
    emb, _ = embed_texts(plan, texts, device)
    values = emb[source["pooling"]].astype(np.float32)  # (n, layers, hidden)
    return [values[:, j] for j in range(values.shape[1])]


def predict_texts(
    model_dir: Path, texts: list[str], *, device: str = "auto"
) -> tuple[list[str], np.ndarray, list[str]]:
    """(predicted label names, class probabilities (n, classes), label names)."""
    head, meta = load_trained(model_dir)
    device = resolve_device(device)
    blocks, owners = [], []
    with torch.inference_mode():
        for i, source in enumerate(meta["sources"]):
            new = embed_source(source, texts, device)
            blocks += new
            owners += [i] * len(new)
    proba = head.predict_proba(fuse_blocks(blocks, owners, meta["fusion"]))
    names = meta["label_names"]
    # head.classes_ are label indices seen in training; map columns back to names.
    columns = [names[int(c)] for c in head.classes_]
    return [columns[i] for i in proba.argmax(axis=1)], proba, columns
