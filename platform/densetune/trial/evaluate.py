"""Running a model on a benchmark's questions: greedy generation with the answer read from the response
(LLM-Adapters), the candidate labels scored by log-likelihood (faster), or, under the text protocol, each option's
text scored by log-likelihood (lm-evaluation-harness: acc, and acc_norm by length).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.answers import LABEL_FORMATS, LOGLIK_PREFIX, answer_format, choices, extract, is_correct
from ..config import PROTOCOLS
from ..data.tokens import IGNORE_INDEX, TokenizedRows, collate
from ..data.prompts import prompt
from ..data.protocols import text_question


@contextmanager
def _inference(model: torch.nn.Module, tokenizer, padding_side: str) -> Iterator[None]:
    """Eval mode, no gradients and the given padding side for the duration; the previous state afterwards."""
    was_training, previous_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = padding_side
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        tokenizer.padding_side = previous_side


def _batches(order: list[int], batch_size: int) -> Iterator[list[int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def _device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def generate(
    model, tokenizer, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 8, progress: bool = False
) -> list[str]:
    """Greedy continuations of `prompts` (only the new text), in the order of `prompts`."""
    outputs: list[str] = [""] * len(prompts)
    # Prompts of similar length share a batch, so little compute goes to padding.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    device = _device(model)
    # Left padding: every prompt then ends at the same position and the new tokens follow it directly.
    with _inference(model, tokenizer, "left"), tqdm(total=len(prompts), desc="generate", disable=not progress) as bar:
        for batch in _batches(order, batch_size):
            inputs = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True).to(device)
            generated = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            texts = tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in zip(batch, texts):
                outputs[i] = text
            bar.update(len(batch))
    return outputs


@dataclass(frozen=True)
class _Sequence:
    """One forward pass's worth of tokens and the log-probs to read from it.

    Each target (prompt, candidate, position, token) adds log p(token | tokens[:position + 1]) to that
    candidate's score.
    """

    tokens: list[int]
    targets: list[tuple[int, int, int, int]]


def _common_prefix_length(sequences: list[list[int]]) -> int:
    length = 0
    for column in zip(*sequences):
        if any(token != column[0] for token in column):
            break
        length += 1
    return length


def _candidate_sequences(
    tokenizer, prompt_index: int, context: str, continuations: list[str], single_token_shortcut: bool,
    from_context: bool,
) -> list[_Sequence]:
    tokenized = [tokenizer(context + continuation)["input_ids"] for continuation in continuations]
    if from_context:
        # Every token of a continuation counts, shared ones too (lm-evaluation-harness): acc_norm divides the sum by
        # the continuation's length. Where the context's last token merges with a continuation's first, the merged
        # token counts.
        start = _common_prefix_length([tokenizer(context)["input_ids"], *tokenized])
    else:
        start = _common_prefix_length(tokenized)
    if start == 0:
        raise ValueError(f"the candidates {continuations!r} share no tokens with their prompt, so none can be scored")
    if single_token_shortcut and all(len(tokens) == start + 1 for tokens in tokenized):
        # The candidates differ in their last token only: one pass over the shared prefix scores them all.
        targets = [(prompt_index, k, start - 1, tokens[-1]) for k, tokens in enumerate(tokenized)]
        return [_Sequence(tokenized[0][:start], targets)]
    return [
        _Sequence(tokens, [(prompt_index, k, t - 1, tokens[t]) for t in range(start, len(tokens))])
        for k, tokens in enumerate(tokenized)
    ]


def _candidate_scores(
    model,
    tokenizer,
    contexts: list[str],
    continuations: list[list[str]],
    batch_size: int = 8,
    progress: bool = False,
    single_token_shortcut: bool = True,
    from_context: bool = False,
) -> list[list[float]]:
    """Each continuation's log-likelihood after its context: summed over its own tokens (`from_context`), or over
    the tokens where the continuations differ (enough to rank them, and cheaper)."""
    if len(contexts) != len(continuations):
        raise ValueError(f"got {len(contexts)} prompts but {len(continuations)} candidate lists")
    sequences = [
        sequence
        for i, (context, options) in enumerate(zip(contexts, continuations))
        for sequence in _candidate_sequences(tokenizer, i, context, options, single_token_shortcut, from_context)
    ]
    scores = [[0.0] * len(options) for options in continuations]
    order = sorted(range(len(sequences)), key=lambda s: len(sequences[s].tokens), reverse=True)
    device = _device(model)
    with _inference(model, tokenizer, "right"), tqdm(total=len(sequences), desc="loglik", disable=not progress) as bar:
        for batch in _batches(order, batch_size):
            _score_batch(model, [sequences[s] for s in batch], tokenizer.pad_token_id, device, scores)
            bar.update(len(batch))
    return scores


def _score_batch(
    model, sequences: list[_Sequence], pad_token_id: int, device: torch.device, scores: list[list[float]]
) -> None:
    # Right padding: a causal model's real positions never see the pads after them, so no position shifts.
    width = max(len(sequence.tokens) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, :len(sequence.tokens)] = torch.tensor(sequence.tokens)
        attention_mask[row, :len(sequence.tokens)] = 1
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    targets = [(row, *target) for row, sequence in enumerate(sequences) for target in sequence.targets]
    # Columns: batch row, prompt, candidate, position, token; reshape keeps the shape when nothing is read.
    table = torch.tensor(targets, dtype=torch.long, device=logits.device).reshape(-1, 5)
    rows, positions, tokens = table[:, 0], table[:, 3], table[:, 4]
    # Normalize only the rows that are read: the full (batch, length, vocabulary) softmax can be large.
    log_probs = torch.log_softmax(logits[rows, positions].float(), dim=-1)
    picked = log_probs.gather(1, tokens[:, None]).squeeze(1).tolist()
    for (_, prompt_index, candidate, _, _), value in zip(targets, picked):
        scores[prompt_index][candidate] += value


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def loglik_pick(
    model, tokenizer, prompts: list[str], candidates: list[list[str]], batch_size: int = 8, progress: bool = False
) -> list[int]:
    """For each prompt, the index of its most likely candidate label as the response "the correct answer is
    <candidate>"; no generation."""
    contexts = [prompt_text + LOGLIK_PREFIX for prompt_text in prompts]
    return [_argmax(row) for row in _candidate_scores(model, tokenizer, contexts, candidates, batch_size, progress)]


