"""The Zarr v3 layout of a feature cache split (`<cache>/<split>.zarr`): its reader and writer."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline import locations
from pipeline.errors import GenddError
from pipeline.locations import one_line
from pipeline.store_wds import rebuild_hint


def _stored_dtypes(codec: str) -> dict[str, type]:
    """Dtype of every per-sample array the codec stores."""
    value = {"bf16": np.uint16, "int8": np.int8}.get(codec, np.float16)
    dtypes = {"features": value, "logits": np.uint16 if codec == "bf16" else np.float16, "views": np.float32}
    return dtypes | ({"features_scale": np.float32} if codec == "int8" else {})


def _compressors(codec: str) -> tuple[BloscCodec | Crc32cCodec, ...]:
    """Zarr bytes codecs: Blosc (lz4 for "lz4", none for "none", zstd otherwise, lossy ones included), then crc32c."""
    # The checksum makes a truncated or corrupt chunk fail to decode; Blosc alone may decode it into garbage.
    if codec == "none":
        return (Crc32cCodec(),)
    # zstd at clevel 1: on post-ReLU float16 features it compresses as well as clevel 5 (1.69x) at ~6x the speed.
    cname, clevel = ("lz4", 5) if codec == "lz4" else ("zstd", 1)
    return (BloscCodec(cname=cname, clevel=clevel, shuffle="shuffle"), Crc32cCodec())


@contextmanager
def _quiet_zarr() -> Iterator[None]:
    """Silence zarr's notes that string arrays are outside the core v3 spec (older 3.1.x warn on vlen-utf8)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=zarr.errors.UnstableSpecificationWarning)
        warnings.filterwarnings("ignore", message=".*vlen-utf8.*")
        yield


