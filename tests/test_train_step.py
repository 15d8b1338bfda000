"""The trainer's step, without Ray: what it reports as the loss, for every method alike."""

import dataclasses
import math

import pytest
import torch

from densetune.config import TrialConfig
from densetune.data.batching import TokenCounts
from densetune.data.tokens import collate
from densetune.trial.inputs import load_data
from densetune.trial.models import load_tokenizer
from densetune.trial.loop import build_state, require_gpu, target_loss_sum, train_step

CONFIG = TrialConfig(
    model="tiny-llama", rank=4, dropout=0.0, batch_size=4, micro_batch_size=2, datasets=["synthetic"],
    dtype="float32", cutoff_len=128, max_steps=4,
)
# no warm-up, so that the first steps move the adapter
FP16 = dataclasses.replace(CONFIG, dtype="float16", lr=1e-2, warmup_steps=0)
CPU = torch.device("cpu")


def micro_batches(config: TrialConfig) -> list[dict[str, torch.Tensor]]:
    """A step's two micro-batches of two rows."""
    rows = load_data(config).train
    return [collate(rows, [i, i + 1], load_tokenizer(config.model).pad_token_id) for i in (0, 2)]


def counted(batches: list[dict[str, torch.Tensor]]) -> TokenCounts:
    return TokenCounts(
        tokens=sum(int(b["attention_mask"].sum()) for b in batches),
        slots=sum(b["attention_mask"].numel() for b in batches),
    )


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def one_step(method: str):
    """The model before its first step, the step's result, and the step's micro-batches."""
    config = dataclasses.replace(CONFIG, method=method)
    batches = micro_batches(config)
    state = build_state(config, "float32", CPU, total_steps=4)
    model = state.model
    targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    model.train()
    with torch.no_grad():
        # the transformers model under the adapter alone: the task's loss, without what the PEFT model adds to it
        task = sum(model.base_model.model(**b, num_items_in_batch=targets).loss.item() for b in batches)
        whole = sum(model(**b, num_items_in_batch=targets).loss.item() for b in batches)
    return task, whole, train_step(state, batches, counted(batches))


def test_adalora_reports_the_task_loss_and_its_orthogonality_penalty_apart():
    task, whole, step = one_step("adalora")
    assert whole - task > 1e-3  # AdaLoRA adds orth_reg_weight times its penalty to the model's loss
    assert step.loss == pytest.approx(whole, rel=1e-5)  # what was minimised
    assert step.task_loss == pytest.approx(task, rel=1e-5) and step.aux_loss == pytest.approx(whole - task, rel=1e-4)


@pytest.mark.parametrize("method", ["denselora", "lora"])
def test_other_methods_have_no_auxiliary_loss(method):
    task, whole, step = one_step(method)
    assert task == pytest.approx(whole) and step.aux_loss is None
    assert step.task_loss == step.loss == pytest.approx(task, rel=1e-5)


