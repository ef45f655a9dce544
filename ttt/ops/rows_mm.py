"""y = x @ w.T for the few rows of a decode step (x: [M <= 16, K] of B sequences' one token, w: [N, K]) in one Triton
kernel that streams w once, with K optionally split over S programs per block of w's rows (so that the grid covers
the SMs where N / BN blocks alone would leave most of them idle), their fp32 partials summed after or left to the
consumer. `layers.merged.few_rows_linear` runs the compiled decode step's products through it at `launch_for`'s
launch; `benchmarks/bench_layer_kernels.py --gemms --rows-mm` times launches beside cuBLAS.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import cdiv

MAX_ROWS = 16  # the rows of x one program multiplies (masked beyond x's rows)


@triton.jit
def _rows_mm_kernel(x_ptr, w_ptr, y_ptr, M, N, K, s_xm, s_wn, s_ym, s_ys, KS,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SWAP: tl.constexpr):
    # program: outputs [0, M) (M <= BM) x [n0, n0 + BN) over K's slice [k0, k0 + KS) (the split's partial at y + split * s_ys);
    # SWAP: the product as w-tile x x.T ([BN, BK] x [BK, BM], w's rows as the MMA's M side: Hopper's wgmma)
    rm = tl.arange(0, BM)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    k_lo = tl.program_id(1) * KS
    k_hi = tl.minimum(K, k_lo + KS)
    if SWAP:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        km = k0 + rk < k_hi
        x = tl.load(x_ptr + rm[:, None] * s_xm + (k0 + rk)[None, :], mask=(rm[:, None] < M) & km[None, :], other=0.0)
        w = tl.load(w_ptr + rn[:, None] * s_wn + (k0 + rk)[None, :], mask=(rn[:, None] < N) & km[None, :], other=0.0)
        if SWAP:
            acc = tl.dot(w, tl.trans(x), acc)  # [BN, BK] x [BK, BM]
        else:
            acc = tl.dot(x, tl.trans(w), acc)  # [BM, BK] x [BK, BN]
    if SWAP:
        out = tl.trans(acc)  # [BN, BM] -> [BM, BN]
    else:
        out = acc
    y = y_ptr + tl.program_id(1) * s_ys + rm[:, None] * s_ym + rn[None, :]
    tl.store(y, out.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def launch_for(N: int, K: int, sms: int) -> dict:
    """rows_mm's launch for N outputs over K on a GPU of `sms` SMs: blocks of 64 outputs, K split over the most
    programs (at most 4 splits) that keep one program an SM. Measured on the H100 at the 1.3b decode's products
    (docs/kernels_notes.md, Decode): a split pays only where the blocks alone leave most SMs idle."""
    BN, BK = 64, 128
    return dict(BN=BN, BK=BK, splits=max(1, min(4, sms // cdiv(N, BN), cdiv(K, BK))), num_warps=4, num_stages=4,
                swap=True)


def rows_mm(x: torch.Tensor, w: torch.Tensor, BN: int = 64, BK: int = 128, splits: int = 1, num_warps: int = 4,
            num_stages: int = 4, swap: bool = True, partials: bool = False) -> torch.Tensor:
    """x [..., K] (at most MAX_ROWS rows in all, last dim contiguous) times w [N, K].T (rows contiguous, x's dtype) -> y
    [..., N] in x's dtype, accumulated in fp32 (as F.linear without bias). The launch: BN outputs and BK of K per
    step, K split over `splits` programs per block of outputs (fp32 partials [splits, M, N], summed), warps, stages,
    swap (the product in w's-rows-as-M orientation). partials: return the splits' fp32 partials [S, M, N] unsummed
    (for a consumer that sums them itself, e.g. inside a compiled graph's next element-wise kernel)."""
    K = x.shape[-1]
    rows = x.reshape(-1, K)  # [..., K] -> [M, K] (a view for the decode's [B, 1, K])
    M, N = rows.shape[0], w.shape[0]
    if M > MAX_ROWS or w.dim() != 2 or w.shape[1] != K or w.dtype != x.dtype or rows.stride(-1) != 1 \
            or w.stride(-1) != 1:
        raise ValueError(f"x, w: expected x [..., K] of at most {MAX_ROWS} rows and w [N, K] of x's dtype, both with "
                         f"a contiguous last dim; got {tuple(x.shape)} {x.dtype}, {tuple(w.shape)} {w.dtype}")
    if splits < 1 or BN < 16 or BK < 16:  # (tl.dot's least tile side)
        raise ValueError(f"launch: expected splits >= 1 and BN, BK >= 16, got splits={splits}, BN={BN}, BK={BK}")
    KS = cdiv(cdiv(K, BK), splits) * BK  # each split's K, whole BK steps
    S = cdiv(K, KS)
    y = torch.empty((S, M, N), dtype=x.dtype if S == 1 else torch.float32, device=x.device)
    _rows_mm_kernel[(cdiv(N, BN), S)](rows, w, y, M, N, K, rows.stride(0), w.stride(0), y.stride(1), y.stride(0), KS,
                                      BM=MAX_ROWS, BN=BN, BK=BK, SWAP=swap, num_warps=num_warps, num_stages=num_stages)
    if partials:
        return y.float()
    out = y[0] if S == 1 else y.sum(0).to(x.dtype)  # [S, M, N] -> [M, N]
    return out.view(*x.shape[:-1], N)  # [M, N] -> [..., N]
