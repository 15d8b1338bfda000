"""Sweeps on a local Ray: trials on tiny-llama tracked in MLflow, checked through the tracking store."""

import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path

import peft
import pytest
from mlflow import MlflowClient
from safetensors.torch import load_file

import densemod
from conftest import checkpoint_steps, is_ray_train_worker, kill_and_wait
from densetune.config import TrialConfig
from densetune.experiment import LOCAL, SMOKE
from densetune.sweep.tune import OptunaOnEvaluations, SweepConfig, run_sweep
from densetune.results.store import sweep_runs

# The --smoke settings of experiments/: what a user runs first, so it is what the tests run.
TINY_TRIAL = dict(LOCAL, **SMOKE)


def trial(tmp_path: Path, **settings) -> TrialConfig:
    return TrialConfig(**{**TINY_TRIAL, "storage_path": str(tmp_path / "runs"), **settings})


def tracked(uri: str, sweep: str) -> tuple[MlflowClient, list, list]:
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], f"tags.sweep = '{sweep}'")
    parents = [r for r in runs if r.data.tags["densetune.role"] == "sweep"]
    children = [r for r in runs if r.data.tags["densetune.role"] == "trial"]
    return client, parents, children


def expected_trainable(method: str, variant: str, rank: int) -> int:
    """The count densemod measures on the same architecture (tiny-llama's shapes, built here)."""
    from densetune.trial.models import load_model

    config = densemod.build_peft_config(method, rank, variant=variant, target_modules=TrialConfig().targets)
    return densemod.parameter_report(peft.get_peft_model(load_model("tiny-llama"), config)).trainable


