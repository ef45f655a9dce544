"""The products of a one-token step (decode: one row per sequence) that the fused layer path runs in Triton, each
bound by reading its weights once, with the element-wise work around them done in the same kernels:

    y = swiglu_step(x, w_gate, w_up, w_down, residual)    # residual + (silu(x Wg^T) * (x Wu^T)) Wd^T
    h = swiglu_step(h, w_gate, w_up, w_down, True, add=y, norm_weight=nw, eps=eps)   # s + FFN(RMSNorm(s)), s = h + y
    o = gated_linear_step(o, g, ln_weight, ln_bias, w_o, eps=eps)    # (LayerNorm(o) * gelu_tanh(g)) Wo^T

swiglu_step: the SwiGLU feed-forward in two kernels: the gate and up products of one block of hidden units at once,
silu(g) * u written from the fp32 products (one rounding, where the cuBLAS path rounds g and u first); then the down
product with the residual added before its one rounding. In a pre-norm block (`model.SwiGLU.sublayer`) the mixer's
residual sum and the FFN's RMSNorm happen inside them as well: the first kernel makes a pass over its rows for their
1/rms (x's few rows come from L2), and the second adds the sum back. The cuBLAS path of the same sub-layer (residual
+ RMSNorm, the merged gate|up GEMM, silu x up, the down GEMM with its split-K reduce, the residual's add) launches
six kernels. gated_linear_step: the TTT (M) layer's output (`layers.ttt.TTTLayer._out`): its post-LayerNorm and
GELU x gate in the product's operand (two passes over the rows for their mean and variance), one launch for three.
x and the weights of one dtype (fp16, bf16 or fp32), all math in fp32 with the roundings of the PyTorch paths'
operands; the references are those paths (tests/test_decode_products.py); `benchmarks/bench_layer_kernels.py --mlp`
times the FFN sub-layer against its cuBLAS path at the 1.3b decode's shapes.

Each program owns BN output columns of BM (16 to 64) rows and walks all of K (no split-K reduction); more rows than
64 take one program row per 64. Launches (BN, BK, warps, stages, swap[, one_pass]) are explicit arguments,
`DEFAULT_LAUNCH` the measured choice. one_pass (a normalised operand): the rows' sums are taken inside the products'
loop and the norm applied to the fp32 products after it, instead of a pass over the rows before the loop (which
the loop's weight stream waits for): RMS scales the products of s * nw by 1/rms; LayerNorm with z = nw (x gate)
takes three products of each weight tile, (x z) W * rstd - (z W) * rstd * mean + (nb (x gate)) W, with the
variance as E[x^2] - mean^2 in fp32. Triton's interpreter (3.9) multiplies bf16 tiles wrongly (fp16 and fp32
right): the CPU tests run those, the GPU tests bf16 too.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import _dot, _gelu_parts, cdiv, dot_mode, pow2

MAX_BM = 64  # the most rows of x one program multiplies (BM: the M side of the products, a power of two >= 16)
NO_NORM, RMS, LAYER = 0, 1, 2  # the operand's normalisation (NORM)

# (BN, BK, warps, stages, swap, one_pass) per kernel: docs/kernels_notes.md, "Decode" (bench_layer_kernels --mlp)
DEFAULT_LAUNCH = {"gate_up": (64, 128, 4, 4, True, True), "down": (16, 256, 2, 4, False, False),
                  "out": (16, 256, 2, 4, False, True)}


@triton.jit
def _x_tile(x_ptr, a_ptr, g_ptr, nw_ptr, nb_ptr, mean, rstd, rm, rk, M, K, s_xm, s_am, s_gm, EVEN_K: tl.constexpr,
            HAS_ADD: tl.constexpr, NORM: tl.constexpr, HAS_GATE: tl.constexpr):
    """The [BM, BK] operand x[rm, rk] in x's dtype (rows past M, columns past K zeros): + a[rm, rk] (the sum rounded to
    x's dtype); normalised with the rows' mean and 1/rms or 1/std and the weight nw (and bias nb: LayerNorm);
    times gelu_tanh(g[rm, rk]); one rounding after the sum and one at the end."""
    if EVEN_K:
        m = rm[:, None] < M
    else:
        m = (rm[:, None] < M) & (rk[None, :] < K)
    x = tl.load(x_ptr + rm[:, None] * s_xm + rk[None, :], mask=m, other=0.0)
    if HAS_ADD:
        x = (x.to(tl.float32) + tl.load(a_ptr + rm[:, None] * s_am + rk[None, :], mask=m, other=0.0)
             .to(tl.float32)).to(x.dtype)
    if NORM != 0 or HAS_GATE:
        z = x.to(tl.float32)
        if NORM != 0:
            z = (z - mean[:, None]) * rstd[:, None] * tl.load(nw_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)[None, :]
        if NORM == 2:
            z += tl.load(nb_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)[None, :]
        if HAS_GATE:
            gz, _ = _gelu_parts(tl.load(g_ptr + rm[:, None] * s_gm + rk[None, :], mask=m, other=0.0).to(tl.float32))
            z *= gz
        x = z.to(x.dtype)
    return x


@triton.jit
def _row_stats(x_ptr, a_ptr, rm, M, K, s_xm, s_am, eps, BM: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
               HAS_ADD: tl.constexpr, NORM: tl.constexpr):
    """(mean, 1/rms) of x's rows rm (+ a, rounded) for RMS, (mean, 1/std) for LAYER (a second pass for the
    variance about the mean), zeros and ones for NO_NORM; fp32 [BM] each."""
    mean = tl.zeros([BM], dtype=tl.float32)
    rstd = tl.zeros([BM], dtype=tl.float32) + 1.0
    if NORM != 0:
        s1 = tl.zeros([BM], dtype=tl.float32)
        if NORM == 2:
            for k0 in range(0, K, BK):
                s1 += tl.sum(_x_tile(x_ptr, a_ptr, x_ptr, x_ptr, x_ptr, mean, rstd, rm, k0 + tl.arange(0, BK), M, K,
                                     s_xm, s_am, 0, EVEN_K, HAS_ADD, 0, False).to(tl.float32), axis=1)
            mean = s1 / K
        s2 = tl.zeros([BM], dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            xt = _x_tile(x_ptr, a_ptr, x_ptr, x_ptr, x_ptr, mean, rstd, rm, rk, M, K, s_xm, s_am, 0, EVEN_K, HAS_ADD,
                         0, False).to(tl.float32) - mean[:, None]
            xt = tl.where(rk[None, :] < K, xt, 0.0)  # (the columns past K: zeros minus the mean)
            s2 += tl.sum(xt * xt, axis=1)
        rstd = 1.0 / tl.sqrt(s2 / K + tl.cast(eps, tl.float32))
    return mean, rstd


@triton.jit
def _w_tile(w_ptr, rn, rk, N, K, s_wn, EVEN_K: tl.constexpr):
    """w[rn, rk] [BN, BK] (rows past N, columns past K zeros)."""
    if EVEN_K:
        w = tl.load(w_ptr + rn[:, None] * s_wn + rk[None, :], mask=rn[:, None] < N, other=0.0)
    else:
        w = tl.load(w_ptr + rn[:, None] * s_wn + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
    return w


@triton.jit
def _acc_dot(acc, x, w, SWAP: tl.constexpr, DOT: tl.constexpr):
    """acc + x @ w^T: acc [BM, BN], or its transpose [BN, BM] when SWAP (the weight's rows as the product's M side,
    which wgmma takes from 64 up)."""
    if SWAP:
        acc += _dot(w, tl.trans(x), DOT)  # [BN, BK] x [BK, BM]
    else:
        acc += _dot(x, tl.trans(w), DOT)  # [BM, BK] x [BK, BN]
    return acc


@triton.jit
def _w_dot(acc, x, w_ptr, rn, rk, N, K, s_wn, EVEN_K: tl.constexpr, SWAP: tl.constexpr, DOT: tl.constexpr):
    """acc + x @ w[rn, rk]^T (`_acc_dot` of `_w_tile`)."""
    return _acc_dot(acc, x, _w_tile(w_ptr, rn, rk, N, K, s_wn, EVEN_K), SWAP, DOT)


@triton.jit
def _scale_rows(acc, v, SWAP: tl.constexpr):
    """acc's rows (its columns when SWAP) times v [BM]."""
    if SWAP:
        acc = acc * v[None, :]
    else:
        acc = acc * v[:, None]
    return acc


