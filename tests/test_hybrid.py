"""Hybrid adapters: PEFT's LoRA on some module kinds and DenseLoRA on others, one adapter (the paper's Table 8)."""

import json

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

import densemod
from densemod.accounting import meta_model, target_shapes
from conftest import PAPER_TARGETS, input_ids, logits, make_tiny_llama, train_step  # noqa: F401

LORA_KINDS = ("q_proj", "k_proj", "v_proj")
DENSE_KINDS = ("up_proj", "down_proj")


def hybrid(r: int = 4, **kwargs) -> peft.PeftModel:
    return peft.get_peft_model(make_tiny_llama(), densemod.build_peft_config("hybrid", r, **kwargs))


def adapted(model: peft.PeftModel) -> dict[str, BaseTunerLayer]:
    """kind -> its adapted layers, over both decoder layers."""
    layers: dict[str, list[BaseTunerLayer]] = {}
    for key, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            layers.setdefault(key.rpartition(".")[2], []).append(module)
    return layers


def trained_hybrid(input_ids: torch.Tensor, steps: int = 2) -> peft.PeftModel:
    model = hybrid()
    for _ in range(steps):
        train_step(model, input_ids)
    return model


def tiny_by_hand(r: int) -> int:
    """LoRA: 2 layers * ((64 + 64) + 2 * (64 + 32)) * r on q, k, v; DenseLoRA: ((64 + 96) + (96 + 64)) * r for the
    shared W_e, W_d of up and down once, plus 4 adapted layers * r^2."""
    return 2 * ((64 + 64) + 2 * (64 + 32)) * r + ((64 + 96) + (96 + 64)) * r + 4 * r * r


def test_the_default_hybrid_is_table_8():
    config = densemod.build_peft_config("hybrid", 4)
    assert isinstance(config, densemod.DenseLoraConfig)
    assert (config.target_modules, config.lora_modules) == (set(PAPER_TARGETS), set(LORA_KINDS))
    assert (config.lora_alpha, config.lora_dropout) == (8, 0.05)

    model = peft.get_peft_model(make_tiny_llama(), config)
    layers = adapted(model)
    assert set(layers) == {*LORA_KINDS, *DENSE_KINDS}
    for kind in LORA_KINDS:
        assert len(layers[kind]) == 2
        for layer in layers[kind]:
            assert isinstance(layer, LoraLayer) and not isinstance(layer, densemod.DenseLoraLayer)
            assert (layer.r["default"], layer.scaling["default"], layer.lora_dropout["default"].p) == (4, 2.0, 0.05)
    tuner = model.base_model
    for kind in DENSE_KINDS:
        assert len(layers[kind]) == 2
        for layer in layers[kind]:
            assert isinstance(layer, densemod.DenseLoraLayer)
            w_e, w_d = layer.shared.weights("default", layer.share_key["default"])
            assert w_e is tuner.denselora_encoder["default"][kind] and w_d is tuner.denselora_decoder["default"][kind]
    assert set(tuner.denselora_encoder["default"]) == set(DENSE_KINDS)


@pytest.mark.parametrize("r", [4, 8])
def test_trainable_count_is_exact(r):
    base = make_tiny_llama()
    config = densemod.build_peft_config("hybrid", r)
    predicted_before = densemod.predict_trainable(config, target_shapes(base, config))

    model = peft.get_peft_model(base, config)
    report = densemod.parameter_report(model)

    requires_grad = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.trainable == report.predicted_trainable == predicted_before == requires_grad == tiny_by_hand(r)
    assert tiny_by_hand(4) == 2_560 + 1_344


