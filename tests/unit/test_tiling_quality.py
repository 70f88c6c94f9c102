"""Tiled PatchCore and PaDiM against the same detectors on the resized image, on synthetic
768 px carpet with defects of 10-20 px (which a resize to 256 px shrinks to 3-7 px), ImageNet
mobilenet_v2 (the one real backbone here), in one run: the margins are measured, not assumed.
And per-position statistics against a shared model on an aligned board whose defect is a part
of the wrong kind in a slot: every pixel of it is normal somewhere else on the board."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomaly_core.data.datasets import ImageDataset, mvtec_records
from anomaly_core.data.synthetic import generate
from anomaly_core.detectors import build_detector
from anomaly_core.detectors.tiling import TiledDetector, Tiling
from anomaly_core.training.fit import fit
from anomaly_core.training.metrics import image_auroc, pixel_auroc

SIZE, TILE, RESIZED = 768, 128, 256
# Measured (seed 0, 6 training images, 6 good + 8 defective test images): PaDiM image AUROC
# 0.938 tiled / 0.625 resized, pixel 0.994 / 0.656; PatchCore (coreset 0.01) 0.625 / 0.292,
# pixel 0.988 / 0.717. At 1,024 px with 8 training images: PaDiM 0.771 / 0.458, pixel 0.999 /
# 0.517; PatchCore 0.896 / 0.333, pixel 0.976 / 0.727 (twice the test's time).
MIN_IMAGE_GAIN, MIN_PIXEL_GAIN = 0.15, 0.2


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("highres"))
    generate(root, categories=["carpet"], size=SIZE, n_train=6, n_test_good=6, n_test_defect=2,
             defect_px=(10, 20))
    return root


def _evaluate(detector, data: str, size: int) -> tuple[float, float]:
    torch.manual_seed(0)
    fit(detector, ImageDataset(mvtec_records(data, "carpet", "train"), (size, size)), batch_size=4)
    test = ImageDataset(mvtec_records(data, "carpet", "test"), (SIZE, SIZE))
    scores, maps, labels, masks = [], [], [], []
    detector.eval()
    with torch.no_grad():
        for i in range(len(test)):
            item = test[i]
            x = item["image"][None]
            if size != SIZE:
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                  align_corners=False)
            out = detector(x)
            maps.append(F.interpolate(out.map[None], size=(SIZE, SIZE), mode="bilinear",
                                      align_corners=False)[0, 0].numpy())
            scores.append(float(out.score[0]))
            labels.append(int(item["label"]))
            masks.append(item["mask"].numpy() > 0.5)
    return (image_auroc(np.array(labels), np.array(scores)),
            pixel_auroc(np.stack(masks), np.stack(maps)))


@pytest.mark.parametrize("name, options", [
    ("padim", {}),
    # the paper's low-memory coreset: 6 images x 36 tiles are 55,000 patches to select from
    ("patchcore", {"coreset_ratio": 0.01}),
])
def test_tiles_find_small_defects_that_the_resized_image_loses(name, options, data):
    resized = _evaluate(build_detector(name, backbone="mobilenet_v2", image_size=RESIZED,
                                       **options), data, RESIZED)
    tiled = _evaluate(TiledDetector(build_detector(name, backbone="mobilenet_v2", image_size=TILE,
                                                   **options),
                                    Tiling(size=(SIZE, SIZE), tile=TILE, batch=32)), data, SIZE)
    assert tiled[0] >= resized[0] + MIN_IMAGE_GAIN, (tiled, resized)
    assert tiled[1] >= resized[1] + MIN_PIXEL_GAIN, (tiled, resized)


BOARD, SLOT = 256, 128  # a 2 x 2 board: slot q holds part q (round, square, cross, triangle)
# Measured (seed 0, 10 training boards, 8 good + 8 with a wrong part): PaDiM image AUROC 1.0
# own / 0.547 shared, pixel 0.998 / 0.649; PatchCore (coreset 0.1) 1.0 / 0.625, pixel 0.997 /
# 0.607.
MIN_POSITION_IMAGE_GAIN, MIN_POSITION_PIXEL_GAIN = 0.3, 0.2


def _part(kind: int, n: int, shift: np.ndarray) -> np.ndarray:
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    dy, dx = y - n / 2 - shift[0], x - n / 2 - shift[1]
    r = n / 4
    return [dy**2 + dx**2 <= r**2,
            (abs(dy) <= 0.85 * r) & (abs(dx) <= 0.85 * r),
            ((abs(dy) <= r) & (abs(dx) <= 0.3 * r)) | ((abs(dx) <= r) & (abs(dy) <= 0.3 * r)),
            (dy <= 0.8 * r) & (dy >= -r) & (abs(dx) <= (dy + r) * 0.55)][kind]


def _board(rng: np.random.Generator, defect: bool) -> tuple[torch.Tensor, np.ndarray]:
    image = np.full((3, BOARD, BOARD), 0.35, np.float32)
    image[1] += 0.1
    mask = np.zeros((BOARD, BOARD), bool)
    wrong = rng.integers(4) if defect else -1
    for q in range(4):
        slot = (slice(None), slice(q // 2 * SLOT, q // 2 * SLOT + SLOT),
                slice(q % 2 * SLOT, q % 2 * SLOT + SLOT))
        kind = (q + rng.integers(1, 4)) % 4 if q == wrong else q
        part = _part(kind, SLOT, rng.uniform(-4, 4, 2))
        image[slot][:, part] = np.array([0.85, 0.8, 0.6], np.float32)[:, None]
        if q == wrong:  # the wrong part and where the right one belongs
            mask[slot[1:]] = part | _part(q, SLOT, np.zeros(2))
    image += rng.normal(0, 0.03, image.shape).astype(np.float32)
    return torch.from_numpy(np.clip(image, 0, 1)), mask


@pytest.mark.parametrize("name, options", [("padim", {}), ("patchcore", {"coreset_ratio": 0.1})])
def test_own_statistics_per_tile_position_find_a_part_in_the_wrong_slot(name, options):
    from tests.helpers import TensorImages

    rng = np.random.default_rng(0)
    train = torch.stack([_board(rng, False)[0] for _ in range(10)])
    test = [_board(rng, i >= 8) for i in range(16)]
    images, masks = torch.stack([t[0] for t in test]), np.stack([t[1] for t in test])
    labels = np.array([0] * 8 + [1] * 8)
    results = {}
    for positions in ("shared", "own"):
        torch.manual_seed(0)
        detector = TiledDetector(build_detector(name, backbone="mobilenet_v2", image_size=SLOT,
                                                **options),
                                 Tiling(size=(BOARD, BOARD), tile=SLOT, positions=positions))
        fit(detector, TensorImages(train), batch_size=4)
        with torch.no_grad():
            out = detector.eval()(images)
        results[positions] = (image_auroc(labels, out.score.numpy()),
                              pixel_auroc(masks, out.map.numpy()))
    own, shared = results["own"], results["shared"]
    assert own[0] >= shared[0] + MIN_POSITION_IMAGE_GAIN, results
    assert own[1] >= shared[1] + MIN_POSITION_PIXEL_GAIN, results
