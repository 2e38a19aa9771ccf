import gzip
import json
import os
import re
import struct
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.prepare import _record_hash, file_digest, prepare_shards
from pipeline.data.shards import key_array, load_index, load_split, read_shard, read_shard_labels
from pipeline.data.sources import iter_source, long_tail_indices
from pipeline.data.specs import load_spec
from pipeline.errors import GenddError

from .conftest import DIGITS_SPEC, ROOT


def test_round_trip_keys_labels_pixels(digits_shards) -> None:
    spec = load_spec(DIGITS_SPEC)
    for split in ("train", "val"):
        data = load_split(digits_shards.split(split))
        source = [s for _, s in zip(range(200), iter_source(spec, split), strict=False)]
        assert data.keys == [s.key for s in source]
        assert data.labels.tolist() == [s.label for s in source]
        pixels = np.stack([s.image.transpose(2, 0, 1) for s in source])
        assert np.array_equal(data.images.numpy(), pixels)
        assert len(set(data.keys)) == len(data.keys)


def test_index_records_shards_counts_starts(digits_shards) -> None:
    train = digits_shards.split("train")
    assert train.counts == (64, 64, 64, 8)
    assert train.starts == (0, 64, 128, 192)
    assert digits_shards.spec_hash == load_spec(DIGITS_SPEC).spec_hash
    with pytest.raises(GenddError, match="no split 'test'"):
        digits_shards.split("test")


def test_keys_file_lists_the_split_in_order_and_a_scan_agrees(digits_shards) -> None:
    shards = digits_shards.split("train")
    assert shards.keys_file and (shards.root / shards.keys_file).is_file()
    assert shards.keys_array and (shards.root / shards.keys_array).is_file()
    keys, labels = shards.keys_and_labels()
    assert keys.dtype.kind == "S" and labels.dtype == np.int64 and keys.shape == labels.shape == (shards.n,)
    # shards from before the arrays read the JSON file, shards from before that a scan: the same values
    for older in (replace(shards, keys_array=None), replace(shards, keys_array=None, keys_file=None)):
        old_keys, old_labels = older.keys_and_labels()
        assert old_keys.dtype.kind == "S" and np.array_equal(old_keys, keys) and np.array_equal(old_labels, labels)
    assert np.strings.decode(keys[:3]).tolist() == read_shard(shards.path(0)).keys[:3]


def test_key_array_holds_utf8_bytes_of_the_longest_key() -> None:
    keys = key_array(["a", "c\u00e9/x", "bb"])
    assert keys.dtype == np.dtype("S5") and keys[1] == "c\u00e9/x".encode()
    assert key_array(keys) is keys and np.array_equal(key_array(np.array(["a", "c\u00e9/x", "bb"])), keys)
    assert key_array([]).shape == (0,)


def test_rerun_rewrites_nothing(tmp_path: Path) -> None:
    spec = load_spec(DIGITS_SPEC)
    prepare_shards(spec, tmp_path, shard_size=50, max_samples=120)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    _, wrote = prepare_shards(spec, tmp_path, shard_size=50, max_samples=120)
    assert not wrote
    assert stamps == {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}


def test_interrupted_prepare_finishes_and_other_settings_rewrite(tmp_path: Path) -> None:
    spec = load_spec(DIGITS_SPEC)
    prepare_shards(spec, tmp_path, shard_size=50, max_samples=120)
    (tmp_path / "index.json").unlink()
    (tmp_path / "train-000001.tar").unlink()  # as if killed before this shard and the index were written
    kept = (tmp_path / "train-000000.tar").stat().st_mtime_ns
    index, wrote = prepare_shards(spec, tmp_path, shard_size=50, max_samples=120)
    assert wrote and (tmp_path / "train-000001.tar").is_file()
    assert (tmp_path / "train-000000.tar").stat().st_mtime_ns == kept
    index, _ = prepare_shards(spec, tmp_path, shard_size=40, max_samples=120)
    assert index.split("train").counts == (40, 40, 40)
    assert not (tmp_path / "train-000000.tar.tmp").exists()


