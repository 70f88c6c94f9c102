"""Nearest-neighbour search of query rows against a memory bank, in blocks (never a full
distance matrix), with 16-bit products where the CPU or the run's precision makes them faster
and the found neighbours' distances computed again exactly."""

from __future__ import annotations

import functools

import torch

from anomaly_core.features.precision import low_precision_dtype

# Elements of one distance block in knn(): 2**22 float32 values = 16 MiB of scratch on CPU;
# 2**26 (256 MiB) on a GPU, where each block's ~10 kernel launches, not the scratch, are the
# cost: PatchCore's 16 x 1,024 patches against a 6,554-row bank are 2 blocks there, not 32.
DEFAULT_BLOCK = 1 << 22
GPU_BLOCK = 1 << 26
# Query rows centred at once in knn(), in distance blocks: 8 blocks (128 MiB as float32).
QUERY_CHUNK = 8
LOW_PRECISION = {"float16": torch.float16, "bfloat16": torch.bfloat16}
KNN_DTYPES = ("auto", "float32", *LOW_PRECISION)
# Extra candidates found in low precision, then re-ranked exactly in float32. With bf16
# products, 16,384 queries of 1,024 dims against 6,554 bank rows: PatchCore's features
# (wide_resnet50_2, random weights) missed no true nearest neighbour with 2 or 4 extra
# (0.4 % with none); clustered Gaussian rows missed 1.2 % with 1, 0.2 % with 2, 0.006 % with
# 4 (that distance 0.03 % off); 4 costs 7 % more time than none.
_RERANK_EXTRA = 4
# knn()'s augmented rows are padded to a multiple of this many columns (GEMM alignment).
_ALIGN = 16


def knn_dtype(name: str) -> str:
    """A detector's `knn_dtype` setting, checked: auto, float32, float16 or bfloat16."""
    if name not in KNN_DTYPES:
        raise ValueError(f"knn_dtype {name!r} is not one of {', '.join(KNN_DTYPES)}")
    return name


def knn_products(setting: str, device: torch.device) -> torch.dtype:
    """The dtype of knn()'s products for a `knn_dtype` setting on `device`.

    "auto": the 16-bit dtype of a surrounding compute_precision("fp16"/"bf16"), else bfloat16
    on a CPU that multiplies bf16 natively (AVX512-BF16 or AMX: 4.9x float32's speed on a
    2-core AMD EPYC, 7.5x on an Intel CPU with AMX), else float32. Low-precision products
    only choose candidates: their distances are computed again exactly (see knn()).
    """
    if setting == "auto":
        context = low_precision_dtype()
        if context is not None:
            return context
        return torch.bfloat16 if device.type == "cpu" and cpu_bf16_products() else torch.float32
    return LOW_PRECISION.get(knn_dtype(setting), torch.float32)


