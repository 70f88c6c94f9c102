"""Checks a job makes on the driver before Ray starts any worker, so that a deterministic problem
(missing weights, empty data, unwritable output, resources no node has, a path other nodes do not
see) ends the job at once with one message that names the input and what to do (exit 2).

The checks that need the Ray cluster live here; their Ray-free parts (and the detector and
output checks) in anomaly_core.preflight.
"""

from __future__ import annotations

import argparse
import os
import uuid
from collections.abc import Sequence

from anomaly_core import storage
from anomaly_core.preflight import (
    PreflightError,
    check_detector,
    check_writable,
    existing_ancestor,
    path_fingerprint,
    placement_problem,
    probe_node,
)
from jobs.common import init_ray

PROBE_TIMEOUT_S = 120.0


def autoscaler_node_types() -> list[dict]:
    """Resources of each node type the autoscaler may launch ([] without an autoscaler)."""
    try:
        from ray._private.state import state  # the GCS copy of the autoscaler's cluster config

        config = state.get_cluster_config()
    except Exception:
        return []
    if config is None:
        return []
    return [dict(group.resources) for group in config.node_group_configs if group.max_count != 0]


def check_resources(bundle: dict[str, float], count: int, what: str, advice: str) -> None:
    """Fail unless the cluster can ever place `count` bundles (otherwise Ray would wait forever:
    "No available node types can fulfill resource request")."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    problem = placement_problem(bundle, count, nodes, autoscaler_node_types())
    if problem:
        raise PreflightError(f"{what}: {problem}; {advice}")


def check_replicas(count: int, cpus: float, use_gpu: bool, count_flag: str, cpus_flag: str) -> None:
    """check_resources for `count` replicas (Train workers, model actors) of `cpus` CPUs and one
    GPU each with --use-gpu, worded with the job's own flags."""
    gpu = " and --use-gpu (1 GPU)" if use_gpu else ""
    check_resources({"CPU": cpus, "GPU": 1.0 if use_gpu else 0.0}, count,
                    f"{count_flag} {count} with {cpus_flag} {cpus:g}{gpu}",
                    f"lower {cpus_flag} or {count_flag} (or drop --use-gpu), or add nodes that large")


def check_nodes(
    paths: Sequence[str | None],
    *,
    detector: str | None = None,
    options: dict | None = None,
) -> int:
    """On a cluster of several nodes, one small task per node checks that every local path given
    to the job is the same folder there (a shared mount) and that the pretrained weights resolve
    there too. Returns the number of nodes checked; raises PreflightError naming path and node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    local = sorted({os.path.abspath(p) for p in paths if p and not storage.is_s3(p)})
    weights = []
    if detector is not None:
        from anomaly_core.detectors import detector_class, make_config

        weights = detector_class(detector).pretrained_weights(make_config(detector, **(options or {})))
    if len(nodes) <= 1 or not (local or weights):
        return len(nodes)
    # A fresh, uniquely named file in each writable folder tells one shared folder from two
    # folders of the same name on two disks; read-only inputs compare their listings instead.
    probes: dict[str, str | None] = {}
    given = {existing_ancestor(p): p for p in local}  # what to name in a message
    for path in given:
        marker = None
        if os.path.isdir(path) and os.access(path, os.W_OK):
            marker = os.path.join(path, f".shared-probe-{uuid.uuid4().hex[:12]}")
            open(marker, "w").close()
        probes[path] = marker
    try:
        expected = {p: path_fingerprint(p, m) for p, m in probes.items()}
        probe = ray.remote(num_cpus=0)(probe_node)
        refs = {
            n["NodeManagerAddress"] + " (" + n["NodeID"][:12] + ")": probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(probes, weights)
            for n in nodes
        }
        try:
            seen = dict(zip(refs, ray.get(list(refs.values()), timeout=PROBE_TIMEOUT_S)))
        except ray.exceptions.GetTimeoutError as exc:
            raise PreflightError(
                f"the per-node check did not finish within {PROBE_TIMEOUT_S:.0f} s on "
                f"{len(nodes)} nodes; check that every node is healthy (`ray status`)") from exc
    finally:
        for marker in probes.values():
            if marker:
                os.remove(marker)
    for node, result in seen.items():
        for path, there in result["paths"].items():
            if there != expected[path]:
                state = "does not exist" if there == "missing" else f"is another folder ({there})"
                where = given[path] if given[path] == path else f"{given[path]} (its folder {path})"
                raise PreflightError(
                    f"{where} {state} on node {node}: on a cluster of {len(nodes)} nodes every local "
                    "path must be a mount all nodes share; use s3:// or a shared filesystem (NFS, "
                    "EFS, a Kubernetes ReadWriteMany volume) mounted at the same path everywhere"
                )
        for source, problem in result["weights"].items():
            if problem:
                raise PreflightError(f"weights {source} cannot be loaded on node {node}: {problem}")
    return len(nodes)


def preflight_training(args: argparse.Namespace, name: str, options: dict,
                       output: str | None) -> tuple[list, list]:
    """jobs.train's and jobs.tune's checks before Ray starts a worker: weights, data, output,
    resources, nodes. Returns the (train, validation) records; every failure raises with the
    input named (exit 2)."""
    from anomaly_core.training.validation import training_records

    check_detector(name, options)
    train, val = training_records(args.data, category=args.category, seed=args.seed,
                                  val_fraction=args.val_fraction, val_data=args.val_data)
    for flag, uri in (("--output", output), ("--storage-path", args.storage_path)):
        if uri:
            check_writable(uri, flag=flag)
    init_ray(args.address)
    check_replicas(args.num_workers, args.cpus_per_worker, args.use_gpu,
                   "--num-workers", "--cpus-per-worker")
    check_nodes([args.data, args.val_data, output, args.storage_path], detector=name,
                options=options)
    return train, val
