"""The "triton" backend of the TTT ops: autograd wrappers around the Triton kernels.

Mirrors the PyTorch dual form (`ttt_linear/dual.py`, `ttt_mlp/dual.py`): same signature, same outputs,
same state. The kernels (`ttt_linear/chunk.py`, `ttt_mlp/chunk.py`) run whole mini-batches that start
at a mini-batch boundary with a zero accumulator. A call is split into up to three pieces:
  head: the tokens that finish a mini-batch already begun (state.pos % b != 0) -> PyTorch dual form;
  body: the aligned whole mini-batches -> the Triton kernels (weights on chip, checkpointed backward),
        called as torch.library custom ops (`torch.ops.ttt.*_chunk_fwd/bwd`, fake impls + autograd), so
        torch.compile traces them without a graph break;
  tail: the last T % b tokens of a partial mini-batch -> PyTorch dual form.
Autograd joins the pieces, so gradients reach every input and the initial state (params and accum).
When the start state's accumulator requires grad at an aligned position, the first mini-batch also
runs in the dual form, whose gradient w.r.t. that (zero) accumulator the kernels do not compute.
TTT-MLP has two kernel pairs (MLP_IMPLS, below): "regs" keeps W1 and W2 (2 x d x 4d fp32) in registers up to
d = 64 (the default there), and "blocked" walks F in blocks with the weights in a per-program global scratch
and serves larger head dims (96 for the 760m preset, 128). `forward`'s `mlp_impl` and `mlp_warps` arguments
pick (None: by head dim).
One-token calls (decode) use the fused step kernels (`ttt_linear/step_triton.py`, `ttt_mlp/step_triton.py`);
a one-token call that needs gradients runs the PyTorch step instead (logged once). float64 inputs run the
dual form (the kernels compute in fp32; also logged once).
Importing this module imports Triton, so `ttt.ops.triton_available()` reports whether it works.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import triton  # noqa: F401  (import failure = backend unavailable)

from .common import TTTState
from .ttt_linear import chunk as _lin_chunk, dual as _lin_dual, step as _lin_step
from .ttt_linear import step_triton as lin_step_triton
from .ttt_mlp import chunk as _mlp_chunk, chunk_blocked as _mlp_blocked
from .ttt_mlp import dual as _mlp_dual, step as _mlp_step
from .ttt_mlp import step_triton as mlp_step_triton

log = logging.getLogger(__name__)
_warned: set = set()


def _warn_once(key, msg: str, *args) -> None:
    """Say once per case when part of a triton-backend call runs in the PyTorch dual form."""
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)

GROUP = 8  # mini-batches between weight checkpoints of the forward (the backward recomputes within)
# the TTT-Linear backward by default: "split" (chain + parallel passes; docs/kernels_notes.md)
LINEAR_BWD_IMPL = "split"


@dataclass(frozen=True)
class LinearKernels:
    """How the TTT-Linear body runs (an explicit argument of `forward`; tests and benchmarks pass one).
    bwd: the backward's chain ("split" picks by size, "split_lean" | "split_full", see `ttt_linear/chunk.py`);
    group: mini-batches per weight checkpoint; dot_mode: the products' operand precision (None: by input dtype);
    fwd_warps: None for the default; bwd_warps: None, or (pre, chain, post); bwd_segments: the time segments of
    the backward's pipelined launch (None: by size)."""
    bwd: str = LINEAR_BWD_IMPL
    group: int = GROUP
    dot_mode: int | None = None
    fwd_warps: int | None = None
    bwd_warps: tuple | None = None
    bwd_segments: int | None = None

    def __post_init__(self):
        if self.bwd not in _lin_chunk.BWD_IMPLS:
            raise ValueError(f"LinearKernels.bwd: expected one of {_lin_chunk.BWD_IMPLS}, got {self.bwd!r}")


