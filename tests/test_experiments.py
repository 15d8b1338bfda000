"""The scripts in experiments/: valid studies, the shared flags, and a sweep resumed after its driver was killed."""

import dataclasses
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from densetune.experiment import main, parser, sweep_config, tuning_of
from densetune.sweep.tune import check_sweep, tune_config
from densetune.tuning import check_tuning

ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted(p for p in (ROOT / "experiments").glob("*_*.py") if p.name != "parameter_budget.py")


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_seven_studies_exist():
    assert [p.stem for p in STUDIES] == [
        "data_fraction_sweep", "method_comparison", "module_sweep", "pareto_search", "rank_sweep", "tuned_comparison",
        "variant_ablation",
    ]


HEAVY = ("torch", "transformers", "peft", "datasets", "mlflow", "ray.tune", "ray.train", "pandas", "matplotlib")
# Runs a command line's --help in a fresh interpreter and prints the heavy libraries it imported.
HELP = """
import runpy, sys
target, sys.argv = sys.argv[1], sys.argv[1:] + ["--help"]
try:
    runpy.run_module(target, run_name="__main__", alter_sys=True) if target.startswith("densetune") else runpy.run_path(target, run_name="__main__")
except SystemExit as exit:
    assert exit.code == 0, exit.code
print("imported:", *sorted(m for m in HEAVY if m in sys.modules))
""".replace("HEAVY", repr(HEAVY))


