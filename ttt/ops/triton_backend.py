"""The "triton" backend of the TTT ops: `TritonOp`, the op of one kind that runs the Triton kernels.

Mirrors the PyTorch dual form (`ttt_linear/dual.py`, `ttt_mlp/dual.py`): same inputs, same outputs, same state.
The kernels (`ttt_linear/chunk.py`, `ttt_mlp/chunk.py`, `ttt_mlp/chunk_blocked.py`) walk rows (`triton_utils.Rows`):
the B sequences of a batch, or the N documents of a packed one (cu_seqlens), one program per (row, head), each
row's mini-batches from its first token with a zero accumulator, its last one partial where the row ends inside
it. `TritonOp`'s rules, all of them:
  - a row that starts inside a mini-batch (its position % b != 0) runs the tokens that finish it (the head) in the
    PyTorch dual form; the rest of every row runs in the kernels (weights on chip, checkpointed backward), called
    as torch.library custom ops (`torch.ops.ttt.*_chunk_fwd/bwd`, fake impls + autograd), so torch.compile traces
    them without a graph break. A row ending in a partial mini-batch keeps that mini-batch's start weights (the
    kernels leave it uncommitted) and its accumulators come from the dual form's inner gradients of those
    tokens (`Reference.grads`), a few small products. Autograd joins the pieces, so gradients reach every input
    and the initial state (params and accum). No cu_seqlens and one full-length document run the same kernels;
  - the shared-memory pair (`ttt_mlp/chunk_smem.py`; the default in 16 bits on Hopper at head dims 64 and 128,
    with and without cu_seqlens, see `default_mlp_impl`; `MLPKernels(impl="smem")` names it) walks
    the same rows, their whole mini-batches only, on a persistent grid (packed documents of unequal lengths spread
    over its programs longest first, `chunk_smem.schedule`); a row's partial last mini-batch runs in the dual form
    from the weights the kernels reach (all rows' at once), its weights left uncommitted as the other kernels leave
    them;
  - when the start state's accumulator requires grad at an aligned position, the first mini-batch also runs
    in the dual form, whose gradient w.r.t. that (zero) accumulator the kernels do not compute;
  - a one-token call without cu_seqlens (decode) runs the fused step kernel (`ttt_linear/step_triton.py`,
    `ttt_mlp/step_triton.py`), or the PyTorch step when it needs gradients (the step kernels have no backward);
  - float64 inputs, and calls without the inner LayerNorm, are refused (`resolve_op` gives them the dual form).
Kernel choices are explicit values, `LinearKernels` and `MLPKernels` (defaults: the measured winners,
docs/kernels_notes.md). Importing this module imports Triton, so `ttt.ops.triton_available()` reports whether
it works.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton  # noqa: F401  (import failure = backend unavailable)

from . import TTTOp
from .common import TTTInputs, TTTState, compute_dtype, end_pos, ln_operands
from .packed import Window, rows_of, upload
from .triton_utils import Rows, batch_rows, cdiv, document_rows, hopper, tile
from .ttt_linear import bwd_split as _lin_bwd_split, chunk as _lin_chunk, step_triton as _lin_step_triton, \
    walks_gluon as _lin_walks_gluon
from .ttt_mlp import chunk as _mlp_chunk, chunk_blocked as _mlp_blocked, dual as _mlp_dual, \
    step_triton as _mlp_step_triton

GROUP = 8  # mini-batches between weight checkpoints of the forward (the backward recomputes within)
# TTT-MLP kernel pairs: ttt_mlp/chunk.py (weights in registers), chunk_blocked.py (F in column blocks),
# chunk_smem.py (weights in shared memory, wgmma, Hopper; the default in 16 bits there at head dims 64 and 128)
MLP_IMPLS = ("regs", "blocked", "smem")
MLP_MAX_D = 64  # the register kernels hold W1 and W2 on chip up to this head dim


def default_mlp_impl(d: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None,
                     mini_batch: int = 16, grad: bool = False) -> str:
    """The TTT-MLP kernel pair used when none is named, by what was measured (H200, B16 T2k, D 2048; forward /
    forward+backward ms, docs/kernels_notes.md): with 16-bit inputs and b = 16 on a Hopper GPU, "smem" at head
    dims 64 and 128 (d 64: 4.5 / 35.7 against the register pair's 7.0 / 79.5 and the F-blocked pair's 8.4 / 65.8;
    d 128: 11.6 / 105.7 against the F-blocked pair's 20.5 / 129.3); with gradients in fp32 on a GPU, "blocked" (F
    walked in column blocks): the register backward in fp32 spills 22 KB of stack per thread and compiles for
    116 s, the blocked one for 31 s (offline sm_90, d 64, 8 warps); otherwise "regs" up to MLP_MAX_D and "blocked"
    above. Packed documents (cu_seqlens) take the same pair: every pair walks them (the smem pair once did not, and
    packed calls fell to "regs": one full-length document of 8k tokens trained in 47.2 ms against the plain call's
    29.2, H200, bf16, H 12 x d 64, benchmarks/bench_packed.py)."""
    if (d in (64, 128) and dtype in (torch.bfloat16, torch.float16) and mini_batch == 16
            and device is not None and _smem_runs_on(device)):  # 16: the smem pair's mini-batch (its MB)
        return "smem"
    if grad and dtype == torch.float32 and device is not None and device.type == "cuda":
        return "blocked"  # (the interpreter on the CPU compiles nothing: the register pair there, as before)
    return "regs" if d <= MLP_MAX_D else "blocked"


@torch.compiler.assume_constant_result  # a compiled model asks it while tracing, once (no trace of the cache)
def _smem_runs_on(device: torch.device) -> bool:
    """Whether the smem pair can run on `device`: a Hopper GPU (sm_90: its wgmma) and a Triton with Gluon. Asked on
    every TTT-MLP call that picks its kernels by default, so answered once per device. (Two functions: Dynamo
    traces into an lru_cache wrapper even when it is marked constant, and warns.)"""
    return _smem_runs_on_cached(device)


@functools.cache
def _smem_runs_on_cached(device: torch.device) -> bool:
    if not hopper(device):
        return False
    try:
        _mlp_module("smem")
    except ValueError:  # no Gluon in this Triton: the next choice
        return False
    return True


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
    """How TTT-Linear runs in the kernels. fwd: the forward ("auto" picks by size, "fused" | "split" |
    "fused_gluon" | "split_gluon", "auto_gluon" picks between those two, see `ttt_linear/chunk.py`'s `fwd`);
    bwd: the backward's chain ("split" picks by size, "split_lean" | "split_full", see `ttt_linear/chunk.py`;
    "split_gluon": the pre pass, the full chain and the post pass in Gluon; "auto", the default: "split_gluon"
    where those kernels take the shapes on a Hopper GPU, else "split", `chunk.bwd_impl`); the Gluon kernels
    (`ttt_linear/walks_gluon.py`) take head dim 64 or 128, mini-batch 16, 16-bit inputs and 4 or 8 warps (by
    default their own, `walks_gluon.launch`; `RunOptions.linear_gluon` asks for them in a model); group:
    mini-batches per weight checkpoint; dot_mode: the products' operand precision (None: by input dtype); fwd_warps:
    None for the default; bwd_warps: None, or (pre, chain, post), the backward's passes in whichever kernels run;
    bwd_segments: the time segments of the backward's pipelined launch (None: by size); bwd_scratch: the dtype of
    the backward's scratch rows between its passes, "fp32" or "bf16" (None: bf16 for bf16 inputs, else fp32;
    `ttt_linear/bwd_split.py`'s `scratch_dtype`)."""

    bwd: str = "auto"
    group: int = GROUP
    fwd: str = "auto"
    dot_mode: int | None = None
    fwd_warps: int | None = None
    bwd_warps: tuple | None = None
    bwd_segments: int | None = None
    bwd_scratch: str | None = None

    def __post_init__(self):
        _lin_bwd_split.scratch_dtype(self.bwd_scratch)
        if self.bwd not in _lin_chunk.BWD_IMPLS:
            raise ValueError(f"LinearKernels.bwd: expected one of {_lin_chunk.BWD_IMPLS}, got {self.bwd!r}")
        if self.fwd not in _lin_chunk.FWD_IMPLS:
            raise ValueError(f"LinearKernels.fwd: expected one of {_lin_chunk.FWD_IMPLS}, got {self.fwd!r}")

    def check(self, d: int, mini_batch: int, dtype: torch.dtype) -> None:
        """Every head dim runs (padded to a power of two), with and without packed documents; the Gluon kernels
        only what they are written for (a one-line error): the backward's choice is checked here, so that it fails
        before the forward runs; the forward's where it launches (`ttt_linear/chunk.py`'s `fwd`)."""
        if self.bwd == "split_gluon":
            _lin_walks_gluon.check(d, mini_batch, dtype, self.dot_mode)
            for w in self.bwd_warps or ():
                _lin_walks_gluon.check_warps(w, "LinearKernels.bwd_warps")

    def body(self, x: TTTInputs, params, rows: Rows, save: bool):
        """The rows' mini-batches from `params` (one per row) with zero accumulators: (o, final params, fp32)."""
        outs = _lin_fwd_op(x.q, x.k, x.v, x.lr, x.tau, x.ln_weight, x.ln_bias, *_f32(params), *_rows_args(rows),
                           x.mini_batch, self.group, save, -1 if self.dot_mode is None else self.dot_mode,
                           self.fwd_warps or 0, self.fwd, self.bwd, list(self.bwd_warps or ()), self.bwd_segments or 0,
                           self.bwd_scratch or "")
        return outs[0], outs[1:3]

    def step(self, x: TTTInputs, state: TTTState):
        return _lin_step_triton.forward(x, state)


