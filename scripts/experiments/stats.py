"""Intervals and paired tests over repeated random splits (the page's comparisons).

Every method of docs/RESULTS.md is scored on the same J random train / validation / test splits of a
data set. The splits' training sets overlap (any two share most of their rows), so the J scores are
positively correlated and the plain t-interval, variance s²/J, is optimistic: it treats them as
independent. Nadeau & Bengio (2003, "Inference for the generalization error", Machine Learning 52)
correct the variance of a mean over J resplits to (1/J + n_test/n_train)·s², with J - 1 degrees of
freedom: the corrected resampled t-test. n_train counts every row a method learns from (training
and validation rows: choices are made on validation), n_test the rows it is scored on.

Two methods on the same splits are compared by the same test on their per-split differences
(paired: split-to-split variation common to both cancels). Scores live in [0, 1]: an interval of a
score that reaches past either end is clipped there, and `clipped` says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    lo: float
    hi: float
    clipped: bool = False  # an end was cut to [0, 1]


@dataclass(frozen=True)
class Paired:
    """`a` minus `b` over the same splits: the mean difference, its corrected interval, and the
    two-sided p-values of the corrected and of the plain paired t-test."""

    diff: float
    ci: Interval
    p: float
    p_plain: float
    n: int


def _t(values: Sequence[float], inflation: float) -> tuple[float, float, int]:
    """(mean, standard error, degrees of freedom) with the variance of the mean inflated from
    1/J to `inflation`."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        raise ValueError(f"an interval over splits needs two or more splits, got {len(v)}")
    return float(v.mean()), float(np.sqrt(inflation * v.var(ddof=1))), len(v) - 1


def _correction(n: int, n_train: int, n_test: int) -> float:
    if n_train <= 0 or n_test <= 0:
        raise ValueError(f"n_train ({n_train}) and n_test ({n_test}) must be positive")
    return 1 / n + n_test / n_train


def interval(
    values: Sequence[float], *, n_train: int | None = None, n_test: int | None = None
) -> Interval:
    """95% t-interval of the mean of per-split scores, clipped to [0, 1]: the plain one, or with
    `n_train` and `n_test` Nadeau and Bengio's corrected one."""
    n = len(values)
    inflation = 1 / n if n_train is None else _correction(n, n_train, n_test)
    mean, se, df = _t(values, inflation)
    half = stats.t.ppf(0.5 + LEVEL / 2, df) * se
    lo, hi = mean - half, mean + half
    return Interval(float(max(0.0, lo)), float(min(1.0, hi)), bool(lo < 0.0 or hi > 1.0))


def paired(a: Sequence[float], b: Sequence[float], *, n_train: int, n_test: int) -> Paired:
    """The corrected resampled t-test of `a - b` (per-split scores of two methods, in the same
    split order), with the plain paired t-test's p-value beside it."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same splits: {len(a)} against {len(b)} values")
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(d)
    mean, se, df = _t(d, _correction(n, n_train, n_test))
    _, se_plain, _ = _t(d, 1 / n)
    half = stats.t.ppf(0.5 + LEVEL / 2, df) * se
    return Paired(
        diff=mean,
        ci=Interval(mean - half, mean + half),
        p=_two_sided(mean, se, df),
        p_plain=_two_sided(mean, se_plain, df),
        n=n,
    )


def _two_sided(mean: float, se: float, df: int) -> float:
    if se == 0.0:  # every split gave the same difference: no spread to test against
        return 1.0 if mean == 0.0 else float("nan")
    return float(2 * stats.t.sf(abs(mean / se), df))


def common_splits(a: dict, b: dict) -> tuple[list[float], list[float]]:
    """The per-split values of two summaries over the splits (`seeds`) both have, in the same
    order; a summary written without `seeds` covers the protocol's splits 0..n-1 in order."""
    sa, sb = a.get("seeds", list(range(a["n"]))), b.get("seeds", list(range(b["n"])))
    both = [s for s in sa if s in sb]
    return [a["values"][sa.index(s)] for s in both], [b["values"][sb.index(s)] for s in both]


def p_text(p: float) -> str:
    """A p-value as the page prints it (undefined where the differences have no spread)."""
    if p != p:
        return "– (no spread)"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"
