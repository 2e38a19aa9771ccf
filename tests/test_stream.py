"""The stream mode: coverage across ranks and workers, (key, view) pairing, determinism, refusals, HTTP, the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache.meta import CacheMeta
from pipeline.cache.store import FeatureCacheWriter, open_cache
from pipeline.config import DataOptions
from pipeline.data.shards import ShardIndex, load_index, load_split
from pipeline.errors import GenddError
from pipeline.train.input import EpochPlan, view_plan
from pipeline.train.memory import memory_input
from pipeline.train.stream import StreamInput, _open_source, stream_eval_batches

from .conftest import serve_http

K, D = 3, 8


def build_cache(
    shards: ShardIndex, root: Path, fmt: str = "zarr", split: str = "train", teacher_sha: str = "a" * 64
) -> Path:
    """A cache aligned with the shards whose feature[i, k, 0] = i * K + k: a batch shows which (sample, view) it got."""
    keys, labels = shards.split(split).keys_and_labels()
    n, c = len(keys), int(shards.spec["num_classes"])
    teacher = {"name": "t", "checkpoint_sha256": teacher_sha, "feature_dim": D, "num_classes": c}
    teacher |= {"input_size": 8, "mean": (0.5,), "std": (0.25,)}
    meta = CacheMeta(
        teacher=teacher,
        dataset={"name": "digits", "spec_hash": shards.spec_hash, "split": split, "n": n},
        views={"K": K, "policy": {"kind": "rrc"}, "seed": 0},
    )
    rng = np.random.default_rng(0)
    writer = FeatureCacheWriter.open(
        root,
        split,
        meta,
        chunk_size=shards.shard_size,
        keys=keys,
        labels=labels,
        head_weight=rng.standard_normal((c, D)),
        head_bias=np.zeros(c),
        fmt=fmt,
    )
    images = load_split(shards.split(split))
    for i in range(writer.n_chunks):
        start, stop = i * shards.shard_size, min(n, (i + 1) * shards.shard_size)
        tag = (np.arange(start, stop)[:, None] * K + np.arange(K)[None, :]).astype(np.float32)
        features = np.concatenate([tag[..., None], rng.standard_normal((stop - start, K, D - 1))], axis=-1)
        views = np.tile(np.array([0.0, 0.0, 1.0, 1.0, 0.0], np.float32), (stop - start, K, 1))
        views[..., 0] = tag / (n * K)  # distinct per (sample, view): checks the view travels with its features
        png = [b"x"] * (stop - start) if fmt == "webdataset" else None
        if png is not None:
            from pipeline.data.shards import read_shard

            png = read_shard(shards.split(split).path(i), keep_png=True).png
        writer.write_chunk(i, features, rng.standard_normal((stop - start, K, c)), views, png)
    assert writer.finalize()
    assert len(images.keys) == n
    return root


@pytest.fixture(scope="module")
def cached(digits_shards: ShardIndex, tmp_path_factory: pytest.TempPathFactory) -> tuple[ShardIndex, Path]:
    return digits_shards, build_cache(digits_shards, tmp_path_factory.mktemp("stream_cache"))


def epoch(source: StreamInput, plan: EpochPlan) -> list[dict]:
    return list(source.batches(plan))


def check_pairing(batches: list[dict], shards: ShardIndex, seed: int, ep: int) -> None:
    """Every row holds the image, label, view and teacher outputs of one (sample, view)."""
    split = load_split(shards.split("train"))
    n = len(split.keys)
    for batch in batches:
        idx, view = batch["index"], batch["view"]
        assert batch["teacher_features"].dtype == torch.float16 and batch["teacher_logits"].dtype == torch.float16
        assert torch.equal(view, torch.from_numpy(view_plan(seed, ep, idx.numpy(), K)))
        assert torch.equal(batch["teacher_features"][:, 0].long(), idx * K + view)
        assert torch.allclose(batch["views"][:, 0], ((idx * K + view) / (n * K)).float())
        assert torch.equal(batch["images"], split.images[idx]) and torch.equal(batch["labels"], split.labels[idx])


def test_two_ranks_two_workers_visit_every_sample_once(cached: tuple[ShardIndex, Path]) -> None:
    shards, cache = cached
    n = shards.split("train").n
    source = StreamInput(shards.root, cache, "train", DataOptions(mode="stream", workers=2, shuffle_buffer=16))
    seen: Counter = Counter()
    steps = []
    for rank in range(2):
        batches = epoch(source, EpochPlan(7, 1, 16, rank, 2))
        steps.append(len(batches))
        check_pairing(batches, shards, 7, 1)
        seen.update(torch.cat([b["index"] for b in batches]).tolist())
    assert sorted(seen) == list(range(n)) and set(seen.values()) == {1}
    assert max(steps) == source.steps_per_epoch(7, 1, 16, 2)  # the schedule knows the epoch's length up front


def test_same_seed_same_batches_other_epoch_other_order(cached: tuple[ShardIndex, Path]) -> None:
    shards, cache = cached
    source = StreamInput(shards.root, cache, "train", DataOptions(mode="stream", workers=2, shuffle_buffer=32))
    first, again = epoch(source, EpochPlan(3, 0, 16)), epoch(source, EpochPlan(3, 0, 16))
    assert len(first) == len(again) == source.steps_per_epoch(3, 0, 16, 1)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, again, strict=True) for k in a)
    other = torch.cat([b["index"] for b in epoch(source, EpochPlan(3, 1, 16))])
    assert not torch.equal(torch.cat([b["index"] for b in first]), other)
    check_pairing(first, shards, 3, 0)


def test_shuffle_buffer_mixes_shards(cached: tuple[ShardIndex, Path]) -> None:
    shards, cache = cached
    source = StreamInput(shards.root, cache, "train", DataOptions(mode="stream", workers=0, shuffle_buffer=128))
    first = epoch(source, EpochPlan(0, 0, 32))[0]["index"] // shards.shard_size
    assert len(set(first.tolist())) > 1  # one batch draws from several shards


def test_webdataset_cache_streams_the_same_pairs(digits_shards: ShardIndex, tmp_path: Path) -> None:
    cache = build_cache(digits_shards, tmp_path / "wds", fmt="webdataset")
    source = StreamInput(digits_shards.root, cache, "train", DataOptions(mode="stream", workers=1))
    check_pairing(epoch(source, EpochPlan(0, 2, 16)), digits_shards, 0, 2)


def test_webdataset_cache_stream_reads_no_image_shard(
    digits_shards: ShardIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A webdataset cache holds the images: the stream takes them from its tars (one object per shard, not two, over
    a network) and gets the pixels, labels and targets the image shards plus a Zarr cache give."""
    import pipeline.train.stream as stream_module

    zarr_cache = build_cache(digits_shards, tmp_path / "zarr")
    wds_cache = build_cache(digits_shards, tmp_path / "wds", fmt="webdataset")
    plan = EpochPlan(0, 1, 16)
    reference, _ = _open_source(digits_shards.root, zarr_cache, "train")
    wanted = [reference.read(i, plan) for i in range(len(digits_shards.split("train").names))]

    def no_image_shards(*args, **kwargs):
        raise AssertionError("an image shard was read")

    monkeypatch.setattr(stream_module, "decode_shard", no_image_shards)
    source, _ = _open_source(digits_shards.root, wds_cache, "train")
    for i, want in enumerate(wanted):
        got = source.read(i, plan)
        assert got.keys() == want.keys()
        for name in want:
            assert np.array_equal(got[name], want[name]), (i, name)


