"""Writing outputs safely: check the output location before long work, write every file under a temporary name and
rename it into place (a crash or a full disk never leaves a file that looks complete), and say what an
operating-system error means in one line."""

from __future__ import annotations

import errno
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline import locations
from pipeline.errors import GenddError

_ADVICE = {
    errno.ENOSPC: "no space left on the device: free space or choose another output location",
    errno.EDQUOT: "disk quota exceeded: free space or choose another output location",
    errno.EACCES: "permission denied: choose a location you can write, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a location you can write, or fix its permissions",
    errno.EROFS: "the filesystem is read-only: choose a writable output location",
    errno.ENOTDIR: "a part of the path is an existing file, not a directory: choose another location",
    errno.EEXIST: "it exists and is not what gendd expects there: remove it or choose another location",
    errno.EISDIR: "it is a directory where a file is expected: remove it or choose another location",
    errno.ENOENT: "no such file or directory: check the path",
    errno.EIO: "input/output error from the device: check the disk",
}


def os_error_line(err: OSError) -> str:
    """One line for an operating-system error: the path it concerns and what to do."""
    where = err.filename if err.filename is not None else "?"
    advice = _ADVICE.get(err.errno or -1, f"{err.strerror or type(err).__name__}: check the path and the disk")
    return f"{where}: {advice}"


def check_out_writable(out: str | Path) -> Path | str:
    """`check_writable` for a stage that writes object storage too: a URL's bucket is checked (credentials, the
    bucket, write permission: one line each) before any work."""
    location = locations.check_out(out)
    if isinstance(location, str):
        locations.probe_writable(location)
        return location
    return check_writable(location)


def check_writable(out: str | Path) -> Path:
    """Create the output directory `out` (local only) and prove it writable, before any long work starts."""
    root = locations.check_local_out(out)
    probe = root / f".gendd-write-test.{uuid.uuid4().hex}"
    try:
        if root.exists() and not root.is_dir():
            raise GenddError(f"{root}: the output path is an existing file: choose a directory path for the output")
        root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"gendd")
        probe.unlink()
    except OSError as err:
        if err.filename is not None and Path(err.filename) == probe:
            err = OSError(err.errno, err.strerror, str(root))
        raise GenddError(f"cannot write the output: {os_error_line(err)}") from err
    return root


@contextmanager
def naming(path: str | Path, *aliases: Path) -> Iterator[None]:
    """Re-raise an operating-system error that names no file (a full disk answers a write() so) or names one of
    `aliases` (a temporary name) as one about `path`: the error line then says which output failed."""
    try:
        yield
    except OSError as err:
        unnamed = err.filename is None or any(Path(err.filename) == alias for alias in aliases)
        if unnamed and err.errno is not None:
            raise OSError(err.errno, err.strerror, str(path)) from err  # the same subclass (errno decides it)
        raise


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on failure it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with naming(path, tmp):
            yield tmp
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, value: Any, indent: int | None = 1) -> None:
    """Write a JSON file atomically."""
    write_text(path, json.dumps(value, indent=indent))


def save_figure(fig: Any, path: str | Path, dpi: int = 100) -> None:
    """Save a matplotlib figure atomically (the format named explicitly: the temporary name has no .png)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
