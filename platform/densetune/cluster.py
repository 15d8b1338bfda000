"""What the Ray cluster a study runs on has, and what it can grow to: its live nodes, and the node types that the
cluster launcher's autoscaler may add. A study decides from these, once, whether its trials use GPUs and whether its
storage path must be shared.

The autoscaler's node types are read where the cluster launcher leaves them, ~/ray_bootstrap_config.yaml on the head
node, which is where a study's driver runs under `ray job submit` (Ray Tune looks for the same file to tell an
autoscaling cluster). Elsewhere the file is absent and only the live nodes count.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ray

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
# Set by Ray's job supervisor for the driver of a submitted job (ray job submit), whose working directory is
# temporary: Ray deletes it with the job.
JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def bootstrap_config() -> dict[str, Any]:
    """The cluster launcher's configuration on this (head) node; {} where there is none."""
    import yaml

    path = Path(BOOTSTRAP_CONFIG).expanduser()
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def addable_node_types(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The worker node types an autoscaler with this configuration can add: those allowed at least one node."""
    if not config.get("max_workers", 0):
        return []
    head = config.get("head_node_type")
    return [kind for name, kind in config.get("available_node_types", {}).items()
            if name != head and kind.get("max_workers", 0) > 0]


def live_nodes() -> list[dict[str, Any]]:
    return [node for node in ray.nodes() if node["Alive"]]


def may_have_several_nodes() -> bool:
    """Whether this cluster has more than one node now, or an autoscaler that can add some."""
    return len(live_nodes()) > 1 or bool(addable_node_types(bootstrap_config()))


def has_gpus() -> bool:
    """Whether a node of this cluster has GPUs now, or the autoscaler can add a node type that has."""
    if ray.cluster_resources().get("GPU", 0) > 0:
        return True
    return any(kind.get("resources", {}).get("GPU", 0) > 0 for kind in addable_node_types(bootstrap_config()))


def in_submitted_job() -> bool:
    return JOB_ENV in os.environ
