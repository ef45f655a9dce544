"""TTT-MLP mini-batch dual form as a Triton forward kernel; backward by checkpointed recompute.

Mirrors `ttt/ops/ttt_mlp/dual.py` (SPEC section 4) on whole, aligned mini-batches whose start state has a
zero accumulator; `ttt/ops/triton_backend.py` runs the partial pieces at either end in PyTorch.

Forward: one program per (batch, head) walks the mini-batches. What stays on chip: both inner weight
matrices W1 (d x F) and W2 (F x d), F = 4d, and the biases, fp32, in registers for the whole sequence
(8 warps for d = 64; the compiler spills part of them, still faster than 16 warps, see
docs/kernels_notes.md); q, k, v, lr are read once per mini-batch
(prefetched one mini-batch ahead), o written once. Head dim and F are padded to powers of two with masks.
tanh-GELU and its exact derivative are computed in fp32 (tanh through a sigmoid).

Backward: NOT a Triton kernel yet. The forward saves (W1, c1, W2, c2) every GROUP mini-batches; the
backward walks the groups in reverse and re-runs the PyTorch dual form on each group under autograd,
from its checkpoint, chaining the state gradient. Memory stays O(T/GROUP) weights plus one group's graph;
speed is that of the PyTorch dual form (see docs/benchmarks.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import TTTState
from ..ttt_linear.chunk import _center, _dot
from . import dual as _dual

DOT_MODE = None  # None: by input dtype; an int forces one (0 fp32, 1 tf32, 2 bf16, 3 fp16 operands)
NUM_WARPS = None  # None: 8 (H100, d = 64: 5.6 ms with 8 warps vs 12.4 with 16; docs/kernels_notes.md)


@triton.jit
def _gelu_parts(x):
    """tanh-GELU(x) and its exact derivative, fp32."""
    c = 0.7978845608028654
    u = c * (x + 0.044715 * x * x * x)
    t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
    y = 0.5 * x * (1.0 + t)
    dy = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)
    return y, dy


@triton.jit
def ttt_mlp_fwd_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, w1_ptr, c1_ptr, w2_ptr, c2_ptr,
    o_ptr, w1T_ptr, c1T_ptr, w2T_ptr, c2T_ptr, ck1_ptr, ckc1_ptr, ck2_ptr, ckc2_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h, o_b, o_t, o_h,
    H, NMB, NCK,
    D: tl.constexpr, BD: tl.constexpr, FF: tl.constexpr, BF: tl.constexpr, MB: tl.constexpr,
    BT: tl.constexpr, GROUP: tl.constexpr, SAVE: tl.constexpr, DOT_MODE: tl.constexpr,
):
    pid = tl.program_id(0)
    bi = pid // H
    hi = pid % H
    rt = tl.arange(0, BT)
    rd = tl.arange(0, BD)
    rf = tl.arange(0, BF)
    cmask = rd < D
    fmask = rf < FF
    tmask = rt < MB
    m2 = tmask[:, None] & cmask[None, :]
    w1mask = cmask[:, None] & fmask[None, :]
    w2mask = fmask[:, None] & cmask[None, :]
    w1off = rd[:, None] * FF + rf[None, :]  # [BD, BF] of a row-major d x F
    w2off = rf[:, None] * D + rd[None, :]  # [BF, BD] of a row-major F x d

    W1 = tl.load(w1_ptr + pid * D * FF + w1off, mask=w1mask, other=0.0)
    c1 = tl.load(c1_ptr + pid * FF + rf, mask=fmask, other=0.0)
    W2 = tl.load(w2_ptr + pid * FF * D + w2off, mask=w2mask, other=0.0)
    c2 = tl.load(c2_ptr + pid * D + rd, mask=cmask, other=0.0)
    gam = tl.load(lnw_ptr + hi * D + rd, mask=cmask, other=0.0).to(tl.float32)
    bet = tl.load(lnb_ptr + hi * D + rd, mask=cmask, other=0.0).to(tl.float32)
    tau_r = tl.load(tau_ptr + rt, mask=tmask, other=0.0).to(tl.float32)
    tau_b = tl.load(tau_ptr + MB - 1).to(tl.float32)
    causal = (rt[:, None] >= rt[None, :]) & tmask[None, :]

    in_base = bi * s_b + hi * s_h
    in_off = rt[:, None] * s_t + rd[None, :]
    out_off = rt[:, None] * o_t + rd[None, :]
    lr_base = bi * l_b + hi * l_h
    qn = tl.load(q_ptr + in_base + in_off, mask=m2, other=0.0)
    kn = tl.load(k_ptr + in_base + in_off, mask=m2, other=0.0)
    vn = tl.load(v_ptr + in_base + in_off, mask=m2, other=0.0)
    lrn = tl.load(lr_ptr + lr_base + rt * l_t, mask=tmask, other=0.0)
    for n in range(NMB):
        if SAVE:
            if n % GROUP == 0:
                ck = pid * NCK + n // GROUP
                tl.store(ck1_ptr + ck * D * FF + w1off, W1, mask=w1mask)
                tl.store(ckc1_ptr + ck * FF + rf, c1, mask=fmask)
                tl.store(ck2_ptr + ck * FF * D + w2off, W2, mask=w2mask)
                tl.store(ckc2_ptr + ck * D + rd, c2, mask=cmask)
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

        # inner forward / backward at the start weights
        Z1 = _dot(k, W1, DOT_MODE) + c1[None, :]  # [BT, BF]
        X2, dX2 = _gelu_parts(Z1)
        Z2 = _dot(X2, W2, DOT_MODE) + c2[None, :]  # [BT, BD]
        zc = _center(Z2, cmask, D)
        rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, axis=1) / D + 1e-6)
        xh = zc * rstd[:, None]
        gy = gam[None, :] * (gam[None, :] * xh + bet[None, :] - (v - k))
        mg = tl.sum(gy, axis=1) / D
        mgx = tl.sum(gy * xh, axis=1) / D
        G2 = tl.where(cmask[None, :], (gy - mg[:, None] - xh * mgx[:, None]) * rstd[:, None], 0.0)
        G1 = _dot(G2, tl.trans(W2), DOT_MODE) * dX2  # [BT, BF]

        E = tl.where(causal, tau_r[:, None] * lr[None, :], 0.0)
        P1 = E * (_dot(q, tl.trans(k), DOT_MODE) + 1.0)
        Z1b = _dot(q, W1, DOT_MODE) + c1[None, :] - _dot(P1, G1, DOT_MODE)
        X2b, _unused = _gelu_parts(Z1b)
        P2 = E * (_dot(X2b, tl.trans(X2), DOT_MODE) + 1.0)
        Z2b = _dot(X2b, W2, DOT_MODE) + c2[None, :] - _dot(P2, G2, DOT_MODE)
        zb = _center(Z2b, cmask, D)
        rstdb = 1.0 / tl.sqrt(tl.sum(zb * zb, axis=1) / D + 1e-6)
        o = q + zb * rstdb[:, None] * gam[None, :] + bet[None, :]
        tl.store(o_ptr + bi * o_b + hi * o_h + t0 * o_t + out_off, o.to(o_ptr.dtype.element_ty), mask=m2)

        eb = (tau_b * lr)[:, None]
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


def _dot_mode(dtype: torch.dtype) -> int:
    if DOT_MODE is not None:
        return DOT_MODE
    if dtype == torch.bfloat16:
        return 2
    if dtype == torch.float16:
        return 3
    return 1 if torch.backends.cuda.matmul.allow_tf32 else 0


def fwd(q, k, v, lr, tau, ln_weight, ln_bias, params, mini_batch: int, group: int = 8, save: bool = True):
    """Aligned whole mini-batches. q, k, v [B,T,H,d] (last dim contiguous, same strides), T % b == 0;
    params = (W1 [B,H,d,F], c1 [B,H,F], W2 [B,H,F,d], c2 [B,H,d]) fp32 contiguous.
    Returns o, the final params, and the checkpoints (params every `group` mini-batches) when `save`."""
    B, T, H, d = q.shape
    F = params[0].shape[-1]
    nmb = T // mini_batch
    nck = triton.cdiv(nmb, group)
    BD, BF = triton.next_power_of_2(d), triton.next_power_of_2(F)
    BT = max(16, triton.next_power_of_2(mini_batch))
    warps = NUM_WARPS or 8
    o = torch.empty((B, T, H, d), dtype=q.dtype, device=q.device)
    fin = tuple(torch.empty_like(p) for p in params)
    if save:
        ck = tuple(torch.empty((B, H, nck, *p.shape[2:]), dtype=torch.float32, device=q.device) for p in params)
    else:
        ck = fin  # never written
    ttt_mlp_fwd_kernel[(B * H,)](
        q, k, v, lr, tau, ln_weight, ln_bias, *params, o, *fin, *ck,
        q.stride(0), q.stride(1), q.stride(2), lr.stride(0), lr.stride(1), lr.stride(2),
        o.stride(0), o.stride(1), o.stride(2), H, nmb, nck,
        D=d, BD=BD, FF=F, BF=BF, MB=mini_batch, BT=BT, GROUP=group, SAVE=save, DOT_MODE=_dot_mode(q.dtype),
        num_warps=warps)
    return o, fin, (ck if save else None)


def bwd(q, k, v, lr, tau, ln_weight, ln_bias, ckpt, do, dfin, mini_batch: int, group: int = 8):
    """Gradients of the aligned forward by recompute: each checkpoint group re-runs the PyTorch dual
    form under autograd, last group first, carrying the gradient of the group's start weights back."""
    B, T, H, d = q.shape
    nmb = T // mini_batch
    nck = triton.cdiv(nmb, group)
    dps = [torch.zeros((B, H, *c.shape[3:]), dtype=torch.float32, device=q.device) if g is None else g.float()
           for g, c in zip(dfin, ckpt)]
    if do is None:
        do = torch.zeros_like(q)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dlr = torch.empty(lr.shape, dtype=torch.float32, device=q.device)
    dtau = torch.zeros(tau.shape, dtype=torch.float32, device=q.device)
    dlnw = torch.zeros(ln_weight.shape, dtype=torch.float32, device=q.device)
    dlnb = torch.zeros(ln_bias.shape, dtype=torch.float32, device=q.device)
    for g in reversed(range(nck)):
        s = slice(g * group * mini_batch, min(nmb, (g + 1) * group) * mini_batch)
        with torch.enable_grad():
            xs = [x[:, s].detach().requires_grad_() for x in (q, k, v, lr)]
            glob = [x.detach().requires_grad_() for x in (tau, ln_weight, ln_bias)]
            ps = [c[:, :, g].detach().requires_grad_() for c in ckpt]
            st = TTTState("mlp", tuple(ps), tuple(torch.zeros_like(p) for p in ps), 0)
            o, st2 = _dual.forward(*xs, *glob, st, mini_batch)
            outs = [o, *st2.params]
            gouts = [do[:, s], *dps]
            grads = torch.autograd.grad(outs, xs + glob + ps, gouts)
        for dst, gr in zip((dq, dk, dv, dlr), grads[:4]):
            dst[:, s] = gr
        dtau += grads[4].float()
        dlnw += grads[5].float()
        dlnb += grads[6].float()
        dps = [gr.float() for gr in grads[7:]]
    return dq, dk, dv, dlr, dtau, dlnw, dlnb, tuple(dps)
