"""The training recipe each Ray Train worker runs: one trial's fine-tuning, its checkpoints and its evaluation.

train_loop reads top to bottom: set up the trial (its state, state.py), restore a checkpoint if Ray hands one over,
then step through the data, evaluating and reporting every few steps and checkpointing every few more, and evaluate
at the end. The functions after it are its parts, in the order it calls them; each takes the trial's state.

The data arrives tokenized, through Ray's object store (`loop_config`: the trial's config, the tokenized rows and which
of them this trial trains on, the test split's questions, the validation set, and when the trial started). The
validation set is evaluated at step 0, every eval_every steps and at the end; the test split at the end (and at step 0
with eval_at_start).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import random
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple, Optional, TypeVar

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from peft import get_peft_model
from transformers import get_linear_schedule_with_warmup

import densemod

from . import checkpoint as ckpt
from . import precision as mixed
from ..config import DIVERGED, VAL_PREFIX, TrialConfig
from ..data.batching import TokenCounts, epoch_batches, token_counts
from ..data.tokens import IGNORE_INDEX, collate
from ..files import PREDICTIONS, SNAPSHOTS, SUMMARY, TRIAL_CONFIG
from .evaluate import answer_loss, benchmark_metrics, evaluate, summed_token_loss
from .increments import SnapshotRecorder, load_snapshots
from .models import load_model, load_tokenizer
from .rendezvous import require_cuda
from .state import TrialState, WorkerData, planned_steps

logger = logging.getLogger(__name__)


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    """One worker's trial; rank 0's summary of it (every worker returns its own, Ray keeps rank 0's)."""
    state = set_up(loop_config)
    restore(state, ray.train.get_checkpoint())
    state.trained = ray.train.torch.prepare_model(state.model)
    begin(state)
    if state.resumed_from is None:
        evaluate_before_training(state)
    for micro_batches in remaining_steps(state):
        started = time.perf_counter()
        done = train_step(state, collated(state, micro_batches), token_counts(state.data.lengths, micro_batches))
        if not math.isfinite(done.loss):
            return diverged(state, done.loss)
        finish_step(state, done)
        record_step(state, done, elapsed=time.perf_counter() - started)
    # A run resumed after its last step took none here; it evaluates and checkpoints again, so that it too returns and
    # keeps the final evaluation and summary.
    if state.position.step == state.total_steps and not state.evaluated_at_end:
        evaluation = run_evaluation(state, test=state.cfg.evaluate_test)
        report_to_ray(state, {"step": state.position.step, **evaluation}, checkpoint=True)
    return state.summary


def set_up(loop_config: dict[str, Any]) -> TrialState:
    """This worker's trial at step 0: its model, what trains it, and its data from Ray's object store."""
    # The config crosses Ray's boundary as a dict; this is where it becomes a TrialConfig again.
    cfg = TrialConfig.from_dict(loop_config["config"])
    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    require_gpu(cfg, device)
    data = WorkerData(
        tokenizer=load_tokenizer(cfg.model), rows=ray.get(loop_config["train"]), examples=loop_config["train_indices"],
        test_sets=ray.get(loop_config["eval_sets"]), val_sets=ray.get(loop_config["val_sets"]),
        val_answers=ray.get(loop_config["val_answers"]),
    )
    state = build_state(cfg, mixed.resolve(cfg.dtype, device), device, planned_steps(cfg, len(data.examples)))
    state.rank, state.world = context.get_world_rank(), context.get_world_size()
    state.data = data
    state.started_at = loop_config["started_at"]
    if cfg.snapshot_every and state.rank == 0:
        state.snapshots = SnapshotRecorder()
    return state


def require_gpu(cfg: TrialConfig, device: torch.device) -> None:
    """A trial that asks for GPUs fails at once on a worker without one, rather than train for hours on its CPU (a
    worker group checks this before its rendezvous; local mode, here)."""
    if cfg.use_gpu and device.type != "cuda":
        require_cuda()


def build_state(cfg: TrialConfig, precision: str, device: torch.device, total_steps: int) -> TrialState:
    """The adapted model on `device`, AdamW over the adapter's weights, the linear schedule and float16's gradient
    scaler: a trial as rank 0 of one worker, with no data yet."""
    # The same seed on every worker gives every worker the same adapter initialisation.
    torch.manual_seed(cfg.seed)
    base = load_model(cfg.model, dtype=mixed.weights_dtype(precision), device=device)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing recomputes the shared encoder correctly under DDP.
        base.activation_checkpointing_enable({"use_reentrant": False})
    # PEFT keeps the adapter's weights in float32 over bfloat16 or float16 base weights (autocast_adapter_dtype), and
    # creates them on their base layer's device.
    model = get_peft_model(base, cfg.peft_config(total_steps))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    optimization = ckpt.Optimization(
        optimizer=optimizer, scheduler=get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, total_steps),
        scaler=mixed.grad_scaler(precision, device),
    )
    return TrialState(
        cfg=cfg, device=device, precision=precision, model=model, optimization=optimization,
        step_hook=densemod.step_hook(model), total_steps=total_steps,
    )


