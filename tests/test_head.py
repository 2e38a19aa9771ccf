import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from pipeline.config import SAMPLERS
from pipeline.distill.head import GenerativeHead, HeadConfig, tokenize, untokenize
from pipeline.errors import GenddError

TINY = HeadConfig(feature_dim=8, cond_dim=4, token_dim=4, width=128, depth=2)
TARGETS = torch.stack([torch.ones(8), -torch.ones(8)])  # (2, D_T): one target per condition


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@contextmanager
def single_thread() -> Iterator[None]:
    """Run tiny-matrix training on one thread: more threads only add sync overhead, badly so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained() -> tuple[GenerativeHead, torch.Tensor]:
    """A tiny head fitted to two conditions with targets +1 and -1, and those two conditions z (2, D_S)."""
    torch.manual_seed(0)
    head = GenerativeHead(TINY)
    h = torch.randn(2, TINY.cond_dim)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    hb, yb = h.repeat(16, 1), TARGETS.repeat(16, 1)
    with single_thread():
        for _ in range(300):
            loss = head(yb, head.condition(hb))
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()
    with torch.no_grad():
        z = head.condition(h)
    return head, z


def test_tokenize_round_trip_cuts_contiguous_chunks() -> None:
    x = torch.arange(24.0).reshape(2, 12)
    tokens = tokenize(x, 4)
    assert tokens.shape == (2, 3, 4)
    assert torch.equal(tokens[1, 2], torch.tensor([20.0, 21.0, 22.0, 23.0]))
    assert torch.equal(untokenize(tokens), x)


def test_config_refuses_a_token_dim_that_does_not_divide() -> None:
    with pytest.raises(GenddError, match=r"token_dim 64 does not divide the teacher feature dim 100.*50, 25, 20"):
        HeadConfig(feature_dim=100, cond_dim=8)
    assert HeadConfig(feature_dim=512, cond_dim=8).num_tokens == 8


def test_fresh_denoiser_is_the_exact_zero_map() -> None:
    torch.manual_seed(0)
    head = GenerativeHead(TINY)
    x = torch.randn(5, TINY.num_tokens, TINY.token_dim)
    t = torch.randint(0, TINY.num_train_steps, (5, TINY.num_tokens))
    z = torch.randn(5, 1, TINY.cond_dim)
    assert torch.equal(head.denoiser(x, t, z), torch.zeros_like(x))
    # ... and so the first loss is the plain noise energy, close to 1
    loss = head(torch.randn(64, TINY.feature_dim), torch.randn(64, TINY.cond_dim), generator=_gen(0))
    assert 0.8 < loss.item() < 1.2


def test_forward_is_reproducible_and_checks_shapes() -> None:
    torch.manual_seed(0)
    head = GenerativeHead(TINY)
    y, z = torch.randn(3, TINY.feature_dim), torch.randn(3, TINY.cond_dim)
    with torch.no_grad():  # make the denoiser non-trivial so the loss depends on the draws
        head.denoiser.final.linear.weight.normal_()
    assert head(y, z, generator=_gen(1)).item() == head(y, z, generator=_gen(1)).item()
    assert head(y, z, generator=_gen(1)).item() != head(y, z, generator=_gen(2)).item()
    with pytest.raises(GenddError, match="expects"):
        head(torch.randn(3, 6), z)


def test_trained_head_separates_two_conditions(trained: tuple[GenerativeHead, torch.Tensor]) -> None:
    head, z = trained
    out = head.sample(z, generator=_gen(0))  # defaults: 5 samples, CFG 2.0, DDIM 25 steps
    assert out.shape == (2, TINY.feature_dim)
    own = (out - TARGETS).norm(dim=1)
    other = (out - TARGETS.flip(0)).norm(dim=1)
    assert torch.all(own < other)
    assert torch.all(own < 1.0), own  # the targets are 2 * sqrt(8) ~ 5.7 apart


def _count_denoiser_calls(head: GenerativeHead, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Patch the denoiser to record (batch rows, conditions that are all zero) per call."""
    calls: list[tuple[int, int]] = []
    original = head.denoiser.forward

    def recording(x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        calls.append((x.shape[0], int((z == 0).all(dim=-1).sum())))
        return original(x, t, z)

    monkeypatch.setattr(head.denoiser, "forward", recording)
    return calls


def test_cfg_scale_one_is_the_plain_conditional_sample(
    trained: tuple[GenerativeHead, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    head, z = trained
    calls = _count_denoiser_calls(head, monkeypatch)
    plain = head.sample(z, n_samples=3, cfg_scale=1.0, steps=10, generator=_gen(5))
    assert calls == [(3 * 2, 0)] * 10  # one call per step, conditional rows only
    calls.clear()
    # just above 1 the guided path runs: one batched call per step with as many z = 0 rows, same result
    guided = head.sample(z, n_samples=3, cfg_scale=math.nextafter(1.0, 2.0), steps=10, generator=_gen(5))
    assert calls == [(2 * 3 * 2, 3 * 2)] * 10
    torch.testing.assert_close(plain, guided, rtol=0, atol=1e-4)


def test_cfg_scale_zero_is_the_unconditional_sample(trained: tuple[GenerativeHead, torch.Tensor]) -> None:
    head, z = trained
    uncond = head.sample(z, cfg_scale=0.0, generator=_gen(3))
    zero_cond = head.sample(torch.zeros_like(z), cfg_scale=1.0, generator=_gen(3))
    torch.testing.assert_close(uncond, zero_cond, rtol=0, atol=1e-4)
    assert not torch.allclose(uncond, head.sample(z, cfg_scale=1.0, generator=_gen(3)), atol=1e-2)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_are_finite_and_deterministic(sampler: str, trained: tuple[GenerativeHead, torch.Tensor]) -> None:
    head, z = trained
    torch.manual_seed(1)  # a different global RNG state per call: only the generator may matter
    first = head.sample(z, sampler=sampler, steps=12, generator=_gen(7))
    torch.manual_seed(2)
    second = head.sample(z, sampler=sampler, steps=12, generator=_gen(7))
    other = head.sample(z, sampler=sampler, steps=12, generator=_gen(8))
    assert first.shape == (2, TINY.feature_dim) and torch.isfinite(first).all()
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert torch.all((first - TARGETS).norm(dim=1) < 1.0)


def test_unknown_sampler_lists_the_choices(trained: tuple[GenerativeHead, torch.Tensor]) -> None:
    head, z = trained
    with pytest.raises(GenddError, match="ddpm, ddim, dpmsolver"):
        head.sample(z, sampler="euler")


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_condition_dropout_zeroes_that_share_of_rows(dropout: float, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    cfg = HeadConfig(feature_dim=8, cond_dim=4, token_dim=4, width=16, depth=1, cond_dropout=dropout)
    head = GenerativeHead(cfg)
    calls = _count_denoiser_calls(head, monkeypatch)
    head(torch.randn(500, 8), torch.randn(500, 4), generator=_gen(0))
    [(n, zeroed)] = calls
    assert n == 500 * cfg.diffusion_batch_mul
    share = zeroed / (n * cfg.num_tokens)  # dropout is per (sample, token, repeat) row
    assert abs(share - dropout) < 0.02


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_other_predictions_learn_and_sample_the_targets(prediction: str) -> None:
    """A head trained to predict velocity or x0 is sampled with the same parameterisation (a mismatch would miss)."""
    torch.manual_seed(0)
    cfg = HeadConfig(feature_dim=8, cond_dim=4, token_dim=4, width=128, depth=2, prediction=prediction)
    head = GenerativeHead(cfg)
    h = torch.randn(2, cfg.cond_dim)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    with single_thread():
        for _ in range(300):
            loss = head(TARGETS.repeat(16, 1), head.condition(h.repeat(16, 1)))
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        out = head.eval().sample(head.condition(h), steps=10, generator=_gen(0))
    assert torch.all((out - TARGETS).norm(dim=1) < (out - TARGETS.flip(0)).norm(dim=1))
    assert torch.all((out - TARGETS).norm(dim=1) < 1.0)


def test_prediction_targets_differ_and_unknown_is_refused() -> None:
    """Same draws, three parameterisations: the regression targets differ, so the losses do."""
    y, z = torch.randn(3, TINY.feature_dim), torch.randn(3, TINY.cond_dim)
    losses = []
    for prediction in ("epsilon", "v_prediction", "sample"):
        torch.manual_seed(0)
        cfg = HeadConfig(feature_dim=8, cond_dim=4, token_dim=4, width=128, depth=2, prediction=prediction)
        head = GenerativeHead(cfg)  # zero map: loss = E[target^2]
        losses.append(head(y, z, generator=_gen(1)).item())
    assert len({round(v, 6) for v in losses}) == 3
    with pytest.raises(GenddError, match="v_prediction"):
        HeadConfig(feature_dim=8, cond_dim=4, token_dim=4, prediction="x")
