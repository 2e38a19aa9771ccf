"""The memory mode: a whole split decoded once and held in memory (on the GPU when it fits), with its cached
teacher outputs; batches are gathered from those arrays."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.data.shards import load_index, load_split
from pipeline.errors import GenddError
from pipeline.train.input import DEVICE_TARGET_SHARE, EpochPlan, InputInfo, fresh_views, stats_chunks, view_plan

if TYPE_CHECKING:
    from pipeline.cache.ensemble import Caches


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
    teachers: int = 1  # several caches: features and logits of every teacher side by side
    teacher_dims: tuple[int, ...] = ()


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
            teachers=data.teachers,
            teacher_dims=data.teacher_dims,
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


def load_train_data(shards: str | Path, cache: Caches, split: str = "train") -> TrainData:
    """Shards of a split held in memory, joined with the feature cache(s) (float16) when given."""
    from pipeline.cache.ensemble import open_caches
    from pipeline.data.shards import key_array

    index = load_index(shards)
    data = load_split(index.split(split))
    spec = index.spec
    out = TrainData(data.images, data.labels, tuple(spec["mean"]), tuple(spec["std"]), keys=data.keys)
    out.num_classes = int(spec["num_classes"])
    if cache is None:
        return out
    store = open_caches(cache, split, spec_hash=index.spec_hash, shards=index.split(split))
    if not np.array_equal(store.keys, key_array(data.keys)):
        raise GenddError(f"cache {store.path} was extracted from other samples than {shards}; re-run gendd extract")
    k, n = store.K, store.n
    out.teachers, out.teacher_dims = store.teachers, store.teacher_dims
    out.features = torch.empty((n, k, store.feature_dim), dtype=torch.float16)
    out.logits = torch.empty((n, k, store.num_classes * out.teachers), dtype=torch.float16)
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


def memory_input(shards: str | Path, cache: Caches, split: str = "train") -> MemoryInput:
    """The memory mode of a split (chunked like its shards, so target statistics match the stream mode)."""
    return MemoryInput(load_train_data(shards, cache, split), load_index(shards).shard_size)