def restore(state: TrialState, checkpoint: Optional[ray.train.Checkpoint]) -> None:
    """Continue from Ray's checkpoint where there is one: the adapter, the optimizer, the position, this worker's random
    state and the snapshots so far (so a resumed run still compares with step 0). Without one, seed this worker."""
    if checkpoint is None:
        # Dropout masks should differ between workers.
        torch.manual_seed(state.cfg.seed + state.rank)
        random.seed(state.cfg.seed + state.rank)
        return
    with checkpoint.as_directory() as name:
        folder = Path(name)
        ckpt.load_adapter(state.model, folder)
        ckpt.load_optimizer(state.optimization, folder)
        state.position = ckpt.load_position(folder)
        ckpt.load_rng(folder, state.rank)
        if state.snapshots is not None and (folder / SNAPSHOTS).exists():
            state.snapshots = SnapshotRecorder(load_snapshots(folder / SNAPSHOTS))
    state.resumed_from = state.position.step


def begin(state: TrialState) -> None:
    """The run's facts, the summary they open, and the run's first line in the log."""
    report = densemod.parameter_report(state.model)
    state.facts = {
        "trainable_params": report.trainable, "total_params": report.total, "trainable_pct": report.trainable_pct,
        "total_steps": state.total_steps, "precision": state.precision,
        "node_id": ray.get_runtime_context().get_node_id(),
    }
    state.summary = {
        **state.facts, "resumed_from_step": state.resumed_from, "history": [], "evaluations": [], "predictions": [],
    }
    log(state.rank, (
        f"{report} | steps {state.position.step}->{state.stop} of {state.total_steps} | {state.world} worker(s) on "
        f"{state.device} | {state.precision}"
    ))


def evaluate_before_training(state: TrialState) -> None:
    """Step 0 of a fresh run: the adapter's first snapshot, and the validation set's evaluation (with the test
    split's under eval_at_start), so that learning curves start from the untrained adapter."""
    cfg = state.cfg
    if state.snapshots is not None:
        state.snapshots.record(0, state.model)
    test = cfg.eval_at_start and cfg.evaluate_test
    if state.data.val_sets or test:
        metrics = {"step": 0, **run_evaluation(state, test=test), **state.facts}
        log(state.rank, f"before training: {format_accuracies(metrics)}")
        ray.train.report(metrics)


def remaining_steps(state: TrialState) -> Iterator[list[np.ndarray]]:
    """This worker's micro-batches (positions into the trial's examples) for each step from the state's position to
    its stop, epoch after epoch. The caller moves the position on after each step."""
    cfg = state.cfg
    while state.position.step < state.stop:
        batches = epoch_batches(
            state.data.lengths, cfg.batch_size, cfg.micro_batch_size, state.position.epoch, cfg.seed, state.rank,
            state.world, cfg.group_by_length,
        )
        for micro_batches in batches[state.position.step_in_epoch:]:
            yield micro_batches
            if state.position.step == state.stop:
                return
        state.next_epoch()


def collated(state: TrialState, micro_batches: list[np.ndarray]) -> list[dict[str, torch.Tensor]]:
    data = state.data
    return [collate(data.rows, data.examples[batch], data.tokenizer.pad_token_id) for batch in micro_batches]


