"""TTT-Linear backward, split: a lean sequential chain between two passes parallel over checkpoint groups.

The gradients whose formulas are in `chunk.py`'s docstring, computed in three launches so that only the part
that truly depends on the carried weight gradient runs one program per (row, head); the rest runs one
program per (row, head, checkpoint group) (the longest row's groups for every row: a shorter row's programs
past its end do nothing; rows: `triton_utils.Rows`, a row's partial last mini-batch adds no carried-weight
terms since the forward left it uncommitted):

(a) `_pre_kernel`, per group: from the group's checkpoint (W, c) walk its mini-batches forward (recomputing
    the inner forward and the W update). Everything that does not involve dW' (the gradient w.r.t. the
    weights after the mini-batch):
      dZb = LN-backward(dO gam) at the output,   dgam += dO x^b, dbet += dO
      dP = -dZb G^T, dA = dP * E, dE = dP * (Q K^T + 1)  ->  dtau_i, dlr_j (the dE part)
      dq = dO + dZb W^T + dA K                     (final)
      dG0 = -P^T dZb,  dk_a = dA^T Q
    and stores x^, rstd (of the inner LN at Z = K W + c), dG0, dZb, dk_a as [T, d] scratch rows
    (rstd fp32 [T]).
(b) `_chain_kernel`, per (row, head), all mini-batches in reverse, carrying only dW, dc:
      G, gy recomputed row-wise from x^, rstd, v - k (no product)
      KdW = K dW + dc,  S = rowsum(KdW * G)  ->  dlr_j -= tau_b S_j, dtau_b -= sum lr S
      dG = dG0 - e_b KdW  ->  dgy, dx^, ds, dZ (the LN-L2 gradient backward)
      dk_b = -(e_b G) dW^T,  dW += Q^T dZb + K^T dZ,  dc += sum dZb + sum dZ
    and stores dZ, dk_b, dgy as [T, d] scratch rows. Next mini-batch's loads are issued before this one's math.
(c) `_post_kernel`, per group: recompute W (and x^) per mini-batch from the checkpoint; dk = dk_a + dk_b + gam dgy
    + dZ W^T, dv = -gam dgy, dgam, dbet (the dgy part): what needs no dW' leaves the chain.
Memory: the forward's checkpoints plus seven [B, H, T, d] scratch tensors (bf16 for bf16 inputs, else fp32:
`scratch_dtype`; every kernel loads them into fp32) and a few fp32 [B, H, T] ones (packed rows: [H, T, d], each
document's rows at its own tokens); nothing of size d x d per mini-batch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import walks_gluon
from ..triton_utils import (Rows, _dot, _head_consts, _ln_l2_grad, _ln_l2_grad_bwd, _load_mb, _mb_masks, _normalize,
                            _offsets, _proj, _row, _tiles, _when, batch_rows, tile)


@triton.jit
def _inner_fwd(k, v, W, c, gam, bet, cmask, D: tl.constexpr, DOT_MODE: tl.constexpr, EPS: tl.constexpr):
    """Inner forward at the start weights and the closed-form LN-L2 gradient: G [BT,BD], xh, rstd."""
    G, xh, rstd, _gy, _mgx = _ln_l2_grad(_dot(k, W, DOT_MODE) + c[None, :], v, k, gam, bet, cmask, D, EPS)
    return G, xh, rstd


@triton.jit
def _group_tiles(H, NCK, G_LO, NG, D: tl.constexpr, BD: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr):
    """Program of a per-group launch over groups [G_LO, G_LO + NG): its (batch*head) pid, group g and global
    index pid2 = pid * NCK + g, and the tile indices and masks."""
    pid = tl.program_id(0) // NG
    g = G_LO + tl.program_id(0) % NG
    pid2 = pid * NCK + g
    rt = tl.arange(0, BT)
    rd = tl.arange(0, BD)
    cmask = rd < D
    tmask = rt < MB
    return pid2, pid, g, pid // H, pid % H, rt, rd, cmask, tmask, tmask[:, None] & cmask[None, :]


@triton.jit
def _pre_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, ckw_ptr, ckc_ptr, do_ptr,
    dq_ptr, xh_ptr, g_ptr, rs_ptr, dg0_ptr, dzb_ptr, dka_ptr, dlra_ptr, dtau_ptr, dlnw_ptr, dlnb_ptr, span_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h, o_b, o_t, o_h, sc_b,
    H, NCK, T, G_LO, NG,
    D: tl.constexpr, BD: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr, GROUP: tl.constexpr,
    DOT_MODE: tl.constexpr, EPS: tl.constexpr, STORE_G: tl.constexpr,
):
    pid2, pid, g, bi, hi, rt, rd, cmask, tmask, m2 = _group_tiles(H, NCK, G_LO, NG, D, BD, MB, BT)
    start, L, slot = _row(span_ptr, bi)
    NMB = tl.cdiv(L, MB)
    wmask = cmask[:, None] & cmask[None, :]
    woff = rd[:, None] * D + rd[None, :]
    gam, bet, tau_r, tau_b, causal = _head_consts(lnw_ptr, lnb_ptr, tau_ptr, hi, rt, rd, cmask, tmask, D, MB)
    ck = (slot + g) * H + hi
    has = g * GROUP < NMB  # the row has this group (rows differ in length)
    W = tl.load(ckw_ptr + ck * D * D + woff, mask=_when(wmask, has), other=0.0)
    c = tl.load(ckc_ptr + ck * D + rd, mask=_when(cmask, has), other=0.0)
    dgam = tl.zeros([BD], dtype=tl.float32)
    dbet = tl.zeros([BD], dtype=tl.float32)
    dtau = tl.zeros([BT], dtype=tl.float32)

    in_base, in_off, lr_base, out_base, out_off = _offsets(bi, hi, start, rt, rd, s_b, s_t, s_h, l_b, l_t, l_h,
                                                           o_b, o_t, o_h)
    sc_t = (bi * sc_b + hi) * T + start  # fp32 scratch rows [B*H or H, T, D]: this row's first token
    sc_off = (sc_t + rt)[:, None] * D + rd[None, :]
    n0 = g * GROUP
    n1 = tl.minimum(n0 + GROUP, NMB)
    t0 = n0 * MB
    tm, m2 = _mb_masks(t0, rt, L, cmask, MB)
    qn, kn, vn, lrn = _load_mb(q_ptr, k_ptr, v_ptr, lr_ptr, in_base + t0 * s_t + in_off, lr_base + t0 * l_t, rt, m2,
                               tm, l_t)
    dOn = tl.load(do_ptr + out_base + t0 * o_t + out_off, mask=m2, other=0.0)
    for n in range(n0, n1):
        t0 = n * MB
        tm, m2 = _mb_masks(t0, rt, L, cmask, MB)
        tau_e = tl.where(t0 + MB <= L, tau_b, 0.0)  # a partial last mini-batch commits nothing
        q = qn.to(tl.float32)
        k = kn.to(tl.float32)
        v = vn.to(tl.float32)
        lr = lrn.to(tl.float32)
        dO = dOn.to(tl.float32)
        t1 = tl.minimum(n + 1, n1 - 1) * MB
        tm1, m21 = _mb_masks(t1, rt, L, cmask, MB)
        qn, kn, vn, lrn = _load_mb(q_ptr, k_ptr, v_ptr, lr_ptr, in_base + t1 * s_t + in_off, lr_base + t1 * l_t, rt,
                                   m21, tm1, l_t)
        dOn = tl.load(do_ptr + out_base + t1 * o_t + out_off, mask=m21, other=0.0)

        G, xh, rstd = _inner_fwd(k, v, W, c, gam, bet, cmask, D, DOT_MODE, EPS)
        E = tl.where(causal, tau_r[:, None] * lr[None, :], 0.0)
        QK1 = _dot(q, tl.trans(k), DOT_MODE) + 1.0
        P = E * QK1
        Zb = _dot(q, W, DOT_MODE) + c[None, :] - _dot(P, G, DOT_MODE)
        xhb, rstdb = _normalize(Zb, cmask, D, EPS)
        dgam += tl.sum(dO * xhb, axis=0)
        dbet += tl.sum(dO, axis=0)
        dZb = _proj(dO * gam[None, :], xhb, rstdb, cmask, D)
        dP = -_dot(dZb, tl.trans(G), DOT_MODE)
        dG0 = -_dot(tl.trans(P), dZb, DOT_MODE)
        dE = tl.where(causal, dP * QK1, 0.0)
        dA = dP * E
        dq = dO + _dot(dZb, tl.trans(W), DOT_MODE) + _dot(dA, k, DOT_MODE)
        dka = _dot(tl.trans(dA), q, DOT_MODE)
        dtau += tl.sum(dE * lr[None, :], axis=1)
        dlr = tl.sum(dE * tau_r[:, None], axis=0)

        tl.store(dq_ptr + out_base + t0 * o_t + out_off, dq.to(dq_ptr.dtype.element_ty), mask=m2)
        so = sc_off + t0 * D
        tl.store(xh_ptr + so, xh, mask=m2)
        if STORE_G:
            tl.store(g_ptr + so, G, mask=m2)
        tl.store(dg0_ptr + so, dG0, mask=m2)
        tl.store(dzb_ptr + so, dZb, mask=m2)
        tl.store(dka_ptr + so, dka, mask=m2)
        tl.store(rs_ptr + sc_t + t0 + rt, rstd, mask=tm)
        tl.store(dlra_ptr + sc_t + t0 + rt, dlr, mask=tm)

        eG = (tau_e * lr)[:, None] * G
        W -= _dot(tl.trans(k), eG, DOT_MODE)
        c -= tl.sum(eG, axis=0)
    tl.store(dtau_ptr + pid2 * BT + rt, dtau)
    tl.store(dlnw_ptr + pid2 * BD + rd, dgam)
    tl.store(dlnb_ptr + pid2 * BD + rd, dbet)


@triton.jit
def _chain_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, xh_ptr, rs_ptr, dg0_ptr, dzb_ptr,
    dwT_ptr, dcT_ptr,
    dz_ptr, dkb_ptr, dgy_ptr, dlrb_ptr, dw0_ptr, dc0_ptr, dtau_ptr, span_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h, sc_b,
    H, NCK, T, N_LO, N_HI, IN_LIM,
    D: tl.constexpr, BD: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr, GROUP: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    pid, bi, hi, rt, rd, cmask, tmask, m2 = _tiles(H, D, BD, MB, BT)
    start, L, slot = _row(span_ptr, bi)
    n_hi = tl.minimum(N_HI, tl.cdiv(L, MB))  # this segment's mini-batches of this row: N_LO .. n_hi - 1
    wmask = cmask[:, None] & cmask[None, :]
    woff = rd[:, None] * D + rd[None, :]
    gam, bet, tau_r, tau_b, causal = _head_consts(lnw_ptr, lnb_ptr, tau_ptr, hi, rt, rd, cmask, tmask, D, MB)

    # the final state's gradient (IN_LIM = D * D), or none (0: zeros, nothing read)
    dW = tl.load(dwT_ptr + pid * D * D + woff, mask=wmask & (woff < IN_LIM), other=0.0)
    dc = tl.load(dcT_ptr + pid * D + rd, mask=cmask & (rd * D < IN_LIM), other=0.0)
    dtau_b = tl.zeros([BT], dtype=tl.float32)

    in_base = bi * s_b + start * s_t + hi * s_h
    in_off = rt[:, None] * s_t + rd[None, :]
    lr_base = bi * l_b + start * l_t + hi * l_h
    sc_t = (bi * sc_b + hi) * T + start
    sc_off = (sc_t + rt)[:, None] * D + rd[None, :]
    t0 = tl.maximum(n_hi - 1, 0) * MB  # (no mini-batch of this row here: loads nothing used)
    tm, m2 = _mb_masks(t0, rt, L, cmask, MB)
    # plain loads, not `_load_mb`: with its address form this kernel compiles to 40 B more stack (offline sm_90)
    qn = tl.load(q_ptr + in_base + t0 * s_t + in_off, mask=m2, other=0.0)
    kn = tl.load(k_ptr + in_base + t0 * s_t + in_off, mask=m2, other=0.0)
    vn = tl.load(v_ptr + in_base + t0 * s_t + in_off, mask=m2, other=0.0)
    lrn = tl.load(lr_ptr + lr_base + (t0 + rt) * l_t, mask=tm, other=0.0)
    xhn = tl.load(xh_ptr + sc_off + t0 * D, mask=m2, other=0.0).to(tl.float32)
    dg0n = tl.load(dg0_ptr + sc_off + t0 * D, mask=m2, other=0.0).to(tl.float32)
    dzbn = tl.load(dzb_ptr + sc_off + t0 * D, mask=m2, other=0.0).to(tl.float32)
    rsn = tl.load(rs_ptr + sc_t + t0 + rt, mask=tm, other=0.0)
    for ni in range(n_hi - N_LO):
        n = n_hi - 1 - ni
        t0 = n * MB
        tm, m2 = _mb_masks(t0, rt, L, cmask, MB)
        full = t0 + MB <= L  # a partial last mini-batch commits nothing: no carried-weight terms
        q = qn.to(tl.float32)
        k = kn.to(tl.float32)
        v = vn.to(tl.float32)
        lr = lrn.to(tl.float32)
        xh = xhn
        dG0 = dg0n
        dZb = dzbn
        rstd = rsn
        t1 = tl.maximum(n - 1, N_LO) * MB
        tm1, m21 = _mb_masks(t1, rt, L, cmask, MB)
        qn = tl.load(q_ptr + in_base + t1 * s_t + in_off, mask=m21, other=0.0)
        kn = tl.load(k_ptr + in_base + t1 * s_t + in_off, mask=m21, other=0.0)
        vn = tl.load(v_ptr + in_base + t1 * s_t + in_off, mask=m21, other=0.0)
        lrn = tl.load(lr_ptr + lr_base + (t1 + rt) * l_t, mask=tm1, other=0.0)
        xhn = tl.load(xh_ptr + sc_off + t1 * D, mask=m21, other=0.0).to(tl.float32)
        dg0n = tl.load(dg0_ptr + sc_off + t1 * D, mask=m21, other=0.0).to(tl.float32)
        dzbn = tl.load(dzb_ptr + sc_off + t1 * D, mask=m21, other=0.0).to(tl.float32)
        rsn = tl.load(rs_ptr + sc_t + t1 + rt, mask=tm1, other=0.0)

        # the inner gradient G, recomputed from the stored LN statistics (row-wise, no product)
        gy = gam[None, :] * (gam[None, :] * xh + bet[None, :] - (v - k))
        mgx = tl.sum(gy * xh, axis=1) / D
        G = _proj(gy, xh, rstd, cmask, D)
        tau_e = tl.where(full, tau_b, 0.0)
        eb = tau_e * lr
        # the chain: W' = W - K^T (e_b G), c' = c - sum e_b G
        KdW = _dot(k, dW, DOT_MODE) + dc[None, :]
        S = tl.sum(KdW * G, axis=1)
        dG = dG0 - eb[:, None] * KdW
        dkb = -_dot(eb[:, None] * G, tl.trans(dW), DOT_MODE)
        dtau_b += tl.where(full, -lr * S, 0.0)
        if n % GROUP == 0:  # the group's first mini-batch, walked last: the group's part of dtau_b
            tl.store(dtau_ptr + (pid * NCK + n // GROUP) * BT + rt,
                     tl.where(rt == MB - 1, tl.sum(dtau_b, axis=0), 0.0))
            dtau_b = tl.zeros([BT], dtype=tl.float32)
        # G = LN-L2 gradient at Z = K W + c
        dgy, dZ = _ln_l2_grad_bwd(dG, G, xh, rstd, gy, mgx, gam, cmask, D)
        dW += _dot(tl.trans(q), dZb, DOT_MODE) + _dot(tl.trans(k), dZ, DOT_MODE)
        dc += tl.sum(dZb + dZ, axis=0)
        so = sc_off + t0 * D
        tl.store(dz_ptr + so, dZ, mask=m2)
        tl.store(dkb_ptr + so, dkb, mask=m2)
        tl.store(dgy_ptr + so, dgy, mask=m2)
        tl.store(dlrb_ptr + sc_t + t0 + rt, -tau_e * S, mask=tm)
    tl.store(dw0_ptr + pid * D * D + woff, dW, mask=wmask)
    tl.store(dc0_ptr + pid * D + rd, dc, mask=cmask)


@triton.jit
def _post_kernel(
    k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, ckw_ptr, ckc_ptr, dz_ptr, dkb_ptr, dka_ptr, dgy_ptr,
    dk_ptr, dv_ptr, dlnw_ptr, dlnb_ptr, span_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h, o_b, o_t, o_h, sc_b,
    H, NCK, T, G_LO, NG,
    D: tl.constexpr, BD: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr, GROUP: tl.constexpr,
    DOT_MODE: tl.constexpr, EPS: tl.constexpr,
):
    pid2, pid, g, bi, hi, rt, rd, cmask, tmask, m2 = _group_tiles(H, NCK, G_LO, NG, D, BD, MB, BT)
    start, L, slot = _row(span_ptr, bi)
    NMB = tl.cdiv(L, MB)
    wmask = cmask[:, None] & cmask[None, :]
    woff = rd[:, None] * D + rd[None, :]
    gam, bet, tau_r, tau_b, causal = _head_consts(lnw_ptr, lnb_ptr, tau_ptr, hi, rt, rd, cmask, tmask, D, MB)
    ck = (slot + g) * H + hi
    has = g * GROUP < NMB
    W = tl.load(ckw_ptr + ck * D * D + woff, mask=_when(wmask, has), other=0.0)
    c = tl.load(ckc_ptr + ck * D + rd, mask=_when(cmask, has), other=0.0)
    dgamT = tl.zeros([BT, BD], dtype=tl.float32)
    dbetT = tl.zeros([BT, BD], dtype=tl.float32)

    in_base, in_off, lr_base, out_base, out_off = _offsets(bi, hi, start, rt, rd, s_b, s_t, s_h, l_b, l_t, l_h,
                                                           o_b, o_t, o_h)
    sc_t = (bi * sc_b + hi) * T + start
    sc_off = (sc_t + rt)[:, None] * D + rd[None, :]
    n0 = g * GROUP
    n1 = tl.minimum(n0 + GROUP, NMB)
    t0 = n0 * MB
    tm, m2 = _mb_masks(t0, rt, L, cmask, MB)
    kn = tl.load(k_ptr + in_base + t0 * s_t + in_off, mask=m2, other=0.0)
    vn = tl.load(v_ptr + in_base + t0 * s_t + in_off, mask=m2, other=0.0)
    lrn = tl.load(lr_ptr + lr_base + (t0 + rt) * l_t, mask=tm, other=0.0)
    dzn = tl.load(dz_ptr + sc_off + t0 * D, mask=m2, other=0.0).to(tl.float32)
    dgyn = tl.load(dgy_ptr + sc_off + t0 * D, mask=m2, other=0.0).to(tl.float32)
    dkn = tl.load(dka_ptr + sc_off + t0 * D, mask=m2, other=0.0).to(tl.float32) \
        + tl.load(dkb_ptr + sc_off + t0 * D, mask=m2, other=0.0).to(tl.float32)
    for n in range(n0, n1):
        t0 = n * MB
        tm, m2 = _mb_masks(t0, rt, L, cmask, MB)
        tau_e = tl.where(t0 + MB <= L, tau_b, 0.0)
        k = kn.to(tl.float32)
        v = vn.to(tl.float32)
        lr = lrn.to(tl.float32)
        dZ = dzn
        dgy = dgyn
        dk = dkn
        t1 = tl.minimum(n + 1, n1 - 1) * MB
        tm1, m21 = _mb_masks(t1, rt, L, cmask, MB)
        kn = tl.load(k_ptr + in_base + t1 * s_t + in_off, mask=m21, other=0.0)
        vn = tl.load(v_ptr + in_base + t1 * s_t + in_off, mask=m21, other=0.0)
        lrn = tl.load(lr_ptr + lr_base + (t1 + rt) * l_t, mask=tm1, other=0.0)
        dzn = tl.load(dz_ptr + sc_off + t1 * D, mask=m21, other=0.0).to(tl.float32)
        dgyn = tl.load(dgy_ptr + sc_off + t1 * D, mask=m21, other=0.0).to(tl.float32)
        dkn = tl.load(dka_ptr + sc_off + t1 * D, mask=m21, other=0.0).to(tl.float32) \
            + tl.load(dkb_ptr + sc_off + t1 * D, mask=m21, other=0.0).to(tl.float32)
        dk += gam[None, :] * dgy + _dot(dZ, tl.trans(W), DOT_MODE)
        optr = out_base + t0 * o_t + out_off
        tl.store(dk_ptr + optr, dk.to(dk_ptr.dtype.element_ty), mask=m2)
        tl.store(dv_ptr + optr, (-gam[None, :] * dgy).to(dv_ptr.dtype.element_ty), mask=m2)
        G, xh, rstd = _inner_fwd(k, v, W, c, gam, bet, cmask, D, DOT_MODE, EPS)
        dgamT += dgy * (2.0 * gam[None, :] * xh + bet[None, :] - (v - k))
        dbetT += dgy
        eG = (tau_e * lr)[:, None] * G
        W -= _dot(tl.trans(k), eG, DOT_MODE)
        c -= tl.sum(eG, axis=0)
    tl.store(dlnw_ptr + pid2 * BD + rd, tl.sum(dgamT, axis=0))
    tl.store(dlnb_ptr + pid2 * BD + rd, tl.sum(dbetT, axis=0) * gam)


@triton.jit
def _chain_lean_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, xh_ptr, g_ptr, rs_ptr, dg0_ptr, dzb_ptr,
    dwT_ptr, dcT_ptr,
    dz_ptr, dgy_ptr, bw_ptr, bc_ptr, dw0_ptr, dc0_ptr, span_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h, sc_b,
    H, T, N_LO, N_HI, IN_LIM,
    D: tl.constexpr, BD: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr, GROUP: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    """Only the recurrence: dW, dc carried; stores dZ, dgy per mini-batch and (dW, dc) where the walk enters
    each checkpoint group (the gradient w.r.t. the weights after the group's last mini-batch)."""
    pid, bi, hi, rt, rd, cmask, tmask, m2 = _tiles(H, D, BD, MB, BT)
    start, L, slot = _row(span_ptr, bi)
    NMB = tl.cdiv(L, MB)
    n_hi = tl.minimum(N_HI, NMB)
    wmask = cmask[:, None] & cmask[None, :]
    woff = rd[:, None] * D + rd[None, :]
    gam, bet, tau_r, tau_b, causal = _head_consts(lnw_ptr, lnb_ptr, tau_ptr, hi, rt, rd, cmask, tmask, D, MB)

    # the final state's gradient (IN_LIM = D * D), or none (0: zeros, nothing read)
    dW = tl.load(dwT_ptr + pid * D * D + woff, mask=wmask & (woff < IN_LIM), other=0.0)
    dc = tl.load(dcT_ptr + pid * D + rd, mask=cmask & (rd * D < IN_LIM), other=0.0)

    in_base = bi * s_b + start * s_t + hi * s_h
    in_off = rt[:, None] * s_t + rd[None, :]
    lr_base = bi * l_b + start * l_t + hi * l_h
    sc_t = (bi * sc_b + hi) * T + start
    sc_off = (sc_t + rt)[:, None] * D + rd[None, :]
    t0 = tl.maximum(n_hi - 1, 0) * MB  # (no mini-batch of this row here: loads nothing used)
    tm, m2 = _mb_masks(t0, rt, L, cmask, MB)
    qn, kn, vn, lrn = _load_mb(q_ptr, k_ptr, v_ptr, lr_ptr, in_base + t0 * s_t + in_off, lr_base + t0 * l_t, rt, m2,
                               tm, l_t)
    xhn = tl.load(xh_ptr + sc_off + t0 * D, mask=m2, other=0.0).to(tl.float32)
    gn = tl.load(g_ptr + sc_off + t0 * D, mask=m2, other=0.0).to(tl.float32)
    dg0n = tl.load(dg0_ptr + sc_off + t0 * D, mask=m2, other=0.0).to(tl.float32)
    dzbn = tl.load(dzb_ptr + sc_off + t0 * D, mask=m2, other=0.0).to(tl.float32)
    rsn = tl.load(rs_ptr + sc_t + t0 + rt, mask=tm, other=0.0)
    for ni in range(n_hi - N_LO):
        n = n_hi - 1 - ni
        t0 = n * MB
        tm, m2 = _mb_masks(t0, rt, L, cmask, MB)
        if (n % GROUP == GROUP - 1) | (n == NMB - 1):
            ck = (slot + n // GROUP) * H + hi
            tl.store(bw_ptr + ck * D * D + woff, dW, mask=wmask)
            tl.store(bc_ptr + ck * D + rd, dc, mask=cmask)
        q = qn.to(tl.float32)
        k = kn.to(tl.float32)
        v = vn.to(tl.float32)
        lr = lrn.to(tl.float32)
        xh = xhn
        G = gn
        dG0 = dg0n
        dZb = dzbn
        rstd = rsn
        t1 = tl.maximum(n - 1, N_LO) * MB
        tm1, m21 = _mb_masks(t1, rt, L, cmask, MB)
        qn, kn, vn, lrn = _load_mb(q_ptr, k_ptr, v_ptr, lr_ptr, in_base + t1 * s_t + in_off, lr_base + t1 * l_t, rt,
                                   m21, tm1, l_t)
        xhn = tl.load(xh_ptr + sc_off + t1 * D, mask=m21, other=0.0).to(tl.float32)
        gn = tl.load(g_ptr + sc_off + t1 * D, mask=m21, other=0.0).to(tl.float32)
        dg0n = tl.load(dg0_ptr + sc_off + t1 * D, mask=m21, other=0.0).to(tl.float32)
        dzbn = tl.load(dzb_ptr + sc_off + t1 * D, mask=m21, other=0.0).to(tl.float32)
        rsn = tl.load(rs_ptr + sc_t + t1 + rt, mask=tm1, other=0.0)

        gy = gam[None, :] * (gam[None, :] * xh + bet[None, :] - (v - k))
        mgx = tl.sum(gy * xh, axis=1) / D
        eb = tl.where(t0 + MB <= L, tau_b, 0.0) * lr  # a partial last mini-batch commits nothing
        dG = dG0 - eb[:, None] * (_dot(k, dW, DOT_MODE) + dc[None, :])
        dgy, dZ = _ln_l2_grad_bwd(dG, G, xh, rstd, gy, mgx, gam, cmask, D)
        dW += _dot(tl.trans(q), dZb, DOT_MODE) + _dot(tl.trans(k), dZ, DOT_MODE)
        dc += tl.sum(dZb + dZ, axis=0)
        so = sc_off + t0 * D
        tl.store(dz_ptr + so, dZ, mask=m2)
        tl.store(dgy_ptr + so, dgy, mask=m2)
    tl.store(dw0_ptr + pid * D * D + woff, dW, mask=wmask)
    tl.store(dc0_ptr + pid * D + rd, dc, mask=cmask)


@triton.jit
def _post_lean_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, ckw_ptr, bw_ptr, bc_ptr,
    xh_ptr, g_ptr, dzb_ptr, dz_ptr, dgy_ptr, dka_ptr,
    dk_ptr, dv_ptr, dlrb_ptr, dtau_ptr, dlnw_ptr, dlnb_ptr, span_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h, o_b, o_t, o_h, sc_b,
    H, NCK, T, G_LO, NG,
    D: tl.constexpr, BD: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr, GROUP: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    """Per group: (R) reverse from the group-end (dW, dc): the dW'-terms of dk and dlr/dtau_b, into dka in place;
    (F) forward from the checkpoint W (updated with the stored G): dk = that + gam dgy + dZ W^T, dv, dgam, dbet."""
    pid2, pid, g, bi, hi, rt, rd, cmask, tmask, m2 = _group_tiles(H, NCK, G_LO, NG, D, BD, MB, BT)
    start, L, slot = _row(span_ptr, bi)
    NMB = tl.cdiv(L, MB)
    wmask = cmask[:, None] & cmask[None, :]
    woff = rd[:, None] * D + rd[None, :]
    gam, bet, tau_r, tau_b, causal = _head_consts(lnw_ptr, lnb_ptr, tau_ptr, hi, rt, rd, cmask, tmask, D, MB)
    in_base, in_off, lr_base, out_base, out_off = _offsets(bi, hi, start, rt, rd, s_b, s_t, s_h, l_b, l_t, l_h,
                                                           o_b, o_t, o_h)
    sc_t = (bi * sc_b + hi) * T + start
    sc_off = (sc_t + rt)[:, None] * D + rd[None, :]
    n0 = g * GROUP
    n1 = tl.minimum(n0 + GROUP, NMB)
    ck = (slot + g) * H + hi
    has = n0 < NMB

    # (R) reverse over the group, carrying the gradient w.r.t. the weights after each mini-batch
    dW = tl.load(bw_ptr + ck * D * D + woff, mask=_when(wmask, has), other=0.0)
    dc = tl.load(bc_ptr + ck * D + rd, mask=_when(cmask, has), other=0.0)
    dtau_b = tl.zeros([BT], dtype=tl.float32)
    t0 = tl.maximum(n1 - 1, 0) * MB
    tm, m2 = _mb_masks(t0, rt, L, cmask, MB)
    qn = tl.load(q_ptr + in_base + t0 * s_t + in_off, mask=m2, other=0.0)
    kn = tl.load(k_ptr + in_base + t0 * s_t + in_off, mask=m2, other=0.0)
    lrn = tl.load(lr_ptr + lr_base + (t0 + rt) * l_t, mask=tm, other=0.0)
    gn = tl.load(g_ptr + sc_off + t0 * D, mask=m2, other=0.0).to(tl.float32)
    dzbn = tl.load(dzb_ptr + sc_off + t0 * D, mask=m2, other=0.0).to(tl.float32)
    dzn = tl.load(dz_ptr + sc_off + t0 * D, mask=m2, other=0.0).to(tl.float32)
    dkan = tl.load(dka_ptr + sc_off + t0 * D, mask=m2, other=0.0).to(tl.float32)
    for ni in range(n1 - n0):
        n = n1 - 1 - ni
        t0 = n * MB
        tm, m2 = _mb_masks(t0, rt, L, cmask, MB)
        full = t0 + MB <= L  # a partial last mini-batch commits nothing: no carried-weight terms
        q = qn.to(tl.float32)
        k = kn.to(tl.float32)
        lr = lrn.to(tl.float32)
        G = gn
        dZb = dzbn
        dZ = dzn
        dka = dkan
        t1 = tl.maximum(n - 1, n0) * MB
        tm1, m21 = _mb_masks(t1, rt, L, cmask, MB)
        qn = tl.load(q_ptr + in_base + t1 * s_t + in_off, mask=m21, other=0.0)
        kn = tl.load(k_ptr + in_base + t1 * s_t + in_off, mask=m21, other=0.0)
        lrn = tl.load(lr_ptr + lr_base + (t1 + rt) * l_t, mask=tm1, other=0.0)
        gn = tl.load(g_ptr + sc_off + t1 * D, mask=m21, other=0.0).to(tl.float32)
        dzbn = tl.load(dzb_ptr + sc_off + t1 * D, mask=m21, other=0.0).to(tl.float32)
        dzn = tl.load(dz_ptr + sc_off + t1 * D, mask=m21, other=0.0).to(tl.float32)
        dkan = tl.load(dka_ptr + sc_off + t1 * D, mask=m21, other=0.0).to(tl.float32)
        tau_e = tl.where(full, tau_b, 0.0)
        eb = tau_e * lr
        S = tl.sum((_dot(k, dW, DOT_MODE) + dc[None, :]) * G, axis=1)
        dtau_b += tl.where(full, -lr * S, 0.0)
        dkr = dka - _dot(eb[:, None] * G, tl.trans(dW), DOT_MODE)
        dW += _dot(tl.trans(q), dZb, DOT_MODE) + _dot(tl.trans(k), dZ, DOT_MODE)
        dc += tl.sum(dZb + dZ, axis=0)
        so = sc_off + t0 * D
        tl.store(dka_ptr + so, dkr, mask=m2)
        tl.store(dlrb_ptr + sc_t + t0 + rt, -tau_e * S, mask=tm)
    tl.debug_barrier()

    # (F) forward over the group: W per mini-batch from the checkpoint and the stored G
    W = tl.load(ckw_ptr + ck * D * D + woff, mask=_when(wmask, has), other=0.0)
    dgam = tl.zeros([BD], dtype=tl.float32)
    dbet = tl.zeros([BD], dtype=tl.float32)
    t0 = n0 * MB
    tm, m2 = _mb_masks(t0, rt, L, cmask, MB)
    kn = tl.load(k_ptr + in_base + t0 * s_t + in_off, mask=m2, other=0.0)
    vn = tl.load(v_ptr + in_base + t0 * s_t + in_off, mask=m2, other=0.0)
    lrn = tl.load(lr_ptr + lr_base + (t0 + rt) * l_t, mask=tm, other=0.0)
    gn = tl.load(g_ptr + sc_off + t0 * D, mask=m2, other=0.0).to(tl.float32)
    xhn = tl.load(xh_ptr + sc_off + t0 * D, mask=m2, other=0.0).to(tl.float32)
    dgyn = tl.load(dgy_ptr + sc_off + t0 * D, mask=m2, other=0.0).to(tl.float32)
    dzn = tl.load(dz_ptr + sc_off + t0 * D, mask=m2, other=0.0).to(tl.float32)
    dkn = tl.load(dka_ptr + sc_off + t0 * D, mask=m2, other=0.0).to(tl.float32)
    for n in range(n0, n1):
        t0 = n * MB
        tm, m2 = _mb_masks(t0, rt, L, cmask, MB)
        tau_e = tl.where(t0 + MB <= L, tau_b, 0.0)
        k = kn.to(tl.float32)
        v = vn.to(tl.float32)
        lr = lrn.to(tl.float32)
        G = gn
        xh = xhn
        dgy = dgyn
        dZ = dzn
        dk = dkn
        t1 = tl.minimum(n + 1, n1 - 1) * MB
        tm1, m21 = _mb_masks(t1, rt, L, cmask, MB)
        kn = tl.load(k_ptr + in_base + t1 * s_t + in_off, mask=m21, other=0.0)
        vn = tl.load(v_ptr + in_base + t1 * s_t + in_off, mask=m21, other=0.0)
        lrn = tl.load(lr_ptr + lr_base + (t1 + rt) * l_t, mask=tm1, other=0.0)
        gn = tl.load(g_ptr + sc_off + t1 * D, mask=m21, other=0.0).to(tl.float32)
        xhn = tl.load(xh_ptr + sc_off + t1 * D, mask=m21, other=0.0).to(tl.float32)
        dgyn = tl.load(dgy_ptr + sc_off + t1 * D, mask=m21, other=0.0).to(tl.float32)
        dzn = tl.load(dz_ptr + sc_off + t1 * D, mask=m21, other=0.0).to(tl.float32)
        dkn = tl.load(dka_ptr + sc_off + t1 * D, mask=m21, other=0.0).to(tl.float32)
        dk += gam[None, :] * dgy + _dot(dZ, tl.trans(W), DOT_MODE)
        optr = out_base + t0 * o_t + out_off
        tl.store(dk_ptr + optr, dk.to(dk_ptr.dtype.element_ty), mask=m2)
        tl.store(dv_ptr + optr, (-gam[None, :] * dgy).to(dv_ptr.dtype.element_ty), mask=m2)
        dgam += tl.sum(dgy * (2.0 * gam[None, :] * xh + bet[None, :] - (v - k)), axis=0)
        dbet += tl.sum(dgy * gam[None, :], axis=0)
        W -= _dot(tl.trans(k), (tau_e * lr)[:, None] * G, DOT_MODE)
    tl.store(dtau_ptr + pid2 * BT + rt, tl.where(rt == MB - 1, tl.sum(dtau_b, axis=0), 0.0))
    tl.store(dlnw_ptr + pid2 * BD + rd, dgam)
    tl.store(dlnb_ptr + pid2 * BD + rd, dbet)


LEAN_MAX_PROGRAMS = 64  # the lean chain when B*H <= this (the chain's latency dominates), else the full chain
# Time segments of the pipelined launch: rows of at most SHORT_GROUPS checkpoint groups (T <= 2048 at b 16, group 8)
# take one (a short chain hides little of the parallel passes, and each segment adds three launches and two events
# of host time: B16 T2048 H12 backward 2.26-2.44 ms in one segment against 2.90-2.99 in four, H200), longer ones
# SEGMENTS (B4 T8192 H12: 2.28 ms in four against 2.56 in one).
SHORT_GROUPS = 16
SEGMENTS = 4


# The dtypes the scratch rows between the passes may take (`scratch_dtype`): fp32, or bf16 (half the bytes; the
# kernels compute in fp32 either way, each stored value rounded once to bf16). Measured (H100, docs/kernels_notes.md):
# bf16 takes the 125m layer's backward kernels from 1.13 to 0.95 ms at B16 T2k and 2.10 to 1.74 at B4 T8k, at
# gradient errors against fp32 of 2-5e-3 (against 2-4e-3 with fp32 rows; dtau, a sum with cancellation, up to 2x
# more); so bf16 is the default for bf16 inputs. fp16 inputs keep fp32 rows (bf16 rows raised their gradients'
# error about tenfold: fp16's 10-bit mantissa leaves the rows' rounding dominant).
SCRATCH = {"fp32": torch.float32, "bf16": torch.bfloat16}


def scratch_dtype(scratch: str | None, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype of the [rows, T, d] scratch tensors for a `SCRATCH` name (None: bf16 for bf16 inputs, else fp32)
    and inputs of `dtype`; a one-line error for another name."""
    if scratch is None:
        return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    if scratch not in SCRATCH:
        raise ValueError(f"LinearKernels.bwd_scratch: expected one of {tuple(SCRATCH)} or None, got {scratch!r}")
    return SCRATCH[scratch]


# (pre, chain, post) warps. Measured on the H200 (docs/kernels_notes.md): 4 everywhere (the full chain alone ran
# faster at 8 with few programs, but with the pipelined launch 4 won at B*H >= 128)
WARPS = (4, 4, 4)


def plan(n: int, H: int, nck: int, lean: bool | None, segments: int | None) -> tuple[bool, int]:
    """(lean, segments) of a backward over n rows x H heads of nck checkpoint groups (the longest row's), the
    defaults filled in: lean when n*H <= LEAN_MAX_PROGRAMS (measured: lean wins where the chain dominates, full
    where the parallel passes do); one segment for at most SHORT_GROUPS groups, else SEGMENTS; never more
    segments than groups."""
    if lean is None:
        lean = n * H <= LEAN_MAX_PROGRAMS
    if segments is None:
        segments = 1 if nck <= SHORT_GROUPS else SEGMENTS
    return lean, max(1, min(segments, nck))


def bwd_parts(q, k, v, lr, tau, ln_weight, ln_bias, ckpt, do, dwT, dcT, mini_batch, group, *, dot_mode, eps,
              warps=None, info=None, lean=None, segments=None, rows: Rows | None = None, gluon: bool = False,
              scratch: str | None = None):
    """The split backward's launches (`chunk.bwd` is its contract): dq, dk, dv, dW0, dc0 and the passes' partial
    sums of dlr, dtau, dln_w, dln_b, which `sums` adds up (apart, so that the op's autograd formula traces them
    under torch.compile: Inductor fuses what would be a dozen eager reductions per call). warps: (pre, chain,
    post), None for `WARPS`. lean: the chain carries only the recurrence (dk's dW'-terms, dlr/dtau_b, dv,
    dgam/dbet in the post pass, from (dW, dc) stored per group) instead of computing them itself. segments: the
    checkpoint groups are cut into this many time segments, processed from the last: on CUDA the chain of
    segment s runs on a high-priority side stream while the pre pass of segment s - 1 and the post pass of
    segment s + 1 run beside it (the chain of N*H programs leaves most of the GPU free). None for either: `plan`.
    rows: the forward's `Rows` (None: every batch entry whole); per-group launches cover the longest row's groups
    (the programs of a shorter row's missing groups do nothing). gluon: the three launches (the full chain's) as
    `walks_gluon`'s kernels (warps: theirs unless given, `walks_gluon.launch`; the caller checked what they take).
    scratch: the dtype of the [rows, T, d] scratch rows between the passes (`scratch_dtype`)."""
    B, T, H, d = q.shape
    rows = rows or batch_rows(B, T, mini_batch, group, q.device)
    N = rows.n
    # the Gluon launches' options, pre / chain / post (warps None: theirs), checked once before anything launches
    gl_opts = [walks_gluon.launch(d, w, "LinearKernels.bwd_warps") for w in warps or (None,) * 3] if gluon else None
    warps = warps or WARPS
    b = mini_batch
    nck = rows.nck
    lean, nseg = plan(N, H, nck, lean, segments)
    bounds = [s * nck // nseg for s in range(nseg + 1)]  # group bounds of the segments
    BD, BT = tile(d), tile(b)
    ckw, ckc = ckpt
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    fill = torch.empty if rows.covered else torch.zeros  # tokens in no row get zero gradients
    dq, dk, dv = (fill((B, T, H, d), dtype=q.dtype, device=dev) for _ in range(3))
    SR = H if rows.packed else B * H  # scratch rows: per head, every row's tokens at their own positions
    sdt = dict(dtype=scratch_dtype(scratch, q.dtype), device=dev)
    xh, dg0, dzb, dka, dz, dkb = (torch.empty((SR, T, d), **sdt) for _ in range(6))
    gg = torch.empty((SR, T, d), **sdt)  # lean: G from the pre pass; full: the chain's dgy
    rs = torch.empty((SR, T), **f32)
    dlra, dlrb = (fill((SR, T), **f32) for _ in range(2))
    # partial sums per (row, head, group), the pre pass's (a) and the later one's (b), in two buffers that one
    # reduction each adds up (`sums`): dtau's [a, b] (b the lean post's or the full chain's, which walks a shorter
    # row's groups only: zeros first), the LN weights' [w_a, w_b, b_a, b_b] (b: the post pass's)
    tparts = (torch.empty if lean else torch.zeros)((2, N * H * nck, BT), **f32)
    lparts = torch.empty((4, N * H * nck, BD), **f32)
    dtau_a, dtau_b = tparts.unbind(0)
    dlnw_a, dlnw_b, dlnb_a, dlnb_b = lparts.unbind(0)
    dw0 = torch.empty((N, H, d, d), **f32)
    dc0 = torch.empty((N, H, d), **f32)
    cw, cc = (torch.empty((N, H, d, d), **f32), torch.empty((N, H, d), **f32)) if nseg > 1 else (dw0, dc0)
    if lean:
        bw = torch.empty((rows.slots * H, d, d), **f32)
        bc = torch.empty((rows.slots * H, d), **f32)
    strides = (*rows.strides(q), *rows.strides(lr), *rows.strides(dq), 0 if rows.packed else H)
    meta = dict(D=d, BD=BD, MB=b, BT=BT, DOT_MODE=dot_mode)
    span = rows.span
    launched = {}

    def pre(s):
        g0, ng = bounds[s], bounds[s + 1] - bounds[s]
        args = (q, k, v, lr, tau, ln_weight, ln_bias, ckw, ckc, do,
                dq, xh, gg, rs, dg0, dzb, dka, dlra, dtau_a, dlnw_a, dlnb_a, span, *strides, H, nck, T, g0, ng)
        if gluon:
            launched["ttt_linear_bwd_pre"] = walks_gluon._pre_kernel[(N * H * ng,)](
                *args, D=d, MB=b, GROUP=group, EPS=eps, STORE_G=lean, **gl_opts[0])
        else:
            launched["ttt_linear_bwd_pre"] = _pre_kernel[(N * H * ng,)](
                *args, GROUP=group, EPS=eps, STORE_G=lean, num_warps=warps[0], **meta)

    def chain(s):
        n_lo, n_hi = bounds[s] * group, min(bounds[s + 1] * group, rows.nmb)
        wi, ci = (dwT, dcT) if s == nseg - 1 else (cw, cc)
        lim = 0 if wi is None else d * d  # the chain starts from zeros where the final state has no gradient
        wi, ci = (dw0, dc0) if wi is None else (wi, ci)  # (then never read)
        wo, co = (dw0, dc0) if s == 0 else (cw, cc)
        if gluon:
            launched["ttt_linear_bwd_chain"] = walks_gluon._chain_kernel[(N * H,)](
                q, k, v, lr, tau, ln_weight, ln_bias, xh, rs, dg0, dzb, wi, ci,
                dz, dkb, gg, dlrb, wo, co, dtau_b, span,
                *strides[:6], strides[-1], H, nck, T, n_lo, n_hi, lim, D=d, MB=b, GROUP=group, **gl_opts[1])
        elif lean:
            launched["ttt_linear_bwd_chain"] = _chain_lean_kernel[(N * H,)](
                q, k, v, lr, tau, ln_weight, ln_bias, xh, gg, rs, dg0, dzb, wi, ci,
                dz, dkb, bw, bc, wo, co, span, *strides[:6], strides[-1], H, T, n_lo, n_hi, lim, GROUP=group,
                num_warps=warps[1], **meta)
        else:
            launched["ttt_linear_bwd_chain"] = _chain_kernel[(N * H,)](
                q, k, v, lr, tau, ln_weight, ln_bias, xh, rs, dg0, dzb, wi, ci,
                dz, dkb, gg, dlrb, wo, co, dtau_b, span,
                *strides[:6], strides[-1], H, nck, T, n_lo, n_hi, lim, GROUP=group, num_warps=warps[1], **meta)

    def post(s):
        g0, ng = bounds[s], bounds[s + 1] - bounds[s]
        if lean:
            launched["ttt_linear_bwd_post"] = _post_lean_kernel[(N * H * ng,)](
                q, k, v, lr, tau, ln_weight, ln_bias, ckw, bw, bc, xh, gg, dzb, dz, dkb, dka,
                dk, dv, dlrb, dtau_b, dlnw_b, dlnb_b, span,
                *strides, H, nck, T, g0, ng, GROUP=group, num_warps=warps[2], **meta)
        else:
            args = (k, v, lr, tau, ln_weight, ln_bias, ckw, ckc, dz, dkb, dka, gg, dk, dv, dlnw_b, dlnb_b, span,
                    *strides, H, nck, T, g0, ng)
            if gluon:
                launched["ttt_linear_bwd_post"] = walks_gluon._post_kernel[(N * H * ng,)](
                    *args, D=d, MB=b, GROUP=group, EPS=eps, **gl_opts[2])
            else:
                launched["ttt_linear_bwd_post"] = _post_kernel[(N * H * ng,)](
                    *args, GROUP=group, EPS=eps, num_warps=warps[2], **meta)

    if dev.type == "cuda" and nseg > 1:
        main = torch.cuda.current_stream(dev)
        # the side streams come from PyTorch's per-device stream pools (nothing is created or kept here)
        s_chain, s_post = torch.cuda.Stream(dev, priority=-1), torch.cuda.Stream(dev)
        s_chain.wait_stream(main)
        s_post.wait_stream(main)
        for s in reversed(range(nseg)):
            pre(s)
            e = main.record_event()
            with torch.cuda.stream(s_chain):
                s_chain.wait_event(e)
                chain(s)
                e = s_chain.record_event()
            with torch.cuda.stream(s_post):
                s_post.wait_event(e)
                post(s)
        main.wait_stream(s_chain)
        main.wait_stream(s_post)
    else:
        for s in reversed(range(nseg)):
            pre(s)
            chain(s)
            post(s)
    if info is not None:
        info.update(launched)
    return dq, dk, dv, dw0, dc0, (dlra, dlrb, tparts, lparts)


def sums(parts, B: int, H: int, b: int, d: int, N: int):
    """dlr [B,T,H], dtau [b], dln_w, dln_b [H,d] from `bwd_parts`' partial sums (N rows): dlra, dlrb [SR, T];
    tparts [2, N*H*groups, BT] (dtau's, a and b); lparts [4, N*H*groups, BD] (dln_w's a and b, then dln_b's)."""
    dlra, dlrb, tparts, lparts = parts
    T, BD = dlra.shape[1], lparts.shape[-1]
    dlr = (dlra + dlrb).view(B, H, T).transpose(1, 2).contiguous()  # [SR, T] = [B*H, T] (packed: [H, T], B = 1)
    dtau = tparts.sum((0, 1))[:b]
    # [4, N*H*groups, BD] -> [w|b, a|b, N, H, groups, BD], summed over the passes, rows and groups: [w|b, H, BD]
    ln = lparts.view(2, 2, N, H, -1, BD).sum((1, 2, 4))
    return dlr, dtau, ln[0, :, :d], ln[1, :, :d]
