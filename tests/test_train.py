"""Training loop pieces: parameter groups, schedules, refusals, and resume equivalence."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline.config import HeadSettings, ObjectiveConfig, TrainConfig
from pipeline.errors import GenddError
from pipeline.train.input import EpochPlan, view_plan
from pipeline.train.loop import schedule, train
from pipeline.train.memory import MemoryInput, TrainData
from pipeline.train.student import build_student, check_data_serves, param_groups


def _data(n: int = 48, labeled: bool = True, cached: bool = True) -> TrainData:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 3 if labeled else torch.full((n,), -1)
    data = TrainData(torch.randint(0, 256, (n, 1, 8, 8), generator=gen, dtype=torch.uint8), labels, (0.3,), (0.4,))
    if cached:
        k, d = 2, 32
        data.views = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0], [0.1, 0.0, 0.9, 1.0, 1.0]]).expand(n, k, 5).clone()
        data.features = (torch.randn(n, k, d, generator=gen) + labels.clamp_min(0)[:, None, None].float()).half()
        data.head_weight = torch.randn(3, d, generator=gen) * 0.1
        data.head_bias = torch.zeros(3)
        data.logits = (data.features.float() @ data.head_weight.T).half()
    data.keys = [f"s{i:04d}" for i in range(n)]
    return data


def _info(data: TrainData):
    return MemoryInput(data).info


TINY = TrainConfig(
    model="test_resnet",
    objective=ObjectiveConfig(method="gendd"),
    epochs=3,
    batch_size=16,
    head=HeadSettings(token_dim=16, width=32, depth=1, diffusion_batch_mul=2),
    warmstart_epochs=1,
    cpu=True,
)


def test_param_groups_exempt_head_norms_and_biases() -> None:
    student = build_student(TINY, _info(_data()), 8)
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


def _epoch(data: TrainData, epoch: int, rank: int = 0, world: int = 1) -> list[dict]:
    return list(MemoryInput(data).batches(EpochPlan(TINY.seed, epoch, 16, rank, world)))


def test_memory_batches_depend_on_seed_and_epoch_only_and_split_ranks() -> None:
    data = _data(50)
    first, again = _epoch(data, 3), _epoch(data, 3)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, again, strict=True) for k in a)
    assert not torch.equal(first[0]["index"], _epoch(data, 4)[0]["index"])
    ranks = [torch.cat([b["index"] for b in _epoch(data, 3, r, 2)]) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 25 and not set(ranks[0].tolist()) & set(ranks[1].tolist())
    for batch in first:  # every sample is paired with its own cached view and teacher outputs
        idx, view = batch["index"], batch["view"]
        assert torch.equal(view, torch.from_numpy(view_plan(TINY.seed, 3, idx.numpy(), 2)))
        assert torch.equal(batch["teacher_features"], data.features[idx, view])
        assert torch.equal(batch["views"], data.views[idx, view]) and torch.equal(batch["images"], data.images[idx])


def test_view_plan_is_stateless_and_uses_every_view() -> None:
    index = torch.arange(4000).numpy()
    plan = view_plan(0, 1, index, 8)
    assert (plan[::-1] == view_plan(0, 1, index[::-1], 8)).all()  # a sample's view does not depend on the order
    assert set(plan.tolist()) == set(range(8)) and abs((plan == 0).mean() - 1 / 8) < 0.03
    assert (plan != view_plan(0, 2, index, 8)).mean() > 0.8 and (view_plan(0, 1, index, 1) == 0).all()


def test_refusals_are_one_line() -> None:
    cases = [
        (TINY, _data(labeled=False), "needs labels"),
        (replace(TINY, objective=ObjectiveConfig(method="kd")), _data(cached=False), "cache"),
        (replace(TINY, objective=ObjectiveConfig(method="kl", logit_adjust=1.0)), _data(), "logit_adjust"),
    ]
    for cfg, data, words in cases:
        with pytest.raises(GenddError, match=words) as info:
            check_data_serves(cfg, _info(data))
        assert "\n" not in str(info.value)
    with pytest.raises(GenddError, match="--warmstart-epochs must be in"):
        replace(TINY, warmstart_epochs=3)  # refused when the settings are made, before any data is read
    with pytest.raises(GenddError, match="token_dim 16 does not divide"):
        build_student(TINY, _info(_shrink(_data(), 24)), 8)


def _shrink(data: TrainData, dim: int) -> TrainData:
    data.features, data.head_weight = data.features[..., :dim], data.head_weight[:, :dim]
    return data


def test_resumed_training_ends_where_an_uninterrupted_one_does(tmp_path: Path, monkeypatch) -> None:
    data = _data()
    whole, whole_history = train(TINY, data, tmp_path / "whole", 8)
    import pipeline.train.loop as train_module

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


def test_logit_adjustment_gives_the_student_the_training_class_prior() -> None:
    data = _data()
    data.labels = torch.tensor([0] * 30 + [1] * 12 + [2] * 6)
    adjusted = build_student(replace(TINY, objective=ObjectiveConfig(method="gendd", logit_adjust=1.0)), _info(data), 8)
    assert torch.allclose(adjusted.log_prior.exp(), torch.tensor([30.0, 12.0, 6.0]) / 48)
    assert "log_prior" in adjusted.state_dict()  # resumes with the same prior
    plain = build_student(TINY, _info(data), 8)
    assert plain.log_prior is None and "log_prior" not in plain.state_dict()


def test_unsupervised_methods_never_see_labels_even_in_the_warm_start(tmp_path: Path, monkeypatch) -> None:
    import pipeline.train.loop as train_module

    seen = []
    real = train_module.batch_targets

    def spy(batch, info, device, use_labels):
        out = real(batch, info, device, use_labels)
        seen.append("labels" in out)
        return out

    monkeypatch.setattr(train_module, "batch_targets", spy)
    cfg = replace(TINY, objective=ObjectiveConfig(method="gendd_unsup", contraction=0.0), epochs=2)
    train(cfg, _data(), tmp_path, 8)  # labelled data, warm start on: the warm start matches teacher logits instead
    assert seen and not any(seen)


@pytest.mark.parametrize("labels", ["shuffled", "absent"])
def test_unsupervised_warm_start_trains_the_same_weights_whatever_the_labels(tmp_path: Path, labels: str) -> None:
    cfg = replace(TINY, objective=ObjectiveConfig(method="gendd_unsup"), epochs=2)
    reference, _ = train(cfg, _data(), tmp_path / "reference", 8)
    other = _data()  # the same images, features and teacher logits; only the labels differ
    gen = torch.Generator().manual_seed(1)
    perm = torch.randperm(len(other.labels), generator=gen)
    other.labels = other.labels[perm] if labels == "shuffled" else torch.full_like(other.labels, -1)
    assert not torch.equal(other.labels, _data().labels)
    student, _ = train(cfg, other, tmp_path / "other", 8)
    for (name, a), b in zip(reference.state_dict().items(), student.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_resuming_with_more_epochs_continues_the_run(tmp_path: Path) -> None:
    data = _data()
    short = replace(TINY, epochs=2, warmstart_epochs=0)
    _, first = train(short, data, tmp_path, 8)
    _, history = train(replace(short, epochs=3), data, tmp_path, 8)
    assert [h["epoch"] for h in history] == [1, 2, 3] and history[:2] == first  # two kept, one more trained
