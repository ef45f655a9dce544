"""Tests of the TTT layers (ttt/layers/ttt.py, docs/math.md §§3, 5, 6): a hand-written reference of the
whole layer, the streaming contract (every split point, 3-way splits, token by token, conv window and RoPE
at position mod b included), naive == dual at layer level (outputs and every parameter gradient),
gradient flow, init, the generic inner-model layer, bf16 autocast, and bad input.

Everything exact runs in float64 with every parameter perturbed away from its init (LN gamma != 1,
delta != 0, biases != 0, ...), so that no term can vanish by accident."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ttt.layers.ttt as ttt_mod
from ttt.layers.ttt import TTTLayer, TTTLayerState, TTTLinear, TTTMLP

D, H, B_MB = 16, 2, 4  # model width, heads (head dim 8), mini-batch size
T = 2 * B_MB + 3  # two full mini-batches and a partial one
BATCH = 2
KINDS = {"linear": TTTLinear, "mlp": TTTMLP}
BACKBONES = ("mamba", "transformer")
CASES = [(k, bb) for k in KINDS for bb in BACKBONES]
TOL = dict(rtol=0, atol=1e-12)


def perturb_(layer: TTTLayer, seed: int = 1):
    """Move every parameter off its init so each one matters (O(1) q, k, v; gamma != 1; delta != 0 ...)."""
    g = torch.Generator().manual_seed(seed)

    def rn(p, s):
        return torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * s

    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name == "delta":  # keep 1/i + delta_i > 0 (away from the clamp) for i <= b = 4
                p.copy_(rn(p, 0.05))
            elif name in ("ln_weight", "post_norm.weight"):
                p.copy_(1.0 + rn(p, 0.3))
            elif name.endswith("proj.weight"):
                p.copy_(rn(p, 1.0 / math.sqrt(layer.d_model)))
            elif name.startswith("conv_") and name.endswith("weight"):
                p.copy_(rn(p, 0.5))
            elif name == "lr_weight":
                p.copy_(rn(p, 0.5 / math.sqrt(layer.d_model)))
            elif name.startswith("W") or name in ("weight",) or p.dim() >= 3:  # inner weights
                p.copy_(rn(p, 0.5 / math.sqrt(p.shape[-2])))
            else:  # biases, LN beta, lr bias, inner biases
                p.copy_(rn(p, 0.3))
    return layer


def make_layer(kind="linear", backbone="mamba", seed=0, base_lr=None, **kw):
    torch.manual_seed(seed)
    if isinstance(kind, str):
        layer = KINDS[kind](D, H, backbone=backbone, mini_batch=B_MB, base_lr=base_lr, **kw)
    else:
        layer = TTTLayer(D, H, inner=kind, backbone=backbone, mini_batch=B_MB, base_lr=base_lr, **kw)
    layer = layer.double()
    # a larger inner step than the default so the inner updates move the outputs by O(1) amounts
    layer.base_lr = 4.0 * layer.base_lr
    return perturb_(layer, seed + 1)


def make_x(T_=T, seed=123, batch=BATCH):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, T_, D, generator=g, dtype=torch.float64)


def assert_state_equal(s1: TTTLayerState, s2: TTTLayerState, atol=1e-12):
    assert s1.op.kind == s2.op.kind
    assert s1.pos == s2.pos
    assert len(s1.op.params) == len(s2.op.params)
    for a, b in zip(s1.op.params + s1.op.accum, s2.op.params + s2.op.accum):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=atol)
    if s1.conv is None or s2.conv is None:
        assert s1.conv is None and s2.conv is None
    else:
        assert s1.conv.shape == s2.conv.shape
        torch.testing.assert_close(s1.conv, s2.conv, rtol=0, atol=atol)


def run_chunks(layer, x, sizes, state=None):
    ys = []
    t = 0
    for n in sizes:
        y, state = layer(x[:, t:t + n], state)
        ys.append(y)
        t += n
    assert t == x.shape[1]
    return torch.cat(ys, 1), state


# ---------------------------------------------------------------------------------------------------
# A from-scratch reference of the layer (docs/math.md §§2, 3, 5, 6): own conv, own RoPE, own primal
# inner loop with autograd gradients. Shares no code with ttt.layers or ttt.ops.
# ---------------------------------------------------------------------------------------------------

def ref_rope(x, positions, base=10000.0):
    """x [B,T,H,d]; rotate pairs (2i, 2i+1) by positions[t] * base^(-2i/d) (angles in fp32 as the layer)."""
    d = x.shape[-1]
    ang = (positions.float()[:, None] * base ** (-torch.arange(0, d, 2).float() / d)).double()  # [T, d/2]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]  # [T, 1, d/2]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out


def ref_conv(u, weight, bias):
    """Depthwise causal conv: y_t = bias + sum_j w[:, j] * u_{t - (W-1) + j} (zeros before the start)."""
    Wd = weight.shape[-1]
    y = torch.zeros_like(u) + bias
    for t in range(u.shape[1]):
        for j in range(Wd):
            s = t - (Wd - 1) + j
            if s >= 0:
                y[:, t] = y[:, t] + weight[:, 0, j] * u[:, s]
    return y


def ref_ln(z, g, b, eps=1e-6):
    mu = z.mean(-1, keepdim=True)
    var = ((z - mu) ** 2).mean(-1, keepdim=True)
    return (z - mu) / torch.sqrt(var + eps) * g + b


def ref_f_res(kind, p, x):
    """x [d]; p: one head's weights."""
    if kind == "linear":
        W, c = p
        return x @ W + c
    W1, c1, W2, c2 = p
    return F.gelu(x @ W1 + c1, approximate="tanh") @ W2 + c2


