"""Training objectives: the loss of every method (LOSSES), keyed like pipeline/config.py's METHOD_SPECS."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import ObjectiveConfig
from pipeline.errors import GenddError
from pipeline.head import GenerativeHead


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


def _softened_kl(student_logits: Tensor, teacher_logits: Tensor, tau: float) -> Tensor:
    # KL(softmax(t / tau) || softmax(s / tau)) per sample, averaged over the batch; tau^2 keeps the gradient
    # scale independent of tau (Hinton et al.).
    log_p_s = F.log_softmax(student_logits / tau, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / tau, dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * tau**2


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, alpha: float, tau: float) -> Tensor:
    """Hinton KD: CE(labels) + alpha * tau^2 * KL(teacher || student) at temperature tau."""
    return F.cross_entropy(student_logits, labels) + alpha * _softened_kl(student_logits, teacher_logits, tau)


def kl_loss(student_logits: Tensor, teacher_logits: Tensor, tau: float = 1.0) -> Tensor:
    """Unsupervised distillation: tau^2 * KL(teacher softmax || student softmax), no labels."""
    return _softened_kl(student_logits, teacher_logits, tau)


def warmstart_loss(feats: Tensor, proj: nn.Module, head_weight: Tensor, head_bias: Tensor, labels: Tensor) -> Tensor:
    """Stage-1 warm start: CE of the frozen teacher classifier applied to proj(feats)."""
    logits = F.linear(proj(feats), head_weight.detach(), head_bias.detach())  # (B, C); the teacher stays frozen
    return F.cross_entropy(logits, labels)


def _require(method: str, **inputs: object) -> None:
    missing = [name for name, value in inputs.items() if value is None]
    if missing:
        raise GenddError(f"method {method!r} needs {', '.join(inputs)}, but {', '.join(missing)} was not given")


def soft_anchor_labels(labels: Tensor, teacher_logits: Tensor, alpha: float) -> Tensor:
    """Soft labels (B, C) of the official ImageNet anchor: alpha * onehot(y) + (1 - alpha) * softmax(teacher logits)."""
    onehot = F.one_hot(labels, teacher_logits.shape[1]).to(teacher_logits.dtype)
    return alpha * onehot + (1 - alpha) * teacher_logits.softmax(dim=-1)


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
        labels = soft_anchor_labels(labels, teacher_logits, cfg.soft_anchor)
    y = contract_targets(teacher_features, labels, centres, cfg.contraction)  # (B, D_T)
    z, y = feature_mixup(z, y, cfg.mixup_beta, generator)
    return head(y, z, generator=generator)


def class_log_prior(labels: Tensor, num_classes: int) -> Tensor:
    """log of the training class frequencies (C,), for logit adjustment; unseen classes count as one sample."""
    counts = torch.bincount(labels[labels >= 0], minlength=num_classes).clamp_min(1).float()
    return (counts / counts.sum()).log()


def _label_ce(cfg: ObjectiveConfig, logits: Tensor, labels: Tensor, log_prior: Tensor | None) -> Tensor:
    if cfg.logit_adjust == 0:
        return F.cross_entropy(logits, labels)
    if log_prior is None:
        raise GenddError("logit_adjust needs the class prior of the training labels; none was given")
    return F.cross_entropy(logits + cfg.logit_adjust * log_prior, labels)


@dataclass(frozen=True)
class ObjectiveInputs:
    """What a loss may read: student features (B, D_S), its classifier (the probe: features -> logits), the head, the
    batch's targets."""

    feats: Tensor
    classifier: Callable[[Tensor], Tensor]
    head: GenerativeHead | None
    teacher_features: Tensor | None
    teacher_logits: Tensor | None
    labels: Tensor | None
    centres: Tensor | None
    generator: torch.Generator | None
    log_prior: Tensor | None


Loss = Callable[[ObjectiveConfig, ObjectiveInputs], tuple[Tensor, dict[str, Tensor]]]


def _ce(cfg: ObjectiveConfig, x: ObjectiveInputs) -> tuple[Tensor, dict[str, Tensor]]:
    _require(cfg.method, labels=x.labels)
    loss = _label_ce(cfg, x.classifier(x.feats), x.labels, x.log_prior)
    return loss, {"loss": loss.detach(), "ce": loss.detach()}


def _kd(cfg: ObjectiveConfig, x: ObjectiveInputs) -> tuple[Tensor, dict[str, Tensor]]:
    _require(cfg.method, labels=x.labels, teacher_logits=x.teacher_logits)
    logits = x.classifier(x.feats)
    ce = _label_ce(cfg, logits, x.labels, x.log_prior)
    kl = _softened_kl(logits, x.teacher_logits, cfg.kd_tau)
    loss = ce + cfg.kd_alpha * kl
    return loss, {"loss": loss.detach(), "ce": ce.detach(), "kl": kl.detach()}


def _kl(cfg: ObjectiveConfig, x: ObjectiveInputs) -> tuple[Tensor, dict[str, Tensor]]:
    _require(cfg.method, teacher_logits=x.teacher_logits)
    loss = kl_loss(x.classifier(x.feats), x.teacher_logits)
    return loss, {"loss": loss.detach(), "kl": loss.detach()}


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


# The loss of every method of pipeline/config.py's METHOD_SPECS (what each reads and trains), by the same name.
LOSSES: dict[str, Loss] = {"ce": _ce, "kd": _kd, "kl": _kl, "gendd": _gendd, "gendd_unsup": _gendd_unsup}


def compute_objective(
    cfg: ObjectiveConfig,
    *,
    feats: Tensor,
    classifier: Callable[[Tensor], Tensor],
    head: GenerativeHead | None,
    teacher_features: Tensor | None,
    teacher_logits: Tensor | None,
    labels: Tensor | None,
    centres: Tensor | None,
    generator: torch.Generator | None = None,
    log_prior: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss of cfg.method on student features (B, D_S) and detached scalars to log (no host sync per step)."""
    inputs = ObjectiveInputs(
        feats=feats,
        classifier=classifier,
        head=head,
        teacher_features=teacher_features,
        teacher_logits=teacher_logits,
        labels=labels,
        centres=centres,
        generator=generator,
        log_prior=log_prior,
    )
    return LOSSES[cfg.method](cfg, inputs)
