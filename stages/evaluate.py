"""`gendd evaluate`: top-1/top-5 of a student through the probe and the generative path."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.config import REFIT_SAMPLES, DataOptions, SamplingConfig
from stages.options import (
    DATA_HELP,
    DEVICE_HELP,
    THREADS_HELP,
    WORKERS_HELP,
    DataMode,
    Device,
    Sampler,
    Spacing,
    default,
    pin_threads,
)

S, D = SamplingConfig, DataOptions


def command(
    shards: str = typer.Option(..., help="Image shard directory or URL."),
    cache: list[str] | None = typer.Option(
        None,
        help="Feature cache (directory or URL): teacher head and its accuracy. Repeat it for a student distilled "
        "from several teachers (the same caches in the same order).",
    ),
    student_dir: Path = typer.Option(..., help="Student directory to evaluate (gendd distill --out)."),
    out: str = typer.Option(..., help="Directory (local) for metrics.json, details.json and per_class.png."),
    split: str = typer.Option("val", help="Which split of the shards to evaluate on."),
    sampler: Sampler = typer.Option(default(S, "sampler"), help="Diffusion sampler of the generative path."),
    steps: int = typer.Option(default(S, "steps"), help="Sampler steps."),
    spacing: Spacing = typer.Option(
        default(S, "spacing"), help="Timesteps visited: leading (10 steps: 900..0), trailing (999..99), linspace."
    ),
    cfg_scale: float = typer.Option(default(S, "cfg_scale"), help="Classifier-free guidance scale (1 = none)."),
    n_samples: int = typer.Option(default(S, "n_samples"), help="Samples averaged per image."),
    fast: bool = typer.Option(False, help="Probe path only: skip sampling."),
    batch_size: int = typer.Option(256, help="Images per forward pass."),
    device: Device = typer.Option("auto", help=DEVICE_HELP),
    threads: int = typer.Option(0, min=0, help=THREADS_HELP),
    seed: int = typer.Option(default(S, "seed"), help="Seed of the sampler's noise."),
    data: DataMode = typer.Option(default(D, "mode"), help=DATA_HELP),
    workers: int = typer.Option(default(D, "workers"), help=WORKERS_HELP),
    refit: bool = typer.Option(
        False,
        help="Also fit a logistic-regression probe on the frozen student features of the train split (and on the "
        "head's condition) and score it here: refit_top1 / refit_z_top1 (features vs trained readout).",
    ),
    refit_samples: int = typer.Option(
        REFIT_SAMPLES, help="--refit: fit on the first N train samples (held in memory: N x D float32)."
    ),
) -> None:
    """Evaluate a student; writes metrics.json (the scalars DVC shows), details.json and a per-class plot."""
    pin_threads(threads)
    from pipeline.evaluate.evaluate import run_evaluation
    from stages.options import use_cpu

    sampling = None
    if not fast:
        sampling = SamplingConfig(
            sampler=sampler, steps=steps, cfg_scale=cfg_scale, n_samples=n_samples, seed=seed, spacing=spacing
        )
    options = DataOptions(mode=data, workers=workers)
    where = "cpu" if use_cpu(device) else (None if device == "auto" else "cuda")
    m = run_evaluation(
        shards,
        tuple(cache or ()) or None,
        student_dir,
        out,
        sampling,
        split=split,
        batch_size=batch_size,
        device=where,
        data=options,
        refit=refit,
        refit_samples=refit_samples,
    )
    shown = ("probe_top1", "generative_top1", "teacher_top1", "refit_top1", "refit_z_top1")
    parts = [f"{k}={m[k]:.2f}" for k in shown if k in m]
    typer.echo(f"{m['method']} {m['student']}: " + " ".join(parts) + f" -> {out}/metrics.json")
