"""jobs.report and anomaly_core.report on their own (no Ray): many rows read without their images,
per-day numbers, errors, captions, the labelled metrics and the flags. The page in a browser is
tested with a real scoring run (integration)."""

import json
import re
import time

import numpy as np
import pytest

from anomaly_core.report import labels, load
from anomaly_core.scoring.runs import RunModel, ScoreRun, finish, publish_part, stage_part
from anomaly_core.scoring.schema import utc_now
from anomaly_core.scoring.scorer import encode_png
from anomaly_core.training import metrics
from jobs import report

ROWS, FILES = 20_000, 10


def write_run(output: str, n: int, files: int, day: str = "2026-11-30", run_id: str = "r1",
              shifts: dict[str, float] | None = None, registered: int | None = None) -> dict:
    """A finished run of n rows per product (every 1000th an error) over `files` part files per
    product, as the score job writes them; the images themselves do not exist. One product
    (padim, an artifact) by default; several: a fleet run, each product's scores shifted."""
    import pyarrow as pa

    shifts = shifts or {"padim": 0.0}
    models = tuple(RunModel(product=p, version=str(registered or "v1"), model_version="v1",
                            detector="padim", uri=f"/m/{p}", registered=registered,
                            alias="champion" if registered else None) for p in shifts)
    single = len(shifts) == 1 and not registered

    def uri(product: str, i: int) -> str:
        return f"/nowhere/{i:06d}.png" if single else f"/nowhere/{product}/{i:06d}.png"

    inputs = pa.table({"uri": [uri(p, i) for p in shifts for i in range(n)],
                       "product": [p for p in shifts for _ in range(n)]})
    run = ScoreRun(run_id, output, day, "/nowhere", False, f"{day}T00:00:00", models,
                   fleet=not single, inputs=inputs)
    rng = np.random.default_rng(0)
    heat, mask = encode_png(np.zeros((32, 32))), encode_png(np.zeros((32, 32)))
    calibration = {"threshold": 1.2, "pixel_threshold": 0.5,
                   "normal_scores": sorted(rng.normal(1.0, 0.1, 200).tolist())}
    for product, shift in shifts.items():
        now, rows = utc_now(), []
        for i, score in enumerate(rng.normal(1.0 + shift, 0.1, n)):
            row = {"uri": uri(product, i), "model_version": "v1", "scored_at": now,
                   "run_id": run_id, "width": 32, "height": 32}
            if i % 1000 == 7:
                row["error"] = f"{uri(product, i)}: not a recognised image"
            else:
                row.update(score=float(score), is_anomalous=bool(score > 1.2), heatmap_png=heat,
                           mask_png=mask)
            rows.append(row)
        for k in range(files):
            publish_part(run, stage_part(run, rows[k::files], product))
    return finish(run, {"total": 1.0}, None,
                  {p: {"calibration": calibration, "model_uri": f"/m/{p}"} for p in shifts})


def test_tens_of_thousands_of_rows_read_only_the_thumbnails_images(tmp_path, monkeypatch):
    from anomaly_core.data import decode

    out = str(tmp_path / "scores")
    write_run(out, 500, 1, day="2026-11-29", run_id="r0")
    write_run(out, 50, 1, day="2026-09-01", run_id="r-old")  # before the last 30 days
    write_run(out, ROWS, FILES)
    opened, read = [], []
    real_read = load.read_pngs

    def counting_read(fs, rows, uris):
        result = real_read(fs, rows, uris)
        read.append(len(result))
        return result

    monkeypatch.setattr(decode, "load_image", lambda uri, **_: opened.append(uri) or 1 / 0)
    monkeypatch.setattr(load, "read_pngs", counting_read)
    start = time.perf_counter()
    page = report.main(["--scores", out, "--out", str(tmp_path / "report"), "--top", "10",
                        "--sample", "5"])
    wall = time.perf_counter() - start
    assert len(opened) == 15 and read == [15]  # images and PNGs of the thumbnails only
    text = open(page).read()
    assert text.count('<figure class="thumb">') == 15
    assert text.count("image not readable now") == 15
    # The run reported is the latest day's; the older day only feeds the per-day table.
    assert "run r1" in text and "2026-11-29" in text and "Per day" in text
    assert "2026-09-01" not in text
    assert f"Errors ({ROWS // 1000})" in text and "&lt;image&gt;: not a recognised image" in text
    assert "Kolmogorov-Smirnov" in text
    assert wall < 60, wall  # measured 2.2 s on 2 cores (another job running)


