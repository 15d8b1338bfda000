"""The configuration of a trial and of a sweep: what the user wrote, serialisable whole (it is logged to the tracking
store as is). Plain dataclasses, importable without torch, PEFT or Ray, so that command lines answer --help at once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    from peft import PeftConfig

EVAL_MODES = ("generate", "loglik")
PROTOCOLS = ("label", "text")
DTYPES = ("auto", "float32", "bfloat16")
SEARCHABLE = ("rank", "targets", "data_fraction", "method", "variant", "protocol", "lr", "alpha", "dropout", "seed")
SEARCHES = ("grid", "random", "optuna")
SCHEDULERS = ("fifo", "asha")
# The metric a trial reports, with the step, when its loss stops being finite: it ends there (train.diverged).
DIVERGED = "diverged_at_step"


@dataclass
class TrialConfig:
    # what to adapt, and how (densemod.build_peft_config's arguments)
    model: str = "smollm2-135m"
    method: str = "denselora"
    variant: str = "denselora"
    rank: int = 32
    alpha: Optional[float] = None  # None: 2 * rank
    dropout: float = 0.05
    targets: str = "q,k,v,up,down"
    # data: LLM-Adapters files or folders, folder names in the data folders (ARC-Easy: data.data_dirs), Hub ids, or
    # "synthetic" (the built-in task)
    datasets: list[str] = field(default_factory=lambda: ["synthetic"])
    # label: the paper's response "the correct answer is answer2"; text: the right option's text, each option's text
    # scored by log-likelihood (densetune.protocols)
    protocol: str = "label"
    eval_datasets: Optional[list[str]] = None  # None: the test split of each training set
    data_fraction: float = 1.0
    cutoff_len: int = 256
    train_on_inputs: bool = True
    group_by_length: bool = True  # batches of examples of similar length: little compute spent on padding
    # the paper's recipe: AdamW, lr 3e-4, linear schedule with 100 warm-up steps, batch 16 of micro-batches of 4
    lr: float = 3e-4
    warmup_steps: int = 100
    batch_size: int = 16  # global, across workers and accumulation steps
    micro_batch_size: int = 4
    epochs: int = 2
    max_steps: Optional[int] = None  # None: epochs over the data
    stop_after_step: Optional[int] = None  # end the run early, keeping the schedule of the full run (resumable)
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    seed: int = 42
    # auto: bfloat16 autocast where the hardware computes bf16 natively (GPU; CPU with AMX or AVX-512 BF16), else
    # float32; bfloat16: base weights in bf16 and bf16 autocast, adapter weights and optimizer state in float32
    dtype: str = "auto"
    # Ray Train worker group
    # 0: Ray Train's local mode, the loop runs in this process (for debuggers and profilers; no checkpoints, no sweeps)
    num_workers: int = 1
    use_gpu: Optional[bool] = None  # None: when the cluster has GPUs
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    # restarts of the worker group after a lost worker or node, each from the last checkpoint (or the start; Ray
    # Train's FailureConfig); a trial fails after one more
    max_failures: int = 2
    # reporting, checkpoints, evaluation
    report_every: int = 10
    checkpoint_every: Optional[int] = None  # None: only at the end
    # label protocol: greedy generation and answer extraction (LLM-Adapters), or "loglik", faster; the text protocol
    # always scores the options' texts
    eval_mode: str = "generate"
    eval_every: Optional[int] = None  # None: only at the end
    eval_at_start: bool = False  # also evaluate before the first step: the base model, for DenseLoRA and LoRA
    eval_limit: Optional[int] = None  # a fixed subset of this many questions per benchmark, the same for every seed
    eval_batch_size: int = 8
    eval_sharded: bool = False  # evaluate on every worker's share instead of on rank 0 alone
    max_new_tokens: int = 32
    # record each adapted layer's r x r matrices (DenseLoRA's M, slices of LoRA's A and B) at step 0 and every this many
    # steps, for the report's increment heat maps (densetune.increments); None: never
    snapshot_every: Optional[int] = None
    name: Optional[str] = None  # the run's folder under storage_path; an existing one is resumed
    storage_path: str = "runs"

    def peft_config(self, total_steps: int) -> PeftConfig:
        """The adapter this trial trains (total_steps matters to AdaLoRA's schedule only)."""
        import densemod

        return densemod.build_peft_config(
            self.method, self.rank, self.alpha, self.dropout, self.targets, self.variant, total_steps=total_steps
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrialConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown trial settings {unknown}; allowed: {sorted(known)}")
        return cls(**values)


@dataclass
class SweepConfig:
    study: str  # the MLflow experiment: sweeps of one study are compared there
    space: dict[str, Any]  # a searchable setting -> a list of values (or a ray.tune distribution, random/optuna)
    trial: TrialConfig = field(default_factory=TrialConfig)  # every other setting; its storage_path holds the sweep
    search: str = "grid"  # grid: every combination; random: num_samples draws; optuna: Bayesian, num_samples trials
    num_samples: int = 1  # grid: passes over the grid (with different seeds only if seed is searched)
    scheduler: str = "fifo"  # asha: stop the worse trials early, at steps grace_period, 2x, 4x, ...
    # what optuna and asha compare; ASHA sees it only where a trial reports it. A list (with a list of modes) asks optuna
    # for a multi-objective search, e.g. ["accuracy/average", "trainable_params"], ["max", "min"]: ASHA then compares
    # the first objective.
    metric: Union[str, list[str]] = "accuracy/average"
    mode: Union[str, list[str]] = "max"
    grace_period: int = 10
    max_concurrent: int = 0  # 0: as many trials at once as the cluster's nodes fit (no limit on an autoscaling cluster)
    name: Optional[str] = None  # the sweep's folder and MLflow name; None: <study>-<time>
    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite in the storage path
    resume: bool = False  # continue the sweep called `name`: unfinished trials resume, finished ones are kept


@functools.cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrialConfig)


def field_type(name: str) -> Optional[tuple[Any, bool]]:
    """(the type a TrialConfig field holds, whether it may be None), e.g. (int, True) for max_steps and
    (list[str], False) for datasets; None when there is no such field."""
    hint = _hints().get(name)
    if hint is None:
        return None
    if typing.get_origin(hint) is typing.Union:
        return next(t for t in typing.get_args(hint) if t is not type(None)), True
    return hint, False


def comma_list(text: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']: how lists are written on command lines."""
    return [part.strip() for part in text.split(",") if part.strip()]
