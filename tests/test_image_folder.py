"""Your own image folder: class folders carved into train/val, class names from folders, changes detected,
16-bit/palette/alpha images converted. Tiny synthetic images written here with PIL (nothing downloaded)."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.folders import val_count
from pipeline.data.prepare import prepare_shards
from pipeline.data.shards import read_shard, read_shard_labels
from pipeline.data.sources import iter_source
from pipeline.data.specs import load_spec
from pipeline.errors import GenddError

SIZES = {"bird": 10, "cat": 7, "dog": 4}  # val_fraction 0.25 -> 2.5, 1.75, 1.0 -> 3, 2, 1 val images (half up)


def _image(path: Path, colour: tuple[int, int, int]) -> None:
    """A 6x6 image, PNG or JPEG by the suffix (mixed formats in one class, as in a real folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 6), colour).save(path)


def _class_folders(root: Path, sizes: dict[str, int] = SIZES) -> dict[str, list[str]]:
    """root/<class>/<image> only (no split folders): every other image a JPEG; one name with a dot and one in a
    sub-folder. Returns each class's expected sample keys."""
    keys = {}
    for c, (name, n) in enumerate(sizes.items()):
        keys[name] = []
        for j in range(n):
            stem = {0: "sub/img0", 1: "img.v1"}.get(j, f"img{j}")
            _image(root / name / f"{stem}.{'jpg' if j % 2 else 'png'}", (c * 100, j * 20, 50))
            keys[name].append(f"{name}/{stem.replace('.', '_')}")
    return keys


def _spec(tmp_path: Path, path: Path, extra: str = "", name: str = "spec.yaml") -> Path:
    spec = tmp_path / name
    spec.write_text(
        f"name: mine\nsource: image_folder\npath: {path}\nsplits: {{train: train, val: val}}\nval_fraction: 0.25\n"
        f"image_size: 8\nchannels: 3\nmean: [0.5, 0.5, 0.5]\nstd: [0.25, 0.25, 0.25]\n{extra}"
    )
    return spec


def _keys_labels(index, split: str) -> dict[str, int]:
    """key -> label of a split, read from the shards themselves (not the keys file)."""
    shards = index.split(split)
    out = {}
    for i in range(len(shards.names)):
        keys, labels = read_shard_labels(shards.path(i))
        out |= dict(zip(keys, labels, strict=True))
    return out


def test_val_count_rounds_half_up_keeps_one_of_each_and_never_all() -> None:
    assert [val_count(n, 0.25) for n in (0, 1, 2, 4, 7, 10)] == [0, 0, 1, 1, 2, 3]
    assert val_count(2, 0.9) == 1 and val_count(3, 0.01) == 1 and val_count(100, 0.2) == 20


def test_class_folders_are_carved_into_a_stratified_deterministic_split(tmp_path: Path) -> None:
    data = tmp_path / "photos"
    expected = _class_folders(data)
    spec = load_spec(_spec(tmp_path, data))
    assert spec.num_classes == 0 and spec.class_names == ()  # from the folders, at prepare
    index, wrote = prepare_shards(spec, tmp_path / "out", shard_size=4)
    assert wrote and set(index.splits) == {"train", "val"}
    train, val = _keys_labels(index, "train"), _keys_labels(index, "val")
    assert not set(train) & set(val)  # every image in exactly one split
    assert sorted({**train, **val}) == sorted(k for keys in expected.values() for k in keys)
    names = list(SIZES)
    for c, name in enumerate(names):
        assert all(label == c for key, label in {**train, **val}.items() if key.startswith(name + "/"))
        assert sum(1 for k in val if k.startswith(name + "/")) == val_count(SIZES[name], 0.25)
    assert sorted(val.values()) == [0, 0, 0, 1, 1, 2]  # 3, 2, 1 of 10, 7, 4
    record = json.loads((tmp_path / "out" / "index.json").read_text())
    assert record["class_names"] == names and record["spec"]["class_names"] == names
    assert record["spec"]["num_classes"] == 3 and index.class_names == tuple(names)
    assert record["spec_hash"] == spec.spec_hash  # the hash of the spec as written, as the CLI prints it
    assert all(len(entry["source_fingerprint"]) == 64 for entry in record["splits"].values())
    pixels = read_shard(index.split("val").path(0))
    assert pixels.images.shape[1:] == (3, 8, 8)

    prepare_shards(load_spec(_spec(tmp_path, data)), tmp_path / "again", shard_size=4)
    first = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert first == {p.name: p.read_bytes() for p in (tmp_path / "again").iterdir()}  # byte for byte
    moved = load_spec(_spec(tmp_path, data, "seed: 1\n", name="seed1.yaml"))
    other = _keys_labels(prepare_shards(moved, tmp_path / "seed1", shard_size=4)[0], "val")
    assert set(other) != set(val) and sorted(other.values()) == sorted(val.values())  # the seed draws the split


