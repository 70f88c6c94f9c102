"""Storage layer against local folders and a real S3 protocol server (moto on loopback)."""

import hashlib
import os
import shutil
import socket

import moto.settings
import pytest

from anomaly_core import storage
from anomaly_core.storage import StorageError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """An empty root URI for each backend (S3: a bucket on the server AWS_ENDPOINT_URL names)."""
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("s3_bucket")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_round_trip_bytes_creates_parents(root):
    base = root
    uri = storage.join(base, "a", "b", "c.bin")
    data = bytes(range(256)) * 100
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data
    storage.write_bytes(uri, b"second")
    assert storage.read_bytes(uri) == b"second"


def test_relative_and_file_uri_paths_resolve_to_the_same_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage.write_bytes("sub/x.txt", b"hi")
    assert (tmp_path / "sub" / "x.txt").read_bytes() == b"hi"
    assert storage.read_bytes(f"file://{tmp_path}/sub/x.txt") == b"hi"
    assert storage.list_files("sub") == [str(tmp_path / "sub" / "x.txt")]


def test_list_files_is_recursive_sorted_filtered_and_keeps_uri_form(root):
    base = root
    for key in ["b/z.PNG", "a.png", "b/c/d.jpg", "b/notes.txt", "a2.Jpg"]:
        storage.write_bytes(storage.join(base, "imgs", key), b"x")
    folder = storage.join(base, "imgs")
    found = storage.list_files(folder, extensions=[".png", "jpg"])
    expected = sorted(storage.join(folder, k) for k in ["a.png", "a2.Jpg", "b/z.PNG", "b/c/d.jpg"])
    assert found == expected
    assert all(f.startswith("s3://") for f in found) == storage.is_s3(base)
    assert storage.list_files(folder, recursive=False) == [
        storage.join(folder, "a.png"),
        storage.join(folder, "a2.Jpg"),
    ]
    assert len(storage.list_files(folder)) == 5


def test_list_files_on_missing_folder_raises(root):
    base = root
    storage.write_bytes(storage.join(base, "there", "f.bin"), b"x")
    with pytest.raises(StorageError, match="does not exist"):
        storage.list_files(storage.join(base, "nowhere"))
    with pytest.raises(StorageError, match="is a file, not a folder"):
        storage.list_files(storage.join(base, "there", "f.bin"))


def test_missing_key_error_names_the_uri(root):
    base = root
    uri = storage.join(base, "no", "such.bin")
    with pytest.raises(StorageError, match="does not exist") as err:
        storage.read_bytes(uri)
    assert uri in str(err.value)
    assert "bucket" not in str(err.value)


@pytest.mark.parametrize(
    "operation",
    [
        lambda uri: storage.read_bytes(uri),
        lambda uri: storage.write_bytes(uri, b"x"),
        lambda uri: storage.list_files(uri),
    ],
    ids=["read", "write", "list"],
)
def test_missing_bucket_error_names_bucket_and_endpoint(s3_endpoint, operation):
    with pytest.raises(StorageError) as err:
        operation("s3://no-such-bucket-here/images/x.png")
    message = str(err.value)
    assert "bucket 'no-such-bucket-here' does not exist" in message
    assert s3_endpoint in message
    assert "--s3-endpoint" in message


def test_wrong_credentials_give_access_denied_without_the_secret(
    s3_bucket, s3_endpoint, monkeypatch
):
    storage.write_bytes(f"{s3_bucket}/k.bin", b"x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-never-shown")
    # The server is in-process: from now on it checks every request against its (empty) IAM.
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    for operation in (storage.read_bytes, storage.list_files):
        with pytest.raises(StorageError, match="access denied") as err:
            operation(f"{s3_bucket}/k.bin")
        assert "AWS_SECRET_ACCESS_KEY" in str(err.value)
        assert "s3cr3t" not in str(err.value)


def test_unreachable_endpoint_error_names_endpoint(monkeypatch):
    endpoint = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # the default budget waits a minute or more
    with pytest.raises(StorageError, match="cannot reach S3") as err:
        storage.read_bytes("s3://some-bucket/x.png")
    assert endpoint in str(err.value)


def test_exists_for_file_folder_and_missing(root):
    base = root
    storage.write_bytes(storage.join(base, "d", "f.bin"), b"x")
    assert storage.exists(storage.join(base, "d", "f.bin"))
    assert storage.exists(storage.join(base, "d"))
    assert not storage.exists(storage.join(base, "d", "g.bin"))
    assert not storage.exists(storage.join(base, "e"))


