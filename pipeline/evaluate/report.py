"""The comparison report: every evaluation in one Markdown table, plus accuracy and training-curve plots."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import GenddError
from pipeline.outputs import check_writable, save_figure, write_json, write_text

# The table's reference: each student's gain over Hinton KD with the same student ("vs KD").
BASELINE = "kd"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _read_json(path: Path, run: str, stage: str, needs: tuple[str, ...]) -> dict:
    """A run's JSON record, or one line naming the run, the file and the stage that rewrites it."""
    fix = f"re-run gendd {stage} for run {run!r}, or remove its directory"
    if not path.is_file():
        raise GenddError(f"run {run!r}: {path} is missing: {fix}")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise GenddError(f"run {run!r}: {path} is unreadable ({type(err).__name__}: {err}): {fix}") from err
    missing = [key for key in needs if not isinstance(record, dict) or key not in record]
    if missing:
        raise GenddError(f"run {run!r}: {path} lacks {', '.join(missing)}: {fix}")
    return record


def collect(evals: Path, students: Path) -> list[dict]:
    """One row per evaluated student x method (every directory under `evals`), joined with its training summary;
    a run whose metrics or training record is missing or damaged is named, never dropped."""
    rows = []
    if not evals.is_dir():
        raise GenddError(f"{evals} is not a directory of evaluations: run gendd evaluate (or dvc repro) first")
    for run_dir in sorted(p for p in evals.iterdir() if p.is_dir() and not p.name.startswith(".")):
        run = run_dir.name
        metrics = _read_json(run_dir / "details.json", run, "evaluate", ("method", "student", "probe_top1"))
        history = _read_json(students / run / "train.json", run, "distill", ("history",))["history"]
        rows.append({"run": run, **metrics, "history": history})
    if not rows:
        raise GenddError(f"no */details.json under {evals}; run gendd evaluate (or dvc repro) first")
    return rows


def _teachers(row: dict) -> str:
    """A run's teachers: their model names joined by '+' for a student of several caches, '-' for one teacher."""
    return "+".join(row.get("teachers", [])) or "-"


def markdown_table(rows: list[dict], cache_info: dict | None) -> str:
    """The comparison table: teacher, then each student x method with both paths, its delta over KD (of the same
    student and teachers) and cost; with students of several teachers, a column names each run's teachers."""
    several = any("teachers" in r for r in rows)
    kd = {(r["student"], _teachers(r)): r["probe_top1"] for r in rows if r["method"] == BASELINE}
    teacher = next((r["teacher_top1"] for r in rows if "teacher_top1" in r and "teachers" not in r), None)
    lines = [
        "| student | method | probe top-1 | generative top-1 | vs KD | top-5 (probe) | train s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        f"| teacher | - | {_fmt(teacher)} | - | - | - | - |",
    ]
    if several:  # a teachers column after the method, and the ensembles' own (mean-probability) top-1 as rows
        lines = [line.replace(" | probe top-1", " | teachers | probe top-1", 1) for line in lines[:1]]
        lines += ["| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        ensembles = {_teachers(r): r["teacher_top1"] for r in rows if "teachers" in r and "teacher_top1" in r}
        for name, top1 in [("-", teacher), *sorted(ensembles.items())]:
            lines.append(f"| teacher | - | {name} | {_fmt(top1)} | - | - | - | - |")
    for r in sorted(rows, key=lambda r: (r["student"], _teachers(r), r["method"])):
        base = kd.get((r["student"], _teachers(r)))
        delta = None if base is None else r["probe_top1"] - base
        teachers = f"{_teachers(r)} | " if several else ""
        lines.append(
            f"| {r['student']} | {r['method']} | {teachers}{_fmt(r['probe_top1'])} | "
            f"{_fmt(r.get('generative_top1'))} | "
            f"{'-' if delta is None else f'{delta:+.2f}'} | {_fmt(r.get('probe_top5'))} | "
            f"{_fmt(r.get('train_seconds'), 1)} |"
        )
    if cache_info:
        lines.append("")
        lines.append(
            f"Feature cache: {cache_info['N']} samples x {cache_info['K']} views, D={cache_info['D']}, "
            f"codec {cache_info['codec']}, {cache_info['bytes_per_value']:.3f} bytes per stored value, "
            f"{sum(cache_info['stored_bytes'].values()) / 1e6:.2f} MB."
        )
    return "\n".join(lines) + "\n"


def _plots(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(rows, key=lambda r: (r["student"], r["method"]))
    fig, ax = plt.subplots(figsize=(max(5, len(runs) * 0.9), 3.4))
    x = range(len(runs))
    ax.bar([i - 0.2 for i in x], [r["probe_top1"] for r in runs], 0.4, label="probe")
    ax.bar([i + 0.2 for i in x], [r.get("generative_top1") or 0 for r in runs], 0.4, label="generative")
    ax.set_xticks(list(x), [r["run"] for r in runs], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("val top-1 (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "accuracy.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for r in runs:
        points = [(h["epoch"], h["val_probe_top1"]) for h in r["history"] if "val_probe_top1" in h]
        if points:
            ax.plot(*zip(*points, strict=True), marker=".", label=r["run"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("val probe top-1 (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "curves.png")
    plt.close(fig)


def write_report(evals: Path, students: Path, out: str | Path, cache: Path | None = None) -> str:
    """Write report.md, summary.json (DVC metrics), curves.csv (DVC plot) and PNG plots; return the Markdown."""
    from pipeline.cache.store import open_cache

    out = check_writable(out)
    rows = collect(evals, students)
    info = open_cache(cache, "train").info() if cache is not None else None
    table = markdown_table(rows, info)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "report.md", "# GenDD comparison\n\n" + table)
    keys = ("probe_top1", "generative_top1", "train_seconds")
    summary = {r["run"]: {k: round(r[k], 2) for k in keys if isinstance(r.get(k), (int, float))} for r in rows}
    write_json(out / "summary.json", summary)
    curve_rows = ["run,epoch,val_probe_top1,loss"]
    for r in rows:
        curve_rows += [
            f"{r['run']},{h['epoch']},{h.get('val_probe_top1', '')},{h.get('loss', '')}" for h in r["history"]
        ]
    write_text(out / "curves.csv", "\n".join(curve_rows) + "\n")
    _plots(rows, out)
    return table
