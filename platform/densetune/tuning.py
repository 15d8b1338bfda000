"""Each configuration at its own best: `--tune lr=1e-4,3e-4,1e-3,3e-3`, then the comparison.

A fair comparison of methods gives each its own learning rate (or any other searched setting). Two phases, each a
sweep, both nested under one MLflow run of the study:

1. Tuning. Every configuration of the space (its settings but the seed) trains at every value of the tuned setting,
   with one seed, and is evaluated on the validation set only; each configuration's value is the one whose trial is
   best on the sweep's first objective (selection.best: finished trials only, ties to the earlier trial). Each
   configuration is a sweep of its own, so that ASHA, if asked for, stops a trial for trailing the same
   configuration's other values, never another method's. Where a configuration's pick is the lowest or highest value it tried, one value past that edge
   is tried for it (the step of the two nearest values: geometric for positive numbers), up to `extend` times.
2. Comparison. Each configuration at its picked value, with every seed, evaluated on the test split too: the sweep
   whose report compares them with paired tests; the report shows the tuning table first.

The test split chooses nothing: the tuning phase does not even evaluate it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import pandas as pd
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

from .config import SEARCHABLE, SweepConfig, grid_points, points_space, settings_label
from .files import ROLE, STUDY, SWEEP, TUNED_ROLE, TUNING_TABLE
from .sweep.record import artifact_root, check_tracking_uri, git_commit, source_tags, store_uri
from .sweep.selection import Candidate, best
from .sweep.tune import SweepResult, check_sweep, objectives, run_sweep



@dataclass(frozen=True)
class Tuning:
    setting: str  # a searchable setting, e.g. lr
    values: tuple  # the grid it is tuned over
    extend: int = 2  # values tried past a grid's edge, per configuration, where its pick lands on that edge


@dataclass
class TunedResult:
    name: str  # the study's run name; its phases are <name>-tuning[-k] and <name>
    run_id: str  # the study's run
    table: pd.DataFrame  # one row per tuning trial: configuration, value, the objective, status, picked
    picks: dict[str, Any]  # configuration label -> its value
    comparison: SweepResult  # the second phase


def check_tuning(sweep: SweepConfig, tuning: Tuning) -> None:
    """Bad input in one line before anything starts: the setting, its values, and every trial of both phases."""
    if tuning.setting not in SEARCHABLE or tuning.setting == "seed":
        allowed = ", ".join(s for s in SEARCHABLE if s != "seed")
        raise ValueError(f"--tune {tuning.setting!r}: not a setting to tune; allowed: {allowed}")
    if tuning.setting in sweep.space:
        raise ValueError(f"--tune {tuning.setting} and --space {tuning.setting}=... both set it: use one of them")
    if len(tuning.values) < 2:
        raise ValueError(f"--tune {tuning.setting}: give at least two values to choose from; got {list(tuning.values)}")
    if tuning.extend < 0:
        raise ValueError(f"--tune-extend must be a non-negative integer; got {tuning.extend!r}")
    if sweep.search != "grid":
        raise ValueError(f"--tune runs each phase as a grid; search {sweep.search!r} draws its own trials")
    configurations, seeds = split_space(sweep)
    points = [{**c, tuning.setting: v, "seed": s} for c in configurations for v in tuning.values for s in seeds]
    check_sweep(dataclasses.replace(sweep, space=points_space(points), points=points))


def plan(sweep: SweepConfig, tuning: Tuning) -> tuple[list[str], SweepConfig]:
    """What a tuned study runs, as lines, and its first phase as a sweep (for a dry run's estimate)."""
    configurations, seeds = split_space(sweep)
    first = len(configurations) * len(tuning.values)
    lines = [
        f"--tune {tuning.setting} over {', '.join(map(str, tuning.values))}: {first} tuning trials (every configuration "
        f"at every value, seed {seeds[0]}, the validation set only), up to {tuning.extend * len(configurations)} more "
        f"past the edges, then {len(configurations) * len(seeds)} comparison trials (each configuration at its pick, "
        f"seeds {', '.join(map(str, seeds))})",
    ]
    points = [{**c, tuning.setting: v} for c in configurations for v in tuning.values]
    phase = dataclasses.replace(
        sweep, name=f"{sweep.name or sweep.study}-tuning", space=points_space(points), points=points,
        trial=dataclasses.replace(sweep.trial, seed=seeds[0], evaluate_test=False),
    )
    return lines, phase


def split_space(sweep: SweepConfig) -> tuple[list[dict[str, Any]], list[int]]:
    """The configurations (every combination of the space's settings but the seed, or the explicit points without
    their seeds) and the seeds."""
    seeds = list(sweep.space.get("seed", [sweep.trial.seed]))
    if sweep.points is not None:
        configurations = [{k: v for k, v in point.items() if k != "seed"} for point in sweep.points]
        return [c for i, c in enumerate(configurations) if c not in configurations[:i]], seeds
    space = {k: v for k, v in sweep.space.items() if k != "seed"}
    return list(grid_points(space)), seeds


def run_tuned(sweep: SweepConfig, tuning: Tuning) -> TunedResult:
    """Tune `tuning.setting` for every configuration on the validation set, then run each at its value with every
    seed; every sweep of both phases nested under one MLflow run of the study."""
    check_tuning(sweep, tuning)
    name = sweep.name or f"{sweep.study}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    configurations, seeds = split_space(sweep)
    keys = list(dict.fromkeys(k for c in configurations for k in c))
    uri = store_uri(sweep.tracking_uri, sweep.trial.storage_path)
    check_tracking_uri(uri)
    client = MlflowClient(uri)
    parent = study_run(client, sweep, tuning, name, uri)
    try:
        return tune_then_compare(sweep, tuning, name, configurations, seeds, keys, client, parent)
    except BaseException:
        # interrupted (Ctrl-C, SIGTERM) or failed: the study's run must not stay RUNNING; its sweeps close their own
        if client.get_run(parent).info.status == "RUNNING":
            client.set_terminated(parent, "KILLED")
        raise


def tune_then_compare(
    sweep: SweepConfig, tuning: Tuning, name: str, configurations: list[dict[str, Any]], seeds: list[int],
    keys: list[str], client: MlflowClient, parent: str,
) -> TunedResult:
    """The two phases of run_tuned, under the study's run `parent`."""
    goal = objectives(sweep)[:1]
    tuning_trial = dataclasses.replace(sweep.trial, seed=seeds[0], evaluate_test=False)
    tried: dict[str, dict[Any, Candidate]] = {}
    for index, configuration in enumerate(configurations, 1):
        # A sweep per configuration: ASHA then compares a configuration's values with each other, never one method's
        # trials with another's.
        label, values = settings_label(configuration, keys), list(tuning.values)
        tried[label] = {}
        for round_ in range(tuning.extend + 1):
            points = [{**configuration, tuning.setting: value} for value in values]
            phase = run_sweep(dataclasses.replace(
                sweep, name=f"{name}-tuning-{index}" + (f"-{round_ + 1}" if round_ else ""), trial=tuning_trial,
                space=points_space(points), points=points, parent_run_id=parent, resume=False,
            ))
            record(phase, points, keys, tuning.setting, goal[0][0], tried)
            beyond = past_edge(list(tried[label]), choose({label: tried[label]}, goal).get(label))
            if beyond is None:
                break
            values = [beyond]
    picks = choose(tried, goal)
    table = tuning_frame(tried, picks, goal[0][0])
    log_table(client, parent, table, picks)
    missing = [label for label in tried if label not in picks]
    if missing:
        client.set_terminated(parent, "FAILED")
        raise RuntimeError(f"no tuning trial of {', '.join(missing)} finished with {goal[0][0]}: nothing to compare "
                           "them at")
    compared = [{**c, tuning.setting: picks[settings_label(c, keys)], "seed": s} for c in configurations for s in seeds]
    # the comparison runs every trial to its end: a scheduler stops trials to save time in a search, not here
    comparison = run_sweep(dataclasses.replace(
        sweep, name=name, space=points_space(compared), points=compared, parent_run_id=parent, resume=False,
        scheduler="fifo",
    ))
    client.set_terminated(parent, "FAILED" if comparison.failed or comparison.diverged else "FINISHED")
    return TunedResult(name, parent, table, picks, comparison)


def study_run(client: MlflowClient, sweep: SweepConfig, tuning: Tuning, name: str, uri: str) -> str:
    """The study's MLflow run, the parent of its phases' sweep runs: what was tuned over which values."""
    found = client.get_experiment_by_name(sweep.study)
    experiment = found.experiment_id if found else client.create_experiment(
        sweep.study, artifact_location=artifact_root(uri)
    )
    run = client.create_run(experiment, run_name=name, tags={
        ROLE: TUNED_ROLE, SWEEP: name, STUDY: sweep.study, MLFLOW_GIT_COMMIT: git_commit(), **source_tags(),
    })
    params = {
        "tuned": tuning.setting, "values": json.dumps(list(tuning.values)), "extend": str(tuning.extend),
        "space": json.dumps(sweep.space), "metric": objectives(sweep)[0][0], "mode": objectives(sweep)[0][1],
    }
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    return run.info.run_id


def record(
    phase: SweepResult, points: list[dict[str, Any]], keys: list[str], setting: str, metric: str,
    tried: dict[str, dict[Any, Candidate]],
) -> None:
    """Each point's trial as a Candidate (its objective's last value and its status), by configuration and value.
    A trial's run is named by its point (sweep.record: settings_label of the searched settings, in the space's order).
    Its key starts with the order in which its configuration tried it, so that a tie goes to the value tried first
    (Tune's trial ids differ in a random prefix from one sweep to the next), and ends with its trial id."""
    runs = phase.trials.set_index("run_name") if not phase.trials.empty else pd.DataFrame()
    for point in points:
        label = settings_label(point, [*keys, setting])
        row = runs.loc[label] if label in runs.index else None
        value = row.get(metric) if row is not None else math.nan
        by_value = tried[settings_label(point, keys)]
        by_value[point[setting]] = Candidate(
            f"{len(by_value):03d} {row['trial_id'] if row is not None else label}",
            {metric: float(value)} if value is not None and pd.notna(value) else {},
            str(row["status"]) if row is not None else "FAILED",
        )


def choose(tried: dict[str, dict[Any, Candidate]], goal: list[tuple[str, str]]) -> dict[str, Any]:
    """Per configuration, the value whose trial selection.best picks; configurations with none are left out."""
    picks = {}
    for label, by_value in tried.items():
        chosen = best(list(by_value.values()), goal)
        if chosen is not None:
            picks[label] = next(value for value, candidate in by_value.items() if candidate is chosen)
    return picks


def past_edge(values: list[Any], pick: Any) -> Optional[Any]:
    """The next value past the edge of `values` that `pick` sits on (None if it sits on neither, or the values are not
    numbers): a step as large as the one between the edge and its neighbour, a factor for positive numbers."""
    numbers = sorted(values)
    if pick is None or len(numbers) < 2 or not all(isinstance(v, (int, float)) for v in numbers):
        return None
    if pick == numbers[0]:
        edge, neighbour = numbers[0], numbers[1]
    elif pick == numbers[-1]:
        edge, neighbour = numbers[-1], numbers[-2]
    else:
        return None
    beyond = edge * edge / neighbour if edge > 0 and neighbour > 0 else 2 * edge - neighbour
    return round(beyond) if all(isinstance(v, int) for v in numbers) else float(f"{beyond:.6g}")


def tuning_frame(tried: dict[str, dict[Any, Candidate]], picks: dict[str, Any], metric: str) -> pd.DataFrame:
    rows = [
        {"configuration": label, "value": value, metric: c.metrics.get(metric, math.nan), "status": c.status,
         "trial": c.key, "picked": picks.get(label) == value}
        for label, by_value in tried.items() for value, c in sorted(by_value.items())
    ]
    return pd.DataFrame(rows, columns=["configuration", "value", metric, "status", "trial", "picked"])


def log_table(client: MlflowClient, run_id: str, table: pd.DataFrame, picks: dict[str, Any]) -> None:
    """The tuning table (tuning.csv) and the picks (a param) on the study's run."""
    client.log_param(run_id, "picks", json.dumps(picks))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / TUNING_TABLE
        table.to_csv(path, index=False)
        client.log_artifact(run_id, str(path))
