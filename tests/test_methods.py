"""One entry point builds every method's PEFT config; each trains a step on the tiny model."""

import peft
import pytest
import torch

import densemod
from densemod.methods import resolve_targets
from conftest import input_ids, make_tiny_llama  # noqa: F401

EXPECTED_CLASS = {
    "denselora": densemod.DenseLoraConfig, "lora": peft.LoraConfig, "dora": peft.LoraConfig,
    "vera": peft.VeraConfig, "lokr": peft.LoKrConfig, "adalora": peft.AdaLoraConfig,
    "hybrid": densemod.DenseLoraConfig,
}


def test_short_target_names_resolve_to_llama_module_names():
    assert resolve_targets("q,k,v,up,down") == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert resolve_targets(["o", "gate_proj", "lm_head"]) == ["o_proj", "gate_proj", "lm_head"]
    assert resolve_targets("all-linear") == "all-linear"
    assert resolve_targets("qkvud") == resolve_targets("q,k,v,up,down")
    assert resolve_targets("qkvo") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert resolve_targets(["qkv"]) == ["qkv"]  # a list names modules, never a set


@pytest.mark.parametrize("method", densemod.METHODS)
def test_every_method_trains_a_step(method, input_ids):
    config = densemod.build_peft_config(method, r=4, target_modules="q,k,v,up,down", total_steps=10)
    assert type(config) is EXPECTED_CLASS[method]
    model = peft.get_peft_model(make_tiny_llama(), config)
    assert set(model.base_model.targeted_module_names) == {
        f"model.layers.{i}.{group}.{name}"
        for i in range(2)
        for group, names in (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("up_proj", "down_proj")))
        for name in names
    }

    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    densemod.step_hook(model)(1)
    optimizer.zero_grad()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable))


def test_dora_and_lora_differ_only_in_the_magnitude_vector(input_ids):
    lora = densemod.build_peft_config("lora", 8, target_modules="q,v")
    dora = densemod.build_peft_config("dora", 8, target_modules="q,v")
    lora_fields, dora_fields = lora.to_dict(), dora.to_dict()
    assert {k for k in lora_fields | dora_fields if lora_fields.get(k) != dora_fields.get(k)} == {"use_dora"}
    assert (lora.use_dora, dora.use_dora, dora.lora_alpha) == (False, True, 16)

    torch.manual_seed(0)
    lora_model = peft.get_peft_model(make_tiny_llama(), lora)
    torch.manual_seed(0)
    dora_model = peft.get_peft_model(make_tiny_llama(), dora)
    lora_weights = {n: p for n, p in lora_model.named_parameters() if p.requires_grad}
    dora_weights = {n: p for n, p in dora_model.named_parameters() if p.requires_grad}
    extra = set(dora_weights) - set(lora_weights)
    # one magnitude per output feature of each adapted layer (q: 64, v: 32, in 2 layers), and the same A and B
    assert set(lora_weights) <= set(dora_weights) and all("lora_magnitude_vector" in n for n in extra)
    assert sorted(dora_weights[n].numel() for n in extra) == [32, 32, 64, 64]
    assert all(torch.equal(lora_weights[n], dora_weights[n]) for n in lora_weights)
    # B starts at zero, so both start as the base model
    base = make_tiny_llama()(input_ids=input_ids).logits
    for model in (lora_model, dora_model):
        torch.testing.assert_close(model(input_ids=input_ids).logits, base)


def test_adalora_step_hook_reallocates_rank(input_ids):
    config = densemod.build_peft_config("adalora", r=4, target_modules="q,v", total_steps=20)
    assert (config.init_r, config.target_r, config.tinit, config.tfinal) == (6, 4, 2, 2)
    model = peft.get_peft_model(make_tiny_llama(), config)
    hook = densemod.step_hook(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(1, 4):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        hook(step)
        optimizer.zero_grad()
    # from step tinit on, AdaLoRA scores every singular value's importance
    assert len(model.base_model.rankallocator.ipt) == 2 * 2 * 3  # q and v in 2 layers, lora_A, lora_B, lora_E


@pytest.mark.parametrize("method", [m for m in densemod.METHODS if m != "adalora"])
def test_other_methods_step_hook_changes_nothing(method, input_ids):
    model = peft.get_peft_model(make_tiny_llama(), densemod.build_peft_config(method, r=4, total_steps=10))
    model.train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters() if p.requires_grad}
    densemod.step_hook(model)(5)
    after = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert before.keys() == after.keys()
    assert all(torch.equal(w, after[n]) and torch.equal(g, after[n].grad) for n, (w, g) in before.items())
