"""Streaming: peak memory of `gendd distill` against the dataset size, and its throughput, --data stream vs memory.

For each size (1x/4x/16x samples by default) the benchmark makes synthetic 3-channel image shards (train split only:
no per-epoch evaluation, so training alone is measured) and a feature cache aligned with them, written directly with
`FeatureCacheWriter` (K views from the rrc policy, ReLU-like float features, zstd). Then every (size, mode) runs the
real CLI, `python -m stages.app distill ... --data MODE`, in a fresh process, one run at a time, while this process
polls the run's process tree (the main process and its DataLoader workers) every --poll seconds: the sum of RSS
(shared pages counted in every process), the main process's own peak RSS (VmHWM), and the sum of PSS
(`/proc/<pid>/smaps_rollup`; pages shared copy-on-write by forked workers are split fairly, counted once; read less
often, see `_Trace`). Throughput is the last epoch's images/s from `<out>/train.json` (the first epoch includes
start-up). Streaming reads one shard and its cache chunk at a time through a bounded shuffle buffer (4096 samples by
default: below that size the buffer holds the whole split), so its peak should stay flat while the memory mode's
grows with N. Use at least 2 epochs: the second shows the steady state of the persistent loader workers.

  # results/streaming_cpu_256px.*: the data dominates the memory mode (1.46 GiB of images at 8000 samples)
  python benchmarks/bench_streaming.py --sizes 500 2000 8000 --image-size 256 --input-size 16 --shuffle-buffer 256 \
      --tag 256px
  python benchmarks/bench_streaming.py                            # 1000 / 4000 / 16000 samples, 64 px, D_T=2048
  python benchmarks/bench_streaming.py --sizes 200 400 --work /tmp/bs-tiny --tag tiny --out /tmp/bs-tiny-results
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from benchlib import (
    ROOT,
    _write_idx,
    fresh_dir,
    machine,
    make_parser,
    result_name,
    setup,
    synthetic_images,
    write_results,
)

from pipeline.cache.meta import CacheMeta
from pipeline.cache.store import FeatureCacheWriter
from pipeline.config import ViewPolicy
from pipeline.data.prepare import prepare_shards
from pipeline.data.shards import ShardIndex
from pipeline.data.specs import load_spec
from pipeline.data.views import sample_views

NAME = "streaming"
MODES = ("memory", "stream")
MIB = 2**20


# ---- data -----------------------------------------------------------------------------------------------------


def image_shards(work: Path, n: int, size: int, shard_size: int, seed: int) -> ShardIndex:
    """n synthetic RGB images (10 classes), train split only, as image shards; reused when already complete."""
    name = f"stream-n{n}-s{size}-c3-sh{shard_size}"
    root = work / name
    if (root / "shards" / "index.json").is_file():
        index, _ = prepare_shards(load_spec(root / "spec.yaml"), root / "shards", shard_size=shard_size)
        return index
    raw = fresh_dir(root / "raw")
    rgb = np.stack([synthetic_images(n, size, seed + 7919 * c) for c in range(3)], axis=-1)  # (N, H, W, 3)
    _write_idx(raw / "train-images-idx3-ubyte", rgb)
    _write_idx(raw / "train-labels-idx1-ubyte", np.random.default_rng(seed).integers(0, 10, n).astype(np.uint8))
    spec = (
        f"name: {name}\nsource: idx\npath: {raw}\nsplits: {{train: train}}\nnum_classes: 10\nimage_size: {size}\n"
        "channels: 3\nmean: [0.45, 0.45, 0.45]\nstd: [0.25, 0.25, 0.25]\nlabeled: true\n"
    )
    (root / "spec.yaml").write_text(spec)
    index, _ = prepare_shards(load_spec(root / "spec.yaml"), root / "shards", shard_size=shard_size)
    return index


def feature_cache(index: ShardIndex, root: Path, args) -> Path:
    """A zstd cache aligned chunk for shard with `index`'s train split: K rrc views, ReLU-like features (reused)."""
    settings = {"spec_hash": index.spec_hash, "K": args.views, "D": args.feature_dim, "input": args.input_size}
    settings |= {"seed": args.seed, "chunk_size": index.shard_size}
    marker = root / "bench.json"
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return root
    fresh_dir(root)
    keys, labels = index.split("train").keys_and_labels()
    n, c, d, k = len(keys), int(index.spec["num_classes"]), args.feature_dim, args.views
    teacher = {"name": "synthetic", "checkpoint_sha256": "0" * 64, "feature_dim": d, "num_classes": c}
    teacher |= {"input_size": args.input_size, "mean": tuple(index.spec["mean"]), "std": tuple(index.spec["std"])}
    meta = CacheMeta(
        teacher=teacher,
        dataset={"name": index.spec["name"], "spec_hash": index.spec_hash, "split": "train", "n": n},
        views={"K": k, "policy": ViewPolicy().to_dict(), "seed": args.seed},
        codec="zstd",
    )
    rng = np.random.default_rng(args.seed)
    writer = FeatureCacheWriter.open(
        root,
        "train",
        meta,
        chunk_size=index.shard_size,
        keys=keys,
        labels=np.asarray(labels),
        head_weight=rng.standard_normal((c, d)).astype(np.float32),
        head_bias=np.zeros(c, np.float32),
        fmt="zarr",
    )
    for i in range(writer.n_chunks):
        start, stop = i * index.shard_size, min(n, (i + 1) * index.shard_size)
        features = np.abs(rng.standard_normal((stop - start, k, d), dtype=np.float32))  # post-ReLU-like, >= 0
        logits = rng.standard_normal((stop - start, k, c), dtype=np.float32) * 3
        chunk_keys = np.strings.decode(keys[start:stop]).tolist()  # views are seeded by the key as str
        views = sample_views(chunk_keys, k, ViewPolicy(), args.seed, int(index.spec["image_size"]))
        writer.write_chunk(i, features, logits, views)
    if not writer.finalize():
        raise SystemExit(f"{root}: the cache is incomplete after writing every chunk")
    marker.write_text(json.dumps(settings))
    return root


