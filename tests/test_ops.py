"""Op-level tests of TTT-Linear and TTT-MLP (ttt/ops): rung 1, 3 and 4 of the test ladder.

- naive (the spec, autograd inner gradients) == dual (mini-batch dual form) in float64: outputs, final
  state and the gradients w.r.t. every input, for several mini-batch sizes and start positions;
- torch.autograd.gradcheck of both backends on tiny shapes;
- the streaming contract of docs/math.md §5: any split into calls, token by token (the decode step),
  and prefill-then-step all equal one forward over the whole sequence;
- the generic inner-model op (ttt_generic) against the dedicated ops, and with another inner model;
- bad input fails early, naming the argument.
"""
from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from conftest import random_inputs
from ttt.ops import TTTState, make_tau, resolve_backend, ttt_linear, ttt_mlp, ttt_op
from ttt.ops.generic import ttt_generic

KINDS = ("linear", "mlp")
FP64 = dict(rtol=1e-12, atol=1e-12)


def assert_state_close(got: TTTState, want: TTTState, **tol):
    assert got.kind == want.kind
    assert got.pos == want.pos
    for name, a, b in zip(("params", "accum"), (got.params, got.accum), (want.params, want.accum)):
        assert len(a) == len(b)
        for i, (x, y) in enumerate(zip(a, b)):
            torch.testing.assert_close(x, y, **tol, msg=lambda m: f"state.{name}[{i}]: {m}")


def outputs_of(o, state):
    return [o, *state.params, *state.accum]


def vjp(outputs, leaves: dict, seed=1):
    """Gradients of <outputs, random cotangents> w.r.t. each leaf (same cotangents for every call)."""
    g = torch.Generator().manual_seed(seed)
    outs = [x for x in outputs if x.requires_grad]
    total = sum((x * torch.randn(x.shape, generator=g, dtype=x.dtype)).sum() for x in outs)
    grads = torch.autograd.grad(total, list(leaves.values()))
    return dict(zip(leaves, grads))


# --- rung 1: naive == dual ------------------------------------------------------------------------------

# (mini_batch, start pos) over T = 7: b = 1, b = T, T not a multiple of b, fresh and mid-mini-batch starts
NAIVE_DUAL_CASES = [(1, 0), (1, 3), (3, 0), (3, 4), (4, 6), (7, 0), (7, 2)]


