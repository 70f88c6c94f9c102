"""ViT k-NN: bank shapes, the k-NN scores, the bounded patch bank, and banks gathered across ranks."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from anomaly_core.detectors import build_detector
from anomaly_core.training.fit import fit
from tests.helpers import TensorImages, free_port

GIB = 1 << 30
SIZE = 224


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def small_vit(tmp_path_factory) -> str:
    """A two-layer, 32-wide ViT with the published model's 224 px input and 16 px patches."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    path = str(tmp_path_factory.mktemp("vit"))
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    return path


def _small(path: str, **options):
    return build_detector("vit_knn", weights=path, **options)


def test_random_vit_base_gives_cls_and_14x14_patch_banks_and_maps():
    torch.manual_seed(0)
    detector = build_detector("vit_knn", weights="random")
    train = _images(2)
    fit(detector, TensorImages(train), batch_size=2)
    assert detector.cls_bank.shape == (2, 768) and detector.patch_bank.shape == (2 * 14 * 14, 768)
    out = detector(torch.cat([train[:1], _images(1, seed=5)]))
    assert out.score.shape == (2,) and out.map.shape == (2, SIZE, SIZE)
    assert out.score[0] == 0 and out.score[1] > 0  # a training image is its own nearest CLS


def test_image_score_is_the_mean_distance_to_the_k_nearest_normal_cls(small_vit):
    detector = _small(small_vit, k=3)
    fit(detector, TensorImages(_images(6)), batch_size=3)
    test = _images(2, seed=8)
    cls, patches = detector.features(test)
    expected = (
        torch.cdist(cls.double(), detector.cls_bank.double()).topk(3, largest=False).values.mean(1)
    )
    assert torch.allclose(detector(test).score.double(), expected, rtol=1e-4)
    grid = (
        torch.cdist(patches.double(), detector.patch_bank.double())
        .topk(3, largest=False)
        .values.mean(-1)
    )
    detector.config.image_score = "patch_max"
    assert torch.allclose(detector(test).score.double(), grid.max(1).values, rtol=1e-4)


def test_patch_bank_stays_within_the_memory_budget(small_vit):
    budget_gb = 200_000 / GIB  # 6 images' tokens are 6 x 196 x 32 floats = 150 KB raw
    detector = _small(small_vit, memory_budget_gb=budget_gb)
    fit(detector, TensorImages(_images(6)), batch_size=2)
    stats = detector.fit_stats
    assert stats["peak_bytes"] <= 200_000 and stats["capped"]
    assert len(detector.cls_bank) == 6 and stats["patch_bank_rows"] < 6 * 196


def test_bad_vit_knn_options_say_what_to_do(small_vit):
    with pytest.raises(ValueError, match="is a CNN"):
        build_detector("vit_knn", backbone="resnet18", weights="random")
    with pytest.raises(ValueError, match="set image_size=224"):
        _small(small_vit, image_size=64)
    with pytest.raises(ValueError, match="image_score"):
        _small(small_vit, image_score="mean")
    detector = _small(small_vit, k=5)
    with pytest.raises(ValueError, match="at least 5 training images"):
        fit(detector, TensorImages(_images(3)), batch_size=3)


def _rank_banks(rank: int, world: int, port: int, path: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        detector = _small(path)
        fit(detector, TensorImages(_images(5)), batch_size=2)
        torch.save({"cls": detector.cls_bank, "patch": detector.patch_bank}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _rows(bank: torch.Tensor) -> list[tuple[float, ...]]:
    return sorted(tuple(round(v, 4) for v in row) for row in bank.tolist())


def test_two_ranks_gather_the_banks_of_all_images(small_vit, tmp_path):
    out = str(tmp_path / "rank")
    mp.spawn(_rank_banks, args=(2, free_port(), small_vit, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    assert torch.equal(ranks[0]["cls"], ranks[1]["cls"]) and torch.equal(
        ranks[0]["patch"], ranks[1]["patch"]
    )
    single = _small(small_vit)
    fit(single, TensorImages(_images(5)), batch_size=2)
    # Under the budget every CLS and every token is kept: the same rows, in shard order.
    assert _rows(ranks[0]["cls"]) == _rows(single.cls_bank) and len(single.cls_bank) == 5
    assert (
        _rows(ranks[0]["patch"]) == _rows(single.patch_bank) and len(single.patch_bank) == 5 * 196
    )
