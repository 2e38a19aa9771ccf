"""Shared pieces of the benchmarks: options, machine description, timing, result files, tiny data and teachers.

Every benchmark runs as `python benchmarks/bench_<name>.py [options]` and imports this module from its own folder.
Result files are named `<name>_<machine>[_<tag>]`: machine `cpu` where CUDA is absent, else the GPU's short name.
Nothing is downloaded: data is the embedded digits set or synthetic uint8 images, teachers are random-weight timm
models (or trained here on digits).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.data.prepare import prepare_shards
from pipeline.data.shards import ShardIndex
from pipeline.data.specs import load_spec
from pipeline.models import ModelCard, create_model, feature_dim, save_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DIGITS_SPEC = ROOT / "data_specs" / "digits.yaml"
WORK = Path(os.environ.get("GENDD_BENCH_WORK", "/tmp/gendd-bench"))


def make_parser(description: str) -> argparse.ArgumentParser:
    """Options every benchmark takes: device, torch threads, where results and scratch data go."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: less disturbed by others)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the .json and .md result files")
    parser.add_argument("--work", type=Path, default=WORK, help="scratch folder (shards, teachers, caches)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="variant suffix of the result files: <name>_<machine>_<tag>.json/.md")
    return parser


# words of a CUDA device name that do not tell GPUs apart ("NVIDIA H100 80GB HBM3" -> "h100")
_GPU_VENDOR_WORDS = {"nvidia", "tesla", "geforce", "quadro"}


def machine_tag(device: str = "cpu") -> str:
    """The machine part of a result name: `cpu` without CUDA, else the GPU's short name (`h100`, `a100`, `rtx4090`)."""
    if not torch.cuda.is_available():
        return "cpu"
    dev = torch.device(device)
    index = dev.index if dev.type == "cuda" and dev.index is not None else 0
    words = [
        w for w in re.split(r"[\s_-]+", torch.cuda.get_device_name(index).lower()) if w and w not in _GPU_VENDOR_WORDS
    ]
    model = next((i for i, w in enumerate(words) if any(c.isdigit() for c in w)), None)
    short = "".join(words[: model + 1]) if model is not None else "".join(words[:1])
    return re.sub(r"[^a-z0-9]", "", short) or "gpu"


def result_name(name: str, args: argparse.Namespace) -> str:
    """`<name>_<machine>`, plus `_<tag>` when --tag is given (several configurations of one benchmark side by side)."""
    stem = f"{name}_{machine_tag(args.device)}"
    return f"{stem}_{args.tag}" if args.tag else stem


def setup(args: argparse.Namespace) -> torch.device:
    """Pin torch threads, seed, and return the device (refusing cuda where there is none)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    args.work.mkdir(parents=True, exist_ok=True)
    return device


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: torch.device) -> dict:
    """What produced the numbers: CPU model and cores, torch version and threads, the GPU if one was used."""
    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": str(device),
        "loadavg_1min_at_end": os.getloadavg()[0],  # > cores: other processes competed for the CPU
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_name() -> str:
    """Short name of the machine a result table was made on: the GPU's when CUDA is visible, else CPU and cores."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{_cpu_model()}, {os.cpu_count()} cores"


def seed_mean(values: Sequence[float | None]) -> float | None:
    """Mean over seeds, or None unless every seed has the value (a missing run is never averaged away)."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present and len(present) == len(values) else None


def machine_line(info: dict) -> str:
    """One Markdown line naming the machine."""
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    return (
        f"Machine: {info['cpu']} ({info['cores_usable']} of {info['cores']} cores usable), torch {info['torch']}, "
        f"{info['torch_threads']} torch thread(s), device {info['device']}{gpu}, Python {info['python']}; "
        f"1-min load average at the end {info['loadavg_1min_at_end']:.2f}."
    )


def sync(device: torch.device) -> None:
    """Wait for queued device work, so that wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(seconds, result) of one call, device work included."""
    sync(device)
    started = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - started, result


def fmt(value: object) -> str:
    """Table cell: 4 significant digits for floats."""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.3e}"
    return str(value)


def md_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of `rows` (dicts), in `columns` order (default: the keys of all rows, first seen first)."""
    columns = list(columns or dict.fromkeys(key for row in rows for key in row))  # every row's keys, in order
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(
    out: Path,
    name: str,
    info: dict,
    tables: dict[str, list[dict]],
    summary: dict,
    notes: Sequence[str] = (),
    extra: dict | None = None,
) -> None:
    """Write `<out>/<name>.json` (everything, plus `extra`) and `<out>/<name>.md` (machine, summary, tables)."""
    out.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "command": ["python", *sys.argv], "machine": info, "summary": summary}
    record |= {"tables": tables, "notes": list(notes)}
    record |= extra or {}
    (out / f"{name}.json").write_text(json.dumps(record, indent=1, default=str))
    parts = [f"# {name}", "", machine_line(info), "", "Command: `" + " ".join(["python", *sys.argv]) + "`", ""]
    if summary:
        parts += [md_table([{"figure": k, "value": v} for k, v in summary.items()]), ""]
    for title, rows in tables.items():
        if rows:
            parts += [f"## {title}", "", md_table(rows), ""]
    parts += [f"- {note}" for note in notes]
    (out / f"{name}.md").write_text("\n".join(parts).rstrip() + "\n")
    print(f"wrote {out / name}.json and .md")


