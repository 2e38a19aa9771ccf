"""No silent faults in a feature cache: reads refuse NaN/inf and damaged chunks with one line naming the array and the
chunk; `gendd cache verify` reads every chunk, lists every problem and fails; `gendd cache info` shows cheap damage.

Synthetic caches from tests/test_store.py (N=10, K=3, D=16, C=5, chunks of 4: 3 chunks) for the scan; the digits
shards and a tiny random teacher for the replay.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.cache.store import open_cache
from pipeline.errors import GenddError
from stages.app import main
from tests.test_extract import Teacher, _make_teacher
from tests.test_store import CHUNK, build, make_data, make_meta, open_writer, write_chunks

# ---- helpers ----------------------------------------------------------------------------------------------------


@dataclass
class Run:
    code: int
    out: str
    err: str


def gendd(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: object) -> Run:
    """`gendd ARGS` in this process, as the console entry point runs it."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["gendd", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    out = capsys.readouterr()
    return Run(code, out.out, out.err)


def assert_fails_naming(run: Run, *needles: str) -> str:
    """A failed run: exit 2, exactly one stderr line `gendd: error: ...` holding every needle, no traceback."""
    lines = [line for line in run.err.splitlines() if line.strip()]
    assert run.code == 2, (run.code, run.err)
    assert len(lines) == 1 and lines[0].startswith("gendd: error: "), run.err
    assert "Traceback" not in run.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def flip_middle(path: Path) -> None:
    """Invert one byte in the middle of a file (its size stays)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def zarr_group(root: Path) -> zarr.Group:
    return zarr.open_group(str(root / "train.zarr"), mode="r+")


# ---- (a) one corrupted chunk file anywhere: verify fails naming it ----------------------------------------------

CORRUPTIONS = {  # chunk file -> what the error must name
    "features": ("zstd", "train.zarr/features/c/1/0/0", "features chunk 1"),
    "logits": ("zstd", "train.zarr/logits/c/2/0/0", "logits chunk 2"),
    "views": ("zstd", "train.zarr/views/c/0/0/0", "views chunk 0"),
    "features_scale": ("int8", "train.zarr/features_scale/c/1/0", "features_scale chunk 1"),
    "labels": ("zstd", "train.zarr/labels/c/0", "labels chunk 0"),
    "keys": ("zstd", "train.zarr/keys/c/0", "keys chunk 0"),
    "done": ("zstd", "train.zarr/done/c/1", "done chunk 1"),
    "head/weight": ("zstd", "train.zarr/head/weight/c/0/0", "head/weight chunk 0"),
    "head/bias": ("lz4", "train.zarr/head/bias/c/0", "head/bias chunk 0"),
    "tar": ("zstd", "train-features/train-000001.tar", "train-000001.tar chunk 1"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_one_corrupted_chunk_file_fails_verify_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, case: str
) -> None:
    codec, file, names = CORRUPTIONS[case]
    root = build(tmp_path, codec, "webdataset" if file.endswith(".tar") else "zarr")
    assert gendd(monkeypatch, capsys, "cache", "verify", root, "--samples", "0").code == 0  # clean before
    flip_middle(root / file)
    run = gendd(monkeypatch, capsys, "cache", "verify", root, "--samples", "0")
    line = assert_fails_naming(run, names, "1 problem in", str(root))
    assert "corrupt" in line and "delete" in line
    assert f"problem: {names}" in run.out  # the list on stdout


@pytest.mark.parametrize("member", ["png", "features.npy"])
def test_a_flipped_byte_inside_a_tar_member_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, member: str
) -> None:
    """Tar headers carry checksums, member data does not: only the tar's recorded CRC-32 sees this byte."""
    import tarfile

    root = build(tmp_path, fmt="webdataset")
    tar_path = root / "train-features/train-000001.tar"
    with tarfile.open(tar_path) as tar:
        target = next(m for m in tar if m.name.endswith("." + member))
    data = bytearray(tar_path.read_bytes())
    data[target.offset_data + target.size - 1] ^= 0x01  # the last byte: past any npy header
    tar_path.write_bytes(bytes(data))
    with pytest.raises(GenddError, match=r"train-000001\.tar chunk 1 is corrupt \(CRC-32 "):
        open_cache(root, "train").read_chunk(1)
    run = gendd(monkeypatch, capsys, "cache", "verify", root, "--samples", "0")
    assert_fails_naming(run, "train-000001.tar chunk 1: is corrupt", f"delete {tar_path} and re-run gendd extract")


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_verify_reads_a_cache_over_http(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, fmt: str
) -> None:
    from tests.conftest import serve_http

    build(tmp_path / "ok", fmt=fmt)
    build(tmp_path / "bad", fmt=fmt)
    flip_middle(tmp_path / ("bad/train.zarr/views/c/2/0/0" if fmt == "zarr" else "bad/train-features/train-000002.tar"))
    with serve_http(tmp_path) as url:
        run = gendd(monkeypatch, capsys, "cache", "verify", f"{url}/ok", "--samples", "0")
        assert run.code == 0 and "ok: no problems found" in run.out, run.err
        run = gendd(monkeypatch, capsys, "cache", "verify", f"{url}/bad", "--samples", "0")
    names = "views chunk 2" if fmt == "zarr" else "train-000002.tar chunk 2"
    assert_fails_naming(run, names, "check the URL, or re-run gendd extract and upload the cache again")


