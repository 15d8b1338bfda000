"""Run one fine-tuning trial on a Ray Train worker group, from Python or the command line.

    python -m densetune.trial --model smollm2-135m --method denselora --rank 32 --targets q,k,v,up,down --max-steps 50

Everything that can be wrong with the input is checked here, before any worker starts. Rerunning with the same
--name and --storage-path resumes the run from its last checkpoint. The console shows what runs, one progress line
and the result; Ray's own output goes to trial.log in the trial's folder (-v: to the console too).

Libraries that take seconds to import (torch, transformers, PEFT, Ray Train) are imported in the functions that use
them, so that --help answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Optional, Sequence

import ray

from .. import cluster
from ..cluster import check_placeable, own_ray, uses_gpu, worker_resources
from ..config import DIVERGED, DTYPES, EVAL_MODES, PROTOCOLS, TrialConfig, add_setting, shown
from ..storage import check_placement, check_storage, join, storage_root
from .console import local_folder

if TYPE_CHECKING:
    import numpy as np
    import ray.train

    from .inputs import TrialData
    from .progress import TrialConsole


@dataclass
class TrialResult:
    config: TrialConfig
    summary: dict[str, Any]  # what rank 0's training loop returned: counts, history, evaluations, predictions
    path: Optional[str]  # the run's folder on the storage path; None in local mode (num_workers 0), which keeps none
    checkpoint: Optional[str]  # the last checkpoint: adapter, optimizer, position, predictions.json
    wall_time_s: float

    @property
    def accuracies(self) -> dict[str, float]:
        return {k: v for k, v in self.summary["evaluations"][-1].items() if k != "step"} if self.summary["evaluations"] else {}

    @property
    def diverged_at(self) -> Optional[int]:
        """The step whose loss was not finite, where the run ended; None if it did not diverge."""
        return self.summary.get(DIVERGED)


def prepare(config: TrialConfig, data: Optional[TrialData] = None) -> tuple[TrialData, np.ndarray]:
    """Check the configuration, load the data unless a sweep already did (`data`, checked against this config), and
    pick the rows this trial trains on; every error here is one line naming the bad value."""
    from .inputs import data_source, load_data, training_rows

    check_config(config)
    if data is None:
        check_adapter_fits(config)  # a sweep checked each adapter against the model once for all its trials
        data = load_data(config)
    elif data.source != data_source(config):
        raise ValueError(f"the data given was loaded for {data.source}, not for this trial's {data_source(config)}")
    return data, training_rows(config, data)


def check_config(config: TrialConfig) -> None:
    """Every check that needs no data and no Ray: cheap enough to run on each point of a sweep's grid."""
    from densemod.denselora.config import check_choice

    from ..data.loading import check_fraction
    from .models import check_model_name

    check_model_name(config.model)
    if not config.datasets:
        raise ValueError("no training data set given: name at least one source")
    config.peft_config(total_steps=2)
    check_choice("eval_mode", config.eval_mode, EVAL_MODES)
    check_choice("dtype", config.dtype, DTYPES)
    check_choice("protocol", config.protocol, PROTOCOLS)
    check_non_negative("num_workers", config.num_workers, "in this process")
    for name in ("batch_size", "micro_batch_size", "epochs", "report_every", "cutoff_len"):
        check_positive(name, getattr(config, name))
    for name in ("max_steps", "stop_after_step", "checkpoint_every", "eval_every", "eval_limit", "snapshot_every"):
        if getattr(config, name) is not None:
            check_positive(name, getattr(config, name))
    check_non_negative("warmup_steps", config.warmup_steps, "no warm-up")
    check_non_negative("max_failures", config.max_failures, "a lost worker fails the trial")
    check_non_negative("seed", config.seed)
    check_non_negative("val_size", config.val_size, "no validation set")
    if config.eval_every is not None and config.val_size == 0:
        raise ValueError(
            f"eval_every {config.eval_every} evaluates the validation set, and val_size is 0: give val_size a number of "
            "rows, or leave eval_every unset"
        )
    for name in ("eval_batch_size", "max_new_tokens"):
        check_positive(name, getattr(config, name))
    check_fraction(config.data_fraction)
    for name in ("lr", "max_grad_norm", "cpus_per_worker", "gpus_per_worker"):
        check_positive_number(name, getattr(config, name))
    check_gpus_per_worker(config)
    per_step = config.micro_batch_size * max(1, config.num_workers)
    if config.batch_size % per_step:
        raise ValueError(
            f"batch_size {config.batch_size} must be a multiple of micro_batch_size x num_workers = {per_step}"
        )


