"""A trial's data, read and tokenized once on the driver: the training rows it may train on and the benchmarks it
evaluates on. A sweep loads it once for all its trials; each trial then picks its own rows from it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import numpy as np

from .answers import LABEL_FORMATS, answer_format
from .config import TrialConfig
from .data import Benchmark, TokenizedRows, fraction_indices, load_benchmark, sample_rows, tokenize_pairs
from .models import load_tokenizer
from .protocols import text_question, training_pair

if TYPE_CHECKING:
    import ray

logger = logging.getLogger(__name__)
EVAL_SUBSET_SEED = 0  # which eval_limit questions of a benchmark every trial answers


@dataclass
class TrialData:
    """Every training row tokenized, and every evaluation benchmark's test rows, loaded once on the driver.

    Trials that agree on `source` can share one: a sweep loads it once for all its trials and puts `train` into Ray's
    object store, where every worker of every trial reads it. A trial picks its own rows from it (data_fraction, seed,
    eval_limit).
    """

    source: tuple  # what it was made from: data_source(config)
    train: Union[TokenizedRows, ray.ObjectRef]  # all training rows, source after source
    trainable: np.ndarray  # per training row: whether a target token is left within cutoff_len
    eval_sets: list[tuple[str, list[dict]]]  # (benchmark, all its test rows)


def data_source(config: TrialConfig) -> tuple:
    """The settings that decide a trial's TrialData."""
    return (
        config.model, tuple(config.datasets), tuple(eval_sources(config)), config.cutoff_len, config.train_on_inputs,
        config.protocol,
    )


def load_data(config: TrialConfig) -> TrialData:
    """Read every training row and tokenize it as the protocol words it, and read the evaluation benchmarks, checking
    that the protocol and the eval mode can score their answers."""
    pairs = [pair for source in config.datasets for pair in training_pairs(source, config.protocol)]
    rows = tokenize_pairs(pairs, load_tokenizer(config.model), config.cutoff_len, config.train_on_inputs)
    eval_sets = [eval_benchmark(source, config.eval_mode, config.protocol) for source in eval_sources(config)]
    return TrialData(data_source(config), rows, rows.trainable(), eval_sets)


def training_pairs(source: str, protocol: str) -> list[tuple[str, str]]:
    """The (prompt, response) pairs of a data set's training rows, in its order (sources follow each other, as
    commonsense_170k mixes its benchmarks)."""
    benchmark = load_benchmark(source, "train")
    # Only the text protocol reads the options, and so needs to know how the answers are written.
    fmt = answer_format(benchmark.name, [row["answer"] for row in benchmark.rows]) if protocol == "text" else None
    pairs = []
    for index, row in enumerate(benchmark.rows):
        with located(f"{benchmark.name} train row {index}"):
            pairs.append(training_pair(row, fmt, protocol))
    return pairs


@contextmanager
def located(where: str) -> Iterator[None]:
    """A row's error, prefixed with which row it is."""
    try:
        yield
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def training_rows(config: TrialConfig, data: TrialData) -> np.ndarray:
    """The rows this trial trains on: its data_fraction of them, chosen with its seed, less those with no target
    token within the cutoff."""
    chosen = np.asarray(fraction_indices(len(data.trainable), config.data_fraction, config.seed), dtype=np.int64)
    kept = chosen[data.trainable[chosen]]
    if len(kept) < len(chosen):
        logger.warning(
            "%d of %d training rows have no target token within cutoff_len %d and are skipped",
            len(chosen) - len(kept), len(chosen), config.cutoff_len,
        )
    if len(kept) < config.batch_size:
        raise ValueError(f"{len(kept)} trainable training rows make no batch of batch_size {config.batch_size}")
    return kept


def eval_sources(config: TrialConfig) -> list[str]:
    return config.datasets if config.eval_datasets is None else config.eval_datasets


def eval_benchmark(source: str, eval_mode: str, protocol: str = "label") -> tuple[str, list[dict]]:
    benchmark: Benchmark = load_benchmark(source, "test")
    fmt = answer_format(benchmark.name, [row["answer"] for row in benchmark.rows])
    if protocol == "text":
        for index, row in enumerate(benchmark.rows):  # every question's options must be readable before any worker
            with located(f"{benchmark.name} test row {index}"):
                text_question(row, fmt)
    elif eval_mode == "loglik" and fmt not in LABEL_FORMATS:
        raise ValueError(
            f"eval_mode 'loglik' scores fixed candidates, but {benchmark.name!r} has {fmt!r} answers: "
            "use eval_mode 'generate'"
        )
    return benchmark.name, benchmark.rows


def eval_set(config: TrialConfig, name: str, rows: list[dict]) -> tuple[str, list[dict]]:
    """The questions a trial evaluates on: all, or a fixed subset of eval_limit. The subset does not depend on the
    trial's seed: every trial of a study answers the same questions, so any two can be compared question by question
    (a paired test)."""
    if config.eval_limit and config.eval_limit < len(rows):
        rows = sample_rows(rows, config.eval_limit, EVAL_SUBSET_SEED)
    return name, rows
