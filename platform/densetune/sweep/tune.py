"""A sweep: Ray Tune over fine-tuning trials, each trial a Ray Train worker group, every trial tracked in MLflow.

    from densetune.config import TrialConfig
    from densetune.sweep import SweepConfig, run_sweep
    result = run_sweep(SweepConfig("rank_sweep", {"rank": [8, 16, 32]}, TrialConfig(max_steps=60)))
    print(result.trials[["rank", "trainable_params", "accuracy/average"]])

The sweep's folder is <storage_path>/<name>: Tune's experiment state, and under trials/ each trial's Ray Train run
(checkpoints). Running it again with resume=True continues it; finished trials are not run again.

    python -m densetune.sweep list            # the sweeps in the store (densetune.results.store, which reads them)
    python -m densetune.sweep close NAME      # end as KILLED the runs a dead driver left RUNNING
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Union

import pandas as pd
import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.sample import Domain

import densemod
from densemod.denselora.config import check_choice

from .. import cluster
from ..cluster import check_placeable, own_ray, trials_that_fit, uses_gpu, worker_resources
from ..config import (
    DIVERGED,
    POINT,
    SCHEDULERS,
    SEARCHABLE,
    SEARCHES,
    VAL_PREFIX,
    SweepConfig,
    TrialConfig,
    flat_params,
    grid_points,
    settings_label,
)
from .progress import SweepProgress
from ..trial.console import clock, console, local_folder, output_to
from ..trial.inputs import TrialData, data_source, load_data, training_rows
from ..trial.run import check_adapter_fits, check_config, check_non_negative, check_positive, run_trial
from .selection import check_objective, without_test_metrics
from ..storage import check_placement, check_storage, join, read_text, storage_root, write_text

# A trial's driver only starts its worker group and waits: a sliver of memory, no CPU, so that a 2-worker trial
# still fits a 2-CPU machine (Tune's default of 1 CPU per trial would leave it 1). It runs on the head node, beside
# the sweep's driver: Ray Train's controller goes where the trial's driver is, and a controller lost with a worker
# node would fail the trial, where a lost worker only restarts it from its checkpoint (FailureConfig).
DRIVER_RESOURCES = {"memory": 256 * 2**20, cluster.HEAD_RESOURCE: 0.001}
RECORD = "densetune_sweep.json"  # in the sweep's folder: its study, tracking store and trial settings, for --resume
# Search values for "method" may also name a DenseLoRA variant: one axis compares the paper's variants with the
# PEFT baselines.
METHOD_CHOICES = (*densemod.METHODS, *(v for v in densemod.VARIANTS if v != "denselora"))


@dataclass
class SweepResult:
    name: str
    path: str  # the sweep's folder: Tune's state and each trial's checkpoints
    tracking_uri: str
    run_id: str  # the sweep's parent run
    trials: pd.DataFrame  # sweep_runs(): one row per trial, params, last metrics, status
    table: pd.DataFrame = dataclasses.field(default_factory=pd.DataFrame)  # summary.summary_frame of the trials
    failed: list[str] = dataclasses.field(default_factory=list)  # the error file of each trial that failed
    diverged: list[str] = dataclasses.field(default_factory=list)  # the folder of each trial whose loss was not finite


def trial_config(params: dict[str, Any]) -> TrialConfig:
    """A Tune trial's parameters as a TrialConfig; a variant named as the method means DenseLoRA with that variant."""
    params = flat_params(params)
    if params.get("method") in densemod.VARIANTS and params["method"] != "denselora":
        params["method"], params["variant"] = "denselora", params["method"]
    return TrialConfig.from_dict(params)


def sweep_trial(params: dict[str, Any], data: dict[tuple, TrialData], worst: dict[str, float]) -> None:
    """The Tune trainable: one trial's Ray Train run on the sweep's data (sweep_data), its reports forwarded to Tune.
    A trial that diverged reports the `worst` value of every objective last, so that ASHA and Optuna rank it below
    every other.

    The Train run is named for the Tune trial, so a restored sweep resumes it from its last checkpoint.
    """
    config = dataclasses.replace(trial_config(params), name=tune.get_context().get_trial_id())
    forward = TuneReportCallback()
    result = run_trial(config, callbacks=[forward], data=data[data_source(config)])
    wait_until_tune_has_read(forward)
    if result.diverged_at is not None:
        tune.report({**worst, "step": result.diverged_at, DIVERGED: result.diverged_at})


