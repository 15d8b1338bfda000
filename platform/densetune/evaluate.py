"""LLM-Adapters evaluation: Alpaca prompt, greedy generation, answer extracted by pattern; plus a faster
log-likelihood mode for the multiple-choice benchmarks that scores each candidate instead of generating.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from densetune.prompts import prompt

FORMATS = ("boolean", "solution", "answer", "ending", "option", "number", "letter")
LABEL_FORMATS = FORMATS[:5]  # the multiple-choice formats: the answer is one of a fixed set of labels
LOGLIK_PREFIX = "the correct answer is "  # how LLM-Adapters' training outputs word a multiple-choice answer
NUMBER_TOLERANCE = 1e-3  # LLM-Adapters counts a numeric answer right within 0.001

# Names are matched after lower-casing and turning '-' into '_', so "ARC-Easy" and "arc_easy" are the same.
KNOWN_BENCHMARKS = {
    "boolq": "boolean",
    "piqa": "solution",
    **dict.fromkeys(("social_i_qa", "siqa", "arc_challenge", "arc_easy", "openbookqa", "synthetic"), "answer"),
    "hellaswag": "ending",
    "winogrande": "option",
    **dict.fromkeys(("gsm8k", "addsub", "svamp", "multiarith", "singleeq", "mawps", "math_data"), "number"),
    "aqua": "letter",
}
DEFAULT_CHOICES = {
    "boolean": ["true", "false"],
    "solution": ["solution1", "solution2"],
    "answer": ["answer1", "answer2", "answer3", "answer4", "answer5"],
    "ending": ["ending1", "ending2", "ending3", "ending4"],
    "option": ["option1", "option2"],
}

# A number with an optional decimal part, or ".5". In text the minus only counts as a sign when it does not
# follow a digit, so the range "10-12" ends in 12, not -12; it may come before a dollar sign, as in "-$110".
_NUMBER_RE = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)")
_NUMBER_IN_TEXT_RE = re.compile(r"(?:(?<!\d)(-)\$?)?(\d+(?:\.\d+)?|\.\d+)")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")
# Whole words only: "answer12" is not "answer1", "untrue" is not "true".
_LABEL_RE = {fmt: re.compile(r"\b(" + "|".join(labels) + r")\b", re.I) for fmt, labels in DEFAULT_CHOICES.items()}
_LABEL_STATED_RE = {
    fmt: re.compile(r"answer is\W*(" + "|".join(labels) + r")\b", re.I) for fmt, labels in DEFAULT_CHOICES.items()
}
# "The answer is (D)", "answer: C", "the answer is c." -- a lower-case letter only when no word follows it, so
# "the answer is a train" states nothing.
_LETTER_STATED_RE = re.compile(r"(?i:answer)(?:\s+is|\s*:)\s*\(?(?:([A-E])\b|([a-e])\b(?!\s+[a-z]))")
_LETTER_PARENTHESIZED_RE = re.compile(r"\(([A-Ea-e])\)")
_LETTER_WORD_RE = re.compile(r"\b([A-E])\b")
_ANSWER_FORMAT_LINE_RE = re.compile(r"^\s*answer format:\s*(.+?)\s*$", re.I | re.M)


def answer_format(name: str, answers: Iterable[str]) -> str:
    """The answer format of benchmark `name`: known by name, otherwise inferred from its gold answers."""
    known = KNOWN_BENCHMARKS.get(name.lower().replace("-", "_"))
    if known:
        return known
    answers = [str(answer).strip() for answer in answers]
    lowered = [answer.lower() for answer in answers]
    if answers:
        if all(answer in ("true", "false") for answer in lowered):
            return "boolean"
        for fmt in ("solution", "answer", "ending", "option"):
            if all(re.fullmatch(fmt + r"\d+", answer) for answer in lowered):
                return fmt
        if all(re.fullmatch(r"[a-e]", answer) for answer in lowered):
            return "letter"
        if all(_NUMBER_RE.fullmatch(answer.replace(",", "")) for answer in answers):
            return "number"
    examples = ", ".join(repr(answer) for answer in answers[:3]) or "none"
    raise ValueError(
        f"cannot tell the answer format of benchmark {name!r}: its answers (e.g. {examples}) match none of the "
        f"known formats {', '.join(FORMATS)}"
    )


def extract(fmt: str, text: str) -> str | float | None:
    """The answer stated in a model's response `text`, or None when it states none."""
    if fmt in LABEL_FORMATS:
        return _extract_label(fmt, text)
    if fmt == "number":
        return _extract_number(text)
    if fmt == "letter":
        return _extract_letter(text)
    raise _unknown_format(fmt)


def _extract_label(fmt: str, text: str) -> str | None:
    # An explicit "answer is X" wins (the last one: models correct themselves); otherwise the first label
    # mentioned, as LLM-Adapters does.
    stated = _LABEL_STATED_RE[fmt].findall(text)
    if stated:
        return stated[-1].lower()
    mentioned = _LABEL_RE[fmt].search(text)
    return mentioned.group(1).lower() if mentioned else None


