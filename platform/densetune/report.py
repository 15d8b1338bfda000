"""A sweep's report, regenerated from its tracking store: the paper's tables and figures, with intervals over seeds
and paired tests on the same questions, so that a difference is called one only where the data show it.

    python -m densetune.report SWEEP [--tracking-uri URI] [--study NAME] [--out DIR]

writes report.md, trials.csv, pairs.csv and PNG figures into the sweep's folder (or --out), and logs them to the
sweep's MLflow run under report/.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # not pyplot: no display backend on the machines sweeps run on
from mlflow import MlflowClient
from mlflow.entities import Metric, Run
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from .config import DEFAULT_METRIC, DENSELORA_METHODS
from .curves import (
    budget_lines, budget_table, curve_points, learning_curves_caption, learning_curves_figure, loss_caption, loss_figure,
    mean_curves, metric_histories, save,
)
from .files import PREDICTIONS, SNAPSHOTS
from .selection import FINISHED, Candidate, best, is_test_metric
from .stats import McNemar, detectable_difference, holm, interval, majority_baseline, mcnemar
from .storage import is_remote
from .tables import count, markdown_table, percent, percent_interval, significant
from .tracking import (
    DEVICE_SECONDS, ROLE, SWEEP, TUNED_ROLE, TUNING_TABLE, experiment_ids, store_uri, sweep_runs,
)

AVERAGE = "average"
ALPHA = 0.05  # a difference is called one where the Holm-adjusted p is below this
FAMILIES = ("accuracy", "accuracy_norm")  # accuracy_norm: the text protocol's length-normalised pick
NO_DIFFERENCE = "no difference shown"
VAL_LOSS = "val/loss"
MANIFEST = "report_files.txt"  # what the last report wrote into its folder: removed when it is regenerated
REPORT_ARTIFACTS = "report"  # the sweep's run keeps the report's files under this artifact path
BUDGET_SHARE = 0.9  # the learning curves' budget table: steps, tokens and seconds to 90 % of the best final accuracy
# Columns every trial row has, as nan where the store lacks them (a trial that failed before its first report)
TRIAL_COLUMNS = ("seed", "method", "variant", "share_scope", "protocol", "trainable_params", "trainable_pct", "loss", "wall_time_s")
PAIR_COLUMNS = ("trial_a", "trial_b", "configuration_a", "configuration_b", "seed_a", "seed_b", "same_seed",
                "same_configuration")
Key = tuple[str, int]  # a question: (benchmark, its index in the benchmark's full test list)


# What the store holds


@dataclass(frozen=True)
class Answers:
    """One trial's evaluated questions: before training (empty when it did not evaluate at start) and after."""

    untuned: dict[Key, dict]
    trained: dict[Key, dict]


@dataclass
class SweepRecord:
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
        params = self.parent.data.params
        metrics, modes = params.get("metric", DEFAULT_METRIC).split(","), params.get("mode", "max").split(",")
        return list(zip(metrics, modes))

    @property
    def validation(self) -> Optional[str]:
        """The validation accuracy the trials logged (val/accuracy/average), or None for a sweep without a validation
        set: then nothing in the report is chosen."""
        return DEFAULT_METRIC if DEFAULT_METRIC in self.trials else None

    @property
    def configuration_keys(self) -> list[str]:
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
        return [f for f in FAMILIES if f"{f}/{AVERAGE}" in self.metrics]

    @property
    def benchmarks(self) -> list[str]:
        """The benchmarks, with the average last."""
        names = sorted({m.split("/", 1)[1] for m in self.metrics} - {AVERAGE})
        return [*names, AVERAGE]


def load_sweep(sweep: str, tracking_uri: str, study: Optional[str], downloads: Path) -> SweepRecord:
    """Everything the report needs from the store; artifacts are downloaded into `downloads`."""
    client = MlflowClient(tracking_uri)
    parent = find_parent(client, sweep, tracking_uri, study)
    experiment = client.get_experiment(parent.info.experiment_id).name
    trials = sweep_runs(sweep, tracking_uri, experiment)
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


def find_parent(client: MlflowClient, sweep: str, tracking_uri: str, study: Optional[str]) -> Run:
    ids = experiment_ids(client, study)
    query = f"tags.{SWEEP} = '{sweep}' and tags.`{ROLE}` = 'sweep'"
    runs = client.search_runs(ids, query, max_results=1) if ids else []
    if not runs:
        where = f"study {study!r} of " if study else ""
        raise ValueError(f"no sweep {sweep!r} in {where}tracking store {tracking_uri}")
    return runs[0]


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
    folder.mkdir(parents=True, exist_ok=True)
    records = json.loads(Path(client.download_artifacts(run_id, PREDICTIONS, str(folder))).read_text())
    last = max((r["step"] for r in records), default=0)
    return Answers(questions(records, 0) if last > 0 else {}, questions(records, last))


