"""The TTT-Linear backward kernels (`ttt/ops/ttt_linear/chunk.py`, `bwd`: the split backward's two chain
variants, `bwd_split.py`, in one time segment and in segments of one group) == torch.autograd through the PyTorch
dual form, called at the kernel level: whole aligned mini-batches from (W0, c0) with a zero
accumulator, non-zero gradients of the final state, checkpoint groups of 2 and 3 mini-batches (several groups,
a partial last one), padded mini-batch rows (b = 8) and a padded head dim (d = 24), every kernel output
NaN-poisoned before the kernel runs. On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import pytest
import torch

from triton_env import DEV  # first: it sets TRITON_INTERPRET before anything imports Triton
from conftest import PoisonTorch
from ttt.ops import TTTInputs, TTTState, make_tau
from ttt.ops.ttt_linear import bwd_split, chunk, dual


def _inputs(B, T, H, d, b, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale + shift).float()

    q, k, v = (r(B, T, H, d) for _ in range(3))
    lr = (torch.rand(B, T, H, generator=g, dtype=torch.float64).float() * 0.9 + 0.05) / d ** 0.5
    delta = r(b, scale=0.1)
    lnw, lnb = r(H, d, scale=0.2, shift=1.0), r(H, d, scale=0.2)
    W0, c0 = r(B, H, d, d, scale=d ** -0.5), r(B, H, d, scale=0.1)
    do, dwT, dcT = r(B, T, H, d), r(B, H, d, d), r(B, H, d)
    return [x.to(DEV) for x in (q, k, v, lr, delta, lnw, lnb, W0, c0)], [x.to(DEV) for x in (do, dwT, dcT)]


def _reference(ins, outs_grad, b):
    """Gradients by autograd through the dual form (fp64): dq, dk, dv, dlr, dtau, dln_w, dln_b, dW0, dc0."""
    ins = [x.double().requires_grad_() for x in ins]
    q, k, v, lr, delta, lnw, lnb, W0, c0 = ins
    tau = make_tau(delta).detach().requires_grad_()
    st = TTTState("linear", (W0, c0), (torch.zeros_like(W0), torch.zeros_like(c0)), 0)
    o, st2 = dual.forward(TTTInputs(q, k, v, lr, tau, lnw, lnb), st)
    do, dwT, dcT = (x.double() for x in outs_grad)
    loss = (o * do).sum() + (st2.params[0] * dwT).sum() + (st2.params[1] * dcT).sum()
    gq, gk, gv, glr, gtau, glnw, glnb, gW0, gc0 = torch.autograd.grad(loss, [q, k, v, lr, tau, lnw, lnb, W0, c0])
    return gq, gk, gv, glr, gtau, glnw, glnb, gW0, gc0


def _kernel(ins, outs_grad, b, group, dtype, impl, segments=None):
    q, k, v, lr, delta, lnw, lnb, W0, c0 = ins
    q, k, v = (x.to(dtype) for x in (q, k, v))
    tau = make_tau(delta)
    _, _, _, ck = chunk.fwd(q, k, v, lr, tau, lnw, lnb, W0, c0, b, group=group)
    do, dwT, dcT = outs_grad
    return chunk.bwd(q, k, v, lr, tau, lnw, lnb, ck, do.to(dtype), dwT, dcT, b, group=group, impl=impl,
                     segments=segments)


def _rel(a, b):
    assert torch.isfinite(a).all(), "non-finite values (an unwritten output?)"
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


NAMES = ["dq", "dk", "dv", "dlr", "dtau", "dln_w", "dln_b", "dW0", "dc0"]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(chunk, "torch", PoisonTorch())
    monkeypatch.setattr(bwd_split, "torch", PoisonTorch())


# (B, T, H, d, b, group): 7 mini-batches of 8 (padded to 16 rows) in groups of 3 (3 + 3 + 1); 5 mini-batches
# of 16 with d = 24 (padded to 32) in groups of 2 (2 + 2 + 1)
CASES = [(1, 56, 2, 16, 8, 3), (2, 80, 1, 24, 16, 2)]


@pytest.mark.parametrize("segments", [None, 3])  # the default (one segment at these lengths) and one group each
@pytest.mark.parametrize("impl", ["split_lean", "split_full"])
@pytest.mark.parametrize("B,T,H,d,b,group", CASES)
def test_linear_bwd_kernel_matches_autograd(B, T, H, d, b, group, impl, segments):
    ins, outs_grad = _inputs(B, T, H, d, b)
    ref = _reference(ins, outs_grad, b)
    got = _kernel(ins, outs_grad, b, group, torch.float32, impl, segments)
    errs = {n: _rel(x, y) for n, x, y in zip(NAMES, got, ref)}
    assert max(errs.values()) < 1e-4, errs


@pytest.mark.parametrize("segments", [None, 3])
@pytest.mark.parametrize("impl", ["split_lean", "split_full"])
def test_linear_bwd_without_a_final_state_gradient(impl, segments):
    """dwT, dcT None (a loss of the outputs alone, a training step's): the gradients of zero ones, with nothing of
    theirs read (the kernel outputs NaN-poisoned, the chain's first segment from zeros)."""
    B, T, H, d, b, group = CASES[0]
    ins, (do, dwT, dcT) = _inputs(B, T, H, d, b)
    ref = _reference(ins, (do, torch.zeros_like(dwT), torch.zeros_like(dcT)), b)
    got = _kernel(ins, (do, None, None), b, group, torch.float32, impl, segments)
    errs = {n: _rel(x, y) for n, x, y in zip(NAMES, got, ref)}
    assert max(errs.values()) < 1e-4, errs


@pytest.mark.parametrize("impl", ["split_lean", "split_full"])
def test_linear_bwd_fp16_operands(impl):
    """fp16 inputs (16-bit products, fp32 statistics) stay close to the fp64 reference."""
    ins, outs_grad = _inputs(1, 48, 2, 16, 16)
    ref = _reference(ins, outs_grad, 16)
    errs = {n: _rel(x, y) for n, x, y in zip(NAMES, _kernel(ins, outs_grad, 16, 2, torch.float16, impl), ref)}
    assert max(errs.values()) < 5e-3, errs
