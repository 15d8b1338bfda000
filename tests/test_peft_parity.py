"""What a PEFT user relies on works for DenseLoRA as it does for LoRA on the same model: the generic config fields
(modules_to_save, layers_to_transform, layers_pattern, exclude_modules, inference_mode, bias, fan_in_fan_out),
several adapters, set_adapter, set_requires_grad, disable_adapter, peft_type, the model card, and loading."""

import copy
import json
import os
import pickle
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import peft
import pytest
import torch
from huggingface_hub import ModelCard
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

import densemod
from conftest import PAPER_TARGETS, TINY, input_ids, logits, make_tiny_llama, train_step  # noqa: F401
from densemod.denselora.card import CARD_LINE

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("lora", "denselora")
VOCAB_BY_HIDDEN = TINY["vocab_size"] * TINY["hidden_size"]  # the size of the tiny model's lm_head and embed_tokens
# Parameters and saved keys of the adapters themselves are named so; everything else is PEFT's generic machinery.
ADAPTER_MARK = "lora_"  # lora_A, lora_B and denselora_M, denselora_encoder, denselora_decoder


def config(method: str, **fields) -> peft.PeftConfig:
    """The same adapter in either method, initialised away from a no-op so that outputs show whether it is on."""
    fields = {"r": 4, "target_modules": PAPER_TARGETS, **fields}
    if method == "lora":
        return peft.LoraConfig(init_lora_weights=False, **fields)
    return densemod.DenseLoraConfig(init_weights=False, **fields)


