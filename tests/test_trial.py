"""One trial end to end on Ray Train: tiny-llama, the built-in data, a few steps each."""

import json
import os
import subprocess
import sys

import pytest
import ray

from densetune.config import TrialConfig
from densetune.trial.increments import by_step, load_snapshots
from densetune.trial.models import tiny_llama
from densetune.trial.run import main, prepare, run_trial

# float32: the tests below compare runs that must agree to rounding (bfloat16 has its own test).
FAST = dict(
    model="tiny-llama", rank=4, dropout=0.0, batch_size=8, micro_batch_size=2, lr=1e-2, warmup_steps=0,
    report_every=1, eval_mode="loglik", eval_limit=16, cutoff_len=128, datasets=["synthetic"], dtype="float32",
    val_size=16,
)
# bfloat16 keeps 8 bits of mantissa, but a loss averages the rounding errors of many tokens: on the tiny model the two
# curves differed by at most 5e-4 over 20 steps (2026-11-29).
BF16_LOSS_TOLERANCE = 0.01


def losses(result, steps=None):
    return {h["step"]: h["loss"] for h in result.summary["history"] if steps is None or h["step"] in steps}


def test_one_and_two_workers_train_on_the_same_global_batches(local_ray, tmp_path):
    one = run_trial(TrialConfig(**FAST, max_steps=4, num_workers=1, name="one", storage_path=str(tmp_path)))
    # two workers, each evaluating half of the questions, with activation checkpointing through the shared
    # encoder under DDP
    two = run_trial(TrialConfig(
        **FAST, max_steps=4, num_workers=2, eval_sharded=True, gradient_checkpointing=True, name="two",
        storage_path=str(tmp_path),
    ))

    # and the same loop in this process (Ray Train's local mode)
    here = run_trial(TrialConfig(**FAST, max_steps=4, num_workers=0, name="here", storage_path=str(tmp_path)))

    assert list(losses(one)) == list(losses(two)) == list(losses(here)) == [1, 2, 3, 4]
    assert losses(one)[4] < losses(one)[1]  # lr 1e-2 without warm-up: the later steps depend on the updates
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    assert losses(here) == pytest.approx(losses(one), rel=1e-4)
    assert two.accuracies == one.accuracies == here.accuracies
    assert [p["index"] for p in two.summary["predictions"]] == list(range(16))
    assert (here.path, here.checkpoint) == (None, None) and one.checkpoint.startswith(one.path)


def test_resume_continues_the_uninterrupted_loss_curve(local_ray, tmp_path):
    settings = dict(
        FAST, dropout=0.1, warmup_steps=2, max_steps=6, checkpoint_every=3, snapshot_every=2, storage_path=str(tmp_path)
    )
    full = run_trial(TrialConfig(**settings, name="full"))
    paused = run_trial(TrialConfig(**settings, name="paused", stop_after_step=3))
    resumed = run_trial(TrialConfig(**settings, name="paused"))

    assert losses(paused) == pytest.approx(losses(full, {1, 2, 3}), rel=1e-6)
    # the run is not over: the validation set's evaluation at step 0 only, no final one yet
    assert [e["step"] for e in paused.summary["evaluations"]] == [0]
    assert set(paused.summary["evaluations"][0]) == {"step", "val/accuracy/synthetic", "val/accuracy/average"}
    assert resumed.summary["resumed_from_step"] == 3
    assert list(losses(resumed)) == [4, 5, 6]
    assert losses(resumed) == pytest.approx(losses(full, {4, 5, 6}), rel=1e-5)
    assert resumed.accuracies == full.accuracies

    predictions = json.loads(open(os.path.join(resumed.checkpoint, "predictions.json")).read())
    assert len(predictions) == 16 and {p["step"] for p in predictions} == {6}
    assert set(predictions[0]) == {"step", "benchmark", "index", "output", "extracted", "gold", "correct", "correct_norm"}
    # the snapshots recorded before the pause travel with the checkpoint: the resumed run still compares with step 0
    snapshots = load_snapshots(os.path.join(resumed.checkpoint, "snapshots.safetensors"))
    assert sorted(by_step(snapshots)) == [0, 2, 4, 6]
    assert set(by_step(snapshots)[0]) == set(snapshot_keys(full.checkpoint))
    saved = json.loads(open(os.path.join(resumed.checkpoint, "summary.json")).read())
    assert saved["evaluations"] == resumed.summary["evaluations"] and saved["trainable_params"] == 2976


