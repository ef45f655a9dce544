"""docs/math.md §8 as tests: the facts that tie TTT layers to known sequence models.

- Theorem 1: a linear inner model without LN or residual, batch GD over the whole sequence from W0 = 0
  (eta = 1/2 with loss ||.||^2, i.e. lr = 1 with loss 1/2 ||.||^2) is causal linear attention.
- Theorem 2: a Nadaraya-Watson inner learner with kernel exp(k.q) is causal softmax attention.
- Mini-batch size b = 1 is online GD; b = T is batch GD at the initial weights with tau_i = 1/i.
Every reference here is written independently of the library (own loops, torch's own LayerNorm).
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import random_inputs
from ttt.ops import make_tau
from ttt.ops.generic import ttt_generic

KINDS = ("linear", "mlp")


def test_theorem1_batch_gd_linear_learner_is_linear_attention():
    B, T, H, d = 2, 6, 2, 3
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, d, generator=g, dtype=torch.float64) for _ in range(3))
    i = torch.arange(1, T + 1, dtype=torch.float64)
    tau = make_tau(1.0 - 1.0 / i)  # tau_i = 1: every token uses the plain sum of gradients, no running mean
    assert torch.equal(tau, torch.ones(T, dtype=torch.float64))
    lr = torch.ones(B, T, H, dtype=torch.float64)
    W0 = torch.zeros(H, d, d, dtype=torch.float64)
    o, state = ttt_generic(nn.Linear(d, d, bias=False), q, k, v, lr, tau, None, None, init_params=(W0,),
                           mini_batch=T, residual=False)
    # causal linear attention without normaliser or feature map: o_t = sum_{s <= t} (q_t . k_s) v_s
    expect = torch.zeros_like(q)
    for bi, h, t in itertools.product(range(B), range(H), range(T)):
        for s in range(t + 1):
            expect[bi, t, h] += (q[bi, t, h] @ k[bi, s, h]) * v[bi, s, h]
    torch.testing.assert_close(o, expect, rtol=1e-12, atol=1e-12)
    # the final inner weights are the linear-attention state sum_s v_s k_s^T (nn.Linear stores W^T)
    torch.testing.assert_close(state.params[0], torch.einsum("bthi,bthj->bhij", v, k), rtol=1e-12, atol=1e-12)


class NadarayaWatson:
    """Inner learner whose 'training' memorises (k, v) and whose prediction is the kernel regression
    sum_s exp(k_s . x) v_s / sum_s exp(k_s . x)."""

    def __init__(self):
        self.keys, self.values = [], []

    def train_on_token(self, k, v):
        self.keys.append(k)
        self.values.append(v)

    def predict(self, x):
        w = torch.stack([torch.exp(ks @ x) for ks in self.keys])  # [n]
        return (w[:, None] * torch.stack(self.values)).sum(0) / w.sum()


def test_theorem2_nadaraya_watson_learner_is_softmax_attention():
    B, T, H, d = 2, 7, 2, 4
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=torch.float64) for _ in range(3))
    o = torch.empty_like(q)
    for bi, h in itertools.product(range(B), range(H)):  # one TTT layer per sequence and head
        learner = NadarayaWatson()
        for t in range(T):  # the TTT loop: train on the token's (training view, label view), then predict
            learner.train_on_token(k[bi, h, t], v[bi, h, t])
            o[bi, h, t] = learner.predict(q[bi, h, t])
    expect = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
    torch.testing.assert_close(o, expect, rtol=1e-12, atol=1e-12)


# --- b = 1 is online GD, b = T is batch GD ---------------------------------------------------------------

def inner(kind, W, x):
    """f_res(x; W) for one head, written out: x [d]."""
    if kind == "linear":
        return x @ W[0] + W[1]
    return F.gelu(x @ W[0] + W[1], approximate="tanh") @ W[2] + W[3]


def ln(z, weight, bias):
    return F.layer_norm(z, z.shape[-1:], eps=1e-6) * weight + bias


def token_loss(kind, W, k, v, weight, bias):
    return 0.5 * ((ln(inner(kind, W, k), weight, bias) - (v - k)) ** 2).sum()


def grad_at(kind, W, k, v, weight, bias):
    W = [w.detach().requires_grad_() for w in W]
    return torch.autograd.grad(token_loss(kind, W, k, v, weight, bias), W)


def predict(kind, W, x, weight, bias):
    return x + ln(inner(kind, W, x), weight, bias)


@pytest.mark.parametrize("backend", ["dual", "naive"])
@pytest.mark.parametrize("kind", KINDS)
def test_mini_batch_1_is_online_gd(kind, backend):
    inp = random_inputs(kind, T=6, b=1)
    inp.delta = torch.zeros(1, dtype=torch.float64)  # tau_1 = 1
    o, state = inp.run(backend)
    B, T, H, _ = inp.q.shape
    for bi, h in itertools.product(range(B), range(H)):
        W = [p[h] for p in inp.init]
        lnw, lnb = inp.ln_weight[h], inp.ln_bias[h]
        for t in range(T):
            x = lambda t_: t_[bi, t, h]  # noqa: E731
            grads = grad_at(kind, W, x(inp.k), x(inp.v), lnw, lnb)
            W = [w - inp.lr[bi, t, h] * g for w, g in zip(W, grads)]  # W <- W - lr_t grad l_t(W)
            torch.testing.assert_close(o[bi, t, h], predict(kind, W, x(inp.q), lnw, lnb), rtol=1e-10, atol=1e-11)
        for p, w in zip(state.params, W):
            torch.testing.assert_close(p[bi, h], w, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("backend", ["dual", "naive"])
@pytest.mark.parametrize("kind", KINDS)
def test_mini_batch_T_is_batch_gd(kind, backend):
    T = 6
    inp = random_inputs(kind, T=T, b=T)
    inp.delta = torch.zeros(T, dtype=torch.float64)  # tau_i = 1/i
    o, state = inp.run(backend)
    B, _, H, _ = inp.q.shape
    for bi, h in itertools.product(range(B), range(H)):
        W0 = [p[h] for p in inp.init]
        lnw, lnb = inp.ln_weight[h], inp.ln_bias[h]
        x = lambda t_, t: t_[bi, t, h]  # noqa: E731
        grads = [grad_at(kind, W0, x(inp.k, t), x(inp.v, t), lnw, lnb) for t in range(T)]  # all at W0
        for t in range(T):  # W_t = W0 - (1/t) sum_{s <= t} lr_s grad l_s(W0)   (t 1-based)
            W_t = [w - sum(inp.lr[bi, s, h] * grads[s][j] for s in range(t + 1)) / (t + 1) for j, w in enumerate(W0)]
            torch.testing.assert_close(o[bi, t, h], predict(kind, W_t, x(inp.q, t), lnw, lnb), rtol=1e-10, atol=1e-11)
        for p, w in zip(state.params, W_t):
            torch.testing.assert_close(p[bi, h], w, rtol=1e-10, atol=1e-11)
    assert all(not a.any() for a in state.accum)
