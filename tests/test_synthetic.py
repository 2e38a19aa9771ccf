"""The synthetic source (class patterns generated inside prepare) and the ImageNet-shaped rehearsal's files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.data.prepare import prepare_shards
from pipeline.data.shards import load_split
from pipeline.data.sources import iter_source
from pipeline.data.specs import load_spec
from pipeline.data.synthetic import synthetic_prototypes
from pipeline.errors import GenddError

from .conftest import ROOT

SCALE = ROOT / "benchmarks" / "scale"


def _spec(tmp_path: Path, **changes):
    raw = {
        "name": "synth",
        "source": "synthetic",
        "splits": {"train": 600, "val": 100},
        "num_classes": 6,
        "image_size": 12,
        "channels": 3,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.26, 0.26, 0.26],
    } | changes
    path = tmp_path / "synth.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_spec(path)


def _samples(spec, split: str):
    samples = list(iter_source(spec, split))
    return np.stack([s.image for s in samples]), np.array([s.label for s in samples]), [s.key for s in samples]


def test_synthetic_samples_are_deterministic_and_shaped_as_the_spec_says(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    images, labels, keys = _samples(spec, "train")
    again, labels_again, keys_again = _samples(spec, "train")
    assert images.shape == (600, 12, 12, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again) and keys == keys_again
    assert len(set(keys)) == 600 and labels.min() >= 0 and labels.max() < 6 and len(np.unique(labels)) == 6
    val, _, val_keys = _samples(spec, "val")
    assert len(val) == 100 and not set(val_keys) & set(keys) and not np.array_equal(val[:10], images[:10])
    other, _, _ = _samples(_spec(tmp_path, seed=1), "train")
    assert not np.array_equal(other, images)  # the seed decides the data


def test_synthetic_classes_are_learnable(tmp_path: Path) -> None:
    """Nearest class prototype beats chance by far on val: a teacher has something to learn."""
    spec = _spec(tmp_path)
    images, labels, _ = _samples(spec, "val")
    prototypes = synthetic_prototypes(spec).reshape(spec.num_classes, -1)
    distance = ((images.reshape(len(images), 1, -1).astype(np.float32) - prototypes[None]) ** 2).sum(-1)
    accuracy = float((distance.argmin(1) == labels).mean())
    assert accuracy > 0.35, accuracy  # chance: 1/6 (the shifts and noise keep a template match far from 1)


def test_unlabeled_synthetic_has_no_labels(tmp_path: Path) -> None:
    _, labels, _ = _samples(_spec(tmp_path, labeled=False), "val")
    assert (labels == -1).all()


@pytest.mark.parametrize("splits", [{"train": "many"}, {"train": 0}, {"train": -5}])
def test_a_synthetic_split_needs_a_positive_count(tmp_path: Path, splits: dict) -> None:
    with pytest.raises(GenddError) as info:
        _spec(tmp_path, splits=splits)
    assert "field 'splits'" in str(info.value) and "sample count" in str(info.value) and "\n" not in str(info.value)


def test_prepare_writes_synthetic_shards(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    index, wrote = prepare_shards(spec, tmp_path / "shards", shard_size=256, max_samples=500)
    assert wrote and index.split("train").n == 500 and len(index.split("train").names) == 2
    data = load_split(index.split("val"))
    images, labels, _ = _samples(spec, "val")
    assert np.array_equal(data.images.permute(0, 2, 3, 1).numpy(), images)  # lossless through PNG
    assert np.array_equal(data.labels.numpy(), labels)
    assert not prepare_shards(spec, tmp_path / "shards", shard_size=256, max_samples=500)[1]  # up to date


def test_imagenet_shaped_spec_has_imagenets_counts() -> None:
    spec = load_spec(ROOT / "data_specs" / "imagenet_shaped.yaml")
    assert spec.splits == {"train": "1281167", "val": "50000"} and spec.num_classes == 1000


def test_the_rehearsal_pipeline_resolves(tmp_path: Path) -> None:
    """benchmarks/scale's dvc.yaml and params.yaml make the stages the measuring script expects."""
    if shutil.which("git") is None:
        pytest.skip("git is needed for DVC")
    out = subprocess.run(
        [sys.executable, "-m", "dvc", "dag", "--md"], cwd=SCALE, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for stage in (
        "prepare@full",
        "prepare@sixteenth",
        "teacher",
        "extract@full",
        "distill@full-gendd",
        "distill@sixteenth-kd",
        "evaluate@full-kd",
        "report",
    ):
        assert stage in out.stdout, stage
    sys.path.insert(0, str(SCALE))
    try:
        from measure import stage_label
    finally:
        sys.path.remove(str(SCALE))
    assert stage_label(["/x/bin/python", "/x/bin/gendd", "distill", "--out", "students/full-kd"]) == (
        "distill students/full-kd"
    )
    assert stage_label(["/x/bin/gendd", "extract", "--shards", "s", "--out", "data/full/cache"]) == (
        "extract data/full/cache"
    )
    assert stage_label(["python", "-m", "dvc", "repro"]) is None
