"""Bytes and CPU decode time per image of the shards' PNG (what `gendd prepare` writes) at ImageNet training sizes,
against the JPEG the ImageNet originals are, for the projection in docs/scale.md.

    python benchmarks/scale/decode_costs.py          # -> benchmarks/results/decode_costs_cpu.json

Images: 256 x 256 crops of scikit-learn's two embedded photographs (china.jpg, flower.jpg), resized, so the
content is natural-image-like; one decode at a time on one core (a loader worker's work per sample).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

RESULTS = Path(__file__).resolve().parents[1] / "results"


def crops(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    """`n` random square crops of the sample photographs, resized to size x size."""
    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.integers(200, min(photo.shape[:2])))
        y, x = (int(rng.integers(0, photo.shape[d] - side + 1)) for d in (0, 1))
        out.append(Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.Resampling.BILINEAR))
    return out


def cost(images: list[Image.Image], **save: object) -> dict[str, float]:
    blobs = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, **save)
        blobs.append(buffer.getvalue())
    started = time.perf_counter()
    for blob in blobs:
        np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    seconds = time.perf_counter() - started
    return {"bytes_per_image": float(np.mean([len(b) for b in blobs])), "decode_ms": 1000 * seconds / len(blobs)}


def main() -> None:
    images = crops(200, 256)
    result = {
        "image_size": 256,
        "images": len(images),
        "png_level1": cost(images, format="PNG", compress_level=1),
        "jpeg_q90": cost(images, format="JPEG", quality=90),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "decode_costs_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
