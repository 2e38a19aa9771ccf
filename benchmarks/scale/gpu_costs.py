"""Per-sample device costs of a real ImageNet run, for the projection in docs/scale.md.

    python benchmarks/scale/gpu_costs.py --out DIR                  # on a GPU host: ImageNet sizes
    python benchmarks/scale/gpu_costs.py --out DIR --tiny           # a CPU smoke run: tiny sizes

On synthetic uint8 images (pixels do not change the cost), with the pipeline's own code paths: extraction's teacher
forward on one view (apply_views crop + resize, then features and logits, bf16 autocast), and one optimiser step of
a student trained from cached teacher outputs: `kd`, `gendd` with the shipped head, and `gendd` with the paper's
head (width 1024, 10 noise draws per token). Writes gpu_costs_<machine>.json: images per second for each.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.config import HeadSettings, ObjectiveConfig, TrainConfig
from pipeline.data.views import apply_views
from pipeline.models import create_model, features
from pipeline.train.input import InputInfo
from pipeline.train.student import batch_targets, build_student

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def rate(step, batch: int, seconds: float, device: torch.device) -> float:
    """Images per second of `step()` (after 3 warm-up calls), timed for about `seconds`."""
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        calls += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return calls * batch / (time.perf_counter() - started)


def views(batch: int, device: torch.device) -> torch.Tensor:
    """Random-resized-crop-like boxes (x0, y0, x1, y1 normalised, flip)."""
    v = torch.rand(batch, 5, device=device)
    v[:, :2] *= 0.3
    v[:, 2:4] = v[:, :2] + 0.5 + 0.2 * v[:, 2:4]
    v[:, 4] = (v[:, 4] > 0.5).float()
    return v


def teacher_rate(name: str, size: int, stored: int, batch: int, seconds: float, device: torch.device) -> float:
    net = create_model(name, 1000, 3, small_stem=False).to(device).eval().to(memory_format=torch.channels_last)
    pixels = torch.randint(0, 256, (batch, 3, stored, stored), dtype=torch.uint8, device=device)
    box = views(batch, device)

    @torch.no_grad()
    def step() -> None:
        x = apply_views(pixels, box, size, MEAN, STD).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            feats = features(net, x)
            net.get_classifier()(feats)

    return rate(step, batch, seconds, device)


def student_rate(
    method: str, head: HeadSettings, dims: tuple[int, int], size: int, stored: int, batch: int, seconds: float, device
) -> float:
    d_t, classes = dims
    cfg = TrainConfig(
        model="resnet18", small_stem=False, objective=ObjectiveConfig(method=method), head=head, mixed_precision="bf16"
    )
    info = InputInfo(
        n=batch,
        channels=3,
        image_size=stored,
        mean=MEAN,
        std=STD,
        num_classes=classes,
        labels=torch.zeros(batch, dtype=torch.int64),
        num_views=1,
        feature_dim=d_t,
        head_weight=torch.randn(classes, d_t) * 0.02,
        head_bias=torch.zeros(classes),
    )
    model = build_student(cfg, info, size).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cpu_batch = {
        "labels": torch.randint(0, classes, (batch,)),
        "teacher_features": torch.rand(batch, d_t).half(),
        "teacher_logits": torch.randn(batch, classes).half(),
    }
    targets = batch_targets(cpu_batch, info, device, use_labels=True)
    pixels = torch.randint(0, 256, (batch, 3, stored, stored), dtype=torch.uint8, device=device)
    box = views(batch, device)

    def step() -> None:
        x = apply_views(pixels, box, size, MEAN, STD).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = model(x, targets, cfg.objective, False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return rate(step, batch, seconds, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (a CPU smoke run)")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per figure")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    size, stored, batch = (32, 36, 4) if args.tiny else (224, 256, 256)
    seconds = 0.5 if args.tiny else args.seconds
    dims = (2048, 1000)  # resnet50's feature size, ImageNet's classes
    paper = replace(HeadSettings(), width=1024, diffusion_batch_mul=10)
    result = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "image_size": size,
        "stored_size": stored,
        "batch": batch,
        "precision": "bf16 autocast",
        "images_per_s": {},
    }
    figures = result["images_per_s"]
    figures["teacher_resnet50_forward"] = teacher_rate("resnet50", size, stored, batch, seconds, device)
    print(json.dumps(figures), flush=True)
    figures["student_resnet18_kd_step"] = student_rate("kd", HeadSettings(), dims, size, stored, batch, seconds, device)
    print(json.dumps(figures), flush=True)
    figures["student_resnet18_gendd_step"] = student_rate(
        "gendd", HeadSettings(), dims, size, stored, batch, seconds, device
    )
    print(json.dumps(figures), flush=True)
    figures["student_resnet18_gendd_paper_head_step"] = student_rate(
        "gendd", paper, dims, size, stored, batch, seconds, device
    )
    print(json.dumps(figures), flush=True)
    machine = "cpu" if device.type == "cpu" else result["device"].lower().split()[1]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gpu_costs_{machine}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
