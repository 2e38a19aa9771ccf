"""The comparison report: every evaluation in one Markdown table, plus accuracy and training-curve plots."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import GenddError


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _probe(row: dict) -> float | None:
    """Probe top-1, or None when the method trains no probe (unsupervised GenDD)."""
    return None if row.get("probe_untrained") else row.get("probe_top1")


def collect(evals: Path, students: Path) -> list[dict]:
    """One row per evaluated student x method, joined with its training summary."""
    rows = []
    for metrics_path in sorted(evals.glob("*/metrics.json")):
        metrics = json.loads(metrics_path.read_text())
        train_path = students / metrics_path.parent.name / "train.json"
        history = json.loads(train_path.read_text())["history"] if train_path.is_file() else []
        rows.append({"run": metrics_path.parent.name, **metrics, "history": history})
    if not rows:
        raise GenddError(f"no */metrics.json under {evals}; run gendd evaluate (or dvc repro) first")
    return rows


def markdown_table(rows: list[dict], cache_info: dict | None) -> str:
    """The comparison table: teacher, then each student x method with both paths, its delta over KD and cost."""
    kd = {r["student"]: r["probe_top1"] for r in rows if r["method"] == "kd"}
    teacher = next((r["teacher_top1"] for r in rows if "teacher_top1" in r), None)
    lines = [
        "| student | method | probe top-1 | generative top-1 | vs KD | top-5 (probe) | train s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        f"| teacher | - | {_fmt(teacher)} | - | - | - | - |",
    ]
    for r in sorted(rows, key=lambda r: (r["student"], r["method"])):
        main = _probe(r) if _probe(r) is not None else r.get("generative_top1")
        delta = main - kd[r["student"]] if r["student"] in kd and main is not None else None
        lines.append(
            f"| {r['student']} | {r['method']} | {_fmt(_probe(r))} | {_fmt(r.get('generative_top1'))} | "
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
    ax.bar([i - 0.2 for i in x], [_probe(r) or 0 for r in runs], 0.4, label="probe")
    ax.bar([i + 0.2 for i in x], [r.get("generative_top1") or 0 for r in runs], 0.4, label="generative")
    ax.set_xticks(list(x), [r["run"] for r in runs], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("val top-1 (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=100)
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
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)


def write_report(evals: Path, students: Path, out: str | Path, cache: Path | None = None) -> str:
    """Write report.md, summary.json (DVC metrics), curves.csv (DVC plot) and PNG plots; return the Markdown."""
    from pipeline.locations import check_local_out
    from pipeline.store import open_cache

    out = check_local_out(out)
    rows = collect(evals, students)
    info = open_cache(cache, "train").info() if cache is not None else None
    table = markdown_table(rows, info)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("# GenDD comparison\n\n" + table)
    summary = {r["run"]: {k: r[k] for k in ("probe_top1", "generative_top1", "train_seconds") if k in r} for r in rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    curve_rows = ["run,epoch,val_probe_top1,loss"]
    for r in rows:
        curve_rows += [
            f"{r['run']},{h['epoch']},{h.get('val_probe_top1', '')},{h.get('loss', '')}" for h in r["history"]
        ]
    (out / "curves.csv").write_text("\n".join(curve_rows) + "\n")
    _plots(rows, out)
    return table
