# ruff: noqa: F811 (fixtures imported from test_extract are parameters here)
"""Shards and caches written straight to object storage: a real S3 endpoint on 127.0.0.1 (moto's server, see
conftest.S3Server) that s3fs, zarr and botocore talk to over HTTP exactly as to a cloud bucket."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline import locations
from pipeline.cache.store import FeatureCacheWriter, open_cache
from pipeline.config import ExtractConfig
from pipeline.data.prepare import prepare_shards
from pipeline.data.specs import load_spec
from pipeline.errors import GenddError
from pipeline.extract.extract import extract

from .conftest import DIGITS_SPEC, ROOT, S3Server
from .test_extract import BATCH, K, Teacher, cfg, reference, teacher  # noqa: F401 (fixtures)
from .test_faults import run_cli

pytest.importorskip("s3fs", reason="s3fs (the s3 extra, in the dev extra) writes s3://")


def _objects(url: str) -> dict[str, bytes]:
    """Every object under a prefix, by its path below it."""
    import s3fs

    fs = s3fs.S3FileSystem()
    root = url.removeprefix("s3://").rstrip("/")
    return {path[len(root) + 1 :]: fs.cat_file(path) for path in fs.find(root)}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_extract_into_s3_writes_the_local_store_object_for_object(
    cfg: ExtractConfig, reference: Path, teacher: Teacher, s3: S3Server, capsys: pytest.CaptureFixture
) -> None:
    """`extract --out s3://...` makes, chunk for chunk, the bytes a local extraction makes; `cache info` and
    `cache verify` read it there."""
    url = s3.bucket() + "/cache"
    results = extract(replace(cfg, out=url))
    assert [r["complete"] for r in results] == [True, True]
    for split in ("train", "val"):
        assert _objects(f"{url}/{split}.zarr") == _files(reference / f"{split}.zarr"), split
    remote, local = open_cache(url, "train").info(), open_cache(reference, "train").info()
    assert remote["stored_bytes"] == local["stored_bytes"] and remote["damage"] == []
    code, _, raw = run_cli(capsys, "cache", "info", url)
    assert code == 0, raw
    code, _, raw = run_cli(capsys, "cache", "verify", url, "--teacher", teacher.dir, "--shards", cfg.shards)
    assert code == 0, raw


def test_two_processes_fill_one_bucket_like_one_process(
    cfg: ExtractConfig, reference: Path, teacher: Teacher, s3: S3Server
) -> None:
    """Two extraction processes at once, each its share of the chunks, into one S3 store (a fleet of one bucket):
    the same objects as one local process, completed by whichever finished last."""
    url = s3.bucket() + "/cache"
    code = textwrap.dedent(
        f"""
        import sys, torch
        from pipeline.config import ExtractConfig
        from pipeline.extract.extract import TeacherRunner, extract_split
        cfg = ExtractConfig({str(cfg.shards)!r}, {str(teacher.dir)!r}, {url!r}, ("train",), {K}, batch_size={BATCH},
                            cpu=True, workers=0)
        result = extract_split(cfg, "train", TeacherRunner(cfg.teacher, torch.device("cpu"), None),
                               rank=int(sys.argv[1]), world=2)
        result["writer"].finalize()
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(rank)], env=env) for rank in (0, 1)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert _objects(f"{url}/train.zarr") == _files(reference / "train.zarr")


