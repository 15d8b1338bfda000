"""How a sweep chooses: what its searcher and scheduler may see, and which trial (or configuration) is best.

Three splits (../shared/DESIGN.md): a trial trains on its training rows, is chosen on the validation set held out
from them (val/...), and is reported on the benchmark's test split (accuracy/..., accuracy_norm/...). Every choice
reads validation metrics or a trial's size, never a test metric: a sweep's objectives are checked here, the results
its searcher and scheduler receive are stripped of test metrics here, and the best trial is picked here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from ..config import TEST_PREFIXES, VAL_PREFIX

FINISHED = "FINISHED"


def is_test_metric(name: str) -> bool:
    return name.startswith(TEST_PREFIXES)


def without_test_metrics(result: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's result as a searcher or a scheduler may see it: every test-split metric removed."""
    return {k: v for k, v in result.items() if not is_test_metric(k)}


def check_objective(metric: str) -> None:
    """A sweep chooses on validation metrics (or a trial's size); a test metric as its objective is refused."""
    if is_test_metric(metric):
        raise ValueError(
            f"metric {metric!r} is measured on the test split, which is reported and never chosen on: use "
            f"{VAL_PREFIX}{metric} (the validation set held out from the training rows)"
        )


@dataclass(frozen=True)
class Candidate:
    """A trial (or a configuration) as the choice sees it: `key` breaks ties (the trial id: the earlier trial wins)."""

    key: str
    metrics: Mapping[str, float]
    status: str = FINISHED
    diverged: bool = False


def best(candidates: Sequence[Candidate], objectives: Sequence[tuple[str, str]]) -> Optional[Candidate]:
    """The best finished, non-diverged candidate that has a finite value of every objective: the best on the first
    objective (mode "max" or "min"), ties broken by the next ones, then by the smallest key. None if none qualifies.

    Killed (stopped early), failed and diverged trials are never chosen: their last values were not measured at the
    end of training.
    """

    def eligible(candidate: Candidate) -> bool:
        values = [candidate.metrics.get(metric) for metric, _ in objectives]
        return (
            candidate.status == FINISHED and not candidate.diverged
            and all(v is not None and math.isfinite(v) for v in values)
        )

    def order(candidate: Candidate) -> tuple:
        signed = [-candidate.metrics[m] if mode == "max" else candidate.metrics[m] for m, mode in objectives]
        return (*signed, candidate.key)

    found = [c for c in candidates if eligible(c)]
    return min(found, key=order) if found else None