def check_gpus_per_worker(config: TrialConfig) -> None:
    """A worker trains on one GPU: a share of one lets one-worker trials share a GPU, but two ranks of one trial on
    one GPU fail in NCCL ("Duplicate GPU detected"), and a worker's second GPU would sit idle."""
    gpus = config.gpus_per_worker
    if gpus > 1:
        raise ValueError(
            f"gpus_per_worker {gpus:g}: a worker trains on one GPU and would leave the others idle; use more workers "
            f"(num_workers {max(1, config.num_workers) * math.ceil(gpus)} with gpus_per_worker 1)"
        )
    if gpus < 1 and config.num_workers > 1:
        raise ValueError(
            f"gpus_per_worker {gpus:g} with num_workers {config.num_workers} puts ranks of one trial on one GPU, which "
            "NCCL refuses: give each worker a whole GPU (gpus_per_worker 1), or share GPUs between one-worker trials"
        )


def check_adapter_fits(config: TrialConfig) -> None:
    """Apply the adapter to the model's architecture on the meta device: a target that names no module of this model
    fails here, in one line, instead of on every worker."""
    from peft import get_peft_model

    from .models import meta_model

    get_peft_model(meta_model(config.model), config.peft_config(total_steps=2), low_cpu_mem_usage=True)


def check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")


def check_positive_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number; got {value!r}")


