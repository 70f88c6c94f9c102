"""Synthetic validation anomalies: masks are exactly where pixels were pasted."""

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from anomaly_core.data.anomalies import KINDS, SyntheticAnomalyDataset, make_anomaly, perlin


def _image(seed: int = 0, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(40, 200, size)[None, :, None] + rng.normal(0, 12, (size, size, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", KINDS)
def test_mask_is_exactly_the_pasted_pixels(kind):
    image = _image()
    for seed in range(10):
        out, mask = make_anomaly(image, kind, np.random.default_rng(seed))
        changed = (out != image).any(axis=-1)
        assert np.array_equal(mask, changed)
        assert 0.003 < mask.mean() < 0.35


def test_anomalies_are_deterministic_per_seed():
    image = _image()
    a = make_anomaly(image, "perlin", np.random.default_rng(3))
    b = make_anomaly(image, "perlin", np.random.default_rng(3))
    c = make_anomaly(image, "perlin", np.random.default_rng(4))
    assert np.array_equal(a[1], b[1]) and not np.array_equal(a[1], c[1])


def test_perlin_noise_is_smooth_and_bounded():
    noise = perlin((64, 64), (4, 4), np.random.default_rng(0))
    assert noise.shape == (64, 64) and np.abs(noise).max() <= 1.5
    assert np.abs(np.diff(noise, axis=0)).max() < 0.3  # gradient noise, not white noise


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="cutpaste"):
        make_anomaly(_image(), "scratchy", np.random.default_rng(0))


class Normals(Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        image = torch.from_numpy(_image(i)).permute(2, 0, 1).float() / 255
        return {"image": image, "label": 0, "mask": torch.zeros(64, 64), "index": i}


def test_dataset_pairs_each_normal_image_with_an_anomalous_copy():
    data = SyntheticAnomalyDataset(Normals(), seed=1)
    assert len(data) == 6
    labels = [data[i]["label"] for i in range(6)]
    assert labels == [0, 0, 0, 1, 1, 1]
    for i in range(3, 6):
        item, normal = data[i], data[i - 3]
        before = (normal["image"] * 255).round()
        after = (item["image"] * 255).round()
        changed = (after != before).any(dim=0)
        assert torch.equal(changed, item["mask"] > 0) and item["mask"].sum() > 0
        assert torch.equal(data[i]["mask"], item["mask"])  # same every time
