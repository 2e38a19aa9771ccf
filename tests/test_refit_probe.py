"""`gendd evaluate --refit`: a logistic-regression probe fitted on the frozen student features of the train split tells
a student's features from its trained readout. Digits shards, a synthetic teacher cache, 1-epoch students (tiny)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.data.shards import ShardIndex
from pipeline.errors import GenddError
from pipeline.evaluate.evaluate import SHOWN_METRICS
from pipeline.evaluate.refit import fit_refit_probes
from pipeline.models import load_model, sha256_file
from stages.app import main

from .test_faults import run_cli
from .test_stream import TINY_DISTILL, build_cache

EVAL = ["--steps", "2", "--n-samples", "1", "--device", "cpu", "--data", "memory"]
REFIT_KEYS = ("refit_top1", "refit_z_top1", "refit_seconds", "refit_train_samples", "refit_minus_probe")


@dataclass
class World:
    shards: Path
    cache: Path
    gendd: Path  # a student with a generative head
    ce: Path  # one without
    root: Path


@pytest.fixture(scope="module")
def world(digits_shards: ShardIndex, tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("refit")
    cache = root / "cache"
    for split in ("train", "val"):
        build_cache(digits_shards, cache, split=split)
    w = World(Path(digits_shards.root), cache, root / "gendd", root / "ce", root)
    for method, out in (("gendd", w.gendd), ("ce", w.ce)):
        args = ["distill", "--shards", w.shards, "--cache", cache, "--out", out, "--method", method]
        main([*map(str, args), *TINY_DISTILL])
    return w


def evaluate(w: World, student: Path, name: str, *extra: str, shards: Path | None = None) -> dict:
    """`gendd evaluate` in-process; returns details.json, after checking metrics.json holds its shown subset."""
    out = w.root / "eval" / name
    args = ["evaluate", "--shards", shards or w.shards, "--cache", w.cache, "--student-dir", student, "--out", out]
    main([*map(str, args), *EVAL, *extra])
    details = json.loads((out / "details.json").read_text())
    shown = json.loads((out / "metrics.json").read_text())
    assert shown == {k: round(details[k], 2) for k in SHOWN_METRICS if k in details}
    return details


def zero_readout(student: Path, out: Path) -> Path:
    """A copy of the student whose own classifier (the trained probe) is all zeros: same features, no readout."""
    shutil.copytree(student, out)
    net, _ = load_model(out, "student")
    for p in net.get_classifier().parameters():
        p.data.zero_()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "student.safetensors"))
    card = json.loads((out / "student.json").read_text())
    (out / "student.json").write_text(json.dumps(card | {"sha256": sha256_file(out / "student.safetensors")}))
    return out


def test_refit_metrics_per_student_and_off_is_unchanged(world: World) -> None:
    for kind, student in (("gendd", world.gendd), ("ce", world.ce)):
        off = evaluate(world, student, f"{kind}-off")
        on = evaluate(world, student, f"{kind}-on", "--refit")
        assert not any(k.startswith("refit") for k in off), "without --refit nothing of it is recorded"
        assert 0 <= on["refit_top1"] <= 100 and 0 <= on["refit_top5"] <= 100
        assert ("refit_z_top1" in on) == (kind == "gendd"), "the condition z is refit iff the student has a head"
        assert on["refit_train_samples"] == 200 and on["refit_seconds"] > 0 and on["refit_converged"]
        assert on["refit_minus_probe"] == pytest.approx(on["refit_top1"] - on["probe_top1"])
        # the refit neither moves the other paths (the sampler's generator included) nor adds to the plot
        for key in ("probe_top1", "probe_top5", "probe_per_class", "generative_top1", "teacher_top1"):
            assert on.get(key) == off.get(key), (kind, key)
        assert not any(k.startswith("refit") and k.endswith("per_class") for k in on)
        assert ("generative_top1" in on) == (kind == "gendd"), "the sampler ran beside the refit"


def test_refit_recovers_the_accuracy_a_zeroed_readout_loses(world: World) -> None:
    blind = zero_readout(world.gendd, world.root / "gendd-zeroed")
    trained = evaluate(world, world.gendd, "gendd-refit", "--refit", "--fast")
    zeroed = evaluate(world, blind, "zeroed-refit", "--refit", "--fast")
    assert zeroed["probe_top1"] <= 20, "all-zero logits: chance (the first class's share, ~10% on digits)"
    # the refit reads the features only: the readout's loss does not reach it
    assert zeroed["refit_top1"] == trained["refit_top1"] and zeroed["refit_z_top1"] == trained["refit_z_top1"]
    assert zeroed["refit_top1"] >= 60 and zeroed["refit_z_top1"] >= 60, "digits features are linearly informative"
    assert zeroed["refit_minus_probe"] >= 40


def test_refit_samples_caps_the_fit_and_stream_fits_the_same_rows(world: World) -> None:
    memory = evaluate(world, world.ce, "cap-memory", "--refit", "--fast", "--refit-samples", "96")
    stream = evaluate(
        world,
        world.ce,
        "cap-stream",
        "--refit",
        "--fast",
        "--refit-samples",
        "96",
        "--data",
        "stream",
        "--workers",
        "0",
    )
    assert memory["refit_train_samples"] == stream["refit_train_samples"] == 96
    assert abs(memory["refit_top1"] - stream["refit_top1"]) <= 100 / 200  # the same rows: at most one image apart
    assert memory["probe_top1"] == stream["probe_top1"]


def test_no_train_split_is_one_line(world: World, capsys: pytest.CaptureFixture) -> None:
    shards = Path(shutil.copytree(world.shards, world.root / "val-only"))
    index = json.loads((shards / "index.json").read_text())
    del index["splits"]["train"]
    (shards / "index.json").write_text(json.dumps(index))
    out = world.root / "eval" / "no-train"
    args = ["evaluate", "--shards", shards, "--cache", world.cache, "--student-dir", world.ce, "--out", out, *EVAL]
    code, lines, _ = run_cli(capsys, *args, "--refit")
    assert code != 0 and len(lines) == 1, lines
    assert "train split" in lines[0] and "drop --refit" in lines[0] and "gendd prepare" in lines[0]
    assert not (out / "metrics.json").exists()
    code, _, _ = run_cli(capsys, *args, "--fast")  # the same shards evaluate without --refit
    assert code == 0


def test_a_probe_needs_two_classes_and_unseen_classes_are_never_predicted(capsys: pytest.CaptureFixture) -> None:
    x = np.random.default_rng(0).standard_normal((40, 6)).astype(np.float32)
    with pytest.raises(GenddError, match="refit-samples"):
        fit_refit_probes({"features": x}, np.zeros(40, np.int64), 3)
    labels = np.arange(40) % 2  # classes 0 and 1 of 3
    x[:, 0] += 3 * labels
    (model, converged) = fit_refit_probes({"features": x}, labels, 3)["features"]
    assert "2 of 3 classes" in capsys.readouterr().out and converged
    from pipeline.evaluate.refit import refit_logits

    logits = refit_logits(model, x, 3)
    assert torch.isinf(logits[:, 2]).all() and (logits.argmax(1).numpy() == labels).mean() > 0.9


def test_distill_refit_readout_exports_the_refit_probe(world: World) -> None:
    """`distill --refit-readout` folds the refit probe into the student's classifier: its probe top-1 is then the
    refit top-1 of the same features, and the student stays a plain timm network."""
    out = world.root / "gendd-refit"
    args = ["distill", "--shards", world.shards, "--cache", world.cache, "--out", out, "--method", "gendd"]
    main([*map(str, args), *TINY_DISTILL, "--refit-readout"])
    card = json.loads((out / "student.json").read_text())
    train = json.loads((out / "train.json").read_text())
    assert card["extra"]["readout"] == "refit" and train["refit_readout"]["samples"] > 0
    before = evaluate(world, world.gendd, "gendd-trained", "--refit", "--fast")
    after = evaluate(world, out, "gendd-refitted", "--refit", "--fast")
    assert after["refit_top1"] == before["refit_top1"]  # the same features (the run is seeded alike)
    assert abs(after["probe_top1"] - before["refit_top1"]) <= 0.6  # the folded fit predicts as the refit probe
    assert after["probe_top1"] > before["probe_top1"] + 10  # the 1-epoch trained probe is far behind its features
