"""Readers for the dataset sources a spec can name; each yields uniform uint8 images at the spec's size."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import locations
from pipeline.data.folders import folder_layout, image_folder_samples
from pipeline.data.samples import Sample, SourceMissing, fit_image, long_tail_indices
from pipeline.data.specs import DataSpec
from pipeline.errors import GenddError


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
        yield Sample(f"{spec.name}-{split}-{i:07d}", fit_image(images[i], spec), int(labels[i]) if spec.labeled else -1)


def _synthetic(spec: DataSpec, split: str, on_total: Callable[[int], None]) -> Iterator[Sample]:
    from pipeline.data.synthetic import synthetic_samples

    return (Sample(key, image, label) for key, image, label in synthetic_samples(spec, split, on_total))


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
        yield Sample(record["__key__"], fit_image(Image.open(io.BytesIO(record[name])), spec), label)


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
        "image_folder": image_folder_samples,
        "webdataset": _webdataset,
        "synthetic": _synthetic,
    }
    return readers[spec.source](spec, split, on_total or (lambda n: None))
