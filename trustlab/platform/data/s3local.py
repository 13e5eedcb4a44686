"""A local S3 for tests, benchmarks and the ``data.store=s3`` demo: moto's server on 127.0.0.1.

``LocalS3`` starts ``moto.server.ThreadedMotoServer`` on a free loopback port in this process
(a thread; it lives as long as the process or until ``stop()``), sets dummy credentials in the
environment when none are set (moto accepts any; pyarrow and boto3 need some), and gives the
endpoint URL. Everything else talks to it exactly as to real S3: ``pyarrow.fs.S3FileSystem``
with ``endpoint_override`` (``trustlab.platform.storage.s3_filesystem``) and boto3 with
``endpoint_url``.

    with LocalS3() as s3:
        s3.create_bucket("videos")
        uri = upload_manifest("manifest.csv", s3.endpoint, "videos", "synth")   # s3://videos/synth/manifest.csv
"""
from __future__ import annotations

import os
import socket

import pandas as pd


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ensure_dummy_credentials() -> None:
    """Dummy keys for moto when no AWS credentials are configured (and no metadata-server probes)."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


class LocalS3:
    """moto S3 server on ``host`` (loopback only) and a free port; ``endpoint`` is its URL."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None):
        if not host.startswith("127.") and host != "localhost":
            raise ValueError("the local S3 server listens on the loopback interface only")
        self.host, self.port = host, port
        self._server = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "LocalS3":
        from moto.server import ThreadedMotoServer

        ensure_dummy_credentials()
        self.port = self.port or _free_port(self.host)
        self._server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def client(self):
        return s3_client(self.endpoint)

    def create_bucket(self, bucket: str) -> None:
        create_bucket(self.endpoint, bucket)


def s3_client(endpoint: str | None):
    import boto3

    ensure_dummy_credentials()
    return boto3.client("s3", endpoint_url=endpoint, region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))


def create_bucket(endpoint: str | None, bucket: str) -> None:
    """Create ``bucket`` unless it exists."""
    c = s3_client(endpoint)
    try:
        c.head_bucket(Bucket=bucket)
    except Exception:
        c.create_bucket(Bucket=bucket)


def upload_file(endpoint: str | None, local_path: str, bucket: str, key: str) -> str:
    s3_client(endpoint).upload_file(local_path, bucket, key)
    return f"s3://{bucket}/{key}"


def upload_manifest(manifest: str, endpoint: str | None, bucket: str, prefix: str = "") -> str:
    """Upload every video of a local manifest to ``s3://bucket/prefix/<split>/<file>`` and a copy
    of the manifest whose ``uri`` column points there; returns the uploaded manifest's URI.
    Files already present with the same size are not sent again."""
    create_bucket(endpoint, bucket)
    c = s3_client(endpoint)
    df = pd.read_csv(manifest) if manifest.endswith(".csv") else pd.read_parquet(manifest)
    prefix = prefix.strip("/")
    uris = []
    for uri, split in zip(df["uri"], df["split"]):
        key = "/".join(p for p in (prefix, str(split), os.path.basename(uri)) if p)
        size = os.path.getsize(uri)
        try:
            same = c.head_object(Bucket=bucket, Key=key)["ContentLength"] == size
        except Exception:
            same = False
        if not same:
            c.upload_file(uri, bucket, key)
        uris.append(f"s3://{bucket}/{key}")
    out = df.copy()
    out["uri"] = uris
    key = "/".join(p for p in (prefix, "manifest.csv") if p)
    c.put_object(Bucket=bucket, Key=key, Body=out.to_csv(index=False).encode())
    return f"s3://{bucket}/{key}"
