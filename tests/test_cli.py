"""Both command lines explain themselves: every flag's help with its default and allowed values, the studies' examples
as written, one spelling per trial setting; and sweep_runs finds the store the studies write by default."""

import dataclasses

import pytest

import densemod
import densemod.methods
from densetune import config
from densetune.config import TrialConfig, flag, shown
from densetune.experiment import parser as study_parser
from densetune.experiment import sweep_config
from densetune.files import ROLE, SWEEP, TRIAL_ID
from densetune.results.store import sweep_runs
from densetune.sweep.record import SweepTracker, TrackedSweep, check_tracking_uri, store_uri
from densetune.trial.run import parse_args
from densetune.trial.run import parser as trial_parser
from test_experiments import ROOT, STUDIES, load

RANK_SWEEP = ROOT / "experiments" / "rank_sweep.py"
# The study flags that set a trial setting; --name is the sweep's name, not a trial's.
STUDY_TRIAL_FLAGS = {
    "model", "datasets", "eval_datasets", "protocol", "max_steps", "num_workers", "cpus_per_worker", "gpus_per_worker",
    "storage_path",
}


def options(text: str) -> dict[str, str]:
    """The options of a --help text: each option string -> its help, joined from the lines it spans."""
    found: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.split("\noptions:\n", 1)[1].splitlines():
        if line.startswith("  -"):
            invocation, _, first = line.strip().partition("  ")
            current = [first.strip()]
            found.update({part.split(" ")[0]: current for part in invocation.split(", ")})
        else:
            current.append(line.strip())
    return {option: " ".join(filter(None, lines)) for option, lines in found.items()}


@pytest.fixture
def trial_help(monkeypatch) -> dict[str, str]:
    monkeypatch.setenv("COLUMNS", "200")  # fewer wrapped lines to join
    return options(trial_parser().format_help())


def test_every_trial_setting_has_a_flag_with_help_and_its_default(trial_help):
    for name, default in dataclasses.asdict(TrialConfig()).items():
        text = trial_help[flag(name)]
        assert text.split(" (")[0].strip(), name
        assert f"default: {shown(name, default)})" in text, name
        assert "default: None" not in text, name  # a field that may be None says what None means
    assert trial_help["--rank"].endswith("(default: 32)")
    assert trial_help["--datasets"].endswith("(default: synthetic)")
    assert trial_help["--alpha"].endswith("(default: 2 x rank)")
    assert trial_help["--no-train-on-inputs"] == trial_help["--train-on-inputs"]
    assert trial_help["--train-on-inputs"].endswith("(default: true)")


def test_the_fixed_sets_name_their_values(trial_help):
    assert "(one of: denselora, lora, dora, vera, lokr, adalora, hybrid; default: denselora)" in trial_help["--method"]
    assert "(one of: denselora, freeze, only_matrix; default: denselora)" in trial_help["--variant"]
    assert "(one of: kind, layer; default: kind)" in trial_help["--share-scope"]
    assert "(default: the attention projections among the targets" in trial_help["--lora-targets"]
    assert "(one of: label, text; default: label)" in trial_help["--protocol"]
    assert "(one of: generate, loglik; default: generate)" in trial_help["--eval-mode"]
    assert "(one of: auto, float32, bfloat16, float16; default: auto)" in trial_help["--dtype"]
    assert "(qkv, ud, qkvud, qkvo, qkvoud, all-linear)" in trial_help["--targets"]
    assert "(q, k, v, o, gate, up, down, or module names)" in trial_help["--targets"]


def test_the_copies_of_densemods_names_are_densemods():
    assert config.METHODS == densemod.METHODS
    assert config.VARIANTS == densemod.VARIANTS
    assert config.SHARE_SCOPES == densemod.SHARE_SCOPES
    assert config.DENSELORA_METHODS == densemod.methods.DENSELORA_METHODS
    assert config.TARGET_SET_NAMES == tuple(densemod.TARGET_SETS)
    assert config.TARGET_KINDS == tuple(densemod.methods.TARGET_ALIASES)


