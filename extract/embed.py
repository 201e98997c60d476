"""One way to turn texts into stored-precision embeddings: load the plan's model, then embed. Used by
the extraction pipeline (once per job, then shard by shard) and by `predict` on new texts."""

from __future__ import annotations

import logging
import sys
import time

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from llmembed.extract.backbones import load_model, load_tokenizer
from llmembed.extract.embedder import Extractor
from llmembed.extract.plan import ExtractPlan, resolve_token_budget
from llmembed.extract.stats import EmbedStats

log = logging.getLogger(__name__)


def load_embedder(plan: ExtractPlan, device: str) -> tuple[Extractor, float]:
    """The plan's model (cut after its deepest stored layer) and tokenizer, ready to embed; and the
    seconds loading took."""
    if not (plan.progress and sys.stderr.isatty()):
        # transformers' own bars (loading weights, de-quantizing GGUF) follow the same rule as ours
        hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    # A GGUF backbone is de-quantized once into the cache root and read from there afterwards.
    root = {"cache_root": plan.cache_root, "group_writable": plan.group_writable}
    model = load_model(
        plan.backbone,
        plan.info,
        depth=plan.depth,
        dtype=getattr(torch, plan.spec.compute_dtype),
        device=device,
        **root,
    )
    tokenizer = load_tokenizer(plan.backbone, plan.info, **root)  # after the model
    seconds = time.perf_counter() - t0
    log.info(
        "loaded %s (%d of %d layers) and its tokenizer in %.1f s",
        plan.backbone.name,
        plan.depth,
        plan.info.num_layers,
        seconds,
    )
    extractor = Extractor(
        model,
        tokenizer,
        layers=list(plan.layers),
        poolings=list(plan.poolings),
        max_length=plan.spec.max_length,
        prompt=plan.spec.prompt,
        truncation_side=plan.spec.truncation_side,
        padding_side=plan.backbone.padding_side,
        token_budget=resolve_token_budget(plan.token_budget, device, plan.info),
        device=str(model.get_input_embeddings().weight.device),
        # The store's precision: what training read from the cache is what predict computes.
        out_dtype=getattr(torch, plan.spec.store_dtype),
    )
    return extractor, seconds


def embed_texts(
    plan: ExtractPlan, texts: list[str], device: str
) -> tuple[dict[str, np.ndarray], EmbedStats]:
    """{pooling: (len(texts), layers, hidden)} in the store dtype, computed exactly as the cache
    computes them, without touching the cache."""
    extractor, seconds = load_embedder(plan, device)
    emb, stats = extractor.embed(texts)
    stats.load_seconds = seconds
    return emb, stats
