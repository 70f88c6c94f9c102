"""One static HTML page about a scoring run, from its rows, its _SUCCESS.json and, when given, the
labelled test images it scored: what python -m jobs.report writes."""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

from anomaly_core import storage
from anomaly_core.report import labels, load, page, plots

log = logging.getLogger(__name__)


def write_report(scores: str, out: str, *, labels_root: str | None = None,
                 run_id: str | None = None, product: str | None = None, top: int = 24,
                 sample: int = 12, thumb_size: int = 256, days: int = 30) -> str:
    """Write <out>/index.html about `product` (needed when the run scored several) in the run
    `run_id` under `scores` (else the last finished one of the latest day): thumbnails of its `top` most anomalous images and of a random `sample`
    of the rest, its scores against the validation ones, `days` days of its model, and, with
    `labels_root` (an MVTec-layout root), its metrics against the labels. Returns the page's URI.

    Only the light columns of the rows are read for the distributions; PNGs and images only for
    the thumbnails and the labelled rows.
    """
    from anomaly_core.scoring.schema import utc_now

    truth = labels.ground_truth(labels_root) if labels_root else {}
    summary = load.load_summary(scores, run_id, product)
    dataset, fs = load.score_dataset(scores)
    run_rows = load.read_run_rows(dataset, summary)
    scored = run_rows[run_rows["error"].isna()].sort_values("score", ascending=False)
    log.info("run %s: %d rows (%d scored)", summary["run_id"], len(run_rows), len(scored))
    calibration = summary.get("calibration") or {}
    threshold = calibration.get("threshold")
    top_rows = scored.head(top)
    rest = scored.iloc[top:]
    sample_rows = rest.sample(n=min(sample, len(rest)), random_state=0) if len(rest) else rest
    matched = [u for u in run_rows["uri"] if labels.label_key(u) in truth]
    pngs = load.read_pngs(fs, run_rows, {*top_rows["uri"], *sample_rows["uri"], *matched})
    root = load.input_root(summary.get("source"), list(run_rows["uri"]))

    # A thumbnail's true mask serves the metrics too; the cache holds no more than the thumbnails'.
    true_mask = functools.lru_cache(maxsize=max(top + sample, 1))(labels.read_mask)

    def thumbs(chosen) -> list[dict]:
        out = []
        for row in chosen.itertuples():
            facts = truth.get(labels.label_key(row.uri))
            gt = true_mask(facts["mask_uri"]) if facts and facts["mask_uri"] else None
            src, note = plots.thumbnail(row.uri, pngs.get(row.uri), gt, thumb_size)
            out.append({"uri": row.uri, "name": load.relative(row.uri, root), "score": row.score,
                        "threshold": threshold, "anomalous": bool(row.is_anomalous), "src": src,
                        "note": note, "truth": facts and facts["defect"]})
        return out

    n_anomalous = int(scored["is_anomalous"].fillna(False).astype(bool).sum())
    context: dict[str, Any] = {
        "summary": summary, "scores": scores, "side": thumb_size, "root": root,
        "written": utc_now().isoformat(timespec="seconds"),
        "anomalous": n_anomalous, "rate": n_anomalous / max(len(scored), 1),
        "top": thumbs(top_rows), "sample": thumbs(sample_rows),
        "histogram": plots.histogram(scored["score"].to_numpy(), threshold),
        "errors": load.error_reasons(run_rows), "labelled": 0, "days": None,
    }
    reference = np.asarray(calibration.get("normal_scores") or [], dtype=np.float64)
    if len(reference) >= 2 and len(scored) >= 2:
        values = scored["score"].to_numpy()
        context.update(
            drift=load.drift(values, reference),
            drift_plot=plots.drift_plot(values, reference, threshold),
            reference_rate=float((reference >= threshold).mean()) if threshold is not None else 0.0)
    counts = load.per_day(dataset, summary, days)
    if len(counts) > 1:
        context.update(days=counts, days_plot=plots.days_plot(counts))
    if truth:
        images = labels.labelled_images(run_rows, truth, pngs, true_mask)
        table, groups = labels.metrics_table(images)
        context.update(metrics=table, labelled=len(images),
                       curves=plots.curves(groups) if groups else None)
        if not images:
            log.warning("none of the run's images is among the labelled test images of %s",
                        labels_root)
    uri = storage.join(out, "index.html")
    storage.write_bytes(uri, page.render(context).encode())
    return uri
