"""A trial's data, read and tokenized once on the driver: the training rows it may train on and the benchmarks it
evaluates on. A sweep loads it once for all its trials; each trial then picks its own rows from it."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

from ..data.answers import LABEL_FORMATS, answer_format
from ..config import TrialConfig
from ..data.loading import (
    SUITES,
    Benchmark,
    data_dirs,
    expand_suites,
    fraction_indices,
    load_benchmark,
    sample_indices,
    sample_rows,
)
from ..data.tokens import TokenizedRows, tokenize_pairs
from .models import load_tokenizer
from ..data.protocols import text_question, training_pair

if TYPE_CHECKING:
    import ray

logger = logging.getLogger(__name__)
EVAL_SUBSET_SEED = 0  # which eval_limit questions of a benchmark every trial answers
VAL_SEED = 0  # which training rows are every trial's validation set


@dataclass
class TrialData:
    """Every training row tokenized, the validation set held out from them, and every evaluation benchmark's test rows,
    loaded once on the driver.

    Trials that agree on `source` can share one: a sweep loads it once for all its trials and puts `train` into Ray's
    object store, where every worker of every trial reads it. A trial picks its own rows from it (data_fraction, seed,
    eval_limit), never one of `held_out`.
    """

    source: tuple  # what it was made from: data_source(config)
    train: Union[TokenizedRows, ray.ObjectRef]  # all training rows, source after source
    trainable: np.ndarray  # per training row: whether a target token is left within cutoff_len
    eval_sets: list[tuple[str, list[dict]]]  # (benchmark, all its test rows)
    held_out: np.ndarray  # which training rows are the validation set: never trained on
    val_sets: list[tuple[str, list[dict]]]  # (training data set, its validation rows): scored as the test rows are
    val_answers: TokenizedRows  # the validation rows tokenized with the loss on their answers only: val/loss


def data_source(config: TrialConfig) -> tuple:
    """The settings that decide a trial's TrialData."""
    return (
        config.model, tuple(config.datasets), tuple(eval_sources(config)), config.cutoff_len, config.train_on_inputs,
        config.protocol, config.val_size,
    )


def load_data(config: TrialConfig) -> TrialData:
    """Read every training row and tokenize it as the protocol words it, hold the validation set out, and read the
    evaluation benchmarks, checking that the protocol and the eval mode can score their answers."""
    tokenizer = load_tokenizer(config.model)
    benchmarks = [load_benchmark(source, "train") for source in config.datasets]
    pairs = [pair for benchmark in benchmarks for pair in training_pairs(benchmark, config.protocol)]
    rows = tokenize_pairs(pairs, tokenizer, config.cutoff_len, config.train_on_inputs)
    held_out = validation_indices(benchmarks, config.val_size)
    val_sets = validation_sets(benchmarks, held_out, config)
    # The loss on the answers alone, whatever train_on_inputs says: how well the model answers, not how it reads.
    val_answers = tokenize_pairs([pairs[i] for i in held_out], tokenizer, config.cutoff_len, train_on_inputs=False)
    if len(held_out) and not val_answers.trainable().any():
        logger.warning("no validation row keeps an answer token within cutoff_len %d: no val/loss", config.cutoff_len)
    eval_sets = [eval_benchmark(source, config.eval_mode, config.protocol) for source in eval_sources(config)]
    return TrialData(data_source(config), rows, rows.trainable(), eval_sets, held_out, val_sets, val_answers)


def validation_indices(benchmarks: list[Benchmark], val_size: int) -> np.ndarray:
    """Which rows of the concatenated training sets are held out: `val_size` of each set, drawn with a fixed seed, so
    every trial and seed of a study gets the same validation set."""
    chosen, offset = [], 0
    for benchmark in benchmarks:
        size = len(benchmark.rows)
        if val_size >= size:
            raise ValueError(
                f"{benchmark.name} has {size} training rows: val_size {val_size} would leave none to train on; use a "
                "smaller val_size (0: no validation set)"
            )
        chosen += [offset + index for index in sample_indices(size, val_size, VAL_SEED)] if val_size else []
        offset += size
    return np.asarray(chosen, dtype=np.int64)


