"""The scored index (anomaly_core/scoring/index.py): the incremental state of nightly runs gives
the same answer as the full scan of the results, reads only what can match tonight's images,
stays logarithmic in files, and survives a crash at any point."""

import math
import random
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from anomaly_core import storage
from anomaly_core.scoring import index as scored_index
from anomaly_core.scoring import runs
from anomaly_core.scoring.index import STATE_FILE, ScoredIndex
from anomaly_core.scoring.schema import parquet_bytes, partition_path

T0 = datetime(2025, 1, 1, 2, 0, tzinfo=UTC)
TS = pa.timestamp("us", tz="UTC")


def _rows(uris, etags, night: int, errors=None) -> pa.Table:
    columns = {"uri": pa.array(uris, pa.string()), "etag": pa.array(etags, pa.string()),
               "scored_at": pa.array([T0 + timedelta(days=night)] * len(uris), TS)}
    if errors is not None:
        columns["error"] = pa.array(errors, pa.string())
    return pa.table(columns)


def _as_dict(table: pa.Table) -> dict[str, str]:
    return dict(zip(table["uri"].to_pylist(), table["etag"].to_pylist()))


def _on_disk(index: ScoredIndex) -> set[str]:
    return {u.rsplit("/", 1)[-1] for u in storage.list_files(
        index.root, extensions=[".parquet"])}


def test_lookup_returns_the_latest_etag_of_tonights_uris_only(tmp_path):
    index = ScoredIndex(str(tmp_path), "padim", "v1")
    assert not index.exists()
    assert index.lookup(pa.array(["s3://p/a.png"])).num_rows == 0
    index.add(_rows(["s3://p/a.png", "s3://p/b.png"], ["a1", "b1"], night=1), "night-1")
    index.add(_rows(["s3://p/c.png"], ["c2"], night=2), "night-2")
    index.add(_rows(["s3://p/a.png"], ["a3"], night=3), "night-3")
    # a batch added late (a resumed run of night 0) does not override later scorings
    index.add(_rows(["s3://p/a.png", "s3://p/c.png"], ["a0", "c0"], night=0), "night-0")
    # a failed scoring is not a scoring: night 4's error row is dropped
    index.add(_rows(["s3://p/b.png", "s3://p/d.png"], ["b4", "d4"], night=4,
                    errors=["truncated", None]), "night-4")
    assert index.exists()

    got = index.lookup(pa.chunked_array([["s3://p/d.png", "s3://p/a.png"],
                                         ["s3://p/new.png", "s3://p/b.png", "s3://p/a.png"]]))
    assert got.column_names == ["uri", "etag"]
    assert got.to_pylist() == [{"uri": "s3://p/a.png", "etag": "a3"},
                               {"uri": "s3://p/b.png", "etag": "b1"},
                               {"uri": "s3://p/d.png", "etag": "d4"}]
    assert "s3://p/c.png" not in _as_dict(got)  # in the index, not tonight
    assert index.lookup(["s3://p/c.png"]).to_pylist() == [{"uri": "s3://p/c.png", "etag": "c2"}]
    assert index.lookup([]).num_rows == 0


def test_rows_of_another_model_version_are_refused(tmp_path):
    index = ScoredIndex(str(tmp_path), "padim", "v1")
    rows = _rows(["s3://p/a.png"], ["a"], night=1).append_column(
        "model_version", pa.array(["v2"]))
    with pytest.raises(ValueError, match="v2"):
        index.add(rows, "night-1")
    index.add(_rows([], [], night=1), "night-1")  # empty: nothing at all is written
    assert not index.exists()


def test_adding_the_same_name_again_replaces_its_batch(tmp_path):
    index = ScoredIndex(str(tmp_path), "padim", "v1")
    uris = [f"s3://p/{i:03d}.png" for i in range(50)]
    index.add(_rows(uris, ["x"] * 50, night=1), "run-1")
    first = index.files()
    index.add(_rows(uris, ["x"] * 50, night=1), "run-1")  # a resumed run adds its rows again
    assert len(index.files()) == 1 and index.files()[0]["rows"] == 50
    assert index.files()[0]["file"] != first[0]["file"]  # listed files are never overwritten
    # the resumed run scored more images this time: its batch now holds them all, once
    more = uris + ["s3://p/late.png"]
    index.add(_rows(more, ["y"] * 51, night=1), "run-1")
    assert [(f["name"], f["rows"]) for f in index.files()] == [("run-1", 51)]
    assert _as_dict(index.lookup(more)) == dict.fromkeys(more, "y")