def _extract_number(text: str) -> float | None:
    # Worked solutions end with the result, so the last number is the answer.
    numbers = _NUMBER_IN_TEXT_RE.findall(_THOUSANDS_COMMA.sub("", text))
    if not numbers:
        return None
    sign, digits = numbers[-1]
    return float(sign + digits)


def _extract_letter(text: str) -> str | None:
    # Most explicit first: "answer is X", then "(X)", then any capital A-E standing alone (which may be the
    # article "A", hence last).
    stated = _LETTER_STATED_RE.findall(text)
    if stated:
        upper, lower = stated[-1]
        return (upper or lower).upper()
    for pattern in (_LETTER_PARENTHESIZED_RE, _LETTER_WORD_RE):
        found = pattern.findall(text)
        if found:
            return found[-1].upper()
    return None


def is_correct(fmt: str, predicted: str | float | None, gold: str) -> bool:
    """Whether an extracted answer matches the gold one."""
    if fmt not in FORMATS:
        raise _unknown_format(fmt)
    if predicted is None:
        return False
    if fmt in LABEL_FORMATS:
        return str(predicted).lower() == gold.strip().lower()
    if fmt == "number":
        return abs(float(predicted) - float(gold.replace(",", ""))) <= NUMBER_TOLERANCE
    return str(predicted).upper() == gold.strip().upper()  # letter


def choices(fmt: str, instruction: str) -> list[str]:
    """The candidate answers of a multiple-choice question: from its "Answer format: a/b/c" line, if any."""
    if fmt not in LABEL_FORMATS:
        if fmt in FORMATS:
            raise ValueError(f"format {fmt!r} has no fixed candidate answers; only {', '.join(LABEL_FORMATS)} do")
        raise _unknown_format(fmt)
    lines = _ANSWER_FORMAT_LINE_RE.findall(instruction)
    if lines:
        return [label.strip().lower() for label in lines[-1].split("/") if label.strip()]
    return list(DEFAULT_CHOICES[fmt])


def _unknown_format(fmt: str) -> ValueError:
    return ValueError(f"unknown answer format {fmt!r}; use one of {', '.join(FORMATS)}")


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
    tokenizer, prompt_index: int, prompt_text: str, candidates: list[str], single_token_shortcut: bool
) -> list[_Sequence]:
    tokenized = [tokenizer(prompt_text + LOGLIK_PREFIX + candidate)["input_ids"] for candidate in candidates]
    shared = _common_prefix_length(tokenized)
    if shared == 0:
        raise ValueError(f"the candidates {candidates!r} share no tokens with their prompt, so none can be scored")
    if single_token_shortcut and all(len(tokens) == shared + 1 for tokens in tokenized):
        # The candidates differ in their last token only: one pass over the shared prefix scores them all.
        targets = [(prompt_index, k, shared - 1, tokens[-1]) for k, tokens in enumerate(tokenized)]
        return [_Sequence(tokenized[0][:shared], targets)]
    return [
        _Sequence(tokens, [(prompt_index, k, t - 1, tokens[t]) for t in range(shared, len(tokens))])
        for k, tokens in enumerate(tokenized)
    ]


def _candidate_scores(
    model,
    tokenizer,
    prompts: list[str],
    candidates: list[list[str]],
    batch_size: int = 8,
    progress: bool = False,
    single_token_shortcut: bool = True,
) -> list[list[float]]:
    """Each candidate's summed log-likelihood as the response "the correct answer is <candidate>"."""
    if len(prompts) != len(candidates):
        raise ValueError(f"got {len(prompts)} prompts but {len(candidates)} candidate lists")
    sequences = [
        sequence
        for i, (prompt_text, options) in enumerate(zip(prompts, candidates))
        for sequence in _candidate_sequences(tokenizer, i, prompt_text, options, single_token_shortcut)
    ]
    scores = [[0.0] * len(options) for options in candidates]
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


def loglik_pick(
    model, tokenizer, prompts: list[str], candidates: list[list[str]], batch_size: int = 8, progress: bool = False
) -> list[int]:
    """For each prompt, the index of its most likely candidate answer; no generation."""
    scores = _candidate_scores(model, tokenizer, prompts, candidates, batch_size, progress)
    return [max(range(len(row)), key=row.__getitem__) for row in scores]


@dataclass(frozen=True)
class Prediction:
    """One evaluated row: `index` is its position in the benchmark's full list of rows."""

    benchmark: str
    index: int
    output: str
    extracted: str | float | None
    gold: str
    correct: bool


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
) -> list[Prediction]:
    """Predictions for this shard's rows of benchmark `name` (rows of {instruction, input, answer})."""
    if mode not in ("generate", "loglik"):
        raise ValueError(f"mode must be 'generate' or 'loglik'; got {mode!r}")
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


def accuracy(predictions: Sequence[Prediction]) -> float:
    """The fraction of predictions that are correct."""
    if not predictions:
        raise ValueError("accuracy of no predictions is undefined")
    return sum(prediction.correct for prediction in predictions) / len(predictions)
