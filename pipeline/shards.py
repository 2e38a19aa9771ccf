"""Image shards: `<split>-NNNNNN.tar` (WebDataset layout: __key__, png, cls) plus one `index.json`."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline import locations
from pipeline.errors import GenddError
from pipeline.sources import Sample, iter_source
from pipeline.specs import DataSpec

if TYPE_CHECKING:  # imported where tensors are built: shard-decode processes start without torch
    import torch

INDEX = "index.json"


@dataclass(frozen=True)
class ShardSet:
    """The shards of one split: file names, sample counts and first global index of each."""

    root: Path | str  # a local directory, or the URL string of a remote one
    split: str
    names: tuple[str, ...]
    counts: tuple[int, ...]
    starts: tuple[int, ...]
    keys_file: str | None = None  # keys and labels of the split in order (JSON); absent in shards from before it

    @property
    def n(self) -> int:
        """Number of samples in the split."""
        return sum(self.counts)

    def path(self, i: int) -> Path | str:
        """Location of shard i: a Path locally, the URL string for a remote root."""
        return locations.join(self.root, self.names[i])

    def keys_and_labels(self) -> tuple[list[str], list[int]]:
        """Every key and label of the split in global order: from the side file prepare wrote, else a shard scan."""
        if self.keys_file and locations.is_file(keys_path := locations.join(self.root, self.keys_file)):
            record = json.loads(locations.read_text(keys_path))
            return record["keys"], record["labels"]
        keys, labels = [], []
        for i in range(len(self.names)):
            k, y = read_shard_labels(self.path(i))
            keys += k
            labels += y
        return keys, labels


@dataclass(frozen=True)
class ShardIndex:
    """What `index.json` records: the spec (and its hash) and every split's shards."""

    root: Path | str  # a local directory, or the URL string of a remote one
    spec: dict
    spec_hash: str
    shard_size: int
    max_samples: int | None
    splits: dict[str, ShardSet]

    def split(self, name: str) -> ShardSet:
        """One split's shards, or a clear error naming the splits that exist."""
        if name not in self.splits:
            raise GenddError(
                f"{self.root}: no split {name!r} in the shards (have {', '.join(self.splits)}); "
                "re-run gendd prepare with a spec that defines it"
            )
        return self.splits[name]

    @property
    def labeled(self) -> bool:
        """Whether the shards carry labels."""
        return bool(self.spec["labeled"])


def _encode(sample: Sample) -> dict:
    buffer = io.BytesIO()
    image = sample.image[:, :, 0] if sample.image.shape[2] == 1 else sample.image
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)  # lossless; level 1 keeps prepare fast
    record = {"__key__": sample.key, "png": buffer.getvalue()}
    if sample.label >= 0:
        record["cls"] = str(sample.label).encode()
    return record


def _write_shard(path: Path, samples: list[Sample]) -> None:
    """Write to a temporary name and rename: a crash never leaves a half shard under the final name."""
    import webdataset as wds

    tmp = path.with_suffix(".tar.tmp")
    with open(tmp, "wb") as handle, wds.TarWriter(handle) as writer:
        for sample in samples:
            writer.write(_encode(sample))
    os.replace(tmp, path)


def _batched(items: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _write_split(spec: DataSpec, split: str, root: Path, shard_size: int, max_samples: int | None) -> dict:
    names, counts, starts, seen, labels = [], [], [], {}, []
    samples = islice(iter_source(spec, split), max_samples)
    with tqdm(desc=f"prepare {split}", unit="img", leave=False) as bar:
        for i, chunk in enumerate(_batched(samples, shard_size)):
            name = f"{split}-{i:06d}.tar"
            for sample in chunk:
                if sample.key in seen:
                    raise GenddError(
                        f"spec {spec.name}: duplicate sample key {sample.key!r} in {split}; keys must be unique"
                    )
                seen[sample.key] = None  # a dict: unique and in order (the keys file lists them)
                labels.append(sample.label)
            if not (root / name).is_file():  # shards are deterministic: a finished one from a killed run is kept
                _write_shard(root / name, chunk)
            names.append(name)
            starts.append(sum(counts))
            counts.append(len(chunk))
            bar.update(len(chunk))
    if not counts:
        raise GenddError(f"spec {spec.name}: split {split!r} has no samples; check the source path and spec")
    # Keys and labels in one small file: extraction sizes its store from them without scanning every shard.
    keys_file = f"{split}-keys.json"
    (root / keys_file).write_text(json.dumps({"keys": list(seen), "labels": labels}))
    return {"shards": names, "counts": counts, "starts": starts, "n": sum(counts), "keys_file": keys_file}


def load_index(root: str | Path) -> ShardIndex:
    """Read `index.json` of a shard directory or URL."""
    root = locations.normalize(root)
    path = locations.join(root, INDEX)
    if not locations.is_file(path):
        if locations.is_url(root):
            raise GenddError(f"{path} not found: check the URL, or run gendd prepare and upload its output there")
        raise GenddError(f"{path} not found; run `gendd prepare --spec <spec> --out {root}` first")
    try:
        raw = json.loads(locations.read_text(path))
    except ValueError as err:
        raise GenddError(f"{path} is not valid JSON ({locations.one_line(err)}): re-run gendd prepare") from err
    splits = {
        name: ShardSet(root, name, tuple(s["shards"]), tuple(s["counts"]), tuple(s["starts"]), s.get("keys_file"))
        for name, s in raw["splits"].items()
    }
    return ShardIndex(root, raw["spec"], raw["spec_hash"], raw["shard_size"], raw["max_samples"], splits)


def prepare_shards(
    spec: DataSpec, out: str | Path, shard_size: int = 1000, max_samples: int | None = None
) -> tuple[ShardIndex, bool]:
    """Write every split of `spec` as shards; returns (index, wrote) and writes nothing when already up to date."""
    if shard_size < 1:
        raise GenddError(f"shard size must be >= 1, got {shard_size}")
    root = locations.check_local_out(out)
    signature = {"spec_hash": spec.spec_hash, "shard_size": shard_size, "max_samples": max_samples}
    if (root / INDEX).is_file():
        index = load_index(root)
        whole = all(s.path(i).is_file() for s in index.splits.values() for i in range(len(s.names)))
        whole = whole and all((s.root / s.keys_file).is_file() for s in index.splits.values() if s.keys_file)
        if whole and (index.spec_hash, index.shard_size, index.max_samples) == tuple(signature.values()):
            return index, False
    # The marker says which settings the shards on disk were made with: finished shards of a killed run with the
    # same settings are kept (they are deterministic), anything else is cleared so no stale shard survives.
    marker = root / ".prepare.json"
    if not marker.is_file() or json.loads(marker.read_text()) != signature:
        for stale in [*root.glob("*.tar"), *root.glob("*-keys.json"), root / INDEX]:
            stale.unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(signature))
    splits = {split: _write_split(spec, split, root, shard_size, max_samples) for split in spec.splits}
    spec_fields = {k: v for k, v in spec.__dict__.items() if k != "path"}
    record = {"spec": spec_fields, **signature, "splits": splits}
    tmp = root / (INDEX + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=list))
    os.replace(tmp, root / INDEX)  # written last: an index means every shard is whole
    return load_index(root), True


