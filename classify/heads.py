"""Classifier heads on cached embeddings, following the scikit-learn estimator contract.

`fit(X, y)` / `predict` / `predict_proba` / `score`; constructors store parameters and do nothing
else, so heads work inside scikit-learn pipelines and searches. `fit` also takes an optional
`validation=(X_val, y_val)`; without it a seeded, stratified 12.5% of the training rows is held out
for model choice and early stopping.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import sys

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted, check_X_y, validate_data
from torch import nn
from tqdm.auto import tqdm

from llmembed.extract.plan import device_problem

log = logging.getLogger(__name__)


def _holdout(X, y, validation, seed):
    """(X_train, y_train, X_val, y_val): the given validation set, or 12.5% of the training rows."""
    if validation is not None:
        X_val, y_val = check_X_y(*validation, dtype=np.float32)
        if X_val.shape[1] != X.shape[1]:
            raise ValueError(
                f"validation X has {X_val.shape[1]} features but X has {X.shape[1]}: "
                "give validation rows with the same columns"
            )
        return X, y, X_val, y_val
    X_tr, X_val, y_tr, y_val = train_test_split(
        X, y, test_size=0.125, random_state=seed, stratify=y
    )
    return X_tr, y_tr, X_val, y_val


def is_whole(v, least: int = 1) -> bool:
    """A whole number of at least `least` (a bool, numpy's too, is not one)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)) and v >= least


def is_number(v) -> bool:
    """A finite real number (not a bool)."""
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v)


def _values(v) -> bool:
    """A list, tuple or 1-d array of values (not a string, which is a sequence of letters)."""
    return isinstance(v, (list, tuple)) or (isinstance(v, np.ndarray) and v.ndim == 1)


def _positive(v) -> bool:
    return is_number(v) and v > 0


WHOLE = "use a whole number, 0 or more"


class ParamError(ValueError):
    """A head parameter that `fit` could not use; the message starts with its name."""


def _require(ok: bool, name: str, value, want: str) -> None:
    if not ok:
        raise ParamError(f"{name}={value!r}: {want}")


class LogRegHead(ClassifierMixin, BaseEstimator):
    """Standardized features, L2 logistic regression; C chosen on the validation split. The final
    model is the one fitted on the training rows with that C, so validation scores stay honest."""

    def __init__(
        self, *, Cs=(0.005, 0.01, 0.05, 0.1, 0.5, 1.0), max_iter=3000, tol=1e-3, random_state=0
    ):
        self.Cs = Cs
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state

    def check_params(self) -> None:
        """Refuse, naming it, a parameter that would fail (or do nothing) inside `fit`."""
        Cs = self.Cs
        ok = _values(Cs) and len(Cs) > 0 and all(_positive(c) for c in Cs)
        _require(ok, "Cs", Cs, "give a list of one or more positive values of C, e.g. [0.1, 1.0]")
        _require(
            is_whole(self.max_iter, 1), "max_iter", self.max_iter, "use a whole number, 1 or more"
        )
        _require(_positive(self.tol), "tol", self.tol, "use a positive tolerance, e.g. 1e-3")
        rs = self.random_state  # None: scikit-learn's own meaning
        _require(rs is None or is_whole(rs, 0), "random_state", rs, WHOLE + " (or null)")

    def _model(self, C, **kw):
        return LogisticRegression(
            C=C, max_iter=self.max_iter, tol=self.tol, random_state=self.random_state, **kw
        )

    def fit(self, X, y, *, validation=None):
        self.check_params()
        X, y = check_X_y(X, y, dtype=np.float32)
        X_tr, y_tr, X_val, y_val = _holdout(X, y, validation, self.random_state)
        self.scaler_ = StandardScaler().fit(X_tr)
        X_tr, X_val = self.scaler_.transform(X_tr), self.scaler_.transform(X_val)
        # One regularization path, each C warm-started from the previous (4-5x faster than cold fits).
        path, fits, self.validation_scores_ = self._model(1.0, warm_start=True), {}, {}
        for C in sorted(self.Cs):
            path.set_params(C=C).fit(X_tr, y_tr)
            fits[C] = (path.coef_.copy(), path.intercept_.copy())
            self.validation_scores_[C] = path.score(X_val, y_val)
        # Ties go to the stronger regularization.
        self.C_ = max(self.Cs, key=lambda c: (self.validation_scores_[c], -c))
        self.clf_ = self._fitted(*fits[self.C_], path.classes_)
        self.classes_ = self.clf_.classes_
        self.n_features_in_ = X.shape[1]
        return self

    def _fitted(self, coef, intercept, classes) -> LogisticRegression:
        clf = self._model(1.0)
        clf.coef_, clf.intercept_, clf.classes_ = coef, intercept, classes
        clf.n_features_in_ = coef.shape[1]
        return clf

    def predict_proba(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float32)
        return self.clf_.predict_proba(self.scaler_.transform(X))

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    # Saved as plain arrays (safetensors) + JSON: nothing pickled.
    def state(self) -> dict[str, np.ndarray]:
        return {
            "coef": self.clf_.coef_,
            "intercept": self.clf_.intercept_,
            "classes": self.classes_,
            "mean": self.scaler_.mean_,
            "scale": self.scaler_.scale_,
        }

    def load_state(self, state: dict[str, np.ndarray]) -> LogRegHead:
        self.scaler_ = StandardScaler()
        self.scaler_.mean_, self.scaler_.scale_ = state["mean"], state["scale"]
        self.scaler_.var_ = state["scale"] ** 2
        self.scaler_.n_features_in_ = len(state["mean"])
        self.clf_ = self._fitted(state["coef"], state["intercept"], state["classes"])
        self.classes_ = self.clf_.classes_
        self.n_features_in_ = len(state["mean"])
        return self


