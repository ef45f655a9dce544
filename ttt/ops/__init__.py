"""TTT ops: one signature, several backends, the backend decided once.

    op = resolve_op("linear", "auto", device, dtype)       # a TTTLayer does this once per device and dtype
    o, state = op(TTTInputs(q, k, v, lr, tau, ln_weight, ln_bias), state)
    o, state = ttt_linear(q, k, v, lr, tau, ln_weight, ln_bias, state, backend="auto")   # the same, one call

q, k, v: [B, T, H, d] (any float dtype; o has q's dtype); lr: [B, T, H] the per-token inner learning rate
base_lr * sigma_j / d; tau: [b] the per-position factor tau_i (its length is the mini-batch size b);
ln_weight, ln_bias: [H, d] the inner LayerNorm, or both None for none; residual=False drops the inner residual
(target v instead of v - k, output LN(f(q)) instead of q + LN(f(q))); state: a `TTTState` (see
`TTTState.initial`). cu_seqlens (int64 [N + 1], `TTTInputs.cu_seqlens`): q holds N packed documents ([1, T, ...]),
each run as if alone from its own row of the state (N rows), the final state one row per document
(docs/packed.md); every backend takes them. Backends:
  "naive"  the specification: per-token weights, inner gradients by torch.autograd (slow; tests)
  "dual"   the mini-batch dual form in PyTorch (CPU path, reference for the kernels)
  "triton" the Triton kernels (CUDA, or Triton's interpreter with TRITON_INTERPRET=1)
  "auto"   "triton" for CUDA fp32/fp16/bf16 tensors when Triton imports and the kernels support the switches
           (inner LayerNorm and residual on), else "dual".
A backend asked for by name that cannot run raises; nothing falls back silently. The one documented
exception: "triton" with float64 inputs resolves to the dual form (the kernels compute in fp32), with a warning.
"""
from __future__ import annotations

import abc
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .common import RowsState, TTTInputs, TTTState, make_tau
from .ttt_linear import dual as _lin_dual, naive as _lin_naive, step as _lin_step
from .ttt_mlp import dual as _mlp_dual, naive as _mlp_naive, step as _mlp_step

__all__ = ["RowsState", "TTTInputs", "TTTState", "TTTOp", "make_tau", "ttt_linear", "ttt_mlp", "ttt_op", "BACKENDS",
           "resolve_backend", "resolve_op", "triton_available", "kernel_unsupported"]

BACKENDS = ("auto", "naive", "dual", "triton")


@dataclass(frozen=True)
class Reference:
    """The PyTorch forms of one kind, each (x: TTTInputs, state, residual) -> (o, new state): naive (the
    specification), dual (the mini-batch dual form) and step (one token per row, the primal form); and the dual
    form's inner gradients of a piece, grads(k, v, params, gam, bet, residual), and add_grads(accum, k, lr, grads),
    the accumulators they grow (what a partial mini-batch leaves in the state)."""

    kind: str
    naive: Callable
    dual: Callable
    step: Callable
    grads: Callable
    add_grads: Callable


REFERENCES = {kind: Reference(kind, naive.forward, dual.forward, step.forward, dual.grads, dual.add_grads)
              for kind, naive, dual, step in (("linear", _lin_naive, _lin_dual, _lin_step),
                                              ("mlp", _mlp_naive, _mlp_dual, _mlp_step))}