# ---- one measured run -----------------------------------------------------------------------------------------


def _pss_kib(pid: int) -> int:
    """PSS of one process (KiB), 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _hwm_kib(pid: int) -> int:
    """Peak RSS (VmHWM, KiB) of one process so far, 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class _Trace:
    """What the polls of one run saw: peaks of the process tree, before and during training, CPU seconds per process.

    RSS, VmHWM and CPU times are cheap and read at every poll. PSS is not (smaps_rollup walks the page tables: ~50 ms
    for a 2 GB trainer here), so it is read when the tree's RSS reaches a new high (+2%) and otherwise at intervals
    that keep its cost under `pss_share` of one core: a 10 Hz PSS poll would take ~30% of a core from the run.
    """

    def __init__(self, pid: int, log: Path, pss_share: float) -> None:
        self.main, self.log, self.started = psutil.Process(pid), log, time.perf_counter()
        self.pss_share = pss_share
        self.peak = {"pss": 0, "rss": 0, "procs": 0, "hwm": 0}
        self.pss_before_train = 0  # KiB: the peak up to the first training step (loading, target statistics)
        self.train_at: float | None = None  # seconds from the start to the first progress line of epoch 1
        self.cpu: dict[int, float] = {}  # pid -> user + system seconds at its last poll
        self.timeline: list[tuple[float, float, float, int]] = []  # (s, tree PSS MiB, tree RSS MiB, processes)
        self.rss_mark, self.pss_due = 0, 0.0

    def poll(self) -> None:
        """One reading of the tree: RSS, VmHWM and CPU times; PSS when the tree grew or a reading is due."""
        try:
            tree = [self.main, *self.main.children(recursive=True)]
        except psutil.Error:
            return
        rss, alive = 0, []
        for proc in tree:
            try:
                rss += proc.memory_info().rss // 1024
                times = proc.cpu_times()
            except psutil.Error:
                continue
            self.cpu[proc.pid] = times.user + times.system
            alive.append(proc.pid)
        now = {"rss": rss, "procs": len(alive), "hwm": _hwm_kib(self.main.pid)}
        self.peak |= {key: max(self.peak[key], value) for key, value in now.items()}  # VmHWM is itself a peak
        at = time.perf_counter() - self.started
        if self.train_at is None and "epoch 1/" in self.log.read_text(errors="replace"):
            self.train_at = at
        if rss > 1.02 * self.rss_mark or at >= self.pss_due:
            self.rss_mark = max(self.rss_mark, rss)
            self._read_pss(alive, rss, at)

    def _read_pss(self, pids: list[int], rss: int, at: float) -> None:
        cost = time.perf_counter()
        pss = sum(_pss_kib(pid) for pid in pids)
        cost = time.perf_counter() - cost
        self.pss_due = at + cost / self.pss_share
        self.peak["pss"] = max(self.peak["pss"], pss)
        if self.train_at is None:
            self.pss_before_train = max(self.pss_before_train, pss)
        self.timeline.append((round(at, 2), round(pss / 1024, 1), round(rss / 1024, 1), len(pids)))

    def figures(self) -> dict:
        """The row fields of this trace (MiB, seconds)."""
        worst = max(self.timeline, key=lambda point: point[1], default=(0.0, 0.0, 0))
        return {
            "tree_pss_peak_mib": self.peak["pss"] / 1024,
            "tree_rss_sum_peak_mib": self.peak["rss"] / 1024,
            "main_maxrss_mib": self.peak["hwm"] / 1024,
            "pss_peak_before_training_mib": self.pss_before_train / 1024,
            "pss_peak_at_s": worst[0],
            "training_starts_at_s": self.train_at,
            "processes_max": self.peak["procs"],
            "pss_readings": len(self.timeline),
            "cpu_s_main": self.cpu.get(self.main.pid, 0.0),
            "cpu_s_workers": sum(v for pid, v in self.cpu.items() if pid != self.main.pid),
        }


