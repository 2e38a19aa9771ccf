"""The ensemble part's table: KD and GenDD students of teacher a, teacher b and both (a+b), each against the KD of the
same student, seed and teachers; then per student the seed means, GenDD - KD per teacher set, and whether the
ensemble's student reaches the better single teacher's; then what the second teacher's cache costs (`--costs`).

    python ensemble.py --evals eval/ensemble --caches data/fashion_mnist/cache data/fashion_mnist/cache-b \
        --extract-logs ... --out ../results/accuracy_fmnist_cpu_ensemble
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared benchlib
from benchlib import seed_mean

COLUMNS = (
    "| teachers | student | method | seed | probe top-1 | generative top-1 | probe - KD | refit top-1 | teacher "
    "| train+eval s |\n| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)


def _fmt(value: float | None, sign: bool = False) -> str:
    return "-" if value is None else (f"{value:+.2f}" if sign else f"{value:.2f}")


def teacher_sets(params: dict) -> dict[str, list[str]]:
    """Folder of each teacher set -> its teachers' model names (params.yaml `ensemble-sets` names params blocks)."""
    return {name: [params[block]["model"] for block in blocks] for name, blocks in params["ensemble-sets"].items()}


def read_rows(evals: Path, params: dict) -> list[dict]:
    """Every evaluation of the part, in table order; a missing one is named."""
    rows = []
    for folder, teachers in teacher_sets(params).items():
        for student in params["students"]:
            for method in params["methods"]["ensemble"]:
                for seed in params["seeds"]:
                    path = evals / folder / f"{student}-{method}-s{seed}" / "details.json"
                    if not path.is_file():
                        raise SystemExit(f"table: {path} is missing: run `dvc repro table-ensemble`")
                    details = json.loads(path.read_text())
                    row = {"part": "ensemble", "teachers": "+".join(teachers), "student": student, "method": method}
                    rows.append(row | {"seed": seed, **details, "teachers": "+".join(teachers)})
    return rows


def _kd_of(rows: list[dict], r: dict) -> float | None:
    same = ("teachers", "student", "seed")
    return next((b["probe_top1"] for b in rows if b["method"] == "kd" and all(b[k] == r[k] for k in same)), None)


def markdown(rows: list[dict]) -> str:
    """One row per run, in the results' row format with the teachers first."""
    lines = [COLUMNS]
    for r in rows:
        base = _kd_of(rows, r)
        seconds = r.get("train_seconds", 0.0) + r.get("eval_seconds", 0.0)
        lines.append(
            f"| {r['teachers']} | {r['student']} | {r['method']} | {r['seed']} | {_fmt(r['probe_top1'])} | "
            f"{_fmt(r.get('generative_top1'))} | {_fmt(None if base is None else r['probe_top1'] - base, True)} | "
            f"{_fmt(r.get('refit_top1'))} | {_fmt(r.get('teacher_top1'))} | {seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


def summary(rows: list[dict], params: dict) -> tuple[str, dict]:
    """Seed means per (student, teachers, method) with the gap to KD, and the ensemble against its teachers."""
    sets = ["+".join(t) for t in teacher_sets(params).values()]
    mean: dict[tuple[str, str, str], dict[str, float | None]] = {}
    for student in params["students"]:
        for teachers in sets:
            for method in params["methods"]["ensemble"]:
                runs = [r for r in rows if (r["student"], r["teachers"], r["method"]) == (student, teachers, method)]
                mean[student, teachers, method] = {
                    k: seed_mean([r.get(k) for r in runs])
                    for k in ("probe_top1", "generative_top1", "refit_top1", "teacher_top1")
                }
    lines = [
        "| student | teachers | teacher top-1 | KD probe | GenDD probe | GenDD generative | GenDD - KD |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    verdicts = {}
    for student in params["students"]:
        for teachers in sets:
            kd, gendd = mean[student, teachers, "kd"], mean[student, teachers, "gendd"]
            gap = gendd["probe_top1"] - kd["probe_top1"]
            lines.append(
                f"| {student} | {teachers} | {_fmt(kd['teacher_top1'])} | {_fmt(kd['probe_top1'])} | "
                f"{_fmt(gendd['probe_top1'])} | {_fmt(gendd['generative_top1'])} | {gap:+.2f} |"
            )
        singles, both = sets[:-1], sets[-1]
        for method in ("kd", "gendd"):
            best = max(singles, key=lambda t: mean[student, t, method]["probe_top1"])
            gain = mean[student, both, method]["probe_top1"] - mean[student, best, method]["probe_top1"]
            verdicts[f"{student} {method}: ensemble - best single ({best})"] = round(gain, 2)
        gaps = {t: mean[student, t, "gendd"]["probe_top1"] - mean[student, t, "kd"]["probe_top1"] for t in sets}
        verdicts[f"{student}: (GenDD - KD) ensemble - (GenDD - KD) teacher a"] = round(gaps[both] - gaps[sets[0]], 2)
    text = "\n".join(lines) + "\n\n" + "\n".join(f"- {k}: {v:+.2f}" for k, v in verdicts.items()) + "\n"
    return text, verdicts


def costs(shards: Path, teachers: list[Path], extract: dict) -> tuple[str, list[dict]]:
    """What each teacher's cache costs, measured here one after the other: `gendd extract` of the training split with
    the profile's options into a scratch folder (wall seconds), then the cache's stored bytes per value."""
    import subprocess
    import tempfile
    import time

    from pipeline.cache.store import open_cache

    options = [arg for k, v in extract.items() for arg in (f"--{k}", str(v))]
    found = []
    for teacher in teachers:
        with tempfile.TemporaryDirectory() as scratch:
            cmd = ["gendd", "extract", "--shards", str(shards), "--teacher", str(teacher), "--out", scratch]
            started = time.perf_counter()
            subprocess.run([*cmd, "--splits", "train", *options], check=True, capture_output=True)
            seconds = time.perf_counter() - started
            cache = open_cache(scratch, "train")
            info = cache.info()
        found.append(
            {
                "teacher": cache.meta.teacher["name"],
                "D": info["D"],
                "views": info["N"] * info["K"],
                "extract_s": seconds,
                "views_per_s": info["N"] * info["K"] / seconds,
                "bytes_per_value": info["bytes_per_value"],
                "stored_MB": sum(info["stored_bytes"].values()) / 1e6,
            }
        )
    lines = ["| teacher | D | views | extract s | views/s | bytes per value | cache MB | MB vs first |"]
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in found:
        lines.append(
            f"| {r['teacher']} | {r['D']} | {r['views']} | {r['extract_s']:.1f} | {r['views_per_s']:.0f} | "
            f"{r['bytes_per_value']:.3f} | {r['stored_MB']:.1f} | {r['stored_MB'] / found[0]['stored_MB']:.2f} |"
        )
    return "\n".join(lines) + "\n", found
