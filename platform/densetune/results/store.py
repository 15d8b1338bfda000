"""Reading a sweep's record from the MLflow store: the one place that finds a sweep's runs, and everything the report
and the CLIs read there (its trials as a frame, their evaluations, answers and metric histories, its tuned study's
table, the files its trials logged). The sweep's tracker writes the record (densetune.sweep.record); both use the names
in densetune.files.

    python -m densetune.sweep list            # the sweeps in the store, their status and trials
    python -m densetune.sweep close NAME      # end as KILLED the runs a dead driver left RUNNING
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Run
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from ..config import DEFAULT_METRIC, DENSELORA_METHODS, field_type
from ..files import FACTS, PREDICTIONS, ROLE, SNAPSHOTS, STUDY, SWEEP, TRIAL_ID, TUNED_ROLE, TUNING_TABLE, WALL_TIME
from ..sweep.record import store_uri
from ..sweep.selection import FINISHED
from .curves import HISTORY_COLUMNS, last_per_step

AVERAGE = "average"
FAMILIES = ("accuracy", "accuracy_norm")  # accuracy_norm: the text protocol's length-normalised pick
# Columns every trial row has, as nan where the store lacks them (a trial that failed before its first report)
TRIAL_COLUMNS = ("seed", "method", "variant", "share_scope", "protocol", "trainable_params", "trainable_pct", "loss",
                 WALL_TIME)
Key = tuple[str, int]  # a question: (benchmark, its index in the benchmark's full test list)


# Finding a sweep


def sweep_records(client: MlflowClient, sweep: str, tracking_uri: str, study: Optional[str] = None) -> list[Run]:
    """Every run of `sweep`, its own and its trials'. Raises ValueError, one line naming the sweeps there, when the
    store (or its `study`) has no sweep of that name."""
    ids = experiment_ids(client, study)
    runs = client.search_runs(ids, f"tags.{SWEEP} = '{sweep}'", max_results=10_000) if ids else []
    if not any(r.data.tags.get(ROLE) == "sweep" for r in runs):
        found = sweeps(tracking_uri)
        if study is not None:
            found = found[found["study"] == study]
        known = ", ".join(sorted(found["sweep"])) or "none"
        where = tracking_uri if study is None else f"study {study!r} of {tracking_uri}"
        raise ValueError(f"no sweep named {sweep!r} in {where}; the sweeps there: {known}")
    return runs


def experiment_ids(client: MlflowClient, study: Optional[str] = None) -> list[str]:
    """The ids of the store's experiments, or of the one named `study` (none if it does not exist)."""
    experiments = [client.get_experiment_by_name(study)] if study else client.search_experiments()
    return [e.experiment_id for e in experiments if e is not None]


def sweeps(tracking_uri: str) -> pd.DataFrame:
    """One row per sweep in the store: its name, study, status, start, and how many of its trials ended how."""
    client = MlflowClient(tracking_uri)
    ids = experiment_ids(client)
    parents, trials = (
        client.search_runs(ids, f"tags.`{ROLE}` = '{role}'", max_results=50_000) if ids else [] for role in ("sweep", "trial")
    )
    rows = []
    for parent in parents:
        name = parent.data.tags[SWEEP]
        statuses = pd.Series([r.info.status for r in trials if r.data.tags.get(SWEEP) == name], dtype=str)
        rows.append({
            "sweep": name, "study": parent.data.tags.get(STUDY), "status": parent.info.status,
            "started": pd.Timestamp(parent.info.start_time, unit="ms").strftime("%Y-%m-%d %H:%M"),
            "trials": ", ".join(f"{n} {status}" for status, n in statuses.value_counts().sort_index().items()),
        })
    return pd.DataFrame(rows, columns=["sweep", "study", "status", "started", "trials"])


def close_sweep(sweep: str, tracking_uri: str) -> list[str]:
    """End as KILLED every run of `sweep` still RUNNING: what a driver that died (kill -9, a lost head) leaves behind.
    Returns their names. Raises ValueError naming the known sweeps when the store has none of that name."""
    client = MlflowClient(tracking_uri)
    running = [r for r in sweep_records(client, sweep, tracking_uri) if r.info.status == "RUNNING"]
    for run in running:
        client.set_terminated(run.info.run_id, "KILLED")
    return [run.info.run_name for run in running]


# A sweep's trials


