"""What an adapter costs to train and to run, DenseLoRA against LoRA, measured side by side in one run: the training
step (the trainer's own: forward, backward, clipping, AdamW) in float32 and bfloat16 autocast, the training memory it
adds, and the forward pass alone against LoRA unmerged and merged into the weights.

    python bench/adapter_cost.py                       # SmolLM2-135M, r = 8, 32, 128: ~12 min on 2 CPU cores
    python bench/adapter_cost.py --ranks 32 --steps 3  # shorter

Step times are medians of steps taken in turn (LoRA, DenseLoRA, LoRA, ...), so a machine that slows down during the
run slows both alike. Training memory is the peak resident memory of a process that loads the model and takes a few
steps, less what it held once the model was loaded (on a GPU: the peak allocated by torch), one process per cell.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import NamedTuple

import torch

from densetune.trial import precision as mixed
from densetune.config import TrialConfig
from densetune.data.batching import TokenCounts
from densetune.trial.loop import build_state, train_step
from densetune.trial.state import TrialState
from throughput import machine, table

METHODS = ("lora", "denselora")
# The setting: a batch of 8 sequences of 128 tokens, the paper's targets.
BATCH, TOKENS = 8, 128


class Cell(NamedTuple):
    """One measurement's setting."""

    model: str
    rank: int
    precision: str
    dropout: float


def config(cell: Cell, method: str) -> TrialConfig:
    return TrialConfig(
        model=cell.model, method=method, rank=cell.rank, targets="q,k,v,up,down", dropout=cell.dropout,
        warmup_steps=0,
    )


def batch(vocab_size: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab_size, (BATCH, TOKENS), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step(state: TrialState, inputs: dict[str, torch.Tensor]) -> float:
    synchronize()
    started = time.perf_counter()
    train_step(state, [inputs], TokenCounts(tokens=BATCH * TOKENS, slots=BATCH * TOKENS))
    state.optimization.optimizer.zero_grad(set_to_none=True)
    synchronize()
    return time.perf_counter() - started


def training_steps(cell: Cell, steps: int) -> dict[str, float]:
    """Median seconds per training step of each method, the methods taking turns."""
    built = {m: build_state(config(cell, m), cell.precision, device(), total_steps=100) for m in METHODS}
    inputs = batch(built["lora"].model.config.vocab_size)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for index in range(steps + 1):  # the first step of each warms up and is not counted
        for method, state in built.items():
            elapsed = step(state, inputs)
            if index:
                times[method].append(elapsed)
    return {method: statistics.median(values) for method, values in times.items()}


def forward_times(cell: Cell, steps: int) -> dict[str, float]:
    """Median seconds per forward pass (eval mode, no gradients): LoRA unmerged, LoRA merged, DenseLoRA."""
    built = {m: build_state(config(cell, m), cell.precision, device(), total_steps=100).model for m in METHODS}
    built["lora merged"] = build_state(config(cell, "lora"), cell.precision, device(), 100).model.merge_and_unload()
    inputs = {k: v.to(device()) for k, v in batch(built["lora"].config.vocab_size).items() if k != "labels"}
    times: dict[str, list[float]] = {name: [] for name in built}
    with torch.no_grad():
        for index in range(steps + 1):
            for name, model in built.items():
                model.eval()
                synchronize()
                started = time.perf_counter()
                with mixed.autocast(cell.precision, device()):
                    model(**inputs)
                synchronize()
                if index:
                    times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def memory_added(cell: Cell, method: str) -> float:
    """GiB of training memory one method adds, from a process of its own (resident memory peaks are per process)."""
    args = [sys.executable, __file__, "--memory-of", json.dumps([*cell, method])]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def measure_memory(cell: Cell, method: str) -> float:
    state = build_state(config(cell, method), cell.precision, device(), total_steps=100)
    inputs = batch(state.model.config.vocab_size)
    if device().type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        loaded = torch.cuda.memory_allocated()
    else:
        # Loading the model peaks above what it then holds: start the peak afresh (Linux: clear_refs 5).
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        loaded = status_bytes("VmRSS")
    for _ in range(3):
        step(state, inputs)
    peak = torch.cuda.max_memory_allocated() if device().type == "cuda" else status_bytes("VmHWM")
    return (peak - loaded) / 2**30


def status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: resident now, VmHWM: its peak)."""
    for line in open("/proc/self/status"):
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def precisions() -> list[str]:
    return ["float32", "bfloat16"] if mixed.native_bf16(device()) else ["float32"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ranks", default="8,32,128", help="comma-separated (default: %(default)s)")
    parser.add_argument(
        "--dropouts", default="0.05,0", help="comma-separated dropout probabilities, both methods alike; the forward "
        "pass is measured at the first only, since evaluation does not drop (default: %(default)s)",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method and cell (default: %(default)s)")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # one cell's memory, in a process of its own
    args = parser.parse_args()
    if args.memory_of:
        *cell, method = json.loads(args.memory_of)
        print(measure_memory(Cell(*cell), method))
        return
    ranks = [int(r) for r in args.ranks.split(",")]
    dropouts = [float(p) for p in args.dropouts.split(",")]
    print(f"{machine()}\n")
    print(f"{args.model}, batch {BATCH} x {TOKENS} tokens, targets q,k,v,up,down\n")
    rows, forward_rows = [], []
    for dropout in dropouts:
        for rank in ranks:
            for precision in precisions():
                cell = Cell(args.model, rank, precision, dropout)
                steps = training_steps(cell, args.steps)
                memory = {m: memory_added(cell, m) for m in METHODS}
                rows.append([
                    dropout, rank, precision, f"{steps['lora']:.3f}", f"{steps['denselora']:.3f}",
                    f"{steps['denselora'] / steps['lora']:.2f}x", f"{memory['lora']:.2f}",
                    f"{memory['denselora']:.2f}", f"{100 * (memory['denselora'] / memory['lora'] - 1):+.0f} %",
                ])
                if dropout == dropouts[0]:
                    forward = forward_times(cell, args.steps)
                    forward_rows.append([
                        rank, precision, *(f"{forward[n]:.3f}" for n in ("lora", "lora merged", "denselora")),
                        f"{forward['denselora'] / forward['lora']:.2f}x",
                        f"{forward['denselora'] / forward['lora merged']:.2f}x",
                    ])
                print(f"done: dropout {dropout} r={rank} {precision}", file=sys.stderr, flush=True)
    print(f"Training step, medians of {args.steps} steps taken in turn; training memory added (GiB)\n")
    print(table(["dropout", "r", "precision", "LoRA s/step", "DenseLoRA s/step", "DenseLoRA / LoRA", "LoRA memory",
                 "DenseLoRA memory", "DenseLoRA memory vs LoRA"], rows))
    print(f"\nForward pass alone (eval, no gradients), medians of {args.steps} passes taken in turn\n")
    print(table(["r", "precision", "LoRA s", "LoRA merged s", "DenseLoRA s", "DenseLoRA / LoRA",
                 "DenseLoRA / merged LoRA"], forward_rows))


if __name__ == "__main__":
    main()
