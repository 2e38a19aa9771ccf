"""`gendd prepare`: data spec -> WebDataset image shards + index.json."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.data.prepare import prepare_shards
from pipeline.data.specs import load_spec


def command(
    spec: Path = typer.Option(..., help="Data spec YAML (see data_specs/)."),
    out: str = typer.Option(
        ..., help="Output directory (or s3://, gs:// prefix) for <split>-NNNNNN.tar shards and index.json."
    ),
    shard_size: int = typer.Option(1000, help="Samples per shard (also the feature cache's chunk size)."),
    max_samples: int = typer.Option(0, help="Keep only the first N samples of each split (0 = all; quick runs)."),
    source_path: str | None = typer.Option(None, help="Read the source data from here instead of the spec's path."),
) -> None:
    """Write a dataset's splits as image shards; does nothing when they are already up to date."""
    data_spec = load_spec(spec, source_path)
    index, wrote = prepare_shards(data_spec, out, shard_size, max_samples or None)
    verb = "wrote" if wrote else "up to date:"
    for name, shards in index.splits.items():
        typer.echo(f"{verb} {shards.n} {name} samples in {len(shards.names)} shards -> {out}/{name}-*.tar")
    typer.echo(f"index: {out}/index.json (spec {data_spec.name}, hash {data_spec.spec_hash})")
