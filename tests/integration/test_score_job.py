"""jobs/score.py as a plant runs it: folders and S3, incremental nights, kill and resume, bad input."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
from PIL import Image

from anomaly_core import storage
from anomaly_core.data.datasets import ImageDataset, mvtec_records
from anomaly_core.data.synthetic import generate
from anomaly_core.detectors import build_detector
from anomaly_core.model.artifact import ModelArtifact
from anomaly_core.scoring.schema import COLUMNS
from anomaly_core.scoring.scorer import decode_png
from anomaly_core.training.evaluate import calibrate, predict
from anomaly_core.training.fit import fit
from jobs import score
from jobs.common import JobFailed
from tests.helpers import pids_named

SIZE = 64
pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("synthetic"))
    generate(root, categories=["capsule"], size=SIZE, n_train=12, n_test_good=6, n_test_defect=2)
    return root


@pytest.fixture(scope="module")
def model(data, tmp_path_factory) -> str:
    """A small PaDiM fitted in-process (training through Ray is tested elsewhere)."""
    torch.manual_seed(0)
    detector = build_detector("padim", backbone="mobilenet_v2", image_size=SIZE, layers=["layer2"])
    train = ImageDataset(mvtec_records(data, "capsule", "train"), (SIZE, SIZE))
    fit(detector, train, batch_size=6)
    pred = predict(detector, train)
    path = str(tmp_path_factory.mktemp("model"))
    ModelArtifact(detector, calibrate(pred["scores"], pred["maps"], pred["labels"])[0]).save(path)
    return path


def images_dir(data: str, dest) -> str:
    shutil.copytree(f"{data}/capsule/test", dest)
    return str(dest)


def read_rows(output: str) -> list[dict]:
    fs, path = storage.filesystem(output)
    return pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table().to_pylist()


def run_score(model: str, source: str, output: str, *extra: str) -> dict:
    return score.main(["--model", model, "--input", source, "--output", output,
                       "--batch-size", "4", "--rows-per-file", "7", "--progress-every", "0", *extra])


def test_folder_in_folder_out_one_row_per_image_readable_as_one_table_and_rerun_adds_none(
        model, data, tmp_path):
    source = images_dir(data, tmp_path / "in")
    out = str(tmp_path / "out")
    summary = run_score(model, source, out)
    rows = read_rows(out)
    listed = storage.list_files(source)
    assert sorted(r["uri"] for r in rows) == listed  # every image once: no gaps, no duplicates
    assert summary["scored"] == len(listed) and summary["errors"] == 0 and summary["files"] >= 2
    # Decoding ran in its own CPU tasks, not fused into the model actor.
    assert {"MapBatches(read_images)", "MapBatches(ScoringActor)"} <= set(summary["stages"])
    assert set(COLUMNS) <= set(rows[0]) and {(r["product"], r["version"]) for r in rows} == {
        ("padim", summary["products"]["padim"]["model_version"])}
    # --heatmaps anomalous (the default): a heatmap exactly where the image is anomalous, a
    # mask on every row.
    assert all((r["heatmap_png"] is not None) == r["is_anomalous"] for r in rows)
    first = next(r for r in rows if r["is_anomalous"])
    mask = decode_png(first["mask_png"])
    heat = np.asarray(Image.open(io.BytesIO(first["heatmap_png"])))
    assert mask.shape == heat.shape == (first["height"], first["width"]) and heat.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255} and first["etag"].startswith("sha256:")
    assert all(r["mask_png"] for r in rows)
    import pandas as pd

    assert len(pd.read_parquet(out)) == len(listed)
    import duckdb

    count = duckdb.sql(f"select count(*), count(distinct uri) from read_parquet("
                       f"'{out}/dt=*/product=*/version=*/*.parquet', hive_partitioning = true) "
                       "where product = 'padim'").fetchall()[0]
    assert count == (len(listed), len(listed))
    manifest = json.loads((tmp_path / "out" / "_runs" / summary["run_id"] / "_SUCCESS.json").read_text())
    assert manifest["scored"] == len(listed) and manifest["skipped"] == 0 and "timings_s" in manifest
    # The same command again: the finished run is resumed and writes nothing new.
    files = sorted(os.listdir(next((tmp_path / "out").glob("dt=*/product=padim/version=*"))))
    again = run_score(model, source, out)
    assert again["resumed"] and sorted(os.listdir(next((tmp_path / "out").glob("dt=*/product=padim/version=*")))) == files
    assert len(read_rows(out)) == again["rows"] == len(listed)


def test_s3_in_s3_out_at_the_mask_size_asked_for_rendered_in_the_actor(
        model, data, s3_bucket, s3_endpoint):
    src = f"{s3_bucket}/incoming"
    local = storage.list_files(f"{data}/capsule/test")
    for path in local:
        storage.write_bytes(src + path.split("/capsule/test", 1)[1], open(path, "rb").read())
    # One image larger than the model's input: resized by the model actor, in a ragged batch.
    larger = io.BytesIO()
    Image.open(local[0]).resize((SIZE * 3 // 2, SIZE * 3 // 2)).save(larger, "PNG")
    storage.write_bytes(f"{src}/larger.png", larger.getvalue())
    local.append(f"{src}/larger.png")
    out = f"{s3_bucket}/scores"
    # The GPU path's options on CPU: images resized and maps rendered in the actor, two batches
    # in it at once.
    summary = run_score(model, src, out, "--s3-endpoint", s3_endpoint, "--mask-size", "16", "24",
                        "--render-on-device", "--batches-in-flight", "2", "--heatmaps", "all",
                        "--resize-on-device")
    rows = read_rows(out)
    assert len(rows) == len({r["uri"] for r in rows}) == len(local) == summary["scored"]
    for row in rows:  # every row a heatmap (--heatmaps all); --mask-size, not the image's size
        for column in ("mask_png", "heatmap_png"):
            assert np.asarray(Image.open(io.BytesIO(row[column]))).shape == (16, 24)
    assert all(r["uri"].startswith(src) for r in rows)
    assert all(r["etag"] and not r["etag"].startswith("sha256:") for r in rows)  # S3 ETags
    assert storage.exists(f"{out}/_runs/{summary['run_id']}/_SUCCESS.json")


def test_incremental_scores_only_new_and_changed_images(model, data, tmp_path):
    source, out = images_dir(data, tmp_path / "in"), str(tmp_path / "out")
    first = run_score(model, source, out, "--incremental")
    n = first["scored"]
    changed = tmp_path / "in" / "good" / "000.png"
    shutil.copy(tmp_path / "in" / "good" / "001.png", changed)  # same name, new content
    shutil.copy(tmp_path / "in" / "good" / "002.png", tmp_path / "in" / "good" / "new.png")
    # A later night is a new run; --run-id stands in for tomorrow's date.
    second = run_score(model, source, out, "--incremental", "--run-id", "night-2")
    assert second["scored"] == 2 and second["skipped"] == n - 1
    rows = read_rows(out)
    new = {r["uri"] for r in rows if r["run_id"] == "night-2"}
    assert new == {str(changed), str(tmp_path / "in" / "good" / "new.png")}
    third = run_score(model, source, out, "--incremental", "--run-id", "night-3")
    assert third["scored"] == 0 and third["skipped"] == n + 1


def test_a_new_model_version_rescores_everything(model, data, tmp_path):
    source, out = images_dir(data, tmp_path / "in"), str(tmp_path / "out")
    first = run_score(model, source, out, "--incremental")
    other = tmp_path / "model2"
    artifact = ModelArtifact.load(model)
    artifact.detector.mean += 0.01  # a retrained model: different weights, new version
    artifact.save(str(other))
    second = run_score(str(other), source, out, "--incremental", "--heatmaps", "none")
    assert artifact.model_version != first["products"]["padim"]["model_version"]
    assert second["scored"] == first["scored"] and second["skipped"] == 0
    # --heatmaps none: the same rows and columns, every heatmap null, every mask there.
    rows = [r for r in read_rows(out) if r["version"] == artifact.model_version]
    assert len(rows) == second["rows"] and set(COLUMNS) <= set(rows[0])
    assert all(r["heatmap_png"] is None and r["mask_png"] for r in rows)


def _write(path, image: Image.Image, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def test_every_bad_input_kind_is_a_row_and_the_run_goes_on(model, data, tmp_path):
    source = tmp_path / "in"
    images_dir(data, source)
    bad = source / "bad"
    bad.mkdir()
    (bad / "zero.png").write_bytes(b"")
    (bad / "text.jpg").write_bytes(b"this is a text file")
    good_png = (source / "good" / "000.png").read_bytes()
    (bad / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
    (bad / "corrupt.png").write_bytes(good_png[:40] + bytes(200) + good_png[240:])
    _write(bad / "huge.png", Image.new("L", (3000, 3000)))
    _write(source / "odd" / "gray.png", Image.new("L", (40, 30), 128))
    _write(source / "odd" / "cmyk.jpg", Image.new("CMYK", (40, 30), (0, 50, 100, 0)))
    gray16 = Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16))
    _write(source / "odd" / "gray16.png", gray16)
    # --gpu-decode: plain JPEGs decode in the model actor (on CPU here), the CMYK one on a task
    photo = Image.open(io.BytesIO(good_png)).convert("RGB").resize((40, 30))
    _write(source / "odd" / "photo.jpg", photo, quality=90)
    photo_jpg = (source / "odd" / "photo.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(photo_jpg[: len(photo_jpg) // 2])
    out = str(tmp_path / "out")
    summary = run_score(model, str(source), out, "--max-pixels", "4000000", "--gpu-decode")
    rows = {r["uri"].rsplit("/", 1)[-1]: r for r in read_rows(out)}
    for name in ("zero.png", "text.jpg", "truncated.png", "corrupt.png", "huge.png",
                 "truncated.jpg"):
        assert rows[name]["error"] and name in rows[name]["error"], name
        assert rows[name]["score"] is None
    assert "pixels" in rows["huge.png"]["error"]
    for name in ("gray.png", "cmyk.jpg", "gray16.png", "photo.jpg"):  # RGB and scored
        assert rows[name]["error"] is None and rows[name]["score"] is not None
        assert (rows[name]["width"], rows[name]["height"]) == (40, 30)
    assert summary["errors"] == 6 and summary["rows"] == len(storage.list_files(str(source)))


def test_max_error_rate_fails_the_run_after_writing_the_rows(model, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    (source / "a.png").write_bytes(b"")
    _write(source / "b.png", Image.new("RGB", (32, 32)))
    with pytest.raises(JobFailed, match="above --max-error-rate"):
        run_score(model, str(source), str(tmp_path / "out"), "--max-error-rate", "0.2")
    assert len(read_rows(str(tmp_path / "out"))) == 2


@pytest.mark.parametrize("case", ["missing bucket", "missing prefix", "bad credentials", "bad model"])
def test_unusable_input_or_model_fails_before_any_work(case, model, s3_bucket, s3_endpoint, tmp_path, monkeypatch):
    source, model_uri, out = f"{s3_bucket}/nothing-here", model, str(tmp_path / "out")
    expected = "nothing under"
    if case == "missing bucket":
        source, expected = "s3://no-such-bucket-xyz/images", "no-such-bucket-xyz"
    elif case == "bad credentials":
        import moto.settings

        monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
        storage._s3_client.cache_clear()
        source, expected = f"{s3_bucket}/images", "access denied"
    elif case == "bad model":
        model_uri, expected = str(tmp_path), "model.json"
    try:
        with pytest.raises((storage.StorageError, ValueError)) as err:
            run_score(model_uri, source, out, "--s3-endpoint", s3_endpoint)
    finally:
        storage._s3_client.cache_clear()
    assert expected in str(err.value)
    assert not os.path.exists(out)  # nothing written


def test_killed_driver_resumes_to_exactly_one_row_per_image(model, data, tmp_path):
    import ray

    source = tmp_path / "in"
    source.mkdir()
    originals = storage.list_files(f"{data}/capsule/test")
    for i in range(160):  # enough work that the kill lands mid-run
        shutil.copy(originals[i % len(originals)], source / f"{i:04d}.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jobs.score", "--model", model, "--input", str(source),
           "--output", str(out), "--batch-size", "2", "--rows-per-file", "4",
           "--address", ray.get_runtime_context().gcs_address]
    env = dict(os.environ, AWS_SECRET_ACCESS_KEY="s3cr3t-never-logged")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("dt=*/product=*/version=*/part-*.parquet"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(read_rows(str(out)))
    assert 0 < partial < 160, "the kill must land mid-run"
    finished = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    rows = read_rows(str(out))
    uris = [r["uri"] for r in rows]
    assert len(uris) == len(set(uris)) == 160  # exactly once: no duplicates, no gaps
    assert "resumed" in finished.stderr
    for text in (finished.stdout, finished.stderr, *[p.read_text() for p in out.glob("_runs/*/*.json")]):
        assert "s3cr3t-never-logged" not in text


def _s3_images(data: str, bucket: str, n: int) -> str:
    originals = storage.list_files(f"{data}/capsule/test")
    for i in range(n):
        storage.copy_file(originals[i % len(originals)], f"{bucket}/in/{i:04d}.png")
    return f"{bucket}/in"


def _score_through(proxy, model: str, source: str, out: str, **env: str):
    """The score job in its own process, its S3 calls through the fault proxy."""
    import ray

    cmd = [sys.executable, "-m", "jobs.score", "--model", model, "--input", source,
           "--output", out, "--batch-size", "4", "--rows-per-file", "8", "--progress-every", "1",
           "--address", ray.get_runtime_context().gcs_address]
    return subprocess.Popen(cmd, env=dict(os.environ, AWS_ENDPOINT_URL_S3=proxy.url, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _when_rows_appear(out: str, proc, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if storage.exists(out) and any(f.startswith(f"{out}/dt=") for f in storage.list_files(out)):
            return
        time.sleep(0.2)
    raise AssertionError("no part file was published")


def test_throttling_resets_and_a_30_s_stall_cost_no_row_and_are_counted(model, data, s3_bucket,
                                                                         s3_endpoint):
    from tests.s3_faults import FaultProxy

    source, out = _s3_images(data, s3_bucket, 96), f"{s3_bucket}/out"
    with FaultProxy(s3_endpoint, slow_down=0.08, reset=0.04, seed=3) as proxy:
        proc = _score_through(proxy, model, source, out)
        _when_rows_appear(out, proc)
        proxy.stall(30)  # as the S3 server paused mid-run
        stdout, stderr = proc.communicate(timeout=400)
        faults = dict(proxy.faults)
    assert proc.returncode == 0, stderr[-3000:]
    rows = read_rows(out)
    assert len(rows) == len({r["uri"] for r in rows}) == 96
    assert all(r["error"] is None for r in rows)  # no image became an "unreachable" error row
    summary = _success(out)
    assert faults["slow_down"] > 0 and faults["stalled"] > 0, faults
    retried = summary["storage_retries"]
    assert retried["total"] >= faults["slow_down"] and retried["tasks"] > 0, (retried, faults)
    assert "S3 calls retried" in stderr


def _success(out: str) -> dict:
    (path,) = [f for f in storage.list_files(f"{out}/_runs") if f.endswith("/_SUCCESS.json")]
    return json.loads(storage.read_bytes(path))


def test_past_the_retry_budget_the_job_stops_with_exit_4_and_a_rerun_resumes_exactly_once(
        model, data, s3_bucket, s3_endpoint):
    from tests.s3_faults import FaultProxy

    source, out = _s3_images(data, s3_bucket, 96), f"{s3_bucket}/out"
    with FaultProxy(s3_endpoint, seed=5) as proxy:
        proc = _score_through(proxy, model, source, out, AWS_MAX_ATTEMPTS="2")
        _when_rows_appear(out, proc)
        proxy.set_faults(slow_down=1.0)  # S3 throttles everything from now on
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 4, stderr[-3000:]
        reason = stderr.strip().splitlines()[-1]
        bucket = s3_bucket[len("s3://"):]
        assert "failed: " in reason and bucket in reason and "SLOW_DOWN" in reason, reason
        assert "run the same command again" in reason
        partial = read_rows(out)
        assert 0 < len(partial) < 96 and all(r["error"] is None for r in partial)

        proxy.set_faults(slow_down=0.0)
        rerun = _score_through(proxy, model, source, out, AWS_MAX_ATTEMPTS="2")
        _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr[-3000:]
    assert "resumed" in stderr
    rows = read_rows(out)
    assert len(rows) == len({r["uri"] for r in rows}) == 96
    assert all(r["error"] is None for r in rows)


def test_a_batch_stuck_in_a_model_actor_is_started_again_and_written_exactly_once(
        model, data, tmp_path):
    """A model actor that stops answering (SIGSTOP: like one whose node is cut off, or one that
    has no room to restart after its node was lost) holds its batches forever; once Ray Data
    sees no progress for --stall-timeout seconds the job starts a new attempt of the run over
    the images not yet written, and every image ends up with exactly one row."""
    import threading

    source = tmp_path / "in"
    source.mkdir()
    for i in range(5):
        for rec in mvtec_records(data, "capsule", "test"):
            shutil.copyfile(rec.uri, source / f"{i}-{os.path.basename(os.path.dirname(rec.uri))}-"
                                              f"{os.path.basename(rec.uri)}")
    stopped: list[int] = []

    def stop_a_model_actor() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            pids = pids_named(b"ScoringActor")
            if len(pids) == 2:
                time.sleep(1.0)  # the pool is up and batches are flowing
                os.kill(pids[0], signal.SIGSTOP)
                stopped.append(pids[0])
                return
            time.sleep(0.05)

    stopper = threading.Thread(target=stop_a_model_actor, daemon=True)
    stopper.start()
    out = str(tmp_path / "out")
    try:
        summary = run_score(model, str(source), out, "--num-actors", "2", "--decode-cpus", "0.5",
                            "--row-cpus", "0.5", "--batch-size", "2", "--stall-timeout", "8")
    finally:
        stopper.join(timeout=5)
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert stopped, "no model actor was stopped"
    n = len(os.listdir(source))
    assert summary["rows"] == n and summary["errors"] == 0
    # One new attempt for the stopped actor; on a busy 2-core machine a second one can follow
    # while the new pool grows (a short --stall-timeout).
    restarts = summary["restarts"]
    assert 1 <= len(restarts) <= 2, restarts
    assert all(r["reason"].startswith("no progress for 8 s") for r in restarts), restarts
    assert 0 < restarts[0]["images"] < n
    uris = [r["uri"] for r in read_rows(out)]
    assert len(uris) == len(set(uris)) == n
    assert not list((tmp_path / "out").glob("_runs/*/staging/**/*.parquet"))