@dataclass(frozen=True)
class MLPKernels:
    """How TTT-MLP runs in the kernels. impl: the kernel pair (MLP_IMPLS; None: `default_mlp_impl`, per call; "smem":
    head dim 64 / 128, mini-batch 16, 16-bit inputs, Hopper); warps: its warps per program (None: the kernel
    module's default); group: mini-batches per weight checkpoint; keep: in training, the smem forward also keeps
    every mini-batch's 16-bit start weights for the backward, which then recomputes none (faster; memory: 4 F d
    bytes per (row, head, mini-batch), `chunk_smem.fwd`); the other pairs ignore it;
    step_block_f, step_warps: the decode step kernel's F block width and warps (None: its defaults)."""

    impl: str | None = None
    warps: int | None = None
    group: int = GROUP
    keep: bool = False
    step_block_f: int | None = None
    step_warps: int | None = None

    def __post_init__(self):
        if self.impl is not None and self.impl not in MLP_IMPLS:
            raise ValueError(f"mlp_impl: expected None or one of {MLP_IMPLS}, got {self.impl!r}")

    def check(self, d: int, mini_batch: int, dtype: torch.dtype) -> None:
        """The head dim d the chosen kernels take (every pair takes packed documents); a one-line error."""
        if self.impl == "regs" and d > MLP_MAX_D:
            raise ValueError(f"mlp_impl: 'regs' holds the weights in registers only up to head dim {MLP_MAX_D}, "
                             f"got head dim {d}")
        if self.impl == "smem" and d not in _mlp_module("smem").HEAD_DIMS:
            raise ValueError(f"mlp_impl: 'smem' is written for head dim 64 or 128, got head dim {d}")

    def body(self, x: TTTInputs, params, rows: Rows, save: bool):
        """The rows' mini-batches from `params` (one per row) with zero accumulators: (o, final params, fp32)."""
        impl = self.impl or default_mlp_impl(x.q.shape[-1], x.q.dtype, x.q.device, x.mini_batch, save)
        if impl == "smem":
            return self._smem_body(x, params, rows, save)
        none = x.q.new_empty(0, dtype=torch.int32)
        outs = _mlp_fwd_op(x.q, x.k, x.v, x.lr, x.tau, x.ln_weight, x.ln_bias, *_f32(params), *_rows_args(rows),
                           x.mini_batch, self.group, save, False, impl, self.warps or 0, none, none)
        return outs[0], outs[1:5]

    def _smem_body(self, x: TTTInputs, params, rows: Rows, save: bool):
        """`body` in the smem kernels: every row's whole mini-batches in one launch (the rows of a batch, or the
        documents of a packed sequence, one (row, head) pair at a time per group of programs), then every row's
        partial last mini-batch (r = its length % b tokens; the kernels leave its start weights uncommitted, as the
        row kernels do) in the dual form from the weights the kernels reach; the tokens before the rows' first
        ones are left for the caller (unwritten here)."""
        B, T, H, d = x.q.shape
        b = x.mini_batch
        _mlp_module("smem").check(d, b, x.q.dtype)
        sched = _smem_schedules(x, rows, H, d)
        fin = _mlp_fwd_op(x.q, x.k, x.v, x.lr, x.tau, x.ln_weight, x.ln_bias, *_f32(params), *_rows_args(rows), b,
                          self.group, save, self.keep and save, "smem", self.warps or 0, *sched)
        o, params = fin[0], tuple(fin[1:5])
        tails = [n % b for n in rows.lengths]
        if not any(tails):
            return o, params
        # the tails on windows of b slots (empty slots: zero tokens with lr 0), one piece of the dual form for all rows
        # that have one, the same way with and without cu_seqlens (one full-length document: the plain call's bits)
        ct = compute_dtype(x.q)
        gam, bet = ln_operands(x, ct)
        if x.packing is None:  # every row's last r tokens
            r = tails[0]
            q, k, v, lr = _last_tokens((x.q, x.k, x.v, x.lr), r, b)
            pc = params
        else:
            win, rows_t, flat, tok = _packed_tails(x.packing, tails, b, x.q.device, memo=rows.covered)
            q, k, v, lr = (win.gather(t[0]) for t in (x.q, x.k, x.v, x.lr))  # [R,b,H,d], [R,b,H]
            pc = tuple(p.index_select(0, rows_t) for p in params)  # the rows with a tail
        q, k, v = (t.to(ct).transpose(1, 2) for t in (q, k, v))  # [R,b,H,d] -> [R,H,b,d]
        lr = lr.to(ct).transpose(1, 2)  # [R,b,H] -> [R,H,b]
        pc = tuple(p.to(ct) for p in pc)
        o_t, _acc = _mlp_dual.piece(q, k, v, lr, x.tau.to(ct), gam, bet, pc, tuple(torch.zeros_like(p) for p in pc))
        o_t = o_t.transpose(1, 2).to(o.dtype)  # [R,b,H,d]
        if x.packing is None:
            return torch.cat([o[:, :T - r], o_t[:, :r]], 1), params
        return o.index_copy(1, tok, o_t.reshape(-1, H, d).index_select(0, flat)[None]), params  # the filled slots

    def step(self, x: TTTInputs, state: TTTState):
        return _mlp_step_triton.forward(x, state, block_f=self.step_block_f, num_warps=self.step_warps)


