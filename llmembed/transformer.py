"""`Features`: cached LLM layers as a scikit-learn transformer (texts in, fused matrix out).

    from sklearn.pipeline import make_pipeline
    from sklearn.linear_model import LogisticRegression
    model = make_pipeline(
        llmembed.Features([{"backbone": "minilm", "layers": [4], "pooling": "mean"}]),
        LogisticRegression(),
    )
    model.fit(train_texts, train_labels).score(test_texts, test_labels)

The backbones are frozen, so `fit` learns nothing: `transform` reads (or computes once into the
cache) each source's layers with an `llmembed.Encoder` per source, kept (with its model, once
loaded) between calls, and fuses them. Works in `Pipeline`, `cross_val_score`, `GridSearchCV`
(e.g. over `features__sources`) and `clone`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from llmembed.api import SettingsError, layer_list

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
    src = {"layers": [-1], "pooling": "mean", **src}
    try:
        layer_list(src["layers"])
    except SettingsError as err:
        raise SettingsError(f"sources[{i}]: {err}") from None
    return src


class Features(TransformerMixin, BaseEstimator):
    """Texts -> fused embeddings of one or more cached (backbone, layers, pooling) sources.

    `sources`: a list of mappings as in conf/features/*.yaml (`role` is accepted and ignored: it
    matters to the paper's head only). `fusion`: `concat` (every layer side by side) or `mean`
    (per source, the mean of its layers; sources side by side). `column`: the text column of a
    DataFrame given to `transform` (a frame of one column needs none; with more, one must be
    named: the label column is never embedded as texts). `settings`: extraction settings by
    name, as `llmembed.encode` takes them (cache_root, dtype, max_length, ...)."""

    def __init__(
        self,
        sources: Sequence[Mapping] = ({"backbone": "minilm", "layers": [4], "pooling": "mean"},),
        fusion: str = "concat",
        *,
        column: str | None = None,
        settings: Mapping[str, Any] | None = None,
        show_progress_bar: bool | None = None,
    ):
        self.sources = sources
        self.fusion = fusion
        self.column = column
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
        """`(len(X), features)` float32 for a list (or array, Series, or one column of a
        DataFrame) of texts."""
        texts = self._texts(X)
        blocks = []
        for encoder in self._encoders():
            values = encoder.encode(texts, show_progress_bar=self.show_progress_bar)
            if self.fusion == "mean":  # (n, layers, hidden)
                values = values.mean(axis=1, keepdims=True)
            blocks.append(values.reshape(len(texts), -1))
        return np.concatenate(blocks, axis=1)

    def _texts(self, X) -> list[str]:
        if isinstance(X, str):
            return [X]
        columns = getattr(X, "columns", None)
        if columns is not None:  # a DataFrame: one column, named or the only one
            names = list(columns)
            if self.column is not None:
                if self.column not in names:
                    raise SettingsError(
                        f"column={self.column!r} is not a column of X; its columns: {names}"
                    )
                X = X[self.column]
            elif len(names) == 1:
                X = X[names[0]]
            else:
                raise SettingsError(
                    f"X is a DataFrame with columns {names}: say which holds the texts with "
                    "Features(..., column=NAME), or pass that column alone (X[NAME])"
                )
        array = np.asarray(X, dtype=object)
        if array.ndim == 2 and array.shape[1] == 1:
            array = array[:, 0]
        if array.ndim != 1:
            raise SettingsError(
                f"X must be a list of texts (one text per row), got an array of shape "
                f"{array.shape}; pass the text column alone"
            )
        return list(array)

    def _encoders(self) -> list:
        """One Encoder per source, made at the first call and kept (with its loaded model)
        while the parameters stay the same."""
        from llmembed.encoder import Encoder

        sources = self._sources()
        made = (repr(sources), repr(self.settings))
        if getattr(self, "_made", None) != made:
            self._encoder_list = [
                Encoder(
                    src["backbone"],
                    src["layers"],
                    src["pooling"],
                    show_progress_bar=self.show_progress_bar,
                    **dict(self.settings or {}),
                )
                for src in sources
            ]
            self._made = made
        return self._encoder_list

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        """`<backbone>:<pooling>:L<layer>:<unit>` (or `...:mean:<unit>` under mean fusion)."""
        names: list[str] = []
        for encoder in self._encoders():
            layers = ["mean"] if self.fusion == "mean" else [f"L{x}" for x in encoder.layers]
            names += [
                f"{encoder.name}:{encoder.pooling}:{p}:{u}"
                for p in layers
                for u in range(encoder.hidden_size)
            ]
        return np.asarray(names, dtype=object)

    def __getstate__(self) -> dict:
        # A copy (clone's deepcopy, joblib) takes the parameters, not loaded models.
        state = super().__getstate__()
        state.pop("_encoder_list", None)
        state.pop("_made", None)
        return state
