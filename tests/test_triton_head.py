"""The loss head's row kernel (ops/cross_entropy.py) and linear_cross_entropy(impl="triton") against the PyTorch
chunk. On CPU the kernel runs in Triton's interpreter (fp32 and fp16: its numpy has no bf16); bf16 on a GPU."""
from __future__ import annotations

import pytest
import torch

from triton_env import DEV  # first: it sets TRITON_INTERPRET before anything imports Triton
from conftest import rel
from ttt.layers.head import linear_cross_entropy
from ttt.ops.cross_entropy import MAX_BLOCK, rows_nll_grad_

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [53, MAX_BLOCK + 300])  # one block of columns, and two (the online sum's loop)
def test_row_kernel_matches_log_softmax(dtype, V):
    """NLL and softmax - onehot (zero on ignored rows) of the same logits: the NLL within fp32 rounding of
    PyTorch's in fp64, the gradient within one rounding to the logits' dtype; a target outside the vocabulary
    gives NaN; without the gradient the same NLL, the logits left as they are."""
    g = torch.Generator().manual_seed(0)
    n = 6
    lg = (3 * torch.randn(n, V, generator=g)).to(dtype).to(DEV)
    t = torch.randint(0, V, (n,), generator=g).to(DEV)
    t[2] = -100
    t[4] = V - 1  # the last column
    ref = torch.log_softmax(lg.double(), dim=-1)
    keep = t != -100
    want_nll = torch.where(keep, -ref.gather(1, torch.where(keep, t, 0)[:, None])[:, 0], 0.0)
    want_g = (ref.exp() - torch.nn.functional.one_hot(torch.where(keep, t, 0), V)) * keep[:, None]
    out = lg.clone()
    nll = rows_nll_grad_(out, t, -100)
    assert nll.dtype == torch.float32 and out.dtype == dtype
    torch.testing.assert_close(nll.double(), want_nll, rtol=1e-5, atol=1e-5)
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(out.double(), want_g, rtol=tol, atol=tol)
    bad = t.clone()
    bad[1] = V
    assert torch.isnan(rows_nll_grad_(lg.clone(), bad, -100)[1])
    kept = lg.clone()
    assert torch.equal(rows_nll_grad_(kept, t, -100, grad=False), nll) and torch.equal(kept, lg)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_ce_triton_matches_torch(reduction, dtype):
    """impl="triton" against impl="torch": the loss and the gradients of h and the weight, over several chunks
    (the last partial) with ignored rows; per-token losses ("none") weighted row by row, so that each row's output
    gradient is its own."""
    g = torch.Generator().manual_seed(1)
    N, D, V = 45, 32, 300
    h = (torch.randn(N, D, generator=g) / 4).to(dtype).to(DEV).requires_grad_()
    w = (torch.randn(V, D, generator=g) / 4).to(dtype).to(DEV).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g).to(DEV)
    t[[0, 17, 40]] = -100
    got, want = (linear_cross_entropy(h, w, t, reduction=reduction, chunk=16, impl=impl) for impl in ("triton", "torch"))
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert got.shape == want.shape == ((N,) if reduction == "none" else ())
    with torch.no_grad():  # without gradients (evaluation) the same losses
        torch.testing.assert_close(linear_cross_entropy(h, w, t, reduction=reduction, chunk=16, impl="triton"), got)
    scale = torch.linspace(-1, 2, N, device=DEV) if reduction == "none" else torch.tensor(2.0, device=DEV)
    for a, b in zip(torch.autograd.grad((scale * got).sum(), (h, w)), torch.autograd.grad((scale * want).sum(), (h, w))):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * 0.1)
    wf = w.detach()  # a frozen head weight: the gradient of h alone
    got, want = (linear_cross_entropy(h, wf, t, reduction=reduction, chunk=16, impl=impl) for impl in ("triton", "torch"))
    a, b = (torch.autograd.grad((scale * x).sum(), h)[0] for x in (got, want))
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * 0.1)


def test_linear_ce_impl_errors(monkeypatch):
    h, w, t = torch.zeros(4, 3), torch.zeros(5, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"^impl: expected one of \('auto', 'torch', 'triton'\), got 'cuda'$"):
        linear_cross_entropy(h, w, t, impl="cuda")
    with pytest.raises(ValueError, match=r"^impl: 'triton' takes h in bf16, fp16 or fp32, got torch.float64$"):
        linear_cross_entropy(h.double(), w.double(), t, impl="triton")
    if DEV == "cpu":  # outside the interpreter a CPU tensor cannot run the kernel: an error, no fallback
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match=r"^impl: 'triton' needs CUDA tensors \(got cpu\)"):
            linear_cross_entropy(h, w, t, impl="triton")


