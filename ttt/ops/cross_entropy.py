"""The loss head's per-row cross-entropy in one Triton kernel (`layers/head.py` calls it, impl="triton").

    nll = rows_nll_grad_(logits, targets, ignore_index)   # logits [n, V] (16-bit or fp32), overwritten

One program per row reads its logits twice: first an online log-sum-exp (per-lane running max and sum of
exponentials in fp32, combined at the end), then the gradient softmax - onehot (zero on an ignored row), written
over the logits in their dtype. Against the PyTorch chunk (cast to fp32, logsumexp, subtract, exp, one-hot,
mask, cast back: about a dozen passes over an fp32 [n, V] copy) this reads the 16-bit logits twice and writes
them once. The values are those of the PyTorch form up to the order of the fp32 sums.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import pow2

MAX_BLOCK = 4096  # vocabulary columns a program reads at a time (fewer for a smaller vocabulary)
WARPS = 8


@triton.jit
def _rows_nll_grad_kernel(lg_ptr, t_ptr, nll_ptr, V, stride, ignore_index, BV: tl.constexpr, GRAD: tl.constexpr):
    row = tl.program_id(0)
    base = lg_ptr + row.to(tl.int64) * stride
    cols = tl.arange(0, BV)
    t = tl.load(t_ptr + row).to(tl.int32)
    keep = t != ignore_index
    # per lane: the running max m and the sum s of exp(x - m); -1e30 (not -inf) so that masked lanes add 0, not NaN
    m = tl.full([BV], -1e30, tl.float32)
    s = tl.zeros([BV], tl.float32)
    for v0 in range(0, V, BV):
        x = tl.load(base + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    mx = tl.max(m, axis=0)
    lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), axis=0))
    ok = (t >= 0) & (t < V)
    tgt = tl.load(base + tl.where(keep & ok, t, 0)).to(tl.float32)
    tgt = tl.where(ok | ~keep, tgt, float("nan"))  # a target outside the vocabulary: NaN, not a stray read
    tl.store(nll_ptr + row, tl.where(keep, lse - tgt, 0.0))
    if GRAD:
        for v0 in range(0, V, BV):
            inside = v0 + cols < V
            x = tl.load(base + v0 + cols, mask=inside, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(v0 + cols == t, 1.0, 0.0)
            tl.store(base + v0 + cols, tl.where(keep, g, 0.0).to(lg_ptr.dtype.element_ty), mask=inside)


def rows_nll_grad_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, grad: bool = True) -> torch.Tensor:
    """Per-row NLL [n] (fp32) of logits [n, V] (last dim contiguous) against targets [n]; with `grad` the logits are
    overwritten with d nll / d logits = softmax - onehot (zero where the target is ignore_index), without it they
    are left as they are (one read of them instead of two reads and a write). A target outside [0, V) other than
    ignore_index gives a NaN NLL."""
    n, V = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logits: expected the vocabulary dim contiguous")
    nll = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        _rows_nll_grad_kernel[(n,)](logits, targets.contiguous(), nll, V, logits.stride(0), ignore_index,
                                    BV=min(pow2(V), MAX_BLOCK), GRAD=grad, num_warps=WARPS)
    return nll
