"""Ray, for the trials and sweeps: starting or joining it, what its cluster has and can grow to, and what fits where.

A study decides from these, once, whether its trials use GPUs and whether its storage path must be shared. The
autoscaler's node types are read where the cluster launcher leaves them, ~/ray_bootstrap_config.yaml on the head node,
which is where a study's driver runs under `ray job submit` (Ray Tune looks for the same file to tell an autoscaling
cluster). Elsewhere the file is absent and only the live nodes count.

Ray's private API is touched in three places, each wrapped once (here, or trial/rendezvous.py) and named in PRIVATE_RAY
with the Ray version it was checked against; tests/test_cluster.py fails loudly where an upgrade moves them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import ray

if TYPE_CHECKING:
    from .config import TrialConfig

# Ray Train polls workers for reports every 2 s by default, and each report waits for the poll.
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
# Set by Ray's job supervisor for the driver of a submitted job (ray job submit), whose working directory is
# temporary: Ray deletes it with the job.
JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Ray's private names this project relies on, with the version they were checked against: (module, name).
CHECKED_RAY = "2.60.0"
PRIVATE_RAY = (
    ("ray._private.ray_constants", "ENABLE_RAY_CLUSTER"),  # loopback_only
    ("ray.train.torch.config", "_TorchBackend"),  # rendezvous.BoundTorchConfig
    ("ray._common.constants", "HEAD_NODE_RESOURCE_NAME"),  # HEAD_RESOURCE's value
)
# The resource Ray gives the head node only: asking for a sliver of it places a task on the head.
HEAD_RESOURCE = "node:__internal_head__"


def ensure_ray() -> bool:
    """Use the Ray this process already joined, else join the cluster RAY_ADDRESS names, else start a Ray of its own
    on 127.0.0.1. Returns whether it started or joined one (the caller then shuts it down).

    Never ray.init() without an address: that joins whatever Ray it finds running on the machine (another user's
    study, a test's head). Joining a cluster, the project's own packages travel in the runtime environment, so every
    node runs the code this driver runs.
    """
    if ray.is_initialized():
        return False
    os.environ.update({k: os.environ.get(k, v) for k, v in RAY_ENV.items()})
    runtime_env: dict[str, Any] = {"env_vars": {k: os.environ[k] for k in RAY_ENV}}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        import densemod
        import densetune

        runtime_env["py_modules"] = [str(Path(package.__file__).parent) for package in (densemod, densetune)]
        ray.init(address=address, runtime_env=runtime_env)
    else:
        loopback_only()
        ray.init(address="local", runtime_env=runtime_env)
    return True


def loopback_only() -> None:
    """Keep a local Ray's servers, agents and workers on 127.0.0.1; by default they listen on every interface.

    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 once, when it is imported: the variable reaches the processes Ray
    starts, and the constant it set (private: PRIVATE_RAY) is changed here for this process, which imported Ray before.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


@contextlib.contextmanager
def own_ray() -> Iterator[None]:
    """Ray for the duration of the block: the one this process already uses, or one started (or joined) for it and
    shut down after it, also on Ctrl-C or an error."""
    started = ensure_ray()
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def joined_a_cluster() -> bool:
    """Whether the studies run on a cluster reached through RAY_ADDRESS (ray job submit sets it), which an autoscaler
    may grow: then only it knows what fits."""
    return bool(os.environ.get("RAY_ADDRESS"))


def in_submitted_job() -> bool:
    return JOB_ENV in os.environ


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


def live_nodes() -> list[dict[str, float]]:
    """The resources of each live node of this Ray cluster."""
    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def this_machine() -> list[dict[str, float]]:
    """This machine as the one node of the Ray a study would start here (for estimates, before any Ray runs)."""
    import torch

    return [{"CPU": os.cpu_count() or 1, "GPU": torch.cuda.device_count()}]


def may_have_several_nodes() -> bool:
    """Whether this cluster has more than one node now, or an autoscaler that can add some."""
    return len(live_nodes()) > 1 or bool(addable_node_types(bootstrap_config()))


def has_gpus() -> bool:
    """Whether a node of this cluster has GPUs now, or the autoscaler can add a node type that has."""
    if ray.cluster_resources().get("GPU", 0) > 0:
        return True
    return any(kind.get("resources", {}).get("GPU", 0) > 0 for kind in addable_node_types(bootstrap_config()))


def uses_gpu(config: TrialConfig) -> bool:
    """Whether the trial trains on GPUs: as its config says, else whether the cluster has or can add GPU nodes (an
    autoscaling cluster starts with none). A sweep decides this once and passes the answer to every trial."""
    return has_gpus() if config.use_gpu is None else config.use_gpu


def worker_resources(config: TrialConfig, gpu: bool) -> dict[str, float]:
    """What one Ray Train worker of this trial asks for."""
    return {"CPU": config.cpus_per_worker, **({"GPU": config.gpus_per_worker} if gpu else {})}


def workers_that_fit(config: TrialConfig, gpu: bool, nodes: list[dict[str, float]]) -> int:
    """How many of this trial's workers `nodes` hold at once, each node on its own."""
    per_worker = worker_resources(config, gpu)
    return sum(min(int(node.get(kind, 0) // amount) for kind, amount in per_worker.items()) for node in nodes)


def trials_that_fit(config: TrialConfig, gpu: bool, nodes: list[dict[str, float]]) -> Optional[int]:
    """How many trials' worker groups `nodes` hold at once; None on a cluster joined through RAY_ADDRESS, which its
    autoscaler may grow.

    Tune counts only a trial's driver (a little memory), so without this limit every trial would start at once and
    all but a few would wait inside Ray Train for workers, their clocks running.
    """
    if joined_a_cluster():
        return None
    return max(1, workers_that_fit(config, gpu, nodes) // max(1, config.num_workers))


def check_placeable(config: TrialConfig, gpu: bool) -> None:
    """A worker group that no node can host, or that is larger than the cluster, would wait forever: refuse it.

    Skipped for a cluster reached through RAY_ADDRESS (an autoscaling cluster grows to fit, and only its autoscaler
    knows how far) and in local mode (num_workers 0), which places no workers.
    """
    if joined_a_cluster() or config.num_workers == 0:
        return
    per_worker = worker_resources(config, gpu)
    if workers_that_fit(config, gpu, live_nodes()) == 0:
        raise ValueError(
            f"one worker needs {per_worker}, more than any node of this Ray cluster has: lower cpus_per_worker or "
            "gpus_per_worker"
        )
    have = ray.cluster_resources()
    for kind, amount in per_worker.items():
        if amount * config.num_workers > have.get(kind, 0):
            raise ValueError(
                f"num_workers {config.num_workers} need {amount * config.num_workers:g} {kind}s in all, but this Ray "
                f"cluster has {have.get(kind, 0):g}: use fewer workers or fewer {kind}s per worker"
            )
