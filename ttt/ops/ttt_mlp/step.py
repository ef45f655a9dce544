"""TTT-MLP one-token decode step in PyTorch (docs/math.md §5, primal form with the closed-form
LayerNorm gradient and the exact tanh-GELU derivative). Also runs packed documents of one token each (every
row at its own position)."""
from __future__ import annotations

from ..common import (TTTInputs, TTTState, advance, end_pos, gelu, gelu_grad, inner_grad, inner_out, step_inputs,
                      step_output)


def forward(x: TTTInputs, state: TTTState, residual: bool = True):
    """x: one token per row ([B,1,H,d], or [1,N,H,d] with cu_seqlens of N one-token documents; ln_* [H,d] or
    None: no inner LayerNorm). Returns (o like q, new state)."""
    qt, kt, vt, lr_t, tau, i, t_i, gam, bet, (W1, c1, W2, c2), (A1, a1, A2, a2) = step_inputs(x, state)
    z1 = kt @ W1 + c1[:, :, None]  # [R,H,1,F]
    x2 = gelu(z1)
    g2 = inner_grad(x2 @ W2 + c2[:, :, None], vt - kt if residual else vt, gam, bet)  # [R,H,1,d]
    g1 = (g2 @ W2.transpose(-1, -2)) * gelu_grad(z1)  # [R,H,1,F]
    A1 = A1 + (lr_t * kt).transpose(-1, -2) @ g1
    a1 = a1 + (lr_t * g1).squeeze(-2)
    A2 = A2 + (lr_t * x2).transpose(-1, -2) @ g2
    a2 = a2 + (lr_t * g2).squeeze(-2)
    h = gelu(qt @ W1 + c1[:, :, None] - t_i * (qt @ A1 + a1[:, :, None]))
    z2 = h @ W2 + c2[:, :, None] - t_i * (h @ A2 + a2[:, :, None])
    o = step_output(x, inner_out(qt, z2, gam, bet, residual))
    params, accum = advance((W1, c1, W2, c2), (A1, a1, A2, a2), 1, i, tau)  # the commit, as in the dual form
    return o, TTTState("mlp", params, accum, end_pos(x, state))
