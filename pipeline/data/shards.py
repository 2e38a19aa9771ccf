"""Image shards: `<split>-NNNNNN.tar` (WebDataset layout: __key__, png, cls) plus one `index.json`."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pipeline import locations
from pipeline.errors import GenddError

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
    sizes: tuple[int, ...] = ()  # byte size of each shard as prepare wrote it; empty in indexes from before it
    hashes: tuple[str, ...] = ()  # sha256 (hex) of each shard as prepare wrote it; empty in indexes from before it
    keys_size: int | None = None  # byte size and sha256 of the keys file, likewise
    keys_hash: str | None = None
    keys_array: str | None = None  # the keys file's content as numpy arrays (.npz); absent in shards from before it

    @property
    def n(self) -> int:
        """Number of samples in the split."""
        return sum(self.counts)

    @property
    def digest(self) -> str | None:
        """sha256 over the split's shard hashes in order: what its pixels and labels are (None: an index without
        hashes). A training checkpoint records it, so a run over changed shards never resumes one."""
        if not self.hashes:
            return None
        return hashlib.sha256("\n".join(self.hashes).encode()).hexdigest()

    def path(self, i: int) -> Path | str:
        """Location of shard i: a Path locally, the URL string for a remote root."""
        return locations.join(self.root, self.names[i])

    def keys_and_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """Every key (a `key_array`) and label ((N,) int64) of the split in global order: from the arrays prepare
        wrote, else its JSON keys file (shards from before the arrays), else a scan of the shards."""
        if self.keys_array and locations.is_file(arrays_path := locations.join(self.root, self.keys_array)):
            return read_key_arrays(arrays_path)
        if self.keys_file and locations.is_file(keys_path := locations.join(self.root, self.keys_file)):
            record = json.loads(locations.read_text(keys_path))
            return key_array(record["keys"]), np.asarray(record["labels"], dtype=np.int64)
        keys, labels = [], []
        for i in range(len(self.names)):
            k, y = read_shard_labels(self.path(i))
            keys += k
            labels += y
        return key_array(keys), np.asarray(labels, dtype=np.int64)


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

    @property
    def class_names(self) -> tuple[str, ...]:
        """The class names in label order (an image folder's folder names when its spec lists none); may be empty."""
        return tuple(self.spec.get("class_names") or ())


def key_array(keys: Sequence[str] | np.ndarray) -> np.ndarray:
    """Sample keys as one fixed-width bytes array (UTF-8, numpy dtype "S<longest>"), the form every reader holds.

    A list of 1.28M str is 1.28M objects (~190 MiB with the list) whose refcounts dirty every page they sit on, so
    each forked loader worker ends up with its own copy; one numpy array has one refcount and its pages stay shared.
    Bytes, not numpy's "U": UTF-32 would take 4x the memory. Elements are bytes: decode before formatting or
    hashing one (views are seeded by the key as str)."""
    if isinstance(keys, np.ndarray) and keys.dtype.kind != "O":
        if keys.dtype.kind == "S":
            return keys
        try:  # ASCII (the usual keys): a plain cast, ~3x less transient memory than encode's bytes per key
            return keys.astype(f"S{max(1, int(np.strings.str_len(keys).max(initial=0)))}")
        except UnicodeEncodeError:
            return np.strings.encode(keys, "utf-8")
    return np.array([key if isinstance(key, bytes) else str(key).encode() for key in keys], dtype=np.bytes_)


def read_key_arrays(location: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(keys, labels int64) from a keys array file (.npz) prepare wrote: no Python object per sample is made."""
    try:
        data = locations.read_bytes(location) if locations.is_url(location) else Path(location).read_bytes()
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            keys, labels = arrays["keys"], arrays["labels"].astype(np.int64)
        if keys.dtype.kind != "S" or keys.shape != labels.shape or keys.ndim != 1:
            raise ValueError(f"keys {keys.dtype} {keys.shape}, labels {labels.shape}")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise GenddError(f"{location}: unreadable keys file ({locations.one_line(err)}): {_redo(location)}") from err
    return keys, labels


def read_marker(marker: Path) -> dict | None:
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def load_index(root: str | Path) -> ShardIndex:
    """Read `index.json` of a shard directory or URL."""
    root = locations.normalize(root)
    path = locations.join(root, INDEX)
    if not locations.is_file(path):
        if locations.is_url(root):
            raise GenddError(f"{path} not found: check the URL, or run gendd prepare and upload its output there")
        raise GenddError(f"{path} not found; run `gendd prepare --spec <spec> --out {root}` first")
    redo = "re-run gendd prepare" + ("" if locations.is_url(root) else f" --out {root}")
    try:
        raw = json.loads(locations.read_text(path))
    except ValueError as err:
        raise GenddError(f"{path} is not valid JSON ({locations.one_line(err)}): {redo}") from err
    try:
        splits = {
            name: ShardSet(
                root,
                name,
                tuple(s["shards"]),
                tuple(s["counts"]),
                tuple(s["starts"]),
                s.get("keys_file"),
                tuple(s.get("sizes", ())),
                tuple(s.get("sha256", ())),
                s.get("keys_size"),
                s.get("keys_sha256"),
                s.get("keys_array"),
            )
            for name, s in raw["splits"].items()
        }
        return ShardIndex(root, raw["spec"], raw["spec_hash"], raw["shard_size"], raw["max_samples"], splits)
    except (KeyError, TypeError, AttributeError) as err:
        raise GenddError(f"{path} lacks field {locations.one_line(err)}: {redo}") from err


@dataclass(frozen=True)
class ShardData:
    """Decoded samples of one or more shards: keys, (N, C, H, W) uint8 images and (N,) int64 labels (-1 = none)."""

    keys: list[str]
    images: torch.Tensor
    labels: torch.Tensor
    png: list[bytes] | None = None  # the encoded images, kept when a writer re-packs them (WebDataset caches)


REWRITES = "(it rewrites damaged shards; the feature cache stays valid since shards are deterministic)"


def _redo(location: str | Path) -> str:
    """What to do about a damaged shard: remake it (and upload it again when it is remote)."""
    if locations.is_url(location):
        return "re-run gendd prepare and upload the shards again"
    return f"re-run gendd prepare --out {Path(str(location).removeprefix('file://')).parent} {REWRITES}"


def shard_count_error(shards: ShardSet, i: int, found: int) -> GenddError:
    """The error for shard i holding `found` samples where index.json says otherwise, with the fix that works: a
    shard whose size or sha256 differs from the recorded one is damaged (prepare rewrites it); one that is as
    recorded means index.json itself is wrong (prepare rewrites that). For remote shards: remake and upload."""
    location = shards.path(i)
    head = f"{location}: {found} samples, index.json says {shards.counts[i]}"
    if locations.is_url(location):
        return GenddError(f"{head}: the shard or index.json is damaged; {_redo(location)}")
    redo = f"re-run gendd prepare --out {shards.root}"
    if not shards.sizes or not Path(location).is_file():
        return GenddError(f"{head}: the shard or index.json is damaged; {redo} {REWRITES}")
    size = Path(location).stat().st_size
    if size != shards.sizes[i]:
        return GenddError(
            f"{head}: the shard is damaged or truncated ({size} bytes, index.json recorded {shards.sizes[i]}); "
            f"{redo} {REWRITES}"
        )
    if shards.hashes and file_digest(Path(location))[1] != shards.hashes[i]:
        return GenddError(f"{head}: the shard is damaged (its sha256 differs from index.json's); {redo} {REWRITES}")
    return GenddError(
        f"{head}, but the shard is byte for byte as prepare wrote it: index.json is wrong or was edited; "
        f"{redo} to rewrite index.json"
    )


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


def decode_pngs(pngs: list[bytes]) -> np.ndarray:
    """Encoded images (as a shard holds them) -> (N, C, H, W) uint8, decoded as decode_shard decodes them."""
    array = np.stack([np.asarray(Image.open(io.BytesIO(data))) for data in pngs])
    return np.ascontiguousarray(array[:, None] if array.ndim == 3 else array.transpose(0, 3, 1, 2))


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
            raise shard_count_error(shards, i, len(part.keys))
    return ShardData(
        [k for p in parts for k in p.keys], torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts])
    )


def file_digest(path: Path) -> tuple[int, str]:
    """(byte size, sha256 hex) of a local file, read in 1 MiB blocks: shards can be gigabytes."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()
