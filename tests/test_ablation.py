"""The ablation switches (inner LayerNorm, inner residual, learnable eta, learnable W0), each against a
reference; the Triton dispatch refusing the switches it does not run; NaN isolation (a NaN at position j
never reaches outputs < j); the dtype check at layer entries; the LeCun-normal conv init."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from conftest import random_inputs
from ttt.config import get_config
from ttt.layers.attention import Attention
from ttt.layers.conv import CausalConv1d
from ttt.layers.mamba import Mamba2, MambaConv1d
from ttt.layers.ttt import TTTLayer
from ttt.model import TTTLM
from ttt.ops import TTTState, make_tau, resolve_backend, ttt_op
from ttt.ops.generic import ttt_generic

KINDS = ("linear", "mlp")
SWITCHES = [(False, True), (True, False), (False, False)]  # (inner_ln, residual), the non-default ones


def run(inp, backend, inner_ln, residual, start=0, stop=None, state=None):
    s = slice(start, stop)
    lnw, lnb = (inp.ln_weight, inp.ln_bias) if inner_ln else (None, None)
    return ttt_op(inp.kind, inp.q[:, s], inp.k[:, s], inp.v[:, s], inp.lr[:, s], inp.tau, lnw, lnb,
                  inp.state() if state is None else state, mini_batch=inp.mini_batch, backend=backend,
                  residual=residual)


# --- Theorem 1: the switches reach causal linear attention -------------------------------------------------

@pytest.mark.parametrize("backend", ["dual", "naive", "step"])
def test_theorem1_no_ln_no_residual_batch_gd_from_zero_is_linear_attention(backend):
    """Linear inner model, no LN, no residual, b = T, tau_i = 1, lr = 1 (eta = 1/2 for the loss ||.||^2),
    W0 = 0, b0 = 0: o_t = sum_{s<=t} (q_t . k_s + 1) v_s (the +1 is the inner bias, a constant feature)."""
    B, T, H, d = 2, 6, 2, 3
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, d, generator=g, dtype=torch.float64) for _ in range(3))
    i = torch.arange(1, T + 1, dtype=torch.float64)
    tau = make_tau(1.0 - 1.0 / i)  # tau_i = 1
    lr = torch.ones(B, T, H, dtype=torch.float64)
    st = TTTState.initial("linear", (torch.zeros(H, d, d, dtype=torch.float64),
                                     torch.zeros(H, d, dtype=torch.float64)), B, dtype=torch.float64)
    if backend == "step":  # one token per call: the decode step
        outs = []
        for t in range(T):
            o_t, st = ttt_op("linear", q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], lr[:, t:t + 1], tau, None, None,
                             st, mini_batch=T, backend="dual", residual=False)
            outs.append(o_t)
        o = torch.cat(outs, 1)
    else:
        o, st = ttt_op("linear", q, k, v, lr, tau, None, None, st, mini_batch=T, backend=backend, residual=False)
    expect = torch.zeros_like(q)
    for bi, h, t in itertools.product(range(B), range(H), range(T)):
        for s in range(t + 1):
            expect[bi, t, h] += (q[bi, t, h] @ k[bi, s, h] + 1.0) * v[bi, s, h]
    torch.testing.assert_close(o, expect, rtol=1e-12, atol=1e-12)
    # the committed weights are the linear-attention state sum_s k_s v_s^T (x @ W convention) and sum_s v_s
    torch.testing.assert_close(st.params[0], torch.einsum("bthi,bthj->bhij", k, v), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st.params[1], v.sum(1), rtol=1e-12, atol=1e-12)


# --- each switch: an independent reference, and the dual form against the primal one -----------------------

def reference(kind, inp, inner_ln, residual):
    """Per-token primal TTT written out here: at each token the gradient of 0.5||N(f(k)) - target||^2 at the
    start-of-mini-batch weights, W_i = W_start - tau_i sum_{j<=i} lr_j g_j, output [q +] N(f(q; W_i))."""
    B, T, H, d = inp.q.shape
    o = torch.empty_like(inp.q)

    def f(W, x):
        if kind == "linear":
            return x @ W[0] + W[1]
        return nn.functional.gelu(x @ W[0] + W[1], approximate="tanh") @ W[2] + W[3]

    for bi, h in itertools.product(range(B), range(H)):
        def norm(z):
            if not inner_ln:
                return z
            return nn.functional.layer_norm(z, (d,), eps=1e-6) * inp.ln_weight[h] + inp.ln_bias[h]
        W = [p[h] for p in inp.init]
        acc = [torch.zeros_like(w) for w in W]
        for t in range(T):
            x = lambda a: a[bi, t, h]  # noqa: E731
            i = t % inp.mini_batch
            Wg = [w.detach().requires_grad_() for w in W]
            target = x(inp.v) - x(inp.k) if residual else x(inp.v)
            grads = torch.autograd.grad(0.5 * ((norm(f(Wg, x(inp.k))) - target) ** 2).sum(), Wg)
            acc = [a + inp.lr[bi, t, h] * gr for a, gr in zip(acc, grads)]
            Wt = [w - inp.tau[i] * a for w, a in zip(W, acc)]
            z = norm(f(Wt, x(inp.q)))
            o[bi, t, h] = x(inp.q) + z if residual else z
            if i == inp.mini_batch - 1:
                W, acc = Wt, [torch.zeros_like(a) for a in acc]
    return o


@pytest.mark.parametrize("inner_ln,residual", SWITCHES)
@pytest.mark.parametrize("kind", KINDS)
def test_switches_dual_and_naive_equal_reference(kind, inner_ln, residual):
    inp = random_inputs(kind, T=7, b=3)
    expect = reference(kind, inp, inner_ln, residual)
    for backend in ("dual", "naive"):
        o, _ = run(inp, backend, inner_ln, residual)
        torch.testing.assert_close(o, expect, rtol=1e-10, atol=1e-11, msg=backend)


@pytest.mark.parametrize("inner_ln,residual", SWITCHES)
@pytest.mark.parametrize("kind", KINDS)
def test_switches_dual_equals_naive_states_gradients_and_streaming(kind, inner_ln, residual):
    inp = random_inputs(kind, T=7, b=3, pos=1, requires_grad=True)
    res = {}
    for backend in ("dual", "naive"):
        o, st = run(inp, backend, inner_ln, residual)
        w = torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)
        names = [n for n in inp.leaves() if not (n.startswith("ln_") and not inner_ln)]
        grads = torch.autograd.grad((o * w).sum(), [inp.leaves()[n] for n in names])
        res[backend] = (o, st, dict(zip(names, grads)))
    (o_d, st_d, g_d), (o_n, st_n, g_n) = res["dual"], res["naive"]
    torch.testing.assert_close(o_d, o_n, rtol=1e-10, atol=1e-11)
    for a, b in zip((*st_d.params, *st_d.accum), (*st_n.params, *st_n.accum)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)
    for n in g_d:
        torch.testing.assert_close(g_d[n], g_n[n], rtol=1e-9, atol=1e-10, msg=n)
    # streaming: pieces of 2 and 1 tokens (the step) carry the same state
    with torch.no_grad():
        st, outs = None, []
        for a, b in ((0, 2), (2, 3), (3, 7)):
            o, st = run(inp, "dual", inner_ln, residual, a, b, state=st)
            outs.append(o)
        torch.testing.assert_close(torch.cat(outs, 1), o_d, rtol=1e-10, atol=1e-11)


def test_triton_dispatch_refuses_switches_and_auto_picks_dual():
    for kw, name in (({"inner_ln": False}, "inner_ln"), ({"residual": False}, "residual")):
        with pytest.raises(RuntimeError, match=rf"backend='triton': .*{name} off"):
            resolve_backend("triton", torch.device("cuda"), **kw)
        assert resolve_backend("auto", torch.device("cuda"), **kw) == "dual"
    inp = random_inputs("linear", T=4, b=2)
    with pytest.raises(RuntimeError, match="residual off"):
        run(inp, "triton", True, False)
    layer = TTTLayer(16, 2, inner_ln=False, backend="triton")
    with pytest.raises(RuntimeError, match="inner_ln off"):
        layer(torch.randn(1, 4, 16))


# --- layer switches --------------------------------------------------------------------------------------

D, H, T = 16, 2, 11


def layer_pair(kind, **switch):
    torch.manual_seed(0)
    ref = TTTLayer(D, H, inner=kind, mini_batch=4).double()
    abl = TTTLayer(D, H, inner=kind, mini_batch=4, **switch).double()
    return ref, abl


@pytest.mark.parametrize("kind", KINDS)
def test_fixed_eta_is_a_saturated_gate_with_zero_offsets(kind):
    ref, abl = layer_pair(kind, learn_lr=False)
    names = {n for n, _ in abl.named_parameters()}
    assert not names & {"lr_weight", "lr_bias", "delta"}
    with torch.no_grad():
        ref.lr_weight.zero_()
        ref.lr_bias.fill_(50.0)  # sigmoid(50) == 1 in fp64: eta = base_lr / d
        ref.delta.zero_()  # tau_i = 1/i
    abl.load_state_dict({n: p for n, p in ref.state_dict().items() if n in abl.state_dict()})
    x = torch.randn(2, T, D, dtype=torch.float64)
    torch.testing.assert_close(abl(x)[0], ref(x)[0], rtol=1e-12, atol=1e-12)


def test_zero_w0_is_a_zeroed_learnable_w0_and_not_trained():
    ref, abl = layer_pair("linear", learn_init=False)
    assert "W1" not in dict(abl.named_parameters()) and "b1" not in dict(abl.named_parameters())
    assert not abl.W1.any() and not abl.b1.any()
    abl.reset_parameters()
    assert not abl.W1.any()
    with torch.no_grad():
        ref.W1.zero_()
        ref.b1.zero_()
    abl.load_state_dict({n: p for n, p in ref.state_dict().items() if n in abl.state_dict()})
    x = torch.randn(2, T, D, dtype=torch.float64)
    torch.testing.assert_close(abl(x)[0], ref(x)[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="^learn_init: "):
        TTTLayer(D, H, inner="mlp", learn_init=False)
    with pytest.raises(ValueError, match="^ttt_learn_init: "):
        get_config("debug", mixer="ttt_mlp", ttt_learn_init=False)


@pytest.mark.parametrize("inner_ln,residual", SWITCHES)
def test_layer_ln_residual_switches_equal_generic_inner(inner_ln, residual):
    """The linear layer with a switch off equals the generic (primal, autograd) layer with nn.Linear inside."""
    d = D // H
    torch.manual_seed(0)
    ref = TTTLayer(D, H, inner="linear", mini_batch=4, inner_ln=inner_ln, residual=residual).double()
    gen = TTTLayer(D, H, inner=nn.Linear(d, d).double(), mini_batch=4, inner_ln=inner_ln, residual=residual,
                   base_lr=1.0).double()
    assert ("ln_weight" in dict(ref.named_parameters())) == inner_ln
    sd = {n: p for n, p in ref.state_dict().items() if n not in ("W1", "b1")}
    sd["weight"], sd["bias"] = ref.W1.detach().transpose(-1, -2), ref.b1.detach()  # nn.Linear stores W^T
    gen.load_state_dict(sd)
    x = torch.randn(2, T, D, dtype=torch.float64)
    torch.testing.assert_close(gen(x)[0], ref(x)[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("switch", ["ttt_learn_lr", "ttt_learn_init", "ttt_inner_ln", "ttt_inner_residual"])
def test_model_switches_build_train_and_stream(switch):
    torch.manual_seed(0)
    cfg = get_config("debug", mixer="ttt_linear", vocab_size=64, **{switch: False})
    model = TTTLM(cfg).double()
    ids = torch.randint(0, 64, (2, 19))
    loss, _ = model(ids[:, :-1], targets=ids[:, 1:])
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        full, _ = model(ids)
        a, st = model(ids[:, :7])
        b, _ = model(ids[:, 7:], st)
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-9, atol=1e-9)


# --- NaN isolation: a NaN at position j never reaches outputs < j ---------------------------------------

NAN_AT, NAN_B, NAN_T = 20, 16, 32


@pytest.mark.parametrize("inner_ln,residual", [(True, True), (False, False)])
@pytest.mark.parametrize("kind,backend", [(kind, b) for kind in KINDS for b in ("dual", "naive", "step")]
                         + [("linear", "generic")])  # the generic form, with a linear inner nn.Module
def test_nan_at_j_stays_out_of_earlier_outputs_of_its_mini_batch(kind, backend, inner_ln, residual):
    clean = random_inputs(kind, B=1, T=NAN_T, H=2, d=4, b=NAN_B, dtype=torch.float32)
    bad = random_inputs(kind, B=1, T=NAN_T, H=2, d=4, b=NAN_B, dtype=torch.float32)
    for name in ("q", "k", "v"):
        getattr(bad, name)[:, NAN_AT] = float("nan")
    outs = []
    for inp in (clean, bad):
        if backend == "step":
            st, os_ = None, []
            for t in range(NAN_T):
                o, st = run(inp, "dual", inner_ln, residual, t, t + 1, state=st)
                os_.append(o)
            outs.append(torch.cat(os_, 1))
        elif backend == "generic":
            lnw, lnb = (inp.ln_weight, inp.ln_bias) if inner_ln else (None, None)
            lin = nn.Linear(4, 4)
            o, _ = ttt_generic(lin, inp.q, inp.k, inp.v, inp.lr, inp.tau, lnw, lnb,
                               init_params=(inp.init[0].transpose(-1, -2), inp.init[1]), mini_batch=NAN_B,
                               residual=residual)
            outs.append(o)
        else:
            outs.append(run(inp, backend, inner_ln, residual)[0])
    o_clean, o_bad = outs
    assert torch.isfinite(o_clean).all()
    torch.testing.assert_close(o_bad[:, :NAN_AT], o_clean[:, :NAN_AT], rtol=0, atol=0)
    assert o_bad[:, NAN_AT:].isnan().all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backbone", ["mamba", "transformer"])
def test_layer_nan_at_j_stays_out_of_earlier_outputs(kind, backbone):
    torch.manual_seed(0)
    layer = TTTLayer(16, 2, inner=kind, backbone=backbone, mini_batch=NAN_B)
    x = torch.randn(1, NAN_T, 16)
    xb = x.clone()
    xb[:, NAN_AT, 3] = float("nan")
    with torch.no_grad():
        y, _ = layer(x)
        yb, _ = layer(xb)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(yb[:, :NAN_AT], y[:, :NAN_AT], rtol=0, atol=0)
    assert yb[:, NAN_AT:].isnan().all()


# --- dtype at the entry ----------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: TTTLayer(16, 2), lambda: TTTLayer(16, 2, inner="mlp"),
                                  lambda: Attention(16, 2), lambda: Mamba2(16, d_state=8, head_dim=8)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_layer_refuses_input_dtype_unlike_its_weights(make, dtype):
    layer = make()
    with pytest.raises(TypeError, match=rf"^x: expected dtype torch.float32 like the layer's weights, got {dtype}"):
        layer(torch.randn(1, 5, 16, dtype=dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts for the layer: allowed
        y, _ = layer(torch.randn(1, 5, 16, dtype=torch.bfloat16))
    assert torch.isfinite(y.float()).all()


# --- init ------------------------------------------------------------------------------------------------

def test_causal_conv_init_is_lecun_normal_with_zero_bias():
    torch.manual_seed(0)
    width, C = 4, 20000
    conv = CausalConv1d(C, width)
    w = conv.weight.detach()
    std = 1.0 / math.sqrt(width)  # fan_in = width: one input channel per depthwise filter
    assert abs(w.std().item() / std - 1) < 0.02
    bound = 2 * std / 0.87962566103423978  # truncated at 2 std of the untruncated normal
    assert w.abs().max().item() <= bound and w.abs().max().item() > 0.95 * bound
    assert not conv.bias.any()
    # every causal conv of the TTT layer and of the (M) block uses it; Mamba-2 keeps its own (uniform) init
    model = TTTLM(get_config("debug", mixer="ttt_linear", vocab_size=64, conv_width=4))
    blk = model.blocks[0]
    for c in (blk.conv, blk.mixer.conv_q, blk.mixer.conv_k):
        assert abs(c.weight.std().item() / std - 1) < 0.2 and not c.bias.any()
    mconv = MambaConv1d(20000, 4)
    assert mconv.weight.abs().max().item() <= 0.5 and mconv.bias.any()
