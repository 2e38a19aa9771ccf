"""Scaling: extraction time and peak memory at 1x, 4x, 16x samples (synthetic 8x8 images, tiny teacher).

Each size runs `pipeline.extract.extract` in a fresh subprocess: peak resident memory (`ru_maxrss`) before the call
(imports done) and after it, so the growth is what extraction itself held at its peak; a second subprocess per size
measures the Python heap peak with tracemalloc (slower, so its time is not used). Streaming (one shard decoded and
one chunk written at a time) means time ~ linear in N and peak memory ~ flat.

  python benchmarks/bench_scaling.py                      # 500 / 2000 / 8000 samples, shards of 250, K=4
  python benchmarks/bench_scaling.py --device cuda --sizes 10000 40000 160000 --shard-size 1000 --image-size 32
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import torch
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

NAME = "scaling"


def child(args) -> None:
    """Run one extraction here and print its time and memory as one JSON line."""
    import accelerate  # noqa: F401  (imported before the baseline: extract imports it lazily)

    from pipeline.config import ExtractConfig
    from pipeline.extract.extract import extract

    torch.set_num_threads(args.threads)
    cfg = ExtractConfig(
        args.shards,
        args.teacher,
        args.cache,
        ("train",),
        args.views,
        batch_size=args.batch,
        cpu=torch.device(args.device).type == "cpu",
    )
    fresh_dir(args.cache)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.tracemalloc:
        tracemalloc.start()
    started = time.perf_counter()
    result = extract(cfg)[0]
    seconds = time.perf_counter() - started
    record = {"seconds": seconds, "views": result["views"], "loop_views_per_s": result["views_per_s"]}
    if args.tracemalloc:
        record["py_heap_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    record |= {"maxrss_before_mb": before / 1024, "maxrss_mb": after / 1024}
    print(json.dumps(record))


def spawn(args, shards: Path, teacher: Path, traced: bool) -> dict:
    """One fresh process extracting `shards`; its JSON record."""
    command = [
        sys.executable,
        __file__,
        "--child",
        "--shards",
        str(shards),
        "--teacher",
        str(teacher),
        "--cache",
        str(args.work / "scaling-cache"),
        "--views",
        str(args.views),
        "--batch",
        str(args.batch),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
    ]
    command += ["--tracemalloc"] if traced else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 8000])
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--teacher-model", default="test_resnet")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--no-tracemalloc", dest="traced", action="store_false")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tracemalloc", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--teacher", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    device = setup(args)
    rows = []
    for n in args.sizes:
        index = synthetic_shards(args.work, n, args.image_size, 1, args.shard_size)
        tag = f"{index.spec['name']}-{args.teacher_model}"
        teacher = random_teacher(args.work / "teachers" / tag, args.teacher_model, index, args.image_size, True)
        record = spawn(args, index.root, teacher, traced=False)
        if args.traced:
            record["py_heap_peak_mb"] = spawn(args, index.root, teacher, traced=True)["py_heap_peak_mb"]
        row = {"N": n, "shards": len(index.split("train").names), **record}
        row["rss_growth_mb"] = row["maxrss_mb"] - row["maxrss_before_mb"]
        row["views_per_s"] = row["views"] / row["seconds"]
        rows.append(row)
        print(
            f"N={n}: {row['seconds']:.2f}s ({row['views_per_s']:.0f} views/s), peak RSS {row['maxrss_mb']:.0f} MB "
            f"(+{row['rss_growth_mb']:.1f} MB), Python heap peak {row.get('py_heap_peak_mb', float('nan')):.1f} MB"
        )
    first = rows[0]
    for row in rows:
        row["n_ratio"] = row["N"] / first["N"]
        row["time_ratio"] = row["seconds"] / first["seconds"]
        row["us_per_view"] = 1e6 * row["seconds"] / row["views"]
    last = rows[-1]
    summary = {
        f"time ratio at {last['n_ratio']:.0f}x samples (linear = {last['n_ratio']:.0f})": last["time_ratio"],
        f"time per view at {last['n_ratio']:.0f}x over 1x (flat = 1)": last["us_per_view"] / first["us_per_view"],
        f"peak RSS growth at {last['n_ratio']:.0f}x over 1x": last["rss_growth_mb"] / max(first["rss_growth_mb"], 1e-9),
        f"peak RSS at {last['n_ratio']:.0f}x over 1x (flat = 1)": last["maxrss_mb"] / first["maxrss_mb"],
    }
    if args.traced:
        heap = last["py_heap_peak_mb"] / first["py_heap_peak_mb"]
        summary[f"Python heap peak at {last['n_ratio']:.0f}x over 1x"] = heap
        per_sample = (last["py_heap_peak_mb"] - first["py_heap_peak_mb"]) * 2**20 / (last["N"] - first["N"])
        summary["Python heap peak per extra sample (bytes; keys, labels)"] = per_sample
    notes = [
        f"synthetic {args.image_size}x{args.image_size} 1-channel images in shards of {args.shard_size}, random "
        f"{args.teacher_model} teacher (small stem), K={args.views}, batch {args.batch}, codec zstd; one fresh "
        "process per size and measurement.",
        "seconds: the whole extract() call; maxrss_before_mb: peak RSS after imports, before extract(); "
        "rss_growth_mb: what extraction added to the peak; py_heap_peak_mb: tracemalloc peak during extract() "
        "(Python allocations, numpy included; torch tensors not traced).",
    ]
    write_results(args.out, result_name(NAME, args), machine(device), {"extraction vs samples": rows}, summary, notes)


if __name__ == "__main__":
    main()
