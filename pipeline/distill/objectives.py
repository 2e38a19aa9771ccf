"""GenDD's objectives: Distribution Contraction, feature mixup and the diffusion loss of the head, for `gendd` and
`gendd_unsup`; the head and the target statistics the training loop asks for (MethodSpec.module)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config import HeadSettings, ObjectiveConfig, TrainConfig
from pipeline.distill.head import GenerativeHead, HeadConfig
from pipeline.errors import GenddError
from pipeline.train.input import TrainInput
from pipeline.train.losses import Loss, ObjectiveInputs, _label_ce, _require, kl_loss, teacher_log_probs


def contract_targets(features: Tensor, labels: Tensor | None, centres: Tensor | None, lam: float) -> Tensor:
    """Pull teacher features (B, D) towards class centres (C, D): (1 - lam) * f + lam * W[label] (or q @ W)."""
    if lam == 0:
        return features
    if labels is None or centres is None:
        raise GenddError(f"contraction {lam} needs labels and class centres; pass both or set contraction to 0")
    # Soft labels q (B, C) give the expected centre q @ W; hard labels pick W[label]. Both (B, D).
    anchor = labels.to(centres.dtype) @ centres if labels.is_floating_point() else centres[labels]
    return (1 - lam) * features + lam * anchor


def _beta_draw(beta: float, generator: torch.Generator | None) -> float:
    # torch's Beta sampler takes no generator; seed numpy from the torch RNG so the draw stays reproducible.
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device if generator else "cpu"))
    return float(np.random.default_rng(seed).beta(beta, beta))


def feature_mixup(z: Tensor, y: Tensor, beta: float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Mix conditions z (B, D_S) and targets y (B, D_T) with one m ~ Beta(beta, beta) and one shared permutation."""
    if beta <= 0:
        return z, y
    m = _beta_draw(beta, generator)
    draw_device = generator.device if generator is not None else z.device
    perm = torch.randperm(z.shape[0], generator=generator, device=draw_device).to(z.device)
    return m * z + (1 - m) * z[perm], m * y + (1 - m) * y[perm]


def soft_anchor_labels(labels: Tensor, teacher_logits: Tensor, alpha: float, num_classes: int | None = None) -> Tensor:
    """Soft labels (B, C) of the official ImageNet anchor: alpha * onehot(y) + (1 - alpha) * softmax(teacher logits)
    (logits of several teachers side by side, (B, T*C): the mean of their probabilities)."""
    num_classes = num_classes or teacher_logits.shape[-1]
    onehot = F.one_hot(labels, num_classes).to(teacher_logits.dtype)
    if teacher_logits.shape[-1] == num_classes:
        return alpha * onehot + (1 - alpha) * teacher_logits.softmax(dim=-1)
    return alpha * onehot + (1 - alpha) * teacher_log_probs(teacher_logits, num_classes).exp()


def _generative_loss(
    cfg: ObjectiveConfig,
    feats: Tensor,
    head: GenerativeHead,
    teacher_features: Tensor,
    labels: Tensor | None,
    centres: Tensor | None,
    generator: torch.Generator | None,
    teacher_logits: Tensor | None = None,
) -> Tensor:
    z = head.condition(feats)  # (B, D_S)
    if labels is not None and cfg.soft_anchor < 1:
        _require(f"{cfg.method} with soft_anchor {cfg.soft_anchor}", teacher_logits=teacher_logits)
        classes = centres.shape[0] if centres is not None else None
        labels = soft_anchor_labels(labels, teacher_logits, cfg.soft_anchor, classes)
    y = contract_targets(teacher_features, labels, centres, cfg.contraction)  # (B, D_T)
    z, y = feature_mixup(z, y, cfg.mixup_beta, generator)
    return head(y, z, generator=generator)


def _gendd(cfg: ObjectiveConfig, x: ObjectiveInputs) -> tuple[Tensor, dict[str, Tensor]]:
    _require(cfg.method, head=x.head, teacher_features=x.teacher_features, labels=x.labels)
    diffusion = _generative_loss(
        cfg, x.feats, x.head, x.teacher_features, x.labels, x.centres, x.generator, x.teacher_logits
    )
    probe = _label_ce(cfg, x.classifier(x.feats.detach()), x.labels, x.log_prior)  # never trains the backbone
    loss = diffusion + probe
    return loss, {"loss": loss.detach(), "diffusion": diffusion.detach(), "probe_ce": probe.detach()}


def _gendd_unsup(cfg: ObjectiveConfig, x: ObjectiveInputs) -> tuple[Tensor, dict[str, Tensor]]:
    # The backbone learns from the diffusion loss alone, on uncontracted teacher features. A label-free probe (KL to
    # the cached teacher logits, on the detached feature) makes the student usable without sampling; like the
    # supervised probe it sends no gradient into the backbone.
    _require(cfg.method, head=x.head, teacher_features=x.teacher_features)
    diffusion = _generative_loss(cfg, x.feats, x.head, x.teacher_features, None, None, x.generator)
    if x.teacher_logits is None:
        return diffusion, {"loss": diffusion.detach(), "diffusion": diffusion.detach()}
    probe = kl_loss(x.classifier(x.feats.detach()), x.teacher_logits)
    loss = diffusion + probe
    return loss, {"loss": loss.detach(), "diffusion": diffusion.detach(), "probe_kl": probe.detach()}


def target_stats(cfg: TrainConfig, data: TrainInput) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean/std of the contracted targets over every cached (sample, view) of the chunks that
    `feature_chunks` yields (all of them for small caches), accumulated in float64 one chunk at a time."""
    total = sq = None
    rows = 0
    uses_labels = cfg.objective.contraction > 0  # never for an unsupervised method (ObjectiveConfig)
    for feats, labels in data.feature_chunks():
        n, k, d = feats.shape
        y = torch.from_numpy(labels).long().repeat_interleave(k) if uses_labels else None
        targets = contract_targets(
            torch.from_numpy(feats).reshape(n * k, d).float(), y, data.info.head_weight, cfg.objective.contraction
        ).double()
        total = targets.sum(0) if total is None else total + targets.sum(0)
        sq = (targets**2).sum(0) if sq is None else sq + (targets**2).sum(0)
        rows += n * k
    if total is None:
        raise GenddError("the feature cache holds no samples to standardise the targets with; re-run gendd extract")
    mean = total / rows
    std = ((sq - rows * mean**2).clamp_min(0) / max(rows - 1, 1)).sqrt().float()
    return mean.float(), std.clamp_min(0.1 * float(std.median()))  # floor: near-dead dims would blow up


# The losses of the methods whose MethodSpec.module is this module (the others: pipeline/train/losses.py).
LOSSES: dict[str, Loss] = {"gendd": _gendd, "gendd_unsup": _gendd_unsup}


def build_head(settings: HeadSettings, feature_dim: int, cond_dim: int, stats: tuple | None) -> GenerativeHead:
    """The generative head for teacher features of `feature_dim`, conditioned on student features of `cond_dim`
    (`stats`: the targets' mean/std from target_stats, used when `settings.target_norm`)."""
    head = GenerativeHead(
        HeadConfig(
            feature_dim=feature_dim,
            cond_dim=cond_dim,
            token_dim=settings.token_dim,
            width=settings.width,
            depth=settings.depth,
            diffusion_batch_mul=settings.diffusion_batch_mul,
            cond_dropout=settings.cond_dropout,
            prediction=settings.prediction,
            timestep_power=settings.timestep_power,
            learn_sigma=settings.learn_sigma,
        )
    )
    if settings.target_norm and stats is not None:
        head.set_target_stats(*stats)
    return head