def test_corrupt_and_truncated_shards_give_one_line(tmp_path: Path, digits_shards) -> None:
    bad = tmp_path / "train-000000.tar"
    bad.write_bytes(digits_shards.split("train").path(0).read_bytes()[:3000])
    with pytest.raises(GenddError, match=re.escape(f"re-run gendd prepare --out {tmp_path} (it rewrites")) as info:
        read_shard(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(GenddError, match="run `gendd prepare"):
        load_index(tmp_path / "missing")


def _idx_file(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_idx_source_and_long_tail(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 30)
    _idx_file(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (300, 28, 28)))
    _idx_file(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    _idx_file(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (300, 28, 28)))
    _idx_file(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    spec = load_spec(ROOT / "data_specs" / "fashion_mnist_lt.yaml", source_path=str(tmp_path))
    train = np.array([s.label for s in iter_source(spec, "train")])
    counts = np.bincount(train, minlength=10)
    assert counts[0] == 30 and counts[-1] == int(30 / 100) and np.all(np.diff(counts) <= 0)
    assert np.bincount([s.label for s in iter_source(spec, "val")]).tolist() == [30] * 10
    assert len(long_tail_indices(labels, 10, 1.0)) == 300


def test_holdout_spec_slices_the_training_file_and_never_reads_the_test_split(tmp_path: Path) -> None:
    labels = np.arange(300) % 10
    _idx_file(tmp_path / "train-images-idx3-ubyte.gz", np.arange(300)[:, None, None].repeat(28, 1).repeat(28, 2) % 256)
    _idx_file(tmp_path / "train-labels-idx1-ubyte.gz", labels)  # no t10k files at all
    spec = load_spec(ROOT / "data_specs" / "fashion_mnist_holdout.yaml", source_path=str(tmp_path))
    spec = replace(spec, splits={"train": "train[:200]", "val": "train[200:]"})
    train, val = list(iter_source(spec, "train")), list(iter_source(spec, "val"))
    assert (len(train), len(val)) == (200, 100)
    assert [int(s.image[0, 0, 0]) for s in val[:3]] == [200, 201, 202]  # the rows after the cut, in order
    for bad in ("train[5]", "train[300:]"):
        with pytest.raises(GenddError, match="train"):
            list(iter_source(replace(spec, splits={"train": bad}), "train"))


def test_missing_idx_files_say_how_to_get_them(tmp_path: Path) -> None:
    spec = load_spec(ROOT / "data_specs" / "fashion_mnist.yaml", source_path=str(tmp_path))
    with pytest.raises(GenddError, match="dataset-fashion-mnist"):
        next(iter_source(spec, "train"))


def test_image_folder_shards_mix_classes(tmp_path: Path) -> None:
    """Class folders are read in a seeded random order: every shard holds several classes (streaming needs it)."""
    from PIL import Image

    root = tmp_path / "images"
    for c, name in enumerate(["a", "b", "c"]):
        (root / "train" / name).mkdir(parents=True)
        for j in range(8):
            Image.new("RGB", (10, 10), (c * 80, j * 20, 0)).save(root / "train" / name / f"{j}.png")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        f"name: folders\nsource: image_folder\npath: {root}\nsplits: {{train: train}}\nnum_classes: 3\n"
        "image_size: 8\nchannels: 3\nmean: [0.5, 0.5, 0.5]\nstd: [0.25, 0.25, 0.25]\nlabeled: true\n"
    )
    index, _ = prepare_shards(load_spec(spec_file), tmp_path / "shards", shard_size=8)
    shards = index.split("train")
    per_shard = [set(read_shard_labels(shards.path(i))[1]) for i in range(len(shards.names))]
    assert len(per_shard) == 3 and all(len(classes) > 1 for classes in per_shard)
    assert sorted(shards.keys_and_labels()[0]) == sorted(f"{n}/{j}".encode() for n in "abc" for j in range(8))


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "flip a byte":  # same size: only the hash can tell
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 3])
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["flip a byte", "truncate", "delete"])
@pytest.mark.parametrize("name", ["train-000001.tar", "val-keys.json", "val-keys.npz"])
def test_prepare_rewrites_a_damaged_file_byte_for_byte(tmp_path: Path, capsys, how: str, name: str) -> None:
    spec = load_spec(DIGITS_SPEC)
    index, _ = prepare_shards(spec, tmp_path, shard_size=50, max_samples=120)
    train = index.split("train")
    assert len(train.sizes) == len(train.hashes) == 3 and train.keys_hash
    assert file_digest(tmp_path / "train-000001.tar") == (train.sizes[1], train.hashes[1])
    original = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    _damage(tmp_path / name, how)
    capsys.readouterr()
    _, wrote = prepare_shards(spec, tmp_path, shard_size=50, max_samples=120)
    out = capsys.readouterr().out
    assert wrote and "rewrote" in out and name in out
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == original  # shards are deterministic
    assert not prepare_shards(spec, tmp_path, shard_size=50, max_samples=120)[1]


