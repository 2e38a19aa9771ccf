"""Feature cache: round-trips per codec and format, layout, resume, concurrent writers, refusals, info."""

import io
import json
import multiprocessing
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline.cache.meta import CacheMeta
from pipeline.cache.store import FeatureCacheWriter, open_cache
from pipeline.config import CODECS, FORMATS
from pipeline.errors import GenddError

N, K, D, C, CHUNK = 10, 3, 16, 5, 4  # 3 chunks, the last one partial (2 samples)


def make_meta(
    codec: str = "zstd", sha: str = "a" * 64, spec_hash: str = "spec-1", seed: int = 0, n: int = N
) -> CacheMeta:
    teacher = {
        "name": "resnet18",
        "checkpoint_sha256": sha,
        "feature_dim": D,
        "num_classes": C,
        "input_size": (3, 8, 8),
        "mean": (0.5, 0.5, 0.5),
        "std": (0.25, 0.25, 0.25),
    }
    dataset = {"name": "digits", "spec_hash": spec_hash, "split": "train", "n": n}
    views = {"K": K, "policy": {"kind": "random_resized_crop", "scale": [0.35, 1.0], "flip": True}, "seed": seed}
    return CacheMeta(teacher=teacher, dataset=dataset, views=views, codec=codec)


def make_data(seed: int = 0, n: int = N) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "features": (rng.standard_normal((n, K, D)) * 2).astype(np.float32),
        "logits": (rng.standard_normal((n, K, C)) * 5).astype(np.float32),
        "views": rng.random((n, K, 5)).astype(np.float32),
        "labels": np.where(np.arange(n) % 4 == 1, -1, rng.integers(0, C, n)),  # some unlabeled samples
        "keys": [f"sample-{i:05d}" for i in range(n)],
        "images": [bytes([i % 256]) * (i + 1) for i in range(n)],
        "head_weight": rng.standard_normal((C, D)).astype(np.float32),
        "head_bias": rng.standard_normal(C).astype(np.float32),
    }


def open_writer(root: Path, data: dict, meta: CacheMeta, fmt: str = "zarr", chunk: int = CHUNK) -> FeatureCacheWriter:
    return FeatureCacheWriter.open(
        root,
        "train",
        meta,
        chunk_size=chunk,
        keys=data["keys"],
        labels=data["labels"],
        head_weight=data["head_weight"],
        head_bias=data["head_bias"],
        fmt=fmt,
    )


def write_chunks(writer: FeatureCacheWriter, data: dict, chunks: list[int]) -> None:
    for i in chunks:
        rows = slice(i * writer.chunk_size, (i + 1) * writer.chunk_size)
        writer.write_chunk(i, data["features"][rows], data["logits"][rows], data["views"][rows], data["images"][rows])


def build(root: Path, codec: str = "zstd", fmt: str = "zarr", data: dict | None = None, chunk: int = CHUNK) -> Path:
    data = data or make_data()
    writer = open_writer(root, data, make_meta(codec, n=len(data["keys"])), fmt, chunk)
    write_chunks(writer, data, list(range(writer.n_chunks)))
    assert writer.finalize() and writer.complete
    return root


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _fill_as_rank(root: str, rank: int, world: int) -> None:
    # Runs in a spawned process: regenerates the same data, opens its own writer, fills its own chunks.
    data = make_data()
    writer = open_writer(Path(root), data, make_meta())
    write_chunks(writer, data, writer.pending_chunks(rank, world))
    writer.finalize()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("codec", CODECS)
