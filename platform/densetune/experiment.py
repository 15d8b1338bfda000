"""What every script in experiments/ shares: a study (a search space and the columns worth printing), the common
command-line flags, the sweep, and the summary table at the end.

With no flags a study runs on a laptop: a local Ray, the built-in pretrained SmolLM2-135M, the built-in task, an
embedded sqlite store. --smoke runs the same study in a few minutes on the random tiny model.

The sweep, and with it Ray Tune, MLflow and torch, is imported only once the flags are read: --help answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .config import SCHEDULERS, SEARCHABLE, SEARCHES, SweepConfig, TrialConfig, comma_list, field_type

if TYPE_CHECKING:
    from .sweep import SweepResult

# One trial on 2 CPU cores in a few minutes: SmolLM2-135M, batches of 8, the fast log-likelihood evaluation on a fixed
# subset, and the loss on the answers only.
LOCAL = dict(
    model="smollm2-135m", datasets=["synthetic"], max_steps=60, warmup_steps=6, batch_size=8, micro_batch_size=4,
    train_on_inputs=False, eval_mode="loglik", eval_limit=200, report_every=5, cpus_per_worker=2.0,
)
# The whole study in a few minutes: the random tiny model, a handful of steps, a few questions. Its tokenizer is
# byte-level, so the cutoff is longer: a built-in question is about 450 bytes.
SMOKE = dict(
    model="tiny-llama", max_steps=4, warmup_steps=1, batch_size=4, micro_batch_size=2, cutoff_len=512,
    eval_limit=8, eval_batch_size=8, report_every=2, cpus_per_worker=1.0,
)


@dataclass
class Study:
    name: str  # the MLflow experiment
    space: dict[str, list]  # searched settings -> values
    trial: dict[str, Any] = field(default_factory=dict)  # the study's own fixed settings, over LOCAL
    columns: tuple[str, ...] = ("trainable_params",)  # besides the searched settings, in the summary table


def parser(study: Study, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", help="tiny-llama, smollm2-135m, a Hugging Face id or a folder (default: smollm2-135m)")
    p.add_argument("--dataset", type=comma_list, help="comma-separated: synthetic, LLM-Adapters files or folders, Hub ids")
    p.add_argument("--eval-datasets", type=comma_list, help="comma-separated (default: the test split of each dataset)")
    p.add_argument("--space", action="append", default=[], metavar="SETTING=V1,V2",
                   help=f"replace or add a searched setting, one of {', '.join(SEARCHABLE)} (repeatable); "
                        f"this study searches {format_space(study.space)}")
    p.add_argument("--set", action="append", default=[], metavar="SETTING=VALUE",
                   help="any other trial setting, e.g. --set lr=1e-3 --set eval_limit=100 (repeatable)")
    p.add_argument("--search", choices=SEARCHES, default="grid")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="fifo", help="asha: stop the worse trials early")
    p.add_argument("--metric", default="accuracy/average", help="what optuna and asha compare (default: %(default)s)")
    p.add_argument("--mode", choices=("max", "min"), default="max")
    p.add_argument("--num-samples", type=int, default=1, help="grid: passes over the grid; random, optuna: trials")
    p.add_argument("--max-steps", type=int, help="optimizer steps per trial")
    p.add_argument("--workers-per-trial", type=int, help="Ray Train workers per trial (default 1)")
    p.add_argument("--cpus-per-worker", type=float)
    p.add_argument("--gpus-per-worker", type=float,
                   help="train on GPUs, this many per worker; fractions share a GPU between trials, e.g. 0.25 "
                        "(default: 1 when the cluster has GPUs, else CPUs only)")
    p.add_argument("--max-concurrent", type=int, default=0, help="trials at once (default: as many as fit)")
    p.add_argument("--tracking-uri", help="an MLflow server or database (default: $MLFLOW_TRACKING_URI, else sqlite "
                                          "in the storage path)")
    p.add_argument("--storage-path", default="runs", help="a folder or URI (s3://, gs://) shared by all nodes")
    p.add_argument("--name", help="the sweep's name (default: <study>-<time>); with --resume, the sweep to continue")
    p.add_argument("--resume", action="store_true", help="continue the sweep --name after its driver stopped")
    p.add_argument("--smoke", action="store_true", help="the same study in minutes: tiny random model, a few steps")
    return p


def format_space(space: dict[str, list]) -> str:
    return " ".join(f"{k}={','.join(map(str, v))}" for k, v in space.items())


def parse_setting(text: str, flag: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"{flag} {text!r}: write SETTING=VALUE")
    return name.strip().replace("-", "_"), value.strip()


def typed(name: str, text: str) -> Any:
    """A command-line value with the type of the TrialConfig field it sets."""
    if field_type(name) is None:
        allowed = ", ".join(sorted(f.name for f in dataclasses.fields(TrialConfig)))
        raise ValueError(f"unknown trial setting {name!r}; allowed: {allowed}")
    kind, optional = field_type(name)
    if optional and text.lower() == "none":
        return None
    if typing.get_origin(kind) is list:
        return comma_list(text)
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"{name} must be true or false; got {text!r}")
        return text.lower() == "true"
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{name} must be {kind.__name__}; got {text!r}") from None


def search_value(name: str, text: str) -> Any:
    """One value of a searched setting; an explicit target list joins its kinds with "+" (q+v), since "," separates
    the values."""
    return typed(name, text.replace("+", ",") if name == "targets" else text)


def sweep_config(study: Study, args: argparse.Namespace) -> SweepConfig:
    """The flags over the study over the local (or smoke) defaults."""
    settings = {**LOCAL, **study.trial, **(SMOKE if args.smoke else {})}
    flags = {
        "model": args.model, "datasets": args.dataset, "eval_datasets": args.eval_datasets, "max_steps": args.max_steps,
        "num_workers": args.workers_per_trial, "cpus_per_worker": args.cpus_per_worker,
        "gpus_per_worker": args.gpus_per_worker, "storage_path": args.storage_path,
    }
    settings.update({k: v for k, v in flags.items() if v is not None})
    if args.gpus_per_worker:
        # Asked for explicitly: an autoscaling cluster may have no GPU node yet when the sweep starts.
        settings["use_gpu"] = True
    for text in args.set:
        name, value = parse_setting(text, "--set")
        settings[name] = typed(name, value)
    space = dict(study.space)
    for text in args.space:
        name, values = parse_setting(text, "--space")
        space[name] = [search_value(name, value) for value in comma_list(values)] if name in SEARCHABLE else values
    return SweepConfig(
        study=study.name, space=space, trial=TrialConfig.from_dict(settings), search=args.search,
        num_samples=args.num_samples, scheduler=args.scheduler, metric=args.metric, mode=args.mode,
        max_concurrent=args.max_concurrent, name=args.name, tracking_uri=args.tracking_uri, resume=args.resume,
    )


def summary_table(result: SweepResult, study: Study, space: dict[str, Any]) -> str:
    import pandas as pd

    trials = result.trials
    if trials.empty:
        return "no trials were recorded"
    accuracies = sorted(c for c in trials.columns if c.startswith("accuracy/"))
    wanted = [*space, *study.columns, *accuracies, "status"]
    columns = list(dict.fromkeys(c for c in wanted if c in trials.columns))
    table = trials[columns].sort_values(list(c for c in space if c in trials.columns), ignore_index=True)
    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.float_format", "{:.4f}".format):
        return table.to_string(index=False)


def loss_plot(result: SweepResult, searched: list[str]) -> str:
    """The trials' loss curves, in the sweep's folder when it is local and as an artifact of the sweep's run."""
    from mlflow import MlflowClient

    from .report import plot_metric

    folder = Path(result.path) if "://" not in result.path else Path(tempfile.mkdtemp())
    path = plot_metric(result.trials, result.tracking_uri, searched, folder / "loss.png")
    MlflowClient(result.tracking_uri).log_artifact(result.run_id, str(path))
    return str(path)


def main(study: Study, description: str, argv: Optional[list[str]] = None) -> int:
    args = parser(study, description).parse_args(argv)
    from .sweep import run_sweep
    from .tracking import ui_command

    try:
        sweep = sweep_config(study, args)
        result = run_sweep(sweep)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"\nsweep {result.name} ({len(result.trials)} trials), folder {result.path}\n")
    print(summary_table(result, study, sweep.space))
    if not result.trials.empty:
        print(f"\nloss curves: {loss_plot(result, list(sweep.space))}")
    print(f"\nMLflow experiment {study.name!r}, sweep tag {result.name!r}. To browse it:\n  {ui_command(result.tracking_uri)}")
    return 0
