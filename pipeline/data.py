"""Training and evaluation input: one interface, two implementations, chosen by `--data auto|memory|stream`.

- memory: the whole split decoded once and held in memory (on the device when training on a GPU, targets too when
  they fit): the fastest path for small sets such as digits or Fashion-MNIST.
- stream (pipeline/stream.py): shards are read per epoch, split across ranks and loader workers, and shuffled
  through a bounded buffer: memory stays flat whatever the size of the dataset.

Every batch is a dict of tensors: `images` (B, C, H, W) uint8, `views` (B, 5) float32 (the view to apply),
`labels` (B,) int64 (-1 = none), `index` (B,) int64 (global sample index), `view` (B,) int64 (cached view index),
and with a cache `teacher_features` (B, D_T) / `teacher_logits` (B, C), float16 until they reach the device.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from pipeline.errors import GenddError
from pipeline.shards import ShardIndex, load_index, load_split
from pipeline.views import ViewPolicy, sample_views

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


# ---- footprint and mode choice -------------------------------------------------------------------------------


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


# ---- memory mode ---------------------------------------------------------------------------------------------


@dataclass
class TrainData:
    """A whole split in memory: uint8 images, labels, and cached teacher outputs per (sample, view) if any."""

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64, -1 = none
    mean: tuple[float, ...]
    std: tuple[float, ...]
    views: torch.Tensor | None = None  # (N, K, 5) cached views; None -> fresh views from the policy each epoch
    features: torch.Tensor | None = None  # (N, K, D_T) float16
    logits: torch.Tensor | None = None  # (N, K, C) float16
    head_weight: torch.Tensor | None = None  # (C, D_T)
    head_bias: torch.Tensor | None = None
    keys: list[str] = field(default_factory=list)
    num_classes: int | None = None  # default: the head's rows, else the largest label + 1


def targets_to(data: TrainData, device: torch.device) -> TrainData:
    """The data with its per-sample targets (labels, views, teacher outputs) where the training steps gather them.

    On a GPU they move to the device when they fit in DEVICE_TARGET_SHARE of its free memory: a copy from pageable
    host memory synchronises the stream, so gathering on the host and copying every step stalls the queue (small
    students are launch-bound). Otherwise they stay in pinned host memory, whose copies are asynchronous.
    """
    if device.type != "cuda":
        return data
    per_sample = [data.labels, data.views, data.features, data.logits]
    nbytes = sum(t.numel() * t.element_size() for t in per_sample if t is not None)
    free, _ = torch.cuda.mem_get_info(device)
    move = (lambda t: t.to(device)) if nbytes <= DEVICE_TARGET_SHARE * free else (lambda t: t.pin_memory())
    moved = {
        name: move(getattr(data, name))
        for name in ("labels", "views", "features", "logits", "head_weight", "head_bias")
        if getattr(data, name) is not None
    }
    return replace(data, **moved)


class MemoryInput:
    """The memory mode: a TrainData split, batches gathered from it where it lives."""

    mode = "memory"

    def __init__(self, data: TrainData, chunk_size: int = 1000) -> None:
        self.data, self.images, self.chunk_size = data, data.images, chunk_size
        n_cls = data.num_classes or (data.head_weight.shape[0] if data.head_weight is not None else 0)
        self.info = InputInfo(
            n=len(data.labels),
            channels=data.images.shape[1],
            image_size=data.images.shape[-1],
            mean=data.mean,
            std=data.std,
            num_classes=n_cls or int(data.labels.max()) + 1,
            labels=data.labels.cpu(),
            num_views=0 if data.views is None else data.views.shape[1],
            feature_dim=None if data.features is None else data.features.shape[-1],
            head_weight=data.head_weight,
            head_bias=data.head_bias,
        )

    def place(self, device: torch.device) -> None:
        """Images to the device (small sets live there whole: batches are gathers); targets per `targets_to`."""
        self.images = self.data.images.to(device)
        self.data = targets_to(self.data, device)

    def start(self, plan: EpochPlan, device: torch.device | None = None, start_step: int = 0) -> None:
        """Nothing to start: the split is in memory."""

    def steps_per_epoch(self, seed: int, epoch: int, batch_size: int, world: int) -> int:
        """Every rank takes the same number of samples, N // world (the remainder is left out of that epoch)."""
        return math.ceil(self.info.n // world / batch_size)

    def batches(self, plan: EpochPlan, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of a global random order from (seed, epoch); rank r takes every world-th sample of it. The order is
        drawn whole; a resume at `start_step` only skips the batches before it."""
        data, n = self.data, self.info.n
        gen = torch.Generator().manual_seed(plan.seed * 100_003 + plan.epoch)
        order = torch.randperm(n, generator=gen)
        order = order[: (n // plan.world) * plan.world][plan.rank :: plan.world]
        view_index = torch.from_numpy(view_plan(plan.seed, plan.epoch, np.arange(n), max(self.info.num_views, 1)))
        if data.views is not None:
            views = data.views[torch.arange(n, device=data.views.device), view_index.to(data.views.device)]
        else:
            views = torch.from_numpy(fresh_views(data.keys, plan, self.info.image_size))
        # One copy per epoch to where the targets live: the steps below slice and gather without host copies.
        where = data.labels.device
        order, view_index, views = order.to(where), view_index.to(where), views.to(where)
        for start in range(start_step * plan.batch_size, len(order), plan.batch_size):
            idx = order[start : start + plan.batch_size]
            batch = {"images": self.images[idx.to(self.images.device)], "views": views[idx], "labels": data.labels[idx]}
            batch |= {"index": idx, "view": view_index[idx]}
            if data.features is not None:
                batch["teacher_features"] = data.features[idx, view_index[idx]]
                batch["teacher_logits"] = data.logits[idx, view_index[idx]]
            yield batch

    def feature_chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The cached features in cache-chunk slices (the same slices the stream mode reads)."""
        if self.data.features is None:
            return
        features, labels = self.data.features.cpu().numpy(), self.data.labels.cpu().numpy()
        for i in stats_chunks(-(-self.info.n // self.chunk_size), self.chunk_size):
            rows = slice(i * self.chunk_size, (i + 1) * self.chunk_size)
            yield features[rows], labels[rows]


def stats_chunks(n_chunks: int, chunk_size: int = 1) -> list[int]:
    """Chunks the target statistics read: all of them, or evenly spread ones up to TARGET_STATS_SAMPLES samples."""
    wanted = max(1, TARGET_STATS_SAMPLES // max(chunk_size, 1))
    if n_chunks <= wanted:
        return list(range(n_chunks))
    return sorted({int(i) for i in np.linspace(0, n_chunks - 1, wanted)})


def load_train_data(shards: str | Path, cache: str | Path | None, split: str = "train") -> TrainData:
    """Shards of a split held in memory, joined with the feature cache (float16) when one is given."""
    from pipeline.shards import key_array
    from pipeline.store import open_cache

    index = load_index(shards)
    data = load_split(index.split(split))
    spec = index.spec
    out = TrainData(data.images, data.labels, tuple(spec["mean"]), tuple(spec["std"]), keys=data.keys)
    out.num_classes = int(spec["num_classes"])
    if cache is None:
        return out
    store = open_cache(cache, split, spec_hash=index.spec_hash, shards=index.split(split))
    if not np.array_equal(store.keys, key_array(data.keys)):
        raise GenddError(f"cache {cache} was extracted from other samples than {shards}; re-run gendd extract")
    k, n = store.K, store.n
    out.features = torch.empty((n, k, store.feature_dim), dtype=torch.float16)
    out.logits = torch.empty((n, k, store.num_classes), dtype=torch.float16)
    out.views = torch.empty((n, k, 5), dtype=torch.float32)
    for i in range(store.n_chunks):  # chunk by chunk into preallocated float16: no float32 copy of the split
        start, stop = store.chunk_bounds(i)
        chunk = store.read_chunk(i, dtype=np.float16)
        for name in ("features", "logits", "views"):
            getattr(out, name)[start:stop] = torch.from_numpy(chunk[name])
    out.head_weight = torch.from_numpy(np.asarray(store.head_weight, dtype=np.float32))
    out.head_bias = torch.from_numpy(np.asarray(store.head_bias, dtype=np.float32))
    out.num_classes = store.num_classes
    return out


def memory_input(shards: str | Path, cache: str | Path | None, split: str = "train") -> MemoryInput:
    """The memory mode of a split (chunked like its shards, so target statistics match the stream mode)."""
    return MemoryInput(load_train_data(shards, cache, split), load_index(shards).shard_size)


def stream_workers(requested: int) -> int:
    """Loader processes for the stream mode: one per core beyond the two training uses (at least one, up to 8)."""
    if requested >= 0:
        return requested
    return max(1, min(8, (os.cpu_count() or 1) - 2))


def train_device(cpu: bool) -> torch.device:
    """The device a training process will use (before accelerate is set up): its local GPU, else the CPU."""
    if cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def make_accelerator(mixed_precision: str, cpu: bool, **kwargs: object):
    """accelerate's Accelerator, its refusals (e.g. fp16 without a GPU) as one line that names the fix."""
    from accelerate import Accelerator

    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu, **kwargs)
    except (ValueError, RuntimeError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise GenddError(f"accelerate refused --mixed-precision {mixed_precision} (cpu={cpu}): {first}") from err