# TTT-MLP kernel pairs, chosen by the `mlp_impl` argument of `forward` (None: `default_mlp_impl(d)`):
#   "regs": ttt_mlp/chunk.py, weights in registers, tokens the row dimension (d <= MLP_MAX_D);
#   "blocked": ttt_mlp/chunk_blocked.py, F walked in blocks, weights in a per-program global scratch.
MLP_IMPLS = ("regs", "blocked")
MLP_MAX_D = 64  # the register kernels hold W1 and W2 on chip up to this head dim


def default_mlp_impl(d: int) -> str:
    """The TTT-MLP kernel pair for head dim d: "regs" up to MLP_MAX_D, "blocked" above."""
    return "regs" if d <= MLP_MAX_D else "blocked"


def _prep(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _same_strides(q, k, v):
    q, k, v = _prep(q), _prep(k), _prep(v)
    if not (q.stride() == k.stride() == v.stride()):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return q, k, v


def _mlp_kernels(d: int, impl: str | None):
    """The TTT-MLP (fwd, bwd) launchers for head dim d and `impl` (None: `default_mlp_impl(d)`)."""
    impl = impl or default_mlp_impl(d)
    if impl not in MLP_IMPLS:
        raise ValueError(f"mlp_impl: expected None or one of {MLP_IMPLS}, got {impl!r}")
    if impl != "blocked" and d > MLP_MAX_D:
        raise ValueError(f"mlp_impl: {impl!r} holds the weights in registers only up to head dim {MLP_MAX_D}, "
                         f"got head dim {d}")
    mod = {"regs": _mlp_chunk, "blocked": _mlp_blocked}[impl]
    return mod.fwd, mod.bwd


# ---- torch.library custom ops: torch.compile traces through these without a graph break ----
# Each kernel launch is one op with a fake (meta) implementation; the forward ops' autograd formulas call
# the backward ops. `save` (whether checkpoints are written for a backward) is decided by the caller,
# since a custom op's body does not see whether its inputs require grad; without it the checkpoint
# outputs are empty tensors.
def _nck(T, mini_batch, group):
    return triton.cdiv(T // mini_batch, group)


@torch.library.custom_op("ttt::linear_chunk_fwd", mutates_args=())
def _lin_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor, tau: torch.Tensor,
                ln_weight: torch.Tensor, ln_bias: torch.Tensor, W0: torch.Tensor, c0: torch.Tensor,
                mini_batch: int, group: int, save: bool, dot_mode: int, fwd_warps: int, bwd_impl: str,
                bwd_warps: list[int], bwd_segments: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _same_strides(q, k, v)
    o, wT, cT, ck = _lin_chunk.fwd(q, k, v, lr, tau, ln_weight, ln_bias, W0.contiguous(), c0.contiguous(),
                                   mini_batch, group, save, dot_mode=None if dot_mode < 0 else dot_mode,
                                   warps=fwd_warps or None)
    if ck is None:
        ck = (q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32))
    return o, wT, cT, *ck


@_lin_fwd_op.register_fake
def _(q, k, v, lr, tau, ln_weight, ln_bias, W0, c0, mini_batch, group, save, dot_mode, fwd_warps, bwd_impl,
      bwd_warps, bwd_segments):
    B, T, H, d = q.shape
    nck = _nck(T, mini_batch, group)
    ck = ((q.new_empty((B, H, nck, d, d), dtype=torch.float32), q.new_empty((B, H, nck, d), dtype=torch.float32))
          if save else (q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32)))
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(W0), \
        torch.empty_like(c0), *ck


@torch.library.custom_op("ttt::linear_chunk_bwd", mutates_args=())
def _lin_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor, tau: torch.Tensor,
                ln_weight: torch.Tensor, ln_bias: torch.Tensor, ckw: torch.Tensor, ckc: torch.Tensor,
                do: torch.Tensor, dwT: torch.Tensor, dcT: torch.Tensor, mini_batch: int,
                group: int, dot_mode: int, impl: str, warps: list[int], segments: int) -> list[torch.Tensor]:
    q, k, v = _same_strides(q, k, v)
    return list(_lin_chunk.bwd(q, k, v, lr, tau, ln_weight, ln_bias, (ckw, ckc), do, dwT.float(), dcT.float(),
                               mini_batch, group, dot_mode=None if dot_mode < 0 else dot_mode, impl=impl,
                               warps=tuple(warps) or None,
                               segments=segments or None))


