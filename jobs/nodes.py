"""What the jobs do when nodes come and go: watch the cluster's nodes and say at once when one
is lost or joins, tell a lost node's errors from the job's own, and size a restarted stage to
the nodes left.

Ray itself reruns a lost node's tasks and restarts its actors elsewhere; what it cannot do is
finish a batch held by an actor that has no room left to restart in, or rows whose inputs
lived only on the lost node and need that actor to be made again. The score job therefore
runs its pipeline in attempts: when Ray Data reports no progress for --stall-timeout seconds
(its no-progress guard), or passes on a lost node's error, the job starts a new attempt of
the same run over the images not yet written, its model actors sized to the nodes left (see
jobs/score.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("jobs")


class ClusterGaveOut(RuntimeError):
    """Nodes were lost past what the job rides out (exit code 4: the same command resumes)."""


def node_loss_errors() -> tuple[type[BaseException], ...]:
    """Errors a pipeline stage ends with when a node's work was lost for good, and Ray Data's
    no-progress timeout (a stage waiting on an actor that cannot restart)."""
    import ray.exceptions as rex
    from ray.data.exceptions import ExecutionTimeoutError

    return (ExecutionTimeoutError, rex.NodeDiedError, rex.ObjectLostError, rex.OwnerDiedError,
            rex.ActorDiedError, rex.ActorUnavailableError, rex.WorkerCrashedError)


def replicas_that_fit(bundle: dict[str, float], count: int, free: bool = False) -> int:
    """How many of `count` replicas (each `bundle`) the live nodes could hold (with `free`:
    in what they have free now), at most `count`; `count` where an autoscaler can add nodes
    that hold them."""
    import ray
    from ray._private.state import available_resources_per_node

    from jobs.preflight import autoscaler_node_types, placement_problem

    nodes = (list(available_resources_per_node().values()) if free
             else [n["Resources"] for n in ray.nodes() if n.get("Alive")])
    types = autoscaler_node_types()
    return next((n for n in range(count, 0, -1) if not placement_problem(bundle, n, nodes, types)),
                0)


class NodeWatch:
    """A thread polling the cluster's node table every `every` seconds while a job runs: a node
    lost or joined is logged at once, with `state()` (what the job has done) and `then` (what
    happens next), and `on_lost()` called; `lost` and `draining` keep them for the summary."""

    def __init__(self, state: Callable[[], str], on_lost: Callable[[], Any] = lambda: None,
                 every: float = 1.0, what: str = "the job",
                 then: str = "Ray reruns the tasks it held and restarts its actors on the nodes "
                             "left; the images whose work was there are done again") -> None:
        self.state, self.on_lost, self.every = state, on_lost, every
        self.what, self.then = what, then
        self.lost: list[dict[str, Any]] = []
        self.draining: list[dict[str, Any]] = []  # drain notices (preemption, idle removal)
        self._stop = threading.Event()
        self._start = time.perf_counter()

    @staticmethod
    def drains() -> dict[str, int]:
        """Nodes being drained (Ray's drain API: KubeRay, the autoscaler, cloud preemption
        handlers) and each one's deadline (ms since the epoch, 0 for none)."""
        import ray._private.state

        return dict(ray._private.state.state.get_draining_nodes() or {})

    @staticmethod
    def alive() -> dict[str, str]:
        import ray

        return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}

    def __enter__(self) -> NodeWatch:
        self._known = self.alive()
        self._thread = threading.Thread(target=self._watch, name="node-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _watch(self) -> None:
        while not self._stop.wait(self.every):
            try:
                alive, drains = self.alive(), self.drains()
            except Exception:  # the GCS is briefly unreachable: ask again next time
                continue
            after = round(time.perf_counter() - self._start, 1)
            for node in sorted(set(drains) - {d["node_id"] for d in self.draining}):
                left = (drains[node] / 1000 - time.time()) if drains[node] else None
                self.draining.append({"node": alive.get(node, node), "node_id": node,
                                      "after_s": after, "deadline_in_s": left and round(left)})
                log.warning("node %s is being drained%s, %.0f s into %s (%s): Ray sends it no "
                            "new work, and what it holds finishes there if it can",
                            alive.get(node, node), f" (deadline in {left:.0f} s)" if left else "",
                            after, self.what, self.state())
            for node in sorted(set(self._known) - set(alive)):
                ip, state = self._known[node], self.state()
                self.lost.append({"node": ip, "node_id": node, "after_s": after, "state": state})
                self.on_lost()
                log.warning("node %s lost %.0f s into %s (%s): %s", ip, after, self.what, state,
                            self.then)
            for node in sorted(set(alive) - set(self._known)):
                log.info("node %s joined %.0f s into %s: the work still waiting can use it",
                         alive[node], after, self.what)
            self._known = alive


def next_scoring_attempt(run, args, exc: BaseException, restarts: list[dict], watch: NodeWatch,
                         progress):
    """After the score job's pipeline stopped on a lost node (or made no progress for
    --stall-timeout seconds): a new attempt of the same run (anomaly_core.scoring.runs) over
    the images not yet written. Returns the attempt, its images and its (least, most) model
    actors; ClusterGaveOut past --max-restarts or when no node left can ever hold an actor."""
    from ray.data.exceptions import ExecutionTimeoutError

    from anomaly_core.scoring import runs

    lost = ", ".join(n["node"] for n in watch.lost)
    why = (f"no progress for {args.stall_timeout:g} s" if isinstance(exc, ExecutionTimeoutError)
           else f"{type(exc).__name__}") + (f" after node {lost} was lost" if lost else "")
    gpu = " and a GPU" if args.use_gpu else ""
    if len(restarts) >= args.max_restarts:
        raise ClusterGaveOut(f"scoring stopped ({why}) after {len(restarts)} restart(s) "
                             f"(--max-restarts); the rows written are kept: run the same command "
                             "again to score the rest") from exc
    bundle = {"CPU": args.cpus_per_actor, "GPU": 1.0 if args.use_gpu else 0}
    if not replicas_that_fit(bundle, args.num_actors):
        raise ClusterGaveOut(f"scoring stopped ({why}) and no node left can hold a model actor "
                             f"({args.cpus_per_actor:g} CPUs{gpu}); the rows written are kept: "
                             "run the same command again once nodes are back") from exc
    # The new pool starts with the actors that fit in what is free now (an actor that hangs
    # may hold its CPUs a while after the old pipeline let it go) and grows to --num-actors.
    actors = (max(replicas_that_fit(bundle, args.num_actors, free=True), 1), args.num_actors)
    run = runs.next_attempt(run)
    todo = runs.pending(run)
    restarts.append({"reason": why, "attempt": run.attempt, "images": todo.num_rows,
                     "model_actors": actors[0], "state": progress.state()})
    progress.redone += todo.num_rows
    log.warning("%s (%s): attempt %s scores the %d images not yet written, with %d to %d model "
                "actor(s)", why, progress.state(), run.attempt, todo.num_rows, *actors)
    return run, todo, actors
