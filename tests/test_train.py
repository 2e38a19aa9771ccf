"""Training loop pieces: parameter groups, schedules, refusals, and resume equivalence."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline.errors import GenddError
from pipeline.objectives import ObjectiveConfig
from pipeline.train import (
    TrainConfig,
    TrainData,
    build_student,
    check_data_serves,
    epoch_plan,
    param_groups,
    schedule,
    targets_to,
    train,
)


def _data(n: int = 48, labeled: bool = True, cached: bool = True) -> TrainData:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 3 if labeled else torch.full((n,), -1)
    data = TrainData(torch.randint(0, 256, (n, 1, 8, 8), generator=gen, dtype=torch.uint8), labels, (0.3,), (0.4,))
    if cached:
        k, d = 2, 32
        data.views = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0], [0.1, 0.0, 0.9, 1.0, 1.0]]).expand(n, k, 5).clone()
        data.features = torch.randn(n, k, d, generator=gen) + labels.clamp_min(0)[:, None, None].float()
        data.head_weight = torch.randn(3, d, generator=gen) * 0.1
        data.head_bias = torch.zeros(3)
        data.logits = data.features @ data.head_weight.T
    return data


TINY = TrainConfig(
    model="test_resnet",
    method="gendd",
    objective=ObjectiveConfig("gendd"),
    epochs=3,
    batch_size=16,
    head_token_dim=16,
    head_width=32,
    head_depth=1,
    diffusion_batch_mul=2,
    warmstart_epochs=1,
    cpu=True,
)


def test_param_groups_exempt_head_norms_and_biases() -> None:
    student = build_student(TINY, _data(), 8)
    decay, no_decay, head = param_groups(student, 0.05, 2.5)
    head_ids = {id(p) for p in student.head.parameters()} | {id(p) for p in student.net.get_classifier().parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == head["weight_decay"] == 0.0
    assert head_ids == {id(p) for p in head["params"]} and head["lr_mult"] == 2.5 == 2.5 * decay["lr_mult"]
    assert all(p.ndim > 1 for p in decay["params"])
    assert sum(p.numel() for g in (decay, no_decay, head) for p in g["params"]) == sum(
        p.numel() for p in student.parameters()
    )


def test_schedule_warms_up_decays_and_ramps_beta2() -> None:
    cfg = replace(TINY, lr=1e-3)
    lrs, betas = zip(*(schedule(s, 100, 10, cfg) for s in range(100)), strict=True)
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:])) and lrs[-1] < 1e-5
    assert betas[0] == pytest.approx(0.95) and betas[-1] == pytest.approx(0.999, abs=1e-4)
    assert all(a <= b for a, b in itertools.pairwise(betas))


def test_epoch_plan_depends_on_seed_and_epoch_only_and_splits_ranks() -> None:
    data = _data(50)
    order, views = epoch_plan(TINY, data, 3, 0, 1)
    again, views_again = epoch_plan(TINY, data, 3, 0, 1)
    assert torch.equal(order, again) and torch.equal(views, views_again)
    assert not torch.equal(order, epoch_plan(TINY, data, 4, 0, 1)[0])
    ranks = [epoch_plan(TINY, data, 3, r, 2)[0] for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 25 and not set(ranks[0].tolist()) & set(ranks[1].tolist())


def test_refusals_are_one_line() -> None:
    cases = [
        (TINY, _data(labeled=False), "needs labels"),
        (replace(TINY, method="kd", objective=ObjectiveConfig("kd")), _data(cached=False), "cache"),
        (replace(TINY, warmstart_epochs=3), _data(), "warmstart_epochs"),
        (replace(TINY, method="kl", objective=ObjectiveConfig("kl", logit_adjust=1.0)), _data(), "logit_adjust"),
    ]
    for cfg, data, words in cases:
        with pytest.raises(GenddError, match=words) as info:
            check_data_serves(cfg, data)
        assert "\n" not in str(info.value)
    with pytest.raises(GenddError, match="token_dim 16 does not divide"):
        build_student(TINY, _shrink(_data(), 24), 8)


def _shrink(data: TrainData, dim: int) -> TrainData:
    data.features, data.head_weight = data.features[..., :dim], data.head_weight[:, :dim]
    return data


def test_resumed_training_ends_where_an_uninterrupted_one_does(tmp_path: Path, monkeypatch) -> None:
    data = _data()
    whole, whole_history = train(TINY, data, tmp_path / "whole", 8)
    import pipeline.train as train_module

    real_save, calls = train_module._save_checkpoint, []

    def killed_after_two_epochs(path, state):
        real_save(path, state)
        calls.append(state["epoch"])
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(train_module, "_save_checkpoint", killed_after_two_epochs)
    with pytest.raises(KeyboardInterrupt):
        train(TINY, data, tmp_path / "resumed", 8)
    monkeypatch.setattr(train_module, "_save_checkpoint", real_save)
    resumed, history = train(TINY, data, tmp_path / "resumed", 8)
    assert [h["epoch"] for h in history] == [1, 2, 3] == [h["epoch"] for h in whole_history]
    assert history[-1]["loss"] == pytest.approx(whole_history[-1]["loss"], rel=1e-4)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name


def test_checkpoint_from_other_settings_is_refused(tmp_path: Path) -> None:
    data = _data()
    train(replace(TINY, epochs=2, warmstart_epochs=0), data, tmp_path, 8)
    with pytest.raises(GenddError, match="other settings"):
        train(replace(TINY, epochs=2, warmstart_epochs=0, lr=1e-2), data, tmp_path, 8)


def test_logit_adjustment_gives_the_student_the_training_class_prior() -> None:
    data = _data()
    data.labels = torch.tensor([0] * 30 + [1] * 12 + [2] * 6)
    adjusted = build_student(replace(TINY, objective=ObjectiveConfig("gendd", logit_adjust=1.0)), data, 8)
    assert torch.allclose(adjusted.log_prior.exp(), torch.tensor([30.0, 12.0, 6.0]) / 48)
    assert "log_prior" in adjusted.state_dict()  # resumes with the same prior
    plain = build_student(TINY, data, 8)
    assert plain.log_prior is None and "log_prior" not in plain.state_dict()


def test_targets_where_steps_gather_them_give_the_same_batches() -> None:
    """targets_to settles once whether batches carry labels (no per-step check on the device); the batches match
    the per-batch host path."""
    from pipeline.train import _batch

    data, idx = _data(), torch.tensor([3, 7, 11, 0])
    view_index = torch.randint(2, (48,), generator=torch.Generator().manual_seed(1))
    placed = targets_to(data, torch.device("cpu"))
    assert placed.labeled is True and data.labeled is None
    before, after = (_batch(d, idx, view_index, torch.device("cpu")) for d in (data, placed))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert "labels" not in _batch(targets_to(_data(labeled=False), torch.device("cpu")), idx, view_index, "cpu")
