"""TTT-Linear as specified: primal form, per-token weights, inner gradients from torch.autograd."""
from __future__ import annotations

from ..common import TTTInputs, TTTState
from ..generic import primal_forward


def f_res(params, x):
    """x [B,H,d] -> x W1 + b1."""
    W, c = params
    return (x.unsqueeze(-2) @ W).squeeze(-2) + c


def forward(x: TTTInputs, state: TTTState, residual: bool = True):
    o, params, accum, pos = primal_forward(f_res, x, state.params, state.accum, state.pos, residual)
    return o.to(x.q.dtype), TTTState("linear", params, accum, pos)
