"""densetune.results.curves on hand-built metric histories, numbers checked by hand; the store's metric_histories
(densetune.results.store), which reads them, on a real sqlite store.

Configuration A has two seeds (runs a1, a2), configuration B one (b1). Each logs tokens_seen and device_seconds at
steps 5 and 10 and is evaluated at steps 0, 8 and 10:

    run  tokens 5, 10   seconds 5, 10   accuracy 0, 8, 10   at step 8: tokens, seconds
    a1   100, 300       10, 20          .40, .60, .70       100 + 3/5 * 200 = 220, 16
    a2   120, 320       12, 22          .40, .50, .80       240, 18
    b1   100, 200        5, 10          .40, .45, .50       160, 8

A's mean curve: .40, .55, .75 (tokens 0, 230, 310; seconds 0, 17, 21); B's: .40, .45, .50.
"""

import math
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from densetune.results.curves import (
    budget_lines,
    budget_table,
    curve_points,
    learning_curves_figure,
    loss_caption,
    loss_figure,
    mean_curves,
    moving_average,
)
from densetune.results.store import metric_histories

ACCURACY = "val/accuracy/average"
PNG = b"\x89PNG\r\n\x1a\n"
TRIALS = pd.DataFrame({"run_id": ["a1", "a2", "b1"], "configuration": ["A", "A", "B"], "seed": [1, 2, 1]})
LOGGED = {  # run -> metric -> {step: value}
    "a1": {"tokens_seen": {5: 100, 10: 300}, "device_seconds": {5: 10, 10: 20}, ACCURACY: {0: .40, 8: .60, 10: .70}},
    "a2": {"tokens_seen": {5: 120, 10: 320}, "device_seconds": {5: 12, 10: 22}, ACCURACY: {0: .40, 8: .50, 10: .80}},
    "b1": {"tokens_seen": {5: 100, 10: 200}, "device_seconds": {5: 5, 10: 10}, ACCURACY: {0: .40, 8: .45, 10: .50}},
}


def histories(logged: dict = LOGGED, extra: list[tuple] = ()) -> pd.DataFrame:
    rows = [(run, metric, step, float(value)) for run, metrics in logged.items()
            for metric, values in metrics.items() for step, value in values.items()]
    return pd.DataFrame([*rows, *extra], columns=["run_id", "metric", "step", "value"])