def _last_tokens(ts, r: int, b: int) -> tuple:
    """Every row's last r tokens of each t [B, T, ...], zero-padded to b slots: [B, b, ...] (a partial last
    mini-batch on a window of b slots)."""
    return tuple(F.pad(t[:, -r:], (0, 0) * (t.dim() - 2) + (0, b - r)) for t in ts)


def _smem_schedules(x: TTTInputs, rows: Rows, H: int, d: int) -> tuple:
    """The smem launches' schedules (`chunk_smem.schedules`: forward, backward) as int32 tensors on the device, empty
    where the plain walk is used (always for the rows of a batch: equal lengths); built once per packing for the
    usual packed call (rows without heads)."""
    none = x.q.new_empty(0, dtype=torch.int32)
    if not rows.packed:
        return none, none

    def make():
        parts = _mlp_module("smem").schedules([n // x.mini_batch for n in rows.lengths], H, d, x.q.device)
        if not any(parts):
            return none, none
        n0 = len(parts[0] or ())
        t = upload([*(parts[0] or ()), *(parts[1] or ())], torch.int32, x.q.device)
        return t[:n0], t[n0:]

    key = ("smem_schedules", x.mini_batch, rows.group, H, d)
    return x.packing.memoize(key, make) if rows.covered else make()


def _packed_tails(pk, tails, b: int, device, memo: bool):
    """The partial last mini-batches of packed rows (tails[i]: row i's tokens past its whole mini-batches, up to
    document i's end): the rows that have one (int64 [R]), a `Window` [R, b] of their tokens, and the filled
    slots' flat indices in [R * b] and tokens along T (int64 [n] each). memo: built once per packing (the rows
    without heads)."""
    def make():
        docs = [i for i, r in enumerate(tails) if r]
        ends = [pk.bounds[i + 1] for i in docs]
        first = [e - tails[i] for e, i in zip(ends, docs)]
        flat = [j * b + s for j, i in enumerate(docs) for s in range(tails[i])]
        tok = [f + s for f, i in zip(first, docs) for s in range(tails[i])]
        idx = upload(docs + flat + tok, torch.int64, device)
        R, n = len(docs), len(flat)
        return Window.of(first, first, ends, b, device), idx[:R], idx[R:R + n], idx[R + n:]

    return pk.memoize(("smem_tails", b), make) if memo else make()


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
        self.kernels.check(x.q.shape[-1], x.mini_batch, x.q.dtype)
        B, T = x.q.shape[:2]
        pk, b = x.packing, x.mini_batch
        if pk is None and T == 1:
            if _needs_grad(x.q, x.k, x.v, x.lr, x.tau, x.ln_weight, x.ln_bias, *state.params, *state.accum):
                return self.ref.step(x, state)
            return self.kernels.step(x, state)
        lengths = [T] * B if pk is None else pk.lengths
        starts = [state.pos] * B if pk is None else pk.row_positions(state.pos)
        # the tokens that finish a begun mini-batch (or the whole first one, for a gradient of a zero accumulator)
        first = b if any(a.requires_grad for a in state.accum) else 0
        heads = [min(n, (-p) % b or first) for n, p in zip(lengths, starts)]
        end = end_pos(x, state)
        o_head = None
        if any(heads):
            o_head, index, state = self._heads(x, state, heads)
        rest = [n - h for n, h in zip(lengths, heads)]
        if not any(rest):
            return o_head, TTTState(state.kind, state.params, state.accum, end)
        group, dev = self.kernels.group, x.q.device
        if pk is None:
            rows = batch_rows(B, T, b, group, dev, start=heads[0])
        elif any(heads):
            rows = document_rows(pk.bounds, b, group, heads=heads, device=dev)
        else:  # the usual packed call: built once per packing (the layers of a model share it)
            rows = pk.memoize(("ttt_rows", b, group), lambda: document_rows(pk.bounds, b, group, cu=pk.cu_seqlens))
        save = _needs_grad(x.q, x.k, x.v, x.lr, x.tau, x.ln_weight, x.ln_bias, *state.params)
        o, params = self.kernels.body(x, state.params, rows, save)
        params = tuple(p.to(s.dtype) for p, s in zip(params, state.params))
        accum = self._tail_accum(x, params, state, heads, rest)
        if o_head is not None:
            o = o.index_copy(1, index, o_head)  # the head tokens' outputs (the kernels left them unwritten)
        return o, TTTState(state.kind, params, accum, end)

    def _heads(self, x: TTTInputs, state: TTTState, heads):
        """Run every row's head (its first heads[n] tokens) in the dual form: (their outputs, their token indices
        along T, the state after them)."""
        pk, dev = x.packing, x.q.device
        if pk is None:
            o, st = self.ref.dual(x.tokens(0, heads[0]), state)
            return o, torch.arange(heads[0], device=dev), st
        docs = [i for i, h in enumerate(heads) if h]
        index = upload(torch.cat([torch.arange(pk.bounds[i], pk.bounds[i] + heads[i]) for i in docs]), torch.int64, dev)
        cu = torch.tensor([0] + [heads[i] for i in docs]).cumsum(0)
        o, st = self.ref.dual(x.select(index, cu), rows_of(state, docs))
        idx = upload(docs, torch.int64, dev)
        pos = list(pk.row_positions(state.pos))
        for i, p in zip(docs, st.pos):
            pos[i] = p
        merged = TTTState(state.kind, tuple(a.index_copy(0, idx, b) for a, b in zip(state.params, st.params)),
                          tuple(a.index_copy(0, idx, b) for a, b in zip(state.accum, st.accum)), tuple(pos))
        return o, index, merged

    def _tail_accum(self, x: TTTInputs, params, state: TTTState, heads, rest):
        """The accumulators after the kernels: a row ending in a partial mini-batch (r = rest % b of its tokens in
        it) gets the gated gradients of those r tokens at the start weights the kernels returned, computed for every
        row on a window of b slots (r filled; a row with r = 0 gets exactly zero), the same way with and without
        cu_seqlens; a row the kernels had no tokens of keeps its accumulators."""
        b, pk = x.mini_batch, x.packing
        tails = [r % b for r in rest]
        if not any(tails):
            accum = tuple(torch.zeros_like(p) for p in params)
        else:
            if pk is None:  # every row's last r tokens, padded to b slots
                r = tails[0]
                k, v, lr = _last_tokens((x.k, x.v, x.lr), r, b)
            else:
                first = [e - r for e, r in zip(pk.bounds[1:], tails)]
                make = lambda: Window.of(first, first, pk.bounds[1:], b, x.q.device)  # noqa: E731
                win = make() if any(heads) else pk.memoize(("ttt_tails", b), make)
                k, v, lr = (win.gather(t[0]) for t in (x.k, x.v, x.lr))  # [N,b,H,d], [N,b,H]
            ct = compute_dtype(x.q)
            gam, bet = ln_operands(x, ct)
            k, v = (t.to(ct).transpose(1, 2) for t in (k, v))  # [R,b,H,d] -> [R,H,b,d]
            lr = lr.to(ct).transpose(1, 2)  # [R,b,H] -> [R,H,b]: zero on the empty slots
            pc = tuple(p.to(ct) for p in params)  # a state in a narrower dtype (a bf16 initial state) computes in ct
            accum = self.ref.add_grads(tuple(torch.zeros_like(p) for p in pc), k, lr, self.ref.grads(k, v, pc, gam, bet))
            accum = tuple(a.to(p.dtype) for a, p in zip(accum, params))  # in the dtype of the params returned
        if all(rest):
            return accum
        keep = upload([r == 0 for r in rest], torch.bool, x.q.device)  # rows finished in their heads
        return tuple(torch.where(keep.view(-1, *[1] * (a.dim() - 1)), s, a) for s, a in zip(state.accum, accum))


# ---- torch.library custom ops: torch.compile traces through these without a graph break ----
# Each kernel launch is one op with a fake (meta) implementation; the forward ops' autograd formulas call
# the backward ops. `save` (whether checkpoints are written for a backward) is decided by the caller,
# since a custom op's body does not see whether its inputs require grad; without it the checkpoint
# outputs are empty tensors. The rows (`triton_utils.Rows`) travel as their fields (span, packed, nmb, slots,
# covered).
def _rows_args(rows: Rows) -> tuple:
    return rows.span, rows.packed, rows.nmb, rows.slots, rows.covered


@torch.library.custom_op("ttt::linear_chunk_fwd", mutates_args=())
def _lin_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor, tau: torch.Tensor,
                ln_weight: torch.Tensor, ln_bias: torch.Tensor, W0: torch.Tensor, c0: torch.Tensor,
                span: torch.Tensor, packed: bool, nmb: int, slots: int, covered: bool,
                mini_batch: int, group: int, save: bool, dot_mode: int, fwd_warps: int, fwd_impl: str,
                bwd_impl: str, bwd_warps: list[int], bwd_segments: int, bwd_scratch: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _same_strides(q, k, v)
    o, wT, cT, ck = _lin_chunk.fwd(q, k, v, lr, tau, ln_weight, ln_bias, W0, c0,
                                   mini_batch, group, save, dot_mode=None if dot_mode < 0 else dot_mode,
                                   warps=fwd_warps or None, rows=Rows(span, packed, nmb, slots, covered, group),
                                   impl=fwd_impl)
    if ck is None:
        ck = (q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32))
    return o, wT, cT, *ck


@_lin_fwd_op.register_fake
def _(q, k, v, lr, tau, ln_weight, ln_bias, W0, c0, span, packed, nmb, slots, covered, mini_batch, group, save,
      dot_mode, fwd_warps, fwd_impl, bwd_impl, bwd_warps, bwd_segments, bwd_scratch):
    H, d = q.shape[2:]
    ck = ((q.new_empty((slots, H, d, d), dtype=torch.float32), q.new_empty((slots, H, d), dtype=torch.float32))
          if save else (q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32)))
    return torch.empty_like(q, memory_format=torch.contiguous_format), W0.new_empty(W0.shape), \
        c0.new_empty(c0.shape), *ck


