"""TTT-Linear, mini-batch dual form in PyTorch (docs/math.md §4), with the carried partial-mini-batch
state of docs/math.md §5. Differentiable by autograd; the CPU path and the reference for the kernels.
Ablation switches: no inner LayerNorm (ln_weight None), no residual (residual=False)."""
from __future__ import annotations

import torch

from ..common import TTTInputs, TTTState, advance, causal_matmul, causal_tril, dual_inputs, inner_grad, inner_out, segments


def forward(x: TTTInputs, state: TTTState, residual: bool = True):
    """x: the op's inputs (`TTTInputs`). Returns (o [B,T,H,d], new state)."""
    T = x.q.shape[1]
    Q, K, V, LR, tau, gam, bet, (W, c), (A, a) = dual_inputs(x, state)
    # W: [B,H,d,d], c: [B,H,d]; A, a: their accumulators
    outs = []
    for t0, n, off in segments(T, state.pos, x.mini_batch):
        q_, k_, v_ = Q[:, :, t0:t0 + n], K[:, :, t0:t0 + n], V[:, :, t0:t0 + n]  # [B,H,n,d]
        lr_ = LR[:, :, t0:t0 + n]  # [B,H,n]
        ti = tau[off:off + n]  # [n]
        Z = k_ @ W + c[:, :, None]  # gradients at the start-of-mini-batch weights
        G = inner_grad(Z, v_ - k_ if residual else v_, gam, bet)  # [B,H,n,d]
        E = ti[:, None] * lr_[:, :, None, :]  # [B,H,n,n]: E_ij = tau_i lr_j, used for j <= i only
        # the +1 carries the bias update; where (not a product with a 0/1 mask) keeps a NaN at j out of rows i < j
        attn = torch.where(causal_tril(n, Q.device), E * (q_ @ k_.transpose(-1, -2) + 1.0), 0.0)
        Zbar = q_ @ W + c[:, :, None] - ti[:, None] * (q_ @ A + a[:, :, None]) - causal_matmul(attn, G)
        outs.append(inner_out(q_, Zbar, gam, bet, residual))
        A = A + (lr_[..., None] * k_).transpose(-1, -2) @ G
        a = a + (lr_[..., None] * G).sum(2)
        (W, c), (A, a) = advance((W, c), (A, a), n, off, tau)
    o = torch.cat(outs, dim=2).transpose(1, 2).to(x.q.dtype)  # [B,T,H,d]
    return o, TTTState("linear", (W, c), (A, a), state.pos + T)