@pytest.mark.parametrize("b,pos", NAIVE_DUAL_CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_naive_equals_dual(kind, b, pos):
    inp = random_inputs(kind, T=7, b=b, pos=pos, requires_grad=True)
    o_n, s_n = inp.run("naive")
    o_d, s_d = inp.run("dual")
    assert o_d.shape == inp.q.shape and o_d.dtype == inp.q.dtype
    torch.testing.assert_close(o_d, o_n, rtol=1e-10, atol=1e-11)
    assert_state_close(s_d, s_n, rtol=1e-10, atol=1e-11)
    assert s_d.pos == pos + 7
    leaves = inp.leaves()
    assert len(leaves) == 7 + len(inp.init) * (2 if pos else 1)
    g_n, g_d = vjp(outputs_of(o_n, s_n), leaves), vjp(outputs_of(o_d, s_d), leaves)
    for name in leaves:
        assert g_d[name].abs().sum() > 0, f"no gradient reaches {name}"
        torch.testing.assert_close(g_d[name], g_n[name], rtol=1e-9, atol=1e-10, msg=lambda m: f"d/d{name}: {m}")


@pytest.mark.parametrize("backend", ["dual", "naive"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind, backend):
    inp = random_inputs(kind, B=1, T=5, H=1, d=3 if kind == "linear" else 2, b=2, pos=1, requires_grad=True)
    names = list(inp.leaves())

    def f(*tensors):
        o, st = inp.with_leaves(dict(zip(names, tensors))).run(backend)
        return tuple(x for x in outputs_of(o, st) if x.requires_grad)

    assert torch.autograd.gradcheck(f, tuple(inp.leaves().values()), eps=1e-6, atol=1e-6, rtol=1e-5)


# --- rungs 3 and 4: streaming (docs/math.md §5) ----------------------------------------------------------

SB = 3  # mini-batch size of the streaming tests; sequences of length 2 * SB + 3


def stream_inputs(kind, dtype=torch.float64, pos=0, requires_grad=False):
    return random_inputs(kind, T=2 * SB + 3, b=SB, pos=pos, dtype=dtype, requires_grad=requires_grad)


def run_pieces(inp, cuts, backend):
    """Consecutive calls over [0, c1), [c1, c2), ..., [cn, T), carrying the state."""
    T = inp.q.shape[1]
    bounds = [0, *cuts, T]
    state, outs = inp.state(), []
    for s, e in zip(bounds[:-1], bounds[1:]):
        o, state = inp.run(backend, s, e, state)
        outs.append(o)
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("pos", [0, SB + 1])
@pytest.mark.parametrize("backend", ["dual", "naive"])
@pytest.mark.parametrize("kind", KINDS)
def test_split_every_point(kind, backend, pos):
    inp = stream_inputs(kind, pos=pos)
    T = inp.q.shape[1]
    o_ref, s_ref = inp.run(backend)
    for cut in range(1, T):
        o, st = run_pieces(inp, [cut], backend)
        torch.testing.assert_close(o, o_ref, **FP64, msg=lambda m: f"split at {cut}: {m}")
        assert_state_close(st, s_ref, **FP64)


@pytest.mark.parametrize("backend", ["dual", "naive"])
@pytest.mark.parametrize("kind", KINDS)
def test_split_three_ways(kind, backend):
    inp = stream_inputs(kind)
    o_ref, s_ref = inp.run(backend)
    for cuts in ([1, SB + 2], [SB - 1, 2 * SB + 1], [SB, SB + 1]):  # cuts inside mini-batches, and on a boundary
        o, st = run_pieces(inp, cuts, backend)
        torch.testing.assert_close(o, o_ref, **FP64, msg=lambda m: f"cuts {cuts}: {m}")
        assert_state_close(st, s_ref, **FP64)


@pytest.mark.parametrize("kind", KINDS)
def test_split_fp32(kind):
    inp = stream_inputs(kind, dtype=torch.float32, pos=1)
    o_ref, s_ref = inp.run("dual")
    assert o_ref.dtype == torch.float32 and s_ref.params[0].dtype == torch.float32
    for cuts in ([SB + 1], [2, 2 * SB - 1]):
        o, st = run_pieces(inp, cuts, "dual")
        torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
        assert_state_close(st, s_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["dual", "naive"])  # "dual" with T = 1 dispatches to the decode step
@pytest.mark.parametrize("kind", KINDS)
def test_token_by_token(kind, backend):
    inp = stream_inputs(kind, pos=1)
    o_ref, s_ref = inp.run(backend)
    o, st = run_pieces(inp, list(range(1, inp.q.shape[1])), backend)
    torch.testing.assert_close(o, o_ref, **FP64)
    assert_state_close(st, s_ref, **FP64)


@pytest.mark.parametrize("kind", KINDS)
def test_step_matches_naive_at_every_position(kind):
    """The decode step equals the spec for one token at every in-batch index, with a live accumulator."""
    inp = stream_inputs(kind)
    state = inp.state()
    for t in range(inp.q.shape[1]):
        o_s, s_s = inp.run("dual", t, t + 1, state)  # T = 1: the decode step
        o_d, s_d = inp.run("naive", t, t + 1, state)
        torch.testing.assert_close(o_s, o_d, **FP64)
        assert_state_close(s_s, s_d, **FP64)
        state = s_s


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_then_step(kind):
    inp = stream_inputs(kind)
    T = inp.q.shape[1]
    o_ref, s_ref = inp.run("dual")
    for prefill in (1, SB - 1, SB, SB + 1, T - 1):
        o, st = run_pieces(inp, list(range(prefill, T)), "dual")
        torch.testing.assert_close(o, o_ref, **FP64, msg=lambda m: f"prefill {prefill}: {m}")
        assert_state_close(st, s_ref, **FP64)


@pytest.mark.parametrize("backend", ["dual", "naive"])
@pytest.mark.parametrize("kind", KINDS)
def test_no_grad_streaming_carries_no_graph(kind, backend):
    """Generation runs under no_grad with trainable initial weights: the outputs are those of the grad-mode
    run, and no autograd graph rides along in the state (it would grow from call to call)."""
    inp = stream_inputs(kind, pos=1, requires_grad=True)
    o_ref, s_ref = inp.run(backend)
    with torch.no_grad():
        o, st = run_pieces(inp, list(range(1, inp.q.shape[1])), backend)  # the start state built under no_grad
    assert not o.requires_grad
    assert not any(x.requires_grad for x in st.params + st.accum)
    torch.testing.assert_close(o, o_ref.detach(), **FP64)
    assert_state_close(st, s_ref.detach(), **FP64)


# --- the generic inner-model op ------------------------------------------------------------------------

def as_module(kind, d):
    """The dedicated ops' inner model as an nn.Module (nn.Linear computes x @ weight.T + bias)."""
    if kind == "linear":
        return nn.Linear(d, d)
    return nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))


