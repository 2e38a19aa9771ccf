"""Feature cache: a teacher's features and logits on K views of every sample, chunked in step with the image shards.

Two formats, one reader (`FeatureCache`):
- "zarr" (default): a Zarr v3 group `<cache>/<split>.zarr` with `features` (N, K, D), `logits` (N, K, C),
  `views` (N, K, 5) float32, `labels` (N,) int32 (-1 = none), `keys` (N,) variable-length UTF-8 strings,
  `head/weight` (C, D), `head/bias` (C,) float32, `done` (n_chunks,) bool in chunks of 1, and for int8
  `features_scale` (N, K) float32. Chunk i holds samples [i * chunk_size, (i + 1) * chunk_size), other axes whole.
- "webdataset": self-contained training shards `<cache>/<split>-features/` (layout in pipeline/cache/wds_store.py).

Codecs: "zstd" (default; float16 through Blosc-zstd, clevel 1, byte shuffle), "lz4" (Blosc-lz4) and "none" (raw
float16) are lossless on float16; "bf16" (bfloat16 bits in uint16) and "int8" (features only, symmetric absmax scale
per (sample, view); logits float16) are lossy and opt-in. Every Zarr chunk carries a crc32c checksum. Reads return
float32, or float16 features and logits when asked (streaming keeps them half precision until the device).

Per-sample metadata is held as numpy arrays (keys as `pipeline.data.shards.key_array`, labels int64), which forked
loader workers share without copying. The attribute `dataset.shard_sha256` lists the sha256 of every image shard the
cache was built from (caches from before it lack it); readers given the shards refuse a cache whose shards changed
since.

Stores may live at an fsspec URL (read: `http(s)://`, `s3://`, `gs://`; written: `s3://`, `gs://`). In object storage
every file is one object uploaded whole (a chunk is one PUT), so a reader never sees half of one; a store is created
locally and uploaded with its marker last (`_create_once`).
Reads check what they return: a chunk holding NaN or inf, a damaged or missing chunk file (Zarr: a bad crc32c
checksum; webdataset: a tar that differs from its recorded CRC-32), labels or keys of the wrong length, labels out of
range, a non-finite teacher head or attributes lacking a field are each one `GenddError` line naming the store, the
array and the chunk, with the fix. `gendd cache verify` (pipeline/cache/scan.py, pipeline/extract/verify.py) runs
every such check on every chunk.

Concurrency: a store is built in a private temp directory and renamed into place (atomic on a POSIX filesystem), so
concurrent `FeatureCacheWriter.open` calls with the same meta all end on one fully created store and nobody sees a
half-created one. Writers then fill whole chunks only (distinct chunk files, themselves written via temp + rename),
set `done[i]` after the chunk's data, and whoever finds every chunk done sets `complete` last. No write opens an
existing file: every file is written under a temp name and renamed into place, so a file that DVC links from its
cache (hardlink or symlink) is replaced, never modified.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import locations
from pipeline.cache.codecs import EXTRACT_FIX, all_finite, decode_chunk, encode_chunk
from pipeline.cache.meta import (
    SCHEMA_VERSION,
    CacheMeta,
    attrs_problems,
    check_same_store,
    head_arrays,
    head_problems,
    index_problems,
)
from pipeline.cache.wds_store import StoreDamage, WdsStore
from pipeline.cache.zarr_store import ZarrStore
from pipeline.config import FORMATS
from pipeline.data.shards import key_array
from pipeline.errors import GenddError
from pipeline.locations import one_line

if TYPE_CHECKING:
    from pipeline.data.shards import ShardSet


_STORES: dict[str, type[ZarrStore] | type[WdsStore]] = {"zarr": ZarrStore, "webdataset": WdsStore}


def _chunk_bounds(i: int, chunk_size: int, n: int) -> tuple[int, int]:
    """Samples [start, stop) of chunk i."""
    if not 0 <= i < -(-n // chunk_size):
        raise IndexError(f"chunk {i} out of range: the cache has {-(-n // chunk_size)} chunks")
    return i * chunk_size, min(n, (i + 1) * chunk_size)


def _check_inputs(meta: CacheMeta, split: str, chunk_size: int, keys: np.ndarray, labels: np.ndarray) -> None:
    """Refuse a writer whose arguments disagree with its meta."""
    n = int(meta.dataset["n"])
    if meta.dataset["split"] != split:
        raise GenddError(f"cache meta is for split {meta.dataset['split']!r}, not {split!r}: pass the matching meta")
    if chunk_size < 1:
        raise GenddError(f"chunk_size must be >= 1, got {chunk_size}: pass the image shard size")
    if len(keys) != n or labels.shape != (n,):
        raise GenddError(f"{split}: {len(keys)} keys and {labels.shape} labels for n={n} samples: pass one per sample")
    if len(np.unique(keys)) != n:
        raise GenddError(f"{split}: sample keys are not unique: re-run gendd prepare")
    c = int(meta.teacher["num_classes"])
    if labels.size and (labels.min() < -1 or labels.max() >= c):
        raise GenddError(
            f"{split}: labels span [{labels.min()}, {labels.max()}] but the teacher has {c} classes (labels must lie "
            f"in [-1, {c})): use a teacher trained on this dataset"
        )


def _create_once(store_cls: type[ZarrStore] | type[WdsStore], path: Path | str, *layout: Any) -> None:
    """Create the store at `path` unless it exists: built privately, then renamed into place (one creator wins); in
    object storage uploaded with its marker last (racing creators upload the same bytes, never chunk data)."""
    if store_cls.exists(path):
        return
    if locations.is_url(path):
        with tempfile.TemporaryDirectory(prefix="gendd-store-") as tmp:
            store_cls.create(Path(tmp) / "store", *layout)
            locations.put_tree(Path(tmp) / "store", str(path), last=store_cls.MARKER)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        store_cls.create(tmp, *layout)
        os.rename(tmp, path)  # fails if another writer's store is already there (or the path is a non-empty dir)
    except OSError as exc:
        if not store_cls.exists(path):
            raise GenddError(
                f"{path} exists but is not a feature cache ({one_line(exc)}): delete it or pick another path"
            ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class FeatureCacheWriter:
    """Fills one split's cache chunk by chunk; several writers (ranks) may fill disjoint chunks of one store."""

    def __init__(self, store: ZarrStore | WdsStore, meta: CacheMeta):
        self._store = store
        self.meta = meta
        self.path = store.path
        self.n, self.K = int(meta.dataset["n"]), int(meta.views["K"])
        self.feature_dim, self.num_classes = int(meta.teacher["feature_dim"]), int(meta.teacher["num_classes"])
        self.chunk_size, self.n_chunks = store.chunk_size, store.n_chunks

    @classmethod
    def open(
        cls,
        cache_dir: str | Path,
        split: str,
        meta: CacheMeta,
        *,
        chunk_size: int,
        keys: Sequence[str] | np.ndarray,
        labels: np.ndarray,
        head_weight: np.ndarray,
        head_bias: np.ndarray,
        fmt: str = "zarr",
    ) -> FeatureCacheWriter:
        """Create the store, or reopen an existing one with identical meta (resume); refuse a different meta."""
        if fmt not in FORMATS:
            raise GenddError(f"unknown cache format {fmt!r}: choose one of {', '.join(FORMATS)}")
        meta.validate()
        keys, labels = key_array(keys), np.asarray(labels).astype(np.int32)
        _check_inputs(meta, split, chunk_size, keys, labels)
        head = head_arrays(meta, head_weight, head_bias)
        store_cls = _STORES[fmt]
        path = store_cls.location(locations.check_out(cache_dir), split)
        attrs = meta.to_attrs()
        _create_once(store_cls, path, attrs, chunk_size, keys, labels, head)
        store = store_cls.open(path, writable=True)
        check_same_store(store, attrs, chunk_size, keys, labels)
        return cls(store, meta)

    def pending_chunks(self, rank: int = 0, world: int = 1) -> list[int]:
        """Chunks not done yet that belong to `rank` of `world` writers (chunk i goes to rank i % world)."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} out of range for world size {world}")
        done = self._store.done()
        return [i for i in range(rank, self.n_chunks, world) if not done[i]]

    def write_chunk(
        self,
        i: int,
        features: np.ndarray,
        logits: np.ndarray,
        views: np.ndarray,
        images: list[bytes] | None = None,
    ) -> None:
        """Write chunk i whole (features (n_i, K, D), logits (n_i, K, C), views (n_i, K, 5)), then mark it done."""
        start, stop = _chunk_bounds(i, self.chunk_size, self.n)
        arrays = {"features": np.asarray(features), "logits": np.asarray(logits), "views": np.asarray(views)}
        for name, width in (("features", self.feature_dim), ("logits", self.num_classes), ("views", 5)):
            if arrays[name].shape != (expected := (stop - start, self.K, width)):
                raise GenddError(f"chunk {i}: {name} has shape {arrays[name].shape}, expected {expected} (n_i, K, dim)")
        with self._remote_calls():
            self._store.write(i, start, encode_chunk(self.meta.codec, **arrays), images)

    def finalize(self) -> bool:
        """Set `complete` iff every chunk is done (by any writer); return whether the store is complete."""
        with self._remote_calls():
            if not self._store.done().all():
                return False
            if not self.complete:
                self._store.set_complete()
        return True

    @contextmanager
    def _remote_calls(self) -> Iterator[None]:
        """An object store that stays unreachable through the retries (or refuses a write): one line naming it;
        the chunks written so far are kept, and a re-run fills only the missing ones."""
        try:
            yield
        except GenddError:
            raise
        except locations.network_errors() as exc:
            if not locations.is_url(self.path):
                raise
            raise locations.remote_error(str(self.path), exc) from exc

    @property
    def complete(self) -> bool:
        """Whether the store is marked complete."""
        return bool(self._store.attrs.get("complete"))


class FeatureCache:
    """Read side of a cache, the same for both formats; features, logits and views come back as float32."""

    def __init__(self, store: ZarrStore | WdsStore):
        self._store = store
        self.fmt, self.path = store.fmt, store.path
        attrs = store.attrs
        if problems := attrs_problems(attrs):
            raise StoreDamage(self.path, "attributes", None, problems[0])
        self.meta = CacheMeta.from_attrs(attrs)
        self.complete = bool(attrs.get("complete"))
        self.n, self.K = int(self.meta.dataset["n"]), int(self.meta.views["K"])
        self.feature_dim = int(self.meta.teacher["feature_dim"])
        self.teachers, self.teacher_dims, self.caches = 1, (self.feature_dim,), [self]  # several: cache/ensemble.py
        self.num_classes = int(self.meta.teacher["num_classes"])
        self.chunk_size, self.n_chunks = store.chunk_size, store.n_chunks
        if self.chunk_size < 1 or self.n_chunks != -(-self.n // self.chunk_size):
            why = f"has {self.n_chunks} chunks of {self.chunk_size} samples for N={self.n}"
            raise StoreDamage(self.path, "done", None, why)
        self.head_weight, self.head_bias = store.head()
        if problems := head_problems(self.head_weight, self.head_bias, self.num_classes, self.feature_dim):
            raise StoreDamage(self.path, *problems[0])
        self.labels = store.labels().astype(np.int64)
        self.keys = store.keys()  # (N,) fixed-width UTF-8 bytes (`key_array`): shared by forked loader workers
        if problems := index_problems(self.labels, self.keys, self.n, self.num_classes, unique=False):
            raise StoreDamage(self.path, *problems[0])
        self.done = np.ones(self.n_chunks, dtype=bool) if self.complete else store.done()

    def chunk_bounds(self, i: int) -> tuple[int, int]:
        """Global sample range [start, stop) of chunk i (= image shard i)."""
        return _chunk_bounds(i, self.chunk_size, self.n)

    @property
    def holds_images(self) -> bool:
        """Whether the cache's chunks carry the images too (webdataset): a reader then needs no image shard."""
        return self.fmt == "webdataset"

    def read_chunk(self, i: int, dtype: type = np.float32, images: list[bytes] | None = None) -> dict[str, np.ndarray]:
        """Chunk i: features (n_i, K, D), logits (n_i, K, C) as `dtype` (float32 or float16), views (n_i, K, 5)
        float32, labels (n_i,) int64; `images` (a cache that `holds_images`) receives the samples' PNG bytes."""
        start, stop = _chunk_bounds(i, self.chunk_size, self.n)
        if not self.done[i]:
            raise GenddError(f"{self.path}: chunk {i} is not written yet: {EXTRACT_FIX} to finish the cache")
        stored = self._store.read(i, start, stop, images=images)
        for name, array in stored.items():  # checked as stored (bf16 bits, float16): decoding keeps NaN and inf
            if not all_finite(array, bf16_bits=self.meta.codec == "bf16" and name in ("features", "logits")):
                raise StoreDamage(self.path, name, i, "holds NaN or inf", self._store.chunk_fix(i))
        return decode_chunk(self.meta.codec, stored, dtype) | {"labels": self.labels[start:stop]}

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Samples at `indices` (any order, repeats allowed), reading each touched chunk once."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self.n):
            raise IndexError(f"sample index out of range [0, {self.n})")
        widths = {"features": self.feature_dim, "logits": self.num_classes, "views": 5}
        out = {name: np.empty((len(indices), self.K, w), np.float32) for name, w in widths.items()}
        out["labels"] = self.labels[indices]
        chunk_of = indices // self.chunk_size
        for c in np.unique(chunk_of):
            rows = np.flatnonzero(chunk_of == c)
            data = self.read_chunk(int(c))
            for name in widths:
                out[name][rows] = data[name][indices[rows] - c * self.chunk_size]
        return out

    def load_all(self) -> dict[str, np.ndarray]:
        """The whole split in memory (small datasets)."""
        return self.read(np.arange(self.n))

    def info(self) -> dict:
        """Sizes and storage cost, for `gendd cache info`."""
        sizes = self._store.stored_bytes()
        starts = np.flatnonzero(self.done) * self.chunk_size
        n_done = int((np.minimum(starts + self.chunk_size, self.n) - starts).sum())  # samples in finished chunks
        value_bytes = sum(sizes.get(name, 0) for name in ("features", "logits", "features_scale"))
        n_values = n_done * self.K * (self.feature_dim + self.num_classes)
        return {
            "path": str(self.path),
            "format": self.fmt,
            "N": self.n,
            "K": self.K,
            "D": self.feature_dim,
            "C": self.num_classes,
            "codec": self.meta.codec,
            "complete": self.complete,
            "chunks_done": int(self.done.sum()),
            "n_chunks": self.n_chunks,
            "stored_bytes": sizes,
            "bytes_per_sample_view": (value_bytes + sizes.get("views", 0)) / max(n_done * self.K, 1),
            "bytes_per_value": value_bytes / max(n_values, 1),
            "compression_ratio": 4 * n_values / value_bytes if value_bytes else 0.0,
            "damage": self.damage_seen(),
        }

    def damage_seen(self) -> list[str]:
        """Damage visible without reading chunk data (local stores): chunk files (tars) missing or cut short for
        done chunks, done flags unset in a complete store, an unfinished store; `gendd cache verify` reads them all."""
        found = [] if self.complete else [f"incomplete: {int(self.done.sum())} of {self.n_chunks} chunks done"]
        if isinstance(self._store, ZarrStore):
            return found + self._store.damage_seen(self.done, self.complete)
        return found + self._store.damage_seen(self.complete)