def test_scores_in_s3(s3_bucket, s3_endpoint, tmp_path):
    write_run(f"{s3_bucket}/scores", 40, 2)
    page = report.main(["--scores", f"{s3_bucket}/scores", "--out", str(tmp_path / "report"),
                        "--top", "3", "--sample", "2", "--s3-endpoint", s3_endpoint])
    assert open(page).read().count('<figure class="thumb">') == 5


def test_per_day_counts_and_rates():
    import pandas as pd

    rows = pd.DataFrame({"dt": ["d1", "d1", "d1", "d2"], "error": [None, None, "x", None],
                         "is_anomalous": [True, False, None, False]})
    days = load.day_counts(rows)
    assert days.loc["d1"].tolist() == [2, 1, 1, 0.5] and days.loc["d2"].tolist() == [1, 0, 0, 0.0]


def test_a_folder_without_runs_and_bad_flags_say_what_to_do(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="run python -m jobs.score first"):
        report.main(["--scores", str(tmp_path), "--out", str(tmp_path / "r")])
    write_run(str(tmp_path / "s"), 3, 1)
    with pytest.raises(ValueError, match="run nope has not finished"):
        report.main(["--scores", str(tmp_path / "s"), "--out", str(tmp_path / "r"), "--run-id", "nope"])
    with pytest.raises(SystemExit):
        report.main(["--scores", str(tmp_path), "--out", str(tmp_path / "r"), "--top", "-1"])
    assert "--top -1" in capsys.readouterr().err


def test_label_key_matches_a_copy_of_the_same_test_image():
    assert labels.label_key("s3://b/copy/capsule/test/crack/001.png") == "capsule/test/crack/001.png"
    assert labels.label_key("/data/mvtec/capsule/test/crack/001.png") == "capsule/test/crack/001.png"
    assert json.loads(json.dumps(load.LIGHT_COLUMNS)) == load.LIGHT_COLUMNS


def test_captions_name_the_image_below_the_input_root(tmp_path):
    out = str(tmp_path / "scores")
    write_run(out, 30, 1)  # source /nowhere, images /nowhere/000000.png ...
    page = report.main(["--scores", out, "--out", str(tmp_path / "report"), "--top", "3",
                        "--sample", "0"])
    text = open(page).read()
    captions = re.findall(r"<figcaption>([^<]*)<br>", text)
    assert len(captions) == 3 and all(re.fullmatch(r"\d{6}\.png", c) for c in captions), captions
    assert 'title="/nowhere/' in text and "Image paths are below /nowhere." in text


def test_the_input_root_is_the_source_else_the_images_common_folder():
    uris = ["s3://b/plant/2026/11/30/a.png", "s3://b/plant/2026/12/01/b.png"]
    assert load.input_root("s3://b/plant/", uris) == "s3://b/plant"
    # A manifest's run: its source is the list, not a folder of the images.
    assert load.input_root("s3://b/lists/tonight.csv", uris) == "s3://b/plant/2026"
    assert load.input_root(None, ["/data/x/a.png"]) == "/data/x"
    assert load.relative(uris[1], "s3://b/plant/2026") == "12/01/b.png"
    assert load.relative("/elsewhere/c.png", "s3://b/plant") == "/elsewhere/c.png"


