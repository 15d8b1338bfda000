"""Finding a trained adapter and what is known of it: a sweep's chosen trial (by the sweep's own objectives, on
validation metrics, as its run names it), a trial of a sweep by name, a trial's folder or checkpoint, or any PEFT
adapter folder. densetune.evaluate and densetune.export start here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mlflow import MlflowClient
from mlflow.entities import Run

from ..config import TrialConfig
from ..files import ADAPTER, ADAPTER_CONFIG, PREDICTIONS, ROLE, SUMMARY, SWEEP, TRIAL_CONFIG, TRIAL_ID
from ..sweep.record import best_run
from ..sweep.record import store_uri
from .store import objectives, store_options, sweep_records

CHECKPOINT = re.compile(r"checkpoint_(\d+)$")


@dataclass
class SavedAdapter:
    """An adapter folder (adapter_config.json, adapter_model.safetensors) and what is known of the trial that trained
    it: its settings, its summary (parameter counts, metrics) and its test predictions, where they were kept."""

    folder: Path
    described_as: str  # how the commands name it: "trial X of sweep S (chosen on val/accuracy/average)", a path
    config: Optional[TrialConfig] = None
    summary: Optional[dict[str, Any]] = None
    predictions: Optional[list[dict[str, Any]]] = None
    run: Optional[Run] = None  # the trial's MLflow run, where it came from a sweep
    sweep: Optional[str] = None
    tracking_uri: Optional[str] = None
    metrics: dict[str, float] = field(default_factory=dict)  # the trial's last reported metrics, where known

    @property
    def base_model(self) -> Optional[str]:
        """The model it adapts: its trial's, else the one its adapter_config.json names (None if neither does)."""
        if self.config is not None:
            return self.config.model
        return json.loads((self.folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")


def from_folder(path: Path) -> SavedAdapter:
    """A PEFT adapter folder, a trial's checkpoint (which holds one), or a trial's folder (its last checkpoint)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"adapter {str(path)!r} is not a folder: give a PEFT adapter folder, a trial's checkpoint or a "
                         "trial's folder")
    checkpoints = sorted((p for p in path.iterdir() if CHECKPOINT.match(p.name)), key=lambda p: int(p.name[11:]))
    folder = checkpoints[-1] if not (path / ADAPTER_CONFIG).exists() and checkpoints else path
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER).is_file():
        raise ValueError(
            f"adapter {str(path)!r} holds neither {ADAPTER_CONFIG} and {ADAPTER} nor a trial's checkpoint_* folder"
        )
    return SavedAdapter(
        folder=folder, described_as=str(folder), config=read_config(folder / TRIAL_CONFIG),
        summary=read_json(folder / SUMMARY), predictions=read_json(folder / PREDICTIONS),
    )


def from_sweep(
    sweep: str, tracking_uri: str, downloads: Path, trial: Optional[str] = None, study: Optional[str] = None
) -> SavedAdapter:
    """The adapter of a sweep's trial, downloaded from the tracking store into `downloads`: the trial named `trial`
    (its run name or Ray trial id), else the one the sweep chose on its own objectives (selection.best over its
    finished trials: validation metrics or size, never a test metric)."""
    client = MlflowClient(tracking_uri)
    runs = sweep_records(client, sweep, tracking_uri, study)
    parent = next(run for run in runs if run.data.tags.get(ROLE) == "sweep")
    trials = [run for run in runs if run.data.tags.get(ROLE) == "trial"
              and run.info.experiment_id == parent.info.experiment_id]
    if trial is None:
        chosen_on = objectives(parent)
        run = best_run(trials, chosen_on)
        if run is None:
            raise ValueError(
                f"sweep {sweep!r} has no finished trial with a value of its objective {chosen_on[0][0]}: nothing to "
                "choose; name a trial with --trial"
            )
        how = f"chosen by the sweep on {', '.join(f'{m} ({mode})' for m, mode in chosen_on)}"
    else:
        named = [run for run in trials if trial in (run.info.run_name, run.data.tags.get(TRIAL_ID))]
        if not named:
            known = ", ".join(sorted(run.info.run_name for run in trials)) or "none"
            raise ValueError(f"sweep {sweep!r} has no trial named {trial!r}; its trials: {known}")
        run, how = named[0], "named"
    names = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    if "adapter" not in names:
        raise ValueError(
            f"trial {run.info.run_name} of sweep {sweep!r} ({run.info.status}) logged no adapter: only a trial that "
            "ended with a checkpoint has one"
        )
    target = downloads / run.info.run_id
    target.mkdir(parents=True, exist_ok=True)
    folder = Path(client.download_artifacts(run.info.run_id, "adapter", str(target)))
    kept = {name: Path(client.download_artifacts(run.info.run_id, name, str(target)))
            for name in (TRIAL_CONFIG, SUMMARY, PREDICTIONS) if name in names}
    return SavedAdapter(
        folder=folder, described_as=f"trial {run.info.run_name} of sweep {sweep} ({how})",
        config=read_config(kept.get(TRIAL_CONFIG)), summary=read_json(kept.get(SUMMARY)),
        predictions=read_json(kept.get(PREDICTIONS)), run=run, sweep=run.data.tags.get(SWEEP), tracking_uri=tracking_uri,
        metrics=dict(run.data.metrics),
    )


def read_json(path: Optional[Path]) -> Any:
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def read_config(path: Optional[Path]) -> Optional[TrialConfig]:
    values = read_json(path)
    return TrialConfig.from_dict(values) if values is not None else None


def source_options() -> argparse.ArgumentParser:
    """The flags that say which adapter a command takes (for `parents=`): a folder, or a sweep's trial by choice or by
    name, from a tracking store."""
    options = argparse.ArgumentParser(add_help=False, parents=[store_options(defaults=True)])
    options.add_argument(
        "--adapter", help="a PEFT adapter folder, a trial's checkpoint, or a trial's folder (its last checkpoint)"
    )
    options.add_argument("--sweep", help="the sweep whose trial's adapter to take (from the tracking store)")
    options.add_argument(
        "--best", action="store_true",
        help="with --sweep: the trial the sweep chose, by its own objectives on validation metrics (the default)",
    )
    options.add_argument("--trial", help="with --sweep: this trial instead (its run name, or its Ray trial id)")
    options.add_argument("--study", help="with --sweep: the study (MLflow experiment) holding it, where two share a name")
    return options


def chosen_adapter(args: argparse.Namespace, downloads: Path) -> Optional[SavedAdapter]:
    """The adapter source_options' flags name; None when they name none. Raises ValueError, one line, on flags that
    contradict each other or name nothing that exists."""
    if args.adapter and args.sweep:
        raise ValueError("give --adapter PATH or --sweep NAME, not both")
    if (args.best or args.trial) and not args.sweep:
        raise ValueError(f"{'--best' if args.best else '--trial'} picks a trial of a sweep: add --sweep NAME")
    if args.best and args.trial:
        raise ValueError("--best and --trial both name a trial: give one")
    if args.adapter:
        return from_folder(Path(args.adapter))
    if args.sweep:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar for every file downloaded
        return from_sweep(args.sweep, store_uri(args.tracking_uri, args.storage_path), downloads, args.trial, args.study)
    return None
