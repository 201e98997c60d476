"""Scores of a classifier on one split, the same for binary and multi-class tasks, with 95% intervals
that say how much a score could move on another test set of the same size (`evaluate`) or another
seed or split (`summarize`)."""

from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

LEVEL = 0.95
Z = float(stats.norm.ppf(0.5 + LEVEL / 2))  # 1.959964: two-sided 95% normal quantile
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0  # fixed, so an interval is reproducible from the predictions alone


def wilson_interval(successes: int, n: int, z: float = Z) -> list[float]:
    """Wilson score interval of a proportion: unlike the normal (Wald) interval it stays inside
    [0, 1] and keeps its coverage near 0 and 1, where accuracies of good classifiers live."""
    if n <= 0:
        raise ValueError(f"an interval needs at least one row, got n={n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def macro_f1_from_confusions(cm: np.ndarray) -> np.ndarray:
    """Macro-F1 of each confusion matrix in cm (..., K, K; rows truth), averaged over the labels
    present in truth or predictions: a label with no row and no prediction has no F1 at all."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support, predicted = cm.sum(axis=-1), cm.sum(axis=-2)
    denom = support + predicted  # 2·tp + fp + fn
    present = denom > 0
    f1 = np.divide(2 * tp, denom, out=np.zeros(denom.shape), where=present)
    return f1.sum(axis=-1) / np.maximum(present.sum(axis=-1), 1)


def bootstrap_macro_f1_interval(
    cm: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> list[float]:
    """Percentile bootstrap interval of macro-F1 over test rows. Resampling n rows with
    replacement only changes how many rows fall in each (truth, prediction) cell, so it is drawn as
    one multinomial over the K² cells: the same distribution as resampling rows, in O(resamples·K²)
    whatever the number of rows."""
    n, k = int(cm.sum()), cm.shape[0]
    cells = np.random.default_rng(seed).multinomial(n, cm.ravel() / n, size=resamples)
    scores = macro_f1_from_confusions(cells.reshape(resamples, k, k))  # (resamples,)
    lo, hi = np.percentile(scores, [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
    return [float(lo), float(hi)]


def evaluate(y_true: np.ndarray, y_pred: np.ndarray, label_names: list[str]) -> dict:
    """Accuracy with its Wilson interval, macro-F1 (over the labels present in truth or
    predictions) with a bootstrap interval, micro-F1, the labels left out of macro-F1, a per-class
    report and the confusion matrix (rows: truth). Per-class report and matrix keep all labels."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        raise ValueError("evaluate needs at least one row; this split is empty")
    labels = list(range(len(label_names)))
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    report = classification_report(
        y_true, y_pred, labels=labels, target_names=label_names, output_dict=True, zero_division=0
    )
    present = [i for i in labels if cm[i].sum() + cm[:, i].sum() > 0]
    return {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "accuracy_ci": wilson_interval(int(np.trace(cm)), len(y_true)),
        "macro_f1": float(macro_f1_from_confusions(cm)),
        "macro_f1_ci": bootstrap_macro_f1_interval(cm),
        "macro_f1_labels": len(present),  # how many labels macro-F1 averages
        "absent_labels": [label_names[i] for i in labels if i not in present],
        "micro_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="micro", zero_division=0)
        ),
        "per_class": {name: {k: float(v) for k, v in report[name].items()} for name in label_names},
        "confusion_matrix": cm.tolist(),
    }


def t_interval(values: np.ndarray) -> list[float]:
    """Student-t interval of the mean over runs (n >= 2), clipped to [0, 1] where scores live."""
    n = len(values)
    half = stats.t.ppf(0.5 + LEVEL / 2, n - 1) * np.std(values, ddof=1) / np.sqrt(n)
    mean = float(np.mean(values))
    return [max(0.0, mean - half), min(1.0, mean + half)]


def summarize(runs: list[dict], keys=("accuracy", "macro_f1", "micro_f1")) -> dict:
    """Per metric over runs (seeds or repeated splits): {mean, std, n, ci: [lo, hi]}.

    `std` is the sample standard deviation (ddof=1); with a single run there is no spread to
    measure and it is 0.0 (read `n`). `ci` is a 95% t-interval of the mean over runs when n >= 2.
    Over seeds on one split it reflects training randomness only, not the test set's sampling: for
    that, read each run's own `<metric>_ci`. With a single run `ci` is that run's test-set interval
    (None for a metric without one, such as micro-F1)."""
    if not runs:
        raise ValueError("summarize needs at least one run")
    out = {}
    for k in keys:
        values = np.array([r[k] for r in runs], dtype=float)
        single = len(values) == 1
        ci = runs[0].get(f"{k}_ci") if single else t_interval(values)
        out[k] = {
            "mean": float(values.mean()),
            "std": 0.0 if single else float(np.std(values, ddof=1)),
            "n": len(values),
            "ci": None if ci is None else [float(x) for x in ci],
        }
    return out
