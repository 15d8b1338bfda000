"""The report's numbers as text: percentages, intervals, counts and Markdown tables."""

from __future__ import annotations

from typing import Any

import pandas as pd


def percent(value: float) -> str:
    return "n/a" if pd.isna(value) else f"{100 * value:.1f}"


def percent_interval(mean: float, half_width: float) -> str:
    return "n/a" if pd.isna(mean) else f"{percent(mean)} ± {percent(half_width)}"


def count(value: Any) -> str:
    return "n/a" if pd.isna(value) else f"{int(round(value)):,}"


def significant(value: Any) -> str:
    return "n/a" if pd.isna(value) else f"{value:.3g}"


def markdown_table(frame: pd.DataFrame) -> list[str]:
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return lines
