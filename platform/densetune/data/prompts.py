"""The LLM-Adapters (Alpaca) prompt, the same for training and evaluation."""

from __future__ import annotations

_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def prompt(instruction: str, input: str = "") -> str:
    """The prompt up to and including '### Response:\\n'; the response text follows it directly.

    LLM-Adapters' own template carries the indentation of its Python source into the text; this is the same
    template without those stray spaces.
    """
    template = _WITH_INPUT if input else _WITHOUT_INPUT
    return template.format(instruction=instruction, input=input)
