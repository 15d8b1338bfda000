"""The sweep's MLflow record: one parent run per sweep, one child run per trial, written by the sweep's driver.

Ray's MLflowLoggerCallback is not used: it logs every numeric key of every Tune result (config/ prefixes, pids,
timestamps, trial ids parsed as numbers) and leaves the runs of a killed driver RUNNING. This callback logs the
trial's configuration as the user wrote it, the training loop's own metrics, and always ends a run.

This module writes the record; the results stage reads it (densetune.results.store), both by the names in
densetune.files.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
import fcntl
import functools
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import pyarrow.fs
import ray.train
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE,
)
from ray import tune

from densemod.denselora.config import default_alpha

from .callbacks import RestorableCallback
from ..config import (
    DEFAULT_METRIC,
    DIVERGED,
    TEST_PREFIXES,
    VAL_PREFIX,
    TrialConfig,
    flat_params,
    settings_label,
)
from ..files import (
    ADAPTER, ADAPTER_CONFIG, DEVICE_SECONDS, FACTS, PREDICTIONS, ROLE, SNAPSHOTS, STUDY, SUMMARY, SWEEP, TRIAL_ID,
    TRIAL_CONFIG, WALL_TIME,
)
from .selection import Candidate, best
from ..storage import is_remote

STEP_METRICS = (
    "loss", "aux_loss", "learning_rate", "tokens_per_s", "tokens_seen", "padding_fraction", "step_time_s",
    "peak_memory_mb", "epoch", "startup_s", DEVICE_SECONDS,
)
NODE_ID = "ray.node_id"  # a tag of a trial's run: the node its rank 0 runs on
FAILED_TRIALS, DIVERGED_TRIALS = "failed_trials", "diverged_trials"  # tags of the sweep's run
DIVERGED_TAG = "diverged"  # a tag of a trial's run whose loss was not finite: the step
ADAPTER_FILES = (ADAPTER, ADAPTER_CONFIG)
RECORD_FILES = (PREDICTIONS, SUMMARY, SNAPSHOTS)
# evaluations: the test split's accuracies (accuracy/..., accuracy_norm/...) and the validation set's (val/...)
EVALUATED = (*TEST_PREFIXES, VAL_PREFIX)


def default_tracking_uri(storage_path: str) -> str:
    """An embedded store: sqlite in the storage folder (a local one, or a shared mount given as file://), as an
    absolute URI because Ray's processes run in other directories. A bucket holds no database: a study there names a
    tracking server, which outlives the study (a default beside the driver would be lost with a submitted job's
    working directory)."""
    if storage_path.startswith("file://"):
        folder = Path(urllib.parse.urlsplit(storage_path).path)
    elif is_remote(storage_path):
        raise ValueError(
            f"storage_path {storage_path!r} cannot hold the study's MLflow store, and none was given: pass the MLflow "
            "server that keeps it, --tracking-uri http://HEAD_IP:5000 (on a cluster, the head's: README, 'On a "
            "cluster'), or set MLFLOW_TRACKING_URI"
        )
    else:
        folder = Path(storage_path).resolve()
    return f"sqlite:///{folder / 'mlflow.db'}"


def store_uri(tracking_uri: Optional[str] = None, storage_path: str = "runs") -> str:
    """The store a command uses: the one it names, else $MLFLOW_TRACKING_URI, else the embedded store of the storage
    path (by default ./runs/mlflow.db, where a study writes without flags)."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(storage_path)


def artifact_root(uri: str) -> Optional[str]:
    """Artifacts of an embedded sqlite store go beside the database (MLflow's default is relative to the current
    directory, which differs between Ray's processes); a server decides for itself."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts")
    return None


def check_tracking_uri(uri: str) -> None:
    """Reach the store once, before any trial starts: a server must answer, a database must open."""
    try:
        if uri.startswith(("http://", "https://")):
            # MLflow's own client retries for minutes; the server's health endpoint answers at once or not at all.
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10).close()
        else:
            # MLflow logs each step of a new store's schema migration at INFO: not news for the user
            with store_lock(uri), logging_level(logging.WARNING, "mlflow.store.db.utils", "alembic"):
                MlflowClient(uri).search_experiments(max_results=1)  # creates a new store's tables
    except Exception as error:  # noqa: BLE001 - any failure here means the same thing to the user
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"tracking URI {uri!r} cannot be reached ({reason}): start the MLflow server, or pass another "
            "--tracking-uri (or none, for the embedded sqlite store)"
        ) from None


@contextlib.contextmanager
def logging_level(level: int, *names: str) -> Iterator[None]:
    """The named loggers at `level` at least for the duration of the block."""
    loggers = [logging.getLogger(name) for name in names]
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(level, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        for logger, old in zip(loggers, before):
            logger.setLevel(old)


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """For an sqlite store, hold a lock file beside the database: two processes that create a new store at once both
    run MLflow's schema migration, and one fails ("duplicate column name"). Other stores need no lock."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this store."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


@functools.cache
def git_commit() -> str:
    """The project's commit; Ray uploads a job's working_dir without .git, so a job can pass DENSETUNE_GIT_COMMIT."""
    if os.environ.get("DENSETUNE_GIT_COMMIT"):
        return os.environ["DENSETUNE_GIT_COMMIT"]
    folder = Path(__file__).resolve().parent
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def source_tags() -> dict[str, str]:
    """The UI's Source column: the script that drove the sweep (a study, or python for the API)."""
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] not in ("", "-c") else "python"
    return {MLFLOW_SOURCE_NAME: script, MLFLOW_SOURCE_TYPE: "LOCAL"}