def distill_command(args, shards: Path, cache: Path, out: Path, mode: str) -> list[str]:
    """The CLI call measured for one (size, mode)."""
    command = [sys.executable, "-m", "stages.app", "distill", "--shards", str(shards), "--cache", str(cache)]
    command += ["--out", str(out), "--student", args.student, "--method", "gendd", "--epochs", str(args.epochs)]
    command += ["--batch-size", str(args.batch_size), "--data", mode, "--no-resume"]
    command += ["--device", "cpu"] if args.device == "cpu" else []  # --device cuda: distill takes the GPU
    command += ["--token-dim", "64", "--head-width", str(args.head_width), "--diffusion-batch-mul", "2"]
    return [*command, "--workers", str(args.workers), "--shuffle-buffer", str(args.shuffle_buffer)]


def measure(args, command: list[str], out: Path) -> dict:
    """Run `command` in a fresh process, polling its tree's memory; peaks, wall time and the epochs' throughput."""
    fresh_dir(out)
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    load_before = os.getloadavg()[0]
    with (out / "distill.log").open("w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        trace = _Trace(proc.pid, out / "distill.log", args.pss_cpu_share)
        cpu = time.process_time()
        while proc.poll() is None:
            trace.poll()
            time.sleep(args.poll)
        poll_cpu = time.process_time() - cpu  # what the polls took from the 2 cores the run shares
    wall = time.perf_counter() - trace.started
    text = (out / "distill.log").read_text(errors="replace")
    if proc.returncode:
        raise SystemExit(f"distill failed ({proc.returncode}): {' '.join(command)}\n{text[-3000:]}")
    (out / "memory_timeline.json").write_text(json.dumps(trace.timeline))
    history = json.loads((out / "train.json").read_text())["history"]
    return trace.figures() | {
        "images_per_s_epochs": [round(r["images_per_s"], 1) for r in history],
        "seconds_epochs": [round(r["seconds"], 2) for r in history],
        "images_per_s_last": history[-1]["images_per_s"],
        "wall_s": wall,
        "poll_cpu_s": poll_cpu,
        "loadavg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "data_line": next((line for line in text.splitlines() if line.startswith("data: ")), ""),
    }


# ---- results --------------------------------------------------------------------------------------------------


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Peak memory (MiB) of the process tree against the dataset size, one line per mode, log-x."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the table is the result; the plot is a convenience
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for color, mode in zip(("C0", "C1"), MODES, strict=True):
        mine = [r for r in rows if r["mode"] == mode]
        sizes = [r["samples"] for r in mine]
        ax.plot(sizes, [r["tree_pss_peak_mib"] for r in mine], c=color, marker="o", label=f"{mode}: process tree (PSS)")
        main_rss = [r["main_maxrss_mib"] for r in mine]
        ax.plot(sizes, main_rss, c=color, ls=":", marker=".", label=f"{mode}: main process peak RSS")
    ax.set_xscale("log")
    sizes = sorted({r["samples"] for r in rows})
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("training samples")
    ax.set_ylabel("peak memory (MiB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ratios(rows: list[dict]) -> dict:
    """The figures the targets are about, from this run's rows: memory growth per mode and stream/memory speed."""
    by = {(r["mode"], r["samples"]): r for r in rows}
    small, large = min(r["samples"] for r in rows), max(r["samples"] for r in rows)

    def growth(mode: str, key: str = "tree_pss_peak_mib") -> float:
        return by[(mode, large)][key] / by[(mode, small)][key]

    return {
        "size_ratio": large / small,
        "rss_ratio": growth("stream"),
        "rss_ratio_memory": growth("memory"),
        "throughput_ratio": by[("stream", large)]["images_per_s_last"] / by[("memory", large)]["images_per_s_last"],
        "rss_ratio_rss_sum": growth("stream", "tree_rss_sum_peak_mib"),
        "rss_ratio_main_maxrss": growth("stream", "main_maxrss_mib"),
        "rss_ratio_memory_main_maxrss": growth("memory", "main_maxrss_mib"),
    }


def parse_args():
    """The benchmark's options (benchlib's common ones plus data, student and polling settings)."""
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000], help="training samples")
    parser.add_argument("--image-size", type=int, default=64, help="stored image side (px)")
    parser.add_argument("--shard-size", type=int, default=500, help="samples per shard (= cache chunk)")
    parser.add_argument("--views", type=int, default=4, help="cached views per sample (K)")
    parser.add_argument("--feature-dim", type=int, default=2048, help="teacher feature dimension (D_T)")
    parser.add_argument("--input-size", type=int, default=32, help="the teacher's (hence the student's) input size")
    parser.add_argument("--student", default="test_resnet")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--head-width", type=int, default=256)
    parser.add_argument("--workers", type=int, default=-1, help="stream loader processes (-1: distill's auto)")
    parser.add_argument("--shuffle-buffer", type=int, default=4096)
    parser.add_argument("--poll", type=float, default=0.1, help="seconds between memory readings")
    parser.add_argument("--pss-cpu-share", type=float, default=0.05, help="PSS readings' budget (share of one core)")
    return parser.parse_args()