def find_store(root: Path | str, split: str) -> ZarrStore | WdsStore:
    """Open the split's store (local or at a URL) in whichever format exists (Zarr first), or say what to run."""
    root = locations.normalize(root)
    for store_cls in (ZarrStore, WdsStore):
        path = store_cls.location(root, split)
        if store_cls.exists(path):
            store = store_cls.open(path)
            version = store.attrs.get("schema_version")
            if version is None:
                raise GenddError(f"{path} is not a gendd feature cache (no schema_version): pick another path")
            if version != SCHEMA_VERSION:
                raise GenddError(f"{path} has cache schema {version}, this gendd reads {SCHEMA_VERSION}: {EXTRACT_FIX}")
            return store
        # Locally only: servers answer a directory URL inconsistently (a listing, 403 or 404).
        if not locations.is_url(path) and path.exists():
            raise GenddError(f"{path} is not a feature cache (half-created or foreign): delete it and {EXTRACT_FIX}")
    if locations.is_url(root):
        raise GenddError(
            f"no feature cache for split {split!r} at {root}: check the URL, or run gendd extract and upload its output"
        )
    if not root.is_dir():
        raise GenddError(f"no feature cache at {root}: run gendd extract to build it")
    cached = sorted(
        {p.name.removesuffix(".zarr") for p in root.glob("*.zarr")}
        | {p.name.removesuffix("-features") for p in root.glob("*-features")}
    )
    found = ", ".join(cached) or "none"
    raise GenddError(f"{root} has no cached split {split!r} (cached: {found}): run gendd extract for split {split!r}")


