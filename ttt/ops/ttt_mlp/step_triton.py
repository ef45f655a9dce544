"""TTT-MLP one-token decode step as one fused Triton kernel.

Mirrors `ttt/ops/ttt_mlp/step.py` (docs/math.md §5, primal form): per (batch, head) program, the token's
inner gradients at the start weights (W1, c1, W2, c2), the accumulator update, the output with
W - tau_i * A and the inner LayerNorm, and the commit at the end of a mini-batch, in one launch.

The weights (2 x d x 4d fp32 per head, plus the two accumulators of the same size) do not fit in one
program's registers at d = 64, so the hidden width F is walked in blocks of BF columns, twice:
  pass 1: z2 = GELU(k W1 + c1) W2 + c2, summed over the F blocks -> g2 (LN-L2 gradient, d values);
  pass 2: per F block, g1 = (g2 W2^T) * GELU'(z1), A1, a1, A2 updated and written (or, on a commit,
          W - tau_i A written and the accumulators zeroed), and the output pre-activation
          z = h (W2 - tau_i A2) with h = GELU(q (W1 - tau_i A1) + c1 - tau_i a1) summed over blocks.
Then a2, c2 and the output LayerNorm. W1/W2 are read twice (the second read mostly from cache),
A1/A2 once, the new accumulators written once; no intermediate goes to memory.
Inference only (no backward): the triton backend sends calls that need gradients to the PyTorch step;
`forward` refuses them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import LN_EPS, TTTInputs, TTTState
from ..triton_utils import _gelu_parts, _step_token, pow2, step_operands


@triton.jit
def ttt_mlp_step_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr,
    w1_ptr, c1_ptr, w2_ptr, c2_ptr, a1_ptr, ab1_ptr, a2_ptr, ab2_ptr,
    o_ptr, w1n_ptr, c1n_ptr, w2n_ptr, c2n_ptr, a1n_ptr, ab1n_ptr, a2n_ptr, ab2n_ptr,
    s_b, s_h, l_b, l_h, H, i_pos,
    D: tl.constexpr, BD: tl.constexpr, FF: tl.constexpr, BF: tl.constexpr, COMMIT: tl.constexpr,
    EPS: tl.constexpr,
):
    pid, bi, hi, rd, cmask, q, k, v, lr, t_i, gam, bet = _step_token(
        q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, s_b, s_h, l_b, l_h, H, i_pos, D, BD)
    rf = tl.arange(0, BF)
    c2 = tl.load(c2_ptr + pid * D + rd, mask=cmask, other=0.0)
    a2 = tl.load(ab2_ptr + pid * D + rd, mask=cmask, other=0.0)
    w1base = pid * D * FF
    w2base = pid * FF * D

    # pass 1: z2 = GELU(k W1 + c1) W2 + c2
    z2 = c2
    for f0 in range(0, FF, BF):
        fm = (f0 + rf) < FF
        m1 = cmask[:, None] & fm[None, :]  # [BD, BF] block of W1 (d x F)
        m2 = fm[:, None] & cmask[None, :]  # [BF, BD] block of W2 (F x d)
        off1 = rd[:, None] * FF + (f0 + rf)[None, :]
        off2 = (f0 + rf)[:, None] * D + rd[None, :]
        W1 = tl.load(w1_ptr + w1base + off1, mask=m1, other=0.0)
        c1 = tl.load(c1_ptr + pid * FF + f0 + rf, mask=fm, other=0.0)
        W2 = tl.load(w2_ptr + w2base + off2, mask=m2, other=0.0)
        x2, _dx2 = _gelu_parts(tl.sum(k[:, None] * W1, axis=0) + c1)
        z2 += tl.sum(x2[:, None] * W2, axis=0)
    mu = tl.sum(z2, axis=0) / D
    zc = tl.where(cmask, z2 - mu, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, axis=0) / D + EPS)
    xh = zc * rstd
    gy = gam * (gam * xh + bet - (v - k))
    g2 = tl.where(cmask, (gy - tl.sum(gy, axis=0) / D - xh * (tl.sum(gy * xh, axis=0) / D)) * rstd, 0.0)
    a2 = a2 + lr * g2

    # pass 2: accumulators, output pre-activation
    zo = c2 - t_i * a2
    for f0 in range(0, FF, BF):
        fm = (f0 + rf) < FF
        m1 = cmask[:, None] & fm[None, :]
        m2 = fm[:, None] & cmask[None, :]
        off1 = rd[:, None] * FF + (f0 + rf)[None, :]
        off2 = (f0 + rf)[:, None] * D + rd[None, :]
        W1 = tl.load(w1_ptr + w1base + off1, mask=m1, other=0.0)
        c1 = tl.load(c1_ptr + pid * FF + f0 + rf, mask=fm, other=0.0)
        W2 = tl.load(w2_ptr + w2base + off2, mask=m2, other=0.0)
        A1 = tl.load(a1_ptr + w1base + off1, mask=m1, other=0.0)
        a1 = tl.load(ab1_ptr + pid * FF + f0 + rf, mask=fm, other=0.0)
        A2 = tl.load(a2_ptr + w2base + off2, mask=m2, other=0.0)
        x2, dx2 = _gelu_parts(tl.sum(k[:, None] * W1, axis=0) + c1)
        g1 = tl.sum(W2 * g2[None, :], axis=1) * dx2  # [BF]
        A1 = A1 + (lr * k)[:, None] * g1[None, :]
        a1 = a1 + lr * g1
        A2 = A2 + (lr * x2)[:, None] * g2[None, :]
        W1t = W1 - t_i * A1
        c1t = c1 - t_i * a1
        W2t = W2 - t_i * A2
        h, _dh = _gelu_parts(tl.sum(q[:, None] * W1t, axis=0) + c1t)
        zo += tl.sum(h[:, None] * W2t, axis=0)
        if COMMIT:
            tl.store(w1n_ptr + w1base + off1, W1t, mask=m1)
            tl.store(c1n_ptr + pid * FF + f0 + rf, c1t, mask=fm)
            tl.store(w2n_ptr + w2base + off2, W2t, mask=m2)
            tl.store(a1n_ptr + w1base + off1, tl.zeros([BD, BF], dtype=tl.float32), mask=m1)
            tl.store(ab1n_ptr + pid * FF + f0 + rf, tl.zeros([BF], dtype=tl.float32), mask=fm)
            tl.store(a2n_ptr + w2base + off2, tl.zeros([BF, BD], dtype=tl.float32), mask=m2)
        else:
            tl.store(a1n_ptr + w1base + off1, A1, mask=m1)
            tl.store(ab1n_ptr + pid * FF + f0 + rf, a1, mask=fm)
            tl.store(a2n_ptr + w2base + off2, A2, mask=m2)
    mu = tl.sum(zo, axis=0) / D
    zc = tl.where(cmask, zo - mu, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, axis=0) / D + EPS)
    o = q + zc * rstd * gam + bet
    tl.store(o_ptr + bi * H * D + hi * D + rd, o.to(o_ptr.dtype.element_ty), mask=cmask)
    if COMMIT:
        tl.store(c2n_ptr + pid * D + rd, c2 - t_i * a2, mask=cmask)
        tl.store(ab2n_ptr + pid * D + rd, tl.zeros([BD], dtype=tl.float32), mask=cmask)
    else:
        tl.store(ab2n_ptr + pid * D + rd, a2, mask=cmask)


def block_f_default(d: int, F: int) -> int:
    """The step's F block width where none is asked for: 64 columns up to head dim 64, 32 above (at d 128 the
    64-column blocks spill and measured 18-22% slower, docs/kernels_notes.md; F itself where it is narrower)."""
    return min(64 if d <= 64 else 32, pow2(F))


def forward(x: TTTInputs, state: TTTState, block_f: int | None = None, num_warps: int | None = None):
    """x: one token ([B,1,H,d]). Returns (o [B,1,H,d], new state); same contract as `step.forward`.
    block_f: columns of F per block (None: `block_f_default`); num_warps None: 4. Both measured on the GPU
    against the other settings by `benchmarks/bench_mlp.py --only step` (docs/kernels_notes.md)."""
    B, _, H, d = x.q.shape
    F = state.params[0].shape[-1]
    i = state.pos % x.mini_batch
    commit = i == x.mini_batch - 1
    ps = tuple(p.to(torch.float32).contiguous() for p in state.params)
    acc = tuple(x.to(torch.float32).contiguous() for x in state.accum)
    q0, k0, v0, lr0 = step_operands(x, state)
    o = torch.empty((B, 1, H, d), dtype=x.q.dtype, device=x.q.device)
    new_ps = tuple(torch.empty_like(p) for p in ps) if commit else ps
    new_acc = tuple(torch.empty_like(x) for x in acc)
    BF = block_f or block_f_default(d, F)
    ttt_mlp_step_kernel[(B * H,)](
        q0, k0, v0, lr0, x.tau, x.ln_weight, x.ln_bias, *ps, *acc, o, *new_ps, *new_acc,
        q0.stride(0), q0.stride(1), lr0.stride(0), lr0.stride(1), H, i,
        D=d, BD=pow2(d), FF=F, BF=BF, COMMIT=commit, EPS=LN_EPS, num_warps=num_warps or 4)
    return o, TTTState("mlp", new_ps, new_acc, state.pos + 1)
