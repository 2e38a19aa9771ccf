"""An image-folder source: class folders (optionally under split folders), the val split carved from train by
`val_fraction`, and every refusal of an odd layout as one line."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import locations
from pipeline.data.samples import Sample, SourceMissing, fit_image, long_tail_indices
from pipeline.data.specs import DataSpec
from pipeline.errors import GenddError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


CARVED_SPLITS = ("train", "val")  # the parts a folder of class folders is split into (by val_fraction)


# Folder names that are split folders, not classes: a folder of class folders holding one of them is a layout mistake.
SPLIT_LIKE = ("train", "training", "val", "valid", "validation", "test", "testing", "eval")


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


def image_folder_samples(spec: DataSpec, split: str, on_total: Callable[[int], None]) -> Iterator[Sample]:
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
                pixels = fit_image(image, spec)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise GenddError(f"{path}: not a readable image ({locations.one_line(err)}); remove or replace it") from err
        yield Sample(_key(path, root), pixels, label if spec.labeled else -1)