@triton.jit
def _gate_up_kernel(x_ptr, a_ptr, nw_ptr, wg_ptr, wu_ptr, h_ptr, M, F, K, s_xm, s_am, s_wg, s_wu, s_hm, eps,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr, SWAP: tl.constexpr,
                    DOT: tl.constexpr, HAS_ADD: tl.constexpr, NORM: tl.constexpr, ONE_PASS: tl.constexpr):
    # program: hidden units [n0, n0 + BN) of rows [m0, m0 + BM): the gate's and the up projection's rows n.
    # ONE_PASS (RMS): the rows' sums of squares taken in the products' loop and 1/rms applied to the fp32 products
    # after it (the operand s * nw rounded), instead of a pass over the rows before the loop
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    POST: tl.constexpr = ONE_PASS and NORM == 1
    if POST:
        mean = tl.zeros([BM], dtype=tl.float32)
        rstd = mean + 1.0
        ss = tl.zeros([BM], dtype=tl.float32)
    else:
        mean, rstd = _row_stats(x_ptr, a_ptr, rm, M, K, s_xm, s_am, eps, BM, BK, EVEN_K, HAS_ADD, NORM)
    if SWAP:
        g = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        g = tl.zeros([BM, BN], dtype=tl.float32)
    u = tl.zeros_like(g)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        if POST:
            xs = _x_tile(x_ptr, a_ptr, x_ptr, nw_ptr, nw_ptr, mean, rstd, rm, rk, M, K, s_xm, s_am, 0, EVEN_K,
                         HAS_ADD, 0, False).to(tl.float32)
            ss += tl.sum(xs * xs, axis=1)
            xt = (xs * tl.load(nw_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)[None, :]).to(x_ptr.dtype.element_ty)
        else:
            xt = _x_tile(x_ptr, a_ptr, x_ptr, nw_ptr, nw_ptr, mean, rstd, rm, rk, M, K, s_xm, s_am, 0, EVEN_K,
                         HAS_ADD, NORM, False)
        g = _w_dot(g, xt, wg_ptr, rn, rk, F, K, s_wg, EVEN_K, SWAP, DOT)
        u = _w_dot(u, xt, wu_ptr, rn, rk, F, K, s_wu, EVEN_K, SWAP, DOT)
    if POST:
        rstd = 1.0 / tl.sqrt(ss / K + tl.cast(eps, tl.float32))
        g = _scale_rows(g, rstd, SWAP)
        u = _scale_rows(u, rstd, SWAP)
    h = g * tl.sigmoid(g) * u
    if SWAP:
        h = tl.trans(h)  # [BN, BM] -> [BM, BN]
    tl.store(h_ptr + rm[:, None] * s_hm + rn[None, :], h.to(h_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < F))