def text_picks(
    model, tokenizer, contexts: list[str], options: list[list[str]], batch_size: int = 8, progress: bool = False
) -> list[tuple[int, int]]:
    """For each context, (the option with the highest log-likelihood, the one with the highest log-likelihood per
    byte of its text): lm-evaluation-harness's acc and acc_norm."""
    scores = _candidate_scores(model, tokenizer, contexts, options, batch_size, progress, from_context=True)
    return [
        (_argmax(row), _argmax([score / len(text.encode()) for score, text in zip(row, texts)]))
        for row, texts in zip(scores, options)
    ]


@dataclass(frozen=True)
class Prediction:
    """One evaluated row: `index` is its position in the benchmark's full list of rows. `correct_norm`: under the
    text protocol, whether the length-normalised pick (acc_norm) is right; None otherwise."""

    benchmark: str
    index: int
    output: str
    extracted: str | float | None
    gold: str
    correct: bool
    correct_norm: bool | None = None


def evaluate(
    model,
    tokenizer,
    name: str,
    rows: list[dict],
    mode: str = "generate",
    max_new_tokens: int = 32,
    batch_size: int = 8,
    shard: tuple[int, int] = (0, 1),
    progress: bool = False,
    protocol: str = "label",
) -> list[Prediction]:
    """Predictions for this shard's rows of benchmark `name` (rows of {instruction, input, answer}). The text protocol
    always scores the options' texts; `mode` chooses how the label protocol answers."""
    if mode not in ("generate", "loglik"):
        raise ValueError(f"mode must be 'generate' or 'loglik'; got {mode!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    # The format comes from all rows, not this shard's, so every shard agrees on it.
    fmt = answer_format(name, [str(row["answer"]) for row in rows])
    if mode == "loglik" and fmt not in LABEL_FORMATS:
        raise ValueError(
            f"benchmark {name!r} has {fmt!r} answers, which have no fixed candidates to score; use mode 'generate'"
        )
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world; got {shard!r}")
    indices = list(range(rank, len(rows), world))
    if protocol == "text":
        return _evaluate_text(model, tokenizer, name, rows, indices, fmt, batch_size, progress)
    prompts = [prompt(rows[i]["instruction"], rows[i].get("input", "")) for i in indices]
    if mode == "generate":
        outputs = generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress)
        extracted = [extract(fmt, output) for output in outputs]
    else:
        options = [choices(fmt, rows[i]["instruction"]) for i in indices]
        picks = loglik_pick(model, tokenizer, prompts, options, batch_size, progress)
        outputs = extracted = [candidates[pick] for candidates, pick in zip(options, picks)]
    predictions = []
    for i, output, answer in zip(indices, outputs, extracted):
        gold = str(rows[i]["answer"])
        predictions.append(Prediction(name, i, output, answer, gold, is_correct(fmt, answer, gold)))
    return predictions


