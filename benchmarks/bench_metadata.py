"""Per-process memory of a split's per-sample metadata (keys and labels) at ImageNet scale, without any image.

Builds the metadata of a synthetic split of N samples (keys "train-0001234", 1000 classes): an index.json with its
keys files (as `gendd prepare` writes them) over shards that do not exist, and a Zarr feature cache made through
`FeatureCacheWriter.open` with a 1-d feature, 1 view and no chunk data. A fresh process then opens them the way a
training reader does (`open_cache` + the shards' `keys_and_labels`, both kept) and reports the growth of its memory:
PSS (what this process costs the machine), RSS, the peak (transient objects included), and the bytes of the keys
and labels themselves (the rest of the growth is heap that decoding freed and glibc keeps for reuse). A forked child,
like a loader worker, then compares the two key sets slice by slice (as `_Shards.read` does per shard) and reports
the memory it had to copy (private dirty pages: 0 when the parent's pages stay shared).

  python benchmarks/bench_metadata.py               # N = 1281167 (ImageNet-1k train)
  python benchmarks/bench_metadata.py 100000 --work /tmp/meta
  PYTHONPATH=<other checkout> python benchmarks/bench_metadata.py --measure-only    # another gendd, same data
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_TRAIN = 1_281_167
SHARD = 1000

# Run in a fresh interpreter: numbers from /proc/self/smaps_rollup (kB) before and after opening, and in a fork.
MEASURE = r"""
import gc, json, os, resource, sys, time
import numpy as np
from pipeline.shards import load_index
from pipeline.store import open_cache

def rollup():
    fields = {}
    with open("/proc/self/smaps_rollup") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1])
    return fields

shards_dir, cache_dir = sys.argv[1], sys.argv[2]
index = load_index(shards_dir)
shard_set = index.split("train")
gc.collect()
before, started = rollup(), time.perf_counter()
cache = open_cache(cache_dir, "train", allow_incomplete=True)
keys, labels = shard_set.keys_and_labels()
seconds = time.perf_counter() - started
gc.collect()
after = rollup()
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before["Rss"]

def held(x):  # bytes of a numpy array, or of a list and the objects in it
    return x.nbytes if isinstance(x, np.ndarray) else sys.getsizeof(x) + sum(map(sys.getsizeof, x))

arrays_kb = sum(held(x) for x in (cache.keys, cache.labels, keys, labels)) // 1024

read, write = os.pipe()
pid = os.fork()
if pid == 0:  # a loader worker: compare the keys shard by shard, as the stream reader does
    os.close(read)
    start = rollup()["Private_Dirty"]
    same = True
    for s in range(0, len(keys), 1000):
        same &= list(cache.keys[s : s + 1000]) == list(keys[s : s + 1000])
    copied = rollup()["Private_Dirty"] - start
    os.write(write, json.dumps({"copied_kb": copied, "same": bool(same)}).encode())
    os._exit(0)
os.close(write)
child = json.loads(os.read(read, 1 << 16))
os.waitpid(pid, 0)
print(json.dumps({
    "n": len(keys),
    "pss_kb": after["Pss"] - before["Pss"],
    "rss_kb": after["Rss"] - before["Rss"],
    "peak_kb": peak_kb,
    "held_kb": arrays_kb,
    "open_s": seconds,
    "worker_copied_kb": child["copied_kb"],
    "keys_match": child["same"],
    "keys_type": type(cache.keys).__name__ + ("" if isinstance(cache.keys, list) else f" {cache.keys.dtype}"),
}))
"""


def build(work: Path, n: int) -> tuple[Path, Path]:
    """The shards' index.json + keys files and the cache's Zarr store for N samples (no shard, no chunk data)."""
    from pipeline.cache.meta import CacheMeta
    from pipeline.cache.store import FeatureCacheWriter
    from pipeline.data.prepare import write_keys_files
    from pipeline.data.shards import INDEX

    shards, cache = work / "shards", work / "cache"
    if (shards / INDEX).is_file() and (cache / "train.zarr" / "zarr.json").is_file():
        return shards, cache
    shards.mkdir(parents=True, exist_ok=True)
    keys = [f"train-{i:07d}" for i in range(n)]
    labels = (np.arange(n) % 1000).tolist()
    fields, _ = write_keys_files(shards, "train", keys, labels)
    counts = [min(SHARD, n - s) for s in range(0, n, SHARD)]
    entry = {"shards": [f"train-{i:06d}.tar" for i in range(len(counts))], "counts": counts}
    entry |= {"starts": list(range(0, n, SHARD)), "n": n} | fields
    spec = {"name": "metadata-bench", "labeled": True, "num_classes": 1000, "image_size": 8, "channels": 3}
    record = {"spec": spec, "spec_hash": "bench", "shard_size": SHARD, "max_samples": None, "splits": {"train": entry}}
    (shards / INDEX).write_text(json.dumps(record))
    teacher = {"name": "none", "checkpoint_sha256": "0" * 64, "feature_dim": 1, "num_classes": 1000}
    teacher |= {"input_size": 8, "mean": [0.5], "std": [0.25]}
    dataset = {"name": "metadata-bench", "spec_hash": "bench", "split": "train", "n": n}
    meta = CacheMeta(teacher=teacher, dataset=dataset, views={"K": 1, "policy": {"kind": "none"}, "seed": 0})
    head = {"head_weight": np.zeros((1000, 1), np.float32), "head_bias": np.zeros(1000, np.float32)}
    FeatureCacheWriter.open(cache, "train", meta, chunk_size=SHARD, keys=keys, labels=np.asarray(labels), **head)
    return shards, cache


def measure(shards: Path, cache: Path) -> dict:
    """Open the metadata in a fresh interpreter (the gendd on PYTHONPATH); its memory growth in MB (10^6 bytes)."""
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)  # a PYTHONPATH gendd first
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(shards), str(cache)],
        capture_output=True,
        text=True,
        check=True,
        cwd=shards,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path},
    )
    raw = json.loads(done.stdout.strip().splitlines()[-1])
    mb = {k.removesuffix("_kb") + "_mb": round(v * 1024 / 1e6, 1) for k, v in raw.items() if k.endswith("_kb")}
    return {
        "n": raw["n"],
        "metadata_mb_per_process": mb["pss_mb"],
        "rss_mb": mb["rss_mb"],
        "peak_mb": mb["peak_mb"],
        "objects_mb": mb["held_mb"],  # the keys and labels themselves; the rest of the growth is freed C heap
        "worker_copied_mb": mb["worker_copied_mb"],
        "open_s": round(raw["open_s"], 2),
        "keys": raw["keys_type"],
        "keys_match": raw["keys_match"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=IMAGENET_TRAIN, help="samples in the split")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gendd-bench/metadata"), help="scratch folder")
    parser.add_argument("--measure-only", action="store_true", help="measure data already built in --work")
    args = parser.parse_args()
    work = args.work / str(args.n)
    shards, cache = (work / "shards", work / "cache") if args.measure_only else build(work, args.n)
    print(json.dumps(measure(shards, cache)))


if __name__ == "__main__":
    main()
