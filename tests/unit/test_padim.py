"""PaDiM: Gaussian statistics, the cross-worker reduction, fit memory, and scoring behaviour."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import anomaly_core.detectors.padim as padim
from anomaly_core.detectors import build_detector, make_config
from anomaly_core.detectors.base import Detector, DetectorConfig
from anomaly_core.training.fit import fit
from tests.helpers import TensorImages, free_port

TINY = dict(backbone="resnet18", weights="random", image_size=64, n_features=24)


def _images(n: int = 11) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _make(**options) -> torch.nn.Module:
    torch.manual_seed(0)  # the same random backbone in every process
    return build_detector("padim", **{**TINY, **options})


def _reference(detector, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean [hw, d] and inverse of (covariance + 0.01 I) [hw, d, d] from the embeddings."""
    with torch.no_grad():
        emb = detector.embed(images).flatten(2).permute(2, 0, 1).double().numpy()  # [hw, n, d]
    cov = np.stack([np.cov(e, rowvar=False) for e in emb]) + 0.01 * np.eye(emb.shape[-1])
    return emb.mean(1), np.linalg.inv(cov)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        detector = _make()
        fit(detector, TensorImages(_images()), batch_size=3)
        if rank == 0:
            torch.save({"mean": detector.mean, "inv": detector.inv_covariance}, out)
    finally:
        dist.destroy_process_group()


def test_two_workers_give_single_worker_padim_stats(tmp_path):
    single = _make()
    fit(single, TensorImages(_images()), batch_size=4)
    out = str(tmp_path / "two.pt")
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
    two = torch.load(out)
    assert torch.allclose(two["mean"], single.mean, atol=1e-5, rtol=0)
    scale = single.inv_covariance.abs().max()
    assert torch.allclose(two["inv"], single.inv_covariance, atol=1e-6 * scale, rtol=1e-5)
    assert single.mean.abs().max() > 1e-3  # the comparison is not between zeros


@pytest.mark.parametrize("chunk_bytes", [padim.CHUNK_BYTES, 50_000])
def test_padim_stats_equal_the_float64_mean_and_inverse_covariance(monkeypatch, chunk_bytes):
    # 50 KB: 256 positions of 24 x 24 float64 in 22 chunks of 11 and a last one of 3.
    monkeypatch.setattr(padim, "CHUNK_BYTES", chunk_bytes)
    detector = _make()
    images = _images(9)
    fit(detector, TensorImages(images), batch_size=4)
    mean, inv = _reference(detector, images)
    np.testing.assert_allclose(detector.mean.numpy(), mean, atol=1e-5)
    # The chunked in-place Cholesky inverse against the float64 inverse of the usual covariance.
    np.testing.assert_allclose(
        detector.inv_covariance.numpy(), inv, rtol=1e-4, atol=1e-5 * np.abs(inv).max()
    )
    assert (
        detector.inv_covariance.dtype == torch.float32 and detector.inv_covariance.is_contiguous()
    )
    assert detector._outer is None and detector._sum is None  # nothing left behind


def test_padim_accumulates_in_float64_under_bf16_autocast():
    detector = _make()
    images = _images(4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        detector.observe(images)
        emb = detector.embed(images).flatten(2).permute(2, 0, 1).double()  # [hw, n, d]
    assert {t.dtype for t in detector._outer} == {torch.float64}
    outer = torch.cat(detector._outer)
    assert torch.allclose(detector._sum, emb.sum(1), rtol=1e-12, atol=0)
    assert torch.allclose(outer, emb.transpose(1, 2) @ emb, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"image_size": 70},
        {"layers": ("layer2", "layer3")},
        {"accumulate_dtype": "float32"},
        {"backbone": "mobilenet_v2", "layers": ("layer2",), "n_features": None},
    ],
)
def test_fit_state_bytes_is_what_fitting_allocates(options):
    detector = _make(**options)
    size = detector.config.image_size
    detector.observe(torch.rand(2, 3, size, size))
    allocated = sum(t.numel() * t.element_size() for t in [detector._sum, *detector._outer])
    assert padim.Padim.fit_state_bytes(make_config("padim", **{**TINY, **options})) == allocated


def test_fit_state_bytes_at_the_defaults_and_for_other_detectors():
    # 64 x 64 positions, 550 channels, float64: the 9.9 GB.
    assert padim.Padim.fit_state_bytes(make_config("padim")) == 4096 * (550 + 550 * 550) * 8
    assert Detector.fit_state_bytes(DetectorConfig()) is None


