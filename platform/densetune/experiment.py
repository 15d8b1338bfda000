"""What every script in experiments/ shares: a study (a search space and the columns worth printing), the common
command-line flags, the sweep, and the summary table at the end.

With no flags a study runs on a laptop: a local Ray, the built-in pretrained SmolLM2-135M, ARC-Easy under the text
protocol (from the data folders: densetune.data.data_dirs), an embedded sqlite store. Every trial is evaluated before
and after training, and the study ends with its report (densetune.report). --smoke runs the same study in a minute on
the random tiny model and the built-in task.

The sweep, and with it Ray Tune, MLflow and torch, is imported only once the flags are read: --help answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

from .config import PROTOCOLS, SCHEDULERS, SEARCHABLE, SEARCHES, SweepConfig, TrialConfig, comma_list, field_type

if TYPE_CHECKING:
    from .sweep import SweepResult

# One trial on 2 CPU cores in about three minutes that shows learning (docs/RESULTS.md says why these): SmolLM2-135M
# on ARC-Easy's questions, the text protocol (the model answers with the option's text, which it already partly knows),
# batches of 8, the loss on the answers only, and a fixed 200-question subset of the test split scored before and
# after training.
LOCAL = dict(
    model="smollm2-135m", datasets=["ARC-Easy"], protocol="text", max_steps=60, warmup_steps=6, batch_size=8,
    micro_batch_size=4, train_on_inputs=False, eval_mode="loglik", eval_limit=200, eval_at_start=True,
    report_every=5, cpus_per_worker=2.0,
)
# The whole study in a minute: the random tiny model, the built-in task (no data files needed), a handful of steps, a
# few questions. Its tokenizer is byte-level, so the cutoff is longer: a built-in question is about 450 bytes.
SMOKE = dict(
    model="tiny-llama", datasets=["synthetic"], max_steps=4, warmup_steps=1, batch_size=4, micro_batch_size=2,
    cutoff_len=512, eval_limit=8, eval_batch_size=8, report_every=2, cpus_per_worker=1.0,
)


@dataclass
class Study:
    name: str  # the MLflow experiment
    space: dict[str, list]  # searched settings -> values
    trial: dict[str, Any] = field(default_factory=dict)  # the study's own fixed settings, over LOCAL
    columns: tuple[str, ...] = ("trainable_params",)  # besides the searched settings, in the summary table
    sweep: dict[str, Any] = field(default_factory=dict)  # defaults of the sweep's own flags, e.g. search="optuna"


def parser(study: Study, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", help="tiny-llama, smollm2-135m, a Hugging Face id or a folder (default: smollm2-135m)")
    p.add_argument("--dataset", type=comma_list, help="comma-separated: synthetic, LLM-Adapters files or folders, Hub ids")
    p.add_argument("--eval-datasets", type=comma_list, help="comma-separated (default: the test split of each dataset)")
    p.add_argument("--protocol", choices=PROTOCOLS,
                   help="label: the paper's 'the correct answer is answer2'; text: the option's text, scored by "
                        "log-likelihood (default: text; search both with --space protocol=label,text)")
    p.add_argument("--seeds", type=int, default=1, help="repeat every configuration with this many seeds (default 1)")
    p.add_argument("--space", action="append", default=[], metavar="SETTING=V1,V2",
                   help=f"replace or add a searched setting, one of {', '.join(SEARCHABLE)} (repeatable); "
                        f"this study searches {format_space(study.space)}")
    p.add_argument("--set", action="append", default=[], metavar="SETTING=VALUE",
                   help="any other trial setting, e.g. --set lr=1e-3 --set eval_limit=100 (repeatable)")
    p.add_argument("--search", choices=SEARCHES, default="grid", help="(default: %(default)s)")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="fifo",
                   help="asha: stop the worse trials early (default: %(default)s)")
    p.add_argument("--metric", type=comma_list, default="accuracy/average",
                   help="what optuna and asha compare; several, comma-separated, for a multi-objective optuna search, "
                        "e.g. accuracy/average,trainable_params (default: accuracy/average)")
    p.add_argument("--mode", type=comma_list, default="max", help="max or min, one per metric (default: max)")
    p.add_argument("--num-samples", type=int, default=1,
                   help="grid: passes over the grid; random, optuna: trials (default: %(default)s)")
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
    p.set_defaults(**study.sweep)
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
        "model": args.model, "datasets": args.dataset, "eval_datasets": args.eval_datasets, "protocol": args.protocol,
        "max_steps": args.max_steps,
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
    if args.seeds != 1:
        space["seed"] = seeds(args, space, settings.get("seed", TrialConfig.seed))
    return SweepConfig(
        study=study.name, space=space, trial=TrialConfig.from_dict(settings), search=args.search,
        num_samples=args.num_samples, scheduler=args.scheduler, metric=one_or_list(args.metric),
        mode=one_or_list(args.mode),
        max_concurrent=args.max_concurrent, name=args.name, tracking_uri=args.tracking_uri, resume=args.resume,
    )


def one_or_list(values: list[str]) -> Any:
    return values[0] if len(values) == 1 else values


def seeds(args: argparse.Namespace, space: dict[str, Any], first: int) -> list[int]:
    """--seeds N: the seeds first, first + 1, ..., a grid axis, so every configuration runs with each of them."""
    if isinstance(args.seeds, bool) or args.seeds < 1:
        raise ValueError(f"--seeds must be a positive integer; got {args.seeds!r}")
    if "seed" in space:
        raise ValueError("--seeds and --space seed=... both set the seeds: use one of them")
    if args.search != "grid":
        raise ValueError(f"--seeds repeats the configurations of a grid; {args.search} search draws its own: use --num-samples")
    return list(range(first, first + args.seeds))


def summary_table(result: SweepResult, study: Study, space: dict[str, Any]) -> str:
    """Each trial's searched settings, study columns, final accuracies and status; with several seeds, each
    configuration's mean ± 95 % interval over its finished seeds instead."""
    import pandas as pd

    from .tracking import ACCURACY_PREFIXES

    trials = result.trials
    if trials.empty:
        return "no trials were recorded"
    accuracies = sorted(c for c in trials.columns if c.startswith(ACCURACY_PREFIXES))
    if "seed" in space and len(space["seed"]) > 1:
        trials = over_seeds(trials, [k for k in space if k != "seed" and k in trials.columns], study.columns, accuracies)
        wanted = list(trials.columns)
    else:
        # a method searched may name a DenseLoRA variant (freeze), which runs as method denselora with that variant
        variant = ["variant"] if "method" in space else []
        wanted = [*space, *variant, *study.columns, *accuracies, "status"]
    columns = list(dict.fromkeys(c for c in wanted if c in trials.columns))
    table = trials[columns].sort_values(list(c for c in space if c in trials.columns), ignore_index=True)
    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.float_format", "{:.4f}".format):
        return table.to_string(index=False)


