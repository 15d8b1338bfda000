"""The precision a trial runs in: what 'auto' picks on each device, float16's autocast and gradient scaler, and the
scaler's state through a checkpoint."""

import dataclasses

import pytest
import torch

from densetune.trial import checkpoint as ckpt
from densetune.trial import precision as mixed
from densetune.config import TrialConfig
from densetune.trial.loop import build_state

CONFIG = TrialConfig(
    model="tiny-llama", rank=4, dropout=0.0, batch_size=4, micro_batch_size=2, datasets=["synthetic"],
    dtype="float16", cutoff_len=128, max_steps=4,
)
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def simulate_cuda(monkeypatch, native: bool) -> None:
    """A CUDA GPU as torch's hardware query reports it: with native bf16 (compute capability 8+) bf16 is supported
    either way; without it (T4, V100) only when emulation counts, torch's default."""
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation
    )


def simulate_cpu(monkeypatch, native: bool) -> None:
    for check in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, check, lambda: native, raising=False)


@pytest.mark.parametrize(("native", "chosen"), [(True, "bfloat16"), (False, "float16")])
def test_auto_on_a_gpu_is_bfloat16_only_where_it_is_native_else_float16(monkeypatch, native, chosen):
    simulate_cuda(monkeypatch, native)
    assert mixed.native_bf16(CUDA) is native
    assert mixed.resolve("auto", CUDA) == chosen


@pytest.mark.parametrize(("native", "chosen"), [(True, "bfloat16"), (False, "float32")])
def test_auto_on_a_cpu_is_bfloat16_where_it_is_native_else_float32(monkeypatch, native, chosen):
    simulate_cpu(monkeypatch, native)
    assert mixed.resolve("auto", CPU) == chosen


@pytest.mark.parametrize("setting", ["float32", "bfloat16", "float16"])
def test_a_named_precision_is_kept_on_every_device(monkeypatch, setting):
    simulate_cuda(monkeypatch, native=False)
    assert mixed.resolve(setting, CUDA) == mixed.resolve(setting, CPU) == setting


@pytest.mark.parametrize(("precision", "dtype"), [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_mixed_precisions_autocast_to_their_dtype(precision, dtype):
    with mixed.autocast(precision, CPU):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype
    with mixed.autocast("float32", CPU):
        assert not torch.is_autocast_enabled("cpu")


def test_only_float16_has_a_gradient_scaler():
    assert mixed.grad_scaler("float32", CPU) is None and mixed.grad_scaler("bfloat16", CPU) is None
    scaler = mixed.grad_scaler("float16", CPU)
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()


@pytest.mark.parametrize("method", ["denselora", "lora"])
def test_in_float16_the_base_is_float16_and_the_adapter_float32(method):
    model = build_state(dataclasses.replace(CONFIG, method=method), "float16", CPU, total_steps=4).model
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trainable == {torch.float32} and frozen == {torch.float16}


def stepped_scaler() -> torch.amp.GradScaler:
    """A scaler past its defaults: it backed off at an overflow, then stepped once (its growth tracker counts it)."""
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    for loss in (weight.sum() * float("inf"), weight.sum()):
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    return scaler


def test_the_scalers_state_survives_a_checkpoint(tmp_path):
    optimization = build_state(CONFIG, "float16", CPU, total_steps=4).optimization
    scaler = stepped_scaler()
    assert scaler.state_dict()["scale"] == 512.0 and scaler.state_dict()["_growth_tracker"] == 1
    ckpt.save_optimizer(optimization._replace(scaler=scaler), tmp_path)

    restored = torch.amp.GradScaler("cpu")
    ckpt.load_optimizer(optimization._replace(scaler=restored), tmp_path)
    assert restored.state_dict() == scaler.state_dict()


def test_a_run_resumed_in_another_precision_keeps_what_applies(tmp_path):
    """'auto' follows the workers' hardware, so a run may resume in float16 from a bfloat16 checkpoint (a fresh
    scaler) or the other way round (the saved scale unused)."""
    optimization = build_state(CONFIG, "float16", CPU, total_steps=4).optimization
    for precision in ("bf16", "fp16"):
        (tmp_path / precision).mkdir()
    ckpt.save_optimizer(optimization._replace(scaler=None), tmp_path / "bf16")
    fresh = torch.amp.GradScaler("cpu")
    ckpt.load_optimizer(optimization._replace(scaler=fresh), tmp_path / "bf16")
    assert fresh.state_dict() == torch.amp.GradScaler("cpu").state_dict()

    ckpt.save_optimizer(optimization._replace(scaler=stepped_scaler()), tmp_path / "fp16")
    ckpt.load_optimizer(optimization._replace(scaler=None), tmp_path / "fp16")  # no scaler to restore
