"""Job entry points: --help works as a module, and bad flags or inputs fail before any Ray work."""

import subprocess
import sys

import pytest

from jobs import score, train

JOBS = ["train", "score", "tune", "report", "demo", "models"]


def test_help_runs_as_a_module_for_every_job():
    # One interpreter runs each job's module as `python -m` does (runpy, as __main__), so the
    # torch import is paid once.
    script = (f"import runpy, sys\nfor job in {JOBS!r}:\n"
              "    sys.argv = [job, '--help']\n"
              "    try:\n        runpy.run_module(f'jobs.{job}', run_name='__main__')\n"
              "    except SystemExit as exc:\n        assert exc.code == 0, (job, exc.code)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [f"usage: python -m jobs.{job}" in out.stdout for job in JOBS] == [True] * len(JOBS)


def test_train_rejects_an_unknown_detector_option_before_ray(tmp_path):
    with pytest.raises(ValueError, match="padim has no option"):
        train.main(["--data", str(tmp_path), "--output", str(tmp_path / "m"), "--set", "flow_steps=4"])


def test_train_rejects_a_malformed_set_flag(tmp_path):
    with pytest.raises(ValueError, match="key=value"):
        train.main(["--data", str(tmp_path), "--output", str(tmp_path / "m"), "--set", "image_size"])


def test_an_unreachable_registry_fails_train_before_any_work(tmp_path, monkeypatch):
    from anomaly_core.errors import RegistryError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(RegistryError, match="http://127.0.0.1:9"):
        train.main(["--data", str(tmp_path), "--output", str(tmp_path / "m")])
    assert not (tmp_path / "m").exists()


def test_score_by_an_unknown_product_names_it_before_any_work(tmp_path):
    from anomaly_core.errors import RegistryError

    with pytest.raises(RegistryError, match="'never-trained' has no alias @champion"):
        score.main(["--model", "models:/never-trained@champion", "--input", str(tmp_path),
                    "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_score_with_a_missing_model_names_it(tmp_path):
    from anomaly_core.errors import ArtifactError

    with pytest.raises(ArtifactError, match="nothing/model.json"):
        score.main(["--model", str(tmp_path / "nothing"), "--input", str(tmp_path),
                    "--output", str(tmp_path / "out")])


def test_new_user_train_at_defaults_without_cached_weights_exits_2_at_once_with_the_reason(
        synthetic, tmp_path):
    """`python -m jobs.train --data D --category C --output M` (PaDiM, wide_resnet50_2) on a
    machine without the weights: exit 2 before Ray starts, the reason and what to do last."""
    import os
    import time

    data = synthetic("capsule", 48, 6, 1, 1)
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "empty-hub"), "ANOMALY_OFFLINE": "1"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "jobs.train", "--data", data, "--category", "capsule",
                          "--output", str(tmp_path / "model")], capture_output=True, text=True,
                         timeout=120, env=env)
    wall = time.perf_counter() - start
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2, out.stderr[-2000:]
    assert "failed: ImageNet weights for wide_resnet50_2" in last and "Pre-seed" in last
    assert "ray" not in out.stderr.lower().replace("ray-anomaly", "")  # no Ray was started
    assert len(out.stderr.strip().splitlines()) <= 3 and wall < 60
    assert not (tmp_path / "model").exists()


def test_save_best_artifact_retrains_with_every_training_flag_the_sweep_was_given():
    from jobs import tune

    args = tune.parse_args([
        "--data", "s3://b/d", "--category", "c", "--output", "s3://b/o", "--param", "lr=grid:1,2",
        "--cpus-per-worker", "6", "--precision", "bf16", "--channels-last", "--use-gpu",
        "--num-workers", "2", "--loader-workers", "3", "--epochs", "7", "--val-data", "s3://b/v",
        "--s3-endpoint", "http://minio:9000", "--storage-path", "s3://b/sweep-storage"])
    argv = tune._train_argv(args, "s3://b/o/best_model", {"detector": "stpm", "options": {"lr": 0.1}})
    retrain = train.parse_args(argv)
    for flag in ("data", "category", "cpus_per_worker", "precision", "channels_last", "use_gpu",
                 "num_workers", "loader_workers", "epochs", "val_data", "s3_endpoint", "seed"):
        assert getattr(retrain, flag) == getattr(args, flag), flag
    assert retrain.output == "s3://b/o/best_model" and retrain.overrides == ["lr=0.1"]
    assert retrain.storage_path is None  # its checkpoints go beside best_model, not in the sweep's