def over_seeds(trials: Any, keys: list[str], columns: Sequence[str], accuracies: list[str]) -> Any:
    """One row per configuration of the finished trials: its seeds, the study's columns, and each accuracy as
    'mean ± half-width' in percent (Student t, 95 %)."""
    import pandas as pd

    from .report import interval, percent_interval

    finished = trials[trials["status"] == "FINISHED"]
    rows = []
    for values, group in finished.groupby(keys, sort=True) if keys else [((), finished)]:
        row = dict(zip(keys, values if isinstance(values, tuple) else (values,)))
        row["seeds"] = len(group)
        row.update({c: group[c].iloc[0] for c in columns if c in group})
        for name in accuracies:
            row[name] = percent_interval(*interval(group[name]))
        rows.append(row)
    return pd.DataFrame(rows)


def main(study: Study, description: str, argv: Optional[list[str]] = None) -> int:
    args = parser(study, description).parse_args(argv)
    from .report import write_report
    from .sweep import run_sweep
    from .tracking import ui_command
    from .trial import stop_on_sigterm

    stop_on_sigterm()
    try:
        sweep = sweep_config(study, args)
        result = run_sweep(sweep)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"\nsweep {result.name} ({len(result.trials)} trials), folder {result.path}\n")
    print(summary_table(result, study, sweep.space))
    # A sweep on a remote storage path keeps its report in MLflow only.
    out = None if "://" not in result.path else tempfile.mkdtemp()
    print(f"\nreport (tables, paired tests, figures): {write_report(result.name, result.tracking_uri, study.name, out)}")
    print(f"\nMLflow experiment {study.name!r}, sweep tag {result.name!r}. To browse it:\n  {ui_command(result.tracking_uri)}")
    unsuccessful = [
        (result.diverged, "diverged (their loss was not finite; MLflow tag 'diverged' holds the step)"),
        (result.failed, "failed; their errors"),
    ]
    for paths, what in unsuccessful:
        if paths:
            print(f"\nerror: {len(paths)} of {len(result.trials)} trials {what}:\n  " + "\n  ".join(paths), file=sys.stderr)
    return 1 if result.failed or result.diverged else 0