@pytest.mark.parametrize("train_on_inputs", [False, True])
@pytest.mark.parametrize("method", ["denselora", "lora"])
def test_logits_at_the_target_positions_only_give_transformers_loss_and_gradients(method, train_on_inputs):
    """The step computes the vocabulary's logits only where a position predicts a target token; the loss it
    minimises and every adapter gradient must be those of transformers' own loss over the full logits, on rows of
    different lengths (right padding) and with the loss on the answers only or on every token."""
    config = dataclasses.replace(CONFIG, method=method, train_on_inputs=train_on_inputs, seed=3, cutoff_len=1024)
    rows = load_data(config).train
    longest = sorted(range(len(rows)), key=lambda i: int(rows.lengths[i]))
    batch = collate(rows, [longest[0], longest[len(rows) // 2], longest[-1]], load_tokenizer(config.model).pad_token_id)
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 3  # three lengths: padding in two rows
    targets = int((batch["labels"][:, 1:] != -100).sum())
    model = build_state(config, "float32", CPU, total_steps=4).model
    with torch.no_grad():  # away from the zero-output start, so that every adapter weight has a gradient
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))

    def loss_and_grads(loss_fn) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    full, full_grads = loss_and_grads(lambda: model(**batch, num_items_in_batch=targets).loss)
    kept, kept_grads = loss_and_grads(lambda: target_loss_sum(model, batch, torch.device("cpu")) / targets)
    assert kept == pytest.approx(full, rel=1e-6)
    assert full_grads.keys() == kept_grads.keys() and full_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(kept_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
        assert grad.abs().sum() > 0, name


def test_a_float16_step_is_the_scaled_step_written_out():
    """Backward on the loss times the scale, gradients divided by it, clipped, AdamW: as GradScaler's manual has it."""
    batches = micro_batches(FP16)
    state = build_state(FP16, "float16", CPU, total_steps=4)
    initial = trainable(state.model)
    scale = state.optimization.scaler.get_scale()
    assert not train_step(state, batches, counted(batches)).skipped

    hand = build_state(FP16, "float16", CPU, total_steps=4)
    by_hand, hand_optimizer = hand.model, hand.optimization.optimizer
    by_hand.train()
    targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.float16):
            (target_loss_sum(by_hand, batch, CPU) / targets * scale).backward()
    weights = [p for p in by_hand.parameters() if p.requires_grad]
    for weight in weights:
        weight.grad /= scale
    torch.nn.utils.clip_grad_norm_(weights, FP16.max_grad_norm)
    hand_optimizer.step()

    stepped, expected = trainable(state.model), trainable(by_hand)
    assert any(not torch.equal(stepped[name], initial[name]) for name in initial)
    for name, weight in stepped.items():
        torch.testing.assert_close(weight, expected[name], msg=name)


def losses(precision: str, steps: int = 4) -> list[float]:
    batches = micro_batches(FP16)
    state = build_state(FP16, precision, CPU, total_steps=steps)
    assert (state.optimization.scaler is None) == (precision != "float16")
    done = []
    for _ in range(steps):
        step = train_step(state, batches, counted(batches))
        assert not step.skipped
        done.append(step.loss)
        state.optimization.optimizer.zero_grad(set_to_none=True)
    return done


def test_float16_with_its_scaler_follows_the_float32_loss_curve():
    # on the tiny model the two differed by at most 3e-5 over 6 steps
    fp16, fp32 = losses("float16"), losses("float32")
    assert all(later < earlier for earlier, later in zip(fp16, fp16[1:]))
    assert fp16 == pytest.approx(fp32, abs=1e-3) and fp16 != fp32  # float16 did run


def test_an_overflow_in_float16_skips_the_step_and_leaves_the_adapter_as_it_was():
    batches = micro_batches(FP16)
    state = build_state(FP16, "float16", CPU, total_steps=4)
    before = trainable(state.model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # the scaled gradients overflow float16: inf
    state.optimization = state.optimization._replace(scaler=scaler)
    step = train_step(state, batches, counted(batches))
    assert step.skipped and math.isfinite(step.loss)  # not a divergence: the loss itself is finite
    assert scaler.get_scale() == 2.0**99  # backed off
    assert not state.optimization.optimizer.state  # AdamW never stepped
    after = trainable(state.model)
    assert all(torch.equal(after[name], weight) for name, weight in before.items())


def test_the_model_is_built_on_the_workers_device():
    model = build_state(CONFIG, "bfloat16", torch.device("meta"), total_steps=4).model
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_a_trial_that_asks_for_gpus_fails_at_once_on_a_worker_without_one():
    message = r"^the trial asks for GPUs, but torch on its worker's node \(.+\) sees none \(torch .+, CUDA None\): install "
    with pytest.raises(RuntimeError, match=message):
        require_gpu(dataclasses.replace(CONFIG, use_gpu=True), CPU)
    for use_gpu in (False, None):
        require_gpu(dataclasses.replace(CONFIG, use_gpu=use_gpu), CPU)
