"""A local S3-compatible server for tests (moto's server mode on 127.0.0.1) and the environment that points the
usual AWS variables at it. Skips when moto or s3fs is not installed (the `ray` extra brings them)."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

SECRET = "not-a-real-secret-" + uuid.uuid4().hex[:8]  # searched for in every object a run writes


def s3_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": "testing-key", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint}


@contextmanager
def moto_s3() -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1; yields the environment variables that reach it."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield s3_env(f"http://{host}:{port}")
    finally:
        server.stop()


def make_bucket(env: dict[str, str], bucket: str) -> Any:
    """Create a bucket; returns an s3fs filesystem bound to the server (for checks)."""
    import s3fs

    fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]})
    fs.mkdir(bucket)
    return fs


@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """The variables set in this process for the block (fsspec caches filesystems by their arguments only)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        from s3fs import S3FileSystem

        S3FileSystem.clear_instance_cache()
    except ImportError:
        pass
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
