"""Ray heads that tests (and you: `python tests/ray_head.py`) start with `ray start --head` on this machine, beside
whatever other Ray runs here.

A bare `ray start --head` takes Ray's default ports (the GCS's 6379, the dashboard's 8265, the job agent's 52365,
...): beside another Ray its job agent cannot bind, and every `ray job submit` is refused with "No available agent to
submit job" (STACK_NOTES). A head started here gets a free 127.0.0.1 port for every server it opens, worker ports
chosen by the system, and a temporary folder of its own, so that it never becomes the /tmp/ray/ray_current_cluster
that a bare ray.init() would join; it is ready once its job agent answers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from densetune.cluster import RAY_ENV

RAY = str(Path(sys.executable).parent / "ray")
# Ray's defaults, which the first `ray start --head` on a machine takes and a second one collides on.
DEFAULT_PORTS = {"--port": 6379, "--dashboard-port": 8265, "--dashboard-agent-listen-port": 52365}
# Every server of a head that listens on a port of its own: those `ray start` has a flag for, then those set by
# environment variables (the dashboard's and the autoscaler's Prometheus metrics); workers take ports the system
# chooses (0, 0).
PORT_FLAGS = (
    "--port", "--dashboard-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port", "--object-manager-port",
    "--ray-client-server-port",
)
PORT_VARIABLES = ("DASHBOARD_METRIC_PORT", "AUTOSCALER_METRIC_PORT")


def free_ports(count: int) -> list[int]:
    """`count` different ports that are free on 127.0.0.1 now (all bound at once, so that none comes twice)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def ray_env() -> dict[str, str]:
    """The environment of a head and of the `ray` commands that talk to it: this venv's Python first on PATH (the
    cluster's Python is this venv's, as on a cluster whose nodes installed the project), every server on 127.0.0.1,
    the token Ray 2.60 requires of clients, and trials that report fast."""
    return {
        **os.environ, **RAY_ENV, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
    }


def answers(url: str) -> bool:
    """Whether an HTTP server answers at `url`, whatever it says (401 without Ray's token counts)."""
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def wait_until(ready: Callable[[], bool], seconds: float, alive: Callable[[], bool]) -> bool:
    """Poll `ready` until it holds (True), `seconds` pass or `alive` no longer holds (False)."""
    deadline = time.monotonic() + seconds
    while not ready():
        if not alive() or time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


@dataclass
class Head:
    """A `ray start --head --block` process; stopping it (SIGTERM) stops every Ray process it started."""

    process: subprocess.Popen
    temp_dir: Path
    ports: dict[str, int]

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.ports['--dashboard-port']}"

    def running(self) -> bool:
        return self.process.poll() is None

    def wait_for_job_agent(self, seconds: float = 90) -> None:
        """Wait until `ray job submit` can reach the job agent: the dashboard's job API answers, then the agent's
        HTTP server, which registers itself with the dashboard right after it starts (and the dashboard waits 10 s
        for that on each submission)."""
        agent = f"http://127.0.0.1:{self.ports['--dashboard-agent-listen-port']}/api/healthz"
        deadline = time.monotonic() + seconds
        for url in (f"{self.dashboard}/api/version", agent):
            if not wait_until(lambda url=url: answers(url), deadline - time.monotonic(), self.running):
                log = (self.temp_dir / "ray_start.log").read_text()[-3000:]
                raise AssertionError(f"{url} did not answer within {seconds} s (running: {self.running()}):\n{log}")

    def stop(self) -> None:
        if self.running():
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_head(num_cpus: int = 2, default_ports: bool = False) -> Head:
    """`ray start --head` on 127.0.0.1 with `num_cpus` CPUs, a temporary folder of its own and free ports (or Ray's
    defaults, to stand for another Ray on the machine). Returns at once: wait for it (Head.wait_for_job_agent) before
    use, stop it (Head.stop) after."""
    if default_ports:
        ports, variables, flags = DEFAULT_PORTS, {}, []
    else:
        free = free_ports(len(PORT_FLAGS) + len(PORT_VARIABLES))
        ports = dict(zip(PORT_FLAGS, free))
        variables = {name: str(port) for name, port in zip(PORT_VARIABLES, free[len(PORT_FLAGS):])}
        flags = [part for flag, port in ports.items() for part in (flag, str(port))]
        flags += ["--min-worker-port", "0", "--max-worker-port", "0"]
    # A short path: Ray's Unix sockets live under it, and a socket's path may not pass 107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    command = [
        RAY, "start", "--head", "--block", "--num-cpus", str(num_cpus), "--node-ip-address", "127.0.0.1",
        "--dashboard-host", "127.0.0.1", "--temp-dir", str(temp_dir), *flags,
    ]
    with open(temp_dir / "ray_start.log", "w") as log:
        process = subprocess.Popen(command, env={**ray_env(), **variables}, stdout=log, stderr=subprocess.STDOUT)
    return Head(process, temp_dir, ports)


def main() -> None:
    """Start a head for `ray job submit` on this machine, beside any other Ray; print how to reach it once its job
    agent answers; stop it on Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs for Ray tasks (default: all)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # through `finally`, which stops the head
    head = start_head(args.num_cpus)
    try:
        head.wait_for_job_agent()
        print(f"export RAY_API_SERVER_ADDRESS={head.dashboard} RAY_AUTH_MODE=token", flush=True)
        print(f"# Ray's logs, until the head stops: {head.temp_dir}/session_latest/logs", flush=True)
        head.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        head.stop()


if __name__ == "__main__":
    main()