def to_module_layout(kind, params, transpose=lambda w: w.transpose(-1, -2)):
    """(W1, b1[, W2, b2]) in op layout <-> module parameter order; weights are transposed."""
    return tuple(transpose(p) if i % 2 == 0 else p for i, p in enumerate(params))


@pytest.mark.parametrize("kind", KINDS)
def test_generic_matches_dual(kind):
    inp = random_inputs(kind, T=7, b=3, requires_grad=True)
    d = inp.q.shape[-1]
    o_d, s_d = inp.run("dual")
    o_g, s_g = ttt_generic(as_module(kind, d), inp.q, inp.k, inp.v, inp.lr, inp.tau, inp.ln_weight, inp.ln_bias,
                           init_params=to_module_layout(kind, inp.init), mini_batch=3)
    assert s_g.kind == "generic" and s_g.pos == s_d.pos == 7
    s_g = TTTState(kind, to_module_layout(kind, s_g.params), to_module_layout(kind, s_g.accum), s_g.pos)
    torch.testing.assert_close(o_g, o_d, rtol=1e-10, atol=1e-11)
    assert_state_close(s_g, s_d, rtol=1e-10, atol=1e-11)
    leaves = inp.leaves()
    g_d, g_g = vjp(outputs_of(o_d, s_d), leaves), vjp(outputs_of(o_g, s_g), leaves)
    for name in leaves:
        torch.testing.assert_close(g_g[name], g_d[name], rtol=1e-9, atol=1e-10, msg=lambda m: f"d/d{name}: {m}")


class GatedMLP(nn.Module):
    """(x W_a) * silu(x W_b) W_c: an inner model the dedicated ops do not have."""

    def __init__(self, d, hidden):
        super().__init__()
        self.a = nn.Linear(d, hidden, bias=False)
        self.b = nn.Linear(d, hidden, bias=False)
        self.c = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.c(self.a(x) * F.silu(self.b(x)))


def gated_inputs(T, b, requires_grad=False, const_lr=None):
    inp = random_inputs("linear", T=T, b=b)
    H, d = inp.ln_weight.shape
    g = torch.Generator().manual_seed(3)
    init = tuple(torch.randn(H, *s, generator=g, dtype=torch.float64) * 0.5 for s in [(2 * d, d), (2 * d, d),
                                                                                        (d, 2 * d)])
    lr = inp.lr if const_lr is None else torch.full_like(inp.lr, const_lr)
    for t in (inp.q, inp.k, inp.v, *init):
        t.requires_grad_(requires_grad)
    return inp, init, lr, GatedMLP(d, 2 * d)