@_lin_bwd_op.register_fake
def _(q, k, v, lr, tau, ln_weight, ln_bias, ckw, ckc, do, dwT, dcT, mini_batch, group, dot_mode, impl, warps,
      segments):
    B, T, H, d = q.shape
    f32 = dict(dtype=torch.float32)
    e = lambda *s: q.new_empty(s, **f32)  # noqa: E731
    return [q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), e(B, T, H), e(mini_batch),
            e(H, d), e(H, d), e(B, H, d, d), e(B, H, d)]


def _lin_setup(ctx, inputs, output):
    (q, k, v, lr, tau, lnw, lnb, W0, c0, mini_batch, group, save, dot_mode, fwd_warps, bwd_impl, bwd_warps,
     bwd_segments) = inputs
    ctx.save_for_backward(q, k, v, lr, tau, lnw, lnb, output[3], output[4])
    ctx.meta = (mini_batch, group, save, dot_mode, bwd_impl, bwd_warps, bwd_segments)


def _lin_backward(ctx, do, dwT, dcT, _dckw, _dckc):
    q, k, v, lr, tau, lnw, lnb, ckw, ckc = ctx.saved_tensors
    mini_batch, group, save, dot_mode, bwd_impl, bwd_warps, bwd_segments = ctx.meta
    if not save:
        raise RuntimeError("ttt::linear_chunk_fwd ran with save=False: no checkpoints for a backward")
    B, T, H, d = q.shape
    do = torch.zeros_like(q) if do is None else do.contiguous()
    dwT = q.new_zeros((B, H, d, d), dtype=torch.float32) if dwT is None else dwT
    dcT = q.new_zeros((B, H, d), dtype=torch.float32) if dcT is None else dcT
    dq, dk, dv, dlr, dtau, dlnw, dlnb, dw0, dc0 = _lin_bwd_op(q, k, v, lr, tau, lnw, lnb, ckw, ckc, do, dwT, dcT,
                                                              mini_batch, group, dot_mode, bwd_impl, bwd_warps,
                                                              bwd_segments)
    return (dq, dk, dv, dlr.to(lr.dtype), dtau.to(tau.dtype), dlnw.to(lnw.dtype), dlnb.to(lnb.dtype), dw0, dc0,
            None, None, None, None, None, None, None, None)


_lin_fwd_op.register_autograd(_lin_backward, setup_context=_lin_setup)

_MLP_SHAPES = lambda d, F: ((d, F), (F,), (F, d), (d,))  # noqa: E731


@torch.library.custom_op("ttt::mlp_chunk_fwd", mutates_args=())
def _mlp_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor, tau: torch.Tensor,
                ln_weight: torch.Tensor, ln_bias: torch.Tensor, W1: torch.Tensor, c1: torch.Tensor,
                W2: torch.Tensor, c2: torch.Tensor, mini_batch: int, group: int,
                save: bool, impl: str, warps: int) -> list[torch.Tensor]:
    q, k, v = _same_strides(q, k, v)
    ps = tuple(p.contiguous() for p in (W1, c1, W2, c2))
    o, fin, ck = _mlp_kernels(q.shape[-1], impl)[0](q, k, v, lr, tau, ln_weight, ln_bias, ps, mini_batch, group,
                                                     save, num_warps=warps or None)
    if ck is None:
        ck = tuple(q.new_empty(0, dtype=torch.float32) for _ in range(4))
    return [o, *fin, *ck]


