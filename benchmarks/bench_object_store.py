"""Object storage against local disk, in one run: extraction into an S3 endpoint and `distill --data stream` from it.

The S3 endpoint is moto's server in its own process on 127.0.0.1 (the code talks S3 over HTTP through s3fs and
botocore, as to a cloud bucket; on a 2-core machine the server shares the cores with the job it serves). Every job
runs as the `gendd` command in a fresh process, with its own timer:

- extract: the same shards and teacher, `--out <local dir>` vs `--out s3://...`; throughput = views / wall seconds.
- stream: `gendd distill --data stream` for one epoch from local shards + cache vs the same shards + cache uploaded
  to the bucket; throughput = the epoch's images/s as the training loop reports it.

extract_ratio and stream_ratio are S3 throughput over local throughput (1.0 = object storage costs nothing).

    python benchmarks/bench_object_store.py [--samples 8192] [--views 4]
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
from benchlib import (
    fresh_dir,
    machine,
    make_parser,
    random_teacher,
    result_name,
    setup,
    synthetic_shards,
    write_results,
)

NAME = "object_store"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(port: int) -> subprocess.Popen:
    """moto's S3 server in its own process; returns once it answers."""
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("the moto S3 server did not start")


def _gendd(env: dict, *args: str) -> tuple[float, str]:
    """Run `gendd ARGS`; returns (wall seconds, output)."""
    start = time.perf_counter()
    done = subprocess.run(["gendd", *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"gendd {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


def _upload(local: Path, url: str) -> None:
    import s3fs

    s3fs.S3FileSystem().put(str(local), url, recursive=True)


def _epoch_images_per_s(out: Path) -> float:
    history = json.loads((out / "train.json").read_text())["history"]
    return float(history[-1]["images_per_s"])


def main() -> None:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8192, help="synthetic training images (32 px, 3 channels)")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1, help="stream loader workers")
    parser.add_argument(
        "--teacher",
        default="test_resnet",
        help="timm model of the random teacher (small: storage, not compute, is measured)",
    )
    args = parser.parse_args()
    device = setup(args)
    work = fresh_dir(args.work / NAME)
    index = synthetic_shards(args.work, n=args.samples, size=32, channels=3, shard_size=512, n_val=512)
    teacher = random_teacher(work / "teacher", args.teacher, index, 32, small_stem=True)
    port = _free_port()
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench"}
    env |= {"AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    env |= {"OMP_NUM_THREADS": str(args.threads)}
    os.environ.update(env)
    server = _start_server(port)
    try:
        boto3.client("s3").create_bucket(Bucket="bench")
        shards_url, cache_url = "s3://bench/shards", "s3://bench/cache"
        _upload(Path(index.root), shards_url)
        common = ["--teacher", str(teacher), "--views", str(args.views), "--batch-size", "256", "--device", "cpu"]
        common += ["--workers", "0", "--splits", "train"]
        rows = []
        for where, out in (("local", str(work / "cache")), ("s3", cache_url)):
            seconds, _ = _gendd(env, "extract", "--shards", str(index.root), "--out", out, *common)
            views = index.split("train").n * args.views
            rows.append({"job": "extract", "where": where, "seconds": seconds, "per_s": views / seconds})
        for where, shards, cache in (
            ("local", str(index.root), str(work / "cache")),
            ("s3", shards_url, cache_url),
        ):
            out = work / f"student-{where}"
            shutil.rmtree(out, ignore_errors=True)
            train = ["--student", "test_resnet", "--method", "kd", "--epochs", "1", "--batch-size", "128"]
            train += ["--data", "stream", "--workers", str(args.workers), "--device", "cpu", "--no-resume"]
            seconds, _ = _gendd(env, "distill", "--shards", shards, "--cache", cache, "--out", str(out), *train)
            rows.append({"job": "stream", "where": where, "seconds": seconds, "per_s": _epoch_images_per_s(out)})
    finally:
        server.terminate()
        server.wait(timeout=10)
    rate = {(r["job"], r["where"]): r["per_s"] for r in rows}
    summary = {
        "extract_ratio": rate[("extract", "s3")] / rate[("extract", "local")],
        "stream_ratio": rate[("stream", "s3")] / rate[("stream", "local")],
    }
    notes = [
        f"{args.samples} synthetic 32 px RGB training images in shards of 512, a random {args.teacher} teacher, K = "
        f"{args.views} views, zstd cache; students test_resnet kd, batch 128, stream mode with {args.workers} "
        "loader worker(s). Extract per_s = views per wall second of the whole command (process start, teacher load "
        "and store creation included); stream per_s = the epoch's images/s.",
        "The S3 endpoint is moto's server on 127.0.0.1 in its own process, sharing this machine's cores: a cloud "
        "bucket adds network latency and bandwidth limits instead of CPU contention.",
    ]
    write_results(args.out, result_name(NAME, args), machine(device), {"throughput": rows}, summary, notes)


if __name__ == "__main__":
    main()