def questions(records: list[dict], step: int) -> dict[Key, dict]:
    return {(r["benchmark"], int(r["index"])): r for r in records if r["step"] == step}


# Statistics


def gain(trials: pd.DataFrame, metric: str) -> pd.Series:
    return trials[f"trained_{metric}"] - trials[f"untuned_{metric}"]


def compare(a: dict[Key, dict], b: dict[Key, dict]) -> McNemar:
    """McNemar of two evaluations of the same questions, matched by benchmark and index."""
    keys = sorted(a)
    return mcnemar([bool(a[k]["correct"]) for k in keys], [bool(b[k]["correct"]) for k in keys])


def verdict(adjusted: float, result: McNemar, a_wins: str, b_wins: str) -> str:
    if adjusted >= ALPHA:
        return NO_DIFFERENCE
    return a_wins if result.a_only > result.b_only else b_wins


def before_vs_after(record: SweepRecord) -> pd.DataFrame:
    """Per finished trial that evaluated at start: McNemar of its step-0 answers against its final ones."""
    rows = []
    for _, trial in record.finished.iterrows():
        answers = record.answers.get(trial["run_id"])
        if answers and answers.trained and answers.untuned.keys() == answers.trained.keys():
            result = compare(answers.untuned, answers.trained)
            rows.append({"trial": trial["trial_id"], "configuration": trial["configuration"], "seed": trial.get("seed"),
                         "result": result})
    return with_tests(pd.DataFrame(rows, columns=["trial", "configuration", "seed", "result"]), "worse", "better")


def pairs(record: SweepRecord) -> pd.DataFrame:
    """McNemar between every two finished trials evaluated on the same questions (final answers, benchmarks
    pooled); the family tested together is the pairs that share a seed and differ in configuration."""
    trials = [t for _, t in record.finished.iterrows() if t["run_id"] in record.answers]
    rows = []
    for a, b in itertools.combinations(trials, 2):
        first, second = record.answers[a["run_id"]].trained, record.answers[b["run_id"]].trained
        if first and first.keys() == second.keys():
            rows.append({
                "trial_a": a["trial_id"], "trial_b": b["trial_id"],
                "configuration_a": a["configuration"], "configuration_b": b["configuration"],
                "seed_a": a.get("seed"), "seed_b": b.get("seed"), "same_seed": a.get("seed") == b.get("seed"),
                "same_configuration": a["configuration"] == b["configuration"], "result": compare(first, second),
            })
    frame = pd.DataFrame(rows, columns=[*PAIR_COLUMNS, "result"])
    return with_tests(frame, "A better", "B better", frame["same_seed"] & ~frame["same_configuration"])


TEST_COLUMNS = ("n", "both", "a_only", "b_only", "neither", "accuracy_a", "accuracy_b", "p", "p_holm", "detectable",
                "verdict")


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


def figure_lines(name: str, caption: str) -> list[str]:
    return [f"![{caption}]({name})", "", f"*{name}: {caption}*", ""]


# Sections of report.md


def header(record: SweepRecord, command: str) -> list[str]:
    params, trials = record.parent.data.params, record.trials
    protocols = sorted(set(trials["protocol"].dropna())) if "protocol" in trials else []
    statuses = trials["status"].value_counts() if not trials.empty else pd.Series(dtype=int)
    return [
        f"# Sweep {record.name}", "",
        f"- study: {record.study}",
        f"- model: {params.get('model', 'not recorded')}",
        f"- datasets: {params.get('datasets', 'not recorded')}",
        f"- protocol: {', '.join(protocols) or 'not recorded'}",
        f"- search space: {params.get('space', 'not recorded')}",
        f"- trials: {', '.join(f'{n} {status}' for status, n in statuses.items()) or 'none'}",
        *phase_line(record),
        f"- regenerate: `{command}`", "",
    ]


def phase_line(record: SweepRecord) -> list[str]:
    """For a sweep of a --tune study: which of its phases this sweep is."""
    study = record.tuned
    if study is None:
        return []
    name, setting = study.info.run_name, study.data.params.get("tuned", "a setting")
    if is_comparison(study, record.parent):
        return [f"- phase: the comparison of tuned study {name}, every configuration at its own {setting}"]
    return [f"- phase: tuning {setting} for tuned study {name}: one seed, judged on the validation set; the test split "
            "was not evaluated"]


def how_to_read() -> list[str]:
    return [
        "## How to read this", "",
        "Accuracies are percentages. An interval (±) is the half-width of the 95 % Student-t interval over the seeds "
        "of a configuration; with one seed there is no interval (n/a). Two evaluations are compared with an exact "
        "McNemar test on the same questions, and a difference is called one (better, worse) only where its "
        f"Holm-adjusted p is below {ALPHA}, across all the comparisons of its table; otherwise: {NO_DIFFERENCE}. "
        "\"detectable (points)\" is that test's resolution: the smallest accuracy difference it had an 80 % chance to "
        f"call significant at level {ALPHA} unadjusted, given its questions and its share of discordant ones (right "
        "in one evaluation only); Holm's adjustment raises the real threshold, so a difference below it going "
        "unshown says little, and \"none possible\" means too few discordant questions for any difference to show. "
        "The majority baseline is the accuracy of always giving a benchmark's most frequent gold answer.", "",
    ]


