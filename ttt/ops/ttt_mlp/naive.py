"""TTT-MLP as specified: primal form, per-token weights, inner gradients from torch.autograd."""
from __future__ import annotations

from ..common import TTTInputs, TTTState, gelu
from ..generic import primal_forward


def f_res(params, x):
    """x [B,H,d] -> GELU_tanh(x W1 + b1) W2 + b2."""
    W1, c1, W2, c2 = params
    h = gelu((x.unsqueeze(-2) @ W1).squeeze(-2) + c1)  # [B,H,F]
    return (h.unsqueeze(-2) @ W2).squeeze(-2) + c2


def forward(x: TTTInputs, state: TTTState, residual: bool = True):
    o, params, accum, pos = primal_forward(f_res, x, state.params, state.accum, state.pos, residual)
    return o.to(x.q.dtype), TTTState("mlp", params, accum, pos)
