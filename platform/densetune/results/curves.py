"""Learning curves and budgets from a sweep's metric histories: how a configuration's validation accuracy grows with
the optimizer steps, the tokens trained on and the device seconds spent, and what it took each configuration to come
within a share of the best final accuracy.

Everything here is a pure function over pandas frames (histories: run_id, metric, step, value, as
results.store.metric_histories reads them; the trials' run_id and configuration), so that the report and the tests
draw the same figures without an MLflow client:

    histories = store.metric_histories(client, trials["run_id"], ["val/accuracy/average", "loss", "val/loss", *COST])
    curves = mean_curves(curve_points(histories, trials, "val/accuracy/average"))
    budget_table(curves)                        # the target (a column), and when each configuration reached it
    learning_curves_figure(curves, folder / "learning_curves.png", "val/accuracy/average", reference)
    loss_figure(histories, trials, folder / "loss_curves.png")
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from matplotlib import rcParams
from matplotlib.figure import Figure  # not pyplot: no display backend on the machines sweeps run on

from .tables import count, markdown_table, percent
from ..files import DEVICE_SECONDS

TOKENS = "tokens_seen"
COST = (TOKENS, DEVICE_SECONDS)  # cumulative at each step: what the curves are also drawn against
TRAIN_LOSS, VAL_LOSS = "loss", "val/loss"
HISTORY_COLUMNS = ["run_id", "metric", "step", "value"]
POINT_COLUMNS = ["configuration", "run_id", "step", TOKENS, DEVICE_SECONDS, "value"]
CURVE_COLUMNS = ["configuration", "step", "mean", "min", "max", "trials", TOKENS, DEVICE_SECONDS]
BUDGET_COLUMNS = ["configuration", "trials", "final", "step", TOKENS, DEVICE_SECONDS, "target"]
# The three panels of a learning-curve figure: the column drawn on x, its label
AGAINST = (("step", "optimizer step"), (TOKENS, "tokens seen"), (DEVICE_SECONDS, "device seconds"))


# Frames


def last_per_step(histories: pd.DataFrame) -> pd.DataFrame:
    """One row per run, metric and step: the last of the rows that share them, sorted by run, metric and step."""
    kept = histories.drop_duplicates(["run_id", "metric", "step"], keep="last")
    return kept.sort_values(["run_id", "metric", "step"], kind="stable").reset_index(drop=True)


def curve_points(histories: pd.DataFrame, trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """`metric`'s values of every trial in `trials` (columns run_id, configuration), each with the trial's tokens_seen
    and device_seconds at its step, interpolated linearly over the steps between the trial's own logged values of
    those (step 0 counts as 0 tokens and 0 seconds unless logged; nan beyond its last logged step, or where it logged
    none). Columns configuration, run_id, step, tokens_seen, device_seconds, value."""
    histories = last_per_step(histories)
    frames = []
    for run_id, configuration in zip(trials["run_id"], trials["configuration"]):
        own = histories[histories["run_id"] == run_id]
        values = own[own["metric"] == metric]
        if values.empty:
            continue
        steps = values["step"].to_numpy(dtype=float)
        cost = {name: interpolate(own[own["metric"] == name], steps) for name in COST}
        frames.append(pd.DataFrame({"configuration": configuration, "run_id": run_id, "step": values["step"].to_numpy(),
                                    **cost, "value": values["value"].to_numpy(dtype=float)}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=POINT_COLUMNS)


def interpolate(history: pd.DataFrame, steps: np.ndarray) -> np.ndarray:
    """A cumulative quantity's `history` (columns step, value) at `steps`, linear between its logged steps, counting
    0 at step 0 unless logged there; nan past its last logged step, and everywhere when it logged nothing."""
    known = history[["step", "value"]].astype(float).dropna()
    if known.empty:
        return np.full(len(steps), math.nan)
    if not (known["step"] == 0).any():
        known = pd.concat([pd.DataFrame({"step": [0.0], "value": [0.0]}), known])
    known = known.sort_values("step")
    return np.interp(steps, known["step"], known["value"], left=math.nan, right=math.nan)


def mean_curves(points: pd.DataFrame) -> pd.DataFrame:
    """Per configuration and step (of `curve_points`): the mean, min and max of value over the trials (seeds) that
    have a value at that step, their number (trials), and their mean tokens_seen and device_seconds there. Columns
    configuration, step, mean, min, max, trials, tokens_seen, device_seconds; configurations in the order of
    `points`, steps ascending."""
    points = points.dropna(subset=["value"])
    if points.empty:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    curves = points.groupby(["configuration", "step"], sort=False).agg(
        mean=("value", "mean"), min=("value", "min"), max=("value", "max"), trials=("run_id", "nunique"),
        **{name: (name, "mean") for name in COST},
    ).reset_index()
    order = {name: i for i, name in enumerate(points["configuration"].unique())}
    curves = curves.sort_values(["configuration", "step"], key=lambda c: c.map(order) if c.name == "configuration"
                                else c)
    return curves.reset_index(drop=True)[CURVE_COLUMNS]


def budget_table(curves: pd.DataFrame, share: float = 0.9) -> pd.DataFrame:
    """What each configuration of `mean_curves` took to come within `share` of the best: the target is `share` times
    the best final mean over the configurations (a configuration's final: its mean at its last step; higher is
    better, as for accuracies). One row per configuration: trials (at its last step), final, and the first step at
    which its mean reaches the target with the mean tokens_seen and device_seconds there (nan for a configuration
    that never reaches it: "not reached"). The target is the column `target`, the same on every row."""
    if curves.empty:
        return pd.DataFrame(columns=BUDGET_COLUMNS)
    finals = {name: curve.sort_values("step").iloc[-1] for name, curve in curves.groupby("configuration", sort=False)}
    target = share * max(final["mean"] for final in finals.values())
    rows = []
    for name, curve in curves.groupby("configuration", sort=False):
        reached = curve.sort_values("step").loc[lambda c: c["mean"] >= target]
        first = reached.iloc[0] if not reached.empty else pd.Series(math.nan, index=["step", *COST])
        rows.append({"configuration": name, "trials": finals[name]["trials"], "final": finals[name]["mean"],
                     "step": first["step"], **{c: first[c] for c in COST}, "target": target})
    return pd.DataFrame(rows, columns=BUDGET_COLUMNS)


def budget_lines(table: pd.DataFrame, metric: str, share: float = 0.9) -> list[str]:
    """`budget_table` as the report's markdown: a sentence on the target and a table, "not reached" where a
    configuration never reached it."""
    if table.empty:
        return []
    target = table["target"].iloc[0]
    shown = pd.DataFrame({
        "configuration": table["configuration"], "trials": table["trials"].map(count),
        f"final {metric}": table["final"].map(percent),
        **{name: table[column].map(lambda v: "not reached" if pd.isna(v) else count(v))
           for name, column in (("step", "step"), ("tokens", TOKENS), ("device seconds", DEVICE_SECONDS))},
    })
    sentence = (f"What each configuration took to reach {percent(target)} % {metric}, {100 * share:g} % of the best "
                "final mean over seeds: the first evaluation at which its mean reaches it, with the mean tokens and "
                "device seconds its trials had spent by then.")
    return [sentence, "", *markdown_table(shown), ""]


# Figures


def save(figure: Figure, path: Path) -> Path:
    """Write `figure` to `path` as PNG, the one way every figure of a report is saved."""
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def colours(names: Sequence[str]) -> dict[str, str]:
    """One colour per configuration, the same in every panel and figure: matplotlib's cycle in order."""
    cycle = rcParams["axes.prop_cycle"].by_key()["color"]
    return {name: cycle[i % len(cycle)] for i, name in enumerate(names)}


