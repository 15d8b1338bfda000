"""The few statistics a sweep's report rests on: an interval over seeds, a paired test on the same questions and the
smallest difference it could show, a correction for testing many pairs at once, and the baseline of always giving the
most frequent answer."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """The mean of `values` and the half-width of its Student-t interval (n - 1 degrees of freedom); one value has no
    interval, its half-width is nan."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = float(data.mean())
    if data.size == 1:
        return mean, math.nan
    quantile = stats.t.ppf((1 + confidence) / 2, data.size - 1)
    return mean, float(quantile * data.std(ddof=1) / math.sqrt(data.size))


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval (low, high) of an accuracy of `correct` out of `n` questions: one evaluation's
    uncertainty over the questions it drew. Unlike the normal approximation it stays within [0, 1] and does not shrink
    to a point at 0 or n correct."""
    if not 0 <= correct <= n or n == 0:
        raise ValueError(f"wilson_interval needs 0 <= correct <= n and n > 0; got {correct} of {n}")
    z = float(stats.norm.ppf((1 + confidence) / 2))
    share = correct / n
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class McNemar:
    """Paired correctness of two evaluations of the same questions: how many each got right alone, and the p-value."""

    n: int
    both: int
    a_only: int
    b_only: int
    neither: int
    p: float


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> McNemar:
    """Exact two-sided McNemar test: `a[i]` and `b[i]` say whether each evaluation answered question i correctly.

    Only the discordant questions carry information; under no difference each is equally likely to favour a or b, so
    the smaller count is binomial(a_only + b_only, 1/2).
    """
    if len(a) != len(b):
        raise ValueError(f"McNemar needs the same questions in both evaluations: {len(a)} answers against {len(b)}")
    pairs = Counter(zip(map(bool, a), map(bool, b)))
    a_only, b_only = pairs[True, False], pairs[False, True]
    discordant = a_only + b_only
    p = 1.0 if discordant == 0 else min(1.0, 2 * float(stats.binom.cdf(min(a_only, b_only), discordant, 0.5)))
    return McNemar(len(a), pairs[True, True], a_only, b_only, pairs[False, False], p)


def detectable_difference(n: int, discordant: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The resolution of an exact McNemar test on `n` questions of which `discordant` (a_only + b_only) were
    discordant: the smallest accuracy difference delta = (a_only - b_only) / n, as a fraction of n, that the test of
    `mcnemar` at level `alpha` calls significant with probability `power`.

    Conditional on the D discordant questions, a difference delta makes each one favour a with probability
    q = 1/2 + delta * n / (2 * D), so a_only ~ binomial(D, q). The test rejects on a fixed set of a_only values; the
    probability of that set grows with q on [1/2, 1] (the set is symmetric and holds only the tails), so the smallest q
    that reaches `power` is found by bisection, and delta = (2q - 1) * D / n.

    Returns math.inf when no difference of any size could be shown with so few discordant questions: even the most
    lopsided split of D has p above `alpha` (always so for D <= 5 at 0.05), so the test cannot reject at all.
    """
    if n < 1:
        raise ValueError(f"detectable_difference needs at least one question, got n = {n}")
    if not 0 <= discordant <= n:
        raise ValueError(f"detectable_difference needs 0 <= discordant <= n = {n}, got discordant = {discordant}")
    if not 0 < alpha < 1:
        raise ValueError(f"detectable_difference needs 0 < alpha < 1, got alpha = {alpha}")
    if not 0 < power < 1:
        raise ValueError(f"detectable_difference needs 0 < power < 1, got power = {power}")
    splits = np.arange(discordant + 1)  # the possible values of a_only
    smaller = np.minimum(splits, discordant - splits)
    # the same rule as mcnemar's p, computed once for every split
    rejected = splits[np.minimum(1.0, 2 * stats.binom.cdf(smaller, discordant, 0.5)) <= alpha]
    if rejected.size == 0:  # D = 0 included: a p of 1 is never below alpha
        return math.inf

    def rejection_probability(q: float) -> float:
        return float(stats.binom.pmf(rejected, discordant, q).sum())

    # at q = 1 every discordant question favours a: a_only = D, the most lopsided split, rejected whenever any is; so
    # the rejection probability there is 1 >= power, and the answer lies within delta <= D / n
    low, high = 0.5, 1.0
    if rejection_probability(low) >= power:
        return 0.0
    while high - low > 1e-10:
        middle = (low + high) / 2
        low, high = (low, middle) if rejection_probability(middle) >= power else (middle, high)
    return (2 * high - 1) * discordant / n


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the order given: the i-th smallest is multiplied by (m - i + 1), then made
    non-decreasing in that order and capped at 1, so that comparing each with 0.05 controls the family-wise error."""
    order = np.argsort(pvalues, kind="stable")
    m = len(order)
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(pvalues[index])))
        adjusted[index] = running
    return adjusted


def majority_baseline(golds: Sequence[str]) -> tuple[str, float]:
    """The most frequent gold answer (the first met among equals) and its share: the accuracy of always answering it."""
    if not golds:
        raise ValueError("majority_baseline needs at least one gold answer")
    answer, count = Counter(golds).most_common(1)[0]
    return answer, count / len(golds)


def interval(values: pd.Series) -> tuple[float, float]:
    """mean_interval of the values present; (nan, nan) when there are none."""
    values = values.dropna()
    return mean_interval(values.tolist()) if len(values) else (math.nan, math.nan)
