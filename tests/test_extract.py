"""Extraction: cached values replay the teacher, resume and multi-writer fills are byte-identical, refusals are clear.

One tiny random teacher (timm's `test_resnet`, 96-d features) over the digits shards (200 samples per split, shards of
64, so 4 chunks with a partial last one); batches of 50 (sample, view) pairs so every chunk takes several forwards.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from pipeline.cache.store import FeatureCacheWriter, open_cache
from pipeline.config import ExtractConfig, ViewPolicy
from pipeline.data.shards import ShardIndex, read_shard
from pipeline.data.views import apply_views, sample_views
from pipeline.errors import GenddError
from pipeline.extract.extract import TeacherRunner, extract, extract_split
from pipeline.models import ModelCard, create_model, feature_dim, features, linear_head, save_model, sha256_file

K, BATCH, SIZE, CHUNKS = 3, 50, 8, 4  # 200 samples / 64 per shard -> 4 chunks
ARRAYS = ("features", "logits", "views", "labels", "keys", "head/weight", "head/bias", "done")


@dataclass(frozen=True)
class Teacher:
    """A saved teacher and the in-memory model it was saved from (the independent reference)."""

    dir: Path
    model: nn.Module
    sha256: str


def _make_teacher(out: Path, index: ShardIndex, seed: int, extra: dict | None) -> Teacher:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = create_model("test_resnet", 10, 1, small_stem=True).eval()
    for module in model.modules():  # undo timm's zero-init of each block's last BN, so features depend on the view
        if isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
    spec = index.spec
    card = ModelCard(
        "test_resnet", 10, 1, True, SIZE, tuple(spec["mean"]), tuple(spec["std"]), feature_dim(model, 1, SIZE), extra
    )
    weights = save_model(model, card, out, "teacher")
    return Teacher(out, model, sha256_file(weights))


@pytest.fixture(scope="module")
def teacher(digits_shards: ShardIndex, tmp_path_factory: pytest.TempPathFactory) -> Teacher:
    """The teacher every cache here is built with."""
    extra = {"spec_hash": digits_shards.spec_hash}
    return _make_teacher(tmp_path_factory.mktemp("teacher"), digits_shards, 0, extra)


@pytest.fixture(scope="module")
def cfg(digits_shards: ShardIndex, teacher: Teacher, tmp_path_factory: pytest.TempPathFactory) -> ExtractConfig:
    """The reference extraction's config (train with K views, val with the identity only)."""
    out = tmp_path_factory.mktemp("cache")
    return ExtractConfig(digits_shards.root, teacher.dir, out, ("train", "val"), K, batch_size=BATCH, cpu=True)


@pytest.fixture(scope="module")
def reference(cfg: ExtractConfig) -> Path:
    """One uninterrupted extraction; returns the cache directory."""
    results = extract(cfg)
    assert [(r["split"], r["K"], r["chunks_written"], r["complete"]) for r in results] == [
        ("train", K, CHUNKS, True),
        ("val", 1, CHUNKS, True),
    ]
    return cfg.out


def _arrays(store: Path) -> dict[str, np.ndarray]:
    group = zarr.open(str(store), mode="r")
    return {name: group[name][:] for name in ARRAYS}


def _assert_same_arrays(a: Path, b: Path) -> None:
    got, want = _arrays(a), _arrays(b)
    for name in ARRAYS:
        if name == "keys":
            assert got[name].tolist() == want[name].tolist()
        else:
            assert got[name].dtype == want[name].dtype, name
            assert np.array_equal(got[name], want[name]), f"{name} differs"
    assert zarr.open(str(a), mode="r").attrs.asdict() == zarr.open(str(b), mode="r").attrs.asdict()


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _crash_after(monkeypatch: pytest.MonkeyPatch, n_ok: int) -> list[int]:
    """Make `write_chunk` fail after `n_ok` chunks (a killed run); returns the chunk indices written."""
    original, written = FeatureCacheWriter.write_chunk, []

    def write_chunk(self: FeatureCacheWriter, i: int, *args, **kwargs) -> None:
        if len(written) >= n_ok:
            raise RuntimeError("simulated crash")
        original(self, i, *args, **kwargs)
        written.append(i)

    monkeypatch.setattr(FeatureCacheWriter, "write_chunk", write_chunk)
    return written


