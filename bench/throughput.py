"""Throughput of a trial, measured side by side in one run on this machine: the training step in float32 and in
bfloat16 autocast, the padding that length grouping removes, a trial through Ray against the same loop run in this
process, the start-up of a trial against Ray Train's own, and how fast the command lines answer --help.

    python bench/throughput.py                 # ~17 min on 2 CPU cores; docs/PERFORMANCE.md holds its output
    python bench/throughput.py --steps 20 --pairs 1   # shorter: fewer, shorter trials through Ray and in-process
    python bench/throughput.py --datasets synthetic   # the built-in task, where the ARC-Easy files are absent

It prints Markdown tables. Step times are medians of interleaved steps, so a machine that slows down during the run
slows both sides alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from densetune.data.batching import epoch_batches, token_counts
from densetune.config import TrialConfig
from densetune.data.tokens import TokenizedRows, collate
from densetune.experiment import LOCAL
from densetune.trial.inputs import load_data
from densetune.trial.models import load_tokenizer
from densetune.trial.loop import build_state, train_step
from densetune.cluster import RAY_ENV
from densetune.trial.run import run_trial

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "llm-adapters"
# The default study's trial (experiments/rank_sweep.py with no flags), at the rank the paper's tables centre on.
DEFAULT = TrialConfig(**LOCAL, rank=32)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    flags = set(open("/proc/cpuinfo").read().split()) if Path("/proc/cpuinfo").exists() else set()
    native = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (
        f"torch {torch.__version__}, {os.cpu_count()} CPUs ({torch.get_num_threads()} torch threads), "
        f"bf16 instructions: {', '.join(native) or 'none'}, GPU: {gpu}"
    )


def default_rows(datasets: list[str]) -> TokenizedRows:
    """Every training row of `datasets`, tokenized as the default study's trials tokenize them."""
    return load_data(dataclasses.replace(DEFAULT, datasets=datasets)).train


