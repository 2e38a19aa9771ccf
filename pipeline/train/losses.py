"""Training objectives: the loss of every method (LOSSES), keyed like pipeline/config.py's METHOD_SPECS."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import METHOD_SPECS, ObjectiveConfig
from pipeline.errors import GenddError


def teacher_log_probs(teacher_logits: Tensor, num_classes: int, tau: float = 1.0) -> Tensor:
    """log softmax(t / tau) (B, C) of one teacher's logits, or of T teachers' logits side by side (B, T*C, as a
    TeacherEnsemble serves them): the log of the mean of their probabilities, each teacher at temperature tau."""
    width = teacher_logits.shape[-1]
    if width == num_classes:
        return F.log_softmax(teacher_logits / tau, dim=-1)
    if width % num_classes:
        raise GenddError(f"teacher logits have {width} values per sample, not a multiple of the {num_classes} classes")
    log_p = F.log_softmax(teacher_logits.unflatten(-1, (width // num_classes, num_classes)) / tau, dim=-1)
    return torch.logsumexp(log_p, dim=-2) - math.log(width // num_classes)


def _softened_kl(student_logits: Tensor, teacher_logits: Tensor, tau: float) -> Tensor:
    # KL(softmax(t / tau) || softmax(s / tau)) per sample, averaged over the batch; tau^2 keeps the gradient
    # scale independent of tau (Hinton et al.). Several teachers: their mean probability is the target.
    log_p_s = F.log_softmax(student_logits / tau, dim=-1)
    log_p_t = teacher_log_probs(teacher_logits, student_logits.shape[-1], tau)
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
    head: nn.Module | None
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


# The losses of the methods whose MethodSpec.module is this one (GenDD's are in pipeline/distill/objectives.py).
LOSSES: dict[str, Loss] = {"ce": _ce, "kd": _kd, "kl": _kl}


def method_module(method: str) -> ModuleType:
    """The module with `method`'s loss (and, for a method with a head, `build_head` and `target_stats`), imported
    now: code only one method needs is loaded when that method runs."""
    return importlib.import_module(METHOD_SPECS[method].module)


def compute_objective(
    cfg: ObjectiveConfig,
    *,
    feats: Tensor,
    classifier: Callable[[Tensor], Tensor],
    head: nn.Module | None,
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
    return method_module(cfg.method).LOSSES[cfg.method](cfg, inputs)
