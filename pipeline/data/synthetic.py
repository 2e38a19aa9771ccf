"""The `synthetic` source: deterministic, learnable class patterns generated inside `gendd prepare` (no files), to
rehearse the pipeline at any sample count, class count and image size (data_specs/imagenet_shaped.yaml)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import numpy as np

from pipeline.data.specs import DataSpec

# Samples drawn together (vectorised; each block seeded on its own): up to 4096, fewer for large images so that a
# block's float64 noise stays within 128 MB (16 px RGB: 4096 samples; 224 px RGB: 111).
_SYNTHETIC_VALUES = 1 << 24


def synthetic_prototypes(spec: DataSpec) -> np.ndarray:
    """(C, H, W, channels) float32 class patterns of a synthetic source: a coarse 4x4 colour grid (what makes the
    class easy to tell at a glance) plus a finer 8x8 grid at lower contrast (what makes it worth a convolution)."""
    rng = np.random.default_rng([spec.seed, 0x5EED])
    size, c, ch = spec.image_size, spec.num_classes, spec.channels
    coarse = rng.uniform(64, 192, (c, 4, 4, ch)).astype(np.float32)
    fine = rng.uniform(-48, 48, (c, 8, 8, ch)).astype(np.float32)

    def upsample(grid: np.ndarray) -> np.ndarray:  # nearest, to image_size (any size: index arithmetic, no resize)
        rows = np.arange(size) * grid.shape[1] // size
        return grid[:, rows][:, :, rows]

    return upsample(coarse) + upsample(fine)


def synthetic_samples(
    spec: DataSpec, split: str, on_total: Callable[[int], None]
) -> Iterator[tuple[str, np.ndarray, int]]:
    """Deterministic, learnable samples generated on the fly (like torchvision's FakeData, but a class is a
    pattern, so a teacher learns something): class prototype, shifted by up to 3 pixels (wrapping), brightness
    jitter and Gaussian noise. Sample i depends only on (seed, split name, i // block): any run makes the same."""
    n, prototypes = int(spec.splits[split]), synthetic_prototypes(spec)
    on_total(n)
    split_code = int.from_bytes(hashlib.sha256(split.encode()).digest()[:4], "little")
    block = max(1, min(4096, _SYNTHETIC_VALUES // (spec.image_size**2 * spec.channels)))
    for block_start in range(0, n, block):
        size = min(block, n - block_start)
        rng = np.random.default_rng([spec.seed, split_code, block_start // block])
        labels = rng.integers(0, spec.num_classes, size)
        images = prototypes[labels] + rng.uniform(-40, 40, (size, 1, 1, 1)).astype(np.float32)
        images += rng.normal(0, 50, images.shape).astype(np.float32)
        shifts = rng.integers(-3, 4, (size, 2))
        for i in range(size):
            image = np.clip(np.roll(images[i], tuple(shifts[i]), axis=(0, 1)), 0, 255).astype(np.uint8)
            label = int(labels[i]) if spec.labeled else -1
            yield f"{spec.name}-{split}-{block_start + i:07d}", image, label
