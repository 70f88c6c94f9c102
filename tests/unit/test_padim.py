"""PaDiM: Gaussian statistics, the cross-worker reduction, and scoring behaviour."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from anomaly_core.detectors import build_detector
from anomaly_core.fit import fit
from tests.helpers import TensorImages, free_port

TINY = dict(backbone="resnet18", weights="random", image_size=64, n_features=24)


def _images(n: int = 11) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _make() -> torch.nn.Module:
    torch.manual_seed(0)  # the same random backbone in every process
    return build_detector("padim", **TINY)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        detector = _make()
        fit(detector, TensorImages(_images()), batch_size=3)
        if rank == 0:
            torch.save({"mean": detector.mean, "cov": detector.covariance}, out)
    finally:
        dist.destroy_process_group()


def test_two_workers_give_single_worker_padim_stats(tmp_path):
    single = _make()
    fit(single, TensorImages(_images()), batch_size=4)
    out = str(tmp_path / "two.pt")
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
    two = torch.load(out)
    assert torch.allclose(two["mean"], single.mean, atol=1e-5, rtol=0)
    assert torch.allclose(two["cov"], single.covariance, atol=1e-5, rtol=0)
    assert single.covariance.abs().max() > 1e-3  # the comparison is not between zeros


def test_padim_stats_equal_numpy_mean_and_covariance():
    detector = _make()
    images = _images(9)
    fit(detector, TensorImages(images), batch_size=4)
    with torch.no_grad():
        emb = detector.embed(images).flatten(2).permute(2, 0, 1).double().numpy()  # [hw, n, d]
    pos = 5
    expected_cov = np.cov(emb[pos], rowvar=False) + 0.01 * np.eye(emb.shape[-1])
    np.testing.assert_allclose(detector.mean[pos].numpy(), emb[pos].mean(0), atol=1e-5)
    np.testing.assert_allclose(detector.covariance[pos].numpy(), expected_cov, atol=1e-4)


def test_padim_uses_the_papers_channel_counts_and_a_seeded_subset():
    assert build_detector("padim", backbone="resnet18", weights="random").channel_index.numel() == 100
    a = build_detector("padim", **TINY).channel_index
    b = build_detector("padim", **{**TINY, "seed": 1}).channel_index
    assert torch.equal(a, build_detector("padim", **TINY).channel_index) and not torch.equal(a, b)


def test_padim_map_is_at_input_size_and_highest_where_the_image_is_changed():
    detector = _make()
    fit(detector, TensorImages(torch.full((8, 3, 64, 64), 0.5) + 0.02 * _images(8)), batch_size=4)
    test = torch.full((2, 3, 64, 64), 0.5)
    test[1, :, 40:56, 8:24] = 1.0
    out = detector(test)
    assert out.map.shape == (2, 64, 64) and out.score.shape == (2,)
    assert out.score[1] > out.score[0]
    peak = np.unravel_index(out.map[1].argmax().item(), (64, 64))
    assert 30 <= peak[0] <= 63 and 0 <= peak[1] <= 34


def test_unfitted_padim_says_so():
    with pytest.raises(RuntimeError, match="not fitted"):
        _make()(torch.rand(1, 3, 64, 64))


def test_padim_rejects_a_single_training_image():
    detector = _make()
    with pytest.raises(ValueError, match="at least 2"):
        fit(detector, TensorImages(_images(1)), batch_size=1)


def test_unknown_option_names_the_detector_and_its_options():
    with pytest.raises(ValueError, match="padim has no option"):
        build_detector("padim", flow_steps=3)
