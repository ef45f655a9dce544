"""Shared helpers of the tests (imported as `from conftest import random_inputs`): random, non-trivial
inputs for one TTT op call, and a runner; and (`cli`, `one_line_error`) the command line run in-process.

Non-trivial on purpose: LN weight != 1 and bias != 0, lr random in (0, 1), tau from a random delta,
random initial weights W0/b0 (per head, broadcast with `TTTState.initial`), and optionally a start
in the middle of a mini-batch with a non-zero pending accumulator.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ttt.ops import TTTInputs, TTTState, make_tau, ttt_op

_aten = torch.ops.aten


def _sliced_reduce(self, input):
    """Triton's interpreter's reduction with a combine function of its own (not a plain sum, min or max: the
    kernels' tuple sums, `triton_utils._add2` / `_add3`), one combine call per slice along the axis instead of one per
    element: the same combines in the same order, on whole slices (the per-element loop made the Triton CPU tests
    twice as slow). Installed by `pytest_collection_finish`."""
    original_axis = self.axis
    input, axis = self.unravel(input, self.axis)
    datas = [t.handle.data for t in input]
    acc = [np.take(d, 0, axis=axis) for d in datas]
    for i in range(1, datas[0].shape[axis]):
        r = self.combine_fn.fn(*(self.to_tensor(a, t.dtype) for a, t in zip(acc, input)),
                               *(self.to_tensor(np.take(d, i, axis=axis), t.dtype) for d, t in zip(datas, input)))
        acc = [np.asarray(x.handle.data, dtype=d.dtype).reshape(a.shape)
               for x, d, a in zip(r if isinstance(r, tuple) else (r,), datas, acc)]
    out = []
    for data, t in zip(acc, input):
        if self.keep_dims:
            data = np.expand_dims(data, axis) if original_axis is not None else data.reshape([1] * len(t.shape))
        elif original_axis is None:
            data = data.item()
        out.append(self.to_tensor(data, t.dtype))
    return out


def pytest_collection_finish(session):
    """The test modules have imported Triton (with TRITON_INTERPRET set where there is no GPU): speed up its
    interpreter's generic reduction (`_sliced_reduce`)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    if interpreter.ReduceOps.generic_reduce is not _sliced_reduce:
        interpreter.ReduceOps.original_generic_reduce = interpreter.ReduceOps.generic_reduce  # (its test compares)
        interpreter.ReduceOps.generic_reduce = _sliced_reduce


class PoisonTorch:
    """Stands in for `torch` inside a kernel module (tests monkeypatch it in): every buffer it allocates
    starts as NaN, so an element a kernel forgets to write shows up in the comparison."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return torch.empty(*args, **kwargs).fill_(float("nan"))

    @staticmethod
    def empty_like(*args, **kwargs):
        return torch.empty_like(*args, **kwargs).fill_(float("nan"))


class RoundProducts(TorchDispatchMode):
    """Inside it, every matrix product (forward and autograd's backward alike) rounds its two operands to `dtype`
    and computes in theirs (fp32): the rounding of a 16-bit kernel's tensor-core products, given to a PyTorch
    reference that otherwise computes in fp32. A product it does not know raises, so none passes unrounded."""

    MM = (_aten.mm.default, _aten.bmm.default)
    ADD_MM = (_aten.addmm.default, _aten.baddbmm.default)
    OTHER = (_aten.mm, _aten.bmm, _aten.addmm, _aten.baddbmm, _aten.matmul, _aten.dot, _aten.mv, _aten.addmv,
             _aten.addbmm, _aten.convolution)

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.rounded = 0  # the products rounded so far

    def _round(self, t):
        return t.to(self.dtype).to(t.dtype)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.MM:
            args = (self._round(args[0]), self._round(args[1]))
            self.rounded += 1
        elif func in self.ADD_MM:
            args = (args[0], self._round(args[1]), self._round(args[2]), *args[3:])
            self.rounded += 1
        elif func.overloadpacket in self.OTHER:
            raise NotImplementedError(f"RoundProducts: {func} is a product it does not round")
        return func(*args, **kwargs)


def inner_shapes(kind: str, d: int):
    """Per-head shapes of the inner weights, in `TTTState.params` order."""
    F = 4 * d
    return [(d, d), (d,)] if kind == "linear" else [(d, F), (F,), (F, d), (d,)]


@dataclass
class OpInputs:
    kind: str
    q: torch.Tensor  # [B,T,H,d]
    k: torch.Tensor
    v: torch.Tensor
    lr: torch.Tensor  # [B,T,H]
    delta: torch.Tensor  # [b]; tau = make_tau(delta)
    ln_weight: torch.Tensor  # [H,d]
    ln_bias: torch.Tensor
    init: tuple  # per-head initial weights [H, ...] (the learnable W0/b0)
    accum: tuple | None  # [B,H,...] pending accumulators of the start state (None: fresh start)
    pos: int
    mini_batch: int

    @property
    def tau(self):
        return make_tau(self.delta)

    def state(self) -> TTTState:
        st = TTTState.initial(self.kind, self.init, self.q.shape[0], dtype=self.q.dtype)
        return st if self.accum is None else replace(st, accum=self.accum, pos=self.pos)

    def leaves(self) -> dict:
        """Every input tensor, by name (the ones gradients are checked against)."""
        out = dict(q=self.q, k=self.k, v=self.v, lr=self.lr, delta=self.delta, ln_weight=self.ln_weight,
                   ln_bias=self.ln_bias)
        out.update({f"init{i}": p for i, p in enumerate(self.init)})
        out.update({f"accum{i}": a for i, a in enumerate(self.accum or ())})
        return out

    def with_leaves(self, leaves: dict) -> "OpInputs":
        """A copy whose tensors are taken from `leaves` (same names as `leaves()`)."""
        init = tuple(leaves[f"init{i}"] for i in range(len(self.init)))
        accum = None if self.accum is None else tuple(leaves[f"accum{i}"] for i in range(len(self.accum)))
        plain = {n: leaves[n] for n in ("q", "k", "v", "lr", "delta", "ln_weight", "ln_bias")}
        return replace(self, init=init, accum=accum, **plain)

    def inputs(self, start=0, stop=None) -> TTTInputs:
        """The op's inputs (`TTTInputs`) of tokens [start, stop)."""
        return TTTInputs(self.q, self.k, self.v, self.lr, self.tau, self.ln_weight, self.ln_bias).tokens(start, stop)

    def run(self, backend="dual", start=0, stop=None, state=None):
        """The op on tokens [start, stop), from `state` (default: the start state)."""
        s = slice(start, stop)
        return ttt_op(self.kind, self.q[:, s], self.k[:, s], self.v[:, s], self.lr[:, s], self.tau,
                      self.ln_weight, self.ln_bias, self.state() if state is None else state,
                      mini_batch=self.mini_batch, backend=backend)


def random_inputs(kind, *, B=2, T=7, H=2, d=4, b=3, pos=0, dtype=torch.float64, seed=0,
                  requires_grad=False) -> OpInputs:
    """pos > 0 starts from a state at position pos with a random pending accumulator (zero when pos is
    at a mini-batch boundary, as the op leaves it there)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)

    q, k, v = rnd(B, T, H, d), rnd(B, T, H, d), rnd(B, T, H, d)
    lr = torch.rand(B, T, H, generator=g, dtype=torch.float64).clamp(0.02, 0.98).to(dtype)
    i = torch.arange(1, b + 1, dtype=torch.float64)
    delta = ((torch.rand(b, generator=g, dtype=torch.float64) - 0.5) * 0.8 / i).to(dtype)  # tau_i in (0.6, 1.4)/i
    ln_weight, ln_bias = rnd(H, d, scale=0.3, shift=1.0), rnd(H, d, scale=0.3)
    init = tuple(rnd(H, *s, scale=(1.0 / s[0] ** 0.5 if len(s) == 2 else 0.3)) for s in inner_shapes(kind, d))
    accum = None
    if pos > 0:
        live = float(pos % b != 0)
        accum = tuple(rnd(B, H, *s, scale=0.1 * live) for s in inner_shapes(kind, d))
    inp = OpInputs(kind, q, k, v, lr, delta, ln_weight, ln_bias, init, accum, pos, b)
    if requires_grad:
        for t in inp.leaves().values():
            t.requires_grad_()
    return inp


def rel(a, b):
    """Relative L2 error of a against b (fp64); a must be all finite (an unwritten output would not be)."""
    assert torch.isfinite(a).all(), "non-finite values (an unwritten output?)"
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_against_dual(inp, fast, *, T, pos, dtype, grad, tol, label):
    """fast(): (o, state) of the path under test on `inp`; compared with inp.run("dual") on the output, the final
    params and accumulators, and (grad) the gradient w.r.t. every leaf of a random weighting of all of them.
    Asserts every relative error is <= tol; returns them."""
    o1, s1 = fast()
    o2, s2 = inp.run("dual")
    assert s1.pos == s2.pos == pos + T
    assert o1.dtype == o2.dtype == dtype
    errs = {"o": rel(o1, o2)}
    for i, (x, y) in enumerate(zip(s1.params + s1.accum, s2.params + s2.accum)):
        errs[f"state{i}"] = rel(x, y) if y.abs().max() > 0 else x.abs().max().item()
    if grad:
        leaves = inp.leaves()
        g = torch.Generator(device=o2.device).manual_seed(1)
        wo = torch.randn(o2.shape, generator=g, device=o2.device, dtype=torch.float64).to(dtype)
        ws = [torch.randn(p.shape, generator=g, device=o2.device, dtype=torch.float64).to(p.dtype)
              for p in s2.params + s2.accum]

        def loss(o, s):
            return (o * wo).sum() + sum((p * w).sum() for p, w in zip(s.params + s.accum, ws))

        g1 = torch.autograd.grad(loss(o1, s1), list(leaves.values()), allow_unused=True)
        g2 = torch.autograd.grad(loss(o2, s2), list(leaves.values()), allow_unused=True)
        for name, x, y in zip(leaves, g1, g2):
            if y is None or y.abs().max() == 0:
                assert x is None or x.abs().max() == 0, name
                continue
            errs[f"d{name}"] = rel(x, y)
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"{label}: over {tol}: {bad}"
    return errs


def cli(capsys, *argv):
    """(exit code, stdout, stderr) of `ttt argv` run in this process (arguments may be paths)."""
    from ttt.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse: --help, usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *words):
    """Exit status 2, one line on stderr (notes aside), no traceback, each of `words` in it; the line."""
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("note:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]
