"""The training loop each Ray Train worker runs: one trial's fine-tuning, its checkpoints and its evaluation.

Read top to bottom: build the model, restore a checkpoint if Ray hands one over, then step through the data,
reporting every few steps and checkpointing every few more, and evaluate at the end. The data arrives tokenized,
through Ray's object store (`loop_config`: the trial's config, the tokenized rows and which of them this trial trains
on, the test split's questions, the validation set, and when the trial started). The validation set is evaluated at
step 0, every eval_every steps and at the end; the test split at the end (and at step 0 with eval_at_start).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import random
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

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
from .batching import epoch_batches, token_counts
from .config import DIVERGED, VAL_PREFIX, TrialConfig
from .data import IGNORE_INDEX, TokenizedRows, collate
from .evaluate import accuracy, answer_loss, evaluate, summed_token_loss
from .files import PREDICTIONS, SNAPSHOTS, SUMMARY
from .increments import SnapshotRecorder, load_snapshots
from .models import load_model, load_tokenizer
from .rendezvous import require_cuda

logger = logging.getLogger(__name__)


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    cfg = TrialConfig.from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    require_gpu(cfg, device)
    on_gpu = device.type == "cuda"

    tokenizer = load_tokenizer(cfg.model)
    rows: TokenizedRows = ray.get(loop_config["train"])
    examples: np.ndarray = loop_config["train_indices"]  # which rows this trial trains on
    lengths = rows.lengths[examples]
    eval_sets = ray.get(loop_config["eval_sets"])
    val_sets, val_answers = ray.get(loop_config["validation"])
    steps_per_epoch = len(examples) // cfg.batch_size
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    stop = min(total_steps, cfg.stop_after_step or total_steps)
    precision = mixed.resolve(cfg.dtype, device)

    model, optimizer, scheduler = build_model(cfg, precision, device, total_steps)
    optimization = ckpt.Optimization(optimizer, scheduler, mixed.grad_scaler(precision, device))
    after_step = densemod.step_hook(model)

    position = ckpt.Position(step=0, epoch=0, step_in_epoch=0)
    # Snapshots of the adapter's r x r matrices for the increment heat maps, on rank 0 (DDP keeps the workers' equal);
    # every checkpoint keeps those so far, so a resumed run still compares with step 0.
    snapshots = SnapshotRecorder() if cfg.snapshot_every and rank == 0 else None
    restored = ray.train.get_checkpoint()
    if restored:
        with restored.as_directory() as folder:
            ckpt.load_adapter(model, Path(folder))
            ckpt.load_optimizer(optimization, Path(folder))
            position = ckpt.load_position(Path(folder))
            ckpt.load_rng(Path(folder), rank)
            if snapshots is not None and (Path(folder) / SNAPSHOTS).exists():
                snapshots = SnapshotRecorder(load_snapshots(Path(folder) / SNAPSHOTS))
    else:
        # Dropout masks should differ between workers.
        torch.manual_seed(cfg.seed + rank)
        random.seed(cfg.seed + rank)
    ddp_model = ray.train.torch.prepare_model(model)

    report = densemod.parameter_report(model)
    # Constant for the run (node_id: where rank 0 runs), reported with every metric so that whoever tracks the run
    # sees them from the start.
    facts = {
        "trainable_params": report.trainable, "total_params": report.total, "trainable_pct": report.trainable_pct,
        "total_steps": total_steps, "precision": precision, "node_id": ray.get_runtime_context().get_node_id(),
    }
    summary: dict[str, Any] = {
        **facts, "resumed_from_step": position.step if restored else None, "history": [], "evaluations": [],
        "predictions": [],
    }
    log(rank, f"{report} | steps {position.step}->{stop} of {total_steps} | {world} worker(s) on {device} | {precision}")
    evaluation = Evaluation(
        model, tokenizer, cfg, rank, world, functools.partial(mixed.autocast, precision, device), eval_sets, val_sets,
        val_answers, summary,
    )
    startup: dict[str, float] = {}  # from run_trial to the first optimizer step, reported once
    # What the trial's reserved devices have cost so far, reported with every metric: budgets in learning curves.
    devices = max(1, cfg.num_workers) * (cfg.gpus_per_worker if on_gpu else cfg.cpus_per_worker)

    if snapshots is not None and not restored:
        snapshots.record(0, model)
    test_at_start = cfg.eval_at_start and cfg.evaluate_test
    if (val_sets or test_at_start) and not restored:
        metrics = {"step": 0, **evaluation.run(0, test=test_at_start), **facts}
        log(rank, f"before training: {format_accuracies(metrics)}")
        ray.train.report(metrics)
    evaluated_at_end = False
    while position.step < stop:
        batches = epoch_batches(
            lengths, cfg.batch_size, cfg.micro_batch_size, position.epoch, cfg.seed, rank, world, cfg.group_by_length
        )
        for micro_batches in batches[position.step_in_epoch:]:
            started = time.perf_counter()
            inputs = [collate(rows, examples[batch], tokenizer.pad_token_id) for batch in micro_batches]
            done = train_step(
                ddp_model, inputs, token_counts(lengths, micro_batches), world, device, precision, cfg, optimizer,
                optimization.scaler,
            )
            if not math.isfinite(done.loss):
                return diverged(summary, position.step + 1, done.loss, rank)
            # A step float16's scaler skipped moved no weight: the schedule waits for one that does, and AdaLoRA's
            # importance scores, which read the gradients, would take in its infinities.
            if not done.skipped:
                scheduler.step()
                after_step(position.step + 1)
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - started
            if "startup_s" not in summary:
                summary["startup_s"] = startup["startup_s"] = time.time() - loop_config["started_at"]
            position = dataclasses.replace(
                position, step=position.step + 1, step_in_epoch=position.step_in_epoch + 1,
                tokens=position.tokens + done.tokens,
            )

            step = position.step
            if snapshots is not None and (step % cfg.snapshot_every == 0 or step == total_steps):
                snapshots.record(step, model)
            metrics = {
                "step": step, "epoch": step / steps_per_epoch, "loss": done.task_loss,
                "learning_rate": scheduler.get_last_lr()[0], "tokens_per_s": done.tokens / elapsed,
                "tokens_seen": position.tokens, "padding_fraction": 1 - done.tokens / done.slots, "step_time_s": elapsed,
                "peak_memory_mb": peak_memory_mb(on_gpu),
                "device_seconds": (time.time() - loop_config["started_at"]) * devices, **facts, **startup,
            }
            if done.aux_loss is not None:
                metrics["aux_loss"] = done.aux_loss
            finished = evaluated_at_end = step == total_steps
            # the validation set at every evaluation; the test split only at the end
            evaluating = finished or bool(cfg.eval_every and step % cfg.eval_every == 0)
            if evaluating:
                metrics.update(evaluation.run(step, test=finished and cfg.evaluate_test))
            at_checkpoint = step == stop or bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
            if at_checkpoint or evaluating or step % cfg.report_every == 0:
                summary["history"].append(metrics)
                log(rank, format_metrics(metrics, total_steps))
                report_to_ray(
                    metrics, model, optimization, position, rank, at_checkpoint, summary if finished else None,
                    snapshots,
                )
                startup.clear()
            if step == stop:
                break
        else:
            position = dataclasses.replace(position, epoch=position.epoch + 1, step_in_epoch=0)
    if position.step == total_steps and not evaluated_at_end:  # resumed a run that had already finished
        metrics = {"step": position.step, **evaluation.run(position.step, test=cfg.evaluate_test)}
        report_to_ray(metrics, model, optimization, position, rank, True, summary, snapshots)
    return summary


def require_gpu(cfg: TrialConfig, device: torch.device) -> None:
    """A trial that asks for GPUs fails at once on a worker without one, rather than train for hours on its CPU (a
    worker group checks this before its rendezvous; local mode, here)."""
    if cfg.use_gpu and device.type != "cuda":
        require_cuda()


def diverged(summary: dict[str, Any], step: int, loss: float, rank: int) -> dict[str, Any]:
    """End the run at a non-finite loss: every worker reports it (the report is a barrier), without a checkpoint, and
    the summary says at which step. The sweep tells Tune the objectives' worst values and ends the run FAILED."""
    log(rank, f"step {step}: the loss is {loss}; the run diverged and stops here, its weights as of step {step - 1}")
    summary[DIVERGED] = step
    ray.train.report({"step": step, DIVERGED: step})
    return summary


