"""LLM-Adapters' answers: the answer format of each benchmark, the answer stated in a response, whether it is right,
and the candidate labels of a multiple-choice question. Text only: no model here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

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
# "Answer format: answer1/answer2/answer3": wherever it stands, on its own line (most LLM-Adapters files) or after
# the last option on the same line (WinoGrande's "Option1: Sarah Option2: Maria Answer format: option1/option2").
ANSWER_FORMAT_RE = re.compile(r"\banswer format:[ \t]*(\w+(?:[ \t]*/[ \t]*\w+)*)", re.I)


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
    stated = ANSWER_FORMAT_RE.findall(instruction)
    if stated:
        return [label.strip().lower() for label in stated[-1].split("/") if label.strip()]
    return list(DEFAULT_CHOICES[fmt])


def _unknown_format(fmt: str) -> ValueError:
    return ValueError(f"unknown answer format {fmt!r}; use one of {', '.join(FORMATS)}")
