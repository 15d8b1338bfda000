"""Figures of a sweep, drawn from its tracking store: one curve per trial, labelled with its searched values."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd
from matplotlib.figure import Figure  # not pyplot: no display backend on the machines sweeps run on
from mlflow import MlflowClient


def plot_metric(
    trials: pd.DataFrame, tracking_uri: str, searched: Sequence[str], path: Path, metric: str = "loss"
) -> Path:
    """`metric` against the optimizer step for every trial in `trials` (a sweep_runs frame), saved as a PNG."""
    client = MlflowClient(tracking_uri)
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    for _, trial in trials.iterrows():
        history = sorted((m.step, m.value) for m in client.get_metric_history(trial["run_id"], metric))
        if history:
            label = " ".join(f"{k}={trial[k]}" for k in searched if k in trial) or trial["trial_id"]
            axes.plot(*zip(*history), marker=".", label=f"{label} ({trial['status'].lower()})")
    axes.set(xlabel="optimizer step", ylabel=metric, title=f"{metric} of each trial")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path