def test_verify_lists_every_problem_not_only_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    root = build(tmp_path)
    for file in ("features/c/0/0/0", "logits/c/2/0/0", "keys/c/0"):
        flip_middle(root / "train.zarr" / file)
    (root / "train.zarr/views/c/1/0/0").unlink()  # zarr alone would read a lost chunk file as zeros
    run = gendd(monkeypatch, capsys, "cache", "verify", root, "--samples", "0")
    assert_fails_naming(run, "4 problems in", "keys chunk 0")
    problems = [line for line in run.out.splitlines() if line.startswith("problem: ")]
    assert [p.split(":")[1].strip() for p in problems] == [
        "keys chunk 0",
        "features chunk 0",
        "views chunk 1",
        "logits chunk 2",
    ]
    assert "views chunk 1: is missing (no chunk file)" in run.out


# ---- (b) NaN / inf written through the store (valid checksums) ---------------------------------------------------

NAN = {  # codec, array, what to write: NaN as the stored dtype holds it
    "zstd features": ("zstd", "features", np.float16(np.nan)),
    "bf16 logits": ("bf16", "logits", np.uint16(0x7FC0)),  # a bfloat16 NaN bit pattern
    "int8 features_scale": ("int8", "features_scale", np.float32(np.inf)),
    "none views": ("none", "views", np.float32(np.nan)),
}


@pytest.mark.parametrize("case", NAN)
def test_nan_in_a_chunk_is_refused_where_read_and_by_verify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, case: str
) -> None:
    codec, name, value = NAN[case]
    data = make_data()
    root = build(tmp_path, codec, data=data)
    index = (5, 1) if name == "features_scale" else (5, 1, 3)  # sample 5: chunk 1
    zarr_group(root)[name][index] = value
    cache = open_cache(root, "train")
    cache.read_chunk(0)
    for dtype in (np.float32, np.float16):
        with pytest.raises(GenddError) as error:
            cache.read_chunk(1, dtype=dtype)
        message = str(error.value)
        assert f"{root / 'train.zarr'}: {name} chunk 1 holds NaN or inf: delete " in message and "\n" not in message
    with pytest.raises(GenddError, match=f"{name} chunk 1 holds NaN or inf"):
        cache.load_all()
    run = gendd(monkeypatch, capsys, "cache", "verify", root, "--samples", "0")
    assert_fails_naming(run, f"{name} chunk 1: holds NaN or inf")

    # the advice works: delete the chunk's done flag, and extraction redoes just that chunk
    (root / "train.zarr/done/c/1").unlink()
    writer = open_writer(root, data, make_meta(codec))
    assert writer.pending_chunks() == [1]
    write_chunks(writer, data, [1])
    assert np.isfinite(open_cache(root, "train").load_all()["features"]).all()
    assert gendd(monkeypatch, capsys, "cache", "verify", root, "--samples", "0").code == 0


def test_nan_in_a_webdataset_chunk_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from pipeline.cache.codecs import encode_chunk

    data = make_data()
    root = build(tmp_path, "zstd", "webdataset", data)
    writer = open_writer(root, data, make_meta(), "webdataset")
    rows = slice(2 * CHUNK, 3 * CHUNK)
    stored = encode_chunk("zstd", data["features"][rows], data["logits"][rows], data["views"][rows])
    stored["logits"][1, 2, 0] = np.inf  # written as the writer would, tar and checksum consistent
    writer._store.write(2, 2 * CHUNK, stored, data["images"][rows])
    with pytest.raises(GenddError, match=r"logits chunk 2 holds NaN or inf: delete .*train-000002\.tar"):
        open_cache(root, "train").read_chunk(2)
    assert_fails_naming(gendd(monkeypatch, capsys, "cache", "verify", root, "--samples", "0"), "logits chunk 2")


