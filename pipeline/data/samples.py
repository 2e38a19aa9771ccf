"""One sample of a source: a uint8 image at the spec's size, its key and label; the conversions every reader shares."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from pipeline.data.specs import DataSpec
from pipeline.errors import GenddError

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


_ALPHA = ("LA", "La", "RGBA", "RGBa", "PA")


class SourceMissing(GenddError):
    """The source data is not there at all (rather than unreadable): prepare can still keep intact shards."""


@dataclass(frozen=True)
class Sample:
    """One source image: a stable key, (H, W, C) uint8 pixels at the spec's size, and a label (-1 if none)."""

    key: str
    image: np.ndarray
    label: int


def _eight_bit(pil: Image.Image) -> Image.Image:
    """An image in a mode that converts to L or RGB without losing its range: 16-bit grey ("I;16*", and "I", read
    as 0..65535) is scaled to 0..255 (v * 255 / 65535, rounded: 65535 -> 255, 32896 -> 128; Pillow's own convert
    would clip it), and alpha ("LA", "RGBA", "PA", or a palette/colour-key transparency) is composited on black:
    the pixels are multiplied by alpha, so fully transparent pixels are black whatever colour they happen to hold.
    Palettes become their colours, CMYK and YCbCr go through Pillow's RGB conversion."""
    if pil.mode in _SIXTEEN_BIT:
        grey = np.clip(np.asarray(pil).astype(np.int64), 0, 65535)
        return Image.fromarray(((grey * 255 + 32767) // 65535).astype(np.uint8), "L")
    if pil.mode == "La":
        pil = pil.convert("LA")
    if "transparency" in pil.info and pil.mode in ("P", "L", "RGB"):
        pil = pil.convert("RGBA")
    if pil.mode in _ALPHA:
        rgba = np.asarray(pil.convert("RGBA")).astype(np.uint32)
        rgb = (rgba[:, :, :3] * rgba[:, :, 3:] + 127) // 255
        return Image.fromarray(rgb.astype(np.uint8), "RGB")
    return pil


def fit_image(image: np.ndarray | Image.Image, spec: DataSpec) -> np.ndarray:
    """Convert to the spec's channels and size (bilinear resize only when the source differs). Decoded files are
    turned upright by their EXIF orientation (phone photos) and brought to 8 bits by `_eight_bit` first."""
    pil = ImageOps.exif_transpose(image) if isinstance(image, Image.Image) else Image.fromarray(image)
    pil = _eight_bit(pil).convert("L" if spec.channels == 1 else "RGB")
    if pil.size != (spec.image_size, spec.image_size):
        pil = pil.resize((spec.image_size, spec.image_size), Image.Resampling.BILINEAR)
    array = np.asarray(pil, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def long_tail_indices(labels: np.ndarray, num_classes: int, factor: float) -> np.ndarray:
    """Keep the first n_max * factor^(-c/(C-1)) samples of class c (exponential profile, as in CIFAR-LT)."""
    counts = np.bincount(labels, minlength=num_classes)
    n_max = counts.max()
    keep = [int(n_max * factor ** (-c / max(num_classes - 1, 1))) for c in range(num_classes)]
    chosen = [np.flatnonzero(labels == c)[: keep[c]] for c in range(num_classes)]
    return np.sort(np.concatenate(chosen))