def test_randomized_nights_match_brute_force_and_stay_logarithmic(tmp_path, monkeypatch):
    monkeypatch.setattr(scored_index, "MERGE_BATCH_ROWS", 37)  # merges stream many batches
    rng = random.Random(7)
    index = ScoredIndex(str(tmp_path), "padim", "v1", row_group_rows=64)
    truth: dict[str, tuple[int, str]] = {}
    population = [f"s3://plant/line{i % 5:02d}/img{i:05d}.png" for i in range(4000)]
    added = 0
    for night in range(30):
        n = rng.choice([20, 60, 150, 400])
        uris = rng.sample(population, n)
        etags = [f"e{night}-{rng.randrange(3)}" for _ in uris]
        errors = [("bad" if rng.random() < 0.05 else None) for _ in uris]
        index.add(_rows(uris, etags, night, errors), f"night-{night}")
        for uri, etag, error in zip(uris, etags, errors):
            if error is None:
                truth[uri] = etag
                added += 1
        if rng.random() < 0.2:  # a resumed run re-adds its batch
            index.add(_rows(uris, etags, night, errors), f"night-{night}")
        tonight = rng.sample(population, 600) + [f"s3://plant/unseen/{night}-{i}" for i in range(20)]
        assert _as_dict(index.lookup(pa.array(tonight))) == \
            {u: truth[u] for u in tonight if u in truth}, night
        files = index.files()
        # at most fanin - 1 files per size tier
        assert len(files) <= 3 * (math.floor(math.log(max(added, 1), 4)) + 1), files
    assert any(f["name"] is None for f in index.files())  # merges happened
    assert sum(f["rows"] for f in index.files()) <= added
    # what is on disk besides the listed files is only what the last compaction merged away
    assert len(_on_disk(index)) <= len(index.files()) + 8


def test_same_answer_as_the_full_scan_of_the_results(tmp_path):
    """The index fed with each night's rows answers as the full scan of the part files
    (runs.scan_history, which fills the index of results written before it)."""
    output, rng = str(tmp_path / "scores"), random.Random(3)
    index = ScoredIndex(output, "padim", "v1", row_group_rows=32)
    population = [f"s3://plant/img{i:04d}.png" for i in range(600)]
    for night in range(8):
        uris = sorted(rng.sample(population, 150))
        version = "v0" if night == 2 else "v1"  # another model version's rows are not ours
        table = _rows(uris, [f"e{rng.randrange(4)}" for _ in uris], night,
                      [("bad" if rng.random() < 0.1 else None) for _ in uris])
        table = table.append_column("model_version", pa.array([version] * len(uris)))
        day = T0 + timedelta(days=night)
        partition = partition_path(output, f"{day:%Y-%m-%d}", "padim", version)
        storage.write_bytes(storage.join(partition, "part-0.parquet"), parquet_bytes(table))
        if version == "v1":
            index.add(table, f"night-{night}")
    tonight = rng.sample(population, 300)
    full = runs.scan_history(output, "padim", "v1").select(["uri", "etag"])
    expected = _as_dict(full.filter(pc.is_in(full["uri"], value_set=pa.array(tonight))))
    assert _as_dict(index.lookup(tonight)) == expected and expected


