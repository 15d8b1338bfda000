"""Two trials at once with one thread each against one trial with both threads, on a 2-core machine: the training
steps each arrangement completes per second, side by side in one run (the arrangements alternate, twice each).

    python bench/trial_threads.py              # ~5 min on 2 CPU cores; docs/PERFORMANCE.md holds its output
    python bench/trial_threads.py --steps 6    # shorter

A study's trials are independent, so a sweep may run them as one 2-CPU trial at a time (cpus_per_worker=2) or as two
1-CPU trials at once (cpus_per_worker=1). The steps are the default study's (SmolLM2-135M, DenseLoRA r = 32, batches
of 8 short ARC-Easy rows), in float32 or bf16 as the machine computes them; each process loads its model before a
barrier and times its steps after it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time

from throughput import DEFAULT, machine, table


def steps(threads: int, count: int, barrier, results) -> None:
    """In a process of its own: `count` training steps of the default study on `threads` threads, timed from the
    barrier on."""
    import torch

    torch.set_num_threads(threads)
    from densetune import precision as mixed
    from densetune.batching import epoch_batches, token_counts
    from densetune.data import collate
    from densetune.inputs import load_data, training_rows
    from densetune.models import load_tokenizer
    from densetune.train import build_model, train_step

    device = torch.device("cpu")
    precision = mixed.resolve(DEFAULT.dtype, device)
    data = load_data(DEFAULT)
    tokenizer = load_tokenizer(DEFAULT.model)
    examples = training_rows(DEFAULT, data)
    lengths = data.train.lengths[examples]
    schedule = epoch_batches(lengths, DEFAULT.batch_size, DEFAULT.micro_batch_size, 0, DEFAULT.seed, 0, 1)
    model, optimizer, _ = build_model(DEFAULT, precision, device, total_steps=count)
    barrier.wait()
    started = time.perf_counter()
    for micro_batches in schedule[:count]:
        inputs = [collate(data.train, examples[b], tokenizer.pad_token_id) for b in micro_batches]
        train_step(model, inputs, token_counts(lengths, micro_batches), 1, device, precision, DEFAULT, optimizer)
        optimizer.zero_grad(set_to_none=True)
    results.put((started, time.perf_counter()))


def steps_per_second(processes: int, threads: int, count: int) -> float:
    """`processes` processes of `threads` threads, each taking `count` steps: steps per second of them all."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=steps, args=(threads, count, barrier, results)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    spans = [results.get(timeout=1800) for _ in workers]
    for worker in workers:
        worker.join()
    return processes * count / (max(end for _, end in spans) - min(start for start, _ in spans))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16, help="steps each trial takes, per measurement")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"# bench/trial_threads.py, {time.strftime('%Y-%m-%d')}\n\n{machine()}\n", flush=True)
    arrangements = {f"1 trial x {cores} threads": (1, cores), f"{cores} trials x 1 thread": (cores, 1)}
    rates: dict[str, list[float]] = {name: [] for name in arrangements}
    for _ in range(args.repeats):
        for name, (processes, threads) in arrangements.items():
            rates[name].append(steps_per_second(processes, threads, args.steps))
    one = statistics.median(rates[next(iter(arrangements))])
    print(
        f"Training steps per second of the machine: {DEFAULT.model}, r={DEFAULT.rank}, the default study's first "
        f"{args.steps} steps in each trial, medians of {args.repeats} alternating runs\n"
    )
    print(table(
        ["arrangement", "steps/s (each run)", "median", "ratio"],
        [[name, ", ".join(f"{r:.3f}" for r in rates[name]), f"{statistics.median(rates[name]):.3f}",
          f"{statistics.median(rates[name]) / one:.2f}x"] for name in arrangements],
    ))


if __name__ == "__main__":
    main()
