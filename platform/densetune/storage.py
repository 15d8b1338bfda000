"""Where runs are kept: a local folder or a URI that pyarrow's file systems reach (s3://, gs://, file://, with a query
string such as ?endpoint_override=HOST:PORT&scheme=http for an S3-compatible server). pyarrow is imported when used:
the command lines answer --help without it.

On a cluster of several nodes every worker writes its checkpoints to the storage path, so it must be one that every
node reaches: a bucket, or a folder that every node mounts, given as a file:// URI to say that it is shared.
"""

from __future__ import annotations

import uuid
from pathlib import Path


def is_remote(path: str) -> bool:
    """Whether `path` is a URI (s3://, gs://, file:// ...) rather than a folder of this machine."""
    return "://" in path


def storage_root(path: str) -> str:
    """A storage path as Ray wants it: a URI as it is (without a trailing slash), a local folder absolute."""
    if not is_remote(path):
        return str(Path(path).resolve())
    location, query = split_query(path)
    return location.rstrip("/") + query


def join(base: str, *names: str) -> str:
    """`names` below the folder or URI `base`: inside the URI's path, before its query string."""
    location, query = split_query(base)
    return "/".join([location.rstrip("/"), *names]) + query


def split_query(uri: str) -> tuple[str, str]:
    """('s3://bucket/runs', '?endpoint_override=...') from 's3://bucket/runs?endpoint_override=...'."""
    location, mark, query = uri.partition("?")
    return location, mark + query


def check_storage(path: str) -> None:
    """Write and remove a probe file, so a read-only or mistyped storage path fails before any trial."""
    import pyarrow.fs

    probe = join(storage_root(path), f".densetune-write-check-{uuid.uuid4().hex}")
    try:
        write_text(probe, "ok")
        filesystem, inner = pyarrow.fs.FileSystem.from_uri(probe)
        filesystem.delete_file(inner)
    except (OSError, ValueError, pyarrow.ArrowException) as error:
        raise ValueError(f"storage_path {path!r} cannot be written ({error}): pass a folder or URI you can write") from None


def check_placement(path: str, several_nodes: bool, in_job: bool) -> None:
    """Refuse a storage path that would not keep a study's runs: a local folder on a cluster of several nodes (each
    worker's checkpoints would stay on its own node's disk: the trial fails at its checkpoint, or resumes from nothing),
    or a relative one in a submitted job (its working directory is deleted with the job)."""
    if is_remote(path):
        return
    if several_nodes:
        raise ValueError(
            f"storage_path {path!r} is a folder of this machine, and this Ray cluster has (or can add) other nodes, "
            "whose workers write there too: pass a URI every node reaches (s3://bucket/runs, gs://bucket/runs), or a "
            "folder every node mounts, as file:///mnt/shared/runs"
        )
    if in_job and not Path(path).is_absolute():
        raise ValueError(
            f"storage_path {path!r} is relative, and a submitted Ray job's working directory is deleted with the job: "
            "pass an absolute folder or a URI (s3://bucket/runs)"
        )


def read_text(path: str) -> str:
    import pyarrow.fs

    filesystem, inner = pyarrow.fs.FileSystem.from_uri(path)
    with filesystem.open_input_stream(inner) as stream:
        return stream.read().decode()


def write_text(path: str, text: str) -> None:
    import pyarrow.fs

    filesystem, inner = pyarrow.fs.FileSystem.from_uri(path)
    filesystem.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(inner) as stream:
        stream.write(text.encode())