def test_memory_and_stream_train_on_the_same_views(cached: tuple[ShardIndex, Path]) -> None:
    shards, cache = cached
    plan = EpochPlan(5, 2, 16)
    pairs, chunks = [], []
    for source in (
        memory_input(shards.root, cache),
        StreamInput(shards.root, cache, "train", DataOptions(mode="stream")),
    ):
        rows = [torch.cat([b[k] for b in source.batches(plan)]).tolist() for k in ("index", "view")]
        pairs.append(sorted(zip(*rows, strict=True)))
        chunks.append(list(source.feature_chunks()))  # target statistics read the same values in both modes
    assert pairs[0] == pairs[1]
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(*chunks, strict=True))


def test_evaluation_stream_reads_every_sample_once(cached: tuple[ShardIndex, Path]) -> None:
    shards, _ = cached
    info, batches = stream_eval_batches(shards.root, None, "val", 50, workers=2)
    index = torch.cat([b["index"] for b in batches])
    assert sorted(index.tolist()) == list(range(info.n))


def test_truncated_shard_and_mismatched_cache_are_one_line_errors(cached: tuple[ShardIndex, Path], tmp_path: Path):
    shards, _ = cached
    copy = tmp_path / "shards"
    shutil.copytree(shards.root, copy)
    record = json.loads((copy / "index.json").read_text())
    record["splits"]["train"]["counts"][1] += 5  # the shard holds fewer samples than the index says
    (copy / "index.json").write_text(json.dumps(record))
    with pytest.raises(GenddError, match=r"train-000001\.tar: 64 samples, index\.json says 69") as info:
        epoch(StreamInput(copy, None, "train", DataOptions(mode="stream", workers=1)), EpochPlan(0, 0, 16))
    assert "\n" not in str(info.value)
    other = tmp_path / "other"  # a cache of the val split's samples, renamed as train: other keys
    build_cache(shards, other, split="val")
    (other / "val.zarr").rename(other / "train.zarr")
    with pytest.raises(GenddError) as info:
        StreamInput(shards.root, other, "train", DataOptions(mode="stream"))
    assert "\n" not in str(info.value) and ("does not match" in str(info.value) or "built for" in str(info.value))