def worst_values(sweep: SweepConfig) -> dict[str, float]:
    """Each objective's worst value: the most negative float for one maximised, the largest for one minimised (finite,
    so every result stays valid JSON)."""
    return {metric: -sys.float_info.max if mode == "max" else sys.float_info.max for metric, mode in objectives(sweep)}


def wait_until_tune_has_read(forward: TuneReportCallback, timeout_s: float = 600.0) -> None:
    """Return only once Tune has taken the trial's last report from the callback's queue.

    Ray 2.60 deadlocks otherwise: when the trainable returns, Tune puts its own end-of-trial result into the queue of
    size 1 that its main thread reads; if the main thread then still has the callback's last report to move into that
    queue, it blocks forever and the trial stays RUNNING (seen in a sweep whose driver was slow to ask for results). The
    main thread takes the report out of the callback's queue a few milliseconds before it moves it on, hence the pause.
    """
    queue = forward._training_actor_item_queue  # the callback's own queue; Ray has no public handle on it
    deadline = time.monotonic() + timeout_s
    while not queue.empty() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)


def sweep_data(sweep: SweepConfig) -> dict[tuple, TrialData]:
    """The data of every trial, loaded once: one TrialData per protocol searched (it decides how rows are tokenized),
    keyed by data_source. Each is checked at the smallest fraction searched: every trial must get at least one batch.
    Called before the storage and the store are touched: bad data leaves nothing behind."""
    protocols = sweep.space.get("protocol", [sweep.trial.protocol])
    protocols = getattr(protocols, "categories", protocols)  # tune.choice([...]) under random or optuna search
    fractions = sweep.space.get("data_fraction", [sweep.trial.data_fraction])
    smallest = min(fractions) if isinstance(fractions, (list, tuple)) else sweep.trial.data_fraction
    data = {}
    for protocol in protocols:
        config = dataclasses.replace(sweep.trial, protocol=protocol)
        data[data_source(config)] = load_data(config)
        training_rows(dataclasses.replace(config, data_fraction=smallest), data[data_source(config)])
    return data


def check_space(sweep: SweepConfig) -> None:
    """Names, values and every combination of values, checked before anything starts."""
    if not sweep.space:
        raise ValueError(f"the search space is empty: give at least one of {list(SEARCHABLE)} a list of values")
    for key, values in sweep.space.items():
        if key not in SEARCHABLE:
            raise ValueError(f"unknown search dimension {key!r}; allowed: {', '.join(SEARCHABLE)}")
        if isinstance(values, Domain):
            if sweep.search == "grid":
                raise ValueError(f"{key}: grid search needs a list of values, not a distribution")
        elif not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"{key}: give a non-empty list of values; got {values!r}")
        if key == "method":
            for value in values if isinstance(values, (list, tuple)) else []:
                check_choice("method", value, METHOD_CHOICES)
    if sweep.points is not None:
        check_points(sweep)
    base = dataclasses.asdict(sweep.trial)
    adapters = set()
    for point in itertools.islice(trial_points(sweep), 10_000):
        config = trial_config({**base, **point})
        try:
            check_config(config)
            # The adapter against the model's architecture, once per kind of adapter (it builds the model on meta).
            adapter = config.peft_config(total_steps=2).to_dict()
            if repr(adapter) not in adapters:
                check_adapter_fits(config)
                adapters.add(repr(adapter))
        except ValueError as error:
            where = settings_label(point)
            raise ValueError(f"the trial {where}: {error}") from None


def check_points(sweep: SweepConfig) -> None:
    """Explicit points: a grid of them, each naming searchable settings only."""
    if sweep.search != "grid":
        raise ValueError(f"explicit points are run as a grid; search {sweep.search!r} draws its own")
    if not sweep.points or not all(isinstance(point, dict) and point for point in sweep.points):
        raise ValueError(f"points must be a non-empty list of settings (dicts); got {sweep.points!r}")
    for point in sweep.points:
        unknown = sorted(set(point) - set(SEARCHABLE))
        if unknown:
            raise ValueError(f"the point {settings_label(point)}: unknown search dimension {unknown[0]!r}; allowed: "
                             f"{', '.join(SEARCHABLE)}")


