"""Scores and their 95% intervals: pinned numbers, macro-F1 over the labels present, and the spread
over runs."""

import time

import numpy as np
import pytest
from sklearn.metrics import f1_score

from llmembed.classify.metrics import (
    bootstrap_macro_f1_interval,
    evaluate,
    summarize,
    wilson_interval,
)


def test_metrics_binary_and_multiclass():
    m = evaluate(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), ["neg", "pos"])
    assert m["accuracy"] == 0.75 and m["micro_f1"] == 0.75 and m["n"] == 4
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)  # both classes count, not only "pos"
    assert m["confusion_matrix"] == [[1, 1], [0, 2]]
    m3 = evaluate(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 2]), ["a", "b", "c"])
    assert m3["per_class"]["b"]["recall"] == 0
    assert m3["per_class"]["c"]["precision"] == pytest.approx(2 / 3)
    assert m3["absent_labels"] == [] and m3["macro_f1_labels"] == 3  # "b" has a row: it counts


@pytest.mark.parametrize(
    "successes, n, expected",
    [
        (80, 100, [0.7112, 0.8666]),
        (100, 100, [0.9630, 1.0]),  # never the degenerate [1, 1] of the normal interval
        (0, 10, [0.0, 0.2775]),
        (8500, 10000, [0.8429, 0.8569]),
    ],
)
def test_wilson_interval_pinned(successes, n, expected):
    assert wilson_interval(successes, n) == pytest.approx(expected, abs=5e-5)


def test_accuracy_interval_reflects_the_test_set_size():
    y = np.array([1] * 50 + [0] * 50)
    pred = y.copy()
    pred[:20] = 0  # 80 of 100 right
    assert evaluate(y, pred, ["neg", "pos"])["accuracy_ci"] == pytest.approx(
        [0.7112, 0.8666], abs=5e-5
    )
    big = evaluate(np.tile(y, 100), np.tile(pred, 100), ["neg", "pos"])
    assert big["accuracy_ci"] == pytest.approx(
        [0.7920, 0.8077], abs=5e-5
    )  # 100x the rows: 1/10 as wide


def test_macro_f1_counts_only_labels_present_in_truth_or_predictions():
    names = ["neg", "pos", "neutral"]
    m = evaluate(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1]), names)
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0  # was 0.667: "neutral" counted as F1 0
    assert m["absent_labels"] == ["neutral"] and m["macro_f1_labels"] == 2
    # The per-class report and the confusion matrix still hold every label.
    assert list(m["per_class"]) == names and np.shape(m["confusion_matrix"]) == (3, 3)
    # A label only predicted (never true) is present: its F1 is 0 and it counts.
    m = evaluate(np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1]), names)
    assert m["absent_labels"] == [] and m["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert m["macro_f1"] == pytest.approx(f1_score([0, 0, 1, 1], [0, 2, 1, 1], average="macro"))


def noisy_predictions(n, classes=4, right=0.8, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    return y, np.where(rng.random(n) < right, y, rng.integers(0, classes, n))


def test_macro_f1_bootstrap_interval_is_seeded_fast_and_matches_resampling_rows():
    y, p = noisy_predictions(10_000)
    t = time.perf_counter()
    m = evaluate(y, p, list("abcd"))
    assert time.perf_counter() - t < 1.0  # 1,000 resamples of 10k rows: ~20 ms on a quiet core
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    lo, hi = m["macro_f1_ci"]
    assert (
        lo < m["macro_f1"] < hi and m["macro_f1_ci"] == evaluate(y, p, list("abcd"))["macro_f1_ci"]
    )
    assert [lo, hi] == pytest.approx([0.8437, 0.8575], abs=5e-4)
    # The multinomial draw over confusion cells is the row bootstrap: compare with resampling rows.
    y, p = noisy_predictions(2_000, seed=2)
    rng = np.random.default_rng(7)
    rows = rng.integers(0, len(y), (1000, len(y)))
    naive = [f1_score(y[r], p[r], average="macro") for r in rows]
    cm = np.array(evaluate(y, p, list("abcd"))["confusion_matrix"])
    assert bootstrap_macro_f1_interval(cm) == pytest.approx(
        np.percentile(naive, [2.5, 97.5]), abs=4e-3
    )


def test_summarize_over_runs_sample_std_and_t_interval():
    runs = [
        {"accuracy": 0.8, "accuracy_ci": [0.7, 0.9], "macro_f1": 0.7},
        {"accuracy": 0.9, "accuracy_ci": [0.8, 0.95], "macro_f1": 0.9},
        {"accuracy": 0.85, "accuracy_ci": [0.75, 0.92], "macro_f1": 0.8},
    ]
    s = summarize(runs, keys=("accuracy", "macro_f1"))
    acc = s["accuracy"]
    assert acc["n"] == 3 and acc["mean"] == pytest.approx(0.85)
    assert acc["std"] == pytest.approx(0.05)  # ddof=1: the population std would be 0.0408
    # mean ± t(0.975, 2) · s / √3 = 0.85 ± 4.3027 · 0.05 / 1.7321
    assert acc["ci"] == pytest.approx([0.7258, 0.9742], abs=5e-5)
    two = summarize(runs[:2], keys=("accuracy",))["accuracy"]
    # t(0.975, 1) = 12.71: two runs say little, and the bound past 1 is clipped to 1.
    assert two["std"] == pytest.approx(0.0707107, abs=1e-7) and two["ci"] == pytest.approx(
        [0.2147, 1.0], abs=5e-5
    )


def test_summarize_single_run_uses_its_test_set_interval():
    s = summarize(
        [{"accuracy": 0.8, "accuracy_ci": [0.7112, 0.8666], "micro_f1": 0.8}],
        keys=("accuracy", "micro_f1"),
    )
    assert s["accuracy"] == {"mean": 0.8, "std": 0.0, "n": 1, "ci": [0.7112, 0.8666]}
    assert s["micro_f1"]["ci"] is None  # no interval of its own: none invented
    m = evaluate(np.array([0, 1] * 50), np.array([0, 1] * 40 + [1, 0] * 10), ["a", "b"])
    assert summarize([m])["macro_f1"]["ci"] == m["macro_f1_ci"]
