"""After a sweep: scoring its adapters on benchmarks without training (densetune.evaluate), and taking one out as a
plain PEFT folder or a merged model (densetune.export). One sweep of two tiny-llama trials serves every test."""

import json
import math
from collections import Counter
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from peft import get_peft_model

from densetune import evaluate, export
from densetune.config import TrialConfig
from densetune.experiment import LOCAL, SMOKE
from densetune.files import EVALUATED_RUN, ROLE
from densetune.results.stats import wilson_interval
from densetune.sweep.tune import SweepConfig, run_sweep
from densetune.trial.checkpoint import load_adapter
from densetune.trial.models import byte_tokenizer, load_model

QUESTIONS, VAL_SIZE = 12, 8


@pytest.fixture(scope="module")
def sweep(local_ray, tmp_path_factory):
    """Two finished trials, DenseLoRA and its mergeable variant, evaluated under the text protocol before and after."""
    folder = tmp_path_factory.mktemp("sweep")
    trial = TrialConfig(**{
        **LOCAL, **SMOKE, "storage_path": str(folder / "runs"), "rank": 4, "protocol": "text", "eval_limit": QUESTIONS,
        "val_size": VAL_SIZE, "eval_at_start": True,
    })
    return run_sweep(SweepConfig("after", {"variant": ["denselora", "only_matrix"]}, trial, name="after"))


def trial_run(sweep, variant: str):
    return sweep.trials[sweep.trials["variant"] == variant].iloc[0]


def checkpoint(sweep, variant: str) -> Path:
    return max((Path(sweep.path) / "trials" / trial_run(sweep, variant)["trial_id"]).glob("checkpoint_[0-9]*"))


def trial_answers(folder: Path) -> dict[int, list[dict]]:
    """The trial's own predictions by step (0: before training, the base model's)."""
    by_step: dict[int, list[dict]] = {}
    for record in json.loads((folder / "predictions.json").read_text()):
        by_step.setdefault(record["step"], []).append(record)
    return by_step


def evaluated(tmp_path: Path, *argv: str) -> dict[str, list[dict]]:
    out = tmp_path / "evaluation"
    assert evaluate.main([*argv, "--output", str(out)]) == 0
    found: dict[str, list[dict]] = {}
    for record in json.loads((out / "predictions.json").read_text()):
        found.setdefault(record.pop("model"), []).append(record)
    return found


def same(found: list[dict], expected: list[dict]) -> bool:
    keys = ("benchmark", "index", "extracted", "correct", "correct_norm")
    return [{k: r[k] for k in keys} for r in found] == [{k: r[k] for k in keys} for r in expected]


def test_the_sweeps_chosen_adapter_answers_as_at_the_end_of_its_trial_and_its_base_as_at_step_0(sweep, tmp_path):
    client = MlflowClient(sweep.tracking_uri)
    best = client.get_run(sweep.run_id).data.tags["best_run_id"]
    variant = sweep.trials.set_index("run_id").loc[best, "variant"]
    expected = trial_answers(checkpoint(sweep, variant))

    found = evaluated(tmp_path, "--sweep", "after", "--best", "--tracking-uri", sweep.tracking_uri, "--num-workers", "0")

    assert len(found["adapted"]) == QUESTIONS
    assert same(found["adapted"], expected[max(expected)])
    assert same(found["base"], expected[0])


def test_ray_workers_give_the_answers_of_one_process(sweep, tmp_path):
    folder = str(checkpoint(sweep, "denselora"))
    alone = evaluated(tmp_path / "alone", "--adapter", folder, "--num-workers", "0")
    shared = evaluated(tmp_path / "shared", "--adapter", folder, "--num-workers", "2")
    assert same(shared["adapted"], alone["adapted"]) and same(shared["base"], alone["base"])


