"""`gendd prepare`: every split of a spec written as image shards, resumably and deterministically (a shard's bytes
are a function of its samples), plus `index.json` and the keys files."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline import locations
from pipeline.data.samples import Sample, SourceMissing
from pipeline.data.shards import INDEX, ShardIndex, file_digest, key_array, load_index, read_marker
from pipeline.data.sources import inspect_source, iter_source
from pipeline.data.specs import DataSpec
from pipeline.errors import GenddError
from pipeline.outputs import naming

if TYPE_CHECKING:  # imported where tensors are built: shard-decode processes start without torch
    pass


TAR_MTIME = 946684800  # 2000-01-01: a fixed member mtime makes a shard's bytes a function of its samples only


def _key_arrays_bytes(keys: np.ndarray, labels: np.ndarray) -> bytes:
    """An .npz of keys and int32 labels with a fixed zip timestamp: the same samples give the same bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as npz:  # np.savez would stamp the current time into the zip
        for name, array in (("keys", keys), ("labels", labels.astype(np.int32))):
            member = io.BytesIO()
            np.save(member, np.ascontiguousarray(array), allow_pickle=False)
            npz.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
    return buffer.getvalue()


def _encode(sample: Sample) -> dict:
    buffer = io.BytesIO()
    image = sample.image[:, :, 0] if sample.image.shape[2] == 1 else sample.image
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)  # lossless; level 1 keeps prepare fast
    record = {"__key__": sample.key, "png": buffer.getvalue()}
    if sample.label >= 0:
        record["cls"] = str(sample.label).encode()
    return record


def _write_new(path: Path, data: bytes) -> None:
    """Write `data` as a new file at `path` (a temp name): a leftover one is unlinked first, never truncated, since a
    file in a DVC-tracked folder may be a hardlink into DVC's cache."""
    path.unlink(missing_ok=True)
    with naming(path), open(path, "xb") as handle:
        handle.write(data)


def _replace_if_changed(tmp: Path, path: Path) -> tuple[tuple[int, str], bool]:
    """Move a freshly written `tmp` to `path` unless `path` already holds the same bytes (its mtime is then kept);
    returns the file's (size, sha256) and whether `path` changed."""
    digest = file_digest(tmp)
    if path.is_file() and file_digest(path) == digest:
        tmp.unlink()
        return digest, False
    os.replace(tmp, path)
    return digest, True


def _write_shard(path: Path, samples: list[Sample]) -> tuple[tuple[int, str], bool]:
    """Write to a temporary name and rename: a crash never leaves a half shard under the final name. Returns the
    shard's (size, sha256) and whether the file changed (an identical shard of a killed run is kept as it is)."""
    import webdataset as wds

    tmp = path.with_suffix(".tar.tmp")
    tmp.unlink(missing_ok=True)  # a new file, never a truncated one (see _write_new)
    with open(tmp, "xb") as handle, wds.TarWriter(handle, mtime=TAR_MTIME) as writer:
        for sample in samples:
            writer.write(_encode(sample))
    return _replace_if_changed(tmp, path)


