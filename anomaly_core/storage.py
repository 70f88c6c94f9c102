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


# The AWS SDKs' own variables, in their order of precedence; pyarrow's S3FileSystem reads none of
# the endpoint ones (apache/arrow#49643), so this module is the one place that does.
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REGION_VARIABLES = ("AWS_REGION", "AWS_DEFAULT_REGION")


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


@functools.cache
def _s3_filesystem(url: str | None, region: str) -> pafs.S3FileSystem:
    if url is None:
        return pafs.S3FileSystem(region=region)
    # pyarrow wants host:port and the scheme apart.
    parsed = _check_endpoint(url)
    host = parsed.netloc.rsplit("@", 1)[-1]  # host:port, [v6]:port; drops any user:pass@
    return pafs.S3FileSystem(endpoint_override=host, scheme=parsed.scheme, region=region)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding `uri` and the path inside it (absolute, or bucket/key for S3)."""
    if is_s3(uri):
        path = uri[len("s3://") :].strip("/")
        if not path:
            raise StorageError(f"{uri!r} names no bucket; use s3://bucket/prefix")
        return _s3_filesystem(endpoint(), region()), path
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
            f"cannot reach S3 at {where} to {action} {uri}; check AWS_ENDPOINT_URL "
            "(or --s3-endpoint) and that it is up"
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


def read_bytes(uri: str) -> bytes:
    """The whole content of one file."""
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path, compression=None) as f:
            return f.readall()
    except OSError as exc:
        raise storage_error(exc, uri, "read") from exc


def write_bytes(uri: str, data: bytes) -> None:
    """Write a file, creating parent folders; readers never see a partly written file."""
    fs, path = filesystem(uri)
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


def copy_file(src: str, dst: str, *, chunk_size: int = 8 << 20) -> str:
    """Stream one file between local paths and s3:// URIs, a chunk at a time; returns its sha256 hex.

    Memory stays at one chunk whatever the file's size. As with write_bytes, readers never see a
    partly written dst: a local one is renamed into place when complete, an S3 upload appears
    when complete.
    """
    src_fs, src_path = filesystem(src)
    dst_fs, dst_path = filesystem(dst)
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


def move(src: str, dst: str) -> None:
    """Move one file within one filesystem: a same-filesystem rename locally (atomic), a
    server-side copy then a delete on S3 (the copy appears whole or not at all)."""
    fs, src_path = filesystem(src)
    _, dst_path = filesystem(dst)
    try:
        if is_s3(src):
            fs.copy_file(src_path, dst_path)
            fs.delete_file(src_path)
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


def size(uri: str) -> int:
    """The size in bytes of one file."""
    fs, path = filesystem(uri)
    info = _info(fs, path, uri)
    if info.type != pafs.FileType.File:
        raise storage_error(FileNotFoundError(uri), uri, "look up")
    return info.size


def exists(uri: str) -> bool:
    """True if a file or folder/prefix exists at `uri` (a missing bucket counts as absent)."""
    fs, path = filesystem(uri)
    return _info(fs, path, uri).type != pafs.FileType.NotFound


def list_files(
    uri: str,
    *,
    extensions: Iterable[str] | None = None,
    recursive: bool = True,
) -> list[str]:
    """Sorted full URIs of the files under a folder/prefix, optionally only some extensions."""
    fs, path = filesystem(uri)
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


def delete(uri: str) -> None:
    """Delete a file, or a folder/prefix with everything under it; absent is not an error.

    On a bare s3://bucket this empties the bucket but keeps it.
    """
    fs, path = filesystem(uri)
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
def _s3_client(url: str | None, region_name: str):
    import boto3

    # boto3 only for listing: it pages and returns ETags, which pyarrow's listing does not.
    return boto3.client("s3", endpoint_url=url, region_name=region_name)


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
    if type(exc).__name__ in ("EndpointConnectionError", "ConnectTimeoutError"):
        return StorageError(f"cannot reach S3 at {where} to list {uri}; check AWS_ENDPOINT_URL (or --s3-endpoint)")
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
        _, path = filesystem(uri)
        bucket, _, prefix = path.partition("/")
        prefix = prefix + "/" if prefix else ""
        client = _s3_client(endpoint(), region())
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
            raise _boto_error(exc, uri) from exc
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