@functools.cache
def cpu_bf16_products() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (Linux /proc/cpuinfo flags).

    Without them bf16 products are emulated, slower than float32 (an AVX2-only AMD EPYC)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        flags = []
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _blocks(q: int, m: int, block: int) -> tuple[int, int]:
    """(query rows, bank rows) per distance block of at most `block` elements."""
    bank_rows = max(1, min(m, block // max(1, min(q, 1024))))
    return max(1, min(q, block // bank_rows)), bank_rows


def _knn(
    query: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    *,
    block: int | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    # knn() without its autocast guard.
    if bank.ndim != 2 or query.ndim != 2 or query.shape[1] != bank.shape[1]:
        raise ValueError(
            f"knn needs query [q,d] and bank [m,d]; got {tuple(query.shape)}, {tuple(bank.shape)}"
        )
    m, dim = bank.shape
    if not 1 <= k <= m:
        raise ValueError(f"knn k={k} must be in 1..{m} (the bank's size)")
    q = query.shape[0]
    if block is None:
        block = DEFAULT_BLOCK if bank.device.type == "cpu" else GPU_BLOCK
    low = dtype is not None and dtype != torch.float32
    products = dtype if low else torch.float32
    found = min(m, k + _RERANK_EXTRA) if low else k
    q_rows, b_rows = _blocks(q, m, block)
    r_rows = max(1, min(q_rows, block // (found * dim)))  # the exact pass gathers found rows each
    chunk = max(q_rows, QUERY_CHUNK * block // dim)
    width = -(-(dim + 4) // _ALIGN) * _ALIGN
    centre = bank.float().mean(0)
    scale = torch.ones((), device=bank.device)
    if low:
        # Unit scale keeps float16 products far from overflow and where its precision is best.
        # Reduced on the device (Python's max() of tensors would wait for a GPU per block).
        scale = torch.stack([
            (bank[bs : bs + b_rows].float() - centre).norm(dim=1).max()
            for bs in range(0, m, b_rows)
        ]).max().clamp_min(1e-12)

    def augmented(rows: torch.Tensor, times: float, square_at: int) -> torch.Tensor:
        # Centred, scaled rows in the products' dtype, with four more columns: queries as
        # [-2 a, 1, 1, |a|^2 hi, lo], keys as [b, |b|^2 hi, lo, 1, 1], so that one product
        # is |a - b|^2, accumulated in float32 inside the matmul. The squares are the rounded
        # rows' own, split in two 16-bit parts: only the distance (small for near rows), not
        # |a|^2 + |b|^2, is rounded to 16 bits on the way out. bf16 products of PatchCore's
        # features, whose nearest neighbours lie at 3-6 % of their norms, found every exact
        # neighbour this way; with the squares added outside the product they missed 10 %.
        scaled = ((rows.float() - centre) / scale).to(products)
        out = scaled.new_ones(len(scaled), width)
        out[:, :dim] = scaled * times
        out[:, dim + 4 :] = 0
        square = scaled.float().pow(2).sum(1)
        hi = square.to(products)
        out[:, square_at] = hi
        out[:, square_at + 1] = (square - hi.float()).to(products)
        return out

    def keys(bs: int) -> torch.Tensor:
        return augmented(bank[bs : bs + b_rows], 1, dim)

    dists, idxs = [], []
    # A chunk of queries at a time with the bank's blocks outside its query blocks: each bank
    # block is centred (and converted) once per chunk, not once per query block, which in 16
    # bits cost more than the products (CPU, PatchCore's 1,536 dims).
    for cs in range(0, q, chunk):
        rows = query[cs : cs + chunk]
        n = len(rows)
        probe = augmented(rows, -2, dim + 2)
        best_d = torch.full((n, found), float("inf"), device=rows.device)
        best_i = torch.zeros((n, found), dtype=torch.long, device=rows.device)
        for bs in range(0, m, b_rows):
            block_keys = keys(bs)
            for qs in range(0, n, q_rows):
                qe = min(n, qs + q_rows)
                d2 = probe[qs:qe] @ block_keys.T  # squared distances
                if found == 1:  # min() is several times faster than topk() on CPU
                    d, i = d2.min(dim=1, keepdim=True)
                else:
                    d, i = d2.topk(min(found, d2.shape[1]), dim=1, largest=False)
                d = torch.cat([best_d[qs:qe], d.float()], 1)
                d, pick = d.topk(found, dim=1, largest=False)
                best_d[qs:qe] = d
                best_i[qs:qe] = torch.cat([best_i[qs:qe], i + bs], 1).gather(1, pick)
        # The products only choose: the found neighbours' distances are computed again from
        # differences in float32 (and re-ranked, for low precision's extra candidates).
        for qs in range(0, n, r_rows):
            near = best_i[qs : qs + r_rows]
            diff = rows[qs : qs + r_rows].float().unsqueeze(1) - bank[near].float()
            d, pick = torch.linalg.vector_norm(diff, dim=-1).topk(k, dim=1, largest=False)
            dists.append(d)
            idxs.append(near.gather(1, pick))
    return torch.cat(dists), torch.cat(idxs)


@torch.no_grad()
def knn(
    query: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    *,
    block: int | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances [q,k] and indices [q,k] of each query row's k nearest bank rows.

    Candidates come from |a|^2 + |b|^2 - 2 a.b (one product of augmented rows) over blocks of
    at most `block` elements (default: DEFAULT_BLOCK on CPU, GPU_BLOCK on GPUs), never a full
    [q,m] matrix; rows are centred on the bank's mean first, which keeps that expansion precise
    for features with a large common offset. Returned distances are computed again from
    differences, so a row's distance to itself is 0. dtype float16/bfloat16 runs the products
    in that precision on scaled rows and re-ranks a few extra candidates in float32: only
    near-ties may be ordered differently. None: the surrounding compute_precision's, else
    float32 (knn_products() turns a detector's setting into a dtype).
    """
    # Under a caller's bf16 autocast the expansion would lose the distances: precision is
    # what `dtype` says, or bf16 products (re-ranked in float32) inside compute_precision("bf16").
    if dtype is None:
        dtype = low_precision_dtype()
    with torch.autocast(query.device.type, enabled=False):
        return _knn(query, bank, k, block=block, dtype=dtype)
