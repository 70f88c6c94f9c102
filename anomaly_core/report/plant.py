"""The plant overview: one page per night over every product scored into one output root, and a
rolling page over the last nights. A product is the registered model a run scored with
(`models:/<product>@...`; a run from a plain artifact counts under its detector's name).

Per product: images scored, anomaly rate against the rate its validation scores give at its
threshold, the drift of its scores from the validation ones (Kolmogorov-Smirnov distance), model
version and registered version, and a link to its full report (anomaly_core.report.write),
whose first section is its worst images. Products are ordered by how far they are from normal.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np

from anomaly_core import storage
from anomaly_core.report import load

STYLE = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
         "td:first-child,th:first-child{text-align:left}.far{background:#fdd}")


def product_line(dataset, summary: dict[str, Any]) -> dict[str, Any]:
    """One product's numbers on one night, from its run's rows and its validation scores."""
    rows = load.read_run_rows(dataset, summary)
    scored = rows[rows["error"].isna()]
    calibration = summary.get("calibration") or {}
    threshold = calibration.get("threshold")
    reference = np.asarray(calibration.get("normal_scores") or [], dtype=np.float64)
    values = scored["score"].to_numpy(dtype=np.float64)
    rate = float(scored["is_anomalous"].fillna(False).astype(bool).mean()) if len(scored) else 0.0
    expected = (float((reference >= threshold).mean())
                if len(reference) and threshold is not None else None)
    drift = (load.drift(values, reference)["ks_distance"]
             if len(reference) >= 2 and len(values) >= 2 else None)
    return {"product": summary["product"], "run_id": summary["run_id"], "day": summary["day"],
            "images": int(summary["rows"]), "errors": int(summary["errors"]),
            "anomaly_rate": rate, "validation_rate": expected, "drift": drift,
            "model_version": summary.get("model_version"),
            "registered_version": summary.get("registered"),
            "aliases": summary.get("alias") or "",
            # how far from normal: the drift, else the excess of anomalies over validation's
            "distance": drift if drift is not None else max(rate - (expected or 0.0), 0.0)}


def write_overview(scores: str, out: str, *, day: str | None = None, nights: int = 7,
                   top: int = 24) -> str:
    """<out>/index.html for the night `day` (default: the latest), each product's full report
    under <out>/<product>/, and <out>/rolling.html over the last `nights` nights. Returns the
    night's page."""
    from anomaly_core.report.write import write_report

    runs = load.finished_runs(scores)
    if not runs:
        raise ValueError(f"no finished run under {scores}; run the score jobs first")
    days = sorted({r["day"] for r in runs})
    day = day or days[-1]
    if day not in days:
        raise ValueError(f"no run finished on {day} under {scores}; nights with runs: "
                         f"{', '.join(days[-nights:])}")
    dataset, _ = load.score_dataset(scores)

    def last_per_product(night: str) -> dict[str, dict]:
        latest: dict[str, dict] = {}
        for r in sorted((r for r in runs if r["day"] == night), key=lambda r: r["finished_at"]):
            latest[r["product"]] = r
        return latest

    tonight = [product_line(dataset, s) for s in last_per_product(day).values()]
    tonight.sort(key=lambda line: -line["distance"])
    for line in tonight:
        write_report(scores, storage.join(out, line["product"]), run_id=line["run_id"],
                     product=line["product"], top=top)
    page = storage.join(out, "index.html")
    storage.write_bytes(page, _night_page(day, tonight, scores).encode())
    recent = days[-nights:]
    rolling = {night: {p: product_line(dataset, s) for p, s in last_per_product(night).items()}
               for night in recent}
    storage.write_bytes(storage.join(out, "rolling.html"),
                        _rolling_page(recent, rolling).encode())
    return page


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else html.escape(str(value))


def _night_page(day: str, lines: list[dict], scores: str) -> str:
    head = ["product", "images", "errors", "anomaly rate", "validation rate", "drift (KS)",
            "model", "version", "aliases", "worst images"]
    body = []
    for line in lines:
        far = line["distance"] >= 0.3
        product = html.escape(line["product"])
        body.append(
            f'<tr class="{"far" if far else ""}" data-product="{product}">'
            f'<td><a href="{product}/index.html">{product}</a></td>'
            f'<td>{line["images"]}</td><td>{line["errors"]}</td>'
            f'<td>{_fmt(line["anomaly_rate"])}</td><td>{_fmt(line["validation_rate"])}</td>'
            f'<td>{_fmt(line["drift"])}</td><td>{_fmt(line["model_version"])}</td>'
            f'<td>{_fmt(line["registered_version"])}</td><td>{_fmt(line["aliases"])}</td>'
            f'<td><a class="worst" href="{product}/index.html#worst">worst images</a></td></tr>')
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Plant overview {day}"
            f"</title><style>{STYLE}</style></head><body><h1>Plant overview, {day}</h1>"
            f"<p>{len(lines)} products scored into {html.escape(scores)}, ordered by how far "
            "their scores are from their validation scores (Kolmogorov-Smirnov distance). "
            "<a href='rolling.html'>The last nights</a>.</p><table><tr>"
            + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(body)
            + "</table></body></html>")


def _rolling_page(nights: list[str], rolling: dict[str, dict[str, dict]]) -> str:
    products = sorted({p for per in rolling.values() for p in per})
    rows = []
    for product in products:
        cells = []
        for night in nights:
            line = rolling[night].get(product)
            cells.append("<td>-</td>" if line is None else
                         f"<td>{_fmt(line['anomaly_rate'])} / {_fmt(line['drift'], 2)}</td>")
        rows.append(f"<tr><td>{html.escape(product)}</td>{''.join(cells)}</tr>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Plant, last nights</title>"
            f"<style>{STYLE}</style></head><body><h1>Plant, the last {len(nights)} nights</h1>"
            "<p>Anomaly rate / drift (KS distance) per product and night.</p><table><tr>"
            "<th>product</th>" + "".join(f"<th>{n}</th>" for n in nights) + "</tr>"
            + "".join(rows) + "</table></body></html>")
