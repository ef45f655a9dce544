"""TTT-MLP, mini-batch dual form in PyTorch (docs/math.md §4), with the carried partial-mini-batch
state of docs/math.md §5. Differentiable by autograd; the CPU path and the reference for the kernels.
Ablation switches: no inner LayerNorm (ln_weight None), no residual (residual=False)."""
from __future__ import annotations

import torch

from ..common import (TTTInputs, TTTState, advance, causal_matmul, causal_tril, dual_inputs, gelu, gelu_grad,
                      inner_grad, inner_out, segments)


def forward(x: TTTInputs, state: TTTState, residual: bool = True):
    """x: the op's inputs (`TTTInputs`). Returns (o [B,T,H,d], new state)."""
    T = x.q.shape[1]
    Q, K, V, LR, tau, gam, bet, (W1, c1, W2, c2), (A1, a1, A2, a2) = dual_inputs(x, state)
    # W1 [B,H,d,F], c1 [B,H,F], W2 [B,H,F,d], c2 [B,H,d]; A*, a*: their accumulators
    outs = []
    for t0, n, off in segments(T, state.pos, x.mini_batch):
        q_, k_, v_ = Q[:, :, t0:t0 + n], K[:, :, t0:t0 + n], V[:, :, t0:t0 + n]  # [B,H,n,d]
        lr_ = LR[:, :, t0:t0 + n]  # [B,H,n]
        ti = tau[off:off + n][:, None]  # [n,1]
        tril = causal_tril(n, Q.device)
        # inner forward and backward at the start-of-mini-batch weights
        Z1 = k_ @ W1 + c1[:, :, None]  # [B,H,n,F]
        X2 = gelu(Z1)
        Z2 = X2 @ W2 + c2[:, :, None]  # [B,H,n,d]
        G2 = inner_grad(Z2, v_ - k_ if residual else v_, gam, bet)
        G1 = (G2 @ W2.transpose(-1, -2)) * gelu_grad(Z1)  # [B,H,n,F]
        E = ti * lr_[:, :, None, :]  # [B,H,n,n]: E_ij = tau_i lr_j, used for j <= i only
        # where (not a product with a 0/1 mask) keeps a NaN at j out of rows i < j
        attn1 = torch.where(tril, E * (q_ @ k_.transpose(-1, -2) + 1.0), 0.0)
        Z1b = q_ @ W1 + c1[:, :, None] - ti * (q_ @ A1 + a1[:, :, None]) - causal_matmul(attn1, G1)
        X2b = gelu(Z1b)
        attn2 = torch.where(tril, E * (X2b @ X2.transpose(-1, -2) + 1.0), 0.0)
        Z2b = X2b @ W2 + c2[:, :, None] - ti * (X2b @ A2 + a2[:, :, None]) - causal_matmul(attn2, G2)
        outs.append(inner_out(q_, Z2b, gam, bet, residual))
        A1 = A1 + (lr_[..., None] * k_).transpose(-1, -2) @ G1
        a1 = a1 + (lr_[..., None] * G1).sum(2)
        A2 = A2 + (lr_[..., None] * X2).transpose(-1, -2) @ G2
        a2 = a2 + (lr_[..., None] * G2).sum(2)
        (W1, c1, W2, c2), (A1, a1, A2, a2) = advance((W1, c1, W2, c2), (A1, a1, A2, a2), n, off, tau)
    o = torch.cat(outs, dim=2).transpose(1, 2).to(x.q.dtype)  # [B,T,H,d]
    return o, TTTState("mlp", (W1, c1, W2, c2), (A1, a1, A2, a2), state.pos + T)
