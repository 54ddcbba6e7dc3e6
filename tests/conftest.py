"""Shared fixtures: one loopback S3 server, one GCS emulator and one local Ray cluster per test session.

The object stores start first and their endpoints (and the S3 server's fake
credentials) go into the environment before ``ray.init()``, so every Ray
worker inherits them (Ray workers copy the driver's environment when the
cluster starts).
"""

from __future__ import annotations

import os
import uuid

import boto3
import pytest

FAKE_SECRET = "mmdp-test-secret-" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto's server mode) on 127.0.0.1 and a free port."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(
        AWS_ACCESS_KEY_ID="mmdp-test-key",
        AWS_SECRET_ACCESS_KEY=FAKE_SECRET,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


_S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the loopback server, as an ``s3://`` URL."""
    name = f"mmdp-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def gcs_server():
    """A GCS emulator (gcp-storage-emulator, the JSON API) on 127.0.0.1, named by STORAGE_EMULATOR_HOST."""
    import socket
    from contextlib import closing

    from gcp_storage_emulator.server import create_server

    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=GCS_BUCKET)
    server.start()
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    yield os.environ["STORAGE_EMULATOR_HOST"]
    server.stop()
    if saved is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = saved


GCS_BUCKET = "mmdp-test"


@pytest.fixture
def gcs_prefix(gcs_server):
    """A fresh folder in the emulator's bucket, as a ``gs://`` URL."""
    return f"gs://{GCS_BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def ray_session(s3_server, gcs_server, tmp_path_factory):
    """One local Ray cluster of 2 logical CPUs for the whole test session."""
    import ray

    from pipeline.cli import connect_ray

    connect_ray(
        num_cpus=2,
        dashboard=False,
        log_to_driver=False,
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_local(ray_session):
    """The ``ray`` module, connected to the session's cluster (the actor tests' name for it)."""
    return ray_session
