"""One part's comparison table from its evaluations: one row per (student, method, seed), each against KD (KL on
unlabeled data) of the same student and seed. Writes <out>.md (Markdown) and <out>.json (the rows and the profile).

    python table.py --part balanced --evals eval/balanced --shards data/fashion_mnist/shards \
        --out ../results/accuracy_fmnist_cpu_balanced
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared benchlib
from benchlib import machine_name, seed_mean

HERE = Path(__file__).resolve().parent
COLUMNS = (
    "| part | student | method | seed | probe top-1 | generative top-1 | probe - KD | refit top-1 | teacher "
    "| many / medium / few | train+eval s |\n| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"
)
MEAN_COLUMNS = (
    "| part | student | method | seeds | probe top-1 | generative top-1 | probe - KD | refit top-1 |\n"
    "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"
)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def read_rows(part: str, evals: Path, params: dict) -> list[dict]:
    """The evaluations of `part` in table order (student, method, seed as in params.yaml); a missing one is named."""
    rows = []
    for student in params["students"]:
        for method in params["methods"][part]:
            for seed in params["seeds"]:
                path = evals / f"{student}-{method}-s{seed}" / "details.json"
                if not path.is_file():
                    raise SystemExit(f"table: {path} is missing: run `dvc repro table@{part}`")
                details = json.loads(path.read_text())
                rows.append({"part": part, "student": student, "method": method, "seed": seed, **details})
    return rows


def class_counts(shards: Path) -> list[int]:
    """Training images per class, from the shards' keys file."""
    from pipeline.data.shards import load_index

    index = load_index(shards)
    labels = index.split("train").keys_and_labels()[1]
    return [int((labels == c).sum()) for c in range(int(index.spec["num_classes"]))]


def shot_groups(per_class: list[float], counts: list[int]) -> dict[str, float]:
    """Mean per-class top-1 of many- (>= 1000 training images), medium- and few-shot (< 200) classes."""
    groups: dict[str, list[float]] = {"many": [], "medium": [], "few": []}
    for count, acc in zip(counts, per_class, strict=True):
        groups["many" if count >= 1000 else "few" if count < 200 else "medium"].append(acc)
    return {k: sum(v) / len(v) for k, v in groups.items() if v}