def test_exists_is_false_for_missing_bucket(s3_endpoint):
    assert not storage.exists("s3://no-such-bucket-here/x")


def test_delete_removes_file_or_whole_prefix_and_ignores_absent(root):
    base = root
    for key in ["keep.bin", "d/a.bin", "d/e/b.bin"]:
        storage.write_bytes(storage.join(base, key), b"x")
    storage.delete(storage.join(base, "keep.bin"))
    assert not storage.exists(storage.join(base, "keep.bin"))
    storage.delete(storage.join(base, "d"))
    assert storage.list_files(base) == []
    storage.delete(storage.join(base, "never", "was"))


def test_delete_on_bucket_root_empties_but_keeps_bucket(s3_bucket, s3_endpoint):
    storage.write_bytes(f"{s3_bucket}/a/b.bin", b"x")
    storage.delete(s3_bucket)
    assert storage.list_files(s3_bucket) == []


def test_local_write_leaves_no_temp_files_and_old_content_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "model.bin"
    storage.write_bytes(str(target), b"old")
    storage.write_bytes(str(target), b"new")
    assert os.listdir(tmp_path) == ["model.bin"]

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StorageError, match="disk full"):
        storage.write_bytes(str(target), b"partial")
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["model.bin"]


def test_local_write_uses_umask_permissions_not_private_temp_mode(tmp_path):
    old = os.umask(0o022)
    try:
        storage.write_bytes(str(tmp_path / "f.bin"), b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644


def test_endpoint_comes_from_env_with_s3_specific_variable_first(
    s3_bucket, s3_endpoint, monkeypatch
):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    storage.write_bytes(f"{s3_bucket}/env.bin", b"via env")
    assert storage.read_bytes(f"{s3_bucket}/env.bin") == b"via env"


def test_join_handles_slashes_for_local_and_s3():
    assert storage.join("s3://bucket", "a/", "/b.png") == "s3://bucket/a/b.png"
    assert storage.join("s3://bucket/pre/", "x") == "s3://bucket/pre/x"
    assert storage.join("/data/in", "cls", "/x.png") == "/data/in/cls/x.png"
    assert storage.join("rel", "x") == os.path.join("rel", "x")
    assert storage.join("s3://bucket/pre") == "s3://bucket/pre"


def test_bad_uris_raise_with_a_fix(monkeypatch):
    with pytest.raises(StorageError, match="names no bucket"):
        storage.read_bytes("s3://")
    with pytest.raises(StorageError, match="unsupported scheme"):
        storage.read_bytes("gs://bucket/x")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "ftp://host:21")
    with pytest.raises(StorageError, match="not a URL.*AWS_ENDPOINT_URL"):
        storage.read_bytes("s3://bucket/x")


def test_copy_file_streams_both_ways_and_returns_the_sha256(root, tmp_path):
    base = root
    data = os.urandom(3 << 20)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    uri = storage.join(base, "sub", "copy.bin")
    digest = storage.copy_file(str(src), uri, chunk_size=1 << 20)
    assert digest == hashlib.sha256(data).hexdigest()
    back = tmp_path / "out" / "back.bin"
    assert storage.copy_file(uri, str(back), chunk_size=1 << 20) == digest
    assert back.read_bytes() == data and os.listdir(tmp_path / "out") == ["back.bin"]


def test_copy_file_missing_source_names_it_and_writes_nothing(root, tmp_path):
    base = root
    missing = storage.join(base, "nope.bin")
    with pytest.raises(StorageError, match="nope.bin does not exist"):
        storage.copy_file(missing, str(tmp_path / "out" / "x.bin"))
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_copy_file_refuses_before_filling_the_disk(tmp_path, monkeypatch):
    (tmp_path / "src.bin").write_bytes(b"x" * 1000)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 10))
    with pytest.raises(StorageError, match="not enough free space in .*out"):
        storage.copy_file(str(tmp_path / "src.bin"), str(tmp_path / "out" / "x.bin"))
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("where", ["local", "s3"])
def test_gz_named_files_are_stored_and_read_as_their_bytes(where, tmp_path, request):
    # pyarrow would otherwise guess a compression from ".gz": gzip again on S3 writes, gunzip on
    # local reads, so the same file read differently from the two.
    import gzip

    if where == "s3":
        base = request.getfixturevalue("s3_bucket")
    else:
        base = str(tmp_path)
    data = gzip.compress(b"uri\n/a.png\n")
    uri = storage.join(base, "report.csv.gz")
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data
    copy = storage.join(base, "copy.csv.gz")
    storage.copy_file(uri, copy)
    assert storage.read_bytes(copy) == data
