"""Heads on synthetic data: they learn what is learnable, stay at chance otherwise, follow the
scikit-learn contract and survive a save/load round trip."""

import logging
import re

import numpy as np
import pytest
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.decomposition import PCA
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline

from llmembed.classify.heads import MIN_DELTA, LLMEmbedHead, LogRegHead, MLPHead, ParamError
from llmembed.classify.saved import SavedModelError, load_trained, save_trained

FAST = {"max_epochs": 60, "patience": 8}


def blobs(n=600, d=24, classes=3, seed=0, learnable=True, spread=1.5):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centers = rng.normal(0, spread, (classes, d))
    X = rng.normal(0, 1, (n, d)) + (centers[y] if learnable else 0)
    return X.astype(np.float32), y


def heads():
    return [
        LogRegHead(),
        MLPHead(hidden=(32,), lr=3e-3, **FAST),
        LLMEmbedHead(
            block_sizes=(8, 8, 8),
            block_roles=("llm", "llm", "encoder"),
            width=16,
            hidden=(32, 16),
            lr=3e-3,
            batch_size=128,
            **FAST,
        ),
        # The paper's code: raw inputs, an encoder already `width` wide fed unprojected, LLM last.
        LLMEmbedHead(
            block_sizes=(8, 8, 8),
            block_roles=("encoder", "llm", "llm"),
            width=8,
            hidden=(32, 16),
            standardize=False,
            project_same_width=False,
            lr=3e-3,
            batch_size=128,
            **FAST,
        ),
    ]


def head_id(head):
    return type(head).__name__ + ("_paper" if getattr(head, "standardize", True) is False else "")


@pytest.mark.parametrize("head", heads(), ids=head_id)
def test_learnable_labels_are_learned_and_random_ones_are_not(head):
    X, y = blobs()
    h = clone(head).fit(X[:400], y[:400])
    assert h.score(X[400:], y[400:]) > 0.9
    Xr, yr = blobs(learnable=False, seed=1)
    control = clone(head).fit(Xr[:400], yr[:400])
    assert control.score(Xr[400:], yr[400:]) < 0.45  # three classes: chance is 1/3


@pytest.mark.parametrize("head", heads(), ids=head_id)
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
    info = {"label_names": ["a", "b", "c"], "fusion": "concat", "sources": []}
    save_trained(tmp_path / "m", fitted, head_name=name, info=info)
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


@pytest.mark.parametrize(
    "sizes, roles, message",
    [
        ((10, 10), ("llm", "llm"), "add up to 20 but X has 24 columns"),
        ((8, 8, 8), ("llm", "llm"), "block_roles has 2 entries for 3 blocks"),
        ((8, 8, 8), ("llm", "bert", "encoder"), r"entries \[\(1, 'bert'\)\] are not one of"),
        ((8, 8, 8), ("encoder",) * 3, "marks no block 'llm'"),
        ((8, 8, 8), (), "block_roles has 0 entries"),  # roles are never guessed
        ((8, 16), ("llm", "llm"), r"must share one width to be averaged; their widths: \[8, 16\]"),
    ],
)
def test_paper_head_checks_its_blocks_in_fit(sizes, roles, message):
    X, y = blobs(n=100)
    head = LLMEmbedHead(block_sizes=sizes, block_roles=roles, **FAST)  # __init__ only stores
    with pytest.raises(ValueError, match=message):
        head.fit(X, y)


@pytest.mark.parametrize(
    "sizes, roles, llm_columns",
    [
        ((4, 4, 6), ("llm", "llm", "encoder"), [slice(0, 4), slice(4, 8)]),
        ((6, 4, 4), ("encoder", "llm", "llm"), [slice(6, 10), slice(10, 14)]),
        ((4, 6, 4), ("llm", "encoder", "llm"), [slice(0, 4), slice(10, 14)]),
    ],
)
def test_paper_head_averages_exactly_the_llm_blocks(sizes, roles, llm_columns):
    X, y = blobs(n=120, d=14)
    head = LLMEmbedHead(
        block_sizes=sizes,
        block_roles=roles,
        width=4,
        hidden=(8,),
        standardize=False,  # the mean is then over the raw columns
        max_epochs=1,
        patience=1,
        device="cpu",
    ).fit(X, y)
    seen = []
    head.module_.mlp.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    x = np.random.default_rng(3).normal(size=(5, 14)).astype(np.float32)
    head.predict_proba(x)
    expected = np.mean([x[:, c] for c in llm_columns], axis=0)  # (5, 4)
    np.testing.assert_allclose(seen[0][:, -4:].numpy(), expected, rtol=1e-6)
    assert seen[0].shape[1] == len(sizes) * (len(sizes) + 1) // 2 + 4