def ref_layer(layer: TTTLayer, x):
    """Whole-sequence forward of `layer` (kind linear or mlp) written straight from docs/math.md."""
    Bx, Tx, Dx = x.shape
    Hh, d, b = layer.n_heads, layer.head_dim, layer.mini_batch
    if layer.backbone == "mamba":
        u = x @ layer.qk_proj.weight.T
        q = ref_conv(u, layer.conv_q.weight, layer.conv_q.bias)
        k = ref_conv(u, layer.conv_k.weight, layer.conv_k.bias)
    else:
        q, k = x @ layer.q_proj.weight.T, x @ layer.k_proj.weight.T
    v = x @ layer.v_proj.weight.T
    q, k, v = (t.reshape(Bx, Tx, Hh, d) for t in (q, k, v))
    pos = torch.arange(Tx) % b
    q, k = ref_rope(q, pos, layer.rope_base), ref_rope(k, pos, layer.rope_base)
    sig = torch.sigmoid(x @ layer.lr_weight.T + layer.lr_bias)  # [B,T,H]
    lr = layer.base_lr * sig / d
    tau = torch.clamp(1.0 / torch.arange(1, b + 1, dtype=x.dtype) + layer.delta, min=0)
    out = torch.zeros(Bx, Tx, Hh, d, dtype=x.dtype)
    with torch.enable_grad():
        for bi in range(Bx):
            for h in range(Hh):
                W = [p[h] for p in layer.inner_params()]
                g_, be = layer.ln_weight[h], layer.ln_bias[h]
                acc = [torch.zeros_like(w) for w in W]
                for t in range(Tx):
                    i = t % b
                    kt, vt, qt = k[bi, t, h], v[bi, t, h], q[bi, t, h]
                    Wg = [w if w.requires_grad else w.detach().requires_grad_() for w in W]
                    loss = 0.5 * (ref_ln(ref_f_res(layer.kind, Wg, kt), g_, be) - (vt - kt)).pow(2).sum()
                    grads = torch.autograd.grad(loss, Wg, create_graph=True)
                    W = Wg
                    acc = [a + lr[bi, t, h] * gr for a, gr in zip(acc, grads)]
                    Wt = [w - tau[i] * a for w, a in zip(W, acc)]
                    out[bi, t, h] = qt + ref_ln(ref_f_res(layer.kind, Wt, qt), g_, be)
                    if i == b - 1:
                        W, acc = Wt, [torch.zeros_like(a) for a in acc]
    o = F.layer_norm(out.reshape(Bx, Tx, Dx), (Dx,), layer.post_norm.weight, layer.post_norm.bias, eps=1e-6)
    if layer.backbone == "mamba":
        o = F.gelu(x @ layer.gate_proj.weight.T, approximate="tanh") * o
    return o @ layer.o_proj.weight.T


@pytest.mark.parametrize("kind,backbone", CASES)
def test_layer_matches_reference(kind, backbone):
    layer = make_layer(kind, backbone)
    x = make_x()
    y, st = layer(x)
    with torch.no_grad():
        y_ref = ref_layer(layer, x)
    torch.testing.assert_close(y, y_ref, **TOL)
    assert st.pos == T
    # the reference continues past the first call too: [x1; x2] through the layer in two calls
    x2 = make_x(5, seed=7)
    y2, _ = layer(x2, st)
    with torch.no_grad():
        y_ref2 = ref_layer(layer, torch.cat([x, x2], 1))[:, T:]
    torch.testing.assert_close(y2, y_ref2, **TOL)


