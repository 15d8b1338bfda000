"""Exact parameter counts on the paper's models, built from their configs on the meta device."""

import peft
import pytest

import densemod
from densemod.accounting import REFERENCE_MODELS, meta_model, target_shapes

TARGETS = "q,k,v,up,down"


def lora_by_hand(name: str, r: int) -> int:
    """sum over targets of layers * (d + k) * r, from the model's published sizes."""
    cfg = REFERENCE_MODELS[name]
    hidden, ffn, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = hidden // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    per_layer = (hidden + hidden) + 2 * (hidden + kv) + (hidden + ffn) + (ffn + hidden)
    return layers * per_layer * r


def denselora_by_hand(name: str, r: int) -> int:
    """sum over kinds of (k + d) * r once, plus one r x r matrix per adapted layer (5 per decoder layer)."""
    layers = REFERENCE_MODELS[name]["num_hidden_layers"]
    return lora_by_hand(name, r) // layers + 5 * layers * r * r


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-3-8b"])
@pytest.mark.parametrize("r", [16, 32, 64])
@pytest.mark.parametrize("method", ["denselora", "lora"])
def test_measured_equals_predicted_on_meta_models(name, r, method):
    config = densemod.build_peft_config(method, r, target_modules=TARGETS)
    base = meta_model(name)
    predicted_before = densemod.predict_trainable(config, target_shapes(base, config))

    report = densemod.parameter_report(peft.get_peft_model(base, config))

    by_hand = denselora_by_hand(name, r) if method == "denselora" else lora_by_hand(name, r)
    assert report.trainable == report.predicted_trainable == predicted_before == by_hand


def test_the_papers_reference_point():
    """LLaMA-2-7B, r=16, q,k,v,up,down: the paper reports about 0.9M for DenseLoRA and about 28M for LoRA."""
    dense = densemod.parameter_report(peft.get_peft_model(meta_model("llama-2-7b"), densemod.build_peft_config("denselora", 16)))
    lora = densemod.parameter_report(peft.get_peft_model(meta_model("llama-2-7b"), densemod.build_peft_config("lora", 16)))
    # DenseLoRA: (3 * 8192 + 2 * 15104) * 16 + 160 * 16^2; LoRA: 32 * (3 * 8192 + 2 * 15104) * 16
    assert dense.trainable == 876_544 + 40_960 == 917_504
    assert lora.trainable == 28_049_408
    assert dense.total == 6_738_415_616 + dense.trainable
    assert round(dense.trainable_pct, 4) == 0.0136


@pytest.mark.parametrize(
    ("method", "variant", "scope"),
    [("denselora", "freeze", "kind"), ("denselora", "only_matrix", "kind"), ("dora", "denselora", "kind")],
)
def test_prediction_holds_for_variants_and_dora(method, variant, scope):
    config = densemod.build_peft_config(method, 32, target_modules="q,v,o,gate", variant=variant)
    base = meta_model("smollm2-135m")
    predicted = densemod.predict_trainable(config, target_shapes(base, config))
    assert densemod.parameter_report(peft.get_peft_model(base, config)).trainable == predicted


def test_per_layer_sharing_costs_the_projections_once_per_layer():
    config = densemod.DenseLoraConfig(r=32, target_modules=["q_proj", "k_proj"], share_scope="layer")
    base = meta_model("smollm2-135m")
    # 30 layers * ((576 + 576) + (576 + 192)) * 32 + 60 * 32^2
    assert densemod.parameter_report(peft.get_peft_model(base, config)).trainable == 1_843_200 + 61_440


def test_methods_without_a_formula_report_none():
    config = densemod.build_peft_config("vera", 16)
    report = densemod.parameter_report(peft.get_peft_model(meta_model("smollm2-135m"), config))
    assert report.predicted_trainable is None and report.trainable > 0
    assert "predicted" not in str(report)