def test_non_finite_head_is_refused_at_open(tmp_path: Path) -> None:
    root = build(tmp_path)
    zarr_group(root)["head/weight"][2, 3] = np.nan
    with pytest.raises(GenddError, match="head/weight holds NaN or inf: delete the store"):
        open_cache(root, "train")


# ---- every array read goes through the same error handling --------------------------------------------------------


@pytest.mark.parametrize("file", ["labels/c/0", "keys/c/0", "head/weight/c/0/0", "head/bias/c/0"])
@pytest.mark.parametrize("damage", ["flip", "lose"])
def test_damaged_small_arrays_are_one_line_errors_at_open(tmp_path: Path, file: str, damage: str) -> None:
    root = build(tmp_path)
    target = root / "train.zarr" / file
    if damage == "flip":
        flip_middle(target)
    else:
        target.unlink()
    with pytest.raises(GenddError) as error:
        open_cache(root, "train")
    array = file.rsplit("/c/", 1)[0]
    message = str(error.value)
    assert message.startswith(f"{root / 'train.zarr'}: {array} chunk 0 ") and "\n" not in message
    assert ("bad checksum" if damage == "flip" else "no chunk file") in message


def test_damaged_done_flag_of_an_unfinished_store_is_one_line(tmp_path: Path) -> None:
    data = make_data()
    write_chunks(open_writer(tmp_path, data, make_meta()), data, [0, 1])
    flip_middle(tmp_path / "train.zarr/done/c/1")
    with pytest.raises(GenddError, match=r"done chunk 1 cannot be read .*: delete .*done/c/1 and re-run gendd extract"):
        open_cache(tmp_path, "train", allow_incomplete=True)
    with pytest.raises(GenddError, match="done chunk 1"):
        open_writer(tmp_path, data, make_meta()).pending_chunks()


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_labels_and_keys_are_checked_at_open(tmp_path: Path, fmt: str) -> None:
    root = build(tmp_path / "range", fmt=fmt)
    if fmt == "zarr":
        zarr_group(root)["labels"][3] = 7  # C = 5
    else:
        meta_file = root / "train-features/meta.json"
        meta = json.loads(meta_file.read_text())
        meta_file.write_text(json.dumps(meta | {"labels": [*meta["labels"][:3], 7, *meta["labels"][4:]]}))
    with pytest.raises(GenddError, match=r"labels has 1 values outside \[-1, 5\) \(first: sample 3: 7\)"):
        open_cache(root, "train")
    if fmt == "webdataset":
        root = build(tmp_path / "short", fmt=fmt)
        meta_file = root / "train-features/meta.json"
        meta = json.loads(meta_file.read_text())
        meta_file.write_text(json.dumps(meta | {"keys": meta["keys"][:-1]}))
        with pytest.raises(GenddError, match="keys has 9 entries, expected N=10"):
            open_cache(root, "train")


def test_labels_outside_the_teacher_classes_are_refused_when_writing(tmp_path: Path) -> None:
    data = make_data()
    data["labels"][0] = 5  # C = 5
    with pytest.raises(GenddError, match=r"labels span \[-1, 5\] but the teacher has 5 classes"):
        open_writer(tmp_path, data, make_meta())


def test_verify_checks_keys_unique_and_attributes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    root = build(tmp_path)
    group = zarr_group(root)
    group["keys"][1] = "sample-00000"
    group.attrs["complete"] = False
    teacher = dict(group.attrs["teacher"])
    del teacher["mean"]
    group.attrs["teacher"] = teacher
    run = gendd(monkeypatch, capsys, "cache", "verify", root, "--samples", "0")
    assert_fails_naming(run, "3 problems in", "attributes: lack teacher.mean")
    assert "problem: attributes: complete is not set" in run.out
    assert "problem: keys: are not unique (1 repeats, first 'sample-00000')" in run.out


# ---- (c) a clean cache passes; the replay against the teacher -----------------------------------------------------


def test_clean_caches_pass_verify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    for fmt in ("zarr", "webdataset"):
        for codec in ("zstd", "int8"):
            root = build(tmp_path / f"{fmt}-{codec}", codec, fmt)
            run = gendd(monkeypatch, capsys, "cache", "verify", root, "--samples", "0")
            assert run.code == 0 and run.err == "", run.err
            assert "ok: no problems found" in run.out and "scan: " in run.out