def build_model(
    cfg: TrialConfig, precision: str, device: torch.device, total_steps: int
) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    """The adapted model on `device`, its AdamW optimizer over the adapter's weights, and the linear schedule."""
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
    return model, optimizer, get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, total_steps)


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


def train_step(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], counts: tuple[int, int], world: int,
    device: torch.device, precision: str, cfg: TrialConfig, optimizer: torch.optim.Optimizer,
    scaler: Optional[torch.amp.GradScaler] = None,
) -> Step:
    """One optimizer step over this worker's micro-batches, whose (real tokens, token slots) are `counts`.

    The loss is summed over the global batch's target tokens and divided by their count, so it does not depend on how
    the batch is split between workers and accumulation steps. The optimizer does not step when that loss is not
    finite. For a method that adds a regulariser to the model's loss (AdaLoRA), the task's own loss is computed from
    the logits as well, so that the two can be logged apart. With float16's `scaler` the backward pass runs on the
    scaled loss, and the step is skipped when the scaled gradients overflow (see optimizer_step).
    """
    model.train()
    targets, tokens, slots = all_reduce_sum(  # the global batch's counts, in one collective
        device, sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches), *counts
    )
    auxiliary = cfg.method in densemod.AUXILIARY_LOSS_METHODS
    loss_sum = task_sum = 0.0
    for i, batch in enumerate(batches):
        # Gradients are all-reduced on the last micro-batch only.
        syncing = i == len(batches) - 1 or not hasattr(model, "no_sync")
        with (contextlib.nullcontext() if syncing else model.no_sync()), mixed.autocast(precision, device):
            if auxiliary:  # the method adds its regulariser to the loss the model computes from the labels
                outputs = model(**{k: v.to(device) for k, v in batch.items()}, num_items_in_batch=targets)
                loss = outputs.loss
                task_sum += summed_token_loss(outputs.logits, batch["labels"]) / targets
            else:
                loss = target_loss_sum(model, batch, device) / targets
            # DDP averages gradients over workers; the loss is already a share of the global sum.
            (loss * world if scaler is None else scaler.scale(loss * world)).backward()
        loss_sum += loss.item()
    loss, task = all_reduce_sum(device, loss_sum, task_sum)
    # A non-finite loss leaves the weights as they were: the caller ends the run, and no NaN reaches an adapter.
    skipped = math.isfinite(loss) and optimizer_step(
        [p for p in model.parameters() if p.requires_grad], optimizer, scaler, cfg.max_grad_norm
    )
    return Step(loss, tokens, slots, loss - task if auxiliary else None, skipped)


