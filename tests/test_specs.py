from pathlib import Path

import pytest
import yaml

from pipeline.data.specs import load_spec
from pipeline.errors import GenddError

from .conftest import ROOT


def _write(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load((ROOT / "data_specs" / "digits.yaml").read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "data_specs").glob("*.yaml")))
def test_every_shipped_spec_loads(name: str) -> None:
    spec = load_spec(ROOT / "data_specs" / name)
    assert spec.num_classes >= 1 and len(spec.spec_hash) == 16


def _one_line_error(path: Path) -> str:
    with pytest.raises(GenddError) as info:
        load_spec(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    message = _one_line_error(tmp_path / "nope.yaml")
    assert "not found" in message and "nope.yaml" in message


def test_wrong_field_type(tmp_path: Path) -> None:
    message = _one_line_error(_write(tmp_path, num_classes="ten"))
    assert "num_classes" in message and "int" in message and "spec.yaml" in message


def test_unknown_source(tmp_path: Path) -> None:
    message = _one_line_error(_write(tmp_path, source="ftp"))
    assert "source" in message and "sklearn_digits" in message


def test_missing_required_field(tmp_path: Path) -> None:
    assert "image_size" in _one_line_error(_write(tmp_path, image_size=None))


def test_unknown_field_and_bad_mean(tmp_path: Path) -> None:
    assert "colour" in _one_line_error(_write(tmp_path, colour=3))
    assert "mean" in _one_line_error(_write(tmp_path, mean=[0.1, 0.2]))


def test_hash_ignores_path_but_tracks_data_fields(tmp_path: Path) -> None:
    base = load_spec(ROOT / "data_specs" / "fashion_mnist.yaml")
    assert base.with_path("/elsewhere").spec_hash == base.spec_hash
    assert load_spec(_write(tmp_path, seed=1)).spec_hash != load_spec(ROOT / "data_specs" / "digits.yaml").spec_hash


@pytest.mark.parametrize(
    ("field", "value"), [("std", [0.0]), ("std", [-0.38]), ("std", [float("nan")]), ("mean", [float("inf")])]
)
def test_std_must_be_positive_and_mean_std_finite(tmp_path: Path, field: str, value: list) -> None:
    message = _one_line_error(_write(tmp_path, **{field: value}))
    assert f"field '{field}'" in message and "spec.yaml" in message
    assert ("positive" if value[0] <= 0 else "finite") in message


def test_imbalance_factor_must_be_finite(tmp_path: Path) -> None:
    assert "imbalance_factor" in _one_line_error(_write(tmp_path, imbalance_factor=float("nan")))


def test_num_classes_may_be_left_out_for_image_folders_or_given_by_class_names(tmp_path: Path) -> None:
    assert "num_classes" in _one_line_error(_write(tmp_path, num_classes=None, class_names=None))
    assert load_spec(_write(tmp_path, num_classes=None)).num_classes == 10  # the number of class_names
    folder = load_spec(_write(tmp_path, source="image_folder", path=str(tmp_path), num_classes=None, class_names=None))
    assert folder.num_classes == 0 and folder.class_names == ()  # prepare counts the class folders
    assert "positive" in _one_line_error(_write(tmp_path, source="image_folder", path="x", num_classes=0))


def test_class_names_must_be_distinct_and_folder_names_strings(tmp_path: Path) -> None:
    message = _one_line_error(_write(tmp_path, num_classes=3, class_names=["a", "b", "a"]))
    assert "class_names" in message and "a more than once" in message
    message = _one_line_error(_write(tmp_path, source="image_folder", path="x", num_classes=2, class_names=[0, 1]))
    assert "class_names" in message and "strings" in message
