"""Reading shards and feature caches from URLs: a local `python -m http.server` (127.0.0.1 only) serves both."""

from __future__ import annotations

import multiprocessing
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline import locations
from pipeline.cache.meta import CacheMeta
from pipeline.cache.store import FeatureCacheWriter, open_cache
from pipeline.data.shards import ShardIndex, decode_shard, load_index, read_shard_labels
from pipeline.errors import GenddError
from pipeline.locations import check_local_out, check_readable, is_url, join

from .conftest import serve_http

N, K, D, C, CHUNK = 10, 2, 8, 4, 4  # 3 chunks, the last one partial


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_cache(root: Path, fmt: str, codec: str = "zstd") -> None:
    """A small complete cache of random float features, written the normal way."""
    rng = np.random.default_rng(0)
    teacher = {"name": "t", "checkpoint_sha256": "a" * 64, "feature_dim": D, "num_classes": C}
    teacher |= {"input_size": (1, 8, 8), "mean": (0.5,), "std": (0.25,)}
    meta = CacheMeta(
        teacher=teacher,
        dataset={"name": "toy", "spec_hash": "h", "split": "train", "n": N},
        views={"K": K, "policy": {"kind": "pad_crop"}, "seed": 0},
        codec=codec,
    )
    writer = FeatureCacheWriter.open(
        root,
        "train",
        meta,
        chunk_size=CHUNK,
        keys=[f"s{i:03d}" for i in range(N)],
        labels=rng.integers(0, C, N),
        head_weight=rng.standard_normal((C, D)),
        head_bias=rng.standard_normal(C),
        fmt=fmt,
    )
    for i in range(writer.n_chunks):
        n_i = min(N, (i + 1) * CHUNK) - i * CHUNK
        features, logits = rng.standard_normal((n_i, K, D)), rng.standard_normal((n_i, K, C)) * 3
        writer.write_chunk(i, features, logits, rng.random((n_i, K, 5)), [bytes([i, j]) for j in range(n_i)])
    assert writer.finalize()


