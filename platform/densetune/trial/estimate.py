"""What a trial will take before it runs: its model with its adapter built in this process, two of its training steps
and one batch of each set it evaluates timed on this machine, and those times scaled to the trial's steps and
questions. Each set is timed on its own: a question's cost differs tenfold between benchmarks (a BoolQ question is
scored on one token, a PIQA question runs its context once per option).

An estimate, not a promise: it assumes every step costs what the measured ones did, data-parallel workers that scale
perfectly, and Ray Train's start-up as measured on the project's 2-core machine (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from transformers.utils import logging as hf_logging

from . import precision as mixed
from ..data.batching import epoch_batches, token_counts
from ..config import TrialConfig
from ..data.tokens import collate
from .evaluate import evaluate
from .inputs import TrialData, eval_set, training_rows
from .models import load_tokenizer
from .loop import build_state, train_step
from .state import planned_steps

# Ray Train's own start-up for each trial, fit() to a no-op training function: 4.7 s (docs/PERFORMANCE.md, median of 3).
RAY_TRAIN_START_S = 4.7


@dataclass
class Measured:
    device: str  # where it was measured: cpu, cuda
    precision: str
    load_s: float  # loading the model and applying the adapter
    step_s: float  # one optimizer step of the trial's global batch, on one worker
    question_s: dict[str, float]  # one question of each set the trial evaluates, by set: test/<name>, val/<name>


def measure(config: TrialConfig, data: TrialData, steps: int = 2) -> Measured:
    """Time `config`'s model on this machine: loading it, `steps` training steps after one that warms up, one batch of
    questions of each set it evaluates. Nothing is saved; the weights it trains are thrown away."""
    # transformers draws a bar for loading the weights: a dry run prints its estimate only
    hf_logging.disable_progress_bar()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = mixed.resolve(config.dtype, device)
    started = time.perf_counter()
    state = build_state(config, precision, device, total_steps=steps + 1)
    load_s = time.perf_counter() - started
    tokenizer = load_tokenizer(config.model)
    examples = training_rows(config, data)
    lengths = data.train.lengths[examples]
    batches = epoch_batches(lengths, config.batch_size, config.micro_batch_size, 0, config.seed, 0, 1)
    times = []
    for micro_batches in batches[: steps + 1]:
        started = time.perf_counter()
        inputs = [collate(data.train, examples[batch], tokenizer.pad_token_id) for batch in micro_batches]
        train_step(state, inputs, token_counts(lengths, micro_batches))
        state.optimization.optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    sample = dataclasses.replace(config, eval_limit=config.eval_batch_size)
    question_s = {}
    for key, (name, rows) in evaluated_sets(data).items():
        name, rows = eval_set(sample, name, rows)
        started = time.perf_counter()
        with mixed.autocast(precision, device):
            evaluate(
                state.model, tokenizer, name, rows, config.eval_mode, config.max_new_tokens, config.eval_batch_size,
                protocol=config.protocol,
            )
        question_s[key] = (time.perf_counter() - started) / len(rows)
    measured = times[1:] or times
    return Measured(device.type, precision, load_s, sum(measured) / len(measured), question_s)


def total_steps(config: TrialConfig, data: TrialData) -> int:
    """The optimizer steps the trial will take, as the training loop counts them."""
    return planned_steps(config, len(training_rows(config, data)))


def evaluated_sets(data: TrialData) -> dict[str, tuple[str, list[dict]]]:
    """The sets a trial evaluates, by key (test/<name>, val/<name>): each benchmark's test split, each validation
    set."""
    return {
        **{f"test/{name}": (name, rows) for name, rows in data.eval_sets},
        **{f"val/{name}": (name, rows) for name, rows in data.val_sets},
    }


def questions(config: TrialConfig, data: TrialData) -> dict[str, int]:
    """The questions the trial answers in all, by set: a test split's at the end (and at step 0 with eval_at_start),
    a validation set's at step 0, every eval_every steps and at the end."""
    steps = total_steps(config, data)
    periodic = (steps - 1) // config.eval_every if config.eval_every else 0
    times = {"test": int(config.evaluate_test) * (1 + int(config.eval_at_start)), "val": 2 + periodic}
    return {
        key: times[key.split("/")[0]] * len(eval_set(config, name, rows)[1] if key.startswith("test/") else rows)
        for key, (name, rows) in evaluated_sets(data).items()
    }


def trial_seconds(config: TrialConfig, data: TrialData, measured: Measured) -> dict[str, float]:
    """The estimated seconds of one trial, by part: Ray's start, loading, training, evaluating."""
    steps = total_steps(config, data)
    return {
        "start": RAY_TRAIN_START_S, "load": measured.load_s,
        "train": steps * measured.step_s / max(1, config.num_workers),
        "evaluate": sum(count * measured.question_s[key] for key, count in questions(config, data).items()),
    }