def step_times(trial: TrialConfig, steps: int) -> str:
    """The trainer's own step (collate, forward, backward, clip, AdamW) in float32 and bfloat16 autocast, interleaved."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = default_rows(trial.datasets)
    tokenizer = load_tokenizer(trial.model)
    batches = epoch_batches(rows.lengths, trial.batch_size, trial.micro_batch_size, 0, trial.seed, 0, 1)
    results = []
    for method in ("denselora", "lora"):
        config = dataclasses.replace(trial, method=method)
        states = {p: build_state(config, p, device, total_steps=100) for p in ("float32", "bfloat16")}
        times: dict[str, list[float]] = {p: [] for p in states}
        for step in range(steps + 1):  # the first step of each warms up and is not counted
            for precision, state in states.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                inputs = [collate(rows, batch, tokenizer.pad_token_id) for batch in batches[step]]
                train_step(state, inputs, token_counts(rows.lengths, batches[step]))
                state.optimization.optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if step:
                    times[precision].append(time.perf_counter() - started)
        fp32, bf16 = (statistics.median(times[p]) for p in ("float32", "bfloat16"))
        results.append([method, f"{fp32:.3f}", f"{bf16:.3f}", f"{fp32 / bf16:.2f}x"])
        del states
    title = (
        f"Training step on {device}: {trial.model}, r={trial.rank} on {trial.targets}, batches of "
        f"{trial.batch_size} ({trial.micro_batch_size} per micro-batch) of {', '.join(trial.datasets)}, medians of "
        f"{steps} interleaved steps"
    )
    return title + "\n\n" + table(["method", "float32 s/step", "bf16 autocast s/step", "speed-up"], results)


def padding() -> str:
    """The share of token slots that are padding over one epoch, shuffled as before and grouped by length."""
    sources = {"built-in task (default study)": ["synthetic"]}
    if SHARED.is_dir():
        sources["ARC-Easy + BoolQ"] = [str(SHARED / "ARC-Easy"), str(SHARED / "boolq")]
    results = []
    for name, datasets in sources.items():
        rows = default_rows(datasets)
        cells = []
        for grouped in (False, True):
            steps = epoch_batches(rows.lengths, DEFAULT.batch_size, DEFAULT.micro_batch_size, 0, DEFAULT.seed, 0, 1, grouped)
            tokens, slots = np.sum([token_counts(rows.lengths, step) for step in steps], axis=0)
            cells.append(f"{100 * (1 - tokens / slots):.1f} %")
        results.append([name, len(rows), f"{int(np.median(rows.lengths))} / {int(rows.lengths.max())}", *cells])
    title = f"Padding over one epoch ({DEFAULT.model} tokens, cutoff {DEFAULT.cutoff_len}, micro-batches of {DEFAULT.micro_batch_size})"
    return title + "\n\n" + table(["data", "rows", "median / max tokens", "shuffled", "grouped by length"], results)


def through_ray(trial: TrialConfig, steps: int, pairs: int, storage: str) -> str:
    """The default study's trial through Ray Train (one worker) and in this process (Ray Train's local mode), in the
    order Ray, here, here, Ray, ...: a machine that drifts slower or faster during the runs weighs on both alike."""
    config = dataclasses.replace(trial, max_steps=steps, eval_limit=20, storage_path=storage)
    runs: dict[int, list] = {1: [], 0: []}
    for workers in [w for pair in range(pairs) for w in ((1, 0) if pair % 2 == 0 else (0, 1))]:
        runs[workers].append(run_trial(dataclasses.replace(config, num_workers=workers, name=f"bench-{workers}-{time.time():.0f}")))
    rows = []
    for workers, label in ((1, "Ray Train, 1 worker"), (0, "this process (local mode)")):
        for result in runs[workers]:
            step_s = statistics.median(h["step_time_s"] for h in result.summary["history"])
            rows.append([label, f"{result.wall_time_s:.1f}", f"{step_s:.3f}", f"{result.summary['startup_s']:.1f}"])
    ray_s, here_s = (sum(r.wall_time_s for r in runs[w]) for w in (1, 0))
    title = (
        f"A {steps}-step trial of the default study ({trial.model} on {', '.join(trial.datasets)}, {trial.method} "
        f"r={trial.rank}, {runs[0][0].summary['precision']}, evaluation on 20 questions), {pairs} of each: through "
        f"Ray / in this process = {ray_s / here_s:.3f}x in wall time"
    )
    return title + "\n\n" + table(["run", "wall s", "median s/step", "run_trial to first step, s"], rows)


def noop(config: dict) -> float:
    return time.time() - config["started_at"]


def startup(repeats: int, storage: str) -> str:
    """From run_trial to the first optimizer step for the tiny model, against Ray Train's floor: the same distance for
    a training function that does nothing."""
    floor = []
    for i in range(repeats):
        trainer = TorchTrainer(
            noop, train_loop_config={"started_at": time.time()},
            scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(name=f"floor-{i}-{time.time():.0f}", storage_path=storage),
        )
        floor.append(trainer.fit().return_value)
    tiny = TrialConfig(
        model="tiny-llama", max_steps=1, batch_size=4, micro_batch_size=2, cutoff_len=512, eval_mode="loglik",
        eval_limit=4, storage_path=storage,
    )
    ours = [run_trial(dataclasses.replace(tiny, name=f"tiny-{i}-{time.time():.0f}")).summary["startup_s"] for i in range(repeats)]
    rows = [
        ["Ray Train's floor: fit() to a no-op training function", *(f"{t:.1f}" for t in floor), f"{statistics.median(floor):.1f}"],
        ["run_trial to the first optimizer step, tiny-llama", *(f"{t:.1f}" for t in ours), f"{statistics.median(ours):.1f}"],
    ]
    title = f"Start-up in a running Ray (seconds, {repeats} runs each, one after the other)"
    return title + "\n\n" + table(["", *(f"run {i + 1}" for i in range(repeats)), "median"], rows)


def help_times(repeats: int) -> str:
    commands = [[sys.executable, str(p), "--help"] for p in sorted((ROOT / "experiments").glob("*_*.py"))]
    commands.append([sys.executable, "-m", "densetune.trial", "--help"])
    rows = []
    for command in commands:
        best = min(timed(command) for _ in range(repeats))
        rows.append([" ".join(Path(part).name if i == 1 else part for i, part in enumerate(command[1:], 1)), f"{best:.2f}"])
    return f"--help, best of {repeats} (seconds)\n\n" + table(["command", "s"], rows)


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of the Ray-against-direct trials")
    parser.add_argument("--step-samples", type=int, default=6, help="interleaved steps per precision")
    parser.add_argument("--pairs", type=int, default=2, help="trials through Ray and in this process, each")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--storage-path", default="/tmp/densetune-bench")
    parser.add_argument(
        "--datasets", default=",".join(DEFAULT.datasets),
        help="the training data of the step times and the trials, comma-separated, as a trial names it: synthetic "
             "where the benchmark files are absent (default: %(default)s)",
    )
    args = parser.parse_args()
    trial = dataclasses.replace(DEFAULT, datasets=args.datasets.split(","))

    print(f"# bench/throughput.py, {time.strftime('%Y-%m-%d')}\n\n{machine()}\n", flush=True)
    print(help_times(args.repeats) + "\n", flush=True)
    print(padding() + "\n", flush=True)
    print(step_times(trial, args.step_samples) + "\n", flush=True)
    os.environ.update(RAY_ENV)
    started = time.perf_counter()
    ray.init(address="local", runtime_env={"env_vars": RAY_ENV}, log_to_driver=False)
    print(f"ray.init: {time.perf_counter() - started:.1f} s\n", flush=True)
    print(startup(args.repeats, args.storage_path) + "\n", flush=True)
    print(through_ray(trial, args.steps, args.pairs, args.storage_path), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