def test_round_trip(tmp_path: Path, fmt: str, codec: str) -> None:
    data = make_data()
    cache = open_cache(build(tmp_path, codec, fmt, data), "train", teacher_sha256="a" * 64, spec_hash="spec-1")
    got = cache.load_all()
    assert (cache.n, cache.K, cache.feature_dim, cache.num_classes, cache.n_chunks, cache.fmt) == (N, K, D, C, 3, fmt)
    assert all(v.dtype == np.float32 for k, v in got.items() if k != "labels")
    x, logits = data["features"], data["logits"]
    if codec == "bf16":
        assert np.all(np.abs(got["features"] - x) <= np.abs(x) * 2.0**-8)
        assert np.all(np.abs(got["logits"] - logits) <= np.abs(logits) * 2.0**-8)
        assert not np.any(got["features"].view(np.uint32) & 0xFFFF)  # really bfloat16: low mantissa bits zero
    elif codec == "int8":
        scale = np.abs(x).max(-1, keepdims=True) / 127
        assert np.all(np.abs(got["features"] - x) <= scale / 2 * (1 + 1e-5))
        assert np.array_equal(got["logits"], logits.astype(np.float16).astype(np.float32))
    else:
        assert np.array_equal(got["features"], x.astype(np.float16).astype(np.float32))
        assert np.array_equal(got["logits"], logits.astype(np.float16).astype(np.float32))
    assert np.array_equal(got["views"], data["views"])
    assert np.array_equal(got["labels"], data["labels"]) and cache.labels.dtype == np.int64
    assert cache.keys.dtype.kind == "S" and np.strings.decode(cache.keys).tolist() == data["keys"]
    assert np.array_equal(cache.head_weight, data["head_weight"]) and np.array_equal(cache.head_bias, data["head_bias"])
    assert cache.read_chunk(2)["features"].shape == (N - 2 * CHUNK, K, D)
    indices = np.array([9, 0, 5, 5, 3, 8])
    picked = cache.read(indices)
    for name, array in picked.items():
        assert np.array_equal(array, got[name][indices]), name


@pytest.mark.parametrize("codec", CODECS)
def test_zarr_layout_opens_with_plain_zarr(tmp_path: Path, codec: str) -> None:
    data = make_data()
    group = zarr.open(build(tmp_path, codec) / "train.zarr", mode="r")
    value = {"int8": np.int8, "bf16": np.uint16}.get(codec, np.float16)
    blosc = [c.cname.value for c in group["features"].compressors if isinstance(c, BloscCodec)]
    assert blosc == {"none": [], "lz4": ["lz4"]}.get(codec, ["zstd"])
    assert isinstance(group["features"].compressors[-1], Crc32cCodec)
    expected = {
        "features": ((N, K, D), value, (CHUNK, K, D)),
        "logits": ((N, K, C), np.uint16 if codec == "bf16" else np.float16, (CHUNK, K, C)),
        "views": ((N, K, 5), np.float32, (CHUNK, K, 5)),
        "labels": ((N,), np.int32, None),
        "head/weight": ((C, D), np.float32, None),
        "head/bias": ((C,), np.float32, None),
        "done": ((3,), np.bool_, (1,)),
    }
    if codec == "int8":
        expected["features_scale"] = ((N, K), np.float32, (CHUNK, K))
    for name, (shape, dtype, chunks) in expected.items():
        array = group[name]
        assert array.shape == shape and array.dtype == np.dtype(dtype), name
        assert chunks is None or array.chunks == chunks, name
    keys = group["keys"][:].tolist()
    assert group["keys"].shape == (N,) and keys == data["keys"] and all(type(k) is str for k in keys)
    assert group["done"][:].all()
    attrs = group.attrs.asdict()
    assert attrs["schema_version"] == 1 and attrs["codec"] == codec and attrs["complete"] is True
    assert attrs["teacher"]["checkpoint_sha256"] == "a" * 64 and attrs["teacher"]["input_size"] == [3, 8, 8]
    assert attrs["dataset"] == {"name": "digits", "spec_hash": "spec-1", "split": "train", "n": N}
    assert attrs["views"]["K"] == K and attrs["views"]["seed"] == 0 and attrs["views"]["policy"]["flip"] is True


