"""The benchmarks in their smoke mode (a few tiny images), so they cannot rot: each runs end to
end as `python -m bench.<name>` from the repository root, prints its table and writes its JSON
with numbers in it."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def run_bench(name: str, out: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    """`python -m bench.<name> <args> --out <out>` in a fresh process; the JSON it wrote."""
    done = subprocess.run([sys.executable, "-m", f"bench.{name}", *args, "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    assert f"wrote {out}" in done.stdout  # the table came first
    return json.loads(out.read_text())


def test_ceilings_smoke(tmp_path):
    result = run_bench("ceilings", tmp_path / "ceilings.json", "--smoke")
    cpu = result["cpu"]
    assert all(_positive(cpu[k]) for k in ("decode", "rows", "cpu", "rows_rendered", "cpu_rendered"))
    assert cpu["cpu"] < min(cpu["decode"], cpu["rows"])
    assert cpu["cpu_rendered"] < min(cpu["decode"], cpu["rows_rendered"])
    assert [m["detector"] for m in result["models"]] == ["padim", "stpm"]
    assert all(_positive(m.get("images_per_s")) for m in result["models"]), result["models"]
    assert result["machine"]["cpus"] >= 1


def test_cpu_per_image_smoke(tmp_path):
    result = run_bench("cpu_per_image", tmp_path / "cpu.json", "--smoke")
    assert [c["case"] for c in result["cases"]] == ["64 px PNG", "128 px JPG"]
    for case in result["cases"]:
        assert all(_positive(case[k]) for k in ("decode", "rows", "rows_rendered"))
        assert case["both"] == pytest.approx(case["decode"] + case["rows"])
    assert result["decoders"] == "fastest per file"


@pytest.mark.usefixtures("ray_cluster")
def test_score_throughput_smoke(tmp_path):
    import ray

    result = run_bench("score_throughput", tmp_path / "score.json", "--smoke",
                       env={"RAY_ADDRESS": ray.get_runtime_context().gcs_address})
    row = result["result"]
    assert all(_positive(row[k]) for k in ("cpu", "model", "bound", "job", "of_bound"))
    # the job ran decoding in its own tasks, apart from the model actor
    assert "MapBatches(read_images)" in result["stages"]


def test_vs_anomalib_smoke(tmp_path):
    result = run_bench("vs_anomalib", tmp_path / "vs.json", "--smoke", "--profile")
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
    from bench.inference_layout import VARIANTS

    result = run_bench("inference_layout", tmp_path / "layout.json", "--smoke")
    assert [r["detector"] for r in result["rows"]] == ["padim"]
    for row in result["rows"]:
        assert "error" not in row, row
        assert all(_positive(row[v]) for v, _, _ in VARIANTS)
        assert row["max_score_change"] < 1e-4  # layouts and folding change only rounding


def test_knn_products_smoke(tmp_path):
    result = run_bench("knn_products", tmp_path / "knn.json", "--smoke")
    assert [r["products"] for r in result["rows"]] == ["float32", "bfloat16"]
    for row in result["rows"]:
        assert _positive(row["knn_s_per_batch"]) and _positive(row["images_per_s"]), row
    # bf16 products with the exact re-rank: the same patch distances as float32's here
    assert result["comparison"]["same_patches"] >= 0.99, result["comparison"]
    assert result["comparison"]["max_patch_ratio"] < 1.01, result["comparison"]


def test_nightly_year_smoke(tmp_path):
    result = run_bench("nightly_year", tmp_path / "nightly.json", "--smoke")
    nights = result["nights"]  # the bench itself checks both plans against its bookkeeping
    assert [n["night"] for n in nights] == [1, 2, 3, 4, 5, 6]
    assert [n["night"] for n in nights if "old_s" in n] == [2, 4, 6]
    assert all(_positive(n["new_s"]) and n["new_mb"] >= 0 and _positive(n["add_s"])
               for n in nights)
    assert all(_positive(n["old_s"]) and n["old_mb"] >= 0 for n in nights if "old_s" in n)
    last = nights[-1]
    assert last["history_rows"] > 10000 and 1 <= last["index_files"] <= 3
    assert 0 < last["rg_read"] <= last["rg"]


def test_listing_smoke(tmp_path):
    result = run_bench("listing", tmp_path / "listing.json", "--smoke")
    rows = {r["input"]: r for r in result["rows"]}
    assert set(rows) == {"s3_listing", "manifest_parquet", "manifest_csv", "inventory_csv",
                         "inventory_parquet"}
    for row in rows.values():
        assert "error" not in row and row["rows"] == 500 and _positive(row["wall_s"]), row


def test_listing_measures_each_input_in_a_fresh_process_of_the_bench(tmp_path):
    # Without --smoke each measurement re-runs the bench (`python -m bench.listing --child`).
    result = run_bench("listing", tmp_path / "listing.json", "--keys", "200")
    assert len(result["rows"]) == 5
    for row in result["rows"]:
        assert "error" not in row and row["rows"] == 200, row
        assert row["peak_mb"] >= row["base_mb"] > 0, row


def test_tiled_throughput_smoke(tmp_path):
    result = run_bench("tiled_throughput", tmp_path / "tiled.json", "--smoke")
    for row in result["rows"]:
        assert "error" not in row, row
        assert row["tiles_per_image"] == 9 and row["map"] == "128x128"
        assert _positive(row["tiles_per_s"]) and _positive(row["fit_s"])


def test_train_layouts_smoke(tmp_path):
    result = run_bench("train_throughput", tmp_path / "layouts.json", "--layouts", "--detector",
                       "stpm", "--image-size", "32", "--batch-size", "2", "--steps", "1",
                       "--rounds", "1")
    [row] = result["rows"]
    assert row["detector"] == "stpm"
    assert _positive(row["nchw"]) and _positive(row["channels_last"]) and _positive(row["channels_last_x"])


def test_auto_pick_smoke(tmp_path):
    result = run_bench("auto_pick", tmp_path / "auto_pick.json", "--smoke")
    (row,) = result["rows"]
    assert row["auto_pick"] in ("padim-n_features-8", "padim-n_features-16")
    assert 0.0 <= row["given_up"] <= 1.0 and row["hit"] == (row["given_up"] == 0.0)
    assert result["summary"]["cases"] == 1


@pytest.mark.usefixtures("ray_cluster")
def test_fleet_smoke(tmp_path):
    import ray

    # Scoring cases only: fleet training runs in tests/integration/test_registry_jobs.py.
    result = run_bench("fleet", tmp_path / "fleet.json", "--smoke", "--skip-training",
                       env={"RAY_ADDRESS": ray.get_runtime_context().gcs_address})
    cases = {r["case"]: r for r in result["rows"]}
    assert set(cases) == {"fleet", "one model", "separate", "budget 1 of 2"}
    assert all(_positive(r["wall_s"]) for r in result["rows"])
    assert cases["separate"]["jobs"] == 2 and cases["fleet"]["loads"] == 2
    assert cases["budget 1 of 2"]["evictions_per_1000"] > 0  # one model held, two products
