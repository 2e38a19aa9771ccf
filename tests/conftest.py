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
