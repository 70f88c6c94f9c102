"""Reading what a scoring run wrote: its _SUCCESS.json, the light columns of its rows, the PNGs of
a few rows, and the per-day counts of its model; and the numbers taken from them alone."""

from __future__ import annotations

import datetime
import json
from typing import Any

import numpy as np

from anomaly_core import storage
from anomaly_core.scoring.runs import RUNS_DIR

LIGHT_COLUMNS = ["uri", "score", "score_normalized", "is_anomalous", "error", "run_id",
                 "model_version", "width", "height", "dt", "product", "version"]


def finished_runs(scores: str) -> list[dict[str, Any]]:
    """Every finished run under `scores` (the score job's --output), one entry per product it
    scored (a fleet run has many): its _SUCCESS.json with that product's counts and model."""
    runs_dir = storage.join(scores, RUNS_DIR)
    if not storage.exists(runs_dir):
        raise FileNotFoundError(f"{scores} holds no scoring runs ({runs_dir} is missing): pass the "
                                "score job's --output as --scores, or run python -m jobs.score first")
    found = [f for f in storage.list_files(runs_dir, extensions=[".json"])
             if f.endswith("/_SUCCESS.json")]
    entries = []
    for summary in (json.loads(storage.read_bytes(f)) for f in found):
        products = summary.pop("products")
        entries += [{**summary, **product} for product in products.values()]
    return entries


def load_summary(scores: str, run_id: str | None, product: str | None = None) -> dict[str, Any]:
    """A product's entry of a run's _SUCCESS.json: the given run, else the last to finish on the
    latest day; the given product, else the run's only one."""
    summaries = finished_runs(scores)
    runs_dir = storage.join(scores, RUNS_DIR)
    if run_id:
        summaries = [s for s in summaries if s["run_id"] == run_id]
        if not summaries:
            raise ValueError(f"run {run_id} has not finished under {scores} (no "
                             f"{runs_dir}/{run_id}/_SUCCESS.json); finish it by running it again")
    if product:
        summaries = [s for s in summaries if s["product"] == product]
        if not summaries:
            raise ValueError(f"no finished run under {scores} scored product {product!r}"
                             + (f" (run {run_id})" if run_id else ""))
    if not summaries:
        raise ValueError(f"no finished run under {scores}: the score job writes _SUCCESS.json last; "
                         "run it (again) to finish its run")
    last = max(summaries, key=lambda s: (s["day"], s["finished_at"]))
    products = sorted({s["product"] for s in summaries if s["run_id"] == last["run_id"]})
    if len(products) > 1:
        raise ValueError(f"run {last['run_id']} scored {len(products)} products "
                         f"({', '.join(products[:10])}); pass --product, or --plant for all")
    return last


def score_dataset(scores: str):
    """The rows under `scores` as one dataset, its partitions (dt=, product=, version=) as
    strings, and its filesystem."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    fs, path = storage.filesystem(scores)
    from anomaly_core.scoring.schema import PARTITION_COLUMNS

    partitioning = pads.partitioning(pa.schema([(c, pa.string()) for c in PARTITION_COLUMNS]),
                                     flavor="hive")
    return pads.dataset(path, filesystem=fs, format="parquet", partitioning=partitioning), fs


def read_run_rows(dataset, summary: dict):
    """The light columns (no PNGs) of the run's rows, with each row's file; only the run's own
    partition is read."""
    import pyarrow.compute as pc

    condition = ((pc.field("dt") == summary["day"]) & (pc.field("product") == summary["product"])
                 & (pc.field("run_id") == summary["run_id"]))
    return dataset.to_table(columns=[*LIGHT_COLUMNS, "__filename"], filter=condition).to_pandas()


def per_day(dataset, summary: dict, days: int):
    """Rows, errors, anomalous images and the anomaly rate per dt= partition of the product, for
    the `days` days up to the run's; partitions outside them are never opened."""
    import pyarrow.compute as pc

    last = datetime.date.fromisoformat(summary["day"])
    first = (last - datetime.timedelta(days=days - 1)).isoformat()
    condition = ((pc.field("product") == summary["product"]) & (pc.field("dt") >= first)
                 & (pc.field("dt") <= last.isoformat()))
    table = dataset.to_table(columns=["dt", "error", "is_anomalous"], filter=condition)
    return day_counts(table.to_pandas())


def day_counts(rows):
    """Rows, errors, anomalous images and the anomaly rate per dt= partition."""
    scored = rows["error"].isna()
    frame = rows.assign(scored=scored, errors=~scored,
                        anomalous=scored & rows["is_anomalous"].fillna(False).astype(bool))
    days = frame.groupby("dt")[["scored", "errors", "anomalous"]].sum()
    days["anomaly_rate"] = days["anomalous"] / days["scored"].clip(lower=1)
    return days.sort_index()


def read_pngs(fs, rows, uris: set[str]) -> dict[str, dict[str, bytes]]:
    """mask_png and heatmap_png of some rows, read only from the files that hold them."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    if not uris:
        return {}
    chosen = rows[rows["uri"].isin(uris)]
    files = sorted(set(chosen["__filename"]))
    run_ids = sorted(set(chosen["run_id"]))
    table = pads.dataset(files, filesystem=fs, format="parquet").to_table(
        columns=["uri", "mask_png", "heatmap_png"],
        filter=pc.field("uri").isin(sorted(uris)) & pc.field("run_id").isin(run_ids))
    return {r["uri"]: r for r in table.to_pylist()}


def error_reasons(run_rows) -> list[dict]:
    """The run's error rows grouped by reason (the image's URI taken out of the message)."""
    errors = run_rows[run_rows["error"].notna()]
    groups: dict[str, list[str]] = {}
    for uri, error in zip(errors["uri"], errors["error"], strict=True):
        groups.setdefault(error.replace(uri, "<image>"), []).append(uri)
    return sorted(({"reason": reason, "rows": len(uris), "example": uris[0]}
                   for reason, uris in groups.items()), key=lambda r: -r["rows"])


def drift(scores: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Two-sample Kolmogorov-Smirnov distance between this run's scores and the validation ones."""
    from scipy.stats import ks_2samp

    result = ks_2samp(scores, reference)
    return {"ks_distance": float(result.statistic), "p_value": float(result.pvalue)}


def input_root(source: str | None, uris: list[str]) -> str:
    """The folder the run's images are named below: the run's source (its --input) when every
    URI is under it, else the URIs' longest common folder (a manifest's images)."""
    source = (source or "").rstrip("/")
    if source and all(u.startswith(source + "/") for u in uris):
        return source
    if not uris:
        return ""
    common = uris[0].split("/")[:-1]
    for uri in uris[1:]:
        folders = uri.split("/")[:-1]
        n = next((i for i, (a, b) in enumerate(zip(common, folders)) if a != b),
                 min(len(common), len(folders)))
        common = common[:n]
    return "/".join(common)


def relative(uri: str, root: str) -> str:
    """`uri` below `root`, or `uri` itself when it is not below it."""
    return uri[len(root) + 1:] if root and uri.startswith(root + "/") else uri
