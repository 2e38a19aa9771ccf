"""`gendd evaluate`: top-1/top-5 of a student through the probe and the generative path."""

from __future__ import annotations

from pathlib import Path

import typer


def command(
    shards: Path = typer.Option(..., help="Image shard directory."),
    cache: Path | None = typer.Option(None, help="Feature cache: teacher head and the teacher's own accuracy."),
    student: Path = typer.Option(..., help="Student directory (gendd distill --out)."),
    out: Path = typer.Option(..., help="Directory for metrics.json and per_class.png."),
    split: str = typer.Option("val"),
    sampler: str = typer.Option("ddim", help="ddpm, ddim or dpmsolver."),
    steps: int = typer.Option(25, help="Sampler steps."),
    cfg_scale: float = typer.Option(2.0, help="Classifier-free guidance scale (1 = none)."),
    n_samples: int = typer.Option(5, help="Samples averaged per image."),
    fast: bool = typer.Option(False, help="Probe path only: skip sampling."),
    batch_size: int = typer.Option(256),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if present)."),
    seed: int = typer.Option(0),
) -> None:
    """Evaluate a student; writes metrics.json (scalars for DVC) and a per-class plot."""
    from pipeline.evaluate import SamplingConfig, run_evaluation

    sampling = None if fast else SamplingConfig(sampler, steps, cfg_scale, n_samples, seed)
    m = run_evaluation(shards, cache, student, out, sampling, split=split, batch_size=batch_size, device=device)
    parts = [f"{k}={m[k]:.2f}" for k in ("probe_top1", "generative_top1", "teacher_top1") if k in m]
    typer.echo(f"{m['method']} {m['student']}: " + " ".join(parts) + f" -> {out}/metrics.json")