def _record_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    return _crash_after(monkeypatch, 10**9)


def _replay(index: ShardIndex, split: str, samples: np.ndarray, views: np.ndarray) -> torch.Tensor:
    """Normalised teacher inputs of `samples` seen through `views` (B, 5), images decoded from the shards."""
    shards = index.split(split)
    images = []
    for p in samples:
        shard = int(np.searchsorted(shards.starts, p, side="right") - 1)
        images.append(read_shard(shards.path(shard)).images[p - shards.starts[shard]])
    return apply_views(torch.stack(images), torch.from_numpy(views), SIZE, index.spec["mean"], index.spec["std"])


def _one_line_with_fix(err: pytest.ExceptionInfo, fix: str) -> None:
    message = str(err.value)
    assert "\n" not in message and fix in message, message


# ---- what is cached ---------------------------------------------------------------------------------------------


def test_cached_features_replay_the_teacher(reference: Path, teacher: Teacher, digits_shards: ShardIndex) -> None:
    cache = open_cache(reference, "train", teacher_sha256=teacher.sha256, spec_hash=digits_shards.spec_hash)
    samples = np.array([0, 63, 64, 130, 199])  # first/last of a shard, a middle shard, the partial last one
    got = cache.read(samples)
    keys = [cache.keys[i].decode() for i in samples]
    assert np.array_equal(got["views"], sample_views(keys, K, ViewPolicy(), 0, SIZE))
    for view in range(K):
        with torch.no_grad():
            fresh = features(teacher.model, _replay(digits_shards, "train", samples, got["views"][:, view])).numpy()
        scale = np.abs(fresh).max()
        np.testing.assert_allclose(got["features"][:, view], fresh, rtol=0, atol=1e-3 * scale)
    # the check above can fail: other views give features that differ far beyond the tolerance
    assert np.abs(got["features"][:, 1] - got["features"][:, 0]).max() > 2e-2 * np.abs(got["features"]).max()


def test_stored_views_are_the_seeded_views_of_every_key(reference: Path) -> None:
    cache = open_cache(reference, "train")
    views, keys = cache.load_all()["views"], np.strings.decode(cache.keys).tolist()
    assert np.array_equal(views, sample_views(keys, K, ViewPolicy(), 0, SIZE))
    assert not np.array_equal(views, sample_views(keys, K, ViewPolicy(), 1, SIZE))  # the seed matters
    val = open_cache(reference, "val")
    assert val.K == 1 and np.array_equal(val.load_all()["views"], np.tile([0, 0, 1, 1, 0], (200, 1, 1)))


def test_logits_are_the_stored_head_on_the_features(
    reference: Path, teacher: Teacher, digits_shards: ShardIndex
) -> None:
    cache = open_cache(reference, "train")
    head = linear_head(teacher.model)
    assert np.array_equal(cache.head_weight, head.weight.detach().numpy())
    assert np.array_equal(cache.head_bias, head.bias.detach().numpy())
    data = cache.load_all()
    f, z = data["features"], data["logits"]  # (N, K, D), (N, K, C)
    # fp16 rounds each stored value by <= 2^-11 relative; bound the error that propagates through the head
    bound = (np.abs(f) @ np.abs(cache.head_weight).T + np.abs(z)) * 2.0**-10 + 1e-6
    assert (np.abs(z - (f @ cache.head_weight.T + cache.head_bias)) <= bound).all()
    assert not (np.abs(z - f @ cache.head_weight.T) <= bound).all()  # a head without its bias would fail
    # and they are the teacher's own logits (its full forward) on the replayed views
    samples = np.array([5, 100, 190])
    with torch.no_grad():
        fresh = teacher.model(_replay(digits_shards, "train", samples, data["views"][samples, 2])).numpy()
    np.testing.assert_allclose(z[samples, 2], fresh, rtol=0, atol=1e-3 * np.abs(fresh).max())