def check_non_negative(name: str, value: Any, zero_means: Optional[str] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        meaning = f" (0: {zero_means})" if zero_means else ""
        raise ValueError(f"{name} must be a non-negative integer{meaning}; got {value!r}")


def run_trial(
    config: TrialConfig, callbacks: Sequence[ray.train.UserCallback] = (), data: Optional[TrialData] = None,
    console: Optional[TrialConsole] = None,
) -> TrialResult:
    """Run one trial to the end (or to stop_after_step) and return rank 0's summary.

    `callbacks` go to Ray Train's RunConfig: a sweep passes Tune's report callback there. `data`: the sweep's data,
    loaded once for all its trials (checked against this config); None to load it here. `console`: the trial
    command's (progress.TrialConsole): what runs and a progress line on the console, Ray's output in the trial's log;
    None leaves the output as Ray writes it.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from .inputs import eval_set
    from .progress import Watched
    from .rendezvous import BoundTorchConfig
    from .loop import train_loop

    started, started_at = time.perf_counter(), time.time()
    data, examples = prepare(config, data)
    run_name = config.name or default_name(config)
    with contextlib.ExitStack() as stack:
        if console is not None:
            stack.enter_context(console.quiet())
        stack.enter_context(own_ray())
        check_placement(config.storage_path, cluster.may_have_several_nodes(), cluster.in_submitted_job())
        check_storage(config.storage_path)
        gpu = uses_gpu(config)
        check_placeable(config, gpu)
        resources = worker_resources(config, gpu)
        watched = Watched(train_loop, {}, [])
        if console is not None:
            folder = local_folder(join(storage_root(config.storage_path), run_name), run_name)
            workers = f"{config.num_workers} worker(s) of " + ", ".join(f"{v:g} {k}" for k, v in resources.items())
            watched = stack.enter_context(console.watching(config, run_name, folder, workers))
        trainer = TorchTrainer(
            watched.train_loop,
            train_loop_config={
                "config": dataclasses.asdict(config),
                "train": data.train if isinstance(data.train, ray.ObjectRef) else ray.put(data.train),
                "train_indices": examples,
                "eval_sets": ray.put([eval_set(config, name, rows) for name, rows in data.eval_sets]),
                "val_sets": ray.put(data.val_sets),
                "val_answers": ray.put(data.val_answers),
                "started_at": started_at,
                **watched.loop_config,
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=config.num_workers, use_gpu=gpu, resources_per_worker=resources
            ),
            torch_config=BoundTorchConfig(),
            run_config=ray.train.RunConfig(
                name=run_name,
                storage_path=storage_root(config.storage_path),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
                callbacks=[*callbacks, *watched.callbacks],
            ),
        )
        result = trainer.fit()
        # Local mode hands back a checkpoint in a temporary folder that is already gone.
        checkpoint = result.checkpoint.path if result.checkpoint and result.path else None
        return TrialResult(config, result.return_value, result.path, checkpoint, time.perf_counter() - started)


def default_name(config: TrialConfig) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{config.model}-{config.method}-{config.variant}-r{config.rank}-{stamp}".replace("/", "_")


def print_summary(result: TrialResult) -> None:
    summary, history = result.summary, result.summary["history"]
    print(f"\ntrial: {result.path or 'run in this process (local mode): no checkpoints kept'}")
    print(
        f"trainable params: {summary['trainable_params']:,d} of {summary['total_params']:,d} "
        f"({summary['trainable_pct']:.4f}%)"
    )
    print(f"precision: {summary['precision']}")
    if history:
        print(f"loss: {history[0]['loss']:.4f} (step {history[0]['step']}) -> {history[-1]['loss']:.4f} (step {history[-1]['step']})")
    for name, value in result.accuracies.items():
        print(f"{name}: {value:.4f}")
    if result.checkpoint:
        print(f"checkpoint (adapter, predictions.json): {result.checkpoint}")
    if "startup_s" in summary:
        print(f"first optimizer step after: {summary['startup_s']:.1f} s")
    print(f"wall time: {result.wall_time_s:.1f} s")


def parser() -> argparse.ArgumentParser:
    """One flag per TrialConfig field (--max-steps for max_steps), with its help and default; lists are
    comma-separated. The description is the module's docstring, its example as written, without the last paragraph,
    which is for readers of the code."""
    p = argparse.ArgumentParser(
        description=__doc__.rsplit("\n\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, default in dataclasses.asdict(TrialConfig()).items():
        add_setting(p, name, shown(name, default), default=default)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="Ray's own output on the console too (default: off: in trial.log in the trial's folder)")
    return p


def parse_command(argv: Optional[list[str]] = None) -> tuple[TrialConfig, bool]:
    """The trial the command line describes, and whether it asked for Ray's output (-v)."""
    args = vars(parser().parse_args(argv))
    verbose = args.pop("verbose")
    return TrialConfig(**args), verbose


def parse_args(argv: Optional[list[str]] = None) -> TrialConfig:
    return parse_command(argv)[0]


def warning_line(message: Warning | str, category: type[Warning], *location: Any, **_: Any) -> str:
    """A warning as the CLIs print it: one line, without the file, line number and source line that Python adds."""
    return f"warning: {message}\n"


def as_a_command() -> None:
    """Set this process up as a CLI: warnings print as one line each, and SIGTERM (kill, a
    scheduler's cancel) acts as Ctrl-C, so that the Ray this process started is shut down and no MLflow run is left
    RUNNING; Python's default would end the process without either."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    warnings.formatwarning = warning_line
    signal.signal(signal.SIGTERM, interrupt)


def main(argv: Optional[list[str]] = None) -> int:
    config, verbose = parse_command(argv)
    as_a_command()
    from .progress import TrialConsole

    try:
        result = run_trial(config, console=TrialConsole(verbose))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_summary(result)
    if result.diverged_at is not None:
        print(
            f"error: the trial diverged: its loss was not finite at step {result.diverged_at}, where it stopped",
            file=sys.stderr,
        )
        return 1
    return 0

