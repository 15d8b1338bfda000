"""The configuration of a trial and of a sweep: what the user wrote, serialisable whole (it is logged to the tracking
store as is), and the flags that set a trial's fields, with their help. Plain dataclasses, importable without torch,
PEFT or Ray, so that command lines answer --help at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

if TYPE_CHECKING:
    from peft import PeftConfig

EVAL_MODES = ("generate", "loglik")
PROTOCOLS = ("label", "text")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# densemod's names (densemod.METHODS, DENSELORA_METHODS, VARIANTS and SHARE_SCOPES, the keys of densemod.TARGET_SETS
# and of its target aliases), copied because `import densemod` imports torch and PEFT, which --help must not wait for;
# tests/test_cli.py checks that the copies equal the originals.
METHODS = ("denselora", "lora", "dora", "vera", "lokr", "adalora", "hybrid")
VARIANTS = ("denselora", "freeze", "only_matrix")
SHARE_SCOPES = ("kind", "layer")
DENSELORA_METHODS = ("denselora", "hybrid")
TARGET_SET_NAMES = ("qkv", "ud", "qkvud", "qkvo", "qkvoud", "all-linear")
TARGET_KINDS = ("q", "k", "v", "o", "gate", "up", "down")
SEARCHABLE = (
    "rank", "targets", "data_fraction", "method", "variant", "share_scope", "protocol", "lr", "alpha", "dropout", "seed",
)
SEARCHES = ("grid", "random", "optuna")
SCHEDULERS = ("fifo", "asha")
# The metric a trial reports, with the step, when its loss stops being finite: it ends there (train.diverged).
DIVERGED = "diverged_at_step"
# The three splits' metrics. Training rows train; the validation set, held out from them, is what every choice reads
# (searchers, schedulers, the best trial, the Pareto front); the benchmark's test split is reported, never chosen on.
VAL_PREFIX = "val/"  # val/accuracy/<benchmark>, val/accuracy/average, val/accuracy_norm/..., val/loss
TEST_PREFIXES = ("accuracy/", "accuracy_norm/")  # per benchmark and average; accuracy_norm: the text protocol
DEFAULT_METRIC = "val/accuracy/average"
POINT = "point"  # a sweep of explicit points (SweepConfig.points) searches this one Tune parameter, a dict each


def setting(default: Any, text: str, choices: tuple[str, ...] = (), unset: Optional[str] = None) -> Any:
    """A TrialConfig field with its one-line help, kept here once for both command lines: what it sets, its allowed
    values where they are a fixed set, and what None means where it may be None."""
    metadata = {"help": text, "choices": choices, "unset": unset}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrialConfig:
    # what to adapt, and how (densemod.build_peft_config's arguments)
    model: str = setting(
        "smollm2-135m", "the base model: smollm2-135m (the pretrained SmolLM2-135M-Instruct), tiny-llama (random, for "
        "tests), a Hugging Face id or a local folder",
    )
    method: str = setting(
        "denselora", "the adapter: DenseLoRA or a PEFT baseline; hybrid: LoRA on lora_targets, DenseLoRA on the other "
        "targets (the paper's Table 8 on the default targets)", METHODS,
    )
    variant: str = setting(
        "denselora", "DenseLoRA's variant (methods denselora, hybrid): freeze trains M alone; only_matrix has no "
        "activations, so it merges", VARIANTS,
    )
    share_scope: str = setting(
        "kind", "what shares one W_e, W_d (methods denselora, hybrid): kind, every layer of a module kind (the paper); "
        "layer, none (the ablation without sharing)", SHARE_SCOPES,
    )
    lora_targets: Optional[str] = setting(
        None, "method hybrid: the targets that LoRA adapts, named as targets are", unset="the attention projections "
        "among the targets (q, k, v of the default targets)",
    )
    rank: int = setting(32, "the adapter's rank r")
    alpha: Optional[float] = setting(None, "the scaling numerator: the update is scaled by alpha / r", unset="2 x rank")
    dropout: float = setting(0.05, "the adapter's dropout probability, in [0, 1); LoKr's rank dropout")
    targets: str = setting(
        "q,k,v,up,down", f"the projections to adapt: a named set ({', '.join(TARGET_SET_NAMES)}) or kinds joined by "
        f"commas ({', '.join(TARGET_KINDS)}, or module names)",
    )
    datasets: list[str] = setting(
        ["synthetic"], "the training data, comma-separated: LLM-Adapters files or folders, folder names in the data "
        "folders (ARC-Easy, boolq: densetune.data.data_dirs), Hub ids, or synthetic, the built-in task",
    )
    protocol: str = setting(
        "label", "label: the paper's response 'the correct answer is answer2'; text: the right option's text, each "
        "option's text scored by log-likelihood", PROTOCOLS,
    )
    eval_datasets: Optional[list[str]] = setting(
        None, "the evaluation data, comma-separated, named as the training data is, or a suite: commonsense (the "
        "paper's eight commonsense benchmarks, those found in the data folders)",
        unset="the test split of each training set",
    )
    val_size: int = setting(
        200, "training rows of each training data set held out as the validation set: the same rows for every trial "
        "and seed, never trained on; evaluated at step 0, every eval_every steps and at the end (val/accuracy/*, "
        "val/loss), and what sweeps choose on; 0: no validation set",
    )
    data_fraction: float = setting(
        1.0, "the share of the training rows kept after the validation set is held out, in (0, 1]: a subset drawn "
        "with the seed",
    )
    cutoff_len: int = setting(256, "the most tokens of an example; longer ones are cut")
    train_on_inputs: bool = setting(True, "the loss on the prompt too, not on the response alone")
    group_by_length: bool = setting(True, "batches of examples of similar length: little compute spent on padding")
    # the paper's recipe: AdamW, lr 3e-4, linear schedule with 100 warm-up steps, batch 16 of micro-batches of 4
    lr: float = setting(3e-4, "AdamW's learning rate, after the warm-up (linear schedule)")
    warmup_steps: int = setting(100, "optimizer steps of linear warm-up")
    batch_size: int = setting(16, "examples per optimizer step: global, across workers and accumulation steps")
    micro_batch_size: int = setting(4, "examples per forward pass of one worker")
    epochs: int = setting(2, "passes over the training rows, when max_steps is unset")
    max_steps: Optional[int] = setting(None, "optimizer steps in all", unset="epochs over the data")
    stop_after_step: Optional[int] = setting(
        None, "end the run early, keeping the schedule of the full run (resumable)", unset="run to the end"
    )
    max_grad_norm: float = setting(1.0, "gradients are clipped to this global norm")
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass: less memory, more time")
    seed: int = setting(42, "picks the training rows' order and subset and the adapter's initialisation")
    dtype: str = setting(
        "auto", "auto: bfloat16 autocast where the hardware computes bf16 natively (GPU of compute capability 8+; "
        "CPU with AMX or AVX-512 BF16), else float16 on a GPU and float32 on a CPU; bfloat16: base weights in bf16 "
        "and bf16 autocast, adapter weights and optimizer state in float32; float16: the same in fp16, with a "
        "gradient scaler", DTYPES,
    )
    # Ray Train worker group
    num_workers: int = setting(
        1, "Ray Train workers, data-parallel; 0: the loop runs in this process, Ray Train's local mode, for debuggers "
        "and profilers: no checkpoints, no sweeps",
    )
    use_gpu: Optional[bool] = setting(None, "train on GPUs", unset="when the cluster has GPUs")
    cpus_per_worker: float = setting(1.0, "CPUs each worker reserves")
    gpus_per_worker: float = setting(
        1.0, "GPUs each worker reserves when it uses GPUs; a fraction shares one, e.g. 0.25"
    )
    max_failures: int = setting(
        2, "restarts of the worker group after a lost worker or node, each from the last checkpoint (or the start; Ray "
        "Train's FailureConfig); a trial fails after one more",
    )
    # reporting, checkpoints, evaluation
    report_every: int = setting(10, "optimizer steps between reports of the loss and the throughput")
    checkpoint_every: Optional[int] = setting(None, "optimizer steps between checkpoints", unset="only at the end")
    eval_mode: str = setting(
        "generate", "under the label protocol, generate: greedy generation and answer extraction (LLM-Adapters); "
        "loglik: faster; the text protocol always scores the options' texts", EVAL_MODES,
    )
    eval_every: Optional[int] = setting(
        None, "optimizer steps between evaluations of the validation set (the test split is evaluated at the end only)",
        unset="only at step 0 and at the end",
    )
    evaluate_test: bool = setting(
        True, "evaluate the test split at the end (and at step 0 with eval_at_start); --tune's tuning phase turns it "
        "off: it chooses on the validation set",
    )
    eval_at_start: bool = setting(
        False, "also evaluate the test split before the first step: the base model, for DenseLoRA and LoRA (the "
        "validation set always is)",
    )
    eval_limit: Optional[int] = setting(
        None, "a fixed subset of this many questions per benchmark, the same for every seed", unset="every question"
    )
    eval_batch_size: int = setting(
        8, "prompts per generation batch and rows per validation-loss batch; a log-likelihood batch holds up to "
        "eval_batch_size x 128 tokens, padding included (each question's options packed after its context)",
    )
    eval_sharded: bool = setting(False, "evaluate on every worker's share instead of on rank 0 alone")
    max_new_tokens: int = setting(32, "the most tokens generated per answer, under eval_mode generate")
    snapshot_every: Optional[int] = setting(
        None, "record each adapted layer's r x r matrices (DenseLoRA's M, slices of LoRA's A and B) at step 0 and "
        "every this many steps, for the report's increment heat maps", unset="never",
    )
    name: Optional[str] = setting(
        None, "the run's folder under storage_path; an existing one is resumed",
        unset="<model>-<method>-<variant>-r<rank>-<time>",
    )
    storage_path: str = setting(
        "runs", "the folder or URI of the runs: on a cluster of several nodes one that all reach, s3://bucket/runs, "
        "gs://..., or file:///mnt/shared/runs for a folder every node mounts",
    )

    def peft_config(self, total_steps: int) -> PeftConfig:
        """The adapter this trial trains (total_steps matters to AdaLoRA's schedule only)."""
        import densemod

        return densemod.build_peft_config(
            self.method, self.rank, self.alpha, self.dropout, self.targets, self.variant, total_steps=total_steps,
            lora_targets=self.lora_targets, share_scope=self.share_scope,
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
    # what optuna, asha and the sweep's best trial compare: a validation metric or a trial's size, never a test metric;
    # ASHA sees it only where a trial reports it. A list (with a list of modes) asks optuna for a multi-objective
    # search, e.g. ["val/accuracy/average", "trainable_params"], ["max", "min"]: ASHA then compares the first objective,
    # and the best trial is the best on the first, ties broken by the next.
    metric: Union[str, list[str]] = DEFAULT_METRIC
    mode: Union[str, list[str]] = "max"
    grace_period: int = 10
    max_concurrent: int = 0  # 0: as many trials at once as the cluster's nodes fit (no limit on an autoscaling cluster)
    name: Optional[str] = None  # the sweep's folder and MLflow name; None: <study>-<time>
    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite in the storage path
    resume: bool = False  # continue the sweep called `name`: unfinished trials resume, finished ones are kept
    # besides the searched settings, accuracies, cost and status: what the summary table shows of each trial
    columns: tuple[str, ...] = ("trainable_params", "trainable_pct")
    # Ray's and Tune's output on the console too; by default it goes to sweep.log in the sweep's folder, and the console
    # shows the sweep's own lines and a progress line
    verbose: bool = False
    # explicit trials, each a dict of searched settings, instead of every combination of `space` (grid search only);
    # `space` then lists each setting's values, as tables and labels show them. --tune runs its phases so.
    points: Optional[list[dict[str, Any]]] = None
    parent_run_id: Optional[str] = None  # the sweep's MLflow run nests under this run (--tune's study run)


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


def settings_label(values: dict[str, Any], keys: Optional[Sequence[str]] = None) -> str:
    """'rank=8 seed=43': how a trial is named by its searched settings (`keys`, by default all of `values`), in its
    MLflow run, on the console and in errors."""
    return " ".join(f"{k}={values[k]}" for k in (values if keys is None else keys))


def flat_params(params: dict[str, Any]) -> dict[str, Any]:
    """A Tune trial's parameters with an explicit point's settings (SweepConfig.points, under POINT) in their place."""
    point = params.get(POINT) or {}
    return {**{k: v for k, v in params.items() if k != POINT}, **point}


def grid_points(space: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every combination of the listed values (one empty point for an empty space); a distribution contributes one
    sample."""
    axes = [values if isinstance(values, (list, tuple)) else [values.sample()] for values in space.values()]
    return (dict(zip(space, combination)) for combination in itertools.product(*axes))


def points_space(points: list[dict[str, Any]]) -> dict[str, list]:
    """What explicit points search, each setting's values in their first order: for tables and labels."""
    space: dict[str, list] = {}
    for point in points:
        for key, value in point.items():
            if value not in space.setdefault(key, []):
                space[key].append(value)
    return space


def comma_list(text: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']: how lists are written on command lines."""
    return [part.strip() for part in text.split(",") if part.strip()]


@functools.cache
def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrialConfig)}


def flag(name: str) -> str:
    """The flag that sets the TrialConfig field `name` in every command line: --max-steps for max_steps."""
    return "--" + name.replace("_", "-")


def shown(name: str, value: Any) -> str:
    """A value of the TrialConfig field `name` as a command line writes it (lists comma-separated, true or false),
    None as what it means there."""
    if value is None:
        return _fields()[name].metadata["unset"]
    if isinstance(value, bool):
        return str(value).lower()
    return ",".join(value) if isinstance(value, list) else str(value)


def add_setting(parser: argparse.ArgumentParser, name: str, unflagged: str, *aliases: str, **kwargs: Any) -> None:
    """Add the flag that sets the TrialConfig field `name`, typed as the field (lists comma-separated, bools
    --x/--no-x), with the field's help line, its allowed values and, as its default, `unflagged`: what the command
    does without the flag. kwargs go to add_argument (its default, choices)."""
    kind, _ = field_type(name)
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = comma_list if typing.get_origin(kind) is list else kind
    metadata = _fields()[name].metadata
    allowed = f"one of: {', '.join(metadata['choices'])}; " if metadata["choices"] else ""
    # argparse formats help with %: a literal one is written %%
    text = f"{metadata['help']} ({allowed}default: {unflagged})".replace("%", "%%")
    parser.add_argument(flag(name), *aliases, help=text, **kwargs)
