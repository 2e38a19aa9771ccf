"""Data specs: one YAML per dataset, validated on load with one-line errors (file, field, what was expected)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import GenddError

SOURCES = ("sklearn_digits", "idx", "image_folder", "webdataset", "synthetic")


@dataclass(frozen=True)
class DataSpec:
    """A validated dataset description; `spec_hash` fingerprints everything that changes the pixels or labels."""

    name: str
    source: str
    splits: dict[str, str]
    num_classes: int
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labeled: bool = True
    path: str | None = None
    class_names: tuple[str, ...] = ()
    val_fraction: float = 0.2
    seed: int = 0
    imbalance_factor: float = 1.0
    imbalance_splits: tuple[str, ...] = ("train",)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def spec_hash(self) -> str:
        """sha256 of the fields that define the data; the source path is left out so moved data keeps its hash."""
        fields = asdict(self)
        fields.pop("path")
        blob = json.dumps(fields, sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def with_path(self, path: str | None) -> DataSpec:
        """The same spec reading from another location (e.g. a copy of the IDX files)."""
        return self if path is None else replace(self, path=path)


# field -> (type(s) accepted, required)
_FIELDS: dict[str, tuple[type | tuple[type, ...], bool]] = {
    "name": (str, True),
    "source": (str, True),
    "splits": (dict, True),
    "num_classes": (int, False),  # required unless class_names gives it or an image_folder's folders do
    "image_size": (int, True),
    "channels": (int, True),
    "mean": (list, True),
    "std": (list, True),
    "labeled": (bool, False),
    "path": (str, False),
    "class_names": (list, False),
    "val_fraction": ((float, int), False),
    "seed": (int, False),
    "imbalance_factor": ((float, int), False),
    "imbalance_splits": (list, False),
    "extra": (dict, False),
}


def _fail(path: Path, key: str, expected: str) -> GenddError:
    return GenddError(f"{path}: field '{key}': expected {expected}")


def _check_types(raw: dict, path: Path) -> None:
    for key in raw:
        if key not in _FIELDS:
            raise _fail(path, key, f"one of the known fields ({', '.join(_FIELDS)}); remove or rename it")
    for key, (kind, required) in _FIELDS.items():
        if key not in raw:
            if required:
                raise _fail(path, key, "a value, but it is missing")
            continue
        value = raw[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise _fail(path, key, f"{names}, got {type(value).__name__} {value!r}")
    if "num_classes" not in raw and "class_names" not in raw and raw["source"] != "image_folder":
        raise _fail(path, "num_classes", "a value, but it is missing (or list the classes in class_names)")
    if "num_classes" in raw and raw["num_classes"] < 1:
        raise _fail(path, "num_classes", f"a positive number, got {raw['num_classes']}")


def _check_values(spec: DataSpec, path: Path) -> None:
    if spec.source not in SOURCES:
        raise _fail(path, "source", f"one of {', '.join(SOURCES)}, got {spec.source!r}")
    if spec.source in ("idx", "image_folder") and not spec.path:
        raise _fail(path, "path", f"the location of the {spec.source} data (or pass --source-path)")
    if not spec.splits or not all(isinstance(v, str) for v in spec.splits.values()):
        raise _fail(path, "splits", "a mapping split name -> source locator (string), e.g. {train: train}")
    if spec.source == "synthetic" and not all(v.isdigit() and int(v) > 0 for v in spec.splits.values()):
        counts = "a sample count per split for a synthetic source, e.g. {train: 1000}"
        raise _fail(path, "splits", f"{counts}, got {spec.splits}")
    if (
        spec.num_classes < (0 if spec.source == "image_folder" else 1)
        or spec.image_size < 1
        or spec.channels not in (1, 3)
    ):
        raise _fail(path, "num_classes/image_size/channels", "positive sizes and 1 or 3 channels")
    for key in ("mean", "std"):
        values = getattr(spec, key)
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if len(values) != spec.channels or not numbers:
            raise _fail(path, key, f"{spec.channels} numbers (one per channel), got {list(values)}")
        if not all(math.isfinite(v) for v in values):
            raise _fail(path, key, f"finite numbers, got {list(values)}")
    if not all(v > 0 for v in spec.std):
        raise _fail(path, "std", f"positive numbers (pixels are divided by them), got {list(spec.std)}")
    if spec.class_names and len(spec.class_names) != spec.num_classes:
        raise _fail(path, "class_names", f"{spec.num_classes} names (num_classes), got {len(spec.class_names)}")
    if not all(isinstance(n, (str, int)) and not isinstance(n, bool) for n in spec.class_names):
        raise _fail(path, "class_names", f"a list of names (strings), got {list(spec.class_names)}")
    if len(set(spec.class_names)) != len(spec.class_names):
        twice = sorted({n for n in spec.class_names if spec.class_names.count(n) > 1}, key=str)
        raise _fail(path, "class_names", f"distinct names, got {', '.join(map(str, twice))} more than once")
    if spec.source == "image_folder" and not all(isinstance(n, str) and n for n in spec.class_names):
        raise _fail(path, "class_names", f"folder names (strings; quote numbers), got {list(spec.class_names)}")
    if not 0.0 < spec.val_fraction < 1.0:
        raise _fail(path, "val_fraction", f"a number in (0, 1), got {spec.val_fraction}")
    if not (math.isfinite(spec.imbalance_factor) and spec.imbalance_factor >= 1.0):
        raise _fail(path, "imbalance_factor", f"a number >= 1 (1 = balanced), got {spec.imbalance_factor}")
    if spec.imbalance_factor > 1.0 and not spec.labeled:
        raise _fail(path, "imbalance_factor", "labels to subsample by class; set labeled: true or remove it")


def load_spec(path: str | Path, source_path: str | None = None) -> DataSpec:
    """Load and validate a data spec; `source_path` overrides the spec's `path` (e.g. a copy of the data)."""
    path = Path(path)
    if not path.is_file():
        raise GenddError(f"{path}: data spec not found; pass an existing YAML file (see data_specs/)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        raise GenddError(f"{path}: not valid YAML (line {None if line is None else line + 1}); fix the syntax") from err
    if not isinstance(raw, dict):
        raise GenddError(f"{path}: expected a mapping of fields at the top level, got {type(raw).__name__}")
    _check_types(raw, path)
    values = dict(raw)
    if raw["source"] == "synthetic" and isinstance(raw["splits"], dict):  # a synthetic split's locator is its count
        counts = raw["splits"].items()
        values["splits"] = {k: str(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in counts}
    for key in ("mean", "std", "class_names", "imbalance_splits"):
        if key in values:
            values[key] = tuple(values[key])
    # num_classes left out: the number of class_names, else 0 = an image_folder's number of class folders (prepare
    # fills in the folder names and their number; the spec hash is of the spec as written)
    values.setdefault("num_classes", len(values.get("class_names", ())))
    values["val_fraction"] = float(values.get("val_fraction", 0.2))
    values["imbalance_factor"] = float(values.get("imbalance_factor", 1.0))
    spec = DataSpec(**values)
    if source_path:
        spec = spec.with_path(source_path)
    _check_values(spec, path)
    if spec.source == "image_folder" and "val_fraction" in raw and "val" not in spec.splits:
        # e.g. splits: {train: .}: the folder is read as the train split alone and val_fraction would carve nothing
        raise GenddError(
            f"{path}: val_fraction {spec.val_fraction} carves a val split, but splits {dict(spec.splits)} declare "
            "none: write splits: {train: train, val: val} to carve val from the class folders under path, or "
            "remove val_fraction"
        )
    return spec