def test_memory_check_names_the_amount_and_the_options_that_reduce_it():
    config = make_config("padim")  # 9.25 GiB of statistics
    padim.check_memory(config, available=12 * 2**30)
    padim.check_memory(config, available=None)  # unknown: no check
    with pytest.raises(padim.FitMemoryError) as err:
        padim.check_memory(config, available=8 * 2**30, device="cuda:0")
    text = str(err.value)
    assert "9.25 GiB" in text and "8.00 GiB is free" in text and "cuda:0" in text
    for option in (
        "accumulate_dtype=float32 (4.62 GiB",
        "n_features=",
        "image_size=224 (7.08 GiB",
        "layers=['layer2', 'layer3'] (2.31 GiB",
    ):
        assert option in text, text
    assert isinstance(err.value, ValueError)  # jobs stop on it instead of retrying


def test_fit_fails_at_the_first_batch_before_allocating(monkeypatch):
    detector = _make()
    stats = padim.Padim.fit_state_bytes(detector.config)  # 1.2 MB
    monkeypatch.setattr(padim, "available_memory", lambda device: int(1.5 * stats))
    with pytest.raises(padim.FitMemoryError, match=r"1\.2 MiB.*n_features=.*image_size=32"):
        fit(detector, TensorImages(_images(4)), batch_size=2)
    assert detector._sum is None and detector._outer is None
    with pytest.raises(padim.FitMemoryError):
        detector.check_fit_memory(torch.device("cpu"))


def test_available_memory_is_positive_on_cpu():
    assert 0 < padim.available_memory("cpu") < 2**50


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cgroup_limit_counts_the_tightest_ancestor_and_reclaimable_cache(tmp_path, version):
    mount, limit, usage, cache = padim._CGROUP[version]
    line = "0::/a/b" if version == "v2" else "4:memory:/a/b"
    (tmp_path / "cgroup").write_text(f"1:cpu:/x\n{line}\n")
    leaf, parent = tmp_path / mount.lstrip("/") / "a" / "b", tmp_path / mount.lstrip("/") / "a"
    leaf.mkdir(parents=True)
    no_limit = "max" if version == "v2" else str(2**63 - 4096)
    for folder, lim, used in ((leaf, no_limit, 600), (parent, "1000", 900)):
        (folder / limit).write_text(lim + "\n")
        (folder / usage).write_text(f"{used}\n")
    (parent / "memory.stat").write_text(f"anon 500\n{cache} 300\n")
    # The parent's limit: 1000 - 900 used + 300 of inactive page cache the kernel can drop.
    assert padim.cgroup_available(str(tmp_path / "cgroup"), str(tmp_path)) == 400
    assert padim.cgroup_available(str(tmp_path / "absent")) is None


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_fit_peak_memory_is_the_statistics_plus_little():
    # 1024 positions x 200 channels: 315 MiB of float64 sums, in chunks the allocator maps and
    # unmaps on their own, so what earlier tests freed cannot hide a full-size temporary.
    detector = build_detector(
        "padim", backbone="resnet18", weights="random", image_size=128, n_features=200
    )
    stats = padim.Padim.fit_state_bytes(detector.config)
    images = torch.rand(8, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        detector.embed(images[:4])  # the backbone's first-run allocations are not the fit's
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    before = _status_bytes("VmRSS")
    fit(detector, TensorImages(images), batch_size=4)
    growth = _status_bytes("VmHWM") - before
    # Measured: stats + ~100 MB (activations, one chunk's inverse); the former full-size
    # temporaries (per-batch outer product, covariance, its copies) gave 4.4 x stats.
    assert stats == 1024 * 200 * 201 * 8
    assert growth <= stats + 160 * 2**20, (growth / 2**20, stats / 2**20)


def test_padim_rejects_an_indefinite_covariance():
    detector = _make(regularization=0.0)  # 3 images, 24 channels: rank 2, singular
    with pytest.raises(ValueError, match="not positive definite.*regularization"):
        fit(detector, TensorImages(_images(3)), batch_size=3)


def test_padim_uses_the_papers_channel_counts_and_a_seeded_subset():
    assert (
        build_detector("padim", backbone="resnet18", weights="random").channel_index.numel() == 100
    )
    a = build_detector("padim", **TINY).channel_index
    b = build_detector("padim", **{**TINY, "seed": 1}).channel_index
    assert torch.equal(a, build_detector("padim", **TINY).channel_index) and not torch.equal(a, b)


def test_embedding_is_the_channel_subset_of_all_layers_at_the_first_grid():
    detector = _make()
    images = _images(2)
    with torch.no_grad():
        feats = detector.backbone(images)
        full = torch.cat(
            [feats[0]]
            + [torch.nn.functional.interpolate(f, size=feats[0].shape[-2:]) for f in feats[1:]],
            dim=1,
        )
        assert torch.equal(detector.embed(images), full[:, detector.channel_index])


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