def test_webdataset_layout(tmp_path: Path) -> None:
    data = make_data()
    root = build(tmp_path, "int8", "webdataset", data) / "train-features"
    assert sorted(p.name for p in root.glob("*.tar")) == [f"train-{i:06d}.tar" for i in range(3)]
    for i in range(3):  # each tar's CRC-32 and size beside it (a tar has no checksum over its contents)
        tar = (root / f"train-{i:06d}.tar").read_bytes()
        record = (root / f"train-{i:06d}.tar.crc32").read_text()
        assert record == f"crc32 {zlib.crc32(tar):08x} bytes {len(tar)}\n"
    meta = json.loads((root / "meta.json").read_text())
    assert meta["complete"] is True and meta["codec"] == "int8" and meta["keys"] == data["keys"]
    assert meta["done"] == [True] * 3 and meta["labels"] == data["labels"].tolist()
    members = {}
    for i in range(3):
        with tarfile.open(root / f"train-{i:06d}.tar") as tar:
            members |= {m.name: tar.extractfile(m).read() for m in tar}
    assert -1 in data["labels"] and (data["labels"] >= 0).any()  # both kinds of sample are exercised
    for key, label, image in zip(data["keys"], data["labels"], data["images"], strict=True):
        assert members[f"{key}.png"] == image and members.get(f"{key}.cls") == (
            str(label).encode() if label >= 0 else None
        )
        features = np.load(io.BytesIO(members[f"{key}.features.npy"]))
        scale = np.load(io.BytesIO(members[f"{key}.features_scale.npy"]))
        logits, views = (np.load(io.BytesIO(members[f"{key}.{name}.npy"])) for name in ("logits", "views"))
        assert (features.dtype, features.shape, scale.shape) == (np.int8, (K, D), (K,))
        assert (logits.dtype, logits.shape, views.dtype, views.shape) == (np.float16, (K, C), np.float32, (K, 5))
    assert len(members) == 6 * N - int((data["labels"] < 0).sum()) and not (root.parent / "train.zarr").exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_equals_single_pass(tmp_path: Path, fmt: str) -> None:
    data = make_data()
    one_go = build(tmp_path / "one", "zstd", fmt, data)
    writer = open_writer(tmp_path / "resumed", data, make_meta(), fmt)
    write_chunks(writer, data, [0, 2])
    assert not writer.finalize() and not writer.complete
    del writer  # a killed extraction: nothing survives but the store
    writer = open_writer(tmp_path / "resumed", data, make_meta(), fmt)
    assert writer.pending_chunks() == [1]
    write_chunks(writer, data, [1, 0])  # rewriting a finished chunk is harmless (idempotent)
    assert writer.finalize()
    assert open_writer(tmp_path / "resumed", data, make_meta(), fmt).pending_chunks() == []
    a, b = open_cache(one_go, "train").load_all(), open_cache(tmp_path / "resumed", "train").load_all()
    assert all(a[name].tobytes() == b[name].tobytes() for name in a)
    assert tree_bytes(one_go) == tree_bytes(tmp_path / "resumed")  # every file identical, byte for byte


@pytest.mark.parametrize("fmt", FORMATS)
def test_keys_are_one_utf8_bytes_array_in_both_formats(tmp_path: Path, fmt: str) -> None:
    data = make_data()
    data["keys"] = [f"cl\u00e4sse/{i}" for i in range(N)]  # non-ASCII: 2 bytes in UTF-8
    cache = open_cache(build(tmp_path, fmt=fmt, data=data), "train")
    assert cache.keys.dtype == np.dtype(f"S{len(data['keys'][0].encode())}")
    assert [key.decode() for key in cache.keys] == data["keys"]
    writer = open_writer(tmp_path, data, make_meta(), fmt)  # resume compares keys as arrays
    assert writer.pending_chunks() == []
    with pytest.raises(GenddError, match="different keys"):
        open_writer(tmp_path, data | {"keys": data["keys"][::-1]}, make_meta(), fmt)


def _link_tree(store: Path, mirror: Path, how: str) -> dict[str, bytes]:
    """Link every file of `store` from `mirror` the way DVC's hardlink or symlink cache types do; returns the bytes."""
    before = tree_bytes(store)
    for name in before:
        (mirror / name).parent.mkdir(parents=True, exist_ok=True)
        if how == "hardlink":
            (mirror / name).hardlink_to(store / name)
        else:  # the store's file becomes a symlink to the "cache" copy
            (store / name).rename(mirror / name)
            (store / name).symlink_to(mirror / name)
    return before


