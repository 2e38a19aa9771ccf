"""Readers for the dataset sources a spec can name; each yields uniform uint8 images at the spec's size."""

from __future__ import annotations

import gzip
import io
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import GenddError
from pipeline.specs import DataSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")


@dataclass(frozen=True)
class Sample:
    """One source image: a stable key, (H, W, C) uint8 pixels at the spec's size, and a label (-1 if none)."""

    key: str
    image: np.ndarray
    label: int


def _fit(image: np.ndarray | Image.Image, spec: DataSpec) -> np.ndarray:
    """Convert to the spec's channels and size (bilinear resize only when the source differs)."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    pil = pil.convert("L" if spec.channels == 1 else "RGB")
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


def _array_samples(spec: DataSpec, split: str) -> Iterator[Sample]:
    images, labels = (_digits if spec.source == "sklearn_digits" else _idx)(spec, split)
    index = np.arange(len(images))
    if spec.imbalance_factor > 1.0 and split in spec.imbalance_splits:
        index = long_tail_indices(labels, spec.num_classes, spec.imbalance_factor)
    for i in index:
        yield Sample(f"{spec.name}-{split}-{i:07d}", _fit(images[i], spec), int(labels[i]) if spec.labeled else -1)


def _image_folder(spec: DataSpec, split: str) -> Iterator[Sample]:
    root = Path(spec.path or "") / spec.splits[split]
    if not root.is_dir():
        raise GenddError(f"{root}: split folder not found; expected <path>/<split>/<class>/<image> (see data_specs/)")
    classes = list(spec.class_names) or sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) != spec.num_classes:
        raise GenddError(f"{root}: found {len(classes)} class folders but num_classes is {spec.num_classes}")
    files = [
        (f, c)
        for c, name in enumerate(classes)
        for f in sorted((root / name).rglob("*"))
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    labels = np.array([c for _, c in files], dtype=np.int64)
    index = np.arange(len(files))
    if spec.imbalance_factor > 1.0 and split in spec.imbalance_splits:
        index = long_tail_indices(labels, spec.num_classes, spec.imbalance_factor)
    # Folders list a class at a time: shards in that order would each hold one class, and a streamed epoch (shards
    # shuffled, then a bounded shuffle buffer) would train on batches of a few classes. A seeded order mixes them.
    index = np.random.default_rng(spec.seed).permutation(index)
    for i in index:
        path, label = files[i]
        try:
            image = Image.open(path)
            image.load()
        except OSError as err:
            raise GenddError(f"{path}: not a readable image ({err}); remove or replace it") from err
        yield Sample(str(path.relative_to(root).with_suffix("")), _fit(image, spec), label if spec.labeled else -1)


def _webdataset(spec: DataSpec, split: str) -> Iterator[Sample]:
    import webdataset as wds

    if spec.imbalance_factor > 1.0:
        raise GenddError(f"spec {spec.name}: imbalance_factor is not supported for webdataset sources; remove it")
    image_keys = ("png", "jpg", "jpeg", "webp")
    urls = spec.splits[split] if not spec.path else f"{spec.path.rstrip('/')}/{spec.splits[split]}"
    stream = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    for record in stream:
        name = next((k for k in image_keys if k in record), None)
        if name is None:
            raise GenddError(
                f"{record.get('__url__')}: sample {record['__key__']} has no image ({'/'.join(image_keys)})"
            )
        label = int(record["cls"]) if spec.labeled and "cls" in record else -1
        yield Sample(record["__key__"], _fit(Image.open(io.BytesIO(record[name])), spec), label)


def iter_source(spec: DataSpec, split: str) -> Iterator[Sample]:
    """Yield the samples of one split in a fixed order (the global sample order of the shards)."""
    if split not in spec.splits:
        raise GenddError(f"spec {spec.name} has no split {split!r}; it has {', '.join(spec.splits)}")
    readers = {
        "sklearn_digits": _array_samples,
        "idx": _array_samples,
        "image_folder": _image_folder,
        "webdataset": _webdataset,
    }
    return readers[spec.source](spec, split)
