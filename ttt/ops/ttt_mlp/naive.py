"""TTT-MLP as specified: primal form, per-token weights, inner gradients from torch.autograd."""
from __future__ import annotations

from ..common import TTTState, gelu
from ..generic import primal_forward


def f_res(params, x):
    """x [B,H,d] -> GELU_tanh(x W1 + b1) W2 + b2."""
    W1, c1, W2, c2 = params
    h = gelu((x.unsqueeze(-2) @ W1).squeeze(-2) + c1)  # [B,H,F]
    return (h.unsqueeze(-2) @ W2).squeeze(-2) + c2


def forward(q, k, v, lr, tau, ln_weight, ln_bias, state: TTTState, mini_batch: int, residual: bool = True):
    o, params, accum, pos = primal_forward(f_res, state.params, state.accum, state.pos, q, k, v, lr, tau,
                                           ln_weight, ln_bias, mini_batch, residual)
    return o.to(q.dtype), TTTState("mlp", params, accum, pos)
