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


def test_every_distill_option_reaches_the_training_config(monkeypatch, tmp_path: Path) -> None:
    """Options that differ from the defaults must arrive in TrainConfig (a dropped one silently trains defaults)."""
    from typer.testing import CliRunner

    import pipeline.distill
    from stages.app import app

    seen = {}

    def capture(cfg):
        seen["train"] = cfg.train
        return {"final": {}, "epochs": 0, "train_seconds": 0.0}

    monkeypatch.setattr(pipeline.distill, "distill", capture)
    args = ["--shards", str(tmp_path), "--out", str(tmp_path / "o"), "--head-lr-mult", "1", "--no-target-norm"]
    args += ["--head-prediction", "sample", "--diffusion-batch-mul", "7", "--head-width", "96", "--token-dim", "32"]
    args += ["--cond-dropout", "0.1", "--warmstart-epochs", "2", "--contraction", "0.5", "--mixup-beta", "0"]
    args += ["--logit-adjust", "1.5"]
    result = CliRunner().invoke(app, ["distill", *args])
    assert result.exit_code == 0, result.output
    cfg = seen["train"]
    assert (cfg.head_lr_mult, cfg.target_norm, cfg.head_prediction) == (1.0, False, "sample")
    assert (cfg.diffusion_batch_mul, cfg.head_width, cfg.head_token_dim, cfg.cond_dropout) == (7, 96, 32, 0.1)
    assert (cfg.warmstart_epochs, cfg.objective.contraction, cfg.objective.mixup_beta) == (2, 0.5, 0.0)
    assert cfg.objective.logit_adjust == 1.5
