"""Chunk codecs of the feature cache: float16 (lossless codecs), bfloat16 bits, int8 with a per-(sample, view)
scale; encode on write, decode (and check for NaN or inf) on read."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import GenddError

if TYPE_CHECKING:
    pass


def all_finite(x: np.ndarray, bf16_bits: bool = False) -> bool:
    """Whether `x` holds no NaN or inf (integers: always). float16 and bfloat16 bit patterns (uint16) are tested on
    their exponent bits, all ones exactly for NaN and inf: ~6x faster than np.isfinite on float16 (measured 1.6 ms
    against 10 ms for 4M values), which matters on every chunk a training run reads."""
    x = np.asarray(x)
    mask = 0x7F80 if bf16_bits else 0x7C00 if x.dtype == np.float16 else None
    if mask is None:
        return x.dtype.kind in "iub" or bool(np.isfinite(x).all())
    return x.size == 0 or int(np.bitwise_and(np.ascontiguousarray(x).view(np.uint16), mask).max()) != mask


def _to_float16(name: str, x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # overflow is reported below, as a GenddError
        half = x.astype(np.float16)
    if not np.isfinite(half).all():
        raise GenddError(f"{name} exceed the float16 range (|x| > 65504): extract with codec 'bf16' instead")
    return half


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)


def _from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _to_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric absmax quantisation over the last axis: (q int8, scale float32 (..., )), x ~ q * scale."""
    scale = (np.abs(x).max(axis=-1) / 127.0).astype(np.float32)  # (n, K)
    safe = np.where(scale > 0, scale, 1.0)[..., None]
    return np.clip(np.rint(x / safe), -127, 127).astype(np.int8), scale


def encode_chunk(codec: str, features: np.ndarray, logits: np.ndarray, views: np.ndarray) -> dict[str, np.ndarray]:
    """Float inputs -> the arrays the codec stores (refuses NaN/inf rather than caching them)."""
    features, logits = np.asarray(features, np.float32), np.asarray(logits, np.float32)
    for name, x in (("features", features), ("logits", logits)):
        if not np.isfinite(x).all():
            raise GenddError(f"teacher {name} contain NaN or inf: check the teacher checkpoint, then {EXTRACT_FIX}")
    stored = {"views": np.asarray(views, np.float32)}
    if codec == "bf16":
        return stored | {"features": _to_bf16_bits(features), "logits": _to_bf16_bits(logits)}
    if codec == "int8":
        q, scale = _to_int8(features)
        return stored | {"features": q, "features_scale": scale, "logits": _to_float16("logits", logits)}
    return stored | {"features": _to_float16("features", features), "logits": _to_float16("logits", logits)}


def decode_chunk(codec: str, stored: dict[str, np.ndarray], dtype: type = np.float32) -> dict[str, np.ndarray]:
    """Stored arrays -> features and logits as `dtype` (float32 or float16), views as float32."""
    if np.dtype(dtype) not in (np.float32, np.float16):
        raise ValueError(f"cache values decode to float32 or float16, not {np.dtype(dtype)}")
    features, logits = stored["features"], stored["logits"]
    if codec == "bf16":
        features, logits = _from_bf16_bits(features), _from_bf16_bits(logits)
    elif codec == "int8":
        features = features.astype(np.float32) * stored["features_scale"][..., None]
    # Stored float16 (zstd, lz4, none) is returned as is for float16: no copy, no float32 round trip.
    out = {"features": np.asarray(features, dtype), "logits": np.asarray(logits, dtype)}
    if codec in ("bf16", "int8") and np.dtype(dtype) == np.float16:
        for name in ("features", "logits"):
            if not np.isfinite(out[name]).all():  # bf16 and int8 hold values past float16's range (|x| > 65504)
                raise GenddError(f"cached {name} exceed the float16 range: read this {codec} cache as float32")
    return out | {"views": np.asarray(stored["views"], np.float32)}


EXTRACT_FIX = "re-run gendd extract"
