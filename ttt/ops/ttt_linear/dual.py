"""TTT-Linear, mini-batch dual form in PyTorch (docs/math.md §4), with the carried partial-mini-batch
state of docs/math.md §5. Differentiable by autograd; the CPU path and the reference for the kernels.
Ablation switches: no inner LayerNorm (ln_weight None), no residual (residual=False). Packed documents
(`TTTInputs.cu_seqlens`) run all at once, each from its own first token (`packed.scan`)."""
from __future__ import annotations

import torch

from ..common import TTTInputs, TTTState, causal_matmul, causal_tril, inner_grad, inner_out
from ..packed import scan


def grads(k_, v_, params, gam, bet, residual: bool = True):
    """The inner gradients of a piece at the start-of-mini-batch weights: G [R,H,n,d] (w.r.t. Z = K W + c)."""
    W, c = params
    return (inner_grad(k_ @ W + c[:, :, None], v_ - k_ if residual else v_, gam, bet),)


def add_grads(accum, k_, lr_, g) -> tuple:
    """The accumulators plus the piece's gated gradients: A + (lr K)^T G, a + sum lr G."""
    (A, a), (G,) = accum, g
    return A + (lr_[..., None] * k_).transpose(-1, -2) @ G, a + (lr_[..., None] * G).sum(2)


def piece(q_, k_, v_, lr_, ti, gam, bet, params, accum, residual: bool = True):
    """One piece of a mini-batch (`packed.scan`'s body): outputs [R,H,n,d] and the grown accumulators."""
    (W, c), (A, a) = params, accum
    g = grads(k_, v_, params, gam, bet, residual)
    E = ti[:, None] * lr_[:, :, None, :]  # [R,H,n,n]: E_ij = tau_i lr_j, used for j <= i only
    # the +1 carries the bias update; where (not a product with a 0/1 mask) keeps a NaN at j out of rows i < j
    attn = torch.where(causal_tril(q_.shape[2], q_.device), E * (q_ @ k_.transpose(-1, -2) + 1.0), 0.0)
    Zbar = q_ @ W + c[:, :, None] - ti[:, None] * (q_ @ A + a[:, :, None]) - causal_matmul(attn, g[0])
    return inner_out(q_, Zbar, gam, bet, residual), add_grads(accum, k_, lr_, g)


def forward(x: TTTInputs, state: TTTState, residual: bool = True):
    """x: the op's inputs (`TTTInputs`). Returns (o [B,T,H,d], new state)."""
    return scan(piece, x, state, residual)
