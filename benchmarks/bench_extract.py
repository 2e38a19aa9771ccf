"""Extraction efficiency: `extract` end to end (decode, views, teacher, compress, write Zarr) over bare forwards.

For each teacher, in one process and alternating, best of `--repeats`:
- bare: the teacher (`TeacherRunner`: apply_views + features + head) over the same flattened (sample, view) batches,
  images pre-decoded on the device, views precomputed, nothing written;
- extract: `pipeline.extract.extract` on the train split into a fresh store (whole call: accelerator, teacher load,
  key scan, store creation, every chunk, finalize), and its own loop throughput (`views_per_s`, chunks only).
Then one instrumented run attributes the time: every library step that extraction calls is wrapped with a timer
(main thread: key scan, store open, view sampling, teacher chunks, waits; side threads: PNG decode, encode + write);
with `--cprofile` a further run lists the main thread's top functions.

  python benchmarks/bench_extract.py                       # digits, test_resnet and resnet18, K=8 (CPU, ~1 min)
  python benchmarks/bench_extract.py --device cuda --data synthetic --n 20000 --image-size 32 --channels 3 \
      --teachers resnet18 resnet50 --batch 512
"""

from __future__ import annotations

import cProfile
import pstats
import threading
import time
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch
from benchlib import (
    digits_shards,
    fresh_dir,
    machine,
    make_parser,
    random_teacher,
    result_name,
    setup,
    synthetic_shards,
    timed,
    write_results,
)

import pipeline.cache.store as store_mod
import pipeline.data.shards as shards_mod
import pipeline.data.views as views_mod
import pipeline.extract.extract as extract_mod
from pipeline.config import ExtractConfig, ViewPolicy
from pipeline.data.shards import ShardIndex, ShardSet, load_split
from pipeline.data.views import sample_views
from pipeline.extract.extract import TeacherRunner, decode_workers, extract

NAME = "extract"


def bare_forward(runner: TeacherRunner, images: torch.Tensor, views: torch.Tensor, k: int, batch: int) -> None:
    """The teacher over every (sample, view) pair in the batches `_run_chunk` forms, outputs kept on the device."""
    rows = torch.arange(len(views), device=images.device) // k  # pair p -> sample p // K, as extraction does
    for start in range(0, len(views), batch):
        runner(images[rows[start : start + batch]], views[start : start + batch])


