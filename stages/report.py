"""`gendd report`: gather every evaluation into one comparison table and plots."""

from __future__ import annotations

from pathlib import Path

import typer


def command(
    evals: Path = typer.Option(..., help="Directory of <run>/metrics.json (gendd evaluate --out parents)."),
    students: Path = typer.Option(..., help="Directory of <run>/train.json (gendd distill --out parents)."),
    out: str = typer.Option(..., help="Directory for report.md, summary.json, curves.csv and plots."),
    cache: Path | None = typer.Option(None, help="Feature cache, for its size in the report."),
) -> None:
    """Write and print the comparison table."""
    from pipeline.evaluate.report import write_report

    typer.echo(write_report(evals, students, out, cache))
    typer.echo(f"-> {out}/report.md, {out}/accuracy.png, {out}/curves.png")