@triton.jit
def _linear_kernel(x_ptr, g_ptr, nw_ptr, nb_ptr, w_ptr, r_ptr, ra_ptr, y_ptr, M, N, K, s_xm, s_gm, s_wn, s_rm, s_ram,
                   s_ym, eps, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
                   SWAP: tl.constexpr, DOT: tl.constexpr, NORM: tl.constexpr, HAS_GATE: tl.constexpr,
                   HAS_R: tl.constexpr, R_ADD: tl.constexpr, ONE_PASS: tl.constexpr):
    # program: output columns [n0, n0 + BN) of rows [m0, m0 + BM) of the (normalised, gated) x times w, plus the
    # residual's (r + ra rounded, with R_ADD). ONE_PASS (a norm): the rows' sums taken in the products' loop, the norm
    # applied to fp32 products after it: for LAYER, with z = nw (* gelu(g)), (x z) w^T * rstd - (z w^T) * rstd * mean
    # + (nb (* gelu(g))) w^T, three products of each weight tile; for RMS one, scaled by 1/rms
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    POST: tl.constexpr = ONE_PASS and NORM != 0
    if POST:
        mean = tl.zeros([BM], dtype=tl.float32)
        rstd = mean + 1.0
        s1 = tl.zeros([BM], dtype=tl.float32)
        s2 = tl.zeros([BM], dtype=tl.float32)
    else:
        mean, rstd = _row_stats(x_ptr, x_ptr, rm, M, K, s_xm, 0, eps, BM, BK, EVEN_K, False, NORM)
    if SWAP:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    acc_z = tl.zeros_like(acc)  # (ONE_PASS, LAYER: the products of z and of the bias part)
    acc_b = tl.zeros_like(acc)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        if POST:
            xs = _x_tile(x_ptr, x_ptr, g_ptr, nw_ptr, nb_ptr, mean, rstd, rm, rk, M, K, s_xm, 0, s_gm, EVEN_K, False,
                         0, False).to(tl.float32)
            s1 += tl.sum(xs, axis=1)
            s2 += tl.sum(xs * xs, axis=1)
            z = tl.broadcast_to(tl.load(nw_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)[None, :], (BM, BK))
            if HAS_GATE:
                m = (rm[:, None] < M) & (rk[None, :] < K)
                gz, _ = _gelu_parts(tl.load(g_ptr + rm[:, None] * s_gm + rk[None, :], mask=m, other=0.0)
                                    .to(tl.float32))
                z *= gz
            w = _w_tile(w_ptr, rn, rk, N, K, s_wn, EVEN_K)
            acc = _acc_dot(acc, (xs * z).to(x_ptr.dtype.element_ty), w, SWAP, DOT)
            if NORM == 2:
                acc_z = _acc_dot(acc_z, z.to(x_ptr.dtype.element_ty), w, SWAP, DOT)
                bz = tl.broadcast_to(tl.load(nb_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)[None, :], (BM, BK))
                if HAS_GATE:
                    bz *= gz
                acc_b = _acc_dot(acc_b, bz.to(x_ptr.dtype.element_ty), w, SWAP, DOT)
        else:
            xt = _x_tile(x_ptr, x_ptr, g_ptr, nw_ptr, nb_ptr, mean, rstd, rm, rk, M, K, s_xm, 0, s_gm, EVEN_K, False,
                         NORM, HAS_GATE)
            acc = _w_dot(acc, xt, w_ptr, rn, rk, N, K, s_wn, EVEN_K, SWAP, DOT)
    if POST:
        if NORM == 2:
            mean = s1 / K
            rstd = 1.0 / tl.sqrt(tl.maximum(s2 / K - mean * mean, 0.0) + tl.cast(eps, tl.float32))
            acc = _scale_rows(acc, rstd, SWAP) - _scale_rows(acc_z, rstd * mean, SWAP) + acc_b
        else:
            acc = _scale_rows(acc, 1.0 / tl.sqrt(s2 / K + tl.cast(eps, tl.float32)), SWAP)
    if SWAP:
        acc = tl.trans(acc)  # [BN, BM] -> [BM, BN]
    m2 = (rm[:, None] < M) & (rn[None, :] < N)
    if HAS_R:
        r = tl.load(r_ptr + rm[:, None] * s_rm + rn[None, :], mask=m2, other=0.0)
        if R_ADD:
            r = (r.to(tl.float32) + tl.load(ra_ptr + rm[:, None] * s_ram + rn[None, :], mask=m2, other=0.0)
                 .to(tl.float32)).to(r.dtype)
        acc += r.to(tl.float32)
    tl.store(y_ptr + rm[:, None] * s_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=m2)