# ---------------------------------------------------------------------------------------------------
# Streaming contract (docs/math.md §5): any split == one shot, outputs and final state.
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,backbone", CASES)
def test_every_split_point_equals_one_shot(kind, backbone):
    layer = make_layer(kind, backbone)
    x = make_x()
    with torch.no_grad():
        y, st = layer(x)
        assert st.pos == T
        for s in range(1, T):
            y_s, st_s = run_chunks(layer, x, [s, T - s])
            torch.testing.assert_close(y_s, y, **TOL, msg=lambda m: f"split at {s}: {m}")
            assert_state_equal(st_s, st)


@pytest.mark.parametrize("kind,backbone", CASES)
def test_three_way_splits_and_token_by_token(kind, backbone):
    layer = make_layer(kind, backbone)
    x = make_x()
    with torch.no_grad():
        y, st = layer(x)
        for sizes in ([3, 5, 3], [1, 1, 9], [4, 4, 3], [2, 7, 2], [5, 1, 5], [9, 1, 1]):
            y_s, st_s = run_chunks(layer, x, sizes)
            torch.testing.assert_close(y_s, y, **TOL, msg=lambda m: f"sizes {sizes}: {m}")
            assert_state_equal(st_s, st)
        y_s, st_s = run_chunks(layer, x, [1] * T)  # decode: the one-token step path
        torch.testing.assert_close(y_s, y, **TOL)
        assert_state_equal(st_s, st)
        # prefill then decode
        y_s, st_s = run_chunks(layer, x, [6] + [1] * (T - 6))
        torch.testing.assert_close(y_s, y, **TOL)
        assert_state_equal(st_s, st)


@pytest.mark.parametrize("kind", KINDS)
def test_token_by_token_naive_backend(kind):
    layer = make_layer(kind, "mamba", backend="naive")
    x = make_x()
    with torch.no_grad():
        y, st = layer(x)
        y_s, st_s = run_chunks(layer, x, [1] * T)
    torch.testing.assert_close(y_s, y, **TOL)
    assert_state_equal(st_s, st)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_conv_window_is_the_last_inputs(backbone):
    layer = make_layer("linear", backbone)
    x = make_x()
    with torch.no_grad():
        _, st0 = layer(x[:, :2])
        _, st = layer(x)
        if backbone == "transformer":
            assert st.conv is None and st0.conv is None
            return
        u = x @ layer.qk_proj.weight.T
        w = layer.conv_q.width - 1
        torch.testing.assert_close(st.conv, u[:, -w:], **TOL)
        # a call shorter than the window keeps the zeros of the start on the left
        torch.testing.assert_close(st0.conv[:, -2:], u[:, :2], **TOL)
        assert (st0.conv[:, :w - 2] == 0).all()


@pytest.mark.parametrize("kind,backbone", CASES)
def test_split_gradients_equal_one_shot(kind, backbone):
    """Backprop through a split forward (state carried, not detached) == through one forward."""
    layer = make_layer(kind, backbone)
    x = make_x()
    w = make_x(seed=5)

    def grads(sizes):
        layer.zero_grad()
        y, st = run_chunks(layer, x, sizes)
        ((y * w).sum() + sum((p * p).sum() for p in st.op.params)).backward()
        return {n: p.grad.clone() for n, p in layer.named_parameters()}

    g1, g2 = grads([T]), grads([3, 6, 1, 1])
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-10, atol=1e-12, msg=lambda m: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------------
# Backends at layer level
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,backbone", CASES)
def test_naive_equals_dual_outputs_and_gradients(kind, backbone):
    x = make_x()
    wy = make_x(seed=9)
    res = {}
    for backend in ("naive", "dual"):
        layer = make_layer(kind, backbone, backend=backend)
        xx = x.clone().requires_grad_()
        y, st = layer(xx)
        loss = (y * wy).sum() + sum((p * p).sum() for p in st.op.params)
        loss.backward()
        res[backend] = (y.detach(), st, {n: p.grad for n, p in layer.named_parameters()}, xx.grad)
    (yn, sn, gn, xn), (yd, sd, gd, xd) = res["naive"], res["dual"]
    torch.testing.assert_close(yd, yn, **TOL)
    sn, sd = TTTLayerState(sn.op.detach(), sn.conv), TTTLayerState(sd.op.detach(), sd.conv)
    assert_state_equal(sd.detach(), sn.detach())
    assert set(gn) == set(gd)
    for n in gn:
        assert gn[n] is not None and gd[n] is not None, n
        torch.testing.assert_close(gd[n], gn[n], rtol=1e-9, atol=1e-12, msg=lambda m: f"{n}: {m}")
    torch.testing.assert_close(xd, xn, rtol=1e-9, atol=1e-12)


