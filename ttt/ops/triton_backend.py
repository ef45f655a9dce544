"""The "triton" backend of the TTT ops: `TritonOp`, the op of one kind that runs the Triton kernels.

Mirrors the PyTorch dual form (`ttt_linear/dual.py`, `ttt_mlp/dual.py`): same inputs, same outputs, same state.
The kernels (`ttt_linear/chunk.py`, `ttt_mlp/chunk.py`, `ttt_mlp/chunk_blocked.py`) run whole mini-batches that
start at a mini-batch boundary with a zero accumulator. `TritonOp`'s rules, all of them:
  - a call is split into up to three pieces: head, the tokens that finish a mini-batch already begun
    (state.pos % b != 0), in the PyTorch dual form; body, the aligned whole mini-batches, in the kernels
    (weights on chip, checkpointed backward), called as torch.library custom ops (`torch.ops.ttt.*_chunk_fwd/bwd`,
    fake impls + autograd), so torch.compile traces them without a graph break; tail, the last T % b tokens
    of a partial mini-batch, in the dual form. Autograd joins the pieces, so gradients reach every input and
    the initial state (params and accum);
  - when the start state's accumulator requires grad at an aligned position, the first mini-batch also runs
    in the dual form, whose gradient w.r.t. that (zero) accumulator the kernels do not compute;
  - a one-token call (decode) runs the fused step kernel (`ttt_linear/step_triton.py`, `ttt_mlp/step_triton.py`),
    or the PyTorch step when it needs gradients (the step kernels have no backward);
  - float64 inputs, and calls without the inner LayerNorm, are refused (`resolve_op` gives them the dual form).
Kernel choices are explicit values, `LinearKernels` and `MLPKernels` (defaults: the measured winners,
docs/kernels_notes.md). Importing this module imports Triton, so `ttt.ops.triton_available()` reports whether
it works.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton  # noqa: F401  (import failure = backend unavailable)

from . import TTTOp
from .common import TTTInputs, TTTState
from .ttt_linear import chunk as _lin_chunk, step_triton as _lin_step_triton
from .ttt_mlp import chunk as _mlp_chunk, chunk_blocked as _mlp_blocked, step_triton as _mlp_step_triton

GROUP = 8  # mini-batches between weight checkpoints of the forward (the backward recomputes within)
# TTT-MLP kernel pairs: ttt_mlp/chunk.py (weights in registers), chunk_blocked.py (F in column blocks),
# chunk_smem.py (weights in shared memory, wgmma, Hopper; opt-in until measured)
MLP_IMPLS = ("regs", "blocked", "smem")
MLP_MAX_D = 64  # the register kernels hold W1 and W2 on chip up to this head dim


def default_mlp_impl(d: int) -> str:
    """The TTT-MLP kernel pair for head dim d: "regs" up to MLP_MAX_D, "blocked" (F walked in column blocks,
    the weights in a per-program global scratch) above."""
    return "regs" if d <= MLP_MAX_D else "blocked"


def _prep(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _same_strides(q, k, v):
    q, k, v = _prep(q), _prep(k), _prep(v)
    if not (q.stride() == k.stride() == v.stride()):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return q, k, v


def _needs_grad(*xs):
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


def _f32(params):
    return tuple(p.to(torch.float32) for p in params)


@dataclass(frozen=True)
class LinearKernels:
    """How TTT-Linear runs in the kernels. bwd: the backward's chain ("split" picks by size, "split_lean" |
    "split_full", see `ttt_linear/chunk.py`); group: mini-batches per weight checkpoint; dot_mode: the products'
    operand precision (None: by input dtype); fwd_warps: None for the default; bwd_warps: None, or (pre, chain,
    post); bwd_segments: the time segments of the backward's pipelined launch (None: by size)."""

    bwd: str = "split"
    group: int = GROUP
    dot_mode: int | None = None
    fwd_warps: int | None = None
    bwd_warps: tuple | None = None
    bwd_segments: int | None = None

    def __post_init__(self):
        if self.bwd not in _lin_chunk.BWD_IMPLS:
            raise ValueError(f"LinearKernels.bwd: expected one of {_lin_chunk.BWD_IMPLS}, got {self.bwd!r}")

    def check(self, d: int) -> None:
        """Every head dim runs (padded to a power of two)."""

    def body(self, x: TTTInputs, params, save: bool):
        """Aligned whole mini-batches from `params` with zero accumulators: (o, final params, fp32)."""
        outs = _lin_fwd_op(x.q, x.k, x.v, x.lr, x.tau, x.ln_weight, x.ln_bias, *_f32(params), x.mini_batch,
                           self.group, save, -1 if self.dot_mode is None else self.dot_mode, self.fwd_warps or 0,
                           self.bwd, list(self.bwd_warps or ()), self.bwd_segments or 0)
        return outs[0], outs[1:3]

    def step(self, x: TTTInputs, state: TTTState):
        return _lin_step_triton.forward(x, state)


