"""Running a model on a benchmark's questions: greedy generation with the answer read from the response
(LLM-Adapters), the candidate labels scored by log-likelihood (faster), or, under the text protocol, each option's
text scored by log-likelihood (lm-evaluation-harness: acc, and acc_norm by length). Log-likelihood scoring runs each
question once: its context once, each option after it in the same sequence, seeing the context and itself only.
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
from ..data.protocols import TARGET_DELIMITER, text_question


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


# A log-likelihood batch holds at most batch_size × BATCH_TOKENS tokens, padding included (a longer question runs
# alone): eval_batch_size is prompts per batch for generation and, for scoring, questions of up to BATCH_TOKENS
# packed tokens each; shorter questions fill the batch with more of them. (config.py's eval_batch_size says 128.)
BATCH_TOKENS = 128


@dataclass(frozen=True)
class _Packed:
    """One question's options in one sequence: the tokens they all share, then each option's own tokens.

    An option's own tokens see the shared tokens and themselves only, at the positions they would have after the shared
    tokens alone, so each option is scored as if it were run by itself while the shared tokens run once. An option's
    last token is only read, never read from, so it is left out. `targets[k]`: option k's (index in `tokens` whose
    logits predict the token, token) pairs; option k's score is the sum of those log-probabilities.
    """

    tokens: list[int]
    branches: list[int]  # per token: 0 for the shared tokens, k + 1 for option k's own
    positions: list[int]
    targets: list[list[tuple[int, int]]]


def _common_prefix_length(sequences: list[list[int]]) -> int:
    length = 0
    for column in zip(*sequences):
        if any(token != column[0] for token in column):
            break
        length += 1
    return length


def _pack(sequences: list[list[int]], starts: list[int]) -> _Packed:
    """Option k is the token sequence `sequences[k]` (its context, then its continuation), scored from `starts[k]`
    on."""
    shared = _common_prefix_length(sequences)
    tokens, branches, positions = list(sequences[0][:shared]), [0] * shared, list(range(shared))
    targets = []
    for k, (sequence, start) in enumerate(zip(sequences, starts)):
        if start < 1:
            raise ValueError("a continuation's first token needs a token before it to be scored")
        offset = len(tokens) - shared  # sequence position t >= shared is at index offset + t of the packed tokens
        own = sequence[shared:-1]
        tokens += own
        branches += [k + 1] * len(own)
        positions += range(shared, shared + len(own))
        reads = [t - 1 if t - 1 < shared else offset + t - 1 for t in range(start, len(sequence))]
        targets.append(list(zip(reads, sequence[start:])))
    return _Packed(tokens, branches, positions, targets)


def _question(tokenizer, pairs: list[tuple[str, str]], from_context: bool) -> _Packed:
    """One question's options, each a (context, continuation) pair, packed: under `from_context` every token of a
    continuation is scored (lm-evaluation-harness; acc_norm divides the sum by the continuation's length; where a
    context's last token merges with its continuation's first, the merged token counts), otherwise the tokens from
    the first one where the options differ (enough to rank options that share their context, and cheaper)."""
    sequences = [tokenizer(context + continuation)["input_ids"] for context, continuation in pairs]
    if from_context:
        starts = [
            _common_prefix_length([tokenizer(context)["input_ids"], sequence])
            for (context, _), sequence in zip(pairs, sequences)
        ]
        if len({context for context, _ in pairs}) == 1:
            # One context: every option from where the first one leaves it, so all are scored over the same positions.
            starts = [min(starts)] * len(starts)
    else:
        starts = [_common_prefix_length(sequences)] * len(sequences)
    if min(starts, default=0) == 0:
        raise ValueError(f"the options {pairs!r} share no tokens with their prompt, so none can be scored")
    return _pack(sequences, starts)


def _candidate_scores(
    model,
    tokenizer,
    questions: list[list[tuple[str, str]]],
    batch_size: int = 8,
    progress: bool = False,
    from_context: bool = False,
) -> list[list[float]]:
    """Each option's log-likelihood: the continuation's after the context, for each question's (context,
    continuation) pairs (see `_question` for the tokens summed). Each question runs once, its shared tokens once."""
    packed = [_question(tokenizer, pairs, from_context) for pairs in questions]
    scores = [[0.0] * len(question.targets) for question in packed]
    order = sorted(range(len(packed)), key=lambda i: len(packed[i].tokens), reverse=True)
    device = _device(model)
    with _inference(model, tokenizer, "right"), tqdm(total=len(packed), desc="loglik", disable=not progress) as bar:
        for batch in _token_batches(order, [len(question.tokens) for question in packed], batch_size):
            _score_batch(model, [packed[i] for i in batch], tokenizer.pad_token_id, device, [scores[i] for i in batch])
            bar.update(len(batch))
    return scores


def _token_batches(order: list[int], lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """`order` (longest first) cut into batches of at most batch_size × BATCH_TOKENS tokens once padded."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    budget, batch = batch_size * BATCH_TOKENS, []
    for i in order:
        if batch and (len(batch) + 1) * lengths[batch[0]] > budget:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _attention_mask(model, branches: torch.Tensor) -> torch.Tensor:
    """The (batch, 1, length, length) mask of packed questions: a token sees the tokens before it in its own branch
    and in the shared one; padding (branch -1) sees padding, so no row is empty. transformers passes a 4D mask to the
    attention as it is: boolean for SDPA (the default), additive for eager attention."""
    query, key = branches[:, :, None], branches[:, None, :]
    causal = torch.ones(branches.shape[1], branches.shape[1], dtype=torch.bool, device=branches.device).tril()
    visible = (causal & ((key == query) | (key == 0)))[:, None]
    config = getattr(getattr(model, "module", model), "config", None)  # DDP keeps the model in .module
    implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    if implementation == "sdpa":
        return visible
    if implementation == "eager":
        dtype = next(model.parameters()).dtype
        blocked = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
        return blocked.masked_fill(~visible, torch.finfo(dtype).min)
    raise ValueError(
        f"log-likelihood scoring packs each question's options behind one 4D attention mask, which attention "
        f"{implementation!r} does not take; load the model with attn_implementation 'sdpa' or 'eager'"
    )