def optimizer_step(
    parameters: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scaler: Optional[torch.amp.GradScaler],
    max_grad_norm: float,
) -> bool:
    """Clip the gradients to `max_grad_norm` and step; whether the step was skipped.

    With a scaler the gradients are unscaled first, so that the clipping (and AdaLoRA after the step) sees the true
    ones. The scaler skips the step when they hold an inf or NaN, which says only that its scale was too large, not
    that the run diverged: it lowers the scale, exactly then, which is how the skip is told (GradScaler does not say).
    """
    if scaler is None:
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        optimizer.step()
        return False
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
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


def all_reduce_sum(device: torch.device, *values: float) -> tuple:
    """Each value summed over the workers; ints stay ints (float64 holds them exactly)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tuple(type(value)(total) for value, total in zip(values, tensor.tolist()))


@dataclass
class Evaluation:
    """What a trial evaluates, and how: the test split's questions (`test_sets`), the validation set's (`val_sets`)
    and its answers tokenized for the loss (`val_answers`), on rank 0 or on every worker's share when sharded, in the
    trial's precision (`autocast`). Every evaluation lands in `summary`; the test split's predictions are kept, with
    their step, for paired tests."""

    model: Any
    tokenizer: Any
    cfg: TrialConfig
    rank: int
    world: int
    autocast: Callable[[], contextlib.AbstractContextManager]
    test_sets: list[tuple[str, list[dict]]]
    val_sets: list[tuple[str, list[dict]]]
    val_answers: TokenizedRows
    summary: dict[str, Any]

    def run(self, step: int, test: bool) -> dict[str, float]:
        """The validation metrics (val/accuracy/*, val/loss) and, with `test`, the test split's (accuracy/*)."""
        results = self.accuracies(self.val_sets, VAL_PREFIX) if self.val_sets else {}
        # rows whose answers the cutoff removed have no loss to measure (inputs.load_data warned of it)
        if self.val_sets and self.rank == 0 and self.val_answers.trainable().any():
            with self.autocast():
                results[f"{VAL_PREFIX}loss"] = answer_loss(
                    self.model, self.tokenizer, self.val_answers, self.cfg.eval_batch_size
                )
        if test:
            predictions: list[Any] = []
            results.update(self.accuracies(self.test_sets, "", predictions))
            self.summary["predictions"].extend({"step": step, **vars(p)} for p in predictions)
        if results:
            self.summary["evaluations"].append({"step": step, **results})
        return results

    def accuracies(
        self, sets: list[tuple[str, list[dict]]], prefix: str, kept: Optional[list[Any]] = None
    ) -> dict[str, float]:
        """Accuracy per benchmark and their average (under the text protocol also accuracy_norm), named with
        `prefix`; the predictions are added to `kept` when given."""
        results: dict[str, float] = {}
        for name, rows in sets:
            found = self.predictions(name, rows)
            if found is None:
                continue
            results[f"{prefix}accuracy/{name}"] = accuracy(found)
            if self.cfg.protocol == "text":
                results[f"{prefix}accuracy_norm/{name}"] = accuracy(found, norm=True)
            if kept is not None:
                kept.extend(found)
        for kind in ("accuracy", "accuracy_norm"):
            values = [v for k, v in results.items() if k.startswith(f"{prefix}{kind}/")]
            if values:
                results[f"{prefix}{kind}/average"] = sum(values) / len(values)
        return results

    def predictions(self, name: str, rows: list[dict]) -> Optional[list[Any]]:
        """This benchmark's predictions: rank 0's, or every worker's share gathered when sharded; None on the other
        ranks."""
        cfg = self.cfg
        run = functools.partial(
            evaluate, self.model, self.tokenizer, name, rows, cfg.eval_mode, cfg.max_new_tokens, cfg.eval_batch_size,
            protocol=cfg.protocol,
        )
        if cfg.eval_sharded and self.world > 1:
            with self.autocast():
                mine = run(shard=(self.rank, self.world), progress=self.rank == 0)
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, mine)
            return sorted((p for part in gathered for p in part), key=lambda p: p.index)
        if self.rank != 0:
            return None
        with self.autocast():
            return run(progress=True)


def report_to_ray(
    metrics: dict[str, Any], model: Any, optimization: ckpt.Optimization, position: ckpt.Position, rank: int,
    checkpoint: bool, final: Optional[dict[str, Any]] = None, snapshots: Optional[SnapshotRecorder] = None,
) -> None:
    """Report to Ray Train: every worker calls it (it is a barrier); with a checkpoint, each adds its own part.

    The final checkpoint also keeps the evaluations' predictions and the run's summary (parameter counts, reported
    metrics, evaluations), and every checkpoint the adapter's snapshots so far, so they persist wherever the storage
    path is.
    """
    if not checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ckpt.save_rng(folder, rank)
        if rank == 0:
            ckpt.save_adapter(model, folder)
            ckpt.save_optimizer(optimization, folder)
            ckpt.save_position(position, folder)
            if final is not None:
                (folder / PREDICTIONS).write_text(json.dumps(final["predictions"], indent=1))
                record = {k: v for k, v in final.items() if k != "predictions"}
                (folder / SUMMARY).write_text(json.dumps(record, indent=1))
            if snapshots:
                snapshots.save(folder / SNAPSHOTS)
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_{position.step:06d}",
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
