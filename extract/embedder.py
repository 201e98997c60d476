"""The forward-pass loop: tokenize, sort by length, batch by a token budget, pool every layer."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from llmembed.extract.pooling import first_token_index, pool_layers

log = logging.getLogger(__name__)


@dataclass
class EmbedStats:
    texts: int = 0
    tokens: int = 0  # real tokens fed to the model
    padded_tokens: int = 0  # tokens including padding
    truncated: int = 0  # texts cut at max_length
    seconds: float = 0.0  # tokenizing and forward passes
    load_seconds: float = 0.0  # loading the model and tokenizer (set by the pipeline)
    oom_retries: int = 0
    forward_calls: int = 0

    def add(self, other: EmbedStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Extractor:
    """Runs a loaded model over texts and returns pooled hidden states of the requested layers."""

    model: torch.nn.Module
    tokenizer: object
    layers: list[int]  # hidden-state indices to keep, 0 = embeddings
    poolings: list[str]
    max_length: int
    prompt: str = "{text}"
    truncation_side: str = "right"
    padding_side: str = "right"
    token_budget: int = 16384  # padded tokens per forward batch; halved on out-of-memory
    device: str = "cpu"
    # The returned arrays' dtype: the store dtype (a float16 shard takes half the memory).
    out_dtype: type = np.float32
    _kwargs: dict = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        assert self.padding_side in ("left", "right"), self.padding_side
        accepted = inspect.signature(self.model.forward).parameters
        # Positions from the mask make left padding safe; no KV cache is wanted for one pass.
        self._positions = "position_ids" in accepted
        if "use_cache" in accepted:
            self._kwargs["use_cache"] = False
        self.tokenizer.truncation_side = self.truncation_side
        vocab = self.model.get_input_embeddings().num_embeddings
        if len(self.tokenizer) > vocab:
            raise ValueError(
                f"the tokenizer has {len(self.tokenizer)} tokens but the model embeds only {vocab}: "
                "they do not belong together; check backbone.tokenizer"
            )

    def tokenize(self, texts: list[str]) -> tuple[list[list[int]], int]:
        """Token ids per text (truncated to max_length) and how many texts were truncated."""
        enc = self.tokenizer(
            [self.prompt.replace("{text}", t) for t in texts],
            truncation=True,
            max_length=self.max_length,
            return_overflowing_tokens=True,
            return_attention_mask=False,
        )
        # Overflow pieces of a truncated text follow its first piece; keep that first piece only.
        owner = enc["overflow_to_sample_mapping"]
        ids: list[list[int]] = [None] * len(texts)  # type: ignore[list-item]
        for piece, row in zip(enc["input_ids"], owner, strict=True):
            if ids[row] is None:
                ids[row] = piece
        return ids, int((np.bincount(owner, minlength=len(texts)) > 1).sum())

    def embed(
        self, texts: list[str], on_batch: Callable[[int, int], None] | None = None
    ) -> tuple[dict[str, np.ndarray], EmbedStats]:
        """{pooling: (len(texts), layers, hidden) of `out_dtype`} in the order of `texts`."""
        start = time.perf_counter()
        ids, truncated = self.tokenize(texts)
        stats = EmbedStats(texts=len(texts), truncated=truncated)
        lengths = np.array([len(x) for x in ids])
        order = np.argsort(
            -lengths, kind="stable"
        )  # longest first: an out-of-memory shows up early
        out: dict[str, np.ndarray] = {}
        i = 0
        while i < len(order):
            width = int(lengths[order[i]])
            batch = order[i : i + max(1, self.token_budget // width)]
            try:
                pooled = self._forward([ids[k] for k in batch])
            except torch.OutOfMemoryError:
                if len(batch) == 1:
                    raise RuntimeError(
                        f"out of memory on a single text of {width} tokens; lower "
                        "extract.max_length or use a device with more memory"
                    ) from None
                self.token_budget = max(1, self.token_budget // 2)
                stats.oom_retries += 1
                log.warning(
                    "out of memory on a batch of %d x %d tokens; token budget halved to %d",
                    len(batch),
                    width,
                    self.token_budget,
                )
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            for name, values in pooled.items():
                if name not in out:
                    out[name] = np.empty((len(texts), *values.shape[1:]), dtype=self.out_dtype)
                out[name][batch] = values
            real = int(lengths[batch].sum())
            stats.tokens += real
            stats.padded_tokens += len(batch) * width
            stats.forward_calls += 1
            i += len(batch)
            if on_batch is not None:
                on_batch(len(batch), real)
        stats.seconds = time.perf_counter() - start
        return out, stats

    @torch.inference_mode()
    def _forward(self, seqs: list[list[int]]) -> dict[str, np.ndarray]:
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            span = (
                slice(width - len(seq), width)
                if self.padding_side == "left"
                else slice(0, len(seq))
            )
            input_ids[row, span] = torch.tensor(seq)
            mask[row, span] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        kwargs = dict(self._kwargs)
        if self._positions:
            kwargs["position_ids"] = (mask.cumsum(dim=1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids, attention_mask=mask, output_hidden_states=True, **kwargs
        )
        pooled = pool_layers(
            [out.hidden_states[layer] for layer in self.layers], mask, self.poolings
        )
        if "pooler" in self.poolings:
            # The model's pooler reads position 0, which is padding under left padding: hand it the
            # first real token of the last layer instead.
            last = out.hidden_states[-1]
            first = last[torch.arange(len(seqs), device=last.device), first_token_index(mask)]
            pooled["pooler"] = self.model.pooler(first[:, None, :]).float()[:, None, :]  # (B, 1, H)
        return {name: t.cpu().numpy() for name, t in pooled.items()}