def snapshot_keys(checkpoint: str) -> set[str]:
    return set(by_step(load_snapshots(os.path.join(checkpoint, "snapshots.safetensors")))[6])


def cpu_has_native_bf16() -> bool:
    flags = open("/proc/cpuinfo").read().split()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def test_bf16_autocast_follows_the_float32_loss_curve(local_ray, tmp_path):
    settings = dict(FAST, max_steps=20, storage_path=str(tmp_path))
    fp32 = run_trial(TrialConfig(**{**settings, "dtype": "float32"}, name="fp32"))
    bf16 = run_trial(TrialConfig(**{**settings, "dtype": "bfloat16"}, name="bf16"))

    assert (fp32.summary["precision"], bf16.summary["precision"]) == ("float32", "bfloat16")
    reference, mixed = losses(fp32), losses(bf16)
    assert list(reference) == list(mixed) == list(range(1, 21))
    assert reference[20] < reference[1] - 0.2  # the curve moves: the comparison is not of two flat lines
    assert reference != mixed  # bfloat16 did run
    assert max(abs(reference[step] - mixed[step]) for step in reference) < BF16_LOSS_TOLERANCE


def test_the_validation_set_is_evaluated_at_every_evaluation_and_the_test_split_at_the_ends(local_ray, tmp_path):
    result = run_trial(TrialConfig(
        **{**FAST, "report_every": 5, "cutoff_len": 512}, max_steps=4, eval_at_start=True, eval_every=2, name="evals",
        storage_path=str(tmp_path),
    ))
    evaluations = result.summary["evaluations"]
    assert [e["step"] for e in evaluations] == [0, 2, 4]
    validation = {"val/accuracy/synthetic", "val/accuracy/average", "val/loss"}
    test = {"accuracy/synthetic", "accuracy/average"}
    assert [set(e) - {"step"} for e in evaluations] == [validation | test, validation, validation | test]
    assert all(0 < e["val/loss"] < 10 for e in evaluations)
    # steps with an evaluation are reported even between report_every steps
    assert [h["step"] for h in result.summary["history"]] == [2, 4]
    # only the test split's answers are kept for paired tests: 16 questions before training and 16 after
    predictions = json.loads(open(os.path.join(result.checkpoint, "predictions.json")).read())
    assert sorted({p["step"] for p in predictions}) == [0, 4] and len(predictions) == 32


def test_command_line_trial_prints_a_summary(local_ray, tmp_path, capsys):
    code = main([
        "--model", "tiny-llama", "--method", "lora", "--rank", "4", "--targets", "q,v", "--max-steps", "2",
        "--batch-size", "4", "--micro-batch-size", "4", "--eval-mode", "loglik", "--eval-limit", "8",
        "--storage-path", str(tmp_path), "--name", "cli",
    ])
    out = capsys.readouterr().out
    assert code == 0
    # what it printed is what the run recorded: the summary saved with its last checkpoint
    (checkpoint,) = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("checkpoint (adapter")]
    assert checkpoint.startswith(str(tmp_path / "cli"))
    summary = json.loads(open(os.path.join(checkpoint, "summary.json")).read())
    total = sum(p.numel() for p in tiny_llama().parameters()) + 1792
    assert summary["total_params"] == total
    # LoRA r=4 on q (64+64) and v (64+32) in 2 layers
    assert f"trainable params: 1,792 of {total:,d} ({100 * 1792 / total:.4f}%)" in out
    # dtype auto: bfloat16 autocast where the CPU has native bf16 instructions
    assert f"precision: {'bfloat16' if cpu_has_native_bf16() else 'float32'}" in out
    final = summary["evaluations"][-1]
    assert final["step"] == 2 and f"accuracy/synthetic: {final['accuracy/synthetic']:.4f}" in out
    assert f"checkpoint (adapter, predictions.json): {checkpoint}" in out
    assert "first optimizer step after: " in out and "wall time: " in out


# A command-line trial on the tiny model: every evaluation before and after training, a few steps.
CLI_TRIAL = [
    "--model", "tiny-llama", "--method", "lora", "--rank", "4", "--targets", "q,v", "--max-steps", "4",
    "--batch-size", "4", "--micro-batch-size", "4", "--eval-mode", "loglik", "--eval-limit", "16", "--eval-at-start",
    "--val-size", "16", "--report-every", "1", "--cutoff-len", "512",
]
# What Ray prints of a trial (the workers' lines it forwards, its report of each result) and the evaluations' bars
RAYS_OUTPUT = ("(RayTrainWorker pid=", "Reporting training result", "loglik: ")


