"""`gendd cache verify`: the integrity check of one split's feature cache, then a sampled replay through the teacher.

The scan reads every chunk of every array (Zarr: each chunk's crc32c is checked as it decodes; webdataset: each tar
against its recorded CRC-32, then parsed) and checks what it read against the attributes: the required fields,
shapes and dtypes, NaN or inf in features, logits, views, features_scale and the teacher head, every done flag set
and `complete` set, labels and keys one per sample, keys unique, labels in [-1, C). It does not stop at a problem:
each one is collected as "<array> chunk <i>: <what>: <fix>" and the report lists them all.

The replay recomputes random (sample, view) pairs from the image shards with the teacher (float32, CPU) and compares
them with the cached features and logits against a per-codec tolerance (`TOLERANCE`). `quick` skips the scan.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.cache.scan import Problem, Report, scan
from pipeline.cache.store import FeatureCache, changed_shard, find_store
from pipeline.cache.wds_store import StoreDamage
from pipeline.cache.zarr_store import PER_SAMPLE
from pipeline.errors import GenddError

# Replay pass/fail per codec: (min cosine, max abs error as a fraction of the feature scale = max |teacher feature|
# over the replayed pairs); logits get the same fraction of their own scale. The replay runs the teacher in float32
# on the CPU, while the cache may come from a GPU run under --mixed-precision fp16/bf16 (bf16 keeps 8 mantissa bits,
# ~0.4% per operation, partly compounding through the network), so the bounds leave ~1% of the scale on top of what
# the codec itself loses. What they must catch is far larger: another view, sample or teacher, or a scrambled chunk,
# gives cosines well under 0.99 and errors of tens of percent of the scale (two views of one sample already differ
# by more than 2% of the scale; see tests/test_extract.py).
# - lossless codecs store float16: rounding <= 2^-11 (0.05%) of each value;
# - bf16 rounds to <= 2^-9 (0.2%) of each value: a little more room;
# - int8 puts every value within absmax/254 of its (sample, view) row (0.4% of the scale), on every component at
#   once: for peaked post-ReLU features (absmax ~10x the rms) the cosine drops to ~0.9995, so 0.995 keeps a margin.
TOLERANCE = {
    "zstd": (0.999, 2e-2),
    "lz4": (0.999, 2e-2),
    "none": (0.999, 2e-2),
    "bf16": (0.998, 3e-2),
    "int8": (0.995, 4e-2),
}


_BATCH = 64  # replayed pairs per teacher forward


def replay(
    cache: FeatureCache,
    report: Report,
    teacher: Path,
    shard_set,
    samples: int,
    seed: int,
    skip: set[int],
) -> None:
    """Recompute `samples` random (sample, view) pairs of finished chunks outside `skip` with the teacher and compare
    them with the cache; pairs past the tolerance, and chunks that fail to read, become problems."""
    import torch

    from pipeline.data.shards import read_shard
    from pipeline.extract.extract import TeacherRunner

    chunks = [i for i in range(cache.n_chunks) if cache.done[i] and i not in skip]
    pool = np.concatenate([np.arange(*cache.chunk_bounds(i)) for i in chunks]) if chunks else np.zeros(0, np.int64)
    if not pool.size:
        report.notes.append("replay: no finished, undamaged chunk to replay")
        return
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(pool, size=min(samples, pool.size), replace=False))
    view_of = rng.integers(0, cache.K, size=len(picks))

    cached = {"features": [], "logits": [], "views": []}
    kept = []
    for c in np.unique(picks // cache.chunk_size):
        rows = np.flatnonzero(picks // cache.chunk_size == c)
        try:
            chunk = cache.read_chunk(int(c))
        except StoreDamage as exc:
            report.damage(exc)
            continue
        local, views = picks[rows] - c * cache.chunk_size, view_of[rows]
        for name in cached:
            cached[name].append(chunk[name][local, views])
        kept.append(rows)
    if not kept:
        return
    rows = np.concatenate(kept)
    picks, view_of = picks[rows], view_of[rows]
    shard_of = np.searchsorted(shard_set.starts, picks, side="right") - 1
    images = []
    for shard in np.unique(shard_of):  # one decoded shard in memory at a time
        data = read_shard(shard_set.path(int(shard)))
        for p in picks[shard_of == shard]:
            j = int(p - shard_set.starts[shard])
            if data.keys[j] != (key := cache.keys[p].decode()):
                what = f"sample {p} is {key!r} in the cache but {data.keys[j]!r} in {shard_set.path(shard)}"
                fix = "re-run gendd extract with these shards (or pass the shards the cache was built from)"
                report.add("keys", None, what, fix)
                return
            images.append(data.images[j].clone())  # not a view: the shard is freed
    runner = TeacherRunner(teacher, torch.device("cpu"), None)
    stored = {name: torch.from_numpy(np.concatenate(arrays)) for name, arrays in cached.items()}
    outputs = [
        runner(torch.stack(images[b : b + _BATCH]), stored["views"][b : b + _BATCH])
        for b in range(0, len(images), _BATCH)
    ]
    fresh = torch.cat([features for features, _ in outputs])
    fresh_logits = torch.cat([logits for _, logits in outputs])
    cosine = torch.nn.functional.cosine_similarity(fresh, stored["features"], dim=1)
    error = (fresh - stored["features"]).abs().amax(dim=1)
    logit_error = (fresh_logits - stored["logits"]).abs().amax(dim=1)
    scale, logit_scale = float(fresh.abs().max()), float(fresh_logits.abs().max())
    min_cosine, fraction = TOLERANCE[cache.meta.codec]
    report.replay = {
        "pairs": len(picks),
        "max_abs_error": float(error.max()),
        "min_cosine": float(cosine.min()),
        "feature_scale": scale,
        "logits_max_abs_error": float(logit_error.max()),
        "logit_scale": logit_scale,
        "tolerance": (min_cosine, fraction),
    }
    fix = "re-run gendd extract with this teacher and these shards (delete the store first)"
    for j in range(len(picks)):
        cos, err, lerr = float(cosine[j]), float(error[j]), float(logit_error[j])
        if cos < min_cosine or err > fraction * scale:
            what = f"sample {picks[j]} view {view_of[j]} differs from the teacher (cosine {cos:.6f}, max abs error "
            what += f"{err:.3g}; pass: cosine >= {min_cosine}, error <= {fraction * scale:.3g})"
            report.add("features", int(picks[j] // cache.chunk_size), what, fix)
        elif lerr > fraction * logit_scale:
            what = f"sample {picks[j]} view {view_of[j]} differs from the teacher (max abs error {lerr:.3g} > "
            report.add("logits", int(picks[j] // cache.chunk_size), what + f"{fraction * logit_scale:.3g})", fix)


def verify(
    root: str | Path,
    split: str,
    *,
    teacher: Path | None = None,
    shards: str | Path | None = None,
    samples: int = 32,
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
) -> Report:
    """Check one split's cache: the full scan (unless `quick`), then `samples` replayed pairs (0: no replay, no
    teacher or shards needed). Problems are collected in the returned report; arguments that cannot work (a missing
    teacher, shards or store) raise GenddError at once."""
    if samples < 0:
        raise GenddError(f"--samples must be >= 0 (0 skips the teacher replay), got {samples}")
    if quick and samples == 0:
        raise GenddError("--quick with --samples 0 checks nothing: drop --quick, or replay some samples")
    if samples and (teacher is None or shards is None):
        raise GenddError(
            "cache verify: the teacher replay needs --teacher and --shards: pass both, or --samples 0 to skip it"
        )
    sha = shard_set = spec_hash = None
    if samples:  # before a long scan: the teacher and shards must be there
        from pipeline.data.shards import load_index
        from pipeline.extract.extract import teacher_fingerprint

        sha = teacher_fingerprint(teacher)["checkpoint_sha256"]
        index = load_index(shards)
        shard_set, spec_hash = index.split(split), index.spec_hash
    store = find_store(root, split)  # unreadable at all (no group, no meta.json): a GenddError, nothing to list
    report = Report(store.path, store.fmt)
    if not quick:
        scan(store, report, progress)
    if not samples:
        return report
    try:
        cache = FeatureCache(store)
    except GenddError as exc:
        if quick or not report.problems:  # else the scan has listed what stops it opening
            report.problems.append(Problem("cache", None, f"cannot be opened ({exc})"))
        report.notes.append("replay: not run (the cache cannot be opened)")
        return report
    if quick and not cache.complete:
        report.add("attributes", None, "complete is not set (the extraction did not finish)", "re-run gendd extract")
    meta = cache.meta
    for what, found, wanted, how in (
        ("teacher checkpoint sha256", meta.teacher["checkpoint_sha256"], sha, f"with the teacher {teacher}"),
        ("dataset spec hash", meta.dataset["spec_hash"], spec_hash, f"after gendd prepare of {shards}"),
    ):
        if found != wanted:
            what = f"record {what} {str(found)[:16]}, not {str(wanted)[:16]}"
            report.add("attributes", None, what, f"re-run gendd extract {how}")
            report.notes.append("replay: not run (the cache was built from another teacher or other shards)")
            return report
    if shard_set.n != cache.n:
        report.add("attributes", None, f"record N={cache.n}, the shards of split {split!r} hold {shard_set.n}")
        return report
    if changed := changed_shard(cache, shard_set):
        report.add("attributes", None, f"record that the cache was built from {changed}", "re-run gendd extract")
        report.notes.append("replay: not run (the cache was built from other shards)")
        return report
    damaged = [p.chunk for p in report.problems if p.array in PER_SAMPLE or p.array.endswith(".tar")]
    replay(cache, report, teacher, shard_set, samples, seed, {c for c in damaged if isinstance(c, int)})
    return report
