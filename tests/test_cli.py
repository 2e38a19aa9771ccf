"""The real `gendd` entry point: sub-commands listed, prepare works, user errors are one line without traceback."""

import os
import subprocess
import sys
from pathlib import Path

from .conftest import DIGITS_SPEC


def _gendd(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "300"}  # --help on one line per option
    cmd = [sys.executable, "-m", "stages.app", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


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

    import pipeline.distill.distill
    from stages.app import app

    seen = {}

    def capture(cfg):
        seen["train"] = cfg.train
        return {"final": {}, "epochs": 0, "train_seconds": 0.0}

    monkeypatch.setattr(pipeline.distill.distill, "distill", capture)
    args = ["--shards", str(tmp_path), "--out", str(tmp_path / "o"), "--head-lr-mult", "1", "--no-target-norm"]
    args += ["--head-prediction", "sample", "--diffusion-batch-mul", "7", "--head-width", "96", "--token-dim", "32"]
    args += ["--cond-dropout", "0.1", "--warmstart-epochs", "2", "--contraction", "0.5", "--mixup-beta", "0"]
    args += ["--logit-adjust", "1.5"]
    result = CliRunner().invoke(app, ["distill", *args])
    assert result.exit_code == 0, result.output
    cfg = seen["train"]
    assert (cfg.head.lr_mult, cfg.head.target_norm, cfg.head.prediction) == (1.0, False, "sample")
    assert (cfg.head.diffusion_batch_mul, cfg.head.width, cfg.head.token_dim, cfg.head.cond_dropout) == (7, 96, 32, 0.1)
    assert (cfg.warmstart_epochs, cfg.objective.contraction, cfg.objective.mixup_beta) == (2, 0.5, 0.0)
    assert cfg.objective.logit_adjust == 1.5


def _stage_options() -> dict[str, list]:
    """Every stage (cache sub-commands included) -> its click parameters."""
    import typer

    from stages.app import app

    root = typer.main.get_command(app)
    stages = {}
    for name, command in root.commands.items():
        for sub, cmd in getattr(command, "commands", {name: command}).items():
            stages[name if sub == name else f"{name} {sub}"] = cmd.params
    return stages


# String options that take a free value (a path, URL, timm model name or split name): no fixed set of choices.
FREE_STRINGS = {"shards", "cache", "out", "work_dir", "student", "model", "split", "splits", "spec", "source_path"}
FREE_STRINGS |= {"path", "teacher", "evals", "students", "checkpoint", "student_dir"}


def test_every_option_has_help_and_every_string_option_its_choices() -> None:
    from typing import get_args

    for stage, params in _stage_options().items():
        result = _gendd(*stage.split(), "--help")
        assert result.returncode == 0, result.stderr
        for param in params:
            assert param.help, f"gendd {stage} --{param.name}: no help text"
            annotation = param.get_runtime_param().annotation
            choices = get_args(annotation) if "Literal" in str(annotation) else ()
            if choices:  # listed in --help as <a|b|c>
                shown = "".join(result.stdout.replace("│", "").split())  # rich wraps long cells in its box
                assert "|".join(choices) in shown, (stage, param.name)
            elif str in (annotation, *get_args(annotation)):
                assert param.name in FREE_STRINGS, f"gendd {stage} --{param.name}: a string without choices"


def test_stages_share_one_device_option() -> None:
    stages = _stage_options()
    for stage in ("teacher", "extract", "distill", "evaluate"):
        names = {p.name for p in stages[stage]}
        assert "device" in names and "cpu" not in names, stage
    result = _gendd("distill", "--shards", "x", "--out", "y", "--device", "gpu")
    assert result.returncode == 2 and "--device" in result.stderr and "auto" in result.stderr


def test_version() -> None:
    from pipeline import __version__

    assert _gendd("--version").stdout.strip() == f"gendd {__version__}"


def test_threads_pins_torch_and_blas_in_a_fresh_process() -> None:
    """--threads N (params.yaml pins 1 for the DVC pipeline) sets torch's and the loaded BLAS/OpenMP pools' threads, and
    the environment for libraries loaded later: CPU float sums, so the figures, do not depend on the machine."""
    import os
    import subprocess
    import sys

    import yaml

    from .conftest import ROOT

    code = (
        "import numpy, torch, threadpoolctl\n"
        "from pipeline.devices import pin_cpu_threads\n"
        "pin_cpu_threads(1)\n"
        "pools = [pool['num_threads'] for pool in threadpoolctl.threadpool_info()]\n"
        "print(torch.get_num_threads(), max(pools, default=1), os.environ['OMP_NUM_THREADS'])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", "import os\n" + code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["1", "1", "1"], out.stdout + out.stderr
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert all(params[stage]["threads"] == 1 for stage in ("teacher", "extract", "distill", "evaluate"))
