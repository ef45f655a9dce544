"""TTT-MLP, mini-batch dual form in PyTorch (docs/math.md §4), with the carried partial-mini-batch
state of docs/math.md §5. Differentiable by autograd; the CPU path and the reference for the kernels.
Ablation switches: no inner LayerNorm (ln_weight None), no residual (residual=False). Packed documents
(`TTTInputs.cu_seqlens`) run all at once, each from its own first token (`packed.scan`)."""
from __future__ import annotations

import torch

from ..common import TTTInputs, TTTState, causal_matmul, causal_tril, gelu, gelu_grad, inner_grad, inner_out
from ..packed import scan


def grads(k_, v_, params, gam, bet, residual: bool = True):
    """The inner forward and gradients of a piece at the start-of-mini-batch weights: X2 = GELU(K W1 + c1)
    [R,H,n,F], G1 (w.r.t. Z1) [R,H,n,F] and G2 (w.r.t. Z2) [R,H,n,d]."""
    W1, c1, W2, c2 = params
    Z1 = k_ @ W1 + c1[:, :, None]  # [R,H,n,F]
    X2 = gelu(Z1)
    G2 = inner_grad(X2 @ W2 + c2[:, :, None], v_ - k_ if residual else v_, gam, bet)  # [R,H,n,d]
    G1 = (G2 @ W2.transpose(-1, -2)) * gelu_grad(Z1)
    return X2, G1, G2


def add_grads(accum, k_, lr_, g) -> tuple:
    """The accumulators plus the piece's gated gradients (lr_j times each token's weight gradients)."""
    (A1, a1, A2, a2), (X2, G1, G2) = accum, g
    lk = lr_[..., None]
    return (A1 + (lk * k_).transpose(-1, -2) @ G1, a1 + (lk * G1).sum(2),
            A2 + (lk * X2).transpose(-1, -2) @ G2, a2 + (lk * G2).sum(2))


def piece(q_, k_, v_, lr_, ti, gam, bet, params, accum, residual: bool = True):
    """One piece of a mini-batch (`packed.scan`'s body): outputs [R,H,n,d] and the grown accumulators."""
    (W1, c1, W2, c2), (A1, a1, A2, a2) = params, accum
    X2, G1, G2 = g = grads(k_, v_, params, gam, bet, residual)
    t = ti[:, None]  # [n,1]
    tril = causal_tril(q_.shape[2], q_.device)
    E = t * lr_[:, :, None, :]  # [R,H,n,n]: E_ij = tau_i lr_j, used for j <= i only
    # where (not a product with a 0/1 mask) keeps a NaN at j out of rows i < j
    attn1 = torch.where(tril, E * (q_ @ k_.transpose(-1, -2) + 1.0), 0.0)
    Z1b = q_ @ W1 + c1[:, :, None] - t * (q_ @ A1 + a1[:, :, None]) - causal_matmul(attn1, G1)
    X2b = gelu(Z1b)
    attn2 = torch.where(tril, E * (X2b @ X2.transpose(-1, -2) + 1.0), 0.0)
    Z2b = X2b @ W2 + c2[:, :, None] - t * (X2b @ A2 + a2[:, :, None]) - causal_matmul(attn2, G2)
    return inner_out(q_, Z2b, gam, bet, residual), add_grads(accum, k_, lr_, g)


def forward(x: TTTInputs, state: TTTState, residual: bool = True):
    """x: the op's inputs (`TTTInputs`). Returns (o [B,T,H,d], new state)."""
    return scan(piece, x, state, residual)
