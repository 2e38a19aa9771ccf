"""The Zarr v3 layout of a feature cache split (`<cache>/<split>.zarr`): its reader and writer.

Every read of an array goes through `_reading`: a missing chunk file (zarr would return the fill value), a bad crc32c
checksum, an undecodable chunk or a failed request becomes one `StoreDamage` line naming the store, the array and
the chunk. Chunk files are `<array>/c/<i>/0/0` for the per-sample arrays (chunk i = samples of image shard i),
`labels/c/0`, `keys/c/0`, `head/weight/c/0/0`, `head/bias/c/0` (one chunk each unless the head is large) and
`done/c/<i>` (absent until chunk i is done).

Local stores are opened through `RenamingLocalStore`: every file (chunks and zarr.json) is written under a temp name
and renamed into place, never opened for writing where it stands, so a file that DVC links from its cache (hardlink
or symlink) is replaced, never modified. zarr's own LocalStore does the same from 3.1.3 on (zarr-python #3412);
3.1.0-3.1.2, which pyproject.toml allows, open the file itself with "wb", truncating the linked inode.
"""

from __future__ import annotations

import asyncio
import os
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.buffer import Buffer
from zarr.storage import LocalStore

from pipeline import locations
from pipeline.cache.wds_store import StoreDamage, read_problem, rebuild_hint
from pipeline.data.shards import key_array
from pipeline.errors import GenddError
from pipeline.locations import one_line
from pipeline.outputs import naming

PER_SAMPLE = ("features", "logits", "views", "features_scale")


SMALL = ("labels", "keys", "head/weight", "head/bias", "done")


def stored_dtypes(codec: str) -> dict[str, type]:
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


def _write_renamed(path: Path, data: Any, exclusive: bool = False) -> None:
    """Write `data` (bytes-like) as a new file beside `path`, then rename it to `path` (link it, when `exclusive`:
    FileExistsError if `path` exists). The file at `path`, if any, is never opened: its inode stays as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with naming(path, tmp), open(tmp, "xb") as handle:
            handle.write(data)
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class RenamingLocalStore(LocalStore):
    """zarr's LocalStore whose every write is a new file renamed into place (see the module docstring: DVC links)."""

    def _put(self, key: str, value: Buffer, exclusive: bool = False) -> None:
        self._check_writable()
        if not isinstance(value, Buffer):
            raise TypeError(f"store value must be a zarr Buffer, not {type(value).__name__}")
        _write_renamed(self.root / key, value.as_numpy_array(), exclusive)

    async def set(self, key: str, value: Buffer) -> None:
        if not self._is_open:
            await self._open()
        await asyncio.to_thread(self._put, key, value)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        if not self._is_open:
            await self._open()
        with suppress(FileExistsError):  # zarr's contract: an existing key is kept as it is
            await asyncio.to_thread(self._put, key, value, True)

    def set_sync(self, key: str, value: Buffer) -> None:
        self._ensure_open_sync()
        self._put(key, value)

    async def set_partial_values(self, key_start_values: Iterable[tuple[str, int, bytes]]) -> None:
        raise NotImplementedError("gendd writes whole chunk files only (a partial write would modify a file)")


def _zarr_store(path: Path | str, writable: bool) -> RenamingLocalStore | str:
    """What zarr opens: a RenamingLocalStore for a local path, the URL itself (fsspec) otherwise: an object store
    writes whole objects (one PUT per chunk), so no reader sees half a chunk."""
    return str(path) if locations.is_url(path) else RenamingLocalStore(Path(path), read_only=not writable)


