"""Calibration per quantity: image scores set the image threshold, map pixels the pixel one.

Quality: each detector, fitted on synthetic normal images and calibrated on held-out normal ones
only (the usual case: no labelled defects), gives masks that overlap the true defects and leave
new normal images almost unmarked. The memory detectors are checked here; the gradient ones
where their training is tested (test_autoencoder, test_stpm, test_defaults_learn for FastFlow,
test_simplenet), on the models those tests train.
"""

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from anomaly_core.detectors import build_detector
from anomaly_core.model.calibration import Calibration
from anomaly_core.training.evaluate import calibrate
from anomaly_core.training.fit import fit
from tests.helpers import mask_quality, synthetic_split

SIZE = 128
N_FIT, N_HELD = 36, 12
MOBILENET = {"backbone": "mobilenet_v2", "weights": "imagenet", "image_size": SIZE}
# At most this share of a new normal image's pixels may be marked, on average.
MAX_NORMAL_MARKED = 0.01


@pytest.fixture(scope="module")
def capsule(synthetic):
    return synthetic_split(synthetic("capsule", SIZE, N_FIT + N_HELD, 12, 3), "capsule", SIZE)


@pytest.fixture(scope="module")
def small_vit(tmp_path_factory) -> str:
    """A random 4-layer, 192-wide ViT with the published model's 224 px input and 16 px patches."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3,
                       intermediate_size=768)
    path = str(tmp_path_factory.mktemp("vit"))
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    return path


# Measured (capsule, 128 px, 36 fitted + 12 held-out normal images, 12 good + 12 defective test
# images; ImageNet mobilenet_v2, a random ViT): pixel F1 / share of normal pixels marked:
# padim 0.353 / 0.0007, patchcore 0.291 / 0.0013, vit_knn 0.332 / 0.0042. The old calibration
# (pixel threshold = image threshold) marked 100 % of vit_knn's normal pixels.
MIN_F1 = {"padim": 0.25, "patchcore": 0.2, "vit_knn": 0.2}


@pytest.mark.parametrize("name", ["padim", "patchcore", "vit_knn"])
def test_memory_detectors_masks_overlap_defects_and_spare_normal_images(name, capsule, small_vit):
    train, test = capsule
    torch.manual_seed(0)
    if name == "vit_knn":  # no ViT ImageNet weights offline: a random ViT, its own 224 px input
        detector = build_detector(name, weights=small_vit)
        train, test = (type(d)(d.records, (224, 224)) for d in (train, test))
    else:
        detector = build_detector(name, **MOBILENET)
    fit(detector, Subset(train, range(N_FIT)), batch_size=8)
    quality = mask_quality(detector, train, test, N_FIT, N_HELD)
    assert quality["f1"] >= MIN_F1[name]
    assert quality["normal_marked"] <= MAX_NORMAL_MARKED


def test_image_and_pixel_thresholds_come_from_their_own_quantities():
    rng = np.random.default_rng(0)
    # An image score on another scale than the map (a CLS distance, a re-weighted score).
    scores, maps = 100 + rng.random(200), rng.random((200, 16, 16))
    calibration, val = calibrate(scores, maps, np.zeros(200))
    assert calibration.threshold == pytest.approx(np.quantile(scores, 0.99))
    assert calibration.pixel_threshold == pytest.approx(np.quantile(maps, 0.999))
    assert val["normal_pixels_marked"] == pytest.approx(0.001, abs=2e-4)
    # Heatmaps: the normal maps stay below 0.5 (the pixel threshold) but at their top.
    heat = calibration.normalize(maps, pixel=True)
    assert (heat >= 0.5).mean() == pytest.approx(0.001, abs=2e-4)
    # The windows: the low end of the normal values -> 0, the threshold -> 0.5, and as much
    # room above it (no defects in this split).
    assert calibration.normalize(calibration.pixel_min, pixel=True) == pytest.approx(0.0, abs=1e-9)
    top = 2 * calibration.pixel_threshold - calibration.pixel_min
    assert calibration.normalize(top, pixel=True) == pytest.approx(1.0)
    assert calibration.normalize(calibration.threshold) == 0.5
    assert calibration.normalize(scores.min()) == pytest.approx(0.0, abs=1e-9)
    # The drift reference: the held-out normal scores, sorted, capped in number.
    assert calibration.normal_scores == sorted(scores.tolist())
    big, _ = calibrate(rng.random(5000), rng.random((5000, 2, 2)), np.zeros(5000))
    assert len(big.normal_scores) == 1000 and big.normal_scores[0] == big.min


def test_labelled_masks_set_the_pixel_threshold_and_labels_alone_the_image_one():
    rng = np.random.default_rng(1)
    labels = np.array([0] * 20 + [1] * 20)
    scores = np.where(labels == 1, 2.0, 1.0) + 0.1 * rng.random(40)
    maps = rng.random((40, 8, 8))
    masks = np.zeros((40, 8, 8), dtype=bool)
    masks[20:, 2:4, 2:4] = True
    maps[masks] += 5.0
    calibration, val = calibrate(scores, maps, labels, masks)
    assert calibration.method == "f1_max on labelled validation images"
    assert calibration.pixel_method == "f1_max on labelled validation masks"
    assert 1.1 < calibration.threshold <= 2.1 and 1.0 < calibration.pixel_threshold <= 6.0
    assert val["pixel_f1_max"] == 1.0
    # Labelled images without masks: the pixel threshold still comes from normal maps.
    calibration, _ = calibrate(scores, maps, labels, np.zeros_like(masks))
    assert calibration.pixel_threshold == pytest.approx(np.quantile(maps[:20], 0.999))
    with pytest.raises(ValueError, match="held-out normal"):
        calibrate(scores[20:], maps[20:], labels[20:])


def test_an_artifact_from_before_per_quantity_calibration_normalizes_as_it_did():
    old = Calibration(**{"threshold": 3.0, "pixel_threshold": 3.0, "min": 1.0, "max": 5.0,
                         "method": "quantile 0.99 of 10 held-out normal scores"})
    values = np.array([1.0, 3.0, 5.0])
    assert old.pixel_min is None and old.normal_scores == []
    assert np.allclose(old.normalize(values, pixel=True), [0.0, 0.5, 1.0])
    assert np.allclose(old.normalize(values), [0.0, 0.5, 1.0])