def test_lookup_reads_only_the_row_groups_that_can_match(tmp_path):
    index = ScoredIndex(str(tmp_path), "padim", "v1", row_group_rows=1000)
    uris = [f"s3://plant/line{i // 5000:02d}/img{i:06d}.png" for i in range(20000)]
    index.add(_rows(uris, ["x"] * len(uris), night=1), "night-1")
    (entry,) = index.files()
    assert entry["rows"] == 20000

    # tonight: 50 images already seen in one narrow key range, and new ones of another line
    tonight = uris[7200:7250] + [f"s3://plant/line99/img{i:06d}.png" for i in range(500)]
    got = index.lookup(pa.array(tonight))
    assert _as_dict(got) == dict.fromkeys(uris[7200:7250], "x")
    stats = index.last_lookup
    assert stats["row_groups"] == 20
    assert stats["row_groups_read"] == 1 and stats["rows_read"] == 1000, stats

    index.lookup(["s3://plant/line02/img010500-new.png", "s3://other/a.png"])
    assert index.last_lookup["row_groups_read"] == 1  # a new uri between two seen ones
    index.lookup(["s3://a/before-everything.png", "s3://z/after-everything.png"])
    assert index.last_lookup["row_groups_read"] == 0


def test_a_crash_during_compaction_leaves_orphans_not_a_broken_index(tmp_path, monkeypatch):
    index = ScoredIndex(str(tmp_path), "padim", "v1", row_group_rows=16)
    truth: dict[str, str] = {}
    population = [f"s3://p/{i:04d}.png" for i in range(300)]
    rng = random.Random(11)

    def add(night: int) -> None:
        uris = rng.sample(population, 40)
        etags = [f"n{night}-{rng.randrange(9)}" for _ in uris]
        truth.update(zip(uris, etags))  # listed before any merge, even if the merge is killed
        index.add(_rows(uris, etags, night), f"night-{night}")

    for night in range(3):
        add(night)
    # A stray file (a crashed writer's) with other etags for every uri: not listed, not read.
    storage.write_bytes(storage.join(index.root, "merged-stray.parquet"), parquet_bytes(
        _rows(population, ["stray"] * len(population), night=99)))

    # The 4th add merges 4 files; the process dies after the merged file, before index.json.
    write_state = ScoredIndex._write_state
    calls = []

    def crash_after_first(self, files):
        calls.append(files)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        write_state(self, files)

    monkeypatch.setattr(ScoredIndex, "_write_state", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        add(3)
    monkeypatch.setattr(ScoredIndex, "_write_state", write_state)
    listed = {f["file"] for f in index.files()}
    assert len(listed) == 4  # the batch was listed before the merge began
    orphans = _on_disk(index) - listed
    assert {o.split("-")[0] for o in orphans} == {"merged"} and len(orphans) == 2
    assert _as_dict(index.lookup(population)) == truth

    for night in range(4, 8):  # the next compaction deletes the orphans
        add(night)
        assert _as_dict(index.lookup(population)) == truth
    assert not orphans & _on_disk(index)
    assert "merged-stray.parquet" not in _on_disk(index)
    state = storage.read_bytes(storage.join(index.root, STATE_FILE))
    assert b"stray" not in state


def test_on_s3(s3_bucket, s3_endpoint):
    output = f"{s3_bucket}/scores"
    index = ScoredIndex(output, "padim", "v1", row_group_rows=100)
    truth: dict[str, str] = {}
    for night in range(5):
        uris = [f"s3://plant/line{night:02d}/img{i:04d}.png" for i in range(300)]
        uris += [f"s3://plant/line00/img{i:04d}.png" for i in range(night * 10)]  # re-listed
        etags = [f"n{night}-{i}" for i in range(len(uris))]
        index.add(_rows(uris, etags, night), f"night-{night}")
        truth.update(zip(uris, etags))
    files = index.files()
    assert len(files) == 2 and files[0]["name"] is None  # 4 nights merged, then night 4
    assert all(u.startswith(f"{s3_bucket}/scores/_index/padim/v1/")
               for u in storage.list_files(output))

    tonight = [f"s3://plant/line00/img{i:04d}.png" for i in range(50)] + ["s3://plant/new.png"]
    got = index.lookup(pa.array(tonight))
    assert _as_dict(got) == {u: truth[u] for u in tonight if u in truth}
    assert _as_dict(got)["s3://plant/line00/img0000.png"] == "n4-300"
    # one row group of the merged file (line00's first images), one of night 4's delta
    assert index.last_lookup["row_groups_read"] == 2, index.last_lookup
    assert ScoredIndex(output, "padim", "v2").lookup(tonight).num_rows == 0
