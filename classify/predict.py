"""Label new texts with a saved model: run the needed extraction in memory, fuse, predict."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from llmembed.cache.store import STORE_DTYPES
from llmembed.classify.saved import load_trained
from llmembed.extract.backbones import inspect_backbone, load_model, load_tokenizer
from llmembed.extract.embedder import Extractor
from llmembed.extract.pipeline import COMPUTE_DTYPES, resolve_device, resolve_token_budget
from llmembed.fuse.features import fuse_blocks

log = logging.getLogger(__name__)


def embed_source(source: dict, texts: list[str], device: str) -> list[np.ndarray]:
    """One block (n, hidden) per layer of a saved source, computed exactly as the cache did."""
    bb = OmegaConf.create(source["backbone"])
    spec = source["spec"]
    info = inspect_backbone(bb, None)
    layers, pooling = source["layers"], source["pooling"]
    depth = info.num_layers if pooling == "pooler" else max(layers)
    model = load_model(
        bb, info, depth=depth, dtype=COMPUTE_DTYPES[spec["compute_dtype"]], device=device
    )
    extractor = Extractor(
        model,
        load_tokenizer(bb, info),
        layers=layers,
        poolings=[pooling],
        max_length=spec["max_length"],
        prompt=spec["prompt"],
        truncation_side=spec["truncation_side"],
        padding_side=bb.padding_side,
        token_budget=resolve_token_budget("auto", device, info),
        device=str(model.get_input_embeddings().weight.device),
        # Training read these numbers from the cache at its storage precision: round the same way.
        out_dtype=STORE_DTYPES[spec["store_dtype"]],
    )
    values = extractor.embed(texts)[0][pooling].astype(np.float32)  # (n, layers, hidden)
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
