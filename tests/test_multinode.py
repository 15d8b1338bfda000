"""A sweep on a Ray cluster of three nodes on this machine (ray.cluster_utils): a head without CPUs and two
one-CPU workers, so two one-worker trials at once must run on different nodes."""

import os

import pytest
import ray
from mlflow import MlflowClient
from ray.cluster_utils import Cluster

from densetune.config import TrialConfig
from densetune.experiment import LOCAL, SMOKE
from densetune.sweep import SweepConfig, run_sweep
from densetune.trial import RAY_ENV


@pytest.fixture
def three_nodes():
    os.environ.update(RAY_ENV)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": RAY_ENV})
    yield [node.node_id for node in workers]
    ray.shutdown()
    cluster.shutdown()


def test_concurrent_trials_land_on_different_nodes_and_are_all_tracked(three_nodes, tmp_path):
    trial = TrialConfig(**{**LOCAL, **SMOKE, "storage_path": str(tmp_path)})
    result = run_sweep(SweepConfig("multinode", {"rank": [4, 8]}, trial, name="spread", max_concurrent=2))

    client = MlflowClient(result.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("multinode").experiment_id], "tags.sweep = 'spread'")
    children = [r for r in runs if r.data.tags["densetune.role"] == "trial"]
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3
    nodes = [r.data.tags["ray.node_id"] for r in children]
    assert sorted(nodes) == sorted(three_nodes)
