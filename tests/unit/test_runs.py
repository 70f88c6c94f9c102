"""The run protocol on its own (no Ray): exactly one row per image for readers after a killed
attempt, whatever its stragglers and its driver's last copy do afterwards."""

import os

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from anomaly_core import storage
from anomaly_core.scoring import runs
from anomaly_core.scoring.schema import utc_now

N = 40


def _rows(uris: list[str], attempt: str) -> list[dict]:
    now = utc_now()
    return [{"uri": u, "model_version": "v1", "scored_at": now, "run_id": "r", "score": 1.0,
             "error": None, "etag": attempt} for u in uris]


def _model(version: str = "v1", product: str = "padim") -> runs.RunModel:
    return runs.RunModel(product=product, version=version, model_version=version,
                         detector="padim", uri=f"/models/{product}/{version}")


def _publish(run: runs.ScoreRun, rows: list[dict], product: str = "padim") -> str:
    """A row task's part file staged and published by its driver, as the score job does."""
    return runs.publish_part(run, runs.stage_part(run, rows, product))


def _open(source: str, output: str) -> runs.ScoreRun:
    return runs.open_run(source=source, output=output, models=[_model()],
                         extensions=[".png"], run_id="r")


def _read_every_way(output: str) -> dict[str, list[str]]:
    """The uris each documented reader returns for the whole output folder."""
    glob = f"{output}/dt=*/product=*/version=*/*.parquet"
    return {
        "pandas": pd.read_parquet(output)["uri"].tolist(),
        "pyarrow": pads.dataset(output, partitioning="hive").to_table(columns=["uri"])["uri"].to_pylist(),
        "duckdb": [r[0] for r in duckdb.sql(
            f"select uri from read_parquet('{glob}', hive_partitioning = true)").fetchall()],
    }


