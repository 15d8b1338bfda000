"""The training step with the vocabulary's logits at every position (transformers' own loss) against the trainer's,
which computes them only at the positions that predict a target token (densetune.trial.loop.target_loss_sum), side by side
in one run: the same batches of the default study, the two ways interleaved step by step.

    python bench/target_logits.py              # ~4 min on 2 CPU cores; docs/PERFORMANCE.md holds its output
    python bench/target_logits.py --steps 4    # shorter

It prints a Markdown table: median seconds per step each way, the ratio, the size of the logits tensor each way, and
the largest difference between the two losses over the steps (the same sum, in another order).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time

import torch

from densetune.trial import precision as mixed
from densetune.data.batching import epoch_batches
from densetune.data.tokens import IGNORE_INDEX, collate
from densetune.trial.inputs import load_data, training_rows
from densetune.trial.models import load_tokenizer
from densetune.trial.loop import build_state, target_loss_sum

from throughput import DEFAULT, machine, table

CPU = torch.device("cpu")


def full_logits_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], targets: int) -> torch.Tensor:
    """The loss as transformers computes it: logits at every position, then the cross-entropy over the targets."""
    return model(**batch, num_items_in_batch=targets).loss


def kept_logits_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], targets: int) -> torch.Tensor:
    return target_loss_sum(model, batch, CPU) / targets


WAYS = {"every position": full_logits_loss, "target positions": kept_logits_loss}


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[dict], loss_fn, dtype: str) -> tuple[float, float]:
    """One optimizer step over the micro-batches: (seconds, the loss)."""
    targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    started, total = time.perf_counter(), 0.0
    for batch in batches:
        with mixed.autocast(dtype, CPU):
            loss = loss_fn(model, batch, targets)
        loss.backward()
        total += loss.item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started, total


def compare(method: str, dtype: str, steps: int) -> list:
    config = dataclasses.replace(DEFAULT, method=method)
    data = load_data(config)
    tokenizer = load_tokenizer(config.model)
    examples = training_rows(config, data)
    lengths = data.train.lengths[examples]
    schedule = epoch_batches(lengths, config.batch_size, config.micro_batch_size, 0, config.seed, 0, 1)
    state = build_state(config, dtype, CPU, total_steps=steps + 1)
    # the same starting weights and optimizer each way, so that both see the same losses
    models = {way: copy.deepcopy((state.model, state.optimization.optimizer)) for way in WAYS}
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    losses: dict[str, list[float]] = {way: [] for way in WAYS}
    slots = kept = 0
    for i, micro_batches in enumerate(schedule[: steps + 1]):  # the first step of each warms up and is not timed
        batches = [collate(data.train, examples[b], tokenizer.pad_token_id) for b in micro_batches]
        slots += sum(b["labels"].numel() for b in batches)
        kept += sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        for way, loss_fn in WAYS.items():
            m, opt = models[way]
            m.train()
            seconds, loss = step(m, opt, batches, loss_fn, dtype)
            losses[way].append(loss)
            if i:
                times[way].append(seconds)
    full, trimmed = (statistics.median(times[w]) for w in WAYS)
    difference = max(abs(a - b) for a, b in zip(*losses.values()))
    return [method, dtype, f"{full:.3f}", f"{trimmed:.3f}", f"{full / trimmed:.2f}x",
            f"{100 * kept / slots:.1f} %", f"{difference:.1e}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps each way, per method and precision")
    args = parser.parse_args()
    dtypes = ["float32", "bfloat16"] if mixed.native_bf16(CPU) else ["float32"]
    print(f"# bench/target_logits.py, {time.strftime('%Y-%m-%d')}\n\n{machine()}\n", flush=True)
    rows = [compare(method, dtype, args.steps) for method in ("denselora", "lora") for dtype in dtypes]
    print(
        f"Training step on cpu: {DEFAULT.model}, r={DEFAULT.rank} on {DEFAULT.targets}, batches of {DEFAULT.batch_size} "
        f"({DEFAULT.micro_batch_size} per micro-batch) of the default study's rows, loss on the answers only; medians "
        f"of {args.steps} interleaved steps\n"
    )
    print(table(
        ["method", "precision", "logits everywhere s/step", "at targets s/step", "speed-up",
         "positions kept (logits tensor's share)", "largest loss difference"], rows,
    ))


if __name__ == "__main__":
    main()
