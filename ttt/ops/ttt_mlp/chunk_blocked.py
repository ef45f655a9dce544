"""TTT-MLP forward and backward kernels for any head dim (96, 128, ...): the hidden width F = 4d is walked in
column blocks, and the inner weights live in a per-program global scratch instead of registers.

Same contract and math as `chunk.py` (which keeps W1, W2 in registers, d <= 64): rows (`triton_utils.Rows`) from
a zero accumulator, a partial last mini-batch masked and left uncommitted; `ttt/ops/triton_backend.py` picks the
kernel and runs the rest in PyTorch.

Forward, per mini-batch (one program per (row, head); W1 [d,F], c1 [F], W2 [F,d] are read and written
in place in the output buffers, which start as a copy of the initial weights; c2 [d] stays in registers):
  pass 1 over F blocks f:  Z2 += GELU(K W1_f + c1_f) W2_f                     (and the checkpoint, if due)
  G2 = LN-L2 gradient at Z2; P1 = E * (Q K^T + 1)
  pass 2 over F blocks f:  G1_f = (G2 W2_f^T) * GELU'(Z1_f); Z1b_f = Q W1_f + c1_f - P1 G1_f;
                           Z2b += GELU(Z1b_f) W2_f; S2 += GELU(Z1b_f) X2_f^T;
                           then W1_f -= K^T (e_b G1_f), c1_f, W2_f -= X2_f^T (e_b G2) written back
  Z2b = Z2b + c2 - (E * (S2 + 1)) G2; o = Q + LN(Z2b); c2 -= sum e_b G2.
Z1_f = K W1_f + c1_f is recomputed in each pass (one small product) rather than stored.

Backward (hand-derived, the formulas of `chunk.py`'s docstring split by what needs a sum over all of F):
per checkpoint group, last first, the start weights of each mini-batch are recomputed into a per-program
scratch (a forward without outputs), then the group is walked back. The carried gradients w.r.t. the
weights after a mini-batch (dW1', dc1', dW2') live in the output buffers (in place; dc2 in registers).
Per mini-batch, four passes over the F blocks:
  A: Z2 = sum_f X2_f W2_f + c2 and X2 dW2' = sum_f X2_f dW2'_f (+ dc2')  -> G2, LN statistics
  B: Z2b = sum_f X2b_f W2_f + ..., X2b X2^T = sum_f X2b_f X2_f^T        -> o's LN backward: dZ2b, dP2, dA2
  C: per block: dX2b_f, dZ1b_f, dG1_f, dH1_f and their sums dP1, dG2 += dH1_f W2_f, dq, dk, the
     carried-weight terms, and dW1_f, dc1_f, dW2_f updated with every term that does not need dZ2
  (dG2 complete -> LN-L2 backward -> dZ2, dV, dgamma, dbeta)
  D: per block: the dZ2 terms: dX2_f += dZ2 W2_f^T -> dZ1_f -> dk, dW1_f, dc1_f; dW2_f += X2_f^T dZ2.
A block's loads and its write-back are separated by a barrier (threads load and store in different
layouts), and each pass that reads what an earlier pass wrote starts after one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import LN_EPS
from ..triton_utils import (Rows, _dot, _finite_or_0, _finite_rows, _gelu_parts, _gelu_parts2, _head_consts,
                            _live_rows, _ln_l2_grad, _ln_l2_grad_bwd, _load_mb, _mb_masks, _normalize, _offsets, _proj,
                            _row, _tiles, batch_rows, cdiv, dot_mode, pow2, tile)

# Defaults of `fwd`/`bwd`: 32-column F blocks, 4 warps, 3 pipeline stages. H100 (docs/kernels_notes.md):
# d = 64, B16 T2048 forward: 32-column blocks with 4 warps 9.0 ms, 8 warps 10.7, 64-column blocks 31.4
# (spills), 16-column blocks 14.0. d = 128, B4 T8192: 3 stages + 4 warps forward 39.5 ms, fwd+bwd 270
# (1 stage + 8 warps: 41.2 / 305). The loop pipeliner stages the F-block loads in shared memory.


@triton.jit
def _wblock(w1_ptr, c1_ptr, w2_ptr, f0, rd, rf, cmask, D: tl.constexpr, FF: tl.constexpr):
    """Block f0:f0+FB of W1 [d,F] (columns), c1 [F] and W2 [F,d] (rows), fp32, zero outside."""
    cols = f0 + rf
    fm = cols < FF
    W1 = tl.load(w1_ptr + rd[:, None] * FF + cols[None, :], mask=cmask[:, None] & fm[None, :], other=0.0)
    c1 = tl.load(c1_ptr + cols, mask=fm, other=0.0)
    W2 = tl.load(w2_ptr + cols[:, None] * D + rd[None, :], mask=fm[:, None] & cmask[None, :], other=0.0)
    return W1, c1, W2


@triton.jit
def _wblock_finite(w1_ptr, c1_ptr, w2_ptr, f0, rd, rf, cmask, D: tl.constexpr, FF: tl.constexpr):
    """`_wblock` with non-finite entries read as 0 (the backward's NaN containment: a poisoned state's
    mini-batches pass no gradient, and must not turn the zeros they multiply into NaN)."""
    W1, c1, W2 = _wblock(w1_ptr, c1_ptr, w2_ptr, f0, rd, rf, cmask, D, FF)
    return _finite_or_0(W1), _finite_or_0(c1), _finite_or_0(W2)


@triton.jit
def _wstore(w1_ptr, c1_ptr, w2_ptr, W1, c1, W2, f0, rd, rf, cmask, D: tl.constexpr, FF: tl.constexpr):
    cols = f0 + rf
    fm = cols < FF
    tl.store(w1_ptr + rd[:, None] * FF + cols[None, :], W1, mask=cmask[:, None] & fm[None, :])
    tl.store(c1_ptr + cols, c1, mask=fm)
    tl.store(w2_ptr + cols[:, None] * D + rd[None, :], W2, mask=fm[:, None] & cmask[None, :])


@triton.jit
def _z2(k, w1_ptr, c1_ptr, w2_ptr, c2, rd, rf, cmask, NFB,
        D: tl.constexpr, FF: tl.constexpr, FB: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
        DOT_MODE: tl.constexpr):
    """Z2 = GELU(K W1 + c1) W2 + c2 over the F blocks. [BT, BD]"""
    z2 = tl.zeros([BT, BD], dtype=tl.float32)
    for f in range(NFB):
        W1, c1, W2 = _wblock(w1_ptr, c1_ptr, w2_ptr, f * FB, rd, rf, cmask, D, FF)
        X2, _d = _gelu_parts(_dot(k, W1, DOT_MODE) + c1[None, :])
        z2 += _dot(X2, W2, DOT_MODE)
    return z2 + c2[None, :]


@triton.jit
def _update(k, eb, G2, w1_ptr, c1_ptr, w2_ptr, dst1_ptr, dstc1_ptr, dst2_ptr, rd, rf, cmask, NFB,
            D: tl.constexpr, FF: tl.constexpr, FB: tl.constexpr, DOT_MODE: tl.constexpr):
    """The end-of-mini-batch step of W1, c1, W2 (read from w*, written to dst*, block by block)."""
    eG2 = eb[:, None] * G2
    for f in range(NFB):
        W1, c1, W2 = _wblock(w1_ptr, c1_ptr, w2_ptr, f * FB, rd, rf, cmask, D, FF)
        X2, D1 = _gelu_parts(_dot(k, W1, DOT_MODE) + c1[None, :])
        eG1 = eb[:, None] * _dot(G2, tl.trans(W2), DOT_MODE) * D1
        W1 -= _dot(tl.trans(k), eG1, DOT_MODE)
        c1 -= tl.sum(eG1, axis=0)
        W2 -= _dot(tl.trans(X2), eG2, DOT_MODE)
        tl.debug_barrier()
        _wstore(dst1_ptr, dstc1_ptr, dst2_ptr, W1, c1, W2, f * FB, rd, rf, cmask, D, FF)


@triton.jit
def _out_block(q, k, G2, P1, W1, c1, W2, DOT_MODE: tl.constexpr):
    """One F block of the output path: X2 = GELU(K W1 + c1), G1 = (G2 W2^T) GELU'(K W1 + c1),
    X2b = GELU(Q W1 + c1 - P1 G1) [BT, FB] each, and which rows (tokens) of G1 are finite [BT]; a non-finite
    row enters the causal product P1 G1 as zeros (the caller poisons the outputs at and after it)."""
    X2, D1 = _gelu_parts(_dot(k, W1, DOT_MODE) + c1[None, :])
    G1 = _dot(G2, tl.trans(W2), DOT_MODE) * D1
    ok = _finite_rows(G1)
    X2b, _d = _gelu_parts(_dot(q, W1, DOT_MODE) + c1[None, :] - _dot(P1, tl.where(ok[:, None], G1, 0.0), DOT_MODE))
    return X2, G1, X2b, ok


@triton.jit
def ttt_mlp_fwd_blocked_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, w1_ptr, c1_ptr, w2_ptr, c2_ptr,
    o_ptr, ck1_ptr, ckc1_ptr, ck2_ptr, ckc2_ptr, span_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h, o_b, o_t, o_h,
    H, NFB,
    D: tl.constexpr, BD: tl.constexpr, FF: tl.constexpr, FB: tl.constexpr, MB: tl.constexpr,
    BT: tl.constexpr, GROUP: tl.constexpr, SAVE: tl.constexpr, DOT_MODE: tl.constexpr, EPS: tl.constexpr,
):
    pid, bi, hi, rt, rd, cmask, tmask, m2 = _tiles(H, D, BD, MB, BT)
    start, L, slot = _row(span_ptr, bi)
    NMB = tl.cdiv(L, MB)
    rf = tl.arange(0, FB)
    w1 = w1_ptr + pid * D * FF  # this program's weights, updated in place
    c1p = c1_ptr + pid * FF
    w2 = w2_ptr + pid * FF * D
    c2 = tl.load(c2_ptr + pid * D + rd, mask=cmask, other=0.0)
    gam, bet, tau_r, tau_b, causal = _head_consts(lnw_ptr, lnb_ptr, tau_ptr, hi, rt, rd, cmask, tmask, D, MB)

    in_base, in_off, lr_base, out_base, out_off = _offsets(bi, hi, start, rt, rd, s_b, s_t, s_h, l_b, l_t, l_h,
                                                           o_b, o_t, o_h)
    tm, m2 = _mb_masks(0, rt, L, cmask, MB)
    qn, kn, vn, lrn = _load_mb(q_ptr, k_ptr, v_ptr, lr_ptr, in_base + in_off, lr_base, rt, m2, tm, l_t)
    for n in range(NMB):
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

        # pass 1: Z2 at the start weights (and the checkpoint of these weights when one is due)
        z2 = tl.zeros([BT, BD], dtype=tl.float32)
        for f in range(NFB):
            W1, c1, W2 = _wblock(w1, c1p, w2, f * FB, rd, rf, cmask, D, FF)
            if SAVE:
                if n % GROUP == 0:
                    ck = (slot + n // GROUP) * H + hi
                    _wstore(ck1_ptr + ck * D * FF, ckc1_ptr + ck * FF, ck2_ptr + ck * FF * D, W1, c1, W2,
                            f * FB, rd, rf, cmask, D, FF)
            X2, _d = _gelu_parts(_dot(k, W1, DOT_MODE) + c1[None, :])
            z2 += _dot(X2, W2, DOT_MODE)
        if SAVE:
            if n % GROUP == 0:
                tl.store(ckc2_ptr + ((slot + n // GROUP) * H + hi) * D + rd, c2, mask=cmask)
        G2, _xh, _rstd, _gy, _mgx = _ln_l2_grad(z2 + c2[None, :], v, k, gam, bet, cmask, D, EPS)
        E = tl.where(causal, tau_r[:, None] * lr[None, :], 0.0)
        P1 = tl.where(causal, E * (_dot(q, tl.trans(k), DOT_MODE) + 1.0), 0.0)
        eb = tau_e * lr
        eG2 = eb[:, None] * G2
        ok = _finite_rows(G2)  # tokens whose G1 and G2 are finite (G1's rows are checked block by block)

        # pass 2: the output products, then the weight update of each block
        z2b = tl.zeros([BT, BD], dtype=tl.float32)
        s2 = tl.zeros([BT, BT], dtype=tl.float32)
        for f in range(NFB):
            W1, c1, W2 = _wblock(w1, c1p, w2, f * FB, rd, rf, cmask, D, FF)
            X2, G1, X2b, okf = _out_block(q, k, G2, P1, W1, c1, W2, DOT_MODE)
            ok = ok & okf
            z2b += _dot(X2b, W2, DOT_MODE)
            s2 += _dot(X2b, tl.trans(X2), DOT_MODE)
            eG1 = eb[:, None] * G1
            W1 -= _dot(tl.trans(k), eG1, DOT_MODE)
            c1 -= tl.sum(eG1, axis=0)
            W2 -= _dot(tl.trans(X2), eG2, DOT_MODE)
            tl.debug_barrier()
            _wstore(w1, c1p, w2, W1, c1, W2, f * FB, rd, rf, cmask, D, FF)
        Z2b = z2b + c2[None, :] - _dot(tl.where(causal, E * (s2 + 1.0), 0.0), tl.where(ok[:, None], G2, 0.0),
                                       DOT_MODE)
        xhb, rstdb = _normalize(Z2b, cmask, D, EPS)
        o = q + xhb * gam[None, :] + bet[None, :]
        # a token with a non-finite G reaches only its own and later outputs (as NaN)
        o = tl.where((tl.sum(tl.where(causal & (~ok)[None, :], 1.0, 0.0), axis=1) > 0.0)[:, None], float("nan"), o)
        tl.store(o_ptr + out_base + t0 * o_t + out_off, o.to(o_ptr.dtype.element_ty), mask=m2)
        c2 -= tl.sum(eG2, axis=0)
        tl.debug_barrier()
    tl.store(c2_ptr + pid * D + rd, c2, mask=cmask)


def _block_f(F: int, block_f: int | None) -> int:
    return block_f or min(32, pow2(F))


def fwd(q, k, v, lr, tau, ln_weight, ln_bias, params, mini_batch: int, group: int, save: bool = True,
        num_warps: int | None = None, dot: int | None = None, block_f: int | None = None,
        num_stages: int | None = None, rows: Rows | None = None):
    """Same contract as `chunk.fwd`: the rows' mini-batches (None: every batch entry whole), params (W1, c1, W2,
    c2) fp32 contiguous, one per row. num_warps None: 4; dot None: by q's dtype; block_f None: 32 columns of F
    per block; num_stages None: 3. Returns o, the final params, and the checkpoints (params every `group`
    mini-batches of every row) when `save`."""
    B, T, H, d = q.shape
    rows = rows or batch_rows(B, T, mini_batch, group, q.device)
    assert rows.group == group
    F = params[0].shape[-1]
    FB = _block_f(F, block_f)
    BT = tile(mini_batch)
    o = torch.empty((B, T, H, d), dtype=q.dtype, device=q.device)
    fin = tuple(p.clone() for p in params)  # the kernel's working weights, updated in place
    if save:
        ck = tuple(torch.empty((rows.slots, H, *p.shape[2:]), dtype=torch.float32, device=q.device) for p in params)
    else:
        ck = fin  # never written
    ttt_mlp_fwd_blocked_kernel[(rows.n * H,)](
        q, k, v, lr, tau, ln_weight, ln_bias, *fin, o, *ck, rows.span,
        *rows.strides(q), *rows.strides(lr), *rows.strides(o), H, cdiv(F, FB),
        D=d, BD=tile(d), FF=F, FB=FB, MB=mini_batch, BT=BT, GROUP=group, SAVE=save,
        DOT_MODE=dot_mode(q.dtype) if dot is None else dot, EPS=LN_EPS, num_warps=num_warps or 4,
        num_stages=num_stages or 3)
    return o, fin, (ck if save else None)


@triton.jit
def ttt_mlp_bwd_blocked_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, ck1_ptr, ckc1_ptr, ck2_ptr, ckc2_ptr,
    do_ptr, dw1_ptr, dc1_ptr, dw2_ptr, dc2_ptr,
    dq_ptr, dk_ptr, dv_ptr, dlr_ptr, dtau_ptr, dlnw_ptr, dlnb_ptr,
    sc1_ptr, scc1_ptr, sc2_ptr, scc2_ptr, span_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h, o_b, o_t, o_h, dl_b,
    H, NFB,
    D: tl.constexpr, BD: tl.constexpr, FF: tl.constexpr, FB: tl.constexpr, MB: tl.constexpr,
    BT: tl.constexpr, GROUP: tl.constexpr, DOT_MODE: tl.constexpr, EPS: tl.constexpr,
):
    pid, bi, hi, rt, rd, cmask, tmask, m2 = _tiles(H, D, BD, MB, BT)
    start, L, slot = _row(span_ptr, bi)
    NMB = tl.cdiv(L, MB)
    NCK = tl.cdiv(NMB, GROUP)
    rf = tl.arange(0, FB)
    gam, bet, tau_r, tau_b, causal = _head_consts(lnw_ptr, lnb_ptr, tau_ptr, hi, rt, rd, cmask, tmask, D, MB)

    # carried gradients w.r.t. the weights after the current mini-batch: in place in the output buffers
    dw1 = dw1_ptr + pid * D * FF
    dc1p = dc1_ptr + pid * FF
    dw2 = dw2_ptr + pid * FF * D
    dc2 = tl.load(dc2_ptr + pid * D + rd, mask=cmask, other=0.0)
    dgam = tl.zeros([BD], dtype=tl.float32)
    dbet = tl.zeros([BD], dtype=tl.float32)
    dtau = tl.zeros([BT], dtype=tl.float32)
    dtau_b = tl.zeros([BT], dtype=tl.float32)

    in_base, in_off, lr_base, out_base, out_off = _offsets(bi, hi, start, rt, rd, s_b, s_t, s_h, l_b, l_t, l_h,
                                                           o_b, o_t, o_h)
    dlr_base = bi * dl_b + start * H + hi  # dlr [B, T, H] contiguous (packed rows: dl_b = 0)
    for gi in range(NCK):
        g = NCK - 1 - gi
        n0 = g * GROUP
        n1 = tl.minimum(n0 + GROUP, NMB)
        # slot 0 of the scratch <- the group's checkpoint; slot j + 1 <- slot j advanced by mini-batch n0 + j
        ck = (slot + g) * H + hi
        sc = pid * GROUP
        for f in range(NFB):
            W1, c1, W2 = _wblock(ck1_ptr + ck * D * FF, ckc1_ptr + ck * FF, ck2_ptr + ck * FF * D, f * FB,
                                 rd, rf, cmask, D, FF)
            _wstore(sc1_ptr + sc * D * FF, scc1_ptr + sc * FF, sc2_ptr + sc * FF * D, W1, c1, W2, f * FB,
                    rd, rf, cmask, D, FF)
        c2 = tl.load(ckc2_ptr + ck * D + rd, mask=cmask, other=0.0)
        tl.store(scc2_ptr + sc * D + rd, c2, mask=cmask)
        tl.debug_barrier()
        for n in range(n0, n1 - 1):  # not the group's last mini-batch: all these are full
            sc = pid * GROUP + n - n0
            tm, m2 = _mb_masks(n * MB, rt, L, cmask, MB)
            ptr = in_base + n * MB * s_t + in_off
            k = tl.load(k_ptr + ptr, mask=m2, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + ptr, mask=m2, other=0.0).to(tl.float32)
            lr = tl.load(lr_ptr + lr_base + (n * MB + rt) * l_t, mask=tm, other=0.0).to(tl.float32)
            w1 = sc1_ptr + sc * D * FF
            c1p = scc1_ptr + sc * FF
            w2 = sc2_ptr + sc * FF * D
            Z2 = _z2(k, w1, c1p, w2, c2, rd, rf, cmask, NFB, D, FF, FB, BT, BD, DOT_MODE)
            G2, _xh, _rstd, _gy, _mgx = _ln_l2_grad(Z2, v, k, gam, bet, cmask, D, EPS)
            eb = tau_b * lr
            _update(k, eb, G2, w1, c1p, w2, w1 + D * FF, c1p + FF, w2 + FF * D, rd, rf, cmask, NFB,
                    D, FF, FB, DOT_MODE)
            c2 -= tl.sum(eb[:, None] * G2, axis=0)
            tl.store(scc2_ptr + (sc + 1) * D + rd, c2, mask=cmask)
            tl.debug_barrier()

        for ni in range(n1 - n0):
            n = n1 - 1 - ni
            t0 = n * MB
            sc = pid * GROUP + n - n0
            w1 = sc1_ptr + sc * D * FF
            c1p = scc1_ptr + sc * FF
            w2 = sc2_ptr + sc * FF * D
            c2 = tl.load(scc2_ptr + sc * D + rd, mask=cmask, other=0.0)
            tm, m2 = _mb_masks(t0, rt, L, cmask, MB)
            full = t0 + MB <= L  # a partial last mini-batch commits nothing: no carried-weight terms
            ptr = in_base + t0 * s_t + in_off
            q = tl.load(q_ptr + ptr, mask=m2, other=0.0).to(tl.float32)
            k = tl.load(k_ptr + ptr, mask=m2, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + ptr, mask=m2, other=0.0).to(tl.float32)
            lr = tl.load(lr_ptr + lr_base + (t0 + rt) * l_t, mask=tm, other=0.0).to(tl.float32)
            dO = tl.load(do_ptr + out_base + t0 * o_t + out_off, mask=m2, other=0.0).to(tl.float32)

            # pass A: Z2 and X2 dW2' (the carried gradient seen through the W2 update)
            z2 = tl.zeros([BT, BD], dtype=tl.float32)
            xdw2 = tl.zeros([BT, BD], dtype=tl.float32)
            for f in range(NFB):
                W1, c1, W2 = _wblock(w1, c1p, w2, f * FB, rd, rf, cmask, D, FF)
                cols = f * FB + rf
                dW2 = tl.load(dw2 + cols[:, None] * D + rd[None, :], mask=(cols < FF)[:, None] & cmask[None, :],
                              other=0.0)
                X2, _d = _gelu_parts(_dot(k, W1, DOT_MODE) + c1[None, :])
                z2 += _dot(X2, W2, DOT_MODE)
                xdw2 += _dot(X2, dW2, DOT_MODE)
            G2, xh, rstd, gy, mgx = _ln_l2_grad(z2 + c2[None, :], v, k, gam, bet, cmask, D, EPS)
            # NaN containment (as in chunk.py): rows at and after a non-finite token, and then the state after this
            # mini-batch, pass no gradient; passes B-D read the weights with non-finite entries as 0
            # (rows past the row's end are zeros and count as finite; a partial last mini-batch commits nothing, so
            # the state after it, the one before it, is kept)
            live, out, keep = _live_rows(q, k, v, lr, tl.where(tm, tl.sum(G2, axis=1), 0.0), causal)
            keep = keep | (t0 + MB > L)
            lv = live[:, None]
            q, dO = tl.where(out[:, None], q, 0.0), tl.where(out[:, None], dO, 0.0)
            k, v, lr = tl.where(lv, k, 0.0), tl.where(lv, v, 0.0), tl.where(live, lr, 0.0)
            G2, xh, gy = tl.where(lv, G2, 0.0), tl.where(lv, xh, 0.0), tl.where(lv, gy, 0.0)
            rstd, mgx = tl.where(live, rstd, 0.0), tl.where(live, mgx, 0.0)
            dc2 = tl.where(keep, dc2, 0.0)
            XdW2 = tl.where(lv, tl.where(keep, xdw2, 0.0), 0.0) + dc2[None, :]
            tau_e = tl.where(full, tau_b, 0.0)
            eb = tau_e * lr
            c2 = _finite_or_0(c2)
            E = tl.where(causal, tau_r[:, None] * lr[None, :], 0.0)
            QK1 = _dot(q, tl.trans(k), DOT_MODE) + 1.0
            P1 = E * QK1

            # pass B: Z2b and X2b X2^T
            z2b = tl.zeros([BT, BD], dtype=tl.float32)
            s2 = tl.zeros([BT, BT], dtype=tl.float32)
            for f in range(NFB):
                W1, c1, W2 = _wblock_finite(w1, c1p, w2, f * FB, rd, rf, cmask, D, FF)
                X2, _G1, X2b, _ok = _out_block(q, k, G2, P1, W1, c1, W2, DOT_MODE)
                z2b += _dot(X2b, W2, DOT_MODE)
                s2 += _dot(X2b, tl.trans(X2), DOT_MODE)
            XX1 = s2 + 1.0
            P2 = E * XX1
            xhb, rstdb = _normalize(z2b + c2[None, :] - _dot(P2, G2, DOT_MODE), cmask, D, EPS)
            # o = q + LN(Z2b);  Z2b = X2b W2 + c2 - P2 G2
            dgam += tl.sum(dO * xhb, axis=0)
            dbet += tl.sum(dO, axis=0)
            dZ2b = _proj(dO * gam[None, :], xhb, rstdb, cmask, D)
            dP2 = -_dot(dZ2b, tl.trans(G2), DOT_MODE)
            dG2 = -_dot(tl.trans(P2), dZ2b, DOT_MODE) - eb[:, None] * XdW2
            dE = dP2 * XX1
            dA2 = dP2 * E
            eG2 = eb[:, None] * G2

            # pass C: everything per block that does not need dZ2; dW1, dc1, dW2 updated in place
            dp1 = tl.zeros([BT, BT], dtype=tl.float32)
            dG2s = tl.zeros([BT, BD], dtype=tl.float32)
            dqs = tl.zeros([BT, BD], dtype=tl.float32)
            dks = tl.zeros([BT, BD], dtype=tl.float32)
            S1 = tl.zeros([BT], dtype=tl.float32)
            for f in range(NFB):
                W1, c1, W2 = _wblock_finite(w1, c1p, w2, f * FB, rd, rf, cmask, D, FF)
                dW1, dc1, dW2 = _wblock(dw1, dc1p, dw2, f * FB, rd, rf, cmask, D, FF)
                dW1, dc1, dW2 = tl.where(keep, dW1, 0.0), tl.where(keep, dc1, 0.0), tl.where(keep, dW2, 0.0)
                Z1 = _dot(k, W1, DOT_MODE) + c1[None, :]
                X2, D1, DD1 = _gelu_parts2(Z1)
                H1 = _dot(G2, tl.trans(W2), DOT_MODE)
                G1 = H1 * D1
                X2b, D1b = _gelu_parts(_dot(q, W1, DOT_MODE) + c1[None, :] - _dot(P1, G1, DOT_MODE))
                dZ1b = (_dot(dZ2b, tl.trans(W2), DOT_MODE) + _dot(dA2, X2, DOT_MODE)) * D1b
                dp1 -= _dot(dZ1b, tl.trans(G1), DOT_MODE)
                KdW1 = _dot(k, dW1, DOT_MODE) + dc1[None, :]
                S1 += tl.sum(KdW1 * G1, axis=1)
                dG1 = -_dot(tl.trans(P1), dZ1b, DOT_MODE) - eb[:, None] * KdW1
                dks -= _dot(eb[:, None] * G1, tl.trans(dW1), DOT_MODE)
                dX2 = _dot(tl.trans(dA2), X2b, DOT_MODE) - _dot(eG2, tl.trans(dW2), DOT_MODE)
                dH1 = dG1 * D1
                dG2s += _dot(dH1, W2, DOT_MODE)
                dZ1 = dG1 * H1 * DD1 + dX2 * D1
                dqs += _dot(dZ1b, tl.trans(W1), DOT_MODE)
                dks += _dot(dZ1, tl.trans(W1), DOT_MODE)
                dW1 += _dot(tl.trans(q), dZ1b, DOT_MODE) + _dot(tl.trans(k), dZ1, DOT_MODE)
                dc1 += tl.sum(dZ1b, axis=0) + tl.sum(dZ1, axis=0)
                dW2 += _dot(tl.trans(X2b), dZ2b, DOT_MODE) + _dot(tl.trans(dH1), G2, DOT_MODE)
                tl.debug_barrier()
                _wstore(dw1, dc1p, dw2, dW1, dc1, dW2, f * FB, rd, rf, cmask, D, FF)
            dG2 += dG2s
            S = S1 + tl.sum(XdW2 * G2, axis=1)
            dlr = -tau_e * S
            dtau_b += tl.where(full, -lr * S, 0.0)
            dE = tl.where(causal, dE + dp1 * QK1, 0.0)
            dtau += tl.sum(dE * lr[None, :], axis=1)
            dlr += tl.sum(dE * tau_r[:, None], axis=0)
            dA1 = dp1 * E
            dq = dO + dqs + _dot(dA1, k, DOT_MODE)
            dk = dks + _dot(tl.trans(dA1), q, DOT_MODE)
            # G2 = LN-L2 gradient at Z2 (target v - k)
            dgy, dZ2 = _ln_l2_grad_bwd(dG2, G2, xh, rstd, gy, mgx, gam, cmask, D)
            dgam += tl.sum(dgy * (2.0 * gam[None, :] * xh + bet[None, :] - (v - k)), axis=0)
            dbet += tl.sum(dgy * gam[None, :], axis=0)
            dv = -gam[None, :] * dgy
            dk += gam[None, :] * dgy
            dc2 += tl.sum(dZ2b, axis=0) + tl.sum(dZ2, axis=0)
            tl.debug_barrier()

            # pass D: the dZ2 terms (Z2 = X2 W2 + c2)
            for f in range(NFB):
                W1, c1, W2 = _wblock_finite(w1, c1p, w2, f * FB, rd, rf, cmask, D, FF)
                dW1, dc1, dW2 = _wblock(dw1, dc1p, dw2, f * FB, rd, rf, cmask, D, FF)
                X2, D1 = _gelu_parts(_dot(k, W1, DOT_MODE) + c1[None, :])
                dZ1 = _dot(dZ2, tl.trans(W2), DOT_MODE) * D1
                dk += _dot(dZ1, tl.trans(W1), DOT_MODE)
                dW1 += _dot(tl.trans(k), dZ1, DOT_MODE)
                dc1 += tl.sum(dZ1, axis=0)
                dW2 += _dot(tl.trans(X2), dZ2, DOT_MODE)
                tl.debug_barrier()
                _wstore(dw1, dc1p, dw2, dW1, dc1, dW2, f * FB, rd, rf, cmask, D, FF)

            optr = out_base + t0 * o_t + out_off
            tl.store(dq_ptr + optr, dq.to(dq_ptr.dtype.element_ty), mask=m2)
            tl.store(dk_ptr + optr, dk.to(dk_ptr.dtype.element_ty), mask=m2)
            tl.store(dv_ptr + optr, dv.to(dv_ptr.dtype.element_ty), mask=m2)
            tl.store(dlr_ptr + dlr_base + (t0 + rt) * H, dlr, mask=tm)
            tl.debug_barrier()
    tl.store(dc2_ptr + pid * D + rd, dc2, mask=cmask)
    dtau += tl.where(rt == MB - 1, tl.sum(dtau_b, axis=0), 0.0)
    tl.store(dtau_ptr + pid * BT + rt, dtau)
    tl.store(dlnw_ptr + pid * BD + rd, dgam)
    tl.store(dlnb_ptr + pid * BD + rd, dbet)


def bwd(q, k, v, lr, tau, ln_weight, ln_bias, ckpt, do, dfin, mini_batch: int, group: int,
        num_warps: int | None = None, dot: int | None = None, block_f: int | None = None,
        num_stages: int | None = None, rows: Rows | None = None):
    """Same contract (and tuning arguments) as `fwd` and `chunk.bwd`: dq, dk, dv (zero at tokens in no row),
    dlr [B,T,H] fp32, dtau [b], dln_w, dln_b [H,d], and the gradients of the start params (fp32)."""
    B, T, H, d = q.shape
    rows = rows or batch_rows(B, T, mini_batch, group, q.device)
    N = rows.n
    F = ckpt[0].shape[-1]
    BD = tile(d)
    FB = _block_f(F, block_f)
    BT = tile(mini_batch)
    shapes = ((d, F), (F,), (F, d), (d,))
    # the carried gradients start as those of the final params and end as those of the start params
    dps = tuple(torch.zeros((N, H, *s), dtype=torch.float32, device=q.device) if g is None
                else g.to(torch.float32).contiguous().clone() for g, s in zip(dfin, shapes))
    do = torch.zeros_like(q) if do is None else do.contiguous()
    fill = torch.empty if rows.covered else torch.zeros  # tokens in no row get zero gradients
    dq, dk, dv = (fill((B, T, H, d), dtype=q.dtype, device=q.device) for _ in range(3))
    dlr = fill((B, T, H), dtype=torch.float32, device=q.device)
    dtau = torch.empty((N * H, BT), dtype=torch.float32, device=q.device)
    dlnw = torch.empty((N * H, BD), dtype=torch.float32, device=q.device)
    dlnb = torch.empty((N * H, BD), dtype=torch.float32, device=q.device)
    scr = tuple(torch.empty((N * H * group, *s), dtype=torch.float32, device=q.device) for s in shapes)
    ttt_mlp_bwd_blocked_kernel[(N * H,)](
        q, k, v, lr, tau, ln_weight, ln_bias, *ckpt, do, *dps,
        dq, dk, dv, dlr, dtau, dlnw, dlnb, *scr, rows.span,
        *rows.strides(q), *rows.strides(lr), *rows.strides(dq), 0 if rows.packed else T * H, H, cdiv(F, FB),
        D=d, BD=BD, FF=F, FB=FB, MB=mini_batch, BT=BT, GROUP=group,
        DOT_MODE=dot_mode(q.dtype) if dot is None else dot, EPS=LN_EPS, num_warps=num_warps or 4,
        num_stages=num_stages or 3)
    dtau = dtau.sum(0)[:mini_batch]
    dlnw = dlnw.view(N, H, BD).sum(0)[:, :d]
    dlnb = dlnb.view(N, H, BD).sum(0)[:, :d]
    return dq, dk, dv, dlr, dtau, dlnw, dlnb, dps
