"""TTT-MLP one-token decode step in PyTorch (docs/math.md §5, primal form with the closed-form
LayerNorm gradient and the exact tanh-GELU derivative)."""
from __future__ import annotations

from ..common import TTTInputs, TTTState, advance, gelu, gelu_grad, inner_grad, inner_out, step_inputs


def forward(x: TTTInputs, state: TTTState, residual: bool = True):
    """x: one token ([B,1,H,d]; ln_* [H,d] or None: no inner LayerNorm). Returns (o [B,1,H,d], new state)."""
    qt, kt, vt, lr_t, tau, i, gam, bet, (W1, c1, W2, c2), (A1, a1, A2, a2) = step_inputs(x, state)
    t_i = tau[i]
    z1 = kt @ W1 + c1[:, :, None]  # [B,H,1,F]
    x2 = gelu(z1)
    g2 = inner_grad(x2 @ W2 + c2[:, :, None], vt - kt if residual else vt, gam, bet)  # [B,H,1,d]
    g1 = (g2 @ W2.transpose(-1, -2)) * gelu_grad(z1)  # [B,H,1,F]
    A1 = A1 + (lr_t * kt).transpose(-1, -2) @ g1
    a1 = a1 + (lr_t * g1).squeeze(-2)
    A2 = A2 + (lr_t * x2).transpose(-1, -2) @ g2
    a2 = a2 + (lr_t * g2).squeeze(-2)
    h = gelu(qt @ W1 + c1[:, :, None] - t_i * (qt @ A1 + a1[:, :, None]))
    z2 = h @ W2 + c2[:, :, None] - t_i * (h @ A2 + a2[:, :, None])
    o = inner_out(qt, z2, gam, bet, residual).squeeze(-2).unsqueeze(1).to(x.q.dtype)  # [B,H,1,d] -> [B,1,H,d]
    params, accum = advance((W1, c1, W2, c2), (A1, a1, A2, a2), 1, i, tau)  # the commit, as in the dual form
    return o, TTTState("mlp", params, accum, state.pos + 1)