def test_paper_faithful_variant_feeds_raw_inputs_and_an_unprojected_encoder():
    X, y = blobs(n=120, d=16)
    kw = {"block_sizes": (4, 8, 4), "block_roles": ("llm", "encoder", "llm"), "width": 8}
    paper = LLMEmbedHead(**kw, standardize=False, project_same_width=False, **FAST).fit(X, y)
    ours = LLMEmbedHead(**kw, **FAST).fit(X, y)
    # The encoder at the common width goes in as it is; LLM blocks are projected whatever their width.
    assert [type(p).__name__ for p in paper.module_.proj] == [
        "Sequential",
        "Identity",
        "Sequential",
    ]
    assert [type(p).__name__ for p in ours.module_.proj] == ["Sequential"] * 3
    assert torch.equal(paper.module_.scaler_mean, torch.zeros(16))
    assert torch.equal(paper.module_.scaler_std, torch.ones(16))
    assert not torch.equal(ours.module_.scaler_mean, torch.zeros(16))


def test_early_stopping_keeps_the_best_epoch_and_stops_patience_epochs_after_it(caplog):
    """The kept weights, best_epoch_, the log line and the stopping rule tell one story."""
    X, y = blobs(n=300, spread=0.3, seed=1)
    patience = 5
    head = MLPHead(hidden=(16,), lr=1e-2, max_epochs=200, patience=patience, device="cpu")
    with caplog.at_level(logging.INFO, logger="llmembed.classify.heads"):
        head.fit(X[:200], y[:200], validation=(X[200:], y[200:]))
    losses = [h["val_loss"] for h in head.history_]
    best = head.best_epoch_
    # This data stops early (about epoch 34 of 200), exactly `patience` epochs after the best.
    assert len(losses) < 100 and len(losses) == best + patience + 1
    # best_epoch_ is the last counted improvement: each beat the running best by MIN_DELTA ...
    running, improvements = float("inf"), []
    for epoch, loss in enumerate(losses):
        if loss < running - MIN_DELTA:
            running, improvements = loss, [*improvements, epoch]
    assert improvements[-1] == best
    # ... even if a later epoch crept below it by less than that (the old "best epoch 37 of 38").
    assert all(loss >= losses[best] - MIN_DELTA for loss in losses[best + 1 :])
    # The kept weights are that epoch's: their validation loss is the one recorded for it.
    with torch.no_grad():
        logits = head.module_(torch.from_numpy(X[200:]))
        kept = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y[200:])).item()
    assert kept == pytest.approx(losses[best], abs=1e-6)
    assert f"best epoch {best} (validation loss {losses[best]:.4f}) of {len(losses)}" in caplog.text


def test_torch_heads_check_the_validation_set():
    X, y = blobs(n=200)
    head = MLPHead(hidden=(32,), lr=3e-3, **FAST)
    with pytest.raises(ValueError, match=r"validation labels \[7\] do not occur"):
        head.fit(X[:150], y[:150], validation=(X[150:], np.where(y[150:] == 2, 7, y[150:])))
    with pytest.raises(ValueError, match="validation X has 10 features but X has 24"):
        head.fit(X[:150], y[:150], validation=(X[150:, :10], y[150:]))
    # float64 validation rows are converted, not a dtype error deep in torch
    head.fit(X[:150], y[:150], validation=(X[150:].astype(np.float64), y[150:]))
    assert head.score(X[150:], y[150:]) > 0.9


def test_the_papers_training_fixed_epochs_last_kept_and_a_softmax_before_the_loss():
    """patience=None trains every epoch and keeps the last one's weights (the paper's code has no
    validation); softmax_before_loss trains on softmax outputs as the paper's code does, which
    changes the loss (and so the weights) but not what predict's argmax reads."""
    X, y = blobs(n=300, spread=0.3, seed=1)
    kw = {"block_sizes": (8, 8, 8), "block_roles": ("llm", "llm", "encoder"), "width": 8}
    kw |= {"hidden": (16,), "lr": 3e-2, "max_epochs": 12, "device": "cpu"}
    fixed = LLMEmbedHead(**kw, patience=None).fit(X[:200], y[:200], validation=(X[200:], y[200:]))
    assert len(fixed.history_) == 12 and fixed.best_epoch_ == 11
    with torch.no_grad():
        kept = torch.nn.functional.cross_entropy(
            fixed.module_(torch.from_numpy(X[200:])), torch.from_numpy(y[200:])
        ).item()
    assert kept == pytest.approx(fixed.history_[-1]["val_loss"], abs=1e-6)  # the last epoch's
    assert min(h["val_loss"] for h in fixed.history_) < kept  # not the best one's

    paper = LLMEmbedHead(**kw, patience=None, softmax_before_loss=True)
    paper.fit(X[:200], y[:200], validation=(X[200:], y[200:]))
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    target = torch.tensor([0])
    assert paper._loss(logits, target).item() == pytest.approx(
        torch.nn.functional.cross_entropy(torch.softmax(logits, 1), target).item()
    )
    assert not torch.equal(paper.module_.mlp[0].weight, fixed.module_.mlp[0].weight)
    proba = paper.predict_proba(X[200:])
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    assert (paper.classes_[proba.argmax(1)] == paper.predict(X[200:])).all()