def test_the_table_reads_the_answers_and_log_nests_the_run_under_its_trial(sweep, tmp_path, capsys):
    run = trial_run(sweep, "only_matrix")
    out = tmp_path / "evaluation"
    argv = ["--sweep", "after", "--trial", run["run_name"], "--tracking-uri", sweep.tracking_uri, "--num-workers", "0"]
    assert evaluate.main([*argv, "--log", "--output", str(out)]) == 0

    printed = capsys.readouterr().out
    assert printed.startswith(f"evaluate: tiny-llama with trial {run['run_name']} of sweep after (named)")
    answers = [r for r in json.loads((out / "predictions.json").read_text()) if r["model"] == "adapted"]
    right = sum(r["correct"] for r in answers)
    low, high = wilson_interval(right, QUESTIONS)
    assert f"{100 * right / QUESTIONS:.1f} ({100 * low:.1f}-{100 * high:.1f})" in printed
    given = Counter(r["extracted"] for r in answers)
    assert "  model " + ", ".join(f"{a} {n}" for a, n in sorted(given.items())) in printed.splitlines()

    client = MlflowClient(sweep.tracking_uri)
    logged = client.search_runs([run_experiment(client, run["run_id"])], f"tags.`{ROLE}` = 'evaluation'")
    assert len(logged) == 1
    tags, metrics = logged[0].data.tags, logged[0].data.metrics
    assert tags[EVALUATED_RUN] == tags["mlflow.parentRunId"] == run["run_id"]
    assert metrics["accuracy/synthetic"] == pytest.approx(right / QUESTIONS)
    assert {"base/accuracy/synthetic", "accuracy_norm/synthetic", "mcnemar_p/accuracy/synthetic"} <= set(metrics)
    assert {a.path for a in client.list_artifacts(logged[0].info.run_id)} == {"evaluation.csv", "predictions.json"}
    # the sweep's trials are still its two trials
    assert len(sweep_trials(client, sweep)) == 2


def run_experiment(client: MlflowClient, run_id: str) -> str:
    return client.get_run(run_id).info.experiment_id


def sweep_trials(client: MlflowClient, sweep) -> list:
    from densetune.results.store import sweep_runs

    return list(sweep_runs(sweep.name, sweep.tracking_uri)["run_id"])


def test_wilson_interval_by_hand():
    # 7 of 12 at z = 1.959964: centre (p + z²/2n) / (1 + z²/n), half-width z / (1 + z²/n) * sqrt(p(1-p)/n + z²/4n²)
    z, n, p = 1.959963984540054, 12, 7 / 12
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert wilson_interval(7, 12) == pytest.approx((centre - half, centre + half))
    assert wilson_interval(0, 12)[0] == pytest.approx(0, abs=1e-12) and wilson_interval(12, 12)[1] == 1


PROMPTS = ["Question: which is larger, 7 or 3?\nAnswer:", "The capital of France is"]
FRESH = """
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base_folder, adapter_folder = sys.argv[1:3]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), adapter_folder).eval()
tokenizer = AutoTokenizer.from_pretrained(base_folder)
with torch.no_grad():
    logits = [model(**tokenizer(p, return_tensors="pt")).logits[0].tolist() for p in json.loads(sys.argv[3])]
print(json.dumps({"logits": logits, "densemod": "densemod" in sys.modules}))
"""


