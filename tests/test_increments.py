"""Snapshots of DenseLoRA's M and LoRA's A/B slices during training, their increments and heat maps."""

import peft
import pytest
import torch

import densemod
from conftest import PAPER_TARGETS, make_tiny_llama, train_step
from densetune.trial.increments import (
    SnapshotRecorder,
    _representative,
    by_step,
    increment_figures,
    increments,
    load_snapshots,
    snapshot,
    top_share,
)

R = 4
LAYERS = 2
GROUP = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "up_proj": "mlp", "down_proj": "mlp"}
MODULE_PATHS = {f"model.layers.{i}.{GROUP[kind]}.{kind}" for i in range(LAYERS) for kind in PAPER_TARGETS}


def adapted(method: str) -> peft.PeftModel:
    config = densemod.build_peft_config(method, R, None, 0.0, "q,k,v,up,down", "denselora", total_steps=10)
    return peft.get_peft_model(make_tiny_llama(), config)


def layer(model: peft.PeftModel, path: str) -> torch.nn.Module:
    return model.base_model.model.get_submodule(path)


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def recorded(method: str, input_ids: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
    """The flat snapshots of `steps` optimizer steps, recorded before the first and after each."""
    model, recorder = adapted(method), SnapshotRecorder()
    recorder.record(0, model)
    for step in range(1, steps + 1):
        train_step(model, input_ids)
        recorder.record(step, model)
    return recorder.snapshots()


def test_denselora_snapshot_holds_one_M_per_adapted_layer():
    model = adapted("denselora")
    matrices = snapshot(model)
    assert set(matrices) == {f"{path}/M" for path in MODULE_PATHS}
    for key, tensor in matrices.items():
        assert tensor.shape == (R, R) and tensor.dtype == torch.float32 and tensor.device.type == "cpu"
        assert not tensor.requires_grad
        assert torch.equal(tensor, layer(model, key.rpartition("/")[0]).denselora_M["default"])


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_snapshot_holds_the_first_r_columns_of_A_and_rows_of_B(method):
    model = adapted(method)
    for module in model.modules():
        if hasattr(module, "lora_B"):  # LoRA's B starts at zero: make the slices tell rows from columns
            torch.nn.init.normal_(module.lora_B["default"].weight)
    matrices = snapshot(model)
    assert set(matrices) == {f"{path}/{m}" for path in MODULE_PATHS for m in "AB"}
    for path in MODULE_PATHS:
        a, b = layer(model, path).lora_A["default"].weight, layer(model, path).lora_B["default"].weight
        assert a.shape[1] > R and b.shape[0] > R
        assert matrices[f"{path}/A"].shape == matrices[f"{path}/B"].shape == (R, R)
        assert torch.equal(matrices[f"{path}/A"], a[:, :R])
        assert torch.equal(matrices[f"{path}/B"], b[:R, :])


@pytest.mark.parametrize("method", ["vera", "lokr", "adalora"])
def test_methods_without_a_comparable_matrix_give_nothing(method):
    model = adapted(method)
    assert snapshot(model) == {}
    recorder = SnapshotRecorder()
    recorder.record(0, model)
    assert len(recorder) == 0


@pytest.mark.parametrize("method, matrix", [("denselora", "M"), ("lora", "A"), ("lora", "B")])
def test_increments_are_the_absolute_change_over_one_optimizer_step(method, matrix, input_ids):
    model = adapted(method)
    path = "model.layers.1.self_attn.q_proj"
    weight = {"M": lambda m: m.denselora_M["default"], "A": lambda m: m.lora_A["default"].weight[:, :R],
              "B": lambda m: m.lora_B["default"].weight[:R, :]}[matrix]
    before = weight(layer(model, path)).detach().clone()
    first = snapshot(model)
    train_step(model, input_ids)
    after = weight(layer(model, path)).detach().clone()
    moved = increments({
        **{f"step0/{k}": t for k, t in first.items()}, **{f"step1/{k}": t for k, t in snapshot(model).items()}
    })
    assert set(moved) == set(first)
    assert torch.equal(moved[f"{path}/{matrix}"], (after - before).abs())
    assert moved[f"{path}/{matrix}"].sum() > 0


def test_increments_compare_the_earliest_and_latest_steps_of_each_key():
    zero, one, three = torch.zeros(2, 2), torch.ones(2, 2), torch.full((2, 2), 3.0)
    snapshots = {"step10/x/M": three, "step0/x/M": one, "step5/x/M": zero, "step5/y/A": one, "step7/y/A": zero}
    moved = increments(snapshots)
    assert torch.equal(moved["x/M"], torch.full((2, 2), 2.0))
    assert torch.equal(moved["y/A"], one)
    assert increments({"step0/x/M": one}) == {}


def test_snapshots_round_trip_through_safetensors(tmp_path, input_ids):
    model, recorder = adapted("denselora"), SnapshotRecorder()
    recorder.record(0, model)
    train_step(model, input_ids)
    recorder.record(3, model)
    assert len(recorder) == 2
    recorder.save(tmp_path / "snapshots.safetensors")

    flat = load_snapshots(tmp_path / "snapshots.safetensors")
    assert set(flat) == {f"step{s}/{path}/M" for s in (0, 3) for path in MODULE_PATHS}
    steps = by_step(flat)
    assert list(steps) == [0, 3]
    assert torch.equal(steps[3]["model.layers.0.mlp.up_proj/M"], snapshot(model)["model.layers.0.mlp.up_proj/M"])
    assert len(SnapshotRecorder(flat)) == 2  # a resumed run continues the record


def test_by_step_rejects_keys_without_a_step():
    with pytest.raises(ValueError, match="step<step>"):
        by_step({"model.layers.0.self_attn.q_proj/M": torch.zeros(2, 2)})


def test_top_share_tells_spread_from_concentrated():
    assert top_share(torch.ones(10, 10)) == pytest.approx(0.1)
    assert top_share(torch.eye(10)[0].reshape(2, 5)) == pytest.approx(1.0)
    assert top_share(torch.tensor([[1.0, 3.0]])) == pytest.approx(0.75)  # at least one entry


def test_representative_layers_are_first_middle_and_last_of_q_proj():
    keys = [f"model.layers.{i}.{GROUP[kind]}.{kind}/M" for i in range(12) for kind in PAPER_TARGETS]
    assert _representative(keys) == {f"model.layers.{i}.self_attn.q_proj" for i in (0, 6, 11)}
    assert _representative([k for k in keys if "q_proj" not in k]) == {
        f"model.layers.{i}.mlp.down_proj" for i in (0, 6, 11)
    }


@pytest.mark.parametrize("method", ["denselora", "lora"])
def test_increment_figures_write_one_png_per_method(method, tmp_path, input_ids):
    snapshots = recorded(method, input_ids, steps=2)
    paths = increment_figures(snapshots, tmp_path, f"{method}_")
    assert paths == [tmp_path / f"{method}_increments.png"]
    assert paths[0].read_bytes().startswith(b"\x89PNG")
    one_step = {k: t for k, t in snapshots.items() if k.startswith("step0/")}
    assert increment_figures(one_step, tmp_path / "none", "x_") == []


def test_merged_runs_get_a_figure_per_method(tmp_path, input_ids):
    snapshots = {**recorded("denselora", input_ids, steps=1), **recorded("lora", input_ids, steps=1)}
    paths = increment_figures(snapshots, tmp_path, "both_")
    assert paths == [tmp_path / "both_denselora_increments.png", tmp_path / "both_lora_increments.png"]
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in paths)
