"""`gendd evaluate`: top-1/top-5 of a student through the probe and the generative path."""

from __future__ import annotations

from pathlib import Path

import typer

from stages.options import DATA_HELP, WORKERS_HELP


def command(
    shards: str = typer.Option(..., help="Image shard directory or URL."),
    cache: str | None = typer.Option(None, help="Feature cache (directory or URL): teacher head and its accuracy."),
    student: Path = typer.Option(..., help="Student directory (gendd distill --out)."),
    out: str = typer.Option(..., help="Directory (local) for metrics.json and per_class.png."),
    split: str = typer.Option("val"),
    sampler: str = typer.Option("ddim", help="ddpm, ddim or dpmsolver."),
    steps: int = typer.Option(25, help="Sampler steps."),
    cfg_scale: float = typer.Option(2.0, help="Classifier-free guidance scale (1 = none)."),
    n_samples: int = typer.Option(5, help="Samples averaged per image."),
    fast: bool = typer.Option(False, help="Probe path only: skip sampling."),
    batch_size: int = typer.Option(256),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if present)."),
    seed: int = typer.Option(0),
    data: str = typer.Option(DATA_HELP[0], help=DATA_HELP[1]),
    workers: int = typer.Option(-1, help=WORKERS_HELP),
) -> None:
    """Evaluate a student; writes metrics.json (scalars for DVC) and a per-class plot."""
    from pipeline.data import DataOptions
    from pipeline.evaluate import SamplingConfig, run_evaluation

    sampling = None if fast else SamplingConfig(sampler, steps, cfg_scale, n_samples, seed)
    options = DataOptions(data, workers)
    m = run_evaluation(
        shards, cache, student, out, sampling, split=split, batch_size=batch_size, device=device, data=options
    )
    parts = [f"{k}={m[k]:.2f}" for k in ("probe_top1", "generative_top1", "teacher_top1") if k in m]
    typer.echo(f"{m['method']} {m['student']}: " + " ".join(parts) + f" -> {out}/metrics.json")
