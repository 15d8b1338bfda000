"""Where runs are kept: a local folder or a URI (s3://, gs://) that pyarrow's file systems reach (imported when used:
the command lines answer --help without it)."""

from __future__ import annotations

import uuid
from pathlib import Path


def storage_root(path: str) -> str:
    """A storage path as Ray wants it: a URI (s3://, gs://) as it is, a local folder absolute."""
    return path.rstrip("/") if "://" in path else str(Path(path).resolve())


def check_storage(path: str) -> None:
    """Write and remove a probe file, so a read-only or mistyped storage path fails before any trial."""
    import pyarrow.fs

    probe = f"{storage_root(path)}/.densetune-write-check-{uuid.uuid4().hex}"
    try:
        write_text(probe, "ok")
        filesystem, inner = pyarrow.fs.FileSystem.from_uri(probe)
        filesystem.delete_file(inner)
    except (OSError, ValueError, pyarrow.ArrowException) as error:
        raise ValueError(f"storage_path {path!r} cannot be written ({error}): pass a folder or URI you can write") from None


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
