"""The one storage layer: read, write, list and delete files on local paths and s3:// URIs.

Built on pyarrow.fs; every failure surfaces as a StorageError that names the URI and what to do.
"""

from __future__ import annotations

import functools
import hashlib
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterable, Iterator
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI and what to do (never credentials)."""


def is_s3(uri: str) -> bool:
    """True for s3:// URIs."""
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Append path parts to a local path or s3:// URI; parts are always relative."""
    pieces = [p.strip("/") for p in parts if p.strip("/")]
    if is_s3(uri) or uri.startswith("file://"):
        return "/".join([uri.rstrip("/"), *pieces])
    return os.path.join(uri, *pieces)


def _resolve_endpoint(s3_endpoint: str | None) -> str | None:
    return (
        s3_endpoint
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or None
    )


def _resolve_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


@functools.cache
def _s3_filesystem(endpoint: str | None, region: str) -> pafs.S3FileSystem:
    if endpoint is None:
        return pafs.S3FileSystem(region=region)
    # pyarrow ignores AWS_ENDPOINT_URL and wants host:port and scheme apart.
    parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise StorageError(
            f"S3 endpoint {endpoint!r} is not a URL like http://host:port; fix --s3-endpoint"
        )
    host = parsed.netloc.rsplit("@", 1)[-1]  # host:port, [v6]:port; drops any user:pass@
    return pafs.S3FileSystem(endpoint_override=host, scheme=parsed.scheme, region=region)


