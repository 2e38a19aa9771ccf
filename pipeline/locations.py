"""Where inputs and outputs live: a local path or an fsspec URL (`http(s)://`, `s3://`, `gs://`). Reads go through
here; outputs are local, or an object store (`s3://`, `gs://`) where every object is uploaded whole, so a reader never
sees half of one. Remote calls retry transient errors (botocore's standard mode) and then fail in one line."""

from __future__ import annotations

import importlib.util
import os
import re
import uuid
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
# Object stores gendd writes to; every other output is a local path.
WRITE_SCHEMES = ("s3", "gs", "gcs")
# Attempts of one S3 call (botocore "standard" retries: exponential backoff with jitter, up to 20 s apart), so an
# outage of about a minute is ridden out and a dead endpoint fails in one line within a few minutes.
S3_ATTEMPTS = 8


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
    """An output location that must be local, as a Path; a URL is refused (nothing is created)."""
    if scheme(location) != "file" and (is_url(location) or _MANGLED_URL.match(str(location))):
        raise GenddError(
            f"{location}: this output must be a local path: write it locally (object storage: prepare and extract "
            "write s3:// and gs:// URLs)"
        )
    return _local(location)


def check_out(location: str | Path) -> Path | str:
    """An output location of a stage that writes object storage: a local Path, or the URL of a scheme this install
    can write (checked without network access: `probe_writable` checks the bucket)."""
    kind = scheme(location)
    if kind in ("local", "file"):
        return check_local_out(location)  # also refuses a URL that lost a slash
    if kind not in WRITE_SCHEMES:
        writable = ", ".join(f"{s}://" for s in WRITE_SCHEMES)
        raise GenddError(f"{location}: cannot write {kind}:// locations: write to a local path or to {writable}")
    check_readable(location)
    return str(location).rstrip("/")


def s3_attempts() -> int:
    """Attempts of one S3 call: GENDD_S3_ATTEMPTS, else S3_ATTEMPTS."""
    return int(os.environ.get("GENDD_S3_ATTEMPTS") or S3_ATTEMPTS)


def _bucket(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0]


def remote_error(url: str, exc: BaseException, doing: str = "write") -> GenddError:
    """One line for a failed object-store call: missing credentials, a missing bucket, access denied, an endpoint
    that stays unreachable after the retries, each with what to do."""
    name, bucket = type(exc).__name__, _bucket(url)
    if name in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"):
        return GenddError(
            f"{url}: no credentials to {doing} {scheme(url)}:// (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or "
            "AWS_PROFILE for s3, GOOGLE_APPLICATION_CREDENTIALS for gs)"
        )
    if isinstance(exc, FileNotFoundError) and "bucket" in str(exc).lower():
        return GenddError(f"{url}: bucket {bucket} does not exist: create it (aws s3 mb s3://{bucket}) or fix the URL")
    if isinstance(exc, PermissionError):
        return GenddError(f"{url}: access denied ({one_line(exc)}): use credentials that may {doing} bucket {bucket}")
    if isinstance(exc, FileNotFoundError):
        return GenddError(f"{url} not found: check the URL (and that the data was uploaded there)")
    return GenddError(
        f"cannot {doing} {url} ({one_line(exc)}) after {s3_attempts()} attempts: check the endpoint (AWS_ENDPOINT_URL) "
        "and the network, then re-run (finished parts are kept)"
    )


def probe_writable(url: str) -> None:
    """Before any work: credentials, bucket and write permission of an object-store output, as one line each."""
    fs = _filesystem(url)
    probe = join(url, f".gendd-write-test.{uuid.uuid4().hex}")
    try:
        fs.ls(f"{scheme(url)}://{_bucket(url)}")  # credentials and the bucket (exists() would hide both as False)
        fs.pipe_file(probe, b"gendd")
        fs.rm_file(probe)
    except network_errors() as exc:
        raise remote_error(url, exc) from exc


def object_sizes(url: str) -> dict[str, int]:
    """Every object under the prefix `url` (s3://, gs://) by its path below it, with its size: one listing."""
    if scheme(url) not in WRITE_SCHEMES:
        raise GenddError(
            f"{url}: sizes need a listing, which {scheme(url)}:// lacks: download it, or use s3:// or gs://"
        )
    fs = _filesystem(url)
    try:
        found = fs.find(url, detail=True)
    except network_errors() as exc:
        raise remote_error(url, exc, "read") from exc
    root = fs._strip_protocol(url).rstrip("/")
    return {name[len(root) + 1 :]: int(entry["size"]) for name, entry in found.items()}


def put_bytes(url: str, data: bytes) -> None:
    """Write one object whole (a single PUT: readers see the old object or the new one, never half)."""
    try:
        _filesystem(url).pipe_file(url, data)
    except network_errors() as exc:
        raise remote_error(url, exc) from exc


def put_file(local: Path, url: str) -> None:
    """Upload a local file whole: the object appears complete or not at all (multipart uploads included)."""
    try:
        _filesystem(url).put_file(str(local), url)
    except network_errors() as exc:
        raise remote_error(url, exc) from exc


def put_tree(local: Path, url: str, last: str) -> None:
    """Upload every file under `local` to the prefix `url`, the file `last` (the marker readers look for) last."""
    files = sorted(p for p in local.rglob("*") if p.is_file())
    for path in sorted(files, key=lambda p: p.relative_to(local).as_posix() == last):
        put_file(path, str(join(url, path.relative_to(local).as_posix())))


def join(root: str | Path, *parts: str) -> str | Path:
    """`root` joined with `parts`: with "/" for a URL, as a Path otherwise."""
    if is_url(root):
        return "/".join([str(root).rstrip("/"), *(part.strip("/") for part in parts)])
    return _local(root).joinpath(*parts)


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for `url`, also for libraries that open it themselves (zarr): finite HTTP timeouts, S3 retries.
    Credentials and endpoints come from the usual environment variables and config files (AWS_ENDPOINT_URL too)."""
    if scheme(url) == "s3":
        return {"config_kwargs": {"retries": {"max_attempts": s3_attempts(), "mode": "standard"}}}
    if scheme(url) not in ("http", "https"):
        return {}  # gs: gcsfs retries transient errors itself
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
    if importlib.util.find_spec("botocore") is not None:
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]  # missing credentials, an endpoint that stays unreachable
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
