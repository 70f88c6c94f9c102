"""One static HTML page about a scoring run: the most anomalous images with their heatmap and mask,
the score distribution (per day, and against the model's validation scores), metrics against
labels when there are some, and the run's summary. No server, no network: one file to open or send.

    python -m jobs.report --scores DIR_OR_S3 [--labels MVTEC_ROOT] --out report/

Only the light columns of the rows are read for the distributions; PNGs and images are read for
the thumbnails (the top N and a random sample) and, with --labels, for the labelled rows alone.
"""

from __future__ import annotations

import argparse
import base64
import functools
import html
import io
import json
import time
from typing import Any

import numpy as np

from jobs.common import log, run_job, setup_logging, use_storage_flags

LIGHT_COLUMNS = ["uri", "score", "score_normalized", "is_anomalous", "error", "run_id",
                 "model_version", "width", "height", "dt", "model"]
PIXEL_SIDE = 256  # labelled pixel metrics are taken on maps and masks resized to this square


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__.split("\n")[0])
    p.add_argument("--scores", required=True, help="the score job's --output: a folder or s3:// prefix")
    p.add_argument("--out", required=True, help="folder for index.html (a folder or s3:// prefix)")
    p.add_argument("--labels", help="MVTec-layout root whose test images were scored: adds AUROC, "
                   "AUPRO and F1 per category and defect type, and the true defect contours")
    p.add_argument("--run-id", help="the run to report (default: the last finished one of the "
                   "latest day)")
    p.add_argument("--top", type=int, default=24, help="thumbnails of the most anomalous images")
    p.add_argument("--sample", type=int, default=12, help="thumbnails of a random sample of the rest")
    p.add_argument("--thumb-size", type=int, default=256, help="longest side of a thumbnail, px")
    p.add_argument("--days", type=int, default=30, help="days up to the run's in the per-day section")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL")
    args = p.parse_args(argv)
    if args.top < 0 or args.sample < 0:
        p.error(f"--top {args.top} and --sample {args.sample} must be 0 or more")
    if args.days < 1:
        p.error(f"--days {args.days} must be 1 or more")
    if args.thumb_size < 32:
        p.error(f"--thumb-size {args.thumb_size} is too small to see anything; use 32 or more")
    return args


# ---------------------------------------------------------------- reading what the run wrote


def load_summary(scores: str, run_id: str | None) -> dict[str, Any]:
    """The run's _SUCCESS.json: the given run, else the last to finish on the latest day."""
    from anomaly_core import storage
    from anomaly_core.scoring.runs import RUNS_DIR

    runs_dir = storage.join(scores, RUNS_DIR)
    if not storage.exists(runs_dir):
        raise FileNotFoundError(f"{scores} holds no scoring runs ({runs_dir} is missing): pass the "
                                "score job's --output as --scores, or run python -m jobs.score first")
    found = [f for f in storage.list_files(runs_dir, extensions=[".json"])
             if f.endswith("/_SUCCESS.json")]
    summaries = [json.loads(storage.read_bytes(f)) for f in found]
    if run_id:
        summaries = [s for s in summaries if s["run_id"] == run_id]
        if not summaries:
            raise ValueError(f"run {run_id} has not finished under {scores} (no "
                             f"{runs_dir}/{run_id}/_SUCCESS.json); finish it by running it again")
    if not summaries:
        raise ValueError(f"no finished run under {scores}: the score job writes _SUCCESS.json last; "
                         "run it (again) to finish its run")
    return max(summaries, key=lambda s: (s["day"], s["finished_at"]))


def score_dataset(scores: str):
    """The rows under `scores` as one dataset, dt= and model= as string partition columns."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    from anomaly_core import storage

    fs, path = storage.filesystem(scores)
    partitioning = pads.partitioning(pa.schema([("dt", pa.string()), ("model", pa.string())]),
                                     flavor="hive")
    return pads.dataset(path, filesystem=fs, format="parquet", partitioning=partitioning), fs


def read_run_rows(dataset, summary: dict):
    """The light columns (no PNGs) of the run's rows, with each row's file; only the run's own
    partition is read."""
    import pyarrow.compute as pc

    condition = ((pc.field("dt") == summary["day"]) & (pc.field("model") == summary["model"])
                 & (pc.field("run_id") == summary["run_id"]))
    return dataset.to_table(columns=[*LIGHT_COLUMNS, "__filename"], filter=condition).to_pandas()


def per_day(dataset, summary: dict, days: int):
    """Rows, errors, anomalous images and the anomaly rate per dt= partition of the model, for
    the `days` days up to the run's; partitions outside them are never opened."""
    import datetime

    import pyarrow.compute as pc

    last = datetime.date.fromisoformat(summary["day"])
    first = (last - datetime.timedelta(days=days - 1)).isoformat()
    condition = ((pc.field("model") == summary["model"]) & (pc.field("dt") >= first)
                 & (pc.field("dt") <= last.isoformat()))
    table = dataset.to_table(columns=["dt", "error", "is_anomalous"], filter=condition)
    return day_counts(table.to_pandas())


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


