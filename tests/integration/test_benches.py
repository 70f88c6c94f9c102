"""The benchmarks in their smoke mode (a few tiny images), so they cannot rot: each runs end to
end, prints its table and writes its JSON with numbers in it."""

import json
import math

import pytest

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_ceilings_smoke(tmp_path):
    from bench import ceilings

    out = tmp_path / "ceilings.json"
    result = ceilings.main(["--smoke", "--out", str(out)])
    cpu = result["cpu"]
    assert all(_positive(cpu[k]) for k in ("decode", "rows", "cpu", "rows_rendered", "cpu_rendered"))
    assert cpu["cpu"] < min(cpu["decode"], cpu["rows"])
    assert cpu["cpu_rendered"] < min(cpu["decode"], cpu["rows_rendered"])
    assert [m["detector"] for m in result["models"]] == ["padim", "stpm"]
    assert all(_positive(m.get("images_per_s")) for m in result["models"]), result["models"]
    assert json.loads(out.read_text())["machine"]["cpus"] >= 1


def test_score_throughput_smoke(tmp_path):
    from bench import score_throughput

    result = score_throughput.main(["--smoke", "--out", str(tmp_path / "score.json")])
    row = result["result"]
    assert all(_positive(row[k]) for k in ("cpu", "model", "bound", "job", "of_bound"))
    # the job ran decoding in its own tasks, apart from the model actor
    assert "MapBatches(read_images)" in result["stages"]


def test_vs_anomalib_smoke(tmp_path):
    from bench import vs_anomalib

    result = vs_anomalib.main(["--smoke", "--profile", "--out", str(tmp_path / "vs.json")])
    rows = {r["impl"]: r for r in result["rows"]}
    assert set(rows) == {"ours", "anomalib"}, result["rows"]
    for row in rows.values():
        assert "error" not in row and row["finite"], row
        assert _positive(row["images_per_s"]) and _positive(row["fit_s"])
        assert 0.0 <= row["image_auroc"] <= 1.0 and 0.0 <= row["pixel_auroc"] <= 1.0
    assert _positive(rows["ours"]["speedup"])
    for row in rows.values():  # the profile of each timed forward: its wall time and top ops
        profile = row["profile"]
        assert "error" not in profile and _positive(profile["wall_ms"]), profile
        assert profile["top"] and all(ms >= 0 for _, ms in profile["top"]), profile


def test_inference_layout_smoke(tmp_path):
    from bench import inference_layout

    result = inference_layout.main(["--smoke", "--out", str(tmp_path / "layout.json")])
    assert [r["detector"] for r in result["rows"]] == ["padim"]
    for row in result["rows"]:
        assert "error" not in row, row
        assert all(_positive(row[v]) for v, _, _ in inference_layout.VARIANTS)
        assert row["max_score_change"] < 1e-4  # layouts and folding change only rounding


def test_knn_products_smoke(tmp_path):
    from bench import knn_products

    result = knn_products.main(["--smoke", "--out", str(tmp_path / "knn.json")])
    assert [r["products"] for r in result["rows"]] == ["float32", "bfloat16"]
    for row in result["rows"]:
        assert _positive(row["knn_s_per_batch"]) and _positive(row["images_per_s"]), row
    # bf16 products with the exact re-rank: the same patch distances as float32's here
    assert result["comparison"]["same_patches"] >= 0.99, result["comparison"]
    assert result["comparison"]["max_patch_ratio"] < 1.01, result["comparison"]


def test_nightly_year_smoke(tmp_path):
    from bench import nightly_year

    out = tmp_path / "nightly.json"
    result = nightly_year.main(["--smoke", "--out", str(out)])
    nights = result["nights"]  # the bench itself checks both plans against its bookkeeping
    assert [n["night"] for n in nights] == [1, 2, 3, 4, 5, 6]
    assert [n["night"] for n in nights if "old_s" in n] == [2, 4, 6]
    assert all(_positive(n["new_s"]) and n["new_mb"] >= 0 and _positive(n["add_s"])
               for n in nights)
    assert all(_positive(n["old_s"]) and n["old_mb"] >= 0 for n in nights if "old_s" in n)
    last = nights[-1]
    assert last["history_rows"] > 10000 and 1 <= last["index_files"] <= 3
    assert 0 < last["rg_read"] <= last["rg"]
    assert json.loads(out.read_text())["nights"][-1]["todo"] == last["todo"]


def test_listing_smoke(tmp_path):
    from bench import listing

    result = listing.main(["--smoke", "--out", str(tmp_path / "listing.json")])
    rows = {(r["input"], r["impl"]): r for r in result["rows"]}
    assert set(rows) == {("s3_listing", "new"), ("s3_listing", "old"),
                         ("manifest_parquet", "new"), ("manifest_parquet", "old"),
                         ("manifest_csv", "new"), ("manifest_csv", "old"),
                         ("inventory_csv", "new"), ("inventory_parquet", "new")}
    for row in rows.values():
        assert "error" not in row and row["rows"] == 500 and _positive(row["wall_s"]), row


def test_tiled_throughput_smoke(tmp_path):
    from bench import tiled_throughput

    result = tiled_throughput.main(["--smoke", "--out", str(tmp_path / "tiled.json")])
    for row in result["rows"]:
        assert "error" not in row, row
        assert row["tiles_per_image"] == 9 and row["map"] == "128x128"
        assert _positive(row["tiles_per_s"]) and _positive(row["fit_s"])


def test_train_layouts_smoke(tmp_path):
    from bench import train_throughput

    result = train_throughput.main([
        "--layouts", "--detector", "stpm", "--image-size", "32", "--batch-size", "2", "--steps",
        "1", "--rounds", "1", "--out", str(tmp_path / "layouts.json")])
    [row] = result["rows"]
    assert row["detector"] == "stpm"
    assert _positive(row["nchw"]) and _positive(row["channels_last"]) and _positive(row["channels_last_x"])
