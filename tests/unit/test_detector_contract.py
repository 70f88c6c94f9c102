"""Every registered detector: fit on synthetic data, score, save, load, score again identically."""

import pytest
import torch

from anomaly_core.data.datasets import ImageDataset, mvtec_records
from anomaly_core.data.synthetic import generate
from anomaly_core.detectors import build_detector, list_detectors, make_config
from anomaly_core.features.backbones import TORCHVISION_MODELS
from anomaly_core.model.artifact import ModelArtifact
from anomaly_core.model.calibration import Calibration
from anomaly_core.training.evaluate import calibrate, predict
from anomaly_core.training.fit import fit

SIZE = 64
# Small, offline settings; a field only applies to detectors whose config has it.
TINY = {"backbone": "resnet18", "weights": "random", "image_size": SIZE, "n_features": 16}


def tiny_config(name: str) -> dict:
    config = make_config(name)
    if config.backbone not in TORCHVISION_MODELS:  # a ViT keeps its own shape and input size
        return {"weights": "random"}
    return {k: v for k, v in TINY.items() if k in config.__dataclass_fields__}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("synthetic"))
    generate(root, categories=["capsule"], size=SIZE, n_train=8, n_test_good=2, n_test_defect=1)
    return root


@pytest.mark.parametrize("name", list_detectors())
def test_registered_detector_fits_scores_and_round_trips(name, data, tmp_path):
    torch.manual_seed(0)
    detector = build_detector(name, **tiny_config(name))
    assert detector.family in ("memory", "gradient")
    size = (detector.config.image_size,) * 2
    train = ImageDataset(mvtec_records(data, "capsule", "train"), size)
    test = ImageDataset(mvtec_records(data, "capsule", "test"), size)
    fit(detector, train, batch_size=4, epochs=1)
    pred = predict(detector, test, batch_size=4)
    assert pred["scores"].shape == (len(test),) and pred["maps"].shape == (len(test), *size)
    calibration, _ = calibrate(pred["scores"], pred["maps"], pred["labels"], pred["masks"])
    ModelArtifact(detector, calibration).save(str(tmp_path / name))
    loaded = ModelArtifact.load(str(tmp_path / name))
    again = predict(loaded.detector, test, batch_size=4)
    assert (again["scores"] == pred["scores"]).all() and (again["maps"] == pred["maps"]).all()


@pytest.mark.parametrize("name", list_detectors())
def test_registered_detector_fits_and_scores_tiled_and_round_trips(name, tmp_path):
    # Tiling works for every detector: two tiles side by side, each at the detector's input size
    from anomaly_core.detectors.tiling import TiledDetector, Tiling
    from anomaly_core.scoring.scorer import Scorer
    from tests.helpers import TensorImages

    torch.manual_seed(0)
    inner = build_detector(name, **tiny_config(name))
    m = inner.config.image_size
    detector = TiledDetector(inner, Tiling(size=(32, 64), tile=32, batch=4))
    fit(detector, TensorImages(torch.rand(2, 3, 32, 64)), batch_size=2, epochs=1)
    artifact = ModelArtifact(detector, Calibration(1.0, 1.0, 0.0, 2.0, "test"))
    artifact.save(str(tmp_path / name))
    loaded = ModelArtifact.load(str(tmp_path / name))
    images = torch.randint(0, 256, (2, 3, 32, 64), dtype=torch.uint8)
    a, b = Scorer(artifact)(images), Scorer(loaded)(images)
    assert a.map.shape == (2, m, 2 * m) and torch.isfinite(a.score).all()
    assert torch.equal(a.score, b.score) and torch.equal(a.map, b.map)
