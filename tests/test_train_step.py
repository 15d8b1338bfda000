"""The trainer's step, without Ray: what it reports as the loss, for every method alike."""

import dataclasses

import pytest
import torch

from densetune.config import TrialConfig
from densetune.data import collate
from densetune.inputs import load_data
from densetune.models import load_tokenizer
from densetune.train import build_model, target_loss_sum, train_step

CONFIG = TrialConfig(
    model="tiny-llama", rank=4, dropout=0.0, batch_size=4, micro_batch_size=2, datasets=["synthetic"],
    dtype="float32", cutoff_len=128, max_steps=4,
)


def one_step(method: str):
    """The model before its first step, the step's result, and the step's micro-batches."""
    config = dataclasses.replace(CONFIG, method=method)
    rows = load_data(config).train
    batches = [collate(rows, [i, i + 1], load_tokenizer(config.model).pad_token_id) for i in (0, 2)]
    counts = (sum(int(b["attention_mask"].sum()) for b in batches), sum(b["attention_mask"].numel() for b in batches))
    model, optimizer, _ = build_model(config, "float32", torch.device("cpu"), total_steps=4)
    targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    model.train()
    with torch.no_grad():
        # the transformers model under the adapter alone: the task's loss, without what the PEFT model adds to it
        task = sum(model.base_model.model(**b, num_items_in_batch=targets).loss.item() for b in batches)
        whole = sum(model(**b, num_items_in_batch=targets).loss.item() for b in batches)
    return task, whole, train_step(model, batches, counts, 1, torch.device("cpu"), "float32", config, optimizer)


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
    model = build_model(config, "float32", torch.device("cpu"), total_steps=4)[0]
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
