"""Storage locations: local paths or ``s3://bucket/prefix``.

pyarrow ignores ``AWS_ENDPOINT_URL``, so an S3-compatible server (moto, MinIO) is reached by
passing ``endpoint_override`` explicitly; the endpoint comes from config (``run.s3_endpoint``)
or, failing that, from ``AWS_ENDPOINT_URL``.
"""
from __future__ import annotations

import os
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_s3(uri: str | None) -> bool:
    return bool(uri) and str(uri).startswith("s3://")


def s3_filesystem(endpoint: str | None = None) -> pafs.S3FileSystem:
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL")
    kw = dict(region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kw.update(access_key=os.environ["AWS_ACCESS_KEY_ID"],
                  secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""))
    if endpoint:
        u = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        kw.update(endpoint_override=u.netloc, scheme=u.scheme or "http")
    return pafs.S3FileSystem(**kw)


def resolve(uri: str, endpoint: str | None = None):
    """``(filesystem or None, path)``: for s3 the path drops the scheme, as pyarrow wants."""
    if is_s3(uri):
        return s3_filesystem(endpoint), str(uri)[len("s3://"):].rstrip("/")
    return None, os.path.abspath(os.path.expanduser(str(uri)))


def read_bytes(uri: str, endpoint: str | None = None) -> bytes:
    fs, path = resolve(uri, endpoint)
    if fs is None:
        with open(path, "rb") as f:
            return f.read()
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes, endpoint: str | None = None) -> None:
    fs, path = resolve(uri, endpoint)
    if fs is None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)