def trial_points(sweep: SweepConfig) -> Any:
    """The searched settings of each trial: the explicit points, or every combination of the space."""
    return iter(sweep.points) if sweep.points is not None else grid_points(sweep.space)


def check_sweep(sweep: SweepConfig) -> None:
    if not sweep.study or not sweep.study.strip():
        raise ValueError("study must name the MLflow experiment; got an empty name")
    check_choice("search", sweep.search, SEARCHES)
    check_choice("scheduler", sweep.scheduler, SCHEDULERS)
    check_objectives(sweep)
    check_positive("num_samples", sweep.num_samples)
    if sweep.trial.num_workers == 0:
        raise ValueError("num_workers 0 runs a trial in the process that starts it; a sweep's trials need num_workers >= 1")
    check_positive("grace_period", sweep.grace_period)
    check_non_negative("max_concurrent", sweep.max_concurrent, "as many as fit")
    check_space(sweep)


def objectives(sweep: SweepConfig) -> list[tuple[str, str]]:
    """(metric, mode) of each objective: one, or several for optuna's multi-objective search."""
    return list(zip(as_list(sweep.metric), as_list(sweep.mode)))


def as_list(value: Union[str, list[str]]) -> list[str]:
    return value if isinstance(value, list) else [value]


def check_objectives(sweep: SweepConfig) -> None:
    metrics, modes = as_list(sweep.metric), as_list(sweep.mode)
    if len(metrics) != len(modes) or not metrics:
        raise ValueError(f"give one mode per metric: metrics {metrics}, modes {modes}")
    for mode in modes:
        check_choice("mode", mode, ("max", "min"))
    for metric in metrics:
        check_objective(metric)
        if metric.startswith(VAL_PREFIX) and sweep.trial.val_size == 0:
            raise ValueError(f"metric {metric!r} is measured on the validation set, and val_size is 0: give val_size a "
                             "number of rows")
    if len(metrics) > 1 and sweep.search != "optuna":
        raise ValueError(f"several metrics ({', '.join(metrics)}) need search 'optuna' (multi-objective); got {sweep.search!r}")


def param_space(sweep: SweepConfig, folder: str) -> dict[str, Any]:
    """The trial's settings with the searched ones as Tune domains; trials keep their runs inside the sweep's folder."""
    space = {**dataclasses.asdict(sweep.trial), "storage_path": join(folder, "trials")}
    if sweep.points is not None:
        return {**space, POINT: tune.grid_search(list(sweep.points))}
    for key, values in sweep.space.items():
        if isinstance(values, Domain):
            space[key] = values
        else:
            space[key] = tune.grid_search(list(values)) if sweep.search == "grid" else tune.choice(list(values))
    return space


class OptunaOnEvaluations(OptunaSearch):
    """Ray's Optuna searcher, shown a trial's results without their test metrics, and only where they hold every
    objective: trials report accuracy when they evaluate, not with every loss. A trial that ends without them (stopped
    by ASHA between evaluations) is told to Optuna as pruned."""

    def _objectives(self) -> list[str]:
        return self.metric if isinstance(self.metric, list) else [self.metric]

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if all(name in result for name in self._objectives()):
            super().on_trial_result(trial_id, without_test_metrics(result))

    def on_trial_complete(self, trial_id: str, result: Optional[dict[str, Any]] = None, error: bool = False) -> None:
        complete = result is not None and all(result.get(name) is not None for name in self._objectives())
        super().on_trial_complete(trial_id, without_test_metrics(result) if complete else None, error)