def test_labelled_metrics_are_those_of_the_heatmaps_at_the_size_the_run_wrote_them():
    """The report's and the demo's one measure: pixel metrics of 8-bit heatmaps at their own
    size, as metrics.pixel_auroc and metrics.aupro give them on the stacked maps."""
    import pandas as pd

    rng = np.random.default_rng(0)
    rows, pngs, truth, masks, heats = [], {}, {}, {}, []
    for i in range(10):
        defect = "good" if i < 5 else "crack"
        uri = f"/copy/capsule/test/{defect}/{i:03d}.png"
        mask = np.zeros((48, 64), dtype=bool)
        heat = rng.integers(0, 120, (48, 64))
        if defect == "crack":
            mask[10 + i:20 + i, 5:9 + i] = True
            mask[40:44, 50:60] = i % 2 == 0  # a second region on some
            heat[mask] += 100 + 10 * i
        heat = heat.astype(np.uint8)
        heats.append(heat)
        mask_uri = f"/labels/capsule/ground_truth/crack/{i:03d}_mask.png" if defect != "good" else None
        if mask_uri:  # the true mask at twice the heatmap's size: resized to it, nearest
            masks[mask_uri] = mask.repeat(2, axis=0).repeat(2, axis=1)
        truth[labels.label_key(uri)] = {"category": "capsule", "defect": defect,
                                        "label": int(defect != "good"), "mask_uri": mask_uri}
        rows.append({"uri": uri, "score": float(heat.max()), "is_anomalous": heat.max() > 200})
        pngs[uri] = {"heatmap_png": encode_png(heat), "mask_png": None}
    images = labels.labelled_images(pd.DataFrame(rows), truth, pngs, masks.__getitem__)
    table, groups = labels.metrics_table(images)
    assert [(r["defect"], r["images"], r["defective"]) for r in table] == [("all", 10, 5),
                                                                          ("crack", 10, 5)]
    stacked = np.stack([m[::2, ::2] for m in masks.values()])
    stacked = np.concatenate([np.zeros((5, 48, 64), dtype=bool), stacked])
    expected = {"pixel_auroc": metrics.pixel_auroc(stacked, np.stack(heats)),
                "aupro": metrics.aupro(stacked, np.stack(heats)),
                "image_auroc": metrics.image_auroc([r["label"] for r in truth.values()],
                                                   [r["score"] for r in rows]),
                "accuracy": np.mean([r["is_anomalous"] == (i >= 5) for i, r in enumerate(rows)])}
    for key, value in expected.items():
        assert table[0][key] == pytest.approx(value, abs=1e-12), key
    assert list(groups) == ["capsule"]

    # --heatmaps anomalous: heatmaps of the anomalous images only. The image metrics still
    # count every labelled image; the pixel metrics would count a biased part, so they are none.
    some = {u: {**p, "heatmap_png": p["heatmap_png"] if r["is_anomalous"] else None}
            for (u, p), r in zip(pngs.items(), rows)}
    assert 0 < sum(r["is_anomalous"] for r in rows) < 10
    partial = labels.metrics_table(
        labels.labelled_images(pd.DataFrame(rows), truth, some, masks.__getitem__))[0][0]
    assert partial["images"] == 10 and partial["heatmaps"] == sum(r["is_anomalous"] for r in rows)
    assert partial["image_auroc"] == table[0]["image_auroc"]
    assert partial["accuracy"] == table[0]["accuracy"]
    assert partial["pixel_auroc"] is None and partial["aupro"] is None
    assert table[0]["heatmaps"] == 10


def test_the_plant_overview_orders_products_by_drift_and_leads_to_the_worst_images(tmp_path):
    from anomaly_core.report.plant import write_overview
    from tests.helpers import CHROMIUM, CHROMIUM_ARGS

    out = str(tmp_path / "scores")
    for night, shift in (("2026-11-29", 0.0), ("2026-11-30", 0.3)):  # one fleet run a night
        write_run(out, 300, 2, day=night, run_id=f"fleet-{night}", registered=3,
                  shifts={"washer": 0.0, "bolt": shift})
    with pytest.raises(ValueError, match="scored 2 products .bolt, washer.; pass --product"):
        report.main(["--scores", out, "--out", str(tmp_path / "one")])
    page = write_overview(out, str(tmp_path / "plant"), top=3)
    text = open(page).read()
    assert text.index('data-product="bolt"') < text.index('data-product="washer"')  # drifted
    assert 'href="bolt/index.html#worst"' in text and "2026-11-30" in text
    assert (tmp_path / "plant" / "washer" / "index.html").exists()
    rolling = (tmp_path / "plant" / "rolling.html").read_text()
    assert "2026-11-29" in rolling and "2026-11-30" in rolling and "bolt" in rolling
    with pytest.raises(ValueError, match="no run finished on 2026-10-01"):
        write_overview(out, str(tmp_path / "x"), day="2026-10-01")

    if not __import__("os").path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: .ci/setup installs Debian's chromium package")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:  # one click from a product to its worst images
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        tab = browser.new_page()
        tab.goto(f"file://{page}", wait_until="load")
        assert tab.title() == "Plant overview 2026-11-30"
        tab.click('tr[data-product="bolt"] a.worst')
        tab.wait_for_load_state("load")
        assert tab.url.endswith("/plant/bolt/index.html#worst")
        assert tab.locator("#worst").count() == 1
        assert tab.locator("figure.thumb").count() == 3 + 12  # the worst 3, a sample of 12
        browser.close()