def test_the_trial_cli_keeps_its_example_and_parses_as_before():
    assert "\n    python -m densetune.trial --model smollm2-135m --method denselora" in trial_parser().format_help()
    trial = parse_args(["--datasets", "a, b", "--no-group-by-length", "--max-steps", "5", "--lr", "1e-3"])
    assert (trial.datasets, trial.group_by_length, trial.max_steps, trial.lr) == (["a", "b"], False, 5, 1e-3)
    assert parse_args([]) == TrialConfig()


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_a_studys_help_keeps_its_examples_and_gives_every_flag_a_default(path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    module = load(path)
    text = study_parser(module.STUDY, module.__doc__).format_help()
    examples = [line for line in module.__doc__.splitlines() if line.startswith(("    python ", "    ray job "))]
    assert examples and all(line in text.splitlines() for line in examples)
    for option, help_text in options(text).items():
        if option not in ("-h", "--help"):
            assert "(default: " in help_text or "; default: " in help_text, option


def test_the_rank_studys_help_shows_its_defaults_and_smokes(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    study = load(RANK_SWEEP).STUDY
    found = options(study_parser(study, "").format_help())
    assert found["--max-steps"].endswith("(default: 60; --smoke: 4)")
    assert found["--datasets"].endswith("(default: ARC-Easy; --smoke: synthetic)")
    assert found["--space"].endswith("(default: rank=8,32,128)")
    pareto = load(ROOT / "experiments" / "pareto_search.py").STUDY
    found = options(study_parser(pareto, "").format_help())
    assert found["--metric"].endswith("(default: val/accuracy/average,trainable_params)")
    assert "targets=q+v,q+k+v+up+down)" in found["--space"]  # as --space writes a target list


def test_the_old_spellings_of_the_study_flags_still_work():
    study = load(RANK_SWEEP).STUDY

    def sweep(*argv: str):
        return sweep_config(study, study_parser(study, "").parse_args(argv))

    new = sweep("--datasets", "synthetic,x/y", "--num-workers", "2")
    assert (new.trial.datasets, new.trial.num_workers) == (["synthetic", "x/y"], 2)
    assert sweep("--dataset", "synthetic,x/y", "--workers-per-trial", "2") == new


def test_the_trial_cli_and_the_studies_spell_each_trial_flag_alike():
    fields = {f.name for f in dataclasses.fields(TrialConfig)}
    trial_flags = {a.dest: a.option_strings[0] for a in trial_parser()._actions if a.dest in fields}
    assert set(trial_flags) == fields
    study = study_parser(load(RANK_SWEEP).STUDY, "")
    shared = [a for a in study._actions if a.dest in trial_flags and a.dest != "name"]
    assert {a.dest for a in shared} == STUDY_TRIAL_FLAGS
    for action in shared:
        assert action.option_strings[0] == trial_flags[action.dest] == flag(action.dest)


@pytest.fixture
def default_store(tmp_path, monkeypatch) -> str:
    """A store where the studies write without flags, ./runs/mlflow.db, holding the sweep 'first' with one trial of
    rank 4 and the sweep 'empty' with none yet."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "runs").mkdir()
    uri = f"sqlite:///{(tmp_path / 'runs').resolve() / 'mlflow.db'}"
    check_tracking_uri(uri)
    first = SweepTracker(TrackedSweep(uri, "a_study", "first", {}), TrialConfig.from_dict)
    run = first.client.create_run(first.experiment_id, tags={ROLE: "trial", SWEEP: "first", TRIAL_ID: "t0"})
    first.client.log_param(run.info.run_id, "rank", "4")
    first.parent_run_id()
    SweepTracker(TrackedSweep(uri, "a_study", "empty", {}), TrialConfig.from_dict).parent_run_id()
    return uri


def test_sweep_runs_reads_the_default_store(default_store):
    assert sweep_runs("first")["rank"].tolist() == [4]
    assert sweep_runs("empty").empty


def test_sweep_runs_names_the_known_sweeps_for_an_unknown_one(default_store):
    with pytest.raises(ValueError) as error:
        sweep_runs("typo")
    assert str(error.value) == f"no sweep named 'typo' in {default_store}; the sweeps there: empty, first"
    with pytest.raises(ValueError) as error:
        sweep_runs("first", study="another_study")
    assert str(error.value) == f"no sweep named 'first' in study 'another_study' of {default_store}; the sweeps there: none"


def test_the_store_a_command_names_comes_first_then_the_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert store_uri() == "http://127.0.0.1:5000"
    assert store_uri("sqlite:///elsewhere.db") == "sqlite:///elsewhere.db"


def test_both_clis_print_a_warning_as_one_line():
    import subprocess
    import sys

    # as the CLIs' main() sets the process up, in a process of its own (pytest records warnings instead of printing)
    code = """
import peft, densemod
from transformers import LlamaConfig, LlamaForCausalLM
from densetune.trial.run import as_a_command
as_a_command()
model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=2, vocab_size=32))
peft.get_peft_model(model, densemod.DenseLoraConfig(r=32, target_modules=["q_proj"]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert (
        "warning: DenseLoRA r=32 is larger than a size of q_proj (in 16, out 16: at most 16): their updates cannot "
        "have rank 32"
    ) in done.stderr.splitlines()
    assert "warnings.warn(" not in done.stderr and "model.py" not in done.stderr