@pytest.mark.parametrize("how", ["hardlink", "symlink"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_writes_replace_files_and_never_modify_a_linked_one(tmp_path: Path, fmt: str, how: str) -> None:
    """A DVC-linked cache (its files hardlinks or symlinks into DVC's cache) is rewritten by new files only: chunks
    written again, a chunk redone after its done flag (tar) was deleted, and the attributes set again."""
    data = make_data()
    root = build(tmp_path / "cache", fmt=fmt, data=data)
    store = root / ("train.zarr" if fmt == "zarr" else "train-features")
    linked = _link_tree(store, tmp_path / "dvc-cache", how)
    (store / ("done/c/1" if fmt == "zarr" else "train-000001.tar")).unlink()  # redo chunk 1
    other = make_data(seed=1) | {"keys": data["keys"], "labels": data["labels"]}
    writer = open_writer(root, data, make_meta(), fmt)
    assert writer.pending_chunks() == [1]
    write_chunks(writer, other, [0, 1])  # other values: a write in place would change the linked bytes
    writer._store.set_complete()  # rewrites zarr.json / meta.json
    assert tree_bytes(tmp_path / "dvc-cache") == linked
    assert open_cache(root, "train").read_chunk(0)["views"].tobytes() == other["views"][:CHUNK].tobytes()


def test_pending_chunks_split_across_ranks(tmp_path: Path) -> None:
    writer = open_writer(tmp_path, make_data(n=30), make_meta(n=30))  # 8 chunks
    assert writer.pending_chunks(0, 3) == [0, 3, 6] and writer.pending_chunks(2, 3) == [2, 5]
    with pytest.raises(ValueError):
        writer.pending_chunks(3, 3)


def test_two_processes_fill_one_store(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")  # fork is unsafe once zarr's event-loop thread is running
    workers = [context.Process(target=_fill_as_rank, args=(str(tmp_path / "shared"), r, 2)) for r in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    shared = open_cache(tmp_path / "shared", "train")  # refuses unless some rank set `complete`
    single = open_cache(build(tmp_path / "single"), "train")
    a, b = shared.load_all(), single.load_all()
    assert all(np.array_equal(a[name], b[name]) for name in a)
    assert tree_bytes(tmp_path / "shared") == tree_bytes(tmp_path / "single")
    assert not list((tmp_path / "shared").glob(".*"))  # the losing creator cleaned up its temp store


def test_two_writers_fill_one_webdataset_cache(tmp_path: Path) -> None:
    data = make_data()
    ranks = [open_writer(tmp_path / "shared", data, make_meta(), "webdataset") for _ in range(2)]
    for rank, writer in enumerate(ranks):
        write_chunks(writer, data, writer.pending_chunks(rank, 2))
    assert [w.finalize() for w in ranks] == [True, True]
    assert tree_bytes(tmp_path / "shared") == tree_bytes(build(tmp_path / "single", fmt="webdataset", data=data))


def _refusal(tmp_path: Path, case: str) -> None:
    data = make_data()
    if case == "incomplete":
        write_chunks(open_writer(tmp_path, data, make_meta()), data, [0])
        open_cache(tmp_path, "train")
    build(tmp_path, data=data)
    calls = {
        "teacher sha": lambda: open_cache(tmp_path, "train", teacher_sha256="b" * 64),
        "spec hash": lambda: open_cache(tmp_path, "train", spec_hash="spec-2"),
        "missing split": lambda: open_cache(tmp_path, "val"),
        "missing cache": lambda: open_cache(tmp_path / "nowhere", "train"),
        "other meta": lambda: open_writer(tmp_path, data, make_meta(seed=1)),
        "other codec": lambda: open_writer(tmp_path, data, make_meta("lz4")),
        "other chunking": lambda: open_writer(tmp_path, data, make_meta(), chunk=5),
        "unknown codec": lambda: open_writer(tmp_path / "new", data, make_meta("gzip")),
        "unknown format": lambda: open_writer(tmp_path / "new", data, make_meta(), "hdf5"),
        "no images": lambda: open_writer(tmp_path, data, make_meta(), "webdataset").write_chunk(
            0, data["features"][:4], data["logits"][:4], data["views"][:4]
        ),
        "wrong shape": lambda: open_writer(tmp_path, data, make_meta()).write_chunk(0, *(np.zeros((4, K, 7)),) * 3),
        "fp16 overflow": lambda: write_chunks(
            open_writer(tmp_path, data | {"logits": data["logits"] * 1e5}, make_meta()),
            data | {"logits": data["logits"] * 1e5},
            [0],
        ),
        "nan": lambda: write_chunks(
            open_writer(tmp_path, data, make_meta()), data | {"features": data["features"] * np.nan}, [0]
        ),
    }
    calls[case]()


@pytest.mark.parametrize("damage", ["lost zarr chunk", "truncated zarr chunk", "lost tar", "truncated tar"])
def test_damaged_store_is_an_error_not_zeros(tmp_path: Path, damage: str) -> None:
    fmt = "zarr" if "zarr" in damage else "webdataset"
    root = build(tmp_path, "zstd", fmt)
    target = root / "train.zarr/logits/c/1/0/0" if fmt == "zarr" else root / "train-features/train-000001.tar"
    if damage.startswith("lost"):
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    cache = open_cache(root, "train")
    assert cache.read_chunk(0)["features"].shape == (CHUNK, K, D)  # the undamaged chunks still read
    with pytest.raises(GenddError, match="delete") as error:
        cache.read(np.array([0, 5]))
    assert "\n" not in str(error.value)
    assert ("logits chunk 1 " if fmt == "zarr" else "train-000001.tar chunk 1 ") in str(error.value)
    if damage.endswith("tar"):  # the advice works: delete the tar, and the writer redoes just that chunk
        target.unlink(missing_ok=True)
        assert open_writer(root, make_data(), make_meta(), fmt).pending_chunks() == [1]


REFUSALS = {
    "incomplete": "1 of 3 chunks done",
    "teacher sha": "sha256 aaaaaaaaaaaaaaaa, not bbbbbbbbbbbbbbbb",
    "spec hash": "dataset spec hash spec-1, not spec-2",
    "missing split": "no cached split 'val' (cached: train)",
    "missing cache": "no feature cache",
    "other meta": "different views",
    "other codec": "codec ('zstd', not 'lz4')",
    "other chunking": "chunk_size (4, not 5)",
    "unknown codec": "zstd, lz4, none, bf16, int8",
    "unknown format": "zarr, webdataset",
    "no images": "pass images=",
    "wrong shape": "expected (4, 3, 16)",
    "fp16 overflow": "bf16",
    "nan": "NaN",
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_are_one_line_errors(tmp_path: Path, case: str) -> None:
    with pytest.raises(GenddError) as error:
        _refusal(tmp_path, case)
    message = str(error.value)
    assert REFUSALS[case] in message and "\n" not in message and ": " in message


def test_info_reports_storage_cost(tmp_path: Path) -> None:
    data = make_data(n=64)
    info = {c: open_cache(build(tmp_path / c, c, data=data, chunk=16), "train").info() for c in CODECS}
    value_bytes = {
        c: sum(i["stored_bytes"].get(a, 0) for a in ("features", "logits", "features_scale")) for c, i in info.items()
    }
    assert info["none"]["compression_ratio"] == pytest.approx(2.0, rel=0.01)  # float16 vs float32 (+ checksums)
    assert info["none"]["bytes_per_value"] == pytest.approx(2.0, rel=0.01)
    assert value_bytes["zstd"] < value_bytes["none"]  # (Gaussian noise barely compresses; lz4 may not at all)
    assert value_bytes["bf16"] < value_bytes["none"] and value_bytes["int8"] < value_bytes["none"]
    for i in info.values():
        assert i["bytes_per_value"] > 0 and i["bytes_per_sample_view"] > 0 and i["compression_ratio"] > 1
        assert (i["N"], i["K"], i["D"], i["C"], i["chunks_done"], i["complete"]) == (64, K, D, C, 4, True)
    wds = open_cache(build(tmp_path / "wds", "int8", "webdataset", data, chunk=16), "train").info()
    assert wds["bytes_per_value"] > 0 and wds["compression_ratio"] > 0 and wds["stored_bytes"]["png"] > 0
