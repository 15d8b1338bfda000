"""What the trial command shows while a trial runs: what it runs, then one progress line through its evaluations and
its steps (console.py: a tqdm bar in a terminal, a plain line every PLAIN_EVERY_S elsewhere), with Ray's own output in
trial.log in the trial's folder unless the user asks for it (-v).

What the line says comes from the trial's processes, through one small Ray actor, the board, which the driver reads
twice a second:
- the steps and the loss from Ray Train's report callback (StepsToBoard), which runs in Ray Train's controller, a
  process of its own, not the driver;
- how far an evaluation has come from rank 0's worker, where it runs: a thread there reads the evaluation's own tqdm
  bar (the one evaluate.py draws, and Ray forwards into the log) and posts its count, so the training loop is as it
  was.
An actor, because both writers are other processes, possibly on other nodes, and the board keeps only the latest
position: nothing queues up if the driver reads late.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import ray
import ray.train
from tqdm import tqdm

from ..config import TrialConfig, settings_label
from .console import Console, Redirect, clock, console, output_to

LOG = "trial.log"  # in the trial's folder: Ray's output, unless -v
READ_EVERY_S = 0.5  # how often the driver reads the board, and rank 0 reads its evaluation's bar
BOARD = "board"  # the key of the board's handle in the training loop's config


class Board:
    """The trial's position as its processes last posted it: the last reported step, of how many, and its loss; the
    evaluation running now (what it scores, how many of how many); when each was posted (the driver's clock is not
    needed: only differences are used)."""

    def __init__(self) -> None:
        self.position: dict[str, Any] = {}

    def post(self, **values: Any) -> None:
        self.position.update(values)

    def read(self) -> dict[str, Any]:
        return dict(self.position)


class StepsToBoard(ray.train.UserCallback):
    """Ray Train's callback for every report (in the controller): rank 0's step, total steps and loss onto the board."""

    def __init__(self, board: Any):
        self.board = board

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        reported = metrics[0] if metrics else {}
        if "step" in reported:
            self.board.post.remote(
                step=reported["step"], total_steps=reported.get("total_steps"), loss=reported.get("loss"),
                reported_at=time.time(),
            )


def live_bar() -> Optional[tuple[str, int, Optional[int]]]:
    """(what it counts, how many, of how many) of the newest tqdm bar drawn in this process now; None when there is none.

    tqdm keeps every bar it draws in a set of its class (its own monitor thread reads it too); a disabled bar, as on
    the ranks that do not evaluate, is not in it."""
    with tqdm.get_lock():
        bars = [bar for bar in tqdm._instances if hasattr(bar, "start_t") and not getattr(bar, "disable", True)]
    if not bars:
        return None
    bar = max(bars, key=lambda b: b.start_t)
    return bar.desc, int(bar.n), bar.total


def watch_bars(board: Any, stop: threading.Event) -> None:
    """Post this process's evaluation bar to the board whenever it changed, until `stop`; then that none runs."""
    posted = None
    while not stop.wait(READ_EVERY_S):
        seen = live_bar()
        if seen != posted:
            board.post.remote(evaluating=seen)
            posted = seen
    board.post.remote(evaluating=None)


def train_loop_on_the_board(loop_config: dict[str, Any]) -> Any:
    """The training loop (loop.train_loop), with rank 0's evaluation bars posted to the board while it runs."""
    from .loop import train_loop

    board = loop_config[BOARD]
    loop_config = {k: v for k, v in loop_config.items() if k != BOARD}
    if ray.train.get_context().get_world_rank() != 0:
        return train_loop(loop_config)
    stop = threading.Event()
    watcher = threading.Thread(target=watch_bars, args=(board, stop), name="evaluation-progress", daemon=True)
    watcher.start()
    try:
        return train_loop(loop_config)
    finally:
        stop.set()
        watcher.join(timeout=5)


