"""TTT ops: one signature, several backends.

    o, state = ttt_linear(q, k, v, lr, tau, ln_weight, ln_bias, state, mini_batch=16, backend="auto")
    o, state = ttt_mlp(q, k, v, lr, tau, ln_weight, ln_bias, state, mini_batch=16, backend="auto")

q, k, v: [B, T, H, d] (any float dtype; o has q's dtype); lr: [B, T, H] the per-token inner learning rate
base_lr * sigma_j / d; tau: [mini_batch] the per-position factor tau_i; ln_weight, ln_bias: [H, d] the
inner LayerNorm, or both None for none; residual=False drops the inner residual (target v instead of v - k,
output LN(f(q)) instead of q + LN(f(q))); state: a `TTTState` (see `TTTState.initial`). Backends:
  "naive"  the specification: per-token weights, inner gradients by torch.autograd (slow; tests)
  "dual"   the mini-batch dual form in PyTorch (CPU path, reference for the kernels)
  "triton" the Triton kernels (CUDA only)
  "auto"   "triton" on CUDA tensors when Triton is importable and the kernels support the switches (inner
           LayerNorm and residual on), else "dual"; the choice is logged once.
A backend asked for by name that cannot run raises; nothing falls back silently.
"""
from __future__ import annotations

import logging
import os

from .common import TTTState, check_inputs, make_tau
from .ttt_linear import dual as _lin_dual, naive as _lin_naive, step as _lin_step
from .ttt_mlp import dual as _mlp_dual, naive as _mlp_naive, step as _mlp_step

__all__ = ["TTTState", "make_tau", "ttt_linear", "ttt_mlp", "ttt_op", "BACKENDS", "resolve_backend",
           "triton_available", "kernel_unsupported"]

BACKENDS = ("auto", "naive", "dual", "triton")
log = logging.getLogger(__name__)
_logged: set = set()


def triton_available() -> tuple[bool, str]:
    """(ok, reason): whether the Triton kernels can be imported here."""
    try:
        from . import triton_backend  # noqa: F401
    except Exception as e:  # ImportError, or Triton failing to initialise
        return False, f"the Triton kernels could not be imported ({type(e).__name__}: {e}); pip install triton"
    return True, ""


def kernel_unsupported(inner_ln: bool = True, residual: bool = True) -> str:
    """Why the Triton kernels cannot run these ablation switches ('' when they can)."""
    off = [name for name, on in (("inner_ln", inner_ln), ("residual", residual)) if not on]
    return f"the Triton kernels implement inner LayerNorm and residual on only; got {', '.join(off)} off" if off else ""


def resolve_backend(backend: str, device, *, inner_ln: bool = True, residual: bool = True) -> str:
    """Turn "auto" into a concrete backend for tensors on `device`; raise if a named one cannot run.
    inner_ln/residual: the ablation switches of the call (the kernels need both on)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    dev_type = getattr(device, "type", str(device))
    unsupported = kernel_unsupported(inner_ln, residual)
    if backend == "auto":
        ok, _ = triton_available() if dev_type == "cuda" and not unsupported else (False, "")
        chosen = "triton" if ok else "dual"
        if (dev_type, chosen) not in _logged:
            _logged.add((dev_type, chosen))
            log.info("ttt ops: backend='auto' chose %r for %s tensors", chosen, dev_type)
        return chosen
    if backend == "triton":
        if unsupported:
            raise RuntimeError(f"backend='triton': {unsupported}; use backend='dual' (or 'auto')")
        if dev_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"backend='triton' needs CUDA tensors (got {dev_type}); use backend='dual' on CPU "
                               "or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter")
        ok, reason = triton_available()
        if not ok:
            raise RuntimeError(f"backend='triton' is not available: {reason}")
    return backend


def ttt_op(kind, q, k, v, lr, tau, ln_weight, ln_bias, state, *, mini_batch=16, backend="auto", residual=True):
    """Run the TTT op of `kind` ("linear" or "mlp") with the chosen backend. Returns (o, new_state)."""
    check_inputs(kind, q, k, v, lr, tau, ln_weight, ln_bias, state, mini_batch)
    backend = resolve_backend(backend, q.device, inner_ln=ln_weight is not None, residual=residual)
    args = (q, k, v, lr, tau, ln_weight, ln_bias, state, mini_batch)
    if backend == "triton":
        from . import triton_backend
        return triton_backend.forward(kind, *args)
    if backend == "naive":
        return (_lin_naive if kind == "linear" else _mlp_naive).forward(*args, residual=residual)
    if q.shape[1] == 1:  # one token: the primal decode step does the same math with less work
        return (_lin_step if kind == "linear" else _mlp_step).forward(*args, residual=residual)
    return (_lin_dual if kind == "linear" else _mlp_dual).forward(*args, residual=residual)


def ttt_linear(q, k, v, lr, tau, ln_weight, ln_bias, state, *, mini_batch=16, backend="auto", residual=True):
    """TTT-Linear op (docs/math.md). See the module docstring for shapes."""
    return ttt_op("linear", q, k, v, lr, tau, ln_weight, ln_bias, state, mini_batch=mini_batch, backend=backend,
                  residual=residual)


def ttt_mlp(q, k, v, lr, tau, ln_weight, ln_bias, state, *, mini_batch=16, backend="auto", residual=True):
    """TTT-MLP op (docs/math.md). See the module docstring for shapes."""
    return ttt_op("mlp", q, k, v, lr, tau, ln_weight, ln_bias, state, mini_batch=mini_batch, backend=backend,
                  residual=residual)