def test_index_without_hashes_from_an_older_gendd_is_rewritten(tmp_path: Path) -> None:
    spec = load_spec(DIGITS_SPEC)
    prepare_shards(spec, tmp_path, shard_size=50, max_samples=120)
    record = json.loads((tmp_path / "index.json").read_text())
    del record["index_sha256"]
    for entry in record["splits"].values():
        for field in ("sizes", "sha256", "keys_size", "keys_sha256", "keys_array", "keys_array_size"):
            del entry[field]
        del entry["keys_array_sha256"]
    (tmp_path / "index.json").write_text(json.dumps(record))
    older = load_index(tmp_path).split("train")
    assert older.hashes == () and older.keys_array is None  # still readable, its keys from the JSON file
    assert np.array_equal(older.keys_and_labels()[0], key_array(load_split(older).keys))
    _, wrote = prepare_shards(spec, tmp_path, shard_size=50, max_samples=120)
    assert wrote and load_index(tmp_path).split("train").hashes and load_index(tmp_path).split("train").keys_array
    assert not prepare_shards(spec, tmp_path, shard_size=50, max_samples=120)[1]


def test_count_mismatch_says_whether_the_shard_or_the_index_is_wrong(tmp_path: Path) -> None:
    spec = load_spec(DIGITS_SPEC)
    prepare_shards(spec, tmp_path, shard_size=50, max_samples=120)
    record = json.loads((tmp_path / "index.json").read_text())
    record["splits"]["train"]["counts"][1] += 5  # edited by hand: the shard itself is as prepare wrote it
    (tmp_path / "index.json").write_text(json.dumps(record))
    with pytest.raises(GenddError, match=r"train-000001\.tar: 50 samples, index\.json says 55") as info:
        load_split(load_index(tmp_path).split("train"))
    message = str(info.value)
    assert "rewrite index.json" in message and "truncated" not in message and "\n" not in message
    assert f"re-run gendd prepare --out {tmp_path}" in message
    _, wrote = prepare_shards(spec, tmp_path, shard_size=50, max_samples=120)  # the advice works
    assert wrote and len(load_split(load_index(tmp_path).split("train")).keys) == 120

    shard = tmp_path / "train-000001.tar"  # cut at a member boundary: a readable tar with fewer samples
    with tarfile.open(shard) as tar:
        firsts = {m.name.partition(".")[0]: m.offset for m in reversed(tar.getmembers())}  # each sample's 1st member
        cut = sorted(firsts.values())[30]
    shard.write_bytes(shard.read_bytes()[:cut])
    with pytest.raises(GenddError, match=r"train-000001\.tar: 30 samples, index\.json says 50") as info:
        load_split(load_index(tmp_path).split("train"))
    message = str(info.value)
    assert "damaged or truncated" in message and "rewrites damaged shards" in message and "index.json is" not in message
    _, wrote = prepare_shards(spec, tmp_path, shard_size=50, max_samples=120)
    assert wrote and len(load_split(load_index(tmp_path).split("train")).keys) == 120


