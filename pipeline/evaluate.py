"""Evaluation: top-1/top-5 through the probe (the student's own classifier) and the generative path."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
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


def val_probe_evaluator(shards: Path, size: int, mean: tuple, std: tuple) -> Callable[[nn.Module], dict] | None:
    """A per-epoch check: probe top-1 of a Student on the val split (None when there is no labelled val split)."""
    from pipeline.shards import load_index, load_split

    index = load_index(shards)
    if "val" not in index.splits or not index.labeled:
        return None
    val = load_split(index.split("val"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def evaluate_fn(student: nn.Module) -> dict:
        was_training = student.training
        logits = predict(student, val.images, size, mean, std, device=device)["probe"]
        student.train(was_training)
        return {"val_probe_top1": topk_accuracy(logits, val.labels, 1)}

    return evaluate_fn


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


def _plot_per_class(metrics: dict, class_names: list[str], path: Path) -> None:
    try:  # the plot is a convenience: a host without matplotlib (e.g. the GPU image) still gets the metrics JSON
        import matplotlib
    except ImportError:
        print(f"note: matplotlib is not installed; {path.name} skipped (metrics JSON holds the same numbers)")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [k.removesuffix("_per_class") for k in metrics if k.endswith("_per_class")]
    fig, ax = plt.subplots(figsize=(max(6, len(class_names) * 0.6), 3.2))
    width = 0.8 / max(len(paths), 1)
    for j, name in enumerate(paths):
        values = [v if v is not None else 0.0 for v in metrics[f"{name}_per_class"]]
        ax.bar([i + j * width for i in range(len(values))], values, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(class_names))], class_names, rotation=45, ha="right")
    ax.set_ylabel("top-1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_evaluation(
    shards: Path,
    cache: Path | None,
    student_dir: Path,
    out: Path,
    sampling: SamplingConfig | None,
    *,
    split: str = "val",
    batch_size: int = 256,
    device: str | None = None,
) -> dict:
    """Evaluate an exported student on a split: both paths, the teacher's own accuracy, per-class; write JSON + plot."""
    from pipeline.distill import load_student
    from pipeline.errors import GenddError
    from pipeline.shards import load_index, load_split
    from pipeline.store import open_cache

    index = load_index(shards)
    if not index.labeled:
        raise GenddError(f"{shards} has no labels: accuracy needs a labelled {split} split")
    data = load_split(index.split(split))
    student, card = load_student(student_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher_head, metrics = None, {"method": card["extra"]["method"], "student": card["name"]}
    if cache is not None:
        store = open_cache(cache, split, spec_hash=index.spec_hash)
        teacher_head = (torch.from_numpy(store.head_weight).float(), torch.from_numpy(store.head_bias).float())
        teacher_logits = torch.from_numpy(store.load_all()["logits"][:, 0])
        metrics["teacher_top1"] = topk_accuracy(teacher_logits, data.labels, 1)
        metrics["teacher_top5"] = topk_accuracy(teacher_logits, data.labels, 5)
    use_sampling = sampling if student.head is not None and teacher_head is not None else None
    started = time.perf_counter()
    logits = predict(
        student,
        data.images,
        card["input_size"],
        tuple(card["mean"]),
        tuple(card["std"]),
        device=dev,
        batch_size=batch_size,
        sampling=use_sampling,
        teacher_head=teacher_head,
    )
    metrics["eval_seconds"] = time.perf_counter() - started
    if metrics["method"] == "gendd_unsup" and "probe" not in (card.get("extra") or {}):
        metrics["probe_untrained"] = True  # a student from before the label-free probe: its classifier never trained
    metrics.update(summarise(logits, data.labels, card["num_classes"]))
    if "generative_top1" in metrics:
        metrics["probe_minus_generative"] = metrics["probe_top1"] - metrics["generative_top1"]
    train_json = student_dir / "train.json"
    if train_json.is_file():
        metrics["train_seconds"] = json.loads(train_json.read_text())["train_seconds"]
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(metrics, out / "metrics.json", use_sampling)
    names = list(index.spec.get("class_names") or [str(c) for c in range(card["num_classes"])])
    _plot_per_class(metrics, names, out / "per_class.png")
    return metrics