def test_an_outage_mid_extract_is_one_line_and_the_rerun_finishes_the_same_store(
    cfg: ExtractConfig, reference: Path, s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The S3 endpoint goes away after two chunks: the retries run out and extraction stops with one line naming
    the store; back up, a re-run writes only what is missing and ends with the bytes of an uninterrupted local run."""
    url = s3.bucket() + "/cache"
    run = replace(cfg, out=url, splits=("train",))
    real, written = FeatureCacheWriter.write_chunk, []

    def then_outage(self, i, *args, **kwargs):
        real(self, i, *args, **kwargs)
        written.append(i)
        if len(written) == 2:
            s3.stop()

    with monkeypatch.context() as patch:
        patch.setattr(FeatureCacheWriter, "write_chunk", then_outage)
        try:
            with pytest.raises(GenddError) as err:
                extract(run)
        finally:
            s3.start()
    message = str(err.value)
    assert "\n" not in message and f"{url}/train.zarr" in message and "3 attempts" in message, message
    assert open_cache(url, "train", allow_incomplete=True).info()["chunks_done"] == 2
    (result,) = extract(run)
    assert result["chunks_written"] == 2 and result["complete"] is True
    assert _objects(f"{url}/train.zarr") == _files(reference / "train.zarr")


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_prepare_extract_distill_evaluate_entirely_through_s3(
    fmt: str, teacher: Teacher, s3: S3Server, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole student side from one bucket: shards uploaded by prepare, a cache of either format extracted into
    it, a student distilled (streamed) and evaluated from it."""
    monkeypatch.setenv("GENDD_STAGE_DIR", str(tmp_path / "stage"))
    bucket = s3.bucket()
    shards, cache = f"{bucket}/shards", f"{bucket}/cache"
    index, wrote = prepare_shards(load_spec(DIGITS_SPEC), shards, shard_size=64, max_samples=200)
    assert wrote and index.split("train").n == 200 and "index.json" in _objects(shards)
    assert prepare_shards(load_spec(DIGITS_SPEC), shards, shard_size=64, max_samples=200)[1] is False  # up to date
    extract(ExtractConfig(shards, teacher.dir, cache, num_views=2, batch_size=BATCH, fmt=fmt, cpu=True, workers=0))
    student, evals = tmp_path / "student", tmp_path / "eval"
    args = ["--shards", shards, "--cache", cache, "--out", student, "--student", "test_resnet", "--method", "kd"]
    args += ["--epochs", "1", "--batch-size", "64", "--data", "stream", "--workers", "1", "--device", "cpu"]
    code, _, raw = run_cli(capsys, "distill", *args)
    assert code == 0, raw
    args = ["--shards", shards, "--cache", cache, "--student-dir", student, "--out", evals, "--fast", "--device", "cpu"]
    code, _, raw = run_cli(capsys, "evaluate", *args)
    assert code == 0 and (evals / "metrics.json").is_file(), raw


def test_a_bad_bucket_or_missing_credentials_is_one_line_before_any_work(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs

    with pytest.raises(GenddError, match=r"bucket gendd-none-such does not exist: create it"):
        locations.probe_writable("s3://gendd-none-such/cache")
    with pytest.raises(GenddError, match=r"cannot write http:// locations"):
        locations.check_out("http://127.0.0.1:9/cache")
    bucket = s3.bucket()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(GenddError, match=r"no credentials to write s3://"):
            locations.probe_writable(f"{bucket}/cache")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()  # the next test's clients read the restored credentials


def test_dvc_remote_on_s3_shares_outputs_between_clones(s3: S3Server, tmp_path: Path) -> None:
    """The README's sharing recipe: `dvc remote add` an S3 remote, `dvc push`; a second clone `dvc pull`s the
    outputs and `dvc repro` there has nothing to do."""
    pytest.importorskip("dvc_s3", reason="dvc-s3 (in the dev extra) pushes to s3://")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@example.com"}
    env |= {"GIT_COMMITTER_NAME": "ci", "GIT_COMMITTER_EMAIL": "ci@example.com"}
    dvc = [sys.executable, "-m", "dvc"]

    def run(cwd: Path, *args: str) -> str:
        done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        return done.stdout + done.stderr

    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    run(first, "git", "init", "-q")
    run(first, *dvc, "init", "-q")
    (first / "dvc.yaml").write_text(
        "stages:\n  make:\n    cmd: python -c \"open('out.bin', 'wb').write(bytes(range(256)) * 64)\"\n"
        "    outs:\n      - out.bin\n"
    )
    run(first, *dvc, "repro", "-q")
    run(first, *dvc, "remote", "add", "-d", "shared", f"{s3.bucket()}/dvcstore")
    run(first, "git", "add", "-A")
    run(first, "git", "commit", "-qm", "pipeline")
    assert "1 file pushed" in run(first, *dvc, "push")
    run(tmp_path, "git", "clone", "-q", str(first), str(second))
    run(second, *dvc, "pull")
    assert (second / "out.bin").read_bytes() == (first / "out.bin").read_bytes()
    assert "up to date" in run(second, *dvc, "status")
    assert "Running stage" not in run(second, *dvc, "repro")
