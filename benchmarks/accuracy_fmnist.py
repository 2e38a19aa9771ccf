"""Accuracy benchmark on Fashion-MNIST: GenDD against KD, KL and CE; balanced, long-tailed and unlabeled.

Runs the real `gendd` CLI stage by stage (each stage resumes or skips finished work), then writes the comparison
table to benchmarks/results/accuracy_fmnist_<profile>.{md,json}. Profiles: `cpu` (a reduced run for 2 CPU cores:
a 10k-image training subset, fewer epochs) and `gpu` (the whole training set). Parts: balanced, longtail, unlabeled.

    python benchmarks/accuracy_fmnist.py --profile cpu --part all
    python benchmarks/accuracy_fmnist.py --profile gpu --part balanced --data .carry/data/fashion-mnist
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# GenDD options per profile. "cpu" keeps the settings its published table was measured with (chosen on the digits
# validation split); the others use the settings tuned on the Fashion-MNIST holdout (benchmarks/tune_gendd.py, never
# the test split; README).
DIGITS_TUNED = ["--token-dim", "64", "--head-width", "256", "--diffusion-batch-mul", "2", "--head-lr-mult", "2.5"]
HOLDOUT_TUNED = [
    *("--token-dim", "64", "--head-width", "256", "--diffusion-batch-mul", "8", "--head-lr-mult", "2.5"),
    *("--head-prediction", "v_prediction"),
]
# The profiles' committed tables were measured at lr 0.002 unless a profile's method_options say otherwise (a
# later --lr wins); gendd's own default is now each method's tuned rate.
PROFILE_LR = ["--lr", "0.002"]
PROFILES: dict[str, dict] = {
    # A dry run of the commands in a minute (not a result).
    "tiny": {
        "max_samples": 300,
        "teacher": "resnet18",
        "teacher_epochs": 1,
        "students": ["test_resnet"],
        "epochs": 1,
        "views": 2,
        "batch": 64,
        "steps": 2,
        "n_samples": 1,
    },
    # max_samples caps every split (the CPU profile keeps the full 10k test split); epochs are equal for all methods.
    "cpu": {
        "max_samples": 10000,
        "teacher": "resnet18",
        "teacher_epochs": 12,
        "students": ["test_efficientnet", "test_resnet"],
        "epochs": 10,
        "views": 8,
        "batch": 128,
        "steps": 10,
        "n_samples": 3,
        "gendd": DIGITS_TUNED,
    },
    # The whole training set; student jobs share one GPU (--parallel N). H100, third session: balanced + unlabeled
    # (10 jobs) took 478 s including prepare, teacher and extraction (benchmarks/README.md).
    "gpu": {
        "max_samples": 0,
        "teacher": "resnet18",
        "teacher_epochs": 30,
        "students": ["resnet10t", "mobilenetv3_small_050"],
        "epochs": 20,
        "views": 8,
        "batch": 256,
        "steps": 10,
        "n_samples": 5,
    },
}
# The cpu profile again with the holdout-tuned v-prediction (diffusion_batch_mul stays 2 on a CPU).
PROFILES["cpu_v"] = {**PROFILES["cpu"], "gendd": [*DIGITS_TUNED, "--head-prediction", "v_prediction"]}
# cpu_v with every method at its best learning rate on the Fashion-MNIST holdout (tune_gendd.py, test_resnet, 10
# epochs; the default 0.002 was too low for all of them). Reuses cpu_v's shards, teacher and cache; runs end in "-lr".
PROFILES["cpu_lr"] = {
    **PROFILES["cpu_v"],
    "data_from": "cpu_v",
    "suffix": "-lr",
    "method_options": {
        "ce": ["--lr", "0.016"],
        "kd": ["--lr", "0.032"],
        "kl": ["--lr", "0.016"],
        "gendd": ["--lr", "0.008"],
        "gendd_unsup": ["--lr", "0.008"],  # 0.016: 0.4 lower
    },
}
# The gpu profile with those learning rates (tuned at batch 128 on the CPU holdout; not yet run on a GPU).
PROFILES["gpu_lr"] = {
    **PROFILES["gpu"],
    "data_from": "gpu",
    "suffix": "-lr",
    "method_options": PROFILES["cpu_lr"]["method_options"],
}
PARTS = {
    "balanced": ("fashion_mnist", ["ce", "kd", "gendd"]),
    "unlabeled": ("fashion_mnist", ["kl", "gendd_unsup"]),
    "longtail": ("fashion_mnist_lt", ["ce", "kd", "gendd"]),
    # the same with logit-adjusted label cross-entropy for every method (--logit-adjust 1; README "Long-tailed data")
    "longtail_la": ("fashion_mnist_lt", ["ce", "kd", "gendd"]),
}
# distill options a part adds to every method, and the suffix its run names get
PART_OPTIONS = {"longtail_la": (["--logit-adjust", "1"], "-la1")}


EXECUTE = True


def gendd(*args: str, log: Path | None = None) -> None:
    """Run one `gendd` stage (through the module, so a host without the console script works too)."""
    if not EXECUTE:  # --report-only: tabulate what earlier runs wrote
        return
    print("+ gendd", " ".join(args), flush=True)
    if log is None:
        subprocess.run([sys.executable, "-m", "stages.app", *args], check=True, cwd=ROOT)
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle:
        subprocess.run([sys.executable, "-m", "stages.app", *args], check=True, cwd=ROOT, stdout=handle, stderr=handle)


def _tolerant(fn):
    """Run a job; a failed job is reported and leaves its row out instead of stopping the other jobs."""

    def wrapped(job):
        try:
            return fn(job)
        except subprocess.CalledProcessError as err:
            print(f"job {job} failed ({err}); see its log", flush=True)
            return None

    return wrapped


def cache_name(prof: dict) -> str:
    """The cache folder of a profile's codec: `cache` for the default (lossless zstd), `cache_<codec>` otherwise."""
    codec = prof.get("codec", "zstd")
    return "cache" if codec == "zstd" else f"cache_{codec}"


