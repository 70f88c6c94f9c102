"""The one storage layer: read, write, list and delete files on local paths and s3:// URIs.

Built on pyarrow.fs; every failure surfaces as a StorageError that names the URI and what to do.
"""

from __future__ import annotations

import functools
import hashlib
import os
import posixpath
import random
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI and what to do (never credentials).
    `transient`: the store was unreachable, throttled or failed on its side, so the same call
    may succeed later (retried by this module's retry policy)."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


    def __reduce__(self):  # keep `transient` across processes (a Ray task's error)
        return type(self), (str(self), self.transient)


class StoreUnavailable(StorageError):
    """The object store did not serve a call within the retry budget. Nothing is wrong with the
    input: a batch job stops (exit 4) rather than record the image as unreadable, and a rerun
    resumes."""


def is_s3(uri: str) -> bool:
    """True for s3:// URIs."""
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Append path parts to a local path or s3:// URI; parts are always relative."""
    pieces = [p.strip("/") for p in parts if p.strip("/")]
    if is_s3(uri) or uri.startswith("file://"):
        return "/".join([uri.rstrip("/"), *pieces])
    return os.path.join(uri, *pieces)


# The AWS SDKs' own variables, in their order of precedence; pyarrow's S3FileSystem reads none of
# the endpoint ones (apache/arrow#49643), so this module is the one place that does.
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REGION_VARIABLES = ("AWS_REGION", "AWS_DEFAULT_REGION")
RETRY_VARIABLES = ("AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS")
# What a job's driver hands its Ray workers, so that every process uses the same store the same way.
AWS_VARIABLES = (*ENDPOINT_VARIABLES, *REGION_VARIABLES, *RETRY_VARIABLES)


def endpoint() -> str | None:
    """The S3 endpoint URL the AWS environment names (MinIO, Ceph, R2...), or None for AWS."""
    return next((os.environ[v] for v in ENDPOINT_VARIABLES if os.environ.get(v)), None)


def region() -> str:
    """The AWS region the environment names, else us-east-1."""
    return next((os.environ[v] for v in REGION_VARIABLES if os.environ.get(v)), "us-east-1")


def use_endpoint(url: str) -> dict[str, str]:
    """Point this process at an S3-compatible endpoint, as AWS_ENDPOINT_URL_S3 does for any AWS
    client; returns the variables to hand to other processes (a job's Ray workers)."""
    _check_endpoint(url)
    os.environ["AWS_ENDPOINT_URL_S3"] = url
    return {"AWS_ENDPOINT_URL_S3": url}


def _check_endpoint(url: str):
    parsed = urlparse(url if "://" in url else f"https://{url}")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise StorageError(
            f"S3 endpoint {url!r} is not a URL like http://host:port; fix --s3-endpoint or "
            "AWS_ENDPOINT_URL"
        )
    return parsed


# Retries: the AWS SDKs' own settings (AWS_RETRY_MODE, AWS_MAX_ATTEMPTS), one policy for every
# S3 call of a job. This module's functions retry themselves, so that each retry is counted
# (retries(); the score job sums them into _SUCCESS.json); pyarrow's SDK then tries once. A
# FileSystem handed out by filesystem() (Parquet datasets, Ray Train's checkpoints) retries
# inside the SDK, uncounted, with the same budget.
DEFAULT_MAX_ATTEMPTS = 10
# Errors after which the same call may succeed: unreachable, reset, timed out (curl 28: under 1
# byte/s for 3 s, as from a paused server), throttled (503 SlowDown) or failed server-side.
TRANSIENT_MARKS = ("NETWORK_CONNECTION", "SLOW_DOWN", "SERVICE_UNAVAILABLE", "THROTTLING",
                   "INTERNAL_FAILURE", "REQUEST_TIMEOUT", "HTTP status 5", "curlCode: 28")
TRANSIENT_CODES = ("SlowDown", "ServiceUnavailable", "Throttling", "ThrottlingException",
                   "RequestTimeout", "InternalError", "500", "502", "503", "504")
_retry_lock = threading.Lock()
_retries: Counter[str] = Counter()


@dataclass(frozen=True)
class RetryPolicy:
    """How S3 calls are retried: `mode` (standard or adaptive, as the AWS SDKs name them;
    adaptive also rate-limits the listing client after throttling) and `max_attempts` per call.
    Backoff doubles from 1 s up to 20 s, half of it random (jitter) and half fixed, so that the
    budget outlasts a stall: 10 attempts wait at least 60 s in all."""

    mode: str = "standard"
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_backoff_s: float = 20.0

    def backoff(self, attempt: int) -> float:
        cap = min(2.0 ** (attempt - 1), self.max_backoff_s)
        return cap / 2 + random.uniform(0, cap / 2)


def retry_policy() -> RetryPolicy:
    """The retry policy the AWS environment names (AWS_RETRY_MODE, AWS_MAX_ATTEMPTS)."""
    mode = os.environ.get("AWS_RETRY_MODE", "standard")
    attempts = os.environ.get("AWS_MAX_ATTEMPTS", str(DEFAULT_MAX_ATTEMPTS))
    if mode not in ("standard", "adaptive", "legacy") or not attempts.isdigit() or int(attempts) < 1:
        raise StorageError(f"AWS_RETRY_MODE={mode!r} / AWS_MAX_ATTEMPTS={attempts!r}: use "
                           "standard or adaptive and a whole number of attempts, at least 1")
    return RetryPolicy("standard" if mode == "legacy" else mode, int(attempts))


def retries() -> dict[str, int]:
    """S3 calls this process retried, by operation (read, write, list, ...), since it started."""
    with _retry_lock:
        return dict(_retries)


def _retried(action: str) -> Callable:
    """Retry a storage function on transient S3 errors under the retry policy, counting each
    retry; past the budget, StoreUnavailable naming the call, the bucket and the budget."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def call(uri: str, *args, **kwargs):
            policy, start = retry_policy(), time.monotonic()
            for attempt in range(1, policy.max_attempts + 1):
                try:
                    return fn(uri, *args, **kwargs)
                except StorageError as exc:
                    if not exc.transient:
                        raise
                    if attempt == policy.max_attempts:
                        raise StoreUnavailable(
                            f"{exc} (failed {attempt} times in {time.monotonic() - start:.0f} s, "
                            f"AWS_MAX_ATTEMPTS={policy.max_attempts}); nothing was lost: run the "
                            "same command again to resume", transient=True) from exc
                    with _retry_lock:
                        _retries[action] += 1
                    time.sleep(policy.backoff(attempt))
            raise AssertionError("unreachable")

        return call

    return wrap


@functools.cache
def _s3_filesystem(url: str | None, region: str, attempts: int) -> pafs.S3FileSystem:
    # allow_delayed_open: a small file is one PutObject rather than a three-call multipart
    # upload, so one try of a part file's write is one request that may fail.
    options = {"region": region, "allow_delayed_open": True,
               "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=attempts)}
    if url is None:
        return pafs.S3FileSystem(**options)
    # pyarrow wants host:port and the scheme apart.
    parsed = _check_endpoint(url)
    host = parsed.netloc.rsplit("@", 1)[-1]  # host:port, [v6]:port; drops any user:pass@
    return pafs.S3FileSystem(endpoint_override=host, scheme=parsed.scheme, **options)


def filesystem(uri: str, *, retrying: bool = True) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding `uri` and the path inside it (absolute, or bucket/key for S3).
    Its S3 calls retry inside the SDK; retrying=False: once (this module retries and counts)."""
    if is_s3(uri):
        path = uri[len("s3://") :].strip("/")
        if not path:
            raise StorageError(f"{uri!r} names no bucket; use s3://bucket/prefix")
        attempts = retry_policy().max_attempts if retrying else 1
        return _s3_filesystem(endpoint(), region(), attempts), path
    if uri.startswith("file://"):
        uri = unquote(urlparse(uri).path)
    elif "://" in uri:
        raise StorageError(f"{uri!r}: unsupported scheme; use a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _endpoint_text() -> str:
    url = endpoint()
    if url is None:
        return f"AWS S3 (region {region()})"
    parsed = urlparse(url if "://" in url else f"https://{url}")
    if parsed.username is None:
        return url
    # An endpoint may carry user:password@; keep that out of messages and logs.
    host = parsed.hostname if parsed.port is None else f"{parsed.hostname}:{parsed.port}"
    return parsed._replace(netloc=host).geturl()


def storage_error(exc: OSError, uri: str, action: str) -> StorageError:
    """Translate a pyarrow/OS error into a StorageError that says what to do."""
    text = str(exc)
    if not is_s3(uri):
        if isinstance(exc, FileNotFoundError):
            return StorageError(f"{uri} does not exist; check the path")
        if isinstance(exc, PermissionError):
            return StorageError(f"permission denied to {action} {uri}; check file permissions")
        return StorageError(f"could not {action} {uri}: {text}")
    fs, path = filesystem(uri)
    bucket = path.split("/", 1)[0]
    where = _endpoint_text()
    missing_bucket = (
        f"bucket {bucket!r} does not exist or is not reachable at {where}; "
        "create it or check AWS_ENDPOINT_URL (or --s3-endpoint)"
    )
    if "NO_SUCH_BUCKET" in text:
        return StorageError(missing_bucket)
    if any(s in text for s in ("ACCESS_DENIED", "INVALID_ACCESS_KEY", "SIGNATURE_DOES_NOT_MATCH")):
        return StorageError(
            f"access denied to {action} {uri} at {where}; check AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket policy"
        )
    if "NETWORK_CONNECTION" in text:
        return StorageError(
            f"cannot reach S3 at {where} to {action} {uri} (bucket {bucket!r}); check "
            "AWS_ENDPOINT_URL (or --s3-endpoint) and that it is up", transient=True)
    if any(mark in text for mark in TRANSIENT_MARKS):
        reason = text.split(": AWS Error ", 1)[-1]
        return StorageError(f"S3 at {where} did not {action} {uri} (bucket {bucket!r}): "
                            f"{reason}", transient=True)
    if isinstance(exc, FileNotFoundError):
        # pyarrow reports a missing bucket as a missing key on reads; tell the two apart.
        try:
            bucket_found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
        except OSError:
            bucket_found = True
        if not bucket_found:
            return StorageError(missing_bucket)
        return StorageError(f"{uri} does not exist; check the key or prefix")
    return StorageError(f"could not {action} {uri} at {where}: {text}")


@_retried("read")
def read_bytes(uri: str) -> bytes:
    """The whole content of one file."""
    fs, path = filesystem(uri, retrying=False)
    try:
        with fs.open_input_stream(path, compression=None) as f:
            return f.readall()
    except OSError as exc:
        raise storage_error(exc, uri, "read") from exc


@_retried("write")
def write_bytes(uri: str, data: bytes) -> None:
    """Write a file, creating parent folders; readers never see a partly written file."""
    fs, path = filesystem(uri, retrying=False)
    try:
        if is_s3(uri):
            # An S3 upload becomes visible only when complete. Always close streams explicitly:
            # an unclosed one flushes in its destructor, which hangs against an in-process server.
            with fs.open_output_stream(path, compression=None) as f:
                f.write(data)
            return
        parent, name = os.path.split(path)
        os.makedirs(parent, exist_ok=True)
        # Temp file in the same folder so os.replace is a same-filesystem atomic rename;
        # os.open with 0o666 keeps the usual umask permissions that mkstemp (0o600) would not.
        tmp = os.path.join(parent, f".{name}.{uuid.uuid4().hex}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
    except OSError as exc:
        raise storage_error(exc, uri, "write") from exc


@_retried("copy")
def copy_file(src: str, dst: str, *, chunk_size: int = 8 << 20) -> str:
    """Stream one file between local paths and s3:// URIs, a chunk at a time; returns its sha256 hex.

    Memory stays at one chunk whatever the file's size. As with write_bytes, readers never see a
    partly written dst: a local one is renamed into place when complete, an S3 upload appears
    when complete.
    """
    src_fs, src_path = filesystem(src, retrying=False)
    dst_fs, dst_path = filesystem(dst, retrying=False)
    digest = hashlib.sha256()

    def pump(source, write) -> None:
        while True:
            try:
                chunk = source.read(chunk_size)
            except OSError as exc:
                raise storage_error(exc, src, "read") from exc
            if not chunk:
                return
            digest.update(chunk)
            write(chunk)

    try:
        source = src_fs.open_input_stream(src_path, compression=None)
    except OSError as exc:
        raise storage_error(exc, src, "read") from exc
    with source:
        if is_s3(dst):
            try:
                with dst_fs.open_output_stream(dst_path, compression=None) as out:
                    pump(source, out.write)
            except OSError as exc:
                raise storage_error(exc, dst, "write") from exc
            return digest.hexdigest()
        size = _info(src_fs, src_path, src).size
        parent, name = os.path.split(dst_path)
        tmp = os.path.join(parent, f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            os.makedirs(parent, exist_ok=True)
            free = shutil.disk_usage(parent).free
            if size is not None and size > free:
                # Fail before the transfer rather than at a full disk after gigabytes of it.
                raise StorageError(
                    f"not enough free space in {parent} for {src} ({size / 1e9:.2f} GB needed, "
                    f"{free / 1e9:.2f} GB free); free some space or choose another folder"
                )
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as out:
                pump(source, out.write)
            os.replace(tmp, dst_path)
        except OSError as exc:
            raise storage_error(exc, dst, "write") from exc
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return digest.hexdigest()


@_retried("move")
def move(src: str, dst: str) -> None:
    """Move one file within one filesystem: a same-filesystem rename locally (atomic), a
    server-side copy then a delete on S3 (the copy appears whole or not at all)."""
    fs, src_path = filesystem(src, retrying=False)
    _, dst_path = filesystem(dst, retrying=False)
    try:
        if is_s3(src):
            try:
                fs.copy_file(src_path, dst_path)
            except OSError:
                if (_info(fs, src_path, src).type != pafs.FileType.NotFound
                        or _info(fs, dst_path, dst).type != pafs.FileType.File):
                    raise
                return  # an earlier try moved it, then failed on what pyarrow does after
            try:
                fs.delete_file(src_path)
            except FileNotFoundError:
                pass  # an earlier try's delete landed and its answer was lost
        else:
            os.makedirs(os.path.dirname(dst_path), exist_ok=True)
            os.replace(src_path, dst_path)
    except OSError as exc:
        raise storage_error(exc, f"{src} -> {dst}", "move") from exc


def _info(fs: pafs.FileSystem, path: str, uri: str) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise storage_error(exc, uri, "look up") from exc


@_retried("look up")
def size(uri: str) -> int:
    """The size in bytes of one file."""
    fs, path = filesystem(uri, retrying=False)
    info = _info(fs, path, uri)
    if info.type != pafs.FileType.File:
        raise storage_error(FileNotFoundError(uri), uri, "look up")
    return info.size


@_retried("look up")
def exists(uri: str) -> bool:
    """True if a file or folder/prefix exists at `uri` (a missing bucket counts as absent)."""
    fs, path = filesystem(uri, retrying=False)
    return _info(fs, path, uri).type != pafs.FileType.NotFound


@_retried("list")
def list_files(
    uri: str,
    *,
    extensions: Iterable[str] | None = None,
    recursive: bool = True,
) -> list[str]:
    """Sorted full URIs of the files under a folder/prefix, optionally only some extensions."""
    fs, path = filesystem(uri, retrying=False)
    suffixes = None
    if extensions is not None:
        suffixes = tuple("." + e.lower().lstrip(".") for e in extensions)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    except (FileNotFoundError, NotADirectoryError) as exc:
        if _info(fs, path, uri).type == pafs.FileType.File:
            raise StorageError(f"{uri} is a file, not a folder; pass its folder") from None
        raise storage_error(exc, uri, "list") from exc
    except OSError as exc:
        raise storage_error(exc, uri, "list") from exc
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(
        prefix + info.path
        for info in infos
        if info.type == pafs.FileType.File
        and (suffixes is None or info.base_name.lower().endswith(suffixes))
    )


@_retried("delete")
def delete(uri: str) -> None:
    """Delete a file, or a folder/prefix with everything under it; absent is not an error.

    On a bare s3://bucket this empties the bucket but keeps it.
    """
    fs, path = filesystem(uri, retrying=False)
    kind = _info(fs, path, uri).type
    try:
        if kind == pafs.FileType.File:
            fs.delete_file(path)
        elif kind == pafs.FileType.Directory:
            if is_s3(uri) and "/" not in posixpath.normpath(path):
                fs.delete_dir_contents(path)
            else:
                fs.delete_dir(path)
    except FileNotFoundError:
        pass  # deleted concurrently: the outcome asked for
    except OSError as exc:
        raise storage_error(exc, uri, "delete") from exc


@functools.cache
def _s3_client(url: str | None, region_name: str, policy: RetryPolicy):
    import boto3
    from botocore.config import Config

    # boto3 only for listing: it pages and returns ETags, which pyarrow's listing does not.
    # botocore retries each page itself (standard or adaptive); pages count their retries.
    retries = {"mode": policy.mode, "max_attempts": policy.max_attempts}
    return boto3.client("s3", endpoint_url=url, region_name=region_name,
                        config=Config(retries=retries))


def _boto_error(exc: Exception, uri: str) -> StorageError:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    where = _endpoint_text()
    bucket = uri[len("s3://") :].split("/", 1)[0]
    if code == "NoSuchBucket":
        return StorageError(
            f"bucket {bucket!r} does not exist or is not reachable at {where}; "
            "create it or check AWS_ENDPOINT_URL (or --s3-endpoint)"
        )
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
        return StorageError(
            f"access denied to list {uri} at {where}; check AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket policy"
        )
    attempts = retry_policy().max_attempts
    if type(exc).__name__ in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                              "ConnectionClosedError"):
        return StoreUnavailable(
            f"cannot reach S3 at {where} to list {uri} (bucket {bucket!r}) in {attempts} "
            "attempts (AWS_MAX_ATTEMPTS); check AWS_ENDPOINT_URL (or --s3-endpoint) and that it "
            "is up, then run the same command again", transient=True)
    if code in TRANSIENT_CODES:
        return StoreUnavailable(
            f"S3 at {where} did not list {uri} (bucket {bucket!r}): {code} in {attempts} "
            "attempts (AWS_MAX_ATTEMPTS); run the same command again", transient=True)
    return StorageError(f"could not list {uri} at {where}: {code or type(exc).__name__}")


def list_objects(
    uri: str,
    *,
    extensions: Iterable[str] | None = None,
    page_size: int = 1000,
) -> Iterator[list[tuple[str, int, str | None]]]:
    """Pages of (uri, size_bytes, etag) under a folder/prefix, recursive, in key order.

    S3 gives its ETag; local files have none (their content hash is taken when read).
    Raises StorageError when the folder/prefix holds nothing at all.
    """
    suffixes = tuple("." + e.lower().lstrip(".") for e in extensions) if extensions else None

    def wanted(name: str) -> bool:
        return suffixes is None or name.lower().endswith(suffixes)

    found = False
    if is_s3(uri):
        _, path = filesystem(uri, retrying=False)
        bucket, _, prefix = path.partition("/")
        prefix = prefix + "/" if prefix else ""
        client = _s3_client(endpoint(), region(), retry_policy())
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}
        )
        try:
            for page in pages:
                if retried := page.get("ResponseMetadata", {}).get("RetryAttempts", 0):
                    with _retry_lock:
                        _retries["list"] += retried
                found = found or bool(page.get("Contents"))
                batch = [
                    (f"s3://{bucket}/{o['Key']}", int(o["Size"]), o["ETag"].strip('"'))
                    for o in page.get("Contents", [])
                    if not o["Key"].endswith("/") and wanted(o["Key"])
                ]
                if batch:
                    yield batch
        except Exception as exc:  # botocore's errors carry the S3 error code
            if isinstance(exc, StorageError):
                raise
            raise _boto_error(exc, uri) from exc
    else:
        _, root = filesystem(uri, retrying=False)
        if not os.path.isdir(root):
            raise StorageError(f"{uri} is not a folder; check the path")
        batch: list[tuple[str, int, str | None]] = []
        for parent, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                found = True
                if wanted(name) and not name.startswith("."):
                    full = os.path.join(parent, name)
                    batch.append((full, os.path.getsize(full), None))
                    if len(batch) >= page_size:
                        yield batch
                        batch = []
        if batch:
            yield batch
    if not found:
        raise StorageError(f"nothing under {uri}; check the prefix or folder")
