"""One way to turn texts into stored-precision embeddings: load the plan's model, then embed. Used by
the extraction pipeline (once per job, then shard by shard) and by `predict` on new texts."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from llmembed.extract.backbones import load_model, load_tokenizer
from llmembed.extract.embedder import Extractor
from llmembed.extract.plan import ExtractPlan, resolve_token_budget
from llmembed.extract.stats import EmbedStats

log = logging.getLogger(__name__)


# Who lends a loaded model to `load_embedder` (an `llmembed.Encoder`, for its own computation).
_lenders = threading.local()


@contextmanager
def lending(lender: Callable[[ExtractPlan, str], Extractor | None]) -> Iterator[None]:
    """While inside, `load_embedder(plan, device)` first asks `lender(plan, device)` for an
    extractor and loads the model only where it returns None: an `llmembed.Encoder` keeps its
    model loaded across calls of the cache-backed path, which loads through here."""
    stack = _lenders.__dict__.setdefault("stack", [])
    stack.append(lender)
    try:
        yield
    finally:
        stack.remove(lender)


def load_embedder(plan: ExtractPlan, device: str) -> tuple[Extractor, float]:
    """The plan's model (cut after its deepest stored layer) and tokenizer, ready to embed, and
    the seconds loading took: a model lent by `lending` (0 s), else `fresh_embedder`."""
    for lender in reversed(_lenders.__dict__.get("stack", [])):
        if (lent := lender(plan, device)) is not None:
            return lent, 0.0
    return fresh_embedder(plan, device)


def fresh_embedder(
    plan: ExtractPlan, device: str, *, keep_converted: bool = True
) -> tuple[Extractor, float]:
    """Load the plan's model and tokenizer. `keep_converted=False` writes nothing: a GGUF
    backbone is de-quantized in memory instead of into the cache root's `converted/`."""
    if not (plan.progress and sys.stderr.isatty()):
        # transformers' own bars (loading weights, de-quantizing GGUF) follow the same rule as ours
        hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    # A GGUF backbone is de-quantized once into the cache root and read from there afterwards.
    # None (keep_converted=False): de-quantized in memory, nothing written under the cache root.
    root = {
        "cache_root": plan.cache_root if keep_converted else None,
        "group_writable": plan.group_writable,
    }
    with _quiet_load_report():
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


class _OnlyUnexpected(logging.Filter):
    """Drops transformers' LOAD REPORT when every key it lists is UNEXPECTED: the layers after
    the deepest one requested (the model is built cut) and a language-model head (the base model
    is loaded). A report of missing, mismatched or unconverted weights still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "LOAD REPORT" not in text:
            return True
        return any(s in text for s in ("MISSING", "MISMATCH", "CONVERSION", "ERROR"))


@contextmanager
def _quiet_load_report() -> Iterator[None]:
    logger = logging.getLogger("transformers.modeling_utils")
    only_unexpected = _OnlyUnexpected()
    logger.addFilter(only_unexpected)
    try:
        yield
    finally:
        logger.removeFilter(only_unexpected)


def embed_texts(
    plan: ExtractPlan, texts: list[str], device: str
) -> tuple[dict[str, np.ndarray], EmbedStats]:
    """{pooling: (len(texts), layers, hidden)} in the store dtype, computed exactly as the cache
    computes them, without touching the cache."""
    extractor, seconds = load_embedder(plan, device)
    emb, stats = extractor.embed(texts)
    stats.load_seconds = seconds
    return emb, stats
