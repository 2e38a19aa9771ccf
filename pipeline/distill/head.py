"""The GenDD generative head: a token-wise conditional diffusion model over teacher features.

Contract (after MAR's DiffLoss): `forward(target, z) -> loss` during training, `sample(z, ...) -> features` at
inference. The teacher feature is cut into tokens; every token is denoised independently by a small adaLN MLP that is
conditioned on the (normalised) student feature, the timestep and the token's position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import PREDICTIONS, SAMPLERS, SPACINGS, HeadSettings
from pipeline.errors import GenddError

if TYPE_CHECKING:
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler


TIME_FREQ_DIM = 256


@dataclass(frozen=True)
class HeadConfig:
    """Shape and diffusion settings of the generative head."""

    feature_dim: int  # D_T, the teacher feature size
    cond_dim: int  # D_S, the student feature size
    # Defaults are HeadSettings' (what `gendd distill` trains): the paper's head is width 1024, prediction epsilon.
    token_dim: int = HeadSettings.token_dim
    width: int = HeadSettings.width
    depth: int = HeadSettings.depth
    num_train_steps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    diffusion_batch_mul: int = HeadSettings.diffusion_batch_mul
    cond_dropout: float = HeadSettings.cond_dropout
    # What the denoiser predicts. epsilon (the paper) weights the clean-target error by SNR(t), ~0 at high noise where
    # only the condition can tell the target; v_prediction weights it by SNR(t) + 1 and sample (x0) by 1, so the
    # student's condition gets gradient there.
    prediction: str = HeadSettings.prediction
    timestep_power: float = HeadSettings.timestep_power  # training t = T * u ** power (1 = uniform)
    learn_sigma: bool = HeadSettings.learn_sigma  # a variance output per dim, trained by the variational bound

    def __post_init__(self) -> None:
        for name in (
            "feature_dim",
            "cond_dim",
            "token_dim",
            "width",
            "depth",
            "num_train_steps",
            "diffusion_batch_mul",
        ):
            if getattr(self, name) < 1:
                raise GenddError(f"head {name} must be a positive integer, got {getattr(self, name)}")
        if self.feature_dim % self.token_dim:
            raise GenddError(
                f"token_dim {self.token_dim} does not divide the teacher feature dim {self.feature_dim}: "
                f"pick a divisor of {self.feature_dim} (e.g. {_suggest_divisors(self.feature_dim, self.token_dim)})"
            )
        if self.prediction not in PREDICTIONS:
            raise GenddError(f"head prediction must be one of {', '.join(PREDICTIONS)}, got {self.prediction!r}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise GenddError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")

    @property
    def num_tokens(self) -> int:
        """Number of tokens T a teacher feature is split into."""
        return self.feature_dim // self.token_dim


def _suggest_divisors(dim: int, token_dim: int, k: int = 3) -> str:
    # Closest divisors to what was asked for; dim itself (a single token) is a last resort.
    divisors = [d for d in range(1, dim) if dim % d == 0] or [dim]
    return ", ".join(str(d) for d in sorted(divisors, key=lambda d: (abs(d - token_dim), -d))[:k])


def tokenize(x: Tensor, token_dim: int) -> Tensor:
    """Split features (B, D) into tokens (B, D // token_dim, token_dim)."""
    return x.reshape(x.shape[0], -1, token_dim)


def untokenize(tokens: Tensor) -> Tensor:
    """Join tokens (B, T, k) back into features (B, T * k)."""
    return tokens.reshape(tokens.shape[0], -1)


def timestep_embedding(t: Tensor, dim: int = TIME_FREQ_DIM, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (..., dim) of (possibly fractional) timesteps t (...)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[..., None] * freqs  # (..., half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    """Residual MLP block whose LayerNorm is shifted, scaled and gated by the conditioning vector."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """Apply the block to x (..., W) under conditioning c (..., W)."""
        shift, scale, gate = self.modulation(c).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.norm(x), shift, scale))


class FinalLayer(nn.Module):
    """Modulated LayerNorm followed by the projection back to token space."""

    def __init__(self, width: int, token_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, token_dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """Map x (..., W) to the prediction (..., token_dim): noise, velocity or clean target."""
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm(x), shift, scale))


