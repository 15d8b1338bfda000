"""Tokenized training rows: (prompt, response) pairs tokenized the way LLM-Adapters' finetune.py does, all at once, into
flat arrays, and `collate`, which pads some of them into a batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


@dataclass
class TokenizedRows:
    """Rows tokenized once, end to end in flat arrays: Ray's object store holds them as they are, and every worker
    reads them there without a copy."""

    input_ids: np.ndarray  # int32: every row's tokens, one row after another
    labels: np.ndarray  # int32, the same layout: IGNORE_INDEX where the loss skips a token
    offsets: np.ndarray  # int64, one more than rows: row i is [offsets[i], offsets[i + 1])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, i: int) -> dict[str, list[int]]:
        start, end = self.offsets[i], self.offsets[i + 1]
        return {"input_ids": self.input_ids[start:end].tolist(), "labels": self.labels[start:end].tolist()}

    def trainable(self) -> np.ndarray:
        """Whether each row keeps a target token after the first position (the first is never predicted): a row whose
        answer the cutoff removed has none, and a batch of such rows would divide the loss by zero."""
        targets = self.labels != IGNORE_INDEX
        targets[self.offsets[:-1]] = False
        return np.add.reduceat(targets, self.offsets[:-1]) > 0 if len(self) else np.zeros(0, bool)


def tokenize_pairs(
    pairs: Sequence[tuple[str, str]], tokenizer: PreTrainedTokenizerBase, cutoff_len: int = 256,
    train_on_inputs: bool = True,
) -> TokenizedRows:
    """LLM-Adapters' rule for every (prompt, response) pair (densetune.protocols.training_pair): prompt + response,
    truncated at `cutoff_len`, EOS appended when it fits; with `train_on_inputs` False the prompt's tokens get label
    IGNORE_INDEX. One batched tokenizer call for all pairs."""
    prompts = [prompt_text for prompt_text, _ in pairs]
    texts = _token_ids(tokenizer, [prompt_text + response for prompt_text, response in pairs], cutoff_len)
    masked = [0] * len(pairs) if train_on_inputs else [len(ids) for ids in _token_ids(tokenizer, prompts, cutoff_len)]
    input_ids, labels, offsets = [], [], [0]
    for ids, prompt_length in zip(texts, masked):
        # A truncated text gets no EOS: the model must not learn to stop in mid-answer.
        if ids[-1] != tokenizer.eos_token_id and len(ids) < cutoff_len:
            ids = [*ids, tokenizer.eos_token_id]
        input_ids.extend(ids)
        labels.extend([IGNORE_INDEX] * prompt_length + ids[prompt_length:])
        offsets.append(len(input_ids))
    return TokenizedRows(
        np.asarray(input_ids, np.int32), np.asarray(labels, np.int32), np.asarray(offsets, np.int64)
    )


def _token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str], cutoff_len: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=cutoff_len, padding=False)["input_ids"] if texts else []


def collate(rows: TokenizedRows, indices: Sequence[int], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Rows `indices`, right-padded to the longest of them: pads get `pad_token_id`, attention 0 and label -100."""
    bounds = [(rows.offsets[i], rows.offsets[i + 1]) for i in indices]
    width = max(end - start for start, end in bounds)
    input_ids = np.full((len(bounds), width), pad_token_id, np.int64)
    labels = np.full((len(bounds), width), IGNORE_INDEX, np.int64)
    attention_mask = np.zeros((len(bounds), width), np.int64)
    for row, (start, end) in enumerate(bounds):
        input_ids[row, :end - start] = rows.input_ids[start:end]
        labels[row, :end - start] = rows.labels[start:end]
        attention_mask[row, :end - start] = 1
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels)}
