"""Sweeps on a Ray cluster of three nodes on this machine (ray.cluster_utils): a head without CPUs and two one-CPU
workers, so two one-worker trials at once must run on different nodes, and a trial whose node is lost can go on
on the other."""

import json
import os
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
from mlflow import MlflowClient
from ray.cluster_utils import Cluster

from conftest import checkpoint_steps, is_ray_train_worker, kill_and_wait
from densetune.config import TrialConfig
from densetune.experiment import LOCAL, SMOKE
from densetune.sweep.tune import SweepConfig, run_sweep
from densetune.cluster import RAY_ENV

# A lost node is declared dead after health_check_failure_threshold missed checks, health_check_period_ms apart
# (by default 5 x 3 s, after a 5 s grace): shortened, so that a test of a lost node takes seconds, not half a minute.
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 500, "health_check_failure_threshold": 3}


@pytest.fixture
def three_nodes():
    os.environ.update(RAY_ENV)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": FAST_HEALTH_CHECKS})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": RAY_ENV})
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def trial(tmp_path: Path, **settings) -> TrialConfig:
    # The nodes of this cluster share this machine's disk: a folder every node mounts, said so as a file:// URI.
    return TrialConfig(**{**LOCAL, **SMOKE, "storage_path": tmp_path.as_uri(), **settings})


def trial_runs(uri: str, study: str, sweep: str) -> tuple[MlflowClient, list, list]:
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(study).experiment_id], f"tags.sweep = '{sweep}'")
    return client, runs, [r for r in runs if r.data.tags["densetune.role"] == "trial"]


def test_concurrent_trials_land_on_different_nodes_and_are_all_tracked(three_nodes, tmp_path):
    _, workers = three_nodes
    result = run_sweep(SweepConfig("multinode", {"rank": [4, 8]}, trial(tmp_path), name="spread", max_concurrent=2))

    _, runs, children = trial_runs(result.tracking_uri, "multinode", "spread")
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3
    nodes = [r.data.tags["ray.node_id"] for r in children]
    assert sorted(nodes) == sorted(node.node_id for node in workers)


def training_worker(workers: list) -> tuple[object, psutil.Process]:
    """This test's Ray Train worker process, and the worker node whose raylet started it."""
    for process in psutil.process_iter():
        try:
            if is_ray_train_worker(process):
                parent = process.ppid()
                return next(n for n in workers if parent in {p.process.pid for p in n.all_processes["raylet"]}), process
        except (psutil.NoSuchProcess, StopIteration):
            pass
    raise AssertionError("no training worker was found on the worker nodes")


def test_a_trial_whose_node_is_lost_goes_on_from_its_checkpoint_on_another_node(three_nodes, tmp_path):
    cluster, workers = three_nodes
    lost: dict = {}

    def lose_the_node_after(checkpoint: str, deadline_s: float = 240) -> None:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline and not list(tmp_path.glob(f"**/{checkpoint}")):
            time.sleep(0.05)
        node, worker = training_worker(workers)
        lost["node"], lost["begun"] = node.node_id, checkpoint_steps(tmp_path)[-1]
        # A lost machine's processes all stop at once. remove_node kills the raylet only, and a worker it started can
        # go on training (and checkpointing) for seconds before it notices: so the worker is killed first.
        kill_and_wait(worker)
        cluster.remove_node(node, allow_graceful=False)
        lost["written"] = checkpoint_steps(tmp_path)[-1]

    config = trial(tmp_path, max_steps=40, checkpoint_every=5, report_every=1, eval_at_start=False)
    killer = threading.Thread(target=lose_the_node_after, args=("checkpoint_000010",))
    killer.start()
    result = run_sweep(SweepConfig("lost_node", {"rank": [4]}, config, name="lost"))
    killer.join()

    assert lost.get("node"), "the node was not removed"
    client, runs, children = trial_runs(result.tracking_uri, "lost_node", "lost")
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 2 and result.failed == []
    (child,) = children
    # it ended on the other worker node, as one run with one history
    assert child.data.tags["ray.node_id"] == next(n.node_id for n in workers if n.node_id != lost["node"])
    assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")] == list(range(1, 41))
    summary = json.loads(Path(client.download_artifacts(child.info.run_id, "summary.json", str(tmp_path))).read_text())
    # it resumed from the last checkpoint registered: the one before the newest folder when the kill began, that one,
    # or one written while the worker was being killed
    assert summary["resumed_from_step"] in range(lost["begun"] - 5, lost["written"] + 1, 5), lost


def test_a_local_storage_path_is_refused_on_several_nodes_before_anything_is_written(three_nodes, tmp_path):
    local = tmp_path / "runs"
    with pytest.raises(ValueError, match=r"^storage_path '.*/runs' is a folder of this machine, and this Ray cluster "):
        run_sweep(SweepConfig("multinode", {"rank": [4]}, trial(tmp_path, storage_path=str(local)), name="local"))
    assert not local.exists()