def changed_shard(cache: FeatureCache, shards: ShardSet) -> str | None:
    """Which image shard differs from the one the cache was built from: "another <path> (sha256 <was>.., now
    <now>..)" for the first shard whose sha256 (`dataset.shard_sha256`) is not the one index.json records now; None
    when they agree, either side records none (a cache or index from before the hashes) or the shard count differs
    (the alignment checks of the readers name that)."""
    built = cache.meta.dataset.get("shard_sha256")
    if not built or not shards.hashes or len(built) != len(shards.hashes):
        return None
    for i, (was, now) in enumerate(zip(built, shards.hashes, strict=True)):
        if was != now:
            return f"another {shards.path(i)} (sha256 {str(was)[:8]}.., now {now[:8]}..)"
    return None


def cache_meta(cache_dir: str | Path, split: str) -> CacheMeta:
    """A split's cache meta from its attributes alone (no keys, labels or head are read: at 1.28M samples the keys
    cost a second per open); readers open the cache whole, with every check, where they read it."""
    store = find_store(cache_dir, split)
    if problems := attrs_problems(attrs := store.attrs):
        raise StoreDamage(store.path, "attributes", None, problems[0])
    return CacheMeta.from_attrs(attrs)


def open_cache(
    cache_dir: str | Path,
    split: str,
    *,
    teacher_sha256: str | None = None,
    spec_hash: str | None = None,
    shards: ShardSet | None = None,
    allow_incomplete: bool = False,
) -> FeatureCache:
    """Open a split's cache; refuse a missing, incomplete (unless allowed) or mismatched one with what to run. With
    `shards` (the split's image shards), refuse a cache built from other shard contents."""
    cache = FeatureCache(find_store(cache_dir, split))
    if not cache.complete and not allow_incomplete:
        done = f"{int(cache.done.sum())} of {cache.n_chunks} chunks done"
        raise GenddError(f"{cache.path} is incomplete ({done}): {EXTRACT_FIX} to finish it")
    checks = (
        ("teacher checkpoint sha256", cache.meta.teacher["checkpoint_sha256"], teacher_sha256, "with this teacher"),
        ("dataset spec hash", cache.meta.dataset["spec_hash"], spec_hash, "after gendd prepare with this spec"),
    )
    for what, found, wanted, how in checks:
        if wanted is not None and found != wanted:
            raise GenddError(
                f"{cache.path} was built for {what} {str(found)[:16]}, not {str(wanted)[:16]}: {EXTRACT_FIX} {how}"
            )
    if shards is not None and (changed := changed_shard(cache, shards)):
        raise GenddError(f"cache {cache_dir} was built from {changed}: {EXTRACT_FIX}")
    return cache
