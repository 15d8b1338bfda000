"""ray_cluster.yaml is a valid Ray cluster-launcher config, checked offline against Ray's own schema."""

from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

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
