"""Gradient detectors learn at their documented defaults on an object category.

Only what these tests must change is changed: backbone mobilenet_v2 (the one ImageNet backbone
available offline) and a smaller image size for time. STPM and the autoencoder are tested at
their defaults on the wood texture in their own files (test_stpm, test_autoencoder); here
FastFlow (backbone fine-tuned, its default) and SimpleNet (against PatchCore on the same data and
backbone) on the capsule object.
"""

import pytest
import torch
from torch.utils.data import Subset

from anomaly_core.detectors import build_detector
from anomaly_core.training.evaluate import predict
from anomaly_core.training.fit import fit
from anomaly_core.training.metrics import image_auroc
from tests.helpers import mask_quality, synthetic_split

CATEGORY = "capsule"  # an object category: the harder, MVTec-like case
SIZE = 96  # every backbone stage still has a grid (mobilenet_v2 stride 16: 6x6)
N_FIT, N_HELD = 32, 8  # training images, and held-out normal images that calibrate
N_TEST_GOOD, N_TEST_DEFECT = 16, 4  # 16 good + 4 x 4 defective test images
EPOCHS = 20  # 4 steps per epoch at batch 8: 80 optimizer steps
BATCH = 8
SEED = 0

# Image AUROC at the defaults, 20 epochs, seeds 0 / 1 / 2 of torch.manual_seed before building
# and of fit(), measured on this data:
#   fastflow    0.984 / 0.980 / 0.973  (backbone_lr 1e-5; at the old 1e-4: 0.77 for seed 0)
#   simplenet   0.992 / 0.980 / 0.988  (noise_std 0.3, rates 1e-3 / 2e-3; the paper's 0.015 and
#               1e-4 / 2e-4 gave 0.738 / 0.641 / 0.859 even at 40 epochs: README design notes)
#   patchcore   0.984 (no training)
# The bound sits below the worst seed with room; chance is 0.5.
MIN_FASTFLOW_AUROC = 0.85
MIN_FASTFLOW_MASK_F1 = 0.15  # measured 0.221 (and 0.04 % of normal pixels marked)
SIMPLENET_BELOW_PATCHCORE = 0.05  # the bound: within 0.05 image AUROC of PatchCore


@pytest.fixture(scope="module")
def split(synthetic):
    root = synthetic(CATEGORY, SIZE, N_FIT + N_HELD, N_TEST_GOOD, N_TEST_DEFECT)
    return synthetic_split(root, CATEGORY, SIZE)


def _auroc(detector, test) -> float:
    pred = predict(detector, test, batch_size=32)
    return image_auroc(pred["labels"], pred["scores"])


def _train(name: str, train) -> torch.nn.Module:
    torch.manual_seed(SEED)
    detector = build_detector(name, image_size=SIZE, backbone="mobilenet_v2")
    fit(detector, Subset(train, range(N_FIT)), batch_size=BATCH, epochs=EPOCHS, seed=SEED)
    return detector


def test_fastflow_learns_at_its_defaults_and_its_masks_find_the_defects(split):
    train, test = split
    detector = _train("fastflow", train)
    assert detector.config.train_backbone  # the default: the backbone is fine-tuned
    auroc = _auroc(detector, test)
    assert auroc >= MIN_FASTFLOW_AUROC
    quality = mask_quality(detector, train, test, N_FIT, N_HELD)
    print(f"fastflow capsule AUROC {auroc:.3f} masks {quality}")
    assert quality["f1"] >= MIN_FASTFLOW_MASK_F1 and quality["normal_marked"] <= 0.01


def test_simplenet_at_its_defaults_comes_within_005_of_patchcore_on_the_same_data(split):
    train, test = split
    simplenet = _train("simplenet", train)
    assert simplenet.config.noise_std == 0.3 and simplenet.config.patch_size == 1  # defaults
    patchcore = _train("patchcore", train)
    ours, reference = _auroc(simplenet, test), _auroc(patchcore, test)
    print(f"capsule image AUROC simplenet {ours:.3f} patchcore {reference:.3f}")
    assert ours >= reference - SIMPLENET_BELOW_PATCHCORE
