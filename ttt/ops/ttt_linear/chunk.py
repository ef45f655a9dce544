"""TTT-Linear mini-batch dual form as Triton kernels: forward and hand-derived backward.

Mirrors `ttt/ops/ttt_linear/dual.py` (SPEC section 4) on whole, aligned mini-batches whose start state
has a zero accumulator; `ttt/ops/triton_backend.py` runs the partial pieces at either end with the
PyTorch dual form and calls these kernels on the aligned middle.

One program per (batch, head) walks the sequence one mini-batch (b rows, padded to BT >= 16) at a time.
What stays on chip: the inner weights W (d x d, fp32) and bias c (fp32) live in registers for the whole
sequence; q, k, v, lr of a mini-batch are read once, o written once. The head dim is padded to a power
of two BD with masks (d = 96 -> BD = 128); padded rows (b < 16) get lr = 0 and are never stored.
All statistics and the state are fp32; matrix products take fp32 operands (tf32 or full fp32, by
DOT_MODE) or the inputs' 16-bit dtype.

Backward: the forward saves (W, c) at the start of every GROUP mini-batches (not every mini-batch).
The backward walks the groups in reverse: it recomputes the group's per-mini-batch start weights from
the checkpoint into a small per-program scratch (GROUP x d x d), then walks the group's mini-batches in
reverse, carrying dW, dc (the gradient w.r.t. the weights after the mini-batch) in registers.
Per mini-batch, with x^ = LN-normalised rows, s = their std, gy = gam (gam x^ + bet - (v - k)),
G = (gy - mean gy - x^ mean(gy x^)) / s, P = E * (Q K^T + 1), Zb = Q W + c - P G, o = q + LN(Zb),
W' = W - K^T (e_b G), c' = c - sum e_b G  (e_b = tau_b lr):
  dZb = LN-backward(dO gam)                      dgam += dO x^b, dbet += dO
  dQ = dO + dZb W^T + (dP*E) K    dP = -dZb G^T   dG = -P^T dZb - e_b (K dW' + dc')
  dK = -(e_b G) dW'^T + (dP*E)^T Q + gam dgy + dZ W^T,   dV = -gam dgy
  dgy = (dG - mean dG - x^ mean(dG x^)) / s,  dx^ = (-mean(gy x^) dG - mean(dG x^) gy) / s + gam^2 dgy
  ds = -sum(dG G) / s,  dZ = (dx^ - mean dx^ - x^ mean(dx^ x^)) / s + ds x^ / d
  dW = dW' + Q^T dZb + K^T dZ,  dc = dc' + sum dZb + sum dZ
  dE = dP * (Q K^T + 1) (lower triangle) -> dtau_i, dlr_j;  e_b -> dlr_j, dtau_b.

Backward kernels (BWD_IMPL, or the environment variable TTT_LINEAR_BWD): the same formulas, three schedules.
  v1: the recompute pass keeps only each mini-batch's (W, c); the walk back re-does the inner forward
      (Z = K W + c, its LN statistics, G) and then the backward: 2 + 14 products and 4 + 17 row reductions
      (LN statistics and LN backward sums) per mini-batch, 7 column sums.
  v2 (default): the recompute pass also keeps, per mini-batch, G, x^, a = gy / gam and dO (one interleaved
      [BT, BD, 4] fp32 tile), W as a dot operand (16-bit for 16-bit products) and the row vectors 1/s,
      mean(gy x^); the walk back skips the inner forward. Identities
      that save row reductions or products (exact in real arithmetic, rounding-level differences only):
        c of a mini-batch's start is rebuilt on the walk back, c = c' + sum e_b G (c is not kept);
        LN(Zb) statistics in one reduction (Chan's merge of mean and squared deviations);
        sum dx^ = (-mean(gy x^) sum dG - mean(dG x^) sum gy + sum gam^2 dG - mean(dG) sum gam^2
                   - mean(dG x^) sum gam^2 x^) / s,
        sum dx^ x^ = (-mean(gy x^) sum dG x^ - d mean(dG x^) mean(gy x^) + sum gam^2 dG x^
                      - mean(dG) sum gam^2 x^ - mean(dG x^) sum gam^2 x^2) / s,
      so all row sums of the LN-L2 backward (with sum gy, sum gam^2 x^, sum gam^2 x^2, and
      sum (K dW' + dc') G for dlr) are one 9-way reduction;
        (e_b G) dW'^T = e_b (G dW'^T) (G's 16-bit copy shared by P G, dZb G^T and this product);
        Q^T dZb + K^T dZ = [Q; K]^T [dZb; dZ] (one product with inner dim 2 BT);
      the column sums for dgam, dbet, dtau are accumulated as tiles and reduced once at the end.
      Per mini-batch: 2 + 12 products, 3 + 3 row reductions (one of them 9-way), 2 column sums.
  v3 (experimental): v2's recompute of group g - 1 interleaved with the walk back through group g in one
      loop body (double-buffered scratch), their row reductions merged: 3 reductions per step for both.
Offline H100 compile (Triton 3.6, sm_90, d = 64, bf16, 8 warps, arguments specialized as at B4 T8192 H32),
SASS per mini-batch step (recompute + walk back): v1 110 barriers / 1660 instructions, v2 51 / 1770,
v3 42 / 2060 (more register spills: 640 B vs 110 B). v2 and v3 also prefetch the recompute's loads.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LN_EPS = 1e-6
LAST = {}  # the last compiled launch of each kernel (its n_regs / n_spills for reports)
DOT_MODE = None  # None: by input dtype (see _dot_mode); an int forces one (benchmarks compare variants)


@triton.jit
def _dot(a, b, DOT_MODE: tl.constexpr):
    """a @ b with fp32 accumulation. DOT_MODE 0: full fp32, 1: tf32, 2: bf16 operands, 3: fp16 operands."""
    if DOT_MODE == 0:
        return tl.dot(a, b, input_precision="ieee")
    elif DOT_MODE == 1:
        return tl.dot(a, b, input_precision="tf32")
    elif DOT_MODE == 2:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))


@triton.jit
def _op(x, DOT_MODE: tl.constexpr):
    """x in the dtype _dot multiplies in; cast once so that a tile and its transpose share one copy."""
    if DOT_MODE == 2:
        return x.to(tl.bfloat16)
    elif DOT_MODE == 3:
        return x.to(tl.float16)
    else:
        return x.to(tl.float32)


@triton.jit
def _center(x, cmask, D: tl.constexpr):
    """Row-wise (x - mean) over the first D columns, zero on the padded columns."""
    mu = tl.sum(x, axis=1) / D
    return tl.where(cmask[None, :], x - mu[:, None], 0.0)


@triton.jit
def _proj(g, xh, rstd, cmask, D: tl.constexpr):
    """(g - mean g - xh mean(g xh)) * rstd, row-wise, zero on padded columns: the LayerNorm backward."""
    mg = tl.sum(g, axis=1) / D
    mgx = tl.sum(g * xh, axis=1) / D
    return tl.where(cmask[None, :], (g - mg[:, None] - xh * mgx[:, None]) * rstd[:, None], 0.0)


@triton.jit
def _inner(k, v, W, c, gam, bet, cmask, D: tl.constexpr, DOT_MODE: tl.constexpr):
    """Inner forward at the start weights and the closed-form LN-L2 gradient.
    Returns G [BT,BD], xh, rstd, gy, mgx = mean(gy xh)."""
    Z = _dot(k, W, DOT_MODE) + c[None, :]
    zc = _center(Z, cmask, D)
    rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, axis=1) / D + 1e-6)
    xh = zc * rstd[:, None]
    gy = gam[None, :] * (gam[None, :] * xh + bet[None, :] - (v - k))
    mg = tl.sum(gy, axis=1) / D
    mgx = tl.sum(gy * xh, axis=1) / D
    G = tl.where(cmask[None, :], (gy - mg[:, None] - xh * mgx[:, None]) * rstd[:, None], 0.0)
    return G, xh, rstd, gy, mgx


@triton.jit
def ttt_linear_fwd_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, w0_ptr, c0_ptr,
    o_ptr, wT_ptr, cT_ptr, ckw_ptr, ckc_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h, o_b, o_t, o_h,
    H, NMB, NCK,
    D: tl.constexpr, BD: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr, GROUP: tl.constexpr,
    SAVE: tl.constexpr, DOT_MODE: tl.constexpr,
):
    pid = tl.program_id(0)
    bi = pid // H
    hi = pid % H
    rt = tl.arange(0, BT)
    rd = tl.arange(0, BD)
    cmask = rd < D
    tmask = rt < MB
    m2 = tmask[:, None] & cmask[None, :]
    wmask = cmask[:, None] & cmask[None, :]
    woff = rd[:, None] * D + rd[None, :]

    W = tl.load(w0_ptr + pid * D * D + woff, mask=wmask, other=0.0)
    c = tl.load(c0_ptr + pid * D + rd, mask=cmask, other=0.0)
    gam = tl.load(lnw_ptr + hi * D + rd, mask=cmask, other=0.0).to(tl.float32)
    bet = tl.load(lnb_ptr + hi * D + rd, mask=cmask, other=0.0).to(tl.float32)
    tau_r = tl.load(tau_ptr + rt, mask=tmask, other=0.0).to(tl.float32)
    tau_b = tl.load(tau_ptr + MB - 1).to(tl.float32)
    causal = (rt[:, None] >= rt[None, :]) & tmask[None, :]

    in_base = bi * s_b + hi * s_h
    in_off = rt[:, None] * s_t + rd[None, :]
    out_off = rt[:, None] * o_t + rd[None, :]
    lr_base = bi * l_b + hi * l_h
    # software pipeline: the loads of mini-batch n + 1 are issued before the math of mini-batch n
    qn = tl.load(q_ptr + in_base + in_off, mask=m2, other=0.0)
    kn = tl.load(k_ptr + in_base + in_off, mask=m2, other=0.0)
    vn = tl.load(v_ptr + in_base + in_off, mask=m2, other=0.0)
    lrn = tl.load(lr_ptr + lr_base + rt * l_t, mask=tmask, other=0.0)
    for n in range(NMB):
        if SAVE:
            if n % GROUP == 0:
                ck = pid * NCK + n // GROUP
                tl.store(ckw_ptr + ck * D * D + woff, W, mask=wmask)
                tl.store(ckc_ptr + ck * D + rd, c, mask=cmask)
        t0 = n * MB
        t1 = tl.minimum(n + 1, NMB - 1) * MB
        q = qn.to(tl.float32)
        k = kn.to(tl.float32)
        v = vn.to(tl.float32)
        lr = lrn.to(tl.float32)
        qn = tl.load(q_ptr + in_base + t1 * s_t + in_off, mask=m2, other=0.0)
        kn = tl.load(k_ptr + in_base + t1 * s_t + in_off, mask=m2, other=0.0)
        vn = tl.load(v_ptr + in_base + t1 * s_t + in_off, mask=m2, other=0.0)
        lrn = tl.load(lr_ptr + lr_base + (t1 + rt) * l_t, mask=tmask, other=0.0)

        G, xh, rstd, gy, mgx = _inner(k, v, W, c, gam, bet, cmask, D, DOT_MODE)
        E = tl.where(causal, tau_r[:, None] * lr[None, :], 0.0)
        P = E * (_dot(q, tl.trans(k), DOT_MODE) + 1.0)
        Zb = _dot(q, W, DOT_MODE) + c[None, :] - _dot(P, G, DOT_MODE)
        zc = _center(Zb, cmask, D)
        rstdb = 1.0 / tl.sqrt(tl.sum(zc * zc, axis=1) / D + 1e-6)
        o = q + zc * rstdb[:, None] * gam[None, :] + bet[None, :]
        tl.store(o_ptr + bi * o_b + hi * o_h + t0 * o_t + out_off, o.to(o_ptr.dtype.element_ty), mask=m2)

        eG = (tau_b * lr)[:, None] * G
        W -= _dot(tl.trans(k), eG, DOT_MODE)
        c -= tl.sum(eG, axis=0)
    tl.store(wT_ptr + pid * D * D + woff, W, mask=wmask)
    tl.store(cT_ptr + pid * D + rd, c, mask=cmask)


@triton.jit
def ttt_linear_bwd_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, ckw_ptr, ckc_ptr,
    do_ptr, dwT_ptr, dcT_ptr,
    dq_ptr, dk_ptr, dv_ptr, dlr_ptr, dw0_ptr, dc0_ptr, dtau_ptr, dlnw_ptr, dlnb_ptr,
    scw_ptr, scc_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h, o_b, o_t, o_h,
    H, NMB, NCK,
    D: tl.constexpr, BD: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr, GROUP: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    pid = tl.program_id(0)
    bi = pid // H
    hi = pid % H
    rt = tl.arange(0, BT)
    rd = tl.arange(0, BD)
    cmask = rd < D
    tmask = rt < MB
    m2 = tmask[:, None] & cmask[None, :]
    wmask = cmask[:, None] & cmask[None, :]
    woff = rd[:, None] * D + rd[None, :]

    gam = tl.load(lnw_ptr + hi * D + rd, mask=cmask, other=0.0).to(tl.float32)
    bet = tl.load(lnb_ptr + hi * D + rd, mask=cmask, other=0.0).to(tl.float32)
    tau_r = tl.load(tau_ptr + rt, mask=tmask, other=0.0).to(tl.float32)
    tau_b = tl.load(tau_ptr + MB - 1).to(tl.float32)
    causal = (rt[:, None] >= rt[None, :]) & tmask[None, :]

    dW = tl.load(dwT_ptr + pid * D * D + woff, mask=wmask, other=0.0)
    dc = tl.load(dcT_ptr + pid * D + rd, mask=cmask, other=0.0)
    dgam = tl.zeros([BD], dtype=tl.float32)
    dbet = tl.zeros([BD], dtype=tl.float32)
    dtau = tl.zeros([BT], dtype=tl.float32)
    dtau_b = tl.zeros([BT], dtype=tl.float32)

    in_base = bi * s_b + hi * s_h
    in_off = rt[:, None] * s_t + rd[None, :]
    out_base = bi * o_b + hi * o_h
    out_off = rt[:, None] * o_t + rd[None, :]
    sc_base = pid * GROUP
    lr_base = bi * l_b + hi * l_h
    for gi in range(NCK):
        g = NCK - 1 - gi
        n0 = g * GROUP
        n1 = tl.minimum(n0 + GROUP, NMB)
        # recompute the start weights of every mini-batch of the group into the scratch
        W = tl.load(ckw_ptr + (pid * NCK + g) * D * D + woff, mask=wmask, other=0.0)
        c = tl.load(ckc_ptr + (pid * NCK + g) * D + rd, mask=cmask, other=0.0)
        for n in range(n0, n1):
            tl.store(scw_ptr + (sc_base + n - n0) * D * D + woff, W, mask=wmask)
            tl.store(scc_ptr + (sc_base + n - n0) * D + rd, c, mask=cmask)
            t0 = n * MB
            ptr = in_base + t0 * s_t + in_off
            k = tl.load(k_ptr + ptr, mask=m2, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + ptr, mask=m2, other=0.0).to(tl.float32)
            lr = tl.load(lr_ptr + lr_base + (t0 + rt) * l_t, mask=tmask, other=0.0).to(tl.float32)
            G, xh, rstd, gy, mgx = _inner(k, v, W, c, gam, bet, cmask, D, DOT_MODE)
            eG = (tau_b * lr)[:, None] * G
            W -= _dot(tl.trans(k), eG, DOT_MODE)
            c -= tl.sum(eG, axis=0)
        tl.debug_barrier()
        # walk the group back
        # software pipeline over the reverse walk: loads of the next (earlier) mini-batch go out first
        n = n1 - 1
        ptr = in_base + n * MB * s_t + in_off
        qn = tl.load(q_ptr + ptr, mask=m2, other=0.0)
        kn = tl.load(k_ptr + ptr, mask=m2, other=0.0)
        vn = tl.load(v_ptr + ptr, mask=m2, other=0.0)
        lrn = tl.load(lr_ptr + lr_base + (n * MB + rt) * l_t, mask=tmask, other=0.0)
        dOn = tl.load(do_ptr + out_base + n * MB * o_t + out_off, mask=m2, other=0.0)
        Wn = tl.load(scw_ptr + (sc_base + n - n0) * D * D + woff, mask=wmask, other=0.0)
        cn = tl.load(scc_ptr + (sc_base + n - n0) * D + rd, mask=cmask, other=0.0)
        for ni in range(n1 - n0):
            n = n1 - 1 - ni
            t0 = n * MB
            W = Wn
            c = cn
            q = qn.to(tl.float32)
            k = kn.to(tl.float32)
            v = vn.to(tl.float32)
            lr = lrn.to(tl.float32)
            dO = dOn.to(tl.float32)
            m = tl.maximum(n - 1, n0)
            ptr = in_base + m * MB * s_t + in_off
            qn = tl.load(q_ptr + ptr, mask=m2, other=0.0)
            kn = tl.load(k_ptr + ptr, mask=m2, other=0.0)
            vn = tl.load(v_ptr + ptr, mask=m2, other=0.0)
            lrn = tl.load(lr_ptr + lr_base + (m * MB + rt) * l_t, mask=tmask, other=0.0)
            dOn = tl.load(do_ptr + out_base + m * MB * o_t + out_off, mask=m2, other=0.0)
            Wn = tl.load(scw_ptr + (sc_base + m - n0) * D * D + woff, mask=wmask, other=0.0)
            cn = tl.load(scc_ptr + (sc_base + m - n0) * D + rd, mask=cmask, other=0.0)

            # forward recompute
            G, xh, rstd, gy, mgx = _inner(k, v, W, c, gam, bet, cmask, D, DOT_MODE)
            E = tl.where(causal, tau_r[:, None] * lr[None, :], 0.0)
            QK1 = _dot(q, tl.trans(k), DOT_MODE) + 1.0
            P = E * QK1
            Zb = _dot(q, W, DOT_MODE) + c[None, :] - _dot(P, G, DOT_MODE)
            zcb = _center(Zb, cmask, D)
            rstdb = 1.0 / tl.sqrt(tl.sum(zcb * zcb, axis=1) / D + 1e-6)
            xhb = zcb * rstdb[:, None]

            # output LayerNorm
            dgam += tl.sum(dO * xhb, axis=0)
            dbet += tl.sum(dO, axis=0)
            dZb = _proj(dO * gam[None, :], xhb, rstdb, cmask, D)
            # Zb = Q W + c - P G
            dq = dO + _dot(dZb, tl.trans(W), DOT_MODE)
            dP = -_dot(dZb, tl.trans(G), DOT_MODE)
            dG = -_dot(tl.trans(P), dZb, DOT_MODE)
            # carry W' = W - K^T (e_b G), c' = c - sum e_b G
            eb = tau_b * lr
            KdW = _dot(k, dW, DOT_MODE) + dc[None, :]
            S = tl.sum(KdW * G, axis=1)
            dG -= eb[:, None] * KdW
            dk = -_dot(eb[:, None] * G, tl.trans(dW), DOT_MODE)
            dlr = -tau_b * S
            dtau_b += -lr * S
            # P = E * (Q K^T + 1)
            dE = tl.where(causal, dP * QK1, 0.0)
            dA = dP * E
            dq += _dot(dA, k, DOT_MODE)
            dk += _dot(tl.trans(dA), q, DOT_MODE)
            dtau += tl.sum(dE * lr[None, :], axis=1)
            dlr += tl.sum(dE * tau_r[:, None], axis=0)
            # G = LN-L2 gradient at Z = K W + c
            dgy = _proj(dG, xh, rstd, cmask, D)
            mdgx = tl.sum(dG * xh, axis=1) / D
            dxh = (-mgx[:, None] * dG - mdgx[:, None] * gy) * rstd[:, None] + (gam * gam)[None, :] * dgy
            ds = -tl.sum(dG * G, axis=1) * rstd
            dZ = _proj(dxh, xh, rstd, cmask, D) + (ds / D)[:, None] * xh
            dgam += tl.sum(dgy * (2.0 * gam[None, :] * xh + bet[None, :] - (v - k)), axis=0)
            dbet += tl.sum(dgy * gam[None, :], axis=0)
            dv = -gam[None, :] * dgy
            dk += gam[None, :] * dgy + _dot(dZ, tl.trans(W), DOT_MODE)
            # gradient w.r.t. the start weights of this mini-batch
            dW += _dot(tl.trans(q), dZb, DOT_MODE) + _dot(tl.trans(k), dZ, DOT_MODE)
            dc += tl.sum(dZb, axis=0) + tl.sum(dZ, axis=0)

            optr = out_base + t0 * o_t + out_off
            tl.store(dq_ptr + optr, dq.to(dq_ptr.dtype.element_ty), mask=m2)
            tl.store(dk_ptr + optr, dk.to(dk_ptr.dtype.element_ty), mask=m2)
            tl.store(dv_ptr + optr, dv.to(dv_ptr.dtype.element_ty), mask=m2)
            tl.store(dlr_ptr + (bi * NMB * MB + t0 + rt) * H + hi, dlr, mask=tmask)
        tl.debug_barrier()
    tl.store(dw0_ptr + pid * D * D + woff, dW, mask=wmask)
    tl.store(dc0_ptr + pid * D + rd, dc, mask=cmask)
    dtau += tl.where(rt == MB - 1, tl.sum(dtau_b, axis=0), 0.0)
    tl.store(dtau_ptr + pid * BT + rt, dtau)
    tl.store(dlnw_ptr + pid * BD + rd, dgam)
    tl.store(dlnb_ptr + pid * BD + rd, dbet)


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _add3(a0, a1, a2, b0, b1, b2):
    return a0 + b0, a1 + b1, a2 + b2


@triton.jit
def _chan(m_a, q_a, n_a, m_b, q_b, n_b):
    """Merge two (mean, sum of squared deviations, count) partials (Chan et al.): a stable one-pass variance."""
    n = n_a + n_b
    w = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
    d = m_b - m_a
    return m_a + d * w, q_a + q_b + d * d * n_a * w, n


@triton.jit
def _add9(a0, a1, a2, a3, a4, a5, a6, a7, a8, b0, b1, b2, b3, b4, b5, b6, b7, b8):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3, a4 + b4, a5 + b5, a6 + b6, a7 + b7, a8 + b8


@triton.jit
def ttt_linear_bwd_kernel_v2(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, ckw_ptr, ckc_ptr,
    do_ptr, dwT_ptr, dcT_ptr,
    dq_ptr, dk_ptr, dv_ptr, dlr_ptr, dw0_ptr, dc0_ptr, dtau_ptr, dlnw_ptr, dlnb_ptr,
    scw_ptr, scp_ptr, scs_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h, o_b, o_t, o_h,
    H, NMB, NCK,
    D: tl.constexpr, BD: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr, GROUP: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    pid = tl.program_id(0)
    bi = pid // H
    hi = pid % H
    rt = tl.arange(0, BT)
    rd = tl.arange(0, BD)
    cmask = rd < D
    tmask = rt < MB
    m2 = tmask[:, None] & cmask[None, :]
    wmask = cmask[:, None] & cmask[None, :]
    woff = rd[:, None] * D + rd[None, :]
    TILE: tl.constexpr = BT * BD
    toff = rt[:, None] * BD + rd[None, :]  # a whole [BT, BD] scratch tile (padding included, no mask)
    r2 = tl.arange(0, 2)
    # four [BT, BD] tiles interleaved element by element ([BT, BD, 2, 2]: one vector access per element)
    poff = (toff[:, :, None, None] * 2 + r2[None, None, :, None]) * 2 + r2[None, None, None, :]

    gam = tl.load(lnw_ptr + hi * D + rd, mask=cmask, other=0.0).to(tl.float32)
    bet = tl.load(lnb_ptr + hi * D + rd, mask=cmask, other=0.0).to(tl.float32)
    tau_r = tl.load(tau_ptr + rt, mask=tmask, other=0.0).to(tl.float32)
    tau_b = tl.load(tau_ptr + MB - 1).to(tl.float32)
    causal = (rt[:, None] >= rt[None, :]) & tmask[None, :]
    gg = tl.sum(gam * gam, axis=0)

    dW = tl.load(dwT_ptr + pid * D * D + woff, mask=wmask, other=0.0)
    dc = tl.load(dcT_ptr + pid * D + rd, mask=cmask, other=0.0)
    # per-step column sums are deferred: accumulate whole tiles, reduce once at the end
    dgam_t = tl.zeros([BT, BD], dtype=tl.float32)
    dbet_t = tl.zeros([BT, BD], dtype=tl.float32)
    dtau_t = tl.zeros([BT, BT], dtype=tl.float32)
    dtau_b = tl.zeros([BT], dtype=tl.float32)

    in_base = bi * s_b + hi * s_h
    in_off = rt[:, None] * s_t + rd[None, :]
    out_base = bi * o_b + hi * o_h
    out_off = rt[:, None] * o_t + rd[None, :]
    sc_base = pid * GROUP
    lr_base = bi * l_b + hi * l_h
    for gi in range(NCK):
        g = NCK - 1 - gi
        n0 = g * GROUP
        n1 = tl.minimum(n0 + GROUP, NMB)
        # 1) forward over the group from its checkpoint. Per mini-batch the scratch gets the start weights W
        # as a dot operand (scw); the tiles G, x^, a = gy / gam and dO, interleaved (scp); the row vectors
        # 1/s, mean(gy x^) (scs). c is not kept: the walk back rebuilds it from the group's end, c = c' + sum e_b G
        W = tl.load(ckw_ptr + (pid * NCK + g) * D * D + woff, mask=wmask, other=0.0)
        c = tl.load(ckc_ptr + (pid * NCK + g) * D + rd, mask=cmask, other=0.0)
        # software pipeline: the loads of mini-batch n + 1 are issued before the math of mini-batch n
        ptr = in_base + n0 * MB * s_t + in_off
        kn = tl.load(k_ptr + ptr, mask=m2, other=0.0)
        vn = tl.load(v_ptr + ptr, mask=m2, other=0.0)
        lrn = tl.load(lr_ptr + lr_base + (n0 * MB + rt) * l_t, mask=tmask, other=0.0)
        dOn = tl.load(do_ptr + out_base + n0 * MB * o_t + out_off, mask=m2, other=0.0)
        for n in range(n0, n1):
            s = sc_base + n - n0
            tl.store(scw_ptr + s * D * D + woff, _op(W, DOT_MODE), mask=wmask)
            k = kn.to(tl.float32)
            v = vn.to(tl.float32)
            lr = lrn.to(tl.float32)
            dOs = dOn.to(tl.float32)
            m = tl.minimum(n + 1, n1 - 1)
            ptr = in_base + m * MB * s_t + in_off
            kn = tl.load(k_ptr + ptr, mask=m2, other=0.0)
            vn = tl.load(v_ptr + ptr, mask=m2, other=0.0)
            lrn = tl.load(lr_ptr + lr_base + (m * MB + rt) * l_t, mask=tmask, other=0.0)
            dOn = tl.load(do_ptr + out_base + m * MB * o_t + out_off, mask=m2, other=0.0)
            tl.store(scp_ptr + s * 4 * TILE + toff * 4 + 3, dOs)  # as loaded: no layout conversion
            # the inner step, as _inner (the two row sums of the G formula in one reduction)
            Z = _dot(k, W, DOT_MODE) + c[None, :]
            zc = _center(Z, cmask, D)
            rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, axis=1) / D + 1e-6)
            xh = zc * rstd[:, None]
            a = gam[None, :] * xh + bet[None, :] - (v - k)
            gy = gam[None, :] * a
            sgy, sgyx = tl.reduce((gy, gy * xh), 1, _add2)
            mgx = sgyx / D
            G = tl.where(cmask[None, :], (gy - (sgy / D)[:, None] - xh * mgx[:, None]) * rstd[:, None], 0.0)
            # G, x^, a interleaved with dO as one [BT, BD, 2, 2] store: one layout conversion for all three
            tl.store(scp_ptr + s * 4 * TILE + poff, tl.join(tl.join(G, xh), tl.join(a, a)), mask=poff % 4 != 3)
            tl.store(scs_ptr + (s * 2 + 0) * BT + rt, rstd)
            tl.store(scs_ptr + (s * 2 + 1) * BT + rt, mgx)
            eG = (tau_b * lr)[:, None] * G
            W -= _dot(tl.trans(k), eG, DOT_MODE)
            c -= tl.sum(eG, axis=0)
        tl.debug_barrier()
        # 2) walk the group back; loads of the next (earlier) mini-batch go out before the current math
        n = n1 - 1
        s = sc_base + n - n0
        ptr = in_base + n * MB * s_t + in_off
        qn = tl.load(q_ptr + ptr, mask=m2, other=0.0)
        kn = tl.load(k_ptr + ptr, mask=m2, other=0.0)
        lrn = tl.load(lr_ptr + lr_base + (n * MB + rt) * l_t, mask=tmask, other=0.0)
        Wn = tl.load(scw_ptr + s * D * D + woff, mask=wmask, other=0.0)
        pkn = tl.load(scp_ptr + s * 4 * TILE + poff)  # G, x^, a, dO: one layout conversion for all four
        Gon = tl.load(scp_ptr + s * 4 * TILE + toff * 4)  # G again, for the products only
        rstdn = tl.load(scs_ptr + (s * 2 + 0) * BT + rt)
        mgxn = tl.load(scs_ptr + (s * 2 + 1) * BT + rt)
        for ni in range(n1 - n0):
            n = n1 - 1 - ni
            t0 = n * MB
            Wo = Wn
            pk = pkn
            Gf = Gon
            Go = _op(Gf, DOT_MODE)
            rstd = rstdn
            mgx = mgxn
            qo = _op(qn, DOT_MODE)
            ko = _op(kn, DOT_MODE)
            lr = lrn.to(tl.float32)
            m = tl.maximum(n - 1, n0)
            s = sc_base + m - n0
            ptr = in_base + m * MB * s_t + in_off
            qn = tl.load(q_ptr + ptr, mask=m2, other=0.0)
            kn = tl.load(k_ptr + ptr, mask=m2, other=0.0)
            lrn = tl.load(lr_ptr + lr_base + (m * MB + rt) * l_t, mask=tmask, other=0.0)
            Wn = tl.load(scw_ptr + s * D * D + woff, mask=wmask, other=0.0)
            pkn = tl.load(scp_ptr + s * 4 * TILE + poff)
            Gon = tl.load(scp_ptr + s * 4 * TILE + toff * 4)
            rstdn = tl.load(scs_ptr + (s * 2 + 0) * BT + rt)
            mgxn = tl.load(scs_ptr + (s * 2 + 1) * BT + rt)

            # output path: everything here is independent of the carried dW, dc
            E = tl.where(causal, tau_r[:, None] * lr[None, :], 0.0)
            QK1 = _dot(qo, tl.trans(ko), DOT_MODE) + 1.0
            P = E * QK1
            Po = _op(P, DOT_MODE)
            eb = tau_b * lr
            c += tl.sum(eb[:, None] * Gf, axis=0)  # c of this mini-batch's start: c' + sum e_b G
            Zb = _dot(qo, Wo, DOT_MODE) + c[None, :] - _dot(Po, Go, DOT_MODE)
            # output LayerNorm statistics in one reduction (Chan's merge of mean and squared deviations)
            cnt = tl.where(cmask, 1.0, 0.0)[None, :] + tl.zeros_like(Zb)
            mub, qb, _ = tl.reduce((tl.where(cmask[None, :], Zb, 0.0), tl.zeros_like(Zb), cnt), 1, _chan)
            rstdb = 1.0 / tl.sqrt(qb / D + 1e-6)
            xhb = tl.where(cmask[None, :], (Zb - mub[:, None]) * rstdb[:, None], 0.0)
            # the tile of G, x^, a, dO is split only here, after adding zeros computed from xhb: this ties it to
            # the products' register layout, so it is converted once (Triton otherwise converts each piece
            # and some values derived from them, ~10 more barriers per step); 0 * xhb is 0 for finite xhb
            z4 = 0.0 * xhb
            gx, ad = tl.split(pk + tl.join(tl.join(z4, z4), tl.join(z4, z4)))
            G, xh = tl.split(gx)
            a, dO = tl.split(ad)
            gO = dO * gam[None, :]
            sg, sgx = tl.reduce((gO, gO * xhb), 1, _add2)
            dZb = tl.where(cmask[None, :], (gO - (sg / D)[:, None] - xhb * (sgx / D)[:, None]) * rstdb[:, None],
                           0.0)
            dZbo = _op(dZb, DOT_MODE)
            dq = dO + _dot(dZbo, tl.trans(Wo), DOT_MODE)
            dP = -_dot(dZbo, tl.trans(Go), DOT_MODE)
            dG = -_dot(tl.trans(Po), dZbo, DOT_MODE)
            dE = tl.where(causal, dP * QK1, 0.0)
            dA = dP * E
            dAo = _op(dA, DOT_MODE)
            dq += _dot(dAo, ko, DOT_MODE)
            dk = _dot(tl.trans(dAo), qo, DOT_MODE)
            dtau_t += dE * lr[None, :]
            dlr = tl.sum(dE * tau_r[:, None], axis=0)
            # the carried chain: W' = W - K^T (e_b G), c' = c - sum e_b G
            dWo = _op(dW, DOT_MODE)
            KdW = _dot(ko, dWo, DOT_MODE) + dc[None, :]
            dk -= eb[:, None] * _dot(Go, tl.trans(dWo), DOT_MODE)  # (e_b G) dW'^T, e_b applied after
            dG -= eb[:, None] * KdW
            # G = LN-L2 gradient at Z = K W + c (x^, 1/s, mean(gy x^), a = gy / gam from the scratch)
            gy = gam[None, :] * a
            # every row sum of the LN-L2 backward in one reduction: the sums of dx^ and dx^ x^ (dZ's
            # LayerNorm backward) expand into sums of dG terms and per-row sums saved by the recompute pass
            g2dG = (gam * gam)[None, :] * dG
            g2x = (gam * gam)[None, :] * xh
            S, sd, sdx, sdg, t1, t2, sgy, sg2x, sg2xx = tl.reduce(
                (KdW * G, dG, dG * xh, dG * G, g2dG, g2dG * xh, gy, g2x, g2x * xh), 1, _add9)
            dlr -= tau_b * S
            dtau_b -= lr * S
            mdgx = sdx / D
            dgy = tl.where(cmask[None, :], (dG - (sd / D)[:, None] - xh * mdgx[:, None]) * rstd[:, None], 0.0)
            dxh = (-mgx[:, None] * dG - mdgx[:, None] * gy) * rstd[:, None] + (gam * gam)[None, :] * dgy
            ds = -sdg * rstd
            # sx = sum dx^, sxx = sum dx^ x^ (sum gy x^ = D mgx)
            sx = rstd * (-mgx * sd - mdgx * sgy + t1 - (sd / D) * gg - mdgx * sg2x)
            sxx = rstd * (-mgx * sdx - mdgx * D * mgx + t2 - (sd / D) * sg2x - mdgx * sg2xx)
            dZ = tl.where(cmask[None, :], (dxh - (sx / D)[:, None] - xh * (sxx / D)[:, None]) * rstd[:, None]
                          + (ds / D)[:, None] * xh, 0.0)
            dgam_t += dO * xhb + dgy * (gam[None, :] * xh + a)
            dbet_t += dO + dgy * gam[None, :]
            dv = -gam[None, :] * dgy
            dZo = _op(dZ, DOT_MODE)
            dk += gam[None, :] * dgy + _dot(dZo, tl.trans(Wo), DOT_MODE)
            # gradient w.r.t. the start weights of this mini-batch: Q^T dZb + K^T dZ as one product
            # [Q; K]^T [dZb; dZ] (inner dim 2 BT)
            qk2 = tl.reshape(tl.permute(tl.join(qo, ko), 2, 0, 1), 2 * BT, BD)
            dz2 = tl.reshape(tl.permute(tl.join(dZbo, dZo), 2, 0, 1), 2 * BT, BD)
            dW += _dot(tl.trans(qk2), dz2, DOT_MODE)
            dc += tl.sum(dZb + dZ, axis=0)

            # dq, dk, dv as one [BT, BD, 2, 2] store (one layout conversion); the 4th slot is masked off
            optr = out_base + t0 * o_t + out_off
            ety = dq_ptr.dtype.element_ty
            tl.store(tl.join(tl.join(dq_ptr + optr, dk_ptr + optr), tl.join(dv_ptr + optr, dv_ptr + optr)),
                     tl.join(tl.join(dq.to(ety), dk.to(ety)), tl.join(dv.to(ety), dv.to(ety))),
                     mask=tl.join(tl.join(m2, m2), tl.join(m2, m2 & (rt < 0)[:, None])))
            tl.store(dlr_ptr + (bi * NMB * MB + t0 + rt) * H + hi, dlr, mask=tmask)
        tl.debug_barrier()
    tl.store(dw0_ptr + pid * D * D + woff, dW, mask=wmask)
    tl.store(dc0_ptr + pid * D + rd, dc, mask=cmask)
    dtau = tl.sum(dtau_t, axis=1) + tl.where(rt == MB - 1, tl.sum(dtau_b, axis=0), 0.0)
    tl.store(dtau_ptr + pid * BT + rt, dtau)
    tl.store(dlnw_ptr + pid * BD + rd, tl.sum(dgam_t, axis=0))
    tl.store(dlnb_ptr + pid * BD + rd, tl.sum(dbet_t, axis=0))


@triton.jit
def _on(mask, ok):
    """mask where the scalar predicate ok holds (ok broadcast to a tensor first: in the interpreter `&` of a
    tensor and a scalar predicate is not boolean)."""
    return mask & (tl.where(mask, 1, 1) * ok.to(tl.int32) != 0)


@triton.jit
def _sum_chan(s_a, m_a, q_a, n_a, s_b, m_b, q_b, n_b):
    """A plain sum and a (mean, squared deviations, count) merge in one reduction."""
    m, q, n = _chan(m_a, q_a, n_a, m_b, q_b, n_b)
    return s_a + s_b, m, q, n


@triton.jit
def _add10(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, b0, b1, b2, b3, b4, b5, b6, b7, b8, b9):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3, a4 + b4, a5 + b5, a6 + b6, a7 + b7, a8 + b8, a9 + b9


@triton.jit
def ttt_linear_bwd_kernel_v3(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, ckw_ptr, ckc_ptr,
    do_ptr, dwT_ptr, dcT_ptr,
    dq_ptr, dk_ptr, dv_ptr, dlr_ptr, dw0_ptr, dc0_ptr, dtau_ptr, dlnw_ptr, dlnb_ptr,
    scw_ptr, scp_ptr, scs_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h, o_b, o_t, o_h,
    H, NMB, NCK,
    D: tl.constexpr, BD: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr, GROUP: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    """v2's two passes interleaved: step j of the walk back through group g and step j of the recompute
    of group g - 1 (into the other half of a double-buffered scratch) run in one loop body, their row
    reductions merged (3 reductions per step instead of 6) and their dependent chains side by side.
    Outer iteration `it` walks group NCK - it back (none at it = 0) and recomputes group NCK - 1 - it
    (none at it = NCK); a step outside its group runs on masked (zero) loads, adds nothing, stores nothing."""
    pid = tl.program_id(0)
    bi = pid // H
    hi = pid % H
    rt = tl.arange(0, BT)
    rd = tl.arange(0, BD)
    cmask = rd < D
    tmask = rt < MB
    m2 = tmask[:, None] & cmask[None, :]
    wmask = cmask[:, None] & cmask[None, :]
    woff = rd[:, None] * D + rd[None, :]
    TILE: tl.constexpr = BT * BD
    toff = rt[:, None] * BD + rd[None, :]
    r2 = tl.arange(0, 2)
    poff = (toff[:, :, None, None] * 2 + r2[None, None, :, None]) * 2 + r2[None, None, None, :]
    full = toff >= 0  # all-true [BT, BD]

    gam = tl.load(lnw_ptr + hi * D + rd, mask=cmask, other=0.0).to(tl.float32)
    bet = tl.load(lnb_ptr + hi * D + rd, mask=cmask, other=0.0).to(tl.float32)
    tau_r = tl.load(tau_ptr + rt, mask=tmask, other=0.0).to(tl.float32)
    tau_b = tl.load(tau_ptr + MB - 1).to(tl.float32)
    causal = (rt[:, None] >= rt[None, :]) & tmask[None, :]
    gg = tl.sum(gam * gam, axis=0)
    g2 = (gam * gam)[None, :]
    cnt = tl.where(cmask, 1.0, 0.0)[None, :] + tl.zeros([BT, BD], dtype=tl.float32)

    dW = tl.load(dwT_ptr + pid * D * D + woff, mask=wmask, other=0.0)
    dc = tl.load(dcT_ptr + pid * D + rd, mask=cmask, other=0.0)
    dgam_t = tl.zeros([BT, BD], dtype=tl.float32)
    dbet_t = tl.zeros([BT, BD], dtype=tl.float32)
    dtau_t = tl.zeros([BT, BT], dtype=tl.float32)
    dtau_b = tl.zeros([BT], dtype=tl.float32)

    in_base = bi * s_b + hi * s_h
    in_off = rt[:, None] * s_t + rd[None, :]
    out_base = bi * o_b + hi * o_h
    out_off = rt[:, None] * o_t + rd[None, :]
    lr_base = bi * l_b + hi * l_h
    c = tl.zeros([BD], dtype=tl.float32)
    for it in range(NCK + 1):
        # recompute: group gc into buffer it % 2; walk back: group gr from buffer (it + 1) % 2
        gc = NCK - 1 - it
        gr = NCK - it
        okc = gc >= 0
        okr = gr < NCK
        n0c = gc * GROUP
        lenc = tl.where(okc, tl.minimum(GROUP, NMB - n0c), 0)
        n0r = gr * GROUP
        lenr = tl.where(okr, tl.minimum(GROUP, NMB - n0r), 0)
        bc = (pid * 2 + it % 2) * GROUP
        br = (pid * 2 + (it + 1) % 2) * GROUP
        gcc = tl.maximum(gc, 0)
        cr = c  # c at the end of group gr: where the recompute of the last outer iteration left it
        W = tl.load(ckw_ptr + (pid * NCK + gcc) * D * D + woff, mask=_on(wmask, okc), other=0.0)
        c = tl.load(ckc_ptr + (pid * NCK + gcc) * D + rd, mask=_on(cmask, okc), other=0.0)
        # first step's loads (recompute step 0, walk-back step 0 = mini-batch n0r + lenr - 1)
        vc = lenc > 0
        nc = n0c
        pc = in_base + nc * MB * s_t + in_off
        kcn = tl.load(k_ptr + pc, mask=_on(m2, vc), other=0.0)
        vcn = tl.load(v_ptr + pc, mask=_on(m2, vc), other=0.0)
        lrcn = tl.load(lr_ptr + lr_base + (nc * MB + rt) * l_t, mask=_on(tmask, vc), other=0.0)
        dOcn = tl.load(do_ptr + out_base + nc * MB * o_t + out_off, mask=_on(m2, vc), other=0.0)
        vr = lenr > 0
        jr = tl.maximum(lenr - 1, 0)
        nr = n0r + jr
        pr = in_base + nr * MB * s_t + in_off
        sr = br + jr
        qn = tl.load(q_ptr + pr, mask=_on(m2, vr), other=0.0)
        kn = tl.load(k_ptr + pr, mask=_on(m2, vr), other=0.0)
        lrn = tl.load(lr_ptr + lr_base + (nr * MB + rt) * l_t, mask=_on(tmask, vr), other=0.0)
        Wn = tl.load(scw_ptr + sr * D * D + woff, mask=_on(wmask, vr), other=0.0)
        pkn = tl.load(scp_ptr + sr * 4 * TILE + poff, mask=_on(poff >= 0, vr), other=0.0)
        Gon = tl.load(scp_ptr + sr * 4 * TILE + toff * 4, mask=_on(full, vr), other=0.0)
        rstdn = tl.load(scs_ptr + (sr * 5 + 0) * BT + rt, mask=_on(rt >= 0, vr), other=0.0)
        mgxn = tl.load(scs_ptr + (sr * 5 + 1) * BT + rt, mask=_on(rt >= 0, vr), other=0.0)
        sgyn = tl.load(scs_ptr + (sr * 5 + 2) * BT + rt, mask=_on(rt >= 0, vr), other=0.0)
        sg2xn = tl.load(scs_ptr + (sr * 5 + 3) * BT + rt, mask=_on(rt >= 0, vr), other=0.0)
        sg2xxn = tl.load(scs_ptr + (sr * 5 + 4) * BT + rt, mask=_on(rt >= 0, vr), other=0.0)
        for j in range(GROUP):
            # ---- this step's inputs; the next step's loads go out first
            okc_j = j < lenc
            sc = bc + j
            t0c = (n0c + j) * MB
            kc = kcn.to(tl.float32)
            vcv = vcn.to(tl.float32)
            lrc = lrcn.to(tl.float32)
            dOc = dOcn.to(tl.float32)
            okr_j = j < lenr
            jr = lenr - 1 - j
            t0r = (n0r + jr) * MB
            Wo = Wn
            pk = pkn
            Gf = Gon
            Go = _op(Gf, DOT_MODE)
            rstd = rstdn
            mgx = mgxn
            sgy = sgyn
            sg2x = sg2xn
            sg2xx = sg2xxn
            qo = _op(qn, DOT_MODE)
            ko = _op(kn, DOT_MODE)
            lr = lrn.to(tl.float32)

            vc = j + 1 < lenc
            nc = n0c + tl.minimum(j + 1, GROUP - 1)
            pc = in_base + nc * MB * s_t + in_off
            kcn = tl.load(k_ptr + pc, mask=_on(m2, vc), other=0.0)
            vcn = tl.load(v_ptr + pc, mask=_on(m2, vc), other=0.0)
            lrcn = tl.load(lr_ptr + lr_base + (nc * MB + rt) * l_t, mask=_on(tmask, vc), other=0.0)
            dOcn = tl.load(do_ptr + out_base + nc * MB * o_t + out_off, mask=_on(m2, vc), other=0.0)
            vr = j + 1 < lenr
            jn = tl.maximum(lenr - 2 - j, 0)
            nr = n0r + jn
            pr = in_base + nr * MB * s_t + in_off
            sr = br + jn
            qn = tl.load(q_ptr + pr, mask=_on(m2, vr), other=0.0)
            kn = tl.load(k_ptr + pr, mask=_on(m2, vr), other=0.0)
            lrn = tl.load(lr_ptr + lr_base + (nr * MB + rt) * l_t, mask=_on(tmask, vr), other=0.0)
            Wn = tl.load(scw_ptr + sr * D * D + woff, mask=_on(wmask, vr), other=0.0)
            pkn = tl.load(scp_ptr + sr * 4 * TILE + poff, mask=_on(poff >= 0, vr), other=0.0)
            Gon = tl.load(scp_ptr + sr * 4 * TILE + toff * 4, mask=_on(full, vr), other=0.0)
            rstdn = tl.load(scs_ptr + (sr * 5 + 0) * BT + rt, mask=_on(rt >= 0, vr), other=0.0)
            mgxn = tl.load(scs_ptr + (sr * 5 + 1) * BT + rt, mask=_on(rt >= 0, vr), other=0.0)
            sgyn = tl.load(scs_ptr + (sr * 5 + 2) * BT + rt, mask=_on(rt >= 0, vr), other=0.0)
            sg2xn = tl.load(scs_ptr + (sr * 5 + 3) * BT + rt, mask=_on(rt >= 0, vr), other=0.0)
            sg2xxn = tl.load(scs_ptr + (sr * 5 + 4) * BT + rt, mask=_on(rt >= 0, vr), other=0.0)

            # ---- recompute step (group gc, step j) | walk-back step (group gr, mini-batch n0r + lenr - 1 - j)
            Wco = _op(W, DOT_MODE)
            tl.store(scw_ptr + sc * D * D + woff, Wco, mask=_on(wmask, okc_j))
            tl.store(scp_ptr + sc * 4 * TILE + toff * 4 + 3, dOc, mask=_on(full, okc_j))
            Z = _dot(kc, Wco, DOT_MODE) + c[None, :]
            E = tl.where(causal, tau_r[:, None] * lr[None, :], 0.0)
            QK1 = _dot(qo, tl.trans(ko), DOT_MODE) + 1.0
            P = E * QK1
            Po = _op(P, DOT_MODE)
            eb = tau_b * lr
            cr += tl.sum(eb[:, None] * Gf, axis=0)
            Zb = _dot(qo, Wo, DOT_MODE) + cr[None, :] - _dot(Po, Go, DOT_MODE)
            # reduction 1: mean of Z | statistics of Zb
            sz, mub, qb, _ = tl.reduce((Z, tl.where(cmask[None, :], Zb, 0.0), tl.zeros_like(Zb), cnt), 1,
                                       _sum_chan)
            zc = tl.where(cmask[None, :], Z - (sz / D)[:, None], 0.0)
            rstdb = 1.0 / tl.sqrt(qb / D + 1e-6)
            xhb = tl.where(cmask[None, :], (Zb - mub[:, None]) * rstdb[:, None], 0.0)
            z4 = 0.0 * xhb  # ties the tile to the products' layout: one conversion (see v2)
            gx, ad = tl.split(pk + tl.join(tl.join(z4, z4), tl.join(z4, z4)))
            G, xh = tl.split(gx)
            a, dO = tl.split(ad)
            gO = dO * gam[None, :]
            # reduction 2: variance of Z | LayerNorm backward sums of the output
            szz, sg, sgx = tl.reduce((zc * zc, gO, gO * xhb), 1, _add3)
            rstd_c = 1.0 / tl.sqrt(szz / D + 1e-6)
            xh_c = zc * rstd_c[:, None]
            a_c = gam[None, :] * xh_c + bet[None, :] - (vcv - kc)
            gy_c = gam[None, :] * a_c
            g2x_c = g2 * xh_c
            dZb = tl.where(cmask[None, :], (gO - (sg / D)[:, None] - xhb * (sgx / D)[:, None]) * rstdb[:, None],
                           0.0)
            dZbo = _op(dZb, DOT_MODE)
            dq = dO + _dot(dZbo, tl.trans(Wo), DOT_MODE)
            dP = -_dot(dZbo, tl.trans(Go), DOT_MODE)
            dG = -_dot(tl.trans(Po), dZbo, DOT_MODE)
            dE = tl.where(causal, dP * QK1, 0.0)
            dA = dP * E
            dAo = _op(dA, DOT_MODE)
            dq += _dot(dAo, ko, DOT_MODE)
            dk = _dot(tl.trans(dAo), qo, DOT_MODE)
            dtau_t += dE * lr[None, :]
            dlr = tl.sum(dE * tau_r[:, None], axis=0)
            dWo = _op(dW, DOT_MODE)
            KdW = _dot(ko, dWo, DOT_MODE) + dc[None, :]
            dk -= eb[:, None] * _dot(Go, tl.trans(dWo), DOT_MODE)
            dG -= eb[:, None] * KdW
            g2dG = g2 * dG
            # reduction 3: the G formula's sums (and the walk-back's per-row sums) | the LN-L2 backward sums
            sgy_c, sgyx_c, sg2x_c, sg2xx_c, S, sd, sdx, sdg, t1, t2 = tl.reduce(
                (gy_c, gy_c * xh_c, g2x_c, g2x_c * xh_c, KdW * G, dG, dG * xh, dG * G, g2dG, g2dG * xh), 1, _add10)
            # recompute: G, the scratch, the weight update
            mgx_c = sgyx_c / D
            G_c = tl.where(cmask[None, :], (gy_c - (sgy_c / D)[:, None] - xh_c * mgx_c[:, None]) * rstd_c[:, None],
                           0.0)
            tl.store(scp_ptr + sc * 4 * TILE + poff, tl.join(tl.join(G_c, xh_c), tl.join(a_c, a_c)),
                     mask=_on(poff % 4 != 3, okc_j))
            tl.store(scs_ptr + (sc * 5 + 0) * BT + rt, rstd_c, mask=_on(rt >= 0, okc_j))
            tl.store(scs_ptr + (sc * 5 + 1) * BT + rt, mgx_c, mask=_on(rt >= 0, okc_j))
            tl.store(scs_ptr + (sc * 5 + 2) * BT + rt, sgy_c, mask=_on(rt >= 0, okc_j))
            tl.store(scs_ptr + (sc * 5 + 3) * BT + rt, sg2x_c, mask=_on(rt >= 0, okc_j))
            tl.store(scs_ptr + (sc * 5 + 4) * BT + rt, sg2xx_c, mask=_on(rt >= 0, okc_j))
            eG = (tau_b * lrc)[:, None] * G_c
            W -= _dot(tl.trans(kc), eG, DOT_MODE)
            c -= tl.sum(eG, axis=0)
            # walk back: dZ, dk, dv and the carried gradients
            dlr -= tau_b * S
            dtau_b -= lr * S
            mdgx = sdx / D
            dgy = tl.where(cmask[None, :], (dG - (sd / D)[:, None] - xh * mdgx[:, None]) * rstd[:, None], 0.0)
            gy = gam[None, :] * a
            dxh = (-mgx[:, None] * dG - mdgx[:, None] * gy) * rstd[:, None] + g2 * dgy
            ds = -sdg * rstd
            sx = rstd * (-mgx * sd - mdgx * sgy + t1 - (sd / D) * gg - mdgx * sg2x)
            sxx = rstd * (-mgx * sdx - mdgx * D * mgx + t2 - (sd / D) * sg2x - mdgx * sg2xx)
            dZ = tl.where(cmask[None, :], (dxh - (sx / D)[:, None] - xh * (sxx / D)[:, None]) * rstd[:, None]
                          + (ds / D)[:, None] * xh, 0.0)
            dgam_t += dO * xhb + dgy * (gam[None, :] * xh + a)
            dbet_t += dO + dgy * gam[None, :]
            dv = -gam[None, :] * dgy
            dZo = _op(dZ, DOT_MODE)
            dk += gam[None, :] * dgy + _dot(dZo, tl.trans(Wo), DOT_MODE)
            qk2 = tl.reshape(tl.permute(tl.join(qo, ko), 2, 0, 1), 2 * BT, BD)
            dz2 = tl.reshape(tl.permute(tl.join(dZbo, dZo), 2, 0, 1), 2 * BT, BD)
            dW += _dot(tl.trans(qk2), dz2, DOT_MODE)
            dc += tl.sum(dZb + dZ, axis=0)
            optr = out_base + t0r * o_t + out_off
            ety = dq_ptr.dtype.element_ty
            mr = _on(m2, okr_j)
            tl.store(tl.join(tl.join(dq_ptr + optr, dk_ptr + optr), tl.join(dv_ptr + optr, dv_ptr + optr)),
                     tl.join(tl.join(dq.to(ety), dk.to(ety)), tl.join(dv.to(ety), dv.to(ety))),
                     mask=tl.join(tl.join(mr, mr), tl.join(mr, mr & (rt < 0)[:, None])))
            tl.store(dlr_ptr + (bi * NMB * MB + t0r + rt) * H + hi, dlr, mask=_on(tmask, okr_j))
        tl.debug_barrier()
    tl.store(dw0_ptr + pid * D * D + woff, dW, mask=wmask)
    tl.store(dc0_ptr + pid * D + rd, dc, mask=cmask)
    dtau = tl.sum(dtau_t, axis=1) + tl.where(rt == MB - 1, tl.sum(dtau_b, axis=0), 0.0)
    tl.store(dtau_ptr + pid * BT + rt, dtau)
    tl.store(dlnw_ptr + pid * BD + rd, tl.sum(dgam_t, axis=0))
    tl.store(dlnb_ptr + pid * BD + rd, tl.sum(dbet_t, axis=0))


_OPERAND_DTYPE = {0: torch.float32, 1: torch.float32, 2: torch.bfloat16, 3: torch.float16}  # by DOT_MODE (_op)


def _dot_mode(dtype: torch.dtype) -> int:
    if DOT_MODE is not None:
        return DOT_MODE
    if dtype == torch.bfloat16:
        return 2
    if dtype == torch.float16:
        return 3
    return 1 if torch.backends.cuda.matmul.allow_tf32 else 0


# backward kernel (see the module docstring): "v2" (the walk back reads G and the inner LN statistics from
# the recompute pass), "v1" (the walk back re-does the inner forward), "v3" (v2's two passes interleaved,
# experimental); the environment variable TTT_LINEAR_BWD overrides it
BWD_IMPL = "v2"
NUM_WARPS = None  # None: forward 4 for d <= 64 else 8, backward 8; an int forces one (benchmark variants)


def _cfg(d: int, backward: bool = False):
    # measured on H100 (docs/kernels_notes.md): d = 64 forward 0.91 ms with 4 warps vs 1.07 with 8;
    # forward + backward 6.55 ms with 4 vs 5.14 with 8 (the backward has ~3x the live tiles)
    BD = triton.next_power_of_2(d)
    return BD, NUM_WARPS or (8 if backward or BD > 64 else 4)


def fwd(q, k, v, lr, tau, ln_weight, ln_bias, W0, c0, mini_batch: int, group: int = 8, save: bool = True,
        dot_mode: int | None = None):
    """Aligned whole mini-batches. q, k, v [B,T,H,d] (last dim contiguous, same strides), T % b == 0;
    lr [B,T,H]; W0 [B,H,d,d], c0 [B,H,d] fp32 contiguous. Returns o [B,T,H,d] (q's dtype), W_T, c_T,
    and the checkpoints (W, c at the start of every `group` mini-batches) when `save`."""
    B, T, H, d = q.shape
    nmb = T // mini_batch
    nck = triton.cdiv(nmb, group)
    BD, warps = _cfg(d)
    BT = max(16, triton.next_power_of_2(mini_batch))
    o = torch.empty((B, T, H, d), dtype=q.dtype, device=q.device)
    wT, cT = torch.empty_like(W0), torch.empty_like(c0)
    if save:
        ckw = torch.empty((B, H, nck, d, d), dtype=torch.float32, device=q.device)
        ckc = torch.empty((B, H, nck, d), dtype=torch.float32, device=q.device)
    else:
        ckw, ckc = wT, cT  # never written
    mode = _dot_mode(q.dtype) if dot_mode is None else dot_mode
    LAST["ttt_linear_fwd_kernel"] = ttt_linear_fwd_kernel[(B * H,)](
        q, k, v, lr, tau, ln_weight, ln_bias, W0, c0, o, wT, cT, ckw, ckc,
        q.stride(0), q.stride(1), q.stride(2), lr.stride(0), lr.stride(1), lr.stride(2),
        o.stride(0), o.stride(1), o.stride(2), H, nmb, nck,
        D=d, BD=BD, MB=mini_batch, BT=BT, GROUP=group, SAVE=save, DOT_MODE=mode, num_warps=warps)
    return o, wT, cT, (ckw, ckc) if save else None


def bwd(q, k, v, lr, tau, ln_weight, ln_bias, ckpt, do, dwT, dcT, mini_batch: int, group: int = 8,
        dot_mode: int | None = None):
    """Gradients of the aligned forward. do [B,T,H,d]; dwT [B,H,d,d], dcT [B,H,d] (fp32) the gradients of
    the final state. Returns dq, dk, dv (q's dtype), dlr [B,T,H] fp32, dtau [b], dln_w, dln_b [H,d],
    dW0 [B,H,d,d], dc0 [B,H,d] (fp32)."""
    B, T, H, d = q.shape
    nmb = T // mini_batch
    nck = triton.cdiv(nmb, group)
    BD, warps = _cfg(d, backward=True)
    BT = max(16, triton.next_power_of_2(mini_batch))
    ckw, ckc = ckpt
    do = do.contiguous()
    dq, dk, dv = (torch.empty((B, T, H, d), dtype=q.dtype, device=q.device) for _ in range(3))
    dlr = torch.empty((B, T, H), dtype=torch.float32, device=q.device)
    dw0 = torch.empty((B, H, d, d), dtype=torch.float32, device=q.device)
    dc0 = torch.empty((B, H, d), dtype=torch.float32, device=q.device)
    dtau = torch.empty((B * H, BT), dtype=torch.float32, device=q.device)
    dlnw = torch.empty((B * H, BD), dtype=torch.float32, device=q.device)
    dlnb = torch.empty((B * H, BD), dtype=torch.float32, device=q.device)
    mode = _dot_mode(q.dtype) if dot_mode is None else dot_mode
    args = (q, k, v, lr, tau, ln_weight, ln_bias, ckw, ckc, do, dwT.contiguous(), dcT.contiguous(),
            dq, dk, dv, dlr, dw0, dc0, dtau, dlnw, dlnb)
    strides = (q.stride(0), q.stride(1), q.stride(2), lr.stride(0), lr.stride(1), lr.stride(2),
               dq.stride(0), dq.stride(1), dq.stride(2))
    meta = dict(D=d, BD=BD, MB=mini_batch, BT=BT, GROUP=group, DOT_MODE=mode, num_warps=warps)
    impl = os.environ.get("TTT_LINEAR_BWD", BWD_IMPL)
    if impl == "v1":
        scw = torch.empty((B * H * group, d, d), dtype=torch.float32, device=q.device)
        scc = torch.empty((B * H * group, d), dtype=torch.float32, device=q.device)
        LAST["ttt_linear_bwd_kernel"] = ttt_linear_bwd_kernel[(B * H,)](
            *args, scw, scc, *strides, H, nmb, nck, **meta)
    elif impl == "v2":
        # per-program scratch of one checkpoint group: start weights as dot operands, 4 [BT, BD] fp32 tiles
        # and 2 row vectors per mini-batch (B4 H32 d64 bf16: 128 x 8 x 24.1 KB = 25 MB, L2-resident)
        scw = torch.empty((B * H * group, d, d), dtype=_OPERAND_DTYPE[mode], device=q.device)
        scp = torch.empty((B * H * group, 4, BT, BD), dtype=torch.float32, device=q.device)
        scs = torch.empty((B * H * group, 2, BT), dtype=torch.float32, device=q.device)
        LAST["ttt_linear_bwd_kernel_v2"] = ttt_linear_bwd_kernel_v2[(B * H,)](
            *args, scw, scp, scs, *strides, H, nmb, nck, **meta)
    elif impl == "v3":
        # as v2, double-buffered (the walk back reads one half while the recompute writes the other)
        scw = torch.empty((B * H * 2 * group, d, d), dtype=_OPERAND_DTYPE[mode], device=q.device)
        scp = torch.empty((B * H * 2 * group, 4, BT, BD), dtype=torch.float32, device=q.device)
        scs = torch.empty((B * H * 2 * group, 5, BT), dtype=torch.float32, device=q.device)
        LAST["ttt_linear_bwd_kernel_v3"] = ttt_linear_bwd_kernel_v3[(B * H,)](
            *args, scw, scp, scs, *strides, H, nmb, nck, **meta)
    else:
        raise ValueError(f"unknown TTT-Linear backward {impl!r} (BWD_IMPL / TTT_LINEAR_BWD: 'v1', 'v2' or 'v3')")
    dtau = dtau.sum(0)[:mini_batch]
    dlnw = dlnw.view(B, H, BD).sum(0)[:, :d]
    dlnb = dlnb.view(B, H, BD).sum(0)[:, :d]
    return dq, dk, dv, dlr, dtau, dlnw, dlnb, dw0, dc0