class Step(NamedTuple):
    loss: float  # the global batch's mean token loss, as the model computed it: what was minimised
    tokens: int  # real tokens in the global batch
    slots: int  # token slots, padding included
    aux_loss: Optional[float] = None  # a method's own regulariser within `loss` (AdaLoRA); None: there is none
    skipped: bool = False  # float16's scaled gradients overflowed: the optimizer did not step, the scaler backed off

    @property
    def task_loss(self) -> float:
        """The language-modelling loss alone: what every method's `loss` metric means."""
        return self.loss - (self.aux_loss or 0.0)


class BatchTotals(NamedTuple):
    """What a step's loss is divided by and reported over, counted on each worker and summed over all."""

    targets: int  # target tokens: the loss is summed over these
    tokens: int
    slots: int


class Losses(NamedTuple):
    loss: float  # what the model computed, its share of the global batch's mean
    task: float  # the task's own part of it, where a method adds a regulariser (else 0)


def train_step(state: TrialState, batches: list[dict[str, torch.Tensor]], counts: TokenCounts) -> Step:
    """One optimizer step of `state`'s model over this worker's micro-batches (`batches`, with their token `counts`).

    The loss is summed over the global batch's target tokens and divided by their count, so it does not depend on how
    the batch is split between workers and accumulation steps. The optimizer does not step when that loss is not
    finite. For a method that adds a regulariser to the model's loss (AdaLoRA), the task's own loss is computed from
    the logits as well, so that the two can be logged apart. With float16's scaler the backward pass runs on the
    scaled loss, and the step is skipped when the scaled gradients overflow (see optimizer_step).
    """
    model, device, scaler = state.trained, state.device, state.optimization.scaler
    model.train()
    totals = all_reduce_sum(device, BatchTotals(  # the global batch's counts, in one collective
        targets=sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches), tokens=counts.tokens,
        slots=counts.slots,
    ))
    auxiliary = state.cfg.method in densemod.AUXILIARY_LOSS_METHODS
    loss_sum = task_sum = 0.0
    for i, batch in enumerate(batches):
        # Gradients are all-reduced on the last micro-batch only.
        syncing = i == len(batches) - 1 or not hasattr(model, "no_sync")
        with (contextlib.nullcontext() if syncing else model.no_sync()), mixed.autocast(state.precision, device):
            if auxiliary:  # the method adds its regulariser to the loss the model computes from the labels
                outputs = model(**{k: v.to(device) for k, v in batch.items()}, num_items_in_batch=totals.targets)
                loss = outputs.loss
                task_sum += summed_token_loss(outputs.logits, batch["labels"]) / totals.targets
            else:
                loss = target_loss_sum(model, batch, device) / totals.targets
            # DDP averages gradients over workers; the loss is already a share of the global sum.
            (loss * state.world if scaler is None else scaler.scale(loss * state.world)).backward()
        loss_sum += loss.item()
    losses = all_reduce_sum(device, Losses(loss=loss_sum, task=task_sum))
    # A non-finite loss leaves the weights as they were: the caller ends the run, and no NaN reaches an adapter.
    skipped = math.isfinite(losses.loss) and optimizer_step(state)
    return Step(
        loss=losses.loss, tokens=totals.tokens, slots=totals.slots,
        aux_loss=losses.loss - losses.task if auxiliary else None, skipped=skipped,
    )


def optimizer_step(state: TrialState) -> bool:
    """Clip the gradients to max_grad_norm and step; whether the step was skipped.

    With a scaler the gradients are unscaled first, so that the clipping (and AdaLoRA after the step) sees the true
    ones. The scaler skips the step when they hold an inf or NaN, which says only that its scale was too large, not
    that the run diverged: it lowers the scale, exactly then, which is how the skip is told (GradScaler does not say).
    """
    parameters = [p for p in state.trained.parameters() if p.requires_grad]
    optimizer, scaler = state.optimization.optimizer, state.optimization.scaler
    if scaler is None:
        torch.nn.utils.clip_grad_norm_(parameters, state.cfg.max_grad_norm)
        optimizer.step()
        return False
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(parameters, state.cfg.max_grad_norm)
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() < scale


def target_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """The causal LM's cross-entropy summed over the batch's target tokens, as transformers computes it (float32
    logits, each position predicting the next token), with the vocabulary's logits computed only at the positions that
    predict a target: with the loss on the answers only that is a few positions per row, and the LM head over
    SmolLM2's 49,152 tokens is a fifth of the model's arithmetic."""
    labels = batch["labels"].to(device)
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    logits = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
        logits_to_keep=predicts,
    ).logits  # (target tokens, vocabulary): the kept positions of every row, in order
    return F.cross_entropy(logits.float(), labels[:, 1:][predicts[:, :-1]], reduction="sum")