class Denoiser(nn.Module):
    """adaLN MLP predicting the noise of every token from (x_t, t, z, token position)."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        w = cfg.width
        self.input_proj = nn.Linear(cfg.token_dim, w)
        self.time_embed = nn.Sequential(nn.Linear(TIME_FREQ_DIM, w), nn.SiLU(), nn.Linear(w, w))
        self.cond_proj = nn.Linear(cfg.cond_dim, w)
        self.pos_embed = nn.Parameter(torch.randn(cfg.num_tokens, w) * 0.02)  # (T, W)
        self.blocks = nn.ModuleList(ResBlock(w) for _ in range(cfg.depth))
        self.final = FinalLayer(w, cfg.token_dim * (2 if cfg.learn_sigma else 1))
        self._zero_init()

    def _zero_init(self) -> None:
        # Gates, shifts/scales and the output start at zero: every block is the identity and the
        # denoiser is the exact zero map, which keeps early training stable (as in DiT / MAR).
        for block in self.blocks:
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
        for layer in (self.final.modulation[-1], self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """Predict noise (N, T, k) from x_t (N, T, k), t broadcastable to (N, T), z broadcastable to (N, T, D_S);
        with learned variance, (N, T, 2k): the prediction, then the variance interpolation in [-1, 1]."""
        t_emb = self.time_embed(timestep_embedding(t).to(x.dtype))  # (..., W)
        c = t_emb + self.cond_proj(z) + self.pos_embed  # (N, T, W)
        h = self.input_proj(x)  # (N, T, W)
        for block in self.blocks:
            h = block(h, c)
        return self.final(h, c)


def make_scheduler(
    sampler: str, cfg: HeadConfig, spacing: str = "leading"
) -> DDPMScheduler | DDIMScheduler | DPMSolverMultistepScheduler:
    """A fresh diffusers scheduler of the named kind on the head's training noise schedule, visiting timesteps as
    `spacing` says (SamplingConfig.spacing)."""
    if spacing not in SPACINGS:
        raise GenddError(f"timestep spacing {spacing!r} is unknown: choose one of {', '.join(SPACINGS)}")
    # Imported here: diffusers pulls in much of torch's compiler stack, a quarter of the CLI's start-up otherwise.
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    common = {
        "num_train_timesteps": cfg.num_train_steps,
        "beta_schedule": cfg.beta_schedule,
        "prediction_type": cfg.prediction,
        "timestep_spacing": spacing,
    }
    # Features are not images: no clipping of x0 to [-1, 1]. "leading" spacing (the default) never visits the cosine
    # schedule's last steps, where alpha_bar ~ 1e-8 would blow up the x0 estimate (x - sigma * eps) / alpha.
    if sampler == "ddpm":  # the only sampler that draws with the learned variance
        variance = "learned_range" if cfg.learn_sigma else "fixed_small"
        return DDPMScheduler(**common, clip_sample=False, variance_type=variance)
    if sampler == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True)
    if sampler == "dpmsolver":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++")
    raise GenddError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")


def _posterior_tables(alphas_cumprod: Tensor) -> dict[str, Tensor]:
    """Per-timestep constants of the variational bound (Ho et al. 2020, eq. 7), in float64 then float32."""
    a = alphas_cumprod.double()
    a_prev = torch.cat([a.new_ones(1), a[:-1]])
    beta = 1 - a / a_prev
    post_var = beta * (1 - a_prev) / (1 - a)
    post_var[0] = post_var[1]  # t = 0 has no posterior variance: clip the log as improved DDPM does
    tables = {
        "sqrt_alpha_bar": a.sqrt(),
        "sqrt_one_minus_alpha_bar": (1 - a).sqrt(),
        "posterior_coef_x0": beta * a_prev.sqrt() / (1 - a),
        "posterior_coef_xt": (1 - a_prev) * (a / a_prev).sqrt() / (1 - a),
        "posterior_log_var": post_var.log(),
        "log_beta": beta.log(),
    }
    return {name: table.float() for name, table in tables.items()}


def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    # Random draws happen where the generator lives (usually the CPU) and are then moved, so a CPU
    # generator gives the same numbers whatever the compute device.
    return generator.device if generator is not None else device


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    dev = _draw_device(generator, like.device)
    return torch.randn(shape, generator=generator, device=dev, dtype=like.dtype).to(like.device)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator, device=_draw_device(generator, device)).to(device)


def _randint(high: int, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.randint(high, shape, generator=generator, device=_draw_device(generator, device)).to(device)


class GenerativeHead(nn.Module):
    """Conditional diffusion head: learns p(teacher feature | student feature) token by token."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        self.cond_norm = nn.LayerNorm(config.cond_dim)
        self.denoiser = Denoiser(config)
        # add_noise moves the scheduler's alphas to the input device once and keeps them there.
        self.train_scheduler = make_scheduler("ddpm", config)
        # Per-dimension target statistics: diffusion works in standardised units (like a latent scale factor), since
        # contracted teacher features are ~0.1 in scale next to unit noise. Identity until set_target_stats.
        self.register_buffer("target_mean", torch.zeros(config.feature_dim))
        self.register_buffer("target_std", torch.ones(config.feature_dim))
        if config.learn_sigma:  # the bound's tables per timestep; derived, so not saved with the weights
            for name, table in _posterior_tables(self.train_scheduler.alphas_cumprod).items():
                self.register_buffer(name, table, persistent=False)

    def set_target_stats(self, mean: Tensor, std: Tensor) -> None:
        """Standardise training targets with these per-dimension statistics (and undo it when sampling)."""
        self.target_mean.copy_(mean)
        self.target_std.copy_(std.clamp_min(1e-6))

    def condition(self, h: Tensor) -> Tensor:
        """Condition z (B, D_S) from the student feature h (B, D_S)."""
        return self.cond_norm(h)

    def _check_dims(self, z: Tensor, target: Tensor | None = None) -> None:
        cfg = self.config
        if z.ndim != 2 or z.shape[1] != cfg.cond_dim:
            raise GenddError(f"condition has shape {tuple(z.shape)} but the head expects (B, {cfg.cond_dim})")
        if target is not None and (target.ndim != 2 or target.shape[1] != cfg.feature_dim):
            raise GenddError(f"target has shape {tuple(target.shape)} but the head expects (B, {cfg.feature_dim})")

    def _draw_timesteps(
        self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
    ) -> Tensor:
        steps, power = self.config.num_train_steps, self.config.timestep_power
        if power == 1.0:
            return _randint(steps, shape, generator, device)
        # u ** power with power < 1 moves mass towards u = 1 (high noise); floor keeps t in [0, steps - 1].
        return (_rand(shape, generator, device) ** power * steps).long().clamp_max(steps - 1)

    def forward(self, target: Tensor, z: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Diffusion loss (MSE on noise, velocity or x0) of teacher features (B, D_T) given conditions z (B, D_S)."""
        self._check_dims(z, target)
        cfg = self.config
        target = (target - self.target_mean) / self.target_std
        x0 = tokenize(target, cfg.token_dim).repeat(cfg.diffusion_batch_mul, 1, 1)  # (N, T, k), N = mul * B
        n, t_len, _ = x0.shape
        z = z.repeat(cfg.diffusion_batch_mul, 1)[:, None, :].expand(n, t_len, -1)  # (N, T, D_S)
        # Every (sample, token, repeat) row gets its own timestep, noise and condition dropout.
        t = self._draw_timesteps((n, t_len), generator, x0.device)  # (N, T)
        noise = _randn(x0.shape, generator, x0)  # (N, T, k)
        drop = _rand((n, t_len, 1), generator, x0.device) < cfg.cond_dropout  # (N, T, 1)
        z = torch.where(drop, torch.zeros_like(z), z)  # z = 0 is the unconditional branch
        # add_noise wants one timestep per leading row, so noise the (N * T, k) view.
        flat = (x0.flatten(0, 1), noise.flatten(0, 1), t.flatten())
        x_t = self.train_scheduler.add_noise(*flat).view_as(x0)
        if cfg.prediction == "epsilon":
            wanted = noise
        elif cfg.prediction == "sample":
            wanted = x0
        else:
            wanted = self.train_scheduler.get_velocity(*flat).view_as(x0)
        out = self.denoiser(x_t, t, z)
        if not cfg.learn_sigma:
            return F.mse_loss(out, wanted)
        pred, frac = out.chunk(2, dim=-1)
        # As in improved DDPM: the bound trains the variance only (the mean's estimate is detached), beside the MSE.
        return F.mse_loss(pred, wanted) + self._variational_bound(pred.detach(), frac, x0, x_t, t).mean()

    def _x0_estimate(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        sqrt_a = self.sqrt_alpha_bar[t][..., None]
        sqrt_1ma = self.sqrt_one_minus_alpha_bar[t][..., None]
        if self.config.prediction == "epsilon":
            return (x_t - sqrt_1ma * pred) / sqrt_a
        if self.config.prediction == "sample":
            return pred
        return sqrt_a * x_t - sqrt_1ma * pred  # v-prediction

    def _variational_bound(self, pred: Tensor, frac: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Per-element bound term in bits: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0, the decoder's
        negative log-likelihood at t = 0 (a continuous Gaussian: features are not 8-bit pixels)."""
        c1, c2 = self.posterior_coef_x0[t][..., None], self.posterior_coef_xt[t][..., None]
        true_mean = c1 * x0 + c2 * x_t
        model_mean = c1 * self._x0_estimate(pred, x_t, t) + c2 * x_t
        true_log_var = self.posterior_log_var[t][..., None]
        weight = (frac + 1) / 2  # [-1, 1] -> [0, 1]: log variance between the posterior's and beta_t's
        model_log_var = weight * self.log_beta[t][..., None] + (1 - weight) * true_log_var
        kl = 0.5 * (
            -1.0
            + model_log_var
            - true_log_var
            + torch.exp(true_log_var - model_log_var)
            + (true_mean - model_mean) ** 2 * torch.exp(-model_log_var)
        )
        nll = 0.5 * (math.log(2 * math.pi) + model_log_var + (x0 - model_mean) ** 2 * torch.exp(-model_log_var))
        return torch.where((t == 0)[..., None], nll, kl) / math.log(2.0)

    def _guided_eps(self, x: Tensor, t: Tensor, z: Tensor, cfg_scale: float) -> Tensor:
        # With guidance, z holds the conditional rows followed by as many z = 0 rows: one batched call. A learned
        # variance is taken from the conditional rows; guidance mixes the prediction only.
        if cfg_scale == 1.0:
            return self.denoiser(x, t, z)
        out_cond, out_uncond = self.denoiser(torch.cat([x, x]), t, z).chunk(2)
        k = self.config.token_dim
        guided = out_uncond[..., :k] + cfg_scale * (out_cond[..., :k] - out_uncond[..., :k])
        return torch.cat([guided, out_cond[..., k:]], dim=-1)

    @torch.no_grad()
    def sample(
        self,
        z: Tensor,
        *,
        n_samples: int = 5,
        cfg_scale: float = 2.0,
        sampler: str = "ddim",
        steps: int = 25,
        generator: torch.Generator | None = None,
        spacing: str = "leading",
    ) -> Tensor:
        """Mean of n_samples generated teacher features (B, D_T) per condition z (B, D_S)."""
        self._check_dims(z)
        if n_samples < 1 or steps < 1:
            raise GenddError(f"n_samples and steps must be positive, got {n_samples} and {steps}")
        cfg = self.config
        scheduler = make_scheduler(sampler, cfg, spacing)  # stateful (multistep history), so one per call
        scheduler.set_timesteps(steps, device=z.device)
        b = z.shape[0]
        z_rows = z.repeat(n_samples, 1)[:, None, :]  # (n * B, 1, D_S)
        if cfg_scale != 1.0:  # at scale 1 the unconditional pass cancels out, so skip it
            z_rows = torch.cat([z_rows, torch.zeros_like(z_rows)])  # (2 * n * B, 1, D_S)
        x = _randn((n_samples * b, cfg.num_tokens, cfg.token_dim), generator, z) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            eps = self._guided_eps(x_in, t, z_rows, cfg_scale)
            if cfg.learn_sigma and sampler != "ddpm":  # deterministic samplers read the prediction only
                eps = eps[..., : cfg.token_dim]
            # (rows, channels) for the scheduler: diffusers splits a learned variance off along dim 1.
            x = scheduler.step(eps.flatten(0, 1), t, x.flatten(0, 1), generator=generator).prev_sample.view_as(x)
        mean = untokenize(x.reshape(n_samples, b, cfg.num_tokens, cfg.token_dim).mean(dim=0))  # (B, D_T)
        return mean * self.target_std + self.target_mean