def test_changed_data_is_rewritten_and_unchanged_data_is_up_to_date(tmp_path: Path, capsys) -> None:
    data, out = tmp_path / "photos", tmp_path / "out"
    _class_folders(data)
    spec = load_spec(_spec(tmp_path, data))
    index, _ = prepare_shards(spec, out, shard_size=4)
    val_before = _keys_labels(index, "val")
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert not prepare_shards(spec, out, shard_size=4)[1]  # nothing touched: up to date, nothing written
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    _image(data / "bird" / "new.png", (1, 2, 3))  # one more image
    index, wrote = prepare_shards(spec, out, shard_size=4)
    assert wrote and "source changed" in capsys.readouterr().out
    both = {**_keys_labels(index, "train"), **_keys_labels(index, "val")}
    assert both["bird/new"] == 0 and len(both) == sum(SIZES.values()) + 1
    val_after = _keys_labels(index, "val")
    assert {k for k in val_after if not k.startswith("bird/")} == {k for k in val_before if not k.startswith("bird/")}
    assert not prepare_shards(spec, out, shard_size=4)[1]

    (data / "cat" / "img2.png").write_bytes((data / "dog" / "img2.png").read_bytes())  # same name, new content
    os.utime(data / "cat" / "img2.png", ns=(1, 1))
    assert prepare_shards(spec, out, shard_size=4)[1]
    for path in [*(data / "bird").glob("img[3-9].*")]:  # fewer images: fewer shards, none left behind
        path.unlink()
    index, wrote = prepare_shards(spec, out, shard_size=4)
    listed = {n for split in index.splits.values() for n in split.names}
    assert wrote and {p.name for p in out.glob("*.tar")} == listed
    assert not any(k.startswith("bird/img3") for k in _keys_labels(index, "train"))


def test_a_missing_source_keeps_intact_shards_with_a_note(tmp_path: Path, capsys) -> None:
    data, out = tmp_path / "photos", tmp_path / "out"
    _class_folders(data, {"a": 3, "b": 3})
    spec = load_spec(_spec(tmp_path, data))
    prepare_shards(spec, out, shard_size=4)
    data.rename(tmp_path / "elsewhere")
    capsys.readouterr()
    assert not prepare_shards(spec, out, shard_size=4)[1]
    assert "cannot check the source" in capsys.readouterr().out
    (out / "train-000000.tar").unlink()  # and now the source is needed
    with pytest.raises(GenddError, match="image folder not found"):
        prepare_shards(spec, out, shard_size=4)