@contextmanager
def _quiet_zarr() -> Iterator[None]:
    """Silence zarr's notes that string arrays are outside the core v3 spec (older 3.1.x warn on vlen-utf8)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=zarr.errors.UnstableSpecificationWarning)
        warnings.filterwarnings("ignore", message=".*vlen-utf8.*")
        yield


class ZarrStore:
    """A `<split>.zarr` group (local, or at a URL: s3:// and gs:// writable); the reader and writer of that layout."""

    fmt = "zarr"
    MARKER = "zarr.json"  # the group's metadata: written last when a store is created

    def __init__(self, path: Path | str, group: zarr.Group, writable: bool = False):
        self.path = path
        self._writable, self._pid = writable, os.getpid()
        self._group = group
        self._arrays = {name: group[name] for name in PER_SAMPLE if name in group}
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
        return locations.is_file(locations.join(path, ZarrStore.MARKER))

    @staticmethod
    def create(path: Path, attrs: dict, chunk_size: int, keys: np.ndarray, labels: np.ndarray, head: dict) -> None:
        """Lay out an empty store (every array, no chunk data) in the fresh, private directory `path`."""
        codec, n, k = attrs["codec"], len(keys), int(attrs["views"]["K"])
        widths = {"features": attrs["teacher"]["feature_dim"], "logits": attrs["teacher"]["num_classes"], "views": 5}
        compressors = _compressors(codec)
        # Every chunk gets a file, even one equal to the fill value (a zero head bias, all labels 0), so that a
        # missing file always means a damaged store.
        with _quiet_zarr(), zarr.config.set({"array.write_empty_chunks": True}):
            group = zarr.create_group(store=_zarr_store(path, True), zarr_format=3, attributes=attrs)
            for name, dtype in stored_dtypes(codec).items():
                shape = (n, k, int(widths[name])) if name in widths else (n, k)
                group.create_array(
                    name, shape=shape, chunks=(chunk_size, *shape[1:]), dtype=dtype, compressors=compressors
                )
            group.create_array("labels", data=labels.astype(np.int32), chunks=(max(n, 1),), compressors=compressors)
            group.create_array("keys", shape=(n,), chunks=(max(n, 1),), dtype=str, compressors=compressors)
            group["keys"][:] = np.strings.decode(key_array(keys), "utf-8").astype(np.dtypes.StringDType())
            head_group = group.create_group("head")
            for name in ("weight", "bias"):
                head_group.create_array(name, data=head[name], compressors=compressors)
            n_chunks = -(-n // chunk_size)
            group.create_array(
                "done", shape=(n_chunks,), chunks=(1,), dtype=bool, fill_value=False, compressors=compressors
            )

    @classmethod
    def open(cls, path: Path | str, writable: bool = False) -> ZarrStore:
        """Open an existing store (local, or at a URL: s3:// and gs:// writable); a damaged or unreachable one is a
        GenddError."""
        path = locations.check_out(path) if writable else locations.normalize(path)
        mode, options = ("r+" if writable else "r"), locations.storage_options(str(path))
        try:
            # Every chunk gets a file, even all-zero ones, so that a missing file always means a damaged store.
            with _quiet_zarr(), zarr.config.set({"array.write_empty_chunks": True}):
                store = _zarr_store(path, writable)
                group = zarr.open_group(store, mode=mode, zarr_format=3, storage_options=options or None)
                return cls(path, group, writable)
        except (*locations.network_errors(), ValueError, KeyError) as exc:
            raise GenddError(f"{path} is not a readable feature cache ({one_line(exc)}): {rebuild_hint(path)}") from exc

    def _own_process(self) -> None:
        """Reopen a remote group in a forked process (a loader worker): its HTTP session belongs to the parent's
        event loop, and zarr fails ("attached to a different loop") when a child uses it."""
        if self._pid != os.getpid() and locations.is_url(self.path):
            fresh = type(self).open(self.path, self._writable)
            self._group, self._arrays, self._done, self._pid = fresh._group, fresh._arrays, fresh._done, fresh._pid

    @contextmanager
    def _reading(self, name: str, chunk: int | str | None = None) -> Iterator[None]:
        """Turn any failure to read array `name` (chunk `chunk`) into one StoreDamage line."""
        try:
            with _quiet_zarr():
                yield
        except GenddError:
            raise
        except (*locations.network_errors(), ValueError, RuntimeError, KeyError) as exc:
            raise StoreDamage(self.path, name, chunk, read_problem(exc), self.chunk_fix(chunk, name)) from exc

    def chunk_fix(self, chunk: int | str | None, name: str = "features") -> str:
        """What to do about a damaged chunk: for a per-sample array or a done flag, delete the chunk's done flag
        (extraction then redoes just that chunk); for anything else, rebuild the store."""
        if name in (*PER_SAMPLE, "done") and isinstance(chunk, int) and not locations.is_url(self.path):
            return f"delete {locations.join(self.path, 'done', 'c', str(chunk))} and re-run gendd extract"
        return rebuild_hint(self.path, "the store")

    @property
    def attrs(self) -> dict:
        """The group's attributes."""
        self._own_process()
        with self._reading("attributes (zarr.json)"):
            return self._group.attrs.asdict()

    def array_names(self) -> list[str]:
        """Every array of the group (per-sample arrays first), as stored."""
        with self._reading("the group listing"):
            names = [name for name, _ in self._group.arrays()]
            if "head" in self._group:
                names += [f"head/{name}" for name, _ in self._group["head"].arrays()]
        return sorted(names, key=lambda n: (n not in PER_SAMPLE, PER_SAMPLE.index(n) if n in PER_SAMPLE else 0, n))

    def describe(self, name: str) -> tuple[tuple[int, ...], np.dtype, tuple[int, ...]] | None:
        """(shape, dtype, chunk shape) of array `name`, or None when the group has no such array."""
        with self._reading(name):
            if name not in self._group:
                return None
            array = self._group[name]
            return tuple(array.shape), np.dtype(array.dtype), tuple(array.chunks)

    def blocks(self, name: str) -> list[tuple[int | str, tuple[int, ...]]]:
        """(label, coordinates) of every chunk of array `name`; the label is the chunk's index along the first axis
        when the other axes are one chunk each (every array here), else its coordinates joined by dots."""
        with self._reading(name):
            grid = self._group[name].cdata_shape
        coords = list(np.ndindex(*grid)) if grid else [()]
        flat = all(g == 1 for g in grid[1:])
        return [(c[0] if flat and c else ".".join(map(str, c)) or 0, tuple(int(x) for x in c)) for c in coords]

    def _chunk_file(self, array: zarr.Array, coords: Sequence[int]) -> Path | str:
        key = array.metadata.encode_chunk_key(tuple(coords))  # "c/<i>/0/0"
        return locations.join(self.path, *array.path.split("/"), *key.split("/"))

    def read_block(
        self, name: str, coords: Sequence[int], label: int | str, missing_ok: bool = False
    ) -> np.ndarray | None:
        """One chunk of array `name`; its file must exist (zarr would return the fill value for a lost one) unless
        `missing_ok` (then None for an absent file)."""
        with self._reading(name, label):
            array = self._group[name]
            if not locations.is_file(self._chunk_file(array, coords)):
                if missing_ok:
                    return None
                raise StoreDamage(self.path, name, label, "is missing (no chunk file)", self.chunk_fix(label, name))
            return np.asarray(array.get_block_selection(tuple(coords)))

    def read_array(self, name: str, missing_ok: bool = False) -> np.ndarray:
        """Array `name` whole; the error names the damaged chunk. `missing_ok`: chunk files may be absent (the done
        flags of unfinished chunks read False)."""
        self._own_process()
        blocks = self.blocks(name)
        try:
            with self._reading(name, blocks[0][0] if len(blocks) == 1 else None):
                array = self._group[name]
                for label, coords in blocks if not missing_ok else ():
                    if not locations.is_file(self._chunk_file(array, coords)):
                        raise StoreDamage(self.path, name, label, "is missing (no chunk file)")
                return np.asarray(array[...])
        except StoreDamage as exc:
            if exc.chunk is not None:
                raise
            for label, coords in blocks:  # which chunk: read them one by one (only after a failure)
                self.read_block(name, coords, label, missing_ok)
            raise

    def keys(self) -> np.ndarray:
        """Sample keys in global order, as a `key_array` (vlen UTF-8 on disk; no Python list is made)."""
        keys = self.read_array("keys")
        if keys.dtype.kind not in "OTU":
            raise StoreDamage(self.path, "keys", None, f"has dtype {keys.dtype}, expected strings")
        return key_array(keys.astype(np.dtypes.StringDType(), copy=False))

    def labels(self) -> np.ndarray:
        """Labels (N,) int32, -1 = none."""
        return np.asarray(self.read_array("labels"), dtype=np.int32)

    def head(self) -> tuple[np.ndarray, np.ndarray]:
        """Teacher classifier weight (C, D) and bias (C,), float32."""
        weight, bias = self.read_array("head/weight"), self.read_array("head/bias")
        return np.asarray(weight, np.float32), np.asarray(bias, np.float32)

    def done(self) -> np.ndarray:
        """(n_chunks,) bool, read fresh from disk (other writers may have filled chunks; an absent flag is False)."""
        return np.asarray(self.read_array("done", missing_ok=True), dtype=bool)

    def write(self, i: int, start: int, stored: dict[str, np.ndarray], images: list[bytes] | None) -> None:
        """Write chunk i's arrays (whole chunks only), then mark it done; images live in the image shards."""
        for name, array in stored.items():
            self._arrays[name][start : start + len(array)] = array
        self._done[i] = True

    def read(self, i: int, start: int, stop: int, images: list[bytes] | None = None) -> dict[str, np.ndarray]:
        """Stored (not decoded) arrays of chunk i (`images`: None, a Zarr cache holds no images)."""
        if images is not None:
            raise GenddError(f"{self.path}: a Zarr cache holds no images: read them from the image shards")
        self._own_process()
        out = {}
        for name, array in self._arrays.items():
            coords = (i, *[0] * (array.ndim - 1))
            with self._reading(name, i):
                if not locations.is_file(self._chunk_file(array, coords)):  # zarr would return zeros for a lost file
                    raise StoreDamage(self.path, name, i, "is missing (no chunk file)", self.chunk_fix(i, name))
                out[name] = array[start:stop]
        return out

    def set_complete(self) -> None:
        """Mark the store complete (the last write of an extraction)."""
        self._group.attrs["complete"] = True

    def damage_seen(self, done: np.ndarray, complete: bool) -> list[str]:
        """Damage visible from file sizes alone (local stores): chunk files missing or too short to hold a checksum for
        done chunks and for the arrays written at creation; done flags unset in a complete store."""
        found = []
        size = self._size_lookup()

        def check(name: str, label: int | str, coords: tuple[int, ...]) -> None:
            bytes_ = size(self._chunk_file(self._group[name], coords))
            if bytes_ is None:
                found.append(f"{name} chunk {label}: chunk file missing")
            elif bytes_ < 4:  # not even the 4-byte crc32c
                found.append(f"{name} chunk {label}: chunk file truncated ({bytes_} bytes)")

        for name in self._arrays:
            for i in np.flatnonzero(done):
                check(name, int(i), (int(i), *[0] * (self._arrays[name].ndim - 1)))
        for name in SMALL[:-1]:
            for label, coords in self.blocks(name):
                check(name, label, coords)
        if complete:
            for i in range(self.n_chunks):
                if size(self._chunk_file(self._done, (i,))) is None:
                    found.append(f"done chunk {i}: not set in a complete store")
        return found

    def _size_lookup(self) -> Callable[[Path | str], int | None]:
        """File (object) path -> its size, None when absent: a stat locally, one listing of an object store."""
        if not locations.is_url(self.path):
            return lambda file: Path(file).stat().st_size if Path(file).is_file() else None
        listing, root = locations.object_sizes(str(self.path)), str(self.path).rstrip("/") + "/"
        return lambda file: listing.get(str(file).removeprefix(root))

    def stored_bytes(self) -> dict[str, int]:
        """Chunk bytes stored per array (without each array's small zarr.json); local, s3:// or gs:// stores."""
        names = [*self._arrays, "labels", "keys", "head/weight", "head/bias", "done"]
        if locations.is_url(self.path):
            listing = locations.object_sizes(str(self.path))
            return {name: sum(s for key, s in listing.items() if key.startswith(f"{name}/c/")) for name in names}
        sizes = {}
        for name in names:
            sizes[name] = self._group[name].nbytes_stored() - (self.path / name / "zarr.json").stat().st_size
        return sizes
