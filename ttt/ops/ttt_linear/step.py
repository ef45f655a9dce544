"""TTT-Linear one-token decode step in PyTorch (docs/math.md §5, primal form with the closed-form
LayerNorm gradient). Same math as the dual form with T = 1, without its mini-batch matrices."""
from __future__ import annotations

from ..common import TTTState, compute_dtype, inner_grad, inner_out


def forward(q, k, v, lr, tau, ln_weight, ln_bias, state: TTTState, mini_batch: int, residual: bool = True):
    """q, k, v: [B,1,H,d]; lr: [B,1,H]; ln_*: [H,d] or None (no inner LayerNorm). Returns (o [B,1,H,d], new state)."""
    ct = compute_dtype(q)
    qt, kt, vt = (x[:, 0].to(ct).unsqueeze(-2) for x in (q, k, v))  # [B,H,1,d]
    lr_t = lr[:, 0].to(ct)[..., None, None]  # [B,H,1,1]
    gam, bet = (None, None) if ln_weight is None else (ln_weight.to(ct)[:, None, :], ln_bias.to(ct)[:, None, :])
    W, c = (p.to(ct) for p in state.params)
    A, a = (x.to(ct) for x in state.accum)
    i = state.pos % mini_batch
    t_i = tau.to(ct)[i]
    g = inner_grad(kt @ W + c[:, :, None], vt - kt if residual else vt, gam, bet)  # [B,H,1,d]
    A = A + (lr_t * kt).transpose(-1, -2) @ g
    a = a + (lr_t * g).squeeze(-2)
    z = qt @ W + c[:, :, None] - t_i * (qt @ A + a[:, :, None])
    o = inner_out(qt, z, gam, bet, residual).squeeze(-2).unsqueeze(1).to(q.dtype)  # [B,1,H,d]
    if i == mini_batch - 1:
        W, c, A, a = W - t_i * A, c - t_i * a, A.new_zeros(A.shape), a.new_zeros(a.shape)
    return o, TTTState("linear", (W, c), (A, a), state.pos + 1)
