"""End to end through the real CLI on the embedded digits: prepare -> teacher -> extract -> distill -> evaluate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import DIGITS_SPEC

METHODS = ("ce", "kd", "kl", "gendd", "gendd_unsup")
HEAD = ["--token-dim", "32", "--head-width", "256", "--diffusion-batch-mul", "2"]

pytestmark = pytest.mark.slow  # the whole pipeline, every method: minutes on 2 cores


def gendd(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "stages.app", *args], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"gendd {' '.join(args)}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole pipeline once: every method distils test_efficientnet from one cached test_efficientnet teacher."""
    root = tmp_path_factory.mktemp("e2e")
    shards, teacher, cache = root / "shards", root / "teacher", root / "cache"
    gendd("prepare", "--spec", str(DIGITS_SPEC), "--out", str(shards), "--shard-size", "256")
    gendd(
        "teacher",
        "--shards",
        str(shards),
        "--out",
        str(teacher),
        "--model",
        "test_efficientnet",
        "--epochs",
        "8",
        "--batch-size",
        "64",
    )
    gendd("extract", "--shards", str(shards), "--teacher", str(teacher), "--out", str(cache), "--views", "4")
    for method in METHODS:
        out = root / "students" / method
        gendd(
            "distill",
            "--shards",
            str(shards),
            "--cache",
            str(cache),
            "--out",
            str(out),
            "--student",
            "test_efficientnet",
            "--method",
            method,
            "--epochs",
            "10",
            "--batch-size",
            "64",
            *HEAD,
        )
        gendd(
            "evaluate",
            "--shards",
            str(shards),
            "--cache",
            str(cache),
            "--student-dir",
            str(out),
            "--out",
            str(root / "eval" / method),
            "--steps",
            "10",
            "--n-samples",
            "3",
        )
    return root


def _metrics(run: Path, method: str) -> dict:
    return json.loads((run / "eval" / method / "details.json").read_text())


def test_every_method_trains_and_evaluates(run: Path) -> None:
    for method in METHODS:
        metrics = _metrics(run, method)
        assert metrics["method"] == method and 0 <= metrics["probe_top1"] <= 100
        assert metrics["teacher_top1"] > 85, "the digits teacher should be far above chance"
        assert (run / "eval" / method / "per_class.png").is_file()
    for method in ("ce", "kd", "kl"):
        assert _metrics(run, method)["probe_top1"] > 85, method
    unsup = _metrics(run, "gendd_unsup")
    assert unsup["generative_top1"] > 50, "unsupervised GenDD learns without labels"
    assert unsup["probe_top1"] > 50, "its label-free probe is trained too"


def test_gendd_probe_is_high_and_generative_path_agrees(run: Path) -> None:
    metrics = _metrics(run, "gendd")
    assert metrics["probe_top1"] >= 90, metrics
    assert abs(metrics["probe_top1"] - metrics["generative_top1"]) <= 3.0, metrics


def test_exported_student_rebuilds_without_gendd(run: Path) -> None:
    out = run / "students" / "gendd"
    result = subprocess.run([sys.executable, "load_student.py"], cwd=out, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ready" in result.stdout, result.stderr
    namespace: dict = {}
    code = (out / "load_student.py").read_text().replace("here = pathlib.Path(__file__).parent", f"here = {str(out)!r}")
    code = code.replace("here /", "pathlib.Path(here) /")
    exec(compile(code, "load_student.py", "exec"), namespace)
    from pipeline.distill.student import load_student

    ours, _ = load_student(out)
    x = torch.randn(4, 1, 8, 8)
    assert torch.allclose(namespace["model"](x), ours.net(x), atol=1e-5)
