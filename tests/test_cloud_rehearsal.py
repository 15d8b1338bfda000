"""The cloud, rehearsed on this machine: a three-node Ray cluster (ray.cluster_utils: a head without CPUs and two
one-CPU workers), an S3-compatible server, and an MLflow server whose artifacts live in its bucket. A study goes to the
head with `ray job submit`, as the README's cluster section says, with its storage path in the bucket and the tracking
server's URI; its driver is killed mid-sweep and the sweep resumed; the same command with a local storage path is
refused."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient
from ray.cluster_utils import Cluster

from densetune.cluster import RAY_ENV
from ray_head import RAY, answers, free_ports, wait_until
from s3_server import S3Server

ROOT = Path(__file__).resolve().parents[1]
NAME = "rehearsal"


@dataclass
class Cloud:
    cluster: Cluster
    s3: S3Server
    tracking_uri: str
    dashboard: str

    def submit(self, *args: str, wait: bool = True) -> subprocess.CompletedProcess:
        """`ray job submit` of the rank study on the tiny model."""
        command = [
            RAY, "job", "submit", "--address", self.dashboard, "--working-dir", str(ROOT),
            *([] if wait else ["--no-wait"]), "--", "python", "experiments/rank_sweep.py", "--smoke",
            "--space", "rank=4,8", "--max-concurrent", "1", "--name", NAME, *args,
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    def ray_job(self, *args: str) -> str:
        done = subprocess.run([RAY, "job", *args, "--address", self.dashboard], capture_output=True, text=True,
                              timeout=120)
        return done.stdout + done.stderr


def wait_for(url: str, seconds: float) -> None:
    assert wait_until(lambda: answers(url), seconds, lambda: True), f"{url} did not answer in {seconds} s"


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cloud")
    saved = dict(os.environ)
    # The nodes' Python is this venv's, as on a cluster whose nodes installed the project; every process started from
    # here (Ray's nodes, the MLflow server) finds the bucket's credentials in its environment.
    os.environ.update({**RAY_ENV, "PATH": f"{Path(RAY).parent}:{os.environ['PATH']}"})
    s3 = S3Server("study-bucket", tmp / "moto.log").start()
    tracking, dashboard, agent = free_ports(3)
    with open(tmp / "mlflow.log", "w") as log:
        server = subprocess.Popen(
            [str(Path(RAY).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(tracking), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination", "s3://study-bucket/mlflow"],
            env={**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint}, cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
        )
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard,
        "dashboard_agent_listen_port": agent,
    })
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        # Ready to submit once the head's job agent answers, which registers with the dashboard as it starts.
        for url in (f"http://127.0.0.1:{dashboard}/api/version", f"http://127.0.0.1:{agent}/api/healthz",
                    f"http://127.0.0.1:{tracking}/health"):
            wait_for(url, 90)
        yield Cloud(cluster, s3, f"http://127.0.0.1:{tracking}", f"http://127.0.0.1:{dashboard}")
    finally:
        cluster.shutdown()
        current = Path("/tmp/ray/ray_current_cluster")  # it would point later bare ray.init() calls at this cluster
        if current.exists() and cluster.address in current.read_text():
            current.unlink()
        server.terminate()
        server.wait(timeout=30)
        s3.stop()
        os.environ.clear()
        os.environ.update(saved)


def trial_runs(client: MlflowClient) -> tuple[list, list]:
    experiment = client.get_experiment_by_name("rank_sweep")
    if experiment is None:
        return [], []
    runs = client.search_runs([experiment.experiment_id], f"tags.sweep = '{NAME}'")
    return runs, [r for r in runs if r.data.tags.get("densetune.role") == "trial"]


def job_id(submitted: subprocess.CompletedProcess) -> str:
    return next(word.strip("'") for word in submitted.stdout.split() if word.strip("'").startswith("raysubmit_"))


def job_files(cluster: Cluster) -> list[Path]:
    """Every file under the jobs' unpacked working directories on the head, relative to its package's folder."""
    folder = Path(cluster.head_node.get_session_dir_path()) / "runtime_resources" / "working_dir_files"
    return [path.relative_to(package) for package in folder.iterdir() for path in package.rglob("*") if path.is_file()]


def test_a_study_on_the_cluster_keeps_everything_in_the_bucket_and_the_tracking_server(cloud, tmp_path):
    storage = cloud.s3.uri("studies")
    flags = ("--storage-path", storage, "--tracking-uri", cloud.tracking_uri)
    client = MlflowClient(cloud.tracking_uri)

    # A local folder on three nodes: refused in one line, before anything is written.
    local = tmp_path / "runs"
    refused = cloud.submit("--storage-path", str(local), "--tracking-uri", cloud.tracking_uri)
    assert refused.returncode != 0
    # The job's own output (ray job submit repeats its tail in the failure's status message).
    errors = [line for line in cloud.ray_job("logs", job_id(refused)).splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: storage_path '{local}' is a folder of this machine, and this Ray cluster has (or can add) other "
        "nodes, whose workers write there too: pass a URI every node reaches (s3://bucket/runs, gs://bucket/runs), or "
        "a folder every node mounts, as file:///mnt/shared/runs"
    ]
    assert not local.exists() and trial_runs(client) == ([], [])

    # The study, its driver killed (ray job stop) once its first trial is tracked as finished.
    submitted = cloud.submit(*flags, wait=False)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job = job_id(submitted)
    deadline = time.monotonic() + 240
    while not any(r.info.status == "FINISHED" for r in trial_runs(client)[1]):
        assert time.monotonic() < deadline, cloud.ray_job("logs", job)[-3000:]
        time.sleep(1)
    cloud.ray_job("stop", job)
    deadline = time.monotonic() + 60
    while "stopped" not in cloud.ray_job("status", job).lower():
        assert time.monotonic() < deadline, cloud.ray_job("status", job)
        time.sleep(1)
    runs, trials = trial_runs(client)
    assert len(trials) >= 1 and not all(r.info.status == "FINISHED" for r in runs)  # cut short

    resumed = cloud.submit(*flags, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"sweep {NAME} (2 trials)" in resumed.stdout

    # The tracking server: one parent run with its two trials, each step of each trial logged once.
    runs, trials = trial_runs(client)
    parents = [r for r in runs if r.data.tags["densetune.role"] == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.params["rank"] for r in trials if r.info.status == "FINISHED") == ["4", "8"]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in trials)
    for run in trials:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert len(steps) == len(set(steps)), (run.data.params["rank"], steps)
    reported = {item.path for item in client.list_artifacts(parents[0].info.run_id, "report")}
    assert "report/report.md" in reported

    # The bucket: every finished trial's checkpoint, and the report through the server's artifact store.
    keys = cloud.s3.keys()
    checkpoints = {key.split("/")[3] for key in keys
                   if key.startswith(f"studies/{NAME}/trials/") and key.endswith("/adapter_model.safetensors")}
    assert len(checkpoints) == 2
    assert any(key.startswith("mlflow/") and key.endswith("/artifacts/report/report.md") for key in keys)

    # Nothing under the jobs' working directories: each holds the project as it was uploaded, and no file more.
    files = job_files(cloud.cluster)
    # (Bytecode caches aside: Python writes them where it imports from, unless PYTHONDONTWRITEBYTECODE is set.)
    added = [path for path in files if not (ROOT / path).exists() and "__pycache__" not in path.parts]
    assert Path("experiments/rank_sweep.py") in files and added == []
