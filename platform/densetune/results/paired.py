"""One model's answers to benchmarks as a reviewer reads them: per benchmark the accuracy with its 95% interval over
the questions, the majority baseline, and, for an adapter scored with its base model on the same questions, the
difference with an exact McNemar test, Holm-adjusted across the table's rows (densetune.evaluate prints it)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import pandas as pd

from ..trial.evaluate import Prediction
from .comparisons import with_tests
from .stats import majority_baseline, mcnemar, wilson_interval
from .tables import percent

Answers = Mapping[str, Sequence[Prediction]]  # benchmark -> its predictions, in the order of its questions


def families(predictions: Sequence[Prediction]) -> list[str]:
    """accuracy, and accuracy_norm where the predictions have length-normalised picks (text protocol)."""
    return ["accuracy", *(["accuracy_norm"] if predictions and predictions[0].correct_norm is not None else [])]


def correctness(predictions: Sequence[Prediction], family: str) -> list[bool]:
    return [bool(p.correct_norm if family == "accuracy_norm" else p.correct) for p in predictions]


def scores_table(model: Answers, base: Answers = {}) -> pd.DataFrame:
    """One row per benchmark and accuracy family: questions, accuracy and its Wilson interval (low, high), the
    majority baseline; with `base` (the base model's answers to the same questions) also its accuracy and the paired
    test of `model` (a) against it (b): comparisons.with_tests' columns."""
    rows = []
    for name, predictions in model.items():
        paired = base.get(name)
        if paired is not None and [p.index for p in paired] != [p.index for p in predictions]:
            raise ValueError(f"{name}: the base model answered other questions than the adapter; no paired test")
        for family in families(predictions):
            correct = correctness(predictions, family)
            low, high = wilson_interval(sum(correct), len(correct))
            row = {
                "benchmark": name, "metric": family, "questions": len(correct), "accuracy": sum(correct) / len(correct),
                "low": low, "high": high, "majority": majority_baseline([p.gold for p in predictions])[1],
            }
            if paired is not None:
                row["result"] = mcnemar(correct, correctness(paired, family))
            rows.append(row)
    frame = pd.DataFrame(rows)
    return with_tests(frame, "adapter better", "base better") if base else frame


def printable(table: pd.DataFrame) -> str:
    """The table as the command prints it: percentages, the interval, counts of the discordant questions."""
    shown = pd.DataFrame({
        "benchmark": table["benchmark"], "metric": table["metric"], "questions": table["questions"],
        "accuracy (95% CI)": [f"{percent(a)} ({percent(lo)}-{percent(hi)})"
                              for a, lo, hi in zip(table["accuracy"], table["low"], table["high"])],
        "majority": table["majority"].map(percent),
    })
    if "p" in table:
        shown["base"] = table["accuracy_b"].map(percent)
        shown["adapter-base"] = [f"{100 * (a - b):+.1f}" for a, b in zip(table["accuracy_a"], table["accuracy_b"])]
        shown["only adapter/only base right"] = [f"{a}/{b}" for a, b in zip(table["a_only"], table["b_only"])]
        shown["p (Holm)"] = [f"{p:.3g} ({q:.3g})" for p, q in zip(table["p"], table["p_holm"])]
        shown["verdict"] = table["verdict"]
    return shown.to_string(index=False)


def answers_given(model: Answers, base: Answers = {}) -> list[str]:
    """Per benchmark, how often each answer was given by the model (and the base model) and is right: a model that
    learned the label prior moves towards the majority answer without telling the questions apart."""
    lines = []
    for name, predictions in model.items():
        lines.append(f"{name} answers:")
        sides = [("gold", [p.gold for p in predictions]), ("model", [str(p.extracted) for p in predictions])]
        if name in base:
            sides.append(("base", [str(p.extracted) for p in base[name]]))
        for side, answers in sides:
            counts = ", ".join(f"{answer} {n}" for answer, n in sorted(Counter(answers).items()))
            lines.append(f"  {side:5s} {counts}")
    return lines
