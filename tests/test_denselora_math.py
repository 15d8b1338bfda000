"""The adapter computes the paper's formula, starts as a no-op, and shares W_e, W_d the way the paper says."""

import math
import re

import peft
import pytest
import torch
from torch import nn

import densemod
from conftest import PAPER_TARGETS, input_ids, logits, make_tiny_llama, train_step  # noqa: F401

VARIANTS = ["denselora", "freeze", "only_matrix"]


class OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def erf_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_adapter_output_is_the_formula(variant):
    torch.manual_seed(0)
    base = OneLinear()
    config = densemod.DenseLoraConfig(
        r=3, lora_alpha=4, lora_dropout=0.0, target_modules=["proj"], variant=variant, init_weights=False
    )
    model = peft.get_peft_model(base, config)
    layer = model.base_model.model.proj
    w0, b0 = layer.base_layer.weight, layer.base_layer.bias
    w_e = model.base_model.denselora_encoder["default"]["proj"]
    w_d = model.base_model.denselora_decoder["default"]["proj"]
    m = layer.denselora_M["default"]
    h = torch.randn(4, 6)

    act = erf_gelu if variant != "only_matrix" else (lambda t: t)
    expected = h @ w0.T + b0 + (4 / 3) * act(act(h @ w_e.T) @ m.T @ w_d.T)

    assert w_e.shape == (3, 6) and w_d.shape == (5, 3) and m.shape == (3, 3)
    torch.testing.assert_close(model(h), expected, rtol=1e-6, atol=1e-6)


def test_default_alpha_is_twice_the_rank():
    assert densemod.DenseLoraConfig(r=32).lora_alpha == 64
    assert densemod.DenseLoraConfig(r=32).scaling == 2.0


def test_initialisation_follows_the_paper(tiny_llama):
    model = peft.get_peft_model(tiny_llama, densemod.DenseLoraConfig(r=8, target_modules=PAPER_TARGETS))
    tuner = model.base_model
    w_e, w_d = tuner.denselora_encoder["default"]["q_proj"], tuner.denselora_decoder["default"]["q_proj"]
    m = tuner.model.model.layers[0].self_attn.q_proj.denselora_M["default"]
    assert torch.count_nonzero(w_d) == 0
    # Kaiming-uniform with a = sqrt(5) is uniform in +-1/sqrt(fan_in).
    assert 0.5 / math.sqrt(64) < w_e.abs().max() <= 1 / math.sqrt(64)
    assert 0.5 / math.sqrt(8) < m.abs().max() <= 1 / math.sqrt(8)


@pytest.mark.parametrize("variant", VARIANTS)
def test_starts_as_the_base_model_and_moves_after_a_step(variant, input_ids):
    base = make_tiny_llama()
    expected = logits(base, input_ids)
    model = peft.get_peft_model(base, densemod.DenseLoraConfig(r=8, target_modules=PAPER_TARGETS, variant=variant))
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=0, atol=0)

    train_step(model, input_ids)
    assert (logits(model, input_ids) - expected).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("share_scope", "variant", "expected"),
    [
        # per kind (k + d) * r: q (64+64)*8, k and v (64+32)*8 each, up and down (64+96)*8 each; plus 10 layers * 8^2
        ("kind", "denselora", 1024 + 2 * 768 + 2 * 1280 + 10 * 64),
        ("kind", "only_matrix", 1024 + 2 * 768 + 2 * 1280 + 10 * 64),
        # every layer its own W_e, W_d: twice the projections
        ("layer", "denselora", 2 * (1024 + 2 * 768 + 2 * 1280) + 10 * 64),
        # only the ten M matrices train
        ("kind", "freeze", 10 * 64),
    ],
)
def test_trainable_parameters_match_the_formula(share_scope, variant, expected, tiny_llama, capsys):
    config = densemod.DenseLoraConfig(r=8, target_modules=PAPER_TARGETS, share_scope=share_scope, variant=variant)
    model = peft.get_peft_model(tiny_llama, config)

    model.print_trainable_parameters()
    printed = int(re.search(r"trainable params: ([\d,]+)", capsys.readouterr().out).group(1).replace(",", ""))
    report = densemod.parameter_report(model)

    assert printed == report.trainable == report.predicted_trainable == expected


def test_freeze_trains_only_m(tiny_llama, input_ids):
    model = peft.get_peft_model(tiny_llama, densemod.DenseLoraConfig(r=8, target_modules=PAPER_TARGETS, variant="freeze"))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 10 and all(".denselora_M." in name for name in trainable)

    tuner = model.base_model
    before = {k: p.detach().clone() for k, p in tuner.denselora_encoder["default"].items()}
    train_step(model, input_ids)
    for key, value in before.items():
        assert torch.equal(tuner.denselora_encoder["default"][key], value)
    assert torch.count_nonzero(tuner.model.model.layers[0].self_attn.q_proj.denselora_M["default"]) > 0


def _copy_into_layer_scope(kind_model, layer_model):
    """Give the per-layer model the kind model's weights: every layer's W_e, W_d = its kind's shared pair."""
    kind_tuner, layer_tuner = kind_model.base_model, layer_model.base_model
    with torch.no_grad():
        for key, layer in layer_tuner.model.named_modules():
            if isinstance(layer, densemod.DenseLoraLayer):
                kind = key.rpartition(".")[2]
                share_key = layer.share_key["default"]
                layer_tuner.denselora_encoder["default"][share_key].copy_(kind_tuner.denselora_encoder["default"][kind])
                layer_tuner.denselora_decoder["default"][share_key].copy_(kind_tuner.denselora_decoder["default"][kind])
                layer.denselora_M["default"].copy_(kind_tuner.model.get_submodule(key).denselora_M["default"])


def test_shared_encoder_gradient_is_the_sum_of_every_layers_contribution(input_ids):
    def build(scope):
        config = densemod.DenseLoraConfig(
            r=8, lora_dropout=0.0, target_modules=PAPER_TARGETS, share_scope=scope, init_weights=False
        )
        return peft.get_peft_model(make_tiny_llama(), config)

    shared, separate = build("kind"), build("layer")
    _copy_into_layer_scope(shared, separate)
    for model in (shared, separate):
        model(input_ids=input_ids, labels=input_ids).loss.backward()

    for key, layer in shared.base_model.model.named_modules():
        if isinstance(layer, densemod.DenseLoraLayer):
            grad = layer.denselora_M["default"].grad
            assert grad is not None and grad.abs().sum() > 0, key

    for kind in PAPER_TARGETS:
        per_layer = [
            separate.base_model.denselora_encoder["default"][f"model__layers__{i}__{group}__{kind}"].grad
            for i in range(2)
            for group in ("self_attn", "mlp")
            if f"model__layers__{i}__{group}__{kind}" in separate.base_model.denselora_encoder["default"]
        ]
        assert len(per_layer) == 2 and all(g.abs().sum() > 0 for g in per_layer), kind
        shared_grad = shared.base_model.denselora_encoder["default"][kind].grad
        torch.testing.assert_close(shared_grad, per_layer[0] + per_layer[1], rtol=1e-4, atol=1e-7)


def test_llama_models_default_to_the_papers_targets(tiny_llama):
    model = peft.get_peft_model(tiny_llama, densemod.DenseLoraConfig(r=4))
    assert model.peft_config["default"].target_modules == set(PAPER_TARGETS)
    assert set(model.base_model.denselora_encoder["default"]) == set(PAPER_TARGETS)