@dataclass(frozen=True)
class ShardData:
    """Decoded samples of one or more shards: keys, (N, C, H, W) uint8 images and (N,) int64 labels (-1 = none)."""

    keys: list[str]
    images: torch.Tensor
    labels: torch.Tensor
    png: list[bytes] | None = None  # the encoded images, kept when a writer re-packs them (WebDataset caches)


def _redo(location: str | Path) -> str:
    """What to do about a damaged shard: remake it (and upload it again when it is remote)."""
    if locations.is_url(location):
        return "re-run gendd prepare and upload the shards again"
    return "delete it and re-run gendd prepare"


def _open_tar(location: str | Path) -> tarfile.TarFile:
    """A shard as a tarfile: local files are streamed, remote ones fetched whole once (memory: one shard)."""
    if locations.is_url(location):
        return tarfile.open(fileobj=io.BytesIO(locations.read_bytes(location)), mode="r:")
    return tarfile.open(locations.normalize(location), "r")


def read_shard(path: str | Path, keep_png: bool = False) -> ShardData:
    """Decode one whole shard in order, as tensors."""
    import torch

    keys, images, labels, raw = decode_shard(path, keep_png)
    return ShardData(keys, torch.from_numpy(images), torch.from_numpy(labels), raw)


def decode_shard(path: str | Path, keep_png: bool = False) -> tuple[list[str], np.ndarray, np.ndarray, list | None]:
    """Decode one whole shard (a path or URL) in order, torch-free: keys, (N, C, H, W) uint8 images, (N,) int64
    labels, and the encoded images when asked. tarfile reads it in one pass (no streaming pipeline needed here)."""
    keys, images, labels, raw, current = [], [], [], [], {}

    def flush() -> None:
        if current:
            if "png" not in current:
                raise GenddError(f"{path}: sample {current['key']} has no png; the shard is corrupt: {_redo(path)}")
            keys.append(current["key"])
            images.append(current["png"])
            labels.append(current.get("cls", -1))
            current.clear()

    try:
        with _open_tar(path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if current and key != current["key"]:
                    flush()
                current["key"] = key
                data = tar.extractfile(member).read()
                if ext == "png":
                    current["png"] = np.asarray(Image.open(io.BytesIO(data)))
                    if keep_png:
                        raw.append(data)
                elif ext == "cls":
                    current["cls"] = int(data)
            flush()
    except (tarfile.TarError, OSError, ValueError) as err:
        raise GenddError(f"{path}: unreadable shard ({locations.one_line(err)}); {_redo(path)}") from err
    array = np.stack(images)
    array = array[:, None] if array.ndim == 3 else array.transpose(0, 3, 1, 2)  # -> (N, C, H, W)
    return keys, np.ascontiguousarray(array), np.asarray(labels, dtype=np.int64), raw if keep_png else None


def read_shard_labels(path: str | Path) -> tuple[list[str], list[int]]:
    """Keys and labels of a shard without decoding its images (cheap: stores are sized from this)."""
    keys, labels = [], []
    try:
        with _open_tar(path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if not keys or keys[-1] != key:
                    keys.append(key)
                    labels.append(-1)
                if ext == "cls":
                    labels[-1] = int(tar.extractfile(member).read())
    except (tarfile.TarError, OSError, ValueError) as err:
        raise GenddError(f"{path}: unreadable shard ({locations.one_line(err)}); {_redo(path)}") from err
    return keys, labels


def load_split(shards: ShardSet) -> ShardData:
    """Every shard of a split, concatenated in global order (small datasets are held whole in memory)."""
    import torch

    parts = [read_shard(shards.path(i)) for i in range(len(shards.names))]
    for i, part in enumerate(parts):
        if len(part.keys) != shards.counts[i]:
            raise GenddError(
                f"{shards.path(i)}: {len(part.keys)} samples, index says {shards.counts[i]}; "
                f"the shard is truncated: {_redo(shards.path(i))}"
            )
    return ShardData(
        [k for p in parts for k in p.keys], torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts])
    )
