"""What a sweep shows while it runs: what it will run, a line when each trial starts and ends, and a live progress line
(trial k of n, step s of S, loss, ETA): a tqdm bar in a terminal, plain lines elsewhere.

Ray's own output (its banners, Tune's tables and result boxes, the workers' logs that Ray forwards to the driver)
goes to a log file in the sweep's folder instead (`output_to`), unless the user asks for it (-v). The sweep's lines
still reach the terminal: they are written to a copy of the terminal's file descriptor taken before the redirection.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, TextIO

from ray import tune
from tqdm import tqdm

from .callbacks import RestorableCallback
from ..config import DIVERGED, flat_params, settings_label

PLAIN_EVERY_S = 15.0  # how often a progress line is printed when the output is not a terminal
ENDED = ("TERMINATED", "ERROR")  # Tune's statuses of a trial that will not run again


class Console:
    """The stream the sweep's own lines go to, and the progress bar drawn at its bottom when it is a terminal."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.tty = stream.isatty()
        self.bar: Optional[tqdm] = None

    def say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)  # above the bar, which is drawn again below it
        else:
            print(line, file=self.stream, flush=True)


_redirected: Optional[Console] = None  # while output_to sends the process's output to a log: the terminal
_plain: Optional[Console] = None


def console() -> Console:
    """Where the sweep's lines go now: the terminal, also while Ray's output goes to a log file; else standard output
    as it is now (a caller may have replaced sys.stdout)."""
    global _plain
    if _redirected is not None:
        return _redirected
    if _plain is None or _plain.stream is not sys.stdout:
        _plain = Console(sys.stdout)
    return _plain


class Redirect:
    """The file that this process's output goes to inside output_to: a temporary one until move_to names the log."""

    def __init__(self, file: Optional[TextIO]):
        self.file = file
        self.temporary = file is not None

    def move_to(self, log: Path) -> None:
        """Go on in `log` (appended to; its folder created), the output so far first. Called once the run is sure to
        go ahead, so that a run its checks refuse leaves no folder behind."""
        if self.file is None:
            return
        log.parent.mkdir(parents=True, exist_ok=True)
        final = open(log, "a", buffering=1)
        for stream in (sys.stdout, sys.stderr, self.file):
            stream.flush()
        final.write(Path(self.file.name).read_text())
        for fd in (1, 2):
            os.dup2(final.fileno(), fd)
        sys.stdout = sys.stderr = final  # output_to's redirect_stdout and redirect_stderr put the originals back
        self.close()
        self.file, self.temporary = final, False

    def close(self) -> None:
        """Close the file; a temporary one that was never moved is removed."""
        if self.file is not None:
            self.file.close()
            if self.temporary:
                os.remove(self.file.name)


@contextlib.contextmanager
def output_to(quiet: bool) -> Iterator[Redirect]:
    """With `quiet`, send everything this process writes to its standard output and error (Ray, Tune, the workers'
    forwarded logs, warnings) to a file for the duration of the block, while console() keeps writing where standard
    output went before; the file is temporary until the Redirect yielded moves it to the sweep's log. Without `quiet`
    (verbose), leave the output as it is.

    Both the file descriptors (what Ray's C++ core and subprocesses write) and Python's sys.stdout and sys.stderr
    (which a notebook or pytest may have pointed elsewhere) are redirected.
    """
    global _redirected
    if not quiet:
        yield Redirect(None)
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    previous = _redirected
    # A process's own standard output is about to become the log: write to a copy of it. Any other stream stays as it is.
    owned = writes_to_fd_1(sys.stdout)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1) if owned else sys.stdout
    redirect = Redirect(tempfile.NamedTemporaryFile("w", prefix="densetune-", suffix=".log", delete=False, buffering=1))
    with contextlib.redirect_stdout(redirect.file), contextlib.redirect_stderr(redirect.file):
        for fd in (1, 2):
            os.dup2(redirect.file.fileno(), fd)
        _redirected = Console(terminal)
        try:
            yield redirect
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
            _redirected = previous
            redirect.close()
            if owned:
                terminal.close()


def writes_to_fd_1(stream: TextIO) -> bool:
    try:
        return stream.fileno() == 1
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return False


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
        self._printed = 0.0
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
        out = console()
        if out.bar is not None:
            out.bar.close()
            out.bar = None

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
        out = console()
        line = self.progress_line(trial)
        if out.tty:
            if out.bar is None:
                out.bar = tqdm(total=0, file=out.stream, bar_format="{desc}", dynamic_ncols=True, leave=False)
            out.bar.set_description_str(line)
        elif time.monotonic() - self._printed >= PLAIN_EVERY_S or trial.trial_id not in self._running:
            out.say(line)
            self._printed = time.monotonic()


def clock(seconds: float) -> str:
    """1:02:03, 4:05."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