def ground_truth(root: str) -> dict[str, dict[str, Any]]:
    """Labelled test images of an MVTec-layout root, keyed by category/test/defect/file."""
    from anomaly_core.data.datasets import mvtec_categories, mvtec_records

    truth = {}
    for category in mvtec_categories(root):
        for record in mvtec_records(root, category, "test"):
            truth[label_key(record.uri)] = {"category": category, "defect": record.defect,
                                            "label": record.label, "mask_uri": record.mask_uri}
    return truth


def label_key(uri: str) -> str:
    """category/test/defect/file: the same image scored from a copy elsewhere still matches."""
    return "/".join(uri.replace("\\", "/").split("/")[-4:])


# ---------------------------------------------------------------- pictures


def _png(fig, tight: bool = True) -> str:
    """A matplotlib figure as a data: URI, closed after; `tight` trims its margins."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight" if tight else None)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _resized(array: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """An 8-bit or boolean array resized to (height, width)."""
    from PIL import Image

    image = Image.fromarray(array.astype(np.uint8) * (255 if array.dtype == bool else 1))
    out = np.asarray(image.resize((size[1], size[0]), Image.NEAREST if nearest else Image.BILINEAR))
    return out > 127 if array.dtype == bool else out


def thumbnail(uri: str, pngs: dict | None, truth_mask: np.ndarray | None, side: int) -> tuple[str, str | None]:
    """The image with its heatmap (jet, translucent), the predicted mask's contour (white) and the
    true defect's contour (green) over it; a data: URI and a note when something is missing."""
    import matplotlib.pyplot as plt

    from anomaly_core.data.decode import load_image
    from anomaly_core.scoring.scorer import decode_png

    heat = decode_png(pngs["heatmap_png"]) if pngs and pngs["heatmap_png"] else None
    mask = decode_png(pngs["mask_png"]) > 0 if pngs and pngs["mask_png"] else None
    note = None
    try:
        image = load_image(uri)
    except Exception as exc:  # moved or deleted since scoring: show the maps alone
        image, note = None, f"image not readable now ({type(exc).__name__})"
    shape = image.shape[:2] if image is not None else heat.shape if heat is not None else (side, side)
    scale = side / max(shape)
    size = (max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale)))
    fig = plt.figure(figsize=(size[1] / 100, size[0] / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    if image is not None:
        ax.imshow(_resized(image, size))
    else:
        ax.imshow(np.zeros(size), cmap="gray")
    if heat is not None:
        # Below a quarter of the way to the pixel threshold stays clear, so the part shows.
        heat = np.ma.masked_less(_resized(heat, size) / 255.0, 0.125)
        ax.imshow(heat, cmap="jet", alpha=0.4, vmin=0, vmax=1)
    for outline, color in ((mask, "white"), (truth_mask, "lime")):
        if outline is not None and outline.any():
            ax.contour(_resized(outline, size, nearest=True), levels=[0.5], colors=color,
                       linewidths=1.2)
    return _png(fig, tight=False), note  # the image fills the figure: no margins to trim


def histogram(scores: np.ndarray, threshold: float | None) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.hist(scores, bins=min(60, max(10, len(scores) // 5)), color="#4477aa")
    if threshold is not None:
        ax.axvline(threshold, color="#cc3311", linestyle="--", label=f"threshold {threshold:.4g}")
        ax.legend()
    ax.set_xlabel("anomaly score")
    ax.set_ylabel("images")
    return _png(fig)


def drift_plot(scores: np.ndarray, reference: np.ndarray, threshold: float | None) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    bins = np.histogram_bin_edges(np.concatenate([scores, reference]), bins=40)
    ax.hist(reference, bins=bins, density=True, alpha=0.5, color="#228833",
            label=f"validation (normal, {len(reference)})")
    ax.hist(scores, bins=bins, density=True, alpha=0.5, color="#4477aa",
            label=f"this run ({len(scores)})")
    if threshold is not None:
        ax.axvline(threshold, color="#cc3311", linestyle="--", label="threshold")
    ax.set_xlabel("anomaly score")
    ax.set_ylabel("density")
    ax.legend()
    return _png(fig)


def days_plot(days) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.bar(days.index, days["scored"], color="#4477aa", label="scored")
    ax.set_ylabel("images scored")
    ax.tick_params(axis="x", rotation=45)
    rate = ax.twinx()
    rate.plot(days.index, 100 * days["anomaly_rate"], color="#cc3311", marker="o")
    rate.set_ylabel("anomalous, %")
    return _png(fig)


def curves(groups: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """ROC and precision-recall curves, one line per category."""
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    fig, (roc, pr) = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, (labels, scores) in groups.items():
        fpr, tpr, _ = roc_curve(labels, scores)
        precision, recall, _ = precision_recall_curve(labels, scores)
        roc.plot(fpr, tpr, label=name)
        pr.plot(recall, precision, label=name)
    roc.plot([0, 1], [0, 1], color="gray", linestyle=":")
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (images)")
    pr.set(xlabel="recall", ylabel="precision", title="precision-recall (images)")
    roc.legend(fontsize=8)
    return _png(fig)


# ---------------------------------------------------------------- numbers


def day_counts(rows):
    """Rows, errors, anomalous images and the anomaly rate per dt= partition."""
    scored = rows["error"].isna()
    frame = rows.assign(scored=scored, errors=~scored,
                        anomalous=scored & rows["is_anomalous"].fillna(False).astype(bool))
    days = frame.groupby("dt")[["scored", "errors", "anomalous"]].sum()
    days["anomaly_rate"] = days["anomalous"] / days["scored"].clip(lower=1)
    return days.sort_index()


def labelled_metrics(run_rows, truth: dict, pngs: dict, true_mask):
    """Image AUROC, pixel AUROC, AUPRO and image F1-max per category and per defect type, and
    the (labels, scores) per category for the curves; true masks come from `true_mask(uri)`.
    Maps and masks are compared at PIXEL_SIDE."""
    from anomaly_core.scoring.scorer import decode_png
    from anomaly_core.training import metrics

    items = []
    for row in run_rows.itertuples():
        facts = truth.get(label_key(row.uri))
        if facts is None or row.uri not in pngs or not pngs[row.uri]["heatmap_png"]:
            continue
        heat = _resized(decode_png(pngs[row.uri]["heatmap_png"]), (PIXEL_SIDE, PIXEL_SIDE))
        if facts["mask_uri"]:
            mask = _resized(true_mask(facts["mask_uri"]), (PIXEL_SIDE, PIXEL_SIDE), nearest=True)
        else:
            mask = np.zeros((PIXEL_SIDE, PIXEL_SIDE), dtype=bool)
        items.append({**facts, "score": row.score, "heat": heat / 255.0, "mask": mask})
    table, groups = [], {}

    def measure(category: str, defect: str, chosen: list[dict]) -> None:
        labels = np.array([i["label"] for i in chosen])
        scores = np.array([i["score"] for i in chosen])
        masks = np.stack([i["mask"] for i in chosen])
        maps = np.stack([i["heat"] for i in chosen])
        out = {"category": category, "defect": defect, "images": len(chosen),
               "defective": int(labels.sum())}
        for key, fn in (("image_auroc", lambda: metrics.image_auroc(labels, scores)),
                        ("pixel_auroc", lambda: metrics.pixel_auroc(masks, maps)),
                        ("aupro", lambda: metrics.aupro(masks, maps)),
                        ("image_f1_max", lambda: metrics.f1_max(labels, scores)[0])):
            try:
                out[key] = fn()
            except ValueError:  # one class only (e.g. no defects of a category were scored)
                out[key] = None
        table.append(out)

    for category in sorted({i["category"] for i in items}):
        mine = [i for i in items if i["category"] == category]
        measure(category, "all", mine)
        labels = np.array([i["label"] for i in mine])
        if len(set(labels)) == 2:
            groups[category] = (labels, np.array([i["score"] for i in mine]))
        for defect in sorted({i["defect"] for i in mine} - {"good"}):
            measure(category, defect, [i for i in mine if i["defect"] in ("good", defect)])
    return table, groups, len(items)


def drift(scores: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Two-sample Kolmogorov-Smirnov distance between this run's scores and the validation ones."""
    from scipy.stats import ks_2samp

    result = ks_2samp(scores, reference)
    return {"ks_distance": float(result.statistic), "p_value": float(result.pvalue)}


# ---------------------------------------------------------------- the page

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4}.grid{display:flex;flex-wrap:wrap;gap:12px}
figure.thumb{margin:0;width:%(side)dpx;font-size:12px}figure.thumb img{display:block;max-width:100%%}
figcaption{word-break:break-all}.bad{color:#b00;font-weight:bold}.ok{color:#070}.note{color:#666}
"""


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns)
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _figures(thumbs: list[dict]) -> str:
    out = []
    for t in thumbs:
        verdict = ('<span class="bad">anomalous</span>' if t["anomalous"]
                   else '<span class="ok">normal</span>')
        truth = f"<br>truth: {html.escape(t['truth'])}" if t.get("truth") else ""
        note = f'<br><span class="note">{html.escape(t["note"])}</span>' if t.get("note") else ""
        out.append(f'<figure class="thumb"><img src="{t["src"]}" alt="{html.escape(t["uri"])}">'
                   f"<figcaption>{html.escape(t['uri'])}<br>score {t['score']:.4g} "
                   f"(threshold {_fmt(t['threshold'])}) {verdict}{truth}{note}</figcaption></figure>")
    return '<div class="grid">' + "".join(out) + "</div>"


def render(context: dict) -> str:
    s, parts = context["summary"], []
    parts.append(f"<h1>Anomaly report: {html.escape(s['model'])} @ {html.escape(s['model_version'])}"
                 f", run {html.escape(s['run_id'])}</h1>")
    parts.append(f"<p>{s['scored']} images scored, {s['errors']} errors, {s['skipped']} skipped; "
                 f"{context['anomalous']} anomalous ({100 * context['rate']:.2f} %). "
                 "Thumbnails: image, heatmap (blue low, red high), predicted mask (white contour)"
                 + (", true defect (green contour)" if context["labelled"] else "") + ".</p>")
    parts.append(f"<h2>Top {len(context['top'])} most anomalous</h2>" + _figures(context["top"]))
    if context["sample"]:
        parts.append(f"<h2>A random sample of {len(context['sample'])} other images</h2>"
                     + _figures(context["sample"]))
    parts.append("<h2>Scores</h2>" + f'<img src="{context["histogram"]}" alt="score histogram">')
    if context.get("drift_plot"):
        d = context["drift"]
        parts.append("<h2>This run against the model's validation scores</h2>"
                     f'<img src="{context["drift_plot"]}" alt="drift">'
                     f"<p>Kolmogorov-Smirnov distance {d['ks_distance']:.3f} (p = {d['p_value']:.3g});"
                     f" above the threshold: {100 * context['rate']:.2f} % of this run, "
                     f"{100 * context['reference_rate']:.2f} % of the validation normal images. "
                     "A large distance with few defects expected means the images changed "
                     "(camera, lighting, product): check before trusting the flags.</p>")
    if context["days"] is not None:
        days = context["days"]
        rows = [{"dt": dt, **{k: (float(v) if k == "anomaly_rate" else int(v))
                              for k, v in r.items()}} for dt, r in days.iterrows()]
        plot = f'<img src="{context["days_plot"]}" alt="per day">' if context.get("days_plot") else ""
        parts.append("<h2>Per day</h2>" + plot
                     + _table(rows, ["dt", "scored", "errors", "anomalous", "anomaly_rate"]))
    if context["labelled"]:
        parts.append(f"<h2>Against labels ({context['labelled']} labelled images)</h2>"
                     + _table(context["metrics"], ["category", "defect", "images", "defective",
                                                   "image_auroc", "pixel_auroc", "aupro",
                                                   "image_f1_max"]))
        if context.get("curves"):
            parts.append(f'<img src="{context["curves"]}" alt="ROC and PR curves">')
    summary_rows = [{"field": k, "value": json.dumps(s[k]) if isinstance(s[k], dict | list) else s[k]}
                    for k in ("run_id", "model", "model_version", "model_uri", "day", "source",
                              "incremental", "resumed", "inputs", "rows", "scored", "errors",
                              "skipped", "images_per_s", "timings_s", "created_at", "finished_at",
                              "partition") if k in s]
    cal = s.get("calibration") or {}
    summary_rows += [{"field": f"calibration.{k}", "value": cal[k]} for k in
                     ("threshold", "method", "pixel_threshold", "pixel_method") if k in cal]
    summary_rows += [{"field": f"validation.{k}", "value": v}
                     for k, v in sorted((s.get("validation_metrics") or {}).items())
                     if isinstance(v, int | float)]
    parts.append("<h2>Run summary</h2>" + _table(summary_rows, ["field", "value"]))
    if context["errors"]:
        parts.append(f"<h2>Errors ({s['errors']})</h2>"
                     + _table(context["errors"], ["reason", "rows", "example"]))
    parts.append(f'<p class="note">Written {html.escape(context["written"])} by python -m '
                 f"jobs.report from {html.escape(context['scores'])}.</p>")
    style = STYLE % {"side": context["side"]}
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Anomaly report '
            f"{html.escape(s['run_id'])}</title><style>{style}</style></head><body>"
            + "\n".join(parts) + "</body></html>")


def error_reasons(run_rows) -> list[dict]:
    """The run's error rows grouped by reason (the image's URI taken out of the message)."""
    errors = run_rows[run_rows["error"].notna()]
    groups: dict[str, list[str]] = {}
    for uri, error in zip(errors["uri"], errors["error"], strict=True):
        groups.setdefault(error.replace(uri, "<image>"), []).append(uri)
    return sorted(({"reason": reason, "rows": len(uris), "example": uris[0]}
                   for reason, uris in groups.items()), key=lambda r: -r["rows"])


def main(argv: list[str] | None = None) -> str:
    setup_logging()
    args = parse_args(argv)
    use_storage_flags(args)
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window

    from anomaly_core import storage
    from anomaly_core.data.decode import decode_mask
    from anomaly_core.scoring.schema import utc_now

    t0 = time.perf_counter()
    truth = ground_truth(args.labels) if args.labels else {}
    summary = load_summary(args.scores, args.run_id)
    dataset, fs = score_dataset(args.scores)
    run_rows = read_run_rows(dataset, summary)
    scored = run_rows[run_rows["error"].isna()].sort_values("score", ascending=False)
    log.info("run %s: %d rows (%d scored)", summary["run_id"], len(run_rows), len(scored))
    calibration = summary.get("calibration") or {}
    threshold = calibration.get("threshold")
    top = scored.head(args.top)
    rest = scored.iloc[args.top:]
    sample = rest.sample(n=min(args.sample, len(rest)), random_state=0) if len(rest) else rest
    matched = [u for u in run_rows["uri"] if label_key(u) in truth]
    pngs = read_pngs(fs, run_rows, {*top["uri"], *sample["uri"], *matched})

    # A thumbnail's true mask serves the metrics too; the cache holds no more than the thumbnails'.
    @functools.lru_cache(maxsize=max(args.top + args.sample, 1))
    def true_mask(uri: str) -> np.ndarray:
        return decode_mask(storage.read_bytes(uri), uri)

    def thumbs(chosen) -> list[dict]:
        out = []
        for row in chosen.itertuples():
            facts = truth.get(label_key(row.uri))
            gt = true_mask(facts["mask_uri"]) if facts and facts["mask_uri"] else None
            src, note = thumbnail(row.uri, pngs.get(row.uri), gt, args.thumb_size)
            out.append({"uri": row.uri, "score": row.score, "threshold": threshold,
                        "anomalous": bool(row.is_anomalous), "src": src, "note": note,
                        "truth": facts and facts["defect"]})
        return out

    n_anomalous = int(scored["is_anomalous"].fillna(False).astype(bool).sum())
    context: dict[str, Any] = {
        "summary": summary, "scores": args.scores, "side": args.thumb_size,
        "written": utc_now().isoformat(timespec="seconds"),
        "anomalous": n_anomalous, "rate": n_anomalous / max(len(scored), 1),
        "top": thumbs(top), "sample": thumbs(sample),
        "histogram": histogram(scored["score"].to_numpy(), threshold),
        "errors": error_reasons(run_rows), "labelled": 0, "days": None,
    }
    reference = np.asarray(calibration.get("normal_scores") or [], dtype=np.float64)
    if len(reference) >= 2 and len(scored) >= 2:
        values = scored["score"].to_numpy()
        context.update(drift=drift(values, reference), drift_plot=drift_plot(values, reference, threshold),
                       reference_rate=float((reference >= threshold).mean()) if threshold is not None else 0.0)
    days = per_day(dataset, summary, args.days)
    if len(days) > 1:
        context.update(days=days, days_plot=days_plot(days))
    if truth:
        table, groups, n = labelled_metrics(run_rows, truth, pngs, true_mask)
        context.update(metrics=table, labelled=n, curves=curves(groups) if groups else None)
        if not n:
            log.warning("none of the run's images is among the labelled test images of %s",
                        args.labels)
    page = render(context)
    out = storage.join(args.out, "index.html")
    storage.write_bytes(out, page.encode())
    log.info("report of %d rows written in %.1f s", len(run_rows), time.perf_counter() - t0)
    print(f"report    {out}")
    return out


if __name__ == "__main__":
    run_job(main)
