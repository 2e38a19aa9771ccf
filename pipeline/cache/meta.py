"""What a feature cache records about itself (`CacheMeta`: teacher, dataset, views, codec) and the checks of its
attributes, teacher head and per-sample index."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.cache.codecs import all_finite
from pipeline.config import CODECS
from pipeline.data.shards import key_array
from pipeline.errors import GenddError

if TYPE_CHECKING:
    from pipeline.cache.wds_store import WdsStore
    from pipeline.cache.zarr_store import ZarrStore


SCHEMA_VERSION = 1


_REQUIRED = {
    "teacher": ("name", "checkpoint_sha256", "feature_dim", "num_classes", "input_size", "mean", "std"),
    "dataset": ("name", "spec_hash", "split", "n"),
    "views": ("K", "policy", "seed"),
}


def attrs_problems(attrs: dict) -> list[str]:
    """What a store's attributes lack or hold wrong (the fields CacheMeta.validate requires, the codec, sizes), each
    phrased to follow "attributes"; empty when they describe a readable cache."""
    problems = []
    if attrs.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"have schema_version {attrs.get('schema_version')!r}, this gendd reads {SCHEMA_VERSION}")
    for section, fields in _REQUIRED.items():
        value = attrs.get(section)
        missing = list(fields) if not isinstance(value, dict) else [f for f in fields if f not in value]
        if missing:
            problems.append(f"lack {', '.join(f'{section}.{f}' for f in missing)}")
    if attrs.get("codec") not in CODECS:
        problems.append(f"have codec {attrs.get('codec')!r}, not one of {', '.join(CODECS)}")
    if not isinstance(attrs.get("complete"), bool):
        problems.append(f"have complete = {attrs.get('complete')!r}, not true or false")
    sizes = (("dataset", "n", 0), ("views", "K", 1), ("teacher", "feature_dim", 1), ("teacher", "num_classes", 1))
    for section, field, least in sizes:
        value = attrs.get(section, {}).get(field, least) if isinstance(attrs.get(section), dict) else least
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            problems.append(f"have {section}.{field} = {value!r}, expected an integer >= {least}")
    return problems


def _to_json(value: Any) -> Any:
    """`value` in plain JSON types (tuples -> lists, numpy -> Python), exactly as attributes read back."""

    def numpy_default(obj: Any) -> Any:
        if isinstance(obj, np.ndarray | np.generic):
            return obj.tolist()
        raise TypeError(f"cache meta holds a {type(obj).__name__}, which JSON cannot store")

    return json.loads(json.dumps(value, default=numpy_default))


@dataclass(frozen=True)
class CacheMeta:
    """What identifies a cache: the teacher, the dataset split, the view policy and the codec."""

    teacher: dict  # name, checkpoint_sha256, feature_dim, num_classes, input_size, mean, std
    dataset: dict  # name (of the spec), spec_hash, split, n
    views: dict  # K, policy (a dict), seed
    codec: str = "zstd"

    def validate(self) -> None:
        """Refuse an unknown codec or a missing field, with the choices or the field names."""
        if self.codec not in CODECS:
            raise GenddError(f"unknown cache codec {self.codec!r}: choose one of {', '.join(CODECS)}")
        for section, fields in _REQUIRED.items():
            missing = [f for f in fields if f not in getattr(self, section)]
            if missing:
                raise GenddError(f"cache meta: {section} lacks {', '.join(missing)}: add them to CacheMeta.{section}")

    def to_attrs(self) -> dict:
        """The store attributes this meta stands for (JSON types; `complete` False)."""
        sections = {"teacher": self.teacher, "dataset": self.dataset, "views": self.views}
        return {"schema_version": SCHEMA_VERSION, **_to_json(sections), "codec": self.codec, "complete": False}

    @classmethod
    def from_attrs(cls, attrs: dict) -> CacheMeta:
        """The meta recorded in a store's attributes."""
        return cls(teacher=attrs["teacher"], dataset=attrs["dataset"], views=attrs["views"], codec=attrs["codec"])