def gendd(*args: str, ok: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "stages.app", *args], capture_output=True, text=True, timeout=600, cwd=cwd
    )
    if ok:
        assert result.returncode == 0, f"gendd {' '.join(args)}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


TINY_DISTILL = ["--student", "test_resnet", "--epochs", "1", "--batch-size", "32", "--device", "cpu"]
TINY_DISTILL += ["--token-dim", "4", "--head-width", "32", "--diffusion-batch-mul", "1", "--input-size", "8"]


def test_distill_and_evaluate_stream_from_an_http_server(cached: tuple[ShardIndex, Path], tmp_path: Path) -> None:
    shards, cache = cached
    served = tmp_path / "served"
    shutil.copytree(shards.root, served / "shards")
    shutil.copytree(cache, served / "cache")
    build_cache(load_index(served / "shards"), served / "cache", split="val")
    with serve_http(served) as url:
        out, ev = tmp_path / "student", tmp_path / "eval"
        remote = ["--shards", f"{url}/shards", "--cache", f"{url}/cache", "--data", "stream", "--workers", "1"]
        gendd("distill", *remote, "--out", str(out), "--method", "gendd", *TINY_DISTILL)
        gendd("evaluate", *remote, "--student-dir", str(out), "--out", str(ev), "--steps", "2", "--n-samples", "1")
    metrics = json.loads((ev / "metrics.json").read_text())
    assert {"probe_top1", "generative_top1", "teacher_top1"} <= metrics.keys()
    history = json.loads((out / "train.json").read_text())["history"]
    assert len(history) == 1 and "val_probe_top1" in history[0]
    assert open_cache(served / "cache", "val").n == shards.split("val").n


