"""The `gendd` command: one sub-command per pipeline stage; user errors print as one line, no traceback."""

from __future__ import annotations

import sys

import typer

from pipeline.errors import GenddError
from stages import cache, distill, evaluate, extract, prepare, report, teacher

app = typer.Typer(
    help="GenDD distillation with an offline teacher: prepare -> teacher -> extract -> distill -> evaluate -> report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Sub-commands are the pipeline stages; run `gendd STAGE --help` for each one's options."""


app.command("prepare")(prepare.command)
app.command("teacher")(teacher.command)
app.command("extract")(extract.command)
app.command("distill")(distill.command)
app.command("evaluate")(evaluate.command)
app.command("report")(report.command)
app.add_typer(cache.app, name="cache")


def main() -> None:
    """Console entry point."""
    try:
        app()
    except GenddError as err:
        print(f"gendd: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
