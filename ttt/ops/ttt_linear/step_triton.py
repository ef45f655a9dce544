"""TTT-Linear one-token decode step as one fused Triton kernel.

Mirrors `ttt/ops/ttt_linear/step.py` (docs/math.md §5, primal form): per (batch, head) program, the
token's inner gradient at the start weights W, the accumulator update, the output with W - tau_i * A and
the inner LayerNorm, and the commit at the end of a mini-batch, in one launch. What stays on chip:
everything: W, c, A, a are read once and the new accumulators (and, on a commit, the new weights) written
once; no intermediate goes to memory. Inference only (no backward): the triton backend sends calls that need
gradients to the PyTorch step; `forward` refuses them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import LN_EPS, TTTInputs, TTTState
from ..triton_utils import _linear_step, _step_store, _step_token, pow2, step_operands


@triton.jit
def ttt_linear_step_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, w_ptr, c_ptr, a_ptr, ab_ptr,
    o_ptr, wn_ptr, cn_ptr, an_ptr, abn_ptr,
    s_b, s_h, l_b, l_h, H, i_pos,
    D: tl.constexpr, BD: tl.constexpr, COMMIT: tl.constexpr, EPS: tl.constexpr,
):
    pid, bi, hi, rd, cmask, q, k, v, lr, t_i, gam, bet = _step_token(
        q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, s_b, s_h, l_b, l_h, H, i_pos, D, BD)
    rr = tl.arange(0, BD)
    wmask = cmask[:, None] & cmask[None, :]
    woff = rr[:, None] * D + rd[None, :]
    qr = tl.load(q_ptr + bi * s_b + hi * s_h + rr, mask=rr < D, other=0.0).to(tl.float32)
    kr = tl.load(k_ptr + bi * s_b + hi * s_h + rr, mask=rr < D, other=0.0).to(tl.float32)
    W = tl.load(w_ptr + pid * D * D + woff, mask=wmask, other=0.0)
    c = tl.load(c_ptr + pid * D + rd, mask=cmask, other=0.0)
    A = tl.load(a_ptr + pid * D * D + woff, mask=wmask, other=0.0)
    a = tl.load(ab_ptr + pid * D + rd, mask=cmask, other=0.0)

    o, A, a = _linear_step(q, k, v, qr, kr, lr, t_i, gam, bet, W, c, A, a, cmask, D, EPS)
    tl.store(o_ptr + bi * H * D + hi * D + rd, o.to(o_ptr.dtype.element_ty), mask=cmask)
    _step_store(wn_ptr, cn_ptr, an_ptr, abn_ptr, pid, woff, wmask, rd, cmask, W, c, A, a, t_i, D, BD, COMMIT)


def forward(x: TTTInputs, state: TTTState):
    """x: one token ([B,1,H,d]). Returns (o [B,1,H,d], new state); same contract as `step.forward`."""
    B, _, H, d = x.q.shape
    i = state.pos % x.mini_batch
    commit = i == x.mini_batch - 1
    W, c = (p.to(torch.float32).contiguous() for p in state.params)
    A, a = (x.to(torch.float32).contiguous() for x in state.accum)
    q0, k0, v0, lr0 = step_operands(x, state)
    o = torch.empty((B, 1, H, d), dtype=x.q.dtype, device=x.q.device)
    Wn, cn = (torch.empty_like(W), torch.empty_like(c)) if commit else (W, c)
    An, an = torch.empty_like(A), torch.empty_like(a)
    ttt_linear_step_kernel[(B * H,)](
        q0, k0, v0, lr0, x.tau, x.ln_weight, x.ln_bias, W, c, A, a, o, Wn, cn, An, an,
        q0.stride(0), q0.stride(1), lr0.stride(0), lr0.stride(1), H, i,
        D=d, BD=pow2(d), COMMIT=commit, EPS=LN_EPS, num_warps=4 if d <= 64 else 8)
    return o, TTTState("linear", (Wn, cn), (An, an), state.pos + 1)