def sweep_runs(sweep: str, tracking_uri: Optional[str] = None, study: Optional[str] = None) -> pd.DataFrame:
    """One row per trial of `sweep`: run id and name, trial id, status, the params (typed), the last value of each metric;
    none while the sweep has no trial yet.

    Params carry TrialConfig's types (rank is an int, lr a float), so the frame sorts and plots as expected. The store
    is by default the one a study writes to without flags (store_uri). Raises ValueError naming the known sweeps when
    the store (or its `study`) has no sweep of that name.
    """
    uri = store_uri(tracking_uri)
    return trial_frame(sweep_records(MlflowClient(uri), sweep, uri, study))


def trial_frame(runs: Sequence[Run]) -> pd.DataFrame:
    """The trial runs among `runs` as sweep_runs' frame, sorted by trial id."""
    rows = [
        {
            "run_id": run.info.run_id, "run_name": run.info.run_name, "trial_id": run.data.tags.get(TRIAL_ID),
            "status": run.info.status,
            **{k: typed_param(k, v) for k, v in run.data.params.items()},
            # the facts logged as metrics too keep their params' types (trainable_params an int)
            **{k: FACTS[k](v) if k in FACTS else v for k, v in run.data.metrics.items()},
        }
        for run in runs if run.data.tags.get(ROLE) == "trial"
    ]
    return pd.DataFrame(rows).sort_values("trial_id", ignore_index=True) if rows else pd.DataFrame(rows)


def typed_param(name: str, value: str) -> Any:
    """A param as the type its setting has (TrialConfig's, or a fact's): MLflow keeps every param as a string."""
    kind = FACTS.get(name) or (field_type(name) or (str, False))[0]
    if kind is bool:
        return value == "True"
    try:
        return kind(value) if kind in (int, float) else value
    except ValueError:
        return value


# What the report reads


@dataclass(frozen=True)
class Answers:
    """One trial's evaluated questions: before training (empty when it did not evaluate at start) and after."""

    untuned: dict[Key, dict]
    trained: dict[Key, dict]


@dataclass
class SweepRecord:
    """What the report reads of one sweep, read once: its run, its trials as a frame, their answers."""

    name: str
    study: str
    tracking_uri: str
    parent: Run
    # one row per trial: sweep_runs' columns, `configuration`, `label` (the method, a DenseLoRA variant apart), and
    # untuned_<metric> / trained_<metric> for every accuracy metric
    trials: pd.DataFrame
    searched: list[str]  # the settings of the search space
    metrics: list[str]  # accuracy/<benchmark>, accuracy/average, and accuracy_norm/... under the text protocol
    answers: dict[str, Answers]  # run id -> its predictions, for the finished trials that logged them
    snapshots: list[str]  # run ids of the finished trials that logged increment snapshots
    tuned: Optional[Run] = None  # the --tune study run this sweep is a phase of, if it is one

    @property
    def objectives(self) -> list[tuple[str, str]]:
        """(metric, mode) of each objective the sweep chose on, as its run recorded them."""
        return objectives(self.parent)

    @property
    def validation(self) -> Optional[str]:
        """The validation accuracy the trials logged (val/accuracy/average), or None for a sweep without a validation
        set: then nothing in the report is chosen."""
        return DEFAULT_METRIC if DEFAULT_METRIC in self.trials else None

    @property
    def configuration_keys(self) -> list[str]:
        """The searched settings but the seed: what tells one configuration from another."""
        return [k for k in self.searched if k != "seed"]

    @property
    def finished(self) -> pd.DataFrame:
        """The trials the statistics and figures use, in the order of the tables: by size, then configuration, seed."""
        if self.trials.empty:
            return self.trials
        finished = self.trials[self.trials["status"] == FINISHED]
        return finished.sort_values(["trainable_params", "configuration", "seed"], kind="stable")

    @property
    def families(self) -> list[str]:
        """The accuracy families the trials logged (accuracy, and accuracy_norm under the text protocol)."""
        return [f for f in FAMILIES if f"{f}/{AVERAGE}" in self.metrics]

    @property
    def benchmarks(self) -> list[str]:
        """The benchmarks, with the average last."""
        names = sorted({m.split("/", 1)[1] for m in self.metrics} - {AVERAGE})
        return [*names, AVERAGE]


def objectives(sweep_run: Run) -> list[tuple[str, str]]:
    """(metric, mode) of each objective a sweep chose on, as its run recorded them."""
    params = sweep_run.data.params
    metrics, modes = params.get("metric", DEFAULT_METRIC).split(","), params.get("mode", "max").split(",")
    return list(zip(metrics, modes))