def tuning_section(record: SweepRecord, downloads: Path) -> list[str]:
    """Where the sweep is --tune's comparison phase: the tuning table its study run keeps (tracking.TUNING_TABLE), each
    configuration's validation result at every value tried, its pick in bold."""
    study = record.tuned
    if study is None or not is_comparison(study, record.parent):
        return []
    client = MlflowClient(record.tracking_uri)
    params = study.data.params
    table = pd.read_csv(client.download_artifacts(study.info.run_id, TUNING_TABLE, str(downloads)))
    setting, metric = params["tuned"], params["metric"]
    cells = table.assign(shown=[
        (f"**{percent(row[metric])}**" if row["picked"] else percent(row[metric]))
        + ("" if row["status"] == FINISHED else f" ({row['status']})")
        for _, row in table.iterrows()
    ]).pivot(index="configuration", columns="value", values="shown").fillna("")
    cells = cells.reset_index().rename(columns=lambda c: c if c == "configuration" else f"{setting}={c}")
    return [
        f"## Tuning: each configuration at its own {setting}", "",
        f"Before the comparison below, every configuration trained at each value of {setting} with one seed (the "
        f"first of the comparison's) and was judged on `{metric}` ({params.get('mode', 'max')}), the validation set; "
        "the test split was not evaluated. "
        "Where a pick landed on the edge of the values tried, the next value past it was tried too. Each row's pick "
        "is in bold and is the value it runs at below; a status in brackets: the trial did not finish (KILLED: "
        "stopped early by ASHA) and could not be picked.", "",
        *markdown_table(cells), "",
    ]


def tuned_study(client: MlflowClient, sweep_run: Run) -> Optional[Run]:
    """The --tune study run this sweep's run is nested under, if it is one."""
    parent = sweep_run.data.tags.get(MLFLOW_PARENT_RUN_ID)
    run = client.get_run(parent) if parent else None
    return run if run is not None and run.data.tags.get(ROLE) == TUNED_ROLE else None


def is_comparison(study: Run, sweep_run: Run) -> bool:
    """Whether the sweep is its tuned study's comparison, which bears the study's name (its tuning sweeps bear
    <name>-tuning-<k>)."""
    return study.data.tags.get(SWEEP) == sweep_run.data.tags.get(SWEEP)


def choices_section(record: SweepRecord) -> list[str]:
    """Which split chose what: the objectives, what the searcher and scheduler saw, the best trial and configuration
    (selection.best on the objectives' last values, and on their means over seeds), and where the front is drawn."""
    params, objectives = record.parent.data.params, record.objectives
    named = ", ".join(f"`{metric}` ({mode})" for metric, mode in objectives)
    lines = ["## How choices were made", ""]
    if any(is_test_metric(metric) for metric, _ in objectives):
        lines += [f"- This sweep chose on {named}, **the test split**: it ran before the platform held out a validation "
                  "set. Its search, pruning and best trial read test accuracy, which overstates them; the Pareto front "
                  "is not drawn.", ""]
        return lines
    if record.validation is None:
        return [*lines, f"- The sweep's objectives are {named}, but no trial logged a validation metric: nothing in "
                        "this report was chosen, and the Pareto front is not drawn.", ""]
    sizes = sorted(set(record.trials["val_size"].dropna().astype(int))) if "val_size" in record.trials else []
    held = f"{', '.join(map(str, sizes))} rows of each training set" if sizes else "rows of the training sets"
    lines.append(
        f"- Objective{'s' if len(objectives) > 1 else ''}: {named}; `val/...` is the validation set ({held}, held out "
        "from the training rows: the same for every trial and seed, never trained on). The searcher "
        f"({params.get('search', 'grid')}) and the scheduler ({params.get('scheduler', 'fifo')}) were shown every "
        "result without its test-split metrics."
    )
    finished = record.finished
    trial = best([candidate(row, row["trial_id"], objectives) for _, row in finished.iterrows()], objectives)
    if trial is not None:
        row = finished[finished["trial_id"] == trial.key].iloc[0]
        lines.append(f"- Best trial (finished trials only; ties go to the next objective, then the earlier trial): "
                     f"{trial.key} ({row['configuration']}, seed {row['seed']}): {objective_values(trial, objectives)}; "
                     f"{test_reported(finished.loc[finished['trial_id'] == trial.key])}.")
    means = finished.groupby("configuration")[[m for m, _ in objectives if m in finished]].mean()
    chosen = best([candidate(row, name, objectives) for name, row in means.iterrows()], objectives)
    if chosen is not None and finished["configuration"].nunique() > 1:
        lines.append(f"- Best configuration (the objectives' means over its seeds): {chosen.key}: "
                     f"{objective_values(chosen, objectives)}; "
                     f"{test_reported(finished.loc[finished['configuration'] == chosen.key])}.")
    lines += ["- The front of accuracy against size (Figures) is drawn on the validation accuracy. Every other accuracy "
              "in this report (untuned, trained, gains, pairs, methods) is the test split's, reported only: none chose "
              "anything.", ""]
    return lines