def setup_spec(spec_name: str, prof: dict, data: str | None, root: Path, teacher_args: tuple[str, ...] = ()) -> None:
    """Shards, teacher and feature cache of one data spec under root/spec_name (each stage skips finished work);
    teacher_args are extra `gendd teacher` options (e.g. --checkpoint to adopt weights instead of training)."""
    shards, teacher, cache = (root / spec_name / d for d in ("shards", "teacher", cache_name(prof)))
    source = ["--source-path", data] if data else []
    gendd(
        "prepare",
        *("--spec", f"data_specs/{spec_name}.yaml", "--out", str(shards), "--shard-size", "1000"),
        *("--max-samples", str(prof["max_samples"]), *source),
    )
    if not (teacher / "teacher.json").is_file():  # a finished teacher is kept (its checkpoint may predate new options)
        gendd(
            "teacher",
            *("--shards", str(shards), "--out", str(teacher), "--model", prof["teacher"], "--no-small-stem"),
            *("--epochs", str(prof["teacher_epochs"]), "--batch-size", str(prof["batch"]), "--policy", "rrc"),
            *PROFILE_LR,
            *teacher_args,
        )
    gendd(
        "extract",
        *("--shards", str(shards), "--teacher", str(teacher), "--out", str(cache)),
        *("--views", str(prof["views"]), "--policy", "rrc", "--codec", prof.get("codec", "zstd")),
    )


def distill_and_evaluate(
    base: Path, run: str, student: str, method: str, seed: int, extra: list[str], prof: dict, log: Path | None = None
) -> dict | None:
    """Distil and evaluate one student under base/students/<run> and base/eval/<run> (skipped when its metrics
    exist); returns the metrics (None if there are none)."""
    shards, cache = base / "shards", base / cache_name(prof)
    out, ev = base / "students" / run, base / "eval" / run
    if EXECUTE and not (ev / "details.json").is_file():
        gendd(
            "distill",
            *("--shards", str(shards), "--cache", str(cache), "--out", str(out), "--student", student),
            *("--no-small-stem", "--method", method, "--epochs", str(prof["epochs"])),
            *("--batch-size", str(prof["batch"]), "--seed", str(seed), *PROFILE_LR, *extra),
            log=log,
        )
        gendd(
            "evaluate",
            *("--shards", str(shards), "--cache", str(cache), "--student-dir", str(out), "--out", str(ev)),
            *("--steps", str(prof["steps"]), "--n-samples", str(prof["n_samples"])),
            log=log,
        )
    return json.loads((ev / "details.json").read_text()) if (ev / "details.json").is_file() else None


