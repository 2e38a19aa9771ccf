"""The `gendd` command: one sub-command per pipeline stage; user errors print as one line, no traceback."""

from __future__ import annotations

import sys
from typing import NoReturn

import typer

from pipeline.errors import GenddError
from pipeline.outputs import os_error_line
from stages import cache, distill, evaluate, extract, prepare, report, teacher

app = typer.Typer(
    help="GenDD distillation with an offline teacher: prepare -> teacher -> extract -> distill -> evaluate -> report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        from pipeline import __version__

        typer.echo(f"gendd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Sub-commands are the pipeline stages; run `gendd STAGE --help` for each one's options."""


app.command("prepare")(prepare.command)
app.command("teacher")(teacher.command)
app.command("extract")(extract.command)
app.command("distill")(distill.command)
app.command("evaluate")(evaluate.command)
app.command("report")(report.command)
app.add_typer(cache.app, name="cache")


def _fail(message: str, code: int = 2) -> NoReturn:
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):  # clear progress bars left open by the failed stage
        bar.close()
    print(f"gendd: error: {' '.join(message.split())}", file=sys.stderr)  # one line, whatever the message holds
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: a user's mistake, a bad option or an operating-system error ends in one line."""
    from typer._click.exceptions import ClickException, NoArgsIsHelpError

    try:
        code = app(args=argv, prog_name="gendd", standalone_mode=False)
    except NoArgsIsHelpError as err:
        err.show()
        raise SystemExit(2) from None
    except ClickException as err:  # unknown option, a value outside its range or choices
        where = f"{err.ctx.command_path}: " if getattr(err, "ctx", None) else ""
        help_hint = f" (see {err.ctx.command_path} --help)" if getattr(err, "ctx", None) else " (see gendd --help)"
        message = err.format_message().replace("Value error, ", "")  # pydantic's prefix on a refused choice
        _fail(f"{where}{message}{help_hint}", err.exit_code)
    except GenddError as err:
        _fail(str(err))
    except OSError as err:  # permission denied, no space left, a file where a directory belongs ...
        _fail(os_error_line(err))
    except KeyboardInterrupt:
        code = 130
    if code == 130:  # typer turns Ctrl-C into exit code 130
        _fail("interrupted; run the same command again to resume (long stages continue where they stopped)", 130)
    if isinstance(code, int) and code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