def test_the_command_line_trial_shows_a_progress_line_and_keeps_rays_output_in_its_log(tmp_path):
    # in a process of its own, with its own Ray, as a user runs it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-m", "densetune.trial", *CLI_TRIAL, "--storage-path", str(tmp_path), "--name", "quiet"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    lines = done.stdout.splitlines()
    folder, log = tmp_path / "quiet", tmp_path / "quiet" / "trial.log"
    # what it runs, where Ray's output is, progress lines, then the result and the checkpoint
    assert len(lines) < 40, done.stdout
    assert lines[0] == ("trial quiet: method=lora rank=4 targets=q,v on tiny-llama, trained on synthetic for 4 steps, "
                        "1 worker(s) of 1 CPU")
    assert lines[1] == f"  Ray's output: {log} (-v shows it here)"
    assert lines[2].startswith("starting · 0:0") and lines[2].endswith(" elapsed")
    assert any(line.startswith("step 4/4 · loss ") for line in lines)
    assert f"trial: {folder}" in lines and any(line.startswith("trainable params: 1,792 of ") for line in lines)
    assert any(line.startswith("accuracy/synthetic: ") for line in lines)
    assert lines[-3] == f"checkpoint (adapter, predictions.json): {folder / 'checkpoint_000004'}"
    assert not [line for line in lines if any(shown in line for shown in RAYS_OUTPUT)]
    # Ray's output is in the log: its banner, the workers' lines, the bars
    logged = log.read_text()
    assert "Started a local Ray instance" in logged and all(shown in logged for shown in RAYS_OUTPUT)


def test_the_command_line_trial_shows_rays_output_with_v(local_ray, tmp_path, capfd):
    assert main([*CLI_TRIAL, "--storage-path", str(tmp_path), "--name", "verbose", "-v"]) == 0
    out, err = capfd.readouterr()
    assert all(shown in out + err for shown in RAYS_OUTPUT)
    assert f"checkpoint (adapter, predictions.json): {tmp_path / 'verbose' / 'checkpoint_000004'}" in out
    assert not (tmp_path / "verbose" / "trial.log").exists()


def test_the_progress_line_reads_the_evaluations_bar_and_the_reported_steps(monkeypatch):
    import io

    from tqdm.auto import tqdm  # as evaluate.py draws its bars

    from densetune.trial import progress

    assert progress.live_bar() is None
    hidden = tqdm(total=8, desc="loglik", disable=True)  # as on a rank that does not evaluate
    assert progress.live_bar() is None
    with tqdm(total=300, desc="generate", file=io.StringIO()) as bar:
        bar.update(112)
        assert progress.live_bar() == ("generate", 112, 300)
    assert progress.live_bar() is None
    hidden.close()

    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    line = progress.Progress().line
    seen = progress.Progress()
    assert line({}) == "starting · 0:00 elapsed"
    assert line({"evaluating": ("generate", 8, 200)}) == "before training · evaluating: generate 8/200 · 0:00 elapsed"
    now[0] = 162.0
    assert seen.line({"step": 10, "total_steps": 60, "loss": 5.5, "reported_at": 1000.0}) == (
        "step 10/60 · loss 5.5000 · 1:02 elapsed"
    )
    # 10 steps in 5 s: 40 more steps in 20 s
    assert seen.line({"step": 20, "total_steps": 60, "loss": 5.25, "reported_at": 1005.0}) == (
        "step 20/60 · loss 5.2500 · 1:02 elapsed · 0:20 to step 60"
    )
    assert seen.line({"step": 50, "total_steps": 60, "loss": 5.0, "reported_at": 1020.0,
                      "evaluating": ("loglik", 3, None)}) == "step 50/60 · loss 5.0000 · evaluating: loglik 3/? · 1:02 elapsed"