@pytest.mark.parametrize(
    "target", [*map(str, sorted((ROOT / "experiments").glob("*.py"))), "densetune.trial"], ids=lambda t: Path(t).stem
)
def test_help_answers_without_importing_the_heavy_libraries(target):
    # --help must answer at once (bench/throughput.py times it): torch, PEFT, MLflow and Ray Tune take seconds each.
    done = subprocess.run([sys.executable, "-c", HELP, target], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    *usage, loaded = done.stdout.rstrip("\n").split("\n")
    assert usage[0].startswith("usage: ")
    assert loaded == "imported:"


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_each_study_is_valid_as_shipped_and_as_smoke(path):
    module = load(path)
    assert module.__doc__.splitlines()[0].strip()  # which study it is
    for argv in ([], ["--smoke"]):
        args = parser(module.STUDY, module.__doc__).parse_args(argv)
        sweep = sweep_config(module.STUDY, args)
        check_sweep(sweep)  # every combination of the space, and each adapter against the model's architecture
        if tuning_of(args) is not None:
            check_tuning(sweep, tuning_of(args))  # every trial of both phases, at every value tuned
        assert sweep.study == module.STUDY.name
    assert sweep.trial.model == "tiny-llama"


def test_flags_set_the_space_and_the_trial_with_their_types():
    study = load(ROOT / "experiments" / "rank_sweep.py").STUDY
    args = parser(study, "").parse_args([
        "--space", "rank=4,16", "--space", "targets=qkv,q+v", "--set", "lr=1e-3", "--set", "eval-limit=none",
        "--set", "train_on_inputs=true", "--datasets", "synthetic,x/y", "--num-workers", "2",
        "--gpus-per-worker", "0.25", "--max-steps", "7", "--max-concurrent", "3", "--scheduler", "asha",
    ])
    sweep = sweep_config(study, args)
    assert sweep.space == {"rank": [4, 16], "targets": ["qkv", "q,v"]}
    trial = sweep.trial
    assert (trial.lr, trial.eval_limit, trial.train_on_inputs, trial.datasets) == (1e-3, None, True, ["synthetic", "x/y"])
    assert (trial.num_workers, trial.gpus_per_worker, trial.use_gpu, trial.max_steps) == (2, 0.25, True, 7)
    assert (sweep.max_concurrent, sweep.scheduler, sweep.search) == (3, "asha", "grid")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--space", "rank=8,x"], "error: rank must be int; got 'x'"),
        (["--space", "ranks=8"], "error: unknown search dimension 'ranks'; allowed: rank, targets"),
        (["--set", "nope=1"], "error: unknown trial setting 'nope'; allowed: "),
        (["--set", "lr"], "error: --set 'lr': write SETTING=VALUE"),
        (["--smoke", "--space", "method=denselora,lorax"], "error: method must be one of "),
        (["--seeds", "0"], "error: --seeds must be a positive integer; got 0"),
        (["--seeds", "2", "--space", "seed=1,2"], "error: --seeds and --space seed=... both set the seeds"),
        (["--seeds", "2", "--search", "random"], "error: --seeds repeats the configurations of a grid; random search"),
        (["--metric", "accuracy/average,trainable_params"], "error: give one mode per metric: metrics ['accuracy/"),
        (["--metric", "a,b", "--mode", "max,min"], "error: several metrics (a, b) need search 'optuna'"),
        (["--metric", "a,b", "--mode", "max,most", "--search", "optuna"], "error: mode must be one of "),
        (["--protocol", "words"], None),  # argparse's own choices: exit 2 with usage
    ],
)
def test_bad_flags_are_one_line_and_exit_2(capsys, argv, message):
    study = load(ROOT / "experiments" / "rank_sweep.py").STUDY
    if message is None:
        with pytest.raises(SystemExit) as exit:
            main(study, "", argv)
        assert exit.value.code == 2 and "argument --protocol: invalid choice: 'words'" in capsys.readouterr().err
        return
    assert main(study, "", argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_seeds_repeat_every_configuration_and_the_protocol_flag_sets_the_trials():
    study = load(ROOT / "experiments" / "rank_sweep.py").STUDY
    sweep = sweep_config(study, parser(study, "").parse_args(["--seeds", "3", "--protocol", "label"]))
    assert sweep.space == {"rank": [8, 32, 128], "seed": [42, 43, 44]}
    assert sweep.trial.protocol == "label" and sweep.search == "grid"


def test_the_default_study_learns_on_real_questions_evaluated_before_and_after():
    study = load(ROOT / "experiments" / "rank_sweep.py").STUDY
    trial = sweep_config(study, parser(study, "").parse_args([])).trial
    assert (trial.model, trial.datasets, trial.protocol) == ("smollm2-135m", ["ARC-Easy"], "text")
    assert trial.eval_at_start and trial.eval_limit == 200


def test_the_pareto_search_asks_optuna_for_two_objectives_and_asha_prunes_on_validation_accuracy():
    study = load(ROOT / "experiments" / "pareto_search.py").STUDY
    sweep = sweep_config(study, parser(study, "").parse_args(["--smoke"]))
    assert (sweep.search, sweep.scheduler, sweep.num_samples) == ("optuna", "asha", 12)
    assert (sweep.metric, sweep.mode) == (["val/accuracy/average", "trainable_params"], ["max", "min"])
    config = tune_config(sweep, concurrent=1)
    assert (config.metric, config.mode) == (None, None)  # the searcher and the scheduler hold their own
    assert (config.search_alg.metric, config.search_alg.mode) == (sweep.metric, sweep.mode)
    assert (config.scheduler._metric, config.scheduler._mode) == ("val/accuracy/average", "max")  # ASHA has no getter
    assert sweep.trial.eval_every == 20  # ASHA compares accuracies, which trials report when they evaluate


def finished_trials(uri: str) -> list:
    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, "tags.`densetune.role` = 'trial' and attributes.status = 'FINISHED'") if ids else []


def saved_as_finished(folder: Path) -> int:
    """How many trials Tune's newest saved experiment state records as finished (TERMINATED)."""
    states = sorted(folder.glob("experiment_state-*.json"))
    try:
        trials = json.loads(states[-1].read_text())["trial_data"] if states else []
    except json.JSONDecodeError:  # caught mid-write
        return 0
    return sum(json.loads(state)["status"] == "TERMINATED" for state, _ in trials)


def two_trial_study(storage: Path) -> list[str]:
    """A smoke study of two trials, one after the other: the study the tests below interrupt and resume."""
    return [
        sys.executable, str(ROOT / "experiments" / "rank_sweep.py"), "--smoke", "--space", "rank=4,8",
        "--max-concurrent", "1", "--name", "killed", "--storage-path", str(storage),
    ]


