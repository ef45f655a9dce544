"""The SwiGLU feed-forward of a one-token step (decode: one row per sequence) in two Triton kernels, bound by reading
the weights once:

    y = swiglu_step(x, w_gate, w_up, w_down, residual)   # residual + (silu(x Wg^T) * (x Wu^T)) Wd^T

x [..., K]; w_gate, w_up [F, K]; w_down [N, F]; residual [..., N] or None; x and the weights of one dtype (fp16,
bf16 or fp32). The first kernel multiplies x by the gate's and the up projection's rows of one block of hidden units
at once and writes silu(g) * u from the fp32 products (one rounding, where the cuBLAS path rounds g and u first);
the second multiplies that by w_down and adds the residual before its one rounding. The cuBLAS path of the same step
(`model.SwiGLU` with merged gate|up weights: that GEMM, Inductor's silu x up kernel, the down GEMM with its split-K
reduce, the residual's add) launches five kernels. The reference is `model.SwiGLU`'s PyTorch path
(tests/test_swiglu_step.py); `benchmarks/bench_layer_kernels.py --mlp` times both at the 1.3b decode's shapes.

Each program owns BN output columns of BM (16 to 64) rows and walks all of K (no split-K reduction); x's few rows
come from L2 at every K step; more rows than 64 take one program row per 64. Launches (BN, BK, warps, stages, swap)
are explicit arguments, `DEFAULT_LAUNCH` the measured choice. Triton's interpreter (3.9) multiplies bf16 tiles
wrongly (fp16 and fp32 right): the CPU tests run those, the GPU tests bf16 too.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import _dot, cdiv, dot_mode, pow2

MAX_BM = 64  # the most rows of x one program multiplies (BM: the M side of the products, a power of two >= 16)

# (BN, BK, warps, stages, swap) per kernel: docs/kernels_notes.md, "Decode" (bench_layer_kernels --mlp)
DEFAULT_LAUNCH = {"gate_up": (64, 128, 4, 4, True), "down": (16, 256, 2, 4, False)}


@triton.jit
def _rows_dot(acc, x_ptr, w_ptr, rm, rn, M, N, K, k0, s_xm, s_wn, BK: tl.constexpr, EVEN_K: tl.constexpr,
              SWAP: tl.constexpr, DOT: tl.constexpr):
    """acc + x[rm, k0:k0+BK] @ w[rn, k0:k0+BK]^T (rows past M or N read as zeros): acc [BM, BN], or its transpose
    [BN, BM] when SWAP (the weight's rows as the products' M side, which wgmma takes from 64 up)."""
    rk = k0 + tl.arange(0, BK)
    if EVEN_K:
        x = tl.load(x_ptr + rm[:, None] * s_xm + rk[None, :], mask=rm[:, None] < M, other=0.0)
        w = tl.load(w_ptr + rn[:, None] * s_wn + rk[None, :], mask=rn[:, None] < N, other=0.0)
    else:
        x = tl.load(x_ptr + rm[:, None] * s_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[:, None] * s_wn + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
    if SWAP:
        acc += _dot(w, tl.trans(x), DOT)  # [BN, BK] x [BK, BM]
    else:
        acc += _dot(x, tl.trans(w), DOT)  # [BM, BK] x [BK, BN]
    return acc


@triton.jit
def _gate_up_kernel(x_ptr, wg_ptr, wu_ptr, h_ptr, M, F, K, s_xm, s_wg, s_wu, s_hm,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr, SWAP: tl.constexpr,
                    DOT: tl.constexpr):
    # program: hidden units [n0, n0 + BN) of rows [m0, m0 + BM): the gate's and the up projection's rows n
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    if SWAP:
        g = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        g = tl.zeros([BM, BN], dtype=tl.float32)
    u = tl.zeros_like(g)
    for k0 in range(0, K, BK):
        g = _rows_dot(g, x_ptr, wg_ptr, rm, rn, M, F, K, k0, s_xm, s_wg, BK, EVEN_K, SWAP, DOT)
        u = _rows_dot(u, x_ptr, wu_ptr, rm, rn, M, F, K, k0, s_xm, s_wu, BK, EVEN_K, SWAP, DOT)
    h = g * tl.sigmoid(g) * u
    if SWAP:
        h = tl.trans(h)  # [BN, BM] -> [BM, BN]
    tl.store(h_ptr + rm[:, None] * s_hm + rn[None, :], h.to(h_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < F))


@triton.jit
def _down_kernel(h_ptr, w_ptr, r_ptr, y_ptr, M, N, K, s_hm, s_wn, s_rm, s_ym,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr, SWAP: tl.constexpr,
                 DOT: tl.constexpr, HAS_R: tl.constexpr):
    # program: output columns [n0, n0 + BN) of rows [m0, m0 + BM), plus the residual's
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    if SWAP:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        acc = _rows_dot(acc, h_ptr, w_ptr, rm, rn, M, N, K, k0, s_hm, s_wn, BK, EVEN_K, SWAP, DOT)
    if SWAP:
        acc = tl.trans(acc)  # [BN, BM] -> [BM, BN]
    m2 = (rm[:, None] < M) & (rn[None, :] < N)
    if HAS_R:
        acc += tl.load(r_ptr + rm[:, None] * s_rm + rn[None, :], mask=m2, other=0.0).to(tl.float32)
    tl.store(y_ptr + rm[:, None] * s_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=m2)


def _launch(kernel, grid_n: int, M: int, launch: tuple, K: int, dtype, *args, **meta):
    BN, BK, warps, stages, swap = launch
    BM = min(MAX_BM, max(16, pow2(M)))
    kernel[(cdiv(grid_n, BN), cdiv(M, BM))](*args, BM=BM, BN=BN, BK=BK, EVEN_K=K % BK == 0, SWAP=swap,
                                             DOT=dot_mode(dtype), **meta, num_warps=warps, num_stages=stages)


def swiglu_step(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                residual: torch.Tensor | None = None, launch: dict | None = None) -> torch.Tensor:
    """residual + (silu(x Wg^T) * (x Wu^T)) Wd^T (module docstring); [..., N] in x's dtype.
    launch: {"gate_up": (BN, BK, warps, stages, swap), "down": (...)}, either or both (the rest: DEFAULT_LAUNCH)."""
    K = x.shape[-1]
    rows = x.reshape(-1, K)  # [..., K] -> [M, K] (a view for the decode's [B, 1, K])
    M, F, N = rows.shape[0], w_gate.shape[0], w_down.shape[0]
    ws = (w_gate, w_up, w_down)
    if (x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or any(w.dim() != 2 for w in ws)
            or w_gate.shape != (F, K) or w_up.shape != (F, K) or w_down.shape != (N, F)
            or any(w.dtype != x.dtype or w.stride(-1) != 1 for w in ws) or rows.stride(-1) != 1):
        raise ValueError(f"x, w_gate, w_up, w_down: expected x [..., K], w_gate and w_up [F, K], w_down [N, F], all "
                         f"fp16, bf16 or fp32 alike with a contiguous last dim; got x {tuple(x.shape)} {x.dtype}, "
                         + ", ".join(f"{tuple(w.shape)} {w.dtype}" for w in ws))
    if residual is not None and (residual.shape != (*x.shape[:-1], N) or residual.stride(-1) != 1):
        raise ValueError(f"residual: expected {(*x.shape[:-1], N)} with a contiguous last dim, got "
                         f"{tuple(residual.shape)}")
    lau = {**DEFAULT_LAUNCH, **(launch or {})}
    h = torch.empty((M, F), dtype=x.dtype, device=x.device)
    _launch(_gate_up_kernel, F, M, lau["gate_up"], K, x.dtype, rows, w_gate, w_up, h, M, F, K, rows.stride(0),
            w_gate.stride(0), w_up.stride(0), h.stride(0))
    r = rows if residual is None else residual.reshape(M, N)  # [..., N] -> [M, N] (unread when None)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    _launch(_down_kernel, N, M, lau["down"], F, x.dtype, h, w_down, r, y, M, N, F, h.stride(0), w_down.stride(0),
            r.stride(0), y.stride(0), HAS_R=residual is not None)
    return y.view(*x.shape[:-1], N)  # [M, N] -> [..., N]
