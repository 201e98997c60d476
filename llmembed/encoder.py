"""`Encoder`: a backbone loaded once, encoding texts many times (through the cache, or not).

    import llmembed
    enc = llmembed.Encoder("minilm", layers=[4, -1], pooling="mean")
    x = enc.encode(["a fine film", "a dull one"])  # (2, 2, 384) float32
    v = enc.encode("one text")                      # (2, 384)

`llmembed.encode` is one call of a fresh Encoder; `llmembed.Features` and
`llmembed.mteb.LayerEncoder` keep one per source. The model is loaded at the first text the cache
lacks (`cache=True`) or at the first call (`cache=False`) and kept until `unload()`; a cache hit
loads nothing. With `cache=False` nothing is written anywhere: no entry, no hash memo, no
de-quantized copy of a GGUF backbone (which is then de-quantized in memory at load).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np

from llmembed.api import (
    SettingsError,
    absolute_layers,
    check_texts,
    layer_list,
    make_api_plan,
)

POOLINGS = ("mean", "last", "first", "pooler")


class Encoder:
    """Per-layer embeddings of `backbone` (a config name, a model folder, a .gguf file, a hub id or
    a mapping {name, path, ...}): `encode(texts)` gives `(len(texts), len(layers), hidden)`
    float32 in the order of `texts`, or `(len(layers), hidden)` for one string.

    `layers`: hidden states (0 = embeddings; negative count from the end). `pooling`: mean, last,
    first or pooler. `cache`: read and fill llmembed's cache (only texts it lacks run the model),
    or compute in memory and write nothing. `settings`: extraction settings by name, as
    `llmembed.encode` takes them. Everything is checked here, before any model is loaded."""

    def __init__(
        self,
        backbone: str | Mapping | os.PathLike = "minilm",
        layers: Sequence[int] | int = (4, 6),
        pooling: str = "mean",
        *,
        cache: bool = True,
        show_progress_bar: bool | None = None,
        **settings: Any,
    ):
        if pooling not in POOLINGS:
            raise SettingsError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if not isinstance(cache, bool):
            raise SettingsError(f"cache must be True or False, got {cache!r}")
        self.cache = cache
        self.pooling = pooling
        self.show_progress_bar = show_progress_bar
        requested = layer_list(layers)
        with _writes_nothing(cache):
            self.plan = make_api_plan(backbone, requested, pooling, settings)
        self.layers = absolute_layers(requested, self.plan.info.num_layers)
        if pooling == "pooler" and self.layers != [self.plan.info.num_layers] * len(self.layers):
            raise SettingsError(
                f"the pooler exists for the last layer only ({self.plan.info.num_layers}); "
                "use layers=[-1]"
            )
        self._held: tuple[tuple, Any] | None = None  # (what it computes, Extractor)

    @property
    def name(self) -> str:
        return self.plan.backbone.name

    @property
    def hidden_size(self) -> int:
        return self.plan.info.hidden_size

    @property
    def num_layers(self) -> int:
        """L: the backbone has hidden states 0..L."""
        return self.plan.info.num_layers

    @property
    def loaded(self) -> bool:
        return self._held is not None

    def encode(self, texts: Sequence[str] | str, *, show_progress_bar: bool | None = None):
        """`(len(texts), len(layers), hidden)` float32; `(len(layers), hidden)` for one str."""
        one = isinstance(texts, str)
        texts = check_texts([texts] if one else texts)
        progress = self.show_progress_bar if show_progress_bar is None else show_progress_bar
        if progress is None:
            progress = sys.stderr.isatty() and len(texts) > 256
        if not texts:
            return np.zeros((0, len(self.layers), self.hidden_size), dtype=np.float32)
        plan = dataclasses.replace(self.plan, progress=bool(progress))
        if self.cache:
            from llmembed.extract.embed import lending
            from llmembed.extract.pipeline import extract_texts

            with lending(self._lend):
                values = extract_texts(plan, texts, name="llmembed.encode").read(
                    self.pooling, self.layers
                )
        else:
            values = self._in_memory(plan, texts, bool(progress))
        return values[0] if one else values

    def unload(self) -> None:
        """Free the model (the next text to compute loads it again)."""
        self._held = None

    def _lend(self, plan, device: str):
        """The extractor for `plan` on `device`: the one held when it computes the same, else a
        new one, loaded once and held (the cache's appends ask for its entry's layers)."""
        from llmembed.extract.embed import fresh_embedder

        what = (
            plan.backbone, plan.info.identity, plan.spec, plan.layers, plan.poolings,
            plan.token_budget, device,
        )  # fmt: skip
        if self._held is None or self._held[0] != what:
            with _writes_nothing(self.cache):
                extractor, _ = fresh_embedder(
                    dataclasses.replace(plan, progress=False), device, keep_converted=self.cache
                )
            self._held = (what, extractor)
        return self._held[1]

    def _in_memory(self, plan, texts: list[str], progress: bool) -> np.ndarray:
        from tqdm.auto import tqdm

        from llmembed.extract.plan import resolve_device

        stored = sorted(set(self.layers))
        plan = plan.storing(stored, [self.pooling])
        extractor = self._lend(plan.confirmed(), resolve_device(plan.device))
        with tqdm(total=len(texts), unit="text", disable=not progress) as bar:
            emb, _ = extractor.embed(texts, lambda n, _tokens: bar.update(n))
        values = emb[self.pooling]  # (n, stored layers, hidden), in the store dtype
        if self.pooling == "pooler":
            return np.repeat(values[:, -1:], len(self.layers), axis=1).astype(np.float32)
        return values[:, [stored.index(x) for x in self.layers]].astype(np.float32)

    def __repr__(self) -> str:
        where = "cache" if self.cache else "memory"
        return (
            f"Encoder({self.name!r}, layers={self.layers}, pooling={self.pooling!r}, "
            f"hidden_size={self.hidden_size}, {where}, {'loaded' if self.loaded else 'not loaded'})"
        )

    def __getstate__(self) -> dict:
        # A copy (joblib, multiprocessing) takes the settings, not the loaded model.
        return {**self.__dict__, "_held": None}


def _writes_nothing(cache: bool):
    """For `cache=False`: the hash memo is read but not written."""
    from llmembed.cache.keys import memo_read_only

    return nullcontext() if cache else memo_read_only()