def test_a_grid_sweep_is_one_parent_run_with_one_finished_child_per_trial(local_ray, tmp_path, capfd):
    sweep = SweepConfig("grid_study", {"method": ["denselora", "freeze", "lora"]}, trial(tmp_path, rank=4), name="g")
    result = run_sweep(sweep)

    # the console: what it runs, where, a line as each trial starts and ends, progress; Ray's and Tune's output is in
    # the sweep's log
    out = capfd.readouterr().out.splitlines()
    assert out[0].startswith("sweep g: 3 trials (grid over method=denselora,freeze,lora) of tiny-llama on synthetic")
    assert out[3] == f"  Ray's output: {tmp_path / 'runs' / 'g' / 'sweep.log'} (-v shows it here)"
    for method in ("denselora", "freeze", "lora"):
        assert sum(line.endswith(f"method={method} started") for line in out) == 1
        assert sum(f"method={method} finished: val/accuracy/average 0." in line for line in out) == 1
    assert out[-1].startswith("3/3 trials done · ") and out[-1].endswith("ETA 0:00")
    assert not [line for line in out if "Trial status" in line or "╭" in line or "Traceback" in line]
    log = (tmp_path / "runs" / "g" / "sweep.log").read_text()
    assert "Trial status" in log and "RayTrainWorker" in log

    client, parents, children = tracked(result.tracking_uri, "g")
    assert result.tracking_uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert json.loads(parents[0].data.params["space"]) == {"method": ["denselora", "freeze", "lora"]}
    assert len(children) == 3
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.info.status for c in children} == {"FINISHED"}
    # "freeze" named as a method is DenseLoRA with the freeze variant
    methods = sorted((c.data.params["method"], c.data.params["variant"]) for c in children)
    assert methods == [("denselora", "denselora"), ("denselora", "freeze"), ("lora", "denselora")]

    # children are named by what the sweep searched
    assert sorted(c.info.run_name for c in children) == ["method=denselora", "method=freeze", "method=lora"]
    for child in children:
        params, tags, metrics = child.data.params, child.data.tags, child.data.metrics
        assert params["rank"] == "4" and params["alpha"] == "8" and params["model"] == "tiny-llama"
        assert params["datasets"] == "synthetic" and params["num_workers"] == "1" and params["total_steps"] == "4"
        trainable = expected_trainable(params["method"], params["variant"], 4)
        assert int(params["trainable_params"]) == trainable and metrics["trainable_params"] == trainable
        assert metrics["total_params"] == int(params["total_params"]) and metrics["total_steps"] == 4
        assert not [k for k in params if "/" in k or k in ("pid", "timestamp", "trial_id", "name")]
        # resources as used: a CPU run names no GPU count; the sweep's folder is on the sweep's run
        assert params["use_gpu"] == "False" and "gpus_per_worker" not in params and "storage_path" not in params
        assert tags["study"] == "grid_study" and tags["sweep"] == "g" and tags["ray.trial_id"]
        assert tags["mlflow.source.name"]  # the UI's Source column: the driver's script
        # the UI's Dataset column: what it trained and evaluated on
        inputs = [(d.dataset.name, d.tags[0].value) for d in child.inputs.dataset_inputs]
        assert sorted(inputs) == [("synthetic/test", "evaluation"), ("synthetic/train", "training")]
        assert len(tags["mlflow.source.git.commit"]) == 40
        assert {"loss", "learning_rate", "tokens_per_s", "peak_memory_mb", "wall_time_s"} <= set(metrics)
        assert {"accuracy/synthetic", "accuracy/average"} <= set(metrics)
        assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")] == [2, 4]
        # the cost: one CPU reserved for the trial's wall time, and every real token of its 4 steps
        assert metrics["device_seconds"] == pytest.approx(metrics["wall_time_s"]) and metrics["wall_time_s"] > 0
        summary = json.loads(Path(client.download_artifacts(child.info.run_id, "summary.json", str(tmp_path / child.info.run_id))).read_text())
        tokens = [h["tokens_per_s"] * h["step_time_s"] for h in summary["history"]]  # steps 2 and 4 of 4
        assert metrics["tokens_seen"] == summary["history"][-1]["tokens_seen"] > sum(tokens)
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"adapter", "config.json", "predictions.json", "summary.json"} <= artifacts
    # numbers are metrics too, so the store filters and sorts them as numbers
    ids = [parents[0].info.experiment_id]
    sizes = sorted((c.data.metrics["trainable_params"] for c in children), reverse=True)  # e.g. 6,272 after 960
    large = client.search_runs(ids, f"tags.sweep = 'g' and metrics.trainable_params > {sizes[-1]}",
                               order_by=["metrics.trainable_params DESC"])
    assert [r.data.metrics["trainable_params"] for r in large] == sizes[:-1]

    # the sweep's run holds its result: trials by status, the best trial's accuracies and settings, the summary table
    parent = client.get_run(parents[0].info.run_id)
    assert parent.data.metrics["trials_finished"] == 3 and parent.data.metrics["trials_failed"] == 0
    # the best trial: the highest validation accuracy, ties to the earlier trial; its test accuracy shown beside it
    best = min(children, key=lambda c: (-c.data.metrics["val/accuracy/average"], c.data.tags["ray.trial_id"]))
    assert parent.data.tags["best_run_id"] == best.info.run_id and parent.data.tags["best_trial"] == best.info.run_name
    assert parent.data.tags["best.method"] == best.data.params["method"]
    for name in ("val/accuracy/average", "val/accuracy/synthetic", "accuracy/average", "accuracy/synthetic"):
        assert parent.data.metrics[f"best/{name}"] == best.data.metrics[name]
    # the validation set at step 0 and at the end, the test split too (eval_at_start): every trial the same questions
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val/accuracy/average")] == [0, 4]
        assert [m.step for m in client.get_metric_history(child.info.run_id, "accuracy/average")] == [0, 4]
        assert 0 < child.data.metrics["val/loss"] and child.data.params["val_size"] == "8"
    assert {"summary.csv", "summary.md"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    table = result.table
    assert sorted(zip(table["method"], table["variant"])) == methods and set(table["status"]) == {"FINISHED"}
    assert {"trainable_params", "accuracy/average", "device_seconds", "tokens_seen"} <= set(table.columns)
    assert (Path(result.path) / "summary.md").read_text().startswith("| method | variant | trainable_params |")

    # the logged adapter is the trained one: it loads, and its trained encoder is not the initial one
    dense = next(c for c in children if c.data.params["variant"] == "denselora" and c.data.params["method"] == "denselora")
    folder = client.download_artifacts(dense.info.run_id, "adapter", str(tmp_path / "download"))
    weights = load_file(Path(folder) / "adapter_model.safetensors")
    assert any("denselora_decoder" in k for k in weights)
    assert all(float(w.abs().sum()) > 0 for k, w in weights.items() if "denselora_decoder" in k)  # W_d starts at 0

    frame = sweep_runs("g", result.tracking_uri)
    assert len(frame) == 3 and list(result.trials["run_id"]) == list(frame["run_id"])
    assert frame["rank"].tolist() == [4, 4, 4] and frame["lr"].dtype == float
    assert frame["trainable_params"].dtype == int and frame["total_steps"].tolist() == [4, 4, 4]
    assert set(frame["status"]) == {"FINISHED"} and frame["accuracy/average"].between(0, 1).all()

    # the same name again, without resume: refused, and nothing that was saved is touched
    state = sorted(p.name for p in Path(result.path).iterdir())
    with pytest.raises(ValueError, match=r"sweep 'g' already exists at .*: pass --resume to continue it"):
        run_sweep(sweep)
    assert sorted(p.name for p in Path(result.path).iterdir()) == state
    assert len(tracked(result.tracking_uri, "g")[2]) == 3


def test_asha_stops_the_worse_trial_and_its_run_ends_killed(local_ray, tmp_path):
    # A metric whose order is known in advance: with one trial at a time, the second (more trainable parameters,
    # worse in mode "min") falls below the first at the first rung (step 2) and is stopped there.
    sweep = SweepConfig(
        "asha_study", {"rank": [2, 8]}, trial(tmp_path, max_steps=8, report_every=1), name="a", scheduler="asha",
        metric="trainable_params", mode="min", grace_period=2, max_concurrent=1,
    )
    result = run_sweep(sweep)

    client, parents, children = tracked(result.tracking_uri, "a")
    by_rank = {int(c.data.params["rank"]): c for c in children}
    assert by_rank[2].info.status == "FINISHED"
    assert by_rank[8].info.status == "KILLED" and by_rank[8].data.tags["stopped_early"] == "true"
    steps = [m.step for m in client.get_metric_history(by_rank[8].info.run_id, "loss")]
    assert max(steps) < 8
    assert parents[0].info.status == "FINISHED"


def test_optuna_and_asha_choose_on_validation_and_never_see_a_test_metric(local_ray, tmp_path, monkeypatch):
    # Tune's searcher and scheduler run in this process (the sweep's driver): record every result they are shown
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    seen: list[str] = []
    for cls in (ASHAScheduler, OptunaSearch):
        for hook in ("on_trial_result", "on_trial_complete"):
            original = getattr(cls, hook)

            def recording(self, *args, original=original, **kwargs):
                result = kwargs.get("result", args[-1] if args else None)
                seen.extend(result or {})
                return original(self, *args, **kwargs)

            monkeypatch.setattr(cls, hook, recording)
    space = {"rank": [2, 4, 8], "seed": [1, 2]}
    sweep = SweepConfig(
        "optuna_study", space, trial(tmp_path, eval_every=2), name="o", search="optuna", num_samples=2,
        scheduler="asha", grace_period=2, metric=["val/accuracy/average", "trainable_params"], mode=["max", "min"],
    )
    result = run_sweep(sweep)

    # they saw the validation metrics, and no test metric at any point
    assert "val/accuracy/average" in seen and "val/loss" in seen
    assert not [name for name in seen if name.startswith(("accuracy/", "accuracy_norm/"))]
    trials = result.trials
    assert len(trials) == 2 and set(trials["status"]) <= {"FINISHED", "KILLED"}
    assert set(trials["rank"]) <= {2, 4, 8} and set(trials["seed"]) <= {1, 2}
    # Optuna's own record: each finished trial told as (validation accuracy, trainable parameters), in the two
    # directions asked for
    searcher = OptunaOnEvaluations()
    searcher.restore_from_dir(result.path)
    study = searcher._ot_study
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    told = sorted(tuple(t.values) for t in study.trials if t.values)
    finished = trials[trials["status"] == "FINISHED"]
    assert told == sorted(zip(finished["val/accuracy/average"], finished["trainable_params"].astype(float)))
    parent = MlflowClient(result.tracking_uri).get_run(result.run_id).data.params
    assert (parent["metric"], parent["mode"]) == ("val/accuracy/average,trainable_params", "max,min")


def test_the_hybrid_and_denselora_without_sharing_are_searched_values(local_ray, tmp_path):
    space = {"method": ["denselora", "hybrid"], "share_scope": ["kind", "layer"]}
    result = run_sweep(SweepConfig("sharing", space, trial(tmp_path, rank=4, max_steps=2), name="s", max_concurrent=2))

    # tiny-llama at r=4 on q, k, v, up, down: W_e, W_d of q (64+64)*4, k and v (64+32)*4, up and down (64+128)*4 (once
    # per kind, or for each of the 2 layers without sharing), M 4*4 per adapted layer; the hybrid's LoRA on q, k, v
    # trains 2 layers * (512 + 384 + 384) and DenseLoRA the rest
    by_hand = {
        ("denselora", "kind"): 2_816 + 10 * 16, ("denselora", "layer"): 2 * 2_816 + 10 * 16,
        ("hybrid", "kind"): 2 * 1_280 + 1_536 + 4 * 16, ("hybrid", "layer"): 2 * 1_280 + 2 * 1_536 + 4 * 16,
    }
    client, _, children = tracked(result.tracking_uri, "s")
    assert {c.info.status for c in children} == {"FINISHED"}
    counts = {(c.data.params["method"], c.data.params["share_scope"]): c.data.metrics["trainable_params"] for c in children}
    assert counts == by_hand
    assert sorted(c.info.run_name for c in children) == [
        "method=denselora share_scope=kind", "method=denselora share_scope=layer",
        "method=hybrid share_scope=kind", "method=hybrid share_scope=layer",
    ]
    # the hybrid's adapter is one: LoRA's A and B beside DenseLoRA's shared projections
    hybrid = next(c for c in children if c.data.params["method"] == "hybrid" and c.data.params["share_scope"] == "kind")
    folder = client.download_artifacts(hybrid.info.run_id, "adapter", str(tmp_path / "download"))
    keys = load_file(Path(folder) / "adapter_model.safetensors")
    assert any("q_proj.lora_A" in k for k in keys) and any("denselora_encoder" in k and "up_proj" in k for k in keys)
    assert not any("q_proj" in k for k in keys if "denselora" in k)

    # the report's variant table tells DenseLoRA with and without sharing apart
    from densetune.results import report

    text = report.write_report("s", result.tracking_uri, out=tmp_path / "report").read_text()
    table = text.split("## DenseLoRA variants and sharing (the paper's Table 4)", 1)[1].split("##", 1)[0]
    assert "| denselora |" in table and "| denselora/unshared |" in table and "hybrid" not in table


def test_one_sweep_compares_the_two_protocols(local_ray, tmp_path):
    result = run_sweep(SweepConfig("protocol_study", {"protocol": ["label", "text"]}, trial(tmp_path, max_steps=2), name="p"))

    client, _, children = tracked(result.tracking_uri, "p")
    by_protocol = {c.data.params["protocol"]: c for c in children}
    assert {c.info.status for c in children} == {"FINISHED"} and set(by_protocol) == {"label", "text"}
    # the text protocol also reports the length-normalised accuracy, before training (step 0) and after
    text, label = by_protocol["text"], by_protocol["label"]
    assert [m.step for m in client.get_metric_history(text.info.run_id, "accuracy_norm/average")] == [0, 2]
    assert "accuracy_norm/average" not in label.data.metrics
    for run, answers in ((label, "answer"), (text, None)):
        path = client.download_artifacts(run.info.run_id, "predictions.json", str(tmp_path / run.info.run_id))
        predictions = json.loads(Path(path).read_text())
        assert {p["step"] for p in predictions} == {0, 2}  # the untuned model's answers, and the trained one's
        labelled = all(p["output"].startswith("answer") for p in predictions)
        assert labelled if answers else not labelled  # text: the options' own words, e.g. "yellow", "42"


def test_a_trial_ends_even_when_the_driver_is_slow_to_read_its_results(local_ray, tmp_path, monkeypatch):
    # A driver that takes a while over each result (a remote MLflow server, a busy machine) lets a trial's training
    # function return before Tune has read its last report: Ray 2.60 then deadlocks unless the trial waits
    # (sweep.wait_until_tune_has_read). Without that wait this sweep never ends; the alarm turns that into a failure.
    from densetune.sweep.record import SweepTracker

    logged = SweepTracker.on_trial_result

    def slowly(self, *args, **kwargs):
        time.sleep(2)
        logged(self, *args, **kwargs)

    monkeypatch.setattr(SweepTracker, "on_trial_result", slowly)
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("the sweep did not end")))
    signal.alarm(240)
    try:
        result = run_sweep(SweepConfig("slow", {"rank": [4]}, trial(tmp_path, max_steps=2, report_every=2), name="s"))
    finally:
        signal.alarm(0)
    assert list(result.trials["status"]) == ["FINISHED"]


