"""Several teachers, one view plan: caches read side by side, ensemble targets, and the refusals of caches that differ.
End to end on the embedded digits through the real CLI: two teachers of different feature sizes (test_efficientnet 256,
test_resnet 96), kd and gendd distilled from both caches, evaluated with both."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.cache.ensemble import TeacherEnsemble, open_caches, readout
from pipeline.cache.store import open_cache
from pipeline.errors import GenddError
from pipeline.train.losses import kd_loss, teacher_log_probs

from .conftest import DIGITS_SPEC

HEAD = ["--token-dim", "32", "--head-width", "128", "--diffusion-batch-mul", "2"]


def gendd(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "stages.app", *args], capture_output=True, text=True, timeout=900)
    if ok:
        assert result.returncode == 0, f"gendd {' '.join(args)}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def refusal(*args: str) -> str:
    """The one line a refused command prints (no traceback)."""
    result = gendd(*args, ok=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Digits shards, two teachers of different architectures and their caches (4 views, seed 0 each), and a third
    cache of teacher a with another view seed."""
    root = tmp_path_factory.mktemp("ensemble")
    paths = {name: root / name for name in ("shards", "teacher_a", "teacher_b", "cache_a", "cache_b", "cache_a_seed1")}
    gendd("prepare", "--spec", str(DIGITS_SPEC), "--out", str(paths["shards"]), "--shard-size", "256")
    for name, model in (("a", "test_efficientnet"), ("b", "test_resnet")):
        teacher = paths[f"teacher_{name}"]
        gendd("teacher", "--shards", str(paths["shards"]), "--out", str(teacher), "--model", model, "--epochs", "4")
        extract = ["extract", "--shards", str(paths["shards"]), "--teacher", str(teacher)]
        gendd(*extract, "--out", str(paths[f"cache_{name}"]))
    extract = ["extract", "--shards", str(paths["shards"]), "--teacher", str(paths["teacher_a"])]
    gendd(*extract, "--out", str(paths["cache_a_seed1"]), "--seed", "1")
    return paths


def _distill(two: dict[str, Path], method: str, *caches: str, epochs: int = 6) -> Path:
    out = two["shards"].parent / "students" / f"{method}-{len(caches)}"
    cache_args = [arg for name in caches for arg in ("--cache", str(two[name]))]
    gendd(
        "distill", "--shards", str(two["shards"]), *cache_args, "--out", str(out), "--method", method,
        "--student", "test_efficientnet", "--epochs", str(epochs), "--batch-size", "64", *HEAD,
    )  # fmt: skip
    return out


def test_teacher_log_probs_are_the_mean_of_the_teachers_probabilities() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    assert torch.equal(teacher_log_probs(a, 7, 2.0), F.log_softmax(a / 2.0, dim=-1))
    mean = (F.softmax(a / 2.0, dim=-1) + F.softmax(b / 2.0, dim=-1)) / 2
    assert torch.allclose(teacher_log_probs(torch.cat([a, b], dim=-1), 7, 2.0).exp(), mean, atol=1e-6)
    # two copies of one teacher are that teacher
    s, y = torch.randn(5, 7, generator=gen), torch.randint(0, 7, (5,), generator=gen)
    one, both = kd_loss(s, a, y, 0.5, 4.0), kd_loss(s, torch.cat([a, a], dim=-1), y, 0.5, 4.0)
    assert math.isclose(float(one), float(both), rel_tol=1e-5)
    with pytest.raises(GenddError, match="not a multiple"):
        teacher_log_probs(torch.randn(5, 9), 7)


def test_caches_of_one_view_plan_read_side_by_side(two: dict[str, Path]) -> None:
    a, b = (open_cache(two[name], "train") for name in ("cache_a", "cache_b"))
    both = open_caches([two["cache_a"], two["cache_b"]], "train")
    assert isinstance(both, TeacherEnsemble) and both.teachers == 2
    assert both.teacher_dims == (a.feature_dim, b.feature_dim) == (256, 96)
    chunk, ca, cb = both.read_chunk(0), a.read_chunk(0), b.read_chunk(0)
    assert np.array_equal(ca["views"], cb["views"])  # extracted separately, the same views (checked, not assumed)
    assert np.array_equal(chunk["features"], np.concatenate([ca["features"], cb["features"]], axis=-1))
    assert np.array_equal(chunk["logits"], np.concatenate([ca["logits"], cb["logits"]], axis=-1))
    # the generative readout: the mean of each teacher's classifier on its own features
    w, bias = readout(both)
    f = np.concatenate([ca["features"][:, 0], cb["features"][:, 0]], axis=-1)
    mean_logits = ca["features"][:, 0] @ a.head_weight.T + a.head_bias + cb["features"][:, 0] @ b.head_weight.T
    mean_logits = (mean_logits + b.head_bias) / 2
    assert np.allclose(f @ w.T + bias, mean_logits, atol=1e-3)
    # one cache opens exactly as before
    assert not isinstance(open_caches([two["cache_a"]], "train"), TeacherEnsemble)


