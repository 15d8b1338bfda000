"""Where a study keeps its runs, its record and its data on a cluster: storage URIs with query strings, against an
S3-compatible server on 127.0.0.1, and the refusals that keep a study's record; GPUs per worker that a worker group
cannot use."""

import json
from pathlib import Path

import pytest

from densetune.config import TrialConfig
from densetune.data.loading import load_benchmark
from densetune.storage import check_placement, check_storage, join, read_text, storage_root, write_text
from densetune.sweep.record import default_tracking_uri, store_uri
from densetune.trial.run import check_config
from s3_server import S3Server

ROW = {"instruction": "Pick one. Answer1: red Answer2: blue", "input": "", "output": "the correct answer is answer1",
       "answer": "answer1"}
QUERY = "?endpoint_override=127.0.0.1:9000&scheme=http"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server("runs-bucket", tmp_path_factory.mktemp("s3") / "moto.log").start()
    yield server
    server.stop()


def test_names_go_into_a_uris_path_before_its_query_string():
    assert join(f"s3://bar/runs{QUERY}", "sweep", "trials") == f"s3://bar/runs/sweep/trials{QUERY}"
    assert join("s3://bar/runs/", "sweep") == "s3://bar/runs/sweep"
    assert join("/data/runs", "sweep") == "/data/runs/sweep"
    assert storage_root(f"s3://bar/runs/{QUERY}") == f"s3://bar/runs{QUERY}"
    assert storage_root("gs://bucket/runs/") == "gs://bucket/runs"
    assert storage_root("runs") == str(Path("runs").resolve())


def test_a_bucket_behind_a_query_string_is_written_and_read(s3):
    root = s3.uri("runs")
    check_storage(root)
    assert s3.keys() == ["runs/"]  # pyarrow's folder marker; the probe is removed
    record = join(root, "sweep", "densetune_sweep.json")
    write_text(record, '{"study": "s"}')
    assert "runs/sweep/densetune_sweep.json" in s3.keys() and read_text(record) == '{"study": "s"}'


def test_a_missing_bucket_is_refused_in_one_line(s3):
    missing = s3.uri("runs").replace(s3.bucket, "no-such-bucket")
    with pytest.raises(ValueError) as error:
        check_storage(missing)
    assert str(error.value).startswith(f"storage_path {missing!r} cannot be written (")
    assert str(error.value).endswith("pass a folder or URI you can write") and "\n" not in str(error.value)


def test_training_data_is_read_from_a_bucket(s3):
    s3.put("data/ARC-mini/train.json", json.dumps([ROW, {**ROW, "answer": "answer2"}]))
    s3.put("data/ARC-mini/test.json", json.dumps([ROW]))
    by_file = load_benchmark(s3.uri("data/ARC-mini/train.json"))
    assert by_file.name == "ARC-mini" and [r["answer"] for r in by_file.rows] == ["answer1", "answer2"]
    by_folder = load_benchmark(s3.uri("data/ARC-mini"), split="test")
    assert by_folder.name == "ARC-mini" and by_folder.rows == [ROW]
    s3.put("data/mix.json", json.dumps([ROW]))
    assert load_benchmark(s3.uri("data/mix.json")).name == "mix"

    s3.put("data/broken.json", "[{")
    with pytest.raises(ValueError, match=r"^s3://runs-bucket/data/broken.json\?.*: cannot read a JSON list of rows \("):
        load_benchmark(s3.uri("data/broken.json"))
    with pytest.raises(ValueError, match=r"data/ARC-mini/val.json\?.*: cannot read a JSON list of rows \("):
        load_benchmark(s3.uri("data/ARC-mini"), split="val")


def test_a_local_folder_is_refused_where_other_nodes_write_or_a_job_deletes_it():
    with pytest.raises(ValueError) as error:
        check_placement("/data/runs", several_nodes=True, in_job=False)
    assert str(error.value) == (
        "storage_path '/data/runs' is a folder of this machine, and this Ray cluster has (or can add) other nodes, "
        "whose workers write there too: pass a URI every node reaches (s3://bucket/runs, gs://bucket/runs), or a "
        "folder every node mounts, as file:///mnt/shared/runs"
    )
    with pytest.raises(ValueError, match=r"^storage_path 'runs' is relative, and a submitted Ray job's working "
                                          r"directory is deleted with the job: pass an absolute folder or a URI"):
        check_placement("runs", several_nodes=False, in_job=True)
    # What every node reaches, or what outlives the job, passes.
    for path, several, in_job in [
        ("file:///mnt/shared/runs", True, True), (f"s3://bar/runs{QUERY}", True, True), ("/data/runs", False, True),
        ("runs", False, False),
    ]:
        check_placement(path, several_nodes=several, in_job=in_job)


def test_a_bucket_needs_a_tracking_server_and_a_shared_mount_keeps_its_own_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError) as error:
        store_uri(None, f"s3://bar/runs{QUERY}")
    assert str(error.value) == (
        f"storage_path 's3://bar/runs{QUERY}' cannot hold the study's MLflow store, and none was given: pass the MLflow "
        "server that keeps it, --tracking-uri http://HEAD_IP:5000 (on a cluster, the head's: README, 'On a cluster'), "
        "or set MLFLOW_TRACKING_URI"
    )
    assert store_uri("http://10.0.0.1:5000", "s3://bar/runs") == "http://10.0.0.1:5000"
    assert default_tracking_uri("file:///mnt/shared/runs") == "sqlite:////mnt/shared/runs/mlflow.db"
    assert default_tracking_uri("runs") == f"sqlite:///{Path('runs').resolve() / 'mlflow.db'}"


@pytest.mark.parametrize("gpus, workers, message", [
    (2.0, 1, "gpus_per_worker 2: a worker trains on one GPU and would leave the others idle; use more workers "
             "(num_workers 2 with gpus_per_worker 1)"),
    (1.5, 2, "gpus_per_worker 1.5: a worker trains on one GPU and would leave the others idle; use more workers "
             "(num_workers 4 with gpus_per_worker 1)"),
    (0.5, 2, "gpus_per_worker 0.5 with num_workers 2 puts ranks of one trial on one GPU, which NCCL refuses: give each "
             "worker a whole GPU (gpus_per_worker 1), or share GPUs between one-worker trials"),
])
def test_gpus_per_worker_that_a_worker_group_cannot_use_are_refused(gpus, workers, message):
    config = TrialConfig(gpus_per_worker=gpus, num_workers=workers, batch_size=16, micro_batch_size=4)
    with pytest.raises(ValueError) as error:
        check_config(config)
    assert str(error.value) == message


def test_a_share_of_a_gpu_is_allowed_to_a_one_worker_trial():
    check_config(TrialConfig(gpus_per_worker=0.25, num_workers=1))
    check_config(TrialConfig(gpus_per_worker=1.0, num_workers=2, batch_size=16, micro_batch_size=4))
