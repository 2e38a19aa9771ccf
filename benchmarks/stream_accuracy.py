"""Memory against stream input on Fashion-MNIST: the same student, method, seed and settings trained and evaluated
with `--data memory` and with `--data stream`; both top-1s, side by side.

Uses the data of an accuracy_fmnist.py profile (its shards, teacher and cache, built here when missing) and that
profile's options for the method, so the memory row is a row of that profile's table.

    python benchmarks/stream_accuracy.py                          # cpu_lr profile, test_resnet, gendd, seed 0
    python benchmarks/stream_accuracy.py --seeds 0 1 --student test_efficientnet --method kd --parallel 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import accuracy_fmnist as acc

MODES = ("memory", "stream")


def run_mode(args: argparse.Namespace, seed: int, mode: str) -> dict:
    """Distil and evaluate with one seed and data mode (skipped when its metrics exist); its row."""
    prof = acc.PROFILES[args.profile]
    base = Path(args.root) / acc.PARTS["balanced"][0]
    run = f"{args.student}-{args.method}-s{seed}{prof.get('suffix', '')}-data-{mode}"
    extra = [
        *(prof.get("gendd", acc.HOLDOUT_TUNED) if args.method.startswith("gendd") else []),
        *prof.get("method_options", {}).get(args.method, []),
    ]
    log = Path(args.root) / "logs" / f"{run}.log"
    shards, cache = base / "shards", base / acc.cache_name(prof)
    out, ev = base / "students" / run, base / "eval" / run
    started = time.perf_counter()
    if not (ev / "details.json").is_file():
        acc.gendd(
            "distill",
            *("--shards", str(shards), "--cache", str(cache), "--out", str(out), "--student", args.student),
            *("--no-small-stem", "--method", args.method, "--epochs", str(prof["epochs"])),
            *("--batch-size", str(prof["batch"]), "--seed", str(seed), *extra, "--data", mode),
            log=log,
        )
        acc.gendd(
            "evaluate",
            *("--shards", str(shards), "--cache", str(cache), "--student-dir", str(out), "--out", str(ev)),
            *("--steps", str(prof["steps"]), "--n-samples", str(prof["n_samples"]), "--data", mode),
            log=log,
        )
    metrics = json.loads((ev / "details.json").read_text())
    history = json.loads((out / "train.json").read_text())["history"]
    return {
        "data": mode,
        "seed": seed,
        "run": run,
        "probe_top1": metrics["probe_top1"],
        "generative_top1": metrics.get("generative_top1"),
        "teacher_top1": metrics.get("teacher_top1"),
        "train_seconds": sum(h["seconds"] for h in history),
        "images_per_s_last_epoch": history[-1]["images_per_s"],
        "samples_per_epoch": history[-1].get("samples"),
        "wall_seconds_here": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(acc.PROFILES), default="cpu_lr")
    parser.add_argument("--student", default="test_resnet")
    parser.add_argument("--method", default="gendd", choices=("ce", "kd", "gendd"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--parallel", type=int, default=2, help="modes run at once (1 torch thread each when 2)")
    parser.add_argument("--data", default=None, help="Fashion-MNIST IDX directory (default: the spec's path)")
    parser.add_argument("--root", default=str(acc.ROOT / "outputs" / "bench_fmnist"))
    parser.add_argument("--results", default=str(acc.ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    prof = acc.PROFILES[args.profile]
    args.root = str(Path(args.root) / prof.get("data_from", args.profile))  # that profile's shards, teacher, cache
    acc.setup_spec(acc.PARTS["balanced"][0], prof, args.data, Path(args.root))
    if args.parallel > 1:
        os.environ["OMP_NUM_THREADS"] = "1"  # two torch jobs on shared cores: one thread each
    jobs = [(seed, mode) for seed in args.seeds for mode in MODES]
    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(lambda job: run_mode(args, *job), jobs))
    by = {(r["seed"], r["data"]): r["probe_top1"] for r in rows}
    gaps = [by[(seed, "stream")] - by[(seed, "memory")] for seed in args.seeds]
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (CPU)",
        "profile": args.profile,
        "student": args.student,
        "method": args.method,
        "seeds": args.seeds,
        "parallel_jobs": args.parallel,
        "command": "python benchmarks/stream_accuracy.py --profile "
        + f"{args.profile} --student {args.student} --method {args.method} --seeds {' '.join(map(str, args.seeds))}",
        "rows": rows,
        "probe_top1_stream_minus_memory": gaps,
        "probe_top1_stream_minus_memory_mean": sum(gaps) / len(gaps),
    }
    name = f"stream_accuracy_fmnist_{args.profile}"
    results = Path(args.results)
    (results / f"{name}.json").write_text(json.dumps(record, indent=1))
    lines = [
        f"# Fashion-MNIST, `--data memory` vs `--data stream` ({args.profile} profile)",
        "",
        f"{record['date']}, {record['machine']}, {args.parallel} jobs at once; {args.student}, {args.method}; "
        f"`{record['command']}`. Test split (t10k); train and eval seconds include the sharing of the cores.",
        "",
        "| seed | data | probe top-1 | generative top-1 | teacher top-1 | train s | img/s last epoch | samples/epoch |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        gen = "-" if r["generative_top1"] is None else f"{r['generative_top1']:.2f}"
        lines.append(
            f"| {r['seed']} | {r['data']} | {r['probe_top1']:.2f} | {gen} | {r['teacher_top1']:.2f} | "
            f"{r['train_seconds']:.0f} | {r['images_per_s_last_epoch']:.0f} | {r['samples_per_epoch']} |"
        )
    gap_text = ", ".join(f"{g:+.2f}" for g in gaps)
    lines += [
        "",
        f"Probe top-1, stream minus memory: {gap_text} (mean {record['probe_top1_stream_minus_memory_mean']:+.2f}).",
    ]
    (results / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
