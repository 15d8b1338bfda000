"""Training state on disk, tensors as safetensors and the rest as JSON (no pickles).

A checkpoint folder holds the adapter as PEFT saves it (adapter_model.safetensors, adapter_config.json), the
optimizer's tensors and settings, the scheduler, float16's gradient scaler, the position in the data, and each worker's
random state.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from ..files import ADAPTER, ADAPTER_CONFIG


@dataclass
class Position:
    step: int  # optimizer steps done
    epoch: int
    step_in_epoch: int
    tokens: int = 0  # real (not padding) tokens trained on so far, over all workers


def save_adapter(model: PeftModel, folder: Path, base_model: str) -> None:
    """The adapter as PEFT saves it, its config naming the base model as the trial did (a built-in's name, a folder, a
    Hub id). Named after saving: PEFT would look a Hub-like name up on the Hub as it saves, and writes the folder the
    weights came from (none for a built-in)."""
    model.save_pretrained(folder, safe_serialization=True)
    path = folder / ADAPTER_CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), "base_model_name_or_path": base_model}, indent=2))


def load_adapter(model: PeftModel, folder: Path) -> None:
    saved = load_file(folder / ADAPTER)
    expected = set(get_peft_model_state_dict(model))
    if set(saved) != expected:
        raise ValueError(
            f"checkpoint {folder} does not fit the model: missing {sorted(expected - set(saved))}, "
            f"unexpected {sorted(set(saved) - expected)}"
        )
    set_peft_model_state_dict(model, saved)


class Optimization(NamedTuple):
    """What moves the adapter's weights, saved and restored together: AdamW, its learning-rate schedule, and float16's
    gradient scaler (None in the other precisions)."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Optional[torch.amp.GradScaler] = None


def save_optimizer(optimization: Optimization, folder: Path) -> None:
    state = optimization.optimizer.state_dict()
    tensors = {f"{index}.{name}": value for index, slots in state["state"].items() for name, value in slots.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "optimizer.safetensors")
    meta = {"param_groups": state["param_groups"], "scheduler": optimization.scheduler.state_dict()}
    if optimization.scaler is not None:
        meta["scaler"] = optimization.scaler.state_dict()  # the scale and its growth tracker: plain numbers
    (folder / "optimizer.json").write_text(json.dumps(meta))


def load_optimizer(optimization: Optimization, folder: Path) -> None:
    meta = json.loads((folder / "optimizer.json").read_text())
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(folder / "optimizer.safetensors").items():
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    optimization.optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
    optimization.scheduler.load_state_dict(meta["scheduler"])
    # 'auto' precision follows the workers' hardware, so a run may resume in another one: a float16 run resumed from a
    # bfloat16 checkpoint starts a fresh scaler, and the other way round the saved scale is not needed.
    if optimization.scaler is not None and "scaler" in meta:
        optimization.scaler.load_state_dict(meta["scaler"])


def save_position(position: Position, folder: Path) -> None:
    (folder / "position.json").write_text(json.dumps(asdict(position)))


def load_position(folder: Path) -> Position:
    return Position(**json.loads((folder / "position.json").read_text()))


def save_rng(folder: Path, rank: int) -> None:
    """Each worker's own random state (dropout differs per worker): every worker writes its own file."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, folder / f"rng_rank{rank}.safetensors")
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    (folder / f"rng_rank{rank}.json").write_text(json.dumps({
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "python": [python_state[0], list(python_state[1]), python_state[2]],
    }))


def load_rng(folder: Path, rank: int) -> None:
    tensors = load_file(folder / f"rng_rank{rank}.safetensors")
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    states = json.loads((folder / f"rng_rank{rank}.json").read_text())
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