def test_model_loss_impl_reaches_the_head(monkeypatch):
    """RunOptions(loss_impl="triton"): the model's training loss runs the row kernel (once per chunk) and gives the
    loss and every parameter's gradient of "torch" (fp32, a debug model); the choices are the head's; another
    name is a one-line error."""
    from ttt.config import LOSS_IMPLS, RunOptions, get_config
    from ttt.layers.head import IMPLS
    from ttt.model import TTTLM
    from ttt.ops import cross_entropy

    calls = []
    kernel = cross_entropy.rows_nll_grad_
    monkeypatch.setattr(cross_entropy, "rows_nll_grad_", lambda *a: calls.append(1) or kernel(*a))

    assert LOSS_IMPLS == IMPLS
    torch.manual_seed(0)
    model = TTTLM(get_config("debug", mixer="attention", vocab_size=61)).to(DEV)
    ids, y = torch.randint(0, 61, (2, 21), device=DEV), torch.randint(0, 61, (2, 21), device=DEV)
    out = {}
    for impl in LOSS_IMPLS:
        model.set_run_options(RunOptions(loss_impl=impl))
        loss, _ = model(ids, targets=y, chunk=16)
        out[impl] = [loss.detach(), *torch.autograd.grad(loss, list(model.parameters()))]
    assert len(calls) == 3  # 42 tokens in chunks of 16
    for a, b in zip(out["triton"], out["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"^loss_impl: expected one of \('auto', 'torch', 'triton'\), got 'fused'$"):
        RunOptions(loss_impl="fused")


@pytest.mark.parametrize("dev, dtype, importable, want", [
    ("cuda", torch.bfloat16, True, "triton"), ("cuda", torch.float32, True, "triton"),
    ("cuda", torch.float16, True, "triton"), ("cuda", torch.float64, True, "torch"),
    ("cuda", torch.bfloat16, False, "torch"), ("cpu", torch.float32, True, "torch")])
def test_auto_impl_rule(monkeypatch, dev, dtype, importable, want):
    """impl "auto" (the default of linear_cross_entropy and RunOptions.loss_impl) is the row kernel only for CUDA h
    in 16 bits or fp32 with Triton importable (every reduction); "torch" and "triton" pass through. The rule reads
    h's device and dtype only, so the CUDA cases run on the CPU (the GPU test below runs it on a real tensor)."""
    import ttt.ops
    from ttt.layers.head import resolve_impl
    monkeypatch.setattr(ttt.ops, "triton_available", lambda: (importable, "" if importable else "no"))
    dev = torch.device(dev)
    assert resolve_impl("auto", dev, dtype) == want
    assert [resolve_impl(i, dev, dtype) for i in ("torch", "triton")] == ["torch", "triton"]


@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="needs a CUDA GPU")
def test_gpu_linear_ce_triton_at_the_125m_head():
    """bf16 at the 125m head (D 768, V 32000, 8192 + 1000 rows: a partial second chunk): impl="triton" and "torch"
    equally close to the fp32 loss and gradients, and within 2e-3 of each other; per-token losses by default
    ("auto") come from the row kernel too."""
    from benchmarks.bench_head import fp32_reference, head_inputs, loss_and_grads
    h, w, t = head_inputs(9192, 768, 32000)
    want = fp32_reference(h, w, t)
    got = {impl: loss_and_grads(h, w, t, impl) for impl in ("triton", "torch")}
    from ttt.layers.head import resolve_impl
    assert resolve_impl("auto", h.device, h.dtype) == "triton"  # the default runs the kernel on the GPU
    for a, b, e in zip(got["triton"], got["torch"], want):
        assert rel(a, b) <= 2e-3
        assert rel(a, e) <= 1.1 * rel(b, e) + 1e-4
    with torch.no_grad():
        per_token = {i: linear_cross_entropy(h, w, t, reduction="none", impl=i) for i in ("auto", "triton", "torch")}
    assert torch.equal(per_token["auto"], per_token["triton"])  # the same kernel, bit for bit
    assert not torch.equal(per_token["auto"], per_token["torch"])  # (so the line above tells them apart)