@torch.library.custom_op("ttt::linear_chunk_bwd", mutates_args=())
def _lin_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor, tau: torch.Tensor,
                ln_weight: torch.Tensor, ln_bias: torch.Tensor, ckw: torch.Tensor, ckc: torch.Tensor,
                do: torch.Tensor, dwT: torch.Tensor | None, dcT: torch.Tensor | None,
                span: torch.Tensor, packed: bool, nmb: int, slots: int, covered: bool, mini_batch: int,
                group: int, dot_mode: int, impl: str, warps: list[int], segments: int,
                scratch: str) -> list[torch.Tensor]:
    """dq, dk, dv, dW0, dc0 and the partial sums of dlr, dtau, dln_w, dln_b (`_lin_backward` adds them up). dwT and
    dcT both None: the final state has no gradient (the chain starts from zeros without reading any)."""
    q, k, v = _same_strides(q, k, v)
    dwT, dcT = (None if t is None else t.float() for t in (dwT, dcT))
    dq, dk, dv, dw0, dc0, parts = _lin_chunk.bwd_parts(
        q, k, v, lr, tau, ln_weight, ln_bias, (ckw, ckc), do, dwT, dcT, mini_batch, group,
        dot_mode=None if dot_mode < 0 else dot_mode, impl=impl, warps=tuple(warps) or None,
        segments=segments or None, rows=Rows(span, packed, nmb, slots, covered, group), scratch=scratch or None)
    return [dq, dk, dv, dw0, dc0, *parts]


