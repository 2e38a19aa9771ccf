"""WebDataset layout of the feature cache: self-contained training shards `<split>-features/<split>-NNNNNN.tar`.

One tar per chunk (= per image shard), written to a temp file and moved into place, so a finished tar is the
chunk's "done" flag. Each sample holds `__key__`, `png`, `cls` (labelled samples only) and per-sample `.npy` arrays
in the codec's stored dtype (`features.npy`, `logits.npy`, `views.npy`, and `features_scale.npy` for int8).
`meta.json` holds the attributes, labels, keys and chunking; `head.npz` the teacher classifier. An open store holds the
keys and labels as numpy arrays (`pipeline.data.shards.key_array`, int32), not as the JSON lists they are stored as.
Next to each tar, `<split>-NNNNNN.tar.crc32` records the tar's CRC-32 and size ("crc32 <8 hex> bytes <n>"), written
before the tar: a tar has no checksum over its contents (tarfile checks member headers only), so without it a flipped
byte in a PNG or an array would read back silently. Local reads check it; `gendd cache verify` checks it everywhere.
Tars without one (written by an older gendd) still read, unchecked.
The public interface is `pipeline.cache.store`; this module only lays bytes out on disk.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
import zipfile
import zlib
from pathlib import Path

import numpy as np

from pipeline import locations
from pipeline.data.shards import key_array
from pipeline.errors import GenddError
from pipeline.locations import one_line
from pipeline.outputs import naming

META = "meta.json"


HEAD = "head.npz"


ATTR_KEYS = ("schema_version", "teacher", "dataset", "views", "codec", "complete")


_EXTENSIONS = ("features.npy", "features_scale.npy", "logits.npy", "views.npy", "png", "cls")


CRC_SUFFIX = ".crc32"


def rebuild_hint(location: Path | str, target: str = "it") -> str:
    """What to do about a damaged store (file): rebuild it, and upload it again when it is remote."""
    if locations.is_url(location):
        return "check the URL, or re-run gendd extract and upload the cache again"
    return f"delete {target} and re-run gendd extract"


class StoreDamage(GenddError):
    """A damaged part of a store: one line naming the store, the array (or file) and the chunk, and the fix.

    `array`, `chunk` and `why` stay readable for `gendd cache verify`, which lists every damaged chunk."""

    def __init__(self, path: Path | str, array: str, chunk: int | str | None, why: str, fix: str | None = None):
        self.path, self.array, self.chunk, self.why = path, array, chunk, why
        self.fix = fix or rebuild_hint(path, "the store")
        where = array if chunk is None else f"{array} chunk {chunk}"
        super().__init__(f"{path}: {where} {why}: {self.fix}")


def read_problem(exc: BaseException) -> str:
    """Why a read failed, in a few words (a checksum mismatch without the raw checksum bytes)."""
    text = one_line(exc)
    if "checksum" in text.lower():
        return "cannot be read (bad checksum: the file is corrupt)"
    return f"cannot be read ({text})"


def _replace_atomically(path: Path | str, data: bytes) -> None:
    """Write `data` to a temp file next to `path`, then rename it over `path` (readers never see a partial file); in
    object storage one PUT does the same."""
    if locations.is_url(path):
        locations.put_bytes(str(path), data)
        return
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with naming(path, tmp):
            tmp.write_bytes(data)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _load_npy(data: bytes, headers: dict[bytes, tuple[np.dtype, tuple]]) -> np.ndarray:
    """np.load of one member, parsing each distinct header once (every sample of a chunk shares them)."""
    end = 10 + int.from_bytes(data[8:10], "little")  # npy format 1.0: magic, version, 2-byte header length
    known = headers.get(data[:end]) if data[6] == 1 else None
    if known is None:
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if data[6] == 1 and array.flags.c_contiguous:
            headers[data[:end]] = (array.dtype, array.shape)
        return array
    return np.frombuffer(data, dtype=known[0], offset=end).reshape(known[1])


class WdsStore:
    """A `<split>-features/` directory of feature shards (local, or at a URL: s3://, gs:// writable); its reader
    and writer."""

    fmt = "webdataset"
    MARKER = META  # written last when a store is created

    def __init__(self, path: Path | str, meta: dict):
        self.path = path
        self.chunk_size = int(meta["chunk_size"])
        self.n_chunks = int(meta["n_chunks"])
        # Out of the meta dict: turned into numpy arrays when first read (FeatureCache reads both as it opens).
        self._keys, self._labels = meta.pop("keys", None), meta.pop("labels", None)
        self._meta = meta

    @staticmethod
    def location(cache_dir: Path | str, split: str) -> Path | str:
        """Directory (or URL) that holds one split's feature shards."""
        return locations.join(cache_dir, f"{split}-features")

    @staticmethod
    def exists(path: Path | str) -> bool:
        """Whether a (created) store is at `path`: meta.json is its creation marker."""
        return locations.is_file(locations.join(path, META))

    @staticmethod
    def create(path: Path, attrs: dict, chunk_size: int, keys: np.ndarray, labels: np.ndarray, head: dict) -> None:
        """Lay out an empty store in the (fresh, private) directory `path`."""
        path.mkdir(parents=True, exist_ok=True)
        n = len(keys)
        with zipfile.ZipFile(path / HEAD, "w") as npz:  # np.savez would stamp the current time into the zip
            for name in ("weight", "bias"):
                npz.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), _npy_bytes(head[name]))
        keys = np.strings.decode(key_array(keys), "utf-8").tolist()
        meta = dict(attrs, chunk_size=chunk_size, n_chunks=-(-n // chunk_size), labels=labels.tolist(), keys=keys)
        (path / META).write_text(json.dumps(meta))

    @classmethod
    def open(cls, path: Path | str, writable: bool = False) -> WdsStore:
        """Open an existing store (metadata only; shards are read per chunk); s3:// and gs:// writable too."""
        path = locations.check_out(path) if writable else locations.normalize(path)
        try:
            meta = json.loads(locations.read_text(locations.join(path, META)))
        except (OSError, ValueError) as exc:
            where = locations.join(path, META)
            raise GenddError(f"{where} cannot be read ({one_line(exc)}): {rebuild_hint(path, str(path))}") from exc
        try:
            return cls(path, meta)
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreDamage(path, META, None, f"lacks a valid chunk_size or n_chunks ({one_line(exc)})") from exc

    @property
    def attrs(self) -> dict:
        """The store's attributes (same keys as the Zarr group attributes)."""
        return {k: self._meta[k] for k in ATTR_KEYS if k in self._meta}

    def keys(self) -> np.ndarray:
        """Sample keys in global order, as a `key_array`."""
        if not isinstance(self._keys, np.ndarray):
            if not isinstance(self._keys, list) or not all(isinstance(key, str) for key in self._keys):
                raise StoreDamage(self.path, "keys", None, f"in {META} are missing or not strings")
            self._keys = key_array(self._keys)
        return self._keys

    def labels(self) -> np.ndarray:
        """Labels (N,) int32, -1 = none."""
        if not isinstance(self._labels, np.ndarray):
            try:
                if self._labels is None:
                    raise KeyError("labels")
                labels = np.asarray(self._labels)
                if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
                    raise ValueError(f"not a list of integers (dtype {labels.dtype}, shape {labels.shape})")
            except (KeyError, TypeError, ValueError) as exc:
                raise StoreDamage(self.path, "labels", None, f"in {META} cannot be read ({one_line(exc)})") from exc
            self._labels = labels.astype(np.int32)
        return self._labels

    def _chunk_keys(self, start: int, stop: int) -> list[str]:
        """Keys of samples [start, stop) as str (tar member names)."""
        return np.strings.decode(self.keys()[start:stop], "utf-8").tolist()

    def head(self) -> tuple[np.ndarray, np.ndarray]:
        """Teacher classifier weight (C, D) and bias (C,), float32."""
        try:
            with np.load(io.BytesIO(locations.read_bytes(locations.join(self.path, HEAD)))) as head:
                return head["weight"].astype(np.float32), head["bias"].astype(np.float32)
        except (*locations.network_errors(), ValueError, KeyError, zipfile.BadZipFile) as exc:
            fix = rebuild_hint(self.path, str(self.path))
            raise StoreDamage(self.path, HEAD, None, read_problem(exc), fix) from exc
        except GenddError as exc:  # a remote read that failed
            raise StoreDamage(self.path, HEAD, None, f"cannot be read ({exc})") from exc

    def shard_path(self, i: int) -> Path | str:
        """Tar file (or its URL) of chunk i."""
        return locations.join(self.path, f"{self._meta['dataset']['split']}-{i:06d}.tar")

    def _crc_path(self, i: int) -> Path | str:
        return locations.join(self.path, f"{self._meta['dataset']['split']}-{i:06d}.tar{CRC_SUFFIX}")

    def chunk_fix(self, i: int) -> str:
        """What to do about a damaged chunk i: delete its tar (extraction then redoes just that chunk)."""
        path = self.shard_path(i)
        return rebuild_hint(path) if locations.is_url(path) else f"delete {path} and re-run gendd extract"

    def recorded_crc(self, i: int) -> tuple[int, int] | None:
        """(CRC-32, size) recorded for tar i, or None when it has no checksum file (an older gendd wrote it)."""
        where = self._crc_path(i)
        try:
            if not locations.is_file(where):
                return None
            fields = locations.read_text(where).split()
            if len(fields) != 4 or fields[0] != "crc32" or fields[2] != "bytes":
                raise ValueError(f"unexpected content {' '.join(fields)[:40]!r}")
            return int(fields[1], 16), int(fields[3])
        except (*locations.network_errors(), ValueError) as exc:
            raise StoreDamage(self.path, Path(str(where)).name, i, read_problem(exc), self.chunk_fix(i)) from exc

    def done(self) -> np.ndarray:
        """(n_chunks,) bool: chunk i is done when its tar exists (tars only appear whole, via rename)."""
        recorded = self._meta.get("done", ()) if self._meta.get("complete") else ()
        if locations.is_url(self.path) and len(recorded) == self.n_chunks:
            return np.asarray(recorded, dtype=bool)  # a complete remote store: spare one request per tar
        # Not cached in meta.json locally: deleting a damaged tar and re-running extraction rewrites just that chunk.
        return np.array([locations.is_file(self.shard_path(i)) for i in range(self.n_chunks)], dtype=bool)

    def write(self, i: int, start: int, stored: dict[str, np.ndarray], images: list[bytes] | None) -> None:
        """Write chunk i (samples start.. start+n_i) as one tar, atomically."""
        # Imported here: webdataset pulls in torch (seconds), which readers and the Zarr format never need.
        from webdataset import TarWriter

        n_i = len(stored["views"])
        if images is None or len(images) != n_i:
            got = "none" if images is None else len(images)
            raise GenddError(
                f"chunk {i}: the webdataset cache stores images: pass images= ({n_i} png bytes, got {got})"
            )
        keys, labels = self._chunk_keys(start, start + n_i), self.labels()[start : start + n_i].tolist()
        buffer = io.BytesIO()
        # Fixed mtime/owner so that writing a chunk twice gives the same bytes.
        with TarWriter(buffer, encoder=False, mtime=0, user="gendd", group="gendd") as sink:
            for j in range(n_i):
                sample = {"__key__": keys[j], "png": bytes(images[j])}
                if labels[j] >= 0:
                    sample["cls"] = str(labels[j]).encode()
                sample.update({f"{name}.npy": _npy_bytes(array[j]) for name, array in stored.items()})
                sink.write(sample)
        data = buffer.getvalue()
        # The checksum first: a tar (the chunk's done flag) never exists without its record.
        _replace_atomically(self._crc_path(i), f"crc32 {zlib.crc32(data):08x} bytes {len(data)}\n".encode())
        _replace_atomically(self.shard_path(i), data)

    def read(
        self,
        i: int,
        start: int,
        stop: int,
        crc: tuple[int, int] | None = None,
        *,
        look_up_crc: bool = True,
        images: list[bytes] | None = None,
    ) -> dict[str, np.ndarray]:
        """Stored (not decoded) per-sample arrays of chunk i, stacked along samples; the tar is checked against `crc`
        (CRC-32, size), by default its recorded one (looked up for local stores only: one request less per chunk).
        `images`, when given, receives each sample's PNG bytes from the same tar (no second download)."""
        # tarfile, not webdataset's pipeline: we read one local shard whole and in order, checking every key against
        # meta.json; webdataset's stream/decoder stages (and its torch import) add nothing here.
        keys = self._chunk_keys(start, stop)
        columns: dict[str, list[np.ndarray]] = {}
        headers: dict[bytes, tuple[np.dtype, tuple]] = {}
        j = -1
        path = self.shard_path(i)
        tar_name, fix = Path(str(path)).name, self.chunk_fix(i)
        if crc is None and look_up_crc and not locations.is_url(path):
            crc = self.recorded_crc(i)
        try:
            data = locations.read_bytes(path)  # one read per shard
        except (OSError, GenddError) as exc:
            raise StoreDamage(self.path, tar_name, i, read_problem(exc), fix) from exc
        if crc is not None and (zlib.crc32(data), len(data)) != crc:
            got = f"CRC-32 {zlib.crc32(data):08x}, {len(data)} bytes"
            why = f"is corrupt ({got}; its {tar_name}{CRC_SUFFIX} records {crc[0]:08x}, {crc[1]} bytes)"
            raise StoreDamage(self.path, tar_name, i, why, fix)
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                for member in tar:
                    if j < 0 or not member.name.startswith(keys[j] + "."):
                        j += 1
                        if j >= len(keys) or not member.name.startswith(keys[j] + "."):
                            raise StoreDamage(self.path, tar_name, i, f"has an unexpected member {member.name!r}", fix)
                    ext = member.name[len(keys[j]) + 1 :]
                    if ext.endswith(".npy"):
                        member_data = tar.extractfile(member).read()
                        columns.setdefault(ext[:-4], []).append(_load_npy(member_data, headers))
                    elif ext == "png" and images is not None:
                        images.append(tar.extractfile(member).read())
        except (OSError, tarfile.TarError, ValueError) as exc:
            raise StoreDamage(self.path, tar_name, i, read_problem(exc), fix) from exc
        if images is not None and len(images) != len(keys):
            raise StoreDamage(self.path, tar_name, i, f"holds {len(images)} images for {len(keys)} samples", fix)
        if j != len(keys) - 1 or any(len(c) != len(keys) for c in columns.values()):
            raise StoreDamage(self.path, tar_name, i, f"holds {j + 1} samples, expected {len(keys)}", fix)
        try:
            return {name: np.stack(arrays) for name, arrays in columns.items()}
        except ValueError as exc:  # samples whose arrays differ in shape
            raise StoreDamage(self.path, tar_name, i, f"holds arrays of unequal shapes ({one_line(exc)})", fix) from exc

    def damage_seen(self, complete: bool) -> list[str]:
        """Damage visible without reading the tars (local stores): a done chunk's tar missing (a complete store has
        every tar), or a tar whose size differs from its checksum record."""
        found = []
        listing = locations.object_sizes(str(self.path)) if locations.is_url(self.path) else None
        for i in range(self.n_chunks):
            tar = Path(str(self.shard_path(i)))
            size = listing.get(tar.name) if listing is not None else tar.stat().st_size if tar.is_file() else None
            if size is None:
                if complete:
                    found.append(f"{tar.name} chunk {i}: missing")
                continue
            try:
                recorded = self.recorded_crc(i)
            except StoreDamage as exc:
                found.append(f"{exc.array} chunk {i}: {exc.why}")
                continue
            if recorded is not None and size != recorded[1]:
                found.append(f"{tar.name} chunk {i}: {size} bytes, its checksum file says {recorded[1]}")
        return found

    def set_complete(self) -> None:
        """Record completion (and the per-chunk done list) in meta.json; done last, after every tar exists."""
        update = {"complete": True, "done": [True] * self.n_chunks}
        where = locations.join(self.path, META)
        meta = json.loads(locations.read_text(where)) | update  # keys and labels as stored
        _replace_atomically(where, json.dumps(meta).encode())
        self._meta |= update

    def stored_bytes(self) -> dict[str, int]:
        """Bytes stored per array (tar member payloads of finished shards) plus meta.json and head.npz (a remote store's
        tars are read one by one: the member sizes are in their headers only)."""
        sizes = {name: len(locations.read_bytes(locations.join(self.path, name))) for name in (META, HEAD)}
        sizes = {"meta": sizes[META], "head": sizes[HEAD]}
        for i in np.flatnonzero(self.done()):
            with tarfile.open(fileobj=io.BytesIO(locations.read_bytes(self.shard_path(int(i)))), mode="r:") as tar:
                for member in tar:
                    name = next((e for e in _EXTENSIONS if member.name.endswith("." + e)), "other").removesuffix(".npy")
                    sizes[name] = sizes.get(name, 0) + member.size
        return sizes
