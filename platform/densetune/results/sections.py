"""The sections of a sweep's report.md, as Markdown lines: its header, how its choices were made, its trials, their
configurations, the paired tests, the methods and dimensions tables, and how to read them. Each takes what the store
read (a SweepRecord, a frame) and the comparisons computed; none reads MLflow or draws.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import pandas as pd

from ..files import DEVICE_SECONDS
from ..sweep.selection import FINISHED, Candidate, best, is_test_metric
from .comparisons import ALPHA, NO_DIFFERENCE, before_vs_after, distinct, gain, majority
from .stats import interval
from .store import AVERAGE, SweepRecord, is_comparison
from .tables import count, markdown_table, percent, percent_interval, significant


def header(record: SweepRecord, command: str) -> list[str]:
    """The title and what the sweep was: study, model, data, protocol, space, trials by status, and how to
    regenerate the report."""
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
    """The closing section: what the intervals, tests, verdicts and baselines mean."""
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


def tuning_section(record: SweepRecord, table: Optional[pd.DataFrame]) -> list[str]:
    """Where the sweep is --tune's comparison phase: the tuning table its study run keeps (`table`, as
    store.tuning_table reads it; None for any other sweep), each configuration's validation result at every value
    tried, its pick in bold."""
    if table is None:
        return []
    params = record.tuned.data.params
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
    """A row (a trial, or a configuration's means) as selection.best compares it: the objectives it has."""
    return Candidate(str(key), {m: float(row[m]) for m, _ in objectives if m in row and pd.notna(row[m])})


def objective_values(chosen: Candidate, objectives: Sequence[tuple[str, str]]) -> str:
    """The chosen one's objectives as text: accuracies in percent, anything else (a size) to 3 digits."""
    return ", ".join(
        f"{m} {percent(chosen.metrics[m])} %" if "accuracy" in m else f"{m} {significant(chosen.metrics[m])}"
        for m, _ in objectives
    )


def trials_section(record: SweepRecord) -> list[str]:
    """Every trial, whatever its status: its configuration, seed, size, accuracy before and after, and cost."""
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
    """Per configuration and benchmark, over its finished seeds: untuned, trained and gain, the validation accuracy
    it was chosen on, and the majority baseline."""
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
    """A frame of with_tests as a Markdown table: its columns renamed by `names`, in their order, numbers as text."""
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
    """Each finished trial's answers before training against after it, where it kept both."""
    frame = before_vs_after(record.finished, record.answers)
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
    """The pairs of `table` (comparisons.pairs) tested together: same seed, different configuration."""
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
    """Per value of `keys`: its seeds, mean size and trained `metric` with its interval, as a Markdown table."""
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