class TTTOp(abc.ABC):
    """A TTT op of one kind, resolved to one backend: op(x: TTTInputs, state) -> (o, new state). It does not
    validate its inputs (`x.check(op.kind, state)` does; `ttt_op` calls it).

    kind: "linear" | "mlp"; backend: the concrete backend's name; residual: the inner residual (ablation
    switch); ref: the PyTorch forms of the kind (`Reference`), which every backend is tested against."""

    backend = ""

    def __init__(self, kind: str, residual: bool = True):
        self.kind, self.residual, self.ref = kind, residual, REFERENCES[kind]

    @abc.abstractmethod
    def __call__(self, x: TTTInputs, state: TTTState):
        """(o, new state) of the op on x from state."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, residual={self.residual})"


class NaiveOp(TTTOp):
    """The specification: per-token weights, inner gradients by torch.autograd."""

    backend = "naive"

    def __call__(self, x, state):
        return self.ref.naive(x, state, self.residual)


class DualOp(TTTOp):
    """The mini-batch dual form in PyTorch; one token per row (a one-token call, or packed documents of one token
    each) runs the primal step (the same math, less work)."""

    backend = "dual"

    def __call__(self, x, state):
        T, pk = x.q.shape[1], x.packing
        one = T == 1 if pk is None else pk.num_docs == T
        return (self.ref.step if one else self.ref.dual)(x, state, self.residual)


def triton_available() -> tuple[bool, str]:
    """(ok, reason): whether the Triton kernels can be imported here."""
    try:
        from . import triton_backend  # noqa: F401
    except Exception as e:  # ImportError, or Triton failing to initialise
        return False, f"the Triton kernels could not be imported ({type(e).__name__}: {e}); pip install triton"
    return True, ""


def triton_runs_on(device) -> tuple[bool, str]:
    """(ok, why not, as a predicate: "needs ..." / "is not available: ..."): whether Triton kernels can run on
    tensors of `device` (CUDA, or any device in Triton's interpreter, TRITON_INTERPRET=1) and import here. Also
    the rule of the fused layer kernels."""
    dev_type = getattr(device, "type", str(device))
    if dev_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False, (f"needs CUDA tensors (got {dev_type}); use backend='dual' on CPU or set TRITON_INTERPRET=1 "
                       "to run the kernels in Triton's interpreter")
    ok, reason = triton_available()
    return ok, "" if ok else f"is not available: {reason}"


def kernel_unsupported(inner_ln: bool = True, residual: bool = True) -> str:
    """Why the Triton kernels cannot run these ablation switches ('' when they can)."""
    off = [name for name, on in (("inner_ln", inner_ln), ("residual", residual)) if not on]
    return f"the Triton kernels implement inner LayerNorm and residual on only; got {', '.join(off)} off" if off else ""


def resolve_backend(backend: str, device, *, inner_ln: bool = True, residual: bool = True,
                    dtype: torch.dtype = torch.float32) -> str:
    """The concrete backend ("naive" | "dual" | "triton") that `backend` means for `dtype` tensors on `device`;
    raise if a named one cannot run. inner_ln/residual: the ablation switches (the kernels need both on)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    dev_type = getattr(device, "type", str(device))
    unsupported = kernel_unsupported(inner_ln, residual)
    if backend == "auto":
        usable = dev_type == "cuda" and not unsupported and dtype != torch.float64 and triton_available()[0]
        return "triton" if usable else "dual"
    if backend == "triton":
        if unsupported:
            raise RuntimeError(f"backend='triton': {unsupported}; use backend='dual' (or 'auto')")
        ok, reason = triton_runs_on(device)
        if not ok:
            raise RuntimeError(f"backend='triton' {reason}")
        if dtype == torch.float64:
            warnings.warn("backend='triton': float64 inputs run in the PyTorch dual form (the kernels compute in "
                          "fp32)", stacklevel=3)
            return "dual"
    return backend


def resolve_op(kind: str, backend: str = "auto", device="cpu", dtype: torch.dtype = torch.float32, *,
               inner_ln: bool = True, residual: bool = True, kernels=None) -> TTTOp:
    """The TTT op of `kind` ("linear" | "mlp") for `dtype` tensors on `device`, by `resolve_backend`'s rule.
    kernels: the triton backend's kernel choices (`triton_backend.LinearKernels` / `MLPKernels`; None: the
    defaults), for a triton op only."""
    if kind not in REFERENCES:
        raise ValueError(f"kind: expected one of {tuple(REFERENCES)}, got {kind!r}")
    name = resolve_backend(backend, device, inner_ln=inner_ln, residual=residual, dtype=dtype)
    if name == "triton":
        from .triton_backend import TritonOp
        return TritonOp(kind, kernels)
    if kernels is not None:
        raise ValueError(f"kernels: the triton backend's kernel choices, but backend {backend!r} resolved to {name!r}")
    return (NaiveOp if name == "naive" else DualOp)(kind, residual)


def ttt_op(kind, q, k, v, lr, tau, ln_weight, ln_bias, state, *, mini_batch=None, backend="auto", residual=True,
           cu_seqlens=None):
    """Run the TTT op of `kind` ("linear" or "mlp") with the chosen backend, resolved for this call. Returns
    (o, new_state). mini_batch: optional, = len(tau) (checked). cu_seqlens: packed documents (module docstring)."""
    if mini_batch is not None:
        if not isinstance(mini_batch, int) or isinstance(mini_batch, bool) or mini_batch < 1:
            raise ValueError(f"mini_batch: expected a positive int, got {mini_batch!r}")
        if isinstance(tau, torch.Tensor) and tau.shape != (mini_batch,):
            raise ValueError(f"tau: expected shape {(mini_batch,)} ([mini_batch]), got {tuple(tau.shape)}")
    x = TTTInputs(q, k, v, lr, tau, ln_weight, ln_bias, cu_seqlens)
    x.check(kind, state)
    op = resolve_op(kind, backend, q.device, q.dtype, inner_ln=ln_weight is not None, residual=residual)
    return op(x, state)


def ttt_linear(q, k, v, lr, tau, ln_weight, ln_bias, state, *, mini_batch=None, backend="auto", residual=True,
               cu_seqlens=None):
    """TTT-Linear op (docs/math.md). See the module docstring for shapes."""
    return ttt_op("linear", q, k, v, lr, tau, ln_weight, ln_bias, state, mini_batch=mini_batch, backend=backend,
                  residual=residual, cu_seqlens=cu_seqlens)


def ttt_mlp(q, k, v, lr, tau, ln_weight, ln_bias, state, *, mini_batch=None, backend="auto", residual=True,
            cu_seqlens=None):
    """TTT-MLP op (docs/math.md). See the module docstring for shapes."""
    return ttt_op("mlp", q, k, v, lr, tau, ln_weight, ln_bias, state, mini_batch=mini_batch, backend=backend,
                  residual=residual, cu_seqlens=cu_seqlens)
