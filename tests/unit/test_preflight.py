"""Driver-side checks: each bad input fails at once with a message that names it and what to do."""

import os

import pytest

from anomaly_core import preflight
from anomaly_core.errors import WeightsUnavailableError
from anomaly_core.features.backbones import check_weights
from anomaly_core.preflight import PreflightError, placement_problem


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """A torch hub cache with nothing in it, downloads off."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("ANOMALY_OFFLINE", "1")
    return tmp_path / "torch-home"


def test_uncached_imagenet_weights_name_the_cache_file_and_how_to_pre_seed(empty_hub):
    with pytest.raises(WeightsUnavailableError) as err:
        check_weights("wide_resnet50_2", "imagenet")
    message = str(err.value)
    assert str(empty_hub) in message and "wide_resnet50_2-" in message
    assert "python -m anomaly_core.features.weights download" in message


def test_offline_mobilenet_package_and_cached_files_resolve(empty_hub):
    assert "mobilenet_v2-b0353104.pth" in check_weights("mobilenet_v2", "imagenet")
    cache = empty_hub / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "resnet18-f37072fd.pth").write_bytes(b"x")
    assert str(cache) in check_weights("resnet18", "imagenet")
    assert check_weights("resnet18", "random") == "random"


def test_a_missing_weights_file_or_s3_object_is_named(tmp_path, s3_bucket, s3_endpoint):
    for uri in (str(tmp_path / "nope.pth"), f"{s3_bucket}/weights/nope.pth"):
        with pytest.raises(WeightsUnavailableError, match="nope.pth for resnet18 does not exist"):
            check_weights("resnet18", uri)
    (tmp_path / "w.pth").write_bytes(b"x")
    assert check_weights("resnet18", str(tmp_path / "w.pth")) == str(tmp_path / "w.pth")


def test_check_detector_needs_weights_only_where_the_detector_loads_them(empty_hub):
    # The autoencoder trains from scratch by default: no weights to check.
    assert preflight.check_detector("autoencoder", {"image_size": 64}) == []
    with pytest.raises(WeightsUnavailableError):
        preflight.check_detector("autoencoder", {"transfer_learning": True, "image_size": 64})
    with pytest.raises(WeightsUnavailableError, match="wide_resnet50_2"):
        preflight.check_detector("padim", {})  # all defaults, as a new user runs it


def test_check_detector_builds_once_so_a_bad_option_combination_fails_on_the_driver():
    with pytest.raises(ValueError, match="n_features=100000"):
        preflight.check_detector("padim", {"backbone": "resnet18", "weights": "random",
                                           "n_features": 100000})


def test_check_writable_leaves_nothing_behind_and_names_an_unwritable_output(tmp_path, s3_endpoint):
    target = tmp_path / "new" / "model"
    preflight.check_writable(str(target))
    assert not (tmp_path / "new").exists()  # the probe's folders are removed again
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(PreflightError, match=f"--output {blocker}/model is not writable"):
        preflight.check_writable(str(blocker / "model"))
    with pytest.raises(PreflightError, match="no-such-bucket-xyz"):
        preflight.check_writable("s3://no-such-bucket-xyz/out")


def test_placement_needs_a_node_or_node_type_that_holds_one_bundle():
    two_cpu = [{"CPU": 2.0}]
    problem = placement_problem({"CPU": 4.0, "GPU": 0.0}, 1, two_cpu, [])
    assert "1 x {'CPU': 4.0}" in problem and "'CPU': 2.0" in problem
    assert placement_problem({"CPU": 1.0}, 2, two_cpu, []) is None
    assert placement_problem({"CPU": 1.0}, 3, two_cpu, []) is not None  # 3 workers, 2 CPUs
    assert placement_problem({"CPU": 1.0, "GPU": 1.0}, 1, two_cpu, []) is not None
    # An autoscaler with a GPU node type can add what the live nodes lack.
    gpu_type = [{"CPU": 16.0, "GPU": 1.0}]
    assert placement_problem({"CPU": 4.0, "GPU": 1.0}, 8, two_cpu, gpu_type) is None
    assert placement_problem({"CPU": 4.0, "GPU": 2.0}, 1, two_cpu, gpu_type) is not None


def test_a_folder_is_shared_only_when_the_drivers_marker_is_there(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    marker = shared / ".shared-probe-x"
    marker.touch()
    assert preflight.path_fingerprint(str(shared), str(marker)) == "shared"
    os.remove(marker)  # the same path on another disk: no marker
    assert preflight.path_fingerprint(str(shared), str(marker)) == "another folder"
    assert preflight.path_fingerprint(str(tmp_path / "gone"), None) == "missing"
    # Read-only inputs compare their listings.
    (shared / "a.png").touch()
    before = preflight.path_fingerprint(str(shared), None)
    (shared / "b.png").touch()
    assert preflight.path_fingerprint(str(shared), None) != before
    result = preflight.probe_node({str(shared): None}, [("resnet18", str(tmp_path / "w.pth"))])
    assert "does not exist" in result["weights"][f"resnet18:{tmp_path / 'w.pth'}"]
