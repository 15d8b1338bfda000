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
import os
import shlex
import sys
import tempfile
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .config import (
    DEFAULT_METRIC,
    PROTOCOLS,
    SCHEDULERS,
    SEARCHABLE,
    SEARCHES,
    SweepConfig,
    TrialConfig,
    add_setting,
    comma_list,
    field_type,
    grid_points,
    points_space,
    shown,
)
from .storage import is_remote

if typing.TYPE_CHECKING:
    from .sweep.tune import SweepInterrupted


# One trial on 2 CPU cores in about three minutes that shows learning (docs/RESULTS.md says why these): SmolLM2-135M
# on ARC-Easy's questions, the text protocol (the model answers with the option's text, which it already partly knows),
# batches of 8, the loss on the answers only, and a fixed 200-question subset of the test split scored before and
# after training.
LOCAL = dict(
    model="smollm2-135m", datasets=["ARC-Easy"], protocol="text", max_steps=60, warmup_steps=6, batch_size=8,
    micro_batch_size=4, train_on_inputs=False, eval_mode="loglik", eval_limit=200, eval_at_start=True,
    report_every=5, cpus_per_worker=2.0, val_size=100,
)
# The whole study in a minute: the random tiny model, the built-in task (no data files needed), a handful of steps, a
# few questions. Its tokenizer is byte-level, so the cutoff is longer: a built-in question is about 450 bytes.
SMOKE = dict(
    model="tiny-llama", datasets=["synthetic"], max_steps=4, warmup_steps=1, batch_size=4, micro_batch_size=2,
    cutoff_len=512, eval_limit=8, eval_batch_size=8, report_every=2, cpus_per_worker=1.0, val_size=8,
    eval_datasets=None,
)


@dataclass
class Study:
    name: str  # the MLflow experiment
    space: dict[str, list]  # searched settings -> values
    trial: dict[str, Any] = field(default_factory=dict)  # the study's own fixed settings, over LOCAL
    columns: tuple[str, ...] = ("trainable_params",)  # besides the searched settings, in the summary table
    sweep: dict[str, Any] = field(default_factory=dict)  # defaults of the sweep's own flags, e.g. search="optuna"
    # explicit configurations instead of every combination of `space`, from the trial's settings (the model, the
    # targets): e.g. LoRA at the rank of DenseLoRA's parameter count. --space adds settings to each.
    configurations: Optional[Callable[[TrialConfig], list[dict[str, Any]]]] = None


