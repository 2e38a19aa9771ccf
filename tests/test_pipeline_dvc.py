"""`dvc repro` end to end on tiny params: runs, is idempotent, and a new student re-runs only its own stages."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT

TINY = {
    "prepare": {"shard-size": 64, "max-samples": 160},
    "teacher": {"model": "test_resnet", "epochs": 1, "batch-size": 64},
    "extract": {"views": 2, "batch-size": 256},
    "distill": {
        "epochs": 2,
        "warmstart-epochs": 1,
        "batch-size": 64,
        "token-dim": 32,
        "head-width": 32,
        "head-depth": 1,
        "diffusion-batch-mul": 1,
        "target-norm": False,
    },
    "evaluate": {"steps": 3, "n-samples": 1},
}


def _imported_code(module: str) -> set[str]:
    """Files of `pipeline` and `stages` that `module` imports, directly or not (imports inside functions too)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = ROOT / (name.replace(".", "/") + ".py")
        if not path.is_file():
            path = ROOT / name.replace(".", "/") / "__init__.py"
        if not path.is_file() or str(path.relative_to(ROOT)) in seen:
            continue
        seen.add(str(path.relative_to(ROOT)))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("pipeline", "stages"):
                todo += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names if alias.name.split(".")[0] in ("pipeline", "stages")]
    return seen


def _covered(path: str, deps: list[str]) -> bool:
    """Whether a dep of a stage is the file or a folder above it."""
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def _code_deps(stage: dict) -> list[str]:
    return [dep for dep in stage["deps"] if dep.startswith(("pipeline", "stages"))]


def test_every_stage_depends_on_the_code_it_runs() -> None:
    """A stage whose imported code is missing from its deps would not rerun when that code changes."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        missing = [path for path in _imported_code(f"stages.{name}") if not _covered(path, stage["deps"])]
        assert not missing, f"dvc.yaml stage {name} lacks deps {sorted(missing)}"


def test_stage_code_deps_are_narrow() -> None:
    """Each code dep is imported by its stage (no stale or spare folder), and the data stages depend on no
    student-side code: editing the GenDD head, the objectives or evaluation never reruns the teacher or the cache."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        imported = _imported_code(f"stages.{name}")
        spare = [dep for dep in _code_deps(stage) if not any(_covered(path, [dep]) for path in imported)]
        assert not spare, f"dvc.yaml stage {name} depends on code it does not import: {spare}"
    for name in ("prepare", "teacher", "extract"):
        for student_side in ("pipeline/distill/head.py", "pipeline/distill/objectives.py", "pipeline/evaluate/x.py"):
            assert not _covered(student_side, stages[name]["deps"]), f"{name} depends on {student_side}"
    assert len(_code_deps(stages["teacher"])) <= 14, "the teacher's code deps should be a handful of folders"


def test_the_narrowness_check_sees_a_student_side_dep() -> None:
    """The check itself: a folder dep above the head counts as depending on it."""
    assert _covered("pipeline/distill/head.py", ["pipeline/distill"])
    assert _covered("pipeline/distill/head.py", ["pipeline"])
    assert not _covered("pipeline/distill/head.py", ["pipeline/dist"])


_DRIFT = """
import json, sys
from dvc.repo import Repo
drift = {}
with Repo(".") as repo:  # run in the project: DVC resolves paths against the working directory
    for stage in repo.index.stages:
        if stage.dvcfile.relpath != "dvc.yaml":
            continue
        for dep in stage.deps:
            if dep.def_path.startswith(("pipeline", "stages", "data_specs", "params")) and (found := dep.status()):
                drift.setdefault(stage.addressing, {}).update(found)
print(json.dumps(drift))
"""


def lock_drift(root: Path) -> dict[str, dict]:
    """Stage of the main pipeline (`dvc.yaml`; the benchmarks have their own) -> what of its code, data specs and
    params differs from the committed dvc.lock (empty: none). In a fresh process: DVC keeps hashes it computed."""
    done = subprocess.run([sys.executable, "-c", _DRIFT], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_committed_lock_records_the_current_code_and_params() -> None:
    """dvc.lock is refreshed after every code change (`make run` on the final code): otherwise a fresh clone's
    `make run` reruns stages whose code changed and its figures need not be the README's."""
    drift = lock_drift(ROOT)
    assert not drift, f"dvc.lock is stale (run make run and commit dvc.lock): {drift}"


def test_lock_drift_sees_an_edited_code_folder(tmp_path: Path) -> None:
    """The check itself: in a small DVC project, an edit to a file in a code folder dep is drift of its stage."""
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "step.py").write_text("VALUE = 1\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  step:\n    cmd: python -c \"open('out.txt', 'w').write('x')\"\n    deps:\n      - pipeline\n"
        "    outs:\n      - out.txt\n"
    )
    _run(tmp_path, "git", "init", "-q")
    _run(tmp_path, sys.executable, "-m", "dvc", "init", "-q")
    _run(tmp_path, sys.executable, "-m", "dvc", "repro", "-q")
    assert lock_drift(tmp_path) == {}
    (tmp_path / "pipeline" / "step.py").write_text("VALUE = 2  # edited\n")  # DVC keys its hash cache by size and mtime
    assert lock_drift(tmp_path) == {"step": {"pipeline": "modified"}}