@_lin_bwd_op.register_fake
def _(q, k, v, lr, tau, ln_weight, ln_bias, ckw, ckc, do, dwT, dcT, span, packed, nmb, slots, covered, mini_batch,
      group, dot_mode, impl, warps, segments, scratch):
    B, T, H, d = q.shape
    N = span.shape[0]
    nck = cdiv(nmb, group)
    SR, BT, BD = (H if packed else B * H), tile(mini_batch), tile(d)
    e = lambda *s: q.new_empty(s, dtype=torch.float32)  # noqa: E731
    ng = N * H * nck  # rows of the partial sums: one per (row, head, group)
    return [q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), e(N, H, d, d), e(N, H, d),
            e(SR, T), e(SR, T), e(2, ng, BT), e(4, ng, BD)]


def _lin_setup(ctx, inputs, output):
    (q, k, v, lr, tau, lnw, lnb, W0, c0, span, packed, nmb, slots, covered, mini_batch, group, save, dot_mode,
     fwd_warps, fwd_impl, bwd_impl, bwd_warps, bwd_segments, bwd_scratch) = inputs
    ctx.save_for_backward(q, k, v, lr, tau, lnw, lnb, output[3], output[4], span)
    ctx.set_materialize_grads(False)  # an output without a gradient reaches `_lin_backward` as None, not zeros
    ctx.meta = (packed, nmb, slots, covered, mini_batch, group, save, dot_mode, bwd_impl, bwd_warps, bwd_segments,
                bwd_scratch)
    ctx.rows = W0.shape[0]