def run_job(job: tuple[str, str, str, int], prof: dict, root: Path, parallel: int) -> dict | None:
    """Distil and evaluate one (part, student, method, seed); returns its table row (None if it has no metrics)."""
    part, student, method, seed = job
    base, run = root / PARTS[part][0], f"{student}-{method}-s{seed}"
    if prof.get("codec", "zstd") != "zstd":  # a lossy cache: its own students next to the default cache's
        run += f"-{prof['codec']}"
    part_extra, suffix = PART_OPTIONS.get(part, ([], ""))
    run += prof.get("suffix", "") + suffix
    extra = [
        *(prof.get("gendd", HOLDOUT_TUNED) if method.startswith("gendd") else []),
        *prof.get("method_options", {}).get(method, []),
        *part_extra,
    ]
    # With several jobs at once (a GPU host: small models leave the GPU mostly idle), each job logs to a file.
    log = base / "logs" / f"{run}.log" if parallel > 1 else None
    metrics = distill_and_evaluate(base, run, student, method, seed, extra, prof, log)
    if metrics is None:
        return None
    wall = metrics.get("train_seconds", 0.0) + metrics.get("eval_seconds", 0.0)
    return {"part": part, "student": student, "method": method, "seed": seed, "wall_s": wall, **metrics}


def run_suite(parts: list[str], seeds: list[int], prof: dict, data: str | None, root: Path, parallel: int) -> list:
    """Set up every data spec the parts need (in parallel when allowed), then run all student jobs in one pool."""
    specs = list(dict.fromkeys(PARTS[p][0] for p in parts))
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(specs)))) as pool:
        list(pool.map(lambda spec: setup_spec(spec, prof, data, root), specs))
    jobs = [(p, st, m, seed) for seed in seeds for p in parts for st in prof["students"] for m in PARTS[p][1]]
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        rows = list(pool.map(_tolerant(lambda job: run_job(job, prof, root, parallel)), jobs))
    return [r for r in rows if r is not None]


def shot_groups(row: dict, counts: list[int]) -> dict:
    """Many (>= 1000 training images), medium, few (< 200) shot accuracy from per-class top-1 (probe path)."""
    per_class = row.get("probe_per_class") or []
    groups = {"many": [], "medium": [], "few": []}
    for count, acc in zip(counts, per_class, strict=False):
        groups["many" if count >= 1000 else "few" if count < 200 else "medium"].append(acc)
    return {k: sum(v) / len(v) for k, v in groups.items() if v}