def trial_logits(sweep, variant: str) -> list[torch.Tensor]:
    """The trial's adapter as the trial itself loads it (its config, its checkpoint), on PROMPTS."""
    config = TrialConfig(**json.loads((checkpoint(sweep, variant) / "config.json").read_text()))
    model = get_peft_model(load_model("tiny-llama"), config.peft_config(total_steps=4))
    load_adapter(model, checkpoint(sweep, variant))
    model.eval()
    with torch.no_grad():
        return [model(**byte_tokenizer()(p, return_tensors="pt")).logits[0] for p in PROMPTS]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    """tiny-llama as a plain transformers folder, for a process that knows nothing of this project."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    load_model("tiny-llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def test_an_exported_adapter_loads_with_peft_alone_in_a_fresh_process_and_answers_the_same(sweep, base_folder, tmp_path):
    out = tmp_path / "exported"
    run = trial_run(sweep, "denselora")
    argv = ["--sweep", "after", "--trial", run["trial_id"], "--tracking-uri", sweep.tracking_uri, "--out", str(out)]
    assert export.main(argv) == 0

    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-llama"
    card = (out / "README.md").read_text()
    assert f"{int(run['trainable_params']):,d} trainable of {int(run['total_params']):,d}" in card
    final = trial_answers(checkpoint(sweep, "denselora"))
    right = sum(r["correct"] for r in final[max(final)])
    assert f"| test | synthetic | accuracy | {100 * right / QUESTIONS:.1f} | {QUESTIONS} |" in card
    assert f"| validation | synthetic | accuracy | {100 * run['val/accuracy/synthetic']:.1f} | {VAL_SIZE} |" in card
    assert "python -m densetune.trial \\\n    --model tiny-llama" in card and "--protocol text" in card
    assert "PeftModel.from_pretrained(base" in card

    fresh = subprocess.run(
        [sys.executable, "-c", FRESH, str(base_folder), str(out), json.dumps(PROMPTS)],
        capture_output=True, text=True, check=True, timeout=120,
    )
    loaded = json.loads(fresh.stdout.splitlines()[-1])
    assert loaded["densemod"]  # registered by the installed package as PEFT was imported, not by the script
    for mine, theirs in zip(trial_logits(sweep, "denselora"), loaded["logits"]):
        assert torch.allclose(mine, torch.tensor(theirs), atol=1e-5)
        assert mine.argmax(-1).tolist() == torch.tensor(theirs).argmax(-1).tolist()


def test_merge_writes_a_plain_model_for_the_mergeable_variant_only(sweep, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    source = ["--sweep", "after", "--tracking-uri", sweep.tracking_uri, "--trial"]
    refused = tmp_path / "refused"
    assert export.main([*source, trial_run(sweep, "denselora")["run_name"], "--out", str(refused), "--merge"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: cannot merge a DenseLoRA adapter of variant 'denselora'") and error.count("\n") == 1
    assert not refused.exists() and not list(tmp_path.glob(".refused*"))

    merged = tmp_path / "merged"
    assert export.main([*source, trial_run(sweep, "only_matrix")["run_name"], "--out", str(merged), "--merge"]) == 0
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        for prompt, expected in zip(PROMPTS, trial_logits(sweep, "only_matrix")):
            assert torch.allclose(model(**byte_tokenizer()(prompt, return_tensors="pt")).logits[0], expected, atol=1e-5)
    assert "library_name: transformers" in (merged / "README.md").read_text()


def test_bad_input_is_one_line_and_an_existing_folder_is_left_as_it_was(sweep, tmp_path, capsys):
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    cases = [
        (export.main, ["--best", "--out", str(tmp_path / "x")], "error: --best picks a trial of a sweep: add --sweep NAME"),
        (export.main, ["--sweep", "after", "--tracking-uri", sweep.tracking_uri, "--out", str(kept)],
         f"error: --out {kept} exists and is not an empty folder"),
        (evaluate.main, ["--sweep", "after", "--tracking-uri", sweep.tracking_uri, "--trial", "nosuch"],
         "error: sweep 'after' has no trial named 'nosuch'; its trials: "),
        (evaluate.main, ["--adapter", str(tmp_path)], f"error: adapter {str(tmp_path)!r} holds neither"),
        (evaluate.main, ["--model", "tiny-llama"], "error: no benchmark given: name them with --datasets"),
        (evaluate.main, ["--model", "tiny-llama", "--datasets", "synthetic", "--eval-limit", "0"],
         "error: eval_limit must be a positive integer; got 0"),
    ]
    for command, argv, message in cases:
        assert command(argv) == 2
        error = capsys.readouterr().err
        assert error.startswith(message) and error.count("\n") == 1, error
    assert [p.name for p in kept.iterdir()] == ["notes.txt"] and (kept / "notes.txt").read_text() == "mine"
