"""Adopting your own teacher: a stock timm checkpoint loads as is (the stem follows the checkpoint), checkpoints are
read as timm and torch save them, and a checkpoint that does not fit says, in one line, what differs and what to do.

Models are timm's `test_resnet` (stock first conv already 3x3: the weights cannot tell the stems apart) and
`resnet18` (stock 7x7 stem: the weights tell), built with pretrained=False and saved here; data: the digits shards
(8x8 grayscale, 10 classes).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from pipeline.config import TrainConfig
from pipeline.data.shards import ShardIndex
from pipeline.errors import GenddError
from pipeline.models import (
    ModelCard,
    checkpoint_stem,
    create_model,
    feature_dim,
    features,
    load_card,
    load_model,
    resolve_small_stem,
    save_model,
)
from pipeline.teacher.teacher import TeacherConfig, make_teacher, read_checkpoint
from stages.app import main


def _stock(name: str, num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    """A model as timm builds it (default stem), with seeded random weights."""
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)


def _small(name: str) -> nn.Module:
    """A model as gendd builds it with the small 3x3 stem."""
    torch.manual_seed(1)
    return create_model(name, 10, 1, small_stem=True)


def _save(model: nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _gendd(capsys: pytest.CaptureFixture, *args: str | Path) -> tuple[int, str]:
    """Run the real CLI in-process; returns (exit code, stderr)."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as stop:
        code = int(stop.code or 0)
    return code, capsys.readouterr().err


def _adopt(capsys: pytest.CaptureFixture, shards: ShardIndex, out: Path, name: str, ckpt: Path) -> tuple[int, str]:
    return _gendd(capsys, "teacher", "--shards", shards.root, "--out", out, "--model", name, "--checkpoint", ckpt)


