"""TTT-Linear kernels in Gluon, with layouts chosen so that a token's algebra stays in one warp.

`_fwd_kernel`: the forward walk (`chunk.ttt_linear_fwd_kernel`: with OUT the fused forward, the walk and each
mini-batch's outputs; without, the split forward's walk, storing G and the checkpoints for
`chunk._fwd_out_kernel`'s outputs); `_pre_kernel`: the
split backward's pre pass (`bwd_split._pre_kernel`: per checkpoint group, what needs no dW'); `_chain_kernel`: its
full chain (`bwd_split._chain_kernel`: the mini-batches N_LO .. N_HI - 1 in reverse, carrying dW, dc; stores dZ,
dk_b, dgy, dlr_b and dtau's partial sum per checkpoint group). Same launch contracts, inputs, outputs and formulas
as those Triton kernels.

Why a second form: in the Triton kernels the compiler keeps a mini-batch's [16, d] tiles in the tensor-core result
layout, where each token's d values sit in four warps, so every per-token sum of the LayerNorm algebra and every
load and store of a tile crosses warps through shared memory and a barrier (35 barriers a mini-batch in the chain,
21 in the walk, offline sm_90). Here the tiles live in R, a layout with whole tokens per warp: their row sums are
warp shuffles, their loads and stores need no conversion, and only the products cross layouts, on mma.sync:
  walk:  Z = K W + c (to R through shared memory);  W += K^T (-e_b G) with W in registers
  fused, pre: also Q W + c, Q K^T, P G (Zb to R); pre: dZb G^T, P^T dZb, dZb W^T + dA K, dA^T Q (stored from the
         products' layout)
  chain: KdW = K dW + dc (to R);  dk_b = -(e_b G) dW^T (stored from the products' layout);
         dW += Q^T dZb + K^T dZ with dW in registers
(fp32 accumulators, warps down the weights' rows; the bias's column sums in the products' layout, where a column
stays in a warp). The 16-bit operands sit in shared memory (the products read the weights rounded to 16 bits, as
the Triton kernels' do: a 16-bit copy rewritten after each update), each double-buffered by the mini-batch's parity,
so that one barrier a mini-batch orders their reuse (a buffer written in mini-batch i was last read in i - 2, which
every warp finished before the barrier of i - 1). 16-bit inputs (bf16, fp16), head dim 64 (4 warps) or 128 (8
warps), mini-batch 16: `check`.

Tested on the CPU by running this source in Triton's interpreter through `tests/gluon_shim.py`; layouts and
shared memory only by the offline sm_90 compile and on a GPU (tests marked `gpu`).
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from ..gluon_utils import _cta_barrier, _row
from ..triton_utils import _add2, _add3, _offsets

HEAD_DIMS = (64, 128)
MB = 16


def warps(d: int) -> int:
    """Both kernels' warps at head dim d: the [d, d] fp32 weights (or their gradient) in registers, 32 values a
    thread at 4 warps (d 64) or 8 (d 128)."""
    return 4 if d <= 64 else 8


WARPS = (4, 8)  # the warps a launch may ask for (`launch`)


def walk_warps(d: int, split: bool) -> int:
    """The forward walk's default warps at head dim d: 8 at d 64 when it runs split (the walk alone, few
    programs: H100, the 125m 8k training step 286k against 281k tok/s, 1.3b prefill at 32k 152k against 143k with
    the Triton walk; docs/kernels_notes.md), else `warps(d)`."""
    return 8 if split else warps(d)


def launch(d: int, num_warps: int | None = None, arg: str = "warps") -> dict:
    """A kernel's launch options at head dim d: num_warps (None: `warps(d)`; else one of WARPS, a one-line error
    naming `arg` otherwise) and, for 8 warps at d 64, registers capped at 128 a thread, so that two programs (16
    warps) share an SM: uncapped they take 169-228 and only one fits (offline sm_90, bf16; at the cap the pre pass
    spills 144 B, the chain 16, the post pass 8, the forward nothing). At 8 warps and d 64 the [d, d] updates' warps
    split 4 x 2 (`_mma_layout`)."""
    if num_warps is None:
        num_warps = warps(d)
    check_warps(num_warps, arg)
    return dict(num_warps=num_warps, **({"maxnreg": 128} if d == 64 and num_warps == 8 else {}))


def check_warps(num_warps, arg: str) -> None:
    """A one-line error naming `arg` unless num_warps is one of WARPS."""
    if num_warps not in WARPS:
        raise ValueError(f"{arg}: the Gluon kernels run at {' or '.join(map(str, WARPS))} warps, got {num_warps!r}")


def takes(d: int, mini_batch: int, dtype: torch.dtype, dot_mode: int | None) -> bool:
    """Whether these kernels are written for head dim d, this mini-batch, dtype and product precision."""
    return d in HEAD_DIMS and mini_batch == MB and dtype in (torch.bfloat16, torch.float16) and \
        dot_mode in (None, 2, 3)


def check(d: int, mini_batch: int, dtype: torch.dtype, dot_mode: int | None, choice: str = "bwd='split_gluon'") -> None:
    """The shapes and dtypes these kernels take; a one-line error naming the kernel choice otherwise."""
    if not takes(d, mini_batch, dtype, dot_mode):
        raise ValueError(f"LinearKernels({choice}): takes head dim {HEAD_DIMS}, mini-batch {MB}, bf16 or fp16 inputs "
                         f"and their own product precision; got d {d}, mini-batch {mini_batch}, {dtype}, dot_mode "
                         f"{dot_mode}")


@gluon.constexpr_function
def _token_layout(D, MB, num_warps):
    """R: [MB, D] tiles with MB / num_warps whole tokens per warp (a token's D values in 32 * num_warps / MB of its
    lanes), so that a per-token sum is shuffles within the warp."""
    rw = MB // num_warps
    return gl.BlockedLayout([1, D * rw // 32], [rw, 32 // rw], [num_warps, 1], [1, 0])


@gluon.constexpr_function
def _mma_layout(num_warps, rows, D):
    """mma.sync's (m16n8k16) accumulator layout, the warps across the columns (the [16, d] and [16, 16] products)
    or, `rows`, down the rows of the [D, D] updates, 16 rows a warp at most (more warps than D / 16 go across
    the columns too, so that no warp repeats another's part)."""
    wm = min(num_warps, D // 16) if rows else 1
    return gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[wm, num_warps // wm], instr_shape=[16, 8])


@gluon.constexpr_function
def _operand(parent, index):
    """The layout of mma.sync's 16-bit operand A (index 0) or B (1) for the accumulator layout `parent`."""
    return gl.DotOperandLayout(operand_index=index, parent=parent, k_width=2)


@gluon.jit
def _tile(ptr, off, rt, rd, t0, L, D: gl.constexpr):
    """The [MB, D] tile at element offsets `off` of the tokens t0 + rt (rows past the row's length L as 0)."""
    return gl.load(ptr + off, mask=((t0 + rt) < L)[:, None] & (rd[None, :] < D), other=0.0)


@gluon.jit
def _index_vectors(R: gl.constexpr, LP: gl.constexpr, LW: gl.constexpr, MB: gl.constexpr, D: gl.constexpr):
    """The index vectors every kernel here declares: tokens and features in the token layout R (rt, rd), the
    products' rows, columns and features in LP (riP, rjP, rdP), the updates' rows and columns in LW (riW, rjW)."""
    return (gl.arange(0, MB, layout=gl.SliceLayout(1, R)), gl.arange(0, D, layout=gl.SliceLayout(0, R)),
            gl.arange(0, MB, layout=gl.SliceLayout(1, LP)), gl.arange(0, MB, layout=gl.SliceLayout(0, LP)),
            gl.arange(0, D, layout=gl.SliceLayout(0, LP)), gl.arange(0, D, layout=gl.SliceLayout(1, LW)),
            gl.arange(0, D, layout=gl.SliceLayout(0, LW)))


@gluon.jit
def _ln_consts(lnw_ptr, lnb_ptr, tau_ptr, hi, rd, D: gl.constexpr, MB: gl.constexpr):
    """Head hi's inner LN weight and bias (fp32, in rd's layout) and tau_b."""
    return (gl.load(lnw_ptr + hi * D + rd).to(gl.float32), gl.load(lnb_ptr + hi * D + rd).to(gl.float32),
            gl.load(tau_ptr + MB - 1).to(gl.float32))


@gluon.jit
def _group_of(span_ptr, H, NCK, G_LO, NG, GROUP: gl.constexpr, MB: gl.constexpr):
    """This program of a per-group launch over groups [G_LO, G_LO + NG): its (row, head) index pid, its group's
    partial-sum row pid * NCK + g, row bi and head hi, the row's first token, length and first checkpoint slot, its
    group g and the group's mini-batches n0 .. n1 - 1 (none where a shorter row has no such group)."""
    pid = gl.program_id(0) // NG
    g = G_LO + gl.program_id(0) % NG
    start, L, slot = _row(span_ptr, pid // H)
    n0 = g * GROUP
    return pid, pid * NCK + g, pid // H, pid % H, start, L, slot, g, n0, gl.minimum(n0 + GROUP, (L + MB - 1) // MB)


@gluon.jit
def _checkpoint_in(ckw_ptr, ckc_ptr, ck, present, riW, rjW, rdP, D: gl.constexpr):
    """Checkpoint ck: W [D, D] (the updates' layout) and c [D] (the products'), zeros where not `present`."""
    W = gl.load(ckw_ptr + ck * D * D + riW[:, None] * D + rjW[None, :], mask=(riW[:, None] * 0 + present) != 0,
                other=0.0)
    return W, gl.load(ckc_ptr + ck * D + rdP, mask=(rdP * 0 + present) != 0, other=0.0)


@gluon.jit
def _normalize_rows(z, D: gl.constexpr, EPS: gl.constexpr):
    """Row-wise LayerNorm of z [MB, D] (token layout) without weight and bias: x^ and 1/std."""
    zc = z - (gl.sum(z, axis=1) / D)[:, None]
    rstd = 1.0 / gl.sqrt(gl.sum(zc * zc, axis=1) / D + EPS)
    return zc * rstd[:, None], rstd


@gluon.jit
def _ln_l2_grad_rows(z, v, k, gam, bet, D: gl.constexpr, EPS: gl.constexpr):
    """G, the gradient of the inner loss 0.5 ||LN(z) - (v - k)||^2 (`triton_utils._ln_l2_grad`), row-wise in the
    token layout, with x^ and 1/std."""
    xh, rstd = _normalize_rows(z, D, EPS)
    gy = gam[None, :] * (gam[None, :] * xh + bet[None, :] - (v - k))
    sg, sgx = gl.reduce((gy, gy * xh), 1, _add2)
    return (gy - (sg / D)[:, None] - xh * (sgx / D)[:, None]) * rstd[:, None], xh, rstd


@gluon.jit
def _update(W, c, k_s, eg_s, eg32_s, AW: gl.constexpr, BW: gl.constexpr, LP: gl.constexpr):
    """The mini-batch's weight update from its K and -e_b G (16-bit) and e_b G (fp32) in shared memory: W - K^T
    (e_b G) (W: the fp32 accumulator in registers) and c - sum e_b G (in the products' layout)."""
    W = mma_v2(k_s.permute((1, 0)).load(AW), eg_s.load(BW), W)
    return W, c - gl.sum(eg32_s.load(LP), axis=0)


@gluon.jit
def _chain_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, xh_ptr, rs_ptr, dg0_ptr, dzb_ptr, dwT_ptr, dcT_ptr,
    dz_ptr, dkb_ptr, dgy_ptr, dlrb_ptr, dw0_ptr, dc0_ptr, dtau_ptr, span_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h, sc_b,
    H, NCK, T, N_LO, N_HI, IN_LIM,
    D: gl.constexpr, MB: gl.constexpr, GROUP: gl.constexpr, num_warps: gl.constexpr,
):
    OPT: gl.constexpr = q_ptr.dtype.element_ty
    R: gl.constexpr = _token_layout(D, MB, num_warps)
    LP: gl.constexpr = _mma_layout(num_warps, False, D)  # the [16, d] products
    LW: gl.constexpr = _mma_layout(num_warps, True, D)  # the [d, d] updates
    AP: gl.constexpr = _operand(LP, 0)
    BP: gl.constexpr = _operand(LP, 1)
    AW: gl.constexpr = _operand(LW, 0)
    BW: gl.constexpr = _operand(LW, 1)
    ST: gl.constexpr = gl.NVMMASharedLayout.get_default_for([MB, D], OPT)
    SD: gl.constexpr = gl.NVMMASharedLayout.get_default_for([D, D], OPT)
    k_s = gl.allocate_shared_memory(OPT, [2, MB, D], ST)
    q_s = gl.allocate_shared_memory(OPT, [2, MB, D], ST)
    dzb_s = gl.allocate_shared_memory(OPT, [2, MB, D], ST)
    dz_s = gl.allocate_shared_memory(OPT, [2, MB, D], ST)
    eg_s = gl.allocate_shared_memory(OPT, [2, MB, D], ST)
    wh_s = gl.allocate_shared_memory(OPT, [2, D, D], SD)  # dW rounded to 16 bits (the products' operand)
    # fp32 tiles handed between the layouts: K dW + dc (LP -> R) and dZb + dZ (R -> LP, for dc's column sums)
    SF: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    kw_s = gl.allocate_shared_memory(gl.float32, [2, MB, D], SF)
    zs_s = gl.allocate_shared_memory(gl.float32, [2, MB, D], SF)

    pid = gl.program_id(0)
    bi = pid // H
    hi = pid % H
    start, L, _slot = _row(span_ptr, bi)
    n_hi = gl.minimum(N_HI, (L + MB - 1) // MB)  # this segment's mini-batches of this row: N_LO .. n_hi - 1
    rt, rd, rtP, _rjP, rdP, riW, rjW = _index_vectors(R, LP, LW, MB, D)
    gam, bet, tau_b = _ln_consts(lnw_ptr, lnb_ptr, tau_ptr, hi, rd, D, MB)
    woff = riW[:, None] * D + rjW[None, :]
    # the final state's gradient (IN_LIM = D * D), or none (0: zeros, nothing read); dc in the products' layout (its
    # column sums stay in a warp there)
    dW = gl.load(dwT_ptr + pid * D * D + woff, mask=woff < IN_LIM, other=0.0)
    dc = gl.load(dcT_ptr + pid * D + rdP, mask=rdP * D < IN_LIM, other=0.0)
    dtau_b = gl.zeros([MB], gl.float32, gl.SliceLayout(1, R))

    in_base, in_off, lr_base, _ob, _oo = _offsets(bi, hi, start, rt, rd, s_b, s_t, s_h, l_b, l_t, l_h, 0, 0, 0)  # (no outputs)
    sc_t = (bi * sc_b + hi) * T + start  # scratch rows [B*H or H, T, D]: this row's first token
    sc_off = (sc_t + rt)[:, None] * D + rd[None, :]
    scP = (sc_t + rtP)[:, None] * D + rdP[None, :]
    t0 = gl.maximum(n_hi - 1, 0) * MB  # (no mini-batch of this row here: loads nothing used)
    tm = t0 + rt < L
    qn = _tile(q_ptr + in_base + t0 * s_t, in_off, rt, rd, t0, L, D)
    kn = _tile(k_ptr + in_base + t0 * s_t, in_off, rt, rd, t0, L, D)
    vn = _tile(v_ptr + in_base + t0 * s_t, in_off, rt, rd, t0, L, D)
    lrn = gl.load(lr_ptr + lr_base + (t0 + rt) * l_t, mask=tm, other=0.0)
    xhn = _tile(xh_ptr + t0 * D, sc_off, rt, rd, t0, L, D).to(gl.float32)
    dg0n = _tile(dg0_ptr + t0 * D, sc_off, rt, rd, t0, L, D).to(gl.float32)
    dzbn = _tile(dzb_ptr + t0 * D, sc_off, rt, rd, t0, L, D).to(gl.float32)
    rsn = gl.load(rs_ptr + sc_t + t0 + rt, mask=tm, other=0.0)
    wh_s.index(0).store(dW.to(OPT))
    for ni in range(n_hi - N_LO):
        n = n_hi - 1 - ni
        p = ni % 2
        t0 = n * MB
        full = t0 + MB <= L  # a partial last mini-batch commits nothing: no carried-weight terms
        tm = t0 + rt < L
        m2 = tm[:, None] & (rd[None, :] < D)
        q16 = qn
        k16 = kn
        v = vn.to(gl.float32)
        lr = lrn.to(gl.float32)
        xh = xhn
        dG0 = dg0n
        dZb = dzbn
        rstd = rsn
        t1 = gl.maximum(n - 1, N_LO) * MB  # the next mini-batch's loads, issued before this one's math
        tm1 = t1 + rt < L
        qn = _tile(q_ptr + in_base + t1 * s_t, in_off, rt, rd, t1, L, D)
        kn = _tile(k_ptr + in_base + t1 * s_t, in_off, rt, rd, t1, L, D)
        vn = _tile(v_ptr + in_base + t1 * s_t, in_off, rt, rd, t1, L, D)
        lrn = gl.load(lr_ptr + lr_base + (t1 + rt) * l_t, mask=tm1, other=0.0)
        xhn = _tile(xh_ptr + t1 * D, sc_off, rt, rd, t1, L, D).to(gl.float32)
        dg0n = _tile(dg0_ptr + t1 * D, sc_off, rt, rd, t1, L, D).to(gl.float32)
        dzbn = _tile(dzb_ptr + t1 * D, sc_off, rt, rd, t1, L, D).to(gl.float32)
        rsn = gl.load(rs_ptr + sc_t + t1 + rt, mask=tm1, other=0.0)

        k_s.index(p).store(k16)
        q_s.index(p).store(q16)
        dzb_s.index(p).store(dZb.to(OPT))
        _cta_barrier()  # this mini-batch's operands and the last update's dW copy are written
        kw_s.index(p).store(mma_v2(k_s.index(p).load(AP), wh_s.index(p).load(BP),
                                   gl.zeros([MB, D], gl.float32, LP) + dc[None, :]))
        _cta_barrier()
        kdw = kw_s.index(p).load(R)

        # the inner gradient G, recomputed from the stored LN statistics (row-wise, no product)
        k = k16.to(gl.float32)
        gy = gam[None, :] * (gam[None, :] * xh + bet[None, :] - (v - k))
        sg, sgx = gl.reduce((gy, gy * xh), 1, _add2)
        mgx = sgx / D
        G = (gy - (sg / D)[:, None] - xh * mgx[:, None]) * rstd[:, None]
        tau_e = gl.where(full, tau_b, 0.0)
        eb = tau_e * lr
        S = gl.sum(kdw * G, axis=1)
        dG = dG0 - eb[:, None] * kdw
        dtau_b += gl.where(full, -lr * S, 0.0)
        if n % GROUP == 0:  # the group's first mini-batch, walked last: the group's part of dtau_b
            gl.store(dtau_ptr + (pid * NCK + n // GROUP) * MB + rt, gl.where(rt == MB - 1, gl.sum(dtau_b, axis=0), 0.0))
            dtau_b = gl.zeros([MB], gl.float32, gl.SliceLayout(1, R))
        # G = LN-L2 gradient at Z = K W + c: its backward (`triton_utils._ln_l2_grad_bwd`)
        sg, sgx, sgG = gl.reduce((dG, dG * xh, dG * G), 1, _add3)
        dgy = (dG - (sg / D)[:, None] - xh * (sgx / D)[:, None]) * rstd[:, None]
        dxh = (-mgx[:, None] * dG - (sgx / D)[:, None] * gy) * rstd[:, None] + (gam * gam)[None, :] * dgy
        sd, sdx = gl.reduce((dxh, dxh * xh), 1, _add2)
        dZ = (dxh - (sd / D)[:, None] - xh * (sdx / D)[:, None]) * rstd[:, None] - (sgG * rstd / D)[:, None] * xh
        so = sc_off + t0 * D
        gl.store(dz_ptr + so, dZ, mask=m2)
        gl.store(dgy_ptr + so, dgy, mask=m2)
        gl.store(dlrb_ptr + sc_t + t0 + rt, -tau_e * S, mask=tm)
        dz_s.index(p).store(dZ.to(OPT))
        eg_s.index(p).store((eb[:, None] * G).to(OPT))
        zs_s.index(p).store(dZb + dZ)
        _cta_barrier()  # dZ, e_b G and dZb + dZ written
        dkb = mma_v2(eg_s.index(p).load(AP), wh_s.index(p).permute((1, 0)).load(BP), gl.zeros([MB, D], gl.float32, LP))
        gl.store(dkb_ptr + scP + t0 * D, -dkb, mask=(t0 + rtP < L)[:, None] & (rdP[None, :] < D))
        dW = mma_v2(q_s.index(p).permute((1, 0)).load(AW), dzb_s.index(p).load(BW), dW)
        dW = mma_v2(k_s.index(p).permute((1, 0)).load(AW), dz_s.index(p).load(BW), dW)
        dc += gl.sum(zs_s.index(p).load(LP), axis=0)
        wh_s.index(1 - p).store(dW.to(OPT))  # read from the next mini-batch's barrier on
    gl.store(dw0_ptr + pid * D * D + woff, dW)
    gl.store(dc0_ptr + pid * D + rdP, dc)


@gluon.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, w0_ptr, c0_ptr, o_ptr, wT_ptr, cT_ptr, ckw_ptr, ckc_ptr,
    gs_ptr, span_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h, o_b, o_t, o_h, sc_b, w_sb, c_sb,
    H, T,
    D: gl.constexpr, MB: gl.constexpr, GROUP: gl.constexpr, SAVE: gl.constexpr, OUT: gl.constexpr,
    EPS: gl.constexpr, num_warps: gl.constexpr,
):
    """The forward walk (`chunk.ttt_linear_fwd_kernel`): per mini-batch the inner forward, G and the update; OUT:
    also its outputs, o = q + LN(Zb) gam + bet, Zb = Q W + c - P G, P = E * (Q K^T + 1) (causal; the rows from the
    first non-finite row of G on are NaN, as `chunk._output` makes them), else G stored (fp32 rows [B*H or H, T, d])
    for `chunk._fwd_out_kernel`; the checkpoints when SAVE."""
    OPT: gl.constexpr = k_ptr.dtype.element_ty
    R: gl.constexpr = _token_layout(D, MB, num_warps)
    LP: gl.constexpr = _mma_layout(num_warps, False, D)  # the [16, d] products
    LW: gl.constexpr = _mma_layout(num_warps, True, D)  # the [d, d] updates
    AP: gl.constexpr = _operand(LP, 0)
    BP: gl.constexpr = _operand(LP, 1)
    AW: gl.constexpr = _operand(LW, 0)
    BW: gl.constexpr = _operand(LW, 1)
    ST: gl.constexpr = gl.NVMMASharedLayout.get_default_for([MB, D], OPT)
    SD: gl.constexpr = gl.NVMMASharedLayout.get_default_for([D, D], OPT)
    SF: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    k_s = gl.allocate_shared_memory(OPT, [2, MB, D], ST)
    eg_s = gl.allocate_shared_memory(OPT, [2, MB, D], ST)  # -e_b G
    wh_s = gl.allocate_shared_memory(OPT, [2, D, D], SD)  # W rounded to 16 bits (the products' operand)
    z_s = gl.allocate_shared_memory(gl.float32, [2, MB, D], SF)  # Z = K W + c, products' layout -> R
    eg32_s = gl.allocate_shared_memory(gl.float32, [2, MB, D], SF)  # e_b G, R -> the products' layout (c's sums)
    if OUT:
        SE: gl.constexpr = gl.NVMMASharedLayout.get_default_for([MB, MB], OPT)
        q_s = gl.allocate_shared_memory(OPT, [2, MB, D], ST)
        g_s = gl.allocate_shared_memory(OPT, [2, MB, D], ST)  # G, its non-finite rows as 0 (P G's operand)
        p_s = gl.allocate_shared_memory(OPT, [2, MB, MB], SE)  # P
        zb_s = gl.allocate_shared_memory(gl.float32, [2, MB, D], SF)  # Zb, products' layout -> R
        # which tokens' G is finite (1.0 / 0.0), to every warp at a barrier the walk has anyway (the first bad row's
        # index as a reduction across the warps was two barriers of its own)
        ok_s = gl.allocate_shared_memory(gl.float32, [MB], gl.SwizzledSharedLayout(1, 1, 1, [0]))

    pid = gl.program_id(0)
    bi = pid // H
    hi = pid % H
    start, L, slot = _row(span_ptr, bi)
    nmb = (L + MB - 1) // MB
    rt, rd, riP, rjP, rdP, riW, rjW = _index_vectors(R, LP, LW, MB, D)
    gam, bet, tau_b = _ln_consts(lnw_ptr, lnb_ptr, tau_ptr, hi, rd, D, MB)
    tau_i = gl.load(tau_ptr + riP).to(gl.float32)
    causal = riP[:, None] >= rjP[None, :]
    woff = riW[:, None] * D + rjW[None, :]
    W = gl.load(w0_ptr + bi * w_sb + hi * D * D + woff)  # (w_sb 0: one W0 for every row)
    c = gl.load(c0_ptr + bi * c_sb + hi * D + rdP)

    in_base, in_off, lr_base, out_base, out_off = _offsets(bi, hi, start, rt, rd, s_b, s_t, s_h, l_b, l_t, l_h,
                                                           o_b, o_t, o_h)
    sc_off = ((bi * sc_b + hi) * T + start + rt)[:, None] * D + rd[None, :]  # G rows of this (row, head)
    if OUT:
        qn = _tile(q_ptr + in_base, in_off, rt, rd, 0, L, D)
    kn = _tile(k_ptr + in_base, in_off, rt, rd, 0, L, D)
    vn = _tile(v_ptr + in_base, in_off, rt, rd, 0, L, D)
    lrn = gl.load(lr_ptr + lr_base + rt * l_t, mask=rt < L, other=0.0)
    wh_s.index(0).store(W.to(OPT))
    for n in range(nmb):
        p = n % 2
        if SAVE:
            if n % GROUP == 0:  # the weights at the start of the group: its checkpoint
                ck = (slot + n // GROUP) * H + hi
                gl.store(ckw_ptr + ck * D * D + woff, W)
                gl.store(ckc_ptr + ck * D + rdP, c)
        t0 = n * MB
        m2 = ((t0 + rt) < L)[:, None] & (rd[None, :] < D)
        tau_e = gl.where(t0 + MB <= L, tau_b, 0.0)  # a partial last mini-batch leaves the weights uncommitted
        k16 = kn
        v = vn.to(gl.float32)
        lr = lrn.to(gl.float32)
        t1 = gl.minimum(n + 1, nmb - 1) * MB  # the next mini-batch's loads, issued before this one's math
        if OUT:
            q16 = qn
            qn = _tile(q_ptr + in_base + t1 * s_t, in_off, rt, rd, t1, L, D)
        kn = _tile(k_ptr + in_base + t1 * s_t, in_off, rt, rd, t1, L, D)
        vn = _tile(v_ptr + in_base + t1 * s_t, in_off, rt, rd, t1, L, D)
        lrn = gl.load(lr_ptr + lr_base + (t1 + rt) * l_t, mask=(t1 + rt) < L, other=0.0)

        k_s.index(p).store(k16)
        if OUT:
            q_s.index(p).store(q16)
        _cta_barrier()  # this mini-batch's operands and the last update's W copy are written
        cP = gl.zeros([MB, D], gl.float32, LP) + c[None, :]
        z_s.index(p).store(mma_v2(k_s.index(p).load(AP), wh_s.index(p).load(BP), cP))
        if OUT:
            qw = mma_v2(q_s.index(p).load(AP), wh_s.index(p).load(BP), cP)  # Q W + c
            qk = mma_v2(q_s.index(p).load(AP), k_s.index(p).permute((1, 0)).load(BP),
                        gl.zeros([MB, MB], gl.float32, LP))
            lrP = gl.load(lr_ptr + lr_base + (t0 + rjP) * l_t, mask=t0 + rjP < L, other=0.0).to(gl.float32)
            p_s.index(p).store(gl.where(causal, tau_i[:, None] * lrP[None, :] * (qk + 1.0), 0.0).to(OPT))
        _cta_barrier()  # Z (and P) written
        G, xh, rstd = _ln_l2_grad_rows(z_s.index(p).load(R), v, k16.to(gl.float32), gam, bet, D, EPS)
        if OUT:
            # NaN containment (`chunk._output`): the causal product takes G's non-finite rows as 0, and the
            # outputs from the first such row on are NaN (they depend on it)
            g_ok = gl.abs(gl.sum(G, axis=1)) < float("inf")
            ok_s.store(g_ok.to(gl.float32))
            g_s.index(p).store(gl.where(g_ok[:, None], G, 0.0).to(OPT))
        else:
            gl.store(gs_ptr + sc_off + t0 * D, G, mask=m2)
        eG = (tau_e * lr)[:, None] * G
        eg_s.index(p).store((-eG).to(OPT))
        eg32_s.index(p).store(eG)
        _cta_barrier()  # (G,) -e_b G written
        if OUT:
            zb_s.index(p).store(qw - mma_v2(p_s.index(p).load(AP), g_s.index(p).load(BP),
                                            gl.zeros([MB, D], gl.float32, LP)))
        W, c = _update(W, c, k_s.index(p), eg_s.index(p), eg32_s.index(p), AW, BW, LP)
        if OUT:
            _cta_barrier()  # Zb written
            rj = gl.arange(0, MB, layout=gl.SliceLayout(0, R))
            bad = gl.max(gl.where((rj[None, :] <= rt[:, None]) & (ok_s.load(gl.SliceLayout(0, R)) == 0.0)[None, :],
                                  1.0, 0.0), axis=1) > 0.0  # a token at or before the row has a non-finite G
            zb = gl.where(bad[:, None], float("nan"), zb_s.index(p).load(R))
            xhb, _rstdb = _normalize_rows(zb, D, EPS)
            o = q16.to(gl.float32) + xhb * gam[None, :] + bet[None, :]
            gl.store(o_ptr + out_base + t0 * o_t + out_off, o.to(o_ptr.dtype.element_ty), mask=m2)
        wh_s.index(1 - p).store(W.to(OPT))  # read from the next mini-batch's barrier on
    gl.store(wT_ptr + pid * D * D + woff, W)
    gl.store(cT_ptr + pid * D + rdP, c)


@gluon.jit
def _pre_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, ckw_ptr, ckc_ptr, do_ptr,
    dq_ptr, xh_ptr, g_ptr, rs_ptr, dg0_ptr, dzb_ptr, dka_ptr, dlra_ptr, dtau_ptr, dlnw_ptr, dlnb_ptr, span_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h, o_b, o_t, o_h, sc_b,
    H, NCK, T, G_LO, NG,
    D: gl.constexpr, MB: gl.constexpr, GROUP: gl.constexpr, EPS: gl.constexpr, STORE_G: gl.constexpr,
    num_warps: gl.constexpr,
):
    """The split backward's pre pass (`bwd_split._pre_kernel`): per checkpoint group, its mini-batches forward
    from the checkpoint, everything of the backward that needs no dW'. Products on mma.sync from shared memory
    (Z = K W, Q W, Q K^T, P G, dZb G^T, P^T dZb, dZb W^T + dA K, dA^T Q, the update); the per-token algebra in the
    token layout; the sums over a group's tokens (dgam, dbet, dtau) as tiles, summed once at its end."""
    OPT: gl.constexpr = q_ptr.dtype.element_ty
    R: gl.constexpr = _token_layout(D, MB, num_warps)
    LP: gl.constexpr = _mma_layout(num_warps, False, D)  # the [16, d] products
    LW: gl.constexpr = _mma_layout(num_warps, True, D)  # the [d, d] updates
    AP: gl.constexpr = _operand(LP, 0)
    BP: gl.constexpr = _operand(LP, 1)
    AW: gl.constexpr = _operand(LW, 0)
    BW: gl.constexpr = _operand(LW, 1)
    ST: gl.constexpr = gl.NVMMASharedLayout.get_default_for([MB, D], OPT)
    SE: gl.constexpr = gl.NVMMASharedLayout.get_default_for([MB, MB], OPT)
    SD: gl.constexpr = gl.NVMMASharedLayout.get_default_for([D, D], OPT)
    SF: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    k_s = gl.allocate_shared_memory(OPT, [2, MB, D], ST)
    q_s = gl.allocate_shared_memory(OPT, [2, MB, D], ST)
    g_s = gl.allocate_shared_memory(OPT, [2, MB, D], ST)
    eg_s = gl.allocate_shared_memory(OPT, [2, MB, D], ST)  # -e_b G
    dzb_s = gl.allocate_shared_memory(OPT, [2, MB, D], ST)
    p_s = gl.allocate_shared_memory(OPT, [2, MB, MB], SE)  # P
    da_s = gl.allocate_shared_memory(OPT, [2, MB, MB], SE)  # dA = dP * E
    wh_s = gl.allocate_shared_memory(OPT, [2, D, D], SD)  # W rounded to 16 bits (the products' operand)
    z_s = gl.allocate_shared_memory(gl.float32, [2, MB, D], SF)  # Z = K W + c, products' layout -> R
    zb_s = gl.allocate_shared_memory(gl.float32, [2, MB, D], SF)  # Zb, products' layout -> R
    eg32_s = gl.allocate_shared_memory(gl.float32, [2, MB, D], SF)  # e_b G, R -> the products' layout (c's sums)

    pid, pid2, bi, hi, start, L, slot, g, n0, n1 = _group_of(span_ptr, H, NCK, G_LO, NG, GROUP, MB)
    rt, rd, riP, rjP, rdP, riW, rjW = _index_vectors(R, LP, LW, MB, D)
    gam, bet, tau_b = _ln_consts(lnw_ptr, lnb_ptr, tau_ptr, hi, rd, D, MB)
    tau_i = gl.load(tau_ptr + riP).to(gl.float32)
    causal = riP[:, None] >= rjP[None, :]
    W, c = _checkpoint_in(ckw_ptr, ckc_ptr, (slot + g) * H + hi, (n0 < n1).to(gl.int32), riW, rjW, rdP, D)
    dgamT = gl.zeros([MB, D], gl.float32, R)  # sums over the group's tokens, taken once at its end
    dbetT = gl.zeros([MB, D], gl.float32, R)
    dtauT = gl.zeros([MB, MB], gl.float32, LP)

    in_base, in_off, lr_base, out_base, out_off = _offsets(bi, hi, start, rt, rd, s_b, s_t, s_h, l_b, l_t, l_h,
                                                           o_b, o_t, o_h)
    outP = riP[:, None] * o_t + rdP[None, :]
    sc_t = (bi * sc_b + hi) * T + start  # scratch rows [B*H or H, T, D]: this row's first token
    sc_off = (sc_t + rt)[:, None] * D + rd[None, :]
    scP = (sc_t + riP)[:, None] * D + rdP[None, :]
    t0 = n0 * MB
    tm = t0 + rt < L
    qn = _tile(q_ptr + in_base + t0 * s_t, in_off, rt, rd, t0, L, D)
    kn = _tile(k_ptr + in_base + t0 * s_t, in_off, rt, rd, t0, L, D)
    vn = _tile(v_ptr + in_base + t0 * s_t, in_off, rt, rd, t0, L, D)
    lrn = gl.load(lr_ptr + lr_base + (t0 + rt) * l_t, mask=tm, other=0.0)
    don = _tile(do_ptr + out_base + t0 * o_t, out_off, rt, rd, t0, L, D)
    wh_s.index(0).store(W.to(OPT))
    for n in range(n0, n1):
        p = (n - n0) % 2
        t0 = n * MB
        tm = t0 + rt < L
        m2 = tm[:, None] & (rd[None, :] < D)
        mP = (t0 + riP < L)[:, None] & (rdP[None, :] < D)
        tau_e = gl.where(t0 + MB <= L, tau_b, 0.0)  # a partial last mini-batch commits nothing
        q16 = qn
        k16 = kn
        v = vn.to(gl.float32)
        lr = lrn.to(gl.float32)
        dO = don.to(gl.float32)
        t1 = gl.minimum(n + 1, n1 - 1) * MB  # the next mini-batch's loads, issued before this one's math
        tm1 = t1 + rt < L
        qn = _tile(q_ptr + in_base + t1 * s_t, in_off, rt, rd, t1, L, D)
        kn = _tile(k_ptr + in_base + t1 * s_t, in_off, rt, rd, t1, L, D)
        vn = _tile(v_ptr + in_base + t1 * s_t, in_off, rt, rd, t1, L, D)
        lrn = gl.load(lr_ptr + lr_base + (t1 + rt) * l_t, mask=tm1, other=0.0)
        don = _tile(do_ptr + out_base + t1 * o_t, out_off, rt, rd, t1, L, D)

        k_s.index(p).store(k16)
        q_s.index(p).store(q16)
        _cta_barrier()  # Q, K and the last update's W copy are written
        cP = gl.zeros([MB, D], gl.float32, LP) + c[None, :]
        z_s.index(p).store(mma_v2(k_s.index(p).load(AP), wh_s.index(p).load(BP), cP))
        qw = mma_v2(q_s.index(p).load(AP), wh_s.index(p).load(BP), cP)  # Q W + c
        qk1 = mma_v2(q_s.index(p).load(AP), k_s.index(p).permute((1, 0)).load(BP),
                     gl.zeros([MB, MB], gl.float32, LP)) + 1.0
        lrP = gl.load(lr_ptr + lr_base + (t0 + rjP) * l_t, mask=t0 + rjP < L, other=0.0).to(gl.float32)
        E = gl.where(causal, tau_i[:, None] * lrP[None, :], 0.0)
        P = E * qk1
        p_s.index(p).store(P.to(OPT))
        _cta_barrier()  # Z, P written
        # the inner forward at the start weights: G, x^, 1/std (`triton_utils._ln_l2_grad`)
        z = z_s.index(p).load(R)
        G, xh, rstd = _ln_l2_grad_rows(z, v, k16.to(gl.float32), gam, bet, D, EPS)
        g_s.index(p).store(G.to(OPT))
        eG = (tau_e * lr)[:, None] * G
        eg_s.index(p).store((-eG).to(OPT))
        eg32_s.index(p).store(eG)
        so = sc_off + t0 * D
        gl.store(xh_ptr + so, xh, mask=m2)
        if STORE_G:
            gl.store(g_ptr + so, G, mask=m2)
        gl.store(rs_ptr + sc_t + t0 + rt, rstd, mask=tm)
        _cta_barrier()  # G, -e_b G written
        zb_s.index(p).store(qw - mma_v2(p_s.index(p).load(AP), g_s.index(p).load(BP),
                                        gl.zeros([MB, D], gl.float32, LP)))
        W, c = _update(W, c, k_s.index(p), eg_s.index(p), eg32_s.index(p), AW, BW, LP)
        _cta_barrier()  # Zb written
        # the output LayerNorm's backward: dZb
        zb = zb_s.index(p).load(R)
        xhb, rstdb = _normalize_rows(zb, D, EPS)
        dgamT += dO * xhb
        dbetT += dO
        gd = dO * gam[None, :]
        sd, sdx = gl.reduce((gd, gd * xhb), 1, _add2)
        dZb = (gd - (sd / D)[:, None] - xhb * (sdx / D)[:, None]) * rstdb[:, None]
        gl.store(dzb_ptr + so, dZb, mask=m2)
        dzb_s.index(p).store(dZb.to(OPT))
        _cta_barrier()  # dZb written
        # dP = -dZb G^T, dA = dP E, dE = dP (Q K^T + 1): dtau_i, dlr_j; dG0 = -P^T dZb
        dP = -mma_v2(dzb_s.index(p).load(AP), g_s.index(p).permute((1, 0)).load(BP),
                     gl.zeros([MB, MB], gl.float32, LP))
        dE = gl.where(causal, dP * qk1, 0.0)
        dtauT += dE * lrP[None, :]
        gl.store(dlra_ptr + sc_t + t0 + rjP, gl.sum(dE * tau_i[:, None], axis=0), mask=t0 + rjP < L)
        da_s.index(p).store((dP * E).to(OPT))
        gl.store(dg0_ptr + scP + t0 * D, -mma_v2(p_s.index(p).permute((1, 0)).load(AP), dzb_s.index(p).load(BP),
                                                 gl.zeros([MB, D], gl.float32, LP)), mask=mP)
        _cta_barrier()  # dA written
        # dq = dO + dZb W^T + dA K (final), dk_a = dA^T Q
        dq = gl.load(do_ptr + out_base + t0 * o_t + outP, mask=mP, other=0.0).to(gl.float32)
        dq = mma_v2(dzb_s.index(p).load(AP), wh_s.index(p).permute((1, 0)).load(BP), dq)
        dq = mma_v2(da_s.index(p).load(AP), k_s.index(p).load(BP), dq)
        gl.store(dq_ptr + out_base + t0 * o_t + outP, dq.to(dq_ptr.dtype.element_ty), mask=mP)
        gl.store(dka_ptr + scP + t0 * D, mma_v2(da_s.index(p).permute((1, 0)).load(AP), q_s.index(p).load(BP),
                                                gl.zeros([MB, D], gl.float32, LP)), mask=mP)
        wh_s.index(1 - p).store(W.to(OPT))  # read from the next mini-batch's barrier on
    gl.store(dtau_ptr + pid2 * MB + riP, gl.sum(dtauT, axis=1))
    gl.store(dlnw_ptr + pid2 * D + rd, gl.sum(dgamT, axis=0))
    gl.store(dlnb_ptr + pid2 * D + rd, gl.sum(dbetT, axis=0))


@gluon.jit
def _post_kernel(
    k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, ckw_ptr, ckc_ptr, dz_ptr, dkb_ptr, dka_ptr, dgy_ptr,
    dk_ptr, dv_ptr, dlnw_ptr, dlnb_ptr, span_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h, o_b, o_t, o_h, sc_b,
    H, NCK, T, G_LO, NG,
    D: gl.constexpr, MB: gl.constexpr, GROUP: gl.constexpr, EPS: gl.constexpr, num_warps: gl.constexpr,
):
    """The split backward's post pass after the full chain (`bwd_split._post_kernel`): per checkpoint group, W per
    mini-batch from the checkpoint (x^ from the same recompute); dk = dk_a + dk_b + gam dgy + dZ W^T (in the
    products' layout, stored from it), dv = -gam dgy, the group's dgam, dbet (tiles summed once at its end)."""
    OPT: gl.constexpr = k_ptr.dtype.element_ty
    R: gl.constexpr = _token_layout(D, MB, num_warps)
    LP: gl.constexpr = _mma_layout(num_warps, False, D)  # the [16, d] products
    LW: gl.constexpr = _mma_layout(num_warps, True, D)  # the [d, d] updates
    ST: gl.constexpr = gl.NVMMASharedLayout.get_default_for([MB, D], OPT)
    SD: gl.constexpr = gl.NVMMASharedLayout.get_default_for([D, D], OPT)
    SF: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    k_s = gl.allocate_shared_memory(OPT, [2, MB, D], ST)
    dz_s = gl.allocate_shared_memory(OPT, [2, MB, D], ST)
    eg_s = gl.allocate_shared_memory(OPT, [2, MB, D], ST)  # -e_b G
    wh_s = gl.allocate_shared_memory(OPT, [2, D, D], SD)  # W rounded to 16 bits (the products' operand)
    z_s = gl.allocate_shared_memory(gl.float32, [2, MB, D], SF)  # Z = K W + c, products' layout -> R
    eg32_s = gl.allocate_shared_memory(gl.float32, [2, MB, D], SF)  # e_b G, R -> the products' layout (c's sums)

    pid, pid2, bi, hi, start, L, slot, g, n0, n1 = _group_of(span_ptr, H, NCK, G_LO, NG, GROUP, MB)
    rt, rd, riP, _rjP, rdP, riW, rjW = _index_vectors(R, LP, LW, MB, D)
    gam, bet, tau_b = _ln_consts(lnw_ptr, lnb_ptr, tau_ptr, hi, rd, D, MB)
    gamP = gl.load(lnw_ptr + hi * D + rdP).to(gl.float32)
    W, c = _checkpoint_in(ckw_ptr, ckc_ptr, (slot + g) * H + hi, (n0 < n1).to(gl.int32), riW, rjW, rdP, D)
    dgamT = gl.zeros([MB, D], gl.float32, R)  # sums over the group's tokens, taken once at its end
    dbetT = gl.zeros([MB, D], gl.float32, R)

    in_base, in_off, lr_base, out_base, out_off = _offsets(bi, hi, start, rt, rd, s_b, s_t, s_h, l_b, l_t, l_h,
                                                           o_b, o_t, o_h)
    outP = riP[:, None] * o_t + rdP[None, :]
    sc_t = (bi * sc_b + hi) * T + start  # scratch rows [B*H or H, T, D]: this row's first token
    sc_off = (sc_t + rt)[:, None] * D + rd[None, :]
    scP = (sc_t + riP)[:, None] * D + rdP[None, :]
    t0 = n0 * MB
    kn = _tile(k_ptr + in_base + t0 * s_t, in_off, rt, rd, t0, L, D)
    vn = _tile(v_ptr + in_base + t0 * s_t, in_off, rt, rd, t0, L, D)
    lrn = gl.load(lr_ptr + lr_base + (t0 + rt) * l_t, mask=(t0 + rt) < L, other=0.0)
    dzn = _tile(dz_ptr + t0 * D, sc_off, rt, rd, t0, L, D).to(gl.float32)
    dgyn = _tile(dgy_ptr + t0 * D, sc_off, rt, rd, t0, L, D).to(gl.float32)
    wh_s.index(0).store(W.to(OPT))
    for n in range(n0, n1):
        p = (n - n0) % 2
        t0 = n * MB
        m2 = ((t0 + rt) < L)[:, None] & (rd[None, :] < D)
        mP = ((t0 + riP) < L)[:, None] & (rdP[None, :] < D)
        tau_e = gl.where(t0 + MB <= L, tau_b, 0.0)
        k16 = kn
        v = vn.to(gl.float32)
        lr = lrn.to(gl.float32)
        dZ = dzn
        dgy = dgyn
        t1 = gl.minimum(n + 1, n1 - 1) * MB  # the next mini-batch's loads, issued before this one's math
        kn = _tile(k_ptr + in_base + t1 * s_t, in_off, rt, rd, t1, L, D)
        vn = _tile(v_ptr + in_base + t1 * s_t, in_off, rt, rd, t1, L, D)
        lrn = gl.load(lr_ptr + lr_base + (t1 + rt) * l_t, mask=(t1 + rt) < L, other=0.0)
        dzn = _tile(dz_ptr + t1 * D, sc_off, rt, rd, t1, L, D).to(gl.float32)
        dgyn = _tile(dgy_ptr + t1 * D, sc_off, rt, rd, t1, L, D).to(gl.float32)

        k_s.index(p).store(k16)
        dz_s.index(p).store(dZ.to(OPT))
        _cta_barrier()  # K, dZ and the last update's W copy are written
        cP = gl.zeros([MB, D], gl.float32, LP) + c[None, :]
        z_s.index(p).store(mma_v2(k_s.index(p).load(_operand(LP, 0)), wh_s.index(p).load(_operand(LP, 1)), cP))
        # dk = dk_a + dk_b + gam dgy + dZ W^T, in the products' layout
        dk = _tile(dka_ptr + t0 * D, scP, riP, rdP, t0, L, D).to(gl.float32) \
            + _tile(dkb_ptr + t0 * D, scP, riP, rdP, t0, L, D).to(gl.float32) \
            + gamP[None, :] * _tile(dgy_ptr + t0 * D, scP, riP, rdP, t0, L, D).to(gl.float32)
        dk = mma_v2(dz_s.index(p).load(_operand(LP, 0)), wh_s.index(p).permute((1, 0)).load(_operand(LP, 1)), dk)
        gl.store(dk_ptr + out_base + t0 * o_t + outP, dk.to(dk_ptr.dtype.element_ty), mask=mP)
        gl.store(dv_ptr + out_base + t0 * o_t + out_off, (-gam[None, :] * dgy).to(dv_ptr.dtype.element_ty), mask=m2)
        _cta_barrier()  # Z written
        G, xh, rstd = _ln_l2_grad_rows(z_s.index(p).load(R), v, k16.to(gl.float32), gam, bet, D, EPS)
        k = k16.to(gl.float32)
        dgamT += dgy * (2.0 * gam[None, :] * xh + bet[None, :] - (v - k))
        dbetT += dgy
        eG = (tau_e * lr)[:, None] * G
        eg_s.index(p).store((-eG).to(OPT))
        eg32_s.index(p).store(eG)
        _cta_barrier()  # -e_b G written
        W, c = _update(W, c, k_s.index(p), eg_s.index(p), eg32_s.index(p), _operand(LW, 0), _operand(LW, 1), LP)
        wh_s.index(1 - p).store(W.to(OPT))  # read from the next mini-batch's barrier on
    gl.store(dlnw_ptr + pid2 * D + rd, gl.sum(dgamT, axis=0))
    gl.store(dlnb_ptr + pid2 * D + rd, gl.sum(dbetT, axis=0) * gam)