def head_problems(weight: np.ndarray, bias: np.ndarray, c: int, d: int) -> list[tuple[str, None, str]]:
    """(array, None, what) for a teacher head of the wrong shape or holding NaN or inf."""
    problems = []
    for name, array, shape in (("head/weight", weight, (c, d)), ("head/bias", bias, (c,))):
        if array.shape != shape:
            problems.append((name, None, f"has shape {array.shape}, expected {shape} (num_classes, feature_dim)"))
        elif not all_finite(array):
            problems.append((name, None, "holds NaN or inf"))
    return problems


def index_problems(
    labels: np.ndarray, keys: Sequence[str] | np.ndarray, n: int, num_classes: int, unique: bool = True
) -> list[tuple[str, None, str]]:
    """(array, None, what) for labels or keys that are not one per sample, labels outside [-1, num_classes) and (with
    `unique`) repeated keys."""
    problems = []
    if labels.shape != (n,):
        problems.append(("labels", None, f"has {labels.size} entries, expected N={n}"))
    bad = np.flatnonzero((labels < -1) | (labels >= num_classes))
    if bad.size:
        first = f"sample {bad[0]}: {labels[bad[0]]}"
        problems.append(("labels", None, f"has {bad.size} values outside [-1, {num_classes}) (first: {first})"))
    if len(keys) != n:
        problems.append(("keys", None, f"has {len(keys)} entries, expected N={n}"))
    if unique and len(keys):
        keys = key_array(keys)
        _, first = np.unique(keys, return_index=True)  # where each distinct key first occurs
        if len(first) != len(keys):
            later = np.ones(len(keys), dtype=bool)
            later[first] = False
            repeated = keys[np.flatnonzero(later)[0]].decode(errors="replace")
            problems.append(("keys", None, f"are not unique ({len(keys) - len(first)} repeats, first {repeated!r})"))
    return problems


def check_same_store(
    store: ZarrStore | WdsStore, attrs: dict, chunk_size: int, keys: np.ndarray, labels: np.ndarray
) -> None:
    """Refuse to resume into a store written for another teacher, dataset (image shard contents included), view
    policy, codec or chunking."""
    found, wanted = store.attrs, dict(attrs)
    if isinstance(found.get("dataset"), dict) and "shard_sha256" not in found["dataset"]:
        wanted["dataset"] = without_shards(attrs["dataset"])  # a store from before shard hashes: resumed as before
    differs = [name for name in ("schema_version", "teacher", "dataset", "views") if found.get(name) != wanted[name]]
    if "dataset" in differs and without_shards(found.get("dataset")) == without_shards(wanted["dataset"]):
        differs[differs.index("dataset")] = "dataset (the image shards changed since it was started)"
    if found.get("codec") != attrs["codec"]:
        differs.append(f"codec ({found.get('codec')!r}, not {attrs['codec']!r})")
    if store.chunk_size != chunk_size:
        differs.append(f"chunk_size ({store.chunk_size}, not {chunk_size})")
    if not differs and not np.array_equal(store.keys(), keys):
        differs.append("keys")
    if not differs and not np.array_equal(store.labels(), labels):
        differs.append("labels")
    if differs:
        raise GenddError(
            f"{store.path} holds a cache with a different {', '.join(differs)}: delete it or pick another path"
        )


def without_shards(dataset: Any) -> Any:
    return {k: v for k, v in dataset.items() if k != "shard_sha256"} if isinstance(dataset, dict) else dataset


def head_arrays(meta: CacheMeta, weight: np.ndarray, bias: np.ndarray) -> dict[str, np.ndarray]:
    """The teacher classifier as float32, checked against the meta's dimensions."""
    c, d = int(meta.teacher["num_classes"]), int(meta.teacher["feature_dim"])
    weight, bias = np.asarray(weight, np.float32), np.asarray(bias, np.float32)
    if weight.shape != (c, d) or bias.shape != (c,):
        raise GenddError(f"teacher head has shapes {weight.shape}, {bias.shape}; meta says ({c}, {d}), ({c},)")
    return {"weight": weight, "bias": bias}