@dataclass
class Progress:
    """The driver's reading of the board: the line it shows, and the pace of the steps seen."""

    started: float = field(default_factory=lambda: time.monotonic())
    first: Optional[tuple[float, int]] = None  # (when, step) of the first report with a step after step 0
    last: Optional[tuple[float, int]] = None

    def line(self, position: dict[str, Any]) -> str:
        """The last step reported (of how many) and its loss, the evaluation running now (what it runs, how many of
        how many questions), the time elapsed and the time the steps still need: 'step 30/60 · loss 1.2345 · 0:25
        elapsed · 0:12 to step 60', 'step 50/60 · loss 1.1234 · evaluating: generate 112/300 · 1:02 elapsed'."""
        step, total, evaluating = position.get("step"), position.get("total_steps"), position.get("evaluating")
        if step is None:
            parts = ["before training" if evaluating else "starting"]
        else:
            parts = [f"step {step}/{total or '?'}"]
            if position.get("loss") is not None:
                parts.append(f"loss {position['loss']:.4f}")
        if evaluating:
            what, done, of = evaluating
            parts.append(f"evaluating: {what} {done}/{of if of is not None else '?'}")
        parts.append(f"{clock(time.monotonic() - self.started)} elapsed")
        left = self.steps_left_s(position)
        if left is not None and step < total and not evaluating:
            parts.append(f"{clock(left)} to step {total}")
        return " · ".join(parts)

    def steps_left_s(self, position: dict[str, Any]) -> Optional[float]:
        """The steps still to run at the pace seen between reports (evaluations not counted)."""
        step, total, when = position.get("step"), position.get("total_steps"), position.get("reported_at")
        if not step or total is None or when is None:
            return None
        if self.last is None or self.last[1] != step:
            self.last = (when, step)
            self.first = self.first or self.last
        (t0, s0), (t1, s1) = self.first, self.last
        return (total - step) * (t1 - t0) / (s1 - s0) if s1 > s0 else None


class TrialConsole:
    """The trial command's console, which a caller of run_trial opts into: Ray's output to the trial's log (unless
    `verbose`), what the trial runs, and its progress line while it runs."""

    def __init__(self, verbose: bool = False):
        self.verbose = verbose
        self.output: Optional[Redirect] = None

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Ray's output to a temporary file until `watching` names the trial's log (or, verbose, where it went)."""
        with output_to(not self.verbose) as self.output:
            yield

    @contextlib.contextmanager
    def watching(self, config: TrialConfig, name: str, folder: Path, workers: str) -> Iterator[Watched]:
        """Once the trial is sure to start: its log in `folder`, what it runs, and its progress line until it ends.
        Yields what the trial's TorchTrainer takes to post its progress."""
        log = folder / LOG
        if self.output is not None:
            self.output.move_to(log)
        out = console()
        for line in plan(config, name, workers, None if self.verbose else log):
            out.say(line)
        board = ray.remote(Board).options(num_cpus=0).remote()
        progress, stop = Progress(), threading.Event()
        reader = threading.Thread(
            target=show_progress, args=(board, progress, out, stop), name="trial-progress", daemon=True
        )
        reader.start()
        try:
            yield Watched(train_loop_on_the_board, {BOARD: board}, [StepsToBoard(board)])
            stop.set()
            reader.join(timeout=5)
            if not out.tty:  # where the trial ended, on a plain console (a terminal's bar just goes)
                out.show(progress.line(ray.get(board.read.remote(), timeout=10)), now=True)
        finally:
            stop.set()
            reader.join(timeout=5)
            out.close_bar()
            ray.kill(board)


@dataclass
class Watched:
    """What a TorchTrainer takes to post a trial's progress: its training function, what that function reads from the
    loop's config, and Ray Train's callbacks."""

    train_loop: Callable[[dict[str, Any]], Any]
    loop_config: dict[str, Any]
    callbacks: list[Any]


def show_progress(board: Any, progress: Progress, out: Console, stop: threading.Event) -> None:
    """Read the board and show its line until `stop`."""
    while not stop.wait(READ_EVERY_S):
        try:
            position = ray.get(board.read.remote(), timeout=10)
        except (ray.exceptions.RayError, TimeoutError):
            continue  # a busy or ending Ray: the line waits for the next reading
        out.show(progress.line(position))


def plan(config: TrialConfig, name: str, workers: str, log: Optional[Path]) -> list[str]:
    """What the trial runs, and where its output is: its first lines on the console."""
    steps = f"{config.max_steps} steps" if config.max_steps else f"{config.epochs} epochs"
    variant = {"variant": config.variant} if config.variant != TrialConfig.variant else {}
    adapter = settings_label({"method": config.method, **variant, "rank": config.rank, "targets": config.targets})
    lines = [
        f"trial {name}: {adapter} on {config.model}, trained on {','.join(config.datasets)} for {steps}, {workers}"
    ]
    if log is not None:
        lines.append(f"  Ray's output: {log} (-v shows it here)")
    return lines
