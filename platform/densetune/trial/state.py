"""What one worker's trial holds while it trains: the state every part of the training recipe (loop.py) reads and
changes, in one object, as torchtune's recipes keep theirs on `self`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..config import TrialConfig
from ..data.tokens import TokenizedRows
from . import checkpoint as ckpt
from .increments import SnapshotRecorder


def planned_steps(cfg: TrialConfig, examples: int) -> int:
    """The optimizer steps of a trial that trains on `examples` rows: its schedule's length."""
    return cfg.max_steps or cfg.epochs * (examples // cfg.batch_size)


@dataclass
class WorkerData:
    """The trial's data as a worker reads it from Ray's object store."""

    tokenizer: Any
    rows: TokenizedRows  # every training row the sweep tokenized
    examples: np.ndarray  # which of them this trial trains on
    test_sets: list[tuple[str, list[dict]]]  # (benchmark, the test questions the trial answers)
    val_sets: list[tuple[str, list[dict]]]  # (training data set, its validation questions)
    val_answers: TokenizedRows  # the validation rows tokenized for val/loss
    lengths: np.ndarray = field(init=False)  # the examples' token counts, which every step's batching reads

    def __post_init__(self) -> None:
        self.lengths = self.rows.lengths[self.examples]


@dataclass
class TrialState:
    """One worker's trial. build_state makes the part a training step needs (a dry run, a benchmark or a test steps
    it as it is, rank 0 of one worker); the training loop adds the rest: where this worker stands among the others,
    the data, the position, the snapshots and the summary it builds, and its clock."""

    cfg: TrialConfig
    device: torch.device
    precision: str  # as resolved for this worker's device: float32, bfloat16 or float16
    model: Any  # the PEFT model: what checkpoints save and evaluations run
    optimization: ckpt.Optimization
    step_hook: Callable[[int], None]  # the method's own work after each optimizer step (AdaLoRA's rank budget)
    total_steps: int  # the run's, which the schedule spans; a run may stop before (stop_after_step)
    rank: int = 0
    world: int = 1
    # What the steps run: DDP's wrapper around `model` on several workers (prepare_model), else `model` itself.
    trained: Optional[torch.nn.Module] = None
    data: Optional[WorkerData] = None
    position: ckpt.Position = field(default_factory=lambda: ckpt.Position(step=0, epoch=0, step_in_epoch=0))
    resumed_from: Optional[int] = None  # the step of the checkpoint this run resumed from; None: it started afresh
    # The adapter's r x r matrices for the increment heat maps, on rank 0 (DDP keeps the workers' equal); None when
    # not recorded.
    snapshots: Optional[SnapshotRecorder] = None
    # Constant for the run (node_id: where rank 0 runs), reported with every metric so that whoever tracks the run sees
    # them from the start.
    facts: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)  # what the loop returns and the final checkpoint keeps
    started_at: float = 0.0  # when run_trial started (time.time()): startup_s and device_seconds count from there
    startup: dict[str, float] = field(default_factory=dict)  # startup_s until a report has carried it
    evaluated_at_end: bool = False  # whether this run's last step was the run's last, with its final evaluation

    def __post_init__(self) -> None:
        if self.trained is None:
            self.trained = self.model

    @property
    def stop(self) -> int:
        """The step this run ends at: the last, or stop_after_step."""
        return min(self.total_steps, self.cfg.stop_after_step or self.total_steps)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.data.examples) // self.cfg.batch_size

    @property
    def reserved_devices(self) -> float:
        """The devices the trial holds, whose seconds are its cost: GPUs on GPUs, else CPU cores."""
        cfg = self.cfg
        return max(1, cfg.num_workers) * (cfg.gpus_per_worker if self.device.type == "cuda" else cfg.cpus_per_worker)

    def advance(self, tokens: int) -> None:
        """One optimizer step further, through `tokens` more real tokens."""
        position = self.position
        self.position = dataclasses.replace(
            position, step=position.step + 1, step_in_epoch=position.step_in_epoch + 1, tokens=position.tokens + tokens
        )

    def next_epoch(self) -> None:
        self.position = dataclasses.replace(self.position, epoch=self.position.epoch + 1, step_in_epoch=0)