Summed = TypeVar("Summed", BatchTotals, Losses)


def all_reduce_sum(device: torch.device, values: Summed) -> Summed:
    """Each of `values` summed over the workers; ints stay ints (float64 holds them exactly)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return type(values)(*(type(value)(total) for value, total in zip(values, tensor.tolist())))


def diverged(state: TrialState, loss: float) -> dict[str, Any]:
    """End the run at a non-finite loss: every worker reports it (the report is a barrier), without a checkpoint, and
    the summary says at which step. The sweep tells Tune the objectives' worst values and ends the run FAILED."""
    step = state.position.step + 1
    message = f"step {step}: the loss is {loss}; the run diverged and stops here, its weights as of step {step - 1}"
    log(state.rank, message)
    state.summary[DIVERGED] = step
    ray.train.report({"step": step, DIVERGED: step})
    return state.summary


def finish_step(state: TrialState, done: Step) -> None:
    """After the optimizer's step: the schedule, the method's hook, the gradients cleared, the position moved on."""
    # A step float16's scaler skipped moved no weight: the schedule waits for one that does, and AdaLoRA's importance
    # scores, which read the gradients, would take in its infinities.
    if not done.skipped:
        state.optimization.scheduler.step()
        state.step_hook(state.position.step + 1)
    state.optimization.optimizer.zero_grad(set_to_none=True)
    if "startup_s" not in state.summary:
        state.summary["startup_s"] = state.startup["startup_s"] = time.time() - state.started_at
    state.advance(done.tokens)


def record_step(state: TrialState, done: Step, elapsed: float) -> None:
    """What follows a step that took `elapsed` seconds: the adapter's snapshot, the evaluations due, and a report to
    Ray with the step's metrics, with a checkpoint where one is due. A step is reported on report_every, and whenever
    it evaluates or checkpoints."""
    cfg, step = state.cfg, state.position.step
    if state.snapshots is not None and (step % cfg.snapshot_every == 0 or step == state.total_steps):
        state.snapshots.record(step, state.model)
    metrics = step_metrics(state, done, elapsed)
    finished = state.evaluated_at_end = step == state.total_steps
    # the validation set at every evaluation; the test split only at the end
    evaluating = finished or bool(cfg.eval_every and step % cfg.eval_every == 0)
    if evaluating:
        metrics.update(run_evaluation(state, test=finished and cfg.evaluate_test))
    at_checkpoint = step == state.stop or bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
    if at_checkpoint or evaluating or step % cfg.report_every == 0:
        state.summary["history"].append(metrics)
        log(state.rank, format_metrics(metrics, state.total_steps))
        report_to_ray(state, metrics, checkpoint=at_checkpoint)
        state.startup.clear()


def step_metrics(state: TrialState, done: Step, elapsed: float) -> dict[str, Any]:
    step = state.position.step
    metrics = {
        "step": step, "epoch": step / state.steps_per_epoch, "loss": done.task_loss,
        "learning_rate": state.optimization.scheduler.get_last_lr()[0], "tokens_per_s": done.tokens / elapsed,
        "tokens_seen": state.position.tokens, "padding_fraction": 1 - done.tokens / done.slots, "step_time_s": elapsed,
        "peak_memory_mb": peak_memory_mb(state.device.type == "cuda"),
        # what the trial's reserved devices have cost so far: budgets in learning curves
        "device_seconds": (time.time() - state.started_at) * state.reserved_devices, **state.facts, **state.startup,
    }
    if done.aux_loss is not None:
        metrics["aux_loss"] = done.aux_loss
    return metrics


def run_evaluation(state: TrialState, test: bool) -> dict[str, float]:
    """At the state's step: the validation metrics (val/accuracy/*, val/loss) and, with `test`, the test split's
    (accuracy/*), in the trial's precision. Every evaluation lands in the summary; the test split's predictions are
    kept, with their step, for paired tests."""
    step, data = state.position.step, state.data
    results = score(state, data.val_sets, VAL_PREFIX).metrics if data.val_sets else {}
    # rows whose answers the cutoff removed have no loss to measure (inputs.load_data warned of it)
    if data.val_sets and state.rank == 0 and data.val_answers.trainable().any():
        with mixed.autocast(state.precision, state.device):
            results[f"{VAL_PREFIX}loss"] = answer_loss(
                state.model, data.tokenizer, data.val_answers, state.cfg.eval_batch_size
            )
    if test:
        scored = score(state, data.test_sets, "")
        results.update(scored.metrics)
        state.summary["predictions"].extend({"step": step, **vars(p)} for p in scored.predictions)
    if results:
        state.summary["evaluations"].append({"step": step, **results})
    return results


