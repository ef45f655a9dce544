"""TTT-MLP forward and backward kernels in the transposed orientation: the hidden width F is the row (M)
dimension of the weight-sized products, which Triton tiles with 256-row warp-group products (wgmma).

Same contract and math as `chunk.py` (whole, aligned mini-batches from a zero accumulator; the formulas of
its docstring), written for transposed tiles: a mini-batch's activations are [F, b] and [d, b] (tokens are
columns), the weights are held as U1 = W1^T [F, d] and W2 [F, d], both F-major, in registers for the whole
sequence. Products (d = 64, F = 256, b = 16):
  Z1^T = U1 K^T + c1 (M = F), H1^T = W2 G2^T (M = F), Z1b^T = U1 Q^T + c1 - G1^T P1^T (M = F),
  Z2^T = W2^T X2^T + c2 (M = d, K = F: the one reduction over all of F), U1 -= (e_b G1)^T K (M = F),
  W2 -= X2^T (e_b G2) (M = F);
in `chunk.py` every one of them has M = b = 16 rows. The weights are still 128 fp32 registers per thread at
8 warps (64 at 16) and the kernel spills no less than `chunk.py` by the offline sm_90 compile
(docs/kernels_notes.md round 4); at 16 warps the Z2 product (M = d = 64) replicates W2^T over the warp
groups. Selectable as mlp_impl="trans" for a GPU timing. Checkpoints and the backward's scratch keep the
F-major layout.

NaN containment (forward): a non-finite value at token j may make outputs >= j non-finite, never those < j.
The causal products are masked with `where` (not by multiplying with a 0/1 mask), the G1 and G2 columns
(tokens) that hold a non-finite value enter the intra-mini-batch products as zeros, and the outputs of
every token at or after such a column are set to NaN afterwards (the weight update uses the raw G, so the
state after the mini-batch is non-finite as in the reference).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import LN_EPS
from ..triton_utils import (_center_t, _consts_t, _dot, _finite_cols, _gelu_parts, _gelu_parts2, _inner_t, _load_t,
                            _proj_t, _tiles_t, dot_mode, mlp_tile_sizes as _shape, operand_dtype)


@triton.jit
def ttt_mlp_fwd_t_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, w1_ptr, c1_ptr, w2_ptr, c2_ptr,
    o_ptr, w1T_ptr, c1T_ptr, w2T_ptr, c2T_ptr, ck1_ptr, ckc1_ptr, ck2_ptr, ckc2_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h, o_b, o_t, o_h,
    H, NMB, NCK,
    D: tl.constexpr, BD: tl.constexpr, FF: tl.constexpr, BF: tl.constexpr, MB: tl.constexpr,
    BT: tl.constexpr, GROUP: tl.constexpr, SAVE: tl.constexpr, DOT_MODE: tl.constexpr, EPS: tl.constexpr,
):
    pid, bi, hi, rt, rd, rf, cmask, tmask, fmask = _tiles_t(H, D, BD, FF, BF, MB, BT)
    wmask = fmask[:, None] & cmask[None, :]  # [BF, BD]
    u1off = rf[:, None] + rd[None, :] * FF  # U1 = W1^T [BF, BD] read from a row-major d x F
    w2off = rf[:, None] * D + rd[None, :]  # W2 [BF, BD] of a row-major F x d
    m2t = cmask[:, None] & tmask[None, :]  # [BD, BT]
    U1 = tl.load(w1_ptr + pid * D * FF + u1off, mask=wmask, other=0.0)
    c1 = tl.load(c1_ptr + pid * FF + rf, mask=fmask, other=0.0)
    W2 = tl.load(w2_ptr + pid * FF * D + w2off, mask=wmask, other=0.0)
    c2 = tl.load(c2_ptr + pid * D + rd, mask=cmask, other=0.0)
    gam, bet, tau_r, tau_b, causal_t = _consts_t(lnw_ptr, lnb_ptr, tau_ptr, hi, rt, rd, cmask, tmask, D, MB)

    in_base = bi * s_b + hi * s_h
    in_off = rd[:, None] + rt[None, :] * s_t  # [BD, BT]
    lr_base = bi * l_b + hi * l_h
    out_base = bi * o_b + hi * o_h
    out_off = rd[:, None] + rt[None, :] * o_t
    for n in range(NMB):
        if SAVE:
            if n % GROUP == 0:
                ck = pid * NCK + n // GROUP
                tl.store(ck1_ptr + ck * D * FF + w2off, U1, mask=wmask)  # U1 F-major
                tl.store(ckc1_ptr + ck * FF + rf, c1, mask=fmask)
                tl.store(ck2_ptr + ck * FF * D + w2off, W2, mask=wmask)
                tl.store(ckc2_ptr + ck * D + rd, c2, mask=cmask)
        t0 = n * MB
        ptr = in_base + t0 * s_t + in_off
        qT = _load_t(q_ptr, ptr, m2t)
        kT = _load_t(k_ptr, ptr, m2t)
        vT = _load_t(v_ptr, ptr, m2t)
        lr = tl.load(lr_ptr + lr_base + (t0 + rt) * l_t, mask=tmask, other=0.0).to(tl.float32)

        Z1, X2, D1, G2, H1, G1, xh, rstd, gy, mgx = _inner_t(kT, vT, U1, c1, W2, c2, gam, bet, cmask, D, EPS,
                                                             DOT_MODE)
        # output path; columns (tokens) with a non-finite G enter the causal products as zeros
        ok = _finite_cols(G1) & _finite_cols(G2)
        G1s = tl.where(ok[None, :], G1, 0.0)
        G2s = tl.where(ok[None, :], G2, 0.0)
        ET = tau_r[None, :] * lr[:, None]  # [BT(j), BT(i)]: tau_i lr_j
        P1 = tl.where(causal_t, ET * (_dot(tl.trans(kT), qT, DOT_MODE) + 1.0), 0.0)
        Z1b = _dot(U1, qT, DOT_MODE) + c1[:, None] - _dot(G1s, P1, DOT_MODE)  # [BF, BT]
        X2b, _unused = _gelu_parts(Z1b)
        P2 = tl.where(causal_t, ET * (_dot(tl.trans(X2), X2b, DOT_MODE) + 1.0), 0.0)
        Z2b = _dot(tl.trans(W2), X2b, DOT_MODE) + c2[:, None] - _dot(G2s, P2, DOT_MODE)  # [BD, BT]
        zb = _center_t(Z2b, cmask, D)
        rstdb = 1.0 / tl.sqrt(tl.sum(zb * zb, axis=0) / D + EPS)
        o = qT + zb * rstdb[None, :] * gam[:, None] + bet[:, None]
        poison = tl.sum(tl.where(causal_t & (~ok)[:, None], 1.0, 0.0), axis=0) > 0.0  # [BT(i)]
        o = tl.where(poison[None, :], float("nan"), o)
        tl.store(o_ptr + out_base + t0 * o_t + out_off, o.to(o_ptr.dtype.element_ty), mask=m2t)

        eb = tau_b * lr
        eG1 = eb[None, :] * G1
        eG2 = eb[None, :] * G2
        U1 -= _dot(eG1, tl.trans(kT), DOT_MODE)
        c1 -= tl.sum(eG1, axis=1)
        W2 -= _dot(X2, tl.trans(eG2), DOT_MODE)
        c2 -= tl.sum(eG2, axis=1)
    tl.store(w1T_ptr + pid * D * FF + u1off, U1, mask=wmask)
    tl.store(c1T_ptr + pid * FF + rf, c1, mask=fmask)
    tl.store(w2T_ptr + pid * FF * D + w2off, W2, mask=wmask)
    tl.store(c2T_ptr + pid * D + rd, c2, mask=cmask)


def default_warps(d: int) -> int:
    """8 warps. 16 spill fewer bytes offline (docs/kernels_notes.md round 4) but replicate W2^T over the warp
    groups of the Z2 product; benchmarks/bench_mlp.py times both."""
    return 8


def fwd(q, k, v, lr, tau, ln_weight, ln_bias, params, mini_batch: int, group: int = 8, save: bool = True,
        num_warps: int | None = None, dot: int | None = None):
    """Aligned whole mini-batches; same contract as `chunk.fwd` (the checkpoints hold W1 transposed, for
    `bwd` here only). num_warps None: `default_warps(d)`; dot None: by q's dtype (`dot_mode`)."""
    B, T, H, d = q.shape
    F = params[0].shape[-1]
    nmb = T // mini_batch
    nck = triton.cdiv(nmb, group)
    BD, BF, BT = _shape(d, F, mini_batch)
    o = torch.empty((B, T, H, d), dtype=q.dtype, device=q.device)
    fin = tuple(torch.empty_like(p) for p in params)
    if save:
        ck = tuple(torch.empty((B, H, nck, *p.shape[2:]), dtype=torch.float32, device=q.device) for p in params)
    else:
        ck = fin  # never written
    ttt_mlp_fwd_t_kernel[(B * H,)](
        q, k, v, lr, tau, ln_weight, ln_bias, *params, o, *fin, *ck,
        q.stride(0), q.stride(1), q.stride(2), lr.stride(0), lr.stride(1), lr.stride(2),
        o.stride(0), o.stride(1), o.stride(2), H, nmb, nck,
        D=d, BD=BD, FF=F, BF=BF, MB=mini_batch, BT=BT, GROUP=group, SAVE=save,
        DOT_MODE=dot_mode(q.dtype) if dot is None else dot, EPS=LN_EPS,
        num_warps=num_warps or default_warps(d))
    return o, fin, (ck if save else None)


