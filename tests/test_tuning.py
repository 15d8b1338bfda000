"""--tune: each configuration at its own value of a setting, chosen on the validation set, then compared on test."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from densetune.config import SweepConfig, TrialConfig
from densetune.experiment import LOCAL, SMOKE
from densetune.results.report import write_report
from densetune.sweep.selection import Candidate
from densetune.tuning import Tuning, check_tuning, choose, past_edge, run_tuned

VAL = "val/accuracy/average"


def trial(tmp_path: Path, **settings) -> TrialConfig:
    return TrialConfig(**{**LOCAL, **SMOKE, "storage_path": str(tmp_path / "runs"), **settings})


@pytest.mark.parametrize(
    ("values", "pick", "beyond"),
    [
        ([1e-4, 3e-4, 1e-3, 3e-3], 3e-3, 9e-3),  # a factor 3 past the top
        ([1e-4, 3e-4, 1e-3, 3e-3], 1e-4, 3.33333e-05),  # and below the bottom
        ([1e-4, 3e-4, 1e-3, 3e-3], 1e-3, None),  # inside: nothing to extend
        ([8, 16, 32], 32, 64),  # integers stay integers
        ([-1.0, 0.0, 1.0], -1.0, -2.0),  # not all positive: the same difference
        (["q,v", "q,k,v"], "q,v", None),  # not numbers
        ([1e-3, 3e-3], None, None),  # no pick
    ],
)
def test_the_value_past_an_edge(values, pick, beyond):
    found = past_edge(values, pick)
    assert found == (pytest.approx(beyond) if isinstance(beyond, float) else beyond)


def test_each_configuration_picks_its_best_finished_value_ties_to_the_earlier_trial():
    tried = {
        "rank=2": {1e-3: Candidate("t0", {VAL: 0.5}), 3e-3: Candidate("t1", {VAL: 0.6}),
                   1e-2: Candidate("t2", {VAL: 0.9}, "KILLED")},
        "rank=4": {1e-3: Candidate("t4", {VAL: 0.7}), 3e-3: Candidate("t3", {VAL: 0.7})},
        "rank=8": {1e-3: Candidate("t5", {}, "FAILED")},
    }
    assert choose(tried, [(VAL, "max")]) == {"rank=2": 3e-3, "rank=4": 3e-3}


@pytest.mark.parametrize(
    ("tuning", "change", "message"),
    [
        (Tuning("seed", (1, 2)), {}, r"^--tune 'seed': not a setting to tune; allowed: rank, targets"),
        (Tuning("lr", (1e-3,)), {}, r"^--tune lr: give at least two values to choose from; got \[0.001\]$"),
        (Tuning("rank", (2, 4)), {}, r"^--tune rank and --space rank=... both set it: use one of them$"),
        (Tuning("lr", (1e-3, 1e-2), extend=-1), {}, r"^--tune-extend must be a non-negative integer; got -1$"),
        (Tuning("lr", (1e-3, -1.0)), {}, r"^the trial rank=2 lr=-1.0 seed=42: lr must be a positive number; got -1.0$"),
        (Tuning("lr", (1e-3, 1e-2)), {"metric": "accuracy/average"}, r"^metric 'accuracy/average' is measured on the test"),
    ],
)
def test_bad_tuning_is_one_line_before_anything_starts(tmp_path, tuning, change, message):
    sweep = SweepConfig("tuned", {"rank": [2]}, trial(tmp_path), name="bad", **change)
    with pytest.raises(ValueError, match=message):
        check_tuning(sweep, tuning)
    assert not (tmp_path / "runs").exists()


def test_a_tuned_study_picks_on_validation_then_compares_at_the_picks(local_ray, tmp_path):
    sweep = SweepConfig("tuned", {"rank": [2], "seed": [1, 2]}, trial(tmp_path), name="tl")
    result = run_tuned(sweep, Tuning("lr", (1e-4, 1e-2), extend=1))

    client = MlflowClient(result.comparison.tracking_uri)
    study = client.get_run(result.run_id)
    assert study.data.tags["densetune.role"] == "tuned" and study.info.status == "FINISHED"
    experiment = [study.info.experiment_id]
    sweeps = client.search_runs(experiment, "tags.`densetune.role` = 'sweep'")
    # both phases' sweeps nest under the study's run: the grid, the value past its edge, the comparison
    assert sorted(r.info.run_name for r in sweeps) == ["tl", "tl-tuning-1", "tl-tuning-1-2"]
    assert {r.data.tags["mlflow.parentRunId"] for r in sweeps} == {result.run_id}
    tuning = client.search_runs(experiment, "tags.`densetune.role` = 'trial' and tags.sweep LIKE 'tl-tuning%'")
    # one seed, the validation set only: the tuning phase never evaluates the test split
    assert {r.data.params["seed"] for r in tuning} == {"1"}
    assert all(VAL in r.data.metrics and "accuracy/average" not in r.data.metrics for r in tuning)
    grid = sorted((r for r in tuning if r.data.tags["sweep"] == "tl-tuning-1"), key=lambda r: float(r.data.params["lr"]))
    beyond = [r for r in tuning if r.data.tags["sweep"] == "tl-tuning-1-2"]
    tried = [*grid, *beyond]  # the order the values were tried in: the grid's, then the one past its edge

    def best(runs):  # the finished trial with the best validation accuracy, ties to the value tried first
        finished = [r for r in runs if r.info.status == "FINISHED" and "diverged" not in r.data.tags]
        return min(finished, key=lambda r: (-r.data.metrics[VAL], tried.index(r)))

    assert [float(r.data.params["lr"]) for r in grid] == [1e-4, 1e-2]
    # the grid's pick sits on an edge (two values): the next value past it, a factor 100 away, is tried too
    edge = float(best(grid).data.params["lr"])
    assert [float(r.data.params["lr"]) for r in beyond] == [pytest.approx(1e-6 if edge == 1e-4 else 1.0)]
    chosen = best(tuning)
    assert result.picks == {"rank=2": float(chosen.data.params["lr"])}
    assert json.loads(study.data.params["picks"]) == result.picks
    # the comparison: the pick with every seed, evaluated on the test split too
    compared = client.search_runs(experiment, "tags.`densetune.role` = 'trial' and tags.sweep = 'tl'")
    assert sorted((float(r.data.params["lr"]), r.data.params["seed"]) for r in compared) == [
        (result.picks["rank=2"], "1"), (result.picks["rank=2"], "2")]
    assert all("accuracy/average" in r.data.metrics for r in compared)
    # its report shows the tuning table first, the pick in bold
    text = write_report("tl", result.comparison.tracking_uri, out=tmp_path / "report").read_text()
    section = text.split("## Tuning: each configuration at its own lr")[1].split("\n## ")[0]
    row = [line for line in section.splitlines() if line.startswith("| rank=2 |")][0]
    assert row.count("**") == 2 and f"{100 * chosen.data.metrics[VAL]:.1f}**" in row
    assert "- phase: the comparison of tuned study tl, every configuration at its own lr" in text
    # a tuning sweep's report says what it is, has no tuning table, and shows each value's validation accuracy
    text = write_report("tl-tuning-1", result.comparison.tracking_uri, out=tmp_path / "tuning").read_text()
    assert "- phase: tuning lr for tuned study tl: one seed, judged on the validation set; the test split was not " \
           "evaluated" in text
    assert "## Tuning" not in text and "; the test split was not evaluated." in text
    table = text.split("## Configurations")[1].split("\n## ")[0]
    for run in (r for r in grid if r.info.status == "FINISHED"):
        row = [line for line in table.splitlines() if f"lr={run.data.params['lr']} |" in line][0]
        assert f"| {100 * run.data.metrics[VAL]:.1f} ± n/a |" in row


def test_a_configuration_whose_every_tuning_trial_diverges_fails_the_study_before_the_comparison(local_ray, tmp_path):
    sweep = SweepConfig("tuned", {"rank": [2]}, trial(tmp_path), name="tf")
    with pytest.raises(RuntimeError, match=r"^no tuning trial of rank=2 finished with val/accuracy/average: nothing"):
        run_tuned(sweep, Tuning("lr", (1e5, 1e6), extend=0))
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tuned").experiment_id], "tags.sweep LIKE 'tf%'")
    study = [r for r in runs if r.data.tags["densetune.role"] == "tuned"]
    assert len(study) == 1 and study[0].info.status == "FAILED"
    # the tuning table is kept, and no comparison sweep was started
    assert {r.data.tags["sweep"] for r in runs if r.data.tags["densetune.role"] == "sweep"} == {"tf-tuning-1"}
    assert "tuning.csv" in {a.path for a in client.list_artifacts(study[0].info.run_id)}
