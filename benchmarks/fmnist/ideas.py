"""The holdout idea runs of docs/gap_to_kd.md as one record and one figure: every `<runs>/<idea>/s<seed>` holds a
`log.txt` whose first line names the distill options, and one or more evaluations (`eval/`, `eval-<name>/`, each
`gendd evaluate`'s details.json). Writes <out>.json (every run: idea, seed, options, sampling, metrics) and <out>.png
(each idea's probe and refit top-1, seeds and mean, against the KD and KL runs of the same holdout).

    python ideas.py --runs RUNS --out ../results/gap_to_kd_holdout_cpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared benchlib
from benchlib import machine_name, seed_mean

METRICS = ("probe_top1", "generative_top1", "refit_top1", "refit_z_top1", "train_seconds", "eval_seconds")
BASELINES = {"kd": "gendd", "kl": "gendd_unsup"}  # the baseline each GenDD variant is drawn against


def read_runs(runs: Path) -> list[dict]:
    """One row per (idea, evaluation, seed), in idea order of the folder names."""
    rows = []
    for idea in sorted(p for p in runs.iterdir() if p.is_dir()):
        for seed_dir in sorted(idea.glob("s[0-9]*")):
            log = seed_dir / "log.txt"
            first = log.read_text().splitlines()[0] if log.is_file() else ""
            options = first.split(": ", 1)[1].strip() if ": " in first else ""
            for ev in sorted(seed_dir.glob("eval*")):
                path = ev / "details.json"
                if not path.is_file():
                    continue  # an evaluation still running, or one that failed: left out, not guessed
                d = json.loads(path.read_text())
                name = idea.name if ev.name == "eval" else f"{idea.name} ({ev.name[5:]})"
                rows.append(
                    {
                        "idea": name,
                        "seed": int(seed_dir.name[1:]),
                        "options": options,
                        "method": d["method"],
                        "sampling": d.get("sampling"),
                        **{k: d.get(k) for k in METRICS},
                    }
                )
    return rows


def plot(rows: list[dict], path: Path) -> list[tuple[str, str]]:
    """Dot plot: one line per idea (its distill options), small marks the seeds, large ones the mean; probe, generative
    and refit top-1; the KD / KL means as vertical lines in the panel of the method they are the baseline of.
    Returns the panels drawn (baseline, method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ideas: dict[str, list[dict]] = {}
    for r in rows:
        ideas.setdefault(r["idea"], []).append(r)
    panels = [(base, method) for base, method in BASELINES.items() if any(r["method"] == method for r in rows)]
    heights = [max(2, sum(g[0]["method"] == m for g in ideas.values())) for _, m in panels]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(10, 1.2 + 0.38 * sum(heights)), squeeze=False, gridspec_kw={"height_ratios": heights}
    )
    for ax, (base, method) in zip(axes[:, 0], panels, strict=True):
        names = [n for n, g in ideas.items() if g[0]["method"] == method]
        for y, name in enumerate(names):
            for key, style in (
                ("probe_top1", dict(color="C0", marker="o")),
                ("generative_top1", dict(color="C2", marker="^")),
                ("refit_top1", dict(color="C1", marker="o", mfc="none")),
            ):
                vals = [r[key] for r in ideas[name] if r[key] is not None]
                if vals:
                    ax.plot(vals, [y] * len(vals), ls="", ms=3, alpha=0.5, **style)
                    ax.plot([sum(vals) / len(vals)], [y], ls="", ms=8, **style)
        for key, color in (("probe_top1", "C0"), ("refit_top1", "C1")):
            m = seed_mean([r[key] for r in ideas.get(base, [])])
            if m is not None:
                ax.axvline(m, color=color, ls="--", lw=1, label=f"{base.upper()} {key.split('_')[0]} {m:.2f}")
        options = [ideas[n][0]["options"].replace(f"--method {method}", "").strip() for n in names]
        ax.set_yticks(range(len(names)), [f"{n}: {o}" if o else n for n, o in zip(names, options, strict=True)])
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(
            f"{method}: probe (filled), generative (triangle), refit (open); small: seeds, large: mean", fontsize=9
        )
        ax.legend(fontsize=7, loc="lower right")
    axes[-1, 0].set_xlabel("top-1 on the held-out training images (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return panels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True, help="folder of <idea>/s<seed>/ run folders")
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix (.json and .png)")
    args = parser.parse_args()
    if not args.runs.is_dir():
        raise SystemExit(f"ideas: {args.runs} is not a folder of <idea>/s<seed> runs")
    rows = read_runs(args.runs)
    if not rows:
        raise SystemExit(f"ideas: no <idea>/s<seed>/eval*/details.json under {args.runs}")
    doc = {"date": datetime.date.today().isoformat(), "machine": machine_name(), "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(f"ideas: {len(rows)} runs -> {args.out}.json, {args.out}.png")


if __name__ == "__main__":
    main()
