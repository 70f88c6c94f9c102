"""k-NN search against a bank: blocked, exact distances, 16-bit products that still find the
nearest rows, and the products' dtype each setting takes."""

import pytest
import torch

from anomaly_core.features import knn as knn_module
from anomaly_core.features.knn import knn


@pytest.mark.parametrize("k", [1, 5])
def test_knn_in_blocks_equals_brute_force(k):
    g = torch.Generator().manual_seed(3)
    query, bank = torch.randn(700, 40, generator=g) + 2, torch.randn(333, 40, generator=g)
    d, i = knn(query, bank, k, block=1000)  # many query and bank blocks
    ref = torch.cdist(query.double(), bank.double()).topk(k, largest=False)
    assert torch.equal(i, ref.indices)
    assert torch.allclose(d.double(), ref.values, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_knn_in_low_precision_returns_exact_distances_of_near_identical_neighbours(dtype):
    g = torch.Generator().manual_seed(4)
    bank = torch.randn(500, 64, generator=g) * 5 + 30  # large norms: float16 would overflow raw
    query = bank[:200] + 0.5 * torch.randn(200, 64, generator=g)
    d, i = knn(query, bank, 3, dtype=dtype, block=4096)
    ref = torch.cdist(query.double(), bank.double())
    assert torch.allclose(d.double(), ref.gather(1, i), atol=1e-3)  # exact for what it found
    assert (i[:, 0] == ref.argmin(1)).float().mean() > 0.99


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_knn_in_low_precision_finds_neighbours_much_nearer_than_the_rows_norms(dtype):
    # As PatchCore's features: rows far from the bank's mean (norm ~85), nearest neighbours at
    # ~3 % of that. With |a|^2 + |b|^2 added outside the bf16 product (rounded to 8 bits of
    # a value ~85^2) only 66 % of the nearest were found, some 3x farther than the true one.
    g = torch.Generator().manual_seed(5)
    centres = torch.randn(8, 256, generator=g) * 6
    bank = centres.repeat(250, 1) + torch.randn(2000, 256, generator=g) * 0.3
    query = bank[:1000] + torch.randn(1000, 256, generator=g) * 0.15
    exact_d, exact_i = knn(query, bank, 1, dtype=torch.float32)
    d, i = knn(query, bank, 1, dtype=dtype)
    assert (i == exact_i).float().mean() >= 0.999
    assert (d / exact_d).max() < 1.001


def test_knn_products_auto_follows_the_precision_and_the_cpus_bf16_instructions(monkeypatch):
    from anomaly_core.features.precision import compute_precision

    cpu = torch.device("cpu")
    for has_bf16, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(knn_module, "cpu_bf16_products", lambda has=has_bf16: has)
        assert knn_module.knn_products("auto", cpu) == expected
        with compute_precision("fp16"):
            assert knn_module.knn_products("auto", cpu) == torch.float16
            assert knn_module.knn_products("float32", cpu) == torch.float32
    assert knn_module.knn_products("auto", torch.device("meta")) == torch.float32  # not a CPU
    assert knn_module.knn_products("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="knn_dtype 'int8' is not one of auto"):
        knn_module.knn_products("int8", cpu)
