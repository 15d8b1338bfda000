"""`ray job submit` against a cluster started with `ray start --head` on this machine, beside another Ray: the
project's code reaches the job through its working directory, and the sweep's results land in the tracking store the
job was given."""

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ray_head import DEFAULT_PORTS, RAY, port_is_free, ray_env, start_head

ROOT = Path(__file__).resolve().parents[1]
AGENT_PORT = DEFAULT_PORTS["--dashboard-agent-listen-port"]


@pytest.fixture(scope="module")
def another_ray() -> Iterator[None]:
    """Another Ray on Ray's default ports, as a colleague's `ray start --head` or study would hold them: the one
    running here already, else one started for this module."""
    if not all(port_is_free(port) for port in DEFAULT_PORTS.values()):
        yield
        return
    other = start_head(1, default_ports=True)
    try:
        other.wait_for_job_agent()
        yield
    finally:
        other.stop()


def test_a_study_submitted_as_a_ray_job_is_tracked(tmp_path, another_ray):
    head = start_head(2)
    try:
        head.wait_for_job_agent()
        assert not port_is_free(AGENT_PORT), "no other Ray holds the job agent's default port"
        uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
        job = subprocess.run(
            [RAY, "job", "submit", "--address", head.dashboard, "--working-dir", str(ROOT), "--", "python",
             "experiments/rank_sweep.py", "--smoke", "--space", "rank=4", "--name", "job", "--storage-path",
             str(tmp_path / "runs"), "--tracking-uri", uri],
            env=ray_env(), capture_output=True, text=True, timeout=300,
        )
    finally:
        head.stop()
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "sweep job (1 trials)" in job.stdout and "mlflow ui --backend-store-uri " + uri in job.stdout

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("rank_sweep").experiment_id], "tags.sweep = 'job'")
    assert sorted((r.data.tags["densetune.role"], r.info.status) for r in runs) == [
        ("sweep", "FINISHED"), ("trial", "FINISHED"),
    ]
    assert (tmp_path / "runs" / "job" / "trials").is_dir()
