"""The student: a timm network, plus the generative head and warm-start projection its method needs; its parameter
groups and the targets each batch hands the loss."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import METHOD_SPECS, ObjectiveConfig, TrainConfig
from pipeline.errors import GenddError
from pipeline.models import create_model, feature_dim, features
from pipeline.train.input import InputInfo
from pipeline.train.losses import class_log_prior, compute_objective, kl_loss, method_module, warmstart_loss


class Student(nn.Module):
    """A timm network (its own classifier is the linear probe), plus the generative head and warm-start projection."""

    def __init__(
        self,
        net: nn.Module,
        head: nn.Module | None,
        proj: nn.Module | None,
        log_prior: torch.Tensor | None = None,
        probe_on_condition: bool = False,
    ) -> None:
        super().__init__()
        self.net, self.head, self.proj = net, head, proj
        # GenDD's probe may read the head's normalised condition z instead of the raw feature (HeadSettings).
        self.probe_on_condition = probe_on_condition and head is not None
        self.log_prior: torch.Tensor | None
        # Training-label class prior for logit adjustment; a buffer so it follows the model to its device.
        self.register_buffer("log_prior", log_prior, persistent=log_prior is not None)

    def probe(self, feats: torch.Tensor) -> torch.Tensor:
        """Logits of the student's own classifier on features (B, D_S): the raw feature, or the detached condition."""
        if self.probe_on_condition:
            return self.net.get_classifier()(self.head.condition(feats).detach())
        return self.net.get_classifier()(feats)

    def forward(
        self, x: torch.Tensor, batch: dict, objective: ObjectiveConfig, warm: bool
    ) -> tuple[torch.Tensor, dict]:
        """Loss of one batch; everything runs inside forward so DDP sees every parameter it trains."""
        feats = features(self.net, x)  # (B, D_S)
        if warm:
            if "labels" in batch:
                loss = warmstart_loss(feats, self.proj, batch["head_weight"], batch["head_bias"], batch["labels"])
            else:  # unlabeled data: match the teacher's softmax through its frozen head instead of labels
                logits = self.proj(feats) @ batch["head_weight"].T + batch["head_bias"]
                loss = kl_loss(logits, batch["teacher_logits"])
            return loss, {"loss": loss.detach(), "warmstart": loss.detach()}
        return compute_objective(
            objective,
            feats=feats,
            classifier=self.probe,
            head=self.head,
            teacher_features=batch.get("teacher_features"),
            teacher_logits=batch.get("teacher_logits"),
            labels=batch.get("labels"),
            centres=batch.get("head_weight"),
            log_prior=self.log_prior,
        )


def build_student(cfg: TrainConfig, info: InputInfo, input_size: int, stats: tuple | None = None) -> Student:
    """The student network with the modules its method needs (`stats`: the targets' mean/std, see target_stats)."""
    net = create_model(cfg.model, info.num_classes, info.channels, cfg.small_stem)
    d_s = feature_dim(net, info.channels, input_size)
    head = proj = None
    method = cfg.objective.method
    if cfg.objective.spec.uses_head:
        if info.feature_dim is None:
            raise GenddError(f"method {method} (or a warm start) needs a teacher feature cache: pass --cache")
        head = method_module(method).build_head(cfg.head, info.feature_dim, d_s, stats)
        if cfg.warmstart_epochs:
            proj = nn.Linear(d_s, info.feature_dim)  # stage 1: student feature -> teacher feature space -> its head
    log_prior = class_log_prior(info.labels, info.num_classes) if cfg.objective.logit_adjust else None
    return Student(net, head, proj, log_prior, cfg.head.probe_on_condition)


def check_data_serves(cfg: TrainConfig, info: InputInfo) -> None:
    """Refuse, in one line, a data/cache combination the method cannot use."""
    method, spec = cfg.objective.method, cfg.objective.spec
    if spec.supervised and not info.labeled:
        label_free = " or ".join(name for name, other in METHOD_SPECS.items() if not other.supervised)
        raise GenddError(f"method {method} needs labels but the data has none; use {label_free}")
    if spec.uses_cache and info.feature_dim is None:
        raise GenddError(f"method {method} needs the teacher feature cache: pass --cache (run gendd extract)")
    if info.teachers > 1 and cfg.warmstart_epochs:
        raise GenddError("a warm start maps into one teacher's head: set --warmstart-epochs 0 with several caches")
    if info.teachers > 1 and spec.uses_head and (odd := [d for d in info.teacher_dims if d % cfg.head.token_dim]):
        raise GenddError(
            f"token_dim {cfg.head.token_dim} does not divide teacher feature size {odd[0]} (sizes "
            f"{', '.join(map(str, info.teacher_dims))}): a token must not span two teachers; pick a common divisor"
        )
    if cfg.objective.logit_adjust and not spec.supervised:
        raise GenddError(f"logit_adjust shifts the label cross-entropy, which {method} has none of; set it to 0")


def param_groups(model: Student, weight_decay: float, head_lr_mult: float = 1.0) -> list[dict]:
    """The usual grouping (decay on backbone weight matrices; none on norms and biases, which the official code
    decays: docs/official_recipe.md), plus a group for the generative head and the detached linear probe: no decay,
    lr x head_lr_mult (they start from scratch and must converge within a short budget; the probe never feeds
    gradient to the backbone)."""
    fast = {id(p) for p in model.head.parameters()} if model.head is not None else set()
    if model.head is not None:
        fast |= {id(p) for p in model.net.get_classifier().parameters()}
    groups = {"decay": [], "no_decay": [], "head": []}
    for param in model.parameters():
        if param.requires_grad:
            groups["head" if id(param) in fast else "decay" if param.ndim > 1 else "no_decay"].append(param)
    return [
        {"params": groups["decay"], "weight_decay": weight_decay, "lr_mult": 1.0},
        {"params": groups["no_decay"], "weight_decay": 0.0, "lr_mult": 1.0},
        {"params": groups["head"], "weight_decay": 0.0, "lr_mult": head_lr_mult},
    ]


def batch_targets(
    batch: dict[str, torch.Tensor], info: InputInfo, device: torch.device, use_labels: bool
) -> dict[str, torch.Tensor]:
    """What the objective reads, on the device: labels (when `use_labels`), the teacher's outputs as float32."""
    out = {"head_weight": info.head_weight, "head_bias": info.head_bias}
    if use_labels:
        out["labels"] = batch["labels"]
    if "teacher_features" in batch:  # float16 up to here: half the bytes through the loader and the copy
        out["teacher_features"] = batch["teacher_features"].to(device, non_blocking=True).float()
        out["teacher_logits"] = batch["teacher_logits"].to(device, non_blocking=True).float()
    return {k: v.to(device, non_blocking=True) for k, v in out.items() if v is not None}
