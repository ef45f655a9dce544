"""TTT-MLP mini-batch dual form as a Triton forward kernel; backward by checkpointed recompute.

Mirrors `ttt/ops/ttt_mlp/dual.py` (docs/math.md §4) on rows (`triton_utils.Rows`: the sequences of a batch, or
packed documents) from a zero accumulator, a row's partial last mini-batch masked and left uncommitted, as the
TTT-Linear kernels (`ttt_linear/chunk.py`); `ttt/ops/triton_backend.py` runs the rest in PyTorch.

Forward: one program per (row, head) walks the row's mini-batches. What stays on chip: both inner weight
matrices W1 (d x F) and W2 (F x d), F = 4d, and the biases, fp32, in registers for the whole sequence
(8 warps for d = 64; the compiler spills part of them, still faster than 16 warps, see
docs/kernels_notes.md); q, k, v, lr are read once per mini-batch
(prefetched one mini-batch ahead), o written once. Head dim and F are padded to powers of two with masks.
tanh-GELU and its exact derivative are computed in fp32 (tanh through a sigmoid). A non-finite token makes
only its own and later outputs non-finite (causal products masked with `where`, non-finite G rows zeroed
in them, later outputs set to NaN).

Backward (`ttt_mlp_bwd_kernel`, hand-derived, checked against autograd through the dual form): the forward
saves (W1, c1, W2, c2) every GROUP mini-batches. Per group, last first, the kernel recomputes the start
weights of each mini-batch into a per-program scratch, then walks the group back carrying dW1, dc1, dW2, dc2
(the gradient w.r.t. the weights after the mini-batch). Per mini-batch (docs/math.md §4 reversed), with
P1 = E*(Q K^T + 1), P2 = E*(X2b X2^T + 1), e_b = tau_b lr:
  dZ2b = LN-backward(dO gam); dP2 = -dZ2b G2^T; dG2 = -P2^T dZ2b; dX2b = dZ2b W2^T + (dP2*E) X2;
  dX2 = (dP2*E)^T X2b; dZ1b = dX2b * GELU'(Z1b); dP1 = -dZ1b G1^T; dG1 = -P1^T dZ1b;
  dQ = dO + dZ1b W1^T + (dP1*E) K; dK = (dP1*E)^T Q;
  carry: dG1 -= e_b (K dW1' + dc1'), dG2 -= e_b (X2 dW2' + dc2'), dK -= (e_b G1) dW1'^T,
         dX2 -= (e_b G2) dW2'^T, de_b = -rowsum(G1 (K dW1' + dc1') + G2 (X2 dW2' + dc2'));
  G1 = H1 * GELU'(Z1), H1 = G2 W2^T: dH1 = dG1 GELU'(Z1), dZ1 = dG1 H1 GELU''(Z1), dG2 += dH1 W2;
  G2 = LN-L2 gradient at Z2 (as in the linear kernel) -> dZ2, dgam, dbet, dV, dK;
  dX2 += dZ2 W2^T; dZ1 += dX2 GELU'(Z1); dK += dZ1 W1^T;
  dW1 = dW1' + Q^T dZ1b + K^T dZ1; dW2 = dW2' + X2b^T dZ2b + dH1^T G2 + X2^T dZ2 (biases: the row sums);
  dE = dP1*(QK^T+1) + dP2*(X2b X2^T+1) (lower triangle) -> dtau_i, dlr_j; e_b -> dlr, dtau_b.
Registers: W1, W2 (loaded per step) and dW1, dW2 (carried) are 64 K fp32 at d = 64: the kernel spills
(see docs/kernels_notes.md); one pipeline stage (num_stages=1) keeps shared memory under the H100 limit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import LN_EPS
from ..triton_utils import (Rows, _dot, _finite_rows, _gelu_parts, _gelu_parts2, _head_consts,
                            _live_rows, _ln_l2_grad, _ln_l2_grad_bwd, _load_mb, _mb_masks, _normalize, _offsets, _proj,
                            _row, _tiles, batch_rows, dot_mode, tile)

# Default warps: 8 (H100, d = 64: forward 5.6 ms with 8 warps vs 12.4 with 16; docs/kernels_notes.md)


@triton.jit
def ttt_mlp_fwd_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, w1_ptr, c1_ptr, w2_ptr, c2_ptr,
    o_ptr, w1T_ptr, c1T_ptr, w2T_ptr, c2T_ptr, ck1_ptr, ckc1_ptr, ck2_ptr, ckc2_ptr, span_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h, o_b, o_t, o_h,
    H,
    D: tl.constexpr, BD: tl.constexpr, FF: tl.constexpr, BF: tl.constexpr, MB: tl.constexpr,
    BT: tl.constexpr, GROUP: tl.constexpr, SAVE: tl.constexpr, DOT_MODE: tl.constexpr, EPS: tl.constexpr,
):
    pid, bi, hi, rt, rd, cmask, tmask, m2 = _tiles(H, D, BD, MB, BT)
    start, L, slot = _row(span_ptr, bi)
    NMB = tl.cdiv(L, MB)
    rf = tl.arange(0, BF)
    fmask = rf < FF
    w1mask = cmask[:, None] & fmask[None, :]
    w2mask = fmask[:, None] & cmask[None, :]
    w1off = rd[:, None] * FF + rf[None, :]  # [BD, BF] of a row-major d x F
    w2off = rf[:, None] * D + rd[None, :]  # [BF, BD] of a row-major F x d

    W1 = tl.load(w1_ptr + pid * D * FF + w1off, mask=w1mask, other=0.0)
    c1 = tl.load(c1_ptr + pid * FF + rf, mask=fmask, other=0.0)
    W2 = tl.load(w2_ptr + pid * FF * D + w2off, mask=w2mask, other=0.0)
    c2 = tl.load(c2_ptr + pid * D + rd, mask=cmask, other=0.0)
    gam, bet, tau_r, tau_b, causal = _head_consts(lnw_ptr, lnb_ptr, tau_ptr, hi, rt, rd, cmask, tmask, D, MB)

    in_base, in_off, lr_base, out_base, out_off = _offsets(bi, hi, start, rt, rd, s_b, s_t, s_h, l_b, l_t, l_h,
                                                           o_b, o_t, o_h)
    tm, m2 = _mb_masks(0, rt, L, cmask, MB)
    qn, kn, vn, lrn = _load_mb(q_ptr, k_ptr, v_ptr, lr_ptr, in_base + in_off, lr_base, rt, m2, tm, l_t)
    for n in range(NMB):
        if SAVE:
            if n % GROUP == 0:
                ck = (slot + n // GROUP) * H + hi
                tl.store(ck1_ptr + ck * D * FF + w1off, W1, mask=w1mask)
                tl.store(ckc1_ptr + ck * FF + rf, c1, mask=fmask)
                tl.store(ck2_ptr + ck * FF * D + w2off, W2, mask=w2mask)
                tl.store(ckc2_ptr + ck * D + rd, c2, mask=cmask)
        t0 = n * MB
        t1 = tl.minimum(n + 1, NMB - 1) * MB
        tm, m2 = _mb_masks(t0, rt, L, cmask, MB)
        # a partial last mini-batch (the row ends inside it) leaves the weights uncommitted (tau_b -> 0)
        tau_e = tl.where(t0 + MB <= L, tau_b, 0.0)
        q = qn.to(tl.float32)
        k = kn.to(tl.float32)
        v = vn.to(tl.float32)
        lr = lrn.to(tl.float32)
        tm1, m21 = _mb_masks(t1, rt, L, cmask, MB)
        qn, kn, vn, lrn = _load_mb(q_ptr, k_ptr, v_ptr, lr_ptr, in_base + t1 * s_t + in_off, lr_base + t1 * l_t,
                                   rt, m21, tm1, l_t)

        # inner forward / backward at the start weights
        Z1 = _dot(k, W1, DOT_MODE) + c1[None, :]  # [BT, BF]
        X2, dX2 = _gelu_parts(Z1)
        Z2 = _dot(X2, W2, DOT_MODE) + c2[None, :]  # [BT, BD]
        G2, xh, rstd, gy, mgx = _ln_l2_grad(Z2, v, k, gam, bet, cmask, D, EPS)
        G1 = _dot(G2, tl.trans(W2), DOT_MODE) * dX2  # [BT, BF]

        # output path; rows (tokens) with a non-finite G enter the causal products as zeros, and the outputs
        # at or after such a row are set to NaN (a non-finite token never reaches an earlier output)
        ok = _finite_rows(G1) & _finite_rows(G2)
        E = tau_r[:, None] * lr[None, :]
        P1 = tl.where(causal, E * (_dot(q, tl.trans(k), DOT_MODE) + 1.0), 0.0)
        Z1b = _dot(q, W1, DOT_MODE) + c1[None, :] - _dot(P1, tl.where(ok[:, None], G1, 0.0), DOT_MODE)
        X2b, _unused = _gelu_parts(Z1b)
        P2 = tl.where(causal, E * (_dot(X2b, tl.trans(X2), DOT_MODE) + 1.0), 0.0)
        Z2b = _dot(X2b, W2, DOT_MODE) + c2[None, :] - _dot(P2, tl.where(ok[:, None], G2, 0.0), DOT_MODE)
        xhb, rstdb = _normalize(Z2b, cmask, D, EPS)
        o = q + xhb * gam[None, :] + bet[None, :]
        poison = tl.sum(tl.where(causal & (~ok)[None, :], 1.0, 0.0), axis=1) > 0.0
        o = tl.where(poison[:, None], float("nan"), o)
        tl.store(o_ptr + out_base + t0 * o_t + out_off, o.to(o_ptr.dtype.element_ty), mask=m2)

        eb = (tau_e * lr)[:, None]
        eG1 = eb * G1
        eG2 = eb * G2
        W1 -= _dot(tl.trans(k), eG1, DOT_MODE)
        c1 -= tl.sum(eG1, axis=0)
        W2 -= _dot(tl.trans(X2), eG2, DOT_MODE)
        c2 -= tl.sum(eG2, axis=0)
    tl.store(w1T_ptr + pid * D * FF + w1off, W1, mask=w1mask)
    tl.store(c1T_ptr + pid * FF + rf, c1, mask=fmask)
    tl.store(w2T_ptr + pid * FF * D + w2off, W2, mask=w2mask)
    tl.store(c2T_ptr + pid * D + rd, c2, mask=cmask)


def fwd(q, k, v, lr, tau, ln_weight, ln_bias, params, mini_batch: int, group: int, save: bool = True,
        num_warps: int | None = None, dot: int | None = None, rows: Rows | None = None):
    """The rows' mini-batches (`triton_utils.Rows`; None: every batch entry whole) from a zero accumulator.
    q, k, v [B,T,H,d] (last dim contiguous, same strides); params = (W1 [N,H,d,F], c1 [N,H,F], W2 [N,H,F,d],
    c2 [N,H,d]) fp32 contiguous, one per row. num_warps None: 8; dot None: by q's dtype (`dot_mode`), else the
    `_dot` mode to use. Returns o (tokens in no row unwritten), the final params (a row ending in a partial
    mini-batch: those at its start), and the checkpoints (params every `group` mini-batches of every row,
    [slots, H, ...]) when `save`."""
    B, T, H, d = q.shape
    rows = rows or batch_rows(B, T, mini_batch, group, q.device)
    assert rows.group == group
    F = params[0].shape[-1]
    BD, BF, BT = tile(d), tile(F), tile(mini_batch)
    o = torch.empty((B, T, H, d), dtype=q.dtype, device=q.device)
    fin = tuple(torch.empty_like(p) for p in params)
    if save:
        ck = tuple(torch.empty((rows.slots, H, *p.shape[2:]), dtype=torch.float32, device=q.device) for p in params)
    else:
        ck = fin  # never written
    ttt_mlp_fwd_kernel[(rows.n * H,)](
        q, k, v, lr, tau, ln_weight, ln_bias, *params, o, *fin, *ck, rows.span,
        *rows.strides(q), *rows.strides(lr), *rows.strides(o), H,
        D=d, BD=BD, FF=F, BF=BF, MB=mini_batch, BT=BT, GROUP=group, SAVE=save,
        DOT_MODE=dot_mode(q.dtype) if dot is None else dot, EPS=LN_EPS, num_warps=num_warps or 8)
    return o, fin, (ck if save else None)


@triton.jit
def _mlp_inner(k, v, W1, c1, W2, c2, gam, bet, cmask, D: tl.constexpr, DOT_MODE: tl.constexpr, EPS: tl.constexpr):
    """Inner forward at the start weights and the gradients G2 (w.r.t. Z2) and G1 (w.r.t. Z1)."""
    Z1 = _dot(k, W1, DOT_MODE) + c1[None, :]
    X2, D1 = _gelu_parts(Z1)
    G2, xh, rstd, gy, mgx = _ln_l2_grad(_dot(X2, W2, DOT_MODE) + c2[None, :], v, k, gam, bet, cmask, D, EPS)
    H1 = _dot(G2, tl.trans(W2), DOT_MODE)
    G1 = H1 * D1
    return Z1, X2, D1, G2, H1, G1, xh, rstd, gy, mgx


@triton.jit
def ttt_mlp_bwd_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, ck1_ptr, ckc1_ptr, ck2_ptr, ckc2_ptr,
    do_ptr, dw1T_ptr, dc1T_ptr, dw2T_ptr, dc2T_ptr,
    dq_ptr, dk_ptr, dv_ptr, dlr_ptr, dw1_ptr, dc1_ptr, dw2_ptr, dc2_ptr, dtau_ptr, dlnw_ptr, dlnb_ptr,
    sc1_ptr, scc1_ptr, sc2_ptr, scc2_ptr, span_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h, o_b, o_t, o_h, dl_b,
    H,
    D: tl.constexpr, BD: tl.constexpr, FF: tl.constexpr, BF: tl.constexpr, MB: tl.constexpr,
    BT: tl.constexpr, GROUP: tl.constexpr, DOT_MODE: tl.constexpr, EPS: tl.constexpr,
):
    pid, bi, hi, rt, rd, cmask, tmask, m2 = _tiles(H, D, BD, MB, BT)
    start, L, slot = _row(span_ptr, bi)
    NMB = tl.cdiv(L, MB)
    NCK = tl.cdiv(NMB, GROUP)
    rf = tl.arange(0, BF)
    fmask = rf < FF
    w1mask = cmask[:, None] & fmask[None, :]
    w2mask = fmask[:, None] & cmask[None, :]
    w1off = rd[:, None] * FF + rf[None, :]
    w2off = rf[:, None] * D + rd[None, :]

    gam, bet, tau_r, tau_b, causal = _head_consts(lnw_ptr, lnb_ptr, tau_ptr, hi, rt, rd, cmask, tmask, D, MB)

    dW1 = tl.load(dw1T_ptr + pid * D * FF + w1off, mask=w1mask, other=0.0)
    dc1 = tl.load(dc1T_ptr + pid * FF + rf, mask=fmask, other=0.0)
    dW2 = tl.load(dw2T_ptr + pid * FF * D + w2off, mask=w2mask, other=0.0)
    dc2 = tl.load(dc2T_ptr + pid * D + rd, mask=cmask, other=0.0)
    dgam = tl.zeros([BD], dtype=tl.float32)
    dbet = tl.zeros([BD], dtype=tl.float32)
    dtau = tl.zeros([BT], dtype=tl.float32)
    dtau_b = tl.zeros([BT], dtype=tl.float32)

    in_base, in_off, lr_base, out_base, out_off = _offsets(bi, hi, start, rt, rd, s_b, s_t, s_h, l_b, l_t, l_h,
                                                           o_b, o_t, o_h)
    dlr_base = bi * dl_b + start * H + hi  # dlr [B, T, H] contiguous (packed rows: dl_b = 0)
    sc_base = pid * GROUP
    for gi in range(NCK):
        g = NCK - 1 - gi
        n0 = g * GROUP
        n1 = tl.minimum(n0 + GROUP, NMB)
        # recompute the start weights of every mini-batch of the group into the scratch
        ck = (slot + g) * H + hi
        W1 = tl.load(ck1_ptr + ck * D * FF + w1off, mask=w1mask, other=0.0)
        c1 = tl.load(ckc1_ptr + ck * FF + rf, mask=fmask, other=0.0)
        W2 = tl.load(ck2_ptr + ck * FF * D + w2off, mask=w2mask, other=0.0)
        c2 = tl.load(ckc2_ptr + ck * D + rd, mask=cmask, other=0.0)
        for n in range(n0, n1):
            sc = sc_base + n - n0
            tl.store(sc1_ptr + sc * D * FF + w1off, W1, mask=w1mask)
            tl.store(scc1_ptr + sc * FF + rf, c1, mask=fmask)
            tl.store(sc2_ptr + sc * FF * D + w2off, W2, mask=w2mask)
            tl.store(scc2_ptr + sc * D + rd, c2, mask=cmask)
            if n < n1 - 1:  # the last start weights of the group are not advanced further (so all these are full)
                tm, m2 = _mb_masks(n * MB, rt, L, cmask, MB)
                ptr = in_base + n * MB * s_t + in_off
                k = tl.load(k_ptr + ptr, mask=m2, other=0.0).to(tl.float32)
                v = tl.load(v_ptr + ptr, mask=m2, other=0.0).to(tl.float32)
                lr = tl.load(lr_ptr + lr_base + (n * MB + rt) * l_t, mask=tm, other=0.0).to(tl.float32)
                Z1, X2, D1, G2, H1, G1, xh, rstd, gy, mgx = _mlp_inner(k, v, W1, c1, W2, c2, gam, bet, cmask,
                                                                       D, DOT_MODE, EPS)
                eb = (tau_b * lr)[:, None]
                eG1 = eb * G1
                eG2 = eb * G2
                W1 -= _dot(tl.trans(k), eG1, DOT_MODE)
                c1 -= tl.sum(eG1, axis=0)
                W2 -= _dot(tl.trans(X2), eG2, DOT_MODE)
                c2 -= tl.sum(eG2, axis=0)
        tl.debug_barrier()
        # walk the group back; the loads of the next (earlier) mini-batch's inputs go out first
        n = n1 - 1
        tm, m2 = _mb_masks(n * MB, rt, L, cmask, MB)
        ptr = in_base + n * MB * s_t + in_off
        qn = tl.load(q_ptr + ptr, mask=m2, other=0.0)
        kn = tl.load(k_ptr + ptr, mask=m2, other=0.0)
        vn = tl.load(v_ptr + ptr, mask=m2, other=0.0)
        lrn = tl.load(lr_ptr + lr_base + (n * MB + rt) * l_t, mask=tm, other=0.0)
        dOn = tl.load(do_ptr + out_base + n * MB * o_t + out_off, mask=m2, other=0.0)
        for ni in range(n1 - n0):
            n = n1 - 1 - ni
            t0 = n * MB
            tm, m2 = _mb_masks(t0, rt, L, cmask, MB)
            full = t0 + MB <= L  # a partial last mini-batch commits nothing: no carried-weight terms
            q = qn.to(tl.float32)
            k = kn.to(tl.float32)
            v = vn.to(tl.float32)
            lr = lrn.to(tl.float32)
            dO = dOn.to(tl.float32)
            m = tl.maximum(n - 1, n0)
            tm1, m21 = _mb_masks(m * MB, rt, L, cmask, MB)
            ptr = in_base + m * MB * s_t + in_off
            qn = tl.load(q_ptr + ptr, mask=m21, other=0.0)
            kn = tl.load(k_ptr + ptr, mask=m21, other=0.0)
            vn = tl.load(v_ptr + ptr, mask=m21, other=0.0)
            lrn = tl.load(lr_ptr + lr_base + (m * MB + rt) * l_t, mask=tm1, other=0.0)
            dOn = tl.load(do_ptr + out_base + m * MB * o_t + out_off, mask=m21, other=0.0)
            sc = sc_base + n - n0
            W1s = tl.load(sc1_ptr + sc * D * FF + w1off, mask=w1mask, other=0.0)
            c1 = tl.load(scc1_ptr + sc * FF + rf, mask=fmask, other=0.0)
            W2s = tl.load(sc2_ptr + sc * FF * D + w2off, mask=w2mask, other=0.0)
            c2 = tl.load(scc2_ptr + sc * D + rd, mask=cmask, other=0.0)

            # forward recompute
            Z1, X2, D1, G2, H1, G1, xh, rstd, gy, mgx = _mlp_inner(k, v, W1s, c1, W2s, c2, gam, bet, cmask,
                                                                   D, DOT_MODE, EPS)
            # NaN containment: the rows (tokens) at and after a non-finite one pass no gradient, nor does the state
            # after this mini-batch then; their values enter the products below as zeros (docs/kernels_notes.md)
            # (rows past the row's end are loaded as zeros and count as finite; a partial last mini-batch commits
            # nothing, so the state after it is the one before it: kept)
            live, out, keep = _live_rows(q, k, v, lr, tl.where(tm, tl.sum(G1, axis=1) + tl.sum(G2, axis=1), 0.0),
                                         causal)
            keep = keep | (t0 + MB > L)
            # Non-finite start weights make every row's inner gradient non-finite (row 0 is always in the row), so no
            # row is live then: the weights are not sanitised, their products are taken as zeros on the rows that are
            # not live instead (row selects on [BT, *] results, the values of dead rows only need to be finite); a
            # dropped carry (keep false) likewise enters the products with dW1, dW2 as zeros and is reset after its
            # last use. No weight-sized select is live across the dots: sm_90 fp32 d = 64, 8 warps, needs 176,128 B
            # of shared memory (329,728 with the weights sanitised and the carry reset up front; limit 232,448).
            lv = live[:, None]
            q, dO = tl.where(out[:, None], q, 0.0), tl.where(out[:, None], dO, 0.0)
            k, v, lr = tl.where(lv, k, 0.0), tl.where(lv, v, 0.0), tl.where(live, lr, 0.0)
            Z1, X2, D1, G2, H1, G1 = (tl.where(lv, Z1, 0.0), tl.where(lv, X2, 0.0), tl.where(lv, D1, 0.0),
                                      tl.where(lv, G2, 0.0), tl.where(lv, H1, 0.0), tl.where(lv, G1, 0.0))
            xh, gy = tl.where(lv, xh, 0.0), tl.where(lv, gy, 0.0)
            rstd, mgx = tl.where(live, rstd, 0.0), tl.where(live, mgx, 0.0)
            E = tl.where(causal, tau_r[:, None] * lr[None, :], 0.0)
            QK1 = _dot(q, tl.trans(k), DOT_MODE) + 1.0
            P1 = E * QK1
            Z1b = tl.where(lv, _dot(q, W1s, DOT_MODE) + c1[None, :] - _dot(P1, G1, DOT_MODE), 0.0)
            X2b, D1b = _gelu_parts(Z1b)
            XX1 = _dot(X2b, tl.trans(X2), DOT_MODE) + 1.0
            P2 = E * XX1
            Z2b = tl.where(lv, _dot(X2b, W2s, DOT_MODE) + c2[None, :] - _dot(P2, G2, DOT_MODE), 0.0)
            xhb, rstdb = _normalize(Z2b, cmask, D, EPS)

            # o = q + LN(Z2b)
            dgam += tl.sum(dO * xhb, axis=0)
            dbet += tl.sum(dO, axis=0)
            dZ2b = _proj(dO * gam[None, :], xhb, rstdb, cmask, D)
            # Z2b = X2b W2 + c2 - P2 G2,  P2 = E * (X2b X2^T + 1)
            dP2 = -_dot(dZ2b, tl.trans(G2), DOT_MODE)
            dG2 = -_dot(tl.trans(P2), dZ2b, DOT_MODE)
            dE = dP2 * XX1
            dA2 = dP2 * E
            dX2b = tl.where(lv, _dot(dZ2b, tl.trans(W2s), DOT_MODE), 0.0) + _dot(dA2, X2, DOT_MODE)
            dX2 = _dot(tl.trans(dA2), X2b, DOT_MODE)
            # Z1b = Q W1 + c1 - P1 G1,  P1 = E * (Q K^T + 1),  X2b = GELU(Z1b)
            dZ1b = dX2b * D1b
            dP1 = -_dot(dZ1b, tl.trans(G1), DOT_MODE)
            dG1 = -_dot(tl.trans(P1), dZ1b, DOT_MODE)
            dE += dP1 * QK1
            dA1 = dP1 * E
            dq = dO + tl.where(lv, _dot(dZ1b, tl.trans(W1s), DOT_MODE), 0.0) + _dot(dA1, k, DOT_MODE)
            dk = _dot(tl.trans(dA1), q, DOT_MODE)
            # carry: W1' = W1 - K^T (e_b G1), c1' = c1 - sum e_b G1, W2' = W2 - X2^T (e_b G2), c2' likewise
            tau_e = tl.where(full, tau_b, 0.0)
            eb = tau_e * lr
            KdW1 = tl.where(keep, _dot(k, dW1, DOT_MODE) + dc1[None, :], 0.0)
            XdW2 = tl.where(keep, _dot(X2, dW2, DOT_MODE) + dc2[None, :], 0.0)
            S = tl.sum(KdW1 * G1, axis=1) + tl.sum(XdW2 * G2, axis=1)
            dG1 -= eb[:, None] * KdW1
            dG2 -= eb[:, None] * XdW2
            dk -= tl.where(keep, _dot(eb[:, None] * G1, tl.trans(dW1), DOT_MODE), 0.0)
            dX2 -= tl.where(keep, _dot(eb[:, None] * G2, tl.trans(dW2), DOT_MODE), 0.0)
            dlr = -tau_e * S
            dtau_b += tl.where(full, -lr * S, 0.0)
            dE = tl.where(causal, dE, 0.0)
            dtau += tl.sum(dE * lr[None, :], axis=1)
            dlr += tl.sum(dE * tau_r[:, None], axis=0)
            # G1 = H1 * GELU'(Z1), H1 = G2 W2^T
            dH1 = dG1 * D1
            _x, _dx, DD1 = _gelu_parts2(Z1)
            dZ1 = dG1 * H1 * DD1
            dG2 += tl.where(lv, _dot(dH1, W2s, DOT_MODE), 0.0)
            # G2 = LN-L2 gradient at Z2 = X2 W2 + c2 (target v - k)
            dgy, dZ2 = _ln_l2_grad_bwd(dG2, G2, xh, rstd, gy, mgx, gam, cmask, D)
            dgam += tl.sum(dgy * (2.0 * gam[None, :] * xh + bet[None, :] - (v - k)), axis=0)
            dbet += tl.sum(dgy * gam[None, :], axis=0)
            dv = -gam[None, :] * dgy
            dk += gam[None, :] * dgy
            dX2 += tl.where(lv, _dot(dZ2, tl.trans(W2s), DOT_MODE), 0.0)
            dZ1 += dX2 * D1
            dk += tl.where(lv, _dot(dZ1, tl.trans(W1s), DOT_MODE), 0.0)
            # gradients w.r.t. the start weights of this mini-batch
            # (a dropped carry is reset here, after its last use)
            dW1 = tl.where(keep, dW1, 0.0) + _dot(tl.trans(q), dZ1b, DOT_MODE) + _dot(tl.trans(k), dZ1, DOT_MODE)
            dc1 = tl.where(keep, dc1, 0.0) + tl.sum(dZ1b, axis=0) + tl.sum(dZ1, axis=0)
            dW2 = tl.where(keep, dW2, 0.0) + _dot(tl.trans(X2b), dZ2b, DOT_MODE) + _dot(tl.trans(dH1), G2, DOT_MODE) \
                + _dot(tl.trans(X2), dZ2, DOT_MODE)
            dc2 = tl.where(keep, dc2, 0.0) + tl.sum(dZ2b, axis=0) + tl.sum(dZ2, axis=0)

            optr = out_base + t0 * o_t + out_off
            tl.store(dq_ptr + optr, dq.to(dq_ptr.dtype.element_ty), mask=m2)
            tl.store(dk_ptr + optr, dk.to(dk_ptr.dtype.element_ty), mask=m2)
            tl.store(dv_ptr + optr, dv.to(dv_ptr.dtype.element_ty), mask=m2)
            tl.store(dlr_ptr + dlr_base + (t0 + rt) * H, dlr, mask=tm)
        tl.debug_barrier()
    tl.store(dw1_ptr + pid * D * FF + w1off, dW1, mask=w1mask)
    tl.store(dc1_ptr + pid * FF + rf, dc1, mask=fmask)
    tl.store(dw2_ptr + pid * FF * D + w2off, dW2, mask=w2mask)
    tl.store(dc2_ptr + pid * D + rd, dc2, mask=cmask)
    dtau += tl.where(rt == MB - 1, tl.sum(dtau_b, axis=0), 0.0)
    tl.store(dtau_ptr + pid * BT + rt, dtau)
    tl.store(dlnw_ptr + pid * BD + rd, dgam)
    tl.store(dlnb_ptr + pid * BD + rd, dbet)


# num_stages=1: Triton's loop pipeliner would stage the per-step W1/W2 scratch loads (2 x 64 KB fp32) in
# shared memory 3 deep: 326 KB at d = 64, over the H100's 227 KB (196 KB with 1 stage).


def bwd(q, k, v, lr, tau, ln_weight, ln_bias, ckpt, do, dfin, mini_batch: int, group: int,
        num_warps: int | None = None, dot: int | None = None, rows: Rows | None = None):
    """Gradients of `fwd` over the same rows (hand-derived, Triton). do [B,T,H,d] (or None); dfin the gradients
    of the final (W1, c1, W2, c2) [N,H,...] (entries may be None). Returns dq, dk, dv (q's dtype; zero at tokens
    in no row), dlr [B,T,H] fp32, dtau [b], dln_w, dln_b [H,d], and the gradients of the start params (fp32)."""
    B, T, H, d = q.shape
    rows = rows or batch_rows(B, T, mini_batch, group, q.device)
    N = rows.n
    F = ckpt[0].shape[-1]
    BD, BF, BT = tile(d), tile(F), tile(mini_batch)
    shapes = ((d, F), (F,), (F, d), (d,))
    dfin = tuple(torch.zeros((N, H, *s), dtype=torch.float32, device=q.device) if g is None
                 else g.float().contiguous() for g, s in zip(dfin, shapes))
    do = torch.zeros_like(q) if do is None else do.contiguous()
    fill = torch.empty if rows.covered else torch.zeros  # tokens in no row get zero gradients
    dq, dk, dv = (fill((B, T, H, d), dtype=q.dtype, device=q.device) for _ in range(3))
    dlr = fill((B, T, H), dtype=torch.float32, device=q.device)
    dps = tuple(torch.empty((N, H, *s), dtype=torch.float32, device=q.device) for s in shapes)
    dtau = torch.empty((N * H, BT), dtype=torch.float32, device=q.device)
    dlnw = torch.empty((N * H, BD), dtype=torch.float32, device=q.device)
    dlnb = torch.empty((N * H, BD), dtype=torch.float32, device=q.device)
    dot = dot_mode(q.dtype) if dot is None else dot
    scr = tuple(torch.empty((N * H * group, *s), dtype=torch.float32, device=q.device) for s in shapes)
    ttt_mlp_bwd_kernel[(N * H,)](
        q, k, v, lr, tau, ln_weight, ln_bias, *ckpt, do, *dfin,
        dq, dk, dv, dlr, *dps, dtau, dlnw, dlnb, *scr, rows.span,
        *rows.strides(q), *rows.strides(lr), *rows.strides(dq), 0 if rows.packed else T * H, H,
        D=d, BD=BD, FF=F, BF=BF, MB=mini_batch, BT=BT, GROUP=group,
        DOT_MODE=dot, EPS=LN_EPS, num_warps=num_warps or 8, num_stages=1)
    dtau = dtau.sum(0)[:mini_batch]
    dlnw = dlnw.view(N, H, BD).sum(0)[:, :d]
    dlnb = dlnb.view(N, H, BD).sum(0)[:, :d]
    return dq, dk, dv, dlr, dtau, dlnw, dlnb, dps
