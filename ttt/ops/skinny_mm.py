"""y = x @ w.T for a few rows of x (decode: one token of each of B <= 16 sequences) in one Triton kernel that streams
the weight once: the product is bound by reading w, so each program owns a block of w's rows (BN outputs) and
walks all of K, with no split-K reduction launch. An alternative to cuBLAS's kernels at M = 16 (2.4 TB/s on
average at the 1.3b decode shapes on an H200: docs/kernels_notes.md, "Decode"), measured against them by
`benchmarks/bench_layer_kernels.py --gemms` before anything uses it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import cdiv

MAX_ROWS = 16  # the rows of x one program multiplies (the kernel's BM: the M side, masked beyond x's rows)

CONFIGS = [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=s)
           for bn, bk, w, s in ((16, 256, 4, 4), (16, 512, 4, 3), (32, 256, 4, 4), (32, 128, 4, 6),
                                (64, 128, 4, 4), (64, 256, 8, 3), (16, 128, 2, 6), (32, 512, 8, 3))]


def _skinny_mm_body(x_ptr, w_ptr, y_ptr, M, N, K, s_xm, s_wn, s_ym, BM: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr):
    # program: outputs [0, M) x [n0, n0 + BN); x's rows are few, so x's K-slices come from L2 each time
    rm = tl.arange(0, BM)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        km = k0 + rk < K
        x = tl.load(x_ptr + rm[:, None] * s_xm + (k0 + rk)[None, :], mask=(rm[:, None] < M) & km[None, :], other=0.0)
        w = tl.load(w_ptr + rn[:, None] * s_wn + (k0 + rk)[None, :], mask=(rn[:, None] < N) & km[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)  # [BM, BK] x [BK, BN]
    tl.store(y_ptr + rm[:, None] * s_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


_skinny_mm_kernel = triton.autotune(CONFIGS, key=["M", "N", "K"])(triton.jit(_skinny_mm_body))
_skinny_mm_fixed = triton.jit(_skinny_mm_body)  # one launch config, given by the caller (tests, benchmarks)


def skinny_mm(x: torch.Tensor, w: torch.Tensor, config: triton.Config | None = None) -> torch.Tensor:
    """x [..., K] (at most 16 rows in all, last dim contiguous) times w [N, K].T (16-bit, rows contiguous) -> y
    [..., N] in x's dtype, accumulated in fp32 (as F.linear without bias). config: one launch (BN, BK, warps,
    stages) instead of the autotuned choice among CONFIGS (which times launches, so only on a GPU: elsewhere, in
    Triton's interpreter, the first of CONFIGS)."""
    K = x.shape[-1]
    rows = x.reshape(-1, K)  # [..., K] -> [M, K] (a view for the decode's [B, 1, K])
    M, N = rows.shape[0], w.shape[0]
    if M > MAX_ROWS or w.dim() != 2 or w.shape[1] != K or w.dtype != x.dtype or rows.stride(-1) != 1 \
            or w.stride(-1) != 1:
        raise ValueError(f"x, w: expected x [..., K] of at most {MAX_ROWS} rows and w [N, K] of x's dtype, both with "
                         f"a contiguous last dim; got {tuple(x.shape)} {x.dtype}, {tuple(w.shape)} {w.dtype}")
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    args = (rows, w, y, M, N, K, rows.stride(0), w.stride(0), y.stride(0), MAX_ROWS)
    if config is None and not x.is_cuda:
        config = CONFIGS[0]
    if config is None:
        _skinny_mm_kernel[lambda meta: (cdiv(N, meta["BN"]),)](*args)
    else:
        _skinny_mm_fixed[(cdiv(N, config.kwargs["BN"]),)](*args, **config.kwargs, num_warps=config.num_warps,
                                                          num_stages=config.num_stages)
    return y.view(*x.shape[:-1], N)  # [M, N] -> [..., N]