def test_backend_is_decided_once_per_device_and_dtype(monkeypatch):
    """The layer resolves its op on the first call for a device type and dtype and only looks it up later; a
    new backend (or dtype) is resolved again; the model prepares every layer before its blocks run."""
    calls = []
    real = ttt_mod.resolve_op

    def counting(*args, **kw):
        calls.append(args[:4])
        return real(*args, **kw)
    monkeypatch.setattr(ttt_mod, "resolve_op", counting)
    layer = make_layer("linear", "mamba")
    x = make_x(T_=5)
    y0, s = layer(x)
    for _ in range(3):
        y1, s = layer(x, s)
    assert calls == [("linear", "auto", torch.device("cpu"), torch.float64)]
    assert type(layer.prepare(x.device, x.dtype).op).__name__ == "DualOp"
    layer.backend = "naive"
    y2, _ = layer(x)
    assert len(calls) == 2 and layer.prepare(x.device, x.dtype).op.backend == "naive"
    torch.testing.assert_close(y2, y0, rtol=1e-9, atol=1e-12)
    layer.float()(x.float())
    assert len(calls) == 3 and calls[-1][3] == torch.float32

    from ttt.config import get_config
    from ttt.model import TTTLM
    calls.clear()
    model = TTTLM(get_config("debug", vocab_size=64))
    model(torch.zeros(1, 3, dtype=torch.long))
    model(torch.zeros(1, 3, dtype=torch.long))
    assert len(calls) == model.cfg.n_layers


