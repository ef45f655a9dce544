"""TTT-Linear forward as two Triton kernels: a short sequential chain, then a parallel output pass.

Same contract and math as `chunk.fwd` (SPEC section 4, whole aligned mini-batches from a zero
accumulator). The fused forward walks one (batch, head) per program and computes, per mini-batch, both
the weight recurrence and the output; only the recurrence is sequential. Split:
  1. chain kernel, one program per (batch, head): per mini-batch only Z = K W + c -> the LN-L2 gradient
     G -> W -= K^T (e_b G), c -= sum e_b G. It writes G (fp32, [B*H, T, d]) and (W, c) at the start of
     every GROUP mini-batches (the same checkpoints the backward uses), and the final (W, c).
  2. output kernel, one program per (batch, head, checkpoint group), all in parallel: from the group's
     checkpoint it replays the cheap weight updates with the stored G and computes
     Zb = Q W + c - (E * (Q K^T + 1)) G, o = q + LN(Zb).
The chain per mini-batch drops from five products and two LayerNorms to two products and one; the
output work spreads over B*H*T/(b*GROUP) programs. Extra traffic: G written once and read once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk import _center, _dot, _dot_mode, _inner

LAST = {}  # the last compiled launch of each kernel (its n_regs / n_spills for reports)
CHAIN_WARPS = None  # None: 4 for d <= 64, else 8
OUT_WARPS = None  # None: 4


@triton.jit
def ttt_linear_chain_kernel(
    k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, w0_ptr, c0_ptr,
    g_ptr, wT_ptr, cT_ptr, ckw_ptr, ckc_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h,
    H, T, NMB, NCK,
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
    W = tl.load(w0_ptr + pid * D * D + woff, mask=wmask, other=0.0)
    c = tl.load(c0_ptr + pid * D + rd, mask=cmask, other=0.0)
    gam = tl.load(lnw_ptr + hi * D + rd, mask=cmask, other=0.0).to(tl.float32)
    bet = tl.load(lnb_ptr + hi * D + rd, mask=cmask, other=0.0).to(tl.float32)
    tau_b = tl.load(tau_ptr + MB - 1).to(tl.float32)

    in_base = bi * s_b + hi * s_h
    in_off = rt[:, None] * s_t + rd[None, :]
    lr_base = bi * l_b + hi * l_h
    g_off = (pid * T + rt[:, None]) * D + rd[None, :]
    kn = tl.load(k_ptr + in_base + in_off, mask=m2, other=0.0)
    vn = tl.load(v_ptr + in_base + in_off, mask=m2, other=0.0)
    lrn = tl.load(lr_ptr + lr_base + rt * l_t, mask=tmask, other=0.0)
    for n in range(NMB):
        if n % GROUP == 0:
            ck = pid * NCK + n // GROUP
            tl.store(ckw_ptr + ck * D * D + woff, W, mask=wmask)
            tl.store(ckc_ptr + ck * D + rd, c, mask=cmask)
        t0 = n * MB
        t1 = tl.minimum(n + 1, NMB - 1) * MB
        k = kn.to(tl.float32)
        v = vn.to(tl.float32)
        lr = lrn.to(tl.float32)
        kn = tl.load(k_ptr + in_base + t1 * s_t + in_off, mask=m2, other=0.0)
        vn = tl.load(v_ptr + in_base + t1 * s_t + in_off, mask=m2, other=0.0)
        lrn = tl.load(lr_ptr + lr_base + (t1 + rt) * l_t, mask=tmask, other=0.0)
        G, _xh, _rstd, _gy, _mgx = _inner(k, v, W, c, gam, bet, cmask, D, DOT_MODE)
        tl.store(g_ptr + t0 * D + g_off, G, mask=m2)
        eG = (tau_b * lr)[:, None] * G
        W -= _dot(tl.trans(k), eG, DOT_MODE)
        c -= tl.sum(eG, axis=0)
    tl.store(wT_ptr + pid * D * D + woff, W, mask=wmask)
    tl.store(cT_ptr + pid * D + rd, c, mask=cmask)


@triton.jit
def ttt_linear_out_kernel(
    q_ptr, k_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, g_ptr, ckw_ptr, ckc_ptr, o_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h, o_b, o_t, o_h,
    H, T, NMB, NCK,
    D: tl.constexpr, BD: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr, GROUP: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    bi = pid // H
    hi = pid % H
    rt = tl.arange(0, BT)
    rd = tl.arange(0, BD)
    cmask = rd < D
    tmask = rt < MB
    m2 = tmask[:, None] & cmask[None, :]
    wmask = cmask[:, None] & cmask[None, :]
    woff = rd[:, None] * D + rd[None, :]
    ck = pid * NCK + g
    W = tl.load(ckw_ptr + ck * D * D + woff, mask=wmask, other=0.0)
    c = tl.load(ckc_ptr + ck * D + rd, mask=cmask, other=0.0)
    gam = tl.load(lnw_ptr + hi * D + rd, mask=cmask, other=0.0).to(tl.float32)
    bet = tl.load(lnb_ptr + hi * D + rd, mask=cmask, other=0.0).to(tl.float32)
    tau_r = tl.load(tau_ptr + rt, mask=tmask, other=0.0).to(tl.float32)
    tau_b = tl.load(tau_ptr + MB - 1).to(tl.float32)
    causal = (rt[:, None] >= rt[None, :]) & tmask[None, :]

    in_base = bi * s_b + hi * s_h
    in_off = rt[:, None] * s_t + rd[None, :]
    out_off = rt[:, None] * o_t + rd[None, :]
    lr_base = bi * l_b + hi * l_h
    g_off = (pid * T + rt[:, None]) * D + rd[None, :]
    n0 = g * GROUP
    n1 = tl.minimum(n0 + GROUP, NMB)
    for n in range(n0, n1):
        t0 = n * MB
        q = tl.load(q_ptr + in_base + t0 * s_t + in_off, mask=m2, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + in_base + t0 * s_t + in_off, mask=m2, other=0.0).to(tl.float32)
        lr = tl.load(lr_ptr + lr_base + (t0 + rt) * l_t, mask=tmask, other=0.0).to(tl.float32)
        G = tl.load(g_ptr + t0 * D + g_off, mask=m2, other=0.0)
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


def fwd(q, k, v, lr, tau, ln_weight, ln_bias, W0, c0, mini_batch: int, group: int = 8, save: bool = True):
    """Same contract as `chunk.fwd`. Returns o [B,T,H,d] (q's dtype), W_T, c_T, and the checkpoints
    when `save` (the output pass needs them, so they are always computed)."""
    B, T, H, d = q.shape
    nmb = T // mini_batch
    nck = triton.cdiv(nmb, group)
    BD = triton.next_power_of_2(d)
    BT = max(16, triton.next_power_of_2(mini_batch))
    mode = _dot_mode(q.dtype)
    o = torch.empty((B, T, H, d), dtype=q.dtype, device=q.device)
    wT, cT = torch.empty_like(W0), torch.empty_like(c0)
    G = torch.empty((B * H, T, d), dtype=torch.float32, device=q.device)
    ckw = torch.empty((B, H, nck, d, d), dtype=torch.float32, device=q.device)
    ckc = torch.empty((B, H, nck, d), dtype=torch.float32, device=q.device)
    LAST["ttt_linear_chain_kernel"] = ttt_linear_chain_kernel[(B * H,)](
        k, v, lr, tau, ln_weight, ln_bias, W0, c0, G, wT, cT, ckw, ckc,
        q.stride(0), q.stride(1), q.stride(2), lr.stride(0), lr.stride(1), lr.stride(2), H, T, nmb, nck,
        D=d, BD=BD, MB=mini_batch, BT=BT, GROUP=group, DOT_MODE=mode,
        num_warps=CHAIN_WARPS or (4 if BD <= 64 else 8))
    LAST["ttt_linear_out_kernel"] = ttt_linear_out_kernel[(B * H, nck)](
        q, k, lr, tau, ln_weight, ln_bias, G, ckw, ckc, o,
        q.stride(0), q.stride(1), q.stride(2), lr.stride(0), lr.stride(1), lr.stride(2),
        o.stride(0), o.stride(1), o.stride(2), H, T, nmb, nck,
        D=d, BD=BD, MB=mini_batch, BT=BT, GROUP=group, DOT_MODE=mode,
        num_warps=OUT_WARPS or (4 if BD <= 64 else 8))
    return o, wT, cT, (ckw, ckc) if save else None
