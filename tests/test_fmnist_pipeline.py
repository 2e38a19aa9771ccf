"""The Fashion-MNIST comparison pipeline (benchmarks/fmnist): its params are options of the commands they feed, its
table is right, and `dvc repro table@<part>` runs end to end (on the digits, standing in for Fashion-MNIST)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml

from pipeline.config import METHODS
from stages.app import app

from .conftest import ROOT
from .test_pipeline_dvc import _run

BENCH = ROOT / "benchmarks" / "fmnist"
STAGE_BLOCKS = {"prepare": "prepare", "teacher": "teacher", "teacher-b": "teacher", "extract": "extract"}
STAGE_BLOCKS |= {"distill": "distill", "evaluate": "evaluate"}  # params block -> the stage it feeds


def _table_module():
    spec = importlib.util.spec_from_file_location("fmnist_table", BENCH / "table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _options(stage: str) -> set[str]:
    """Every `--name` (and `--no-name`) that `gendd <stage>` accepts."""
    command = typer.main.get_command(app).commands[stage]
    return {opt.lstrip("-") for param in command.params for opt in (*param.opts, *param.secondary_opts)}


@pytest.mark.parametrize(
    "params_file", [BENCH / "params.yaml", ROOT / "params.yaml", ROOT / "params" / "fashion_mnist.yaml"]
)
def test_every_param_is_an_option_of_its_stage(params_file: Path) -> None:
    """A misspelt key would fail only after an hour of teacher training and extraction."""
    params = yaml.safe_load(params_file.read_text())
    for block, stage in STAGE_BLOCKS.items():
        unknown = set(params.get(block) or {}) - _options(stage)
        assert not unknown, f"{params_file.name}: {block} has no option(s) {sorted(unknown)}"
    methods = params["methods"]
    names = [m for ms in methods.values() for m in ms] if isinstance(methods, dict) else methods
    assert set(names) <= set(METHODS)


def test_every_spec_and_part_is_wired() -> None:
    """Each data spec the pipeline reads exists, and every part in params has distill, evaluate and table stages."""
    stages = yaml.safe_load((BENCH / "dvc.yaml").read_text())["stages"]
    for spec in stages["prepare"]["foreach"]:
        assert (ROOT / "data_specs" / f"{spec}.yaml").is_file()
    params = yaml.safe_load((BENCH / "params.yaml").read_text())
    parts = set(params["methods"]) - {"ensemble"}
    assert set(stages["table"]["foreach"]) == parts
    for part in parts:
        assert f"distill-{part}" in stages and f"evaluate-{part}" in stages
    for folder in params["ensemble-sets"]:  # the ensemble part: one distill and evaluate block per teacher set
        assert f"distill-ensemble-{folder}" in stages and f"evaluate-ensemble-{folder}" in stages
    assert "table-ensemble" in stages


def _details(probe: float, generative: float | None = None, per_class: list[float] | None = None) -> dict:
    record = {"probe_top1": probe, "teacher_top1": 90.0, "train_seconds": 10.0, "eval_seconds": 2.0}
    if generative is not None:
        record["generative_top1"] = generative
    record["probe_per_class"] = per_class or [probe] * 3
    return record


def test_table_rows_against_kd_of_the_same_student_and_seed(tmp_path: Path) -> None:
    table = _table_module()
    params = {"students": ["a", "b"], "seeds": [0, 1], "methods": {"balanced": ["kd", "gendd"]}}
    probes = {("a", "kd", 0): 80.0, ("a", "gendd", 0): 81.5, ("a", "kd", 1): 79.0, ("a", "gendd", 1): 78.0}
    probes |= {("b", "kd", 0): 70.0, ("b", "gendd", 0): 69.0, ("b", "kd", 1): 71.0, ("b", "gendd", 1): 72.25}
    for (student, method, seed), probe in probes.items():
        run = tmp_path / f"{student}-{method}-s{seed}"
        run.mkdir()
        details = _details(probe, probe - 1 if method == "gendd" else None)
        (run / "details.json").write_text(json.dumps(details))
    rows = table.read_rows("balanced", tmp_path, params)
    assert [(r["student"], r["method"], r["seed"]) for r in rows] == [
        ("a", "kd", 0), ("a", "kd", 1), ("a", "gendd", 0), ("a", "gendd", 1),
        ("b", "kd", 0), ("b", "kd", 1), ("b", "gendd", 0), ("b", "gendd", 1),
    ]  # fmt: skip
    lines = table.markdown(rows).splitlines()[2:]
    assert lines[2] == "| balanced | a | gendd | 0 | 81.50 | 80.50 | +1.50 | - | 90.00 |  | 12 |"
    assert lines[3].split(" | ")[6] == "-1.00"  # seed 1 against seed 1's KD (79.00), not seed 0's
    assert lines[7].split(" | ")[6] == "+1.25"
    assert lines[0].split(" | ")[5:7] == ["-", "+0.00"]
    means = table.seed_means(rows).splitlines()[2:]
    assert means[1] == "| balanced | a | gendd | 0, 1 | 79.75 | 78.75 | +0.25 | - |"  # (81.5 + 78) / 2 - 79.5
    assert means[3].split(" | ")[6] == "+0.12"  # b: 70.625 - 70.5


def test_table_names_a_missing_run(tmp_path: Path) -> None:
    params = {"students": ["a"], "seeds": [0], "methods": {"unlabeled": ["kl"]}}
    with pytest.raises(SystemExit, match=r"a-kl-s0/details.json is missing: run `dvc repro table@unlabeled`"):
        _table_module().read_rows("unlabeled", tmp_path, params)


def test_ideas_record_reads_every_run_and_draws_both_panels(tmp_path: Path) -> None:
    """benchmarks/fmnist/ideas.py: one row per (idea, evaluation, seed) with the distill options of its log; an
    evaluation without details.json is left out; the figure has a GenDD panel against KD and one against KL."""
    spec = importlib.util.spec_from_file_location("fmnist_ideas", BENCH / "ideas.py")
    ideas = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ideas)
    runs = tmp_path / "runs"
    for idea, method, options, probe in [
        ("base", "gendd", "", 87.0),
        ("tpow", "gendd", "--timestep-power 0.5", 88.0),
        ("kd", "kd", "--method kd", 89.0),
        ("unsup", "gendd_unsup", "--method gendd_unsup", 86.0),
        ("kl", "kl", "--method kl", 87.5),
    ]:
        for seed in (0, 1):
            run = runs / idea / f"s{seed}"
            (run / "eval").mkdir(parents=True)
            (run / "log.txt").write_text(f"== 2026-12-01T00:00:00Z distill {idea} s{seed}: {options}\nmore\n")
            details = {"method": method, "probe_top1": probe + seed, "refit_top1": probe + 1, "sampling": {}}
            (run / "eval" / "details.json").write_text(json.dumps(details))
    (runs / "base" / "s0" / "eval-ddpm").mkdir()  # an evaluation still running: no details.json yet
    rows = ideas.read_runs(runs)
    assert len(rows) == 10
    tpow = [r for r in rows if r["idea"] == "tpow"]
    assert [r["seed"] for r in tpow] == [0, 1] and tpow[1]["probe_top1"] == 89.0
    assert tpow[0]["options"] == "--timestep-power 0.5" and tpow[0]["generative_top1"] is None
    out = tmp_path / "out" / "record"
    out.parent.mkdir()
    assert ideas.plot(rows, out.with_suffix(".png")) == [("kd", "gendd"), ("kl", "gendd_unsup")]
    assert out.with_suffix(".png").stat().st_size > 1000


def test_shot_groups() -> None:
    groups = _table_module().shot_groups([90.0, 80.0, 60.0, 40.0], [5000, 1000, 500, 50])
    assert groups == {"many": 85.0, "medium": 60.0, "few": 40.0}


def _project(tmp_path: Path) -> tuple[Path, dict]:
    """A copy of the project in a fresh git + DVC repo, the digits standing in for every Fashion-MNIST spec, with
    tiny params (written back by the caller)."""
    if shutil.which("git") is None:
        pytest.skip("git is needed for DVC")
    root = tmp_path / "project"
    for name in ("pipeline", "stages", "data_specs"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(
        BENCH, root / "benchmarks" / "fmnist", ignore=shutil.ignore_patterns("data", "eval", "students", "work")
    )
    shutil.copy(ROOT / "benchmarks" / "benchlib.py", root / "benchmarks" / "benchlib.py")  # table.py's helpers
    digits = yaml.safe_load((ROOT / "data_specs" / "digits.yaml").read_text())
    for spec in yaml.safe_load((BENCH / "dvc.yaml").read_text())["stages"]["prepare"]["foreach"]:
        (root / "data_specs" / f"{spec}.yaml").write_text(yaml.safe_dump({**digits, "name": spec}))
    params = yaml.safe_load((root / "benchmarks" / "fmnist" / "params.yaml").read_text())
    params |= {
        "profile": "test",
        "source-data": "../../data_specs/digits.yaml",
        "students": ["test_resnet"],
        "seeds": [0],
    }
    params["methods"]["balanced"] = ["kd", "gendd"]
    params["prepare"] |= {"shard-size": 64, "max-samples": 128}
    params["teacher"] |= {"model": "test_resnet", "epochs": 1, "batch-size": 64}
    params["extract"] |= {"views": 2}
    params["distill"] |= {"epochs": 1, "batch-size": 64, "token-dim": 16, "head-width": 32, "head-depth": 1}
    params["evaluate"] |= {"steps": 2, "n-samples": 1}
    _run(root, "git", "init", "-q")
    _run(root, sys.executable, "-m", "dvc", "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", root / ".dvc" / "config")  # parsing.bool: --no-flag for false
    return root, params


@pytest.mark.slow
def test_repro_of_a_part_writes_its_table(tmp_path: Path) -> None:
    """`dvc repro table@balanced` in a copy of the project, the digits standing in for every Fashion-MNIST spec."""
    root, params = _project(tmp_path)
    (root / "benchmarks" / "fmnist" / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(root / "benchmarks" / "fmnist", sys.executable, "-m", "dvc", "repro", "table@balanced")
    result = json.loads((root / "benchmarks" / "results" / "accuracy_fmnist_test_balanced.json").read_text())
    assert [(r["method"], r["seed"]) for r in result["rows"]] == [("kd", 0), ("gendd", 0)]
    assert "generative_top1" in result["rows"][1] and "generative_top1" not in result["rows"][0]
    md = (root / "benchmarks" / "results" / "accuracy_fmnist_test_balanced.md").read_text()
    assert "| balanced | test_resnet | gendd | 0 |" in md
    assert not (root / "benchmarks" / "fmnist" / "data" / "fashion_mnist_lt").exists()  # only the part's own data
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "table@balanced"],
        cwd=root / "benchmarks" / "fmnist",
        capture_output=True,
        text=True,
    )
    assert "up to date" in status.stdout, status.stdout


@pytest.mark.slow
def test_repro_of_the_ensemble_part_writes_its_table(tmp_path: Path) -> None:
    """`dvc repro table-ensemble`: a second teacher of another feature size, students of a, b and a+b, the table."""
    root, params = _project(tmp_path)
    params["teacher-b"] = {**params["teacher"], "model": "test_efficientnet"}  # feature size 256; test_resnet's 96
    params["methods"]["ensemble"] = ["kd", "gendd"]
    (root / "benchmarks" / "fmnist" / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(root / "benchmarks" / "fmnist", sys.executable, "-m", "dvc", "repro", "table-ensemble")
    result = json.loads((root / "benchmarks" / "results" / "accuracy_fmnist_test_ensemble.json").read_text())
    teachers = ["test_resnet", "test_efficientnet", "test_resnet+test_efficientnet"]
    assert [(r["teachers"], r["method"]) for r in result["rows"]] == [(t, m) for t in teachers for m in ("kd", "gendd")]
    assert result["rows"][-1]["teachers"] == "test_resnet+test_efficientnet"
    assert [c["D"] for c in result["costs"]] == [96, 256] and all(c["extract_s"] > 0 for c in result["costs"])
    assert any(k.startswith("test_resnet gendd: ensemble - best single") for k in result["summary"])