def wait_for_the_first_trial(driver: subprocess.Popen, storage: Path, saved: bool = True) -> None:
    """Until the first trial of two_trial_study has finished in the store (polled once the store exists: earlier would
    race its creation) and, with `saved`, in Tune's saved state, which --resume reads."""
    uri = f"sqlite:///{storage / 'mlflow.db'}"
    deadline = time.monotonic() + 300
    while not (storage / "killed" / "densetune_sweep.json").exists() or not finished_trials(uri) \
            or (saved and saved_as_finished(storage / "killed") < 1):
        assert driver.poll() is None and time.monotonic() < deadline, "the first trial did not finish"
        time.sleep(1)


def test_a_sweep_resumes_after_its_driver_is_killed(tmp_path):
    """Kill the driver (and the local Ray it started) after the first trial, then --resume: the finished trial is
    not run again, the second runs, and the store ends with both runs FINISHED under one parent."""
    command = two_trial_study(tmp_path)
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # Tune's own state, saved each second instead of each 10
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    driver = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_for_the_first_trial(driver, tmp_path)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started: its whole session
        driver.wait()
    first = finished_trials(uri)
    assert len(first) == 1

    # -v: Ray's and Tune's output on the console as well
    resumed = subprocess.run([*command, "--resume", "-v"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "sweep killed (2 trials)" in resumed.stdout and "Trial status" in resumed.stdout
    # the study ends with its report, in the sweep's folder and on the sweep's run
    report = tmp_path / "killed" / "report.md"
    assert f"report (tables, paired tests, figures): {report}" in resumed.stdout
    assert "| rank=4 |" in report.read_text() and "| rank=8 |" in report.read_text()

    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.sweep = 'killed'")
    children = [r for r in runs if r.data.tags["densetune.role"] == "trial"]
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3
    parent = next(r for r in runs if r.data.tags["densetune.role"] == "sweep")
    assert "report.md" in {a.path.split("/")[-1] for a in client.list_artifacts(parent.info.run_id, "report")}
    assert sorted(int(r.data.params["rank"]) for r in children) == [4, 8]
    again = next(r for r in children if r.info.run_id == first[0].info.run_id)
    assert again.info.end_time == first[0].info.end_time  # not run again
    # each trial one history: the one cut short by the kill logs no step twice after it resumes
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")] == [2, 4]


def test_an_interrupted_study_says_what_finished_and_how_to_resume_it(tmp_path):
    """SIGTERM once the first trial has finished: the study ends within seconds, its Ray gone and its runs closed, and
    its last line says that it was interrupted, what finished, and the command that resumes it: the command that
    test_a_sweep_resumes_after_its_driver_is_killed resumes the same study with."""
    command = two_trial_study(tmp_path)
    driver = subprocess.Popen(command, cwd=tmp_path, start_new_session=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_for_the_first_trial(driver, tmp_path, saved=False)
        driver.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        out, err = driver.communicate(timeout=60)
        took = time.monotonic() - stopped
        # every process of its session gone: the driver and the Ray it started
        deadline = time.monotonic() + 30
        while left_in_session(driver.pid):
            assert time.monotonic() < deadline, f"left running: {left_in_session(driver.pid)}"
            time.sleep(0.5)
    finally:
        if left_in_session(driver.pid):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert took < 30
    last = err.strip().splitlines()[-1]
    said, _, resume = last.partition("; to resume it: ")
    assert said == "interrupted: 1 of 2 trials of sweep killed finished", err[-3000:]
    assert shlex.split(resume) == [*command, "--resume"]
    assert " finished: val/accuracy/average " in out and "interrupted: " not in out  # the console's lines, then this
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.sweep = 'killed'")
    statuses = sorted((r.data.tags["densetune.role"], r.info.status) for r in runs)
    # the second trial's run, if it had started, closed as KILLED; none left RUNNING
    assert statuses in ([("sweep", "KILLED"), ("trial", "FINISHED")],
                        [("sweep", "KILLED"), ("trial", "FINISHED"), ("trial", "KILLED")])


def left_in_session(session: int) -> list[str]:
    """The processes still running in a session (the names of those that are not zombies)."""
    import psutil

    left = []
    for process in psutil.process_iter(["pid", "name", "status"]):
        try:
            if os.getsid(process.pid) == session and process.info["status"] != psutil.STATUS_ZOMBIE:
                left.append(process.info["name"])
        except (ProcessLookupError, PermissionError):
            pass
    return left


@pytest.mark.parametrize(
    "argv, name, command",
    [
        (["--smoke"], "rank_sweep-20261207-101500", ["--smoke", "--name", "rank_sweep-20261207-101500", "--resume"]),
        (["--smoke", "--name", "y"], "y", ["--smoke", "--name", "y", "--resume"]),
        (["--name", "y", "--resume", "-v"], "y", ["--name", "y", "--resume", "-v"]),
    ],
)
def test_the_resume_command_names_the_sweep_and_resumes_it(argv, name, command):
    from densetune.experiment import resume_command

    study = load(ROOT / "experiments" / "rank_sweep.py").STUDY
    args = parser(study, "").parse_args(argv)
    assert shlex.split(resume_command(argv, args, name)) == [sys.executable, sys.argv[0], *command]


def test_an_interrupted_tuned_study_says_it_cannot_be_resumed():
    from densetune.experiment import interrupted_line
    from densetune.sweep.tune import SweepInterrupted

    study = load(ROOT / "experiments" / "tuned_comparison.py").STUDY
    args = parser(study, "").parse_args(["--smoke"])
    line = interrupted_line(SweepInterrupted("t-tuning", "/runs/t-tuning", 3, 8), ["--smoke"], args)
    assert line == ("interrupted: 3 of 8 trials of sweep t-tuning finished; a --tune study cannot be resumed yet: "
                    "run it again with a new --name")


def test_a_sweep_with_failed_trials_exits_1_and_names_their_error_files(tmp_path):
    from test_sweep import model_without_weights  # every check passes; the workers fail to load the weights

    model = model_without_weights(tmp_path / "model")
    command = [
        sys.executable, str(ROOT / "experiments" / "rank_sweep.py"), "--smoke", "--space", "rank=4",
        "--set", f"model={model}", "--name", "failing", "--storage-path", str(tmp_path),
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    error = done.stderr.strip().splitlines()
    assert error[-2] == "error: 1 of 1 trials failed; their errors:"
    assert error[-1].strip().startswith(str(tmp_path / "failing")) and error[-1].endswith("error.txt")
    assert Path(error[-1].strip()).exists()
    # the console: the plan, the trial's failure, the table and the way to the store last; Ray's output in the log
    out = done.stdout.strip().splitlines()
    assert out[0].startswith("sweep failing: 1 trials (grid over rank=4) of ") and "[1/1] rank=4 started" in out
    assert any(line.startswith("[1/1] rank=4 FAILED: ") and line.endswith("error.txt") for line in out)
    assert out[-1] == f"  mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'} --host 127.0.0.1 --port 5000"
    assert not [line for line in out if "╭" in line or "Trial status" in line]
    assert "Trial status" in (tmp_path / "failing" / "sweep.log").read_text()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.sweep = 'failing'")
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED"]  # the trial and the sweep


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--smoke", "--set", "lr=-1"], "error: the trial rank=4: lr must be a positive number; got -1.0"),
        (["--smoke", "--set", "model=org/missing"], "error: the trial rank=4: model 'org/missing' is neither a local"),
        (["--smoke", "--datasets", "BAD"], "error: BAD: row 0 has no field 'input'"),
    ],
)
def test_bad_input_leaves_no_store_and_no_folder(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the Hub cannot be reached, with or without network
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "Pick one."}]')
    argv = [a.replace("BAD", str(bad)) for a in argv]
    storage = tmp_path / "runs"
    study = load(ROOT / "experiments" / "rank_sweep.py").STUDY
    assert main(study, "", [*argv, "--space", "rank=4", "--storage-path", str(storage)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.replace("BAD", str(bad))) and err.count("\n") == 1
    assert not storage.exists()


def test_a_dry_run_lists_the_trials_and_their_time_and_starts_nothing(tmp_path, capsys):
    import ray

    storage = tmp_path / "runs"
    study = load(ROOT / "experiments" / "rank_sweep.py").STUDY
    assert main(study, "", ["--smoke", "--dry-run", "--storage-path", str(storage)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == [
        "dry run of sweep rank_sweep: 3 trials, nothing started", "  trial 1: rank=8", "  trial 2: rank=32",
        "  trial 3: rank=128",
    ]
    assert out[4] == "each trial: 1 worker(s) of 1 CPU (and GPUs if the cluster has them)"
    assert out[5].startswith("measured here on cpu in ") and " s per step; s per question: test/synthetic " in out[5]
    assert ", val/synthetic " in out[5]
    assert out[6].startswith("estimate per trial: start 5 s + load ") and " + train " in out[6]
    assert out[7].startswith("estimate of the sweep: 3 trials, 2 at a time on this machine: ")
    assert not storage.exists() and not ray.is_initialized()


def test_the_estimate_adds_up_the_measured_parts():
    from densetune.config import TrialConfig
    from densetune.trial.estimate import RAY_TRAIN_START_S, Measured, trial_seconds
    from densetune.trial.inputs import load_data

    config = TrialConfig(model="tiny-llama", datasets=["synthetic"], max_steps=60, eval_limit=200, eval_at_start=True,
                         eval_every=25, num_workers=2, batch_size=8)
    measured = Measured("cpu", "float32", 2.0, 1.5, question_s={"test/synthetic": 0.1, "val/synthetic": 0.3})
    parts = trial_seconds(config, load_data(config), measured)
    # 60 steps of 1.5 s on two workers; the 200 validation questions (0.3 s each) at steps 0, 25, 50 and 60, the 200
    # test questions (0.1 s) before training and at the end
    assert parts == pytest.approx(
        {"start": RAY_TRAIN_START_S, "load": 2.0, "train": 45.0, "evaluate": 4 * 200 * 0.3 + 2 * 200 * 0.1}
    )
    tuning = dataclasses.replace(config, evaluate_test=False, val_size=100, eval_every=None)
    assert trial_seconds(tuning, load_data(tuning), measured)["evaluate"] == pytest.approx(2 * 100 * 0.3)


def test_the_tuned_comparison_compares_lora_at_denselora_s_parameter_count_by_the_exact_formulas():
    from densemod.accounting import denselora_trainable, lora_trainable
    from densemod.accounting import LayerShape

    study = load(ROOT / "experiments" / "tuned_comparison.py").STUDY
    sweep = sweep_config(study, parser(study, "").parse_args([]))
    # SmolLM2-135M, q, k, v, up, down of 30 layers: (576 + 576), (576 + 192) twice, (576 + 1536) twice per layer
    shapes = [LayerShape(f"{i}.{kind}", n_in, n_out) for i in range(30) for kind, n_in, n_out in (
        ("q_proj", 576, 576), ("k_proj", 576, 192), ("v_proj", 576, 192), ("up_proj", 576, 1536),
        ("down_proj", 1536, 576))]
    dense = denselora_trainable(shapes, 32)
    assert dense == 374_784  # the figure docs/RESULTS.md reports for DenseLoRA r = 32
    nearest = min(range(1, 65), key=lambda r: abs(lora_trainable(shapes, r) - dense))
    assert nearest == 2 and lora_trainable(shapes, 2) == 414_720
    configurations = [{k: v for k, v in p.items() if k != "seed"} for p in sweep.points]
    assert configurations[::3] == [{"method": "denselora", "rank": 32}, {"method": "lora", "rank": 2},
                                   {"method": "lora", "rank": 32}]
    assert [p["seed"] for p in sweep.points] == [42, 43, 44] * 3
    tuning = tuning_of(parser(study, "").parse_args([]))
    assert (tuning.setting, tuning.values, tuning.extend) == ("lr", (1e-4, 3e-4, 1e-3, 3e-3), 2)
    assert (sweep.trial.max_steps, sweep.scheduler) == (3 * 60, "asha")  # three times the default study's steps
