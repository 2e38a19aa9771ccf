"""Shared fixtures: tiny data made here (the embedded digits set and synthetic arrays), never downloaded."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipeline.data.prepare import prepare_shards
from pipeline.data.shards import ShardIndex
from pipeline.data.specs import load_spec

# The test models are tiny (8-32 px), so intra-op threads gain nothing; with a core busy elsewhere, OpenMP's second
# thread made a CPU epoch up to 18x slower (measured on 2 cores). Set before torch loads: it holds here and in every
# `gendd` a test starts. An OMP_NUM_THREADS already set wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
DIGITS_SPEC = ROOT / "data_specs" / "digits.yaml"


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> ShardIndex:
    """The digits set (first 200 samples of each split) in shards of 64."""
    out = tmp_path_factory.mktemp("digits_shards")
    index, _ = prepare_shards(load_spec(DIGITS_SPEC), out, shard_size=64, max_samples=200)
    return index


@contextmanager
def serve_http(root: Path) -> Iterator[str]:
    """`python -m http.server` on 127.0.0.1 serving `root`, stopped on exit; yields its base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:  # a raw connect, not urllib: proxy settings in the environment must not matter
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the test HTTP server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


class S3Server:
    """A real S3 endpoint on 127.0.0.1 (moto's server): the code under test talks S3 over HTTP through s3fs and
    botocore as it would to a cloud bucket; the endpoint and dummy credentials are passed the standard way
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...). Its state lives in this process, so a stop and start keeps it."""

    def __init__(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one request line per call otherwise
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self._factory = lambda: ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server = self._factory()
        self._server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def bucket(self) -> str:
        """A new, empty bucket's URL."""
        import uuid

        import boto3

        name = f"gendd-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        """The endpoint goes away (connections are refused) until `start`."""
        self._server.stop()

    def start(self) -> None:
        """The endpoint comes back on the same port, with every bucket and object as it was."""
        self._server = self._factory()
        self._server.start()


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """The session's S3 server, with the environment every S3 client here (and in subprocesses) reads."""
    pytest.importorskip("moto", reason="moto[server] (the dev extra) runs the S3 tests")
    server = S3Server()
    env = {
        "AWS_ENDPOINT_URL": server.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # no probe of a cloud metadata service for credentials
        "GENDD_S3_ATTEMPTS": "3",  # an outage fails within seconds, not minutes
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield server
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