def _score_batch(
    model, questions: list[_Packed], pad_token_id: int, device: torch.device, scores: list[list[float]]
) -> None:
    # (row, index in the row, option, token) of every log-probability read
    targets = [
        (row, index, k, token)
        for row, question in enumerate(questions)
        for k, option in enumerate(question.targets)
        for index, token in option
    ]
    if not targets:
        return
    width = max(len(question.tokens) for question in questions)
    input_ids = torch.full((len(questions), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(questions), width), dtype=torch.long)
    branches = torch.full((len(questions), width), -1, dtype=torch.long)
    for row, question in enumerate(questions):
        input_ids[row, :len(question.tokens)] = torch.tensor(question.tokens)
        position_ids[row, :len(question.tokens)] = torch.tensor(question.positions)
        branches[row, :len(question.tokens)] = torch.tensor(question.branches)
    # The language-model head runs on the columns read only, and the log-softmax on the (row, column) pairs read:
    # the full (batch, length, vocabulary) logits can be large.
    columns = sorted({index for _, index, _, _ in targets})
    column_of = {index: c for c, index in enumerate(columns)}
    logits = model(
        input_ids=input_ids.to(device), attention_mask=_attention_mask(model, branches.to(device)),
        position_ids=position_ids.to(device), logits_to_keep=torch.tensor(columns, device=device),
    ).logits
    rows = torch.tensor([row for row, _, _, _ in targets], device=logits.device)
    read = torch.tensor([column_of[index] for _, index, _, _ in targets], device=logits.device)
    tokens = torch.tensor([token for _, _, _, token in targets], device=logits.device)
    log_probs = torch.log_softmax(logits[rows, read].float(), dim=-1)
    picked = log_probs.gather(1, tokens[:, None]).squeeze(1).tolist()
    for (row, _, k, _), value in zip(targets, picked):
        scores[row][k] += value


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _own_length(option: str) -> int:
    """The length in characters of an option's own text, without the delimiter (one space) that joins it to its
    context: what lm-evaluation-harness divides acc_norm by (len() of the choice)."""
    own = option.removeprefix(TARGET_DELIMITER)
    if not own:
        raise ValueError(f"option {option!r} has no text of its own to normalise by")
    return len(own)


def loglik_pick(
    model, tokenizer, prompts: list[str], candidates: list[list[str]], batch_size: int = 8, progress: bool = False
) -> list[int]:
    """For each prompt, the index of its most likely candidate label as the response "the correct answer is
    <candidate>"; no generation."""
    if len(prompts) != len(candidates):
        raise ValueError(f"got {len(prompts)} prompts but {len(candidates)} candidate lists")
    questions = [
        [(prompt_text + LOGLIK_PREFIX, candidate) for candidate in options]
        for prompt_text, options in zip(prompts, candidates)
    ]
    return [_argmax(row) for row in _candidate_scores(model, tokenizer, questions, batch_size, progress)]


def text_picks(
    model, tokenizer, questions: list[list[tuple[str, str]]], batch_size: int = 8, progress: bool = False
) -> list[tuple[int, int]]:
    """For each question, given as its options' (context, continuation) pairs: (the option whose continuation has the
    highest log-likelihood, the one with the highest log-likelihood per character of the continuation's own text):
    lm-evaluation-harness's acc and acc_norm. A continuation is scored with the space that joins it to its context
    (" Paris" after "Answer:"), but acc_norm divides by the length of its own text ("Paris"), as lm-evaluation-harness
    divides by the choice's length, not the delimiter's."""
    scores = _candidate_scores(model, tokenizer, questions, batch_size, progress, from_context=True)
    return [
        (_argmax(row), _argmax([score / _own_length(continuation) for score, (_, continuation) in zip(row, pairs)]))
        for row, pairs in zip(scores, questions)
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
    questions = []
    for i in indices:
        try:
            questions.append(text_question(rows[i], fmt))
        except ValueError as error:
            raise ValueError(f"{name} row {i}: {error}") from None
    pairs = [list(zip(question.contexts, question.continuations)) for question in questions]
    picks = text_picks(model, tokenizer, pairs, batch_size, progress)
    predictions = []
    for i, question, (pick, pick_norm) in zip(indices, questions, picks):
        predictions.append(Prediction(
            name, i, question.texts[pick], question.labels[pick], str(rows[i]["answer"]), pick == question.gold,
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
