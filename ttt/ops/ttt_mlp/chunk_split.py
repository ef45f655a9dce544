"""TTT-MLP forward kernel with F split across the warps of one program: the weights are held as
[NG, F/NG, d] tiles (NG groups of F rows, one per warp) and every weight-sized product is a batched
product over the groups, so each warp works on its own slice of F; the sums over all of F (Z2 = X2 W2 before
its LayerNorm, and X2b X2^T) are a reduction over the group axis once per product.

Same contract and math as `chunk_t.py` (whose backward consumes this forward's checkpoints: both hold W1^T and
W2 F-major), including the NaN containment of the output path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import LN_EPS
from ..triton_utils import (_center_t, _consts_t, _dot, _finite_cols, _gelu_parts, _ln_l2_grad_t, _load_t, dot_mode,
                            mlp_tile_sizes as _shape)


@triton.jit
def _bcast(x, NG: tl.constexpr):
    """[a, b] -> [NG, a, b] (the same tile for every group)."""
    return tl.broadcast_to(x[None, :, :], (NG, x.shape[0], x.shape[1]))


@triton.jit
def ttt_mlp_fwd_split_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, w1_ptr, c1_ptr, w2_ptr, c2_ptr,
    o_ptr, w1T_ptr, c1T_ptr, w2T_ptr, c2T_ptr, ck1_ptr, ckc1_ptr, ck2_ptr, ckc2_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h, o_b, o_t, o_h,
    H, NMB, NCK,
    D: tl.constexpr, BD: tl.constexpr, FF: tl.constexpr, BF: tl.constexpr, MB: tl.constexpr,
    BT: tl.constexpr, GROUP: tl.constexpr, SAVE: tl.constexpr, DOT_MODE: tl.constexpr, EPS: tl.constexpr,
    NG: tl.constexpr,
):
    FW: tl.constexpr = BF // NG
    pid = tl.program_id(0)
    bi = pid // H
    hi = pid % H
    rt = tl.arange(0, BT)
    rd = tl.arange(0, BD)
    cmask = rd < D
    tmask = rt < MB
    rg = tl.arange(0, NG)[:, None, None]
    rw = tl.arange(0, FW)[None, :, None]
    rd3 = rd[None, None, :]
    f3 = rg * FW + rw  # [NG, FW, 1]: the F index of a group row
    wmask = (f3 < FF) & (rd3 < D)  # [NG, FW, BD]
    u1off = f3 + rd3 * FF  # W1^T from a row-major d x F
    w2off = f3 * D + rd3  # W2 (and the F-major checkpoints)
    f2 = (tl.arange(0, NG)[:, None] * FW + tl.arange(0, FW)[None, :])  # [NG, FW]
    fmask2 = f2 < FF
    m2t = cmask[:, None] & tmask[None, :]
    U1 = tl.load(w1_ptr + pid * D * FF + u1off, mask=wmask, other=0.0)
    c1 = tl.load(c1_ptr + pid * FF + f2, mask=fmask2, other=0.0)
    W2 = tl.load(w2_ptr + pid * FF * D + w2off, mask=wmask, other=0.0)
    c2 = tl.load(c2_ptr + pid * D + rd, mask=cmask, other=0.0)
    gam, bet, tau_r, tau_b, causal_t = _consts_t(lnw_ptr, lnb_ptr, tau_ptr, hi, rt, rd, cmask, tmask, D, MB)

    in_base = bi * s_b + hi * s_h
    in_off = rd[:, None] + rt[None, :] * s_t
    lr_base = bi * l_b + hi * l_h
    out_base = bi * o_b + hi * o_h
    out_off = rd[:, None] + rt[None, :] * o_t
    for n in range(NMB):
        if SAVE:
            if n % GROUP == 0:
                ck = pid * NCK + n // GROUP
                tl.store(ck1_ptr + ck * D * FF + w2off, U1, mask=wmask)
                tl.store(ckc1_ptr + ck * FF + f2, c1, mask=fmask2)
                tl.store(ck2_ptr + ck * FF * D + w2off, W2, mask=wmask)
                tl.store(ckc2_ptr + ck * D + rd, c2, mask=cmask)
        t0 = n * MB
        ptr = in_base + t0 * s_t + in_off
        qT = _load_t(q_ptr, ptr, m2t)
        kT = _load_t(k_ptr, ptr, m2t)
        vT = _load_t(v_ptr, ptr, m2t)
        lr = tl.load(lr_ptr + lr_base + (t0 + rt) * l_t, mask=tmask, other=0.0).to(tl.float32)

        Z1 = _dot(U1, _bcast(kT, NG), DOT_MODE) + c1[:, :, None]  # [NG, FW, BT]
        X2, D1 = _gelu_parts(Z1)
        W2t = tl.permute(W2, (0, 2, 1))  # [NG, BD, FW]
        Z2 = tl.sum(_dot(W2t, X2, DOT_MODE), axis=0) + c2[:, None]  # [BD, BT]: the sum over all of F
        G2, xh, rstd, gy, mgx = _ln_l2_grad_t(Z2, vT, kT, gam, bet, cmask, D, EPS)
        G1 = _dot(W2, _bcast(G2, NG), DOT_MODE) * D1  # [NG, FW, BT]

        ok = _finite_cols(tl.reshape(G1, (BF, BT))) & _finite_cols(G2)
        ET = tau_r[None, :] * lr[:, None]
        P1 = tl.where(causal_t, ET * (_dot(tl.trans(kT), qT, DOT_MODE) + 1.0), 0.0)
        G1s = tl.where(ok[None, None, :], G1, 0.0)
        Z1b = _dot(U1, _bcast(qT, NG), DOT_MODE) + c1[:, :, None] - _dot(G1s, _bcast(P1, NG), DOT_MODE)
        X2b, _unused = _gelu_parts(Z1b)
        S2 = tl.sum(_dot(tl.permute(X2, (0, 2, 1)), X2b, DOT_MODE), axis=0)  # [BT(j), BT(i)]
        P2 = tl.where(causal_t, ET * (S2 + 1.0), 0.0)
        Z2b = tl.sum(_dot(W2t, X2b, DOT_MODE), axis=0) + c2[:, None] \
            - _dot(tl.where(ok[None, :], G2, 0.0), P2, DOT_MODE)
        zb = _center_t(Z2b, cmask, D)
        rstdb = 1.0 / tl.sqrt(tl.sum(zb * zb, axis=0) / D + EPS)
        o = qT + zb * rstdb[None, :] * gam[:, None] + bet[:, None]
        poison = tl.sum(tl.where(causal_t & (~ok)[:, None], 1.0, 0.0), axis=0) > 0.0
        o = tl.where(poison[None, :], float("nan"), o)
        tl.store(o_ptr + out_base + t0 * o_t + out_off, o.to(o_ptr.dtype.element_ty), mask=m2t)

        eb = tau_b * lr
        eG1 = eb[None, None, :] * G1
        eG2 = eb[None, :] * G2
        U1 -= _dot(eG1, _bcast(tl.trans(kT), NG), DOT_MODE)
        c1 -= tl.sum(eG1, axis=2)
        W2 -= _dot(X2, _bcast(tl.trans(eG2), NG), DOT_MODE)
        c2 -= tl.sum(eG2, axis=1)
    tl.store(w1T_ptr + pid * D * FF + u1off, U1, mask=wmask)
    tl.store(c1T_ptr + pid * FF + f2, c1, mask=fmask2)
    tl.store(w2T_ptr + pid * FF * D + w2off, W2, mask=wmask)
    tl.store(c2T_ptr + pid * D + rd, c2, mask=cmask)


def fwd(q, k, v, lr, tau, ln_weight, ln_bias, params, mini_batch: int, group: int = 8, save: bool = True,
        num_warps: int | None = None, dot: int | None = None):
    """Same contract as `chunk_t.fwd` (its `bwd` consumes the checkpoints). num_warps None: 8 (one group of
    F rows per warp)."""
    B, T, H, d = q.shape
    F = params[0].shape[-1]
    nmb = T // mini_batch
    nck = triton.cdiv(nmb, group)
    BD, BF, BT = _shape(d, F, mini_batch)
    warps = num_warps or 8
    ng = min(warps, BF // 16)  # groups of at least 16 F rows (the smallest product tile)
    o = torch.empty((B, T, H, d), dtype=q.dtype, device=q.device)
    fin = tuple(torch.empty_like(p) for p in params)
    if save:
        ck = tuple(torch.empty((B, H, nck, *p.shape[2:]), dtype=torch.float32, device=q.device) for p in params)
    else:
        ck = fin  # never written
    ttt_mlp_fwd_split_kernel[(B * H,)](
        q, k, v, lr, tau, ln_weight, ln_bias, *params, o, *fin, *ck,
        q.stride(0), q.stride(1), q.stride(2), lr.stride(0), lr.stride(1), lr.stride(2),
        o.stride(0), o.stride(1), o.stride(2), H, nmb, nck,
        D=d, BD=BD, FF=F, BF=BF, MB=mini_batch, BT=BT, GROUP=group, SAVE=save,
        DOT_MODE=dot_mode(q.dtype) if dot is None else dot, EPS=LN_EPS, NG=ng, num_warps=warps)
    return o, fin, (ck if save else None)

