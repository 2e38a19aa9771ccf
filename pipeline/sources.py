"""Readers for the dataset sources a spec can name; each yields uniform uint8 images at the spec's size."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pipeline import locations
from pipeline.errors import GenddError
from pipeline.specs import DataSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
CARVED_SPLITS = ("train", "val")  # the parts a folder of class folders is split into (by val_fraction)
# Folder names that are split folders, not classes: a folder of class folders holding one of them is a layout mistake.
SPLIT_LIKE = ("train", "training", "val", "valid", "validation", "test", "testing", "eval")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA = ("LA", "La", "RGBA", "RGBa", "PA")


class SourceMissing(GenddError):
    """The source data is not there at all (rather than unreadable): prepare can still keep intact shards."""


@dataclass(frozen=True)
class Sample:
    """One source image: a stable key, (H, W, C) uint8 pixels at the spec's size, and a label (-1 if none)."""

    key: str
    image: np.ndarray
    label: int


def _eight_bit(pil: Image.Image) -> Image.Image:
    """An image in a mode that converts to L or RGB without losing its range: 16-bit grey ("I;16*", and "I", read
    as 0..65535) is scaled to 0..255 (v * 255 / 65535, rounded: 65535 -> 255, 32896 -> 128; Pillow's own convert
    would clip it), and alpha ("LA", "RGBA", "PA", or a palette/colour-key transparency) is composited on black:
    the pixels are multiplied by alpha, so fully transparent pixels are black whatever colour they happen to hold.
    Palettes become their colours, CMYK and YCbCr go through Pillow's RGB conversion."""
    if pil.mode in _SIXTEEN_BIT:
        grey = np.clip(np.asarray(pil).astype(np.int64), 0, 65535)
        return Image.fromarray(((grey * 255 + 32767) // 65535).astype(np.uint8), "L")
    if pil.mode == "La":
        pil = pil.convert("LA")
    if "transparency" in pil.info and pil.mode in ("P", "L", "RGB"):
        pil = pil.convert("RGBA")
    if pil.mode in _ALPHA:
        rgba = np.asarray(pil.convert("RGBA")).astype(np.uint32)
        rgb = (rgba[:, :, :3] * rgba[:, :, 3:] + 127) // 255
        return Image.fromarray(rgb.astype(np.uint8), "RGB")
    return pil


def _fit(image: np.ndarray | Image.Image, spec: DataSpec) -> np.ndarray:
    """Convert to the spec's channels and size (bilinear resize only when the source differs). Decoded files are
    turned upright by their EXIF orientation (phone photos) and brought to 8 bits by `_eight_bit` first."""
    pil = ImageOps.exif_transpose(image) if isinstance(image, Image.Image) else Image.fromarray(image)
    pil = _eight_bit(pil).convert("L" if spec.channels == 1 else "RGB")
    if pil.size != (spec.image_size, spec.image_size):
        pil = pil.resize((spec.image_size, spec.image_size), Image.Resampling.BILINEAR)
    array = np.asarray(pil, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def long_tail_indices(labels: np.ndarray, num_classes: int, factor: float) -> np.ndarray:
    """Keep the first n_max * factor^(-c/(C-1)) samples of class c (exponential profile, as in CIFAR-LT)."""
    counts = np.bincount(labels, minlength=num_classes)
    n_max = counts.max()
    keep = [int(n_max * factor ** (-c / max(num_classes - 1, 1))) for c in range(num_classes)]
    chosen = [np.flatnonzero(labels == c)[: keep[c]] for c in range(num_classes)]
    return np.sort(np.concatenate(chosen))


def _digits(spec: DataSpec, split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 ink levels -> 0..255
    index = np.arange(len(images))
    train, val = train_test_split(
        index, test_size=spec.val_fraction, random_state=spec.seed, stratify=data.target, shuffle=True
    )
    chosen = {"train": np.sort(train), "val": np.sort(val)}.get(spec.splits[split])
    if chosen is None:
        raise GenddError(f"spec {spec.name}: sklearn_digits splits must map to 'train' or 'val', got {spec.splits}")
    return images[chosen], data.target[chosen].astype(np.int64)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            zero, dtype_code, ndim = struct.unpack(">HBB", handle.read(4))
            shape = struct.unpack(f">{ndim}I", handle.read(4 * ndim))
            data = np.frombuffer(handle.read(), dtype=np.uint8)
    except (OSError, EOFError, struct.error) as err:
        raise GenddError(f"{path}: not a readable IDX file ({err}); check the dataset files") from err
    if zero != 0 or dtype_code != 0x08 or data.size != int(np.prod(shape)):
        raise GenddError(f"{path}: not a uint8 IDX file of shape {shape}; the file is corrupt or truncated")
    return data.reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise GenddError(
        f"{root / stem}[.gz] not found; install the data (e.g. apt-get install dataset-fashion-mnist) "
        "or pass --source-path"
    )


def _slice(locator: str) -> tuple[str, slice]:
    """`train[:50000]` -> ("train", slice(None, 50000)): a held-out part of a split, for tuning off the test set."""
    match = re.fullmatch(r"([^\[\]]+)(?:\[(\d*):(\d*)\])?", locator)
    if match is None:
        raise GenddError(f"split locator {locator!r}: expected NAME or NAME[start:stop], e.g. train[:50000]")
    name, start, stop = match.groups()
    return name, slice(int(start) if start else None, int(stop) if stop else None)


def _idx(spec: DataSpec, split: str) -> tuple[np.ndarray, np.ndarray]:
    root, (prefix, part) = Path(spec.path or ""), _slice(spec.splits[split])
    images = _read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if len(images) != len(labels):
        raise GenddError(f"{root}: {prefix} has {len(images)} images but {len(labels)} labels; the files do not match")
    images, labels = images[part], labels[part]
    if len(images) == 0:
        raise GenddError(f"{root}: split locator {spec.splits[split]!r} selects no images; check the slice bounds")
    return images, labels


def _array_samples(spec: DataSpec, split: str, on_total: Callable[[int], None]) -> Iterator[Sample]:
    images, labels = (_digits if spec.source == "sklearn_digits" else _idx)(spec, split)
    index = np.arange(len(images))
    if spec.imbalance_factor > 1.0 and split in spec.imbalance_splits:
        index = long_tail_indices(labels, spec.num_classes, spec.imbalance_factor)
    on_total(len(index))
    for i in index:
        yield Sample(f"{spec.name}-{split}-{i:07d}", _fit(images[i], spec), int(labels[i]) if spec.labeled else -1)


def _synthetic(spec: DataSpec, split: str, on_total: Callable[[int], None]) -> Iterator[Sample]:
    from pipeline.synthetic import synthetic_samples  # (key, image, label): synthetic.py imports nothing from here

    return (Sample(key, image, label) for key, image, label in synthetic_samples(spec, split, on_total))


@dataclass(frozen=True)
class FolderLayout:
    """What an image_folder spec reads: its class names (label = position) and each split's files with labels."""

    root: Path  # the spec's path
    carved: bool  # class folders right in `root`, train/val carved from them by val_fraction
    classes: tuple[str, ...]
    splits: dict[str, tuple[Path, list[tuple[Path, int]]]]  # split -> (folder keys are relative to, files)
    notes: tuple[str, ...]  # what was left out and why (files that are not images, empty classes)


def _summary(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _class_dirs(folder: Path) -> list[str]:
    """Sorted names of the visible sub-folders (hidden ones such as .ipynb_checkpoints are not classes)."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(folder: Path, skipped: list[Path]) -> list[Path]:
    """Image files anywhere under `folder`, sorted; hidden files and folders are passed over, other files are
    added to `skipped` (so prepare can say what it left out)."""
    found = []
    for parent, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if not name.startswith("."):
                path = Path(parent) / name
                (found if path.suffix.lower() in IMAGE_SUFFIXES else skipped).append(path)
    return sorted(found)


def _loose_images(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def _check_classes(spec: DataSpec, where: Path, found: list[str]) -> tuple[str, ...]:
    """The class names in label order: the spec's class_names (each must be a folder, and every folder one of
    them), else the sorted folder names, whose number must match num_classes when the spec gives it."""
    if spec.class_names:
        missing = [n for n in spec.class_names if n not in found]
        extra = [n for n in found if n not in spec.class_names]
        if missing:
            raise GenddError(
                f"{where}: no folder for class_names {_summary(missing)} (folders found: {_summary(found) or 'none'}); "
                "rename the folders or fix class_names in the spec"
            )
        if extra:
            raise GenddError(
                f"{where}: folders {_summary(extra)} are not in class_names; add them to class_names (and "
                f"num_classes) or move them out of {where}"
            )
        return tuple(spec.class_names)
    if spec.num_classes and len(found) != spec.num_classes:
        raise GenddError(
            f"{where}: found {len(found)} class folders ({_summary(found) or 'none'}) but num_classes is "
            f"{spec.num_classes}; set num_classes: {len(found)} or leave it out (it is then the number of folders)"
        )
    return tuple(found)


def val_count(n: int, val_fraction: float) -> int:
    """How many of a class's n images a carved val split takes: val_fraction * n rounded half up, at least one of
    a class with two or more images, and never all of them (one image stays in train)."""
    return min(max(math.floor(val_fraction * n + 0.5), 1), n - 1) if n >= 2 else 0


def _carve(files: list[Path], root: Path, spec: DataSpec) -> set[Path]:
    """The val files of one class: the val_count whose seeded hash of their path is smallest. Each file's draw
    depends on the seed and its own path only, so other classes never move it, and adding or removing files of
    its class moves at most the few at the boundary."""

    def draw(path: Path) -> bytes:
        return hashlib.sha256(f"{spec.seed}/{path.relative_to(root).as_posix()}".encode()).digest()

    return set(sorted(files, key=draw)[: val_count(len(files), spec.val_fraction)])


def _key(path: Path, root: Path) -> str:
    """A sample key from an image's path: relative to `root`, without its suffix, dots as "_" (a shard member is
    <key>.<ext>, so a dot in the key would split it in the wrong place)."""
    return path.relative_to(root).with_suffix("").as_posix().replace(".", "_")


def folder_layout(spec: DataSpec) -> FolderLayout:
    """Scan an image_folder spec's path (names and sizes only, no image is opened). Two layouts:
    `<path>/<split>/<class>/<image>` when a folder of a split's locator exists (every split then needs one), else
    `<path>/<class>/<image>` carved into the locators 'train' and 'val' (per class, val_count by val_fraction)."""
    base = Path(spec.path or "")
    if not base.is_dir():
        raise SourceMissing(
            f"{base}: image folder not found; set path in the spec (or pass --source-path) to a folder of class "
            "folders, <path>/<class>/<image>"
        )
    skipped: list[Path] = []
    notes: list[str] = []
    loose: list[Path] = []
    present = {split: base / loc for split, loc in spec.splits.items() if (base / loc).is_dir()}
    if present:
        absent = [base / loc for split, loc in spec.splits.items() if split not in present]
        if absent:
            raise GenddError(
                f"{absent[0]}: split folder not found, but {next(iter(present.values()))} is: with split folders "
                "every split needs one (<path>/<split>/<class>/<image>); create it, or point path at one folder of "
                "class folders and map splits to train and val to carve val from it by val_fraction"
            )
        found = sorted(set().union(*(_class_dirs(folder) for folder in present.values())))
        classes = _check_classes(spec, base, found)
        splits = {}
        for split, folder in present.items():
            files = [
                (f, c)
                for c, name in enumerate(classes)
                if (folder / name).is_dir()
                for f in _images(folder / name, skipped)
            ]
            splits[split] = (folder, files)
            loose += _loose_images(folder)
    else:
        odd = [loc for loc in spec.splits.values() if loc not in CARVED_SPLITS]
        if odd:
            raise GenddError(
                f"{base / odd[0]}: split folder not found; create <path>/<split>/<class>/<image> folders, or to "
                f"carve train and val from a folder of class folders map the splits to them: "
                "splits: {train: train, val: val}"
            )
        found = _class_dirs(base)
        if not found:
            raise GenddError(
                f"{base}: no class folders; put each class's images in a folder of its own, <path>/<class>/<image> "
                "(or use split folders, <path>/<split>/<class>/<image>)"
            )
        split_like = [n for n in found if n.lower() in SPLIT_LIKE]
        if split_like and not spec.class_names:
            raise GenddError(
                f"{base}: folders {', '.join(split_like)} look like splits, not classes; map the splits to those "
                "folders (splits: {train: <its train folder>, val: <its val folder>}), or if they are classes list "
                "every class in class_names"
            )
        classes = _check_classes(spec, base, found)
        parts: dict[str, list[tuple[Path, int]]] = {part: [] for part in CARVED_SPLITS}
        for c, name in enumerate(classes):
            files = _images(base / name, skipped)
            val = _carve(files, base, spec)
            for f in files:
                parts["val" if f in val else "train"].append((f, c))
        splits = {split: (base, parts[loc]) for split, loc in spec.splits.items()}
        loose = _loose_images(base)
    seen: dict[tuple[Path, str], Path] = {}  # keys are per folder: carved splits share one, split folders do not
    for split, (folder, files) in splits.items():
        have = {c for _, c in files}
        if lacking := [name for c, name in enumerate(classes) if c not in have]:
            notes.append(
                f"split {split!r} has no images of class {_summary(lacking)}; add some to their folders in {folder}"
            )
        for f, _ in files:
            if (other := seen.setdefault((folder, _key(f, folder)), f)) != f:
                raise GenddError(
                    f"{other} and {f} give the same sample key {_key(f, folder)!r} (the path without its suffix, "
                    "dots as _); rename one of them"
                )
    if skipped:
        kinds = sorted({p.suffix.lower() or p.name for p in skipped})
        notes.append(
            f"{base}: left out {_count(len(skipped), 'file')} that are not images ({_summary(kinds)}); gendd reads "
            f"{' '.join(IMAGE_SUFFIXES)}"
        )
    if loose:
        notes.append(f"{base}: left out {_count(len(loose), 'image')} outside class folders, e.g. {loose[0]}")
    return FolderLayout(base, not present, classes, splits, tuple(notes))


def _image_folder(spec: DataSpec, split: str, on_total: Callable[[int], None]) -> Iterator[Sample]:
    layout = folder_layout(spec)
    root, files = layout.splits[split]
    labels = np.array([c for _, c in files], dtype=np.int64)
    index = np.arange(len(files))
    if spec.imbalance_factor > 1.0 and split in spec.imbalance_splits:
        index = long_tail_indices(labels, len(layout.classes), spec.imbalance_factor)
    # Folders list a class at a time: shards in that order would each hold one class, and a streamed epoch (shards
    # shuffled, then a bounded shuffle buffer) would train on batches of a few classes. A seeded order mixes them.
    index = np.random.default_rng(spec.seed).permutation(index)
    on_total(len(index))
    for i in index:
        path, label = files[i]
        try:
            with Image.open(path) as image:
                image.load()
                pixels = _fit(image, spec)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise GenddError(f"{path}: not a readable image ({locations.one_line(err)}); remove or replace it") from err
        yield Sample(_key(path, root), pixels, label if spec.labeled else -1)


def _webdataset(spec: DataSpec, split: str, on_total: Callable[[int], None]) -> Iterator[Sample]:
    import webdataset as wds

    if spec.imbalance_factor > 1.0:
        raise GenddError(f"spec {spec.name}: imbalance_factor is not supported for webdataset sources; remove it")
    image_keys = ("png", "jpg", "jpeg", "webp")
    urls = _webdataset_urls(spec, split)
    stream = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    for record in stream:
        name = next((k for k in image_keys if k in record), None)
        if name is None:
            raise GenddError(
                f"{record.get('__url__')}: sample {record['__key__']} has no image ({'/'.join(image_keys)})"
            )
        label = int(record["cls"]) if spec.labeled and "cls" in record else -1
        yield Sample(record["__key__"], _fit(Image.open(io.BytesIO(record[name])), spec), label)


def _stat_digest(files: list[tuple[str, Path]], extra: object = None) -> str:
    """sha256 of (name, size, st_mtime_ns) of each file (and `extra`): a cheap change check that reads no data."""
    rows = []
    for name, path in files:
        try:
            info = path.stat()
        except OSError as err:
            raise SourceMissing(f"{path}: cannot read it ({locations.one_line(err)}); check the source data") from err
        rows.append([name, info.st_size, info.st_mtime_ns])
    return hashlib.sha256(json.dumps([extra, sorted(rows)]).encode()).hexdigest()


@dataclass(frozen=True)
class SourceState:
    """A source as prepare sees it before reading any pixel: the resolved spec (class names filled in), each
    split's fingerprint (None where there is nothing local to check) and notes on what is left out."""

    spec: DataSpec
    fingerprints: dict[str, str | None]
    notes: tuple[str, ...] = ()


def inspect_source(spec: DataSpec) -> SourceState:
    """Resolve the spec and fingerprint each split's local files: the sorted list of their names (relative to the
    source), sizes and modification times, hashed. Adding, removing, renaming or rewriting a file changes it, and
    so does a change of the class list (labels move). The embedded digits and remote webdatasets give None; a
    missing source raises SourceMissing."""
    if spec.source == "image_folder":
        layout = folder_layout(spec)
        resolved = replace(spec, class_names=layout.classes, num_classes=len(layout.classes))
        prints = {
            split: _stat_digest([(f.relative_to(layout.root).as_posix(), f) for f, _ in files], list(layout.classes))
            for split, (_, files) in layout.splits.items()
        }
        return SourceState(resolved, prints, layout.notes)
    if spec.source == "idx":
        root, prints = Path(spec.path or ""), {}
        for split, locator in spec.splits.items():
            prefix, _ = _slice(locator)
            try:
                files = [_find(root, f"{prefix}-{kind}-idx{dim}-ubyte") for kind, dim in (("images", 3), ("labels", 1))]
            except GenddError as err:
                raise SourceMissing(str(err)) from err
            prints[split] = _stat_digest([(f.name, f) for f in files])
        return SourceState(spec, prints)
    if spec.source == "webdataset":
        return SourceState(spec, {split: _webdataset_fingerprint(spec, split) for split in spec.splits})
    return SourceState(spec, dict.fromkeys(spec.splits))


def _webdataset_urls(spec: DataSpec, split: str) -> str:
    return spec.splits[split] if not spec.path else f"{spec.path.rstrip('/')}/{spec.splits[split]}"


def _webdataset_fingerprint(spec: DataSpec, split: str) -> str | None:
    """Local tar files are fingerprinted like image folders; URLs are not (None)."""
    import braceexpand

    urls = _webdataset_urls(spec, split)
    if locations.is_url(urls) or "::" in urls or urls.startswith("pipe:"):
        return None
    paths = [Path(u.removeprefix("file://")) for u in braceexpand.braceexpand(urls)]
    return _stat_digest([(p.name, p) for p in paths])


def iter_source(spec: DataSpec, split: str, on_total: Callable[[int], None] | None = None) -> Iterator[Sample]:
    """Yield the samples of one split in a fixed order (the global sample order of the shards); `on_total(n)` is
    told the split's size before the first sample, where the source knows it (not for webdataset sources)."""
    if split not in spec.splits:
        raise GenddError(f"spec {spec.name} has no split {split!r}; it has {', '.join(spec.splits)}")
    readers = {
        "sklearn_digits": _array_samples,
        "idx": _array_samples,
        "image_folder": _image_folder,
        "webdataset": _webdataset,
        "synthetic": _synthetic,
    }
    return readers[spec.source](spec, split, on_total or (lambda n: None))