def test_zarr_layout_and_attributes(reference: Path, teacher: Teacher, digits_shards: ShardIndex) -> None:
    group = zarr.open(str(reference / "train.zarr"), mode="r")
    n, d, c = 200, 96, 10
    expected = {
        "features": ((n, K, d), np.float16),
        "logits": ((n, K, c), np.float16),
        "views": ((n, K, 5), np.float32),
        "labels": ((n,), np.int32),
        "head/weight": ((c, d), np.float32),
        "head/bias": ((c,), np.float32),
        "done": ((CHUNKS,), np.bool_),
    }
    for name, (shape, dtype) in expected.items():
        assert group[name].shape == shape and group[name].dtype == dtype, name
    for name in ("features", "logits", "views"):
        assert group[name].chunks[0] == digits_shards.shard_size == 64
    assert group["keys"].shape == (n,)
    assert group["keys"][:].tolist() == [f"digits-train-{i:07d}" for i in range(n)]
    assert group["done"][:].all()
    assert set(group["labels"][:].tolist()) <= set(range(10))
    attrs = group.attrs.asdict()
    assert attrs["schema_version"] == 1 and attrs["complete"] is True and attrs["codec"] == "zstd"
    t = attrs["teacher"]
    assert (t["checkpoint_sha256"], t["feature_dim"], t["num_classes"], t["input_size"]) == (teacher.sha256, d, c, 8)
    assert (t["mean"], t["std"], t["name"]) == ([0.3], [0.38], "test_resnet")
    assert attrs["dataset"]["spec_hash"] == digits_shards.spec_hash and attrs["dataset"]["n"] == n
    assert attrs["dataset"]["shard_sha256"] == list(digits_shards.split("train").hashes)  # one per image shard
    assert attrs["views"] == {"K": K, "policy": ViewPolicy().to_dict(), "seed": 0}


# ---- resume, idempotence, several writers ------------------------------------------------------------------------


