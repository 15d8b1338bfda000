"""ray_cluster.yaml is a valid Ray cluster-launcher config, checked offline against Ray's own schema, and what it
sets up on the nodes, rehearsed here: what reaches them, what their shells find."""

import os
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.command_runner import SSHCommandRunner, _with_interactive
from ray.autoscaler._private.util import prepare_config, validate_config

import densetune.data.loading

CONFIG = Path(__file__).resolve().parents[1] / "ray_cluster.yaml"


def load() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_the_cluster_config_passes_rays_schema():
    config = prepare_config(load())  # fills in Ray's defaults, as `ray up` does
    validate_config(config)
    assert config["head_node_type"] == "head"
    assert config["available_node_types"]["gpu_worker"]["max_workers"] > 0
    assert any("pip install" in command and "densemod" in command for command in config["setup_commands"])
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}  # trials' workers go to GPU nodes
    assert config["docker"]["image"].endswith("-gpu")


def test_the_schema_check_catches_a_misspelt_field():
    config = load()
    config["max_worker"] = config.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(config))


def test_no_server_listens_on_every_interface():
    config = load()
    commands = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "0.0.0.0" not in commands and "--dashboard-host" not in commands  # Ray's default: 127.0.0.1
    assert "mlflow server --host $(hostname -I | cut -d' ' -f1)" in commands  # the head's private address


def test_every_node_type_has_the_heads_instance_profile():
    types = load()["available_node_types"]
    profile = types["head"]["node_config"]["IamInstanceProfile"]
    assert profile.get("Name") or profile.get("Arn")
    assert {name: kind["node_config"].get("IamInstanceProfile") for name, kind in types.items()} == dict.fromkeys(
        types, profile
    )


def test_the_virtual_environment_and_the_runs_stay_off_the_nodes():
    config = prepare_config(load())
    assert config["file_mounts"]["/home/ray/densemod"] == "."
    assert {"/.venv/", "/runs/"} <= set(config["rsync_exclude"]) and config["rsync_filter"] == [".gitignore"]


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed")
def test_rsync_with_rays_filters_copies_the_project_alone(tmp_path):
    source = tmp_path / "project"
    for name in (".venv/bin/python", "runs/sweep/mlflow.db", "build/lib/x.py", "densemod/x.py"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text("")
    shutil.copy(CONFIG.parent / ".gitignore", source)
    # The arguments Ray's command runner gives rsync for every file mount.
    filters = SSHCommandRunner._create_rsync_filter_args(None, prepare_config(load()))
    listed = subprocess.run(
        ["rsync", "-an", "--out-format=%n", *filters, f"{source}/", str(tmp_path / "node")],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    assert {name for name in listed if not name.endswith("/")} == {".gitignore", "densemod/x.py"}


def on_node(home: Path, commands: list[str]) -> str:
    """Run `commands` one by one as Ray's command runner runs a node's set-up and start commands (a login shell that
    sources ~/.bashrc first), with the node's /home/ray at `home`; returns the output of the last."""
    output = ""
    for command in commands:
        done = subprocess.run(
            " ".join(_with_interactive(command.replace("/home/ray", str(home)))), shell=True,
            env={"HOME": str(home), "PATH": os.environ["PATH"]}, capture_output=True, text=True, timeout=60, check=True,
        )
        output = done.stdout
    return output


def test_every_node_finds_the_data_folder_and_the_hub_token(tmp_path):
    config = load()
    home = tmp_path / "home" / "ray"
    # The node's file mounts as `ray up` leaves them: the data folder, the Hub token.
    (home / "data").mkdir(parents=True)
    (home / "hf_token").write_text("hf_test\n")
    assert {"/home/ray/data", "/home/ray/hf_token"} <= set(config["file_mounts"])
    # A login shell reads ~/.bash_profile: there pip, a function, takes precedence over any pip on PATH and records
    # what it was asked to install.
    (home / ".bash_profile").write_text(f'pip() {{ echo "$*" >> {tmp_path}/pip.log; }}\n')

    on_node(home, config["setup_commands"] * 2)  # twice, as a second `ray up` runs the set-up again
    # Every node runs setup_commands before it starts Ray; a start command sees what this one sees.
    assert on_node(home, ['echo "$DENSETUNE_DATA|$HF_TOKEN"']).strip() == f"{home / 'data'}|hf_test"
    assert (home / ".bashrc").read_text().count("DENSETUNE_DATA") == 1
    # The data folder the studies read here, beside the checkout (densetune.data.loading.data_dirs), is the one mounted.
    beside = Path(densetune.data.loading.__file__).resolve().parents[4] / "shared" / "data" / "llm-adapters"
    assert (CONFIG.parent / config["file_mounts"]["/home/ray/data"]).resolve() == beside

    on_node(home, config["head_setup_commands"])
    head_installs = (tmp_path / "pip.log").read_text().splitlines()[-len(config["head_setup_commands"]):]
    assert any(words[0] == "install" and "boto3" in words for words in map(str.split, head_installs))
