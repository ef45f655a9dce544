"""The output head's next-token loss without materialising fp32 logits for every position.

    nll = linear_cross_entropy(h, weight, targets, reduction="mean")   # h [N, D], weight [V, D], targets [N]

The logits h W^T are formed chunk by chunk (`chunk` rows at a time) in fp32 and reduced to the loss at
once. With reduction "mean" or "sum" the gradients w.r.t. h and W are computed in the same pass and
scaled in the backward (no recompute, no [N, V] tensor kept); with reduction "none" the per-token NLL
is returned and each chunk is recomputed in the backward (`torch.utils.checkpoint`). Targets equal to
`ignore_index` add nothing and do not count in the mean. The products run in h's dtype (bf16 under
autocast: the caller casts), logsumexp and the loss in fp32 (fp64 for fp64 inputs). impl "triton" (h in bf16,
fp16 or fp32) takes each chunk's log-sum-exp, loss and gradient in one kernel over the logits in h's dtype
(`ops/cross_entropy.py`) instead of PyTorch's passes over an fp32 copy ("torch"), with every reduction ("none":
the chunk's gradient kept only while its recompute runs in the backward); "auto" (the default) is "triton"
where it can run (CUDA tensors, Triton importable, those dtypes; timed faster for every reduction:
`benchmarks/bench_head.py`), else "torch".
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what impl "triton" takes
IGNORE = -100  # the default ignore_index: a target that adds nothing to the loss


def _chunk_nll(h, w, t, ignore_index: int):
    """Per-row NLL [n] of one chunk, and its fp32 logits [n, V] (the softmax is taken in place by the caller)."""
    ct = torch.promote_types(h.dtype, torch.float32)
    lg = (h @ w.T).to(ct)  # [n, V]
    lse = torch.logsumexp(lg, dim=-1)  # [n]
    keep = t != ignore_index
    tgt = lg.gather(1, torch.where(keep, t, 0)[:, None])[:, 0]
    return torch.where(keep, lse - tgt, 0.0), lg, lse, keep


class _LinearCESum(torch.autograd.Function):
    """Sum over rows of the NLL; gradients taken in the forward, chunk by chunk, and scaled in the backward."""

    @staticmethod
    def forward(ctx, h, w, t, ignore_index: int, chunk: int, impl: str):
        grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        dh = torch.empty_like(h) if grad else None
        dw = torch.zeros(w.shape, dtype=total.dtype, device=w.device) if grad else None
        if impl == "triton":
            from ..ops.cross_entropy import rows_nll_grad_  # (Triton only when asked for)
        for s in range(0, h.shape[0], chunk):
            hs, ts = h[s:s + chunk], t[s:s + chunk]
            # g: d nll / d logits = softmax - onehot, zero on ignored rows, [n, V] in h's dtype
            if impl == "triton":  # the logits in h's dtype, overwritten with g (without gradients: left as they are)
                g = hs @ w.T
                total += rows_nll_grad_(g, ts, ignore_index, grad).sum()  # (grad: write g or not)
            else:
                nll, lg, lse, keep = _chunk_nll(hs, w, ts, ignore_index)
                total += nll.sum()
                if grad:
                    p = lg.sub_(lse[:, None]).exp_()
                    p[torch.arange(p.shape[0], device=p.device), torch.where(keep, ts, 0)] -= 1.0
                    g = (p * keep[:, None]).to(h.dtype)
            if grad:
                dh[s:s + chunk] = g @ w
                dw += (g.T @ hs).to(dw.dtype)
        ctx.save_for_backward(dh, dw)
        ctx.w_dtype = w.dtype
        return total

    @staticmethod
    def backward(ctx, go):
        dh, dw = ctx.saved_tensors
        dh = None if dh is None else dh * go.to(dh.dtype)
        dw = None if dw is None else (dw * go).to(ctx.w_dtype)
        return dh, dw, None, None, None, None


class _RowsNLL(torch.autograd.Function):
    """Per-row NLL [n] of the logits h W^T by the row kernel; with gradients, the kernel's d nll / d logits (written
    over the logits) is kept and scaled by each row's output gradient in the backward."""

    @staticmethod
    def forward(ctx, h, w, t, ignore_index: int):
        from ..ops.cross_entropy import rows_nll_grad_
        g = h @ w.T  # [n, V] logits in h's dtype, overwritten with the gradient
        nll = rows_nll_grad_(g, t, ignore_index)
        ctx.save_for_backward(h, w, g)
        return nll

    @staticmethod
    def backward(ctx, go):
        h, w, g = ctx.saved_tensors
        g = g * go.to(g.dtype)[:, None]
        need_h, need_w = ctx.needs_input_grad[:2]
        return g @ w if need_h else None, g.T @ h if need_w else None, None, None


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """The impl that runs for h of this device and dtype: "auto" -> "triton" for CUDA h in bf16/fp16/fp32 where the
    Triton kernels import (any reduction), else "torch"; "torch" and "triton" as given."""
    if impl != "auto":
        return impl
    if device.type != "cuda" or dtype not in _TRITON_DTYPES:
        return "torch"
    from ..ops import triton_available
    return "triton" if triton_available()[0] else "torch"


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean",
                         ignore_index: int = IGNORE, chunk: int = 8192, impl: str = "auto") -> torch.Tensor:
    """Cross-entropy of the logits h @ weight.T against targets, never holding more than `chunk` rows of
    logits. h: [..., D]; weight: [V, D]; targets: int [...] (h's leading dims). Returns a scalar
    ("mean", "sum") or the per-token NLL shaped like targets ("none"), fp32 (fp64 for fp64 h). impl: one of
    IMPLS (module docstring)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if impl == "triton":
        if h.dtype not in _TRITON_DTYPES:
            raise ValueError(f"impl: 'triton' takes h in bf16, fp16 or fp32, got {h.dtype}")
        from ..ops import triton_runs_on
        ok, why = triton_runs_on(h.device)
        if not ok:
            raise ValueError(f"impl: 'triton' {why}")
    if h.shape[:-1] != targets.shape:
        raise ValueError(f"targets: expected shape {tuple(h.shape[:-1])} (h's leading dims), got {tuple(targets.shape)}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk: expected a positive int, got {chunk!r}")
    impl = resolve_impl(impl, h.device, h.dtype)
    shape = targets.shape
    h2, t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)  # [..., D] -> [N, D]; [...] -> [N]
    if reduction == "none":
        use_ckpt = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)

        def one(hs, ts):
            if impl == "torch":
                return _chunk_nll(hs, weight, ts, ignore_index)[0]
            if use_ckpt:
                return _RowsNLL.apply(hs, weight, ts, ignore_index)
            from ..ops.cross_entropy import rows_nll_grad_
            return rows_nll_grad_(hs @ weight.T, ts, ignore_index, grad=False)  # no gradient taken: the NLL alone

        parts = [checkpoint(one, h2[s:s + chunk], t[s:s + chunk], use_reentrant=False) if use_ckpt
                 else one(h2[s:s + chunk], t[s:s + chunk]) for s in range(0, t.shape[0], chunk)]
        return torch.cat(parts).reshape(shape)
    total = _LinearCESum.apply(h2, weight, t, ignore_index, chunk, impl)
    if reduction == "sum":
        return total
    return total / (t != ignore_index).sum().clamp(min=1)
