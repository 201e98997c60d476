"""`Features`: cached LLM layers as a scikit-learn transformer (texts in, fused matrix out).

    from sklearn.pipeline import make_pipeline
    from sklearn.linear_model import LogisticRegression
    model = make_pipeline(
        llmembed.Features([{"backbone": "minilm", "layers": [4], "pooling": "mean"}]),
        LogisticRegression(),
    )
    model.fit(train_texts, train_labels).score(test_texts, test_labels)

The backbones are frozen, so `fit` learns nothing: `transform` reads (or computes once into the
cache) each source's layers with `llmembed.encode` and fuses them. Works in `Pipeline`,
`cross_val_score`, `GridSearchCV` (e.g. over `features__sources`) and `clone`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from llmembed.api import SettingsError, _layer_list, absolute_layers, encode, make_api_plan

FUSIONS = ("concat", "mean")
SOURCE_KEYS = ("backbone", "layers", "pooling", "role")


def _check_source(i: int, src) -> dict:
    if not isinstance(src, Mapping):
        raise SettingsError(
            f"sources[{i}] must be a mapping like "
            "{'backbone': 'minilm', 'layers': [4], 'pooling': 'mean'}, "
            f"got {type(src).__name__}"
        )
    unknown = sorted(set(src) - set(SOURCE_KEYS))
    if unknown or "backbone" not in src:
        raise SettingsError(
            f"sources[{i}] has keys {sorted(src)}; a source takes backbone (required), layers, "
            "pooling and role, as in conf/features/*.yaml"
        )
    return {"layers": [-1], "pooling": "mean", **src}


class Features(TransformerMixin, BaseEstimator):
    """Texts -> fused embeddings of one or more cached (backbone, layers, pooling) sources.

    `sources`: a list of mappings as in conf/features/*.yaml (`role` is accepted and ignored: it
    matters to the paper's head only). `fusion`: `concat` (every layer side by side) or `mean`
    (per source, the mean of its layers; sources side by side). `settings`: extraction settings by
    name, as `llmembed.encode` takes them (cache_root, dtype, max_length, ...)."""

    def __init__(
        self,
        sources: Sequence[Mapping] = ({"backbone": "minilm", "layers": [4], "pooling": "mean"},),
        fusion: str = "concat",
        *,
        settings: Mapping[str, Any] | None = None,
        show_progress_bar: bool | None = None,
    ):
        self.sources = sources
        self.fusion = fusion
        self.settings = settings
        self.show_progress_bar = show_progress_bar

    def _sources(self) -> list[dict]:
        if isinstance(self.sources, Mapping) or not self.sources:
            raise SettingsError("sources must be a non-empty list of mappings")
        if self.fusion not in FUSIONS:
            raise SettingsError(
                f"fusion must be one of {FUSIONS}, got {self.fusion!r} (the paper's co-occurrence "
                "fusion is learned by its head: use llmembed-classify head=llmembed)"
            )
        return [_check_source(i, s) for i, s in enumerate(self.sources)]

    def fit(self, X=None, y=None):
        """Nothing to learn (the backbones are frozen); checks the parameters."""
        self._sources()
        return self

    def __sklearn_is_fitted__(self) -> bool:
        return True

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        tags.input_tags.string = True
        tags.input_tags.two_d_array = False
        return tags

    def transform(self, X) -> np.ndarray:
        """`(len(X), features)` float32 for a list (or array, or Series) of texts."""
        texts = [X] if isinstance(X, str) else list(np.asarray(X, dtype=object).ravel())
        blocks = []
        for src in self._sources():
            values = encode(
                texts,
                src["backbone"],
                _layer_list(src["layers"]),
                src["pooling"],
                show_progress_bar=self.show_progress_bar,
                **dict(self.settings or {}),
            )  # (n, layers, hidden)
            if self.fusion == "mean":
                values = values.mean(axis=1, keepdims=True)
            blocks.append(values.reshape(len(texts), -1))
        return np.concatenate(blocks, axis=1)

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        """`<backbone>:<pooling>:L<layer>:<unit>` (or `...:mean:<unit>` under mean fusion)."""
        names: list[str] = []
        for src in self._sources():
            plan = make_api_plan(src["backbone"], None, None, dict(self.settings or {}))
            name, hidden = plan.backbone.name, plan.info.hidden_size
            layers = absolute_layers(_layer_list(src["layers"]), plan.info.num_layers)
            parts = ["mean"] if self.fusion == "mean" else [f"L{x}" for x in layers]
            names += [f"{name}:{src['pooling']}:{p}:{u}" for p in parts for u in range(hidden)]
        return np.asarray(names, dtype=object)