@pytest.mark.parametrize(
    ("settings", "dense_by_hand"),
    [
        # no sharing: each of the 2 up and 2 down layers has its own W_e, W_d
        (dict(share_scope="layer"), 2 * ((64 + 96) + (96 + 64)) * 4 + 4 * 4 * 4),
        # freeze: W_e, W_d stay at their initialisation; only the 4 matrices M train
        (dict(variant="freeze"), 4 * 4 * 4),
    ],
)
def test_the_denselora_part_takes_its_variant_and_share_scope(settings, dense_by_hand):
    model = hybrid(**settings)
    report = densemod.parameter_report(model)
    lora_by_hand = 2 * ((64 + 64) + 2 * (64 + 32)) * 4
    assert report.trainable == report.predicted_trainable == lora_by_hand + dense_by_hand
    for layer in adapted(model)["q_proj"]:
        assert isinstance(layer, LoraLayer)


def test_trainable_count_on_llama_2_7b():
    """LoRA on q, k, v: 32 * 3 * (4096 + 4096) * 16; DenseLoRA on up, down: 2 * (4096 + 11008) * 16 + 64 * 16^2.

    Built as densetune.trial checks a trial before any worker starts: on the meta device, low_cpu_mem_usage."""
    config = densemod.build_peft_config("hybrid", 16)
    model = peft.get_peft_model(meta_model("llama-2-7b"), config, low_cpu_mem_usage=True)
    report = densemod.parameter_report(model)
    assert report.trainable == report.predicted_trainable == 12_582_912 + 483_328 + 16_384


def test_a_training_step_trains_both_parts(input_ids):
    model = hybrid()
    untrained = logits(model, input_ids)
    layers, tuner = adapted(model), model.base_model
    lora_b = [layer.lora_B["default"].weight for kind in LORA_KINDS for layer in layers[kind]]
    w_d = list(tuner.denselora_decoder["default"].values())
    before = [p.detach().clone() for p in lora_b + w_d]

    train_step(model, input_ids)

    # B and W_d start at zero (both parts start as no-ops), so they are the ones with a gradient at the first step.
    assert all(not torch.equal(a, b) for a, b in zip(before, lora_b + w_d))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b + w_d)
    assert not torch.equal(untrained, logits(model, input_ids))


def test_save_and_load_round_trip(input_ids, tmp_path):
    model = trained_hybrid(input_ids)
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path)

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sum("lora_A" in key for key in saved) == sum("lora_B" in key for key in saved) == 6
    assert sum("denselora_M" in key for key in saved) == 4
    assert sorted(k for k in saved if "denselora_encoder" in k or "denselora_decoder" in k) == [
        f"base_model.denselora_{part}.{kind}" for part in ("decoder", "encoder") for kind in ("down_proj", "up_proj")
    ]
    assert set(json.loads((tmp_path / "adapter_config.json").read_text())["lora_modules"]) == set(LORA_KINDS)

    loaded = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    assert torch.equal(logits(loaded, input_ids), expected)
    assert densemod.parameter_report(loaded).trainable == 0
    trainable = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path, is_trainable=True)
    report = densemod.parameter_report(trainable)
    assert report.trainable == report.predicted_trainable == tiny_by_hand(4)


def test_low_cpu_mem_usage_load(input_ids, tmp_path):
    model = trained_hybrid(input_ids)
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path, low_cpu_mem_usage=True)
    assert torch.equal(logits(loaded, input_ids), logits(model, input_ids))


def test_both_parts_train_in_float32_on_a_bf16_base(input_ids):
    model = peft.get_peft_model(make_tiny_llama(dtype=torch.bfloat16), densemod.build_peft_config("hybrid", 4))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == tiny_by_hand(4)
    assert {p.dtype for p in trainable} == {torch.float32}
    train_step(model, input_ids)
    assert torch.isfinite(logits(model, input_ids)).all()


def test_the_platforms_state_dict_round_trip(input_ids):
    """What densetune.trial.checkpoint does on resume: the adapter's state dict into a freshly built model."""
    model = trained_hybrid(input_ids)
    state = peft.get_peft_model_state_dict(model)
    fresh = hybrid()
    assert set(state) == set(peft.get_peft_model_state_dict(fresh))
    peft.set_peft_model_state_dict(fresh, state)
    assert torch.equal(logits(fresh, input_ids), logits(model, input_ids))


