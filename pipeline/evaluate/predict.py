"""Logits of an exported student on a split, through the probe and (sampled) the generative path, batch by batch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pipeline.config import DataOptions, SamplingConfig
from pipeline.errors import GenddError
from pipeline.train.probe import identity_features

if TYPE_CHECKING:
    from pipeline.cache.ensemble import Caches


@torch.no_grad()
def predict_batch(
    student: nn.Module,
    images: torch.Tensor,
    input_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    sampling: SamplingConfig | None = None,
    teacher_head: tuple[torch.Tensor, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    keep_features: bool = False,
) -> dict[str, torch.Tensor]:
    """Probe logits of uint8 images (B, C, H, W) on the student's device through the identity view and, when
    `sampling` is set, generative-path logits (teacher head applied to the averaged generated teacher features).
    With `keep_features`, also the frozen features (`features`, (B, D_S)) and, for a student with a head, its
    normalised condition (`condition`): what the refit probe reads; they are not logits."""
    feats = identity_features(student, images, input_size, mean, std)  # (B, D_S)
    out = {"probe": student.probe(feats).float()}
    if keep_features:
        out["features"] = feats.float()
        if student.head is not None:
            out["condition"] = student.head.condition(feats).float()
    if sampling is not None and student.head is not None and teacher_head is not None:
        z = student.head.condition(feats)
        f_t = student.head.sample(
            z,
            n_samples=sampling.n_samples,
            cfg_scale=sampling.cfg_scale,
            sampler=sampling.sampler,
            steps=sampling.steps,
            spacing=sampling.spacing,
            generator=generator,
        )
        weight, bias = (t.to(images.device) for t in teacher_head)
        out["generative"] = (f_t @ weight.T + bias).float()
    return out


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
    """Logits of every path for images held in memory (see `predict_batch`), on the host."""
    student = student.to(device).eval()
    generator = torch.Generator(device).manual_seed(sampling.seed) if sampling else None
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size].to(device)
        out = predict_batch(
            student, chunk, input_size, mean, std, sampling=sampling, teacher_head=teacher_head, generator=generator
        )
        for name, logits in out.items():
            parts.setdefault(name, []).append(logits.cpu())
    return {name: torch.cat(values) for name, values in parts.items()}


def eval_batches(
    shards: str | Path,
    cache: Caches,
    split: str,
    batch_size: int,
    options: DataOptions,
    device: torch.device,
) -> tuple[int, Iterator[dict[str, torch.Tensor]]]:
    """(samples, batches) of a split for evaluation: images, labels and (with a cache) the teacher's view-0 logits,
    held in memory or streamed (`options.mode`; auto: estimated and printed)."""
    from pipeline.cache.ensemble import open_caches
    from pipeline.data.shards import key_array, load_index, load_split
    from pipeline.train.input import choose_mode, footprint
    from pipeline.train.stream import stream_eval_batches

    index = load_index(shards)
    store = None
    if cache is not None:
        store = open_caches(cache, split, spec_hash=index.spec_hash, shards=index.split(split))
    sizes = footprint(index, split, 1, 0, store.num_classes * store.teachers if store else 0)
    mode, line = choose_mode(options.mode, sizes, device, split)
    print(line, flush=True)
    if mode == "stream":
        _, batches = stream_eval_batches(shards, cache, split, batch_size, options.workers, device.type == "cuda")
        return index.split(split).n, batches
    data = load_split(index.split(split))
    logits = None
    if store is not None:
        if not np.array_equal(store.keys, key_array(data.keys)):
            raise GenddError(f"cache {store.path} was extracted from other samples than {shards}; re-run gendd extract")
        logits = torch.cat(
            [torch.from_numpy(store.read_chunk(i, dtype=np.float16)["logits"][:, 0]) for i in range(store.n_chunks)]
        )

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(data.labels), batch_size):
            rows = slice(start, start + batch_size)
            batch = {"images": data.images[rows], "labels": data.labels[rows]}
            yield batch | ({"teacher_logits": logits[rows]} if logits is not None else {})

    return len(data.labels), batches()