def load_sweep(sweep: str, tracking_uri: str, study: Optional[str], downloads: Path) -> SweepRecord:
    """Everything the report needs from the store; artifacts are downloaded into `downloads`."""
    client = MlflowClient(tracking_uri)
    runs = sweep_records(client, sweep, tracking_uri, study)
    parent = next(run for run in runs if run.data.tags.get(ROLE) == "sweep")
    experiment = client.get_experiment(parent.info.experiment_id).name
    # a sweep of the same name in another study is another sweep
    trials = trial_frame([run for run in runs if run.info.experiment_id == parent.info.experiment_id])
    searched = list(json.loads(parent.data.params.get("space", "{}")))
    metrics = accuracy_metrics(trials)
    if not trials.empty:
        trials = trials.reindex(columns=[*trials.columns, *(c for c in TRIAL_COLUMNS if c not in trials)])
        trials = trials.assign(
            configuration=[configuration(row, [k for k in searched if k != "seed"]) for _, row in trials.iterrows()],
            label=[method_label(row) for _, row in trials.iterrows()],
        ).join(evaluations(client, trials, [*metrics, *([DEFAULT_METRIC] if DEFAULT_METRIC in trials else [])]))
    finished = trials[trials["status"] == FINISHED]["run_id"] if not trials.empty else []
    artifacts = {run_id: {a.path for a in client.list_artifacts(run_id)} for run_id in finished}
    answers = {
        run_id: read_answers(client, run_id, downloads / run_id) for run_id, names in artifacts.items()
        if PREDICTIONS in names
    }
    snapshots = [run_id for run_id, names in artifacts.items() if SNAPSHOTS in names]
    return SweepRecord(
        sweep, experiment, tracking_uri, parent, trials, searched, metrics, answers, snapshots,
        tuned_study(client, parent),
    )


def accuracy_metrics(trials: pd.DataFrame) -> list[str]:
    """The accuracy metrics the trials logged, each family's average after its benchmarks."""
    found = [c for c in trials.columns if c.split("/", 1)[0] in FAMILIES and "/" in c]
    return sorted(found, key=lambda m: (FAMILIES.index(m.split("/", 1)[0]), m.endswith(f"/{AVERAGE}"), m))


def configuration(trial: pd.Series, keys: Sequence[str]) -> str:
    """The trial's values of `keys` (the searched settings but the seed: trials that differ only by seed repeat one
    configuration). A searched method is written as its label: a sweep's "freeze" runs as method denselora with
    variant freeze, and must not merge with plain DenseLoRA."""
    return " ".join(f"{k}={method_label(trial) if k == 'method' else trial.get(k)}" for k in keys) or "all"


def method_label(trial: pd.Series) -> str:
    """The method, a DenseLoRA variant and DenseLoRA without sharing counting as methods of their own
    (denselora/freeze, denselora/unshared, hybrid/only_matrix/unshared)."""
    method = str(trial.get("method", "?"))
    if method not in DENSELORA_METHODS:
        return method
    variant = trial.get("variant", "denselora")
    unshared = trial.get("share_scope") == "layer"
    return "/".join([method, *([variant] if variant != "denselora" else []), *(["unshared"] if unshared else [])])