@pytest.fixture
def source(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(N):
        (folder / f"{i:03d}.png").write_bytes(b"x")
    return str(folder)


def test_a_killed_attempts_late_files_never_reach_readers_twice(source, tmp_path):
    output = str(tmp_path / "out")
    a = _open(source, output)
    todo = runs.pending(a)["uri"].to_pylist()
    assert len(todo) == N
    _publish(a, _rows(todo[:10], "a"))  # published before the kill
    straggler = runs.stage_part(a, _rows(todo[10:20], "a"), "padim")  # staged; the driver died first

    b = _open(source, output)  # resumed at once, while a's stragglers may still run
    assert b.resumed and b.attempt != a.attempt
    left = runs.pending(b)["uri"].to_pylist()
    assert left == todo[10:]
    # After b planned: a straggler of a stages another file, and a's dead driver's last copy
    # (already in flight) lands in the partition.
    runs.stage_part(a, _rows(todo[20:30], "a"), "padim")
    late = runs.publish_part(a, straggler)
    for k in range(0, len(left), 8):
        _publish(b, _rows(left[k:k + 8], "b"))
    summary = runs.finish(b, {"total": 1.0})

    assert summary["late_files_removed"] == 1 and not storage.exists(late)
    assert summary["rows"] == N and summary["files"] == 1 + 4
    for reader, uris in _read_every_way(output).items():
        assert sorted(uris) == sorted(todo), reader  # each image once, none missing
    # A straggler that writes after the run finished still writes only where nobody reads.
    runs.stage_part(a, _rows(todo[30:], "a"), "padim")
    for reader, uris in _read_every_way(output).items():
        assert len(uris) == N, reader


def test_a_resumed_attempt_keeps_what_earlier_attempts_published_before_it_planned(source, tmp_path):
    output = str(tmp_path / "out")
    a = _open(source, output)
    todo = runs.pending(a)["uri"].to_pylist()
    first = _publish(a, _rows(todo[:25], "a"))
    b = _open(source, output)
    left = runs.pending(b)["uri"].to_pylist()
    _publish(b, _rows(left, "b"))
    summary = runs.finish(b, {"total": 1.0})
    assert summary["late_files_removed"] == 0 and storage.exists(first)
    assert sorted(pd.read_parquet(output)["uri"]) == sorted(todo)
    assert not storage.exists(f"{output}/_runs/r/staging")
    # Each attempt left its record: what was published when it planned.
    record = storage.read_bytes(f"{output}/_runs/r/attempts/{b.attempt}.json")
    assert first.rsplit("/", 1)[-1].encode() in record


def test_a_rerun_after_midnight_resumes_the_unfinished_run_and_then_starts_a_new_one(
        source, tmp_path, monkeypatch):
    output = str(tmp_path / "out")
    day = utc_now()

    def open_on(when):
        monkeypatch.setattr(runs, "utc_now", lambda: when)
        return runs.open_run(source=source, output=output, models=[_model()],
                             extensions=[".png"])

    a = open_on(day)
    todo = runs.pending(a)["uri"].to_pylist()
    _publish(a, _rows(todo[:15], "a"))  # then the driver dies, before midnight
    b = open_on(day + pd.Timedelta(hours=5))  # rerun the next morning
    assert (b.run_id, b.day, b.resumed) == (a.run_id, a.day, True)
    assert runs.pending(b)["uri"].to_pylist() == todo[15:]
    _publish(b, _rows(todo[15:], "b"))
    runs.finish(b, {"total": 1.0})
    assert sorted(pd.read_parquet(output)["uri"]) == sorted(todo)  # once each, one day
    # Once it finished, that day's command starts its own run; another model version's run
    # never resumes this one.
    c = open_on(day + pd.Timedelta(days=1))
    assert c.run_id != a.run_id and not c.resumed and c.day != a.day
    monkeypatch.setattr(runs, "utc_now", lambda: day + pd.Timedelta(days=2))
    d = runs.open_run(source=source, output=output, models=[_model("v2")], extensions=[".png"])
    assert not d.resumed and d.run_id not in (a.run_id, c.run_id)


def test_only_the_attempts_own_staged_files_are_published(source, tmp_path):
    output = str(tmp_path / "out")
    a = _open(source, output)
    staged = runs.stage_part(a, _rows(runs.pending(a)["uri"].to_pylist()[:3], "a"), "padim")
    b = _open(source, output)
    with pytest.raises(ValueError, match="not a part file staged by attempt"):
        runs.publish_part(b, staged)
    assert isinstance(runs.pending(b), pa.Table)


def test_incremental_state_is_filled_once_from_results_written_before_the_index(source, tmp_path):
    output = str(tmp_path / "out")
    a = _open(source, output)
    todo = runs.pending(a)["uri"].to_pylist()
    _publish(a, _rows(todo, "etag-a"))
    runs.finish(a, {"total": 1.0})
    assert runs.ScoredIndex(output, "padim", "v1").exists()
    storage.delete(f"{output}/_index")  # as results written by a version without the index
    night = runs.open_run(source=source, output=output, models=[_model("v1")],
                          extensions=[".png"], run_id="night2", incremental=True)
    assert night.inputs["prev_etag"].to_pylist() == ["etag-a"] * N  # from the part files
    assert runs.ScoredIndex(output, "padim", "v1").exists()  # filled, next nights read it only
    other = runs.open_run(source=source, output=output, models=[_model("v2")],
                          extensions=[".png"], run_id="night3", incremental=True)
    assert other.inputs["prev_etag"].null_count == N  # a new version scores everything


def test_a_manifest_of_a_million_uris_plans_in_seconds_into_a_bounded_number_of_blocks(tmp_path):
    # Measured here (2 cores): 1.2-2 s for open_run + pending with an incremental lookup over
    # 100,000 rows of history. The bound leaves room for a slow, shared CI machine.
    import time

    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from anomaly_core.scoring.runs import input_blocks

    n = 1_000_000
    numbers = pc.utf8_lpad(pa.array(np.arange(n)).cast(pa.string()), width=7, padding="0")
    uris = pc.binary_join_element_wise("s3://plant/line01/2026-11-30/img", numbers, ".png", "")
    manifest = str(tmp_path / "manifest.parquet")
    pq.write_table(pa.table({"uri": uris, "etag": pc.cast(pc.utf8_length(uris), pa.string())}),
                   manifest)
    output = str(tmp_path / "out")
    runs.ScoredIndex(output, "padim", "v1").add(pa.table({
        "uri": uris.slice(0, 100_000), "etag": pa.array(["old"] * 100_000),
        "scored_at": pa.array([utc_now()] * 100_000, pa.timestamp("us", tz="UTC"))}), "yesterday")
    start = time.perf_counter()
    run = runs.open_run(source=manifest, manifest=True, output=output, models=[_model()],
                        extensions=[".png"], incremental=True)
    todo = runs.pending(run)
    blocks = input_blocks(todo, cpus=64, batch_size=32)
    seconds = time.perf_counter() - start
    assert todo.num_rows == n and run.inputs["prev_etag"].null_count == n - 100_000
    assert len(blocks) == 977 and sum(b.num_rows for b in blocks) == n  # 1,024 rows at most
    assert seconds < 15, f"planning a million manifest URIs took {seconds:.1f} s"


def test_a_fleet_run_is_exactly_once_per_product_and_keeps_rows_of_products_without_a_model(
        tmp_path):
    root = tmp_path / "in"
    for product in ("washer", "bolt", "ghost"):
        folder = root / "2026-12-01" / f"product={product}"
        folder.mkdir(parents=True)
        for i in range(12):
            (folder / f"{i:03d}.png").write_bytes(b"x")
    (root / "stray.png").write_bytes(b"x")  # no product in its path
    output, asked = str(tmp_path / "out"), []

    def resolve(products: list[str]) -> list[runs.RunModel]:  # the registry: no model of ghost
        asked.append(products)
        return [_model("3", p) for p in products if p != "ghost"]

    def start() -> runs.ScoreRun:
        return runs.open_run(source=str(root), output=output, models=resolve, run_id="fleet",
                             extensions=[".png"], product_from="hive:product")

    def plan(run: runs.ScoreRun) -> dict[str, list[str]]:
        todo = runs.publish_without_model(run, runs.pending(run), {"bolt", "washer"},
                                          lambda p: f"product {p} has no model")
        by_product: dict[str, list[str]] = {}
        for uri, product in zip(todo["uri"].to_pylist(), todo["product"].to_pylist()):
            by_product.setdefault(product, []).append(uri)
        return by_product

    a = start()
    assert asked == [["bolt", "ghost", "washer"]] and a.fleet
    todo = plan(a)
    assert {p: len(u) for p, u in todo.items()} == {"bolt": 12, "washer": 12}
    _publish(a, _rows(todo["washer"][:6], "a"), "washer")  # then the driver is killed
    runs.stage_part(a, _rows(todo["bolt"], "a"), "bolt")  # staged, never published
    b = start()  # the rerun resumes with the models it started with: the registry is not asked
    assert b.resumed and len(asked) == 1 and b.models == a.models
    todo = plan(b)
    assert {p: len(u) for p, u in todo.items()} == {"bolt": 12, "washer": 6}
    for product, uris in todo.items():
        _publish(b, _rows(uris, "b"), product)
    summary = runs.finish(b, {"total": 1.0})
    counts = duckdb.sql(
        f"select product, version::varchar, count(*), count(distinct uri), count(error) from "
        f"read_parquet('{output}/dt=*/product=*/version=*/*.parquet', hive_partitioning = true)"
        " group by all order by product").fetchall()
    assert counts == [("bolt", "3", 12, 12, 0), ("ghost", "none", 12, 12, 12),
                      ("none", "none", 1, 1, 1), ("washer", "3", 12, 12, 0)]
    assert {p: (c["rows"], c["errors"]) for p, c in summary["products"].items()} == {
        "bolt": (12, 0), "ghost": (12, 12), "none": (1, 1), "washer": (12, 0)}
    assert summary["rows"] == summary["inputs"] == 37
    errors = pd.read_parquet(output, filters=[("product", "==", "ghost")])["error"]
    assert errors.str.endswith("product ghost has no model").all()


def test_a_manifests_product_names_no_partition_can_hold_go_to_product_none(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri,product\n/a.png,washer\n/b.png,../etc\n/c.png,\n")
    output = str(tmp_path / "out")
    run = runs.open_run(source=str(manifest), manifest=True, output=output, run_id="m",
                        models=lambda products: [_model("1", p) for p in products],
                        extensions=[], product_from="column")
    todo = runs.publish_without_model(run, runs.pending(run), {"washer"},
                                      lambda p: f"no model for {p}")
    assert todo["uri"].to_pylist() == ["/a.png"]
    _publish(run, _rows(["/a.png"], "a"), "washer")
    summary = runs.finish(run, {"total": 1.0})
    assert {p: (c["inputs"], c["rows"], c["errors"]) for p, c in summary["products"].items()} == {
        "none": (2, 2, 2), "washer": (1, 1, 0)}
    assert sorted({os.path.relpath(f, output).split("/part-")[0]
                   for f in storage.list_files(output) if "/_" not in f}) == [
        f"dt={run.day}/product=none/version=none", f"dt={run.day}/product=washer/version=1"]