def run_all(args) -> list[dict]:
    """Data per size (made once), then one measured distill run per (size, mode), one at a time."""
    rows = []
    for n in sorted(args.sizes):
        index = image_shards(args.work, n, args.image_size, args.shard_size, args.seed)
        cache = feature_cache(index, index.root.parent / f"cache-k{args.views}-d{args.feature_dim}", args)
        for mode in MODES:
            command = distill_command(args, index.root, cache, args.work / "runs" / f"n{n}-{mode}", mode)
            row = {"mode": mode, "samples": n, **measure(args, command, args.work / "runs" / f"n{n}-{mode}")}
            rows.append(row)
            print(
                f"N={n} {mode}: tree PSS peak {row['tree_pss_peak_mib']:.0f} MiB (RSS sum "
                f"{row['tree_rss_sum_peak_mib']:.0f}, main {row['main_maxrss_mib']:.0f}), "
                f"{row['images_per_s_epochs']} images/s per epoch, {row['wall_s']:.1f} s",
                flush=True,
            )
    return rows


def notes_for(args) -> list[str]:
    """What the result files' columns mean and how the data was made."""
    return [
        f"synthetic {args.image_size}-px RGB images in shards of {args.shard_size} (train split only), a zstd cache "
        f"aligned with them: K={args.views} rrc views, D_T={args.feature_dim} float features |N(0,1)|, 10 logits; "
        f"student {args.student} at {args.input_size} px, gendd, {args.epochs} epochs, batch {args.batch_size}, "
        f"OMP_NUM_THREADS={args.threads}; one fresh process per run, runs one at a time.",
        "tree_pss_peak_mib: peak over the polls of the summed PSS of distill and its loader workers (shared pages "
        "split between the processes sharing them); tree_rss_sum_peak_mib: the same with RSS (shared pages counted "
        "in each process); main_maxrss_mib: the main process's VmHWM. images_per_s_last: the last epoch's. PSS is "
        f"read when the tree's RSS reaches a new high and otherwise within {args.pss_cpu_share:.0%} of one core "
        "(pss_readings); poll_cpu_s: what all readings cost this process.",
        "cpu_s_main / cpu_s_workers: user + system CPU seconds of the trainer and of its loader workers (whole run); "
        "pss_peak_before_training_mib: peak up to epoch 1 (loading, target statistics); pss_peak_at_s: when the "
        "peak PSS reading was taken (seconds from the start). Every run's PSS timeline: <work>/runs/*/memory_timeline"
        ".json.",
        "rss_ratio: stream's tree PSS peak at the largest size over the smallest; rss_ratio_memory: the same for "
        "--data memory; throughput_ratio: stream / memory images/s of the last epoch at the largest size.",
    ]