def parser(study: Study, description: str) -> argparse.ArgumentParser:
    """The study's flags, each with its help, its allowed values and its default in this study; the flags that set a
    trial setting are spelt as in `python -m densetune.trial` (older spellings still accepted). `description`, the
    study's docstring, is shown as written, so that its example command lines keep their lines."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setting(p, "model", study_default(study, "model"))
    add_setting(p, "datasets", study_default(study, "datasets"), "--dataset")
    add_setting(p, "eval_datasets", study_default(study, "eval_datasets"))
    add_setting(p, "protocol", study_default(study, "protocol"), choices=PROTOCOLS)
    p.add_argument("--seeds", type=int, default=1,
                   help="repeat every configuration with this many seeds, the seed setting's and the next ones "
                        "(default: %(default)s)")
    p.add_argument("--space", action="append", default=[], metavar="SETTING=V1,V2",
                   help=f"replace or add a searched setting, one of {', '.join(SEARCHABLE)}; a target list joins its "
                        f"kinds with + (q+v); repeatable (default: {format_space(study.space)})")
    p.add_argument("--set", action="append", default=[], metavar="SETTING=VALUE",
                   help="any other trial setting (python -m densetune.trial --help lists them), e.g. --set lr=1e-3 "
                        "--set eval_limit=none; repeatable (default: the study's own settings over "
                        "densetune.experiment.LOCAL)")
    p.add_argument("--tune", metavar="SETTING=V1,V2,...",
                   help="give each configuration its own value of a setting (lr, usually): every configuration trains "
                        "at every value with one seed and is judged on the validation set, a value past the grid's "
                        "edge is tried where a pick lands on it, then each configuration runs at its pick with every "
                        "seed (--seeds) and the configurations are compared on test (default: off)")
    p.add_argument("--tune-extend", type=int, default=2,
                   help="with --tune: how many values past a grid's edge each configuration may try (default: "
                        "%(default)s)")
    p.add_argument("--search", choices=SEARCHES, default="grid",
                   help="grid: every combination; random: --num-samples draws; optuna: Bayesian, --num-samples trials "
                        "(default: %(default)s)")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="fifo",
                   help="fifo: every trial runs to its end; asha: stop the worse trials early (default: %(default)s)")
    p.add_argument("--metric", type=comma_list, default=DEFAULT_METRIC,
                   help="what optuna, asha and the sweep's best trial compare: a validation metric (val/...) or "
                        "trainable_params, never a test metric; several, comma-separated, for a multi-objective optuna "
                        f"search, e.g. {DEFAULT_METRIC},trainable_params (default: %(default)s)")
    p.add_argument("--mode", type=comma_list, default="max",
                   help="max or min, one per metric (default: %(default)s)")
    p.add_argument("--grace-period", type=int, default=10,
                   help="asha: the optimizer steps every trial runs before it may be stopped (default: %(default)s)")
    p.add_argument("--num-samples", type=int, default=1,
                   help="grid: passes over the grid; random, optuna: trials (default: %(default)s)")
    add_setting(p, "max_steps", study_default(study, "max_steps"))
    add_setting(p, "num_workers", study_default(study, "num_workers"), "--workers-per-trial")
    add_setting(p, "cpus_per_worker", study_default(study, "cpus_per_worker"))
    add_setting(p, "gpus_per_worker", "1 when the cluster has GPUs, else CPUs only; given, the trials train on GPUs")
    p.add_argument("--max-concurrent", type=int, default=0,
                   help="trials at once; 0: as many as the cluster's nodes fit (default: %(default)s)")
    p.add_argument("--tracking-uri", help="an MLflow server or database (default: $MLFLOW_TRACKING_URI, else sqlite "
                                          "in the storage path)")
    add_setting(p, "storage_path", study_default(study, "storage_path"))
    p.add_argument("--name", help="the sweep's name, its folder in the storage path; with --resume, the sweep to "
                                  "continue (default: <study>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep --name after its driver stopped (default: off, a new sweep)")
    p.add_argument("--smoke", action="store_true",
                   help="the same study in minutes: tiny random model, built-in task, a few steps (default: off)")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything, print the trials it would start, what each reserves and an estimate of "
                        "the time from one step of the model timed here; start nothing (default: off)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="Ray's and Tune's own output on the console too (default: off: in sweep.log in the sweep's "
                        "folder)")
    p.set_defaults(**study.sweep)
    return p


def study_default(study: Study, name: str) -> str:
    """The trial setting `name` in this study when no flag sets it, as --help shows it, with --smoke's where it
    differs."""
    value = {**LOCAL, **study.trial}.get(name, getattr(TrialConfig(), name))
    smoke = SMOKE.get(name, value)
    return shown(name, value) + ("" if smoke == value else f"; --smoke: {shown(name, smoke)}")


def format_space(space: dict[str, list]) -> str:
    """The space as --space writes it: a target list's kinds joined by +."""
    return " ".join(f"{k}={','.join(str(v).replace(',', '+') for v in values)}" for k, values in space.items())


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
        "model": args.model, "datasets": args.datasets, "eval_datasets": args.eval_datasets, "protocol": args.protocol,
        "max_steps": args.max_steps,
        "num_workers": args.num_workers, "cpus_per_worker": args.cpus_per_worker,
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
    trial = TrialConfig.from_dict(settings)
    points = None
    if study.configurations is not None:
        # each configuration with every combination of what --space and --seeds add
        points = [{**point, **extra} for point in study.configurations(trial) for extra in grid_points(space)]
        space = points_space(points)
    return SweepConfig(
        study=study.name, space=space, trial=trial, search=args.search, points=points,
        num_samples=args.num_samples, scheduler=args.scheduler, grace_period=args.grace_period,
        metric=one_or_list(args.metric),
        mode=one_or_list(args.mode),
        max_concurrent=args.max_concurrent, name=args.name, tracking_uri=args.tracking_uri, resume=args.resume,
        columns=study.columns, verbose=args.verbose,
    )


def tuning_of(args: argparse.Namespace) -> Any:
    """--tune SETTING=V1,V2,... as a tuning.Tuning, or None."""
    if args.tune is None:
        return None
    from .tuning import Tuning

    if args.resume:
        raise ValueError("--resume cannot continue a --tune study yet: run it again with a new --name")
    name, values = parse_setting(args.tune, "--tune")
    return Tuning(name, tuple(search_value(name, value) for value in comma_list(values)), args.tune_extend)


