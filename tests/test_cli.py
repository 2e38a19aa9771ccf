"""The real `gendd` entry point: sub-commands listed, prepare works, user errors are one line without traceback."""

import subprocess
import sys
from pathlib import Path

from .conftest import DIGITS_SPEC


def _gendd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.app", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_the_stages() -> None:
    out = _gendd("--help").stdout
    for stage in ("prepare", "teacher", "extract", "distill", "evaluate", "report", "cache"):
        assert stage in out


def test_prepare_prints_what_it_wrote_then_nothing_to_do(tmp_path: Path) -> None:
    first = _gendd("prepare", "--spec", str(DIGITS_SPEC), "--out", str(tmp_path), "--max-samples", "100")
    assert first.returncode == 0, first.stderr
    assert "wrote 100 train samples" in first.stdout and str(tmp_path) in first.stdout
    second = _gendd("prepare", "--spec", str(DIGITS_SPEC), "--out", str(tmp_path), "--max-samples", "100")
    assert "up to date" in second.stdout


def test_bad_spec_is_one_line_without_traceback(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(DIGITS_SPEC.read_text().replace("source: sklearn_digits", "source: ftp"))
    result = _gendd("prepare", "--spec", str(spec), "--out", str(tmp_path / "out"))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "source" in lines[0] and "Traceback" not in result.stderr