def evaluations(client: MlflowClient, trials: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """untuned_<metric> and trained_<metric> of every trial (nan where it has no such evaluation)."""
    rows = []
    for run_id in trials["run_id"]:
        row = {}
        for metric in metrics:
            row[f"untuned_{metric}"], row[f"trained_{metric}"] = before_after(client.get_metric_history(run_id, metric))
        rows.append(row)
    columns = [f"{when}_{m}" for m in metrics for when in ("untuned", "trained")]
    return pd.DataFrame(rows, index=trials.index, columns=columns)


def before_after(history: Sequence[Metric]) -> tuple[float, float]:
    """The value at step 0 (the model before any update) and at the last step after it."""
    points = sorted((m.step, m.timestamp, m.value) for m in history)
    untuned = next((value for step, _, value in points if step == 0), math.nan)
    trained = points[-1][2] if points and points[-1][0] > 0 else math.nan
    return untuned, trained


def read_answers(client: MlflowClient, run_id: str, folder: Path) -> Answers:
    """A trial's predictions (its logged predictions.json, downloaded into `folder`): before training and after."""
    folder.mkdir(parents=True, exist_ok=True)
    records = json.loads(Path(client.download_artifacts(run_id, PREDICTIONS, str(folder))).read_text())
    last = max((r["step"] for r in records), default=0)
    return Answers(questions(records, 0) if last > 0 else {}, questions(records, last))


def questions(records: list[dict], step: int) -> dict[Key, dict]:
    """The predictions at `step`, by question, so that two evaluations pair up on the same questions."""
    return {(r["benchmark"], int(r["index"])): r for r in records if r["step"] == step}


def tuned_study(client: MlflowClient, sweep_run: Run) -> Optional[Run]:
    """The --tune study run this sweep's run is nested under, if it is one."""
    parent = sweep_run.data.tags.get(MLFLOW_PARENT_RUN_ID)
    run = client.get_run(parent) if parent else None
    return run if run is not None and run.data.tags.get(ROLE) == TUNED_ROLE else None


def is_comparison(study: Run, sweep_run: Run) -> bool:
    """Whether the sweep is its tuned study's comparison, which bears the study's name (its tuning sweeps bear
    <name>-tuning-<k>)."""
    return study.data.tags.get(SWEEP) == sweep_run.data.tags.get(SWEEP)


def tuning_table(record: SweepRecord, downloads: Path) -> Optional[pd.DataFrame]:
    """Where the sweep is --tune's comparison phase, the tuning table its study run keeps (TUNING_TABLE, downloaded
    into `downloads`); None for any other sweep."""
    study = record.tuned
    if study is None or not is_comparison(study, record.parent):
        return None
    client = MlflowClient(record.tracking_uri)
    return pd.read_csv(client.download_artifacts(study.info.run_id, TUNING_TABLE, str(downloads)))


def snapshot_files(record: SweepRecord, downloads: Path) -> dict[str, Path]:
    """Run id -> its increment snapshots (SNAPSHOTS), downloaded into `downloads`/<run id>, for the finished trials
    that logged them."""
    client = MlflowClient(record.tracking_uri)
    files = {}
    for run_id in record.snapshots:
        target = downloads / run_id
        target.mkdir(parents=True, exist_ok=True)
        files[run_id] = Path(client.download_artifacts(run_id, SNAPSHOTS, str(target)))
    return files


def metric_histories(client: MlflowClient, run_ids: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """The histories of `metrics` in the runs `run_ids`: one row per run, metric and step (columns run_id, metric,
    step, value). Where a metric was logged more than once at a step (a trial's final device_seconds), the value
    logged last (largest timestamp) is kept. A metric a run never logged has no rows."""
    rows = [
        (run_id, m.key, m.timestamp, int(m.step), float(m.value))
        for run_id in run_ids for metric in metrics for m in client.get_metric_history(run_id, metric)
    ]
    frame = pd.DataFrame(rows, columns=["run_id", "metric", "timestamp", "step", "value"])
    frame = frame.sort_values("timestamp", kind="stable")  # on a tie, the order the store gave
    return last_per_step(frame)[HISTORY_COLUMNS]


# The CLI

STORAGE_PATH = "runs"  # --storage-path's default


def store_options(defaults: bool) -> argparse.ArgumentParser:
    """The options every command takes, for `parents=`: on the top parser with their defaults, and on each command's
    parser without (argparse.SUPPRESS), so that one given before the command is not reset by the command's parser and
    one given after it means the same."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--tracking-uri", default=None if defaults else argparse.SUPPRESS,
        help="the MLflow store (default: $MLFLOW_TRACKING_URI, else the embedded store of --storage-path, as the "
        "studies use)",
    )
    options.add_argument(
        "--storage-path", default=STORAGE_PATH if defaults else argparse.SUPPRESS, help=f"(default: {STORAGE_PATH})",
    )
    return options


def main(argv: Optional[list[str]] = None) -> int:
    """python -m densetune.sweep [options] list | close NAME [options]"""
    parser = argparse.ArgumentParser(
        prog="python -m densetune.sweep", description="The sweeps in a tracking store, and closing one whose driver died.",
        parents=[store_options(defaults=True)],
    )
    commands = parser.add_subparsers(dest="command", required=True)
    after = store_options(defaults=False)  # the same options after the command
    commands.add_parser("list", help="every sweep: its study, status, start and its trials by status", parents=[after])
    close = commands.add_parser(
        "close", help="end as KILLED every run of a sweep still RUNNING; for a sweep whose driver is gone (to go on "
        "with it instead, run its study again with --resume)", parents=[after],
    )
    close.add_argument("name")
    args = parser.parse_args(argv)
    uri = store_uri(args.tracking_uri, args.storage_path)
    if args.command == "list":
        found = sweeps(uri)
        print(found.to_string(index=False) if not found.empty else f"no sweeps in {uri}")
        return 0
    try:
        closed = close_sweep(args.name, uri)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"sweep {args.name}: closed {len(closed)} run(s) left RUNNING" + "".join(f"\n  {n}" for n in closed))
    return 0
