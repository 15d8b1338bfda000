"""Scoring a saved adapter, and the base model under it, on benchmarks outside a training run.

The questions are those a trial with the same settings answers (inputs.eval_set: the same eval_limit subset), scored
by the code a trial scores them with (evaluate.evaluate), in the precision a trial would use on the same device, so the
same adapter gives the same answers here as at the end of its trial. The base model's answers come from the same
loaded model with the adapter switched off (PeftModel.disable_adapter), on the same questions: a paired comparison.

With num_workers 0 it all runs in this process; otherwise each of num_workers Ray tasks scores every num_workers-th
question, on a GPU where the trial would use one, and the answers are put back in order.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import TrialConfig
from ..files import ADAPTER, ADAPTER_CONFIG
from .evaluate import Prediction, evaluate

Sets = list[tuple[str, list[dict]]]  # (benchmark, the questions scored)
AdapterFiles = dict[str, bytes]  # a PEFT adapter folder's two files, by name: they travel to Ray workers as bytes


@dataclass
class Answers:
    """Each benchmark's predictions, in the order of its questions: the adapted model's (empty without an adapter) and
    the base model's (empty when it was not asked for)."""

    adapted: dict[str, list[Prediction]]
    base: dict[str, list[Prediction]]


def adapter_files(folder: Path) -> AdapterFiles:
    """The adapter of a PEFT folder (or a trial's checkpoint, which holds one), read to travel to the workers."""
    missing = [name for name in (ADAPTER_CONFIG, ADAPTER) if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{folder} holds no PEFT adapter: {' and '.join(missing)} missing")
    return {name: (folder / name).read_bytes() for name in (ADAPTER_CONFIG, ADAPTER)}


def score(
    config: TrialConfig, sets: Sets, adapter: Optional[AdapterFiles], base: bool = True, gpu: bool = False,
    progress: Optional[Callable[[str], None]] = None,
) -> Answers:
    """The answers of `config.model` with `adapter` (None: the base model alone) and, with `base`, without it, to every
    question of `sets`; in this process (num_workers 0) or on Ray workers (the caller holds Ray; `gpu`: one GPU each).
    `progress` is told of each benchmark scored (in this process) or each worker done (on Ray)."""
    if config.num_workers == 0:
        return score_shard(config, sets, adapter, base, (0, 1), progress)
    import ray

    task = ray.remote(score_shard).options(
        num_cpus=config.cpus_per_worker, num_gpus=config.gpus_per_worker if gpu else 0
    )
    sets_ref, adapter_ref = ray.put(sets), ray.put(adapter)
    pending = [task.remote(config, sets_ref, adapter_ref, base, (rank, config.num_workers)) for rank in range(config.num_workers)]
    shards = []
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        shards.append(ray.get(done[0]))
        if progress:
            progress(f"worker {len(shards)} of {config.num_workers} done")
    return Answers(*({name: merged([getattr(s, side)[name] for s in shards]) for name in getattr(shards[0], side)}
                     for side in ("adapted", "base")))


def merged(parts: list[list[Prediction]]) -> list[Prediction]:
    return sorted((p for part in parts for p in part), key=lambda p: p.index)


def score_shard(
    config: TrialConfig, sets: Sets, adapter: Optional[AdapterFiles], base: bool, shard: tuple[int, int],
    progress: Optional[Callable[[str], None]] = None,
) -> Answers:
    """This shard's answers: the model loaded once, on this process's GPU if it was given one, else its CPU."""
    from . import precision as mixed
    from .models import load_model, load_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = mixed.resolve(config.dtype, device)
    model = load_model(config.model, dtype=mixed.weights_dtype(chosen), device=device)
    tokenizer = load_tokenizer(config.model)
    if adapter is not None:
        model = with_adapter(model, adapter)

    def answers(name: str, rows: list[dict]) -> list[Prediction]:
        with mixed.autocast(chosen, device):
            found = evaluate(
                model, tokenizer, name, rows, config.eval_mode, config.max_new_tokens, config.eval_batch_size, shard,
                progress=progress is not None and sys.stderr.isatty(), protocol=config.protocol,
            )
        if progress:
            progress(f"{name}: {len(found)} questions scored")
        return found

    adapted = {name: answers(name, rows) for name, rows in sets} if adapter is not None else {}
    if not base:
        return Answers(adapted, {})
    if adapter is None:
        return Answers(adapted, {name: answers(name, rows) for name, rows in sets})
    with model.disable_adapter():
        return Answers(adapted, {name: answers(name, rows) for name, rows in sets})


def with_adapter(model: torch.nn.Module, adapter: AdapterFiles) -> torch.nn.Module:
    """`model` under the adapter, loaded as PEFT loads any saved adapter (DenseLoRA registers itself with PEFT)."""
    import densemod  # noqa: F401  (registers DenseLoRA where the autoload is off)
    from peft import PeftModel

    with tempfile.TemporaryDirectory() as tmp:
        for name, content in adapter.items():
            (Path(tmp) / name).write_bytes(content)
        return PeftModel.from_pretrained(model, tmp)