def _run(cwd: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the project's pipeline files in a fresh git + DVC repo, with tiny params."""
    if shutil.which("git") is None:
        pytest.skip("git is needed for DVC")
    root = tmp_path_factory.mktemp("project")
    for name in ("pipeline", "stages", "data_specs"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, root / name)

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for block, values in TINY.items():
        params[block].update(values)
    params["students"], params["methods"] = ["test_resnet"], ["ce", "kd", "gendd"]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(root, "git", "init", "-q")
    _run(root, sys.executable, "-m", "dvc", "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", root / ".dvc" / "config")  # parsing.bool: --no-flag for false
    shutil.copytree(ROOT / ".dvc" / "plots", root / ".dvc" / "plots")  # the report's curve template
    _run(root, "git", "add", "-A")
    _run(root, "git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "commit", "-qm", "init")
    return root


@pytest.mark.slow
def test_repro_runs_end_to_end_and_reports(project: Path) -> None:
    out = _run(project, sys.executable, "-m", "dvc", "repro")
    report = (project / "outputs" / "report" / "report.md").read_text()
    for method in ("ce", "kd", "gendd"):
        assert f"| test_resnet | {method} |" in report
    assert "| teacher |" in out  # the report stage prints the table
    assert (project / "data" / "cache" / "train.zarr").is_dir()


@pytest.mark.slow
def test_second_repro_does_nothing(project: Path) -> None:
    out = _run(project, sys.executable, "-m", "dvc", "repro")
    assert "Running stage" not in out and "up to date" in out


@pytest.mark.slow
def test_new_student_reruns_only_its_stages(project: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["students"].append("test_convnext")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = _run(project, sys.executable, "-m", "dvc", "status")
    changed = {line.rstrip(":") for line in status.splitlines() if line and not line.startswith((" ", "\t"))}
    assert changed and all("test_convnext" in stage or stage == "report" for stage in changed), changed
    out = _run(project, sys.executable, "-m", "dvc", "repro")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {f"{s}@test_convnext-{m}" for s in ("distill", "evaluate") for m in ("ce", "kd", "gendd")} | {
        "report"
    }


@pytest.mark.slow
def test_dag_metrics_and_plots(project: Path) -> None:
    assert "report" in _run(project, sys.executable, "-m", "dvc", "dag")
    assert "probe_top1" in _run(project, sys.executable, "-m", "dvc", "metrics", "show")
    _run(project, sys.executable, "-m", "dvc", "plots", "show", "-o", str(project / "plots"))
    assert (project / "plots" / "index.html").is_file()


@pytest.mark.slow
def test_editing_the_head_leaves_teacher_and_cache_up_to_date(project: Path) -> None:
    """After a repro, an edit to the GenDD head is a change of the distill (and evaluate) stages only: the teacher
    and the cache, the expensive stages, stay up to date in `dvc status`."""
    head = project / "pipeline" / "distill" / "head.py"
    original = head.read_text()
    assert "up to date" in _run(project, sys.executable, "-m", "dvc", "status")  # after the tests above
    try:
        head.write_text(original + "\n# an edit\n")
        status = _run(project, sys.executable, "-m", "dvc", "status")
    finally:
        head.write_text(original)
    changed = {line.rstrip(":") for line in status.splitlines() if line and not line.startswith((" ", "\t"))}
    assert {"prepare", "teacher", "extract"}.isdisjoint(changed), changed
    assert any(stage.startswith("distill@") for stage in changed), status


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.slow
def test_killed_repro_resumes_distill_from_its_checkpoint(project: Path) -> None:
    """`dvc repro` killed (SIGKILL, as a crash or a preempted machine) during distill: the rerun continues from the
    checkpoint DVC kept (persist), not from epoch 0, and ends with the weights of an uninterrupted run."""
    import signal
    import time

    import torch

    stage, run = "distill@test_resnet-kd", "test_resnet-kd"
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["distill"]["epochs"] = 12  # long enough to be killed in the middle
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ckpt = project / "outputs" / "train" / run / "checkpoint.pt"
    ckpt.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "dvc", "repro", stage]
    proc = subprocess.Popen(
        cmd, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # dvc and the gendd it runs, at once
    proc.wait()
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    reached = state["epoch"] + 1
    assert reached < 12, "the run finished before it was killed: nothing was tested"

    out = _run(project, *cmd)
    assert "resuming" in out and f"epoch {reached}" in out, out[-2000:]
    resumed = _weights(project / "outputs" / "students" / run / "student.safetensors")

    ckpt.unlink()  # the same stage uninterrupted
    _run(project, *cmd, "--single-item", "--force")
    uninterrupted = _weights(project / "outputs" / "students" / run / "student.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name
