"""Evaluation: top-1/top-5 through the probe (the student's own classifier) and the generative path."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.models import features
from pipeline.views import IDENTITY, apply_views


@dataclass(frozen=True)
class SamplingConfig:
    """How the generative path draws teacher features: sampler, steps, guidance scale, samples averaged."""

    sampler: str = "ddim"
    steps: int = 25
    cfg_scale: float = 2.0
    n_samples: int = 5
    seed: int = 0


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Percentage of rows whose label is among the k largest logits."""
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return float(hits.float().mean() * 100)


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    """Top-1 per class (percent), NaN for classes absent from `labels`."""
    correct = (logits.argmax(1) == labels).float()
    return [
        float(correct[labels == c].mean() * 100) if (labels == c).any() else float("nan") for c in range(num_classes)
    ]


@torch.no_grad()
def predict(
    student: nn.Module,
    images: torch.Tensor,
    input_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    device: torch.device,
    batch_size: int = 256,
    sampling: SamplingConfig | None = None,
    teacher_head: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Probe logits of the plain images and, when `sampling` is set, generative-path logits (teacher head applied to
    the averaged generated teacher features)."""
    student = student.to(device).eval()
    generator = torch.Generator(device).manual_seed(sampling.seed) if sampling else None
    probe, generated = [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size].to(device)
        views = torch.tensor([IDENTITY], device=device).expand(len(chunk), 5)
        feats = features(student.net, apply_views(chunk, views, input_size, mean, std))  # (B, D_S)
        probe.append(student.net.get_classifier()(feats).float().cpu())
        if sampling is not None and student.head is not None and teacher_head is not None:
            z = student.head.condition(feats)
            f_t = student.head.sample(
                z,
                n_samples=sampling.n_samples,
                cfg_scale=sampling.cfg_scale,
                sampler=sampling.sampler,
                steps=sampling.steps,
                generator=generator,
            )
            weight, bias = (t.to(device) for t in teacher_head)
            generated.append((f_t @ weight.T + bias).float().cpu())
    out = {"probe": torch.cat(probe)}
    if generated:
        out["generative"] = torch.cat(generated)
    return out


def summarise(logits: dict[str, torch.Tensor], labels: torch.Tensor, num_classes: int) -> dict:
    """Metrics of every path: top-1, top-5 and per-class top-1."""
    metrics: dict = {}
    for path, values in logits.items():
        metrics[f"{path}_top1"] = topk_accuracy(values, labels, 1)
        metrics[f"{path}_top5"] = topk_accuracy(values, labels, 5)
        metrics[f"{path}_per_class"] = per_class_accuracy(values, labels, num_classes)
    return metrics


def write_metrics(metrics: dict, path: str | Path, sampling: SamplingConfig | None) -> None:
    """Metrics JSON (DVC reads scalars from it); per-class lists stay in it for the report."""
    record = {**metrics, **({"sampling": asdict(sampling)} if sampling else {})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=1))
