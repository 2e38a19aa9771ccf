"""Image shards: `<split>-NNNNNN.tar` (WebDataset layout: __key__, png, cls) plus one `index.json`."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline import locations
from pipeline.errors import GenddError
from pipeline.sources import Sample, SourceMissing, inspect_source, iter_source
from pipeline.specs import DataSpec

if TYPE_CHECKING:  # imported where tensors are built: shard-decode processes start without torch
    import torch

INDEX = "index.json"
TAR_MTIME = 946684800  # 2000-01-01: a fixed member mtime makes a shard's bytes a function of its samples only


@dataclass(frozen=True)
class ShardSet:
    """The shards of one split: file names, sample counts and first global index of each."""

    root: Path | str  # a local directory, or the URL string of a remote one
    split: str
    names: tuple[str, ...]
    counts: tuple[int, ...]
    starts: tuple[int, ...]
    keys_file: str | None = None  # keys and labels of the split in order (JSON); absent in shards from before it
    sizes: tuple[int, ...] = ()  # byte size of each shard as prepare wrote it; empty in indexes from before it
    hashes: tuple[str, ...] = ()  # sha256 (hex) of each shard as prepare wrote it; empty in indexes from before it
    keys_size: int | None = None  # byte size and sha256 of the keys file, likewise
    keys_hash: str | None = None
    keys_array: str | None = None  # the keys file's content as numpy arrays (.npz); absent in shards from before it

    @property
    def n(self) -> int:
        """Number of samples in the split."""
        return sum(self.counts)

    @property
    def digest(self) -> str | None:
        """sha256 over the split's shard hashes in order: what its pixels and labels are (None: an index without
        hashes). A training checkpoint records it, so a run over changed shards never resumes one."""
        if not self.hashes:
            return None
        return hashlib.sha256("\n".join(self.hashes).encode()).hexdigest()

    def path(self, i: int) -> Path | str:
        """Location of shard i: a Path locally, the URL string for a remote root."""
        return locations.join(self.root, self.names[i])

    def keys_and_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """Every key (a `key_array`) and label ((N,) int64) of the split in global order: from the arrays prepare
        wrote, else its JSON keys file (shards from before the arrays), else a scan of the shards."""
        if self.keys_array and locations.is_file(arrays_path := locations.join(self.root, self.keys_array)):
            return read_key_arrays(arrays_path)
        if self.keys_file and locations.is_file(keys_path := locations.join(self.root, self.keys_file)):
            record = json.loads(locations.read_text(keys_path))
            return key_array(record["keys"]), np.asarray(record["labels"], dtype=np.int64)
        keys, labels = [], []
        for i in range(len(self.names)):
            k, y = read_shard_labels(self.path(i))
            keys += k
            labels += y
        return key_array(keys), np.asarray(labels, dtype=np.int64)


@dataclass(frozen=True)
class ShardIndex:
    """What `index.json` records: the spec (and its hash) and every split's shards."""

    root: Path | str  # a local directory, or the URL string of a remote one
    spec: dict
    spec_hash: str
    shard_size: int
    max_samples: int | None
    splits: dict[str, ShardSet]

    def split(self, name: str) -> ShardSet:
        """One split's shards, or a clear error naming the splits that exist."""
        if name not in self.splits:
            raise GenddError(
                f"{self.root}: no split {name!r} in the shards (have {', '.join(self.splits)}); "
                "re-run gendd prepare with a spec that defines it"
            )
        return self.splits[name]

    @property
    def labeled(self) -> bool:
        """Whether the shards carry labels."""
        return bool(self.spec["labeled"])

    @property
    def class_names(self) -> tuple[str, ...]:
        """The class names in label order (an image folder's folder names when its spec lists none); may be empty."""
        return tuple(self.spec.get("class_names") or ())


def key_array(keys: Sequence[str] | np.ndarray) -> np.ndarray:
    """Sample keys as one fixed-width bytes array (UTF-8, numpy dtype "S<longest>"), the form every reader holds.

    A list of 1.28M str is 1.28M objects (~190 MiB with the list) whose refcounts dirty every page they sit on, so
    each forked loader worker ends up with its own copy; one numpy array has one refcount and its pages stay shared.
    Bytes, not numpy's "U": UTF-32 would take 4x the memory. Elements are bytes: decode before formatting or
    hashing one (views are seeded by the key as str)."""
    if isinstance(keys, np.ndarray) and keys.dtype.kind != "O":
        if keys.dtype.kind == "S":
            return keys
        try:  # ASCII (the usual keys): a plain cast, ~3x less transient memory than encode's bytes per key
            return keys.astype(f"S{max(1, int(np.strings.str_len(keys).max(initial=0)))}")
        except UnicodeEncodeError:
            return np.strings.encode(keys, "utf-8")
    return np.array([key if isinstance(key, bytes) else str(key).encode() for key in keys], dtype=np.bytes_)


