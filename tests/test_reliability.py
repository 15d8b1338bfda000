"""A study runs on a Ray of its own, on loopback, and a shared tracking store survives sweeps that start together."""

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import ray
from mlflow import MlflowClient

from densetune.sweep.record import check_tracking_uri, store_lock

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}

# Run as a separate driver, without the loopback variable the tests set for themselves: ensure_ray must set it.
OWN_RAY = """
import json, psutil, ray
from densetune.cluster import ensure_ray
assert ensure_ray()
ray.get(ray.remote(lambda: 1).remote())  # a worker, listening like the rest
processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
listening = sorted({c.laddr.ip for p in processes for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN})
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "listening": listening, "processes": len(processes)}))
ray.shutdown()
"""


def test_a_study_starts_its_own_ray_on_loopback_beside_another(local_ray):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    done = subprocess.run([sys.executable, "-c", OWN_RAY], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    # not the Ray this test process runs (a bare ray.init() would have joined it)
    assert seen["gcs"] != ray.get_runtime_context().gcs_address
    assert seen["processes"] > 3 and seen["listening"]
    assert set(seen["listening"]) <= LOOPBACK, seen["listening"]


# Also a driver of its own: the local Ray a study starts (ensure_ray), two Ray Train workers joining torch.distributed
# through Ray's own TorchConfig, then through the trials' BoundTorchConfig.
RENDEZVOUS = """
import json, sys, psutil, ray.train, torch.distributed as dist
from ray.train.torch import TorchTrainer
from densetune.trial.rendezvous import BoundTorchConfig
from densetune.cluster import ensure_ray

def listening_addresses(_):
    # every worker's listening addresses, gathered through the process group (which shows that it works)
    mine = sorted({c.laddr.ip for c in psutil.Process().net_connections("inet") if c.status == psutil.CONN_LISTEN})
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return sorted({ip for ips in everyone for ip in ips})

assert ensure_ray()
seen = {}
for name, config in (("ray", None), ("bound", BoundTorchConfig())):
    seen[name] = TorchTrainer(
        listening_addresses, torch_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=name, storage_path=sys.argv[1]),
    ).fit().return_value
print(json.dumps(seen))
"""


def test_the_rendezvous_store_of_a_trial_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    done = subprocess.run(
        [sys.executable, "-c", RENDEZVOUS, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    # Ray's own setup opens torch's store on every interface: the reason for BoundTorchConfig, which run_trial uses
    assert set(seen["ray"]) - LOOPBACK, seen["ray"]
    assert seen["bound"] and set(seen["bound"]) <= LOOPBACK, seen["bound"]


def open_store(uri: str) -> None:
    check_tracking_uri(uri)


def blocked_on_a_file_lock(pid: int) -> bool:
    """Whether the process sleeps in the kernel waiting for a flock (its wait channel)."""
    return Path(f"/proc/{pid}/wchan").read_text() == "locks_lock_inode_wait"


def test_a_second_process_waits_for_the_store_lock_before_it_creates_the_store(tmp_path):
    # Without the lock two processes creating one new store both ran MLflow's schema migration, and one failed
    # ("duplicate column name: step"). Here the test holds the lock and creates the store itself; the other process
    # must be found waiting on the lock, not migrating beside it.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    context = multiprocessing.get_context("spawn")
    other = context.Process(target=open_store, args=(uri,))
    with store_lock(uri):
        other.start()
        deadline = time.monotonic() + 120
        while not blocked_on_a_file_lock(other.pid):
            assert other.exitcode is None and time.monotonic() < deadline, "it never waited for the lock"
            time.sleep(0.1)
        assert not (tmp_path / "mlflow.db").exists()  # nothing created behind the lock's back
        MlflowClient(uri).search_experiments(max_results=1)  # the schema migration, while the other waits
    other.join(timeout=120)
    assert other.exitcode == 0
    assert [e.name for e in MlflowClient(uri).search_experiments()] == ["Default"]


def test_the_runs_a_dead_driver_left_running_can_be_listed_and_closed(tmp_path, capsys):
    from mlflow import MlflowClient

    from densetune.config import TrialConfig
    from densetune.files import ROLE, SWEEP
    from densetune.results.store import main
    from densetune.sweep.record import SweepTracker, TrackedSweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    check_tracking_uri(uri)
    # what a driver killed mid-sweep leaves behind: the sweep's run and a trial's run, both RUNNING
    tracker = SweepTracker(TrackedSweep(uri, "a_study", "stale", {}), TrialConfig.from_dict)
    client = MlflowClient(uri)
    client.create_run(tracker.experiment_id, run_name="t0 rank=4", tags={ROLE: "trial", SWEEP: "stale"})
    tracker.parent_run_id()

    assert main(["--tracking-uri", uri, "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].split() == ["sweep", "study", "status", "started", "trials"]
    assert listed[1].split()[:3] == ["stale", "a_study", "RUNNING"] and listed[1].endswith("1 RUNNING")

    assert main(["--tracking-uri", uri, "close", "stale"]) == 0
    closed = capsys.readouterr().out.splitlines()
    assert closed[0] == "sweep stale: closed 2 run(s) left RUNNING" and sorted(closed[1:]) == ["  stale", "  t0 rank=4"]
    runs = client.search_runs([tracker.experiment_id])
    assert sorted(r.info.status for r in runs) == ["KILLED", "KILLED"]

    assert main(["--tracking-uri", uri, "close", "stael"]) == 2
    assert capsys.readouterr().err.strip() == f"error: no sweep named 'stael' in {uri}; the sweeps there: stale"


def test_the_sweep_commands_take_their_options_before_or_after_the_command(tmp_path, monkeypatch, capsys):
    from densetune.config import TrialConfig
    from densetune.results.store import main
    from densetune.sweep.record import SweepTracker, TrackedSweep

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # where the default store (./runs) would be: a command that fell back to it lists none
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    check_tracking_uri(uri)
    for name in ("first", "second"):  # two sweeps' runs, still RUNNING as a dead driver leaves them
        SweepTracker(TrackedSweep(uri, f"study_{name}", name, {}), TrialConfig.from_dict).parent_run_id()

    def listed(*argv: str) -> list[str]:
        assert main(list(argv)) == 0
        return capsys.readouterr().out.splitlines()

    before = listed("--tracking-uri", uri, "list")
    assert sorted(line.split()[:3] for line in before[1:]) == [["first", "study_first", "RUNNING"],
                                                               ["second", "study_second", "RUNNING"]]
    assert listed("list", "--tracking-uri", uri) == before
    assert listed("list", "--tracking-uri=" + uri) == before
    # --storage-path finds the embedded store in the folder, on either side
    assert listed("--storage-path", str(store), "list") == before
    assert listed("list", "--storage-path", str(store)) == before
    # an option given before the command is not reset by the command's own copy of the options
    assert listed("--storage-path", str(store), "list", "--tracking-uri", uri) == before
    assert listed("--tracking-uri", uri, "list", "--storage-path", str(tmp_path / "elsewhere")) == before
    assert not (tmp_path / "runs").exists() and not (tmp_path / "elsewhere").exists()

    assert main(["close", "first", "--tracking-uri", uri]) == 0
    assert capsys.readouterr().out.splitlines() == ["sweep first: closed 1 run(s) left RUNNING", "  first"]
    assert main(["--tracking-uri", uri, "close", "second"]) == 0
    assert capsys.readouterr().out.splitlines() == ["sweep second: closed 1 run(s) left RUNNING", "  second"]
    assert main(["close", "--tracking-uri", uri, "third"]) == 2
    assert capsys.readouterr().err.strip() == f"error: no sweep named 'third' in {uri}; the sweeps there: first, second"


def test_two_studies_started_together_on_one_new_store_both_succeed(tmp_path):
    # Each on a Ray of its own, both creating and then writing one new sqlite store at once.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    command = [sys.executable, str(ROOT / "experiments" / "rank_sweep.py"), "--smoke", "--storage-path", str(tmp_path)]
    drivers = {
        name: subprocess.Popen([*command, "--space", f"rank={rank}", "--name", name], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, rank in (("first", 4), ("second", 8))
    }
    outputs = {name: driver.communicate(timeout=600) for name, driver in drivers.items()}
    for name, driver in drivers.items():
        assert driver.returncode == 0, outputs[name][1][-3000:]

    from densetune.results.store import sweep_runs, sweeps

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    found = sweeps(uri).set_index("sweep")
    assert sorted(found.index) == ["first", "second"]
    assert list(found["status"]) == ["FINISHED", "FINISHED"] and list(found["trials"]) == ["1 FINISHED", "1 FINISHED"]
    assert [sweep_runs(name, uri)["rank"].tolist() for name in ("first", "second")] == [[4], [8]]
