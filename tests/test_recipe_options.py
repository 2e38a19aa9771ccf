"""Options of the official recipe and the gap experiments: soft anchor, timestep skew, learned variance, a warm
start before the budget, and a probe on the condition."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pipeline.config import HeadSettings, ObjectiveConfig, TrainConfig
from pipeline.distill.head import GenerativeHead, HeadConfig
from pipeline.distill.objectives import contract_targets, soft_anchor_labels
from pipeline.errors import GenddError
from pipeline.train.loop import train
from pipeline.train.losses import compute_objective
from pipeline.train.student import build_student
from tests.test_train import TINY, _data, _info


def test_soft_anchor_mixes_onehot_and_teacher_softmax_and_alpha_one_is_the_hard_anchor() -> None:
    gen = torch.Generator().manual_seed(0)
    labels, logits = torch.tensor([0, 2, 1]), torch.randn(3, 4, generator=gen)
    centres, feats = torch.randn(4, 6, generator=gen), torch.randn(3, 6, generator=gen)
    q = soft_anchor_labels(labels, logits, 0.25)
    assert torch.allclose(q.sum(1), torch.ones(3))
    assert torch.allclose(q, 0.25 * torch.eye(4)[labels] + 0.75 * logits.softmax(1))
    hard = contract_targets(feats, labels, centres, 0.9)
    assert torch.equal(contract_targets(feats, soft_anchor_labels(labels, logits, 1.0), centres, 0.9), hard)
    assert not torch.allclose(contract_targets(feats, q, centres, 0.9), hard)


def test_soft_anchor_needs_the_teacher_logits_and_a_valid_alpha() -> None:
    with pytest.raises(GenddError, match="--soft-anchor"):
        ObjectiveConfig(soft_anchor=1.5)
    head = GenerativeHead(HeadConfig(feature_dim=8, cond_dim=4, token_dim=4, width=16, depth=1))
    with pytest.raises(GenddError, match="teacher_logits"):
        compute_objective(
            ObjectiveConfig(soft_anchor=0.5),
            feats=torch.randn(3, 4),
            classifier=torch.nn.Linear(4, 3),
            head=head,
            teacher_features=torch.randn(3, 8),
            teacher_logits=None,
            labels=torch.tensor([0, 1, 2]),
            centres=torch.randn(3, 8),
        )


def test_timestep_power_skews_towards_high_noise_and_one_keeps_the_uniform_draw() -> None:
    def draw(power: float) -> torch.Tensor:
        head = GenerativeHead(HeadConfig(feature_dim=8, cond_dim=4, token_dim=4, timestep_power=power))
        return head._draw_timesteps((20000,), torch.Generator().manual_seed(0), torch.device("cpu"))

    uniform = torch.randint(1000, (20000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(draw(1.0), uniform)  # the default is the draw it always was
    skewed = draw(0.5)
    assert int(skewed.min()) >= 0 and int(skewed.max()) <= 999
    assert float(skewed.float().mean()) > 640 > float(uniform.float().mean())  # E[u^0.5] = 2/3


def test_learned_variance_bound_is_zero_at_the_true_posterior_and_trains_the_variance() -> None:
    cfg = HeadConfig(feature_dim=8, cond_dim=4, token_dim=4, width=16, depth=1, learn_sigma=True, prediction="sample")
    head = GenerativeHead(cfg)
    assert "log_beta" not in head.state_dict()  # derived tables are not saved: old exports load unchanged
    gen = torch.Generator().manual_seed(0)
    x0, x_t = torch.randn(5, 2, 4, generator=gen), torch.randn(5, 2, 4, generator=gen)
    t = torch.tensor([[0, 1], [10, 500], [999, 3], [7, 8], [250, 251]])
    at_posterior = head._variational_bound(x0, -torch.ones_like(x0), x0, x_t, t)  # exact mean, posterior variance
    assert torch.allclose(at_posterior[1:][(t[1:] > 0)], torch.zeros(1), atol=1e-5)
    assert float(head._variational_bound(x0 + 0.5, -torch.ones_like(x0), x0, x_t, t)[t > 0].mean()) > 0.01
    loss = head(torch.randn(6, 8, generator=gen), torch.randn(6, 4, generator=gen), generator=gen)
    loss.backward()
    last = head.denoiser.final.linear
    assert last.out_features == 2 * cfg.token_dim and last.bias.grad[cfg.token_dim :].abs().sum() > 0
    z = torch.randn(3, 4, generator=gen)
    for sampler in ("ddpm", "ddim", "dpmsolver"):
        out = head.sample(z, sampler=sampler, steps=4, n_samples=2, generator=torch.Generator().manual_seed(0))
        assert out.shape == (3, 8) and bool(torch.isfinite(out).all()), sampler


def test_warm_start_before_the_budget_adds_its_epochs_with_their_own_schedule(tmp_path) -> None:
    data = _data(96)  # 6 steps an epoch
    cfg = replace(TINY, epochs=2, warmstart_epochs=1, warmstart_before=True, warmup_epochs=0)
    assert cfg.total_epochs == 3 and replace(TINY, epochs=2, warmstart_epochs=1).total_epochs == 2
    _, history = train(cfg, data, tmp_path, 8)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert "warmstart" in history[0] and "diffusion" in history[1] and "diffusion" in history[2]
    # The warm start's cosine ends near zero; the budget's restarts, so its first epoch ends at a high lr.
    assert history[0]["lr"] < 0.15 * cfg.lr and history[1]["lr"] > 0.5 * cfg.lr
    with pytest.raises(GenddError, match="--warmstart-epochs"):
        replace(TINY, warmstart_epochs=0, warmstart_before=True)


def test_probe_on_condition_reads_the_normalised_condition_and_sends_no_gradient() -> None:
    data = _data()
    cfg = replace(TINY, head=replace(TINY.head, probe_on_condition=True))
    student = build_student(cfg, _info(data), 8)
    feats = torch.randn(4, student.head.config.cond_dim, requires_grad=True)
    logits = student.probe(feats)
    expected = student.net.get_classifier()(student.head.condition(feats))
    assert torch.allclose(logits, expected)
    logits.sum().backward()
    assert feats.grad is None or float(feats.grad.abs().sum()) == 0.0
    plain = build_student(TINY, _info(data), 8)
    assert torch.allclose(plain.probe(feats.detach()), plain.net.get_classifier()(feats.detach()))


def test_head_settings_reject_out_of_range_recipe_values() -> None:
    with pytest.raises(GenddError, match="--timestep-power"):
        HeadSettings(timestep_power=0)
    assert TrainConfig().head.learn_sigma is False and TrainConfig().objective.soft_anchor == 1.0