def losses(with_validation: bool = True) -> pd.DataFrame:
    """Training loss reported every 2 steps to 20, validation loss at 0, 10, 20, for every trial of TRIALS."""
    rows = []
    for i, run in enumerate(TRIALS["run_id"]):
        rows += [(run, "loss", step, 3.0 - 0.1 * step + 0.2 * ((step // 2) % 2) + 0.05 * i) for step in range(2, 21, 2)]
        if with_validation:
            rows += [(run, "val/loss", step, 2.5 - 0.05 * step + 0.01 * i) for step in (0, 10, 20)]
    return pd.DataFrame(rows, columns=["run_id", "metric", "step", "value"])


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG


# Reading


def test_metric_histories_keeps_the_value_logged_last(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    experiment = client.create_experiment("curves", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    client.log_batch(run_id, metrics=[
        Metric("device_seconds", 10.0, 1_000, 5),
        Metric("device_seconds", 20.0, 3_000, 10),  # the final value, logged after the step's own report
        Metric("device_seconds", 19.0, 2_000, 10),
        Metric("loss", 2.5, 1_000, 5),
    ])
    frame = metric_histories(client, [run_id], ["device_seconds", "loss", "val/loss"])
    assert list(frame.columns) == ["run_id", "metric", "step", "value"]
    assert frame[["metric", "step", "value"]].values.tolist() == [
        ["device_seconds", 5, 10.0], ["device_seconds", 10, 20.0], ["loss", 5, 2.5],
    ]
    assert set(frame["run_id"]) == {run_id}


def test_metric_histories_of_nothing_has_the_columns(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    run_id = client.create_run(client.create_experiment("e", str(tmp_path / "a"))).info.run_id
    frame = metric_histories(client, [run_id], ["loss"])
    assert frame.empty and list(frame.columns) == ["run_id", "metric", "step", "value"]


# Frames


def test_curve_points_interpolates_tokens_and_seconds_between_logged_steps():
    points = curve_points(histories(), TRIALS, ACCURACY)
    assert list(points.columns) == ["configuration", "run_id", "step", "tokens_seen", "device_seconds", "value"]
    a1 = points[points["run_id"] == "a1"].set_index("step")
    assert a1.loc[8, "tokens_seen"] == pytest.approx(220)  # 100 + (8 - 5) / (10 - 5) * (300 - 100)
    assert a1.loc[8, "device_seconds"] == pytest.approx(16)
    assert a1.loc[0, ["tokens_seen", "device_seconds"]].tolist() == [0, 0]  # not logged at 0: counted as 0
    assert a1.loc[10, ["tokens_seen", "device_seconds", "value"]].tolist() == pytest.approx([300, 20, .70])
    assert set(points["configuration"]) == {"A", "B"} and len(points) == 9
    # between step 0 (counted 0) and the first logged step: 4 / 5 of b1's 100 tokens at step 5
    early = curve_points(histories(extra=[("b1", ACCURACY, 4, .42)]), TRIALS, ACCURACY)
    assert early.set_index(["run_id", "step"]).loc[("b1", 4), "tokens_seen"] == pytest.approx(80)


def test_curve_points_takes_the_last_of_repeated_values_and_no_extrapolation():
    extra = [("a1", "device_seconds", 10, 25.0), ("a1", ACCURACY, 12, .75)]  # a final device_seconds at step 10
    a1 = curve_points(histories(extra=extra), TRIALS, ACCURACY).query("run_id == 'a1'").set_index("step")
    assert a1.loc[8, "device_seconds"] == pytest.approx(10 + 3 / 5 * 15)
    assert math.isnan(a1.loc[12, "tokens_seen"]) and math.isnan(a1.loc[12, "device_seconds"])  # past the last log


def test_curve_points_without_cost_histories_and_without_the_metric():
    logged = {"a1": {ACCURACY: {0: .4, 8: .6}}}
    points = curve_points(histories(logged), TRIALS, ACCURACY)
    assert points["value"].tolist() == [.4, .6]
    assert points[["tokens_seen", "device_seconds"]].isna().all().all()
    assert curve_points(histories(), TRIALS, "val/loss").empty


def test_mean_curves_over_seeds():
    frame = mean_curves(curve_points(histories(), TRIALS, ACCURACY))
    assert list(frame.columns) == ["configuration", "step", "mean", "min", "max", "trials", "tokens_seen",
                                   "device_seconds"]
    assert frame["configuration"].tolist() == ["A"] * 3 + ["B"] * 3
    a = frame[frame["configuration"] == "A"].set_index("step")
    assert a["mean"].tolist() == pytest.approx([.40, .55, .75])
    assert a.loc[8, ["min", "max", "tokens_seen", "device_seconds"]].tolist() == pytest.approx([.50, .60, 230, 17])
    assert a.loc[10, ["min", "max", "tokens_seen", "device_seconds"]].tolist() == pytest.approx([.70, .80, 310, 21])
    assert a["trials"].tolist() == [2, 2, 2]
    b = frame[frame["configuration"] == "B"].set_index("step")
    assert b["trials"].tolist() == [1, 1, 1]
    assert b.loc[8, ["mean", "min", "max", "tokens_seen", "device_seconds"]].tolist() == pytest.approx(
        [.45, .45, .45, 160, 8])


def test_mean_curves_counts_only_the_trials_at_a_step():
    frame = mean_curves(curve_points(histories(extra=[("a1", ACCURACY, 12, .9)]), TRIALS, ACCURACY))
    last = frame[(frame["configuration"] == "A") & (frame["step"] == 12)].iloc[0]
    assert (last["trials"], last["mean"], last["min"], last["max"]) == (1, .9, .9, .9)
    assert mean_curves(curve_points(histories(), TRIALS, "val/loss")).empty


def test_budget_table_target_first_step_and_not_reached():
    curve = mean_curves(curve_points(histories(), TRIALS, ACCURACY))
    table = budget_table(curve).set_index("configuration")
    assert table["target"].tolist() == pytest.approx([0.9 * .75] * 2)  # A's final mean is the best
    assert table.loc["A", ["final", "step", "tokens_seen", "device_seconds", "trials"]].tolist() == pytest.approx(
        [.75, 10, 310, 21, 2])  # .55 at step 8 is below .675
    assert table.loc["B", "final"] == pytest.approx(.50)
    assert table.loc["B", ["step", "tokens_seen", "device_seconds"]].isna().all()  # .50 never reaches .675
    lower = budget_table(curve, share=0.7).set_index("configuration")  # target .525
    assert lower.loc["A", ["step", "tokens_seen", "device_seconds"]].tolist() == pytest.approx([8, 230, 17])
    assert lower.loc["B", ["step"]].isna().all()
    lowest = budget_table(curve, share=0.5).set_index("configuration")  # target .375: reached before training
    assert lowest["step"].tolist() == [0, 0] and lowest["tokens_seen"].tolist() == [0, 0]


def test_budget_lines_say_not_reached():
    table = budget_table(mean_curves(curve_points(histories(), TRIALS, ACCURACY)))
    lines = budget_lines(table, ACCURACY)
    assert "67.5 %" in lines[0]
    row = next(line for line in lines if line.startswith("| B "))
    assert row.count("not reached") == 3 and "50.0" in row
    assert next(line for line in lines if line.startswith("| A ")) == "| A | 2 | 75.0 | 10 | 310 | 21 |"
    assert budget_table(mean_curves(curve_points(histories(), TRIALS, "val/loss"))).empty


# Figures


def test_learning_curves_figure(tmp_path):
    curve = mean_curves(curve_points(histories(), TRIALS, ACCURACY))
    path = learning_curves_figure(curve, tmp_path / "figures" / "learning.png", ACCURACY,
                                  {"untuned model": 0.46, "majority answer": 0.265})
    assert path == tmp_path / "figures" / "learning.png"
    assert_png(path)


def test_learning_curves_figure_of_one_configuration_and_one_trial(tmp_path):
    one = TRIALS[TRIALS["run_id"] == "b1"]
    curve = mean_curves(curve_points(histories(), one, ACCURACY))
    assert_png(learning_curves_figure(curve, tmp_path / "one.png", ACCURACY))
    # without cost histories the other two panels stay empty
    bare = mean_curves(curve_points(histories({"b1": {ACCURACY: {0: .4, 8: .5}}}), one, ACCURACY))
    assert_png(learning_curves_figure(bare, tmp_path / "bare.png", ACCURACY, {"untuned model": .4}))


def test_loss_figure(tmp_path):
    assert_png(loss_figure(losses(), TRIALS, tmp_path / "out" / "loss.png"))
    assert_png(loss_figure(losses(with_validation=False), TRIALS, tmp_path / "train_only.png", window=3))


def test_loss_figure_of_one_trial(tmp_path):
    one = TRIALS[TRIALS["run_id"] == "a1"]
    assert_png(loss_figure(losses(), one, tmp_path / "one.png"))
    assert_png(loss_figure(losses(with_validation=False), one, tmp_path / "one_train.png", window=1))


def test_moving_average_is_centered_over_the_window():
    """loss_figure's solid line: the mean over seeds at each reported step, then a centered rolling mean."""
    frame = pd.DataFrame([("a1", s, v) for s, v in ((1, 4.0), (2, 2.0), (3, 6.0), (4, 0.0))]
                         + [("a2", s, v) for s, v in ((4, 2.0), (3, 2.0), (2, 2.0), (1, 2.0))],
                         columns=["run_id", "step", "value"])
    smooth = moving_average(frame, 3)  # means over seeds: 3, 2, 4, 1; windows of 3 centered, 2 at the ends
    assert smooth.index.tolist() == [1, 2, 3, 4] and smooth.tolist() == pytest.approx([2.5, 3.0, 7 / 3, 2.5])
    assert moving_average(frame, 1).tolist() == pytest.approx([3, 2, 4, 1])
    assert "centered moving average over 3 reports" in loss_caption(3)
    assert "validation" not in loss_caption(3, validation=False)