class ZarrStore:
    """A `<split>.zarr` group (local, or read-only at a URL); the reader and writer of that layout."""

    fmt = "zarr"

    def __init__(self, path: Path | str, group: zarr.Group, writable: bool = False):
        self.path = path
        self._writable, self._pid = writable, os.getpid()
        self._group = group
        self._arrays = {
            name: group[name] for name in ("features", "logits", "views", "features_scale") if name in group
        }
        self._done = group["done"]
        self.chunk_size = int(self._arrays["features"].chunks[0])
        self.n_chunks = int(self._done.shape[0])

    @staticmethod
    def location(cache_dir: Path | str, split: str) -> Path | str:
        """Directory (or URL) of one split's Zarr group."""
        return locations.join(cache_dir, f"{split}.zarr")

    @staticmethod
    def exists(path: Path | str) -> bool:
        """Whether a (created) store is at `path`: the group's zarr.json is its creation marker."""
        return locations.is_file(locations.join(path, "zarr.json"))

    @staticmethod
    def create(path: Path, attrs: dict, chunk_size: int, keys: list[str], labels: np.ndarray, head: dict) -> None:
        """Lay out an empty store (every array, no chunk data) in the fresh, private directory `path`."""
        codec, n, k = attrs["codec"], len(keys), int(attrs["views"]["K"])
        widths = {"features": attrs["teacher"]["feature_dim"], "logits": attrs["teacher"]["num_classes"], "views": 5}
        compressors = _compressors(codec)
        with _quiet_zarr():
            group = zarr.create_group(store=str(path), zarr_format=3, attributes=attrs)
            for name, dtype in _stored_dtypes(codec).items():
                shape = (n, k, int(widths[name])) if name in widths else (n, k)
                group.create_array(
                    name, shape=shape, chunks=(chunk_size, *shape[1:]), dtype=dtype, compressors=compressors
                )
            group.create_array("labels", data=labels.astype(np.int32), chunks=(max(n, 1),), compressors=compressors)
            group.create_array("keys", shape=(n,), chunks=(max(n, 1),), dtype=str, compressors=compressors)
            group["keys"][:] = np.asarray(keys, dtype=np.dtypes.StringDType())
            head_group = group.create_group("head")
            for name in ("weight", "bias"):
                head_group.create_array(name, data=head[name], compressors=compressors)
            n_chunks = -(-n // chunk_size)
            group.create_array(
                "done", shape=(n_chunks,), chunks=(1,), dtype=bool, fill_value=False, compressors=compressors
            )

    @classmethod
    def open(cls, path: Path | str, writable: bool = False) -> ZarrStore:
        """Open an existing store (a URL read-only); a damaged or unreachable one is a GenddError."""
        path = locations.check_local_out(path) if writable else locations.normalize(path)
        mode, options = ("r+" if writable else "r"), locations.storage_options(str(path))
        try:
            # Every chunk gets a file, even all-zero ones, so that a missing file always means a damaged store.
            with _quiet_zarr(), zarr.config.set({"array.write_empty_chunks": True}):
                group = zarr.open_group(str(path), mode=mode, zarr_format=3, storage_options=options or None)
                return cls(path, group, writable)
        except (*locations.network_errors(), ValueError, KeyError) as exc:
            raise GenddError(f"{path} is not a readable feature cache ({one_line(exc)}): {rebuild_hint(path)}") from exc

    def _own_process(self) -> None:
        """Reopen a remote group in a forked process (a loader worker): its HTTP session belongs to the parent's
        event loop, and zarr fails ("attached to a different loop") when a child uses it."""
        if self._pid != os.getpid() and locations.is_url(self.path):
            fresh = type(self).open(self.path, self._writable)
            self._group, self._arrays, self._done, self._pid = fresh._group, fresh._arrays, fresh._done, fresh._pid

    @property
    def attrs(self) -> dict:
        """The group's attributes."""
        self._own_process()
        return self._group.attrs.asdict()

    def keys(self) -> list[str]:
        """Sample keys in global order."""
        self._own_process()
        with _quiet_zarr():
            return [str(key) for key in self._group["keys"][:].tolist()]

    def labels(self) -> np.ndarray:
        """Labels (N,) int32, -1 = none."""
        self._own_process()
        return np.asarray(self._group["labels"][:], dtype=np.int32)

    def head(self) -> tuple[np.ndarray, np.ndarray]:
        """Teacher classifier weight (C, D) and bias (C,), float32."""
        self._own_process()
        weight, bias = self._group["head/weight"][:], self._group["head/bias"][:]
        return np.asarray(weight, np.float32), np.asarray(bias, np.float32)

    def done(self) -> np.ndarray:
        """(n_chunks,) bool, read fresh from disk (other writers may have filled chunks)."""
        self._own_process()
        return np.asarray(self._done[:], dtype=bool)

    def write(self, i: int, start: int, stored: dict[str, np.ndarray], images: list[bytes] | None) -> None:
        """Write chunk i's arrays (whole chunks only), then mark it done; images live in the image shards."""
        for name, array in stored.items():
            self._arrays[name][start : start + len(array)] = array
        self._done[i] = True

    def read(self, i: int, start: int, stop: int) -> dict[str, np.ndarray]:
        """Stored (not decoded) arrays of chunk i."""
        self._own_process()
        try:
            for name, array in self._arrays.items():  # zarr would silently return zeros for a lost chunk file
                if not locations.is_file(locations.join(self.path, name, "c", str(i), *["0"] * (array.ndim - 1))):
                    raise FileNotFoundError(f"{name} chunk file missing")
            return {name: array[start:stop] for name, array in self._arrays.items()}
        except (*locations.network_errors(), ValueError, RuntimeError) as exc:
            raise GenddError(
                f"{self.path}: chunk {i} cannot be read ({one_line(exc)}): {rebuild_hint(self.path, 'the store')}"
            ) from exc

    def set_complete(self) -> None:
        """Mark the store complete (the last write of an extraction)."""
        self._group.attrs["complete"] = True

    def stored_bytes(self) -> dict[str, int]:
        """Chunk bytes stored per array (without each array's small zarr.json); local stores only."""
        if locations.is_url(self.path):
            raise GenddError(f"{self.path}: storage sizes are measured on local caches only: download it first")
        sizes = {}
        for name in [*self._arrays, "labels", "keys", "head/weight", "head/bias", "done"]:
            sizes[name] = self._group[name].nbytes_stored() - (self.path / name / "zarr.json").stat().st_size
        return sizes