class StepTimer:
    """Wraps library functions with wall-clock accumulators (thread-safe), to attribute one extraction's time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def wrap(self, label: str, fn):
        def timed_fn(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.seconds[label] += time.perf_counter() - started
                    self.calls[label] += 1

        return timed_fn


def attribute_time(cfg: ExtractConfig, device: torch.device, bare_s: float) -> list[dict]:
    """One extraction with every library step it calls timed: where the time goes, per view and as a share."""
    timer = StepTimer()
    cls = store_mod.FeatureCacheWriter
    patches = [
        (extract_mod, "TeacherRunner", "teacher load (main)"),
        (ShardSet, "keys_and_labels", "split keys/labels: keys file, or a scan of old shards (main)"),
        (cls, "open", "store create/open (main)"),
        (views_mod, "sample_views", "view sampling (reader thread)"),
        (extract_mod, "_run_chunk", "teacher chunks: forwards + host copy (main)"),
        (cls, "finalize", "finalize (main)"),
        (shards_mod, "read_shard", "tar read + PNG decode (reader thread)"),
        (cls, "write_chunk", "encode + compress + write chunk (saver thread)"),
        (store_mod, "encode_chunk", "  of which encode to float16/bf16/int8 (saver thread)"),
    ]
    cfg = replace(cfg, workers=0)  # one reader thread: timers cannot follow work into decode processes
    fresh_dir(cfg.out)
    with ExitStack() as stack:
        for owner, attr, label in patches:
            stack.enter_context(mock.patch.object(owner, attr, timer.wrap(label, getattr(owner, attr))))
        seconds, results = timed(lambda: extract(cfg), device)
    views, loop = results[0]["views"], results[0]["seconds"]
    main_busy = sum(timer.seconds[p[2]] for p in patches if p[1] == "_run_chunk")
    rows = [{"step": "extract() call (main)", "seconds": seconds, "calls": 1}]
    rows.append({"step": "  of which chunk loop (main)", "seconds": loop, "calls": 1})
    rows.append({"step": "  loop minus teacher chunks: waits, tqdm", "seconds": loop - main_busy, "calls": 1})
    rows += [{"step": label, "seconds": timer.seconds[label], "calls": timer.calls[label]} for _, _, label in patches]
    rows.append({"step": "bare teacher forward (reference, best)", "seconds": bare_s, "calls": 1})
    for row in rows:
        row["us_per_view"] = 1e6 * row["seconds"] / views
        row["share_of_extract"] = row["seconds"] / seconds
        row["alone_views_per_s"] = views / row["seconds"] if row["seconds"] > 0 else float("inf")
    return rows


def main_thread_profile(cfg: ExtractConfig, device: torch.device, top: int = 12) -> list[dict]:
    """cProfile of one extraction (main thread only: the reader and saver threads are not seen)."""
    fresh_dir(cfg.out)
    profiler = cProfile.Profile()
    profiler.enable()
    timed(lambda: extract(cfg), device)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    ranked = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]  # by own (tottime) seconds
    return [
        {"function": f"{Path(f).name}:{line}({fn})", "tottime_s": st[2], "cumtime_s": st[3], "calls": st[1]}
        for (f, line, fn), st in ranked
    ]


def measure(args, index: ShardIndex, teacher_name: str, device: torch.device) -> tuple[dict, list[dict], list[dict]]:
    """Bare forward vs extract for one teacher, best of `--repeats`, alternating."""
    size = int(index.spec["image_size"])
    input_size = args.input_size or size
    small_stem = input_size <= 64
    tdir = random_teacher(
        args.work / "teachers" / f"{index.spec['name']}-{teacher_name}-{input_size}",
        teacher_name,
        index,
        input_size,
        small_stem,
    )
    out = args.work / f"extract-cache-{teacher_name}"
    cfg = ExtractConfig(
        index.root,
        tdir,
        out,
        ("train",),
        args.views,
        batch_size=args.batch,
        codec=args.codec,
        mixed_precision=args.mixed_precision,
        cpu=device.type == "cpu",
        workers=args.workers,
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    runner = TeacherRunner(tdir, device, dtype)
    data = load_split(index.split("train"))
    images = data.images.to(device)
    views = torch.from_numpy(sample_views(data.keys, args.views, ViewPolicy(), cfg.seed, size).reshape(-1, 5))
    views = views.to(device)
    n_views = len(views)
    bare_forward(runner, images, views[: args.batch * 2], args.views, args.batch)  # warm-up (allocator, kernels)
    bare_s, e2e_s, loop_vps, steady_vps, first_s = [], [], [], [], []
    for _ in range(args.repeats):
        bare_s.append(timed(lambda: bare_forward(runner, images, views, args.views, args.batch), device)[0])
        fresh_dir(out)
        seconds, results = timed(lambda: extract(cfg), device)
        e2e_s.append(seconds)
        loop_vps.append(results[0]["views_per_s"])
        steady_vps.append(results[0]["steady_views_per_s"] or float("nan"))
        first_s.append(results[0]["first_chunk_s"])
    bare_vps, e2e_vps = n_views / min(bare_s), n_views / min(e2e_s)
    row = {
        "teacher": teacher_name,
        "D_T": runner.card["feature_dim"],
        "N": len(data.keys),
        "K": args.views,
        "decode_workers": decode_workers(args.workers),
        "views": n_views,
        "bare_views_per_s": bare_vps,
        "extract_views_per_s": e2e_vps,
        "extract_loop_views_per_s": max(loop_vps),
        "ratio_end_to_end": e2e_vps / bare_vps,
        "ratio_loop": max(loop_vps) / bare_vps,
        "first_chunk_s": min(first_s),
        "ratio_after_first_chunk": max(steady_vps) / bare_vps,
        "fixed_setup_s": min(e2e_s) - n_views / max(loop_vps),
    }
    steps = attribute_time(cfg, device, min(bare_s))
    chunks = next(r["seconds"] for r in steps if r["step"].startswith("teacher chunks"))
    row["teacher_slowdown_in_extract"] = chunks / min(bare_s)
    profile = main_thread_profile(cfg, device) if args.cprofile else []
    return row, steps, profile


def main() -> None:
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=("digits", "synthetic"), default="digits")
    parser.add_argument("--n", type=int, default=2000, help="synthetic: train samples")
    parser.add_argument("--image-size", type=int, default=32, help="synthetic: stored image size")
    parser.add_argument("--channels", type=int, default=1, choices=(1, 3), help="synthetic: channels")
    parser.add_argument("--input-size", type=int, default=0, help="teacher input size (0: the image size)")
    parser.add_argument("--teachers", nargs="+", default=["test_resnet", "resnet18"])
    parser.add_argument("--views", type=int, default=8, help="K views per sample (params.yaml: 8)")
    parser.add_argument("--batch", type=int, default=512, help="(sample, view) pairs per forward (params.yaml: 512)")
    parser.add_argument("--shard-size", type=int, default=256, help="samples per shard = per cache chunk")
    parser.add_argument("--codec", default="zstd")
    parser.add_argument("--workers", type=int, default=-1, help="shard-decode processes (-1 auto, 0 one thread)")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cprofile", action="store_true", help="add a cProfile run (main thread)")
    args = parser.parse_args()
    device = setup(args)
    if args.data == "digits":
        index = digits_shards(args.work, args.shard_size)
    else:
        index = synthetic_shards(args.work, args.n, args.image_size, args.channels, args.shard_size)
    rows, tables = [], {}
    for name in args.teachers:
        row, steps, profile = measure(args, index, name, device)
        rows.append(row)
        print(
            f"{name}: bare {row['bare_views_per_s']:.0f} views/s, extract {row['extract_views_per_s']:.0f} "
            f"(loop {row['extract_loop_views_per_s']:.0f}), ratio {row['ratio_end_to_end']:.3f} "
            f"(loop {row['ratio_loop']:.3f}, after the first chunk {row['ratio_after_first_chunk']:.3f}; "
            f"first chunk {row['first_chunk_s']:.2f} s)"
        )
        tables[f"time attribution, {name} (one instrumented run, one reader thread)"] = steps
        tables[f"cProfile main thread, {name} (top by own time)"] = profile
    tables = {"extract vs bare teacher forward": rows, **tables}
    summary = {f"ratio end-to-end ({r['teacher']})": r["ratio_end_to_end"] for r in rows}
    summary |= {f"ratio chunk loop ({r['teacher']})": r["ratio_loop"] for r in rows}
    summary |= {f"ratio after the first chunk ({r['teacher']})": r["ratio_after_first_chunk"] for r in rows}
    summary |= {f"teacher slowdown inside extract ({r['teacher']})": r["teacher_slowdown_in_extract"] for r in rows}
    summary["target"] = "ratio >= 0.90"
    notes = [
        f"data {index.spec['name']} train split ({rows[0]['N']} samples, shards of {args.shard_size}); "
        f"K={args.views}, batch {args.batch} pairs, codec {args.codec}, mixed precision {args.mixed_precision}, "
        f"best of {args.repeats}, bare and extract alternating in one process.",
        "ratio end-to-end: whole extract() call (accelerator, teacher load, key scan, store creation, chunks, "
        "finalize) over the bare forward; ratio chunk loop: extract_split's own views/s (chunks only); ratio after "
        "the first chunk: the loop's views/s once the pipeline is full (decoders started, first shard decoded), "
        "what a long extraction converges to; first_chunk_s: the loop's time to its first chunk.",
        "bare forward: TeacherRunner (apply_views + features + head) on pre-decoded images already on the device, "
        "same (sample, view) batches, no I/O.",
        "random-weight teachers (pretrained=False); teacher speed does not depend on the weights.",
        "time attribution: each step's own wall time in one extraction (side threads overlap the main thread); "
        "alone_views_per_s = the rate that step alone would sustain; teacher slowdown = teacher chunks inside "
        "extract over the bare forward (contention with the reader/saver threads for cores and the GIL).",
    ]
    write_results(args.out, result_name(NAME, args), machine(device), tables, summary, notes)


if __name__ == "__main__":
    main()
