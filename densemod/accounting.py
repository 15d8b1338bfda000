"""Exact parameter accounting: what a model trains, and what the formulas predict it should train.

DenseLoRA trains sum over module kinds of (k + d) * r (one shared W_e, W_d per kind) plus L * r^2 (one M per
adapted layer); LoRA trains sum over adapted layers of (k + d) * r; a hybrid (DenseLoraConfig.lora_modules) trains
LoRA's count over the layers lora_modules names plus DenseLoRA's over the rest. With modules_to_save, PEFT also trains
a full copy of each named module, and counts it as print_trainable_parameters does: the copy among the trainable and
all parameters, the frozen original among all parameters.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Optional

import torch
from peft import PeftConfig, PeftModel, PeftType
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from .denselora import PEFT_TYPE as DENSELORA
from .denselora.layer import linear_sizes
from .denselora.model import module_kind, targeted_layers

# Shapes of the models the paper (and this project) reports on, from their published configs.
REFERENCE_MODELS = {
    "llama-2-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000,
    ),
    "llama-3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256,
    ),
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
    ),
}


class LayerShape(NamedTuple):
    key: str
    in_features: int
    out_features: int

    @property
    def kind(self) -> str:
        return module_kind(self.key)


@dataclass(frozen=True)
class ParameterReport:
    """Counted as PEFT's print_trainable_parameters counts: trainable and total include the full copies that
    modules_to_save trains, total also the frozen originals; `saved_trainable` is the copies' part of `trainable`."""

    trainable: int
    total: int
    predicted_trainable: Optional[int]  # the formula's count plus the copies'; None for methods without a formula here
    saved_trainable: int = 0

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable / self.total

    def __str__(self) -> str:
        saved = f" (modules_to_save copies: {self.saved_trainable:,d})" if self.saved_trainable else ""
        predicted = "" if self.predicted_trainable is None else f" || predicted: {self.predicted_trainable:,d}"
        return (
            f"trainable params: {self.trainable:,d}{saved} || all params: {self.total:,d} || "
            f"trainable%: {self.trainable_pct:.4f}{predicted}"
        )


def meta_model(name: str) -> nn.Module:
    """A reference model with its real shapes on the meta device: no weights, no memory, no download."""
    if name not in REFERENCE_MODELS:
        raise ValueError(f"reference model must be one of {', '.join(map(repr, REFERENCE_MODELS))}; got {name!r}")
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**REFERENCE_MODELS[name]))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), each parameter counted once however many modules share it."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def numel_once(modules: Iterable[nn.Module], trainable_only: bool = False) -> int:
    """The parameters of `modules` (only the trainable ones if asked), each counted once however many hold it."""
    params = {id(p): p for module in modules for p in module.parameters()}
    return sum(p.numel() for p in params.values() if p.requires_grad or not trainable_only)


def denselora_trainable(
    shapes: Iterable[LayerShape], r: int, variant: str = "denselora", share_scope: str = "kind"
) -> int:
    shapes = list(shapes)
    groups = {shape.kind if share_scope == "kind" else shape.key: shape for shape in shapes}
    projections = sum((s.in_features + s.out_features) * r for s in groups.values())
    return (projections if variant != "freeze" else 0) + len(shapes) * r * r


def lora_trainable(shapes: Iterable[LayerShape], r: int, dora: bool = False) -> int:
    # DoRA adds a magnitude vector of the output size to every adapted layer.
    return sum((s.in_features + s.out_features) * r + (s.out_features if dora else 0) for s in shapes)


def predict_trainable(config: PeftConfig, shapes: Iterable[LayerShape], saved: int = 0) -> Optional[int]:
    """The formula's trainable count for `config` on the adapted layers `shapes`, plus `saved`: the size of the
    modules its modules_to_save names (`saved_module_parameters(model, config)`), which PEFT trains as full copies."""
    if config.peft_type == DENSELORA:
        shapes = list(shapes)
        lora = [shape for shape in shapes if config.adapts_with_lora(shape.key)]
        dense = [shape for shape in shapes if not config.adapts_with_lora(shape.key)]
        adapter = lora_trainable(lora, config.r) + denselora_trainable(
            dense, config.r, config.variant, config.share_scope
        )
    elif config.peft_type == PeftType.LORA and not config.rank_pattern:
        adapter = lora_trainable(shapes, config.r, dora=config.use_dora)
    else:
        return None
    return adapter + saved


def saved_module_parameters(model: nn.Module, config: PeftConfig) -> int:
    """The parameters of the un-adapted model's modules that config.modules_to_save names, matched as PEFT matches
    them (a name matches every module key ending in it): PEFT trains a full copy of each."""
    names = getattr(config, "modules_to_save", None) or []
    return numel_once(module for key, module in model.named_modules() if any(key.endswith(n) for n in names))


def target_shapes(model: nn.Module, config: PeftConfig) -> list[LayerShape]:
    """The linear layers of an un-adapted model that `config` would adapt, matched exactly as PEFT matches them."""
    config = copy.deepcopy(config)
    if config.target_modules is None:
        mapping = PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type].target_module_mapping
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in mapping:
            raise ValueError(f"no default target modules for model type {model_type!r}: set target_modules")
        config.target_modules = set(mapping[model_type])
    return [LayerShape(key, *linear_sizes(base)) for key, base in targeted_layers(model, config)]


def adapted_shapes(model: PeftModel, adapter_name: Optional[str] = None) -> list[LayerShape]:
    """The layers that carry `adapter_name` (default: the active adapter), with their base layers' sizes."""
    adapter_name = adapter_name or model.active_adapter
    shapes = []
    for key, module in model.base_model.model.named_modules():
        if isinstance(module, BaseTunerLayer) and adapter_name in getattr(module, "r", {}):
            shapes.append(LayerShape(key, *linear_sizes(module.get_base_layer())))
    return shapes


def saved_copies(model: nn.Module, adapter_name: Optional[str] = None) -> list[nn.Module]:
    """The full copies that modules_to_save trains: of `adapter_name`, or of every adapter if None."""
    wrappers = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    if adapter_name is None:
        return [module for wrapper in wrappers for module in wrapper.modules_to_save.values()]
    return [wrapper.modules_to_save[adapter_name] for wrapper in wrappers if adapter_name in wrapper.modules_to_save]


def parameter_report(model: PeftModel) -> ParameterReport:
    """Measured trainable and total parameters of a PEFT model, and the formula's prediction for its active adapter
    (its modules_to_save copies included)."""
    trainable, total = count_parameters(model)
    saved = numel_once(saved_copies(model, model.active_adapter))
    predicted = predict_trainable(model.active_peft_config, adapted_shapes(model), saved)
    return ParameterReport(trainable, total, predicted, numel_once(saved_copies(model), trainable_only=True))
