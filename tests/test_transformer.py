"""`llmembed.Features` as a scikit-learn transformer: Pipeline, cross-validation, search, clone."""

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import Pipeline, make_pipeline

import llmembed
from llmembed.api import SettingsError
from llmembed.classify.heads import LogRegHead
from tests.conftest import sentences


@pytest.fixture
def data():
    rows = sentences(40, seed=3)
    return [t for t, _ in rows], np.array([y for _, y in rows])


def features(model, root, **kw):
    src = {"backbone": str(model), "layers": [1, 2], "pooling": "mean", "role": "encoder"}
    return llmembed.Features([src], settings={"cache_root": str(root), "dtype": "float32"}, **kw)


def test_transform_is_encode_fused_and_named(tmp_path, tiny_bert, tiny_llama, data):
    texts, _ = data
    settings = {"cache_root": str(tmp_path), "dtype": "float32"}
    sources = [
        {"backbone": str(tiny_bert), "layers": [1, -1], "pooling": "mean"},
        {"backbone": str(tiny_llama), "layers": [-1], "pooling": "last"},
    ]
    f = llmembed.Features(sources, settings=settings)
    assert f.fit(texts) is f
    x = f.transform(texts)
    bert = llmembed.encode(texts, str(tiny_bert), [1, 2], **settings)
    llama = llmembed.encode(texts, str(tiny_llama), [-1], "last", **settings)
    np.testing.assert_array_equal(x, np.concatenate([bert.reshape(40, -1), llama[:, 0]], axis=1))
    names = f.get_feature_names_out()
    assert len(names) == x.shape[1] and names[0] == "tiny-bert0:mean:L1:0"
    assert names[-1].startswith("tiny-llama0:last:L3:")
    mean = llmembed.Features(sources, "mean", settings=settings)
    np.testing.assert_allclose(mean.transform(texts)[:, :32], bert.mean(axis=1), rtol=1e-6)
    assert len(mean.get_feature_names_out()) == mean.transform(texts[:2]).shape[1]


def test_pipeline_cross_val_and_grid_search_over_layers(tmp_path, tiny_bert, data, forward_calls):
    texts, y = data
    model = make_pipeline(features(tiny_bert, tmp_path), LogisticRegression(max_iter=500))
    scores = cross_val_score(model, texts, y, cv=3)
    assert scores.shape == (3,) and scores.mean() > 0.6  # the label word is learnable
    computed = len(forward_calls)
    base = {"backbone": str(tiny_bert), "pooling": "mean"}
    search = GridSearchCV(
        Pipeline([("features", features(tiny_bert, tmp_path)), ("head", LogRegHead())]),
        {"features__sources": [[{**base, "layers": [x]}] for x in (0, 1, 2)]},
        cv=2,
    )
    search.fit(texts, y)
    assert len(forward_calls) == computed  # every layer of every text is read from the cache
    assert search.best_params_["features__sources"][0]["layers"] in ([0], [1], [2])
    assert search.predict(texts[:3]).shape == (3,)


def test_clone_keeps_parameters_and_fit_learns_nothing(tmp_path, tiny_bert):
    f = features(tiny_bert, tmp_path, show_progress_bar=False)
    c = clone(f)
    assert c.get_params() == f.get_params() and c is not f
    assert c.set_params(fusion="mean").fusion == "mean" and f.fusion == "concat"


def test_bad_sources_fail_clearly(tmp_path, tiny_bert):
    with pytest.raises(SettingsError, match="backbone \\(required\\)"):
        llmembed.Features([{"layers": [1]}]).fit(["x"])
    with pytest.raises(SettingsError, match="fusion must be one of"):
        llmembed.Features([{"backbone": "minilm"}], fusion="cooccurrence").fit(["x"])
    with pytest.raises(SettingsError, match="did you mean 'max_length'"):
        llmembed.Features([{"backbone": str(tiny_bert)}], settings={"max_len": 3}).transform(["x"])
