"""Augmentation views: a crop box in normalised coordinates plus a flip bit, replayed identically everywhere.

View 0 is the identity. Views 1..K-1 come from a policy and a counter-based generator keyed only by
(seed, sample key, view index), so they never depend on workers, ranks, epochs or resume points.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import ViewPolicy
from pipeline.data.shards import decode_shard
from pipeline.errors import GenddError

if TYPE_CHECKING:  # torch is imported where views are applied: shard-decode processes start without it (~2 s less)
    import torch


IDENTITY = (0.0, 0.0, 1.0, 1.0, 0.0)


def _uniforms(seed: int, key: str, view: int) -> np.ndarray:
    """Eight uniforms in [0, 1) from a hash of (seed, key, view): a counter-based generator with no state to share."""
    digest = hashlib.blake2b(f"{seed}\x1f{key}\x1f{view}".encode(), digest_size=32).digest()
    return np.frombuffer(digest, dtype="<u4").astype(np.float64) / 2.0**32


def _draw(policy: ViewPolicy, u: np.ndarray, image_size: int) -> tuple[float, float, float, float, float]:
    flip = float(policy.flip and u[0] < 0.5)
    if policy.kind == "rrc":
        area = policy.scale[0] + (policy.scale[1] - policy.scale[0]) * u[1]
        log_lo, log_hi = math.log(policy.ratio[0]), math.log(policy.ratio[1])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[2])
        w, h = min(1.0, math.sqrt(area * aspect)), min(1.0, math.sqrt(area / aspect))
        x0, y0 = (1.0 - w) * u[3], (1.0 - h) * u[4]
        return (x0, y0, x0 + w, y0 + h, flip)
    if policy.kind == "pad_crop":
        # whole-pixel shifts keep the crop exact (no interpolation); outside the image reads as zero padding
        dx = (math.floor(u[1] * (2 * policy.pad + 1)) - policy.pad) / image_size
        dy = (math.floor(u[2] * (2 * policy.pad + 1)) - policy.pad) / image_size
        return (dx, dy, 1.0 + dx, 1.0 + dy, flip)
    if policy.kind == "flip":
        return (*IDENTITY[:4], flip)
    return IDENTITY


def sample_views(keys: Sequence[str], num_views: int, policy: ViewPolicy, seed: int, image_size: int) -> np.ndarray:
    """(N, K, 5) float32 views for the given sample keys; view 0 is always the identity."""
    if num_views < 1:
        raise GenddError(f"the number of views must be >= 1 (view 0 is the plain image), got {num_views}")
    out = np.empty((len(keys), num_views, 5), dtype=np.float32)
    for i, key in enumerate(keys):
        out[i, 0] = IDENTITY
        for k in range(1, num_views):
            out[i, k] = _draw(policy, _uniforms(seed, key, k), image_size)
    return out


def apply_views(
    images: torch.Tensor,
    views: torch.Tensor,
    out_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Crop, resize, flip and normalise a uint8 batch (B, C, H, W) by its views (B, 5) on the images' device.

    roi_align with aligned=True samples bin centres exactly as bilinear resizing (align_corners=False) does,
    and averages several samples per bin when a crop shrinks, so one call serves every crop in the batch.
    """
    b, _, h, w = images.shape
    import torch
    from torchvision.ops import roi_align

    views = views.to(device=images.device, dtype=torch.float32)
    # Scalar arithmetic and arange only: a torch.tensor(list) on a GPU is a host copy that syncs every step.
    corners = views[:, :4].clone()
    corners[:, 0::2] *= w
    corners[:, 1::2] *= h
    index = torch.arange(b, device=images.device, dtype=torch.float32)[:, None]
    boxes = torch.cat([index, corners], dim=1)  # (B, 5): batch index, x0, y0, x1, y1 in pixels
    crops = roi_align(images.float(), boxes, output_size=(out_size, out_size), sampling_ratio=0, aligned=True)
    flip = views[:, 4].bool()[:, None, None, None]
    crops = torch.where(flip, crops.flip(-1), crops)  # (B, C, S, S)
    mean_t, std_t = _norm_constants(tuple(mean), tuple(std), images.device)
    return (crops - mean_t) / std_t


@functools.lru_cache(maxsize=16)
def _norm_constants(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple:
    """(1, C, 1, 1) mean and std in 0-255 units on the device, made once per (mean, std, device)."""
    import torch

    def shaped(values: tuple[float, ...]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32).mul(255.0).view(1, -1, 1, 1).to(device)

    return shaped(mean), shaped(std)


def decode_shard_with_views(
    path: str, keep_png: bool, k: int, policy: ViewPolicy, seed: int, size: int
) -> tuple[list[str], np.ndarray, np.ndarray, list[bytes] | None, np.ndarray]:
    """Decode a shard and draw its K views; plain arrays only, so it can run in a worker process (no GIL, no
    tensor sharing): (keys, images (N, C, H, W) uint8, labels (N,), png or None, views (N, K, 5))."""
    keys, images, labels, png = decode_shard(path, keep_png)
    return keys, images, labels, png, sample_views(keys, k, policy, seed, size)