def _lin_backward(ctx, do, dwT, dcT, _dckw, _dckc):
    q, k, v, lr, tau, lnw, lnb, ckw, ckc, span = ctx.saved_tensors
    (packed, nmb, slots, covered, mini_batch, group, save, dot_mode, bwd_impl, bwd_warps, bwd_segments,
     bwd_scratch) = ctx.meta
    if not save:
        raise RuntimeError("ttt::linear_chunk_fwd ran with save=False: no checkpoints for a backward")
    H, d = q.shape[2:]
    N = ctx.rows
    do = torch.zeros_like(q) if do is None else do.contiguous()
    if (dwT is None) != (dcT is None):  # a gradient of one of the final state's two: the other's zeros
        dwT = q.new_zeros((N, H, d, d), dtype=torch.float32) if dwT is None else dwT
        dcT = q.new_zeros((N, H, d), dtype=torch.float32) if dcT is None else dcT
    dq, dk, dv, dw0, dc0, *parts = _lin_bwd_op(q, k, v, lr, tau, lnw, lnb, ckw, ckc, do, dwT, dcT, span, packed,
                                               nmb, slots, covered, mini_batch, group, dot_mode, bwd_impl,
                                               bwd_warps, bwd_segments, bwd_scratch)
    dlr, dtau, dlnw, dlnb = _lin_bwd_split.sums(parts, q.shape[0], H, mini_batch, d, N)
    return (dq, dk, dv, dlr.to(lr.dtype), dtau.to(tau.dtype), dlnw.to(lnw.dtype), dlnb.to(lnb.dtype), dw0, dc0,
            None, None, None, None, None, None, None, None, None, None, None, None, None, None, None)


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
                W2: torch.Tensor, c2: torch.Tensor, span: torch.Tensor, packed: bool, nmb: int, slots: int,
                covered: bool, mini_batch: int, group: int, save: bool, keep: bool, impl: str, warps: int,
                sched_fwd: torch.Tensor, sched_bwd: torch.Tensor) -> list[torch.Tensor]:
    q, k, v = _same_strides(q, k, v)
    ps = tuple(p.contiguous() for p in (W1, c1, W2, c2))
    extra = dict(sched=sched_fwd, keep=keep) if impl == "smem" else {}
    o, fin, ck = _mlp_module(impl).fwd(q, k, v, lr, tau, ln_weight, ln_bias, ps, mini_batch, group, save,
                                       num_warps=warps or None, rows=Rows(span, packed, nmb, slots, covered, group),
                                       **extra)
    # always nine saved tensors: the four checkpoints, the smem pair's sums (Z2, Z2b, X2b X2^T) and the start weights
    # it kept (`keep`), empty where not made
    ck = tuple(ck or ())
    ck = ck + tuple(q.new_empty(0, dtype=torch.float32) for _ in range(9 - len(ck)))
    return [o, *fin, *ck]