@pytest.mark.parametrize("flags, says", [
    (["--input", "/in", "--since", "2026-11-29"], "--since and --date-prefix go together"),
    (["--manifest", "/m.csv", "--inventory", "/inv/manifest.json"], "pass --input s3://"),
    (["--input", "/in", "--model-threads", "0"], "--model-threads must be at least 1"),
])
def test_score_rejects_date_and_inventory_flags_without_what_they_need(flags, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        score.parse_args(["--model", "/m", "--output", "/o", *flags])
    assert exit_.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize("flags, on_device, in_flight", [
    ([], False, 1),  # CPU: the row tasks render, one batch per actor at a time
    (["--use-gpu"], True, 2),  # GPU: the actor renders (the row tasks' CPUs bound a GPU node)
    (["--use-gpu", "--no-render-on-device"], False, 2),
    (["--render-on-device"], True, 1),
])
def test_score_renders_maps_on_the_device_by_default_on_gpus(flags, on_device, in_flight):
    args = score.parse_args(["--input", "/in", "--model", "/m", "--output", "/o", *flags])
    assert args.render_on_device is on_device and args.batches_in_flight == in_flight


def test_the_score_jobs_driver_imports_no_torch():
    # The driver plans and reads model.json only; importing torch cost 3-4 s of every run's
    # start-up on 2 cores. The model actors import it.
    out = subprocess.run([sys.executable, "-c", "import sys, jobs.score\nprint('torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_scoring_config_carries_the_score_flags_and_is_frozen():
    import dataclasses
    import pickle

    from anomaly_core.config import ScoringConfig

    args = score.parse_args([
        "--model", "s3://b/m", "--input", "/in", "--output", "/o", "--use-gpu", "--precision",
        "bf16", "--compile", "--no-render-on-device", "--mask-size", "64", "96",
        "--model-threads", "3", "--max-pixels", "1000", "--gpu-decode", "--resize-on-device",
        "--heatmaps", "none"])
    config = ScoringConfig.from_args(args, {"padim": ("s3://b/m", [128, 160])})
    assert config == ScoringConfig(
        models={"padim": ("s3://b/m", (128, 160))}, use_gpu=True, precision="bf16",
        compile=True, render_on_device=False, mask_size=(64, 96), model_threads=3,
        max_pixels=1000, keep_jpeg=True, models_memory_mb=8192, resize_on_device=True,
        heatmaps="none")
    assert config.input_sizes == {"padim": (128, 160)}
    defaults = ScoringConfig.from_args(
        score.parse_args(["--model", "/m", "--input", "/in", "--output", "/o"]),
        {"padim": ("/m", (64, 64))})
    assert (defaults.use_gpu, defaults.precision, defaults.render_on_device, defaults.mask_size,
            defaults.model_threads, defaults.keep_jpeg, defaults.resize_on_device,
            defaults.heatmaps) == (False, "auto", False, None, None, False, False, "anomalous")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.use_gpu = False
    assert pickle.loads(pickle.dumps(config)) == config  # how Ray hands it to the actors


def test_training_config_carries_the_training_flags_and_refuses_half_a_tiling():
    import dataclasses
    import pickle

    from anomaly_core.config import TrainingConfig
    from anomaly_core.data.datasets import ImageRecord
    from anomaly_core.detectors import make_config
    from anomaly_core.detectors.tiling import Tiling

    flags = ["--data", "/d", "--output", "/m", "--batch-size", "4", "--epochs", "3",
             "--loader-workers", "2", "--seed", "7", "--precision", "bf16", "--channels-last",
             "--use-gpu", "--input-pipeline", "ray-data", "--objective", "image_auroc=0.7,aupro=0.3"]
    options = dataclasses.asdict(make_config("padim", image_size=32, backbone="resnet18"))
    train_records = [ImageRecord("/d/a.png", 0, "good"), ImageRecord("/d/b.png", 0, "good")]
    val_records = [ImageRecord("/d/c.png", 1, "crack", "/d/c_mask.png")]
    args = train.parse_args([*flags, "--tile", "32", "--tiled-size", "64", "96"])
    config = TrainingConfig.from_args(args, "padim", options, train_records, val_records, "/m")
    assert (config.detector, config.options, config.output) == ("padim", options, "/m")
    assert config.train == tuple(train_records) and config.val == tuple(val_records)
    assert config.objective == {"image_auroc": 0.7, "aupro": 0.3}
    assert (config.batch_size, config.epochs, config.loader_workers, config.seed) == (4, 3, 2, 7)
    assert (config.precision, config.channels_last, config.use_gpu, config.input_pipeline) == \
        ("bf16", True, True, "ray-data")
    assert config.tiling == Tiling(size=(64, 96), tile=32) and config.image_size == (64, 96)
    untiled = TrainingConfig.from_args(train.parse_args(flags), "padim", options,
                                       train_records, val_records, None)
    assert untiled.tiling is None and untiled.image_size == (32, 32) and untiled.output is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 1
    assert pickle.loads(pickle.dumps(config)) == config  # how Ray hands it to the workers
    with pytest.raises(ValueError, match="--tile and --tiled-size go together"):
        TrainingConfig.from_args(train.parse_args([*flags, "--tile", "32"]), "padim", options,
                                 train_records, val_records, "/m")


def test_fleet_flags_choose_where_each_images_product_comes_from(capsys):
    base = ["--input", "/in", "--output", "/o"]
    assert score.parse_args(["--fleet", *base]).product_from == "hive:product"
    assert score.parse_args(["--fleet", *base]).fleet == "champion"
    assert score.parse_args(["--fleet", "candidate", *base]).fleet == "candidate"
    manifest = ["--fleet", "--manifest", "/m.csv", "--output", "/o"]
    assert score.parse_args(manifest).product_from == "column"
    for bad, says in ((["--model", "/m", "--product-from", "folder:1", *base], "pass --fleet"),
                      (["--fleet", "--product-from", "column", *base], "in --manifest"),
                      (["--model", "/m", "--fleet", *base], "not allowed with argument")):
        with pytest.raises(SystemExit):
            score.parse_args(bad)
        assert says in capsys.readouterr().err
