"""The storage layer against an S3 that throttles, drops connections and stalls: a fault proxy
(tests/s3_faults.py) in front of the loopback S3 server. Every call still succeeds, every
retry is counted, and past the retry budget the error names the call and the bucket."""

import time

import numpy as np
import pytest
from PIL import Image

from anomaly_core import storage
from anomaly_core.data.decode import read_image
from tests.s3_faults import FaultProxy


@pytest.fixture
def proxy(s3_endpoint, monkeypatch):
    with FaultProxy(s3_endpoint, seed=7) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", p.url)  # as a user points any AWS client
        yield p


def _retried() -> int:
    return sum(storage.retries().values())


def test_every_call_survives_throttling_and_resets_and_each_retry_is_counted(proxy, s3_bucket):
    before = _retried()
    proxy.set_faults(slow_down=0.1, reset=0.05)
    uris = [f"{s3_bucket}/in/{i:02d}.bin" for i in range(12)]
    for i, uri in enumerate(uris):
        storage.write_bytes(uri, bytes([i]) * 1000)
    assert [storage.read_bytes(u) for u in uris] == [bytes([i]) * 1000 for i in range(12)]
    assert storage.list_files(f"{s3_bucket}/in") == uris
    listed = [u for page in storage.list_objects(f"{s3_bucket}/in", page_size=5) for u, *_ in page]
    assert listed == uris
    storage.copy_file(uris[0], f"{s3_bucket}/copy.bin")
    for uri in uris[:6]:
        storage.move(uri, uri.replace("/in/", "/moved/"))
    assert storage.size(f"{s3_bucket}/copy.bin") == 1000 and storage.exists(f"{s3_bucket}/moved")
    storage.delete(f"{s3_bucket}/moved")
    proxy.set_faults(slow_down=0, reset=0)
    assert len(storage.list_files(s3_bucket)) == 7  # 6 left in in/, and the copy

    injected = proxy.faults["slow_down"] + proxy.faults["reset"]
    # seed 7: 14 503s and 6 resets in 110 requests, 17 retries
    assert proxy.faults["slow_down"] >= 5 and proxy.faults["reset"] >= 3, proxy.faults
    # A 503 fails one try of one call, which is retried once, and counted. curl sends a request
    # whose reused connection was reset again by itself, once: a reset may cost no retry.
    assert proxy.faults["slow_down"] <= _retried() - before <= injected, proxy.faults
    assert {"read", "write", "list"} <= set(storage.retries())


def test_a_stall_longer_than_a_try_is_waited_out(proxy, s3_bucket):
    # 10 s: three tries time out. The 30 s pause of the issue is the score job's test
    # (tests/integration/test_score_job.py), through the same retries.
    storage.write_bytes(f"{s3_bucket}/a.bin", b"x" * 100)
    before = _retried()
    proxy.stall(10)
    t0 = time.monotonic()
    assert storage.read_bytes(f"{s3_bucket}/a.bin") == b"x" * 100
    assert time.monotonic() - t0 >= 9
    assert _retried() > before  # each try times out after 3 s without a byte


def test_past_the_retry_budget_the_error_names_the_call_and_bucket_and_is_no_error_row(
        proxy, s3_bucket, monkeypatch, tmp_path):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    storage.copy_file(str(image), f"{s3_bucket}/a.png")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    proxy.set_faults(slow_down=1.0)
    bucket = s3_bucket[len("s3://"):]
    with pytest.raises(storage.StoreUnavailable) as err:
        storage.read_bytes(f"{s3_bucket}/a.png")
    text = str(err.value)
    assert f"read {s3_bucket}/a.png" in text and repr(bucket) in text and "3 times" in text
    assert "AWS_MAX_ATTEMPTS=3" in text and "run the same command again" in text
    # An image the store did not serve stops the batch: it is not recorded as unreadable.
    with pytest.raises(storage.StoreUnavailable):
        read_image(f"{s3_bucket}/a.png", (8, 8))
    with pytest.raises(storage.StoreUnavailable, match="did not list"):
        list(storage.list_objects(s3_bucket))
    # Permanent errors are not retried: a missing key is said at once.
    proxy.set_faults(slow_down=0)
    before = _retried()
    assert "does not exist" in read_image(f"{s3_bucket}/missing.png", (8, 8))["error"]
    assert _retried() == before


def test_a_bad_retry_setting_is_named(monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "many")
    with pytest.raises(storage.StorageError, match="AWS_MAX_ATTEMPTS='many'"):
        storage.retry_policy()