def test_split_folders_still_work_and_share_one_class_list(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    for split, classes in (("train", "abc"), ("val", "ab")):  # val has no c: labels must still line up
        for c, name in enumerate(classes):
            for j in range(3):
                _image(data / split / name / f"{j}.png", (c * 100, j, 0))
    spec = load_spec(_spec(tmp_path, data, "num_classes: 3\n"))
    index, _ = prepare_shards(spec, tmp_path / "out", shard_size=4)
    assert "split 'val' has no images of class c" in capsys.readouterr().out
    train, val = _keys_labels(index, "train"), _keys_labels(index, "val")
    assert train == {f"{n}/{j}": c for c, n in enumerate("abc") for j in range(3)}
    assert val == {f"{n}/{j}": c for c, n in enumerate("ab") for j in range(3)}
    assert index.class_names == ("a", "b", "c")
    named = load_spec(_spec(tmp_path, data, "class_names: [c, b, a]\n", name="named.yaml"))  # the spec's order
    assert _keys_labels(prepare_shards(named, tmp_path / "named", shard_size=4)[0], "val")["a/0"] == 2


def _one_line(spec: Path) -> str:
    with pytest.raises(GenddError) as info:
        prepare_shards(load_spec(spec), spec.parent / "out")
    assert "\n" not in str(info.value)
    return str(info.value)


def test_folder_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _class_folders(data, {"cat": 2, "dog": 2, "fox": 2})
    message = _one_line(_spec(tmp_path, data, "num_classes: 2\n"))
    assert "found 3 class folders (cat, dog, fox) but num_classes is 2" in message
    message = _one_line(_spec(tmp_path, data, "class_names: [cat, dgo, fox]\n"))
    assert "dgo" in message and "cat, dog, fox" in message
    assert "not in class_names" in _one_line(_spec(tmp_path, data, "class_names: [cat, dog]\n"))
    _image(data / "cat" / "img_v1.png", (0, 0, 0))  # cat/img.v1.jpg has the key cat/img_v1 too
    assert "same sample key 'cat/img_v1'" in _one_line(_spec(tmp_path, data))
    (data / "cat" / "img_v1.png").unlink()
    spec = _spec(tmp_path, data).read_text().replace("val: val", "val: holdout")
    (tmp_path / "holdout.yaml").write_text(spec)
    assert "splits: {train: train, val: val}" in _one_line(tmp_path / "holdout.yaml")
    (tmp_path / "whole.yaml").write_text(spec.replace("splits: {train: train, val: holdout}", "splits: {train: .}"))
    message = _one_line(tmp_path / "whole.yaml")  # val_fraction would make no val split: say what to write
    assert "val_fraction 0.25 carves a val split" in message and "splits: {train: train, val: val}" in message
    (data / "validation").mkdir()
    assert "look like splits" in _one_line(_spec(tmp_path, data))
    (data / "train").mkdir()  # a train folder but no val folder: the split-folder layout, incomplete
    assert re.search(r"val: split folder not found, but .*train is", _one_line(_spec(tmp_path, data)))
    assert "image folder not found" in _one_line(_spec(tmp_path, tmp_path / "nowhere"))


def _pixels(tmp_path: Path, image: Image.Image, channels: int, suffix: str = ".png") -> np.ndarray:
    """What the image_folder reader makes of one saved image, at its own size (4x4)."""
    data = tmp_path / f"c{channels}-{image.mode}"
    (data / "train" / "x").mkdir(parents=True)
    image.save(data / "train" / "x" / f"img{suffix}")
    spec = tmp_path / "spec.yaml"
    mean = ", ".join(["0.5"] * channels)
    spec.write_text(
        f"name: px\nsource: image_folder\npath: {data}\nsplits: {{train: train}}\nimage_size: 4\n"
        f"channels: {channels}\nmean: [{mean}]\nstd: [{mean}]\n"
    )
    (sample,) = iter_source(load_spec(spec), "train")
    return sample.image


def test_sixteen_bit_palette_alpha_and_cmyk_images_convert(tmp_path: Path) -> None:
    grey = np.array([0, 257, 32896, 65535], dtype=np.uint16)[None].repeat(4, 0)
    sixteen = Image.fromarray(grey)
    assert sixteen.mode == "I;16"
    assert _pixels(tmp_path, sixteen, 1)[0, :, 0].tolist() == [0, 1, 128, 255]  # scaled, not clipped
    assert _pixels(tmp_path, sixteen, 3)[0, 2].tolist() == [128, 128, 128]

    palette = Image.new("P", (4, 4))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    for x in range(4):
        for y in range(4):
            palette.putpixel((x, y), x % 3)
    rgb = _pixels(tmp_path, palette, 3)
    assert rgb[0, 0].tolist() == [255, 0, 0] and rgb[0, 1].tolist() == [0, 255, 0] and rgb[0, 2].tolist() == [0, 0, 255]
    palette.info["transparency"] = 2  # blue is the transparent entry (tRNS): composited on black
    rgb = _pixels(tmp_path / "t", palette, 3)
    assert rgb[0, 1].tolist() == [0, 255, 0] and rgb[0, 2].tolist() == [0, 0, 0]

    rgba = Image.new("RGBA", (4, 4), (200, 100, 50, 128))
    assert _pixels(tmp_path, rgba, 3)[0, 0].tolist() == [100, 50, 25]  # colour * alpha / 255
    assert _pixels(tmp_path, Image.new("LA", (4, 4), (255, 0)), 1)[0, 0, 0] == 0  # fully transparent: black
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    assert _pixels(tmp_path, cmyk, 3, ".tif")[0, 0].tolist() == [255, 0, 0]