@pytest.fixture(scope="module")
def served(digits_shards: ShardIndex, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """(local root, its URL): shards, a Zarr and a WebDataset cache, and a Zarr cache with a lost chunk file."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(digits_shards.root, root / "shards")
    build_cache(root / "zarr", "zarr")
    build_cache(root / "wds", "webdataset")
    build_cache(root / "broken", "zarr")
    (root / "broken" / "train.zarr" / "features" / "c" / "1" / "0" / "0").unlink()
    with serve_http(root) as url:
        yield root, url


def test_location_helpers(tmp_path: Path) -> None:
    assert is_url("http://127.0.0.1/x") and is_url("s3://bucket/x") and is_url("gs://b/x")
    assert not is_url(tmp_path) and not is_url(str(tmp_path)) and not is_url(f"file://{tmp_path}")
    assert not is_url("C:/data/shards")
    assert join("http://127.0.0.1:1/a/", "b", "c.tar") == "http://127.0.0.1:1/a/b/c.tar"
    assert join(tmp_path, "b", "c.tar") == join(f"file://{tmp_path}", "b", "c.tar") == tmp_path / "b" / "c.tar"
    assert check_local_out(f"file://{tmp_path}/out") == tmp_path / "out"
    assert locations.normalize(f"file://{tmp_path}") == tmp_path


def test_index_and_shards_over_http(served: tuple[Path, str]) -> None:
    root, url = served
    local, remote = load_index(root / "shards"), load_index(f"{url}/shards/")
    assert remote.root == f"{url}/shards" and remote.spec_hash == local.spec_hash
    for name, split in local.splits.items():
        other = remote.split(name)
        assert (other.names, other.counts, other.starts) == (split.names, split.counts, split.starts)
        assert other.path(0) == f"{url}/shards/{split.names[0]}"
        assert all(map(np.array_equal, other.keys_and_labels(), split.keys_and_labels()))
    shards = remote.split("train")
    keys, images, labels, png = decode_shard(shards.path(1), keep_png=True)
    want = decode_shard(local.split("train").path(1), keep_png=True)
    assert keys == want[0] and png == want[3]
    np.testing.assert_array_equal(images, want[1])
    np.testing.assert_array_equal(labels, want[2])
    assert read_shard_labels(shards.path(1)) == read_shard_labels(local.split("train").path(1))


def test_shards_via_file_url(served: tuple[Path, str]) -> None:
    root, _ = served
    index = load_index(f"file://{root / 'shards'}")
    assert index.root == root / "shards" and isinstance(index.split("train").path(0), Path)


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_cache_over_http(served: tuple[Path, str], fmt: str) -> None:
    root, url = served
    local, remote = open_cache(root / fmt, "train"), open_cache(f"{url}/{fmt}", "train")
    assert remote.complete and np.array_equal(remote.keys, local.keys) and remote.done.all()
    np.testing.assert_array_equal(remote.labels, local.labels)
    np.testing.assert_array_equal(remote.head_weight, local.head_weight)
    for i in range(remote.n_chunks):
        assert remote.chunk_bounds(i) == local.chunk_bounds(i) == (i * CHUNK, min(N, (i + 1) * CHUNK))
        for dtype in (np.float32, np.float16):
            got, want = remote.read_chunk(i, dtype=dtype), local.read_chunk(i, dtype=dtype)
            assert got["features"].dtype == dtype and got["logits"].dtype == dtype
            assert got["views"].dtype == np.float32
            for name in ("features", "logits", "views", "labels"):
                np.testing.assert_array_equal(got[name], want[name])
        # zstd stores float16: the float16 read is exactly the stored values, the float32 read their widening
        np.testing.assert_array_equal(local.read_chunk(i)["features"].astype(np.float16), got["features"])


def _read_in_child(cache: object, queue: multiprocessing.Queue) -> None:
    queue.put(cache.read_chunk(1)["features"])


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_cache_opened_before_fork_reads_in_worker(served: tuple[Path, str], fmt: str) -> None:
    """A loader worker forked after the cache was opened (and read) over HTTP must not reuse the parent's session."""
    _, url = served
    cache = open_cache(f"{url}/{fmt}", "train")
    cache.read_chunk(0)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    worker = context.Process(target=_read_in_child, args=(cache, queue))
    worker.start()
    worker.join(30)
    if worker.is_alive():
        worker.kill()
    assert worker.exitcode == 0
    np.testing.assert_array_equal(queue.get(timeout=5), cache.read_chunk(1)["features"])


def test_float16_read_of_lossy_codecs(tmp_path: Path) -> None:
    for codec in ("bf16", "int8"):
        build_cache(tmp_path / codec, "zarr", codec)
        cache = open_cache(tmp_path / codec, "train")
        full, half = cache.read_chunk(0), cache.read_chunk(0, dtype=np.float16)
        assert half["features"].dtype == np.float16 and half["logits"].dtype == np.float16
        np.testing.assert_array_equal(half["features"], full["features"].astype(np.float16))
        np.testing.assert_array_equal(half["logits"], full["logits"].astype(np.float16))


def test_lost_zarr_chunk_over_http_is_an_error(served: tuple[Path, str]) -> None:
    _, url = served
    cache = open_cache(f"{url}/broken", "train")
    assert cache.read_chunk(0)["features"].any()
    with pytest.raises(GenddError, match="chunk 1") as error:  # not zeros from zarr's fill value
        cache.read_chunk(1)
    assert "\n" not in str(error.value)


def test_missing_remote_data_says_what_to_do(served: tuple[Path, str]) -> None:
    _, url = served
    with pytest.raises(GenddError, match="check the URL") as error:
        open_cache(f"{url}/nothing", "train")
    assert f"{url}/nothing" in str(error.value) and "gendd extract" in str(error.value)
    with pytest.raises(GenddError, match=r"index\.json not found"):
        load_index(f"{url}/zarr")
    with pytest.raises(GenddError, match="not found"):
        decode_shard(f"{url}/shards/train-999999.tar")


@pytest.mark.parametrize("location", ["ftp://127.0.0.1/y", "foo://x"])
def test_unknown_scheme_refused(location: str) -> None:
    with pytest.raises(GenddError, match="cannot read") as error:
        check_readable(location)
    assert "\n" not in str(error.value)
    with pytest.raises(GenddError, match="cannot read"):
        load_index(location)


def test_missing_package_named() -> None:
    for scheme, package in (("s3", "s3fs"), ("gs", "gcsfs")):
        if locations.importlib.util.find_spec(package) is None:
            with pytest.raises(GenddError, match=f"pip install {package}") as error:
                open_cache(f"{scheme}://bucket/cache", "train")
            assert "\n" not in str(error.value)


def test_local_outputs_refuse_urls_and_object_store_outputs_refuse_other_schemes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outputs that must be local (a teacher, a student) refuse any URL; prepare's and extract's accept s3:// and
    gs:// only, and a URL that lost a slash in a Path is never taken for a local folder named "s3:"."""
    from pipeline.locations import check_out

    monkeypatch.chdir(tmp_path)
    for location in ("s3://bucket/x", Path("s3://bucket/x"), "http://127.0.0.1:1/out"):
        with pytest.raises(GenddError, match="this output must be a local path") as error:
            check_local_out(location)
        assert "\n" not in str(error.value)
    assert check_out("s3://bucket/x/") == "s3://bucket/x" and check_out(tmp_path / "out") == tmp_path / "out"
    with pytest.raises(GenddError, match="must be a local path"):
        check_out(Path("s3://bucket/x"))
    with pytest.raises(GenddError, match=r"cannot write http:// locations: write to a local path or to s3://"):
        check_out("http://127.0.0.1:1/out")
    assert list(tmp_path.iterdir()) == []


def test_unreachable_server_fails_fast() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for read in (lambda: load_index(f"{url}/shards"), lambda: open_cache(f"{url}/cache", "train")):
        start = time.monotonic()
        with pytest.raises(GenddError, match=r"127\.0\.0\.1") as error:
            read()
        assert time.monotonic() - start < 10
        assert "\n" not in str(error.value) and "check the URL" in str(error.value)


def test_stalled_server_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(locations, "HTTP_TIMEOUT_S", {"connect": 2.0, "sock_read": 2.0})
    with socket.socket() as silent:  # accepts connections (kernel backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        for read in (lambda: load_index(f"{url}/shards"), lambda: open_cache(f"{url}/cache", "train")):
            start = time.monotonic()
            with pytest.raises(GenddError, match="check the URL"):
                read()
            assert time.monotonic() - start < 10