@_mlp_fwd_op.register_fake
def _(q, k, v, lr, tau, ln_weight, ln_bias, W1, c1, W2, c2, mini_batch, group, save, impl, warps):
    B, T, H, d = q.shape
    F = W1.shape[-1]
    nck = _nck(T, mini_batch, group)
    if save:
        ck = [q.new_empty((B, H, nck, *s), dtype=torch.float32) for s in _MLP_SHAPES(d, F)]
    else:
        ck = [q.new_empty(0, dtype=torch.float32) for _ in range(4)]
    return [torch.empty_like(q, memory_format=torch.contiguous_format),
            *(torch.empty_like(p) for p in (W1, c1, W2, c2)), *ck]


@torch.library.custom_op("ttt::mlp_chunk_bwd", mutates_args=())
def _mlp_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor, tau: torch.Tensor,
                ln_weight: torch.Tensor, ln_bias: torch.Tensor, ck1: torch.Tensor, ckc1: torch.Tensor,
                ck2: torch.Tensor, ckc2: torch.Tensor, do: torch.Tensor, dW1: torch.Tensor, dc1: torch.Tensor,
                dW2: torch.Tensor, dc2: torch.Tensor, mini_batch: int, group: int, impl: str,
                warps: int) -> list[torch.Tensor]:
    q, k, v = _same_strides(q, k, v)
    dq, dk, dv, dlr, dtau, dlnw, dlnb, dps = _mlp_kernels(q.shape[-1], impl)[1](
        q, k, v, lr, tau, ln_weight, ln_bias, (ck1, ckc1, ck2, ckc2), do, (dW1, dc1, dW2, dc2), mini_batch, group,
        num_warps=warps or None)
    return [dq, dk, dv, dlr, dtau, dlnw, dlnb, *dps]


@_mlp_bwd_op.register_fake
def _(q, k, v, lr, tau, ln_weight, ln_bias, ck1, ckc1, ck2, ckc2, do, dW1, dc1, dW2, dc2, mini_batch, group, impl,
      warps):
    B, T, H, d = q.shape
    F = ck1.shape[-1]
    e = lambda *s: q.new_empty(s, dtype=torch.float32)  # noqa: E731
    return [q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), e(B, T, H), e(mini_batch),
            e(H, d), e(H, d), *(e(B, H, *s) for s in _MLP_SHAPES(d, F))]


def _mlp_setup(ctx, inputs, output):
    q, k, v, lr, tau, lnw, lnb, W1, c1, W2, c2, mini_batch, group, save, impl, warps = inputs
    ctx.save_for_backward(q, k, v, lr, tau, lnw, lnb, *output[5:9])
    ctx.meta = (mini_batch, group, save, impl, warps)


def _mlp_backward(ctx, grads):
    q, k, v, lr, tau, lnw, lnb, *ck = ctx.saved_tensors
    mini_batch, group, save, impl, warps = ctx.meta
    if not save:
        raise RuntimeError("ttt::mlp_chunk_fwd ran with save=False: no checkpoints for a backward")
    B, T, H, d = q.shape
    F = ck[0].shape[-1]
    do = grads[0]
    do = torch.zeros_like(q) if do is None else do.contiguous()
    dfin = [q.new_zeros((B, H, *s), dtype=torch.float32) if g is None else g.float()
            for g, s in zip(grads[1:5], _MLP_SHAPES(d, F))]
    dq, dk, dv, dlr, dtau, dlnw, dlnb, *dps = _mlp_bwd_op(q, k, v, lr, tau, lnw, lnb, *ck, do, *dfin,
                                                          mini_batch, group, impl, warps)
    return (dq, dk, dv, dlr.to(lr.dtype), dtau.to(tau.dtype), dlnw.to(lnw.dtype), dlnb.to(lnb.dtype), *dps,
            None, None, None, None, None)


_mlp_fwd_op.register_autograd(_mlp_backward, setup_context=_mlp_setup)