def read_key_arrays(location: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(keys, labels int64) from a keys array file (.npz) prepare wrote: no Python object per sample is made."""
    try:
        data = locations.read_bytes(location) if locations.is_url(location) else Path(location).read_bytes()
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            keys, labels = arrays["keys"], arrays["labels"].astype(np.int64)
        if keys.dtype.kind != "S" or keys.shape != labels.shape or keys.ndim != 1:
            raise ValueError(f"keys {keys.dtype} {keys.shape}, labels {labels.shape}")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise GenddError(f"{location}: unreadable keys file ({locations.one_line(err)}): {_redo(location)}") from err
    return keys, labels


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


def file_digest(path: Path) -> tuple[int, str]:
    """(byte size, sha256 hex) of a local file, read in 1 MiB blocks: shards can be gigabytes."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def _write_new(path: Path, data: bytes) -> None:
    """Write `data` as a new file at `path` (a temp name): a leftover one is unlinked first, never truncated, since a
    file in a DVC-tracked folder may be a hardlink into DVC's cache."""
    path.unlink(missing_ok=True)
    with open(path, "xb") as handle:
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


def _read_marker(marker: Path) -> dict | None:
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def load_index(root: str | Path) -> ShardIndex:
    """Read `index.json` of a shard directory or URL."""
    root = locations.normalize(root)
    path = locations.join(root, INDEX)
    if not locations.is_file(path):
        if locations.is_url(root):
            raise GenddError(f"{path} not found: check the URL, or run gendd prepare and upload its output there")
        raise GenddError(f"{path} not found; run `gendd prepare --spec <spec> --out {root}` first")
    redo = "re-run gendd prepare" + ("" if locations.is_url(root) else f" --out {root}")
    try:
        raw = json.loads(locations.read_text(path))
    except ValueError as err:
        raise GenddError(f"{path} is not valid JSON ({locations.one_line(err)}): {redo}") from err
    try:
        splits = {
            name: ShardSet(
                root,
                name,
                tuple(s["shards"]),
                tuple(s["counts"]),
                tuple(s["starts"]),
                s.get("keys_file"),
                tuple(s.get("sizes", ())),
                tuple(s.get("sha256", ())),
                s.get("keys_size"),
                s.get("keys_sha256"),
                s.get("keys_array"),
            )
            for name, s in raw["splits"].items()
        }
        return ShardIndex(root, raw["spec"], raw["spec_hash"], raw["shard_size"], raw["max_samples"], splits)
    except (KeyError, TypeError, AttributeError) as err:
        raise GenddError(f"{path} lacks field {locations.one_line(err)}: {redo}") from err


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
    root = locations.check_local_out(out)
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
    if _read_marker(marker) != signature:
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


@dataclass(frozen=True)
class ShardData:
    """Decoded samples of one or more shards: keys, (N, C, H, W) uint8 images and (N,) int64 labels (-1 = none)."""

    keys: list[str]
    images: torch.Tensor
    labels: torch.Tensor
    png: list[bytes] | None = None  # the encoded images, kept when a writer re-packs them (WebDataset caches)


REWRITES = "(it rewrites damaged shards; the feature cache stays valid since shards are deterministic)"


def _redo(location: str | Path) -> str:
    """What to do about a damaged shard: remake it (and upload it again when it is remote)."""
    if locations.is_url(location):
        return "re-run gendd prepare and upload the shards again"
    return f"re-run gendd prepare --out {Path(str(location).removeprefix('file://')).parent} {REWRITES}"


def shard_count_error(shards: ShardSet, i: int, found: int) -> GenddError:
    """The error for shard i holding `found` samples where index.json says otherwise, with the fix that works: a
    shard whose size or sha256 differs from the recorded one is damaged (prepare rewrites it); one that is as
    recorded means index.json itself is wrong (prepare rewrites that). For remote shards: remake and upload."""
    location = shards.path(i)
    head = f"{location}: {found} samples, index.json says {shards.counts[i]}"
    if locations.is_url(location):
        return GenddError(f"{head}: the shard or index.json is damaged; {_redo(location)}")
    redo = f"re-run gendd prepare --out {shards.root}"
    if not shards.sizes or not Path(location).is_file():
        return GenddError(f"{head}: the shard or index.json is damaged; {redo} {REWRITES}")
    size = Path(location).stat().st_size
    if size != shards.sizes[i]:
        return GenddError(
            f"{head}: the shard is damaged or truncated ({size} bytes, index.json recorded {shards.sizes[i]}); "
            f"{redo} {REWRITES}"
        )
    if shards.hashes and file_digest(Path(location))[1] != shards.hashes[i]:
        return GenddError(f"{head}: the shard is damaged (its sha256 differs from index.json's); {redo} {REWRITES}")
    return GenddError(
        f"{head}, but the shard is byte for byte as prepare wrote it: index.json is wrong or was edited; "
        f"{redo} to rewrite index.json"
    )


def _open_tar(location: str | Path) -> tarfile.TarFile:
    """A shard as a tarfile: local files are streamed, remote ones fetched whole once (memory: one shard)."""
    if locations.is_url(location):
        return tarfile.open(fileobj=io.BytesIO(locations.read_bytes(location)), mode="r:")
    return tarfile.open(locations.normalize(location), "r")


def read_shard(path: str | Path, keep_png: bool = False) -> ShardData:
    """Decode one whole shard in order, as tensors."""
    import torch

    keys, images, labels, raw = decode_shard(path, keep_png)
    return ShardData(keys, torch.from_numpy(images), torch.from_numpy(labels), raw)


def decode_shard(path: str | Path, keep_png: bool = False) -> tuple[list[str], np.ndarray, np.ndarray, list | None]:
    """Decode one whole shard (a path or URL) in order, torch-free: keys, (N, C, H, W) uint8 images, (N,) int64
    labels, and the encoded images when asked. tarfile reads it in one pass (no streaming pipeline needed here)."""
    keys, images, labels, raw, current = [], [], [], [], {}

    def flush() -> None:
        if current:
            if "png" not in current:
                raise GenddError(f"{path}: sample {current['key']} has no png; the shard is corrupt: {_redo(path)}")
            keys.append(current["key"])
            images.append(current["png"])
            labels.append(current.get("cls", -1))
            current.clear()

    try:
        with _open_tar(path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if current and key != current["key"]:
                    flush()
                current["key"] = key
                data = tar.extractfile(member).read()
                if ext == "png":
                    current["png"] = np.asarray(Image.open(io.BytesIO(data)))
                    if keep_png:
                        raw.append(data)
                elif ext == "cls":
                    current["cls"] = int(data)
            flush()
    except (tarfile.TarError, OSError, ValueError) as err:
        raise GenddError(f"{path}: unreadable shard ({locations.one_line(err)}); {_redo(path)}") from err
    array = np.stack(images)
    array = array[:, None] if array.ndim == 3 else array.transpose(0, 3, 1, 2)  # -> (N, C, H, W)
    return keys, np.ascontiguousarray(array), np.asarray(labels, dtype=np.int64), raw if keep_png else None


def read_shard_labels(path: str | Path) -> tuple[list[str], list[int]]:
    """Keys and labels of a shard without decoding its images (cheap: stores are sized from this)."""
    keys, labels = [], []
    try:
        with _open_tar(path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if not keys or keys[-1] != key:
                    keys.append(key)
                    labels.append(-1)
                if ext == "cls":
                    labels[-1] = int(tar.extractfile(member).read())
    except (tarfile.TarError, OSError, ValueError) as err:
        raise GenddError(f"{path}: unreadable shard ({locations.one_line(err)}); {_redo(path)}") from err
    return keys, labels


def load_split(shards: ShardSet) -> ShardData:
    """Every shard of a split, concatenated in global order (small datasets are held whole in memory)."""
    import torch

    parts = [read_shard(shards.path(i)) for i in range(len(shards.names))]
    for i, part in enumerate(parts):
        if len(part.keys) != shards.counts[i]:
            raise shard_count_error(shards, i, len(part.keys))
    return ShardData(
        [k for p in parts for k in p.keys], torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts])
    )
