"""Ray for the studies (densetune.cluster): what a cluster has and can add, what fits on it, the one GPU decision of a
study, and the private names of Ray it relies on."""

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import ray

from densetune import cluster
from densetune.cluster import CHECKED_RAY, PRIVATE_RAY, trials_that_fit, uses_gpu, workers_that_fit
from densetune.config import TrialConfig


def test_the_private_names_of_ray_are_where_they_were_checked():
    for module, name in PRIVATE_RAY:
        found = hasattr(importlib.import_module(module), name)
        assert found, f"Ray {ray.__version__} has no {module}.{name} (checked against Ray {CHECKED_RAY}): see cluster.py"
    assert importlib.import_module("ray._common.constants").HEAD_NODE_RESOURCE_NAME == cluster.HEAD_RESOURCE
    backend = importlib.import_module("ray.train.torch.config")._TorchBackend
    # rendezvous._BoundBackend overrides this method with these parameters
    assert list(inspect.signature(backend.on_start).parameters) == ["self", "worker_group", "backend_config"]


def test_what_fits_counts_each_node_on_its_own():
    two_cpu_workers = TrialConfig(num_workers=2, cpus_per_worker=1.0, batch_size=16, micro_batch_size=4)
    nodes = [{"CPU": 2.0}, {"CPU": 1.0}, {"CPU": 0.5}]
    assert workers_that_fit(two_cpu_workers, False, nodes) == 3  # 2 + 1 + 0
    assert trials_that_fit(two_cpu_workers, False, nodes) == 1
    quarter_gpus = TrialConfig(num_workers=1, cpus_per_worker=1.0, gpus_per_worker=0.25)
    gpu_nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]
    assert workers_that_fit(quarter_gpus, True, gpu_nodes) == 4 + 2  # the second node runs out of CPUs first
    assert workers_that_fit(quarter_gpus, False, gpu_nodes) == 8 + 2
    assert trials_that_fit(TrialConfig(cpus_per_worker=4.0), False, [{"CPU": 2.0}]) == 1  # at least one, to wait


def test_what_fits_is_unknown_on_a_cluster_joined_through_ray_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert trials_that_fit(TrialConfig(), False, [{"CPU": 2.0}]) is None


def write_bootstrap(home: Path, gpu_workers: int, max_workers: int = 4) -> None:
    """A cluster launcher's configuration as `ray up` leaves it on the head (abridged to what is read)."""
    (home / "ray_bootstrap_config.yaml").write_text(f"""
cluster_name: densemod
max_workers: {max_workers}
head_node_type: head
available_node_types:
  head: {{resources: {{CPU: 0}}, min_workers: 0, max_workers: 0}}
  cpu_worker: {{resources: {{CPU: 8}}, min_workers: 0, max_workers: 2}}
  gpu_worker: {{resources: {{CPU: 8, GPU: 1}}, min_workers: 0, max_workers: {gpu_workers}}}
""")


def test_the_gpu_decision_counts_the_node_types_an_autoscaler_can_add(local_ray, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = TrialConfig()
    # This machine's Ray: one node, no GPU, no autoscaler.
    assert not cluster.has_gpus() and not cluster.may_have_several_nodes() and not uses_gpu(config)
    write_bootstrap(tmp_path, gpu_workers=2)
    assert cluster.has_gpus() and cluster.may_have_several_nodes() and uses_gpu(config)
    assert not uses_gpu(TrialConfig(use_gpu=False))  # the flag decides where it is given
    write_bootstrap(tmp_path, gpu_workers=0)  # GPU nodes allowed none: they are never added
    assert not cluster.has_gpus() and cluster.may_have_several_nodes()
    write_bootstrap(tmp_path, gpu_workers=2, max_workers=0)  # the cluster's own bound allows no worker at all
    assert not cluster.has_gpus() and not cluster.may_have_several_nodes()
    assert ray.cluster_resources().get("GPU", 0) == 0


PHANTOM_GPU = """
import sys

import ray

from densetune.config import TrialConfig
from densetune.experiment import LOCAL, SMOKE

# A Ray that counts a GPU this machine does not have: Ray schedules the worker on it, torch finds no CUDA there.
ray.init(address="local", num_cpus=1, num_gpus=1)
from densetune.trial.run import run_trial

try:
    run_trial(TrialConfig(**{**LOCAL, **SMOKE, "storage_path": sys.argv[1], "name": "phantom"}))
except Exception as error:
    print(type(error).__name__, str(error))
"""


def test_a_trial_that_asked_for_a_gpu_never_trains_on_a_cpu(tmp_path):
    done = subprocess.run([sys.executable, "-c", PHANTOM_GPU, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert "the trial asks for GPUs, but torch on its worker's node (127.0.0.1) sees none (torch " in done.stdout, (
        done.stdout[-3000:] + done.stderr[-3000:]
    )
    assert not list(tmp_path.rglob("checkpoint_*"))  # not one step