def _needs_grad(*xs):
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _body(kind, q, k, v, lr, tau, ln_weight, ln_bias, params, mini_batch, linear: LinearKernels, mlp_impl,
          mlp_warps):
    """Whole mini-batches from an aligned start with zero accumulators. Returns (o, final params)."""
    save = _needs_grad(q, k, v, lr, tau, ln_weight, ln_bias, *params)
    ps = tuple(p.to(torch.float32) for p in params)
    if kind == "linear":
        lk = linear
        outs = _lin_fwd_op(q, k, v, lr, tau, ln_weight, ln_bias, *ps, mini_batch, lk.group, save,
                           -1 if lk.dot_mode is None else lk.dot_mode, lk.fwd_warps or 0, lk.bwd,
                           list(lk.bwd_warps or ()), lk.bwd_segments or 0)
    else:
        impl = mlp_impl or default_mlp_impl(q.shape[-1])
        outs = _mlp_fwd_op(q, k, v, lr, tau, ln_weight, ln_bias, *ps, mini_batch, GROUP, save, impl, mlp_warps or 0)
    o, *p = outs[:1 + len(params)]
    return o, tuple(x.to(y.dtype) for x, y in zip(p, params))


def forward(kind, q, k, v, lr, tau, ln_weight, ln_bias, state: TTTState, mini_batch: int, *,
            linear: LinearKernels | None = None, mlp_impl: str | None = None, mlp_warps: int | None = None):
    """Same contract as the dual form: q, k, v [B,T,H,d]; lr [B,T,H]; tau [b]; ln_* [H,d].
    Returns (o [B,T,H,d] in q's dtype, new TTTState). linear: the TTT-Linear kernel choices (None: the
    defaults, `LinearKernels()`). TTT-MLP only: `mlp_impl` picks the kernel pair (None: `default_mlp_impl(d)`;
    see MLP_IMPLS) and `mlp_warps` its warps per program (None: the kernel module's default for d)."""
    if kind == "mlp":
        _mlp_kernels(q.shape[-1], mlp_impl)  # check the choice before any piece runs
    dual = _lin_dual if kind == "linear" else _mlp_dual
    if q.dtype == torch.float64:
        _warn_once("fp64", "backend='triton': float64 inputs run in the PyTorch dual form (the kernels compute "
                   "in fp32)")
        return dual.forward(q, k, v, lr, tau, ln_weight, ln_bias, state, mini_batch)
    B, T, H, d = q.shape
    b = mini_batch
    if T == 1:
        step = (lin_step_triton if kind == "linear" else mlp_step_triton).forward
        if _needs_grad(q, k, v, lr, tau, ln_weight, ln_bias, *state.params, *state.accum):
            _warn_once("step_grad", "backend='triton': a one-token call that needs gradients runs the PyTorch "
                       "step (the fused step kernel has no backward)")
            step = (_lin_step if kind == "linear" else _mlp_step).forward
        return step(q, k, v, lr, tau, ln_weight, ln_bias, state, mini_batch)
    head = (b - state.pos % b) % b
    if head == 0 and any(a.requires_grad for a in state.accum):
        head = b  # the dual form carries the gradient of the (zero) start accumulator
    head = min(head, T)
    nbody = (T - head) // b * b
    outs = []
    if head:
        o, state = dual.forward(q[:, :head], k[:, :head], v[:, :head], lr[:, :head], tau, ln_weight, ln_bias,
                                state, mini_batch)
        outs.append(o)
    if nbody:
        s = slice(head, head + nbody)
        o, params = _body(kind, q[:, s], k[:, s], v[:, s], lr[:, s], tau, ln_weight, ln_bias, state.params,
                          mini_batch, linear or LinearKernels(), mlp_impl, mlp_warps)
        outs.append(o)
        accum = tuple(torch.zeros(p.shape, dtype=p.dtype, device=p.device) for p in params)
        state = TTTState(kind, params, accum, state.pos + nbody)
    if head + nbody < T:
        s = slice(head + nbody, T)
        o, state = dual.forward(q[:, s], k[:, s], v[:, s], lr[:, s], tau, ln_weight, ln_bias, state, mini_batch)
        outs.append(o)
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return o, state