def test_label_outside_num_classes_is_refused_naming_the_sample(tmp_path: Path) -> None:
    spec_file = tmp_path / "digits5.yaml"
    text = DIGITS_SPEC.read_text().replace("name: digits", "name: digits5").replace("num_classes: 10", "num_classes: 5")
    spec_file.write_text("\n".join(line for line in text.splitlines() if not line.startswith("class_names")))
    spec = load_spec(spec_file)
    first = next(s for s in iter_source(spec, "train") if s.label >= 5)
    with pytest.raises(GenddError) as info:
        prepare_shards(spec, tmp_path / "out", shard_size=50, max_samples=120)
    message = str(info.value)
    assert f"sample {first.key!r} has label {first.label}" in message and "'train'" in message
    assert "digits5" in message and "num_classes" in message and "\n" not in message
    assert not (tmp_path / "out" / "index.json").exists()


def test_damaged_shard_without_the_settings_marker_rewrites_every_split(tmp_path: Path) -> None:
    spec = load_spec(DIGITS_SPEC)
    prepare_shards(spec, tmp_path, shard_size=50, max_samples=120)
    original = {p.name: p.read_bytes() for p in tmp_path.glob("*.tar")}
    (tmp_path / ".prepare.json").unlink()  # unknown settings: everything is cleared, intact splits included
    _damage(tmp_path / "val-000000.tar", "truncate")
    index, wrote = prepare_shards(spec, tmp_path, shard_size=50, max_samples=120)
    assert wrote and {p.name: p.read_bytes() for p in tmp_path.glob("*.tar")} == original
    assert len(load_split(index.split("train")).keys) == 120


def test_changed_idx_files_are_read_again_and_an_old_index_without_a_fingerprint_too(tmp_path: Path, capsys) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    images = np.arange(60 * 28 * 28).reshape(60, 28, 28) % 256
    _idx_file(raw / "train-images-idx3-ubyte.gz", images)
    _idx_file(raw / "train-labels-idx1-ubyte.gz", np.arange(60) % 10)
    spec = load_spec(ROOT / "data_specs" / "fashion_mnist_holdout.yaml", source_path=str(raw))
    spec = replace(spec, splits={"train": "train[:40]", "val": "train[40:]"})
    prepare_shards(spec, out, shard_size=16)
    shards = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("*.tar")}
    assert not prepare_shards(spec, out, shard_size=16)[1]
    os.utime(raw / "train-labels-idx1-ubyte.gz", ns=(1, 1))  # touched: may have changed, so it is read again
    capsys.readouterr()
    _, wrote = prepare_shards(spec, out, shard_size=16)
    assert wrote and "source changed" in capsys.readouterr().out
    assert shards == {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("*.tar")}  # same bytes: kept
    record = json.loads((out / "index.json").read_text())
    for entry in record["splits"].values():
        del entry["source_fingerprint"]
    record["index_sha256"] = _record_hash(record)
    (out / "index.json").write_text(json.dumps(record))
    assert prepare_shards(spec, out, shard_size=16)[1] and "older gendd" in capsys.readouterr().out
    _idx_file(raw / "train-labels-idx1-ubyte.gz", (np.arange(60) + 1) % 10)  # new labels
    index, wrote = prepare_shards(spec, out, shard_size=16)
    assert wrote and index.split("val").keys_and_labels()[1][:3].tolist() == [1, 2, 3]
    assert not prepare_shards(spec, out, shard_size=16)[1]


def test_prepare_never_modifies_a_file_in_place(tmp_path: Path) -> None:
    """Shards that DVC links from its cache (hardlinks) keep their bytes when prepare runs again with other settings:
    every file prepare writes is a new one renamed into place (or removed), never one opened for writing."""
    spec, out = load_spec(DIGITS_SPEC), tmp_path / "shards"
    prepare_shards(spec, out, shard_size=50, max_samples=120)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "dvc-cache").mkdir()
    for name in before:
        (tmp_path / "dvc-cache" / name).hardlink_to(out / name)
    _, wrote = prepare_shards(spec, out, shard_size=40, max_samples=100)  # every file rewritten, the marker too
    assert wrote and {p.name: p.read_bytes() for p in (tmp_path / "dvc-cache").iterdir()} == before
    assert (out / ".prepare.json").read_bytes() != before[".prepare.json"]