def _evaluate_text(
    model, tokenizer, name: str, rows: list[dict], indices: list[int], fmt: str, batch_size: int, progress: bool
) -> list[Prediction]:
    questions = [text_question(rows[i], fmt) for i in indices]
    picks = text_picks(model, tokenizer, [q.context for q in questions], [q.options for q in questions], batch_size, progress)
    predictions = []
    for i, question, (pick, pick_norm) in zip(indices, questions, picks):
        predictions.append(Prediction(
            name, i, question.options[pick].strip(), question.labels[pick], str(rows[i]["answer"]), pick == question.gold,
            pick_norm == question.gold,
        ))
    return predictions


def accuracy(predictions: Sequence[Prediction], norm: bool = False) -> float:
    """The fraction of predictions that are correct; with `norm`, of length-normalised picks (text protocol)."""
    if not predictions:
        raise ValueError("accuracy of no predictions is undefined")
    if norm and any(prediction.correct_norm is None for prediction in predictions):
        raise ValueError("these predictions have no length-normalised picks: only the text protocol makes them")
    return sum(bool(p.correct_norm if norm else p.correct) for p in predictions) / len(predictions)


def benchmark_metrics(found: Mapping[str, Sequence[Prediction]], prefix: str = "") -> dict[str, float]:
    """`prefix`accuracy/<benchmark> for each benchmark's predictions, accuracy_norm/<benchmark> too where they have
    length-normalised picks (text protocol), and each family's average over the benchmarks: a trial's metrics."""
    metrics: dict[str, float] = {}
    for name, predictions in found.items():
        metrics[f"{prefix}accuracy/{name}"] = accuracy(predictions)
        if predictions and predictions[0].correct_norm is not None:
            metrics[f"{prefix}accuracy_norm/{name}"] = accuracy(predictions, norm=True)
    for kind in ("accuracy", "accuracy_norm"):
        values = [v for k, v in metrics.items() if k.startswith(f"{prefix}{kind}/")]
        if values:
            metrics[f"{prefix}{kind}/average"] = sum(values) / len(values)
    return metrics


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The causal LM's cross-entropy summed over the target tokens, as transformers computes it (float32 logits, each
    position predicting the next token)."""
    with torch.no_grad():
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
            ignore_index=IGNORE_INDEX, reduction="sum",
        ).item()


def answer_loss(model, tokenizer, rows: TokenizedRows, batch_size: int = 8) -> float:
    """The mean loss per target token over `rows` (tokenized with the loss on their answers only): the validation
    loss, a smooth curve where per-batch training losses are not. Rows of similar length share a batch."""
    order = sorted(range(len(rows)), key=lambda i: int(rows.lengths[i]), reverse=True)
    device, total, targets = _device(model), 0.0, 0
    with _inference(model, tokenizer, "right"):
        for batch in _batches(order, batch_size):
            inputs = collate(rows, batch, tokenizer.pad_token_id)
            logits = model(
                input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device)
            ).logits
            total += summed_token_loss(logits, inputs["labels"])
            targets += int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
    if targets == 0:
        raise ValueError("these rows have no answer token within cutoff_len: there is no loss to measure")
    return total / targets
