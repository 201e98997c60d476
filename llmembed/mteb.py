"""`LayerEncoder`: chosen layers of a frozen backbone as an encoder for the `mteb` benchmark.

    import mteb
    from llmembed.mteb import LayerEncoder
    model = LayerEncoder("smollm2", layers=[12, 15, 18], pooling="mean")
    mteb.evaluate(model, tasks=mteb.get_tasks(tasks=["Banking77Classification"]))

Every text is embedded once into llmembed's cache by an `llmembed.Encoder` (which keeps the model
loaded between mteb's calls), so a sweep over layers or combinations re-reads the cache instead of
running the model again. Needs `pip install 'llmembed[mteb]'` for mteb itself; the encoder alone
does not import it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmembed.api import SettingsError, check_settings, layer_list
from llmembed.encoder import Encoder

COMBINES = ("mean", "concat")


def _texts(inputs: Iterable) -> list[str]:
    """Texts from what mteb passes: a DataLoader of batches ({"text": [...], ...}), or a plain list
    of strings (mteb 1.x and sentence-transformers style)."""
    if isinstance(inputs, str):
        return [inputs]
    texts: list[str] = []
    for item in inputs:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, Mapping) and "text" in item:
            batch = item["text"]
            texts.extend([batch] if isinstance(batch, str) else list(batch))
        else:
            raise SettingsError(
                f"LayerEncoder embeds texts; got a {type(item).__name__} (text tasks only)"
            )
    return texts


class LayerEncoder:
    """One vector per text from `layers` of `backbone`: their mean (`combine="mean"`, the paper's
    recipe) or their concatenation (`combine="concat"`). `settings`: extraction settings by name,
    as `llmembed.encode` takes them (cache_root, dtype, max_length, prompt, ...)."""

    def __init__(
        self,
        backbone: str | Mapping = "minilm",
        layers: Sequence[int] | int = (-1,),
        pooling: str = "mean",
        *,
        combine: str = "mean",
        normalize: bool = False,
        show_progress_bar: bool | None = None,
        **settings: Any,
    ):
        if combine not in COMBINES:
            raise SettingsError(f"combine must be one of {COMBINES}, got {combine!r}")
        check_settings(settings)
        self.backbone = backbone
        self.layers = layer_list(layers)
        self.pooling = pooling
        self.combine = combine
        self.normalize = normalize
        self.show_progress_bar = show_progress_bar
        self.settings = settings
        self._encoder: Encoder | None = None

    @property
    def encoder(self) -> Encoder:
        """The `llmembed.Encoder` behind it, made at first use (its model loads at the first text
        the cache lacks)."""
        if self._encoder is None:
            self._encoder = Encoder(
                self.backbone,
                self.layers,
                self.pooling,
                show_progress_bar=self.show_progress_bar,
                **self.settings,
            )
        return self._encoder

    @property
    def name(self) -> str:
        """`llmembed/<backbone>-L<layers>-<pooling>[-concat]`, as mteb names results."""
        bb = self.backbone
        bb = bb.get("name", "model") if isinstance(bb, Mapping) else Path(str(bb)).stem
        layers = "-".join(str(x) for x in self.layers)
        tail = "-concat" if self.combine == "concat" else ""
        return f"llmembed/{bb}-L{layers}-{self.pooling}{tail}".replace(" ", "_")

    def encode(self, inputs, **kwargs: Any) -> np.ndarray:
        """(n, dim) float32 for mteb's DataLoader of batches or a list of texts. mteb's keyword
        arguments (task_metadata, hf_split, hf_subset, prompt_type, batch_size, ...) are accepted
        and ignored: the prompt is the `prompt` setting, batching is by token budget."""
        texts = _texts(inputs)
        x = self.encoder.encode(texts)  # (n, layers, hidden)
        x = x.mean(axis=1) if self.combine == "mean" else x.reshape(len(texts), -1)
        if self.normalize:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x.astype(np.float32)

    def similarity(self, embeddings1, embeddings2) -> np.ndarray:
        """Cosine similarity of every pair: (n1, n2)."""
        a, b = _unit(embeddings1), _unit(embeddings2)
        return a @ b.T

    def similarity_pairwise(self, embeddings1, embeddings2) -> np.ndarray:
        """Cosine similarity of corresponding rows: (n,)."""
        return (_unit(embeddings1) * _unit(embeddings2)).sum(axis=1)

    @property
    def embed_dim(self) -> int:
        """Width of one text's vector."""
        width = self.encoder.hidden_size
        return width * len(self.layers) if self.combine == "concat" else width

    @property
    def mteb_model_meta(self):
        """mteb's description of this encoder (needs mteb): its name, the backbone's parameters,
        the vector's width, the revision (what pins the weights) and the longest input."""
        from mteb.models.model_meta import ModelMeta

        from llmembed.cache.keys import short_identity

        plan = self.encoder.plan
        return ModelMeta.create_empty(
            overwrites={
                "name": self.name,
                "revision": short_identity(plan.info.identity).replace(" ", "-"),
                "n_parameters": parameter_count(plan),
                "embed_dim": self.embed_dim,
                "max_tokens": plan.spec.max_length,
                "similarity_fn_name": "cosine",
                "framework": ["PyTorch"],
            }
        )


def _unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    x = x[None] if x.ndim == 1 else x
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def parameter_count(plan) -> int:
    """Parameters of the whole backbone, counted on a skeleton built on torch's meta device (no
    weights are loaded)."""
    import torch
    from transformers import AutoConfig, AutoModel

    source, trust = plan.info.source, plan.backbone.trust_remote_code
    kw = source.load_kwargs(plan.info.identity.get("commit"), trust)
    config = AutoConfig.from_pretrained(source.location, **kw)
    with torch.device("meta"):
        model = AutoModel.from_config(config, trust_remote_code=trust)
    return sum(p.numel() for p in model.parameters())
