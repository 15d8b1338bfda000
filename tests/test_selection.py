"""How a sweep chooses: the best trial by its objectives, and what a searcher or a scheduler may see."""

import math

import pytest

from densetune.sweep.selection import Candidate, best, check_objective, without_test_metrics

VAL = "val/accuracy/average"


def trials(*rows: tuple) -> list[Candidate]:
    """(key, validation accuracy, trainable params[, status[, diverged]]) each."""
    return [
        Candidate(key, {VAL: accuracy, "trainable_params": size}, *rest) for key, accuracy, size, *rest in rows
    ]


def test_the_highest_in_mode_max_and_the_lowest_in_mode_min():
    found = trials(("t0", 0.50, 300), ("t1", 0.62, 200), ("t2", 0.58, 100))
    assert best(found, [(VAL, "max")]).key == "t1"
    assert best(found, [(VAL, "min")]).key == "t0"
    assert best(found, [("trainable_params", "min")]).key == "t2"
    assert best(found, [("trainable_params", "max")]).key == "t0"


def test_a_tie_goes_to_the_next_objective_then_to_the_earlier_trial():
    found = trials(("t3", 0.60, 300), ("t1", 0.60, 100), ("t2", 0.60, 100), ("t0", 0.55, 50))
    # equal accuracy: fewer parameters wins; equal in both: the earlier trial id
    assert best(found, [(VAL, "max"), ("trainable_params", "min")]).key == "t1"
    assert best(found, [(VAL, "max")]).key == "t1"
    # the other way round: the fewest parameters first
    assert best(found, [("trainable_params", "min"), (VAL, "max")]).key == "t0"


def test_killed_failed_and_diverged_trials_are_never_chosen():
    found = trials(
        ("t0", 0.99, 100, "KILLED"), ("t1", 0.98, 100, "FAILED"), ("t2", 0.97, 100, "FINISHED", True),
        ("t3", 0.40, 100, "RUNNING"), ("t4", 0.41, 100),
    )
    assert best(found, [(VAL, "max")]).key == "t4"


def test_a_trial_without_a_finite_objective_is_not_chosen_and_none_is_none():
    found = [
        Candidate("t0", {VAL: math.nan}), Candidate("t1", {}), Candidate("t2", {VAL: math.inf}),
        Candidate("t3", {VAL: 0.3}),
    ]
    assert best(found, [(VAL, "max")]).key == "t3"
    assert best(found[:3], [(VAL, "max")]) is None
    assert best([], [(VAL, "max")]) is None


def test_a_searcher_sees_a_result_without_its_test_metrics():
    result = {
        "step": 4, "loss": 1.0, "val/accuracy/average": 0.5, "val/accuracy/ARC-Easy": 0.5, "val/loss": 1.2,
        "accuracy/average": 0.6, "accuracy/ARC-Easy": 0.6, "accuracy_norm/average": 0.4, "trainable_params": 10,
    }
    assert without_test_metrics(result) == {
        "step": 4, "loss": 1.0, "val/accuracy/average": 0.5, "val/accuracy/ARC-Easy": 0.5, "val/loss": 1.2,
        "trainable_params": 10,
    }


@pytest.mark.parametrize("metric", ["accuracy/average", "accuracy/ARC-Easy", "accuracy_norm/average"])
def test_a_test_metric_is_refused_as_an_objective_in_one_line(metric):
    with pytest.raises(ValueError) as error:
        check_objective(metric)
    assert str(error.value) == (
        f"metric {metric!r} is measured on the test split, which is reported and never chosen on: use val/{metric} "
        "(the validation set held out from the training rows)"
    )


@pytest.mark.parametrize("metric", ["val/accuracy/average", "val/loss", "trainable_params", "loss"])
def test_validation_metrics_and_sizes_are_objectives(metric):
    check_objective(metric)