def write_rows(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


ROW = {"instruction": "Pick one.\n\nAnswer format: answer1/answer2", "input": "", "output": "the correct answer is answer1", "answer": "answer1"}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(datasets=["/nonexistent/train.json"]), r"/nonexistent/train.json"),
        (dict(datasets=["synthetic"], data_fraction=0.0001), r"data_fraction 0.0001 of 1984 rows leaves no row"),
        (dict(model="no-such-model"), r"unknown model 'no-such-model': use one of 'tiny-llama', 'smollm2-135m'"),
        (dict(num_workers=3, micro_batch_size=4, batch_size=16), r"batch_size 16 must be a multiple of micro_batch_size x num_workers = 12"),
        (dict(eval_mode="greedy"), r"eval_mode must be one of 'generate', 'loglik'; got 'greedy'"),
        (dict(rank=0), r"r must be a positive integer"),
        (dict(max_steps=0), r"max_steps must be a positive integer; got 0"),
        (dict(lr=-1.0), r"^lr must be a positive number; got -1.0$"),
        (dict(lr=float("nan")), r"^lr must be a positive number; got nan$"),
        (dict(max_grad_norm=0.0), r"^max_grad_norm must be a positive number; got 0.0$"),
        (dict(warmup_steps=-1), r"^warmup_steps must be a non-negative integer \(0: no warm-up\); got -1$"),
        (dict(seed=-3), r"^seed must be a non-negative integer; got -3$"),
        (dict(eval_batch_size=0), r"^eval_batch_size must be a positive integer; got 0$"),
        (dict(max_new_tokens=0), r"^max_new_tokens must be a positive integer; got 0$"),
        (dict(val_size=-1), r"^val_size must be a non-negative integer \(0: no validation set\); got -1$"),
        (dict(val_size=0, eval_every=5), r"^eval_every 5 evaluates the validation set, and val_size is 0: give val_size"),
        (dict(val_size=2000), r"^synthetic has 2000 training rows: val_size 2000 would leave none to train on; use a "
                              r"smaller val_size \(0: no validation set\)$"),
    ],
)
def test_bad_settings_fail_before_any_worker(settings, message):
    with pytest.raises(ValueError, match=message):
        prepare(TrialConfig(**{**FAST, **settings}))


def test_a_row_without_a_field_names_file_and_row(tmp_path):
    path = write_rows(tmp_path / "bad.json", [ROW, {k: v for k, v in ROW.items() if k != "output"}])
    with pytest.raises(ValueError, match=r"bad.json: row 1 has no field 'output'"):
        prepare(TrialConfig(**{**FAST, "datasets": [path]}))


def test_a_benchmark_no_extractor_knows(tmp_path):
    rows = [{**ROW, "answer": colour} for colour in ("blue", "green", "red")]
    path = write_rows(tmp_path / "colours.json", rows)
    with pytest.raises(ValueError, match=r"'colours'"):
        prepare(TrialConfig(**{**FAST, "eval_datasets": [path]}))


def test_loglik_needs_fixed_candidates(tmp_path):
    rows = [{**ROW, "answer": "12.0"}] * 3
    path = write_rows(tmp_path / "sums.json", rows)
    with pytest.raises(ValueError, match=r"eval_mode 'loglik' scores fixed candidates, but 'sums' has 'number' answers"):
        prepare(TrialConfig(**{**FAST, "eval_datasets": [path]}))


def test_more_workers_than_the_cluster_has(local_ray, tmp_path):
    config = TrialConfig(**{**FAST, "num_workers": 4, "batch_size": 8}, name="big", storage_path=str(tmp_path))
    with pytest.raises(ValueError, match=r"num_workers 4 need 4 CPUs in all, but this Ray cluster has 2"):
        run_trial(config)
    assert not (tmp_path / "big").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "no-such-model"], "error: unknown model 'no-such-model'"),
        (["--lr", "-1"], "error: lr must be a positive number; got -1.0"),
        (["--storage-path", "/proc/x", "--model", "tiny-llama"], "error: storage_path '/proc/x' cannot be written ("),
    ],
)
def test_command_line_bad_input_is_one_line_before_ray_starts(capsys, argv, message):
    ray_before = ray.is_initialized()  # this module's Ray runs when other tests ran first
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)
    assert ray.is_initialized() == ray_before


def test_a_diverging_command_line_trial_stops_at_once_and_exits_1(tmp_path, capsys):
    argv = [
        "--model", "tiny-llama", "--datasets", "synthetic", "--max-steps", "6", "--warmup-steps", "0", "--lr", "1e6",
        "--report-every", "1", "--eval-mode", "loglik", "--eval-limit", "8", "--num-workers", "0",
        "--storage-path", str(tmp_path),
    ]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    error = err.strip().splitlines()[-1]
    assert error.startswith("error: the trial diverged: its loss was not finite at step ")
    step = int(error.split("at step ")[1].split(",")[0])
    assert 1 <= step < 6  # it stopped there, not at the end