def test_reported(trials: pd.DataFrame) -> str:
    """What the chosen trials scored on the test split (mean and interval over them), said as reported only."""
    metric = f"accuracy/{AVERAGE}"
    if metric not in trials or trials[metric].isna().all():
        return "the test split was not evaluated"
    shown = percent(trials[metric].iloc[0]) if len(trials) == 1 else percent_interval(*interval(trials[metric]))
    return f"its test accuracy {shown} % is reported, not chosen on"


def candidate(row: pd.Series, key: str, objectives: Sequence[tuple[str, str]]) -> Candidate:
    return Candidate(str(key), {m: float(row[m]) for m, _ in objectives if m in row and pd.notna(row[m])})


def objective_values(chosen: Candidate, objectives: Sequence[tuple[str, str]]) -> str:
    return ", ".join(
        f"{m} {percent(chosen.metrics[m])} %" if "accuracy" in m else f"{m} {significant(chosen.metrics[m])}"
        for m, _ in objectives
    )


def trials_section(record: SweepRecord) -> list[str]:
    trials = record.trials.sort_values("trial_id")
    columns = {
        "trial": trials["trial_id"], "status": trials["status"], "configuration": trials["configuration"],
        "seed": trials["seed"], "trainable params": trials["trainable_params"].map(count),
    }
    for when in ("untuned", "trained"):
        if f"{when}_accuracy/{AVERAGE}" in trials:
            columns[when] = trials[f"{when}_accuracy/{AVERAGE}"].map(percent)
    # what each trial cost: the devices it reserved times its wall time, and the tokens it trained on
    for name, column in (("device seconds", DEVICE_SECONDS), ("tokens", "tokens_seen")):
        if column in trials:
            columns[name] = trials[column].map(count)
    excluded = (trials["status"] != FINISHED).sum()
    note = [f"{excluded} trial(s) did not finish: they are listed here but left out of every statistic and figure.", ""]
    return ["## Trials", "", *markdown_table(pd.DataFrame(columns)), "", *(note if excluded else [])]


def configurations_section(record: SweepRecord) -> list[str]:
    finished = record.finished
    rows = []
    for name, group in finished.groupby("configuration", sort=False):
        # the trials of a sweep answer the same questions: another trial's golds serve where this group kept none
        runs = [*group["run_id"], *finished["run_id"]]
        answers = next((record.answers[r] for r in runs if r in record.answers), None)
        for benchmark in record.benchmarks:
            row = {"configuration": name, "benchmark": benchmark, "seeds": len(group),
                   "trainable params": count(group["trainable_params"].mean()),
                   "trainable %": significant(group["trainable_pct"].mean())}
            for family in record.families:
                metric, tag = f"{family}/{benchmark}", "" if family == "accuracy" else " (norm)"
                if f"trained_{metric}" not in group:
                    continue
                row[f"untuned{tag}"] = percent(group[f"untuned_{metric}"].mean())
                row[f"trained{tag}"] = percent_interval(*interval(group[f"trained_{metric}"]))
                row[f"gain{tag}"] = percent_interval(*interval(gain(group, metric)))
            if record.validation:  # what chose, beside what is reported
                row["validation (trained)"] = (
                    percent_interval(*interval(group[record.validation])) if benchmark == AVERAGE else ""
                )
            answer, share = majority(answers, benchmark) if answers else ("", math.nan)
            row["majority baseline"] = f"{percent(share)} ({answer})" if answer else percent(share)
            rows.append(row)
    return [
        "## Configurations", "",
        "Finished trials grouped by their searched settings except the seed, smallest first: accuracy before "
        "training (untuned), after it (trained), and the gain, each a mean over seeds; validation (trained): the "
        "validation set's average accuracy at the end, what the sweep chose on.", "",
        *markdown_table(pd.DataFrame(rows).fillna("n/a")), "",
    ]


def tests_table(frame: pd.DataFrame, names: dict[str, str]) -> list[str]:
    shown = frame.rename(columns=names)[list(names.values())].copy()
    for column in ("accuracy A", "accuracy B", "untuned", "trained"):
        if column in shown:
            shown[column] = shown[column].map(percent)
    for column in ("p", "p (Holm)"):
        shown[column] = shown[column].map(significant)
    # inf: too few discordant questions for the test to reject at all
    shown["detectable (points)"] = shown["detectable (points)"].map(
        lambda value: "none possible" if value == math.inf else percent(value))
    return markdown_table(shown)


