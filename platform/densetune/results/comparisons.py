"""The report's comparisons: pure functions over a sweep's finished trials (a frame, as results.store reads them) and
their answers, with no MLflow in sight. Paired McNemar tests of the same questions, before against after training and
trial against trial, Holm-adjusted within the family a table tests; the gain of training; the majority baseline; the
configurations' means and the Pareto front of accuracy against size.
"""

from __future__ import annotations

import itertools
import math
from typing import Mapping, Optional

import numpy as np
import pandas as pd

from ..sweep.selection import is_test_metric
from .stats import McNemar, detectable_difference, holm, majority_baseline, mcnemar
from .store import AVERAGE, Answers, Key

ALPHA = 0.05  # a difference is called one where the Holm-adjusted p is below this
NO_DIFFERENCE = "no difference shown"
PAIR_COLUMNS = ("trial_a", "trial_b", "configuration_a", "configuration_b", "seed_a", "seed_b", "same_seed",
                "same_configuration")
TEST_COLUMNS = ("n", "both", "a_only", "b_only", "neither", "accuracy_a", "accuracy_b", "p", "p_holm", "detectable",
                "verdict")


def gain(trials: pd.DataFrame, metric: str) -> pd.Series:
    """What training added to `metric`, per trial: trained minus untuned (nan where either is missing)."""
    return trials[f"trained_{metric}"] - trials[f"untuned_{metric}"]


def compare(a: dict[Key, dict], b: dict[Key, dict]) -> McNemar:
    """McNemar of two evaluations of the same questions, matched by benchmark and index."""
    keys = sorted(a)
    return mcnemar([bool(a[k]["correct"]) for k in keys], [bool(b[k]["correct"]) for k in keys])


def verdict(adjusted: float, result: McNemar, a_wins: str, b_wins: str) -> str:
    """The word a table shows: the side that won, only where the Holm-adjusted p is below ALPHA."""
    if adjusted >= ALPHA:
        return NO_DIFFERENCE
    return a_wins if result.a_only > result.b_only else b_wins


def before_vs_after(finished: pd.DataFrame, answers: Mapping[str, Answers]) -> pd.DataFrame:
    """Per finished trial that evaluated at start: McNemar of its step-0 answers against its final ones (`answers`:
    run id -> its answers)."""
    rows = []
    for _, trial in finished.iterrows():
        own = answers.get(trial["run_id"])
        if own and own.trained and own.untuned.keys() == own.trained.keys():
            result = compare(own.untuned, own.trained)
            rows.append({"trial": trial["trial_id"], "configuration": trial["configuration"], "seed": trial.get("seed"),
                         "result": result})
    return with_tests(pd.DataFrame(rows, columns=["trial", "configuration", "seed", "result"]), "worse", "better")


def pairs(finished: pd.DataFrame, answers: Mapping[str, Answers]) -> pd.DataFrame:
    """McNemar between every two finished trials evaluated on the same questions (final answers, benchmarks
    pooled); the family tested together is the pairs that share a seed and differ in configuration."""
    trials = [t for _, t in finished.iterrows() if t["run_id"] in answers]
    rows = []
    for a, b in itertools.combinations(trials, 2):
        first, second = answers[a["run_id"]].trained, answers[b["run_id"]].trained
        if first and first.keys() == second.keys():
            rows.append({
                "trial_a": a["trial_id"], "trial_b": b["trial_id"],
                "configuration_a": a["configuration"], "configuration_b": b["configuration"],
                "seed_a": a.get("seed"), "seed_b": b.get("seed"), "same_seed": a.get("seed") == b.get("seed"),
                "same_configuration": a["configuration"] == b["configuration"], "result": compare(first, second),
            })
    frame = pd.DataFrame(rows, columns=[*PAIR_COLUMNS, "result"])
    return with_tests(frame, "A better", "B better", frame["same_seed"] & ~frame["same_configuration"])


def with_tests(frame: pd.DataFrame, a_wins: str, b_wins: str, family: Optional[pd.Series] = None) -> pd.DataFrame:
    """The frame's McNemar results (column `result`) spread into columns, Holm-adjusted across the rows of
    `family` (default: all); the other rows get no adjusted p and no verdict."""
    results = list(frame["result"])
    tested = [True] * len(results) if family is None else list(family)
    adjusted = iter(holm([r.p for r, t in zip(results, tested) if t]))
    rows = []
    for r, t in zip(results, tested):
        q = next(adjusted) if t else math.nan
        rows.append({
            "n": r.n, "both": r.both, "a_only": r.a_only, "b_only": r.b_only, "neither": r.neither,
            "accuracy_a": (r.both + r.a_only) / r.n, "accuracy_b": (r.both + r.b_only) / r.n, "p": r.p,
            "p_holm": q, "detectable": detectable_difference(r.n, r.a_only + r.b_only, ALPHA),
            "verdict": verdict(q, r, a_wins, b_wins) if t else "",
        })
    return frame.drop(columns="result").join(pd.DataFrame(rows, index=frame.index, columns=TEST_COLUMNS))


def majority(answers: Answers, benchmark: str) -> tuple[str, float]:
    """The majority answer of a benchmark's evaluated questions and its share; for the average, the mean share."""
    if benchmark == AVERAGE:
        shares = [majority(answers, name)[1] for name in sorted({b for b, _ in answers.trained})]
        return "", float(np.mean(shares)) if shares else math.nan
    golds = [str(r["gold"]) for (b, _), r in answers.trained.items() if b == benchmark]
    return majority_baseline(golds) if golds else ("", math.nan)


def configuration_means(finished: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per configuration: its label, mean trainable parameters and the mean trained `metric` (for the Pareto front:
    the validation accuracy)."""
    groups = finished.groupby("configuration", sort=False)
    return pd.DataFrame({
        "label": groups["label"].first(), "trainable_params": groups["trainable_params"].mean(),
        "accuracy": groups[f"trained_{metric}"].mean(),
    }).dropna()


def pareto_front(means: pd.DataFrame) -> pd.DataFrame:
    """The configurations no other one beats with as few parameters or fewer: the most accurate for their size."""
    ordered = means.sort_values(["trainable_params", "accuracy"], ascending=[True, False])
    best_before = ordered["accuracy"].cummax().shift(fill_value=-math.inf)
    return ordered[ordered["accuracy"] > best_before]


def baselines(answers: Mapping[str, Answers], points: pd.DataFrame, metric: str) -> dict[str, float]:
    """What a figure's accuracies are to be read against: the untuned model (its mean over the trials that evaluated it)
    and, for the test split, always giving the majority answer (every trial answers the same questions; the answers
    kept are the test split's)."""
    lines = {}
    if f"untuned_{metric}" in points and points[f"untuned_{metric}"].notna().any():
        lines["untuned model"] = float(points[f"untuned_{metric}"].mean())
    if not is_test_metric(metric):
        return lines
    kept = next((answers[r] for r in points["run_id"] if r in answers), None)
    if kept is not None and kept.trained:
        lines["majority answer"] = majority(kept, AVERAGE)[1]
    return lines


def distinct(trials: pd.DataFrame, column: str) -> int:
    """How many values `column` takes (0 where the trials lack it): a table or figure needs at least 2."""
    return trials[column].nunique() if column in trials else 0