def rows_tile(M: int, stages: int) -> tuple[int, int]:
    """(BM, stages) for M rows at a launch tuned at 16: BM the power of two >= M in [16, MAX_BM], one pipeline stage
    fewer per doubling of BM past 16 (on the H100 with Triton 3.6, at BM 64, the benchmark's down and out launches
    at BK 512 and 3 stages asked for ~250 KB of shared memory, more than an SM's 227 KB)."""
    BM = min(MAX_BM, max(16, pow2(M)))
    return BM, max(1, stages - (BM // 16).bit_length() + 1)


def _launch(kernel, grid_n: int, M: int, launch: tuple, K: int, dtype, *args, **meta):
    BN, BK, warps, stages, swap, *one_pass = launch  # (one_pass: optional, default False)
    BM, stages = rows_tile(M, stages)
    kernel[(cdiv(grid_n, BN), cdiv(M, BM))](*args, BM=BM, BN=BN, BK=BK, EVEN_K=K % BK == 0, SWAP=swap,
                                             DOT=dot_mode(dtype), ONE_PASS=bool(one_pass and one_pass[0]), **meta,
                                             num_warps=warps, num_stages=stages)


def swiglu_step(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                residual: torch.Tensor | bool | None = None, *, add: torch.Tensor | None = None,
                norm_weight: torch.Tensor | None = None, eps: float = 1e-6, launch: dict | None = None) -> torch.Tensor:
    """residual + (silu(z Wg^T) * (z Wu^T)) Wd^T with z = x, or s = x + add (rounded to x's dtype) when add is given,
    RMSNorm'd with norm_weight and eps when given (fp32 math, rounded as `layers.norms.RMSNorm` rounds); residual a
    tensor [..., N], True for s itself (a pre-norm block's s + FFN(norm(s)): its residual add and RMSNorm inside the
    kernels, no launch of their own), or None. [..., N] in x's dtype (module docstring).
    launch: {"gate_up": (BN, BK, warps, stages, swap[, one_pass]), "down": (...)}, either or both (the rest:
    DEFAULT_LAUNCH)."""
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
    if add is not None and (add.shape != x.shape or add.stride(-1) != 1):
        raise ValueError(f"add: expected x's shape {tuple(x.shape)} with a contiguous last dim, got {tuple(add.shape)}")
    if norm_weight is not None and norm_weight.shape != (K,):
        raise ValueError(f"norm_weight: expected [{K}], got {tuple(norm_weight.shape)}")
    if residual is True and N != K:
        raise ValueError(f"residual=True: the FFN's input is its residual, so w_down needs {K} rows, got {N}")
    if isinstance(residual, torch.Tensor) and (residual.shape != (*x.shape[:-1], N) or residual.stride(-1) != 1):
        raise ValueError(f"residual: expected {(*x.shape[:-1], N)} with a contiguous last dim, got "
                         f"{tuple(residual.shape)}")
    lau = {**DEFAULT_LAUNCH, **(launch or {})}
    a = rows if add is None else add.reshape(M, K)  # [..., K] -> [M, K] (unread when None)
    nw = rows if norm_weight is None else norm_weight
    h = torch.empty((M, F), dtype=x.dtype, device=x.device)
    _launch(_gate_up_kernel, F, M, lau["gate_up"], K, x.dtype, rows, a, nw, w_gate, w_up, h, M, F, K, rows.stride(0),
            a.stride(0), w_gate.stride(0), w_up.stride(0), h.stride(0), float(eps), HAS_ADD=add is not None,
            NORM=NO_NORM if norm_weight is None else RMS)
    r = residual.reshape(M, N) if isinstance(residual, torch.Tensor) else rows  # [..., N] -> [M, N]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    _launch(_linear_kernel, N, M, lau["down"], F, x.dtype, h, h, h, h, w_down, r, a, y, M, N, F, h.stride(0), 0,
            w_down.stride(0), r.stride(0), a.stride(0), y.stride(0), 0.0, NORM=NO_NORM, HAS_GATE=False,
            HAS_R=residual is not None, R_ADD=residual is True and add is not None)
    return y.view(*x.shape[:-1], N)  # [M, N] -> [..., N]


def gated_linear_step(x: torch.Tensor, gate: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                      w: torch.Tensor, *, eps: float = 1e-6, launch: tuple | None = None) -> torch.Tensor:
    """(LayerNorm(x) * gelu_tanh(gate)) @ w^T in one kernel (module docstring): x, gate [..., K] (last dims
    contiguous; gate may be a column range of a wider tensor), ln_weight, ln_bias [K], w [N, K], all of x's dtype
    (fp16, bf16 or fp32); the LayerNorm and the gate in fp32, the operand rounded once. [..., N] in x's dtype.
    launch: (BN, BK, warps, stages, swap[, one_pass]), default DEFAULT_LAUNCH["out"]."""
    K = x.shape[-1]
    rows, g = x.reshape(-1, K), gate.reshape(-1, K)  # [..., K] -> [M, K] (views for the decode's [B, 1, K])
    M, N = rows.shape[0], w.shape[0]
    if (x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or gate.shape != x.shape or w.dim() != 2
            or w.shape[1] != K or ln_weight.shape != (K,) or ln_bias.shape != (K,)
            or any(t.dtype != x.dtype for t in (gate, w)) or any(t.stride(-1) != 1 for t in (rows, g, w))):
        raise ValueError(f"x, gate, ln_weight, ln_bias, w: expected x and gate [..., K], ln_weight and ln_bias [K], "
                         f"w [N, K], x, gate and w fp16, bf16 or fp32 alike with a contiguous last dim; got x "
                         f"{tuple(x.shape)} {x.dtype}, gate {tuple(gate.shape)} {gate.dtype}, ln "
                         f"{tuple(ln_weight.shape)} {tuple(ln_bias.shape)}, w {tuple(w.shape)} {w.dtype}")
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    _launch(_linear_kernel, N, M, launch or DEFAULT_LAUNCH["out"], K, x.dtype, rows, g, ln_weight, ln_bias, w, y, y,
            y, M, N, K, rows.stride(0), g.stride(0), w.stride(0), 0, 0, y.stride(0), float(eps), NORM=LAYER,
            HAS_GATE=True, HAS_R=False, R_ADD=False)
    return y.view(*x.shape[:-1], N)  # [M, N] -> [..., N]
