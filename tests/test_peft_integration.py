"""DenseLoRA through PEFT's own API: save and load, dtype casts, several adapters, disable, merge."""

import pickle
import warnings

import peft
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import densemod
from conftest import PAPER_TARGETS, input_ids, logits, make_tiny_llama, train_step  # noqa: F401

N_KINDS, N_LAYERS = 5, 10  # q, k, v, up, down in each of the two decoder layers


def trained_adapter(variant: str = "denselora", r: int = 8, **kwargs) -> peft.PeftModel:
    config = densemod.DenseLoraConfig(r=r, target_modules=PAPER_TARGETS, variant=variant, init_weights=False, **kwargs)
    return peft.get_peft_model(make_tiny_llama(), config)


def shared_params(model: peft.PeftModel, adapter: str = "default") -> list[torch.nn.Parameter]:
    tuner = model.base_model
    return [*tuner.denselora_encoder[adapter].values(), *tuner.denselora_decoder[adapter].values()]


def layers(model: peft.PeftModel) -> list[densemod.DenseLoraLayer]:
    return [m for m in model.modules() if isinstance(m, densemod.DenseLoraLayer)]


@pytest.mark.parametrize("variant", ["denselora", "freeze"])
def test_save_and_load_round_trip(variant, input_ids, tmp_path):
    model = trained_adapter(variant)
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path)

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert not (tmp_path / "adapter_model.bin").exists()
    # the shared pair once per kind, one M per layer, nothing else
    assert len(saved) == 2 * N_KINDS + N_LAYERS
    assert sum(".denselora_M" in key for key in saved) == N_LAYERS

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path, is_trainable=True)
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    torch.testing.assert_close(logits(loaded, input_ids), expected, rtol=0, atol=0)
    assert densemod.parameter_report(loaded).trainable == densemod.parameter_report(model).trainable


def test_loaded_adapter_is_frozen_for_inference(input_ids, tmp_path):
    model = trained_adapter()
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters())
    # loaded, not just frozen: the adapter's outputs, not the base model's
    torch.testing.assert_close(logits(loaded, input_ids), logits(model, input_ids), rtol=0, atol=0)
    assert (logits(loaded, input_ids) - logits(make_tiny_llama(), input_ids)).abs().max() > 1e-4


def test_disable_adapter_gives_the_base_logits(input_ids):
    base_logits = logits(make_tiny_llama(), input_ids)
    model = trained_adapter()
    adapted = logits(model, input_ids)
    assert (adapted - base_logits).abs().max() > 1e-4
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, input_ids), base_logits, rtol=0, atol=0)
    torch.testing.assert_close(logits(model, input_ids), adapted, rtol=0, atol=0)


def test_sharing_survives_a_cast_to_bf16(input_ids):
    model = trained_adapter()
    trainable = densemod.parameter_report(model).trainable
    model.to(torch.bfloat16)

    tuner = model.base_model
    for layer in layers(model):
        assert layer.shared.encoder is tuner.denselora_encoder and layer.shared.decoder is tuner.denselora_decoder
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert len({p.data_ptr() for p in shared_params(model)}) == 2 * N_KINDS
    assert densemod.parameter_report(model).trainable == trainable
    assert logits(model, input_ids).dtype == torch.bfloat16


@pytest.mark.parametrize(("autocast", "adapter_dtype"), [(True, torch.float32), (False, torch.bfloat16)])
def test_adapter_on_a_bf16_base_model(autocast, adapter_dtype, input_ids):
    base = make_tiny_llama(dtype=torch.bfloat16)
    config = densemod.DenseLoraConfig(r=8, target_modules=PAPER_TARGETS)
    model = peft.get_peft_model(base, config, autocast_adapter_dtype=autocast)

    adapter_params = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in adapter_params} == {adapter_dtype}
    assert len(adapter_params) == 2 * N_KINDS + N_LAYERS
    train_step(model, input_ids)
    assert logits(model, input_ids).dtype == torch.bfloat16


