"""A sweep's summary table: each trial's searched settings, size, accuracies, cost and status; with several seeds,
each configuration over its finished seeds (mean ± 95 % interval). The study prints it last, and the sweep's MLflow
run keeps it as summary.csv and summary.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from ..config import DEFAULT_METRIC, TEST_PREFIXES, field_type
from ..files import DEVICE_SECONDS
from .stats import interval
from .tables import markdown_table, percent_interval

# What a trial cost: the devices it reserved times its wall time, and the tokens it trained on.
COST = (DEVICE_SECONDS, "tokens_seen")
FILES = ("summary.csv", "summary.md")
VALIDATION = DEFAULT_METRIC  # the validation accuracy, averaged over the training sets


def summary_frame(trials: pd.DataFrame, space: dict[str, Any], columns: Sequence[str]) -> pd.DataFrame:
    """`trials` (store.sweep_runs) as the table a user compares: the searched settings, `columns` (the study's,
    e.g. trainable_params), the validation accuracy (what sweeps choose on), every test accuracy, the cost, and the
    status; sorted by the searched settings."""
    if trials.empty:
        return trials
    validation = [VALIDATION] if VALIDATION in trials.columns else []
    accuracies = validation + sorted(c for c in trials.columns if c.startswith(TEST_PREFIXES))
    seeds = space.get("seed")
    if isinstance(seeds, (list, tuple)) and len(seeds) > 1:
        table = over_seeds(trials, [k for k in space if k != "seed" and k in trials.columns], columns, accuracies)
    else:
        # a method searched may name a DenseLoRA variant (freeze), which runs as method denselora with that variant
        variant = ["variant"] if "method" in space else []
        wanted = [*space, *variant, *columns, *accuracies, *COST, "status"]
        table = trials[list(dict.fromkeys(c for c in wanted if c in trials.columns))]
    return table.sort_values([c for c in space if c in table.columns], ignore_index=True)


def over_seeds(trials: pd.DataFrame, keys: list[str], columns: Sequence[str], accuracies: list[str]) -> pd.DataFrame:
    """One row per configuration of the finished trials: its seeds, `columns`, each accuracy as 'mean ± half-width' in
    percent (Student t, 95 %), and the mean cost of a trial."""
    finished = trials[trials["status"] == "FINISHED"]
    rows = []
    for values, group in finished.groupby(keys, sort=True) if keys else [((), finished)]:
        row = dict(zip(keys, values if isinstance(values, tuple) else (values,)))
        row["seeds"] = len(group)
        row.update({c: group[c].iloc[0] for c in columns if c in group})
        for name in accuracies:
            row[name] = percent_interval(*interval(group[name]))
        row.update({c: group[c].mean() for c in COST if c in group})
        rows.append(row)
    return pd.DataFrame(rows)


def to_text(table: pd.DataFrame) -> str:
    """The table for a terminal: numbers to 4 decimals, counts as integers, settings as written (lr 3e-05, not
    0.0000)."""
    if table.empty:
        return "no trials were recorded"
    settings = {c: table[c].map("{:g}".format) for c in table if (field_type(c) or (None,))[0] is float}
    with pd.option_context("display.width", 250, "display.max_columns", 50, "display.float_format", "{:.4f}".format):
        return rounded(table.assign(**settings)).to_string(index=False)


def rounded(table: pd.DataFrame) -> pd.DataFrame:
    """Counts (device seconds, tokens) without decimals: their fractions say nothing."""
    return table.assign(**{c: table[c].round().astype("Int64") for c in COST if c in table})


def write_files(table: pd.DataFrame, folder: Path) -> list[Path]:
    """summary.csv (every digit) and summary.md (as printed) in `folder`."""
    csv, md = (folder / name for name in FILES)
    table.to_csv(csv, index=False)
    shown = rounded(table).map(lambda v: f"{v:.4f}" if isinstance(v, float) else ("" if pd.isna(v) else v))
    md.write_text("\n".join(markdown_table(shown)) + "\n")
    return [csv, md]