class Scored(NamedTuple):
    metrics: dict[str, float]
    predictions: list[Any]  # every benchmark's, in order; none on the ranks that do not evaluate


def score(state: TrialState, sets: list[tuple[str, list[dict]]], prefix: str) -> Scored:
    """Accuracy per benchmark and their average (under the text protocol also accuracy_norm), named with `prefix`,
    and the predictions they were measured on."""
    found = {name: answers(state, name, rows) for name, rows in sets}
    found = {name: predictions for name, predictions in found.items() if predictions is not None}
    return Scored(
        metrics=benchmark_metrics(found, prefix), predictions=[p for predictions in found.values() for p in predictions]
    )


def answers(state: TrialState, name: str, rows: list[dict]) -> Optional[list[Any]]:
    """One benchmark's predictions: rank 0's, or every worker's share gathered when sharded; None on the other
    ranks."""
    cfg = state.cfg
    run = functools.partial(
        evaluate, state.model, state.data.tokenizer, name, rows, cfg.eval_mode, cfg.max_new_tokens,
        cfg.eval_batch_size, protocol=cfg.protocol,
    )
    if cfg.eval_sharded and state.world > 1:
        with mixed.autocast(state.precision, state.device):
            mine = run(shard=(state.rank, state.world), progress=state.rank == 0)
        gathered: list[Any] = [None] * state.world
        dist.all_gather_object(gathered, mine)
        return sorted((p for part in gathered for p in part), key=lambda p: p.index)
    if state.rank != 0:
        return None
    with mixed.autocast(state.precision, state.device):
        return run(progress=True)


def report_to_ray(state: TrialState, metrics: dict[str, Any], checkpoint: bool) -> None:
    """Report to Ray Train: every worker calls it (it is a barrier); with a checkpoint, each adds its own part.

    The run's last checkpoint also keeps the evaluations' predictions and the run's summary (parameter counts,
    reported metrics, evaluations), and every checkpoint the adapter's snapshots so far, so they persist wherever the
    storage path is.
    """
    if not checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ckpt.save_rng(folder, state.rank)
        if state.rank == 0:
            ckpt.save_adapter(state.model, folder, state.cfg.model)
            (folder / TRIAL_CONFIG).write_text(state.cfg.to_json())
            ckpt.save_optimizer(state.optimization, folder)
            ckpt.save_position(state.position, folder)
            if state.position.step == state.total_steps:
                (folder / PREDICTIONS).write_text(json.dumps(state.summary["predictions"], indent=1))
                record = {k: v for k, v in state.summary.items() if k != "predictions"}
                (folder / SUMMARY).write_text(json.dumps(record, indent=1))
            if state.snapshots:
                state.snapshots.save(folder / SNAPSHOTS)
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_{state.position.step:06d}",
        )


def peak_memory_mb(on_gpu: bool) -> float:
    if on_gpu:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def format_metrics(metrics: dict[str, Any], total_steps: int) -> str:
    return (
        f"step {metrics['step']}/{total_steps} loss {metrics['loss']:.4f} lr {metrics['learning_rate']:.2e} "
        f"{metrics['tokens_per_s']:.0f} tok/s {metrics['step_time_s']:.2f} s/step {format_accuracies(metrics)}"
    ).rstrip()


def format_accuracies(metrics: dict[str, Any]) -> str:
    """'val/average 0.460 average 0.455': the validation set's and the test split's accuracies."""
    shown = (f"{VAL_PREFIX}accuracy/", "accuracy/")
    return " ".join(f"{k.replace('accuracy/', '')} {v:.3f}" for k, v in metrics.items() if k.startswith(shown))


def log(rank: int, message: str) -> None:
    # Ray Train routes worker logging to the driver's console; a bare print there can come out twice.
    if rank == 0:
        logger.info(message)
