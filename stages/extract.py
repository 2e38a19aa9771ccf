"""`gendd extract`: the frozen teacher over every sample and K views -> the feature cache (resumable)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.config import ExtractConfig, ViewPolicy
from stages.options import (
    DEVICE_HELP,
    POLICY_HELP,
    PRECISION_HELP,
    THREADS_HELP,
    Codec,
    Device,
    Format,
    Policy,
    Precision,
    default,
    pin_threads,
)

E = ExtractConfig


def command(
    shards: str = typer.Option(..., help="Image shard directory or URL (gendd prepare --out)."),
    teacher: Path = typer.Option(..., help="Teacher directory (gendd teacher --out)."),
    out: str = typer.Option(
        ..., help="Cache directory or s3://, gs:// prefix: <out>/<split>.zarr (or <split>-features/ shards)."
    ),
    splits: str = typer.Option(",".join(default(E, "splits")), help="Comma-separated splits to extract."),
    views: int = typer.Option(default(E, "num_views"), help="Views per training image (view 0 = the plain image)."),
    eval_views: int = typer.Option(default(E, "eval_views"), help="Views per image for the other splits."),
    policy: Policy = typer.Option(default(E, "policy").kind, help=POLICY_HELP),
    seed: int = typer.Option(default(E, "seed"), help="View seed: views depend only on (seed, key, view index)."),
    batch_size: int = typer.Option(default(E, "batch_size"), help="(sample, view) pairs per teacher forward."),
    codec: Codec = typer.Option(default(E, "codec"), help="zstd (lossless fp16), lz4, none, or lossy bf16 / int8."),
    format: Format = typer.Option(default(E, "fmt"), "--format", help="zarr, or webdataset (training shards)."),
    mixed_precision: Precision = typer.Option(default(E, "mixed_precision"), help=PRECISION_HELP),
    device: Device = typer.Option("auto", help=DEVICE_HELP),
    threads: int = typer.Option(0, min=0, help=THREADS_HELP),
    workers: int = typer.Option(
        default(E, "workers"), help="Shard-decode processes (0 = one thread; -1 = auto: half the cores, max 8)."
    ),
) -> None:
    """Extract teacher features and logits; finished chunks are skipped, so a killed run resumes."""
    pin_threads(threads)
    from pipeline.extract.extract import extract
    from stages.options import use_cpu

    cfg = ExtractConfig(
        shards=shards,
        teacher=teacher,
        out=out,
        splits=tuple(s.strip() for s in splits.split(",") if s.strip()),
        num_views=views,
        eval_views=eval_views,
        policy=ViewPolicy(kind=policy),
        seed=seed,
        batch_size=batch_size,
        codec=codec,
        fmt=format,
        mixed_precision=mixed_precision,
        cpu=use_cpu(device),
        workers=workers,
    )
    for r in extract(cfg):
        state = {True: "complete", False: "incomplete", None: "written"}[r["complete"]]
        typer.echo(
            f"{r['split']}: {r['n']} samples x {r['K']} views, {r['chunks_written']} chunks written "
            f"({r['views_per_s']:.0f} views/s), {state} -> {out}"
        )