@dataclass(frozen=True)
class MLPKernels:
    """How TTT-MLP runs in the kernels. impl: the kernel pair (MLP_IMPLS; None: `default_mlp_impl(d)`; "smem":
    head dim 64 / 128, mini-batch 16, 16-bit inputs, Hopper); warps: its warps per program (None: the kernel
    module's default); group: mini-batches per weight checkpoint;
    step_block_f, step_warps: the decode step kernel's F block width and warps (None: its defaults)."""

    impl: str | None = None
    warps: int | None = None
    group: int = GROUP
    step_block_f: int | None = None
    step_warps: int | None = None

    def __post_init__(self):
        if self.impl is not None and self.impl not in MLP_IMPLS:
            raise ValueError(f"mlp_impl: expected None or one of {MLP_IMPLS}, got {self.impl!r}")

    def check(self, d: int) -> None:
        if self.impl == "regs" and d > MLP_MAX_D:
            raise ValueError(f"mlp_impl: 'regs' holds the weights in registers only up to head dim {MLP_MAX_D}, "
                             f"got head dim {d}")
        if self.impl == "smem" and d not in _mlp_module("smem").HEAD_DIMS:
            raise ValueError(f"mlp_impl: 'smem' is written for head dim 64 or 128, got head dim {d}")

    def body(self, x: TTTInputs, params, save: bool):
        """Aligned whole mini-batches from `params` with zero accumulators: (o, final params, fp32)."""
        impl = self.impl or default_mlp_impl(x.q.shape[-1])
        if impl == "smem":
            _mlp_module(impl).check(x.q.shape[-1], x.mini_batch, x.q.dtype)
        outs = _mlp_fwd_op(x.q, x.k, x.v, x.lr, x.tau, x.ln_weight, x.ln_bias, *_f32(params), x.mini_batch,
                           self.group, save, impl, self.warps or 0)
        return outs[0], outs[1:5]

    def step(self, x: TTTInputs, state: TTTState):
        return _mlp_step_triton.forward(x, state, block_f=self.step_block_f, num_warps=self.step_warps)


class TritonOp(TTTOp):
    """The TTT op of `kind` in the Triton kernels, by the rules of the module docstring. kernels: the kernel
    choices (`LinearKernels` / `MLPKernels`; None: the defaults)."""

    backend = "triton"

    def __init__(self, kind: str, kernels: LinearKernels | MLPKernels | None = None):
        super().__init__(kind, residual=True)  # the kernels implement the inner residual (and LayerNorm) only
        want = LinearKernels if kind == "linear" else MLPKernels
        if not isinstance(kernels, (want, type(None))):
            raise ValueError(f"kernels: expected a {want.__name__} for kind {kind!r}, got {type(kernels).__name__}")
        self.kernels = kernels or want()

    def __repr__(self) -> str:
        return f"TritonOp(kind={self.kind!r}, kernels={self.kernels!r})"

    def __call__(self, x: TTTInputs, state: TTTState):
        if x.q.dtype == torch.float64:
            raise ValueError("q: the Triton kernels compute in fp32; expected fp32/fp16/bf16 inputs, got float64 "
                             "(resolve_op gives float64 the dual form)")
        if x.ln_weight is None:
            raise ValueError("ln_weight: the Triton kernels implement the inner LayerNorm (and residual) only; got "
                             "None (resolve_op gives these switches the dual form)")
        self.kernels.check(x.q.shape[-1])
        dual = self.ref.dual
        T, b = x.q.shape[1], x.mini_batch
        if T == 1:
            if _needs_grad(x.q, x.k, x.v, x.lr, x.tau, x.ln_weight, x.ln_bias, *state.params, *state.accum):
                return self.ref.step(x, state)
            return self.kernels.step(x, state)
        head = (b - state.pos % b) % b
        if head == 0 and any(a.requires_grad for a in state.accum):
            head = b  # the dual form carries the gradient of the (zero) start accumulator
        head = min(head, T)
        nbody = (T - head) // b * b
        outs = []
        if head:
            o, state = dual(x.tokens(0, head), state)
            outs.append(o)
        if nbody:
            xb = x.tokens(head, head + nbody)
            save = _needs_grad(xb.q, xb.k, xb.v, xb.lr, xb.tau, xb.ln_weight, xb.ln_bias, *state.params)
            o, params = self.kernels.body(xb, state.params, save)
            outs.append(o)
            params = tuple(p.to(s.dtype) for p, s in zip(params, state.params))
            state = TTTState(state.kind, params, tuple(torch.zeros_like(p) for p in params), state.pos + nbody)
        if head + nbody < T:
            o, state = dual(x.tokens(head + nbody), state)
            outs.append(o)
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), state


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


def _mlp_module(impl: str):
    """The kernel module of an MLP_IMPLS entry ("smem" imported on first use: it needs Triton's Gluon)."""
    if impl == "regs":
        return _mlp_chunk
    if impl == "blocked":
        return _mlp_blocked
    try:
        from .ttt_mlp import chunk_smem
    except ImportError as e:
        raise ValueError(f"mlp_impl: 'smem' needs Triton's Gluon (triton.experimental.gluon, Triton >= 3.6): {e}") \
            from None
    return chunk_smem




@torch.library.custom_op("ttt::mlp_chunk_fwd", mutates_args=())
def _mlp_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor, tau: torch.Tensor,
                ln_weight: torch.Tensor, ln_bias: torch.Tensor, W1: torch.Tensor, c1: torch.Tensor,
                W2: torch.Tensor, c2: torch.Tensor, mini_batch: int, group: int,
                save: bool, impl: str, warps: int) -> list[torch.Tensor]:
    q, k, v = _same_strides(q, k, v)
    ps = tuple(p.contiguous() for p in (W1, c1, W2, c2))
    o, fin, ck = _mlp_module(impl).fwd(q, k, v, lr, tau, ln_weight, ln_bias, ps, mini_batch, group, save,
                                       num_warps=warps or None)
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
    dq, dk, dv, dlr, dtau, dlnw, dlnb, dps = _mlp_module(impl).bwd(
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


