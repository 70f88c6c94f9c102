"""The report's HTML: one self-contained page (pictures inlined as data: URIs, no script)."""

from __future__ import annotations

import html
import json
from typing import Any

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4}.grid{display:flex;flex-wrap:wrap;gap:12px}
figure.thumb{margin:0;width:%(side)dpx;font-size:12px}figure.thumb img{display:block;max-width:100%%}
figcaption{word-break:break-all}.bad{color:#b00;font-weight:bold}.ok{color:#070}.note{color:#666}
"""
METRIC_COLUMNS = ["category", "defect", "images", "defective", "heatmaps", "image_auroc",
                  "pixel_auroc", "aupro", "image_f1_max", "accuracy"]
SUMMARY_FIELDS = ("run_id", "product", "version", "detector", "model_version", "model_uri", "day", "source", "incremental",
                  "resumed", "inputs", "rows", "scored", "errors", "skipped", "images_per_s",
                  "timings_s", "created_at", "finished_at", "partition")


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
    """Thumbnails captioned with the image's path below the input root (its full URI on hover)."""
    out = []
    for t in thumbs:
        verdict = ('<span class="bad">anomalous</span>' if t["anomalous"]
                   else '<span class="ok">normal</span>')
        truth = f"<br>truth: {html.escape(t['truth'])}" if t.get("truth") else ""
        note = f'<br><span class="note">{html.escape(t["note"])}</span>' if t.get("note") else ""
        uri = html.escape(t["uri"])
        out.append(f'<figure class="thumb"><img src="{t["src"]}" alt="{uri}" title="{uri}">'
                   f"<figcaption>{html.escape(t['name'])}<br>score {t['score']:.4g} "
                   f"(threshold {_fmt(t['threshold'])}) {verdict}{truth}{note}</figcaption></figure>")
    return '<div class="grid">' + "".join(out) + "</div>"


def _summary_rows(s: dict) -> list[dict]:
    rows = [{"field": k, "value": json.dumps(s[k]) if isinstance(s[k], dict | list) else s[k]}
            for k in SUMMARY_FIELDS if k in s]
    cal = s.get("calibration") or {}
    rows += [{"field": f"calibration.{k}", "value": cal[k]} for k in
             ("threshold", "method", "pixel_threshold", "pixel_method") if k in cal]
    rows += [{"field": f"validation.{k}", "value": v}
             for k, v in sorted((s.get("validation_metrics") or {}).items())
             if isinstance(v, int | float)]
    return rows


def render(context: dict) -> str:
    """The page from what write_report gathered (its keys are the sections' contents)."""
    s, parts = context["summary"], []
    parts.append(f"<h1>Anomaly report: {html.escape(s['product'])} version "
                 f"{html.escape(str(s['version']))}, run {html.escape(s['run_id'])}</h1>")
    root = (f" Image paths are below {html.escape(context['root'])}."
            if context.get("root") else "")
    parts.append(f"<p>{s['scored']} images scored, {s['errors']} errors, {s['skipped']} skipped; "
                 f"{context['anomalous']} anomalous ({100 * context['rate']:.2f} %). "
                 "Thumbnails: image, heatmap (blue low, red high), predicted mask (white contour)"
                 + (", true defect (green contour)" if context["labelled"] else "") + f".{root}</p>")
    parts.append(f"<h2 id=\"worst\">Top {len(context['top'])} most anomalous</h2>"
                 + _figures(context["top"]))
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
                     "<p>Pixel metrics on the heatmaps at the size the run wrote them, where "
                     "every image has one (score with <code>--heatmaps all</code> to evaluate; "
                     "the default writes them for anomalous images only); accuracy of the run's "
                     "verdicts at its threshold.</p>"
                     + _table(context["metrics"], METRIC_COLUMNS))
        if context.get("curves"):
            parts.append(f'<img src="{context["curves"]}" alt="ROC and PR curves">')
    parts.append("<h2>Run summary</h2>" + _table(_summary_rows(s), ["field", "value"]))
    if context["errors"]:
        parts.append(f"<h2>Errors ({s['errors']})</h2>"
                     + _table(context["errors"], ["reason", "rows", "example"]))
    parts.append(f'<p class="note">Written {html.escape(context["written"])} by python -m '
                 f"jobs.report from {html.escape(context['scores'])}.</p>")
    style = STYLE % {"side": context["side"]}
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Anomaly report '
            f"{html.escape(s['run_id'])}</title><style>{style}</style></head><body>"
            + "\n".join(parts) + "</body></html>")
