"""What a model is trained to answer and how its answer is scored: the two protocols.

- "label", the paper's (LLM-Adapters): the Alpaca prompt, the response "the correct answer is answer2", and the
  answer read from greedy generation (or scored among the labels by log-likelihood).
- "text", lm-evaluation-harness's for multiple choice: the context "Question: <question>\\nAnswer:", the response the
  right option's own text, and each option's text scored by log-likelihood after the context (acc), also divided by
  the length in characters of its own text, without the space before it (acc_norm). A small model knows things it
  cannot map to "answer2" in a few minutes of training; this protocol shows what it knows.

Both read the same LLM-Adapters rows: the text protocol takes the question and the options from the instruction
("Answer1: … Answer2: …", "Solution1: …", "Option1: …", "Ending1: …"), and scores endings (HellaSwag) after the
sentence they complete and a blank's options (WinoGrande) by the rest of the sentence after each (TextQuestion).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .answers import ANSWER_FORMAT_RE, LABEL_FORMATS, choices
from .prompts import prompt

# BoolQ's labels as an answer's text, as lm-evaluation-harness words them: "Answer: yes" reads as English.
BOOLEAN_TEXT = {"true": "yes", "false": "no"}

_OPTION_RE = re.compile(r"\b(?:Answer|Solution|Option|Ending)(\d+):\s*")
# The format statement and the space before it, wherever it stands (answers.ANSWER_FORMAT_RE).
_ANSWER_FORMAT_RE = re.compile(r"\s*" + ANSWER_FORMAT_RE.pattern, re.I)
# What reading the options wrong leaves in an option's text: a format statement, or a label ("option2").
_MISREAD_RE = re.compile(r"answer format|\b(?:answer|solution|option|ending)\d+\b", re.I)
_BLANK_RE = re.compile(r"(?<!\w)_(?!\w)")  # WinoGrande's blank: "so _ always got the harder cases"
TARGET_DELIMITER = " "  # joins an option to its context ("Answer:" + " " + "a balance"), as in lm-evaluation-harness


@dataclass(frozen=True)
class TextQuestion:
    """A multiple-choice question as lm-evaluation-harness scores it: option k is the continuation continuations[k]
    after the context contexts[k], scored by its log-likelihood (acc) and per character of the continuation's own
    text, TARGET_DELIMITER left out (acc_norm).

    - Questions (ARC, OpenBookQA, SIQA, PIQA, BoolQ): one context "Question: <question>\nAnswer:" for all, and each
      option's text after it.
    - Endings (HellaSwag): the sentence to complete as the one context, and each ending after it.
    - Blanks (WinoGrande, "... so _ always got ..."): each option put in the blank as its own context, and the rest of
      the sentence after the blank, the same for all, as the continuation (lm-evaluation-harness's partial
      evaluation; acc_norm is then acc).
    """

    contexts: list[str]
    continuations: list[str]  # each starts with TARGET_DELIMITER
    gold: int  # the right option's position
    labels: list[str]  # each option's label as the label protocol names it (answer1, ..., true/false)
    texts: list[str]  # each option's own text, as the instruction lists it ("yes"/"no" for true/false)


def training_pair(row: dict, fmt: str | None, protocol: str) -> tuple[str, str]:
    """(prompt, response) a model is trained on; `fmt` (the benchmark's answer format) matters to "text" only."""
    if protocol == "label":
        return prompt(row["instruction"], row["input"]), row["output"]
    question = text_question(row, fmt)
    return question.contexts[question.gold], question.continuations[question.gold]


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
        for label, text in zip(labels, options):
            misread = _MISREAD_RE.search(text)
            if misread:
                raise ValueError(
                    f"option {label}'s text {text[:120]!r} holds {misread.group(0)!r}: the options were not read "
                    "apart, and scoring them would be meaningless"
                )
        labels = wanted
    gold = str(row["answer"]).strip().lower()
    if gold not in labels:
        raise ValueError(f"answer {row['answer']!r} is none of the options {'/'.join(labels)}")
    # The instruction's own words before the question ("Please choose the correct answer to the question:").
    stem = (question.split(": ", 1)[1] if question.startswith("Please ") and ": " in question else question).strip()
    blank = _BLANK_RE.search(stem) if fmt == "option" else None
    if blank:
        before, after = stem[:blank.start()], stem[blank.end():].strip()
        if not after:
            raise ValueError(f"the sentence {stem[:120]!r} ends at its blank: there is nothing after it to score")
        contexts, continuations = [before + text for text in options], [TARGET_DELIMITER + after] * len(options)
    else:
        context = stem if fmt == "ending" else f"Question: {stem}\nAnswer:"
        contexts, continuations = [context] * len(options), [TARGET_DELIMITER + text for text in options]
    return TextQuestion(contexts, continuations, labels.index(gold), labels, options)