def trainable(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def generic(names) -> set[str]:
    return {name for name in names if ADAPTER_MARK not in name}


def reload(folder, is_trainable: bool = False) -> peft.PeftModel:
    return peft.PeftModel.from_pretrained(make_tiny_llama(), folder, is_trainable=is_trainable)


def train_if_trainable(model: peft.PeftModel, input_ids) -> None:
    # A saved copy must differ from its original to show that it is saved and loaded.
    if trainable(model):
        train_step(model, input_ids)


GENERIC_SETTINGS = {
    "modules_to_save": dict(modules_to_save=["lm_head"]),
    "exclude_modules": dict(exclude_modules=r".*\.0\.self_attn\..*"),
    "layers_to_transform": dict(layers_to_transform=[1], layers_pattern="layers"),
    "layer_index": dict(layers_to_transform=0),
    "inference_mode": dict(inference_mode=True, modules_to_save=["lm_head"]),
}


def observe(model: peft.PeftModel, settings: dict, folder, input_ids, base_logits) -> dict:
    """What a user sees of the generic settings: it checks what must hold for any method and returns what LoRA and
    DenseLoRA must share."""
    facts = {"targeted": sorted(model.base_model.targeted_module_names), "trains": generic(trainable(model))}
    train_if_trainable(model, input_ids)
    expected = logits(model, input_ids)
    model.save_pretrained(folder)
    facts["saved"] = generic(load_file(folder / "adapter_model.safetensors"))
    saved_config = json.loads((folder / "adapter_config.json").read_text())
    facts["config"] = {key: saved_config[key] for key in settings}

    reloaded = reload(folder, is_trainable=not settings.get("inference_mode", False))
    assert trainable(reloaded) == trainable(model)
    torch.testing.assert_close(logits(reloaded, input_ids), expected, rtol=0, atol=0)
    with reloaded.disable_adapter():
        torch.testing.assert_close(logits(reloaded, input_ids), base_logits, rtol=0, atol=0)
    return facts


@pytest.mark.parametrize("name", GENERIC_SETTINGS)
def test_generic_fields_act_as_for_lora(name, input_ids, tmp_path):
    settings = GENERIC_SETTINGS[name]
    base_logits = logits(make_tiny_llama(), input_ids)
    facts = {
        method: observe(peft.get_peft_model(make_tiny_llama(), config(method, **settings)), settings,
                        tmp_path / method, input_ids, base_logits)
        for method in METHODS
    }
    assert facts["denselora"] == facts["lora"]
    assert facts["denselora"]["targeted"]
    if "modules_to_save" in settings:
        assert facts["denselora"]["saved"] == {"base_model.model.lm_head.weight"}


def several_adapters(method: str, settings: dict, input_ids, folder) -> dict:
    """Two adapters saving different modules, switched, trained, saved and loaded again; what a user observes."""
    model = peft.get_peft_model(make_tiny_llama(), config(method, **settings))
    train_if_trainable(model, input_ids)
    second = {**settings, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["embed_tokens"]}
    model.add_adapter("second", config(method, **second))
    facts = {"after add_adapter": generic(trainable(model))}
    model.set_adapter("second")
    facts["after set_adapter"] = generic(trainable(model))
    train_step(model, input_ids)
    expected = {"second": logits(model, input_ids)}
    model.set_adapter("default")
    expected["default"] = logits(model, input_ids)
    facts["state dicts"] = {
        name: generic(peft.get_peft_model_state_dict(model, adapter_name=name)) for name in expected
    }

    base_state = peft.get_base_model_state_dict(model)
    untouched = make_tiny_llama().state_dict()
    assert base_state.keys() == untouched.keys()
    assert all(torch.equal(base_state[key], untouched[key]) for key in untouched)

    model.save_pretrained(folder)
    loaded = reload(folder)
    loaded.load_adapter(folder / "second", adapter_name="second")
    assert not trainable(loaded)
    for name, values in expected.items():
        loaded.set_adapter(name)
        torch.testing.assert_close(logits(loaded, input_ids), values, rtol=0, atol=0)
    facts["after set_adapter on the loaded model"] = generic(trainable(loaded))
    return facts


@pytest.mark.parametrize("name", GENERIC_SETTINGS)
def test_several_adapters_with_their_own_saved_modules(name, input_ids, tmp_path):
    settings = GENERIC_SETTINGS[name]
    facts = {method: several_adapters(method, settings, input_ids, tmp_path / method) for method in METHODS}
    assert facts["denselora"] == facts["lora"]
    second_copy = "base_model.model.model.embed_tokens.modules_to_save.second.weight"
    assert facts["denselora"]["after set_adapter"] == {second_copy}
    saved_by_default = {"base_model.model.lm_head.weight"} if "modules_to_save" in settings else set()
    assert facts["denselora"]["state dicts"] == {
        "default": saved_by_default, "second": {"base_model.model.model.embed_tokens.weight"},
    }


@pytest.mark.parametrize("name", GENERIC_SETTINGS)
@pytest.mark.parametrize("method", METHODS)
def test_set_requires_grad_on_a_loaded_adapter(method, name, tmp_path):
    settings = GENERIC_SETTINGS[name]
    peft.get_peft_model(make_tiny_llama(), config(method, **settings)).save_pretrained(tmp_path)
    training = {key: value for key, value in settings.items() if key != "inference_mode"}
    fresh = peft.get_peft_model(make_tiny_llama(), config(method, **training))
    loaded = reload(tmp_path)
    assert not trainable(loaded)
    loaded.set_requires_grad("default")
    # everything a fresh adapter trains, DenseLoRA's shared W_e, W_d and a saved module's copy included
    assert trainable(loaded) == trainable(fresh)
    loaded.set_requires_grad("default", requires_grad=False)
    assert not trainable(loaded)


def model_to_toggle(how: str, folder) -> peft.PeftModel:
    model = peft.get_peft_model(make_tiny_llama(), config("denselora", modules_to_save=["lm_head"]))
    if how == "get_peft_model":
        return model
    model.save_pretrained(folder)
    return reload(folder, is_trainable=how == "loaded to train")


@pytest.mark.parametrize("how", ["get_peft_model", "loaded for inference", "loaded to train"])
def test_disabling_never_changes_what_trains(how, input_ids, tmp_path):
    # PEFT's own layers flip requires_grad here: LoRA loaded for inference trains after `disable_adapter()`.
    model = model_to_toggle(how, tmp_path)
    before = trainable(model)
    assert bool(before) == (how != "loaded for inference")
    with model.disable_adapter():
        assert trainable(model) == before
        logits(model, input_ids)  # nor does a forward pass of the base model
        assert trainable(model) == before
    assert trainable(model) == before
    model.base_model.disable_adapter_layers()
    assert trainable(model) == before
    model.base_model.enable_adapter_layers()
    assert trainable(model) == before


@pytest.mark.parametrize("bias", ["all", "lora_only", "denselora_only"])
def test_bias_other_than_none_is_refused(bias):
    expected = rf"^bias must be 'none': DenseLoRA has no bias of its own to train; got '{bias}'$"
    with pytest.raises(ValueError, match=expected):
        densemod.DenseLoraConfig(bias=bias)
    assert densemod.DenseLoraConfig().bias == "none"


@pytest.mark.parametrize("method", METHODS)
def test_layer_selection_needs_target_names(method):
    with pytest.raises(ValueError, match="layers_to_transform"):
        config(method, target_modules=r".*\.q_proj", layers_to_transform=[0])
    with pytest.raises(ValueError, match="layers_pattern"):
        config(method, layers_pattern="layers")


def test_layer_selection_message():
    with pytest.raises(ValueError, match=r"^layers_to_transform and layers_pattern need target_modules as a list of "
                                         r"names, not the string 'all-linear'$"):
        densemod.DenseLoraConfig(target_modules="all-linear", layers_to_transform=[0])


def make_tiny_gpt2() -> GPT2LMHeadModel:
    """A two-layer GPT-2: its attention and MLP projections are transformers' Conv1D, weight stored (in, out)."""
    torch.manual_seed(0)
    gpt2 = GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(gpt2).eval()


def fan_in_fan_out_warnings(method: str, fan_in_fan_out: bool) -> tuple[list[str], peft.PeftModel]:
    cfg = config(method, target_modules=["c_attn", "c_fc"], fan_in_fan_out=fan_in_fan_out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.get_peft_model(make_tiny_gpt2(), cfg)
    return [str(w.message) for w in caught if "fan_in_fan_out" in str(w.message)], model


@pytest.mark.parametrize("fan_in_fan_out", [True, False])
def test_gpt2_conv1d_fan_in_fan_out_as_lora(fan_in_fan_out):
    lora_warned, lora = fan_in_fan_out_warnings("lora", fan_in_fan_out)
    dense_warned, dense = fan_in_fan_out_warnings("denselora", fan_in_fan_out)
    # both correct False to True, with a warning, and accept True silently
    assert bool(dense_warned) == bool(lora_warned) == (not fan_in_fan_out)
    assert dense.peft_config["default"].fan_in_fan_out is lora.peft_config["default"].fan_in_fan_out is True
    assert dense.base_model.targeted_module_names == lora.base_model.targeted_module_names
    if dense_warned:
        assert dense_warned[0] == (
            "fan_in_fan_out=False but target 'transformer.h.0.attn.c_attn' is a Conv1D, whose weight is stored "
            "(in, out); setting fan_in_fan_out=True"
        )


def test_gpt2_conv1d_trains_saves_loads_and_merges(input_ids, tmp_path):
    base_logits = logits(make_tiny_gpt2(), input_ids)
    cfg = densemod.DenseLoraConfig(
        r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, variant="only_matrix", init_weights=False
    )
    predicted = densemod.predict_trainable(cfg, densemod.target_shapes(make_tiny_gpt2(), cfg))
    model = peft.get_peft_model(make_tiny_gpt2(), cfg)
    report = densemod.parameter_report(model)
    # c_attn 64 -> 192 and c_fc 64 -> 256, one W_e, W_d each, and 4 layers' M
    assert report.trainable == report.predicted_trainable == predicted == (64 + 192 + 64 + 256) * 4 + 4 * 16

    train_step(model, input_ids)
    expected = logits(model, input_ids)
    assert (expected - base_logits).abs().max() > 1e-4
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(make_tiny_gpt2(), tmp_path)
    torch.testing.assert_close(logits(loaded, input_ids), expected, rtol=0, atol=0)
    with loaded.disable_adapter():
        torch.testing.assert_close(logits(loaded, input_ids), base_logits, rtol=0, atol=0)
    torch.testing.assert_close(logits(loaded.merge_and_unload(), input_ids), expected, rtol=1e-5, atol=1e-5)


def test_gpt2_kinds_of_two_shapes_fail_before_the_model_is_touched():
    # attn.c_proj maps 64 -> 64, mlp.c_proj 256 -> 64: one kind, two shapes
    gpt2 = make_tiny_gpt2()
    cfg = densemod.DenseLoraConfig(r=4, target_modules="all-linear", fan_in_fan_out=True)
    expected = (r"^layers of kind 'c_proj' differ in shape \(in 64, out 64 vs in 256, out 64\), so they cannot share "
                r"one encoder and decoder; use share_scope='layer'$")
    with pytest.raises(ValueError, match=expected):
        peft.get_peft_model(gpt2, cfg)
    assert not any(isinstance(m, densemod.DenseLoraLayer) for m in gpt2.modules())
    cfg = densemod.DenseLoraConfig(r=4, target_modules="all-linear", fan_in_fan_out=True, share_scope="layer")
    model = peft.get_peft_model(gpt2, cfg)
    report = densemod.parameter_report(model)
    assert report.trainable == report.predicted_trainable


def test_gpt2_default_targets_are_loras():
    dense = peft.get_peft_model(make_tiny_gpt2(), densemod.DenseLoraConfig(r=4, fan_in_fan_out=True))
    lora = peft.get_peft_model(make_tiny_gpt2(), peft.LoraConfig(r=4, fan_in_fan_out=True))
    assert dense.base_model.targeted_module_names == lora.base_model.targeted_module_names


def test_peft_type_behaves_like_a_peft_type_member(tmp_path):
    model = peft.get_peft_model(make_tiny_llama(), config("denselora"))
    peft_type = model.active_peft_config.peft_type
    assert peft_type.value == "DENSELORA" and peft_type == "DENSELORA" and hash(peft_type) == hash("DENSELORA")
    assert {"DENSELORA": 1}[peft_type] == 1 and PEFT_TYPE_TO_CONFIG_MAPPING["DENSELORA"] is densemod.DenseLoraConfig
    # PEFT's get_model_status reads the member's name from str(), as for str(PeftType.LORA) == "PeftType.LORA"
    assert peft.get_model_status(model).peft_types == {"default": "DENSELORA"}
    assert copy.deepcopy(peft_type) is pickle.loads(pickle.dumps(peft_type)) is peft_type

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "DENSELORA"
    for loaded in (peft.PeftConfig.from_pretrained(tmp_path), peft.PeftConfig.from_peft_type(**saved)):
        assert type(loaded) is densemod.DenseLoraConfig and loaded.peft_type is densemod.denselora.PEFT_TYPE
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text()) == saved


def test_model_card_names_denselora(tmp_path):
    model = peft.get_peft_model(make_tiny_llama(), config("denselora", task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # PEFT updates an existing card: the line must not repeat
    card = ModelCard.load(tmp_path / "README.md")
    assert {"denselora", "densemod", "transformers"} <= set(card.data.tags)
    assert card.data.library_name == "peft" and card.text.count(CARD_LINE) == 1
    assert "DenseLoRA (Mu et al., ACL 2025)" in CARD_LINE and "import densemod" in CARD_LINE

    peft.get_peft_model(make_tiny_llama(), config("lora")).save_pretrained(tmp_path / "lora")
    assert CARD_LINE not in (tmp_path / "lora" / "README.md").read_text()


# The child imports only peft and transformers, as a user who forgot `import densemod` does.
CHILD = """
import json, sys, traceback
import peft, transformers
print("densemod imported with peft:", "densemod" in sys.modules)
folder = sys.argv[1]
base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**json.loads(sys.argv[2])))
for load in (lambda: peft.PeftConfig.from_pretrained(folder), lambda: peft.PeftModel.from_pretrained(base, folder).base_model):
    try:
        print(type(load()).__name__)
    except Exception as exc:
        print(traceback.format_exception_only(exc)[-1].strip())
"""


@pytest.mark.parametrize(
    "autoload, printed",
    [
        ("1", ["densemod imported with peft: True", "DenseLoraConfig", "DenseLoraModel"]),
        # PEFT 0.21.2 looks the type up in its own dict; without densemod imported, this is all it says
        ("0", ["densemod imported with peft: False", "KeyError: 'DENSELORA'", "KeyError: 'DENSELORA'"]),
    ],
)
def test_an_installed_densemod_loads_its_adapters_without_import_densemod(autoload, printed, tmp_path):
    peft.get_peft_model(make_tiny_llama(), config("denselora")).save_pretrained(tmp_path)
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), json.dumps(TINY)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "DENSEMOD_AUTOLOAD": autoload},
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.splitlines() == printed
    assert "`import densemod`" in (tmp_path / "README.md").read_text()


def test_the_wheel_carries_the_line_that_imports_densemod_with_peft(tmp_path):
    build = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    built = subprocess.run([sys.executable, "-c", build, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, check=True)
    wheel = zipfile.ZipFile(tmp_path / built.stdout.splitlines()[-1])
    # beside the two packages, at the top of site-packages once installed
    assert sorted(name for name in wheel.namelist() if "/" not in name) == ["densemod-autoload.pth", "densemod_autoload.py"]
    assert wheel.read("densemod-autoload.pth") == b"import densemod_autoload; densemod_autoload.install()\n"


@pytest.mark.parametrize("method", METHODS)
def test_accounting_counts_the_saved_copies(method):
    base = make_tiny_llama()
    cfg = config(method, modules_to_save=["lm_head"])
    saved = densemod.saved_module_parameters(base, cfg)
    predicted = densemod.predict_trainable(cfg, densemod.target_shapes(base, cfg), saved)
    model = peft.get_peft_model(base, cfg)
    report = densemod.parameter_report(model)

    assert (report.trainable, report.total) == model.get_nb_trainable_parameters()
    assert report.trainable == report.predicted_trainable == predicted
    assert report.saved_trainable == saved == VOCAB_BY_HIDDEN
    assert f"(modules_to_save copies: {VOCAB_BY_HIDDEN:,d})" in str(report)
    if method == "denselora":
        # per kind (k + d) * 4: q 128, k and v 96 each, up and down 160 each; 10 layers * 4^2; the lm_head copy
        assert report.trainable == (128 + 2 * 96 + 2 * 160) * 4 + 10 * 16 + VOCAB_BY_HIDDEN

    model.add_adapter("second", config(method, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    model.set_adapter("second")
    report = densemod.parameter_report(model)
    assert report.trainable == report.predicted_trainable == model.get_nb_trainable_parameters()[0]
    assert report.saved_trainable == VOCAB_BY_HIDDEN  # the embedding's copy; the lm_head copy is frozen now
