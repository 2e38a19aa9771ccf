"""Several teachers' caches read as one: the caches of teachers extracted over the same shards with the same view
plan (K, policy, seed) hold the same views of the same samples, so a student sees one crop per step and every
teacher's output for exactly that crop.

A `TeacherEnsemble` reads like one `FeatureCache` whose features are the teachers' features side by side (D = the sum
of their sizes, teacher by teacher) and whose logits are theirs side by side ((n, K, T*C)); `teachers` = T says how
to split them. Objectives turn the logits into the mean of the teachers' probabilities (pipeline/train/losses.py).
The views, keys, labels and shard hashes are compared, not assumed: a mismatch is refused in one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.cache.meta import CacheMeta
from pipeline.cache.store import FeatureCache, cache_meta, open_cache
from pipeline.errors import GenddError

Caches = str | Path | Sequence[str | Path] | None  # one cache (today's form), several, or none

EXTRACT_SAME_VIEWS = "extract every teacher over the same shards with the same --views, --policy and --seed"


def cache_list(cache: Caches) -> list[str | Path]:
    """The caches named by a `--cache` value: none, one, or several in the order given."""
    if cache is None:
        return []
    if isinstance(cache, (str, Path)):
        return [cache]
    return list(cache)


def single(cache: Caches) -> Caches:
    """A one-element list as the plain path, so one `--cache` takes exactly today's single-teacher route."""
    caches = cache_list(cache)
    return caches[0] if len(caches) == 1 else (caches or None)


def cache_metas(cache: Caches, split: str) -> list[CacheMeta]:
    """Every cache's meta (attributes only), checked to share a view plan."""
    paths = cache_list(cache)
    metas = [cache_meta(c, split) for c in paths]
    for path, meta in zip(paths[1:], metas[1:], strict=True):
        _same_plan(paths[0], metas[0], path, meta)
    return metas


def _same_plan(first: str | Path, a: CacheMeta, other: str | Path, b: CacheMeta) -> None:
    checks = (
        ("views (K, policy, seed)", a.views, b.views),
        ("dataset spec", a.dataset.get("spec_hash"), b.dataset.get("spec_hash")),
        ("sample count", a.dataset.get("n"), b.dataset.get("n")),
        ("image shards", a.dataset.get("shard_sha256"), b.dataset.get("shard_sha256")),
        ("class count", a.teacher["num_classes"], b.teacher["num_classes"]),
    )
    for what, x, y in checks:
        if x != y:
            raise GenddError(f"caches {first} and {other} differ in their {what} ({x} vs {y}): {EXTRACT_SAME_VIEWS}")
    if a.teacher["checkpoint_sha256"] == b.teacher["checkpoint_sha256"]:
        raise GenddError(f"caches {first} and {other} hold the same teacher: pass each teacher's cache once")


class TeacherEnsemble:
    """Several caches of one split, read as one cache of the teachers' outputs side by side (module docstring)."""

    def __init__(self, caches: list[FeatureCache]) -> None:
        first = caches[0]
        for other in caches[1:]:
            _same_plan(first.path, first.meta, other.path, other.meta)
            for what, x, y in (("keys", first.keys, other.keys), ("labels", first.labels, other.labels)):
                if not np.array_equal(x, y):
                    raise GenddError(f"caches {first.path} and {other.path} hold other {what}: {EXTRACT_SAME_VIEWS}")
            if other.chunk_size != first.chunk_size:
                raise GenddError(f"caches {first.path} and {other.path} are chunked differently: {EXTRACT_SAME_VIEWS}")
        self.caches = caches
        self.teachers = len(caches)
        self.path = " + ".join(str(c.path) for c in caches)
        self.fmt, self.meta, self.complete = first.fmt, first.meta, all(c.complete for c in caches)
        self.n, self.K, self.num_classes = first.n, first.K, first.num_classes
        self.chunk_size, self.n_chunks = first.chunk_size, first.n_chunks
        self.labels, self.keys = first.labels, first.keys
        self.teacher_dims = tuple(c.feature_dim for c in caches)
        self.feature_dim = sum(self.teacher_dims)
        # Contraction centres per teacher, side by side: each teacher's dims move towards its own classifier's W[y].
        self.head_weight = np.concatenate([np.asarray(c.head_weight, np.float32) for c in caches], axis=1)
        self.head_bias = np.mean([np.asarray(c.head_bias, np.float32) for c in caches], axis=0)
        self.done = np.logical_and.reduce([c.done for c in caches])
        self.holds_images = False  # the images come from the image shards (the caches may differ in format)

    def chunk_bounds(self, i: int) -> tuple[int, int]:
        """Global sample range [start, stop) of chunk i (= image shard i)."""
        return self.caches[0].chunk_bounds(i)

    def read_chunk(self, i: int, dtype: type = np.float32, images: list[bytes] | None = None) -> dict[str, np.ndarray]:
        """Chunk i of every cache, checked to hold the same views; features (n_i, K, sum D), logits (n_i, K, T*C)."""
        parts = [c.read_chunk(i, dtype) for c in self.caches]
        for cache, part in zip(self.caches[1:], parts[1:], strict=True):
            if not np.array_equal(part["views"], parts[0]["views"]):
                raise GenddError(
                    f"chunk {i} of {cache.path} holds other views than {self.caches[0].path}: {EXTRACT_SAME_VIEWS}"
                )
        return {
            "features": np.concatenate([p["features"] for p in parts], axis=-1),
            "logits": np.concatenate([p["logits"] for p in parts], axis=-1),
            "views": parts[0]["views"],
            "labels": parts[0]["labels"],
        }


def open_caches(cache: Caches, split: str, **checks: object) -> FeatureCache | TeacherEnsemble:
    """One cache as `open_cache` opens it, or several as a TeacherEnsemble (each opened with the same checks)."""
    caches = cache_list(cache)
    if len(caches) == 1:
        return open_cache(caches[0], split, **checks)
    return TeacherEnsemble([open_cache(c, split, **checks) for c in caches])


def readout(store: FeatureCache | TeacherEnsemble) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) that map (generated) teacher features to logits: the teacher's classifier, or for an ensemble the mean
    of the teachers' classifiers' logits on their own features (W_t / T side by side, the mean bias)."""
    if store.teachers == 1:
        return store.head_weight, store.head_bias
    return np.asarray(store.head_weight, np.float32) / store.teachers, store.head_bias