def model_without_weights(folder: Path) -> str:
    """A model folder with a config and a tokenizer but no weights: every check passes, and the workers fail to load
    it."""
    from densetune.trial.models import byte_tokenizer, tiny_llama_config

    tiny_llama_config().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return str(folder)


def test_a_sweep_whose_trials_all_fail_is_a_failed_run_with_its_error_files(local_ray, tmp_path):
    sweep = SweepConfig(
        "fail_study", {"rank": [4, 8]}, trial(tmp_path, model=model_without_weights(tmp_path / "m")), name="f"
    )
    result = run_sweep(sweep)

    _, parents, children = tracked(result.tracking_uri, "f")
    assert [c.info.status for c in children] == ["FAILED", "FAILED"]
    assert parents[0].info.status == "FAILED" and parents[0].data.tags["failed_trials"] == "2"
    assert len(result.failed) == 2
    for error_file in result.failed:
        assert "model.safetensors" in Path(error_file).read_text()  # the workers' own error, kept by Tune


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(space={}), r"the search space is empty"),
        (dict(space={"ranks": [4]}), r"unknown search dimension 'ranks'; allowed: rank, targets"),
        (dict(space={"method": ["denselora", "lorax"]}), r"method must be one of .*got 'lorax'"),
        (dict(space={"rank": [4, 0]}), r"the trial rank=0: r must be a positive integer \(1, 2, ...\); got 0"),
        (dict(space={"rank": []}), r"rank: give a non-empty list of values"),
        (dict(space={"targets": ["qkv", "q,x_proj"]}), r"x_proj"),
        (dict(space={"variant": ["freeze"], "method": ["lora"]}), r"trial variant=freeze method=lora: variant 'freeze' applies"),
        (dict(search="bayes"), r"search must be one of"),
        (dict(metric="accuracy/average"), r"^metric 'accuracy/average' is measured on the test split, which is reported "
                                          r"and never chosen on: use val/accuracy/average \(the validation set"),
        (dict(metric=["trainable_params", "accuracy_norm/ARC-Easy"], mode=["min", "max"], search="optuna"),
         r"^metric 'accuracy_norm/ARC-Easy' is measured on the test split"),
        (dict(trial=dict(val_size=0)), r"^metric 'val/accuracy/average' is measured on the validation set, and "
                                       r"val_size is 0: give val_size a number of rows$"),
        # cutoff_len 8 leaves no answer token in any example
        (dict(trial=dict(cutoff_len=8)), r"0 trainable training rows make no batch of batch_size 4"),
        (dict(trial=dict(num_workers=0)), r"num_workers 0 runs a trial in the process that starts it"),
        (dict(tracking_uri="http://127.0.0.1:9"), r"tracking URI 'http://127.0.0.1:9' cannot be reached"),
        (dict(resume=True, name="never-started"), r"there is no sweep to resume at .*never-started"),
    ],
)
def test_bad_input_is_one_line_before_any_trial(tmp_path, change, message):
    change = dict(change)
    sweep = SweepConfig("bad", {"rank": [4]}, trial(tmp_path, **change.pop("trial", {})), name="bad")
    sweep = dataclasses.replace(sweep, **change)
    with pytest.raises(ValueError, match=message) as error:
        run_sweep(sweep)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "runs" / "bad").exists()


