"""The validation set: held out from the training rows, the same for every trial of a study, never trained on; and
its loss, the mean answer-token cross-entropy, against a hand computation."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from densetune.config import TrialConfig
from densetune.data.tokens import IGNORE_INDEX
from densetune.data.loading import load_benchmark
from densetune.trial.evaluate import answer_loss
from densetune.trial.inputs import load_data, training_rows
from densetune.trial.models import byte_tokenizer, tiny_llama

SETTINGS = dict(model="tiny-llama", cutoff_len=512, batch_size=4, micro_batch_size=2, val_size=20)


def choice_row(k: int) -> dict:
    return {
        "instruction": f"Which is number {k}?\n\nAnswer1: {k} Answer2: {k + 1}\n\nAnswer format: answer1/answer2",
        "input": "", "output": "the correct answer is answer1", "answer": "answer1",
    }


@pytest.fixture(scope="module")
def mine(tmp_path_factory):
    """A second training set of 60 rows, to mix with the built-in task's 2,000."""
    folder = tmp_path_factory.mktemp("mine", numbered=False)
    (folder / "train.json").write_text(json.dumps([choice_row(k) for k in range(60)]))
    (folder / "test.json").write_text(json.dumps([choice_row(k) for k in range(100, 110)]))
    return str(folder)


def test_the_validation_set_is_the_same_for_every_trial_and_never_trained_on(mine):
    label = load_data(TrialConfig(**SETTINGS, datasets=["synthetic", mine]))
    text = load_data(TrialConfig(**SETTINGS, datasets=["synthetic", mine], protocol="text"))
    # val_size rows of each training set, the same whatever the protocol
    assert len(label.held_out) == 40 and np.array_equal(label.held_out, text.held_out)
    assert (label.held_out < 2000).sum() == 20 and (label.held_out >= 2000).sum() == 20
    # named after their training sets, and exactly the held-out rows
    rows = load_benchmark("synthetic").rows + load_benchmark(mine).rows
    assert [name for name, _ in label.val_sets] == ["synthetic", "mine"]
    assert [r for _, found in label.val_sets for r in found] == [rows[i] for i in label.held_out]
    # no trial trains on them, whatever its seed or fraction; the seed still changes which rows train
    chosen = []
    for seed, fraction in ((1, 1.0), (2, 1.0), (1, 0.3), (3, 0.05)):
        config = TrialConfig(**SETTINGS, datasets=["synthetic", mine], seed=seed, data_fraction=fraction)
        kept = training_rows(config, label)
        assert not set(kept) & set(label.held_out)
        chosen.append(kept)
    assert len(chosen[0]) == len(chosen[1]) == 2060 - 40
    assert len(chosen[2]) == int(0.3 * 2020) and not np.array_equal(chosen[2], training_rows(
        TrialConfig(**SETTINGS, datasets=["synthetic", mine], seed=2, data_fraction=0.3), label))


def test_the_validation_loss_counts_the_answer_tokens_only():
    data = load_data(TrialConfig(**SETTINGS, datasets=["synthetic"], train_on_inputs=True))
    tokenizer = byte_tokenizer()
    rows = data.val_answers
    # train_on_inputs trains on the prompt too; the validation loss reads the answer (and EOS) alone
    first = rows.example(0)
    answer = [t for t, label in zip(first["input_ids"], first["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(answer, skip_special_tokens=True) == "the correct answer is " + data.val_sets[0][1][0]["answer"]


def test_the_validation_loss_is_the_mean_cross_entropy_per_answer_token():
    data = load_data(TrialConfig(**SETTINGS, datasets=["synthetic"]))
    tokenizer, model = byte_tokenizer(), tiny_llama().eval()
    # by hand: each row alone, unpadded, its answer tokens' cross-entropies summed, over all rows' answer tokens
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(data.val_answers)):
            example = data.val_answers.example(i)
            ids, labels = torch.tensor([example["input_ids"]]), torch.tensor(example["labels"])
            logits = model(input_ids=ids).logits[0]
            targets = labels[1:] != IGNORE_INDEX
            total += F.cross_entropy(logits[:-1][targets], labels[1:][targets], reduction="sum").item()
            count += int(targets.sum())
    assert answer_loss(model, tokenizer, data.val_answers, batch_size=3) == pytest.approx(total / count, rel=1e-5)
    assert model.training is False


def test_a_training_set_no_larger_than_val_size_is_refused(mine):
    with pytest.raises(ValueError, match=r"^mine has 60 training rows: val_size 60 would leave none to train on"):
        load_data(TrialConfig(**{**SETTINGS, "val_size": 60}, datasets=["synthetic", mine]))


def test_without_a_validation_set_every_row_may_train(mine):
    data = load_data(TrialConfig(**{**SETTINGS, "val_size": 0}, datasets=["synthetic", mine]))
    assert len(data.held_out) == 0 and data.val_sets == []
    assert len(training_rows(TrialConfig(**{**SETTINGS, "val_size": 0}, datasets=["synthetic", mine]), data)) == 2060
