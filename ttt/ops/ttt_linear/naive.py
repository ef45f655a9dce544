"""TTT-Linear as specified: primal form, per-token weights, inner gradients from torch.autograd."""
from __future__ import annotations

from ..common import TTTState
from ..generic import primal_forward


def f_res(params, x):
    """x [B,H,d] -> x W1 + b1."""
    W, c = params
    return (x.unsqueeze(-2) @ W).squeeze(-2) + c


def forward(q, k, v, lr, tau, ln_weight, ln_bias, state: TTTState, mini_batch: int, residual: bool = True):
    o, params, accum, pos = primal_forward(f_res, state.params, state.accum, state.pos, q, k, v, lr, tau,
                                           ln_weight, ln_bias, mini_batch, residual)
    return o.to(q.dtype), TTTState("linear", params, accum, pos)
