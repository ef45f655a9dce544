"""TTT-MLP one-token decode step in PyTorch (docs/math.md §5, primal form with the closed-form
LayerNorm gradient and the exact tanh-GELU derivative)."""
from __future__ import annotations

from ..common import TTTState, compute_dtype, gelu, gelu_grad, inner_grad, inner_out


def forward(q, k, v, lr, tau, ln_weight, ln_bias, state: TTTState, mini_batch: int, residual: bool = True):
    """q, k, v: [B,1,H,d]; lr: [B,1,H]; ln_*: [H,d] or None (no inner LayerNorm). Returns (o [B,1,H,d], new state)."""
    ct = compute_dtype(q)
    qt, kt, vt = (x[:, 0].to(ct).unsqueeze(-2) for x in (q, k, v))  # [B,H,1,d]
    lr_t = lr[:, 0].to(ct)[..., None, None]  # [B,H,1,1]
    gam, bet = (None, None) if ln_weight is None else (ln_weight.to(ct)[:, None, :], ln_bias.to(ct)[:, None, :])
    W1, c1, W2, c2 = (p.to(ct) for p in state.params)
    A1, a1, A2, a2 = (x.to(ct) for x in state.accum)
    i = state.pos % mini_batch
    t_i = tau.to(ct)[i]
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
    o = inner_out(qt, z2, gam, bet, residual).squeeze(-2).unsqueeze(1).to(q.dtype)  # [B,1,H,d]
    params, accum = (W1, c1, W2, c2), (A1, a1, A2, a2)
    if i == mini_batch - 1:
        params = tuple(p - t_i * x for p, x in zip(params, accum))
        accum = tuple(x.new_zeros(x.shape) for x in accum)
    return o, TTTState("mlp", params, accum, state.pos + 1)