@triton.jit
def ttt_mlp_bwd_t_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, ck1_ptr, ckc1_ptr, ck2_ptr, ckc2_ptr,
    do_ptr, dw1T_ptr, dc1T_ptr, dw2T_ptr, dc2T_ptr,
    dq_ptr, dk_ptr, dv_ptr, dlr_ptr, dw1_ptr, dc1_ptr, dw2_ptr, dc2_ptr, dtau_ptr, dlnw_ptr, dlnb_ptr,
    sc1_ptr, scc1_ptr, sc2_ptr, scc2_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h, o_b, o_t, o_h,
    H, NMB, NCK,
    D: tl.constexpr, BD: tl.constexpr, FF: tl.constexpr, BF: tl.constexpr, MB: tl.constexpr,
    BT: tl.constexpr, GROUP: tl.constexpr, DOT_MODE: tl.constexpr, EPS: tl.constexpr,
):
    """`chunk.py`'s backward on transposed tiles (every [b, x] tile of it is [x, b] here; dU1 = dW1^T)."""
    pid, bi, hi, rt, rd, rf, cmask, tmask, fmask = _tiles_t(H, D, BD, FF, BF, MB, BT)
    wmask = fmask[:, None] & cmask[None, :]
    u1off = rf[:, None] + rd[None, :] * FF
    woff = rf[:, None] * D + rd[None, :]
    m2t = cmask[:, None] & tmask[None, :]
    gam, bet, tau_r, tau_b, causal_t = _consts_t(lnw_ptr, lnb_ptr, tau_ptr, hi, rt, rd, cmask, tmask, D, MB)

    dU1 = tl.load(dw1T_ptr + pid * D * FF + u1off, mask=wmask, other=0.0)
    dc1 = tl.load(dc1T_ptr + pid * FF + rf, mask=fmask, other=0.0)
    dW2 = tl.load(dw2T_ptr + pid * FF * D + woff, mask=wmask, other=0.0)
    dc2 = tl.load(dc2T_ptr + pid * D + rd, mask=cmask, other=0.0)
    dgam = tl.zeros([BD], dtype=tl.float32)
    dbet = tl.zeros([BD], dtype=tl.float32)
    dtau = tl.zeros([BT], dtype=tl.float32)
    dtau_b = tl.zeros([BT], dtype=tl.float32)

    in_base = bi * s_b + hi * s_h
    in_off = rd[:, None] + rt[None, :] * s_t
    lr_base = bi * l_b + hi * l_h
    out_base = bi * o_b + hi * o_h
    out_off = rd[:, None] + rt[None, :] * o_t
    sc_base = pid * GROUP
    for gi in range(NCK):
        g = NCK - 1 - gi
        n0 = g * GROUP
        n1 = tl.minimum(n0 + GROUP, NMB)
        ck = pid * NCK + g
        U1 = tl.load(ck1_ptr + ck * D * FF + woff, mask=wmask, other=0.0)
        c1 = tl.load(ckc1_ptr + ck * FF + rf, mask=fmask, other=0.0)
        W2 = tl.load(ck2_ptr + ck * FF * D + woff, mask=wmask, other=0.0)
        c2 = tl.load(ckc2_ptr + ck * D + rd, mask=cmask, other=0.0)
        for n in range(n0, n1):
            sc = sc_base + n - n0
            tl.store(sc1_ptr + sc * D * FF + woff, U1.to(sc1_ptr.dtype.element_ty), mask=wmask)
            tl.store(scc1_ptr + sc * FF + rf, c1, mask=fmask)
            tl.store(sc2_ptr + sc * FF * D + woff, W2.to(sc2_ptr.dtype.element_ty), mask=wmask)
            tl.store(scc2_ptr + sc * D + rd, c2, mask=cmask)
            if n < n1 - 1:  # the last start weights of the group are not advanced further
                ptr = in_base + n * MB * s_t + in_off
                kT = _load_t(k_ptr, ptr, m2t)
                vT = _load_t(v_ptr, ptr, m2t)
                lr = tl.load(lr_ptr + lr_base + (n * MB + rt) * l_t, mask=tmask, other=0.0).to(tl.float32)
                Z1, X2, D1, G2, H1, G1, xh, rstd, gy, mgx = _inner_t(kT, vT, U1, c1, W2, c2, gam, bet, cmask,
                                                                     D, EPS, DOT_MODE)
                eb = tau_b * lr
                eG1 = eb[None, :] * G1
                eG2 = eb[None, :] * G2
                U1 -= _dot(eG1, tl.trans(kT), DOT_MODE)
                c1 -= tl.sum(eG1, axis=1)
                W2 -= _dot(X2, tl.trans(eG2), DOT_MODE)
                c2 -= tl.sum(eG2, axis=1)
        tl.debug_barrier()
        for ni in range(n1 - n0):
            n = n1 - 1 - ni
            t0 = n * MB
            ptr = in_base + t0 * s_t + in_off
            qT = _load_t(q_ptr, ptr, m2t)
            kT = _load_t(k_ptr, ptr, m2t)
            vT = _load_t(v_ptr, ptr, m2t)
            lr = tl.load(lr_ptr + lr_base + (t0 + rt) * l_t, mask=tmask, other=0.0).to(tl.float32)
            dO = _load_t(do_ptr, out_base + t0 * o_t + out_off, m2t)
            sc = sc_base + n - n0
            U1s = tl.load(sc1_ptr + sc * D * FF + woff, mask=wmask, other=0.0)
            c1 = tl.load(scc1_ptr + sc * FF + rf, mask=fmask, other=0.0)
            W2s = tl.load(sc2_ptr + sc * FF * D + woff, mask=wmask, other=0.0)
            c2 = tl.load(scc2_ptr + sc * D + rd, mask=cmask, other=0.0)

            # forward recompute (tokens are columns; ET, P1, P2 are [BT(j), BT(i)])
            Z1, X2, D1, G2, H1, G1, xh, rstd, gy, mgx = _inner_t(kT, vT, U1s, c1, W2s, c2, gam, bet, cmask,
                                                                 D, EPS, DOT_MODE)
            ET = tl.where(causal_t, tau_r[None, :] * lr[:, None], 0.0)
            QK1 = _dot(tl.trans(kT), qT, DOT_MODE) + 1.0
            P1 = tl.where(causal_t, ET * QK1, 0.0)
            Z1b = _dot(U1s, qT, DOT_MODE) + c1[:, None] - _dot(G1, P1, DOT_MODE)
            X2b, D1b = _gelu_parts(Z1b)
            XX1 = _dot(tl.trans(X2), X2b, DOT_MODE) + 1.0
            P2 = tl.where(causal_t, ET * XX1, 0.0)
            Z2b = _dot(tl.trans(W2s), X2b, DOT_MODE) + c2[:, None] - _dot(G2, P2, DOT_MODE)
            zcb = _center_t(Z2b, cmask, D)
            rstdb = 1.0 / tl.sqrt(tl.sum(zcb * zcb, axis=0) / D + EPS)
            xhb = zcb * rstdb[None, :]

            # o = q + LN(Z2b)
            dgam += tl.sum(dO * xhb, axis=1)
            dbet += tl.sum(dO, axis=1)
            dZ2b = _proj_t(dO * gam[:, None], xhb, rstdb, cmask, D)  # [BD, BT]
            # Z2b = X2b W2 + c2 - P2 G2
            dP2 = -_dot(tl.trans(G2), dZ2b, DOT_MODE)  # [BT(j), BT(i)]
            dG2 = -_dot(dZ2b, tl.trans(P2), DOT_MODE)  # [BD, BT]
            dE = dP2 * XX1
            dA2 = dP2 * ET
            dX2b = _dot(W2s, dZ2b, DOT_MODE) + _dot(X2, dA2, DOT_MODE)  # [BF, BT]
            dX2 = _dot(X2b, tl.trans(dA2), DOT_MODE)
            # Z1b = Q W1 + c1 - P1 G1
            dZ1b = dX2b * D1b
            dP1 = -_dot(tl.trans(G1), dZ1b, DOT_MODE)
            dG1 = -_dot(dZ1b, tl.trans(P1), DOT_MODE)
            dE += dP1 * QK1
            dA1 = dP1 * ET
            dq = dO + _dot(tl.trans(U1s), dZ1b, DOT_MODE) + _dot(kT, dA1, DOT_MODE)  # [BD, BT]
            dk = _dot(qT, tl.trans(dA1), DOT_MODE)
            # carry through the end-of-mini-batch update
            eb = tau_b * lr
            KdW1 = _dot(dU1, kT, DOT_MODE) + dc1[:, None]  # [BF, BT]
            XdW2 = _dot(tl.trans(dW2), X2, DOT_MODE) + dc2[:, None]  # [BD, BT]
            S = tl.sum(KdW1 * G1, axis=0) + tl.sum(XdW2 * G2, axis=0)
            dG1 -= eb[None, :] * KdW1
            dG2 -= eb[None, :] * XdW2
            dk -= _dot(tl.trans(dU1), eb[None, :] * G1, DOT_MODE)
            dX2 -= _dot(dW2, eb[None, :] * G2, DOT_MODE)
            dlr = -tau_b * S
            dtau_b += -lr * S
            dE = tl.where(causal_t, dE, 0.0)
            dtau += tl.sum(dE * lr[:, None], axis=0)
            dlr += tl.sum(dE * tau_r[None, :], axis=1)
            # G1 = H1 * GELU'(Z1), H1^T = W2 G2^T
            dH1 = dG1 * D1
            _x, _dx, DD1 = _gelu_parts2(Z1)
            dZ1 = dG1 * H1 * DD1
            dG2 += _dot(tl.trans(W2s), dH1, DOT_MODE)
            # G2 = LN-L2 gradient at Z2 (target v - k)
            dgy = _proj_t(dG2, xh, rstd, cmask, D)
            mdgx = tl.sum(dG2 * xh, axis=0) / D
            dxh = (-mgx[None, :] * dG2 - mdgx[None, :] * gy) * rstd[None, :] + (gam * gam)[:, None] * dgy
            ds = -tl.sum(dG2 * G2, axis=0) * rstd
            dZ2 = _proj_t(dxh, xh, rstd, cmask, D) + (ds / D)[None, :] * xh
            dgam += tl.sum(dgy * (2.0 * gam[:, None] * xh + bet[:, None] - (vT - kT)), axis=1)
            dbet += tl.sum(dgy * gam[:, None], axis=1)
            dv = -gam[:, None] * dgy
            dk += gam[:, None] * dgy
            dX2 += _dot(W2s, dZ2, DOT_MODE)
            dZ1 += dX2 * D1
            dk += _dot(tl.trans(U1s), dZ1, DOT_MODE)
            # gradients w.r.t. the start weights of this mini-batch
            dU1 += _dot(dZ1b, tl.trans(qT), DOT_MODE) + _dot(dZ1, tl.trans(kT), DOT_MODE)
            dc1 += tl.sum(dZ1b, axis=1) + tl.sum(dZ1, axis=1)
            dW2 += _dot(X2b, tl.trans(dZ2b), DOT_MODE) + _dot(dH1, tl.trans(G2), DOT_MODE) \
                + _dot(X2, tl.trans(dZ2), DOT_MODE)
            dc2 += tl.sum(dZ2b, axis=1) + tl.sum(dZ2, axis=1)

            optr = out_base + t0 * o_t + out_off
            tl.store(dq_ptr + optr, dq.to(dq_ptr.dtype.element_ty), mask=m2t)
            tl.store(dk_ptr + optr, dk.to(dk_ptr.dtype.element_ty), mask=m2t)
            tl.store(dv_ptr + optr, dv.to(dv_ptr.dtype.element_ty), mask=m2t)
            tl.store(dlr_ptr + (bi * NMB * MB + t0 + rt) * H + hi, dlr, mask=tmask)
        tl.debug_barrier()
    tl.store(dw1_ptr + pid * D * FF + u1off, dU1, mask=wmask)
    tl.store(dc1_ptr + pid * FF + rf, dc1, mask=fmask)
    tl.store(dw2_ptr + pid * FF * D + woff, dW2, mask=wmask)
    tl.store(dc2_ptr + pid * D + rd, dc2, mask=cmask)
    dtau += tl.where(rt == MB - 1, tl.sum(dtau_b, axis=0), 0.0)
    tl.store(dtau_ptr + pid * BT + rt, dtau)
    tl.store(dlnw_ptr + pid * BD + rd, dgam)
    tl.store(dlnb_ptr + pid * BD + rd, dbet)