def _assert_same_weights(model: nn.Module, want: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("name", ["test_resnet", "resnet18"])
def test_stock_timm_checkpoint_is_adopted_as_is(
    name: str, digits_shards: ShardIndex, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """(a) `gendd teacher --model NAME --checkpoint FILE`, no stem option: timm's stock stem, weights unchanged."""
    model = _stock(name)
    ckpt = _save(model, tmp_path / "stock.safetensors")
    code, err = _adopt(capsys, digits_shards, tmp_path / "teacher", name, ckpt)
    assert code == 0, err
    card = load_card(tmp_path / "teacher", "teacher")
    assert card["small_stem"] is False and card["name"] == name
    assert card["extra"]["checkpoint"] == {"file": "stock.safetensors", "entry": None}
    loaded, _ = load_model(tmp_path / "teacher", "teacher")
    _assert_same_weights(loaded, model.state_dict())
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(features(loaded, x), features(model.eval(), x))


def test_small_stem_checkpoint_is_adopted_from_its_weights(
    digits_shards: ShardIndex, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """(b) resnet18 with gendd's small stem, a bare .safetensors: the 3x3 first conv says which stem it is."""
    model = _small("resnet18")
    ckpt = _save(model, tmp_path / "small.safetensors")
    code, err = _adopt(capsys, digits_shards, tmp_path / "teacher", "resnet18", ckpt)
    assert code == 0, err
    assert load_card(tmp_path / "teacher", "teacher")["small_stem"] is True
    _assert_same_weights(load_model(tmp_path / "teacher", "teacher")[0], model.state_dict())


def test_small_stem_checkpoint_is_adopted_from_its_card(
    digits_shards: ShardIndex, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """(b) test_resnet's stems have the same weight shapes: gendd's card saved with the weights decides."""
    model = _small("test_resnet").eval()
    spec = digits_shards.spec
    card = ModelCard("test_resnet", 10, 1, True, 8, tuple(spec["mean"]), tuple(spec["std"]), feature_dim(model, 1, 8))
    ckpt = save_model(model, card, tmp_path / "earlier", "teacher")
    code, err = _adopt(capsys, digits_shards, tmp_path / "teacher", "test_resnet", ckpt)
    assert code == 0, err
    assert load_card(tmp_path / "teacher", "teacher")["small_stem"] is True
    _assert_same_weights(load_model(tmp_path / "teacher", "teacher")[0], model.state_dict())
    # Without the card the weights cannot tell: taken as timm's stock model.
    (tmp_path / "earlier" / "teacher.json").unlink()
    code, err = _adopt(capsys, digits_shards, tmp_path / "again", "test_resnet", ckpt)
    assert code == 0, err
    assert load_card(tmp_path / "again", "teacher")["small_stem"] is False


def _one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gendd: error: "), err
    return lines[0]


def test_other_class_count_is_refused_naming_the_classifier(
    digits_shards: ShardIndex, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """(c) an ImageNet-style head (1000 classes) on 10-class data: refused, the head is the teacher's class map."""
    model = _stock("test_resnet", num_classes=1000)
    dim = model.get_classifier().in_features
    ckpt = _save(model, tmp_path / "imagenet.safetensors")
    line = _one_line_error(*_adopt(capsys, digits_shards, tmp_path / "teacher", "test_resnet", ckpt))
    assert f"fc.weight: checkpoint [1000, {dim}] vs model [10, {dim}]" in line
    assert "fc.bias: checkpoint [1000] vs model [10]" in line
    assert "classifies 1000 classes but the data spec has 10" in line and "fine-tune" in line
    assert "missing" not in line and "--model" not in line
    assert not (tmp_path / "teacher" / "teacher.json").exists()


@pytest.mark.parametrize(
    ("make", "name", "wants"),
    [
        (  # RGB weights on grayscale data
            lambda: _stock("resnet18", in_chans=3),
            "resnet18",
            ["conv1.weight: checkpoint [64, 3, 7, 7] vs model [64, 1, 7, 7]", "takes 3 input channels", "has 1"],
        ),
        (  # another architecture
            lambda: _stock("resnet18"),
            "test_resnet",
            ["missing keys (e.g. conv1.0.weight)", "unexpected (e.g. conv1.weight)", "pass the --model"],
        ),
        (  # a checkpoint saved without a classifier
            lambda: _stock("resnet18", num_classes=0),
            "resnet18",
            ["2 missing keys (e.g. fc.weight), 0 unexpected", "has no classifier (fc.weight)", "spec has 10"],
        ),
    ],
    ids=["in_chans", "model", "no-head"],
)
def test_mismatch_says_what_differs_and_the_fix(
    make, name: str, wants: list[str], digits_shards: ShardIndex, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """(c) one line: the first mismatching tensors, key counts, and the option or step that fixes it."""
    ckpt = _save(make(), tmp_path / "other.safetensors")
    line = _one_line_error(*_adopt(capsys, digits_shards, tmp_path / "teacher", name, ckpt))
    assert f"{ckpt} does not fit {name} for this data: " in line
    for want in wants:
        assert want in line, line


def test_resolve_small_stem() -> None:
    """(d) auto: small inputs get the small stem; a checkpoint decides when its weights tell; explicit is kept."""
    assert resolve_small_stem(None, "test_resnet", 8)[0] is True
    assert resolve_small_stem(None, "test_resnet", 64)[0] is True
    assert resolve_small_stem(None, "test_resnet", 224)[0] is False
    assert resolve_small_stem(False, "test_resnet", 8)[0] is False
    assert resolve_small_stem(True, "resnet18", 224)[0] is True
    stock, small = _stock("resnet18").state_dict(), _small("resnet18").state_dict()
    assert checkpoint_stem("resnet18", stock)[0] == "stock"
    assert checkpoint_stem("resnet18", small)[0] == "small"
    assert checkpoint_stem("test_resnet", _stock("test_resnet").state_dict())[0] == "either"
    assert checkpoint_stem("test_resnet", stock)[0] == "unknown"
    assert resolve_small_stem(None, "resnet18", 8, stock)[0] is False
    assert resolve_small_stem(None, "resnet18", 224, small)[0] is True
    either = _small("test_resnet").state_dict()
    assert resolve_small_stem(None, "test_resnet", 8, either)[0] is False  # no card: timm's stock model
    assert resolve_small_stem(None, "test_resnet", 8, either, recorded=True)[0] is True
    assert resolve_small_stem(True, "test_resnet", 8, either)[0] is True  # the weights cannot contradict it


def test_explicit_stem_contradicting_the_checkpoint_is_refused(digits_shards: ShardIndex, tmp_path: Path) -> None:
    """(e) --small-stem with stock weights (or --no-small-stem with small-stem weights): refused, with the fix."""
    stock, small = _stock("resnet18").state_dict(), _small("resnet18").state_dict()
    with pytest.raises(GenddError) as caught:
        resolve_small_stem(True, "resnet18", 8, stock, source="ckpt.pt")
    assert str(caught.value) == (
        "ckpt.pt has resnet18's stock stem (its conv1.weight is 7x7), but --small-stem asks for "
        "the other one: leave out --small-stem (the stem then follows the checkpoint) or pass --no-small-stem"
    )
    with pytest.raises(GenddError, match=r"has the small 3x3 stem .* or pass --small-stem$"):
        resolve_small_stem(False, "resnet18", 224, small)
    with pytest.raises(GenddError, match="records small_stem=true"):
        resolve_small_stem(False, "test_resnet", 8, _small("test_resnet").state_dict(), recorded=True)
    ckpt = _save(_stock("resnet18"), tmp_path / "stock.safetensors")
    cfg = TeacherConfig(
        shards=digits_shards.root,
        out=tmp_path / "t",
        train=TrainConfig(model="resnet18"),
        checkpoint=ckpt,
        small_stem=True,
    )
    with pytest.raises(GenddError, match=r"stock stem .* or pass --no-small-stem$"):
        make_teacher(cfg)
    assert not (tmp_path / "t" / "teacher.json").exists()


@pytest.mark.parametrize("form", ["pth", "ddp", "timm-train", "model-key", "compiled"])
def test_checkpoint_forms(form: str, tmp_path: Path) -> None:
    """Checkpoints as timm and torch save them: a bare state_dict, DDP's `module.` keys, timm's train.py dict (EMA
    weights first, argparse options alongside), a {"model": ...} dict, torch.compile's `_orig_mod.` keys."""
    state = _stock("test_resnet").state_dict()
    other = {k: torch.zeros_like(v) for k, v in state.items()}
    saved, entry = {
        "pth": (state, None),
        "ddp": ({f"module.{k}": v for k, v in state.items()}, None),
        "timm-train": (
            {
                "epoch": 3,
                "arch": "test_resnet",
                "state_dict": other,
                "state_dict_ema": {f"module.{k}": v for k, v in state.items()},
                "args": argparse.Namespace(lr=0.1, model="test_resnet"),
                "metric": 91.5,
            },
            "state_dict_ema",
        ),
        "model-key": ({"model": state, "optimizer": {"state": {}}}, "model"),
        "compiled": ({f"_orig_mod.module.{k}": v for k, v in state.items()}, None),
    }[form]
    path = tmp_path / "ckpt.pth"
    torch.save(saved, path)
    got = read_checkpoint(path)
    assert got.entry == entry and got.card is None
    assert set(got.state) == set(state) and all(torch.equal(got.state[k], v) for k, v in state.items())


def test_unreadable_checkpoints_are_refused(tmp_path: Path) -> None:
    """A whole pickled model, a damaged file, a dict without weights: one line each, saying what to save instead."""
    whole = tmp_path / "whole.pt"
    torch.save(_stock("test_resnet"), whole)
    with pytest.raises(GenddError, match=r"holds more than weights .* torch.save\(model.state_dict\(\)"):
        read_checkpoint(whole)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"not a safetensors file")
    with pytest.raises(GenddError, match=r"is not a readable \.safetensors file"):
        read_checkpoint(damaged)
    truncated = tmp_path / "truncated.pth"
    torch.save(_stock("test_resnet").state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(GenddError, match="cannot be read as a torch checkpoint"):
        read_checkpoint(truncated)
    odd = tmp_path / "odd.pth"
    torch.save({"epoch": 3, "weights": [1, 2]}, odd)
    with pytest.raises(GenddError, match="neither a state_dict nor a checkpoint holding one"):
        read_checkpoint(odd)
    with pytest.raises(GenddError, match="not found"):
        read_checkpoint(tmp_path / "absent.pt")
