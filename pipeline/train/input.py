"""Training and evaluation input: one interface, two implementations, chosen by `--data auto|memory|stream`.

- memory: the whole split decoded once and held in memory (on the device when training on a GPU, targets too when
  they fit): the fastest path for small sets such as digits or Fashion-MNIST.
- stream (pipeline/train/stream.py): shards are read per epoch, split across ranks and loader workers, and shuffled
  through a bounded buffer: memory stays flat whatever the size of the dataset.

Every batch is a dict of tensors: `images` (B, C, H, W) uint8, `views` (B, 5) float32 (the view to apply),
`labels` (B,) int64 (-1 = none), `index` (B,) int64 (global sample index), `view` (B,) int64 (cached view index),
and with a cache `teacher_features` (B, D_T) / `teacher_logits` (B, C), float16 until they reach the device.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from pipeline.config import ViewPolicy
from pipeline.data.shards import ShardIndex
from pipeline.data.views import sample_views

# `auto` holds a split in memory only when it takes at most this share of the available host memory (loading
# briefly holds a second copy of the images) and, on a GPU, when the images take at most this share of its free memory.
MEMORY_SHARE = 0.4


# Per-sample targets on the device may take this share of its free memory; more stays in pinned host memory.
DEVICE_TARGET_SHARE = 0.25


# Target statistics (per-dimension mean/std of the diffusion targets) read at most this many cached samples.
TARGET_STATS_SAMPLES = 50_000


@dataclass
class InputInfo:
    """What the model and the objective need to know about a split, without holding its samples."""

    n: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    labels: torch.Tensor  # (N,) int64, -1 = none: small, kept for the class prior
    num_views: int = 0  # views cached per sample (0: no cache, fresh views from the policy)
    feature_dim: int | None = None
    head_weight: torch.Tensor | None = None  # (C, D_T): class centres of Distribution Contraction
    head_bias: torch.Tensor | None = None
    teachers: int = 1  # teachers whose outputs the cached targets hold side by side (pipeline/cache/ensemble.py)
    teacher_dims: tuple[int, ...] = ()  # each teacher's feature size, in the order of the targets

    @property
    def labeled(self) -> bool:
        """Whether every sample has a label."""
        return bool((self.labels >= 0).all())


class TrainInput(Protocol):
    """Batches of one split for training: the interface both modes implement."""

    info: InputInfo
    mode: str

    def place(self, device: torch.device) -> None:
        """Move what lives on the device there (memory mode), once before training."""

    def start(self, plan: EpochPlan, device: torch.device | None = None, start_step: int = 0) -> None:
        """Get ready to serve a run with this plan on `device` from `start_step` of its epoch (the stream mode starts
        its loader workers)."""

    def steps_per_epoch(self, seed: int, epoch: int, batch_size: int, world: int) -> int:
        """Optimiser steps of an epoch (the largest over ranks), known before it starts."""

    def batches(self, plan: EpochPlan, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's batches of one epoch from its `start_step`-th on: the same batches an uninterrupted epoch
        yields from there (a mid-epoch resume)."""

    def feature_chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(features (n, K, D) float16, labels (n,)) of evenly spread cache chunks, for the target statistics."""


@dataclass(frozen=True)
class EpochPlan:
    """What decides one epoch's batches: only (seed, epoch) and the rank layout, never a resume point."""

    seed: int
    epoch: int
    batch_size: int
    rank: int = 0
    world: int = 1
    policy: ViewPolicy = field(default_factory=ViewPolicy)  # fresh views when there is no cache


def view_plan(seed: int, epoch: int, index: np.ndarray, num_views: int) -> np.ndarray:
    """The cached view each sample is trained on in an epoch: a hash of (seed, epoch, sample index) only, so every
    mode, rank, worker and shuffle order picks the same view for a sample."""
    index = np.asarray(index, dtype=np.uint64)
    if num_views <= 1:
        return np.zeros(index.shape, dtype=np.int64)
    # splitmix64 finaliser: a counter-based generator, vectorised and stateless (numpy's Generator is sequential).
    with np.errstate(over="ignore"):
        x = index + np.uint64((seed * 1_000_003 + epoch) % 2**63) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(num_views)).astype(np.int64)


def fresh_views(keys: list[str] | np.ndarray, plan: EpochPlan, image_size: int) -> np.ndarray:
    """(N, 5) policy views of an epoch without a cache, keyed by (seed, epoch, key) as in every mode; keys as str or
    as a key array (UTF-8 bytes, decoded here: views are seeded by the key's text)."""
    if isinstance(keys, np.ndarray) and keys.dtype.kind == "S":
        keys = np.strings.decode(keys, "utf-8").tolist()
    return sample_views(keys, 2, plan.policy, seed=plan.seed * 100_003 + plan.epoch, image_size=image_size)[:, 1]


def footprint(index: ShardIndex, split: str, num_views: int, feature_dim: int, num_classes: int) -> dict[str, int]:
    """Bytes the memory mode holds for a split: decoded images, float16 features and logits, float32 views."""
    n, spec = index.split(split).n, index.spec
    return {
        "images": n * int(spec["channels"]) * int(spec["image_size"]) ** 2,
        "features": n * num_views * feature_dim * 2,
        "logits": n * num_views * num_classes * 2,
        "views": n * num_views * 5 * 4,
    }


def available_host_bytes() -> int:
    """Memory the OS can give this process now (MemAvailable), or the physical size where that is unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_mode(requested: str, sizes: dict[str, int], device: torch.device, split: str) -> tuple[str, str]:
    """The data mode to use and a one-line account of the estimate behind it."""
    total = sum(sizes.values())
    parts = " + ".join(f"{k} {human_bytes(v)}" for k, v in sizes.items() if v)
    host = available_host_bytes()
    fits = total <= MEMORY_SHARE * host
    where = f"host {human_bytes(host)} available"
    if fits and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        fits = sizes["images"] <= MEMORY_SHARE * free
        where += f", device {human_bytes(free)} free"
    mode = requested if requested != "auto" else ("memory" if fits else "stream")
    how = "chosen" if requested == "auto" else "requested"
    return mode, f"data: the {split} split in memory needs {human_bytes(total)} ({parts}); {where} -> {mode} ({how})"


def human_bytes(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (e.g. 3.2 GiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"


def stats_chunks(n_chunks: int, chunk_size: int = 1) -> list[int]:
    """Chunks the target statistics read: all of them, or evenly spread ones up to TARGET_STATS_SAMPLES samples."""
    wanted = max(1, TARGET_STATS_SAMPLES // max(chunk_size, 1))
    if n_chunks <= wanted:
        return list(range(n_chunks))
    return sorted({int(i) for i in np.linspace(0, n_chunks - 1, wanted)})


def stream_workers(requested: int) -> int:
    """Loader processes for the stream mode: one per core beyond the two training uses (at least one, up to 8)."""
    if requested >= 0:
        return requested
    return max(1, min(8, (os.cpu_count() or 1) - 2))
