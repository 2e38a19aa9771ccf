"""The integrity scan of `gendd cache verify`: every chunk of every array of one split's store is read and checked
against the attributes; each problem is collected as "<array> chunk <i>: <what>: <fix>" (the replay through the
teacher: pipeline/extract/verify.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.cache.codecs import all_finite
from pipeline.cache.meta import attrs_problems, head_problems, index_problems
from pipeline.cache.wds_store import StoreDamage, WdsStore, rebuild_hint
from pipeline.cache.zarr_store import PER_SAMPLE, ZarrStore, stored_dtypes
from pipeline.config import CODECS
from pipeline.errors import GenddError


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
    if codec not in CODECS or min(k, d, c) < 1 or n < 0:
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
