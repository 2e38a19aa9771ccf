"""Storage: bytes per cached (sample, view) and per stored value, write/read throughput and error of every codec.

Features are real: teachers trained here on digits for a few epochs (post-ReLU pooled ResNet features, with the
zeros and skew that real caches have), run over the train split with K views. The same float32 arrays go through
`FeatureCacheWriter` (chunk = 256 samples, as the shards) for every codec in `pipeline.config.CODECS`, and back through
`open_cache(...).load_all()`; best of `--repeats` for the throughputs.

  python benchmarks/bench_storage.py                        # test_resnet (96-d) and resnet18 (512-d), K=8, CPU
  python benchmarks/bench_storage.py --device cuda --teachers resnet18 resnet50 --views 16
"""

from __future__ import annotations

import numpy as np
import torch
from benchlib import (
    digits_shards,
    fresh_dir,
    machine,
    make_parser,
    result_name,
    setup,
    timed,
    trained_teacher,
    write_results,
)

from pipeline.cache.meta import CacheMeta
from pipeline.cache.store import FeatureCacheWriter, open_cache
from pipeline.config import CODECS, ViewPolicy
from pipeline.data.shards import ShardIndex, load_split
from pipeline.data.views import sample_views
from pipeline.extract.extract import TeacherRunner, teacher_fingerprint

NAME = "storage"


def teacher_outputs(runner: TeacherRunner, index: ShardIndex, k: int, batch: int) -> dict[str, np.ndarray]:
    """float32 features (N, K, D), logits (N, K, C), views (N, K, 5), keys and labels of the train split."""
    data = load_split(index.split("train"))
    views = sample_views(data.keys, k, ViewPolicy(), 0, int(index.spec["image_size"]))
    flat = torch.from_numpy(views.reshape(-1, 5))
    rows = torch.arange(len(flat)) // k
    feats, logits = [], []
    for start in range(0, len(flat), batch):
        f, z = runner(data.images[rows[start : start + batch]], flat[start : start + batch])
        feats.append(f.cpu())
        logits.append(z.cpu())
    n = len(data.keys)
    return {
        "features": torch.cat(feats).view(n, k, -1).numpy(),
        "logits": torch.cat(logits).view(n, k, -1).numpy(),
        "views": views,
        "keys": data.keys,
        "labels": data.labels.numpy().astype(np.int32),
    }


def write_store(out, index: ShardIndex, tdir, runner: TeacherRunner, arrays: dict, codec: str, chunk: int) -> None:
    """A complete store of `arrays` with `codec`, written chunk by chunk as extraction does."""
    n, k = arrays["features"].shape[:2]
    meta = CacheMeta(
        teacher=teacher_fingerprint(tdir),
        dataset={"name": index.spec["name"], "spec_hash": index.spec_hash, "split": "train", "n": n},
        views={"K": k, "policy": ViewPolicy().to_dict(), "seed": 0},
        codec=codec,
    )
    writer = FeatureCacheWriter.open(
        out,
        "train",
        meta,
        chunk_size=chunk,
        keys=arrays["keys"],
        labels=arrays["labels"],
        head_weight=runner.weight.cpu().numpy(),
        head_bias=runner.bias.cpu().numpy(),
    )
    for i in range(writer.n_chunks):
        part = slice(i * chunk, (i + 1) * chunk)
        writer.write_chunk(i, arrays["features"][part], arrays["logits"][part], arrays["views"][part])
    assert writer.finalize()


def errors(ref: np.ndarray, got: np.ndarray) -> dict:
    """Max abs error, max abs error over the value range, RMS relative error, max/mean elementwise relative error."""
    err = np.abs(got.astype(np.float64) - ref)
    scale = np.abs(ref).max()
    big = np.abs(ref) > 1e-3 * scale  # elementwise relative error only where the value is not ~0
    rel = err[big] / np.abs(ref[big])
    return {
        "max_abs": float(err.max()),
        "max_abs_over_range": float(err.max() / scale),
        "rms_rel": float(np.sqrt((err**2).sum() / (ref.astype(np.float64) ** 2).sum())),
        "max_rel": float(rel.max()),
        "mean_rel": float(rel.mean()),
    }