def tuned_dry_run(sweep: SweepConfig, tuning: Any) -> list[str]:
    """A --tune study's plan, checked, and the dry run of its tuning phase."""
    from .sweep.tune import dry_run
    from .tuning import check_tuning, plan

    check_tuning(sweep, tuning)
    lines, phase = plan(sweep, tuning)
    return [*lines, *dry_run(phase)]


def closest_rank(trial: TrialConfig, method: str, reference: dict[str, Any], ranks: range = range(1, 513)) -> int:
    """The rank at which `method` trains about as many parameters as the `reference` settings (e.g. DenseLoRA r = 32)
    on the trial's model and targets, by densemod's exact formulas on the model's architecture (no weights); ties to
    the smaller rank."""
    import densemod

    from .trial.models import meta_model

    model = meta_model(trial.model)
    reference_peft = dataclasses.replace(trial, **reference).peft_config(total_steps=2)
    goal = densemod.predict_trainable(reference_peft, densemod.target_shapes(model, reference_peft))
    configs = {r: dataclasses.replace(trial, method=method, rank=r).peft_config(total_steps=2) for r in ranks}
    shapes = densemod.target_shapes(model, configs[ranks[0]])  # the same layers at every rank
    return min(ranks, key=lambda r: (abs(densemod.predict_trainable(configs[r], shapes) - goal), r))


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


def main(study: Study, description: str, argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser(study, description).parse_args(argv)
    # MLflow draws a progress bar for every artifact the report downloads
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from .results.report import write_report
    from .results.summary import to_text
    from .sweep.tune import SweepInterrupted, dry_run, run_sweep
    from .sweep.record import ui_command
    from .trial.run import as_a_command

    as_a_command()
    try:
        sweep = sweep_config(study, args)
        tuning = tuning_of(args)
        if args.dry_run:
            print("\n".join(dry_run(sweep) if tuning is None else tuned_dry_run(sweep, tuning)))
            return 0
        if tuning is None:
            result = run_sweep(sweep)
        else:
            from .tuning import run_tuned

            tuned = run_tuned(sweep, tuning)
            print(f"\n{tuning.setting} picked on the validation set: "
                  + "; ".join(f"{label or 'all'}: {value}" for label, value in tuned.picks.items()))
            result = tuned.comparison
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # --tune: no configuration value could be picked (every tuning trial failed)
        print(f"error: {error}", file=sys.stderr)
        return 1
    except SweepInterrupted as stopped:
        sys.stdout.flush()
        print(interrupted_line(stopped, argv, args), file=sys.stderr)
        return 128 + stopped.signum
    # A sweep on a remote storage path keeps its report in MLflow only.
    out = None if not is_remote(result.path) else tempfile.mkdtemp()
    report = write_report(result.name, result.tracking_uri, study.name, out)
    unsuccessful = [
        (result.diverged, "diverged (their loss was not finite; MLflow tag 'diverged' holds the step)"),
        (result.failed, "failed; their errors"),
    ]
    for paths, what in unsuccessful:
        if paths:
            print(f"\nerror: {len(paths)} of {len(result.trials)} trials {what}:\n  " + "\n  ".join(paths), file=sys.stderr)
    sys.stderr.flush()
    # the table and the way to the store last, where the eye lands when the study ends
    print(f"\nsweep {result.name} ({len(result.trials)} trials), folder {result.path}\n")
    print(to_text(result.table))
    print(f"\nreport (tables, paired tests, figures): {report}")
    print(f"\nMLflow experiment {study.name!r}, sweep tag {result.name!r}. To browse it:\n  {ui_command(result.tracking_uri)}")
    return 1 if result.failed or result.diverged else 0


def interrupted_line(stopped: SweepInterrupted, argv: list[str], args: argparse.Namespace) -> str:
    """What an interrupted study says last: that it was, what finished, and the command that continues it (this one,
    with the sweep's name where it was not given, and --resume)."""
    done = f"interrupted: {stopped.finished} of {stopped.planned} trials of sweep {stopped.name} finished"
    if args.tune is not None:
        return f"{done}; a --tune study cannot be resumed yet: run it again with a new --name"
    return f"{done}; to resume it: {resume_command(argv, args, stopped.name)}"


def resume_command(argv: list[str], args: argparse.Namespace, name: str) -> str:
    """The command line that resumes this study: the same interpreter, script and flags, with the sweep's `name` where
    it was generated, and --resume."""
    flags = [*argv, *([] if args.name else ["--name", name]), *([] if args.resume else ["--resume"])]
    return shlex.join([sys.executable, sys.argv[0], *flags])