def markdown(rows: list[dict]) -> str:
    """The rows in the results' table format; probe - KD against the same student and seed's KD (or KL)."""
    lines = [COLUMNS]
    for r in rows:
        base = next(
            (
                b["probe_top1"]
                for b in rows
                if (b["student"], b["seed"]) == (r["student"], r["seed"]) and b["method"] in ("kd", "kl")
            ),
            None,
        )
        delta = "-" if base is None else f"{r['probe_top1'] - base:+.2f}"
        shots = " / ".join(_fmt(r["shots"].get(k)) for k in ("many", "medium", "few")) if "shots" in r else ""
        seconds = r.get("train_seconds", 0.0) + r.get("eval_seconds", 0.0)
        lines.append(
            f"| {r['part']} | {r['student']} | {r['method']} | {r['seed']} | {_fmt(r['probe_top1'])} | "
            f"{_fmt(r.get('generative_top1'))} | {delta} | {_fmt(r.get('refit_top1'))} | {_fmt(r.get('teacher_top1'))} "
            f"| {shots} | {seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


def seed_means(rows: list[dict]) -> str:
    """Mean over seeds of every (student, method); probe - KD against the mean of the same student's KD (or KL)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["student"], r["method"]), []).append(r)
    lines = [MEAN_COLUMNS]
    for (student, method), runs in groups.items():
        probe = seed_mean([r["probe_top1"] for r in runs])
        base = next((g for (s, m), g in groups.items() if s == student and m in ("kd", "kl")), None)
        base_probe = seed_mean([r["probe_top1"] for r in base]) if base else None
        delta = "-" if base_probe is None or probe is None else f"{probe - base_probe:+.2f}"
        seeds = ", ".join(str(r["seed"]) for r in runs)
        gen, refit = (seed_mean([r.get(k) for r in runs]) for k in ("generative_top1", "refit_top1"))
        lines.append(
            f"| {runs[0]['part']} | {student} | {method} | {seeds} | {_fmt(probe)} | {_fmt(gen)} | {delta} | "
            f"{_fmt(refit)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", required=True)
    parser.add_argument("--evals", type=Path, required=True, help="the part's eval folder (<student>-<method>-s<seed>)")
    parser.add_argument("--shards", type=Path, required=True, help="the part's shards (class counts)")
    parser.add_argument("--out", required=True, help="path stem of the .md and .json written")
    parser.add_argument("--params", type=Path, default=HERE / "params.yaml")
    parser.add_argument("--teachers", type=Path, nargs="*", default=[], help="ensemble: teacher dirs, costs measured")
    args = parser.parse_args()
    params = yaml.safe_load(args.params.read_text())
    if args.part == "ensemble":
        return write_ensemble(args, params)
    rows = read_rows(args.part, args.evals, params)
    counts = class_counts(args.shards)
    if min(counts) * 10 <= max(counts):  # long-tailed training data: per-shot groups of the probe's classes
        for r in rows:
            r["shots"] = shot_groups(r["probe_per_class"], counts)
    machine = machine_name()
    date = datetime.date.today().isoformat()
    profile = {k: params[k] for k in ("prepare", "teacher", "extract", "distill", "evaluate")}
    md = (
        f"# Fashion-MNIST accuracy, {args.part} ({params['profile']} profile)\n\n"
        f"{date}, {machine}. Seeds: {params['seeds']}. Command: `cd benchmarks/fmnist && dvc repro table@{args.part}`"
        f" (benchmarks/fmnist/params.yaml). Options of every stage: `{json.dumps(profile)}`; the rest are "
        "the commands' defaults.\n\n" + markdown(rows) + "\nMean over seeds:\n\n" + seed_means(rows)
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md)
    slim = [{k: v for k, v in r.items() if not k.endswith("_per_class")} for r in rows]
    doc = {"date": date, "machine": machine, "profile": params["profile"], "params": params, "rows": slim}
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    print(md, flush=True)


def write_ensemble(args: argparse.Namespace, params: dict) -> None:
    """The ensemble part: its rows, the seed means against each teacher set, the second teacher's costs."""
    import ensemble

    rows = ensemble.read_rows(args.evals, params)
    means, verdicts = ensemble.summary(rows, params)
    cost_md, cost_rows = ensemble.costs(args.shards, args.teachers, params["extract"])
    blocks = ("prepare", "teacher", "teacher-b", "extract", "distill", "evaluate")
    profile = {k: params[k] for k in blocks}
    date = datetime.date.today().isoformat()
    md = (
        f"# Fashion-MNIST accuracy, ensemble ({params['profile']} profile)\n\n"
        f"{date}, {machine_name()}. Seeds: {params['seeds']}. Command: `cd benchmarks/fmnist && dvc repro "
        f"table-ensemble` (benchmarks/fmnist/params.yaml). Options of every stage: `{json.dumps(profile)}`; the rest "
        "are the commands' defaults. Teacher top-1 of a+b: the mean of the two teachers' probabilities.\n\n"
        + ensemble.markdown(rows)
        + "\nMean over seeds:\n\n"
        + means
        + "\nCost of each teacher's cache (the training split, extracted here one after the other):\n\n"
        + cost_md
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md)
    slim = [{k: v for k, v in r.items() if not k.endswith("_per_class")} for r in rows]
    doc = {"date": date, "machine": machine_name(), "profile": params["profile"], "params": params, "rows": slim}
    doc |= {"summary": verdicts, "costs": cost_rows}
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    print(md, flush=True)


if __name__ == "__main__":
    main()