def run_gated(inp, module, lr, init, start=0, stop=None, state=None):
    s = slice(start, stop)
    return ttt_generic(module, inp.q[:, s], inp.k[:, s], inp.v[:, s], lr[:, s], inp.tau, inp.ln_weight,
                       inp.ln_bias, state, init_params=init, mini_batch=inp.mini_batch)


def test_generic_gated_mlp_streaming_and_grads():
    inp, init, lr, module = gated_inputs(T=2 * SB + 3, b=SB, requires_grad=True)
    T = inp.q.shape[1]
    o_ref, s_ref = run_gated(inp, module, lr, init)
    for cut in range(1, T):
        o1, st = run_gated(inp, module, lr, init, 0, cut)
        o2, st = run_gated(inp, module, lr, init, cut, None, st)
        torch.testing.assert_close(torch.cat([o1, o2], 1), o_ref, **FP64)
        assert st.pos == T
        for x, y in zip(st.params + st.accum, s_ref.params + s_ref.accum):
            torch.testing.assert_close(x, y, **FP64)
    leaves = (inp.q, inp.k, inp.v, *init)
    grads = torch.autograd.grad((o_ref ** 2).sum() + sum((p ** 2).sum() for p in s_ref.params), leaves)
    for g in grads:
        assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_generic_gated_mlp_update_is_a_descent_step():
    """One full mini-batch with constant lr and tau_i = 1/i is a gradient step of size lr/b on the summed
    inner loss at the start weights, so the inner loss on those tokens must go down (for each head)."""
    b, lr_c = 4, 0.3
    inp, init, lr, module = gated_inputs(T=b, b=b, const_lr=lr_c)
    inp.delta = torch.zeros(b, dtype=torch.float64)
    _, st = run_gated(inp, module, lr, init)
    names = [n for n, _ in module.named_parameters()]
    B, T, H, d = inp.q.shape

    def inner_loss(weights, bi, h):
        z = functional_call(module, dict(zip(names, weights)), (inp.k[bi, :, h],))  # [T, d]
        y = F.layer_norm(z, (d,), eps=1e-6) * inp.ln_weight[h] + inp.ln_bias[h]
        return 0.5 * ((y - (inp.v[bi, :, h] - inp.k[bi, :, h])) ** 2).sum()

    for bi, h in itertools.product(range(B), range(H)):
        w0 = [p[h].detach().clone().requires_grad_() for p in init]
        before = inner_loss(w0, bi, h)
        grads = torch.autograd.grad(before, w0)
        for w_new, w, g in zip(st.params, w0, grads):
            torch.testing.assert_close(w_new[bi, h], w - lr_c / b * g, rtol=1e-10, atol=1e-12)
        after = inner_loss([p[bi, h] for p in st.params], bi, h)
        assert after < before, f"inner loss did not decrease for batch {bi} head {h}: {before} -> {after}"


# --- bad input -----------------------------------------------------------------------------------------

def good_args(kind="linear"):
    inp = random_inputs(kind, B=2, T=5, H=2, d=4, b=3)
    return dict(q=inp.q, k=inp.k, v=inp.v, lr=inp.lr, tau=inp.tau, ln_weight=inp.ln_weight,
                ln_bias=inp.ln_bias, state=inp.state(), mini_batch=3, backend="dual")


def other_state(kind="linear", B=2, H=2, d=4):
    return random_inputs(kind, B=B, T=1, H=H, d=d, b=3).state()


