"""TTT-Linear one-token decode step in PyTorch (docs/math.md §5, primal form with the closed-form
LayerNorm gradient). Same math as the dual form with T = 1, without its mini-batch matrices."""
from __future__ import annotations

from ..common import TTTInputs, TTTState, advance, inner_grad, inner_out, step_inputs


def forward(x: TTTInputs, state: TTTState, residual: bool = True):
    """x: one token ([B,1,H,d]; ln_* [H,d] or None: no inner LayerNorm). Returns (o [B,1,H,d], new state)."""
    qt, kt, vt, lr_t, tau, i, gam, bet, (W, c), (A, a) = step_inputs(x, state)
    t_i = tau[i]
    g = inner_grad(kt @ W + c[:, :, None], vt - kt if residual else vt, gam, bet)  # [B,H,1,d]
    A = A + (lr_t * kt).transpose(-1, -2) @ g
    a = a + (lr_t * g).squeeze(-2)
    z = qt @ W + c[:, :, None] - t_i * (qt @ A + a[:, :, None])
    o = inner_out(qt, z, gam, bet, residual).squeeze(-2).unsqueeze(1).to(x.q.dtype)  # [B,H,1,d] -> [B,1,H,d]
    params, accum = advance((W, c), (A, a), 1, i, tau)  # the commit after the last token of a mini-batch
    return o, TTTState("linear", params, accum, state.pos + 1)