@_mlp_fwd_op.register_fake
def _(q, k, v, lr, tau, ln_weight, ln_bias, W1, c1, W2, c2, span, packed, nmb, slots, covered, mini_batch, group,
      save, keep, impl, warps, sched_fwd, sched_bwd):
    H, d = q.shape[2:]
    F = W1.shape[-1]
    if save:
        smem = impl == "smem"  # its W1 checkpoints transposed [F, d]; its sums: Z2, Z2b [B,T,H,d], X2b X2^T [B,T,H,16]
        ck = [q.new_empty((slots, H, *(s[::-1] if smem and i == 0 else s)), dtype=torch.float32)
              for i, s in enumerate(_MLP_SHAPES(d, F))]
        ck += [q.new_empty(q.shape if smem else (0,), dtype=torch.float32) for _ in range(2)]
        ck.append(q.new_empty((*q.shape[:3], mini_batch) if smem else (0,), dtype=torch.float32))
        if keep and smem:
            ck += [q.new_empty((slots * group, H, 2, F, d)), q.new_empty((slots * group, H, F + d), dtype=torch.float32)]
        else:
            ck += [q.new_empty(0, dtype=torch.float32) for _ in range(2)]
    else:
        ck = [q.new_empty(0, dtype=torch.float32) for _ in range(9)]
    return [torch.empty_like(q, memory_format=torch.contiguous_format),
            *(torch.empty_like(p) for p in (W1, c1, W2, c2)), *ck]