def draw_reference(axes: Any, reference: dict[str, float]) -> None:
    """Horizontal grey lines at the reference values (fractions, drawn in %), as the report's baselines."""
    for (label, value), style in zip(reference.items(), (":", "-.", "--", (0, (1, 3)))):
        axes.axhline(100 * value, color="grey", linestyle=style, linewidth=1, label=f"{label} ({100 * value:.1f})")


def learning_curves_figure(
    curves: pd.DataFrame, path: Path, metric: str, reference: dict[str, float] | None = None
) -> Path:
    """`metric` (fractions, drawn in %) of `mean_curves` against optimizer step, tokens seen and device seconds, three
    panels sharing the y axis: one line per configuration, the mean over its seeds, their min–max range shaded where
    it has more than one trial; grey horizontal lines at `reference` (e.g. {"untuned model": 0.46})."""
    figure = Figure(figsize=(15, 4.5))
    panels = figure.subplots(1, 3, sharey=True)
    palette = colours(list(curves["configuration"].unique()))
    for axes, (column, label) in zip(panels, AGAINST):
        draw_reference(axes, reference or {})
        for name, curve in curves.groupby("configuration", sort=False):
            draw_curve(axes, curve.dropna(subset=[column]).sort_values(column), column, name, palette[name])
        axes.set(xlabel=label, title=f"against {label}")
        axes.grid(alpha=0.3)
    panels[0].set_ylabel(f"{metric} (%)")
    if panels[0].get_legend_handles_labels()[0]:
        panels[0].legend(fontsize="small")
    figure.suptitle(f"{metric}: mean over seeds, their range shaded")
    return save(figure, path)