def dataset_inputs(config: TrialConfig) -> list[DatasetInput]:
    """The UI's Dataset column: each source the trial trains on (context training) and evaluates on (evaluation), as
    `<data set>/<split>` (ARC-Easy/train, ARC-Easy/test). MLflow wants a digest: this one is of the name, not of the
    content. A suite (commonsense) is listed as the benchmarks it evaluates on."""
    # Imported here: inputs imports torch, which this module's users (report, the CLI's --help) must not wait for.
    from ..trial.inputs import eval_sources

    inputs = []
    splits = (("training", "train", config.datasets), ("evaluation", "test", eval_sources(config)))
    for context, split, sources in splits:
        for source in sources:
            path = Path(source.rstrip("/"))
            name = f"{path.parent.name}/{path.stem}" if path.suffix == ".json" else f"{path.name or source}/{split}"
            digest = hashlib.sha256(f"{source}:{split}".encode()).hexdigest()[:8]
            dataset = Dataset(name, digest, "local", json.dumps({"uri": source, "split": split}))
            inputs.append(DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return inputs


def config_params(config: TrialConfig, gpu: bool) -> dict[str, str]:
    """The trial's settings as MLflow params, with derived defaults spelt out (alpha = 2r, eval sets = train sets) and
    resources as used (`gpu`: whether its workers train on GPUs; no GPU count on a CPU run)."""
    values = dataclasses.asdict(config)
    values["alpha"] = default_alpha(config.rank) if config.alpha is None else config.alpha
    values["eval_datasets"] = config.eval_datasets or config.datasets
    values["use_gpu"] = gpu
    if not gpu:
        del values["gpus_per_worker"]
    del values["name"], values["storage_path"]  # the Ray trial id, kept as a tag; the sweep's folder, on its run
    return {k: ",".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in values.items() if v is not None}


@dataclasses.dataclass(frozen=True)
class TrackedSweep:
    """What the tracker records a sweep as: its store, study and name, the parent run's params, and how its trials are
    named and ranked."""

    uri: str
    study: str
    name: str
    params: dict[str, str]  # the sweep's run's params (tune.sweep_params)
    searched: Sequence[str] = ()  # the settings that name a trial's run
    artifact_root: Optional[str] = None
    gpu: bool = False  # whether the trials train on GPUs
    # the (metric, mode) pairs by which the sweep's run names its best trial (selection.best)
    objectives: Sequence[tuple[str, str]] = ((DEFAULT_METRIC, "max"),)
    parent_run_id: Optional[str] = None  # a run the sweep's own nests under (--tune's study run)


class SweepTracker(RestorableCallback):
    """A Tune callback on the sweep's driver that mirrors every trial into MLflow.

    It finds its runs by tags, never by remembered ids, so a resumed sweep (a new driver, a restored callback)
    continues the same parent and child runs.
    """

    def __init__(self, sweep: TrackedSweep, to_config: Callable[[dict], TrialConfig]):
        """`to_config`: a trial's Tune parameters as its TrialConfig."""
        # Plain attributes, as before TrackedSweep: a sweep saved by an earlier version restores with them.
        self.uri, self.study, self.sweep, self.to_config = sweep.uri, sweep.study, sweep.name, to_config
        self.searched, self.sweep_params, self.artifact_root = list(sweep.searched), sweep.params, sweep.artifact_root
        self.gpu, self.objectives, self.parent_run = sweep.gpu, list(sweep.objectives), sweep.parent_run_id
        self._reset()

    def _reset(self) -> None:
        self._client: Optional[MlflowClient] = None
        self._experiment_id: Optional[str] = None
        self._parent: Optional[str] = None
        self._runs: dict[str, str] = {}  # trial id -> child run id
        self._checkpoints: dict[str, str] = {}  # trial id -> last reported checkpoint path
        self._last: dict[str, dict] = {}  # trial id -> last result with a step
        self._nodes: dict[str, str] = {}  # trial id -> the node its rank 0 runs on
        self._diverged: set[str] = set()  # trial ids whose loss was not finite
        self._steps: dict[str, dict[str, int]] = {}  # trial id -> metric -> last step logged

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.study)
            self._experiment_id = found.experiment_id if found else self.client.create_experiment(
                self.study, artifact_location=self.artifact_root
            )
        return self._experiment_id

    def parent_run_id(self) -> str:
        """The sweep's run, created on first use."""
        if self._parent is None:
            runs = self._search(f"tags.`{ROLE}` = 'sweep'")
            if runs:
                self._parent = runs[0].info.run_id
            else:
                self._parent = self.client.create_run(
                    self.experiment_id, run_name=self.sweep,
                    tags={
                        ROLE: "sweep", SWEEP: self.sweep, STUDY: self.study, MLFLOW_GIT_COMMIT: git_commit(), **source_tags(),
                        **({MLFLOW_PARENT_RUN_ID: self.parent_run} if self.parent_run else {}),
                    },
                ).info.run_id
                self._log(self._parent, params=self.sweep_params)
        return self._parent

    # Tune's hooks

    def setup(self, **info: Any) -> None:
        self._reopen(self.parent_run_id())  # a resumed sweep runs again

    def on_trial_start(self, iteration: int, trials: list, trial: tune.experiment.Trial, **info: Any) -> None:
        self._child(trial)

    def on_trial_result(
        self, iteration: int, trials: list, trial: tune.experiment.Trial, result: dict, **info: Any
    ) -> None:
        run_id = self._child(trial)
        if DIVERGED in result:  # a tag, and no metric: the worst values Tune is told are not measurements
            self.client.set_tag(run_id, DIVERGED_TAG, str(result[DIVERGED]))
            self._diverged.add(trial.trial_id)
            return
        if "checkpoint_path" in result:
            self._checkpoints[trial.trial_id] = result["checkpoint_path"]
        if "step" not in result:
            return
        self._last[trial.trial_id] = result
        stamp, step = now_ms(), int(result["step"])
        facts = {k: cast(result[k]) for k, cast in FACTS.items() if k in result}
        numbers = [k for k, v in facts.items() if not isinstance(v, str)]
        steps = {k: step for k in result if k in STEP_METRICS or k.startswith(EVALUATED)} | dict.fromkeys(numbers, 0)
        # A trial restarted from a checkpoint (a lost worker, a resumed sweep) reports again the steps after it: each
        # metric is logged once per step, so the run keeps one history.
        logged = self._logged_steps(run_id, trial.trial_id, list(steps))
        metrics = [
            Metric(k, float(result[k]), stamp, at) for k, at in steps.items()
            if result[k] is not None and at > logged.get(k, -1)
        ]
        logged.update({m.key: m.step for m in metrics})
        self._log(run_id, params={k: str(v) for k, v in facts.items()}, metrics=metrics)
        if result.get("node_id") and self._nodes.get(trial.trial_id) != result["node_id"]:
            # a tag, not a param: a resumed trial may run on another node
            self.client.set_tag(run_id, NODE_ID, result["node_id"])
            self._nodes[trial.trial_id] = result["node_id"]

    def on_trial_complete(self, iteration: int, trials: list, trial: tune.experiment.Trial, **info: Any) -> None:
        run_id = self._child(trial)
        last = self._last.get(trial.trial_id, {})
        config = self.to_config(trial.config)
        total = last.get("total_steps", 0)
        finished = bool(last) and last["step"] >= min(total, config.stop_after_step or total)
        self._log_cost(run_id, trial, config)
        if trial.trial_id in self._diverged:
            self._log_artifacts(run_id, trial, config, adapter=False)  # no checkpoint after the divergence is logged
            self.client.set_terminated(run_id, "FAILED")
        else:
            self._log_artifacts(run_id, trial, config)
            if not finished:
                self.client.set_tag(run_id, "stopped_early", "true")  # by the scheduler, before its last step
            self.client.set_terminated(run_id, "FINISHED" if finished else "KILLED")
        self.update_sweep_run()

    def on_trial_error(self, iteration: int, trials: list, trial: tune.experiment.Trial, **info: Any) -> None:
        run_id = self._child(trial)
        self._log_cost(run_id, trial, self.to_config(trial.config))
        error = getattr(trial, "error_file", None)
        if error and Path(error).exists():
            self.client.log_artifact(run_id, error)
        self.client.set_terminated(run_id, "FAILED")
        self.update_sweep_run()

    def close(self, status: str = "FINISHED", failed: Optional[int] = None, diverged: Optional[int] = None) -> None:
        """End every trial run still open as KILLED (its trial was interrupted), then the sweep's run: KILLED too if
        any trial was, else `status`; tag it with the numbers of `failed` and `diverged` trials when given.
        Idempotent: a run already ended keeps its status."""
        for tag, count in ((FAILED_TRIALS, failed), (DIVERGED_TRIALS, diverged)):
            if count is not None:
                self.client.set_tag(self.parent_run_id(), tag, str(count))
        running = "attributes.status = 'RUNNING'"
        dangling = self._search(f"tags.`{ROLE}` = 'trial' and {running}")
        for run in dangling:
            self.client.set_terminated(run.info.run_id, "KILLED")
        self.update_sweep_run()
        for run in self._search(f"tags.`{ROLE}` = 'sweep' and {running}"):
            self.client.set_terminated(run.info.run_id, "KILLED" if dangling else status)

    def update_sweep_run(self) -> None:
        """Put the sweep's result so far on its run, where the UI shows it at a glance: how many trials ended how
        (metrics trials_<status>, trials_diverged, at the step of the number of trials ended), and the best finished
        trial by the objective: its objective and accuracies as metrics best/<name>, its run and searched settings as
        tags (best_trial, best.<setting>). The best trial is chosen on the sweep's objectives (validation metrics or
        size: selection.best); its test accuracies are shown, never used to choose."""
        trials = self._search(f"tags.`{ROLE}` = 'trial'")
        statuses = Counter(r.info.status for r in trials)
        ended = sum(n for status, n in statuses.items() if status != "RUNNING")
        counts = {f"trials_{s.lower()}": statuses[s] for s in ("FINISHED", "FAILED", "KILLED", "RUNNING")}
        counts["trials_diverged"] = sum(DIVERGED_TAG in r.data.tags for r in trials)
        stamp = now_ms()
        metrics = [Metric(k, float(v), stamp, ended) for k, v in counts.items()]
        best = best_run(trials, self.objectives)
        if best is not None:
            objectives = {metric for metric, _ in self.objectives}
            shown = {k: v for k, v in best.data.metrics.items() if k in objectives or k.startswith(EVALUATED)}
            metrics += [Metric(f"best/{k}", v, stamp, ended) for k, v in shown.items()]
            tags = {"best_trial": best.info.run_name, "best_run_id": best.info.run_id}
            tags |= {f"best.{k}": best.data.params[k] for k in self.searched if k in best.data.params}
            for key, value in tags.items():
                self.client.set_tag(self.parent_run_id(), key, value)
        self._log(self.parent_run_id(), metrics=metrics)

    def log_sweep_files(self, paths: Sequence[Path], artifact_path: Optional[str] = None) -> None:
        """Files that describe the whole sweep (its summary table), onto the sweep's run."""
        for path in paths:
            self.client.log_artifact(self.parent_run_id(), str(path), artifact_path)

    # helpers

    def _child(self, trial: tune.experiment.Trial) -> str:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        found = self._search(f"tags.`{TRIAL_ID}` = '{trial.trial_id}'")
        if found:
            run_id = found[0].info.run_id
            self._reopen(run_id)
        else:
            config = self.to_config(trial.config)
            # named by what the sweep searched (rank=8 seed=43), as the UI's run column shows it; the trial id is a tag
            name = settings_label(flat_params(trial.config), self.searched)
            run_id = self.client.create_run(
                self.experiment_id, run_name=name,
                tags={
                    ROLE: "trial", SWEEP: self.sweep, STUDY: self.study, TRIAL_ID: trial.trial_id,
                    MLFLOW_PARENT_RUN_ID: self.parent_run_id(), MLFLOW_GIT_COMMIT: git_commit(), **source_tags(),
                },
            ).info.run_id
            self._log(run_id, params=config_params(config, self.gpu))
            self.client.log_inputs(run_id, datasets=dataset_inputs(config))
        self._runs[trial.trial_id] = run_id
        return run_id

    def _logged_steps(self, run_id: str, trial_id: str, names: Sequence[str]) -> dict[str, int]:
        """The last step logged of each metric in `names` for this trial, read from the store once per driver."""
        logged = self._steps.setdefault(trial_id, {})
        for name in names:
            if name not in logged:
                history = self.client.get_metric_history(run_id, name)
                logged[name] = max((m.step for m in history), default=-1)
        return logged

    def _log_cost(self, run_id: str, trial: tune.experiment.Trial, config: TrialConfig) -> None:
        """The trial's wall time, and its cost: the CPUs (or GPUs) its workers reserved, times that time."""
        wall_time = (trial.last_result or {}).get("time_total_s")
        if wall_time is None:
            return
        devices = config.num_workers * (config.gpus_per_worker if self.gpu else config.cpus_per_worker)
        step, stamp = int(self._last.get(trial.trial_id, {}).get("step", 0)), now_ms()
        cost = {WALL_TIME: float(wall_time), DEVICE_SECONDS: float(wall_time) * devices}
        self._log(run_id, metrics=[Metric(k, v, stamp, step) for k, v in cost.items()])

    def _reopen(self, run_id: str) -> None:
        if self.client.get_run(run_id).info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")

    def _search(self, filter_string: str) -> list:
        return self.client.search_runs(
            [self.experiment_id], f"tags.{SWEEP} = '{self.sweep}' and {filter_string}", max_results=10_000
        )

    def _log(self, run_id: str, params: Optional[dict[str, str]] = None, metrics: Optional[list[Metric]] = None) -> None:
        params, metrics = [Param(k, v) for k, v in (params or {}).items()], metrics or []
        for start in range(0, len(params), 100):  # MLflow's limits per batch: 100 params, 1000 metrics
            self.client.log_batch(run_id, params=params[start:start + 100])
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[start:start + 1000])

    def _log_artifacts(
        self, run_id: str, trial: tune.experiment.Trial, config: TrialConfig, adapter: bool = True
    ) -> None:
        """The trial's config, and with `adapter` from its last checkpoint the adapter, predictions and summary."""
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / TRIAL_CONFIG).write_text(json.dumps(dataclasses.asdict(config), indent=1))
            self.client.log_artifact(run_id, str(Path(tmp) / TRIAL_CONFIG))
        path = self._checkpoints.get(trial.trial_id)
        if path is None or not adapter:
            return
        with checkpoint_at(path, config.storage_path).as_directory() as folder:
            for name in ADAPTER_FILES:
                if (Path(folder) / name).exists():
                    self.client.log_artifact(run_id, str(Path(folder) / name), "adapter")
            for name in RECORD_FILES:
                if (Path(folder) / name).exists():
                    self.client.log_artifact(run_id, str(Path(folder) / name))


def best_run(runs: Sequence[Any], objectives: Sequence[tuple[str, str]]) -> Optional[Any]:
    """The trial run selection.best chooses by the last values of `objectives` ((metric, mode) pairs): finished, not
    diverged, best on the first objective, ties broken by the next, then by the earlier trial; None if none has them."""
    candidates = {
        run.info.run_id: Candidate(
            run.data.tags.get(TRIAL_ID, run.info.run_id), run.data.metrics, run.info.status, DIVERGED_TAG in run.data.tags
        )
        for run in runs
    }
    chosen = best(list(candidates.values()), objectives)
    return next((run for run in runs if chosen is not None and candidates[run.info.run_id] is chosen), None)


def checkpoint_at(path: str, storage_path: str) -> ray.train.Checkpoint:
    """A checkpoint reported by a trial, on the storage path's filesystem (local, S3, GCS, ...)."""
    if is_remote(storage_path):
        filesystem, _ = pyarrow.fs.FileSystem.from_uri(storage_path)
        return ray.train.Checkpoint(path, filesystem=filesystem)
    return ray.train.Checkpoint(path)


def now_ms() -> int:
    return int(time.time() * 1000)
