"""A hyperparameter sweep's bookkeeping, without Ray Tune: its search dimensions checked
against the detector's options, the trials' results as a ranked table, the best trial's
options, and the ranking as jobs.tune prints it."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

# One search dimension: (option name, distribution, its arguments), as jobs.tune parses --param.
Param = tuple[str, str, list[Any]]


def check_params(detector: str, params: list[Param], search: str) -> None:
    """Fail unless there is something to search, every dimension is an option of `detector`,
    and a grid search has only discrete dimensions."""
    from anomaly_core.detectors import make_config

    if not params:
        raise ValueError("nothing to search: pass --param NAME=KIND:ARGS or --space file.yaml")
    fields = set(make_config(detector).__dataclass_fields__)
    unknown = [p for p, _, _ in params if p not in fields]
    if unknown:
        raise ValueError(f"{detector} has no option(s) {unknown}; its options: {sorted(fields)}")
    if search == "grid" and any(k not in ("grid", "choice") for _, k, _ in params):
        raise ValueError("--search grid needs every --param as choice:... or grid:...")


def results_table(results: Iterable[Any], params: list[str]) -> pa.Table:
    """One row per trial (a Ray Tune Result: its metrics, config, error and path): its
    parameters, the objective of the epoch its fit keeps (the rank), the last epoch's metrics,
    epochs and wall time; sorted by the objective, trials without one last."""
    rows = []
    for result in results:
        m = result.metrics or {}
        cfg = result.config or {}
        error = str(result.error)[:500] if result.error else m.get("fatal_error")
        rows.append({
            "trial_id": m.get("trial_id") or str(result.path).rsplit("/", 1)[-1],
            "status": "error" if error else "ok",
            **{f"param_{p}": json.dumps(cfg.get(p)) for p in params},
            "objective": m.get("kept_objective"),
            "kept_epoch": m.get("best_epoch", 0 if "kept_objective" in m else None),
            "last_objective": m.get("objective"),
            **{k: m.get(k) for k in ("val_image_auroc", "val_pixel_auroc", "val_aupro", "loss")},
            "epochs": m.get("training_iteration"),
            "wall_s": m.get("time_total_s"),
            "error": error,
        })
    rows.sort(key=lambda r: (r["objective"] is None, -(r["objective"] or 0.0)))
    return pa.Table.from_pylist(rows)


def best_options(best: dict[str, Any], fixed: dict[str, Any], params: list[str]) -> dict[str, Any]:
    """The options of a results row (its param_<name> columns, JSON) over the fixed ones."""
    return {**fixed, **{p: json.loads(best[f"param_{p}"]) for p in params}}


def ranking(sweep: str, rows: list[dict[str, Any]], params: list[str], best: float) -> str:
    """The trials as ranked, one line each, under a header with the `best` objective."""
    lines = [f"\nsweep {sweep}: {len(rows)} trials, best objective {best:.4f}",
             f"{'rank':<5}{'objective':>10}  " + "  ".join(f"{p:>14}" for p in params)
             + f"{'wall_s':>9}"]
    for i, r in enumerate(rows):
        value = "failed" if r["objective"] is None else f"{r['objective']:.4f}"
        shown = [_short(json.loads(r["param_" + p])) for p in params]
        lines.append(f"{i + 1:<5}{value:>10}  " + "  ".join(f"{v:>14}" for v in shown)
                     + f"{(r['wall_s'] or 0):>9.1f}")
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