class ASHAOnValidation(ASHAScheduler):
    """Ray's ASHA, shown a trial's results without their test metrics."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        return super().on_trial_result(tune_controller, trial, without_test_metrics(result))

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        super().on_trial_complete(tune_controller, trial, without_test_metrics(result))


def tune_config(sweep: SweepConfig, concurrent: Optional[int]) -> tune.TuneConfig:
    goals = objectives(sweep)
    several = len(goals) > 1
    scheduler = None
    if sweep.scheduler == "asha":
        # Time is the optimizer step, reported with every metric. Without max_steps the length of a trial is known only
        # to the trial: a bound that no trial reaches just adds rungs that are never used.
        max_t = sweep.trial.max_steps or 10**9
        # Several objectives: ASHA prunes on the first; the searcher gets them all (Tune's own metric must stay unset).
        first = dict(zip(("metric", "mode"), goals[0])) if several else {}
        scheduler = ASHAOnValidation(time_attr="step", max_t=max_t, grace_period=min(sweep.grace_period, max_t), **first)
    search_alg = None
    if sweep.search == "optuna":
        metrics = dict(metric=[m for m, _ in goals], mode=[m for _, m in goals]) if several else {}
        search_alg = OptunaOnEvaluations(seed=sweep.trial.seed, **metrics)
    return tune.TuneConfig(
        metric=None if several else sweep.metric, mode=None if several else sweep.mode, scheduler=scheduler,
        search_alg=search_alg, num_samples=sweep.num_samples, max_concurrent_trials=sweep.max_concurrent or concurrent,
    )


def run_sweep(sweep: SweepConfig) -> SweepResult:
    """Check everything, run the sweep's trials on Ray Tune, and return the sweep's trials from the tracking store.

    The console shows what runs and how far it got; Ray's own output goes to sweep.log in the sweep's folder
    (sweep.verbose: to the console too).
    """
    # Only the sweep's driver tracks; its trials, which import this module too, need not load MLflow. Once the sweep
    # has ended, its result is read back through the results stage (the one import against the flow: test_layout).
    from ..results.store import sweep_runs
    from ..results.summary import summary_frame, write_files
    from .record import SweepTracker, TrackedSweep, artifact_root, check_tracking_uri, store_uri

    check_sweep(sweep)
    name = sweep.name or f"{sweep.study}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    root = storage_root(sweep.trial.storage_path)
    folder = join(root, name)
    uri = store_uri(sweep.tracking_uri, sweep.trial.storage_path)
    if sweep.resume:
        if not tune.Tuner.can_restore(folder):
            raise ValueError(f"there is no sweep to resume at {folder}: check --name and --storage-path")
        # A resumed sweep keeps its study, store, search space and settings: Tune and this record saved them.
        record = json.loads(read_text(join(folder, RECORD)))
        uri = record["tracking_uri"]
        sweep = dataclasses.replace(
            sweep, study=record["study"], trial=TrialConfig.from_dict(record["trial"]), space=json.loads(record["space"])
        )
    elif tune.Tuner.can_restore(folder):
        raise ValueError(f"sweep {name!r} already exists at {folder}: pass --resume to continue it, or another --name")
    data = sweep_data(sweep)
    log = local_folder(folder, name) / "sweep.log"
    with output_to(not sweep.verbose) as output, own_ray():
        # Where the cluster would lose the runs, nothing is written there: not a probe, not the store.
        check_placement(sweep.trial.storage_path, cluster.may_have_several_nodes(), cluster.in_submitted_job())
        check_storage(sweep.trial.storage_path)
        check_tracking_uri(uri)
        # Decided once for every trial: an autoscaling cluster's resources change while the sweep runs.
        gpu = uses_gpu(sweep.trial)
        sweep = dataclasses.replace(sweep, trial=dataclasses.replace(sweep.trial, use_gpu=gpu))
        check_placeable(sweep.trial, gpu)
        output.move_to(log)
        concurrent = sweep.max_concurrent or trials_that_fit(sweep.trial, gpu, cluster.live_nodes())
        for line in plan(sweep, name, folder, uri, concurrent, None if sweep.verbose else log):
            console().say(line)

        # Trials report accuracy only when they evaluate; Tune would otherwise reject every report without it.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        # Ctrl-C stops the sweep at once, as SIGTERM does (below), rather than through Tune's own handler, which stopped
        # the trials for half a minute and then returned as if the sweep had ended.
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        # The tokenized rows go into the object store once; each trial's workers read them there.
        shared = {source: dataclasses.replace(one, train=ray.put(one.train)) for source, one in data.items()}
        trainable = tune.with_resources(
            tune.with_parameters(sweep_trial, data=shared, worst=worst_values(sweep)), DRIVER_RESOURCES
        )
        tracker = SweepTracker(TrackedSweep(
            uri, sweep.study, name, sweep_params(sweep, folder), list(sweep.space), artifact_root(uri), gpu=gpu,
            objectives=objectives(sweep), parent_run_id=sweep.parent_run_id,
        ), trial_config)
        if sweep.resume:
            tuner = tune.Tuner.restore(folder, trainable, resume_unfinished=True, resume_errored=True)
        else:
            record = {"study": sweep.study, "tracking_uri": uri, "trial": dataclasses.asdict(sweep.trial), **sweep_params(sweep, folder)}
            write_text(join(folder, RECORD), json.dumps(record))
            progress = SweepProgress(planned_trials(sweep), list(sweep.space), objectives(sweep)[0][0])
            tuner = tune.Tuner(
                trainable, param_space=param_space(sweep, folder), tune_config=tune_config(sweep, concurrent),
                run_config=tune.RunConfig(name=name, storage_path=root, callbacks=[tracker, progress]),
            )
        try:
            grid = tuner.fit()
        except BaseException as error:
            tracker.close("KILLED")  # interrupted: no run is left RUNNING
            # Ctrl-C, or SIGTERM, on which the handler that ray.init sets exits
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                finished = trials_finished(sweep_runs(name, uri, sweep.study))
                raise SweepInterrupted(name, folder, finished, planned_trials(sweep), signal_of(error)) from None
            raise
    failed = [f"{result.path}/error.txt" for result in grid if result.error]
    diverged = [result.path for result in grid if not result.error and DIVERGED in (result.metrics or {})]
    unsuccessful = len(failed) + len(diverged)
    tracker.close("FAILED" if unsuccessful and unsuccessful == len(grid) else "FINISHED", failed=len(failed), diverged=len(diverged))
    trials = sweep_runs(name, uri, sweep.study)
    table = summary_frame(trials, sweep.space, sweep.columns)
    if not table.empty:
        tracker.log_sweep_files(write_files(table, local_folder(folder, name)))
    return SweepResult(name, folder, uri, tracker.parent_run_id(), trials, table, failed, diverged)


class SweepInterrupted(KeyboardInterrupt):
    """The sweep was stopped (Ctrl-C, SIGTERM) before its trials ended. Its runs are closed as KILLED, Ray is shut
    down, and it can be resumed (resume=True, the studies' --resume): its finished trials are kept (one that finished
    in the seconds before, after Tune last saved its state, evaluates again from its last checkpoint)."""

    def __init__(self, name: str, folder: str, finished: int, planned: int, signum: int = signal.SIGINT):
        super().__init__(f"sweep {name} interrupted: {finished} of {planned} trials finished")
        self.name, self.folder, self.finished, self.planned, self.signum = name, folder, finished, planned, signum


def signal_of(interruption: BaseException) -> int:
    """The signal behind an interruption: SIGTERM where it is an exit (ray.init's handler exits on SIGTERM, with the
    signal's number or, inside Ray's C++ calls, with 1), else SIGINT (Ctrl-C)."""
    return signal.SIGTERM if isinstance(interruption, SystemExit) else signal.SIGINT


def trials_finished(trials: pd.DataFrame) -> int:
    """How many of a sweep's trials (sweep_runs) finished: ran to their end."""
    return int((trials["status"] == "FINISHED").sum()) if not trials.empty else 0


