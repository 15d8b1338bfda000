"""What a model is trained to answer and how its answer is scored: the two protocols.

- "label", the paper's (LLM-Adapters): the Alpaca prompt, the response "the correct answer is answer2", and the
  answer read from greedy generation (or scored among the labels by log-likelihood).
- "text", lm-evaluation-harness's for multiple choice: the context "Question: <question>\\nAnswer:", the response the
  right option's own text, and each option's text scored by log-likelihood after the context (acc), also divided by
  its length in bytes (acc_norm). A small model knows things it cannot map to "answer2" in a few minutes of training;
  this protocol shows what it knows.

Both read the same LLM-Adapters rows: the text protocol takes the question and the options from the instruction
("Answer1: … Answer2: …", "Solution1: …", "Option1: …", "Ending1: …").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .answers import LABEL_FORMATS, choices
from .prompts import prompt

# BoolQ's labels as an answer's text, as lm-evaluation-harness words them: "Answer: yes" reads as English.
BOOLEAN_TEXT = {"true": "yes", "false": "no"}

_OPTION_RE = re.compile(r"\b(?:Answer|Solution|Option|Ending)(\d+):\s*")
_ANSWER_FORMAT_RE = re.compile(r"\n\s*Answer format:.*$", re.S | re.I)


@dataclass(frozen=True)
class TextQuestion:
    context: str  # "Question: <question>\nAnswer:"
    options: list[str]  # each option's text, with the space that follows "Answer:"
    gold: int  # the right option's position
    labels: list[str]  # each option's label as the label protocol names it (answer1, ..., true/false)


def training_pair(row: dict, fmt: str | None, protocol: str) -> tuple[str, str]:
    """(prompt, response) a model is trained on; `fmt` (the benchmark's answer format) matters to "text" only."""
    if protocol == "label":
        return prompt(row["instruction"], row["input"]), row["output"]
    question = text_question(row, fmt)
    return question.context, question.options[question.gold]


def text_question(row: dict, fmt: str) -> TextQuestion:
    """The row's question, options and right option, read from its LLM-Adapters instruction."""
    if fmt not in LABEL_FORMATS:
        raise ValueError(
            f"protocol 'text' scores the options of multiple-choice questions; {fmt!r} answers have none "
            f"(allowed: {', '.join(LABEL_FORMATS)})"
        )
    labels = choices(fmt, row["instruction"])
    body, listed = _ANSWER_FORMAT_RE.subn("", row["instruction"])
    if fmt == "boolean":
        question, options = body, [BOOLEAN_TEXT.get(label, label) for label in labels]
    else:
        parts = _OPTION_RE.split(body)
        # split() alternates text and the captured option numbers: question, "1", text1, "2", text2, ...
        question, numbers, options = parts[0], parts[1::2], [text.strip() for text in parts[2::2]]
        wanted = labels if listed else labels[:len(options)]  # no "Answer format:" line: as many as are listed
        if not options or numbers != [str(k) for k in range(1, len(wanted) + 1)] or not all(options):
            raise ValueError(
                f"cannot read the options {'/'.join(labels)} from the instruction {row['instruction'][:120]!r}"
            )
        labels = wanted
    gold = str(row["answer"]).strip().lower()
    if gold not in labels:
        raise ValueError(f"answer {row['answer']!r} is none of the options {'/'.join(labels)}")
    # The instruction's own words before the question ("Please choose the correct answer to the question:").
    stem = question.split(": ", 1)[1] if question.startswith("Please ") and ": " in question else question
    return TextQuestion(
        f"Question: {stem.strip()}\nAnswer:", [f" {text}" for text in options], labels.index(gold), labels
    )
