"""How far each adapter matrix moved during training: the DenseLoRA paper's heat maps of increments.

The paper (Mu et al., ACL 2025, Figures 1, 5, 6) compares how the entries of DenseLoRA's per-layer r x r matrix M
change against same-sized r x r slices of LoRA's A (r x k: its first r columns) and B (d x r: its first r rows):
DenseLoRA's increments spread over the whole matrix, LoRA's concentrate on a few entries. A training run records
snapshots of these matrices at a few steps (`SnapshotRecorder`); a report draws |last - first| (`increment_figures`).

Snapshot keys are "<module path>/M" (DenseLoRA) or "<module path>/A" and "<module path>/B" (LoRA, DoRA), the
module path as in `named_modules()` without PEFT's "base_model.model." prefix, e.g.
"model.layers.0.self_attn.q_proj/M". Saved files prefix each key with its step: "step<step>/<key>".
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Optional

import torch
from peft.tuners.adalora.layer import AdaLoraLayer
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from densemod import DenseLoraLayer

PEFT_PREFIX = "base_model.model."
STEP_KEY = re.compile(r"step(\d+)/(.+)")
# Which method a matrix belongs to, by its key's last part; a figure is drawn per method.
METHOD_OF_MATRIX = {"M": "DenseLoRA", "A": "LoRA", "B": "LoRA"}
PREFERRED_KIND = "q_proj"
TOP_FRACTION = 0.1


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The active adapter's comparable matrices, per adapted layer: float32 copies on the CPU.

    DenseLoRA gives M (r x r); LoRA and DoRA give A's first r columns and B's first r rows (r x r each, fewer
    where the layer has fewer than r inputs or outputs). VeRA, LoKr and AdaLoRA have no matrix of this shape to
    compare (VeRA's A and B are frozen and shared, LoKr's factors are Kronecker blocks, AdaLoRA's rank changes as it
    prunes), so a model adapted by them gives {}.
    """
    adapter = _active_adapter(model)
    matrices: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        path = name.removeprefix(PEFT_PREFIX)
        for matrix, tensor in _comparable_matrices(module, adapter):
            matrices[f"{path}/{matrix}"] = _frozen_copy(tensor)
    return matrices


def _active_adapter(model: torch.nn.Module) -> str:
    # Snapshot keys do not name the adapter, so two active adapters would collide.
    active = getattr(model, "active_adapters", None)
    if not active or len(active) != 1:
        raise ValueError(f"snapshot needs a PEFT model with exactly one active adapter; got {active!r}")
    return active[0]


