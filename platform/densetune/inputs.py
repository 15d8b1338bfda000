"""A trial's data, read and tokenized once on the driver: the training rows it may train on and the benchmarks it
evaluates on. A sweep loads it once for all its trials; each trial then picks its own rows from it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import numpy as np

from .config import TrialConfig
from .data import Benchmark, TokenizedRows, fraction_indices, load_benchmark, load_training_rows, sample_rows, tokenize_rows
from .evaluate import LABEL_FORMATS, answer_format
from .models import load_tokenizer

if TYPE_CHECKING:
    import ray

logger = logging.getLogger(__name__)


@dataclass
class TrialData:
    """Every training row tokenized, and every evaluation benchmark's test rows, loaded once on the driver.

    Trials that agree on `source` can share one: a sweep loads it once for all its trials and puts `train` into Ray's
    object store, where every worker of every trial reads it. A trial picks its own rows from it (data_fraction, seed,
    eval_limit).
    """

    source: tuple  # what it was made from: data_source(config)
    train: Union[TokenizedRows, ray.ObjectRef]  # all training rows, in load_training_rows' order
    trainable: np.ndarray  # per training row: whether a target token is left within cutoff_len
    eval_sets: list[tuple[str, list[dict]]]  # (benchmark, all its test rows)


def data_source(config: TrialConfig) -> tuple:
    """The settings that decide a trial's TrialData."""
    return config.model, tuple(config.datasets), tuple(eval_sources(config)), config.cutoff_len, config.train_on_inputs


def load_data(config: TrialConfig) -> TrialData:
    """Read and tokenize every training row, and read the evaluation benchmarks, checking that the eval mode can
    score their answers."""
    rows = tokenize_rows(
        load_training_rows(config.datasets), load_tokenizer(config.model), config.cutoff_len, config.train_on_inputs
    )
    eval_sets = [eval_benchmark(source, config.eval_mode) for source in eval_sources(config)]
    return TrialData(data_source(config), rows, rows.trainable(), eval_sets)


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


def eval_benchmark(source: str, eval_mode: str) -> tuple[str, list[dict]]:
    benchmark: Benchmark = load_benchmark(source, "test")
    fmt = answer_format(benchmark.name, [row["answer"] for row in benchmark.rows])
    if eval_mode == "loglik" and fmt not in LABEL_FORMATS:
        raise ValueError(
            f"eval_mode 'loglik' scores fixed candidates, but {benchmark.name!r} has {fmt!r} answers: "
            "use eval_mode 'generate'"
        )
    return benchmark.name, benchmark.rows


def eval_set(config: TrialConfig, name: str, rows: list[dict]) -> tuple[str, list[dict]]:
    """The questions a trial evaluates on: all, or a fixed subset of eval_limit, the same for every trial with the
    same seed."""
    if config.eval_limit and config.eval_limit < len(rows):
        rows = sample_rows(rows, config.eval_limit, config.seed)
    return name, rows