def test_killed_extraction_resumes_to_identical_bytes(
    cfg: ExtractConfig, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = replace(cfg, out=tmp_path, splits=("train",))
    store = tmp_path / "train.zarr"
    with monkeypatch.context() as patch:
        written = _crash_after(patch, 2)
        with pytest.raises(RuntimeError, match="simulated crash"):
            extract(run)
    assert written == [0, 1]
    group = zarr.open(str(store), mode="r")
    assert group.attrs["complete"] is False and group["done"][:].tolist() == [True, True, False, False]
    with pytest.raises(GenddError) as err:
        open_cache(tmp_path, "train")
    _one_line_with_fix(err, "gendd extract")
    assert "incomplete" in str(err.value) and "2 of 4" in str(err.value)

    before = _mtimes(store)
    written = _record_writes(monkeypatch)
    (result,) = extract(run)
    assert written == [2, 3] and result["chunks_written"] == 2 and result["complete"] is True
    after = _mtimes(store)
    for name in ("features", "logits", "views"):  # finished chunks were not rewritten
        for chunk in ("0", "1"):
            path = f"{name}/c/{chunk}/0/0"
            assert after[path] == before[path], path
    assert zarr.open(str(store), mode="r").attrs["complete"] is True
    _assert_same_arrays(store, reference / "train.zarr")

    written.clear()
    (again,) = extract(run)
    assert written == [] and again["chunks_written"] == 0 and again["complete"] is True
    assert _mtimes(store) == after


def test_two_ranks_fill_one_store_like_one_process(
    cfg: ExtractConfig, reference: Path, teacher: Teacher, tmp_path: Path
) -> None:
    run = replace(cfg, out=tmp_path, splits=("train",))
    runner = TeacherRunner(teacher.dir, torch.device("cpu"), None)
    first = extract_split(run, "train", runner, rank=0, world=2)
    assert first["chunks_written"] == 2
    assert zarr.open(str(tmp_path / "train.zarr"), mode="r")["done"][:].tolist() == [True, False, True, False]
    assert first["writer"].finalize() is False  # rank 1's chunks are missing: not complete yet
    assert open_cache(tmp_path, "train", allow_incomplete=True).complete is False
    second = extract_split(run, "train", runner, rank=1, world=2)
    assert second["chunks_written"] == 2
    assert second["writer"].finalize() is True
    _assert_same_arrays(tmp_path / "train.zarr", reference / "train.zarr")


def test_decode_worker_processes_write_the_same_store(cfg: ExtractConfig, reference: Path, tmp_path: Path) -> None:
    """Shards decoded in two worker processes (the GPU-host setting; one pool serves both splits) give the store one
    reader thread gives; the result times the pipeline fill apart from the rest."""
    results = extract(replace(cfg, out=tmp_path, workers=2))
    for split in ("train", "val"):
        _assert_same_arrays(tmp_path / f"{split}.zarr", reference / f"{split}.zarr")
    train = results[0]
    assert 0 < train["first_chunk_s"] < train["seconds"]
    assert train["chunks_written"] < 2 or train["steady_views_per_s"] > 0


def test_decode_workers_auto_spares_a_small_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.extract import extract as extract_mod

    for cores, want in ((1, 0), (2, 0), (4, 2), (16, 8), (64, 8)):
        monkeypatch.setattr(extract_mod.os, "cpu_count", lambda c=cores: c)
        assert extract_mod.decode_workers(-1) == want
    assert extract_mod.decode_workers(3) == 3


def test_accelerate_launch_with_two_processes_fills_one_store(
    cfg: ExtractConfig, reference: Path, tmp_path: Path
) -> None:
    """The real multi-process entry point: two ranks create the store at once, each fills its chunks."""
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--cpu",
        "-m",
        "stages.app",
        "extract",
    ]
    args = [
        "--shards",
        str(cfg.shards),
        "--teacher",
        str(cfg.teacher),
        "--out",
        str(tmp_path),
        "--splits",
        "train",
        "--views",
        str(cfg.num_views),
        "--batch-size",
        str(cfg.batch_size),
        "--seed",
        str(cfg.seed),
    ]
    result = subprocess.run([*launch, *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "complete" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.zarr"]  # no temp store left behind
    _assert_same_arrays(tmp_path / "train.zarr", reference / "train.zarr")


def test_webdataset_format_reads_back_like_zarr(cfg: ExtractConfig, reference: Path, tmp_path: Path) -> None:
    (result,) = extract(replace(cfg, out=tmp_path, splits=("train",), fmt="webdataset"))
    assert result["complete"] is True and result["chunks_written"] == CHUNKS
    wds, ref = open_cache(tmp_path, "train"), open_cache(reference, "train")
    assert wds.fmt == "webdataset" and ref.fmt == "zarr"
    got, want = wds.load_all(), ref.load_all()
    for name in ("features", "logits", "views", "labels"):
        assert np.array_equal(got[name], want[name]), name
    assert wds.keys.dtype.kind == "S" and np.array_equal(wds.keys, ref.keys)
    assert np.array_equal(wds.head_weight, ref.head_weight) and np.array_equal(wds.head_bias, ref.head_bias)
    with tarfile.open(tmp_path / "train-features" / "train-000000.tar") as tar:
        names = tar.getnames()
    assert {"digits-train-0000000." + ext for ext in ("png", "cls", "features.npy", "logits.npy", "views.npy")} <= set(
        names
    )


def test_teacher_card_without_extra_extracts(digits_shards: ShardIndex, tmp_path: Path) -> None:
    plain = _make_teacher(tmp_path / "teacher", digits_shards, 0, None)
    run = ExtractConfig(digits_shards.root, plain.dir, tmp_path / "cache", ("val",), 1, batch_size=BATCH, cpu=True)
    (result,) = extract(run)
    assert result["complete"] is True


# ---- refusals ---------------------------------------------------------------------------------------------------


def test_open_cache_refuses_mismatches_with_the_fix(reference: Path, digits_shards: ShardIndex) -> None:
    with pytest.raises(GenddError) as err:
        open_cache(reference, "train", teacher_sha256="0" * 64)
    _one_line_with_fix(err, "gendd extract with this teacher")
    with pytest.raises(GenddError) as err:
        open_cache(reference, "train", spec_hash="0" * 16)
    _one_line_with_fix(err, "gendd prepare")
    with pytest.raises(GenddError) as err:
        open_cache(reference, "test")
    _one_line_with_fix(err, "gendd extract for split 'test'")
    assert "cached: train, val" in str(err.value)
    open_cache(reference, "train", spec_hash=digits_shards.spec_hash)  # the matching hash is accepted


def test_resume_with_other_views_is_refused(cfg: ExtractConfig, reference: Path) -> None:
    before = _mtimes(reference)
    with pytest.raises(GenddError) as err:
        extract(replace(cfg, splits=("train",), seed=1))
    _one_line_with_fix(err, "delete it or pick another path")
    assert "views" in str(err.value)
    assert _mtimes(reference) == before


def test_verify_refuses_another_teacher(
    reference: Path, digits_shards: ShardIndex, tmp_path: Path, teacher: Teacher
) -> None:
    from pipeline.extract.verify import verify

    other = _make_teacher(tmp_path, digits_shards, 1, {"spec_hash": digits_shards.spec_hash})
    assert other.sha256 != teacher.sha256
    refused = verify(reference, "train", teacher=other.dir, shards=digits_shards.root, samples=4, quick=True)
    assert len(refused.problems) == 1 and "teacher checkpoint sha256" in refused.problems[0].what
    ok = verify(reference, "train", teacher=teacher.dir, shards=digits_shards.root, samples=4, progress=False)
    assert not ok.problems and ok.replay["pairs"] == 4
    assert ok.replay["max_abs_error"] <= 1e-3 * ok.replay["feature_scale"]


# ---- the CLI ----------------------------------------------------------------------------------------------------


def _gendd(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "stages.app", *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_cli_cache_info_and_verify(reference: Path, teacher: Teacher, digits_shards: ShardIndex) -> None:
    info = _gendd("cache", "info", str(reference))
    assert info.returncode == 0, info.stderr
    table = dict(line.split(None, 1) for line in info.stdout.splitlines() if line.strip())
    assert table["N"] == "200" and table["K"] == str(K) and table["complete"] == "True"
    assert 0 < float(table["bytes_per_value"]) < 2.5  # float16 under a lossless codec: about 2 bytes or fewer
    verify = _gendd(
        "cache", "verify", str(reference), "--teacher", str(teacher.dir), "--shards", str(digits_shards.root)
    )
    assert verify.returncode == 0, verify.stderr
    match = re.search(r"max abs error (\S+) \(feature scale (\S+)\), min cosine (\S+)", verify.stdout)
    assert match, verify.stdout
    error, scale, cosine = (float(g) for g in match.groups())
    assert scale > 0 and error <= 1e-3 * scale and cosine > 0.9999


def test_cli_extract_with_missing_teacher_is_one_line(digits_shards: ShardIndex, tmp_path: Path) -> None:
    result = _gendd(
        "extract",
        "--shards",
        str(digits_shards.root),
        "--teacher",
        str(tmp_path / "no-teacher"),
        "--out",
        str(tmp_path / "cache"),
        "--device",
        "cpu",
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "teacher.json" in lines[0] and "gendd teacher" in lines[0]
    assert not (tmp_path / "cache").exists()