def validation_sets(
    benchmarks: list[Benchmark], held_out: np.ndarray, config: TrialConfig
) -> list[tuple[str, list[dict]]]:
    """The held-out rows of each training set, as evaluation questions named after it."""
    sets, offset, held = [], 0, set(held_out.tolist())
    for benchmark in benchmarks:
        rows = [row for index, row in enumerate(benchmark.rows) if offset + index in held]
        offset += len(benchmark.rows)
        if rows:
            check_evaluable(Benchmark(benchmark.name, rows), "validation", config.eval_mode, config.protocol)
            sets.append((benchmark.name, rows))
    return sets


def training_pairs(benchmark: Benchmark, protocol: str) -> list[tuple[str, str]]:
    """The (prompt, response) pairs of a data set's training rows, in its order (sources follow each other, as
    commonsense_170k mixes its benchmarks)."""
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
    """The rows this trial trains on: its data_fraction of those not held out for validation, chosen with its seed,
    less those with no target token within the cutoff."""
    available = np.setdiff1d(np.arange(len(data.trainable)), data.held_out)
    chosen = available[np.asarray(fraction_indices(len(available), config.data_fraction, config.seed), dtype=np.int64)]
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
    """The benchmarks a trial evaluates on: eval_datasets, or the training sets when unset, with a suite name
    (data.SUITES: commonsense) replaced by its benchmarks found in the data folders, so that every consumer (load_data,
    data_source, the tracked data sets) sees the same real names."""
    sources = config.datasets if config.eval_datasets is None else config.eval_datasets
    return list(_expanded_sources(tuple(sources), tuple(data_dirs())))


@functools.cache
def _expanded_sources(sources: tuple[str, ...], folders: tuple[Path, ...]) -> tuple[str, ...]:
    """expand_suites on the test split, warning about a suite's missing benchmarks once per process: eval_sources is
    called several times per trial. Keyed by the folders too, so that another $DENSETUNE_DATA is looked at anew."""
    expanded, missing = expand_suites(sources, "test", folders)
    for suite, absent in missing.items():
        logger.warning(
            "eval suite %s: %s %s no test split in the data folders (%s); evaluating the other %d",
            suite, ", ".join(absent), "has" if len(absent) == 1 else "have",
            ", ".join(str(folder) for folder in folders), len(SUITES[suite]) - len(absent),
        )
    return tuple(expanded)


def eval_benchmark(source: str, eval_mode: str, protocol: str = "label") -> tuple[str, list[dict]]:
    benchmark: Benchmark = load_benchmark(source, "test")
    check_evaluable(benchmark, "test", eval_mode, protocol)
    return benchmark.name, benchmark.rows


def check_evaluable(benchmark: Benchmark, split: str, eval_mode: str, protocol: str) -> None:
    """Every question's options must be readable (text protocol), and loglik needs fixed candidates, before any
    worker starts."""
    fmt = answer_format(benchmark.name, [row["answer"] for row in benchmark.rows])
    if protocol == "text":
        for index, row in enumerate(benchmark.rows):
            with located(f"{benchmark.name} {split} row {index}"):
                text_question(row, fmt)
    elif eval_mode == "loglik" and fmt not in LABEL_FORMATS:
        raise ValueError(
            f"eval_mode 'loglik' scores fixed candidates, but {benchmark.name!r} has {fmt!r} answers: "
            "use eval_mode 'generate'"
        )


def eval_set(config: TrialConfig, name: str, rows: list[dict]) -> tuple[str, list[dict]]:
    """The questions a trial evaluates on: all, or a fixed subset of eval_limit. The subset does not depend on the
    trial's seed: every trial of a study answers the same questions, so any two can be compared question by question
    (a paired test)."""
    if config.eval_limit and config.eval_limit < len(rows):
        rows = sample_rows(rows, config.eval_limit, EVAL_SUBSET_SEED)
    return name, rows