def test_an_unwritable_storage_path_is_refused(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")  # refused even to root, unlike a read-only folder
    with pytest.raises(ValueError, match=r"storage_path '.*a-file/runs' cannot be written \(.*\): pass a folder"):
        run_sweep(SweepConfig("bad", {"rank": [4]}, trial(tmp_path, storage_path=str(tmp_path / "a-file" / "runs"))))


def test_resources_no_node_has_are_refused(local_ray, tmp_path):
    with pytest.raises(ValueError, match=r"one worker needs \{'CPU': 3.0\}, more than any node"):
        run_sweep(SweepConfig("bad", {"rank": [4]}, trial(tmp_path, cpus_per_worker=3.0), name="cpu"))
    with pytest.raises(ValueError, match=r"num_workers 3 need 3 CPUs in all, but this Ray cluster has 2"):
        run_sweep(SweepConfig("bad", {"rank": [4]}, trial(tmp_path, num_workers=3, batch_size=6), name="workers"))
    assert not (tmp_path / "runs" / "cpu").exists()


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_diverging_trial_is_a_failed_run_tagged_with_its_step_and_the_worst_result(local_ray, tmp_path):
    result = run_sweep(SweepConfig("diverge_study", {"lr": [1e-3, 1e6]}, trial(tmp_path), name="d"))

    client, parents, children = tracked(result.tracking_uri, "d")
    by_lr = {float(c.data.params["lr"]): c for c in children}
    diverged, fine = by_lr[1e6], by_lr[1e-3]
    assert (diverged.info.status, fine.info.status) == ("FAILED", "FINISHED")
    step = int(diverged.data.tags["diverged"])
    assert step >= 1 and "diverged" not in fine.data.tags
    # its losses up to the divergence are logged, never a non-finite one; its accuracy before training only (the
    # smoke trial evaluates at step 0), not the worst value Tune was told; no adapter
    losses = [m.value for m in client.get_metric_history(diverged.info.run_id, "loss")]
    assert losses and all(math.isfinite(v) for v in losses)
    assert [m.step for m in client.get_metric_history(diverged.info.run_id, "accuracy/average")] == [0]
    validation = client.get_metric_history(diverged.info.run_id, "val/accuracy/average")
    assert [m.step for m in validation] == [0] and 0 <= validation[0].value <= 1
    assert [a.path for a in client.list_artifacts(diverged.info.run_id)] == ["config.json"]
    assert parents[0].info.status == "FINISHED"
    assert (parents[0].data.tags["diverged_trials"], parents[0].data.tags["failed_trials"]) == ("1", "0")
    assert len(result.diverged) == 1 and result.failed == []
    # Tune's last result for it holds the objective's worst value, and every JSON file the sweep wrote is JSON
    last = strict_json(Path(result.diverged[0], "result.json").read_text().splitlines()[-1])
    assert last["val/accuracy/average"] == -sys.float_info.max and last["diverged_at_step"] == step
    # (Tune's basic-variant-state-*.json is a pickle by another name)
    written = [p for p in Path(result.path).rglob("*.json") if not p.name.startswith("basic-variant-state")]
    assert len(written) > 10
    for path in written:
        for line in path.read_text().splitlines() if path.name == "result.json" else [path.read_text()]:
            strict_json(line)


def kill_a_training_worker_after(checkpoint: str, folder: Path, deadline_s: float = 240) -> dict:
    """Wait for a checkpoint folder of that name under `folder`, then SIGKILL this test's Ray Train worker."""
    import psutil

    seen: dict = {}
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and not list(folder.glob(f"**/{checkpoint}")):
        time.sleep(0.05)
    seen["begun"] = checkpoint_steps(folder)[-1]
    for process in psutil.Process().children(recursive=True):
        try:
            if is_ray_train_worker(process):
                kill_and_wait(process)  # stopped, so that no checkpoint folder appears after the count below
                seen["killed"] = process.pid
        except psutil.NoSuchProcess:
            pass
    seen["written"] = checkpoint_steps(folder)[-1]
    return seen


def test_a_lost_worker_restarts_the_trial_from_its_checkpoint_as_one_run(local_ray, tmp_path):
    import threading

    config = trial(tmp_path, max_steps=60, checkpoint_every=5, report_every=1, eval_at_start=False)
    killer: dict = {}
    thread = threading.Thread(
        # at the second checkpoint, so that the first one is surely registered
        target=lambda: killer.update(kill_a_training_worker_after("checkpoint_000010", tmp_path / "runs" / "lost"))
    )
    thread.start()
    result = run_sweep(SweepConfig("lost_study", {"rank": [4]}, config, name="lost"))
    thread.join()

    assert killer.get("killed"), "no training worker was found to kill"
    client, parents, children = tracked(result.tracking_uri, "lost")
    assert [c.info.status for c in children] == ["FINISHED"] and result.failed == []
    # one history: every step once, although the steps after the checkpoint ran twice
    assert [m.step for m in client.get_metric_history(children[0].info.run_id, "loss")] == list(range(1, 61))
    summary = json.loads(Path(client.download_artifacts(children[0].info.run_id, "summary.json", str(tmp_path))).read_text())
    # the last checkpoint registered: the one before the newest folder when the kill began, or one written meanwhile
    assert summary["resumed_from_step"] in range(killer["begun"] - 5, killer["written"] + 1, 5), killer
