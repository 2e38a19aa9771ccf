"""`gendd cache info|verify`: inspect and check a feature cache."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Inspect (info) and check (verify) a feature cache.", no_args_is_help=True)

_SHOWN = 5  # damage lines `info` spells out


@app.command()
def info(
    path: str = typer.Argument(..., help="Cache directory (gendd extract --out)."),
    split: str = typer.Option("train", help="Which split's store."),
) -> None:
    """What is in a store: shapes, codec, completeness, bytes per cached value, and damage visible without reading
    the chunks (missing chunk files, unset done flags, an unfinished store)."""
    from pipeline.cache.store import open_cache

    stats = open_cache(path, split, allow_incomplete=True).info()
    rows = [(k, v) for k, v in stats.items() if k not in ("stored_bytes", "damage")]
    rows += [(f"bytes[{name}]", size) for name, size in stats["stored_bytes"].items()]
    damage = stats["damage"]
    if damage:
        more = f"; and {len(damage) - _SHOWN} more" if len(damage) > _SHOWN else ""
        listed = "; ".join(damage[:_SHOWN])
        rows.append(("damage", f"{len(damage)} seen: {listed}{more} (run gendd cache verify for a full check)"))
    else:
        rows.append(("damage", "none seen (run gendd cache verify for a full check)"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")


@app.command()
def verify(
    path: str = typer.Argument(..., help="Cache directory, or its URL (http(s)://, s3://, gs://)."),
    teacher: Path | None = typer.Option(
        None, help="Teacher directory the cache was built with (needed for the replay, i.e. unless --samples 0)."
    ),
    shards: str | None = typer.Option(
        None, help="Image shards (directory or URL) the cache was built from (needed unless --samples 0)."
    ),
    split: str = typer.Option("train", help="Which split's store."),
    samples: int = typer.Option(32, help="Random (sample, view) pairs to recompute with the teacher; 0 skips it."),
    seed: int = typer.Option(0, help="Seed of the replayed pairs."),
    quick: bool = typer.Option(False, "--quick", help="Skip the full scan: only open the store and replay pairs."),
) -> None:
    """Integrity check: read every chunk of every array (checksums, shapes, dtypes, NaN/inf, done flags, labels,
    keys, attributes), then recompute random pairs with the teacher. Lists every problem on stdout and exits 2 when
    there is any."""
    from pipeline.extract.verify import verify as run_verify

    report = run_verify(path, split, teacher=teacher, shards=shards, samples=samples, seed=seed, quick=quick)
    for line in report.lines():
        typer.echo(line)
    error = report.error()
    if error is not None:
        raise error