@pytest.mark.parametrize(
    ("head", "says"),
    [
        (LogRegHead(Cs=[]), "Cs=[]: give a list of one or more positive values of C"),
        (LogRegHead(max_iter=0), "max_iter=0: use a whole number, 1 or more"),
        (MLPHead(batch_size=0), "batch_size=0: use a whole number of rows"),  # was a RuntimeError
        (MLPHead(max_epochs=0), "max_epochs=0: use a whole number of epochs"),  # "never finite"
        (MLPHead(hidden="512"), "hidden='512': give a list of layer widths"),
        (MLPHead(dropout=1.0), "dropout=1.0: use 0 to below 1"),
        (MLPHead(patience=-1), "patience=-1: use 0 or more epochs (null: no early stopping)"),
        (MLPHead(device="gpu"), "device='gpu': use auto, cpu, cuda, cuda:N or mps"),
        (LLMEmbedHead(block_sizes=(8,), block_roles=("llm",), sigma=-0.1), "sigma=-0.1"),
        (LLMEmbedHead(block_sizes=(8,), block_roles=("llm",), standardize=1), "standardize=1"),
    ],
)
def test_a_parameter_fit_could_not_use_is_refused_naming_it(head, says):
    """As scikit-learn estimators do, fit checks its parameters before any work; the message
    names the parameter as conf/head/*.yaml does (llmembed-classify prefixes head.params.)."""
    X, y = blobs(n=60, d=8)
    with pytest.raises(ParamError, match=re.escape(says)):
        head.fit(X, y)


def test_numpy_values_and_scikit_learns_none_are_parameters_fit_can_use():
    X, y = blobs(n=80, d=8)
    LogRegHead(Cs=np.logspace(-2, 0, 3), max_iter=np.int64(200), random_state=None).fit(X, y)
    mlp = MLPHead(hidden=np.array([8]), dropout=np.float32(0.1), lr=np.float32(1e-2), max_epochs=2)
    mlp.check_params()
    LLMEmbedHead(sigma=np.float32(0.01), width=np.int64(8), hidden=(), patience=None).check_params()


class PlainHead(ClassifierMixin, BaseEstimator):
    """A user's own estimator: scikit-learn's base class, no declared parameter constraints."""

    def __init__(self, k=1, random_state=0):
        self.k = k
        self.random_state = random_state

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        return self


def test_a_users_own_estimator_passes_the_head_check_and_a_misspelled_parameter_does_not():
    from omegaconf import OmegaConf

    from llmembed.classify.train import check_head
    from llmembed.errors import UserError

    check_head(OmegaConf.create({"_target_": "tests.test_heads.PlainHead", "k": 3}), [2])
    with pytest.raises(
        UserError, match=re.escape("head.params.kk: tests.test_heads.PlainHead takes no")
    ):
        check_head(OmegaConf.create({"_target_": "tests.test_heads.PlainHead", "kk": 3}), [2])


def test_a_head_that_cannot_move_to_its_gpu_says_so_not_that_its_weights_do_not_fit(
    tmp_path, monkeypatch
):
    """The weights are read on the CPU first; only then is the head moved to the device asked
    for, and a failure there (a GPU out of memory) is named as such."""
    X, y = blobs(n=200)
    fitted = MLPHead(hidden=(16,), **FAST).fit(X, y)
    info = {"label_names": ["a", "b", "c"], "fusion": "concat", "sources": []}
    save_trained(tmp_path / "m", fitted, head_name="mlp", info=info)

    def no_room(module, device):
        if str(device) != "cpu":
            raise RuntimeError("CUDA error: out of memory")
        return module

    monkeypatch.setattr(torch.nn.Module, "to", no_room)
    with pytest.raises(
        SavedModelError, match=r"could not move to cuda \(CUDA error: out of memory"
    ):
        load_trained(tmp_path / "m", device="cuda")
    head, _ = load_trained(tmp_path / "m")  # the CPU, as before
    assert head.device == "cpu"
    np.testing.assert_allclose(head.predict_proba(X), fitted.predict_proba(X), atol=1e-6)