def measure_teacher(args, index: ShardIndex, name: str, device: torch.device) -> tuple[list[dict], list[dict], dict]:
    """Size, throughput and error of every codec on one teacher's features."""
    tdir = trained_teacher(
        args.work / "teachers" / f"digits-{name}-trained{args.teacher_epochs}", index, name, args.teacher_epochs, device
    )
    runner = TeacherRunner(tdir, device, None)
    arrays = teacher_outputs(runner, index, args.views, 512)
    n, k, d = arrays["features"].shape
    c = arrays["logits"].shape[-1]
    pairs = n * k
    raw32 = arrays["features"].nbytes + arrays["logits"].nbytes  # float32 values, the uncompressed reference
    feats = arrays["features"]
    about = {
        "teacher": name,
        "N": n,
        "K": k,
        "D": d,
        "C": c,
        "zero_fraction": float((feats == 0).mean()),
        "min": float(feats.min()),
        "max": float(feats.max()),
        "float32_bytes_per_sample_view": raw32 / pairs + 20,
    }
    sizes, quality = [], []
    out = args.work / f"storage-{name}"
    for codec in CODECS:
        write_s, read_s = [], []
        for _ in range(args.repeats):
            fresh_dir(out)
            write_s.append(
                timed(
                    lambda codec=codec: write_store(out, index, tdir, runner, arrays, codec, 256), torch.device("cpu")
                )[0]
            )
            seconds, back = timed(lambda: open_cache(out, "train").load_all(), torch.device("cpu"))
            read_s.append(seconds)
        info = open_cache(out, "train").info()
        values = sum(info["stored_bytes"].get(a, 0) for a in ("features", "logits", "features_scale"))
        sizes.append(
            {
                "teacher": f"{name} ({d}-d)",
                "codec": codec,
                "bytes_per_sample_view": info["bytes_per_sample_view"],
                "bytes_per_value": info["bytes_per_value"],
                "features_bytes_per_value": info["stored_bytes"]["features"] / (pairs * d),
                "ratio_vs_float32": raw32 / values,
                "write_sample_views_per_s": pairs / min(write_s),
                "write_MB_per_s_float32": raw32 / min(write_s) / 1e6,
                "read_sample_views_per_s": pairs / min(read_s),
                "read_MB_per_s_float32": raw32 / min(read_s) / 1e6,
            }
        )
        f_err, z_err = errors(arrays["features"], back["features"]), errors(arrays["logits"], back["logits"])
        agree = (back["logits"].argmax(-1) == arrays["logits"].argmax(-1)).mean() * 100
        quality.append(
            {
                "teacher": f"{name} ({d}-d)",
                "codec": codec,
                **{f"feat_{key}": value for key, value in f_err.items()},
                "logit_max_abs": z_err["max_abs"],
                "logit_argmax_agree_pct": float(agree),
                "views_exact": bool(np.array_equal(back["views"], arrays["views"])),
            }
        )
        print(
            f"{name} {codec}: {sizes[-1]['bytes_per_sample_view']:.1f} B/(sample,view), "
            f"{sizes[-1]['bytes_per_value']:.3f} B/value, write {sizes[-1]['write_sample_views_per_s']:.0f}/s, "
            f"read {sizes[-1]['read_sample_views_per_s']:.0f}/s, feat max abs err {f_err['max_abs']:.2e}"
        )
    return sizes, quality, about


def main() -> None:
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--teachers", nargs="+", default=["test_resnet", "resnet18"])
    parser.add_argument("--teacher-epochs", type=int, default=4)
    parser.add_argument("--views", type=int, default=8, help="K views per sample (params.yaml: 8)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = setup(args)
    index = digits_shards(args.work, 256)
    sizes, quality, about = [], [], []
    for name in args.teachers:
        s, q, a = measure_teacher(args, index, name, device)
        sizes += s
        quality += q
        about.append(a)
    default = {r["teacher"]: r for r in sizes if r["codec"] == "zstd"}
    summary = {f"zstd bytes per value, {t}": r["bytes_per_value"] for t, r in default.items()}
    summary |= {f"zstd bytes per (sample, view), {t}": r["bytes_per_sample_view"] for t, r in default.items()}
    tables = {"size and throughput": sizes, "error against the float32 teacher outputs": quality, "features": about}
    notes = [
        f"digits train split, K={args.views} views per sample, chunks of 256 samples; teachers trained here for "
        f"{args.teacher_epochs} epochs (cross-entropy); best of {args.repeats} writes/reads.",
        "bytes_per_sample_view: features + logits (+ int8 scales) + views (5 float32) per (sample, view), chunk "
        "bytes on disk; bytes_per_value: features + logits (+ scales) per stored feature or logit value; "
        "ratio_vs_float32: float32 feature+logit bytes over stored ones.",
        "write: encode + compress + chunk files + done flags (FeatureCacheWriter.write_chunk per chunk, finalize); "
        "read: open_cache(...).load_all() to float32; MB/s counted in float32 bytes.",
        "errors are against the float32 teacher outputs, so the lossless-on-float16 codecs show float16 rounding; "
        "max_rel/mean_rel: elementwise, over values above 1e-3 of the largest |value|.",
    ]
    write_results(args.out, result_name(NAME, args), machine(device), tables, summary, notes)


if __name__ == "__main__":
    main()