def bwd(q, k, v, lr, tau, ln_weight, ln_bias, ckpt, do, dfin, mini_batch: int, group: int = 8,
        num_warps: int | None = None, dot: int | None = None):
    """Gradients of `fwd` here; same contract as `chunk.bwd` (ckpt from this module's `fwd`)."""
    B, T, H, d = q.shape
    F = ckpt[0].shape[-1]
    nmb = T // mini_batch
    nck = triton.cdiv(nmb, group)
    BD, BF, BT = _shape(d, F, mini_batch)
    shapes = ((d, F), (F,), (F, d), (d,))
    dfin = tuple(torch.zeros((B, H, *s), dtype=torch.float32, device=q.device) if g is None
                 else g.float().contiguous() for g, s in zip(dfin, shapes))
    do = torch.zeros_like(q) if do is None else do.contiguous()
    dq, dk, dv = (torch.empty((B, T, H, d), dtype=q.dtype, device=q.device) for _ in range(3))
    dlr = torch.empty((B, T, H), dtype=torch.float32, device=q.device)
    dps = tuple(torch.empty((B, H, *s), dtype=torch.float32, device=q.device) for s in shapes)
    dtau = torch.empty((B * H, BT), dtype=torch.float32, device=q.device)
    dlnw = torch.empty((B * H, BD), dtype=torch.float32, device=q.device)
    dlnb = torch.empty((B * H, BD), dtype=torch.float32, device=q.device)
    dot = dot_mode(q.dtype) if dot is None else dot
    # the per-step weights of the reverse walk only feed products: stored in the products' operand type
    scr = tuple(torch.empty((B * H * group, *s), device=q.device,
                            dtype=operand_dtype(dot) if len(s) == 2 else torch.float32) for s in shapes)
    ttt_mlp_bwd_t_kernel[(B * H,)](
        q, k, v, lr, tau, ln_weight, ln_bias, *ckpt, do, *dfin,
        dq, dk, dv, dlr, *dps, dtau, dlnw, dlnb, *scr,
        q.stride(0), q.stride(1), q.stride(2), lr.stride(0), lr.stride(1), lr.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), H, nmb, nck,
        D=d, BD=BD, FF=F, BF=BF, MB=mini_batch, BT=BT, GROUP=group, DOT_MODE=dot, EPS=LN_EPS,
        num_warps=num_warps or default_warps(d), num_stages=1)
    dtau = dtau.sum(0)[:mini_batch]
    dlnw = dlnw.view(B, H, BD).sum(0)[:, :d]
    dlnb = dlnb.view(B, H, BD).sum(0)[:, :d]
    return dq, dk, dv, dlr, dtau, dlnw, dlnb, dps