MIN_DELTA = 1e-4  # a validation loss counts as an improvement only when it beats the best by this


class TorchHead(ClassifierMixin, BaseEstimator):
    """Shared training for torch heads: Adam, mini-batches, cross-entropy on logits (no softmax
    before the loss), early stopping on validation loss.

    An epoch improves when its validation loss beats the best so far by MIN_DELTA; `best_epoch_`
    is the last such epoch and its weights are the ones kept. Training stops `patience` epochs
    after it (so `len(history_) == best_epoch_ + patience + 1`) unless `max_epochs` ends it first.
    `patience=None` is no early stopping, as the paper's code: `max_epochs` epochs, the last
    epoch's weights kept (validation is still scored each epoch, for the history only).
    """

    lr: float
    weight_decay: float
    batch_size: int
    max_epochs: int
    patience: int | None
    random_state: int
    device: str
    standardize: bool = True  # LLMEmbedHead makes it a parameter; MLPHead always standardizes

    def _build(self, n_features: int, n_classes: int) -> nn.Module:
        raise NotImplementedError

    def _device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def check_params(self) -> None:
        """Refuse, naming it, a parameter that would fail (or do nothing) inside `fit`."""
        checks = {
            "lr": (_positive, "use a positive learning rate, e.g. 1e-3"),
            "weight_decay": (lambda v: is_number(v) and v >= 0, "use 0 or more"),
            "batch_size": (lambda v: is_whole(v, 1), "use a whole number of rows, 1 or more"),
            "max_epochs": (lambda v: is_whole(v, 1), "use a whole number of epochs, 1 or more"),
            "patience": (
                lambda v: v is None or is_whole(v, 0),
                "use 0 or more epochs (null: no early stopping)",
            ),
            "random_state": (lambda v: is_whole(v, 0), WHOLE),
            "hidden": (
                lambda v: _values(v) and all(is_whole(h, 1) for h in v),
                "give a list of layer widths, each 1 or more, e.g. [512] ([] for none)",
            ),
            "dropout": (lambda v: is_number(v) and 0 <= v < 1, "use 0 to below 1"),
        }
        for name, (ok, want) in checks.items():
            if hasattr(self, name):  # a subclass may not have them all
                value = getattr(self, name)
                _require(ok(value), name, value, want)
        self._check_device()

    def _check_device(self) -> None:
        problem = device_problem(self.device)
        _require(problem is None, "device", self.device, problem)

    def fit(self, X, y, *, validation=None):
        self.check_params()
        X, y = check_X_y(X, y, dtype=np.float32)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        self.n_features_in_ = X.shape[1]
        if validation is not None:
            validation = (validation[0], self._label_indices(validation[1]))
        X_tr, y_tr, X_val, y_val = _holdout(X, y_idx, validation, self.random_state)
        torch.manual_seed(self.random_state)
        dev = self._device()
        self.module_ = self._build(X.shape[1], len(self.classes_)).to(dev)
        if self.standardize:  # part of the module, so a saved state dict carries it
            self.module_.set_scaler(X_tr.mean(0), X_tr.std(0) + 1e-6)
        opt = torch.optim.Adam(
            self.module_.parameters(), lr=self.lr, weight_decay=self.weight_decay
        )
        xt, yt = torch.from_numpy(X_tr).to(dev), torch.from_numpy(y_tr).long().to(dev)
        xv, yv = torch.from_numpy(X_val).to(dev), torch.from_numpy(y_val).long().to(dev)
        gen = torch.Generator().manual_seed(self.random_state)
        best, best_loss, self.best_epoch_, self.history_ = None, float("inf"), -1, []
        # Epochs with their validation figures on a terminal (a log file gets the summary only).
        with tqdm(
            total=self.max_epochs,
            unit="epoch",
            desc=type(self).__name__,
            disable=not sys.stderr.isatty(),
            leave=False,
            dynamic_ncols=True,
            mininterval=0,  # every epoch: an epoch of a small head takes milliseconds
        ) as bar:
            for epoch in range(self.max_epochs):
                self._train_epoch(opt, xt, yt, gen)
                val_loss, val_acc = self._validate(xv, yv)
                self.history_.append(
                    {"epoch": epoch, "val_loss": val_loss, "val_accuracy": val_acc}
                )
                stop = False
                if self.patience is None:  # fixed epochs: the last one is kept
                    best, best_loss, self.best_epoch_ = self.module_.state_dict(), val_loss, epoch
                elif val_loss < best_loss - MIN_DELTA:
                    best, best_loss = copy.deepcopy(self.module_.state_dict()), val_loss
                    self.best_epoch_ = epoch
                elif epoch - self.best_epoch_ >= self.patience:
                    stop = True
                bar.set_postfix(
                    val_loss=f"{val_loss:.4f}",
                    val_acc=f"{val_acc:.3f}",
                    best=self.best_epoch_,
                    refresh=False,
                )
                bar.update()
                if stop:
                    break
        if best is None:
            raise RuntimeError(
                f"{type(self).__name__}: validation loss was never finite "
                f"({self.history_[0]['val_loss']} after epoch 0); lower lr or check the inputs"
            )
        self.module_.load_state_dict(best)
        self.module_.eval()
        log.info(
            "%s: best epoch %d (validation loss %.4f) of %d, patience %s",
            type(self).__name__,
            self.best_epoch_,
            best_loss,
            len(self.history_),
            self.patience,
        )
        return self

    def _label_indices(self, y) -> np.ndarray:
        """Validation labels as indices into classes_; a label training never saw is an error
        (searchsorted alone would map it silently onto a neighbouring class)."""
        y = np.asarray(y)
        unseen = np.setdiff1d(y, self.classes_)
        if len(unseen):
            raise ValueError(
                f"validation labels {unseen.tolist()} do not occur in the training labels "
                f"{self.classes_.tolist()}"
            )
        return np.searchsorted(self.classes_, y)

    def _train_epoch(self, opt, xt, yt, gen) -> None:
        self.module_.train()
        for idx in torch.randperm(len(xt), generator=gen).split(self.batch_size):
            loss = self._loss(self.module_(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, y)

    def _validate(self, xv, yv) -> tuple[float, float]:
        """(validation loss, validation accuracy) of the module as it is now."""
        self.module_.eval()
        with torch.no_grad():
            logits = self.module_(xv)
            loss = self._loss(logits, yv).item()
            return loss, (logits.argmax(1) == yv).float().mean().item()

    def predict_proba(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float32)
        self.module_.eval()
        with torch.no_grad():
            logits = self.module_(torch.from_numpy(X).to(self._device()))
        return torch.softmax(logits, dim=1).cpu().numpy()

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def state(self) -> dict[str, np.ndarray]:
        return {
            "classes": self.classes_,
            **{k: v.cpu().numpy() for k, v in self.module_.state_dict().items()},
        }

    def load_state(self, state: dict[str, np.ndarray]) -> TorchHead:
        self.classes_ = state["classes"]
        self.n_features_in_ = len(state["scaler_mean"])
        self.module_ = self._build(self.n_features_in_, len(self.classes_))
        self.module_.load_state_dict(
            {k: torch.from_numpy(v) for k, v in state.items() if k != "classes"}
        )
        self.module_.eval()
        return self.moved_to(self.device)

    def moved_to(self, device: str) -> TorchHead:
        """This fitted head, to run on `device` (auto, cpu, cuda, cuda:N or mps)."""
        self.device = device
        self.module_.to(self._device())
        return self


class _Scaled(nn.Module):
    def __init__(self, n_features: int):
        super().__init__()
        self.register_buffer("scaler_mean", torch.zeros(n_features))
        self.register_buffer("scaler_std", torch.ones(n_features))

    def set_scaler(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.scaler_mean.copy_(torch.from_numpy(mean))
        self.scaler_std.copy_(torch.from_numpy(std))

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.scaler_mean) / self.scaler_std


class _MLP(_Scaled):
    def __init__(self, n_features, n_classes, hidden, dropout):
        super().__init__(n_features)
        layers, width = [], n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        self.net = nn.Sequential(*layers, nn.Linear(width, n_classes))

    def forward(self, x):  # (B, F) -> (B, classes) logits
        return self.net(self.scale(x))


class MLPHead(TorchHead):
    """A multilayer perceptron on standardized features."""

    def __init__(
        self,
        *,
        hidden=(512,),
        dropout=0.5,
        lr=1e-3,
        weight_decay=1e-4,
        batch_size=256,
        max_epochs=200,
        patience=10,
        random_state=0,
        device="auto",
    ):
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.random_state = random_state
        self.device = device

    def _build(self, n_features, n_classes):
        return _MLP(n_features, n_classes, tuple(self.hidden), self.dropout)


ROLES = ("llm", "encoder")


class _CoOccurrence(_Scaled):
    """The paper's fusion network.

    Each block (one LLM layer, one encoder) is projected to `width` with ReLU and dropout (an
    encoder block already `width` wide is fed as it is when `project_same_width` is False, as in the
    paper's code); the pairwise products P = Z·Zᵀ between projected blocks go through
    2·sigmoid(σ·P) − 1; the upper triangle (diagonal included: the rest repeats it) is flattened and
    concatenated with the mean of the blocks marked "llm"; an MLP maps that to the classes.
    """

    def __init__(
        self, block_sizes, block_roles, n_classes, width, hidden, dropout, sigma, project_same_width
    ):
        super().__init__(sum(block_sizes))
        self.block_sizes = list(block_sizes)
        self.llm_blocks = [i for i, r in enumerate(block_roles) if r == "llm"]
        self.sigma = sigma
        self.proj = nn.ModuleList(
            nn.Identity()
            if d == width and role == "encoder" and not project_same_width
            else nn.Sequential(nn.Linear(d, width), nn.ReLU(), nn.Dropout(dropout))
            for d, role in zip(block_sizes, block_roles, strict=True)
        )
        n = len(block_sizes)
        self.register_buffer("pairs", torch.triu_indices(n, n), persistent=False)
        layers, in_width = [], self.pairs.shape[1] + block_sizes[self.llm_blocks[0]]
        for h in hidden:
            layers += [nn.Linear(in_width, h), nn.ReLU(), nn.Dropout(dropout)]
            in_width = h
        self.mlp = nn.Sequential(*layers, nn.Linear(in_width, n_classes))

    def forward(self, x):  # (B, sum of block sizes) -> (B, classes) logits
        blocks = self.scale(x).split(self.block_sizes, dim=1)
        z = torch.stack(
            [p(b) for p, b in zip(self.proj, blocks, strict=True)], dim=1
        )  # (B, S, width)
        products = z @ z.transpose(1, 2)  # (B, S, S)
        co = 2 * torch.sigmoid(self.sigma * products) - 1
        co = co[:, self.pairs[0], self.pairs[1]]  # (B, S(S+1)/2)
        llm_mean = torch.stack([blocks[i] for i in self.llm_blocks]).mean(dim=0)  # (B, d_llm)
        return self.mlp(torch.cat([co, llm_mean], dim=1))


def check_blocks(sizes: list[int], roles: list[str], n_features: int) -> None:
    """Errors a user can trip with block_sizes / block_roles, each naming the fix."""
    if sum(sizes) != n_features:
        raise ValueError(
            f"block_sizes {sizes} add up to {sum(sizes)} but X has {n_features} columns"
        )
    if len(roles) != len(sizes):
        raise ValueError(
            f"block_roles has {len(roles)} entries for {len(sizes)} blocks (block_sizes {sizes}): "
            f"give one role per block, each one of {ROLES}"
        )
    wrong = [(i, r) for i, r in enumerate(roles) if r not in ROLES]
    if wrong:
        raise ValueError(f"block_roles {roles}: entries {wrong} are not one of {ROLES}")
    llm_sizes = {sizes[i] for i, r in enumerate(roles) if r == "llm"}
    if not llm_sizes:
        raise ValueError(
            f"block_roles {roles} marks no block 'llm': the paper's head averages the LLM's "
            "layers, so mark at least one"
        )
    if len(llm_sizes) > 1:
        raise ValueError(
            f"the blocks marked 'llm' must share one width to be averaged; their widths: "
            f"{[sizes[i] for i, r in enumerate(roles) if r == 'llm']} (block_sizes {sizes})"
        )


class LLMEmbedHead(TorchHead):
    """The paper's head (LLMEmbed, ACL 2024): learned co-occurrence fusion of several layers and
    backbones.

    `block_sizes` gives the widths of the blocks laid side by side in X and `block_roles` what each
    is: "llm" (a layer of the decoder LLM; all of one width, at least one, in any position) or
    "encoder"; the mean of the "llm" blocks joins the fused features. `standardize=False` feeds raw
    inputs and `project_same_width=False` feeds an encoder block already `width` wide without a
    projection: both as in the paper's code. The defaults standardize and project every block.
    `softmax_before_loss=True` trains as the paper's code does, a softmax on the outputs and then a
    cross-entropy that applies its own (a defect: it flattens the gradients); predictions are the
    same argmax either way.
    """

    def __init__(
        self,
        *,
        block_sizes=(),
        block_roles=(),
        width=1024,
        hidden=(1024, 256),
        dropout=0.5,
        sigma=0.01,
        standardize=True,
        project_same_width=True,
        softmax_before_loss=False,
        lr=1e-4,
        weight_decay=0.0,
        batch_size=1024,
        max_epochs=300,
        patience=20,
        random_state=0,
        device="auto",
    ):
        self.block_sizes = block_sizes
        self.block_roles = block_roles
        self.width = width
        self.hidden = hidden
        self.dropout = dropout
        self.sigma = sigma
        self.standardize = standardize
        self.project_same_width = project_same_width
        self.softmax_before_loss = softmax_before_loss
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.random_state = random_state
        self.device = device

    def check_params(self) -> None:
        super().check_params()
        _require(is_whole(self.width, 1), "width", self.width, "use a whole number, 1 or more")
        _require(_positive(self.sigma), "sigma", self.sigma, "use a positive number, e.g. 0.01")
        for name in ("standardize", "project_same_width", "softmax_before_loss"):
            _require(
                isinstance(getattr(self, name), bool),
                name,
                getattr(self, name),
                "use true or false",
            )

    def _build(self, n_features, n_classes):
        sizes, roles = list(self.block_sizes), list(self.block_roles)
        check_blocks(sizes, roles, n_features)
        return _CoOccurrence(
            sizes,
            roles,
            n_classes,
            self.width,
            tuple(self.hidden),
            self.dropout,
            self.sigma,
            self.project_same_width,
        )

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.softmax_before_loss:
            logits = torch.softmax(logits, dim=1)
        return nn.functional.cross_entropy(logits, y)


HEADS = {"logreg": LogRegHead, "mlp": MLPHead, "llmembed": LLMEmbedHead}