def before_after_section(record: SweepRecord) -> list[str]:
    frame = before_vs_after(record)
    title = ["## Before vs after training", ""]
    if frame.empty:
        return [*title, "No finished trial has predictions from an evaluation at step 0 (eval_at_start) and at its "
                        "end: nothing to compare.", ""]
    names = {"trial": "trial", "configuration": "configuration", "seed": "seed", "accuracy_a": "untuned",
             "accuracy_b": "trained", "a_only": "right only before", "b_only": "right only after", "p": "p",
             "p_holm": "p (Holm)", "detectable": "detectable (points)", "verdict": "verdict"}
    return [
        *title,
        "Each finished trial's answers before its first update against its final answers, on the same questions "
        "(all benchmarks pooled); Holm-adjusted across the trials.", "",
        *tests_table(frame, names), "",
    ]


def pairs_section(table: pd.DataFrame) -> list[str]:
    title = ["## Pairs", ""]
    family = table[table["same_seed"] & ~table["same_configuration"]] if not table.empty else table
    if family.empty:
        return [*title, "No two finished trials share a seed and differ in configuration on the same questions.", ""]
    names = {"trial_a": "trial A", "configuration_a": "configuration A", "trial_b": "trial B",
             "configuration_b": "configuration B", "seed_a": "seed", "accuracy_a": "accuracy A",
             "accuracy_b": "accuracy B", "a_only": "right only A", "b_only": "right only B", "p": "p",
             "p_holm": "p (Holm)", "detectable": "detectable (points)", "verdict": "verdict"}
    return [
        *title,
        "Final answers of two finished trials with the same seed and different configurations, on the same "
        "questions (all benchmarks pooled); Holm-adjusted across these pairs. `pairs.csv` holds every pair of "
        "finished trials evaluated on the same questions, same seed or not.", "",
        *tests_table(family, names), "",
    ]


def method_section(record: SweepRecord) -> list[str]:
    """The paper's Table 1: per configuration, its method, size and accuracy on each benchmark."""
    rows = []
    for name, group in record.finished.groupby("configuration", sort=False):
        row = {"method": group["label"].iloc[0], "configuration": name, "seeds": len(group),
               "trainable %": significant(group["trainable_pct"].mean())}
        for benchmark in record.benchmarks:
            metric = f"trained_accuracy/{benchmark}"
            row[benchmark] = percent_interval(*interval(group[metric])) if metric in group else "n/a"
        if "accuracy_norm" in record.families:
            row["average (norm)"] = percent_interval(*interval(group[f"trained_accuracy_norm/{AVERAGE}"]))
        rows.append(row)
    table = pd.DataFrame(rows).sort_values("method", kind="stable")  # and by size within a method
    return ["## Methods (the paper's Table 1)", "", *markdown_table(table), ""]


def dimension_table(finished: pd.DataFrame, keys: list[str], metric: str) -> list[str]:
    rows = []
    for values, group in finished.groupby(keys, sort=True):
        values = values if isinstance(values, tuple) else (values,)
        rows.append({**dict(zip(keys, values)), "seeds": len(group),
                     "trainable params": count(group["trainable_params"].mean()),
                     "accuracy": percent_interval(*interval(group[f"trained_{metric}"]))})
    return markdown_table(pd.DataFrame(rows))


def dimension_sections(record: SweepRecord) -> tuple[list[str], list[str]]:
    """The paper's Tables 3 (targets) and 4 (variants, with sharing off beside them), where the finished trials vary
    them; and the notes."""
    finished, metric = record.finished, f"accuracy/{AVERAGE}"
    lines, notes = [], []
    variants = finished[finished["method"] == "denselora"] if "method" in finished else finished.iloc[:0]
    for title, trials, dimension, keys, what in (
        ("Target modules (the paper's Table 3)", finished, "targets", ["label", "targets"], "targets takes"),
        # the label tells the variant and whether W_e, W_d are shared
        ("DenseLoRA variants and sharing (the paper's Table 4)", variants, "label", ["label"], "variant and share_scope take"),
    ):
        if distinct(trials, dimension) < 2:
            notes.append(f"- {title}: left out, {what} fewer than 2 values among the finished trials.")
        else:
            lines += [f"## {title}", "", *dimension_table(trials, keys, metric), ""]
    return lines, notes


def distinct(trials: pd.DataFrame, column: str) -> int:
    return trials[column].nunique() if column in trials else 0


# Figures


