"""What a job checks on its driver before any worker starts, without Ray: the detector builds
and its weights resolve, an output is writable, resources fit a node, and what a local path
looks like from one node. jobs/preflight.py runs these against the Ray cluster, for training
and scoring alike; each failure names the input and what to do (exit 2).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import uuid
from collections.abc import Sequence

from anomaly_core import storage


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


def path_fingerprint(path: str, marker: str | None) -> str:
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


def probe_node(paths: dict[str, str | None], weights: Sequence[tuple[str, str]]) -> dict:
    """Runs on one node: each path's fingerprint and each weights source's problem (or None)."""
    from anomaly_core.features.backbones import check_weights as resolve

    out = {"paths": {p: path_fingerprint(p, m) for p, m in paths.items()}, "weights": {}}
    for backbone, source in weights:
        try:
            resolve(backbone, source)
            out["weights"][f"{backbone}:{source}"] = None
        except Exception as exc:
            out["weights"][f"{backbone}:{source}"] = str(exc)
    return out


def existing_ancestor(path: str) -> str:
    """`path`, or its nearest existing ancestor (an output folder may not exist yet)."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path
