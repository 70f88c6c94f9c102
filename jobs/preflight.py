"""Checks a job makes on the driver before Ray starts any worker, so that a deterministic problem
(missing weights, empty data, unwritable output, resources no node has, a path other nodes do not
see) ends the job at once with one message that names the input and what to do (exit 2).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import uuid
from collections.abc import Sequence

from anomaly_core import storage

PROBE_TIMEOUT_S = 120.0


class PreflightError(ValueError):
    """A job cannot run as asked; the message names the input and what to do."""


def check_writable(uri: str, *, flag: str = "--output") -> None:
    """Write and delete a probe file under `uri` (a folder or prefix that may not exist yet)."""
    probe = storage.join(uri, f".write-probe-{uuid.uuid4().hex[:12]}")
    created = None  # the topmost local folder the probe creates, removed again after it
    if not storage.is_s3(uri):
        path = os.path.abspath(uri)
        while not os.path.exists(path):
            created, path = path, os.path.dirname(path)
    try:
        storage.write_bytes(probe, b"probe")
        storage.delete(probe)
    except storage.StorageError as exc:
        raise PreflightError(f"{flag} {uri} is not writable ({exc}); choose a folder or bucket "
                             "this job may write to") from exc
    finally:
        if created and os.path.isdir(created):
            shutil.rmtree(created, ignore_errors=True)


def check_detector(detector: str, options: dict) -> list[str]:
    """Build the detector once with random weights (a bad combination of options fails here, not
    in every worker) and resolve the pretrained weights it will load; returns their sources."""
    from anomaly_core.detectors import build_detector, detector_class, make_config
    from anomaly_core.features.backbones import check_weights as resolve

    config = make_config(detector, **options)
    sources = [resolve(b, w)
               for b, w in detector_class(detector).pretrained_weights(config)]
    build_detector(detector, **{**options, "weights": "random"})
    return sources


def _fits(resources: dict, bundle: dict) -> int:
    """How many `bundle`s fit into `resources` (a node's total)."""
    wanted = {k: v for k, v in bundle.items() if v > 0}
    if not wanted:
        return 1 << 30
    return min(math.floor(resources.get(k, 0.0) / v + 1e-9) for k, v in wanted.items())


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


def placement_problem(bundle: dict[str, float], count: int, nodes: list[dict],
                      node_types: list[dict]) -> str | None:
    """Why `count` bundles can never be placed on `nodes` (their total resources) or on nodes of
    the autoscaler's `node_types`, or None when they can."""
    if sum(_fits(r, bundle) for r in nodes) >= count:
        return None
    if any(_fits(r, bundle) > 0 for r in node_types):
        return None  # the autoscaler can add nodes that hold them
    shown = {k: v for k, v in bundle.items() if v > 0}
    largest = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
    have = {k: largest.get(k, 0) for k in ("CPU", "GPU")}
    scope = (f"autoscaler node types {node_types}" if node_types
             else f"{len(nodes)} node(s), the largest with {have}")
    return f"{count} x {shown} cannot be placed on this cluster ({scope})"


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


def _fingerprint(path: str, marker: str | None) -> str:
    """What a path looks like from one node: whether the driver's marker file is there, else a
    file's size or a digest of a folder's entry names."""
    if not os.path.exists(path):
        return "missing"
    if marker:
        return "shared" if os.path.exists(marker) else "another folder"
    if os.path.isfile(path):
        return f"file of {os.path.getsize(path)} bytes"
    with os.scandir(path) as entries:
        names = sorted(e.name for e in entries)
    return f"folder of {len(names)} entries " + hashlib.sha1("\n".join(names).encode()).hexdigest()


def _probe_node(paths: dict[str, str | None], weights: Sequence[tuple[str, str]]) -> dict:
    """Runs on one node: each path's fingerprint and each weights source's problem (or None)."""
    from anomaly_core.features.backbones import check_weights as resolve

    out = {"paths": {p: _fingerprint(p, m) for p, m in paths.items()}, "weights": {}}
    for backbone, source in weights:
        try:
            resolve(backbone, source)
            out["weights"][f"{backbone}:{source}"] = None
        except Exception as exc:
            out["weights"][f"{backbone}:{source}"] = str(exc)
    return out


def _existing(path: str) -> str:
    """`path`, or its nearest existing ancestor (an output folder may not exist yet)."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


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
    given = {_existing(p): p for p in local}  # what to name in a message
    for path in given:
        marker = None
        if os.path.isdir(path) and os.access(path, os.W_OK):
            marker = os.path.join(path, f".shared-probe-{uuid.uuid4().hex[:12]}")
            open(marker, "w").close()
        probes[path] = marker
    try:
        expected = {p: _fingerprint(p, m) for p, m in probes.items()}
        probe = ray.remote(num_cpus=0)(_probe_node)
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