def table(rows: list[dict]) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [
        "| part | student | method | seed | probe top-1 | generative top-1 | probe - KD | teacher | "
        "many / medium / few | train+eval s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in rows:
        kd = next(
            (
                k["probe_top1"]
                for k in rows
                if k["part"] == r["part"]
                and k["student"] == r["student"]
                and k["seed"] == r["seed"]
                and k["method"] == ("kl" if r["part"] == "unlabeled" else "kd")
            ),
            None,
        )
        untrained = bool(r.get("probe_untrained"))  # an old gendd_unsup student without the label-free probe
        main = r.get("generative_top1") if untrained else r["probe_top1"]
        delta = None if kd is None or main is None else main - kd
        shots = ""
        if r["part"].startswith("longtail"):
            g = r.get("shots", {})
            shots = " / ".join(fmt(g.get(k)) for k in ("many", "medium", "few"))
        probe = "-" if untrained else fmt(r["probe_top1"])
        lines.append(
            f"| {r['part']} | {r['student']} | {r['method']} | {r['seed']} | {probe} | "
            f"{fmt(r.get('generative_top1'))} | {'-' if delta is None else f'{delta:+.2f}'} | "
            f"{fmt(r.get('teacher_top1'))} | {shots} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _class_counts(shards: Path) -> list[int]:
    """Training images per class, from the split's keys file (no shard scan); none where the shards are absent."""
    from pipeline.shards import load_index

    if not (shards / "index.json").is_file():
        return []
    index = load_index(shards)
    labels = index.split("train").keys_and_labels()[1]
    return [labels.count(c) for c in range(int(index.spec["num_classes"]))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--part", choices=[*PARTS, "all"], nargs="+", default=["all"])
    parser.add_argument("--parallel", type=int, default=1, help="student jobs at once (a GPU host: 6-10)")
    parser.add_argument("--data", default=None, help="Fashion-MNIST IDX directory (default: the spec's path)")
    parser.add_argument("--root", default=str(ROOT / "outputs" / "bench_fmnist"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--report-only", action="store_true", help="only tabulate the runs already on disk")
    parser.add_argument("--codec", default="zstd", help="cache codec (zstd lossless; bf16, int8 lossy: their top-1)")
    parser.add_argument("--name", default=None, help="results file stem (default: accuracy_fmnist_<profile>[_<parts>])")
    parser.add_argument(
        "--merge",
        default=None,
        help="results JSON of earlier runs of this profile (e.g. seed 0 on another day): its rows that are not re-run "
        "join the table, so a second seed or part adds to it",
    )
    args = parser.parse_args()
    global EXECUTE
    EXECUTE = not args.report_only
    prof = {**PROFILES[args.profile], "codec": args.codec}
    root = Path(args.root) / prof.get("data_from", args.profile)  # shards, teacher and cache of that profile
    parts = list(PARTS) if "all" in args.part else args.part
    rows = run_suite(parts, args.seeds, prof, args.data, root, args.parallel)
    kept = {}
    if args.merge:
        rows, kept = merge_rows(Path(args.merge), rows, prof)
    write_results(rows, args, prof, root, args.parallel, kept)


def _row_key(row: dict) -> tuple:
    return row["part"], row["student"], row["method"], row["seed"]


def merge_rows(path: Path, rows: list[dict], prof: dict) -> tuple[list[dict], dict]:
    """The rows of an earlier results JSON of the same profile that `rows` do not replace, joined with `rows` in
    table order (part, student, method, seed), and that file's other top-level keys (notes such as "runs")."""
    if not path.is_file():
        sys.exit(f"--merge: {path} does not exist; give the .json an earlier run of this profile wrote")
    earlier = json.loads(path.read_text())
    default = {"codec": "zstd"}  # results written before the codec option have no codec key
    if {**default, **earlier.get("profile", {})} != {**default, **prof}:
        sys.exit(
            f"--merge: {path} was measured with another profile ({earlier.get('profile')}); rows of different "
            "settings cannot share one table: write to a new --name instead"
        )
    new = {_row_key(r) for r in rows}
    # each earlier row keeps the machine it ran on (a later run may get another GPU)
    kept_rows = [{"machine": earlier.get("machine"), **r} for r in earlier.get("rows", []) if _row_key(r) not in new]
    merged = kept_rows + rows
    parts, students = list(PARTS), prof["students"]

    def order(r: dict) -> tuple:
        methods = PARTS[r["part"]][1]
        return parts.index(r["part"]), students.index(r["student"]), methods.index(r["method"]), r["seed"]

    kept = {k: v for k, v in earlier.items() if k not in ("machine", "profile", "rows")}
    return sorted(merged, key=order), kept


def write_results(
    rows: list[dict], args: argparse.Namespace, prof: dict, root: Path, parallel: int = 1, kept: dict | None = None
) -> None:
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    try:
        import torch

        if torch.cuda.is_available():
            machine = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    rows = [{"machine": machine, **r} for r in rows]  # rows merged from an earlier run name their own machine
    if any(r["part"].startswith("longtail") and "shots" not in r for r in rows):
        # many/medium/few groups, kept in the JSON (which drops the per-class lists); merged rows bring their own,
        # so this host need not hold the long-tailed shards
        counts = _class_counts(root / "fashion_mnist_lt" / "shards")
        for r in rows:
            if r["part"].startswith("longtail") and "shots" not in r:
                r["shots"] = shot_groups(r, counts)
    machine = ", ".join(dict.fromkeys(r["machine"] for r in rows)) or machine
    seeds = sorted({r["seed"] for r in rows}) or args.seeds  # merged rows may add seeds
    md = (
        f"# Fashion-MNIST accuracy ({args.profile} profile)\n\nMachine: {machine}. Seeds: {seeds}. "
        f"Profile: {json.dumps(prof)}. GenDD options: `{' '.join(prof.get('gendd', HOLDOUT_TUNED))}`.\n"
        + (
            f"Student jobs ran {parallel} at a time on the one device, so their seconds include that sharing.\n"
            if parallel > 1
            else ""
        )
        + "\n"
        + table(rows)
    )
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or (
        f"accuracy_fmnist_{args.profile}"
        + ("" if "all" in args.part else "_" + "_".join(args.part))
        + ("" if args.codec == "zstd" else f"_{args.codec}")
    )
    (out / f"{name}.md").write_text(md)
    slim = [{k: v for k, v in r.items() if not k.endswith("_per_class")} for r in rows]
    doc = {"machine": machine, "profile": prof, **(kept or {}), "rows": slim}
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1))
    print(md, flush=True)


if __name__ == "__main__":
    main()
