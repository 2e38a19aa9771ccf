"""`gendd extract`: the frozen teacher over every sample and K views -> the feature cache (resumable)."""

from __future__ import annotations

from pathlib import Path

import typer


def command(
    shards: str = typer.Option(..., help="Image shard directory (gendd prepare --out)."),
    teacher: Path = typer.Option(..., help="Teacher directory (gendd teacher --out)."),
    out: str = typer.Option(..., help="Cache directory: <out>/<split>.zarr (or <split>-features/ shards)."),
    splits: str = typer.Option("train,val", help="Comma-separated splits to extract."),
    views: int = typer.Option(8, help="Views per training image (view 0 = the plain image)."),
    eval_views: int = typer.Option(1, help="Views per image for the other splits."),
    policy: str = typer.Option("rrc", help="View policy: rrc, pad_crop, flip, none."),
    seed: int = typer.Option(0, help="View seed: views depend only on (seed, key, view index)."),
    batch_size: int = typer.Option(512, help="(sample, view) pairs per teacher forward."),
    codec: str = typer.Option("zstd", help="zstd (lossless fp16, default), lz4, none, or lossy bf16 / int8."),
    format: str = typer.Option("zarr", "--format", help="zarr, or webdataset (self-contained training shards)."),
    mixed_precision: str = typer.Option("no", help="no, bf16 or fp16 autocast for the teacher."),
    cpu: bool = typer.Option(False, help="Force the CPU."),
    workers: int = typer.Option(-1, help="Shard-decode processes (0 = one thread; -1 = auto: half the cores, max 8)."),
) -> None:
    """Extract teacher features and logits; finished chunks are skipped, so a killed run resumes."""
    from pipeline.extract import ExtractConfig, extract
    from pipeline.views import ViewPolicy

    cfg = ExtractConfig(
        shards,
        teacher,
        out,
        tuple(s.strip() for s in splits.split(",") if s.strip()),
        views,
        eval_views,
        ViewPolicy(kind=policy),
        seed,
        batch_size,
        codec,
        format,
        mixed_precision,
        cpu,
        workers,
    )
    for r in extract(cfg):
        state = {True: "complete", False: "incomplete", None: "written"}[r["complete"]]
        typer.echo(
            f"{r['split']}: {r['n']} samples x {r['K']} views, {r['chunks_written']} chunks written "
            f"({r['views_per_s']:.0f} views/s), {state} -> {out}"
        )
