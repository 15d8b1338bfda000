"""An S3-compatible server on 127.0.0.1 for the tests that rehearse cloud storage: moto's standalone server, on a free
port, with one bucket. pyarrow, Ray and MLflow reach it as s3://BUCKET/...?endpoint_override=127.0.0.1:PORT&scheme=http
with any credentials (STACK_NOTES)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ray_head import answers, free_ports, wait_until

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    """`moto_server` in a process of its own, with `bucket` created; every process started after `start` (Ray's
    nodes, an MLflow server) finds the credentials in its environment, as a cloud node finds its instance profile's."""

    def __init__(self, bucket: str, log: Path) -> None:
        self.bucket, self.log, (self.port,) = bucket, log, free_ports(1)
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def uri(self, path: str) -> str:
        """s3://bucket/path as pyarrow and Ray open it on this server."""
        return f"s3://{self.bucket}/{path}?endpoint_override=127.0.0.1:{self.port}&scheme=http"

    def start(self, deadline_s: float = 60) -> S3Server:
        os.environ.update(CREDENTIALS)
        server = Path(sys.executable).parent / "moto_server"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [str(server), "-H", "127.0.0.1", "-p", str(self.port)], stdout=log, stderr=subprocess.STDOUT
            )
        running = lambda: self.process.poll() is None  # noqa: E731
        if not wait_until(lambda: answers(self.endpoint), deadline_s, running):
            raise RuntimeError(f"moto_server did not answer on {self.endpoint}: {self.log.read_text()[-2000:]}")
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=CREDENTIALS["AWS_DEFAULT_REGION"])

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def put(self, key: str, text: str) -> None:
        self.client().put_object(Bucket=self.bucket, Key=key, Body=text.encode())

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