def filesystem(uri: str, *, s3_endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding `uri` and the path inside it (absolute, or bucket/key for S3)."""
    if is_s3(uri):
        path = uri[len("s3://") :].strip("/")
        if not path:
            raise StorageError(f"{uri!r} names no bucket; use s3://bucket/prefix")
        return _s3_filesystem(_resolve_endpoint(s3_endpoint), _resolve_region()), path
    if uri.startswith("file://"):
        uri = unquote(urlparse(uri).path)
    elif "://" in uri:
        raise StorageError(f"{uri!r}: unsupported scheme; use a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _endpoint_text(s3_endpoint: str | None) -> str:
    endpoint = _resolve_endpoint(s3_endpoint)
    if endpoint is None:
        return f"AWS S3 (region {_resolve_region()})"
    parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    if parsed.username is None:
        return endpoint
    # An endpoint may carry user:password@; keep that out of messages and logs.
    host = parsed.hostname if parsed.port is None else f"{parsed.hostname}:{parsed.port}"
    return parsed._replace(netloc=host).geturl()


def _storage_error(exc: OSError, uri: str, action: str, s3_endpoint: str | None) -> StorageError:
    """Translate a pyarrow/OS error into a StorageError that says what to do."""
    text = str(exc)
    if not is_s3(uri):
        if isinstance(exc, FileNotFoundError):
            return StorageError(f"{uri} does not exist; check the path")
        if isinstance(exc, PermissionError):
            return StorageError(f"permission denied to {action} {uri}; check file permissions")
        return StorageError(f"could not {action} {uri}: {text}")
    fs, path = filesystem(uri, s3_endpoint=s3_endpoint)
    bucket = path.split("/", 1)[0]
    where = _endpoint_text(s3_endpoint)
    missing_bucket = (
        f"bucket {bucket!r} does not exist or is not reachable at {where}; "
        "create it or check --s3-endpoint"
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
            f"cannot reach S3 at {where} to {action} {uri}; check --s3-endpoint and that it is up"
        )
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


def read_bytes(uri: str, *, s3_endpoint: str | None = None) -> bytes:
    """The whole content of one file."""
    fs, path = filesystem(uri, s3_endpoint=s3_endpoint)
    try:
        with fs.open_input_stream(path, compression=None) as f:
            return f.readall()
    except OSError as exc:
        raise _storage_error(exc, uri, "read", s3_endpoint) from exc


def write_bytes(uri: str, data: bytes, *, s3_endpoint: str | None = None) -> None:
    """Write a file, creating parent folders; readers never see a partly written file."""
    fs, path = filesystem(uri, s3_endpoint=s3_endpoint)
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
        raise _storage_error(exc, uri, "write", s3_endpoint) from exc


def copy_file(src: str, dst: str, *, s3_endpoint: str | None = None, chunk_size: int = 8 << 20) -> str:
    """Stream one file between local paths and s3:// URIs, a chunk at a time; returns its sha256 hex.

    Memory stays at one chunk whatever the file's size. As with write_bytes, readers never see a
    partly written dst: a local one is renamed into place when complete, an S3 upload appears
    when complete.
    """
    src_fs, src_path = filesystem(src, s3_endpoint=s3_endpoint)
    dst_fs, dst_path = filesystem(dst, s3_endpoint=s3_endpoint)
    digest = hashlib.sha256()

    def pump(source, write) -> None:
        while True:
            try:
                chunk = source.read(chunk_size)
            except OSError as exc:
                raise _storage_error(exc, src, "read", s3_endpoint) from exc
            if not chunk:
                return
            digest.update(chunk)
            write(chunk)

    try:
        source = src_fs.open_input_stream(src_path, compression=None)
    except OSError as exc:
        raise _storage_error(exc, src, "read", s3_endpoint) from exc
    with source:
        if is_s3(dst):
            try:
                with dst_fs.open_output_stream(dst_path, compression=None) as out:
                    pump(source, out.write)
            except OSError as exc:
                raise _storage_error(exc, dst, "write", s3_endpoint) from exc
            return digest.hexdigest()
        size = _info(src_fs, src_path, src, s3_endpoint).size
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
            raise _storage_error(exc, dst, "write", s3_endpoint) from exc
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return digest.hexdigest()


def move(src: str, dst: str, *, s3_endpoint: str | None = None) -> None:
    """Move one file within one filesystem: a same-filesystem rename locally (atomic), a
    server-side copy then a delete on S3 (the copy appears whole or not at all)."""
    fs, src_path = filesystem(src, s3_endpoint=s3_endpoint)
    _, dst_path = filesystem(dst, s3_endpoint=s3_endpoint)
    try:
        if is_s3(src):
            fs.copy_file(src_path, dst_path)
            fs.delete_file(src_path)
        else:
            os.makedirs(os.path.dirname(dst_path), exist_ok=True)
            os.replace(src_path, dst_path)
    except OSError as exc:
        raise _storage_error(exc, f"{src} -> {dst}", "move", s3_endpoint) from exc


def _info(fs: pafs.FileSystem, path: str, uri: str, s3_endpoint: str | None) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise _storage_error(exc, uri, "look up", s3_endpoint) from exc


def exists(uri: str, *, s3_endpoint: str | None = None) -> bool:
    """True if a file or folder/prefix exists at `uri` (a missing bucket counts as absent)."""
    fs, path = filesystem(uri, s3_endpoint=s3_endpoint)
    return _info(fs, path, uri, s3_endpoint).type != pafs.FileType.NotFound


def list_files(
    uri: str,
    *,
    extensions: Iterable[str] | None = None,
    recursive: bool = True,
    s3_endpoint: str | None = None,
) -> list[str]:
    """Sorted full URIs of the files under a folder/prefix, optionally only some extensions."""
    fs, path = filesystem(uri, s3_endpoint=s3_endpoint)
    suffixes = None
    if extensions is not None:
        suffixes = tuple("." + e.lower().lstrip(".") for e in extensions)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    except (FileNotFoundError, NotADirectoryError) as exc:
        if _info(fs, path, uri, s3_endpoint).type == pafs.FileType.File:
            raise StorageError(f"{uri} is a file, not a folder; pass its folder") from None
        raise _storage_error(exc, uri, "list", s3_endpoint) from exc
    except OSError as exc:
        raise _storage_error(exc, uri, "list", s3_endpoint) from exc
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(
        prefix + info.path
        for info in infos
        if info.type == pafs.FileType.File
        and (suffixes is None or info.base_name.lower().endswith(suffixes))
    )


def delete(uri: str, *, s3_endpoint: str | None = None) -> None:
    """Delete a file, or a folder/prefix with everything under it; absent is not an error.

    On a bare s3://bucket this empties the bucket but keeps it.
    """
    fs, path = filesystem(uri, s3_endpoint=s3_endpoint)
    kind = _info(fs, path, uri, s3_endpoint).type
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
        raise _storage_error(exc, uri, "delete", s3_endpoint) from exc


@functools.cache
def _s3_client(endpoint: str | None, region: str):
    import boto3

    # boto3 only for listing: it pages and returns ETags, which pyarrow's listing does not.
    return boto3.client("s3", endpoint_url=endpoint, region_name=region)


def _boto_error(exc: Exception, uri: str, s3_endpoint: str | None) -> StorageError:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    where = _endpoint_text(s3_endpoint)
    bucket = uri[len("s3://") :].split("/", 1)[0]
    if code == "NoSuchBucket":
        return StorageError(
            f"bucket {bucket!r} does not exist or is not reachable at {where}; "
            "create it or check --s3-endpoint"
        )
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
        return StorageError(
            f"access denied to list {uri} at {where}; check AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket policy"
        )
    if type(exc).__name__ in ("EndpointConnectionError", "ConnectTimeoutError"):
        return StorageError(f"cannot reach S3 at {where} to list {uri}; check --s3-endpoint")
    return StorageError(f"could not list {uri} at {where}: {code or type(exc).__name__}")


def list_objects(
    uri: str,
    *,
    extensions: Iterable[str] | None = None,
    s3_endpoint: str | None = None,
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
        _, path = filesystem(uri, s3_endpoint=s3_endpoint)
        bucket, _, prefix = path.partition("/")
        prefix = prefix + "/" if prefix else ""
        client = _s3_client(_resolve_endpoint(s3_endpoint), _resolve_region())
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}
        )
        try:
            for page in pages:
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
            raise _boto_error(exc, uri, s3_endpoint) from exc
    else:
        _, root = filesystem(uri)
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