def main() -> None:
    args = parse_args()
    device = setup(args)
    rows = run_all(args)
    found = ratios(rows)
    checks = {
        "rss_ratio": (found["rss_ratio"], "<=", 1.25, found["rss_ratio"] <= 1.25),
        "throughput_ratio": (found["throughput_ratio"], ">=", 0.9, found["throughput_ratio"] >= 0.9),
    }
    for key, (value, op, target, met) in checks.items():
        print(f"{key} = {value:.3f} (target {op} {target}): {'met' if met else 'MISSED'}")
    print(f"rss_ratio_memory = {found['rss_ratio_memory']:.3f} (for contrast), size_ratio = {found['size_ratio']:g}")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "work")} | {"channels": 3, "codec": "zstd"}
    settings |= {"method": "gendd", "token_dim": 64, "diffusion_batch_mul": 2, "num_classes": 10}
    summary = dict(found) | {
        f"{key} target {op} {target}": "met" if met else "missed" for key, (_, op, target, met) in checks.items()
    }
    name = result_name(NAME, args)
    extra = found | {"rows": rows, "date": datetime.datetime.now().isoformat(timespec="seconds"), "settings": settings}
    extra["command_line"] = " ".join(["python", *sys.argv])
    tables = {"peak memory and throughput per run": rows}
    write_results(args.out, name, machine(device), tables, summary, notes_for(args), extra)
    plot(rows, args.out / f"{name}.png", f"distill peak memory, {args.image_size}-px RGB, D_T={args.feature_dim}")


if __name__ == "__main__":
    main()