def dry_run(sweep: SweepConfig) -> list[str]:
    """What run_sweep would start, checked as it would check it, with an estimate of its time from one trial's model
    timed here (estimate.measure); nothing is started, written or tracked."""
    from ..trial.estimate import measure, trial_seconds

    check_sweep(sweep)
    data = sweep_data(sweep)
    base = dataclasses.asdict(sweep.trial)
    if sweep.search == "grid":
        points = [point for _ in range(sweep.num_samples) for point in trial_points(sweep)]
        listed = [settings_label(point) for point in points]
    else:
        points = [next(grid_points(sweep.space))]
        listed = [f"{sweep.num_samples} trials drawn by {sweep.search} search from {format_search_space(sweep.space)}"]
    first = trial_config({**base, **points[0]})
    gpu = bool(first.use_gpu)
    per_worker = ", ".join(f"{v:g} {k}" for k, v in worker_resources(first, gpu).items())
    measured = measure(first, data[data_source(first)])
    parts = trial_seconds(first, data[data_source(first)], measured)
    one = sum(parts.values())
    at_once = sweep.max_concurrent or trials_that_fit(first, gpu, cluster.this_machine())
    planned = planned_trials(sweep)
    lines = [
        f"dry run of sweep {sweep.name or sweep.study}: {planned} trials, nothing started",
        *(f"  trial {i}: {text}" for i, text in enumerate(listed, 1)),
        f"each trial: {first.num_workers} worker(s) of {per_worker}" + (" (and GPUs if the cluster has them)" if first.use_gpu is None else ""),
        f"measured here on {measured.device} in {measured.precision} ({settings_label(points[0])}): "
        f"load {measured.load_s:.1f} s, {measured.step_s:.2f} s per step; s per question: "
        + ", ".join(f"{key} {seconds:.3f}" for key, seconds in measured.question_s.items()),
        "estimate per trial: " + " + ".join(f"{k} {v:.0f} s" for k, v in parts.items()) + f" = {clock(one)} (m:ss)",
    ]
    if at_once:
        rounds = math.ceil(planned / at_once)
        lines.append(f"estimate of the sweep: {planned} trials, {at_once} at a time on this machine: {clock(rounds * one)}")
    else:
        lines.append(f"estimate of the sweep: {clock(planned * one)} one after the other; a cluster divides it by the trials it runs at once")
    return lines


