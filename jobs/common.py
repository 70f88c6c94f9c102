"""Flags and start-up shared by every job: cluster address, S3 endpoint, logging."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("jobs")

# Hide secrets if a config or flag dict is logged.
SECRET_WORDS = ("secret", "password", "token", "key", "credential")


LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
}


def add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster address (default: RAY_ADDRESS, else a local Ray started here)",
    )
    parser.add_argument(
        "--s3-endpoint",
        default=None,
        help="S3-compatible endpoint URL, e.g. http://minio:9000: sets AWS_ENDPOINT_URL_S3 for "
        "the job and its Ray workers. Without it the AWS environment decides (AWS_ENDPOINT_URL_S3 "
        "/ AWS_ENDPOINT_URL, AWS_REGION, AWS_PROFILE, instance roles), as for any AWS client.",
    )
    parser.add_argument("--use-gpu", action="store_true", help="run the model on GPUs")


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
    )


def redacted(config: dict[str, Any]) -> dict[str, Any]:
    """The config with secret-looking values replaced, for logs and summaries."""
    return {
        k: "***" if any(w in k.lower() for w in SECRET_WORDS) else v for k, v in config.items()
    }


def use_storage_flags(args: argparse.Namespace) -> None:
    """--s3-endpoint: this process's AWS_ENDPOINT_URL_S3, and its workers' (see init_ray)."""
    from anomaly_core import storage

    if args.s3_endpoint:
        storage.use_endpoint(args.s3_endpoint)


def init_ray(address: str | None) -> None:
    """Connect to the cluster at `address`, or start a local Ray when there is none.

    The S3 endpoint and region this driver uses travel to every worker in the job's runtime
    environment: a node's own environment may name none, or another store.
    """
    from anomaly_core import storage

    if address is None:
        # A local Ray for a laptop or a test: keep it on loopback and quiet (no usage report).
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return
    # A submitted job's own runtime env already reaches its workers, and Ray refuses to merge a
    # variable that both name.
    submitted = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    given = (submitted.get("runtime_env") or {}).get("env_vars") or {}
    env = {v: os.environ[v] for v in storage.AWS_VARIABLES if os.environ.get(v) and v not in given}
    context = ray.init(address=address, log_to_driver=True,
                       runtime_env={"env_vars": env} if env else None)
    log.info("ray cluster resources: %s", json.dumps(ray.cluster_resources()))
    if getattr(context, "dashboard_url", None):
        log.info("ray dashboard: http://%s", context.dashboard_url)


class JobFailed(RuntimeError):
    """The job ran, and its own check of the outcome failed (exit code 3)."""


@contextlib.contextmanager
def streaming_context(actor_start_timeout: float, batch_bytes: int,
                      stall_timeout: float = 300) -> Iterator[None]:
    """Ray Data settings of a streaming job (the score job): images flow batch by batch. The
    process's DataContext gets its earlier settings back on exit: a job run in-process (a test,
    a notebook) must not leave its stall timeout to the next Dataset, e.g. a training's ingest."""
    import ray

    context = ray.data.DataContext.get_current()
    settings = {
        # Every actor up (model loaded) before images flow: otherwise the first replica ready
        # takes what the others were started for, and a pool that cannot start says so.
        "wait_for_min_actors_s": actor_start_timeout,
        # Each stage hands on a block per batch instead of collecting 128 MiB (Ray's default)
        # of decoded images or maps first: with a few large input blocks, that would hold back
        # the first rows for thousands of small images.
        "target_max_block_size": max(batch_bytes, 1 << 20),
        # Ray Data's per-operator CPU reservation gave the row tasks none on small clusters
        # (decode 1 CPU + actor 1 CPU of 2): no part file until every image was decoded (none
        # after 150 s of a 100,000-image run on 2 CPUs; 22 s without it, same images/s).
        "op_resource_reservation_enabled": False,
        # A batch held by an actor that cannot restart (its node lost, no room elsewhere)
        # waits forever; Ray Data's no-progress guard ends the wait so the job can start again.
        "execution_no_progress_timeout_s": stall_timeout,
    }
    saved = {key: getattr(context, key) for key in settings}
    for key, value in settings.items():
        setattr(context, key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(context, key, value)


def run_job(main) -> None:
    """Run a job's main; the reason for a failure is always the last log line.

    Exit codes: 2 bad input or configuration (before any work), 3 the job's own check failed
    (e.g. --max-error-rate), 4 the object store did not answer within the retry budget, or
    nodes were lost past what the job rides out (a rerun resumes), 1 anything unexpected.
    """
    from anomaly_core.errors import (  # no torch here
        ArtifactError,
        RegistryError,
        WeightsUnavailableError,
    )
    from anomaly_core.storage import StorageError, StoreUnavailable
    from jobs.nodes import ClusterGaveOut

    try:
        try:
            main()
        except Exception as exc:
            if unavailable := _cause(exc, StoreUnavailable):  # also out of a Ray task
                _fail(4, str(unavailable))
            raise
    except (ArtifactError, RegistryError, StorageError, WeightsUnavailableError, ValueError,
            FileNotFoundError) as exc:
        _fail(2, str(exc))
    except JobFailed as exc:
        _fail(3, str(exc))
    except ClusterGaveOut as exc:
        _fail(4, str(exc))
    except SystemExit as exc:
        if isinstance(exc.code, str):  # a usage problem found by the job: the reason goes last
            _fail(2, exc.code)
        raise
    except Exception as exc:  # an unexpected failure: keep the traceback, end on the reason
        log.exception("unexpected error")
        _fail(1, f"{type(exc).__name__}: {exc}")


def _cause(exc: BaseException | None, kind: type) -> BaseException | None:
    """`exc` or the first exception of `kind` it was raised from. Ray Data hands the driver a
    task's exception as text in its own (UserCodeException): then one made from that text."""
    seen, text = set(), str(exc)
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    name = f"{kind.__module__}.{kind.__qualname__}: "
    lines = [line.split(name, 1)[1] for line in text.splitlines() if name in line]
    return kind(lines[-1]) if lines else None


def _fail(code: int, reason: str) -> None:
    """Log the reason as the job's last line and exit with `code`."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            # Workers' lines reach the driver asynchronously; disconnecting first stops them
            # from landing after the reason.
            ray.shutdown()
    log.error("failed: %s", reason)
    sys.exit(code)
