"""Tune GenDD's short-budget settings on a held-out part of the Fashion-MNIST training set (never the test split).

Uses data_specs/fashion_mnist_holdout.yaml (train = the first 50k training images, val = the last 10k) through the
real `gendd` CLI, one student per named setting, and writes benchmarks/results/tune_gendd_<profile>.{md,json}.

    python benchmarks/tune_gendd.py --prepare-only                # shards, teacher, cache (once)
    python benchmarks/tune_gendd.py --configs kd base v v_mul8    # settings to train and score (resumes/skips)
    python benchmarks/tune_gendd.py --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import accuracy_fmnist
from accuracy_fmnist import PROFILES, ROOT, distill_and_evaluate, setup_spec

# name -> (method, extra distill options). "base" is the setting chosen on digits (see README), with the paper's
# epsilon prediction named explicitly (the CLI default became v_prediction after this tuning).
BASE = ["--token-dim", "64", "--head-width", "256", "--diffusion-batch-mul", "2", "--head-lr-mult", "2.5"]
EPS = ["--head-prediction", "epsilon"]
V = [*BASE, "--head-prediction", "v_prediction"]
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "ce": ("ce", []),
    "kd": ("kd", []),
    "base": ("gendd", [*BASE, *EPS]),
    "v": ("gendd", V),
    "x0": ("gendd", [*BASE, "--head-prediction", "sample"]),
    "x0_mul8": ("gendd", [*BASE, "--head-prediction", "sample", "--diffusion-batch-mul", "8"]),
    "x0_c1": ("gendd", [*BASE, "--head-prediction", "sample", "--contraction", "1.0"]),
    "x0_c0.7": ("gendd", [*BASE, "--head-prediction", "sample", "--contraction", "0.7"]),
    "x0_warm2": ("gendd", [*BASE, "--head-prediction", "sample", "--warmstart-epochs", "2"]),
    "x0_unsup": ("gendd_unsup", [*BASE, "--head-prediction", "sample"]),
    "mul8": ("gendd", [*BASE, *EPS, "--diffusion-batch-mul", "8"]),
    "v_mul8": ("gendd", [*V, "--diffusion-batch-mul", "8"]),
    "v_warm2": ("gendd", [*V, "--warmstart-epochs", "2"]),
    "v_c0.7": ("gendd", [*V, "--contraction", "0.7"]),
    "v_c0.5": ("gendd", [*V, "--contraction", "0.5"]),
    "v_c1": ("gendd", [*V, "--contraction", "1.0"]),
    "v_hlr5": ("gendd", [*V, "--head-lr-mult", "5"]),
    "v_nomix": ("gendd", [*V, "--mixup-beta", "0"]),
    "v_w512": ("gendd", [*V, "--head-width", "512"]),
    "v_lr4": ("gendd", [*V, "--lr", "0.004"]),
    "v_lr8": ("gendd", [*V, "--lr", "0.008"]),
    "kd_lr4": ("kd", ["--lr", "0.004"]),
    "kd_lr8": ("kd", ["--lr", "0.008"]),
    "v_lr16": ("gendd", [*V, "--lr", "0.016"]),
    "kd_lr16": ("kd", ["--lr", "0.016"]),
    "v_lr8_t32": ("gendd", [*V, "--lr", "0.008", "--token-dim", "32"]),
    "v_lr8_t128": ("gendd", [*V, "--lr", "0.008", "--token-dim", "128"]),
    "v_lr8_mul8": ("gendd", [*V, "--lr", "0.008", "--diffusion-batch-mul", "8"]),
    "v_lr8_c0.5": ("gendd", [*V, "--lr", "0.008", "--contraction", "0.5"]),
    "kd_lr32": ("kd", ["--lr", "0.032"]),
    "ce_lr8": ("ce", ["--lr", "0.008"]),
    "ce_lr16": ("ce", ["--lr", "0.016"]),
    "kl_lr8": ("kl", ["--lr", "0.008"]),
    "kl_lr16": ("kl", ["--lr", "0.016"]),
    "ce_lr32": ("ce", ["--lr", "0.032"]),
    "kl_lr32": ("kl", ["--lr", "0.032"]),
    "v_unsup_lr8": ("gendd_unsup", [*V, "--lr", "0.008"]),
    "v_unsup_lr16": ("gendd_unsup", [*V, "--lr", "0.016"]),
    # a three times longer schedule at each method's best 10-epoch lr: does the GenDD - KD gap close with budget?
    "kd_lr16_e30": ("kd", ["--lr", "0.016", "--epochs", "30"]),
    "v_lr8_e30": ("gendd", [*V, "--lr", "0.008", "--epochs", "30"]),
    "unsup": ("gendd_unsup", [*BASE, *EPS]),
    "v_unsup": ("gendd_unsup", V),
    "kl": ("kl", []),
    # long-tailed holdout (--spec fashion_mnist_lt_holdout): logit-adjusted label CE (tau 1) for baselines and probe
    "ce_la1": ("ce", ["--logit-adjust", "1"]),
    "kd_la1": ("kd", ["--logit-adjust", "1"]),
    "v_la1": ("gendd", [*V, "--logit-adjust", "1"]),
}


# Held-out specs (train: part of the training set, val: the last 10k training images) -> results file suffix.
SPECS = {"fashion_mnist_holdout": "", "fashion_mnist_lt_holdout": "_lt"}


def run_config(base: Path, prof: dict, name: str, student: str, seed: int) -> dict | None:
    """Distil and evaluate one named setting (skipped when its metrics exist); its table row, if it has metrics."""
    method, extra = CONFIGS[name]
    metrics = distill_and_evaluate(base, f"{student}-{name}-s{seed}", student, method, seed, extra, prof)
    return None if metrics is None else {"config": name, "options": " ".join(extra), **metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--configs", nargs="*", default=[], choices=sorted(CONFIGS))
    parser.add_argument("--student", default=None, help="default: the profile's last student")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spec", choices=sorted(SPECS), default="fashion_mnist_holdout", help="held-out data spec")
    parser.add_argument("--data", default=None, help="Fashion-MNIST IDX directory (default: the spec's path)")
    parser.add_argument("--teacher-checkpoint", default=None, help="reuse these teacher weights instead of training")
    parser.add_argument("--root", default=str(ROOT / "outputs" / "tune_fmnist"))
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--prepare-only", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    prof, root = PROFILES[args.profile], Path(args.root) / args.profile
    student = args.student or prof["students"][-1]
    if not args.report_only:
        reuse = ("--checkpoint", args.teacher_checkpoint) if args.teacher_checkpoint else ()
        setup_spec(args.spec, prof, args.data, root, reuse)
        if args.prepare_only:
            return
        for name in args.configs:
            run_config(root / args.spec, prof, name, student, args.seed)
    accuracy_fmnist.EXECUTE = False  # tabulate every setting that has metrics, training nothing more
    rows = [r for name in CONFIGS if (r := run_config(root / args.spec, prof, name, student, args.seed))]
    write(rows, args, prof)


def write(rows: list[dict], args: argparse.Namespace, prof: dict) -> None:
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    ref = {m: next((r["probe_top1"] for r in rows if r["config"] == m), None) for m in ("kd", "kl")}
    lines = [
        f"# GenDD tuning on the Fashion-MNIST holdout ({args.profile} profile, spec {args.spec})\n",
        f"Machine: {machine}. Seed {args.seed}. Train: the first 50k training images"
        f"{', made long-tailed (imbalance factor 100),' if SPECS[args.spec] else ''} capped at "
        f"{prof['max_samples'] or 50000}; score: the last 10k training images (balanced; never the test split). "
        f"Epochs {prof['epochs']}, batch {prof['batch']}, DDIM {prof['steps']} steps, {prof['n_samples']} samples.\n",
        "| config | method | options | probe top-1 | generative top-1 | probe - KD (unsupervised: - KL) | train s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        base = ref["kl" if CONFIGS[r["config"]][0] in ("kl", "gendd_unsup") else "kd"]
        delta = "-" if base is None else f"{r['probe_top1'] - base:+.2f}"
        lines.append(
            f"| {r['config']} | {CONFIGS[r['config']][0]} | {r['options'] or '-'} | {fmt(r['probe_top1'])} | "
            f"{fmt(r.get('generative_top1'))} | {delta} | {r.get('train_seconds', 0):.0f} |"
        )
    md = "\n".join(lines) + "\n"
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"tune_gendd_{args.profile}{SPECS[args.spec]}"
    (out / f"{stem}.md").write_text(md)
    (out / f"{stem}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    plot_lr_sweep(rows, out / f"{stem}_lr.png", prof)
    print(md, flush=True)


def plot_lr_sweep(rows: list[dict], path: Path, prof: dict) -> None:
    """Probe top-1 against the learning rate, one line per method, from the settings that change only --lr."""
    sweep: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        method, extra = CONFIGS[r["config"]]
        prefix = V if method.startswith("gendd") else []  # each method's reference setting
        rest = extra[len(prefix) :]
        if extra[: len(prefix)] != prefix or rest[:1] not in ([], ["--lr"]) or len(rest) not in (0, 2):
            continue  # another option changed as well: not a point of the sweep
        lr = float(rest[1]) if rest else 0.002  # the distill default
        sweep.setdefault(method, []).append((lr, r["probe_top1"]))
    sweep = {m: sorted(points) for m, points in sweep.items() if len(points) > 1}
    if not sweep:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the table is the result; the plot is a convenience
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, points in sweep.items():
        ax.plot(*zip(*points, strict=True), marker="o", label=method)
    ax.set_xscale("log", base=2)
    lrs = sorted({lr for points in sweep.values() for lr, _ in points})
    ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
    ax.minorticks_off()
    ax.set_xlabel(f"learning rate (AdamW, cosine, batch {prof['batch']})")
    ax.set_ylabel("probe top-1 on the holdout (%)")
    ax.set_title(f"Fashion-MNIST holdout, {prof['epochs']} epochs, one seed")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
