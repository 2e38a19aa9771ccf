"""Where inputs live: a local path or an fsspec URL (`http(s)://`, `s3://`, `gs://`). Reads go through here; outputs
stay local (`check_local_out`), so no stage ever half-writes to object storage."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

from pipeline.errors import GenddError

# Scheme -> the module that serves it (None: built in) and the pip command that installs it.
READ_SCHEMES: dict[str, tuple[str | None, str]] = {
    "local": (None, ""),
    "file": (None, ""),
    "http": ("aiohttp", "pip install aiohttp"),
    "https": ("aiohttp", "pip install aiohttp"),
    "s3": ("s3fs", "pip install s3fs (or pip install 'gendd[s3]')"),
    "gs": ("gcsfs", "pip install gcsfs (or pip install 'gendd[gcs]')"),
    "gcs": ("gcsfs", "pip install gcsfs (or pip install 'gendd[gcs]')"),
}
# Two or more letters before "://" so a Windows drive ("C:/") never reads as a scheme.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
# A URL that went through Path() lost a slash ("s3://b/x" -> "s3:/b/x"); writing there would make an "s3:" folder.
_MANGLED_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")
# Connect and between-packet limits rather than a total one: a slow but live download of a large shard is fine, a
# dead server or a stalled transfer fails within a minute instead of hanging a training run.
HTTP_TIMEOUT_S = {"connect": 30.0, "sock_read": 60.0}


def one_line(exc: BaseException) -> str:
    """An exception's message squeezed onto one line, to quote inside a one-line GenddError."""
    return " ".join(str(exc).split()) or type(exc).__name__


def scheme(location: str | Path) -> str:
    """The URL scheme of `location` in lower case, or "local" for a plain path."""
    match = _SCHEME.match(location) if isinstance(location, str) else None
    return match.group(1).lower() if match else "local"


def is_url(location: str | Path) -> bool:
    """Whether `location` is a URL that fsspec must serve (`file://` is a local path, not one)."""
    return scheme(location) not in ("local", "file")


def check_readable(location: str | Path) -> None:
    """Refuse, before any work, a location whose scheme this install cannot read."""
    kind = scheme(location)
    if kind not in READ_SCHEMES:
        known = ", ".join(f"{s}://" for s in READ_SCHEMES if s != "local")
        raise GenddError(f"{location}: cannot read {kind}:// locations: use a local path or one of {known}")
    module, install = READ_SCHEMES[kind]
    if module is not None and importlib.util.find_spec(module) is None:
        raise GenddError(f"{location}: reading {kind}:// needs the {module} package: {install}")


def _local(location: str | Path) -> Path:
    """A local location as a Path, without a `file://` prefix."""
    return Path(str(location)[len("file://") :]) if scheme(location) == "file" else Path(location)


def normalize(location: str | Path) -> str | Path:
    """A checked read location: the URL string for remote data, else a Path (`file://` prefix dropped)."""
    check_readable(location)
    return str(location).rstrip("/") if is_url(location) else _local(location)


def check_local_out(location: str | Path) -> Path:
    """An output location as a local Path; a URL is refused (nothing is created)."""
    if scheme(location) != "file" and (is_url(location) or _MANGLED_URL.match(str(location))):
        raise GenddError(
            f"{location}: writing to URLs is not supported: write to a local path and upload it (e.g. aws s3 sync)"
        )
    return _local(location)


def join(root: str | Path, *parts: str) -> str | Path:
    """`root` joined with `parts`: with "/" for a URL, as a Path otherwise."""
    if is_url(root):
        return "/".join([str(root).rstrip("/"), *(part.strip("/") for part in parts)])
    return _local(root).joinpath(*parts)


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for `url`, also for libraries that open it themselves (zarr): finite HTTP timeouts."""
    if scheme(url) not in ("http", "https"):
        return {}  # s3/gs: credentials and settings come from their usual environment variables and config files
    import aiohttp

    return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, **HTTP_TIMEOUT_S)}}


def _filesystem(url: str) -> Any:
    """The fsspec filesystem for `url` (fsspec caches instances per process and drops them after a fork)."""
    import fsspec

    return fsspec.filesystem(scheme(url), **storage_options(url))


def network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a remote read may raise for a missing object, a refused or dropped connection, or a timeout."""
    errors: list[type[BaseException]] = [OSError, TimeoutError]
    if importlib.util.find_spec("aiohttp") is not None:
        import aiohttp

        errors.append(aiohttp.ClientError)  # HTTP status errors (403, 500) are not OSErrors
    return tuple(errors)


def unreachable(url: str | Path, exc: BaseException) -> GenddError:
    """The one-line error for a remote read that failed."""
    if isinstance(exc, FileNotFoundError):
        return GenddError(f"{url} not found: check the URL (and that the data was uploaded there)")
    return GenddError(f"cannot read {url} ({one_line(exc)}): check the URL and that the server is reachable")


def read_bytes(location: str | Path) -> bytes:
    """The whole content of a local file or a remote object."""
    location = normalize(location)
    if not isinstance(location, str):
        return location.read_bytes()
    try:
        return _filesystem(location).cat_file(location)
    except network_errors() as exc:
        raise unreachable(location, exc) from exc


def read_text(location: str | Path) -> str:
    """The content of a local file or remote object as UTF-8 text."""
    return read_bytes(location).decode("utf-8")


def exists(location: str | Path) -> bool:
    """Whether a file or directory (a remote object or prefix) is at `location`; an unreachable server is an error."""
    location = normalize(location)
    if not isinstance(location, str):
        return location.exists()
    fs, url = _filesystem(location), location
    try:
        # strict: fsspec's HTTP exists() otherwise answers False for a refused connection, hiding the real cause.
        return bool(fs.exists(url, strict=True) if scheme(url) in ("http", "https") else fs.exists(url))
    except FileNotFoundError:
        return False
    except network_errors() as exc:
        raise unreachable(url, exc) from exc


def is_file(location: str | Path) -> bool:
    """Whether a file is at `location` (remote: an object; object stores have no directories to confuse it with)."""
    location = normalize(location)
    return exists(location) if isinstance(location, str) else location.is_file()