def baselines(record: SweepRecord, points: pd.DataFrame, metric: str) -> dict[str, float]:
    """What a figure's accuracies are to be read against: the untuned model (its mean over the trials that evaluated it)
    and, for the test split, always giving the majority answer (every trial answers the same questions; the answers
    kept are the test split's)."""
    lines = {}
    if f"untuned_{metric}" in points and points[f"untuned_{metric}"].notna().any():
        lines["untuned model"] = float(points[f"untuned_{metric}"].mean())
    if not is_test_metric(metric):
        return lines
    answers = next((record.answers[r] for r in points["run_id"] if r in record.answers), None)
    if answers is not None and answers.trained:
        lines["majority answer"] = majority(answers, AVERAGE)[1]
    return lines


def draw_baselines(axes: Any, lines: dict[str, float]) -> None:
    for (label, value), style in zip(lines.items(), (":", "-.")):
        axes.axhline(100 * value, color="grey", linestyle=style, linewidth=1, label=f"{label} ({100 * value:.1f})")


def pareto_figure(
    points: pd.DataFrame, front: pd.DataFrame, metric: str, path: Path, reference: dict[str, float]
) -> Path:
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    draw_baselines(axes, reference)
    for label, group in points.groupby("label"):
        axes.scatter(group["trainable_params"], 100 * group[f"trained_{metric}"], label=label, alpha=0.8)
    # The best mean accuracy reachable with at most x parameters, drawn on to the largest trial so that a front of
    # one configuration still shows as a line.
    sizes = [*front["trainable_params"], points["trainable_params"].max()]
    accuracies = 100 * np.array([*front["accuracy"], front["accuracy"].iloc[-1]])
    axes.step(sizes, accuracies, where="post", color="black", linewidth=1, label="Pareto front")
    axes.scatter(front["trainable_params"], 100 * front["accuracy"], s=80, facecolors="none", edgecolors="black",
                 label="its configurations (mean)")
    axes.set_xscale("log")
    axes.set(xlabel="trainable parameters", ylabel=f"{metric} (%)", title="accuracy against size")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return save(figure, path)