def test_caches_that_differ_are_refused_in_one_line(two: dict[str, Path], monkeypatch) -> None:
    base = ["distill", "--shards", str(two["shards"]), "--out", str(two["shards"].parent / "refused"), "--method", "kd"]
    line = refusal(*base, "--cache", str(two["cache_a"]), "--cache", str(two["cache_a_seed1"]))
    assert "views" in line and "same --views, --policy and --seed" in line
    line = refusal(*base, "--cache", str(two["cache_a"]), "--cache", str(two["cache_a"]))
    assert "same teacher" in line
    # views that differ chunk by chunk although the attributes agree (a cache tampered with, or a bug)
    a, b = (open_cache(two[name], "train") for name in ("cache_a", "cache_b"))
    both = TeacherEnsemble([a, b])
    real = b.read_chunk

    def shifted(i: int, dtype: type = np.float32, images: list[bytes] | None = None) -> dict:
        out = real(i, dtype)
        out["views"] = out["views"] + 1
        return out

    monkeypatch.setattr(b, "read_chunk", shifted)
    with pytest.raises(GenddError, match="other views"):
        both.read_chunk(0)


@pytest.mark.slow
def test_kd_and_gendd_distil_from_two_teachers_and_evaluate(two: dict[str, Path]) -> None:
    for method in ("kd", "gendd"):
        student = _distill(two, method, "cache_a", "cache_b")
        card = json.loads((student / "student.json").read_text())
        origin = card["extra"]["provenance"]
        assert origin["teachers"] == ["test_efficientnet", "test_resnet"]
        assert len(origin["teacher checkpoint sha256"]) == 2 and len(origin["feature cache"]) == 2
        out = two["shards"].parent / "eval" / method
        caches = ["--cache", str(two["cache_a"]), "--cache", str(two["cache_b"])]
        sampling = ["--steps", "10", "--n-samples", "3"]
        gendd("evaluate", "--shards", str(two["shards"]), *caches, "--student-dir", str(student), "--out", str(out),
              *sampling)  # fmt: skip
        metrics = json.loads((out / "details.json").read_text())
        assert metrics["teachers"] == ["test_efficientnet", "test_resnet"]
        for key in ("teacher_top1", "teacher1_top1", "teacher2_top1"):
            assert 50 < metrics[key] <= 100, (key, metrics[key])
        assert metrics["probe_top1"] > 80, metrics["probe_top1"]
        if method == "gendd":
            assert metrics["generative_top1"] > 70, metrics["generative_top1"]
        # the student's caches in another order (or one of them) are refused
        line = refusal(
            "evaluate", "--shards", str(two["shards"]), "--cache", str(two["cache_b"]), "--cache", str(two["cache_a"]),
            "--student-dir", str(student), "--out", str(out.parent / "refused"), "--fast",
        )  # fmt: skip
        assert "distilled from" in line


@pytest.mark.slow
def test_token_dim_must_not_span_two_teachers(two: dict[str, Path]) -> None:
    args = ["distill", "--shards", str(two["shards"]), "--cache", str(two["cache_a"]), "--cache", str(two["cache_b"])]
    line = refusal(*args, "--out", str(two["shards"].parent / "odd"), "--method", "gendd", "--token-dim", "64")
    assert "does not divide teacher feature size 96" in line


def test_report_labels_runs_by_their_teachers() -> None:
    from pipeline.evaluate.report import markdown_table

    base = {"student": "s", "probe_top5": 99.0, "train_seconds": 1.0}
    single = [{**base, "method": "kd", "probe_top1": 90.0, "teacher_top1": 91.0}]
    single.append({**base, "method": "gendd", "probe_top1": 89.0, "teacher_top1": 91.0, "generative_top1": 88.0})
    table = markdown_table(single, None)
    assert "teachers" not in table and "| s | gendd | 89.00 | 88.00 | -1.00 |" in table  # one teacher: as before
    both = [{**r, "teachers": ["a", "b"], "teacher_top1": 93.0, "probe_top1": r["probe_top1"] + 2} for r in single]
    table = markdown_table(single + both, None)
    assert "| student | method | teachers | probe top-1 |" in table
    assert "| teacher | - | a+b | 93.00 |" in table and "| teacher | - | - | 91.00 |" in table
    assert "| s | gendd | a+b | 91.00 | 88.00 | -1.00 |" in table  # against the KD of the same teachers
    assert "| s | gendd | - | 89.00 | 88.00 | -1.00 |" in table
