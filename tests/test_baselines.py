"""Tests of the baseline mixers (ttt/layers/attention.py, ttt/layers/mamba.py): hand-written references,
RoPE against complex numbers, streaming (every split point and token by token), gradients, bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ttt.layers.attention import Attention, KVCache, apply_rope
from ttt.layers.mamba import Mamba2, MambaState

D, T = 16, 11


def make_attention(dtype=torch.float64):
    torch.manual_seed(0)
    m = Attention(D, n_heads=2).to(dtype)
    with torch.no_grad():  # larger weights than the 0.02 init, so the softmax is far from uniform
        m.qkv.weight.normal_(0, 0.5)
    return m


def make_mamba(dtype=torch.float64, chunk_size=4):
    torch.manual_seed(0)
    m = Mamba2(D, d_state=4, expand=2, head_dim=8, conv_width=4, chunk_size=chunk_size).to(dtype)
    with torch.no_grad():  # O(1) signals and large steps, so decay and gating really matter
        m.in_proj.weight.normal_(0, 0.5)
        m.dt_bias.uniform_(-1.0, 1.0)
    return m


def rope_reference(x, positions, base=10000.0):
    """Adjacent pairs as complex numbers, multiplied by e^{i theta}; angles rounded to fp32 like the layer."""
    d = x.shape[-1]
    theta = (positions.float()[:, None] * base ** (-torch.arange(0, d, 2).float() / d)).double()  # [T, d/2]
    c = torch.complex(x[..., 0::2].double(), x[..., 1::2].double())  # [B, T, H, d/2]
    c = c * torch.polar(torch.ones_like(theta), theta)[:, None, :]
    return torch.stack((c.real, c.imag), dim=-1).flatten(-2)  # [B, T, H, d]


def attention_reference(m, x):
    B, T_, _ = x.shape
    H, d = m.n_heads, m.head_dim
    Wq, Wk, Wv = m.qkv.weight.chunk(3, dim=0)
    pos = torch.arange(T_)
    q = rope_reference((x @ Wq.T).view(B, T_, H, d), pos).transpose(1, 2)  # [B, H, T, d]
    k = rope_reference((x @ Wk.T).view(B, T_, H, d), pos).transpose(1, 2)
    v = (x @ Wv.T).view(B, T_, H, d).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # [B, H, T, T]
    future = torch.ones(T_, T_, dtype=torch.bool).triu(1)
    p = scores.masked_fill(future, -math.inf).softmax(-1)
    y = (p @ v).transpose(1, 2).reshape(B, T_, H * d)
    return y @ m.o.weight.T


def mamba_reference(m, x):
    """Token-by-token Mamba-2 written from the equations; returns (y, final ssm state)."""
    B, T_, _ = x.shape
    Di, N, H, P, W = m.d_inner, m.d_state, m.nheads, m.head_dim, m.conv.width
    z, xBC, dt = (x @ m.in_proj.weight.T).split([Di, Di + 2 * N, H], dim=-1)
    xpad = F.pad(xBC, (0, 0, W - 1, 0))  # zeros before the sequence
    w = m.conv.weight[:, 0, :]  # [C, W]
    xBC = torch.stack([(xpad[:, t:t + W] * w.T).sum(1) for t in range(T_)], 1) + m.conv.bias
    xs, Bm, Cm = F.silu(xBC).split([Di, N, N], dim=-1)
    xs = xs.view(B, T_, H, P)
    dt = F.softplus(dt + m.dt_bias)
    A = -torch.exp(m.A_log)
    S = torch.zeros(B, H, P, N, dtype=x.dtype)
    ys = []
    for t in range(T_):
        for h in range(H):
            S_h = torch.exp(dt[:, t, h] * A[h])[:, None, None] * S[:, h] \
                + dt[:, t, h, None, None] * xs[:, t, h, :, None] * Bm[:, t, None, :]
            S = torch.cat([S[:, :h], S_h[:, None], S[:, h + 1:]], 1)
        ys.append((S * Cm[:, t, None, None, :]).sum(-1) + m.D[:, None] * xs[:, t])  # [B, H, P]
    y = torch.stack(ys, 1).reshape(B, T_, Di)
    g = y * F.silu(z)
    g = g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + m.norm.eps) * m.norm.weight
    return g @ m.out_proj.weight.T, S


def state_tensors(s):
    return (s.k, s.v) if isinstance(s, KVCache) else (s.conv, s.ssm)


# ---------------------------------------------------------------- RoPE

def test_apply_rope_rotates_adjacent_pairs_like_complex_numbers():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64)
    positions = torch.tensor([0, 1, 7, 100, 4096])
    y = apply_rope(x, positions)
    torch.testing.assert_close(y, rope_reference(x, positions), rtol=0, atol=1e-12)

    def pair_norm(t):
        return t.unflatten(-1, (-1, 2)).norm(dim=-1)  # [B, T, H, d/2]
    torch.testing.assert_close(pair_norm(y), pair_norm(x), rtol=1e-6, atol=0)
    torch.testing.assert_close(y[:, 0], x[:, 0], rtol=0, atol=0)  # position 0 is the identity


def test_apply_rope_keeps_dtype_and_rejects_bad_positions():
    x = torch.randn(1, 3, 2, 4, dtype=torch.bfloat16)
    assert apply_rope(x, torch.arange(3)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="^positions"):
        apply_rope(x, torch.arange(4))
    with pytest.raises(ValueError, match="^x"):
        apply_rope(x[..., :3], torch.arange(3))


# ---------------------------------------------------------------- references

def test_attention_matches_softmax_reference():
    m = make_attention()
    x = torch.randn(2, T, D, dtype=torch.float64)
    y, state = m(x)
    torch.testing.assert_close(y, attention_reference(m, x), rtol=0, atol=1e-12)
    assert state.pos == T and state.k.shape == (2, 2, T, 8)


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_mamba_chunked_matches_per_token_reference(chunk_size):
    m = make_mamba(chunk_size=chunk_size)
    x = torch.randn(2, T, D, dtype=torch.float64)
    y, state = m(x)
    y_ref, S_ref = mamba_reference(m, x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(state.ssm, S_ref, rtol=0, atol=1e-10)


def test_mamba_gradients_match_reference():
    m = make_mamba()
    x = torch.randn(2, T, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, T, D, dtype=torch.float64)
    params = [x] + list(m.parameters())
    got = torch.autograd.grad((m(x)[0] * w).sum(), params)
    want = torch.autograd.grad((mamba_reference(m, x)[0] * w).sum(), params)
    for g, r in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


def test_mamba_backward_fp32_finite():
    m = make_mamba(torch.float32)
    x = torch.randn(2, T, D, requires_grad=True)
    m(x)[0].square().sum().backward()
    for name, p in [("x", x)] + list(m.named_parameters()):
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- streaming

@pytest.mark.parametrize("make", [make_attention, make_mamba], ids=["attention", "mamba"])
def test_streaming_every_split_and_token_by_token(make):
    m = make()
    x = torch.randn(2, T, D, dtype=torch.float64)
    y_full, s_full = m(x)
    for split in range(1, T):
        y1, s = m(x[:, :split])
        y2, s = m(x[:, split:], s)
        torch.testing.assert_close(torch.cat([y1, y2], 1), y_full, rtol=0, atol=1e-10, msg=f"split {split}")
        for a, b in zip(state_tensors(s), state_tensors(s_full)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=f"state, split {split}")
    s, ys = m.init_state(2), []
    for t in range(T):
        y, s = m(x[:, t:t + 1], s)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), y_full, rtol=0, atol=1e-10)
    for a, b in zip(state_tensors(s), state_tensors(s_full)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    if isinstance(s, KVCache):
        assert s.pos == s_full.pos == T


@pytest.mark.parametrize("make", [make_attention, make_mamba], ids=["attention", "mamba"])
def test_cpu_bf16_autocast_runs_and_stays_close(make):
    m = make(torch.float32)
    x = torch.randn(2, T, D)
    y32, _ = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = m(x[:, :5])
        y_last, s = m(x[:, 5:6], s)  # one-token step on a bf16 state
        y_rest, s = m(x[:, 6:], s)
    y = torch.cat([y, y_last, y_rest], 1).float()
    assert torch.isfinite(y).all()
    assert (y - y32).norm() / y32.norm() < 0.05
    if isinstance(s, MambaState):
        assert s.ssm.dtype == torch.float32


# ---------------------------------------------------------------- init and bad input

def test_init_values():
    m = Mamba2(64, d_state=8, head_dim=8)
    dt = F.softplus(m.dt_bias)
    assert ((dt > 1e-3 * 0.999) & (dt < 1e-1 * 1.001)).all()
    A = -torch.exp(m.A_log)
    assert ((A <= -1) & (A >= -16)).all() and (m.D == 1).all()
    assert abs(m.in_proj.weight.std().item() - 0.02) < 0.002
    a = Attention(64, 4)
    assert abs(a.qkv.weight.std().item() - 0.02) < 0.002 and a.qkv.bias is None and a.o.bias is None
    for sub in m.modules():  # a model may reset every submodule after the layer: the init must survive
        if sub is not m and hasattr(sub, "reset_parameters") and not isinstance(sub, torch.nn.Linear):
            sub.reset_parameters()
    bound = 1 / math.sqrt(m.conv.width)  # Mamba-2 keeps nn.Conv1d's default conv init
    assert m.conv.weight.abs().max() <= bound and m.conv.weight.std() > bound / 2
    s = m.init_state(3)
    assert s.conv.shape == (3, 3, 128 + 16) and s.ssm.shape == (3, 16, 8, 8) and s.ssm.dtype == torch.float32
    assert m.init_state(3, dtype=torch.bfloat16).ssm.dtype == torch.float32


@pytest.mark.parametrize("make", [make_attention, make_mamba], ids=["attention", "mamba"])
def test_bad_input_names_the_argument(make):
    m = make()
    x = torch.randn(2, 3, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="^x"):
        m(x[0])  # rank 2
    with pytest.raises(ValueError, match="^x"):
        m(x[..., :-1])  # wrong width
    with pytest.raises(ValueError, match="^state"):
        m(x, m.init_state(3))  # wrong batch size
    _, s = m(x)
    with pytest.raises(ValueError, match="^state"):
        m(x[:1], s)