@pytest.mark.parametrize("where", ["shards", "out"])
def test_unsupported_url_refused_in_one_line_with_nothing_written(tmp_path: Path, where: str) -> None:
    shards = "ftp://127.0.0.1/shards" if where == "shards" else str(tmp_path)
    out = "s3://bucket/student" if where == "out" else str(tmp_path / "student")
    result = gendd("distill", "--shards", shards, "--out", out, "--method", "ce", *TINY_DISTILL, ok=False, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "gendd: error:" in result.stderr
    assert ("ftp" if where == "shards" else "s3://bucket/student") in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no student dir, no ./s3:/bucket


def test_streamed_training_resumes_to_the_same_weights(cached: tuple[ShardIndex, Path], tmp_path: Path, monkeypatch):
    import pipeline.train.loop as train_module
    from pipeline.config import HeadSettings, ObjectiveConfig, TrainConfig
    from pipeline.train.loop import train

    shards, cache = cached
    cfg = TrainConfig(
        model="test_resnet",
        objective=ObjectiveConfig(method="gendd"),
        epochs=3,
        batch_size=32,
        head=HeadSettings(token_dim=4, width=32, depth=1, diffusion_batch_mul=1),
        cpu=True,
    )

    def source() -> StreamInput:
        return StreamInput(shards.root, cache, "train", DataOptions(mode="stream", workers=1, shuffle_buffer=64))

    whole, whole_history = train(cfg, source(), tmp_path / "whole", 8)
    assert [h["samples"] for h in whole_history] == [shards.split("train").n] * 3  # every sample, every epoch
    real_save = train_module._save_checkpoint

    def killed_after_two_epochs(path, state):
        real_save(path, state)
        if state["epoch"] == 1:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(train_module, "_save_checkpoint", killed_after_two_epochs)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, source(), tmp_path / "resumed", 8)
    monkeypatch.setattr(train_module, "_save_checkpoint", real_save)
    resumed, history = train(cfg, source(), tmp_path / "resumed", 8)
    assert history[-1]["loss"] == pytest.approx(whole_history[-1]["loss"], rel=1e-5)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_two_process_ddp_streams_every_sample_once_without_hanging(cached: tuple[ShardIndex, Path], tmp_path: Path):
    """accelerate launch, 2 CPU ranks (gloo): the shards split unevenly (64, 64, 64, 8 samples), the ranks finish
    with different batch counts and join; every sample is trained on once per epoch."""
    shards, cache = cached
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "stages.app"]
    args = ["distill", "--shards", str(shards.root), "--cache", str(cache), "--out", str(out), "--method", "gendd"]
    args += [*TINY_DISTILL, "--epochs", "2", "--data", "stream", "--workers", "2", "--batch-size", "16"]
    result = subprocess.run([*launch, *args], capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((out / "train.json").read_text())["history"]
    assert [h["samples"] for h in history] == [shards.split("train").n] * 2


def test_auto_holds_in_memory_only_what_fits_comfortably(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.train.input as data_module
    from pipeline.train.input import choose_mode

    sizes = {"images": 300 * 2**20, "features": 200 * 2**20, "logits": 0, "views": 0}
    cpu = torch.device("cpu")
    monkeypatch.setattr(data_module, "available_host_bytes", lambda: 1000 * 2**20)
    mode, line = choose_mode("auto", sizes, cpu, "train")
    assert mode == "stream" and "needs 500 MiB (images 300 MiB + features 200 MiB)" in line and "(chosen)" in line
    assert choose_mode("memory", sizes, cpu, "train")[0] == "memory"  # an explicit choice is kept
    monkeypatch.setattr(data_module, "available_host_bytes", lambda: 2000 * 2**20)
    assert choose_mode("auto", sizes, cpu, "train")[0] == "memory"
    with pytest.raises(GenddError, match="choose one of auto, memory, stream"):
        DataOptions(mode="disk")


def test_footprint_counts_images_and_float16_targets(digits_shards: ShardIndex) -> None:
    from pipeline.train.input import footprint

    n = digits_shards.split("train").n
    sizes = footprint(digits_shards, "train", 4, 512, 10)
    assert sizes == {"images": n * 8 * 8, "features": n * 4 * 512 * 2, "logits": n * 4 * 10 * 2, "views": n * 4 * 20}


def test_two_teachers_caches_stream_and_load_side_by_side(cached: tuple[ShardIndex, Path], tmp_path: Path) -> None:
    """A Zarr and a WebDataset cache of two teachers with one view plan: both modes serve every teacher's outputs of
    the very (sample, view) the row holds, side by side (features (B, 2D), logits (B, 2C))."""
    shards, cache = cached
    other = build_cache(shards, tmp_path / "other", fmt="webdataset", teacher_sha="b" * 64)
    c = int(shards.spec["num_classes"])
    plan = EpochPlan(3, 1, 16)
    for source in (
        memory_input(shards.root, [cache, other]),
        StreamInput(shards.root, [cache, other], "train", DataOptions(mode="stream")),
    ):
        assert (source.info.teachers, source.info.teacher_dims, source.info.feature_dim) == (2, (D, D), 2 * D)
        batches = list(source.batches(plan))
        for batch in batches:
            tag = batch["index"] * K + batch["view"]
            assert batch["teacher_features"].shape[1] == 2 * D and batch["teacher_logits"].shape[1] == 2 * c
            assert torch.equal(batch["teacher_features"][:, 0].long(), tag)
            assert torch.equal(batch["teacher_features"][:, D].long(), tag)
        assert sum(len(b["index"]) for b in batches) == source.info.n