def fresh_dir(path: Path) -> Path:
    """An empty folder at `path` (its old content removed)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# ---- data -----------------------------------------------------------------------------------------------------


def digits_shards(work: Path, shard_size: int = 256, max_samples: int | None = None) -> ShardIndex:
    """The embedded digits set (8x8, 1 channel, 1437 train / 360 val) as image shards; reused when up to date."""
    root = work / f"digits-s{shard_size}-m{max_samples or 0}"
    index, _ = prepare_shards(load_spec(DIGITS_SPEC), root, shard_size=shard_size, max_samples=max_samples)
    return index


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def synthetic_images(n: int, size: int, seed: int) -> np.ndarray:
    """(n, size, size) uint8: smooth random blobs plus pixel noise (compresses like a photo, not like noise)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, max(2, size // 8), max(2, size // 8), generator=gen)
    smooth = nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    noisy = smooth * 220 + torch.rand(n, 1, size, size, generator=gen) * 35
    return noisy.clamp(0, 255).to(torch.uint8)[:, 0].numpy()


def synthetic_shards(
    work: Path, n: int, size: int, channels: int, shard_size: int, n_val: int = 16, seed: int = 0
) -> ShardIndex:
    """Synthetic labelled images (10 classes) as image shards, through an IDX-source spec and `prepare_shards`."""
    name = f"synth-n{n}-s{size}-c{channels}-sh{shard_size}"
    root = work / name
    if (root / "shards" / "index.json").is_file():
        index, _ = prepare_shards(load_spec(root / "spec.yaml"), root / "shards", shard_size=shard_size)
        return index
    raw = fresh_dir(root / "raw")
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", n_val)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", synthetic_images(count, size, seed + count))
        _write_idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, count).astype(np.uint8))
    mean, std = [0.45] * channels, [0.25] * channels
    spec = (
        f"name: {name}\nsource: idx\npath: {raw}\nsplits: {{train: train, val: val}}\nnum_classes: 10\n"
        f"image_size: {size}\nchannels: {channels}\nmean: {mean}\nstd: {std}\nlabeled: true\n"
    )
    (root / "spec.yaml").write_text(spec)
    index, _ = prepare_shards(load_spec(root / "spec.yaml"), root / "shards", shard_size=shard_size)
    return index


# ---- teachers -------------------------------------------------------------------------------------------------


def random_teacher(out: Path, name: str, index: ShardIndex, input_size: int, small_stem: bool, seed: int = 0) -> Path:
    """A random-weight timm teacher saved as `gendd teacher` would (card + safetensors); nothing downloaded."""
    if (out / "teacher.json").is_file():
        return out
    spec = index.spec
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = create_model(name, spec["num_classes"], spec["channels"], small_stem).eval()
    for module in model.modules():  # undo timm's zero-init of residual BNs, so features depend on the input
        if isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
    card = ModelCard(
        name,
        spec["num_classes"],
        spec["channels"],
        small_stem,
        input_size,
        tuple(spec["mean"]),
        tuple(spec["std"]),
        feature_dim(model, spec["channels"], input_size),
        {"spec_hash": index.spec_hash},
    )
    save_model(model, card, out, "teacher")
    return out


def trained_teacher(out: Path, index: ShardIndex, name: str, epochs: int, device: torch.device) -> Path:
    """A teacher trained here with cross-entropy (pipeline.teacher.teacher.make_teacher); reused when already there."""
    from pipeline.config import ObjectiveConfig, TrainConfig
    from pipeline.teacher.teacher import TeacherConfig, make_teacher

    if (out / "teacher.json").is_file():
        return out
    cfg = TrainConfig(
        model=name,
        objective=ObjectiveConfig(method="ce"),
        epochs=epochs,
        batch_size=64,
        lr=2e-3,
        cpu=device.type == "cpu",
    )
    card = make_teacher(TeacherConfig(shards=index.root, out=out, train=cfg))
    print(f"teacher {name}: {epochs} epochs, val top-1 {card['extra']['val_top1']:.2f}%")
    return out
