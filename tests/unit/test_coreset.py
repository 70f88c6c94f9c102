"""Greedy k-center coreset, the bounded-memory streaming reducer and its cross-rank merge."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from anomaly_core.features.coreset import StreamingCoreset, gather_and_reduce, greedy_coreset
from anomaly_core.features.knn import knn
from tests.helpers import free_port


def clustered(n: int, dim: int = 48, seed: int = 0) -> torch.Tensor:
    """Rows around 20 centres of different spreads, plus a few outliers: a patch-like cloud."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, dim, generator=g) * 4
    spread = torch.rand(20, 1, generator=g) + 0.2
    which = torch.randint(20, (n,), generator=g)
    rows = centres[which] + torch.randn(n, dim, generator=g) * spread[which]
    rows[:: max(1, n // 10)] += torch.randn(len(rows[:: max(1, n // 10)]), dim, generator=g) * 3
    return rows


def coverage(rows: torch.Tensor, bank: torch.Tensor) -> tuple[float, float]:
    """(covering radius, mean distance) of every row to its nearest bank row."""
    d, _ = knn(rows, bank, 1)
    return d.max().item(), d.mean().item()


def budget_for(rows: int, dim: int, projection_dim: int = 16) -> int:
    """Bytes that give a reducer a capacity of `rows` rows of `dim` float32 values."""
    return int(rows * StreamingCoreset.bytes_per_row(dim, projection_dim=projection_dim)) + 1


def test_greedy_coreset_picks_farthest_points_first_on_a_hand_case():
    # On a line: from 0 the farthest is 20, then 10 (10 from both), then 2 (2 from 0 / 10).
    points = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0], [20.0]])
    assert greedy_coreset(points, 4, start=0).tolist() == [0, 5, 3, 2]
    assert greedy_coreset(points, 6, start=0).sort().values.tolist() == list(range(6))


def test_greedy_coreset_never_picks_a_row_twice_among_duplicates():
    points = torch.zeros(5, 3)
    assert sorted(greedy_coreset(points, 5, start=2).tolist()) == [0, 1, 2, 3, 4]


def exact_coreset(rows: torch.Tensor, ratio: float) -> torch.Tensor:
    """The all-in-memory coreset: a reducer without a budget (PatchCore's memory_budget_gb=None)
    holds every row until one greedy selection."""
    reducer = StreamingCoreset(ratio, None, projection_dim=16)
    reducer.add(rows)
    return reducer.result()


def test_an_unbounded_reducer_keeps_ceil_ratio_rows_of_the_input():
    rows = clustered(1001)
    bank = exact_coreset(rows, 0.1)
    assert bank.shape == (101, 48)
    assert (bank[:, None] == rows[None]).all(-1).any(1).all()  # every one an input row


def test_streaming_keeps_peak_memory_under_a_budget_far_smaller_than_the_rows():
    rows = clustered(20_000, dim=64)  # 5.1 MB of rows
    budget = 400_000
    reducer = StreamingCoreset(0.1, budget, projection_dim=16)
    for batch in rows.split(500):
        reducer.add(batch)
        assert reducer.held_bytes <= budget
    bank = reducer.result()
    assert reducer.peak_bytes <= budget < rows.numel() * 4 / 10
    assert reducer.reductions >= 10 and reducer.capped  # the budget, not the ratio, set the size
    assert len(bank) == reducer.bank_cap and reducer.seen == 20_000


def test_streaming_under_its_budget_is_the_exact_coreset():
    rows = clustered(2000)
    reducer = StreamingCoreset(0.1, budget_for(4000, 48), projection_dim=16)
    for batch in rows.split(300):
        reducer.add(batch)
    assert reducer.reductions == 0
    assert torch.equal(reducer.result(), exact_coreset(rows, 0.1))


def test_streamed_coreset_covers_the_rows_nearly_as_well_as_the_exact_one():
    rows = clustered(12_000)
    exact = exact_coreset(rows, 0.1)
    # 5,000 of the 12,000 rows fit: a reduction every 3,750, and the bank is still ratio x rows.
    reducer = StreamingCoreset(0.1, budget_for(5000, 48), projection_dim=16)
    for batch in rows.split(256):
        reducer.add(batch)
    streamed = reducer.result()
    assert len(streamed) == len(exact) == 1200 and reducer.reductions >= 2 and not reducer.capped
    (r_exact, m_exact), (r_stream, m_stream) = coverage(rows, exact), coverage(rows, streamed)
    # Measured: radius +3 %, mean +1 % (module docstring); bounds leave room for BLAS noise.
    assert r_stream <= 1.15 * r_exact and m_stream <= 1.05 * m_exact


def test_too_small_a_budget_says_how_much_is_needed():
    reducer = StreamingCoreset(0.1, 1000)
    with pytest.raises(ValueError, match="raise it to at least"):
        reducer.add(torch.zeros(4, 1024))


def _rank_bank(rank: int, world: int, port: int, out: str, budget: int) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        rows = clustered(6000)
        reducer = StreamingCoreset(0.1, budget, projection_dim=16)
        # The last rank's shard is empty (more workers than images): it must still take part.
        for batch in rows[rank :: world - 1].split(200) if rank < world - 1 else []:
            reducer.add(batch)
        bank = gather_and_reduce(reducer)
        torch.save({"bank": bank, "peak": reducer.peak_bytes}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_every_rank_ends_with_the_same_bank_of_all_rows_an_empty_shard_too(tmp_path):
    rows = clustered(6000)
    budget = budget_for(2400, 48)  # 2,400 of a rank's 3,000 rows
    out = str(tmp_path / "bank")
    mp.spawn(_rank_bank, args=(3, free_port(), out, budget), nprocs=3, join=True)
    a, b, empty = (torch.load(f"{out}.{r}") for r in range(3))
    assert torch.equal(a["bank"], b["bank"]) and torch.equal(a["bank"], empty["bank"])
    assert len(a["bank"]) == math.ceil(0.1 * len(rows))
    assert a["peak"] <= budget and b["peak"] <= budget  # rank 0 merged within its budget too
    exact = exact_coreset(rows, 0.1)
    (r_exact, m_exact), (r_two, m_two) = coverage(rows, exact), coverage(rows, a["bank"])
    assert r_two <= 1.15 * r_exact and m_two <= 1.05 * m_exact
