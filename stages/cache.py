"""`gendd cache info|verify`: inspect and check a feature cache."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Inspect (info) and check (verify) a feature cache.", no_args_is_help=True)


@app.command()
def info(
    path: Path = typer.Argument(..., help="Cache directory (gendd extract --out)."),
    split: str = typer.Option("train", help="Which split's store."),
) -> None:
    """What is in a store: shapes, codec, completeness, bytes per cached value."""
    from pipeline.store import open_cache

    stats = open_cache(path, split, allow_incomplete=True).info()
    rows = [(k, v) for k, v in stats.items() if k != "stored_bytes"]
    rows += [(f"bytes[{name}]", size) for name, size in stats["stored_bytes"].items()]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")


@app.command()
def verify(
    path: Path = typer.Argument(..., help="Cache directory."),
    teacher: Path = typer.Option(..., help="Teacher directory the cache was built with."),
    shards: Path = typer.Option(..., help="Image shard directory the cache was built from."),
    split: str = typer.Option("train"),
    samples: int = typer.Option(32, help="Random (sample, view) pairs to recompute."),
    seed: int = typer.Option(0),
) -> None:
    """Recompute random pairs with the teacher and report the error of the cached values."""
    from pipeline.extract import verify_cache

    r = verify_cache(path, split, teacher, shards, samples, seed)
    typer.echo(
        f"{r['pairs']} pairs: max abs error {r['max_abs_error']:.3g} (feature scale {r['feature_scale']:.3g}), "
        f"min cosine {r['min_cosine']:.6f}"
    )