def test_unknown_or_unavailable_backend_raises(monkeypatch):
    x = make_x(T_=5)
    for kind in KINDS:
        with pytest.raises(ValueError, match="backend"):
            layer = make_layer(kind, "mamba", backend="fast")
            layer(x)
    with pytest.raises(ValueError, match="backend"):  # the generic inner model too
        layer = make_layer(nn.Linear(D // H, D // H), "mamba", backend="fast")
        layer(x)
    # an unknown name set after construction raises at once
    layer = make_layer("mlp", "transformer")
    with pytest.raises(ValueError, match="^backend: expected one of"):
        layer.backend = "fast"
    # an explicitly requested backend that cannot run here raises instead of falling back
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter would make it runnable
        layer = make_layer("linear", "mamba", backend="triton")
        with pytest.raises(RuntimeError, match="triton"):
            layer(x)


@pytest.mark.parametrize("inner,backend,mode", [
    ("linear", "naive", "no_grad"), ("mlp", "naive", "no_grad"), ("generic", "naive", "no_grad"),
    ("linear", "dual", "inference_mode"), ("mlp", "dual", "inference_mode"),
    ("linear", "naive", "inference_mode"), ("generic", "naive", "inference_mode")])
def test_layers_run_without_grad(inner, backend, mode):
    """fp32 layers run under no_grad (generation), also with backend="naive" or a generic inner module, which
    use autograd.grad inside, and give the grad-mode outputs; also under inference_mode (which `generate` uses),
    where the primal paths run their inner autograd on normal copies of the inputs."""
    torch.manual_seed(0)
    mod = nn.Linear(D // H, D // H) if inner == "generic" else inner
    layer = perturb_(TTTLayer(D, H, inner=mod, mini_batch=B_MB, backend=backend))
    x = make_x().float()
    y_grad, _ = layer(x)
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        y, st = layer(x[:, :5])
        y2, st = layer(x[:, 5:6], st)
        y3, st = layer(x[:, 6:], st)
    torch.testing.assert_close(torch.cat([y, y2, y3], 1), y_grad.detach(), rtol=1e-5, atol=1e-6)


def test_auto_backend_equals_dual_on_cpu():
    x = make_x()
    with torch.no_grad():
        ya, _ = make_layer("mlp", "mamba", backend="auto")(x)
        yd, _ = make_layer("mlp", "mamba", backend="dual")(x)
    torch.testing.assert_close(ya, yd, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# Gradient flow and parameter sets
# ---------------------------------------------------------------------------------------------------

MAMBA_ONLY = {"qk_proj.weight", "conv_q.weight", "conv_q.bias", "conv_k.weight", "conv_k.bias", "gate_proj.weight"}
TRANSFORMER_ONLY = {"q_proj.weight", "k_proj.weight"}
COMMON = {"v_proj.weight", "o_proj.weight", "lr_weight", "lr_bias", "delta", "ln_weight", "ln_bias",
          "post_norm.weight", "post_norm.bias"}
INNER = {"linear": {"W1", "b1"}, "mlp": {"W1", "b1", "W2", "b2"}}


@pytest.mark.parametrize("kind,backbone", CASES)
def test_parameter_set(kind, backbone):
    layer = KINDS[kind](D, H, backbone=backbone, mini_batch=B_MB)
    names = {n for n, _ in layer.named_parameters()}
    want = COMMON | INNER[kind] | (MAMBA_ONLY if backbone == "mamba" else TRANSFORMER_ONLY)
    assert names == want
    shapes = dict((n, tuple(p.shape)) for n, p in layer.named_parameters())
    d = D // H
    assert shapes["W1"] == ((H, d, d) if kind == "linear" else (H, d, 4 * d))
    assert shapes["delta"] == (B_MB,) and shapes["lr_weight"] == (H, D) and shapes["lr_bias"] == (H,)
    assert shapes["ln_weight"] == (H, d) and shapes["ln_bias"] == (H, d)
    if backbone == "mamba":
        assert shapes["conv_q.weight"] == (D, 1, 4) and shapes["conv_q.bias"] == (D,)


@pytest.mark.parametrize("kind,backbone", CASES)
@pytest.mark.parametrize("perturbed", [True, False])
def test_gradients_reach_every_parameter(kind, backbone, perturbed):
    if perturbed:
        layer = make_layer(kind, backbone)
    else:
        torch.manual_seed(0)
        layer = KINDS[kind](D, H, backbone=backbone, mini_batch=B_MB).double()
    x = make_x()
    y, _ = layer(x)
    (y * make_x(seed=3)).sum().backward()
    for n, p in layer.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
        if perturbed:  # with every parameter off its init, every one of them matters
            assert p.grad.abs().max() > 1e-8, n
    if perturbed:  # every tau_i is used (T covers every in-batch index), every head's W0 matters
        assert (layer.delta.grad.abs() > 1e-10).all()
        assert (layer.W1.grad.flatten(1).abs().amax(1) > 1e-8).all()


# ---------------------------------------------------------------------------------------------------
# Init (docs/math.md §6)
# ---------------------------------------------------------------------------------------------------

def _assert_normal(p, std, name, rel=0.06):
    s = p.detach().double().std().item()
    m = p.detach().double().mean().item()
    assert abs(s - std) < rel * std, f"{name}: std {s}, expected {std}"
    assert abs(m) < 4 * std / math.sqrt(p.numel()), f"{name}: mean {m}"


@pytest.mark.parametrize("kind,backbone", CASES)
def test_init(kind, backbone):
    torch.manual_seed(0)
    Dl, Hl = 256, 4
    layer = KINDS[kind](Dl, Hl, backbone=backbone)
    assert layer.mini_batch == 16
    assert layer.base_lr == (1.0 if kind == "linear" else 0.1)
    projs = ["v_proj", "o_proj"] + (["qk_proj", "gate_proj"] if backbone == "mamba" else ["q_proj", "k_proj"])
    for n in projs:
        _assert_normal(getattr(layer, n).weight, 0.02, n)
        assert getattr(layer, n).bias is None, f"{n}: projections have no bias"
    for n in layer.inner_names:
        p = getattr(layer, n)
        if n.startswith("W"):
            _assert_normal(p, 0.02, n)
        else:
            assert (p == 0).all(), n
    _assert_normal(layer.lr_weight, 0.02, "lr_weight", rel=0.15)
    assert (layer.lr_bias == 0).all() and (layer.delta == 0).all()
    assert (layer.ln_weight == 1).all() and (layer.ln_bias == 0).all()
    assert (layer.post_norm.weight == 1).all() and (layer.post_norm.bias == 0).all()
    assert layer.post_norm.eps == 1e-6
    if backbone == "mamba":
        for c in (layer.conv_q, layer.conv_k):
            assert (c.bias == 0).all() and c.width == 4
    tau = ttt_mod.make_tau(layer.delta)
    torch.testing.assert_close(tau, 1.0 / torch.arange(1, 17, dtype=tau.dtype), rtol=0, atol=0)
    # heads differ (independent draws), and reset_parameters restores the init after perturbation
    assert not torch.equal(layer.W1[0], layer.W1[1])
    perturb_(layer)
    layer.reset_parameters()
    assert (layer.delta == 0).all() and (layer.ln_weight == 1).all() and (layer.lr_bias == 0).all()
    _assert_normal(layer.W1, 0.02, "W1 after reset")


def test_base_lr_override_and_used():
    assert TTTLinear(D, H, base_lr=0.5).base_lr == 0.5
    assert TTTMLP(D, H, base_lr=0.5).base_lr == 0.5
    # base_lr scales the inner learning rate: base_lr -> 0 leaves only W0 (outputs change)
    layer = make_layer("linear", "transformer")
    x = make_x()
    with torch.no_grad():
        y1, _ = layer(x)
        layer.base_lr = 0.0
        y0, _ = layer(x)
        y0_ref = ref_layer(layer, x)
    torch.testing.assert_close(y0, y0_ref, **TOL)
    assert (y1 - y0).abs().max() > 1e-3


def test_initial_state_keeps_layer_precision():
    """The learnable W0 of an fp64 layer is not rounded to fp32 in the initial state; fp32 layers stay fp32."""
    layer = make_layer("linear", "mamba")
    st = layer.init_state(BATCH)
    for p, s in zip(layer.inner_params(), st.op.params):
        assert s.dtype == torch.float64
        torch.testing.assert_close(s, p.unsqueeze(0).expand_as(s), rtol=0, atol=0)
    assert st.conv.dtype == torch.float64 and (st.conv == 0).all()
    st32 = TTTLinear(D, H).init_state(BATCH)
    assert all(p.dtype == torch.float32 for p in st32.op.params + st32.op.accum)
    assert st32.pos == 0 and all((a == 0).all() for a in st32.op.accum)


# ---------------------------------------------------------------------------------------------------
# RoPE at position mod b
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backbone", BACKBONES)
def test_rope_positions_are_mod_b(backbone, monkeypatch):
    calls = []
    real = ttt_mod.apply_rope

    def recorder(x, positions, base=10000.0):
        calls.append((positions.clone(), base))
        return real(x, positions, base)

    monkeypatch.setattr(ttt_mod, "apply_rope", recorder)
    layer = make_layer("linear", backbone)
    x = make_x(T_=3 * B_MB + 3)
    pos = 0
    st = None
    with torch.no_grad():
        for n in (5, 1, 7, 1, 1):
            calls.clear()
            _, st = layer(x[:, pos:pos + n], st)
            want = (pos + torch.arange(n)) % B_MB
            assert len(calls) == 2, "RoPE on q and on k"
            for p, base in calls:
                assert p.tolist() == want.tolist(), f"call at pos {pos}"
                assert base == layer.rope_base
            pos += n


@pytest.mark.parametrize("backbone", BACKBONES)
def test_rope_rotation_at_p_equals_at_p_mod_b(backbone):
    """Behavioural check, independent of how RoPE is called: a state at pos = 2b (accumulators zero) and
    the same state relabelled pos = 0 must give the same outputs for the next tokens (q and k rotated at
    p and at p mod b alike, inner updates on), while a relabelling to pos = 1 must not."""
    layer = make_layer("linear", backbone)
    x = make_x()
    with torch.no_grad():
        _, st = layer(x[:, :2 * B_MB])
        assert st.pos == 2 * B_MB and all((a == 0).all() for a in st.op.accum)
        y, _ = layer(x[:, 2 * B_MB:], st)
        relabel = TTTLayerState(dataclasses.replace(st.op, pos=0), st.conv)
        y0, _ = layer(x[:, 2 * B_MB:], relabel)
        torch.testing.assert_close(y0, y, **TOL)
        y1, _ = layer(x[:, 2 * B_MB:], TTTLayerState(dataclasses.replace(st.op, pos=1), st.conv))
        assert (y1 - y).abs().max() > 1e-6


# ---------------------------------------------------------------------------------------------------
# Generic inner model
# ---------------------------------------------------------------------------------------------------

class GatedMLP(nn.Module):
    def __init__(self, d, f=12):
        super().__init__()
        self.up = nn.Linear(d, 2 * f)
        self.down = nn.Linear(f, d)

    def forward(self, x):
        a, g = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(g) * a)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_generic_linear_inner_equals_ttt_linear(backbone):
    d = D // H
    ref = make_layer("linear", backbone)
    gen = make_layer(nn.Linear(d, d), backbone)
    assert gen.kind == "generic" and gen.base_lr == 1.0 * 4.0
    assert dict((n, tuple(p.shape)) for n, p in gen.named_parameters())["weight"] == (H, d, d)
    with torch.no_grad():
        sd = {n: p for n, p in ref.state_dict().items() if n not in ("W1", "b1")}
        sd["weight"] = ref.W1.transpose(-1, -2)  # nn.Linear stores W^T: [H, d_out, d_in]
        sd["bias"] = ref.b1
        gen.load_state_dict(sd)
    x = make_x()
    wy = make_x(seed=4)
    y_ref, st_ref = ref(x)
    y_gen, st_gen = gen(x)
    torch.testing.assert_close(y_gen, y_ref, **TOL)
    assert st_gen.pos == st_ref.pos == T
    torch.testing.assert_close(st_gen.op.params[0], st_ref.op.params[0].transpose(-1, -2), **TOL)
    torch.testing.assert_close(st_gen.op.params[1], st_ref.op.params[1], **TOL)
    (y_ref * wy).sum().backward()
    (y_gen * wy).sum().backward()
    torch.testing.assert_close(gen.weight.grad, ref.W1.grad.transpose(-1, -2), rtol=1e-9, atol=1e-12)
    for n, p in ref.named_parameters():
        if n not in ("W1", "b1"):
            torch.testing.assert_close(gen.get_parameter(n).grad, p.grad, rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_generic_gated_mlp_streams_and_trains(backbone):
    d = D // H
    layer = make_layer(GatedMLP(d), backbone)
    names = {n for n, _ in layer.named_parameters()}
    assert {"up_weight", "up_bias", "down_weight", "down_bias"} <= names
    assert layer.up_weight.shape == (H, 24, d)
    x = make_x()
    with torch.no_grad():
        y, st = layer(x)
        assert torch.isfinite(y).all() and st.op.kind == "generic"
        for sizes in ([5, 6], [4, 4, 3], [1] * T):
            y_s, st_s = run_chunks(layer, x, sizes)
            torch.testing.assert_close(y_s, y, **TOL)
            assert_state_equal(st_s, st)
    y, _ = layer(x)
    (y * make_x(seed=8)).sum().backward()
    for n, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 1e-10, n


def test_generic_init_copies_template_to_every_head():
    torch.manual_seed(0)
    inner = nn.Linear(8, 8)
    layer = TTTLayer(D, H, inner=inner)
    for h in range(H):
        torch.testing.assert_close(layer.weight[h], inner.weight.detach(), rtol=0, atol=0)
        torch.testing.assert_close(layer.bias[h], inner.bias.detach(), rtol=0, atol=0)
    assert not any(n.startswith("_template") for n, _ in layer.named_parameters())


# ---------------------------------------------------------------------------------------------------
# bf16 autocast on CPU
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,backbone", CASES)
def test_bf16_autocast(kind, backbone):
    torch.manual_seed(0)
    layer = KINDS[kind](D, H, backbone=backbone, mini_batch=B_MB)
    perturb_(layer)
    x = make_x().float()
    with torch.no_grad():
        y32, _ = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y1, st = layer(x[:, :6])
            for t in (p for p in st.op.params + st.op.accum):
                assert t.dtype == torch.float32
            y2, st = layer(x[:, 6:7], st)  # the decode step, too
            y3, st = layer(x[:, 7:], st)
    for t in st.op.params + st.op.accum:
        assert t.dtype == torch.float32
    assert st.pos == T
    y = torch.cat([y1, y2, y3], 1).float()
    assert torch.isfinite(y).all()
    err = (y - y32).abs().max() / y32.abs().max()
    assert err < 0.1, f"bf16 autocast far from fp32: relative max error {err}"
    # and training under autocast reaches the parameters in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(x)
    y.float().sum().backward()
    for n, p in layer.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), n


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------

def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="d_model"):
        TTTLinear(18, 4)
    with pytest.raises(ValueError, match="d_model"):
        TTTMLP(15, 3)  # odd head dim: no RoPE pairs
    with pytest.raises(ValueError, match="backbone"):
        TTTLinear(D, H, backbone="rwkv")
    with pytest.raises(ValueError, match="inner"):
        TTTLayer(D, H, inner="conv")
    with pytest.raises(ValueError, match="inner"):
        TTTLayer(D, H, inner=lambda z: z)
    with pytest.raises(ValueError, match="mini_batch"):
        TTTLinear(D, H, mini_batch=0)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_x(kind):
    layer = make_layer(kind, "mamba")
    for bad in (torch.randn(T, D, dtype=torch.float64), torch.randn(1, 2, T, D, dtype=torch.float64),
                torch.randn(2, T, D + 2, dtype=torch.float64), torch.zeros(2, 0, D, dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"^x"):
            layer(bad)


def test_bad_state():
    x = make_x(T_=5)
    lin_m = make_layer("linear", "mamba")
    lin_t = make_layer("linear", "transformer")
    mlp_m = make_layer("mlp", "mamba")
    with torch.no_grad():
        _, s_lin_m = lin_m(x)
        _, s_lin_t = lin_t(x)
        _, s_mlp_m = mlp_m(x)
        _, s_batch1 = lin_m(x[:1])
        cases = [
            (lin_m, s_batch1, ValueError),  # another batch size
            (lin_m, s_mlp_m, ValueError),  # a TTT-MLP state into a TTT-Linear layer
            (mlp_m, s_lin_m, ValueError),
            (lin_m, s_lin_t, ValueError),  # a (T)-backbone state into an (M) layer
            (lin_t, s_lin_m, ValueError),  # and the other way
            (lin_m, s_lin_m.op, TypeError),  # the op state instead of the layer state
            (lin_m, {"pos": 5}, TypeError),
        ]
        for layer, st, exc in cases:
            with pytest.raises(exc, match=r"^state"):
                layer(x, st)
        # another head count / width of inner weights
        other = TTTLinear(D, 4, mini_batch=B_MB).double()
        _, s_other = other(x)
        with pytest.raises(ValueError, match=r"^state"):
            lin_m(x, s_other)
        # a generic-inner state into a linear layer
        gen = make_layer(nn.Linear(D // H, D // H), "mamba")
        _, s_gen = gen(x)
        with pytest.raises(ValueError, match=r"^state"):
            lin_m(x, s_gen)
        # a good state still works after all that
        y, st = lin_m(x, s_lin_m)
        assert st.pos == 10


@pytest.mark.parametrize("backend", ["dual", "triton"])
def test_generic_inner_model_refuses_fast_backends(backend):
    with pytest.raises(ValueError, match=r"^backend: a generic inner model runs the primal form only"):
        TTTLayer(16, 2, inner=nn.Linear(8, 8), backend=backend)


def test_inner_lr_scale_multiplies_base_lr():
    """The buffer the trainer ramps acts exactly as a factor on base_lr, and is not saved with the weights."""
    torch.manual_seed(0)
    a = TTTMLP(16, 2, mini_batch=4).double()
    b = TTTMLP(16, 2, mini_batch=4, base_lr=0.05).double()
    b.load_state_dict(a.state_dict())
    a.inner_lr_scale.fill_(0.5)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    torch.testing.assert_close(a(x)[0], b(x)[0], rtol=1e-12, atol=1e-12)
    assert "inner_lr_scale" not in a.state_dict()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rmsnorm_16bit_on_the_cpu_is_the_fp32_formula(dtype, monkeypatch):
    """Eager 16-bit inference takes PyTorch's fused rms_norm only on CUDA (held to one rounding step in test_gpu.py);
    on the CPU, with or without gradients, the fp32 formula runs (PyTorch's CPU rms_norm rounds twice in 16 bits):
    bit for bit the formula with eps and the weight, and the weight gets its gradient."""
    from ttt.layers import norms
    calls = []
    fused = norms.F.rms_norm
    monkeypatch.setattr(norms.F, "rms_norm", lambda *a, **k: calls.append(1) or fused(*a, **k))
    torch.manual_seed(0)
    norm = norms.RMSNorm(256, eps=1e-3).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(256))
    x = (torch.randn(4, 7, 256) * 0.05).to(dtype)  # small values: eps matters
    xf, wf = x.float(), norm.weight.float()
    slow = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-3) * wf).to(dtype)
    with torch.no_grad():
        fast = norm(x)
    y = norm(x)
    assert calls == [] and fast.dtype == dtype
    assert torch.equal(fast, slow) and torch.equal(y.detach(), slow)
    y.float().sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