@torch.library.custom_op("ttt::mlp_chunk_bwd", mutates_args=())
def _mlp_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor, tau: torch.Tensor,
                ln_weight: torch.Tensor, ln_bias: torch.Tensor, ck1: torch.Tensor, ckc1: torch.Tensor,
                ck2: torch.Tensor, ckc2: torch.Tensor, z2: torch.Tensor, zb: torch.Tensor, s2: torch.Tensor,
                kw: torch.Tensor, kc: torch.Tensor, do: torch.Tensor, dW1: torch.Tensor,
                dc1: torch.Tensor, dW2: torch.Tensor, dc2: torch.Tensor, span: torch.Tensor, packed: bool, nmb: int,
                slots: int, covered: bool, mini_batch: int, group: int, impl: str, warps: int,
                sched: torch.Tensor) -> list[torch.Tensor]:
    q, k, v = _same_strides(q, k, v)
    extra = dict(sched=sched) if impl == "smem" else {}
    # z2, zb, s2: the smem pair's saved sums; kw, kc: the start weights its forward kept (else empty)
    ckpt = (ck1, ckc1, ck2, ckc2) + (((z2, zb, s2) + ((kw, kc) if kw.numel() else ())) if impl == "smem" else ())
    dq, dk, dv, dlr, dtau, dlnw, dlnb, dps = _mlp_module(impl).bwd(
        q, k, v, lr, tau, ln_weight, ln_bias, ckpt, do, (dW1, dc1, dW2, dc2), mini_batch, group,
        num_warps=warps or None, rows=Rows(span, packed, nmb, slots, covered, group), **extra)
    return [dq, dk, dv, dlr, dtau, dlnw, dlnb, *dps]


@_mlp_bwd_op.register_fake
def _(q, k, v, lr, tau, ln_weight, ln_bias, ck1, ckc1, ck2, ckc2, z2, zb, s2, kw, kc, do, dW1, dc1, dW2, dc2, span,
      packed, nmb, slots, covered, mini_batch, group, impl, warps, sched):
    B, T, H, d = q.shape
    F = ckc1.shape[-1]  # (c1's checkpoints: W1's are transposed in the smem pair's)
    N = dW1.shape[0]
    e = lambda *s: q.new_empty(s, dtype=torch.float32)  # noqa: E731
    return [q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), e(B, T, H), e(mini_batch),
            e(H, d), e(H, d), *(e(N, H, *s) for s in _MLP_SHAPES(d, F))]


def _mlp_setup(ctx, inputs, output):
    (q, k, v, lr, tau, lnw, lnb, W1, c1, W2, c2, span, packed, nmb, slots, covered, mini_batch, group, save, _keep,
     impl, warps, _sched_fwd, sched_bwd) = inputs
    ctx.save_for_backward(q, k, v, lr, tau, lnw, lnb, *output[5:14], span, sched_bwd)
    ctx.meta = (packed, nmb, slots, covered, mini_batch, group, save, impl, warps)
    ctx.rows = W1.shape[0]


def _mlp_backward(ctx, grads):
    q, k, v, lr, tau, lnw, lnb, *ck, span, sched = ctx.saved_tensors
    packed, nmb, slots, covered, mini_batch, group, save, impl, warps = ctx.meta
    if not save:
        raise RuntimeError("ttt::mlp_chunk_fwd ran with save=False: no checkpoints for a backward")
    H, d = q.shape[2:]
    F = ck[1].shape[-1]  # (c1's checkpoints [.., F]; W1's are [.., d, F], or [.., F, d] from the smem pair)
    do = grads[0]
    do = torch.zeros_like(q) if do is None else do.contiguous()
    dfin = [q.new_zeros((ctx.rows, H, *s), dtype=torch.float32) if g is None else g.float()
            for g, s in zip(grads[1:5], _MLP_SHAPES(d, F))]
    dq, dk, dv, dlr, dtau, dlnw, dlnb, *dps = _mlp_bwd_op(q, k, v, lr, tau, lnw, lnb, *ck, do, *dfin, span, packed,
                                                          nmb, slots, covered, mini_batch, group, impl, warps, sched)
    return (dq, dk, dv, dlr.to(lr.dtype), dtau.to(tau.dtype), dlnw.to(lnw.dtype), dlnb.to(lnb.dtype), *dps,
            None, None, None, None, None, None, None, None, None, None, None, None, None)


_mlp_fwd_op.register_autograd(_mlp_backward, setup_context=_mlp_setup)
