"""Shared fixtures: an in-process moto S3 server on loopback, fresh buckets on it, one local Ray."""

import os

# Before anything imports ray or transformers: these are read at import time.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANOMALY_OFFLINE", "1")  # never try a model hub from tests
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# The model registry: an embedded SQLite store of this session's own, never ./mlruns.
os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///" + __import__("os").path.join(
    __import__("tempfile").mkdtemp(prefix="ray-anomaly-mlflow-"), "mlflow.db"))
# Ray Train's controller polls its workers every 2 s by default, so each finished fit waits up
# to that long to be noticed; a trivial 2-worker fit took 30.8 s at 0.2 s against 33.7 s at 2 s
# here, and the suite runs a few dozen fits and trials.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# S3 artifacts are cached per node; tests keep theirs out of the home folder.
os.environ.setdefault("RAY_ANOMALY_CACHE", __import__("tempfile").mkdtemp(prefix="ray-anomaly-cache-"))

import logging  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402

_FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a real S3 server (moto) on 127.0.0.1, named by AWS_ENDPOINT_URL in os.environ
    (as a user configures any AWS client) with fake credentials beside it."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in _FAKE_AWS_ENV}
    os.environ.update(_FAKE_AWS_ENV)
    # One line per request on stderr otherwise.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    saved["AWS_ENDPOINT_URL"] = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = url
    try:
        yield url
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _restoring_endpoint_variable() -> Iterator[None]:
    """A job's --s3-endpoint sets AWS_ENDPOINT_URL_S3 for its whole process, as it should; a job
    run in-process by a test or a module's fixture must not point later tests at its endpoint."""
    before = os.environ.get("AWS_ENDPOINT_URL_S3")
    yield
    if before is None:
        os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    else:
        os.environ["AWS_ENDPOINT_URL_S3"] = before


_endpoint_flag_stays_in_its_test = pytest.fixture(autouse=True)(_restoring_endpoint_variable)
_endpoint_flag_stays_in_its_module = pytest.fixture(autouse=True, scope="module")(
    _restoring_endpoint_variable)


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty, uniquely named bucket on the moto server, as s3://<name>."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint: str) -> Iterator[None]:
    """One local Ray for the whole session, on 127.0.0.1; it sees the fake S3 credentials."""
    import socket

    import ray

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dashboard_port = sock.getsockname()[1]
    # The dashboard serves the State API, which Ray Train's placement-group cleaner needs to
    # free a Tune trial's workers once the trial ends; without it their CPUs stay reserved.
    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=dashboard_port, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """synthetic(category, size, n_train, n_test_good, n_test_defect) -> root of a generated
    MVTec-style tree; the same arguments return the same (read-only) tree, generated once."""
    from anomaly_core.data.synthetic import generate

    roots: dict[tuple, str] = {}

    def make(category: str, size: int, n_train: int, n_test_good: int, n_test_defect: int) -> str:
        key = (category, size, n_train, n_test_good, n_test_defect)
        if key not in roots:
            root = str(tmp_path_factory.mktemp(f"synthetic-{category}-{size}"))
            generate(root, categories=[category], size=size, n_train=n_train,
                     n_test_good=n_test_good, n_test_defect=n_test_defect)
            roots[key] = root
        return roots[key]

    return make