def test_arrays_equal_to_the_fill_value_are_stored_not_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """zarr skips writing a chunk equal to the fill value; reads treat a missing file as damage, so none is skipped."""
    data = make_data()
    data["head_bias"], data["labels"] = np.zeros_like(data["head_bias"]), np.zeros_like(data["labels"])
    root = build(tmp_path, data=data)
    assert (root / "train.zarr/head/bias/c/0").is_file() and (root / "train.zarr/labels/c/0").is_file()
    cache = open_cache(root, "train")
    assert not cache.head_bias.any() and not cache.labels.any()
    assert gendd(monkeypatch, capsys, "cache", "verify", root, "--samples", "0").code == 0


def test_verify_options_that_cannot_work_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    root = build(tmp_path)
    assert_fails_naming(gendd(monkeypatch, capsys, "cache", "verify", root), "needs --teacher and --shards")
    run = gendd(monkeypatch, capsys, "cache", "verify", root, "--quick", "--samples", "0")
    assert_fails_naming(run, "checks nothing")
    assert_fails_naming(
        gendd(monkeypatch, capsys, "cache", "verify", tmp_path / "none", "--samples", "0"), "no feature"
    )


def test_info_shows_damage_it_sees_cheaply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    root = build(tmp_path / "zarr")
    run = gendd(monkeypatch, capsys, "cache", "info", root)
    assert run.code == 0 and "damage" in run.out
    table = dict(line.split(None, 1) for line in run.out.splitlines() if line.strip())
    assert table["damage"] == "none seen (run gendd cache verify for a full check)"
    (root / "train.zarr/logits/c/1/0/0").unlink()
    (root / "train.zarr/done/c/2").unlink()
    run = gendd(monkeypatch, capsys, "cache", "info", root)
    table = dict(line.split(None, 1) for line in run.out.splitlines() if line.strip())
    assert run.code == 0
    assert table["damage"].startswith("2 seen: logits chunk 1: chunk file missing; done chunk 2: not set")

    wds = build(tmp_path / "wds", fmt="webdataset")
    (wds / "train-features/train-000000.tar").unlink()
    data = open_cache(wds, "train", allow_incomplete=True).info()["damage"]
    assert data == ["train-000000.tar chunk 0: missing"]


@pytest.fixture(scope="module")
def replayable(digits_shards, tmp_path_factory: pytest.TempPathFactory) -> tuple[Teacher, Path]:
    """A teacher and its extracted val cache (K=2 views, zarr) of the digits shards."""
    from pipeline.config import ExtractConfig
    from pipeline.extract.extract import extract

    teacher = _make_teacher(
        tmp_path_factory.mktemp("teacher"), digits_shards, 0, {"spec_hash": digits_shards.spec_hash}
    )
    out = tmp_path_factory.mktemp("cache")
    config = ExtractConfig(digits_shards.root, teacher.dir, out, ("val",), eval_views=2, batch_size=100, cpu=True)
    (result,) = extract(config)
    assert result["complete"] is True
    return teacher, out


def test_clean_cache_passes_the_full_check_with_replay(
    replayable, digits_shards, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    teacher, cache = replayable
    args = ["cache", "verify", cache, "--split", "val", "--teacher", teacher.dir, "--shards", digits_shards.root]
    for extra in ([], ["--quick"]):
        run = gendd(monkeypatch, capsys, *args, "--samples", "16", *extra)
        assert run.code == 0 and run.err == "", run.err
        assert "replay: 16 pairs: max abs error" in run.out and "ok: no problems found" in run.out
        assert ("scan: " in run.out) is not bool(extra)


def test_replay_fails_on_values_that_are_not_the_teacher_s(
    replayable, digits_shards, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    teacher, cache = replayable
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    group = zarr.open_group(str(copy / "val.zarr"), mode="r+")
    features = group["features"][:]
    group["features"][64:128] = features[64:128, ::-1]  # chunk 1: the views swapped (finite, valid checksums)
    args = ["cache", "verify", copy, "--split", "val", "--teacher", teacher.dir, "--shards", digits_shards.root]
    for extra in ([], ["--quick"]):
        run = gendd(monkeypatch, capsys, *args, "--samples", "200", *extra)
        line = assert_fails_naming(run, "features chunk 1: sample ", "differs from the teacher")
        assert "features chunk 0" not in run.out and "features chunk 2" not in run.out, line

    other = _make_teacher(tmp_path / "other", digits_shards, 1, {"spec_hash": digits_shards.spec_hash})
    run = gendd(monkeypatch, capsys, *args[:5], "--teacher", other.dir, "--shards", digits_shards.root)
    assert_fails_naming(run, "attributes: record teacher checkpoint sha256")
