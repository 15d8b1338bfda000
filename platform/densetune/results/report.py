"""A sweep's report, regenerated from its tracking store: the paper's tables and figures, with intervals over seeds
and paired tests on the same questions, so that a difference is called one only where the data show it.

    python -m densetune.report SWEEP [--tracking-uri URI] [--study NAME] [--out DIR]

writes report.md, trials.csv, pairs.csv and PNG figures into the sweep's folder (or --out), and logs them to the
sweep's MLflow run under report/.

It composes the results stage: what the store holds (store), the comparisons (comparisons), the sections of report.md
(sections) and the figures (figures).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import pandas as pd
from mlflow import MlflowClient
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from ..files import DEVICE_SECONDS, WALL_TIME
from ..storage import is_remote
from ..sweep.record import store_uri
from .comparisons import pairs
from .figures import draw_figures, history_metrics
from .sections import (
    before_after_section,
    choices_section,
    configurations_section,
    dimension_sections,
    header,
    how_to_read,
    method_section,
    pairs_section,
    trials_section,
    tuning_section,
)
from .store import SweepRecord, load_sweep, metric_histories, snapshot_files, tuning_table

MANIFEST = "report_files.txt"  # what the last report wrote into its folder: removed when it is regenerated
REPORT_ARTIFACTS = "report"  # the sweep's run keeps the report's files under this artifact path


def trials_csv(record: SweepRecord) -> pd.DataFrame:
    """One row per trial, whatever its status."""
    settings = record.configuration_keys
    evaluated = [f"{when}_{m}" for m in record.metrics for when in ("untuned", "trained")]
    columns = ["trial_id", "run_id", "status", *settings, "seed", "trainable_params", "trainable_pct", *evaluated,
               WALL_TIME, DEVICE_SECONDS, "tokens_seen"]
    return record.trials.reindex(columns=columns).sort_values(["trial_id"]) if not record.trials.empty else \
        pd.DataFrame(columns=columns)


def output_folder(record: SweepRecord, out: Optional[str | Path]) -> Path:
    """Where the report goes: `out`, else the sweep's own folder when this machine has it."""
    if out is not None:
        return Path(out)
    folder = record.parent.data.params.get("folder")
    if folder is None or is_remote(folder):
        found = "records no folder" if folder is None else f"lives at {folder}, not on this machine"
        raise ValueError(f"sweep {record.name!r} {found}: pass --out DIR")
    return Path(folder)


def report_lines(record: SweepRecord, command: str, folder: Path, downloads: Path,
                 pair_table: pd.DataFrame) -> tuple[list[str], list[Path]]:
    """report.md's lines and the figures drawn into `folder`: the store's histories, snapshots and tuning table are
    read (into `downloads`) only where finished trials need them."""
    lines = header(record, command)
    if record.trials.empty:
        return [*lines, "The sweep has no trials.", ""], []
    lines += trials_section(record)
    if record.finished.empty:
        return [*lines, "No trial finished: there is nothing to compare.", "", *how_to_read()], []
    tables, notes = dimension_sections(record)
    histories = metric_histories(
        MlflowClient(record.tracking_uri), list(record.finished["run_id"]), history_metrics(record)
    )
    figures = draw_figures(record, folder, histories, snapshot_files(record, downloads))
    lines += [*tuning_section(record, tuning_table(record, downloads)), *choices_section(record),
              *configurations_section(record), *before_after_section(record), *pairs_section(pair_table),
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
        pair_table = pairs(record.finished, record.answers)
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
    """`frame` as CSV at `path`, without the index; returns the path, for the list of files written."""
    frame.to_csv(path, index=False)
    return path


def main(argv: Optional[list[str]] = None) -> int:
    """python -m densetune.report SWEEP: 0 and the path of report.md, or 2 and one line on what is wrong."""
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
