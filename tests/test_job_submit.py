"""`ray job submit` against a cluster started with `ray start --head` on this machine: the project's code reaches the
job through its working directory, and the sweep's results land in the tracking store the job was given."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from mlflow import MlflowClient

from densetune.trial import RAY_ENV

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answered (401 without Ray's token)
        except OSError:
            assert time.monotonic() < deadline, f"{url} did not answer in {seconds} s"
            time.sleep(1)


def submit(command: list[str], env: dict[str, str], seconds: float) -> subprocess.CompletedProcess:
    """`ray job submit`, again while the head's job agent is not up yet (on a busy machine it comes seconds after the
    dashboard answers: "No available agent to submit job"); such a refusal starts no job."""
    deadline = time.monotonic() + seconds
    while True:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent to submit job" not in done.stdout + done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(2)


def test_a_study_submitted_as_a_ray_job_is_tracked(tmp_path):
    dashboard = free_port()
    # The cluster's Python is this venv's, as on a cluster whose nodes installed the project.
    env = {
        **os.environ, **RAY_ENV, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
    }
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--num-cpus", "2", "--port", str(free_port()), "--dashboard-host",
         "127.0.0.1", "--dashboard-port", str(dashboard), "--ray-client-server-port", str(free_port())],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(f"http://127.0.0.1:{dashboard}/api/version", 90)
        uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
        job = submit(
            [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(ROOT), "--",
             "python", "experiments/rank_sweep.py", "--smoke", "--space", "rank=4", "--name", "job",
             "--storage-path", str(tmp_path / "runs"), "--tracking-uri", uri],
            env, 120,
        )
    finally:
        head.send_signal(signal.SIGTERM)  # --block: the head stops every Ray process it started
        head.wait(timeout=60)
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists():  # it would point later bare ray.init() calls at the stopped head
            current.unlink()
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "sweep job (1 trials)" in job.stdout and "mlflow ui --backend-store-uri " + uri in job.stdout

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("rank_sweep").experiment_id], "tags.sweep = 'job'")
    assert sorted((r.data.tags["densetune.role"], r.info.status) for r in runs) == [
        ("sweep", "FINISHED"), ("trial", "FINISHED"),
    ]
    assert (tmp_path / "runs" / "job" / "trials").is_dir()