def format_search_space(space: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={','.join(map(str, v))}" if isinstance(v, (list, tuple)) else f"{k}~{v}" for k, v in space.items()
    )


def planned_trials(sweep: SweepConfig) -> int:
    """How many trials the sweep starts: every combination of the grid times num_samples, or num_samples draws."""
    if sweep.search != "grid":
        return sweep.num_samples
    if sweep.points is not None:
        return len(sweep.points) * sweep.num_samples
    return math.prod(len(v) if isinstance(v, (list, tuple)) else 1 for v in sweep.space.values()) * sweep.num_samples


def plan(
    sweep: SweepConfig, name: str, folder: str, uri: str, concurrent: Optional[int], log: Optional[Path]
) -> list[str]:
    """What the sweep will run and where it keeps it: its first lines on the console."""
    config = sweep.trial
    space = format_search_space(sweep.space)
    steps = f"{config.max_steps} steps" if config.max_steps else f"{config.epochs} epochs"
    at_once = f"up to {concurrent} at once" if concurrent else "as many at once as the cluster grows to"
    lines = [
        f"sweep {name}: {planned_trials(sweep)} trials ({'listed points' if sweep.points else sweep.search} over "
        f"{space}) of {config.model} on "
        f"{','.join(config.datasets)}, {steps} each, {config.num_workers} worker(s) per trial, {at_once}",
        f"  folder: {folder}",
        f"  store:  {uri}",
    ]
    if log is not None:
        lines.append(f"  Ray's output: {log} (-v shows it here)")
    return lines


def sweep_params(sweep: SweepConfig, folder: str) -> dict[str, str]:
    """The parent run's params: how the sweep searched, and where its folder is."""
    space = {k: v if isinstance(v, (list, tuple)) else str(v) for k, v in sweep.space.items()}
    seeds = sweep.space.get("seed")
    return {
        "space": json.dumps(space), "search": sweep.search, "num_samples": str(sweep.num_samples),
        "seeds": str(len(seeds) if isinstance(seeds, (list, tuple)) else 1), "folder": folder,
        "scheduler": sweep.scheduler, "metric": ",".join(m for m, _ in objectives(sweep)),
        "mode": ",".join(m for _, m in objectives(sweep)),
        "max_concurrent": str(sweep.max_concurrent), "model": sweep.trial.model,
        "datasets": ",".join(sweep.trial.datasets), **({"points": json.dumps(sweep.points)} if sweep.points else {}),
    }