def dimension_figure(
    finished: pd.DataFrame, dimension: str, metric: str, path: Path, parameters: bool, reference: dict[str, float]
) -> Path:
    """Accuracy (mean ± interval over the trials at each value) against `dimension`, one line per method, with the
    baselines; with `parameters` also the trainable parameters, dashed, on a second axis."""
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    draw_baselines(axes, reference)
    sizes = axes.twinx() if parameters else None
    for label, group in finished.groupby("label"):
        values = sorted(group[dimension].unique())
        stats = [interval(group.loc[group[dimension] == v, f"trained_{metric}"]) for v in values]
        means, half_widths = (np.array(column) * 100 for column in zip(*stats))
        # one seed has no interval: no bar rather than no point
        drawn = axes.errorbar(values, means, yerr=np.nan_to_num(half_widths), marker="o", capsize=3, label=label)
        if sizes is not None:
            counts = [group.loc[group[dimension] == v, "trainable_params"].mean() for v in values]
            sizes.plot(values, counts, linestyle="--", marker="x", alpha=0.6, color=drawn.lines[0].get_color(),
                       label=f"{label} parameters")
    ticks = sorted(finished[dimension].unique())
    if dimension == "rank":  # ranks grow geometrically (8, 32, 128)
        axes.set_xscale("log", base=2)
        axes.minorticks_off()
    axes.set_xticks(ticks, labels=[f"{v:g}" for v in ticks])
    axes.set(xlabel=dimension, ylabel=f"{metric} (%)", title=f"accuracy against {dimension}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="upper left")
    if sizes is not None:
        sizes.set_yscale("log")
        sizes.set_ylabel("trainable parameters (dashed)")
        sizes.legend(fontsize="small", loc="lower right")
    return save(figure, path)


@dataclass
class Figures:
    """The figures drawn and the notes on those left out."""

    lines: list[str]
    notes: list[str]
    paths: list[Path]


def draw_figures(record: SweepRecord, folder: Path, downloads: Path) -> Figures:
    metric = f"accuracy/{AVERAGE}"
    finished = record.finished
    points = finished.dropna(subset=[c for c in (f"trained_{metric}", "trainable_params") if c in finished])
    if f"trained_{metric}" not in finished:
        points = finished.iloc[:0]
    figures = Figures([], [], [])
    reference = baselines(record, points, metric) if not points.empty else {}
    pareto_part(record, folder, figures)
    for dimension, paper, parameters in (("rank", "Figure 4", True), ("data_fraction", "Figure 3", False)):
        name = f"{dimension}.png"
        if distinct(points, dimension) < 2:
            figures.notes.append(f"- `{name}`: not drawn, {dimension} takes fewer than 2 values among the finished "
                                 "trials with an accuracy.")
            continue
        figures.paths.append(dimension_figure(points, dimension, metric, folder / name, parameters, reference))
        caption = (f"{metric} (test split) after training against {dimension} (the paper's {paper}), one line per "
                   "method, mean ± 95 % interval over the trials at each value; grey: the untuned model and the "
                   "majority answer")
        caption += ", trainable parameters dashed" if parameters else ""
        figures.lines += figure_lines(name, caption)
    curves_part(record, folder, figures)
    increments_part(record, folder, downloads, figures)
    return figures


def pareto_part(record: SweepRecord, folder: Path, figures: Figures) -> None:
    """The Pareto front, chosen on the validation accuracy (mean over seeds) against trainable parameters; the
    front's test accuracy is listed beside it, as a report."""
    metric, test = record.validation, f"accuracy/{AVERAGE}"
    finished = record.finished
    points = finished.dropna(subset=[f"trained_{metric}", "trainable_params"]) if metric else finished.iloc[:0]
    if points.empty:
        why = "no finished trial has a validation accuracy" if metric is None else \
            "no finished trial has both a validation accuracy and a parameter count"
        figures.notes.append(f"- `pareto.png`: not drawn, {why} (the front is chosen on validation, never on test).")
        return
    front = pareto_front(configuration_means(points, metric))
    figures.paths.append(pareto_figure(points, front, metric, folder / "pareto.png", baselines(record, points, metric)))
    figures.lines += ["### Accuracy against size", ""]
    figures.lines += figure_lines(
        "pareto.png", f"{metric} (the validation set) after training against trainable parameters (log scale), one "
                      "point per finished trial coloured by method; the step line joins the configurations (means over "
                      "seeds) that no smaller configuration beats; grey: the untuned model",
    )
    tested = points.groupby("configuration")[f"trained_{test}"] if f"trained_{test}" in points else None
    listed = pd.DataFrame({
        "configuration": front.index, "method": front["label"],
        "trainable params": front["trainable_params"].map(count), "validation": front["accuracy"].map(percent),
        "test (reported)": [percent_interval(*interval(tested.get_group(c))) if tested is not None else "n/a"
                            for c in front.index],
    })
    figures.lines += ["The Pareto front (the paper's Table 1 question: the most accuracy for the fewest parameters), "
                      "chosen on the validation set; the test split's accuracy (mean ± 95 % interval over seeds) is "
                      "reported beside it:", "", *markdown_table(listed), ""]


def curves_part(record: SweepRecord, folder: Path, figures: Figures) -> None:
    """The learning curves (the validation accuracy against steps, tokens and device seconds), the budget each
    configuration needed, and the training loss, smoothed, beside the validation loss."""
    finished = record.finished
    client = MlflowClient(record.tracking_uri)
    wanted = ["loss", VAL_LOSS, "tokens_seen", DEVICE_SECONDS, *([record.validation] if record.validation else [])]
    histories = metric_histories(client, list(finished["run_id"]), wanted)
    if record.validation and histories[histories["metric"] == record.validation]["step"].nunique() > 1:
        figures.lines += ["### Learning curves", ""]
        curves = mean_curves(curve_points(histories, finished, record.validation))
        reference = baselines(record, finished, record.validation)
        figures.paths.append(learning_curves_figure(curves, folder / "learning_curves.png", record.validation, reference))
        figures.lines += figure_lines("learning_curves.png", learning_curves_caption(record.validation, reference))
        figures.lines += budget_lines(budget_table(curves, BUDGET_SHARE), record.validation, BUDGET_SHARE)
    else:
        figures.notes.append("- `learning_curves.png`: not drawn, no finished trial evaluated its validation set at "
                             "more than one step.")
    if (histories["metric"] == "loss").any():
        validation = bool((histories["metric"] == VAL_LOSS).any())
        figures.lines += ["### Loss", ""]
        figures.paths.append(loss_figure(histories, finished, folder / "loss.png"))
        figures.lines += figure_lines("loss.png", loss_caption(validation=validation))
    else:
        figures.notes.append("- `loss.png`: not drawn, no finished trial logged a loss.")


def increments_part(record: SweepRecord, folder: Path, downloads: Path, figures: Figures) -> None:
    """The paper's Figures 1, 5 and 6: heat maps of the adapter's increments, for trials that kept snapshots."""
    if not record.snapshots:
        figures.notes.append(f"- increment heat maps: not drawn, no finished trial logged `{SNAPSHOTS}`.")
        return
    from .increments import increment_figures, increments, load_snapshots, top_share  # torch: only when needed

    client = MlflowClient(record.tracking_uri)
    trials = record.finished.set_index("run_id")
    spread = []
    for run_id in record.snapshots:
        trial = trials.loc[run_id]
        target = downloads / run_id
        target.mkdir(parents=True, exist_ok=True)
        snapshots = load_snapshots(client.download_artifacts(run_id, SNAPSHOTS, str(target)))
        shares = [top_share(moved) for moved in increments(snapshots).values()]
        if shares:
            spread.append({"trial": trial["trial_id"], "method": trial["label"], "seed": trial["seed"],
                           "matrices": len(shares), "median": percent(np.median(shares)),
                           "range": f"{percent(min(shares))}–{percent(max(shares))}"})
        for path in increment_figures(snapshots, folder, f"{trial['trial_id']}_", trial["label"]):
            figures.paths.append(path)
            figures.lines += figure_lines(
                path.name, f"how far each entry moved in training, trial {trial['trial_id']} "
                           f"({trial['configuration']}, seed {trial['seed']})",
            )
    if spread:
        figures.lines += [
            "How evenly each trial's increments spread, over all its recorded matrices (every adapted layer's M, or "
            "LoRA's A and B slices): the share (%) of a matrix's total increment held by its 10 % of entries that "
            "moved most; 10 would be perfectly even.", "", *markdown_table(pd.DataFrame(spread)), "",
        ]


# Files


def trials_csv(record: SweepRecord) -> pd.DataFrame:
    """One row per trial, whatever its status."""
    settings = record.configuration_keys
    evaluated = [f"{when}_{m}" for m in record.metrics for when in ("untuned", "trained")]
    columns = ["trial_id", "run_id", "status", *settings, "seed", "trainable_params", "trainable_pct", *evaluated,
               "wall_time_s", DEVICE_SECONDS, "tokens_seen"]
    return record.trials.reindex(columns=columns).sort_values(["trial_id"]) if not record.trials.empty else \
        pd.DataFrame(columns=columns)


def output_folder(record: SweepRecord, out: Optional[str | Path]) -> Path:
    if out is not None:
        return Path(out)
    folder = record.parent.data.params.get("folder")
    if folder is None or is_remote(folder):
        found = "records no folder" if folder is None else f"lives at {folder}, not on this machine"
        raise ValueError(f"sweep {record.name!r} {found}: pass --out DIR")
    return Path(folder)


def report_lines(record: SweepRecord, command: str, folder: Path, downloads: Path,
                 pair_table: pd.DataFrame) -> tuple[list[str], list[Path]]:
    lines = header(record, command)
    if record.trials.empty:
        return [*lines, "The sweep has no trials.", ""], []
    lines += trials_section(record)
    if record.finished.empty:
        return [*lines, "No trial finished: there is nothing to compare.", "", *how_to_read()], []
    tables, notes = dimension_sections(record)
    figures = draw_figures(record, folder, downloads)
    lines += [*tuning_section(record, downloads), *choices_section(record), *configurations_section(record),
              *before_after_section(record),
              *pairs_section(pair_table),
              *method_section(record), *tables, "## Figures", "", *figures.lines]
    if notes or figures.notes:
        lines += ["Left out:", "", *notes, *figures.notes, ""]
    return [*lines, *how_to_read()], figures.paths


def write_report(sweep: str, tracking_uri: str, study: str | None = None, out: str | Path | None = None) -> Path:
    """Write report.md, trials.csv, pairs.csv and the figures of `sweep` into `out` (default: the sweep's folder),
    log them to the sweep's run under report/, and return the path of report.md.

    A report regenerated replaces the previous one whole: the files the last report listed in its folder's
    report_files.txt are removed first, and so is the sweep's report/ in MLflow, so no stale figure survives."""
    with tempfile.TemporaryDirectory() as tmp:
        record = load_sweep(sweep, tracking_uri, study, Path(tmp))
        folder = output_folder(record, out)
        folder.mkdir(parents=True, exist_ok=True)
        remove_previous_report(folder)
        command = f"python -m densetune.report {sweep} --tracking-uri {tracking_uri}" + (
            f" --study {study}" if study else "") + (f" --out {out}" if out is not None else "")
        pair_table = pairs(record)
        lines, figures = report_lines(record, command, folder, Path(tmp), pair_table)
    report = folder / "report.md"
    report.write_text("\n".join(lines))
    written = [
        report, write_csv(trials_csv(record), folder / "trials.csv"), write_csv(pair_table, folder / "pairs.csv"),
        *figures,
    ]
    (folder / MANIFEST).write_text("".join(f"{path.name}\n" for path in written))
    run = record.parent.info
    get_artifact_repository(run.artifact_uri, tracking_uri).delete_artifacts(REPORT_ARTIFACTS)
    client = MlflowClient(tracking_uri)
    for path in written:
        client.log_artifact(run.run_id, str(path), REPORT_ARTIFACTS)
    return report


def remove_previous_report(folder: Path) -> None:
    """Remove the files the folder's last report wrote, as its manifest lists them; nothing else in the folder."""
    manifest = folder / MANIFEST
    if manifest.exists():
        for name in manifest.read_text().split():
            (folder / name).unlink(missing_ok=True)
        manifest.unlink()


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m densetune.report", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", help="the sweep's name (its MLflow tag 'sweep')")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite in ./runs")
    p.add_argument("--study", help="the MLflow experiment to look in (default: all)")
    p.add_argument("--out", help="the folder to write into (default: the sweep's folder)")
    args = p.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar for every file it downloads
    uri = store_uri(args.tracking_uri)
    try:
        path = write_report(args.sweep, uri, args.study, args.out)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
