"""Heads on synthetic data: they learn what is learnable, stay at chance otherwise, follow the
scikit-learn contract and survive a save/load round trip."""

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.decomposition import PCA
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline

from llmembed.classify.heads import LLMEmbedHead, LogRegHead, MLPHead
from llmembed.classify.metrics import evaluate, summarize
from llmembed.classify.saved import load_trained, save_trained

FAST = {"max_epochs": 60, "patience": 8}


def blobs(n=600, d=24, classes=3, seed=0, learnable=True):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centers = rng.normal(0, 1.5, (classes, d))
    X = rng.normal(0, 1, (n, d)) + (centers[y] if learnable else 0)
    return X.astype(np.float32), y


def heads():
    return [
        LogRegHead(),
        MLPHead(hidden=(32,), lr=3e-3, **FAST),
        LLMEmbedHead(
            block_sizes=(8, 8, 8),
            n_llm_blocks=2,
            width=16,
            hidden=(32, 16),
            lr=3e-3,
            batch_size=128,
            **FAST,
        ),
    ]


@pytest.mark.parametrize("head", heads(), ids=lambda h: type(h).__name__)
def test_learnable_labels_are_learned_and_random_ones_are_not(head):
    X, y = blobs()
    h = clone(head).fit(X[:400], y[:400])
    assert h.score(X[400:], y[400:]) > 0.9
    Xr, yr = blobs(learnable=False, seed=1)
    control = clone(head).fit(Xr[:400], yr[:400])
    assert control.score(Xr[400:], yr[400:]) < 0.45  # three classes: chance is 1/3


@pytest.mark.parametrize("head", heads(), ids=lambda h: type(h).__name__)
def test_scikit_learn_contract_and_round_trip(head, tmp_path):
    X, y = blobs(n=300)
    assert head.get_params()["random_state"] == 0 and not hasattr(
        head, "classes_"
    )  # __init__ only stores
    if not isinstance(head, LLMEmbedHead):  # block sizes pin the input width, PCA would change it
        scores = cross_val_score(make_pipeline(PCA(10), clone(head)), X, y, cv=3)
        assert scores.mean() > 0.8
    fitted = clone(head).fit(X[:200], y[:200], validation=(X[200:250], y[200:250]))
    proba = fitted.predict_proba(X[250:])
    np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-5)
    name = {"LogRegHead": "logreg", "MLPHead": "mlp", "LLMEmbedHead": "llmembed"}[
        type(head).__name__
    ]
    save_trained(tmp_path / "m", fitted, head_name=name, info={"label_names": ["a", "b", "c"]})
    loaded, meta = load_trained(tmp_path / "m")
    assert meta["label_names"] == ["a", "b", "c"]
    np.testing.assert_allclose(loaded.predict_proba(X[250:]), proba, atol=1e-6)
    with pytest.raises(ValueError, match="features"):
        fitted.predict(X[:5, :10])  # wrong width: a clear error, not a crash deep inside


def test_seeds_change_torch_heads_and_repeat_exactly():
    X, y = blobs(n=300)
    a = MLPHead(hidden=(32,), random_state=0, **FAST).fit(X, y).predict_proba(X)
    b = MLPHead(hidden=(32,), random_state=0, **FAST).fit(X, y).predict_proba(X)
    c = MLPHead(hidden=(32,), random_state=1, **FAST).fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_paper_head_checks_its_blocks():
    X, y = blobs(n=100)
    with pytest.raises(ValueError, match="add up to 20 but X has 24 columns"):
        LLMEmbedHead(block_sizes=(10, 10), **FAST).fit(X, y)
    with pytest.raises(ValueError, match="must name leading blocks of one width"):
        LLMEmbedHead(block_sizes=(8, 16), n_llm_blocks=2, **FAST).fit(X, y)


def test_metrics_binary_and_multiclass():
    m = evaluate(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), ["neg", "pos"])
    assert m["accuracy"] == 0.75 and m["micro_f1"] == 0.75
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)  # both classes count, not only "pos"
    assert m["confusion_matrix"] == [[1, 1], [0, 2]]
    m3 = evaluate(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 2]), ["a", "b", "c"])
    assert m3["per_class"]["b"]["recall"] == 0 and m3["per_class"]["c"][
        "precision"
    ] == pytest.approx(2 / 3)
    s = summarize(
        [
            {"accuracy": 0.8, "macro_f1": 0.7, "micro_f1": 0.8},
            {"accuracy": 0.9, "macro_f1": 0.9, "micro_f1": 0.9},
        ]
    )
    assert s["accuracy"]["mean"] == pytest.approx(0.85) and s["accuracy"]["std"] == pytest.approx(
        0.05
    )