def draw_curve(axes: Any, curve: pd.DataFrame, x: str, name: str, colour: str) -> None:
    """One configuration's mean curve against column `x`, its min–max range shaded where it has several trials."""
    trials = int(curve["trials"].max()) if not curve.empty else 0
    axes.plot(curve[x], 100 * curve["mean"], marker=".", color=colour, label=f"{name} ({trials} trials)")
    if trials > 1:
        axes.fill_between(curve[x], 100 * curve["min"], 100 * curve["max"], alpha=0.15, color=colour)


def loss_figure(histories: pd.DataFrame, trials: pd.DataFrame, path: Path, window: int = 5) -> Path:
    """The training loss against the optimizer step, per configuration of `trials`: every trial's logged values as
    faint points and, solid, a centered moving average (a rolling mean over `window` consecutive logged steps, fewer
    at the ends) of the mean over its seeds; the validation loss (val/loss, mean over seeds) dashed with markers in
    the same colour, where any trial logged it."""
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    palette = colours(list(trials["configuration"].unique()))
    train, val = (labelled(histories, trials, metric) for metric in (TRAIN_LOSS, VAL_LOSS))
    for name, colour in palette.items():
        raw = train[train["configuration"] == name]
        if not raw.empty:
            axes.scatter(raw["step"], raw["value"], s=8, alpha=0.25, color=colour, linewidths=0)
            smooth = moving_average(raw, window)
            axes.plot(smooth.index, smooth, color=colour, label=f"{name} training (moving average)")
        held_out = val[val["configuration"] == name].groupby("step")["value"].mean().sort_index()
        if not held_out.empty:
            axes.plot(held_out.index, held_out, linestyle="--", marker="o", markersize=4, color=colour,
                      label=f"{name} validation")
    axes.set(xlabel="optimizer step", ylabel="loss", title="training loss (points, moving average) and validation loss")
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small")
    return save(figure, path)


def moving_average(losses: pd.DataFrame, window: int) -> pd.Series:
    """The mean over seeds of `losses` (columns step, value) at each logged step, then a centered rolling mean over
    `window` consecutive logged steps (fewer at the ends), indexed by step."""
    mean = losses.groupby("step")["value"].mean().sort_index()
    return mean.rolling(window, center=True, min_periods=1).mean()


def labelled(histories: pd.DataFrame, trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """`metric`'s history rows of the trials, with their configuration (columns configuration, run_id, step, value)."""
    rows = last_per_step(histories)
    rows = rows[rows["metric"] == metric].dropna(subset=["value"])
    return rows.merge(trials[["run_id", "configuration"]], on="run_id")[["configuration", "run_id", "step", "value"]]


# Captions


def learning_curves_caption(metric: str, reference: dict[str, float] | None = None) -> str:
    """What `learning_curves_figure` draws, for the report."""
    caption = (f"{metric} on the validation set against the optimizer step, the tokens seen and the device seconds "
               "(the devices a trial reserved times its time since it started), one line per configuration: the "
               "mean over its seeds at each evaluation, their range shaded")
    return caption + (f"; grey: {' and '.join(reference)}" if reference else "")


def loss_caption(window: int = 5, validation: bool = True) -> str:
    """What `loss_figure` draws, for the report; `validation`: whether any trial logged val/loss."""
    caption = ("training loss against the optimizer step, one colour per configuration: every trial's reported "
               f"batch losses as faint points, and the mean over seeds as a centered moving average over {window} "
               "reports (batches are grouped by length, so single reports are noisy)")
    validation_part = "; dashed with markers: the validation loss (answer tokens), mean over seeds"
    return caption + (validation_part if validation else "")


def budget_caption(share: float = 0.9) -> str:
    """A one-line description of `budget_table`, for the report."""
    return (f"the target is {100 * share:g} % of the best configuration's final mean; each configuration's first "
            "evaluation whose mean over seeds reaches it, with the tokens and device seconds spent by then")
