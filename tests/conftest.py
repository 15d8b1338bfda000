import os
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch
from transformers import LlamaConfig, LlamaForCausalLM

# Ray must keep its traffic on 127.0.0.1 in tests (see STACK_NOTES).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# A small LLaMA with grouped-query attention: k_proj and v_proj map 64 -> 32, q_proj 64 -> 64,
# up_proj 64 -> 96, down_proj 96 -> 64; two decoder layers.
TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64,
)
PAPER_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def make_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY)).to(dtype).eval()


@pytest.fixture(scope="module")
def local_ray():
    """A fresh local Ray of two CPUs for one test module, reporting fast (see densetune.cluster.RAY_ENV)."""
    from densetune.cluster import RAY_ENV

    os.environ.update(RAY_ENV)
    ray.init(address="local", num_cpus=2, runtime_env={"env_vars": RAY_ENV})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny model's byte-level tokenizer: one token per UTF-8 byte, no BOS."""
    from densetune.trial.models import byte_tokenizer

    return byte_tokenizer()


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    """densetune's built-in tiny-llama, random weights, in eval mode."""
    from densetune.trial.models import tiny_llama

    return tiny_llama().eval()


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()  # new adapter layers start in training mode, with dropout on
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def train_step(model: torch.nn.Module, input_ids: torch.Tensor, lr: float = 1e-2) -> None:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    model.eval()


def checkpoint_steps(folder: Path) -> list[int]:
    """The steps of the trial checkpoints (checkpoint_000010, ...) begun so far anywhere under `folder`."""
    return sorted(int(path.name.removeprefix("checkpoint_")) for path in folder.glob("**/checkpoint_[0-9]*") if path.is_dir())


def is_ray_train_worker(process: psutil.Process) -> bool:
    """Whether a process is a Ray Train worker (its title is cut to 15 characters in the process name)."""
    return process.name().startswith("ray::RayTrainWor") or process.cmdline()[:1] == ["ray::RayTrainWorker"]


def kill_and_wait(process: psutil.Process, deadline_s: float = 30) -> None:
    """SIGKILL a process and wait until it has stopped running (gone, or a zombie its parent has not reaped yet)."""
    process.kill()
    deadline = time.monotonic() + deadline_s
    try:
        while process.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.01)
    except psutil.NoSuchProcess:
        pass