def _comparable_matrices(module: torch.nn.Module, adapter: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(module, DenseLoraLayer) and adapter in module.denselora_M:
        yield "M", module.denselora_M[adapter]
    # AdaLoRA's layers are LoraLayers too, but hold A and B as bare parameters whose rank it prunes.
    elif isinstance(module, LoraLayer) and not isinstance(module, AdaLoraLayer) and adapter in module.lora_A:
        r = module.r[adapter]
        yield "A", module.lora_A[adapter].weight[:, :r]
        yield "B", module.lora_B[adapter].weight[:r, :]


def _frozen_copy(tensor: torch.Tensor) -> torch.Tensor:
    # Contiguous because safetensors refuses strided views such as A's column slice.
    return tensor.detach().to("cpu", torch.float32).clone(memory_format=torch.contiguous_format)


class SnapshotRecorder:
    """Snapshots of one training run by optimizer step, saved as one safetensors file.

    Pass the flat snapshots loaded from a checkpoint (`load_snapshots`) to continue a resumed run's record.
    A model with nothing comparable (VeRA, LoKr, AdaLoRA) records nothing, so `len(recorder)` stays 0 and the
    loop can skip saving.
    """

    def __init__(self, snapshots: Optional[dict[str, torch.Tensor]] = None) -> None:
        self._steps: dict[int, dict[str, torch.Tensor]] = by_step(snapshots or {})

    def record(self, step: int, model: torch.nn.Module) -> None:
        """Snapshot `model` at `step`; recording a step again replaces its snapshot."""
        matrices = snapshot(model)
        if matrices:
            self._steps[step] = matrices

    def snapshots(self) -> dict[str, torch.Tensor]:
        """Every recorded matrix under its flat "step<step>/<key>" key, as `save` writes and `load_snapshots` reads."""
        return {f"step{step}/{key}": tensor for step, matrices in self._steps.items() for key, tensor in matrices.items()}

    def save(self, path: Path) -> None:
        save_file(self.snapshots(), str(path))

    def __len__(self) -> int:
        return len(self._steps)


def load_snapshots(path: Path | str) -> dict[str, torch.Tensor]:
    """The flat "step<step>/<key>" tensors of a file written by `SnapshotRecorder.save`."""
    return load_file(str(path))


def by_step(snapshots: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """Flat "step<step>/<key>" snapshots -> step -> key -> tensor, steps in increasing order."""
    steps: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    for flat_key, tensor in snapshots.items():
        match = STEP_KEY.fullmatch(flat_key)
        if match is None:
            raise ValueError(f"snapshot key {flat_key!r} is not of the form 'step<step>/<module path>/<matrix>'")
        steps[int(match[1])][match[2]] = tensor
    return dict(sorted(steps.items()))


def increments(snapshots: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per matrix key: |last - first|, element-wise, between the earliest and latest steps recording it.

    Each key is compared over its own steps, so the snapshots of two runs (a DenseLoRA and a LoRA run, say) can be
    merged into one dict. Keys recorded at fewer than two steps are left out.
    """
    return {key: (last - first).abs() for key, (_, first, _, last) in _first_and_last(snapshots).items()}


def _first_and_last(snapshots: dict[str, torch.Tensor]) -> dict[str, tuple[int, torch.Tensor, int, torch.Tensor]]:
    """key -> (first step, its tensor, last step, its tensor), for keys recorded at two steps or more."""
    history: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for step, matrices in by_step(snapshots).items():
        for key, tensor in matrices.items():
            history[key][step] = tensor
    ends = {}
    for key, tensors in history.items():
        if len(tensors) >= 2:
            first, last = min(tensors), max(tensors)
            ends[key] = (first, tensors[first], last, tensors[last])
    return ends


def top_share(increment: torch.Tensor, fraction: float = TOP_FRACTION) -> float:
    """The share of the summed increment held by the largest `fraction` of entries (at least one entry).

    Spread evenly it is about `fraction`; concentrated in a few entries it nears 1. NaN when nothing moved.
    """
    values = increment.flatten()
    top = values.topk(max(1, math.ceil(fraction * values.numel()))).values
    return (top.sum() / values.sum()).item()


def increment_figures(
    snapshots: dict[str, torch.Tensor], folder: Path, prefix: str, label: Optional[str] = None
) -> list[Path]:
    """Heat maps of the increments of up to three layers (first, middle, last) of one module kind, per method.

    One PNG per method present, `folder / f"{prefix}increments.png"`; when the snapshots hold two methods (merged
    runs), each file is named `f"{prefix}{method}_increments.png"` instead. DenseLoRA's row shows M per layer,
    LoRA's the A and B slices per layer, on one colour scale per figure. Returns [] when no matrix was recorded at
    two steps or more. `label` names the run's method in the title (DoRA's matrices are LoRA's A and B).
    """
    ends = _first_and_last(snapshots)
    methods: dict[str, list[str]] = defaultdict(list)
    for key in ends:
        methods[METHOD_OF_MATRIX[key.rpartition("/")[2]]].append(key)
    paths = []
    for method, keys in sorted(methods.items()):
        name = f"{prefix}increments.png" if len(methods) == 1 else f"{prefix}{method.lower()}_increments.png"
        layers = _representative(keys)
        panels = [key for key in sorted(keys, key=_matrix_order) if key.rpartition("/")[0] in layers]
        title = label if label and len(methods) == 1 else method
        paths.append(_draw(title, {key: ends[key] for key in panels}, folder / name))
    return paths


def _representative(keys: list[str]) -> set[str]:
    """First, middle and last layer of one module kind, q_proj where adapted, else the first kind by name."""
    paths = {key.rpartition("/")[0] for key in keys}
    kinds = sorted({path.rpartition(".")[2] for path in paths})
    kind = PREFERRED_KIND if PREFERRED_KIND in kinds else kinds[0]
    layers = sorted((path for path in paths if path.rpartition(".")[2] == kind), key=_natural_order)
    return {layers[0], layers[len(layers) // 2], layers[-1]}


def _natural_order(text: str) -> list:
    # Numbers compare as numbers, so layer 10 follows layer 2.
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def _matrix_order(key: str) -> list:
    path, _, matrix = key.rpartition("/")
    return [*_natural_order(path), matrix]


def _draw(method: str, panels: dict[str, tuple[int, torch.Tensor, int, torch.Tensor]], path: Path) -> Path:
    """One row per matrix (M; or A and B), one column per layer, on one colour scale."""
    from matplotlib.figure import Figure  # not pyplot: no display backend on the machines runs report from

    moved = {key: (last - first).abs() for key, (_, first, _, last) in panels.items()}
    scale_max = max(increment.max().item() for increment in moved.values())
    matrices = sorted({key.rpartition("/")[2] for key in moved})
    layers = sorted({key.rpartition("/")[0] for key in moved}, key=_natural_order)
    figure = Figure(figsize=(3.2 * len(layers) + 1, 4.3 * len(matrices)), layout="constrained")
    grid = figure.subplots(len(matrices), len(layers), squeeze=False)
    for row, matrix in zip(grid, matrices):
        for ax, layer in zip(row, layers):
            key = f"{layer}/{matrix}"
            if key not in moved:
                ax.set_axis_off()
                continue
            first_step, _, last_step, _ = panels[key]
            image = ax.imshow(moved[key].numpy(), cmap="viridis", vmin=0.0, vmax=scale_max)
            ax.set_title(f"{layer}\n{_matrix_label(matrix)}: |step {last_step} - step {first_step}|", fontsize="small")
            ax.set(xticks=[], yticks=[])
            share = top_share(moved[key])
            ax.set_xlabel(f"top {TOP_FRACTION:.0%} of entries hold\n{share:.0%} of the increment", fontsize="small")
    figure.colorbar(image, ax=list(grid.flat), label="|increment|", shrink=0.8)
    figure.suptitle(f"{method}: increments of each entry during training")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def _matrix_label(matrix: str) -> str:
    return {"M": "M (r x r)", "A": "A[:, :r]", "B": "B[:r, :]"}[matrix]
