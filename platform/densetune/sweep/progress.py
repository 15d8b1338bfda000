"""What a sweep shows while it runs: what it will run, a line when each trial starts and ends, and a live progress line
(trial k of n, step s of S, loss, ETA) on the console of trial/console.py: a tqdm bar in a terminal, plain lines
elsewhere, with Ray's own output in the sweep's log (`output_to`) unless the user asks for it (-v).
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

from ray import tune

from .callbacks import RestorableCallback
from ..config import DIVERGED, flat_params, settings_label
from ..trial.console import clock, console

ENDED = ("TERMINATED", "ERROR")  # Tune's statuses of a trial that will not run again


class SweepProgress(RestorableCallback):
    """A Tune callback on the sweep's driver that tells the console how the trials go.

    Trials are numbered in the order Tune created them (the same after a resume). The ETA assumes that the steps still
    to run go at the pace that steps went between a trial's reports, and that each trial still to run costs, on top of its
    steps, what the trials that ended cost beyond theirs (start-up, evaluations; before any ended: what running trials
    took to their first report); trials share the time as many at once as run now.
    """

    def __init__(self, planned: int, searched: Sequence[str], metric: str):
        self.planned, self.searched, self.metric = planned, list(searched), metric
        self._reset()

    def _reset(self) -> None:
        self._started = time.monotonic()
        self._steps: dict[str, int] = {}  # trial id -> steps done (all of them once it ended)
        self._totals: dict[str, int] = {}  # trial id -> its total steps, once it reported them
        self._values: dict[str, float] = {}  # trial id -> last value of the metric
        self._running: dict[str, str] = {}  # trial id -> "k/n", of the trials that run now
        self._ended: set[str] = set()  # trials ended while this driver watched
        self._earlier: set[str] = set()  # trials that had ended before (a resumed sweep)
        self._losses: dict[str, float] = {}  # trial id -> its last loss (none at step 0)
        self._began: dict[str, float] = {}  # trial id -> when it started
        self._first: dict[str, tuple[float, int]] = {}  # trial id -> (when, step) of its first report with a step
        self._last: dict[str, tuple[float, int]] = {}  # trial id -> the same, of its last
        self._overheads: list[float] = []  # of each ended trial, its time beyond its steps

    def setup(self, **info: Any) -> None:
        self._reset()

    def on_trial_start(self, iteration: int, trials: list, trial: tune.experiment.Trial, **info: Any) -> None:
        self._earlier |= {t.trial_id for t in trials if t.status in ENDED and t.trial_id not in self._ended}
        self._running[trial.trial_id] = f"{trials.index(trial) + 1}/{max(self.planned, len(trials))}"
        self._began[trial.trial_id] = time.monotonic()
        self._line(trial, "started")

    def on_trial_result(self, iteration: int, trials: list, trial: tune.experiment.Trial, result: dict, **info: Any) -> None:
        if "step" not in result or DIVERGED in result:
            return
        self._steps[trial.trial_id] = int(result["step"])
        self._last[trial.trial_id] = (time.monotonic(), int(result["step"]))
        self._first.setdefault(trial.trial_id, self._last[trial.trial_id])
        if "total_steps" in result:
            self._totals[trial.trial_id] = int(result["total_steps"])
        if result.get(self.metric) is not None:
            self._values[trial.trial_id] = float(result[self.metric])
        if result.get("loss") is not None:
            self._losses[trial.trial_id] = float(result["loss"])
        self._progress(trial)

    def on_trial_complete(self, iteration: int, trials: list, trial: tune.experiment.Trial, **info: Any) -> None:
        last = trial.last_result or {}
        step, total = self._steps.get(trial.trial_id, 0), self._totals.get(trial.trial_id)
        if DIVERGED in last:
            outcome = f"diverged at step {last[DIVERGED]} (its loss was not finite)"
        elif total is not None and step < total:
            outcome = f"stopped early at step {step} of {total}"
        else:
            value = self._values.get(trial.trial_id)
            outcome = "finished" + (f": {self.metric} {value:.4f}" if value is not None else "")
        self._end(trial, f"{outcome}, {last.get('time_total_s', 0):.0f} s")

    def on_trial_error(self, iteration: int, trials: list, trial: tune.experiment.Trial, **info: Any) -> None:
        self._end(trial, f"FAILED: {getattr(trial, 'error_file', None) or 'see the log'}")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        console().close_bar()

    # helpers

    def _label(self, trial: tune.experiment.Trial) -> str:
        return settings_label(flat_params(trial.config), self.searched)

    def _line(self, trial: tune.experiment.Trial, what: str) -> None:
        console().say(f"[{self._running.get(trial.trial_id, '?')}] {self._label(trial)} {what}")

    def _end(self, trial: tune.experiment.Trial, what: str) -> None:
        self._line(trial, what)
        self._running.pop(trial.trial_id, None)
        self._ended.add(trial.trial_id)  # what it did not run (stopped early, failed) is left out of the ETA
        pace = self.step_s()
        if trial.trial_id in self._began and pace is not None:
            spent = time.monotonic() - self._began[trial.trial_id]
            self._overheads.append(max(0.0, spent - self._steps.get(trial.trial_id, 0) * pace))
        self._progress(trial)

    def progress_line(self, trial: tune.experiment.Trial) -> str:
        """d/n trials done · trial k/n step s/S (the trial that reported last, while it runs) · loss · elapsed · ETA."""
        parts = [f"{len(self._ended | self._earlier)}/{self.planned} trials done"]
        if trial.trial_id in self._running:
            total = self._totals.get(trial.trial_id)
            parts.append(f"trial {self._running[trial.trial_id]} step {self._steps.get(trial.trial_id, 0)}/{total or '?'}")
            if trial.trial_id in self._losses:
                parts.append(f"loss {self._losses[trial.trial_id]:.4f}")
        parts.append(f"{clock(time.monotonic() - self._started)} elapsed")
        eta = self.eta_s()
        parts.append(f"ETA {clock(eta)}" if eta is not None else "ETA ?")
        return " · ".join(parts)

    def step_s(self) -> Optional[float]:
        """Seconds per step between reports, over the trials seen."""
        times = [(self._last[t][0] - when, self._last[t][1] - step) for t, (when, step) in self._first.items()]
        steps = sum(n for _, n in times)
        return sum(s for s, _ in times) / steps if steps else None

    def eta_s(self) -> Optional[float]:
        pace = self.step_s()
        if pace is None or not self._totals:
            return None
        per_trial = sum(self._totals.values()) / len(self._totals)  # a trial that reported no total yet: the mean
        if self._overheads:
            overhead = sum(self._overheads) / len(self._overheads)
        else:
            overhead = sum(when - self._began[t] for t, (when, _) in self._first.items() if t in self._began)
            overhead /= max(1, sum(t in self._began for t in self._first))
        now = time.monotonic()
        left = 0.0
        for t in self._running:
            spent = now - self._began.get(t, now) - self._steps.get(t, 0) * pace  # its overhead so far
            left += max(0.0, self._totals.get(t, per_trial) - self._steps.get(t, 0)) * pace + max(0.0, overhead - spent)
        seen = set(self._steps) | set(self._running) | self._ended | self._earlier
        left += (per_trial * pace + overhead) * max(0, self.planned - len(seen))
        return left / max(1, len(self._running))

    def _progress(self, trial: tune.experiment.Trial) -> None:
        # a plain line at once when a trial ends
        console().show(self.progress_line(trial), now=trial.trial_id not in self._running)