def test_disable_adapter_switches_both_parts_off(input_ids):
    model = trained_hybrid(input_ids)
    adapted_logits = logits(model, input_ids)
    flags = [p.requires_grad for p in model.parameters()]
    with model.disable_adapter():
        assert torch.equal(logits(model, input_ids), logits(make_tiny_llama(), input_ids))
    assert torch.equal(logits(model, input_ids), adapted_logits)
    assert [p.requires_grad for p in model.parameters()] == flags


def test_a_second_hybrid_adapter_is_switched_to(input_ids):
    model = hybrid()
    model.add_adapter("second", densemod.build_peft_config("hybrid", 8))
    model.set_adapter("second")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".second" in name for name in trainable)
    report = densemod.parameter_report(model)
    assert report.trainable == report.predicted_trainable == tiny_by_hand(8)


def test_only_matrix_hybrid_merges_into_a_plain_model(input_ids):
    config = densemod.DenseLoraConfig(
        r=4, target_modules=PAPER_TARGETS, lora_modules=list(LORA_KINDS), variant="only_matrix", init_weights=False
    )
    model = peft.get_peft_model(make_tiny_llama(), config)
    expected = logits(model, input_ids)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, input_ids), expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lora_targets=""), r"^lora_targets must name at least one module; got ''$"),
        (dict(lora_targets="q,k,v,up,down"), r"^lora_modules \['down_proj', 'k_proj', 'q_proj', 'up_proj', 'v_proj'\] "
         r"cover every target \['down_proj', 'k_proj', 'q_proj', 'up_proj', 'v_proj'\], leaving DenseLoRA none; "
         r"leave it some, or use peft.LoraConfig$"),
        (dict(lora_targets="q,o"), r"^lora module 'o_proj' names none of the targeted layers; lora_modules must name "
         r"some of the targets \['down_proj', 'k_proj', 'q_proj', 'up_proj', 'v_proj'\]$"),
        (dict(target_modules="ud"), r"^method 'hybrid' puts LoRA on the attention projections among its targets, "
         r"and \['up_proj', 'down_proj'\] has none \(q_proj, k_proj, v_proj, o_proj\); name LoRA's part with "
         r"lora_targets$"),
        (dict(lora_targets="all-linear"), r"^lora_modules must be None or a non-empty list of module names, some of "
         r"target_modules; got 'all-linear'$"),
    ],
)
def test_bad_input_fails_in_one_line_before_the_model_is_touched(kwargs, message):
    base = make_tiny_llama()
    with pytest.raises(ValueError, match=message) as error:
        peft.get_peft_model(base, densemod.build_peft_config("hybrid", 4, **kwargs))
    assert "\n" not in str(error.value)
    assert not any(isinstance(m, BaseTunerLayer) for m in base.modules())


@pytest.mark.parametrize("lora_modules", [[], "q_proj", ["q_proj", ""]])
def test_lora_modules_must_be_a_list_of_names(lora_modules):
    with pytest.raises(ValueError, match=r"^lora_modules must be None or a non-empty list of module names"):
        densemod.DenseLoraConfig(r=4, target_modules=PAPER_TARGETS, lora_modules=lora_modules)


def test_lora_targets_belong_to_the_hybrid_only():
    with pytest.raises(ValueError, match=r"^lora_targets applies to method 'hybrid' only; got method 'lora'$"):
        densemod.build_peft_config("lora", 4, lora_targets="q,k,v")


def test_a_layer_holds_adapters_of_one_kind():
    model = hybrid()
    with pytest.raises(ValueError, match=r"^layer 'model.layers.0.self_attn.q_proj' holds LoRA adapters \['default'\]; "
                       r"adapter 'other' cannot put DenseLoRA on it: a layer holds adapters of one kind$"):
        model.add_adapter("other", densemod.build_peft_config("denselora", 4, target_modules="q"))