def _batched(items: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _check_label(spec: DataSpec, split: str, sample: Sample) -> None:
    """A labeled spec's samples must carry a label in [0, num_classes): anything else would train on garbage."""
    if not spec.labeled or 0 <= sample.label < spec.num_classes:
        return
    where = f"spec {spec.name}: split {split!r} sample {sample.key!r}"
    if sample.label < 0:
        raise GenddError(f"{where} has no label but the spec is labeled: add labels to the data or set labeled: false")
    raise GenddError(
        f"{where} has label {sample.label}, outside [0, {spec.num_classes}): fix num_classes in the spec or the label "
        "in the data"
    )


def _write_split(
    spec: DataSpec, split: str, root: Path, shard_size: int, max_samples: int | None, recorded: dict
) -> tuple[dict, list[str]]:
    """Write a split's shards and keys file; a shard already on disk is kept when it matches `recorded` (name ->
    (size, sha256) from the previous index) or, unrecorded, the bytes it would be written with. Returns the split's
    index entry and the names of recorded or existing files that had to be rewritten (missing or damaged)."""
    names, counts, starts, sizes, hashes, seen, labels, redone = [], [], [], [], [], {}, [], []
    with tqdm(desc=f"prepare {split}", unit="img", leave=False) as bar:

        def total(n: int) -> None:  # the bar shows N of total once the source has listed its samples
            bar.total = min(n, max_samples or n)
            bar.refresh()

        samples = islice(iter_source(spec, split, total), max_samples)
        for i, chunk in enumerate(_batched(samples, shard_size)):
            name = f"{split}-{i:06d}.tar"
            for sample in chunk:
                if sample.key in seen:
                    raise GenddError(
                        f"spec {spec.name}: duplicate sample key {sample.key!r} in {split}; keys must be unique"
                    )
                _check_label(spec, split, sample)
                seen[sample.key] = None  # a dict: unique and in order (the keys file lists them)
                labels.append(sample.label)
            path = root / name
            existed = path.is_file()
            if existed and name in recorded and file_digest(path) == tuple(recorded[name]):
                digest = tuple(recorded[name])  # intact: shards are deterministic, so this is what we would write
            else:
                digest, changed = _write_shard(path, chunk)
                if (changed and existed) or (name in recorded and not existed):
                    redone.append(name)
            names.append(name)
            starts.append(sum(counts))
            counts.append(len(chunk))
            sizes.append(digest[0])
            hashes.append(digest[1])
            bar.update(len(chunk))
    if not counts:
        raise GenddError(f"spec {spec.name}: split {split!r} has no samples; check the source path and spec")
    entry = {"shards": names, "counts": counts, "starts": starts, "n": sum(counts)}
    keys_fields, rewritten = write_keys_files(root, split, list(seen), labels, recorded)
    return entry | {"sizes": sizes, "sha256": hashes} | keys_fields, redone + rewritten


def write_keys_files(
    root: Path, split: str, keys: list[str], labels: list[int], recorded: dict | None = None
) -> tuple[dict, list[str]]:
    """Write a split's keys and labels twice, JSON (what older gendd read) and numpy arrays (.npz: readers load
    1.28M keys without making a Python object per key): extraction sizes its store from them without scanning every
    shard. Returns their index.json fields and the names of files that existed (or `recorded` lists) but changed."""
    keys_file, keys_array = f"{split}-keys.json", f"{split}-keys.npz"
    contents = {
        keys_file: json.dumps({"keys": keys, "labels": labels}).encode(),
        keys_array: _key_arrays_bytes(key_array(keys), np.asarray(labels, dtype=np.int64)),
    }
    digests, redone, recorded = {}, [], recorded or {}
    for name, data in contents.items():
        existed, tmp = (root / name).is_file(), root / (name + ".tmp")
        _write_new(tmp, data)
        digests[name], changed = _replace_if_changed(tmp, root / name)
        if changed and (existed or name in recorded):
            redone.append(name)
    (keys_size, keys_hash), (array_size, array_hash) = digests[keys_file], digests[keys_array]
    fields = {"keys_file": keys_file, "keys_size": keys_size, "keys_sha256": keys_hash}
    return fields | {"keys_array": keys_array, "keys_array_size": array_size, "keys_array_sha256": array_hash}, redone


def _recorded(entry: dict) -> dict[str, tuple[int, str]]:
    """name -> (size, sha256) of every file of a split's index entry (shards and keys file)."""
    files = dict(zip(entry["shards"], zip(entry["sizes"], entry["sha256"], strict=True), strict=True))
    files[entry["keys_file"]] = (entry["keys_size"], entry["keys_sha256"])
    if "keys_array" in entry:  # absent in indexes from before the keys arrays: those read the JSON file
        files[entry["keys_array"]] = (entry["keys_array_size"], entry["keys_array_sha256"])
    return files


def _intact(root: Path, entry: dict) -> bool:
    """Whether every file of a split is on disk with the size and sha256 index.json records (sizes first: cheap)."""
    files = _recorded(entry)
    if not all((root / n).is_file() and (root / n).stat().st_size == size for n, (size, _) in files.items()):
        return False
    return all(file_digest(root / n) == (size, sha) for n, (size, sha) in files.items())


def _record_hash(record: dict) -> str:
    """sha256 of an index record without its own checksum: a hand-edited index.json no longer matches it."""
    body = {k: v for k, v in record.items() if k != "index_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=list).encode()).hexdigest()


def _previous_splits(root: Path, signature: dict) -> tuple[dict, str | None]:
    """The split entries of the index.json in `root` when it was written with these settings, records shard
    hashes and is unedited; else {} and why it cannot be trusted (None when there is none, or other settings)."""
    try:
        raw = json.loads((root / INDEX).read_text())
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError):
        return {}, f"{root / INDEX} is unreadable"
    if not isinstance(raw, dict) or any(raw.get(k) != v for k, v in signature.items()):
        return {}, None
    if "index_sha256" not in raw:
        return {}, f"{root / INDEX} records no shard hashes (written by an older gendd)"
    if raw["index_sha256"] != _record_hash(raw):
        return {}, f"{root / INDEX} was edited or damaged (its checksum does not match)"
    try:
        splits = raw["splits"]
        for entry in splits.values():
            _recorded(entry)
    except (KeyError, TypeError, ValueError, AttributeError):
        return {}, f"{root / INDEX} lacks fields"
    return splits, None


def _summary(names: list[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _drop_stale_shards(root: Path, split: str, keep: list[str]) -> None:
    """Remove shards of `split` that its new entry does not list (the split shrank when its source changed)."""
    pattern = re.compile(re.escape(split) + r"-\d{6}\.tar")
    for path in root.glob("*.tar"):
        if pattern.fullmatch(path.name) and path.name not in keep:
            path.unlink()


def prepare_shards(
    spec: DataSpec, out: str | Path, shard_size: int = 1000, max_samples: int | None = None
) -> tuple[ShardIndex, bool]:
    """Write every split of `spec` as shards; returns (index, wrote) and writes nothing when already up to date:
    the source's fingerprint (local files: names, sizes, modification times) is the one index.json records, and
    every shard and keys file is on disk with the size and sha256 index.json records for these settings. A split
    whose source changed is read again (shards that come out the same are kept); a missing or damaged shard is
    rewritten (shards are deterministic, so it comes back byte for byte). `wrote` is True when anything was."""
    if shard_size < 1:
        raise GenddError(f"shard size must be >= 1, got {shard_size}")
    if isinstance(location := locations.check_out(out), str):
        return _prepare_to_object_store(spec, location, shard_size, max_samples)
    root = location
    signature = {"spec_hash": spec.spec_hash, "shard_size": shard_size, "max_samples": max_samples}
    previous, distrust = _previous_splits(root, signature)
    complete = bool(previous) and set(previous) == set(spec.splits)
    try:
        state = inspect_source(spec)
    except SourceMissing as err:
        if not (complete and all(_intact(root, previous[split]) for split in spec.splits)):
            raise
        print(f"note: {err}: cannot check the source for changes; the shards are as index.json records", flush=True)
        return load_index(root), False
    changed = {
        split: "source_fingerprint" in previous[split]
        for split in spec.splits
        if split in previous and previous[split].get("source_fingerprint") != state.fingerprints[split]
    }  # split -> whether index.json had a fingerprint (else it is from an older gendd)
    intact = {
        split: split in previous and split not in changed and _intact(root, previous[split]) for split in spec.splits
    }
    if complete and all(intact.values()):
        return load_index(root), False
    if distrust:
        print(f"note: {distrust}: checking every shard against the spec and rewriting index.json", flush=True)
    for split, had in changed.items():
        why = "its source changed since the last prepare (files added, removed or modified)"
        if not had:
            why = "index.json has no fingerprint of its source (written by an older gendd)"
        print(f"note: split {split!r}: {why}: reading it again", flush=True)
    for note in state.notes:
        print(f"note: {note}", flush=True)
    # The marker says which settings the shards on disk were made with: finished shards of a killed run with the
    # same settings are kept when they hold the bytes they would be written with, anything else is cleared so no
    # stale shard survives.
    marker = root / ".prepare.json"
    if read_marker(marker) != signature:
        for stale in [*root.glob("*.tar"), *root.glob("*-keys.json"), *root.glob("*-keys.npz"), root / INDEX]:
            stale.unlink(missing_ok=True)
        previous, intact = {}, dict.fromkeys(spec.splits, False)
    root.mkdir(parents=True, exist_ok=True)
    (root / INDEX).unlink(missing_ok=True)  # written last again: while it is absent no stage trusts these shards
    _write_new(root / ".prepare.json.tmp", json.dumps(signature).encode())
    os.replace(root / ".prepare.json.tmp", marker)  # replaced, not rewritten: it may be linked from DVC's cache
    resolved = state.spec  # an image folder's class names (and their number) filled in from its folders
    splits = {}
    for split in spec.splits:
        fingerprint = {"source_fingerprint": state.fingerprints[split]}
        if intact[split]:
            splits[split] = previous[split] | fingerprint  # every file as recorded: the source need not be read again
            continue
        # A changed source invalidates what index.json recorded: every shard is encoded again and compared by bytes.
        recorded = _recorded(previous[split]) if split in previous and split not in changed else {}
        entry, redone = _write_split(resolved, split, root, shard_size, max_samples, recorded)
        splits[split] = entry | fingerprint
        _drop_stale_shards(root, split, entry["shards"])
        if redone and split not in changed:
            print(f"note: rewrote {split} files that were missing or damaged: {_summary(redone)}", flush=True)
    spec_fields = {k: v for k, v in resolved.__dict__.items() if k != "path"}
    record = {"spec": spec_fields, **signature, "class_names": list(resolved.class_names), "splits": splits}
    record["index_sha256"] = _record_hash(record)
    tmp = root / (INDEX + ".tmp")
    _write_new(tmp, json.dumps(record, indent=1, default=list).encode())
    os.replace(tmp, root / INDEX)  # written last: an index means every shard is whole
    return load_index(root), True


def stage_dir(url: str) -> Path:
    """The local folder where shards bound for the object-store prefix `url` are written before upload; kept between
    runs, so a re-run encodes and uploads only what changed (GENDD_STAGE_DIR, else the system's temp folder)."""
    base = Path(os.environ.get("GENDD_STAGE_DIR") or tempfile.gettempdir()) / "gendd-stage"
    return base / hashlib.sha256(url.encode()).hexdigest()[:16]


def _prepare_to_object_store(
    spec: DataSpec, url: str, shard_size: int, max_samples: int | None
) -> tuple[ShardIndex, bool]:
    """prepare_shards into s3:// or gs://: written locally (stage_dir), then every file uploaded whole, index.json
    last (a reader never finds an index whose shards are not all there). A file is uploaded again only when its
    sha256 differs from the one last uploaded or the object is missing or of another size."""
    locations.probe_writable(url)
    stage = stage_dir(url)
    _, wrote = prepare_shards(spec, stage, shard_size, max_samples)
    record_path = stage / ".uploaded.json"
    sent = json.loads(record_path.read_text()) if record_path.is_file() else {}
    remote = locations.object_sizes(url)
    files = sorted(
        (p for p in stage.iterdir() if p.is_file() and not p.name.startswith(".")), key=lambda p: p.name == INDEX
    )
    uploaded = 0
    for path in tqdm(files, desc=f"upload {url}", unit="file", leave=False):
        size, digest = file_digest(path)
        if sent.get(path.name) == [size, digest] and remote.get(path.name) == size:
            continue
        locations.put_file(path, str(locations.join(url, path.name)))
        sent[path.name], uploaded = [size, digest], uploaded + 1
        _write_new(record_path.with_suffix(".tmp"), json.dumps(sent).encode())
        os.replace(record_path.with_suffix(".tmp"), record_path)
    return load_index(url), wrote or uploaded > 0
