"""The report's figures and their captions: accuracy against size with its Pareto front, accuracy against rank and data
fraction, the learning curves and loss (results.curves), and the adapters' increments. Each takes frames and files the
store already read (results.store); none reads MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # not pyplot: no display backend on the machines sweeps run on

from ..files import DEVICE_SECONDS, SNAPSHOTS
from .comparisons import baselines, configuration_means, distinct, pareto_front
from .curves import (
    TOKENS,
    TRAIN_LOSS,
    VAL_LOSS,
    budget_lines,
    budget_table,
    curve_points,
    draw_reference,
    learning_curves_caption,
    learning_curves_figure,
    loss_caption,
    loss_figure,
    mean_curves,
    save,
)
from .stats import interval
from .store import AVERAGE, SweepRecord
from .tables import count, markdown_table, percent, percent_interval

BUDGET_SHARE = 0.9  # the learning curves' budget table: steps, tokens and seconds to 90 % of the best final accuracy


@dataclass
class Figures:
    """The figures drawn and the notes on those left out."""

    lines: list[str]
    notes: list[str]
    paths: list[Path]


def figure_lines(name: str, caption: str) -> list[str]:
    """A figure in report.md: the image, and its caption in italics below it (the alt text alone is not shown)."""
    return [f"![{caption}]({name})", "", f"*{name}: {caption}*", ""]


def history_metrics(record: SweepRecord) -> list[str]:
    """The metric histories the figures draw (store.metric_histories reads them for the finished trials)."""
    return [TRAIN_LOSS, VAL_LOSS, TOKENS, DEVICE_SECONDS, *([record.validation] if record.validation else [])]


def draw_figures(
    record: SweepRecord, folder: Path, histories: pd.DataFrame, snapshots: Mapping[str, Path]
) -> Figures:
    """Every figure the finished trials allow, into `folder`, with their lines for report.md and a note on each one
    left out. `histories`: the finished trials' history_metrics (store.metric_histories); `snapshots`: run id -> its
    increment snapshots file (store.snapshot_files)."""
    metric = f"accuracy/{AVERAGE}"
    finished = record.finished
    points = finished.dropna(subset=[c for c in (f"trained_{metric}", "trainable_params") if c in finished])
    if f"trained_{metric}" not in finished:
        points = finished.iloc[:0]
    figures = Figures([], [], [])
    reference = baselines(record.answers, points, metric) if not points.empty else {}
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
    curves_part(record, folder, histories, figures)
    increments_part(record, folder, snapshots, figures)
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
    reference = baselines(record.answers, points, metric)
    figures.paths.append(pareto_figure(points, front, metric, folder / "pareto.png", reference))
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


def curves_part(record: SweepRecord, folder: Path, histories: pd.DataFrame, figures: Figures) -> None:
    """The learning curves (the validation accuracy against steps, tokens and device seconds), the budget each
    configuration needed, and the training loss, smoothed, beside the validation loss."""
    finished = record.finished
    if record.validation and histories[histories["metric"] == record.validation]["step"].nunique() > 1:
        figures.lines += ["### Learning curves", ""]
        curves = mean_curves(curve_points(histories, finished, record.validation))
        reference = baselines(record.answers, finished, record.validation)
        figures.paths.append(learning_curves_figure(curves, folder / "learning_curves.png", record.validation, reference))
        figures.lines += figure_lines("learning_curves.png", learning_curves_caption(record.validation, reference))
        figures.lines += budget_lines(budget_table(curves, BUDGET_SHARE), record.validation, BUDGET_SHARE)
    else:
        figures.notes.append("- `learning_curves.png`: not drawn, no finished trial evaluated its validation set at "
                             "more than one step.")
    if (histories["metric"] == TRAIN_LOSS).any():
        validation = bool((histories["metric"] == VAL_LOSS).any())
        figures.lines += ["### Loss", ""]
        figures.paths.append(loss_figure(histories, finished, folder / "loss.png"))
        figures.lines += figure_lines("loss.png", loss_caption(validation=validation))
    else:
        figures.notes.append("- `loss.png`: not drawn, no finished trial logged a loss.")


def increments_part(record: SweepRecord, folder: Path, snapshots: Mapping[str, Path], figures: Figures) -> None:
    """The paper's Figures 1, 5 and 6: heat maps of the adapter's increments, for trials that kept snapshots."""
    if not snapshots:
        figures.notes.append(f"- increment heat maps: not drawn, no finished trial logged `{SNAPSHOTS}`.")
        return
    from ..trial.increments import increment_figures, increments, load_snapshots, top_share  # torch: only when needed

    trials = record.finished.set_index("run_id")
    spread = []
    for run_id, path in snapshots.items():
        trial = trials.loc[run_id]
        kept = load_snapshots(path)
        shares = [top_share(moved) for moved in increments(kept).values()]
        if shares:
            spread.append({"trial": trial["trial_id"], "method": trial["label"], "seed": trial["seed"],
                           "matrices": len(shares), "median": percent(np.median(shares)),
                           "range": f"{percent(min(shares))}–{percent(max(shares))}"})
        for figure in increment_figures(kept, folder, f"{trial['trial_id']}_", trial["label"]):
            figures.paths.append(figure)
            figures.lines += figure_lines(
                figure.name, f"how far each entry moved in training, trial {trial['trial_id']} "
                           f"({trial['configuration']}, seed {trial['seed']})",
            )
    if spread:
        figures.lines += [
            "How evenly each trial's increments spread, over all its recorded matrices (every adapted layer's M, or "
            "LoRA's A and B slices): the share (%) of a matrix's total increment held by its 10 % of entries that "
            "moved most; 10 would be perfectly even.", "", *markdown_table(pd.DataFrame(spread)), "",
        ]


def pareto_figure(
    points: pd.DataFrame, front: pd.DataFrame, metric: str, path: Path, reference: dict[str, float]
) -> Path:
    """Accuracy against trainable parameters (log scale), one point per trial coloured by method, with the front of
    the configurations' means as a step line and the baselines in grey."""
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    draw_reference(axes, reference)
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
    draw_reference(axes, reference)
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
