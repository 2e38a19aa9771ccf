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

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import GenddError
from pipeline.store import (
    FeatureCache,
    all_finite,
    attrs_problems,
    changed_shard,
    find_store,
    head_problems,
    index_problems,
)
from pipeline.store_wds import StoreDamage, WdsStore, rebuild_hint
from pipeline.store_zarr import PER_SAMPLE, ZarrStore, stored_dtypes

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


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a store: where (array or file, chunk) and what, with the fix."""

    array: str
    chunk: int | str | None
    what: str
    fix: str = ""

    def __str__(self) -> str:
        where = self.array if self.chunk is None else f"{self.array} chunk {self.chunk}"
        return f"{where}: {self.what}" + (f": {self.fix}" if self.fix else "")


@dataclass
class Report:
    """What `verify` found: problems (each makes the check fail), notes (do not), and what was read."""

    path: Path | str
    fmt: str
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    arrays: int = 0
    chunks_read: int = 0
    scanned: bool = False
    replay: dict | None = None

    def add(self, array: str, chunk: int | str | None, what: str, fix: str | None = None) -> None:
        self.problems.append(Problem(array, chunk, what, rebuild_hint(self.path, "the store") if fix is None else fix))

    def damage(self, exc: StoreDamage) -> None:
        self.problems.append(Problem(exc.array, exc.chunk, exc.why, exc.fix))

    def lines(self) -> list[str]:
        """The report, one line per finding (stdout)."""
        out = [f"verify {self.path} ({self.fmt})"]
        if self.scanned:
            out.append(f"scan: {self.chunks_read} chunks of {self.arrays} arrays read")
        if self.replay is not None and self.replay.get("pairs"):
            r = self.replay
            cosine, error = r["tolerance"]
            out.append(
                f"replay: {r['pairs']} pairs: max abs error {r['max_abs_error']:.3g} (feature scale "
                f"{r['feature_scale']:.3g}), min cosine {r['min_cosine']:.6f} ; logits max abs error "
                f"{r['logits_max_abs_error']:.3g} (logit scale {r['logit_scale']:.3g}) ; pass: cosine >= {cosine}, "
                f"errors <= {error:g} x scale"
            )
        out += [f"note: {note}" for note in self.notes]
        out += [f"problem: {problem}" for problem in self.problems]
        count = len(self.problems)
        out.append(f"{count} problem{'s' * (count != 1)} found" if count else "ok: no problems found")
        return out

    def error(self) -> GenddError | None:
        """The one-line error for a failed check (None when it passed)."""
        if not self.problems:
            return None
        count = len(self.problems)
        return GenddError(
            f"{count} problem{'s' * (count != 1)} in {self.path} (all listed on stdout): first: {self.problems[0]}"
        )


# ---- the scan ---------------------------------------------------------------------------------------------------


def _progress(total: int, path: Path | str, progress: bool):
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, tests)
    name = Path(str(path)).name
    return tqdm(total=total, desc=f"verify {name}", unit="chunk", leave=False, disable=None if progress else True)


def _sizes(attrs: dict) -> tuple[int, int, int, int, str] | None:
    """(N, K, D, C, codec) from attributes that passed `attrs_problems` far enough to be used, else None."""
    try:
        n, k = int(attrs["dataset"]["n"]), int(attrs["views"]["K"])
        d, c = int(attrs["teacher"]["feature_dim"]), int(attrs["teacher"]["num_classes"])
    except (KeyError, TypeError, ValueError):
        return None
    codec = attrs.get("codec")
    if codec not in TOLERANCE or min(k, d, c) < 1 or n < 0:
        return None
    return n, k, d, c, codec


def _check_done(report: Report, done: np.ndarray, complete: bool, name: str, fix: str) -> None:
    """Unfinished chunks: each one in a complete store (damage), one line for an unfinished store."""
    missing = np.flatnonzero(~done)
    if complete:
        for i in missing:
            report.add(name, int(i), "not set in a complete store (the chunk was never finished)", fix)
    elif missing.size:
        what = f"{missing.size} of {done.size} chunks not done (first: chunk {missing[0]})"
        report.add(name, None, what, "re-run gendd extract")


def _check_block(report: Report, name: str, i: int, block: np.ndarray, codec: str, fix: str) -> None:
    if name in stored_dtypes(codec) and not all_finite(block, bf16_bits=codec == "bf16" and name != "views"):
        report.add(name, i, "holds NaN or inf", fix)


def _scan_zarr(store: ZarrStore, report: Report, sizes: tuple, complete: bool, progress: bool) -> None:
    n, k, d, c, codec = sizes
    chunk = store.chunk_size
    n_chunks = -(-n // chunk)
    widths = {"features": d, "logits": c, "views": 5}
    expected: dict[str, tuple[tuple[int, ...], np.dtype | None, tuple[int, ...] | None]] = {}
    for name, dtype in stored_dtypes(codec).items():
        shape = (n, k, widths[name]) if name in widths else (n, k)
        expected[name] = (shape, np.dtype(dtype), (chunk, *shape[1:]))
    expected |= {
        "labels": ((n,), np.dtype(np.int32), None),
        "keys": ((n,), None, None),  # variable-length strings
        "head/weight": ((c, d), np.dtype(np.float32), None),
        "head/bias": ((c,), np.dtype(np.float32), None),
        "done": ((n_chunks,), np.dtype(bool), (1,)),
    }
    for name in store.array_names():
        if name not in expected:
            report.add(name, None, f"is not an array of a {codec} cache")
    usable = []
    for name, (shape, dtype, chunks) in expected.items():
        found = store.describe(name)
        if found is None:
            report.add(name, None, "is missing")
            continue
        got_shape, got_dtype, got_chunks = found
        wrong = []
        if got_shape != shape:
            wrong.append(f"shape {got_shape}, expected {shape}")
        if not (got_dtype == dtype if dtype is not None else got_dtype.kind in "OTU"):
            wrong.append(f"dtype {got_dtype}, expected {dtype or 'strings'}")
        if chunks is not None and got_chunks != chunks:
            wrong.append(f"chunks {got_chunks}, expected {chunks}")
        if wrong:
            report.add(name, None, f"has {', '.join(wrong)} (from the attributes)")
        else:
            usable.append(name)
    report.arrays = len(usable)

    values: dict[str, np.ndarray] = {}
    for name in ("labels", "keys", "head/weight", "head/bias", "done"):
        if name not in usable:
            continue
        blocks = store.blocks(name)
        report.chunks_read += len(blocks)
        try:
            values[name] = store.read_array(name, missing_ok=name == "done")
        except StoreDamage:
            for label, coords in blocks:  # every damaged chunk, not only the first
                try:
                    store.read_block(name, coords, label, missing_ok=name == "done")
                except StoreDamage as exc:
                    report.damage(exc)
    if "labels" in values and "keys" in values:
        for problem in index_problems(values["labels"], values["keys"], n, c):
            report.add(*problem)
    if "head/weight" in values and "head/bias" in values:
        for problem in head_problems(values["head/weight"], values["head/bias"], c, d):
            report.add(*problem)
    done = values.get("done")
    if done is not None:
        _check_done(report, done.astype(bool), complete, "done", "re-run gendd extract (it redoes the chunk)")

    arrays = [name for name in PER_SAMPLE if name in usable]
    with _progress(n_chunks, report.path, progress) as bar:
        for i in range(n_chunks):
            if done is None or done[i]:  # unfinished chunks hold nothing yet
                for name in arrays:
                    report.chunks_read += 1
                    try:
                        block = store.read_block(name, (i, *[0] * (len(expected[name][0]) - 1)), i)
                    except StoreDamage as exc:
                        report.damage(exc)
                        continue
                    _check_block(report, name, i, block, codec, store.chunk_fix(i, name))
            bar.update(1)


def _scan_wds(store: WdsStore, report: Report, sizes: tuple, complete: bool, progress: bool) -> None:
    n, k, d, c, codec = sizes
    n_chunks = -(-n // store.chunk_size)
    if store.n_chunks != n_chunks:
        report.add("meta.json", None, f"records {store.n_chunks} chunks, expected {n_chunks} for N={n}")
        return
    index: dict[str, object] = {}
    for name, read in (("labels", store.labels), ("keys", store.keys), ("head", store.head)):
        try:
            index[name] = read()
        except StoreDamage as exc:
            report.damage(exc)
    report.arrays = 2 + len(stored_dtypes(codec))  # meta.json, head.npz, the per-sample arrays in the tars
    report.chunks_read += 2
    if "labels" in index and "keys" in index:
        for problem in index_problems(index["labels"], index["keys"], n, c):
            report.add(*problem)
    if "head" in index:
        for problem in head_problems(*index["head"], c, d):
            report.add(*problem)
    done = store.done()
    _check_done(report, done, complete, "tar", "re-run gendd extract (it rewrites missing tars)")
    widths = {"features": d, "logits": c, "views": 5}
    unchecked = 0
    with _progress(n_chunks, report.path, progress) as bar:
        for i in np.flatnonzero(done):
            i = int(i)
            start, stop = i * store.chunk_size, min(n, (i + 1) * store.chunk_size)
            fix = store.chunk_fix(i)
            report.chunks_read += 1
            try:
                crc = store.recorded_crc(i)
                unchecked += crc is None
                stored = store.read(i, start, stop, crc, look_up_crc=False)
            except StoreDamage as exc:
                report.damage(exc)
                bar.update(1)
                continue
            for name, dtype in stored_dtypes(codec).items():
                block = stored.get(name)
                shape = (stop - start, k, widths[name]) if name in widths else (stop - start, k)
                if block is None:
                    report.add(name, i, f"is missing from {Path(str(store.shard_path(i))).name}", fix)
                elif block.dtype != np.dtype(dtype) or block.shape != shape:
                    what = f"has dtype {block.dtype}, shape {block.shape}, expected {np.dtype(dtype)}, {shape}"
                    report.add(name, i, what, fix)
                else:
                    _check_block(report, name, i, block, codec, fix)
            for name in sorted(set(stored) - set(stored_dtypes(codec))):
                report.add(name, i, f"is not an array of a {codec} cache", fix)
            bar.update(1)
    if unchecked:
        report.notes.append(
            f"{unchecked} tars have no checksum file (written by an older gendd): parsed and checked, but a flipped "
            "byte inside an image or array would go unnoticed"
        )


def scan(store: ZarrStore | WdsStore, report: Report, progress: bool = True) -> None:
    """Read every chunk of every array of `store`, adding each problem to `report`."""
    report.scanned = True
    attrs = store.attrs
    for problem in attrs_problems(attrs):
        report.add("attributes", None, problem)
    sizes = _sizes(attrs)
    if sizes is None:
        report.notes.append("the attributes lack the sizes or codec the other checks need: nothing else was checked")
        return
    complete = attrs.get("complete") is True
    if not complete:
        report.add("attributes", None, "complete is not set (the extraction did not finish)", "re-run gendd extract")
    if isinstance(store, ZarrStore):
        _scan_zarr(store, report, sizes, complete, progress)
    else:
        _scan_wds(store, report, sizes, complete, progress)


# ---- the replay -------------------------------------------------------------------------------------------------


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

    from pipeline.extract import TeacherRunner
    from pipeline.shards import read_shard

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


# ---- both -------------------------------------------------------------------------------------------------------


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
        from pipeline.extract import teacher_fingerprint
        from pipeline.shards import load_index

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
