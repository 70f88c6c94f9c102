"""Metrics against sklearn, hand-computed cases and a brute-force AUPRO reference."""

import time

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from anomaly_core.training import metrics


def brute_force_aupro(masks, maps, fpr_limit=0.3):
    """Each distinct score as threshold, PRO and FPR counted directly, trapezoids to the limit."""
    masks = np.asarray(masks, dtype=bool)
    regions = []
    for i, mask in enumerate(masks):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, labelled == k) for k in range(1, n + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in sorted(np.unique(maps), reverse=True):
        hit = maps >= t
        fpr = (hit & normal).sum() / normal.sum()
        pro = np.mean([hit[i][region].sum() / region.sum() for i, region in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def random_defects(rng, n=5, size=16, ties=False):
    """Blobby masks (one image defect-free) and maps that partly follow them."""
    noise = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 1.5, 1.5))
    masks = noise > np.quantile(noise, 0.85)
    masks[0] = False
    maps = 0.6 * masks + rng.normal(scale=0.4, size=masks.shape)
    if ties:
        maps = np.round(maps, 1)
    return masks, maps


def rank_auroc(labels, scores):
    """Probability a random anomalous sample outscores a random normal one (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size


def test_image_auroc_matches_pairwise_ranking_and_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(labels * 0.5 + rng.normal(size=300), 1)  # rounding makes ties
    got = metrics.image_auroc(labels, scores)
    assert got == pytest.approx(rank_auroc(labels, scores), abs=1e-12)
    assert got == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_pixel_auroc_is_roc_auc_over_all_pixels_flattened():
    masks, maps = random_defects(np.random.default_rng(1))
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert metrics.pixel_auroc(masks.astype(np.uint8), maps) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
def test_aupro_equals_brute_force_reference(seed, ties):
    masks, maps = random_defects(np.random.default_rng(seed), ties=ties)
    expected = brute_force_aupro(masks, maps)
    assert 0.05 < expected < 0.95  # a case where the curve actually matters
    assert metrics.aupro(masks, maps) == pytest.approx(expected, abs=1e-9)


def test_aupro_with_other_fpr_limit_equals_brute_force():
    masks, maps = random_defects(np.random.default_rng(7))
    for limit in (0.05, 1.0):
        expected = brute_force_aupro(masks, maps, fpr_limit=limit)
        assert metrics.aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-9)


def test_aupro_hand_case_interpolates_at_the_fpr_limit():
    # One 2-pixel region scored 0.9 and 0.5; of 10 normal pixels one scores 0.7, the rest
    # lower. Curve: (0,0) (0,.5) (.1,.5) (.1,1) ... so area to 0.3 is .05 + .2 = .25.
    maps = np.zeros((1, 3, 4))
    masks = np.zeros((1, 3, 4), dtype=bool)
    masks[0, 0, :2] = True
    maps[0, 0, :2] = [0.9, 0.5]
    maps[0, 0, 2] = 0.7
    maps[0, 0, 3:] = 0.01
    maps[0, 1:] = np.arange(8).reshape(2, 4) / 100
    assert metrics.aupro(masks, maps) == pytest.approx(0.25 / 0.3, abs=1e-12)


def test_aupro_averages_over_8_connected_regions_not_pixels():
    # A diagonal pair is one region under 8-connectivity. At threshold 0.9 it is half
    # found and the lone pixel fully found: PRO = (0.5 + 1) / 2 = 0.75 until FPR jumps to 1.
    # (4-connectivity would give (1 + 0 + 1) / 3; pixel weighting 2/3.)
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 3, 3] = True
    maps = np.full((1, 4, 4), 0.5)
    maps[0, 0, 0] = maps[0, 3, 3] = 0.9
    maps[0, 1, 1] = 0.0
    assert metrics.aupro(masks, maps) == pytest.approx(0.75, abs=1e-12)


def test_perfect_detector_scores_one_and_inverted_scores_zero():
    masks, _ = random_defects(np.random.default_rng(3))
    maps = masks + np.random.default_rng(4).uniform(0, 0.5, masks.shape)
    labels = masks.any(axis=(1, 2))
    scores = maps.max(axis=(1, 2))
    result = metrics.evaluate(labels, scores, masks, maps)
    for key in ("image_auroc", "image_f1_max", "pixel_auroc", "aupro", "pixel_f1_max"):
        assert result[key] == pytest.approx(1.0, abs=1e-12), key
    assert metrics.aupro(masks, -maps) == pytest.approx(0.0, abs=1e-12)


def test_f1_max_hand_case_and_threshold_is_inclusive():
    # Thresholds .8/.4/.35/.1 give F1 .667/.5/.8/.667: the best is 0.8 at score >= 0.35.
    f1, threshold = metrics.f1_max([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert f1 == pytest.approx(0.8)
    assert threshold == pytest.approx(0.35)


def test_f1_max_threshold_reproduces_the_reported_f1():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 500)
    scores = labels * 0.8 + rng.normal(size=500)
    f1, threshold = metrics.f1_max(labels, scores)
    predicted = scores >= threshold
    tp = (predicted & (labels == 1)).sum()
    assert 2 * tp / (predicted.sum() + labels.sum()) == pytest.approx(f1, abs=1e-12)
    for t in np.unique(scores):  # and no other threshold does better
        p = scores >= t
        assert 2 * (p & (labels == 1)).sum() / (p.sum() + labels.sum()) <= f1 + 1e-12


def test_evaluate_returns_image_keys_only_without_masks():
    result = metrics.evaluate([0, 1, 1, 0], [0.2, 0.9, 0.6, 0.1])
    assert set(result) == {"image_auroc", "image_f1_max", "image_f1_threshold"}
    assert all(isinstance(v, float) for v in result.values())


def test_evaluate_on_200_images_of_128px_is_fast():
    rng = np.random.default_rng(6)
    masks = np.zeros((200, 128, 128), dtype=bool)
    masks[100:, 40:60, 30:70] = True
    maps = masks * 0.5 + rng.random(masks.shape)
    labels = masks.any(axis=(1, 2))
    start = time.perf_counter()
    result = metrics.evaluate(labels, maps.max(axis=(1, 2)), masks, maps)
    elapsed = time.perf_counter() - start
    assert 0.5 < result["aupro"] < 1.0 and 0.5 < result["pixel_auroc"] < 1.0
    assert elapsed < 15, f"evaluate took {elapsed:.1f}s"  # ~1-2 s normally; generous for CI


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: metrics.image_auroc([1, 1, 1], [0.1, 0.2, 0.3]), "all anomalous"),
        (lambda: metrics.f1_max([0, 0], [0.1, 0.2]), "all normal"),
        (lambda: metrics.aupro(np.zeros((2, 4, 4)), np.ones((2, 4, 4))), "all normal"),
        (lambda: metrics.image_auroc([0, 2], [0.1, 0.2]), "only 0/1"),
        (lambda: metrics.image_auroc([0, 1], [0.1, np.nan]), "NaN"),
        (lambda: metrics.image_auroc([0, 1], [0.1, 0.2, 0.3]), "shape"),
        (lambda: metrics.evaluate([0, 1], [0.1, 0.2], masks=np.zeros((2, 2, 2))), "both masks"),
        (lambda: metrics.aupro(np.ones((2, 2)), np.ones((2, 2))), r"\[N, H, W\]"),
    ],
)
def test_undefined_or_malformed_inputs_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
