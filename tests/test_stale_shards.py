"""A cache knows the image shards it was built from: readers and extract resume refuse it once a shard's content
changed (an image edited in the source, then `gendd prepare`), naming the shard; caches from before the record open.

Data: an image folder of 3 classes x 8 random 10x10 images, prepared into 8 px shards of 8 (3 shards), and a real
`extract` with a tiny random teacher (timm's `test_resnet`), 2 views per sample.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from pipeline.cache.store import open_cache
from pipeline.config import DataOptions, ExtractConfig
from pipeline.data.prepare import prepare_shards
from pipeline.data.shards import load_index
from pipeline.data.specs import load_spec
from pipeline.errors import GenddError
from pipeline.evaluate.predict import eval_batches
from pipeline.extract.extract import extract
from pipeline.extract.verify import verify
from pipeline.models import ModelCard, create_model, feature_dim, save_model
from pipeline.train.memory import load_train_data
from pipeline.train.stream import _open_source

SIZE, SHARD = 8, 8


@dataclass(frozen=True)
class Built:
    """Source images, their spec, the shards and the cache (a copy per test: the tests change them)."""

    images: Path
    spec: Path
    shards: Path
    cache: Path
    teacher: Path


def _write_images(root: Path) -> None:
    rng = np.random.default_rng(0)
    for name in "abc":
        (root / "train" / name).mkdir(parents=True)
        for j in range(8):
            Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(root / "train" / name / f"{j}.png")


def _make_teacher(out: Path) -> Path:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model("test_resnet", 3, 3, small_stem=True).eval()
    card = ModelCard("test_resnet", 3, 3, True, SIZE, (0.5,) * 3, (0.25,) * 3, feature_dim(model, 3, SIZE))
    save_model(model, card, out, "teacher")
    return out


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("stale")
    _write_images(root / "images")
    spec = root / "spec.yaml"
    spec.write_text(
        f"name: folders\nsource: image_folder\npath: {root / 'images'}\nsplits: {{train: train}}\nnum_classes: 3\n"
        f"image_size: {SIZE}\nchannels: 3\nmean: [0.5, 0.5, 0.5]\nstd: [0.25, 0.25, 0.25]\nlabeled: true\n"
    )
    prepare_shards(load_spec(spec), root / "shards", shard_size=SHARD)
    teacher = _make_teacher(root / "teacher")
    cfg = ExtractConfig(root / "shards", teacher, root / "cache", ("train",), 2, batch_size=16, cpu=True, workers=0)
    (result,) = extract(cfg)
    assert result["complete"] is True
    return Built(root / "images", spec, root / "shards", root / "cache", teacher)


@pytest.fixture
def built(original: Built, tmp_path: Path) -> Built:
    """A private copy whose spec points at its own images."""
    for part in ("images", "shards", "cache"):
        shutil.copytree(getattr(original, part), tmp_path / part)
    spec = tmp_path / "spec.yaml"
    spec.write_text(original.spec.read_text().replace(str(original.images), str(tmp_path / "images")))
    return Built(tmp_path / "images", spec, tmp_path / "shards", tmp_path / "cache", original.teacher)


def _edit_one_image_and_prepare(built: Built) -> str:
    """Change one source image's pixels and re-run prepare; returns the name of the shard that changed."""
    before = load_index(built.shards).split("train")
    image = built.images / "train" / "b" / "3.png"
    pixels = np.asarray(Image.open(image)).copy()
    pixels[0, 0] ^= 0xFF
    Image.fromarray(pixels).save(image)
    os.utime(image, ns=(1, 1))  # a modification time prepare's source fingerprint cannot miss
    index, wrote = prepare_shards(load_spec(built.spec), built.shards, shard_size=SHARD)
    after = index.split("train")
    changed = [name for name, a, b in zip(after.names, before.hashes, after.hashes, strict=True) if a != b]
    assert wrote and len(changed) == 1 and after.keys_and_labels()[0].tolist() == before.keys_and_labels()[0].tolist()
    return changed[0]


def _refused(call, shard: str) -> str:
    with pytest.raises(GenddError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and shard in message and "re-run gendd extract" in message, message
    return message


def test_extract_records_every_shard_sha256(original: Built) -> None:
    attrs = zarr.open_group(str(original.cache / "train.zarr"), mode="r").attrs.asdict()
    hashes = load_index(original.shards).split("train").hashes
    assert len(hashes) == 3 and attrs["dataset"]["shard_sha256"] == list(hashes)


def test_readers_refuse_a_cache_whose_shard_changed(built: Built) -> None:
    shard = _edit_one_image_and_prepare(built)
    stream = _refused(lambda: _open_source(built.shards, built.cache, "train"), shard)
    assert stream.startswith(f"cache {built.cache} was built from another {built.shards / shard} (sha256 ")
    assert ".., now " in stream
    _refused(lambda: load_train_data(built.shards, built.cache, "train"), shard)
    memory = DataOptions(mode="memory")
    _refused(lambda: eval_batches(built.shards, built.cache, "train", 8, memory, torch.device("cpu")), shard)
    report = verify(built.cache, "train", teacher=built.teacher, shards=built.shards, samples=2, progress=False)
    assert len(report.problems) == 1 and shard in report.problems[0].what


def test_extract_refuses_to_resume_over_changed_shards(built: Built) -> None:
    _edit_one_image_and_prepare(built)
    (built.cache / "train.zarr" / "done" / "c" / "2").unlink()  # an unfinished cache: resuming would mix contents
    cfg = ExtractConfig(built.shards, built.teacher, built.cache, ("train",), 2, batch_size=16, cpu=True, workers=0)
    with pytest.raises(GenddError, match=r"different dataset \(the image shards changed since it was started\)"):
        extract(cfg)


def _drop_shard_record(cache: Path) -> None:
    """Make the cache look like one written before `dataset.shard_sha256` existed."""
    group = zarr.open_group(str(cache / "train.zarr"), mode="r+")
    dataset = group.attrs["dataset"]
    del dataset["shard_sha256"]
    group.attrs["dataset"] = dataset


def test_a_cache_from_before_the_record_opens_and_resumes(built: Built) -> None:
    _drop_shard_record(built.cache)
    source, info = _open_source(built.shards, built.cache, "train")
    assert source.cache is not None and info.num_views == 2
    assert load_train_data(built.shards, built.cache, "train").features.shape[:2] == (24, 2)
    (built.cache / "train.zarr" / "done" / "c" / "1").unlink()
    cfg = ExtractConfig(built.shards, built.teacher, built.cache, ("train",), 2, batch_size=16, cpu=True, workers=0)
    (result,) = extract(cfg)  # resumed as before: what else it records matches
    assert result["chunks_written"] == 1 and result["complete"] is True
    assert "shard_sha256" not in open_cache(built.cache, "train").meta.dataset


def test_an_index_from_before_shard_hashes_is_not_checked(built: Built) -> None:
    shards = load_index(built.shards).split("train")
    cache = open_cache(built.cache, "train", shards=replace(shards, hashes=()))
    assert cache.complete
