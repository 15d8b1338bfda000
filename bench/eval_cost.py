"""The cost of log-likelihood evaluation, today's way and the packed one side by side in one run on this machine:
each option its own sequence, context included (the scorer before issue 23, copied here as the reference), against
one packed sequence per question (densetune.trial.evaluate: the context once, each option after it behind a 4D mask).

    python bench/eval_cost.py                  # ~6 min on 2 CPU cores; docs/PERFORMANCE.md holds its output
    python bench/eval_cost.py --questions 50   # shorter
    python bench/eval_cost.py --repeats 2      # each side run twice, interleaved; the faster run of each is kept
    python bench/eval_cost.py --threads 1      # on a machine shared with other work: 2 threads thrash there

Untuned smollm2-135m in float32 (this CPU has no native bfloat16), eval_batch_size 8 on both sides: 8 sequences per
batch today, 8 x BATCH_TOKENS tokens per batch packed. The questions are the ones a trial evaluates (the fixed subset
of eval_limit). Tokens: those the model runs, padding excluded (padded: included). The floor is the packed tokens'
share of today's: a speed-up of 1/floor if the cost were the tokens alone. It prints a Markdown table.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from densetune.data.answers import LOGLIK_PREFIX, choices
from densetune.data.loading import load_benchmark
from densetune.data.prompts import prompt
from densetune.data.protocols import text_question
from densetune.trial.evaluate import (
    _argmax, _candidate_scores, _common_prefix_length, _inference, _question, _token_batches,
)
from densetune.trial.inputs import EVAL_SUBSET_SEED, sample_rows
from densetune.trial.models import load_model, load_tokenizer

# (benchmark, split, protocol): OpenBookQA has no test file among the LLM-Adapters files here, so its train split.
CASES = [("ARC-Easy", "test", "text"), ("openbookqa", "train", "text"), ("ARC-Easy", "test", "label")]


# --- Today's way (platform/densetune/trial/evaluate.py before issue 23), the reference: each option its own sequence.


@dataclass(frozen=True)
class _Sequence:
    tokens: list[int]
    targets: list[tuple[int, int, int, int]]  # (prompt, candidate, position, token)


def _candidate_sequences(tokenizer, prompt_index, context, continuations, from_context) -> list[_Sequence]:
    tokenized = [tokenizer(context + continuation)["input_ids"] for continuation in continuations]
    if from_context:
        start = _common_prefix_length([tokenizer(context)["input_ids"], *tokenized])
    else:
        start = _common_prefix_length(tokenized)
    if all(len(tokens) == start + 1 for tokens in tokenized):  # the single-token shortcut
        targets = [(prompt_index, k, start - 1, tokens[-1]) for k, tokens in enumerate(tokenized)]
        return [_Sequence(tokenized[0][:start], targets)]
    return [
        _Sequence(tokens, [(prompt_index, k, t - 1, tokens[t]) for t in range(start, len(tokens))])
        for k, tokens in enumerate(tokenized)
    ]


def todays_scores(model, tokenizer, contexts, continuations, batch_size, from_context) -> list[list[float]]:
    sequences = [
        sequence
        for i, (context, options) in enumerate(zip(contexts, continuations))
        for sequence in _candidate_sequences(tokenizer, i, context, options, from_context)
    ]
    scores = [[0.0] * len(options) for options in continuations]
    order = sorted(range(len(sequences)), key=lambda s: len(sequences[s].tokens), reverse=True)
    with _inference(model, tokenizer, "right"):
        for start in range(0, len(order), batch_size):
            batch = [sequences[s] for s in order[start:start + batch_size]]
            width = max(len(sequence.tokens) for sequence in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, sequence in enumerate(batch):
                input_ids[row, :len(sequence.tokens)] = torch.tensor(sequence.tokens)
                attention_mask[row, :len(sequence.tokens)] = 1
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            targets = [(row, *target) for row, sequence in enumerate(batch) for target in sequence.targets]
            table = torch.tensor(targets, dtype=torch.long).reshape(-1, 5)
            log_probs = torch.log_softmax(logits[table[:, 0], table[:, 3]].float(), dim=-1)
            picked = log_probs.gather(1, table[:, 4:5]).squeeze(1).tolist()
            for (_, prompt_index, candidate, _, _), value in zip(targets, picked):
                scores[prompt_index][candidate] += value
    return scores


def todays_tokens(tokenizer, contexts, continuations, batch_size, from_context) -> tuple[int, int]:
    lengths = sorted(
        (len(s.tokens) for i, (c, o) in enumerate(zip(contexts, continuations))
         for s in _candidate_sequences(tokenizer, i, c, o, from_context)),
        reverse=True,
    )
    padded = sum(len(lengths[s:s + batch_size]) * lengths[s] for s in range(0, len(lengths), batch_size))
    return sum(lengths), padded


# --- The packed way: the package's own scorer.


def packed_tokens(tokenizer, contexts, continuations, batch_size, from_context) -> tuple[int, int]:
    lengths = [
        len(_question(tokenizer, [(c, o) for o in options], from_context).tokens)
        for c, options in zip(contexts, continuations)
    ]
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    padded = sum(len(batch) * lengths[batch[0]] for batch in _token_batches(order, lengths, batch_size))
    return sum(lengths), padded


def packed_scores(model, tokenizer, contexts, continuations, batch_size, from_context) -> list[list[float]]:
    pairs = [[(context, option) for option in options] for context, options in zip(contexts, continuations)]
    return _candidate_scores(model, tokenizer, pairs, batch_size, from_context=from_context)


def questions(name: str, split: str, protocol: str, count: int) -> tuple[list[str], list[list[str]]]:
    rows = sample_rows(load_benchmark(name, split).rows, count, EVAL_SUBSET_SEED)
    if protocol == "text":
        found = [text_question(row, "answer") for row in rows]
        return [q.contexts[0] for q in found], [q.continuations for q in found]  # one context per question here
    contexts = [prompt(row["instruction"]) + LOGLIK_PREFIX for row in rows]
    return contexts, [choices("answer", row["instruction"]) for row in rows]


def timed(function, repeats: int, *args) -> tuple[float, list[list[float]]]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function(*args)
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8, help="eval_batch_size on both sides")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m").eval(), load_tokenizer("smollm2-135m")
    print(f"smollm2-135m, float32, {torch.get_num_threads()} threads, eval_batch_size {args.batch_size}\n")
    print("| benchmark (protocol) | questions | tokens today (padded) | tokens packed (padded) | floor | s/question "
          "today | s/question packed | speed-up | picks same | acc_norm picks same | max abs score diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, split, protocol in CASES:
        contexts, options = questions(name, split, protocol, args.questions)
        from_context = protocol == "text"
        shape = (tokenizer, contexts, options, args.batch_size, from_context)
        old_tokens, new_tokens = todays_tokens(*shape), packed_tokens(*shape)
        old_s = new_s = float("inf")
        for _ in range(args.repeats):  # interleaved, so a machine that slows down slows both sides
            seconds, old = timed(todays_scores, 1, model, *shape)
            old_s = min(old_s, seconds)
            seconds, new = timed(packed_scores, 1, model, *shape)
            new_s = min(new_s, seconds)
        same = sum(_argmax(a) == _argmax(b) for a, b in zip(old, new))
        norm = [[len(o.removeprefix(" ")) for o in texts] for texts in options]
        same_norm = sum(
            _argmax([s / n for s, n in zip(a, ns)]) == _argmax([s / n for s, n in zip(b, ns)])
            for a, b, ns in zip(old, new, norm)
        )
        diff = max(abs(x - y) for a, b in zip(old, new) for x, y in zip(a, b))
        count = len(contexts)
        print(
            f"| {name} ({protocol}{', loglik' if protocol == 'label' else ''}) | {count} | "
            f"{old_tokens[0]:,} ({old_tokens[1]:,}) | {new_tokens[0]:,} ({new_tokens[1]:,}) | "
            f"{new_tokens[0] / old_tokens[0]:.0%} | {old_s / count:.3f} | {new_s / count:.3f} | {old_s / new_s:.2f}x | "
            f"{same}/{count} | {same_norm}/{count} | {diff:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