def test_a_second_adapter_is_added_switched_and_saved(input_ids, tmp_path):
    model = trained_adapter()
    first = logits(model, input_ids)
    second_config = densemod.DenseLoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False)
    model.add_adapter("second", second_config)
    tuner = model.base_model

    assert set(tuner.denselora_encoder) == {"default", "second"}
    assert tuner.denselora_encoder["second"]["q_proj"].shape == (4, 64)
    # add_adapter does not activate: outputs and trainability are the first adapter's
    torch.testing.assert_close(logits(model, input_ids), first, rtol=0, atol=0)
    assert not any(p.requires_grad for p in shared_params(model, "second"))

    model.set_adapter("second")
    second = logits(model, input_ids)
    assert (second - first).abs().max() > 1e-4
    assert all(p.requires_grad for p in shared_params(model, "second"))
    assert not any(p.requires_grad for p in shared_params(model, "default"))
    # q and v in two layers: (64+64)*4 + (64+32)*4 + 4 * 4^2
    assert densemod.parameter_report(model).trainable == 512 + 384 + 64

    model.set_adapter("default")
    torch.testing.assert_close(logits(model, input_ids), first, rtol=0, atol=0)

    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = reloaded.load_adapter(tmp_path / "second", adapter_name="second")
    assert not result.missing_keys and not result.unexpected_keys
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    reloaded.set_adapter("second")
    torch.testing.assert_close(logits(reloaded, input_ids), second, rtol=0, atol=0)


def test_delete_adapter_removes_its_shared_weights(input_ids):
    model = trained_adapter()
    first = logits(model, input_ids)
    parameters = densemod.parameter_report(model).trainable
    model.add_adapter("second", densemod.DenseLoraConfig(r=4, target_modules=["q_proj"]))
    model.delete_adapter("second")
    assert set(model.base_model.denselora_encoder) == set(model.base_model.denselora_decoder) == {"default"}
    # nothing of it is left in any layer or in the model's weights, and the first adapter works as before
    assert not [name for name, _ in model.named_parameters() if "second" in name]
    assert all(set(layer.denselora_M) == {"default"} for layer in layers(model))
    assert densemod.parameter_report(model).trainable == parameters
    torch.testing.assert_close(logits(model, input_ids), first, rtol=0, atol=0)


def test_only_matrix_merges_into_a_plain_model(input_ids):
    model = trained_adapter("only_matrix")
    expected = logits(model, input_ids)
    merged = model.merge_and_unload()

    assert type(merged) is LlamaForCausalLM
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, input_ids), expected, rtol=1e-5, atol=1e-5)


def test_only_matrix_merge_and_unmerge_in_place(input_ids):
    model = trained_adapter("only_matrix")
    expected = logits(model, input_ids)
    base_weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    model.merge_adapter()
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(
        model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, base_weight, rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("variant", ["denselora", "freeze"])
def test_nonlinear_variants_refuse_to_merge_and_stay_intact(variant, input_ids):
    model = trained_adapter(variant)
    expected = logits(model, input_ids)
    with pytest.raises(densemod.MergeError, match=rf"variant '{variant}'.*GELU.*no weight matrix"):
        model.merge_and_unload()
    with pytest.raises(densemod.MergeError):
        model.merge_adapter()
    assert len(layers(model)) == N_LAYERS and not any(layer.merged for layer in layers(model))
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=0, atol=0)


def test_low_cpu_mem_usage_load(input_ids, tmp_path):
    model = trained_adapter()
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path, low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    torch.testing.assert_close(logits(loaded, input_ids), expected, rtol=0, atol=0)


def test_pickling_keeps_one_shared_copy(input_ids):
    model = trained_adapter()
    expected = logits(model, input_ids)
    clone = pickle.loads(pickle.dumps(model))
    tuner = clone.base_model
    assert all(layer.shared.encoder is tuner.denselora_encoder for layer in layers(clone))
    assert densemod.parameter_report(clone).trainable == densemod.parameter_report(model).trainable
    torch.testing.assert_close(logits(clone, input_ids), expected, rtol=0, atol=0)
