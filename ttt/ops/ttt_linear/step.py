"""TTT-Linear one-token decode step in PyTorch (docs/math.md §5, primal form with the closed-form
LayerNorm gradient). Same math as the dual form with T = 1, without its mini-batch matrices. Also runs packed
documents of one token each (every row at its own position)."""
from __future__ import annotations

from ..common import TTTInputs, TTTState, advance, end_pos, inner_grad, inner_out, step_inputs, step_output


def forward(x: TTTInputs, state: TTTState, residual: bool = True):
    """x: one token per row ([B,1,H,d], or [1,N,H,d] with cu_seqlens of N one-token documents; ln_* [H,d] or
    None: no inner LayerNorm). Returns (o like q, new state)."""
    qt, kt, vt, lr_t, tau, i, t_i, gam, bet, (W, c), (A, a) = step_inputs(x, state)
    g = inner_grad(kt @ W + c[:, :, None], vt - kt if residual else vt, gam, bet)  # [R,H,1,d]
    A = A + (lr_t * kt).transpose(-1, -2) @ g
    a = a + (lr_t * g).squeeze(-2)
    z = qt @ W + c[:, :, None] - t_i * (qt @ A + a[:, :, None])
    o = step_output(x, inner_out(qt, z, gam, bet, residual))
    params, accum = advance((W, c), (A, a), 1, i, tau)  # the commit after the last token of a mini-batch
    return o, TTTState("linear", params, accum, end_pos(x, state))