BAD_INPUTS = [
    (ValueError, "q", dict(q=lambda x: x[..., 0])),  # rank 3
    (ValueError, "k", dict(k=lambda x: x[None])),  # rank 5
    (ValueError, "k", dict(k=lambda x: x[:, :4])),  # k / v shape mismatch with q
    (ValueError, "v", dict(v=lambda x: x[..., :3])),
    (TypeError, "k", dict(k=lambda x: x.float())),  # dtype mismatch
    (TypeError, "v", dict(v=lambda x: x.half())),
    (TypeError, "q", dict(q=lambda x: x.long(), k=lambda x: x.long(), v=lambda x: x.long())),  # not floating
    (TypeError, "q", dict(q=lambda x: x.tolist())),
    (ValueError, "k", dict(k=lambda x: x.to("meta"))),  # device mismatch
    (ValueError, "lr", dict(lr=lambda x: x.to("meta"))),
    (ValueError, "tau", dict(tau=lambda x: x.to("meta"))),
    (ValueError, "ln_bias", dict(ln_bias=lambda x: x.to("meta"))),
    (ValueError, "state", dict(state=lambda s: s.to("meta"))),
    (ValueError, "q", dict(q=lambda x: x[:, :0], k=lambda x: x[:, :0], v=lambda x: x[:, :0],
                           lr=lambda x: x[:, :0])),  # empty sequence
    (ValueError, "lr", dict(lr=lambda x: x[:, :, 0])),
    (ValueError, "lr", dict(lr=lambda x: x[:, :4])),
    (ValueError, "lr", dict(lr=0.1)),
    (ValueError, "tau", dict(tau=lambda x: torch.cat([x, x[:1]]))),
    (ValueError, "tau", dict(tau=lambda x: x[None])),
    (ValueError, "ln_weight", dict(ln_weight=lambda x: x[0])),
    (ValueError, "ln_bias", dict(ln_bias=lambda x: x[:, :3])),
    (ValueError, "ln_weight", dict(ln_weight=None)),
    (ValueError, "state", dict(state=lambda s: other_state(B=3))),  # other batch size
    (ValueError, "state", dict(state=lambda s: other_state(H=1))),
    (ValueError, "state", dict(state=lambda s: other_state(d=3))),
    (ValueError, "state", dict(state=lambda s: other_state("mlp"))),  # other kind
    (TypeError, "state", dict(state=lambda s: s.params)),
    (ValueError, "state", dict(state=lambda s: replace(s, accum=(s.accum[0].to("meta"), s.accum[1])))),
    (ValueError, "state", dict(state=lambda s: replace(s, accum=(s.accum[0][..., :2], s.accum[1])))),
    (ValueError, "mini_batch", dict(mini_batch=0)),
    (ValueError, "mini_batch", dict(mini_batch=3.0)),
    (ValueError, "backend", dict(backend="cuda")),
]


@pytest.mark.parametrize("exc,name,over", BAD_INPUTS,
                         ids=[f"{n}-{i}" for i, (_, n, _) in enumerate(BAD_INPUTS)])
def test_bad_input(exc, name, over):
    a = good_args()
    for key, fn in over.items():
        a[key] = fn(a[key]) if callable(fn) else fn
    with pytest.raises(exc, match=rf"^{name}: expected .*, got "):
        ttt_linear(**a)


def test_linear_state_into_mlp_op():
    a = good_args("linear")
    with pytest.raises(ValueError, match=r"^state: expected a state of kind 'mlp', got one of kind 'linear'"):
        ttt_mlp(**a)


def test_triton_on_cpu_raises_instead_of_falling_back(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"^backend='triton' needs CUDA tensors \(got cpu\)"):
        ttt_linear(**{**good_args(), "backend": "triton"})


def test_auto_backend_on_cpu_is_dual():
    assert resolve_backend("auto", torch.device("cpu")) == "dual"
    a = good_args()
    o_auto, s_auto = ttt_op("linear", **{**a, "backend": "auto"})
    o_dual, s_dual = ttt_op("linear", **a)
    assert torch.equal(o_auto, o_dual) and all(torch.equal(x, y) for x, y in zip(s_auto.params, s_dual.params))


def test_make_tau():
    delta = torch.tensor([0.0, 0.5, -1.0, -0.2], dtype=torch.float64)
    torch.testing.assert_close(make_tau(delta), torch.tensor([1.0, 1.0, 0.0, 0.05], dtype=torch.float64))
