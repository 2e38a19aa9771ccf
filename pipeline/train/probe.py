"""The per-epoch val check of a training run: top-1 of the student's own classifier (the probe) on the val split."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pipeline.config import DataOptions
from pipeline.data.views import IDENTITY, apply_views
from pipeline.models import features


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Percentage of rows whose label is among the k largest logits."""
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return float(hits.float().mean() * 100)


def identity_features(
    student: nn.Module, images: torch.Tensor, input_size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """Frozen student features (B, D_S) of uint8 images (B, C, H, W) through the identity view (no augmentation)."""
    views = torch.tensor([IDENTITY], device=images.device).expand(len(images), 5)
    return features(student.net, apply_views(images, views, input_size, mean, std))


class Tally:
    """Running top-1/top-5 and per-class hits of one prediction path: evaluation memory does not grow with N."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes, self.n, self.top1, self.top5 = num_classes, 0, 0, 0
        self.class_hits = torch.zeros(num_classes, dtype=torch.int64)
        self.class_total = torch.zeros(num_classes, dtype=torch.int64)

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Count one batch."""
        logits, labels = logits.float().cpu(), labels.cpu().long()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit1 = top[:, 0] == labels
        self.n += len(labels)
        self.top1 += int(hit1.sum())
        self.top5 += int((top == labels[:, None]).any(dim=1).sum())
        self.class_total += torch.bincount(labels, minlength=self.num_classes)[: self.num_classes]
        self.class_hits += torch.bincount(labels[hit1], minlength=self.num_classes)[: self.num_classes]

    def summary(self, path: str) -> dict:
        """`<path>_top1`, `<path>_top5` (percent) and `<path>_per_class` (NaN for classes never seen)."""
        per_class = [
            float(h * 100 / t) if t else float("nan") for h, t in zip(self.class_hits, self.class_total, strict=True)
        ]
        n = max(self.n, 1)
        return {
            f"{path}_top1": self.top1 * 100 / n,
            f"{path}_top5": self.top5 * 100 / n,
            f"{path}_per_class": per_class,
        }


@torch.no_grad()
def probe_logits(
    student: nn.Module, images: torch.Tensor, input_size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """Logits of the student's own classifier (the probe) on uint8 images through the identity view, float32."""
    return student.probe(identity_features(student, images, input_size, mean, std)).float()


def val_probe_evaluator(
    shards: str | Path, size: int, mean: tuple, std: tuple, options: DataOptions | None = None
) -> Callable[[nn.Module], dict] | None:
    """A per-epoch check: probe top-1 of a Student on the val split (None when there is no labelled val split); the
    split is held in memory or streamed at every call, as `options.mode` says."""
    from pipeline.data.shards import load_index, load_split

    index = load_index(shards)
    if "val" not in index.splits or not index.labeled:
        return None
    from pipeline.train.input import choose_mode, footprint

    options = options or DataOptions(mode="memory")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mode, line = choose_mode(options.mode, footprint(index, "val", 0, 0, 0), device, "val")
    if options.mode == "auto":
        print(line, flush=True)
    held = load_split(index.split("val")) if mode == "memory" else None
    num_classes = int(index.spec["num_classes"])
    streamed = None
    if held is None:  # made now, before training: its loader workers start while the trainer is still small
        from pipeline.train.stream import stream_eval_batches

        streamed = stream_eval_batches(shards, None, "val", 256, options.workers, device.type == "cuda")[1]

    def evaluate_fn(student: nn.Module) -> dict:
        was_training = student.training
        student = student.to(device).eval()
        tally = Tally(num_classes)
        batches = streamed
        if held is not None:
            batches = (
                {"images": held.images[i : i + 256], "labels": held.labels[i : i + 256]}
                for i in range(0, len(held.labels), 256)
            )
        with torch.no_grad():
            for batch in batches:
                tally.add(probe_logits(student, batch["images"].to(device), size, mean, std), batch["labels"])
        student.train(was_training)
        return {"val_probe_top1": tally.summary("probe")["probe_top1"]}

    return evaluate_fn
