"""The fused layer kernels (ttt/ops/fused_layer.py) == their PyTorch references: the depthwise causal
conv(s) with and without a window, RoPE at position mod b, the post-LayerNorm x GELU gate; outputs, the new
window and every gradient (input, window, weights, biases), with NaN-poisoned kernel buffers. On CPU the
kernels run in Triton's interpreter.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from triton_env import DEV  # first: it sets TRITON_INTERPRET before anything imports Triton
from conftest import PoisonTorch
from ttt.layers.attention import apply_rope
from ttt.ops import fused_layer


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(fused_layer, "torch", PoisonTorch())


def ref_conv(x, win, w, b):
    """Shifted products over cat(window, x), fp64."""
    W = w.shape[-1]
    B, T, D = x.shape
    win = torch.zeros(B, W - 1, D, dtype=x.dtype) if win is None else win
    xs = torch.cat([win, x], 1)
    y = sum(xs[:, j:j + T] * w[:, 0, j] for j in range(W))
    return (y + b if b is not None else y), xs[:, xs.shape[1] - (W - 1):]


def ref_conv_rope(x, win, wq, bq, wk, bk, pos, b, d, base):
    B, T, D = x.shape
    p = (pos + torch.arange(T)) % b
    q, new = ref_conv(x, win, wq, bq)
    k, _ = ref_conv(x, win, wk, bk)
    q = apply_rope(q.view(B, T, D // d, d), p, base).view(B, T, D)
    k = apply_rope(k.view(B, T, D // d, d), p, base).view(B, T, D)
    return q, k, new


def rel(a, b):
    assert torch.isfinite(a).all(), "non-finite values (an unwritten output?)"
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def leaves(*ts):
    return [None if t is None else t.detach().to(DEV).requires_grad_(True) for t in ts]


@pytest.mark.parametrize("T,pos,with_win,dtype", [(1, 5, True, torch.float32), (37, 0, False, torch.float32),
                                                  (37, 13, True, torch.float32), (70, 3, True, torch.float16)])
def test_conv_rope_matches_reference(T, pos, with_win, dtype):
    g = torch.Generator().manual_seed(T + pos)
    B, D, d, W, b = 2, 48, 16, 4, 16
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    win = torch.randn(B, W - 1, D, generator=g, dtype=torch.float64) if with_win else None
    wq, wk = (torch.randn(D, 1, W, generator=g, dtype=torch.float64) * 0.5 for _ in range(2))
    bq, bk = (torch.randn(D, generator=g, dtype=torch.float64) for _ in range(2))
    rq, rk, rwin = ref_conv_rope(x, win, wq, bq, wk, bk, pos, b, d, 10000.0)
    xr, winr, wqr, bqr, wkr, bkr = leaves(x, win, wq, bq, wk, bk)
    xi, wini = (xr.to(dtype), None if winr is None else winr.to(dtype))
    q, k, nwin = fused_layer.conv_rope(xi, wini, wqr.float(), bqr.float(), wkr.float(), bkr.float(), pos,
                                       mini_batch=b, head_dim=d)
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    assert q.dtype == k.dtype == dtype
    assert rel(q.cpu(), rq) < tol and rel(k.cpu(), rk) < tol
    torch.testing.assert_close(nwin.double().cpu(), rwin, rtol=tol, atol=tol)
    # gradients: every input of the op
    gq, gk = torch.randn(q.shape, generator=g, dtype=torch.float64), torch.randn(k.shape, generator=g,
                                                                                dtype=torch.float64)
    ins = [t for t in (xr, winr, wqr, bqr, wkr, bkr) if t is not None]
    got = torch.autograd.grad((q.double().cpu() * gq).sum() + (k.double().cpu() * gk).sum(), ins)
    refs = [t.detach().cpu().requires_grad_(True) for t in ins]
    names = ["x", "win", "wq", "bq", "wk", "bk"] if with_win else ["x", "wq", "bq", "wk", "bk"]
    kw = dict(zip(names, refs))
    rq2, rk2, _ = ref_conv_rope(kw["x"], kw.get("win"), kw["wq"], kw["bq"], kw["wk"], kw["bk"], pos, b, d, 1e4)
    want = torch.autograd.grad((rq2 * gq).sum() + (rk2 * gk).sum(), refs)
    for n, a, e in zip(names, got, want):
        assert rel(a.cpu(), e) < (5e-3 if dtype == torch.float16 else 1e-5), n


# launches that reach every path of the conv kernels: R rows loaded at once, BC channels per program, programs,
# b: one segment, many segments, a partial channel block; RoPE's angles once per program for R rows (b = 16, 4) or
# for four groups of R (b = 16 > R), else picked per row from every position's (b = 5) or computed per row (b = 32)
LAUNCHES = [(16, 16, 2, 16), (16, 16, 64, 16), (8, 16, 64, 4), (4, 16, 64, 16), (8, 32, 3, 5), (8, 16, 64, 32)]


def test_conv_segments_fill_whole_waves():
    """The time axis is cut so that waves x tiles per segment is least (a latency-bound program walks its tiles at
    the same pace in a partial wave), over up to four waves' worth of segments: against every such count by brute
    force (the fewest within 10% of the least), at the shapes the H200 runs (132 SMs, 3 to 10 programs per SM) and
    small ones; 125m B4 T8k: 4 segments in one wave, not 5 (1.2 waves); 1.3b B4: 3."""
    def cost(rows, columns, programs, bt, n):
        return -(-columns * n // programs) * -(-(-(-rows // bt)) // n)
    for rows, columns, programs, bt in [(8195, 96, 396, 16), (8195, 256, 396, 16), (2051, 384, 396, 16),
                                        (8192, 96, 1320, 16), (32771, 64, 396, 16), (48, 6, 64, 8), (48, 6, 2, 8),
                                        (45, 10, 7, 16)]:
        n = fused_layer._segments(rows, columns, programs, bt)
        counts = range(1, min(-(-rows // bt), 4 * -(-programs // columns)) + 1)
        least = min(cost(rows, columns, programs, bt, m) for m in counts)
        assert n == min(m for m in counts if cost(rows, columns, programs, bt, m) <= 1.1 * least), (rows, columns, n)
    assert fused_layer._segments(8195, 96, 396, 16) == 4 and fused_layer._segments(8195, 256, 396, 16) == 3
    grid, seg, _ = fused_layer.ConvLaunch(R=16, BC=32, warps=1, programs=396).grid(8192 + 3, 768, 4, 16)
    assert grid == (24, 4, 4) and seg * 4 >= 8195 > seg * 3


@pytest.mark.slow
@pytest.mark.parametrize("R,BC,programs,b", LAUNCHES)
@pytest.mark.parametrize("rope", [True, False])
def test_conv_kernels_every_launch(R, BC, programs, b, rope):
    """The conv kernels called with explicit launches == the fp64 reference: outputs, and the gradients of x, the
    window, both convs' weights and biases (rope: two convs + RoPE; else one conv, as the block's pre-conv)."""
    g = torch.Generator().manual_seed(R * 100 + b)
    B, T, D, d, W, pos = 2, 45, 40, 8, 4, 7
    L = fused_layer.ConvLaunch(R=R, BC=BC, warps=1, programs=programs)
    for with_win in (True, False):
        x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
        win = torch.randn(B, W - 1, D, generator=g, dtype=torch.float64) if with_win else None
        wa, wb = (torch.randn(D, 1, W, generator=g, dtype=torch.float64) for _ in range(2))
        ba, bb = (torch.randn(D, generator=g, dtype=torch.float64) for _ in range(2))
        if not rope:
            wb = bb = None
        ins = [t.clone().requires_grad_(True) if t is not None else None for t in (x, win, wa, ba, wb, bb)]
        if rope:
            ra, rb, _ = ref_conv_rope(*ins, pos, b, d, 10000.0)
        else:
            ra, _ = ref_conv(*ins[:4])
            rb = None
        f = (lambda t: None if t is None else t.float().to(DEV))  # noqa: E731
        ya, yb = fused_layer._conv_fwd(f(x), f(win), f(wa), f(ba), f(wb), f(bb), pos, b, d, 10000.0, rope, launch=L)
        assert rel(ya.cpu(), ra) < 1e-5 and (not rope or rel(yb.cpu(), rb) < 1e-5)
        ga = torch.randn(ra.shape, generator=g, dtype=torch.float64)
        gb = torch.randn(ra.shape, generator=g, dtype=torch.float64) if rope else None
        got = fused_layer._conv_bwd(f(x), f(win), f(wa), f(wb), f(ga), f(gb), pos, b, d, 10000.0, rope, launch=L)
        loss = (ra * ga).sum() + ((rb * gb).sum() if rope else 0.0)
        live = [t for t in ins if t is not None]
        want = dict(zip([id(t) for t in live], torch.autograd.grad(loss, live)))
        names = ["x", "win", "wa", "ba", "wb", "bb"]
        for n, t, a in zip(names, ins, [got[0], got[1], got[2], got[3], *(got[4:6] if rope else (None, None))]):
            if t is not None:
                assert rel(a.cpu(), want[id(t)]) < 1e-5, (n, with_win)


@pytest.mark.parametrize("T,with_win", [(1, True), (23, False), (40, True)])
def test_causal_conv_matches_reference(T, with_win):
    g = torch.Generator().manual_seed(T)
    B, D, W = 3, 20, 4
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    win = torch.randn(B, W - 1, D, generator=g, dtype=torch.float64) if with_win else None
    w, bias = torch.randn(D, 1, W, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    ry, rwin = ref_conv(x, win, w, bias)
    xr, winr, wr, br = leaves(x, win, w, bias)
    y, nwin = fused_layer.causal_conv(xr.float(), None if winr is None else winr.float(), wr.float(), br.float())
    assert rel(y.cpu(), ry) < 1e-5
    torch.testing.assert_close(nwin.double().cpu(), rwin, rtol=1e-6, atol=1e-6)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    ins = [t for t in (xr, winr, wr, br) if t is not None]
    got = torch.autograd.grad((y.double().cpu() * gy).sum(), ins)
    refs = [t.detach().cpu().requires_grad_(True) for t in ins]
    ry2, _ = ref_conv(refs[0], refs[1] if with_win else None, refs[-2], refs[-1])
    want = torch.autograd.grad((ry2 * gy).sum(), refs)
    for a, e in zip(got, want):
        assert rel(a.cpu(), e) < 1e-5


def test_bad_shapes_are_named():
    x = torch.zeros(1, 4, 8, device=DEV)
    with pytest.raises(ValueError, match="head_dim"):
        fused_layer.conv_rope(x, None, torch.zeros(8, 1, 4), None, torch.zeros(8, 1, 4), None, 0, mini_batch=16,
                              head_dim=3)
    with pytest.raises(ValueError, match="wk"):
        fused_layer.conv_rope(x, None, torch.zeros(8, 1, 4), None, torch.zeros(7, 1, 4), None, 0, mini_batch=16,
                              head_dim=4)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_fused_layer_equals_reference_layer(kind):
    """A whole (M) TTT layer on the kernel path (backend "triton": fused conv+RoPE, the op's kernels) == the same
    layer on the PyTorch path ("dual"), streamed in two pieces that split a mini-batch: outputs, the carried state
    (conv window, inner weights) and every parameter's gradient."""
    from ttt.layers.ttt import TTTLayer
    torch.manual_seed(0)
    D, H, b = 32, 2, 8
    ref = TTTLayer(D, H, inner=kind, mini_batch=b, backend="dual")
    with torch.no_grad():  # non-trivial LN, conv biases and delta
        for p in (ref.post_norm.weight, ref.post_norm.bias, ref.conv_q.bias, ref.conv_k.bias, ref.delta):
            p.add_(0.1 * torch.randn_like(p))
    fast = TTTLayer(D, H, inner=kind, mini_batch=b, backend="triton", fused=True)
    fast.load_state_dict(ref.state_dict())
    ref, fast = ref.to(DEV), fast.to(DEV)
    x = torch.randn(2, 21, D, device=DEV)
    ys, yr = [], []
    sf = sr = None
    for piece in (x[:, :11], x[:, 11:]):
        y, sf = fast(piece, sf)
        ys.append(y)
        y, sr = ref(piece, sr)
        yr.append(y)
    yf, yr = torch.cat(ys, 1), torch.cat(yr, 1)
    assert rel(yf.cpu(), yr.cpu()) < 1e-4
    assert rel(sf.conv.cpu(), sr.conv.cpu()) < 1e-6
    for a, e in zip(sf.op.params, sr.op.params):
        assert rel(a.cpu(), e.cpu()) < 1e-4
    gy = torch.randn_like(yr)
    (yf * gy).sum().backward()
    (yr * gy).sum().backward()
    for (n, pr), pf in zip(ref.named_parameters(), fast.parameters()):
        assert rel(pf.grad.cpu(), pr.grad.cpu()) < 1e-3, n


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_fused_model_is_causal(kind):
    """A whole (M) model on the fused path (the training default on a GPU: pre-conv, Q/K conv + RoPE and the op
    as kernels): no position's logits move when a later token changes, inside a mini-batch and across them (a
    kernel that read ahead in time would let the training loss see its own targets)."""
    from ttt.config import RunOptions, get_config
    from ttt.model import TTTLM
    torch.manual_seed(0)
    cfg = get_config("debug", mixer=f"ttt_{kind}", backbone="mamba", vocab_size=64, mini_batch=4)
    model = TTTLM(cfg, RunOptions(ttt_backend="triton", fused_layer=True)).to(DEV).eval()
    x = torch.randint(0, 64, (2, 19), device=DEV)
    with torch.no_grad():
        base, _ = model(x)
        for t in (2, 11, 17):  # inside the first mini-batch (of 4), a mini-batch's last token, the partial last one
            y = x.clone()
            y[:, t] = (y[:, t] + 1) % 64
            out, _ = model(y)
            assert (out[:, :t] - base[:, :t]).abs().max().item() < 1e-6, t
            assert (out[:, t] - base[:, t]).abs().max().item() > 1e-3, t


def test_fused_layer_is_auto_and_an_explicit_request_never_falls_back():
    from ttt.layers.ttt import TTTLayer
    x = torch.randn(1, 5, 16, device=DEV)
    plain = TTTLayer(16, 2, backend="triton").to(DEV)
    # the default (auto) runs the kernels around the triton op on CUDA, the PyTorch layer path elsewhere
    assert plain.prepare(x.device, x.dtype).fused == (DEV == "cuda")
    with pytest.raises(ValueError, match="^fused"):
        TTTLayer(16, 2, backend="dual", fused=True).to(DEV)(x)
    with pytest.raises(ValueError, match="^fused"):
        TTTLayer(16, 2, backend="triton", fused=True).double().to(DEV)(x.double())
    with pytest.raises(ValueError, match="^fused"):
        TTTLayer(16, 2, fused="yes")


def test_fused_layer_auto_runs_the_kernels_only_where_the_op_runs_triton_on_cuda():
    """fused=None (auto; `RunOptions(fused_layer=None)`, the planned default): the kernels run exactly where the
    op resolves to its triton backend on a CUDA device; elsewhere the PyTorch layer path, without an error."""
    from ttt.config import RunOptions, get_config
    from ttt.layers.ttt import TTTLayer
    from ttt.model import TTTLM
    # an explicit triton op resolves for a CPU device only in Triton's interpreter (on a GPU machine it is refused)
    for backend in ("triton", "dual", "auto") if os.environ.get("TRITON_INTERPRET") == "1" else ("dual", "auto"):
        layer = TTTLayer(16, 2, backend=backend, fused=None)
        plan = layer.prepare(torch.device("cpu"), torch.float32)
        assert not plan.fused  # a CPU: never, even with the triton op (Triton's interpreter)
        assert layer.prepare(torch.device("cpu"), torch.float64).op.backend == "dual"
    if DEV == "cuda":
        assert TTTLayer(16, 2, backend="triton", fused=None).prepare(torch.device("cuda"), torch.bfloat16).fused
        assert not TTTLayer(16, 2, backend="dual", fused=None).prepare(torch.device("cuda"), torch.bfloat16).fused
    model = TTTLM(get_config("debug", vocab_size=64), RunOptions(ttt_backend="triton", fused_layer=None)).to(DEV)
    assert all(blk.conv.backend == "auto" and blk.mixer.fused is None for blk in model.blocks)
    ref = TTTLM(get_config("debug", vocab_size=64), RunOptions(ttt_backend="triton")).to(DEV)
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (2, 19), device=DEV)
    torch.testing.assert_close(model(ids)[0], ref(ids)[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="fused_layer"):
        RunOptions(fused_layer="auto")


def test_conv_module_explicit_triton_refuses_what_it_cannot_run():
    from ttt.layers.conv import CausalConv1d
    conv = CausalConv1d(5, 4, backend="triton").to(DEV)
    with pytest.raises(ValueError, match="even channel count"):
        conv(torch.zeros(1, 3, 5, device=DEV))
    with pytest.raises(ValueError, match="backend"):
        CausalConv1d(4, 4, backend="cudnn")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_conv_module_runs_in_the_autocast_dtype(backend):
    """Under bf16 autocast an fp32 input (the (M) block's pre-conv gets its RMSNorm's fp32 output) is convolved in
    bf16, as torch's convolutions are under autocast: output, window and every gradient equal the conv of the input
    rounded to bf16 outside autocast, with a bf16 or fp32 window and without; fp32 outside autocast stays fp32."""
    from ttt.layers.conv import CausalConv1d
    torch.manual_seed(0)
    conv = CausalConv1d(16, 4, backend=backend).to(DEV)
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(2, 21, 16, device=DEV, requires_grad=True)
    for win in (None, torch.randn(2, 3, 16, device=DEV, dtype=torch.bfloat16), torch.randn(2, 3, 16, device=DEV)):
        with torch.autocast(DEV, dtype=torch.bfloat16):  # (an fp32 window: a block's `init_state` under autocast)
            y, new = conv(x, win)
        assert y.dtype == new.dtype == torch.bfloat16
        xb = x.detach().bfloat16().requires_grad_(True)
        want, want_new = conv(xb, win)
        torch.testing.assert_close(y, want, rtol=0, atol=0)
        torch.testing.assert_close(new, want_new, rtol=0, atol=0)
        gy = torch.randn_like(y)
        got = torch.autograd.grad((y.float() * gy).sum(), [x, conv.weight, conv.bias])
        exp = torch.autograd.grad((want.float() * gy).sum(), [xb, conv.weight, conv.bias])
        for a, e in zip(got, exp):
            torch.testing.assert_close(a, e.to(a.dtype), rtol=0, atol=0)
    assert conv(x)[0].dtype == torch.float32


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_conv_module_one_token_under_compile(backend, monkeypatch):
    """The block's pre-conv at T = 1 under torch.compile (the compiled decode step): auto leaves the 4-tap sum to
    Inductor (no kernel call, the kernel's result and window), an explicit triton backend keeps the kernel; T > 1
    and eager T = 1 call the kernel under auto too (forced on here: auto picks the kernel on CUDA only)."""
    from ttt.layers import conv as conv_mod
    calls = []
    kernel = fused_layer.causal_conv
    monkeypatch.setattr(fused_layer, "causal_conv", lambda *a, **k: calls.append(a[0].shape[1]) or kernel(*a, **k))
    torch.manual_seed(0)
    m = conv_mod.CausalConv1d(8, 4, backend=backend).to(DEV)
    monkeypatch.setattr(m, "_use_kernel", lambda x: True)
    x, win = torch.randn(2, 1, 8, device=DEV), torch.randn(2, 3, 8, device=DEV)
    y_k, w_k = kernel(x, win, m.weight, m.bias)
    torch._dynamo.reset()
    y, w = torch.compile(m, backend="eager", fullgraph=True)(x, win)
    assert calls == ([] if backend == "auto" else [1])
    torch.testing.assert_close(y, y_k, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w, w_k)
    calls.clear()
    m(x, win)
    m(torch.randn(2, 5, 8, device=DEV), win)
    assert calls == [1, 5]


def test_custom_ops_trace_under_torch_compile():
    """The fake (meta) implementations and autograd registrations: torch.compile (aot_eager: fake-tensor tracing
    of forward and backward, then the real kernels) gives the eager results and gradients."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 16, generator=g).to(DEV).requires_grad_(True)
    wq, wk = (torch.randn(16, 1, 4, generator=g).to(DEV).requires_grad_(True) for _ in range(2))
    bq = torch.randn(16, generator=g).to(DEV).requires_grad_(True)

    def f(x):
        q, k, win = fused_layer.conv_rope(x, None, wq, bq, wk, None, 3, mini_batch=8, head_dim=8)
        y, _ = fused_layer.causal_conv(q, win, wq, bq)
        return (y * k).sum()
    eager = f(x)
    ge = torch.autograd.grad(eager, (x, wq, wk, bq))
    comp = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    gc = torch.autograd.grad(comp, (x, wq, wk, bq))
    torch.testing.assert_close(comp, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)
    # dynamic shapes (what torch.compile turns to when a second length arrives): the backward's fake sizes its
    # partial sums without running the launch search on symbolic lengths
    dyn = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for T in (9, 21):
        xt = torch.randn(2, T, 16, generator=g).to(DEV).requires_grad_(True)
        for a, b in zip(torch.autograd.grad(dyn(xt), (xt, wq, wk, bq)), torch.autograd.grad(f(xt), (xt, wq, wk, bq))):
            torch.testing.assert_close(a, b)
    # packed documents with windows (the boundary checks on the host break the graph; the ops are traced)
    from ttt.ops.packed import packing
    pk = packing(torch.tensor([0, 2, 7, 9]), 9, DEV)
    xp = torch.randn(1, 9, 16, generator=g).to(DEV).requires_grad_(True)
    win = torch.randn(3, 3, 16, generator=g).to(DEV).requires_grad_(True)

    def fp(x):
        q, k, w2 = fused_layer.conv_rope(x, win, wq, bq, wk, None, (1, 2, 3), mini_batch=8, head_dim=8, cu_seqlens=pk)
        y, w3 = fused_layer.causal_conv(q, w2, wq, bq, cu_seqlens=pk)
        return (y * k).sum() + (w3 * w3).sum()
    wrt = (xp, win, wq, wk, bq)
    eager = fp(xp)
    ge = torch.autograd.grad(eager, wrt)
    comp = torch.compile(fp, backend="aot_eager")(xp)
    gc = torch.autograd.grad(comp, wrt)
    torch.testing.assert_close(comp, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_fused_layer_compiles_whole_under_dynamic_shapes(kind):
    """A fused (M) layer under torch.compile(dynamic=True) at two lengths, whole mini-batches and a partial last one
    (what training at a second length in one process turns to): no graph break (the conv backward's fake once gave
    a data-dependent size, and Dynamo broke the graph at the op), outputs and every gradient equal to eager."""
    from torch._dynamo.utils import counters
    from ttt.layers.ttt import TTTLayer
    torch.manual_seed(0)
    layer = TTTLayer(32, 2, inner=kind, mini_batch=8, backend="triton", fused=True).to(DEV)

    def f(x):
        return layer(x)[0]
    torch._dynamo.reset()
    counters.clear()
    comp = torch.compile(f, backend="aot_eager", dynamic=True)
    for T in (16, 21):
        x = torch.randn(2, T, 32, device=DEV, requires_grad=True)
        wrt = [x, *layer.parameters()]
        ye = f(x)
        ge = torch.autograd.grad(ye.square().sum(), wrt)
        yc = comp(x)
        gc = torch.autograd.grad(yc.square().sum(), wrt)
        assert rel(yc.detach().cpu(), ye.detach().cpu()) < 1e-6
        for a, e in zip(gc, ge):
            assert rel(a.cpu(), e.cpu()) < 1e-5
    # a backend failure is a graph break counted as "unimplemented", with the AOT trace "not_ok"
    breaks = {**counters["graph_break"], **counters["unimplemented"]}
    assert not breaks and not counters["aot_autograd"].get("not_ok"), list(breaks)[:1]


@pytest.mark.slow
@pytest.mark.parametrize("learn_lr,d", [(True, 16), (False, 12)])
def test_fused_decode_step_matches_layer_at_every_position(learn_lr, d):
    """The fused TTT-Linear (M) decode step (one kernel: convs, RoPE, inner lr, TTT step, commit, new window) ==
    the reference layer's one-token steps at every position of two mini-batches after a prompt that ends mid
    mini-batch: outputs, inner weights and accumulators, and the conv window, token by token."""
    from ttt.layers.ttt import TTTLayer
    torch.manual_seed(1)
    H, b = 3, 8
    D = H * d
    ref = TTTLayer(D, H, inner="linear", mini_batch=b, backend="dual", learn_lr=learn_lr)
    with torch.no_grad():
        for p in (ref.post_norm.weight, ref.post_norm.bias, ref.conv_q.bias, ref.conv_k.bias, ref.ln_bias,
                  *((ref.delta, ref.lr_bias) if learn_lr else ())):
            p.add_(0.2 * torch.randn_like(p))
    fast = TTTLayer(D, H, inner="linear", mini_batch=b, backend="triton", fused=True, learn_lr=learn_lr)
    fast.load_state_dict(ref.state_dict())
    for m in (ref, fast):  # the inner lr's factors away from 1 (the kernel forms base_lr * scale / d itself)
        m.base_lr *= 0.7
        m.inner_lr_scale.fill_(0.6)
    ref, fast = ref.to(DEV), fast.to(DEV)
    x = torch.randn(2, 5 + 2 * b, D, device=DEV)
    with torch.no_grad():
        _, sr = ref(x[:, :5])
        sf = sr
        for t in range(5, x.shape[1]):
            yr, sr = ref(x[:, t:t + 1], sr)
            yf, sf = fast(x[:, t:t + 1], sf)
            pos = f"position {t} (i = {t % b})"
            assert rel(yf.cpu(), yr.cpu()) < 1e-5, pos
            assert rel(sf.conv.cpu(), sr.conv.cpu()) < 1e-6, pos
            for a, e in zip((*sf.op.params, *sf.op.accum), (*sr.op.params, *sr.op.accum)):
                assert rel(a.cpu(), e.cpu()) < 1e-5 or e.abs().max() == a.abs().max() == 0, pos
            assert sf.op.pos == sr.op.pos == t + 1


def test_owned_state_is_decoded_in_place():
    """A state in the decode form (`decode_state`: the rows form) marked owned (a CUDA-graphed decoder's buffers) is
    updated in place by the fused decode step: the same outputs as the copying step of the plain form, token by
    token through two commits after a prompt that ends inside a mini-batch, with the new weights, rows, flags and
    conv window in the given tensors, its sums (`plain`) the plain step's accumulators and weights; the same
    state not owned is left as it was."""
    from dataclasses import replace

    from ttt.layers.ttt import TTTLayer
    from ttt.ops import RowsState
    torch.manual_seed(2)
    H, d, b = 2, 8, 4
    layer = TTTLayer(H * d, H, inner="linear", mini_batch=b, backend="triton", fused=True).to(DEV)
    P = 5  # a prompt that ends inside a mini-batch (offset 1); its sums count until the commit at position 7
    x = torch.randn(2, P + 2 * b + 2, H * d, device=DEV)
    with torch.no_grad():
        _, s = layer(x[:, :P])
        so = layer.decode_state(s)
        assert isinstance(so.op, RowsState) and so.op.accum[4].eq(1).all()  # the prompt's sums still count
        so = replace(so, op=replace(so.op, params=tuple(p.clone() for p in so.op.params),
                                    accum=tuple(a.clone() for a in so.op.accum)), conv=s.conv.clone(), owned=True)
        for t in range(P, x.shape[1]):
            y, s = layer(x[:, t:t + 1], s)
            given = (*so.op.params, *so.op.accum, so.conv)
            keep = [g.clone() for g in given]
            yn, sn = layer(x[:, t:t + 1], replace(so, owned=False))
            assert all(torch.equal(g, k) for g, k in zip(given, keep)), t  # not owned: untouched
            yo, so = layer(x[:, t:t + 1], so)
            assert so.owned and all(n is g for n, g in zip((*so.op.params, *so.op.accum, so.conv), given)), t
            assert so.op.accum[4].eq(1.0 if t < 7 else 0.0).all(), t
            torch.testing.assert_close(yo, yn, rtol=0, atol=0)
            torch.testing.assert_close(yo, y, rtol=1e-5, atol=1e-6)
            p = so.plain()
            for n, e in zip((*p.op.params, *p.op.accum, p.conv), (*s.op.params, *s.op.accum, s.conv)):
                torch.testing.assert_close(n, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_push_shifts_in_place(dtype):
    """`window_push_`: the window after one token written into the given tensor (rows 1.. then x), x read through
    its row stride; refused for shapes it cannot take."""
    torch.manual_seed(3)
    win = torch.randn(3, 3, 40, device=DEV).to(dtype)
    h = torch.randn(3, 1, 56, device=DEV).to(dtype)
    x = h[:, :, 8:48]  # rows 56 apart
    want = torch.cat([win[:, 1:], x], dim=1)
    assert fused_layer.window_push_(win, x) is win
    torch.testing.assert_close(win, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="^win, x: expected a contiguous window"):
        fused_layer.window_push_(win.transpose(1, 2), x)


def test_owned_pre_conv_window_is_pushed_in_place():
    """The block pre-conv of an owned one-token step (a graphed decode's buffers) writes its new window into the
    given state (no copy), with the same output and window as the functional step; a state that is not owned is
    left as it was. (Under torch.compile: test_decode_compile traces the push in the owned decode step; the GPU
    tests run it in the graphed decode.)"""
    from ttt.layers.conv import CausalConv1d

    torch.manual_seed(4)
    conv = CausalConv1d(24, 4, backend="triton").to(DEV)
    win = torch.randn(2, 3, 24, device=DEV)
    x = torch.randn(2, 1, 24, device=DEV)
    with torch.no_grad():
        keep = win.clone()
        y, new = conv(x, win)
        assert new is not win and torch.equal(win, keep)
        yo, newo = conv(x, win, owned=True)
        assert newo is win
        torch.testing.assert_close(yo, y, rtol=0, atol=0)
        torch.testing.assert_close(win, new, rtol=0, atol=0)
        other = win.to(torch.bfloat16)  # another dtype than x: the functional step (the kernel reads a converted copy)
        _, new2 = conv(x, other, owned=True)
        assert new2 is not other and new2.dtype == x.dtype


def test_owned_model_state_decodes_in_place():
    """A whole model's owned state (as `GraphedDecoder` builds its buffers): one-token steps give the copying
    steps' logits and states, with every block's pre-conv window and TTT state written into the given tensors."""
    from ttt.config import RunOptions, get_config
    from ttt.decode_graph import flatten_state, rebuild_state
    from ttt.model import TTTLM

    torch.manual_seed(5)
    model = TTTLM(get_config("debug", mixer="ttt_linear", vocab_size=64, mini_batch=4),
                  RunOptions(ttt_backend="triton", fused_layer=True)).to(DEV).eval()
    ids = torch.randint(0, 64, (2, 9), device=DEV)
    with torch.no_grad():
        _, s = model(ids[:, :3])
        given = [t.clone() for t in flatten_state(s)]  # the buffers, as a graphed decoder holds them
        for t in range(3, ids.shape[1]):
            so = rebuild_state(s, list(given), pos=t, owned=True)
            logits, s = model(ids[:, t:t + 1], s)
            lo, new = model(ids[:, t:t + 1], so)
            torch.testing.assert_close(lo, logits, rtol=0, atol=0)
            assert all(b.conv is g.conv for b, g in zip(new.blocks, so.blocks))  # pushed in place
            for g, n, e in zip(given, flatten_state(new), flatten_state(s)):
                if n is not g:  # what a step returns as new tensors (a graphed decoder copies them back)
                    g.copy_(n)
                torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_model_decode_state_steps_and_converts_back():
    """`TTTLM.decode_state` puts every fused TTT-Linear layer's state in the rows form (the graphed decoder's
    buffers, owned: written in place); one-token steps on it give the plain steps' logits through a commit after a
    prompt that ends inside a mini-batch, and `plain_state` gives back their states. A model on the PyTorch layer
    path keeps its states as they are; a prefill continues from either form."""
    from ttt.config import RunOptions, get_config
    from ttt.decode_graph import flatten_state, rebuild_state
    from ttt.model import TTTLM
    from ttt.ops import RowsState

    torch.manual_seed(6)
    cfg = get_config("debug", mixer="ttt_linear", vocab_size=64, mini_batch=4)
    model = TTTLM(cfg, RunOptions(ttt_backend="triton", fused_layer=True)).to(DEV).eval()
    ids = torch.randint(0, 64, (2, 13), device=DEV)
    with torch.no_grad():
        _, s = model(ids[:, :3])
        d = model.decode_state(s)
        assert all(isinstance(b.mixer.op, RowsState) for b in d.blocks)
        assert all(x is y for x, y in zip(model.decode_state(d).blocks[0].mixer.op.accum, d.blocks[0].mixer.op.accum))
        d = rebuild_state(d, [t.clone() for t in flatten_state(d)], owned=True)
        given = flatten_state(d)
        for t in range(3, 9):
            lp, s = model(ids[:, t:t + 1], s)
            ld, d = model(ids[:, t:t + 1], d)
            torch.testing.assert_close(ld, lp, rtol=1e-5, atol=1e-5)
            assert all(n is g for n, g in zip(flatten_state(d), given)), t  # in place
        for a, e in zip(flatten_state(model.plain_state(d)), flatten_state(s)):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
        lp, _ = model(ids[:, 9:], s)  # a prefill after the steps, from either form
        ld, _ = model(ids[:, 9:], d)
        torch.testing.assert_close(ld, lp, rtol=1e-5, atol=1e-5)
        ref = TTTLM(cfg, RunOptions(ttt_backend="triton", fused_layer=False)).to(DEV).eval()
        assert all(x.mixer is y.mixer for x, y in zip(ref.decode_state(s).blocks, s.blocks))


# ---------------------------------------------------------------- packed documents (cu_seqlens)
PACKED_LENS = [1, 3, 8, 6, 2, 9]  # b = 4: multiples of b and not, a length 1, two shorter than the conv width
CARRIED = (3, 5, 1, 4, 2, 7)  # the documents' start positions when they continue an earlier call (RoPE per row)
# the default launch (two segments), 4 and 8 rows loaded at once in one-group segments (a partial channel block at
# 32 channels): segments cut documents anywhere
PACKED_LAUNCHES = {"default": None, "r4": fused_layer.ConvLaunch(R=4, BC=16, warps=1, programs=64),
                   "r8": fused_layer.ConvLaunch(R=8, BC=32, warps=1, programs=64)}


def cu_of(lens):
    return torch.tensor([0, *lens]).cumsum(0)


def per_document(f, x, win, lens, pos):
    """f(x_i [1, L, D], win_i [1, W-1, D] or None, pos_i) -> tensors [1, L, D] ..., window [1, W-1, D] for each
    document alone, concatenated: the outputs along time, the windows along rows."""
    outs, cu = [], cu_of(lens).tolist()
    for i, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        outs.append(f(x[:, s:e], None if win is None else win[i:i + 1], pos if isinstance(pos, int) else pos[i]))
    return [torch.cat(parts, 0 if n == len(outs[0]) - 1 else 1) for n, parts in enumerate(zip(*outs))]


@pytest.mark.parametrize("launch", PACKED_LAUNCHES, ids=PACKED_LAUNCHES.keys())
@pytest.mark.parametrize("with_win,start", [(False, "fresh"), (True, "carried")])
@pytest.mark.parametrize("rope", [True, False], ids=["conv_rope", "causal_conv"])
def test_conv_kernels_packed_equal_each_document_alone(rope, with_win, start, launch, monkeypatch):
    """conv_rope (two convs + RoPE at the position in the document mod b) and causal_conv on packed documents ==
    the fp64 reference on each document alone (from its own window row, or zeros, at its own start position):
    outputs, the new windows, and the gradients of x, the windows, every conv's weights and biases."""
    if PACKED_LAUNCHES[launch] is not None:
        monkeypatch.setattr(fused_layer, "conv_launch", lambda *a: PACKED_LAUNCHES[launch])
    g = torch.Generator().manual_seed(11)
    lens, D, d, W, b = PACKED_LENS, 24, 8, 4, 4
    N, T = len(lens), sum(lens)
    pos = CARRIED if start == "carried" else 0
    x = torch.randn(1, T, D, generator=g, dtype=torch.float64)
    win = torch.randn(N, W - 1, D, generator=g, dtype=torch.float64) if with_win else None
    wq, wk = (torch.randn(D, 1, W, generator=g, dtype=torch.float64) for _ in range(2))
    bq, bk = (torch.randn(D, generator=g, dtype=torch.float64) for _ in range(2))
    names = ["x", "win", "wq", "bq", "wk", "bk"] if rope else ["x", "win", "wq", "bq"]
    ref_ins = {n: t.clone().requires_grad_(True) for n, t in zip(names, (x, win, wq, bq, wk, bk)) if t is not None}
    ins = {n: t.detach().float().to(DEV).requires_grad_(True) for n, t in ref_ins.items()}
    r = ref_ins
    if rope:
        want = per_document(lambda xi, wi, p: ref_conv_rope(xi, wi, r["wq"], r["bq"], r["wk"], r["bk"], p, b, d, 1e4),
                            r["x"], r.get("win"), lens, pos)
        got = fused_layer.conv_rope(ins["x"], ins.get("win"), ins["wq"], ins["bq"], ins["wk"], ins["bk"], pos,
                                    mini_batch=b, head_dim=d, cu_seqlens=cu_of(lens))
    else:
        want = per_document(lambda xi, wi, p: ref_conv(xi, wi, r["wq"], r["bq"]), r["x"], r.get("win"), lens, pos)
        got = fused_layer.causal_conv(ins["x"], ins.get("win"), ins["wq"], ins["bq"], cu_seqlens=cu_of(lens))
    assert [t.shape for t in got] == [t.shape for t in want]
    for i, (a, e) in enumerate(zip(got, want)):
        assert rel(a.cpu(), e) < 1e-5, f"output {i}"
    ws = [torch.randn(e.shape, generator=g, dtype=torch.float64) for e in want]
    gw = torch.autograd.grad(sum((e * w).sum() for e, w in zip(want, ws)), list(ref_ins.values()))
    gg = torch.autograd.grad(sum((a.double().cpu() * w).sum() for a, w in zip(got, ws)), list(ins.values()))
    for n, a, e in zip(ref_ins, gg, gw):
        assert rel(a.cpu(), e) < 1e-5, n


def test_conv_module_triton_backend_takes_packed_documents():
    """The block's pre-conv (CausalConv1d, backend 'triton': `causal_conv`) on packed documents == its PyTorch
    packed path (backend 'torch'): outputs, windows and every gradient, with a window per document and without."""
    from ttt.layers.conv import CausalConv1d
    torch.manual_seed(0)
    lens, D = PACKED_LENS, 16
    ref = CausalConv1d(D, 4, backend="torch")
    with torch.no_grad():
        ref.bias.normal_()
    fast = CausalConv1d(D, 4, backend="triton")
    fast.load_state_dict(ref.state_dict())
    ref, fast = ref.to(DEV), fast.to(DEV)
    for with_win in (True, False):
        x = torch.randn(1, sum(lens), D, device=DEV, requires_grad=True)
        win = torch.randn(len(lens), 3, D, device=DEV, requires_grad=True) if with_win else None
        wrt = [x, *([win] if with_win else [])]
        yr, fr = ref(x, win, cu_seqlens=cu_of(lens))
        yf, ff = fast(x, win, cu_seqlens=cu_of(lens))
        assert rel(yf.cpu(), yr.cpu()) < 1e-6 and rel(ff.cpu(), fr.cpu()) < 1e-6
        gy, gf = torch.randn_like(yr), torch.randn_like(fr)
        want = torch.autograd.grad((yr * gy).sum() + (fr * gf).sum(), wrt + list(ref.parameters()))
        got = torch.autograd.grad((yf * gy).sum() + (ff * gf).sum(), wrt + list(fast.parameters()))
        for i, (a, e) in enumerate(zip(got, want)):
            assert rel(a.cpu(), e.cpu()) < 1e-5, (i, with_win)


def packed_layers(kind, seed=0):
    """An (M) layer on the PyTorch layer path and the same weights on the kernel path, both around the dual op
    (the plan set as auto decides it on CUDA, so only the conv kernels differ; tests/test_packed.py checks the
    op's packed paths), fp32, every parameter moved off its init."""
    from test_layers import perturb_

    from ttt.layers.ttt import Plan, TTTLayer
    torch.manual_seed(seed)
    ref = perturb_(TTTLayer(16, 2, inner=kind, mini_batch=4, backend="dual", fused=False), seed + 1)
    ref.base_lr *= 4.0
    fast = TTTLayer(16, 2, inner=kind, mini_batch=4, backend="dual", fused=None)
    fast.load_state_dict(ref.state_dict())
    fast.base_lr = ref.base_lr
    ref, fast = ref.to(DEV), fast.to(DEV)
    key = (torch.device(DEV).type, torch.float32)
    fast._plans[key] = Plan(fast.prepare(torch.device(DEV), torch.float32).op, True)
    return ref, fast


def layer_rows(st, i):
    return [t[i] for t in (*st.op.params, *st.op.accum, st.conv)]


@pytest.mark.parametrize("start", ["fresh", "carried"])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_fused_layer_packed_equals_pytorch_path_and_documents_alone(kind, start, monkeypatch):
    """A TTT layer (mamba backbone) on packed documents with the conv kernels (fused auto) == the PyTorch layer path
    on the same packed input == each document alone: outputs, every final state row (inner weights, accumulators,
    conv window) and the gradients of x and every parameter. "carried": the documents continue from a packed call
    over prefixes of unequal lengths (a window row and a start position per document)."""
    calls, real = [], fused_layer.conv_rope
    monkeypatch.setattr(fused_layer, "conv_rope", lambda *a, **k: calls.append(k["cu_seqlens"]) or real(*a, **k))
    ref, fast = packed_layers(kind)
    g = torch.Generator().manual_seed(5)
    lens = PACKED_LENS
    pre = [3, 5, 1, 4, 2, 7] if start == "carried" else None
    x = torch.randn(1, sum(lens), 16, generator=g).to(DEV).requires_grad_(True)
    xp = None if pre is None else torch.randn(1, sum(pre), 16, generator=g).to(DEV)
    outs = {}
    for name, layer in (("fused", fast), ("torch", ref)):
        st = None if pre is None else layer(xp, cu_seqlens=cu_of(pre))[1]
        y, fin = layer(x, st, cu_seqlens=cu_of(lens))
        outs[name] = [y] + [t for i in range(len(lens)) for t in layer_rows(fin, i)]
        assert fin.pos == tuple(p + n for p, n in zip(pre or [0] * len(lens), lens))
    ys, alone = [], []
    for i, (s, e) in enumerate(zip(cu_of(lens)[:-1].tolist(), cu_of(lens)[1:].tolist())):
        sti = None
        if pre is not None:
            a, b = cu_of(pre)[i].item(), cu_of(pre)[i + 1].item()
            sti = ref(xp[:, a:b])[1]
        yi, fi = ref(x[:, s:e], sti)
        ys.append(yi)
        alone += layer_rows(fi, 0)
    outs["alone"] = [torch.cat(ys, 1)] + alone
    assert len(calls) == (2 if pre else 1) and all(c is not None for c in calls)  # the kernels ran, packed
    g2 = torch.Generator().manual_seed(7)
    ws = [torch.randn(t.shape, generator=g2).to(DEV) for t in outs["alone"]]
    grads = {}
    for name, layer in (("fused", fast), ("torch", ref), ("alone", ref)):
        loss = sum((t * w).sum() for t, w in zip(outs[name], ws))
        grads[name] = torch.autograd.grad(loss, [x, *layer.parameters()], allow_unused=True)
    names = ["x", *(n for n, _ in ref.named_parameters())]
    for other in ("torch", "alone"):
        for i, (a, e) in enumerate(zip(outs["fused"], outs[other])):
            assert rel(a.cpu(), e.cpu()) < 1e-4 or e.abs().max() == a.abs().max() == 0, (other, "value", i)
        for n, a, e in zip(names, grads["fused"], grads[other]):
            if e is None:
                assert a is None or not a.any(), (other, n)
                continue
            assert rel(a.cpu(), e.cpu()) < 1e-3, (other, n)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_fused_true_takes_packed_documents(kind, monkeypatch):
    """fused=True (with the op's triton backend) runs the conv kernels on packed documents (it refused them
    before): the outputs and the states of fused=False on the same packed input."""
    from ttt.layers.ttt import TTTLayer
    calls, real = [], fused_layer.conv_rope
    monkeypatch.setattr(fused_layer, "conv_rope", lambda *a, **k: calls.append(k["cu_seqlens"]) or real(*a, **k))
    torch.manual_seed(0)
    ref = TTTLayer(16, 2, inner=kind, mini_batch=4, backend="triton", fused=False)
    fast = TTTLayer(16, 2, inner=kind, mini_batch=4, backend="triton", fused=True)
    fast.load_state_dict(ref.state_dict())
    ref, fast = ref.to(DEV), fast.to(DEV)
    x, cu = torch.randn(1, 10, 16, device=DEV), cu_of([1, 6, 3])
    with torch.no_grad():
        yr, sr = ref(x, cu_seqlens=cu)
        yf, sf = fast(x, cu_seqlens=cu)
    assert len(calls) == 1 and calls[0] is not None
    assert rel(yf.cpu(), yr.cpu()) < 1e-5 and rel(sf.conv.cpu(), sr.conv.cpu()) < 1e-6 and sf.pos == sr.pos == (1, 6, 3)
    for a, e in zip(sf.op.params, sr.op.params):
        assert rel(a.cpu(), e.cpu()) < 1e-5


def test_merged_decode_weights_follow_their_sources(monkeypatch):
    """The fused decode step with merged input projections (qk, v, gate, lr as one GEMM: `merge_decode_weights`)
    == the step with separate ones, token by token through a commit, and still after the sources change in place
    between two tokens (the copy is rewritten); the merged product is what runs."""
    import copy

    from ttt.layers import merged as merged_mod
    from ttt.layers.ttt import TTTLayer
    torch.manual_seed(3)
    H, d, b = 2, 8, 4
    layer = TTTLayer(H * d, H, inner="linear", mini_batch=b, backend="triton", fused=True).to(DEV)
    fast = copy.deepcopy(layer)
    fast.merge_decode_weights()
    assert fast.merged.sizes == [H * d, H * d, H * d, H]
    splits = []
    split = merged_mod.MergedWeights.split
    monkeypatch.setattr(merged_mod.MergedWeights, "split", lambda self, y: splits.append(1) or split(self, y))
    x = torch.randn(2, 3 + b + 2, H * d, device=DEV)
    with torch.no_grad():
        _, s = layer(x[:, :3])
        sf = s
        for t in range(3, x.shape[1]):
            if t == 5:
                for m in (layer, fast):
                    m.qk_proj.weight.mul_(1.5)
                    m.lr_weight.add_(0.3)
            y, s = layer(x[:, t:t + 1], s)
            yf, sf = fast(x[:, t:t + 1], sf)
            torch.testing.assert_close(yf, y, rtol=1e-5, atol=1e-6, msg=f"token {t}")
    assert len(splits) == x.shape[1] - 3
    fast.merge_decode_weights(False)
    assert fast.merged is None


def test_decode_step_reads_u_v_gate_from_one_tensor(monkeypatch):
    """linear_decode_step with u, v and the lr gate as column ranges of one tensor (the merged projection's output,
    `cols`) == with three separate tensors, bit for bit; columns outside the tensor are refused."""
    from dataclasses import replace

    from benchmarks import bench_layer_kernels
    monkeypatch.setattr(bench_layer_kernels, "DEV", DEV)
    (u, v, gate, *rest), state = bench_layer_kernels.decode_inputs(B=2, D=32, d=16, b=4)
    pad = torch.randn(2, 1, 3, device=DEV).to(u.dtype)  # columns that belong to none of them
    y = torch.cat([pad, u, v, pad, gate], dim=-1)
    cols = (3, 3 + 32, 3 + 64 + 3)
    for i in (1, 3):
        st = replace(state, pos=i)
        ref = fused_layer.linear_decode_step(u, v, gate, *rest, st, mini_batch=4)
        got = fused_layer.linear_decode_step(y, y, y, *rest, st, mini_batch=4, cols=cols)
        for a, b in zip((got[0], got[2], *got[1].params, *got[1].accum), (ref[0], ref[2], *ref[1].params, *ref[1].accum)):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="^u, v, win: expected"):
        fused_layer.linear_decode_step(y, y, y, *rest, state, mini_batch=4, cols=(3, 3 + 64, 0))


def test_decode_step_launch_choices_compute_the_same(monkeypatch):
    """linear_decode_step's launch argument (warps, registers per thread) changes how the kernel runs, not what it
    computes: outputs, state and window equal the default launch's, inside a mini-batch and at its commit
    (benchmarks/bench_layer_kernels.py --decode times the choices)."""
    from dataclasses import replace

    from benchmarks import bench_layer_kernels
    monkeypatch.setattr(bench_layer_kernels, "DEV", DEV)
    args, state = bench_layer_kernels.decode_inputs(B=2, D=32, d=16, b=4)
    for i in (1, 3):
        st = replace(state, pos=i)
        ref = fused_layer.linear_decode_step(*args, st, mini_batch=4)
        for launch in ((8, None), (4, 128), (2, None)):
            o, s, win = fused_layer.linear_decode_step(*args, st, mini_batch=4, launch=launch)
            torch.testing.assert_close(o, ref[0], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(win, ref[2], rtol=0, atol=0)
            for x, y in zip((*s.params, *s.accum), (*ref[1].params, *ref[1].accum)):
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_decode_kernel_benchmark_checks_both_forms(monkeypatch):
    """benchmarks/bench_layer_kernels.py --decode: each launch in both forms (arguments apart; as the model hands them
    over: one merged tensor by columns, the state in the rows form, state and window in place) is checked against
    the apart default before timing; the model form computes the same up to fp32 rounding (its sums come from the
    rows; here on small shapes, with the graph timer stubbed)."""
    from benchmarks import bench_layer_kernels as blk
    monkeypatch.setattr(blk, "DEV", DEV)
    timed = []
    monkeypatch.setattr(blk, "graphed_ms", lambda fns, **kw: (timed.append([fn() for fn in fns]), 1e-3)[1])
    rows = blk.bench_decode_kernel(["default", "4"], positions=(1, 15), B=2, D=32, d=16, b=16)
    assert [(r["launch"], r["form"], r["position"]) for r in rows] == [
        (ln, f, p) for p in (1, 15) for ln in ("default", "4") for f in ("apart", "as in the model")]
    assert all(r["ok"] and r["ms"] == 1e-3 for r in rows) and len(timed) == len(rows)
    assert all(r["max_rel_err"] == 0 for r in rows if r["launch"] == "default" and r["form"] == "apart")
    assert all(r["max_rel_err"] < 1e-5 for r in rows)


def test_conv_benchmark_checks_every_launch_kind(monkeypatch):
    """benchmarks/bench_layer_kernels.py --launches: "default" and R,BC,warps,programs per SM specs become the launch
    the check and the timing pass to both kernels, and each passes the benchmark's check against the fp32 reference
    (here at a small shape: one head of 64 channels), packed documents (--packed) too."""
    from benchmarks import bench_layer_kernels as blk
    monkeypatch.setattr(blk, "DEV", DEV)
    assert blk.conv_launch_of("default", 40, 128, True, 2) is None
    assert blk.conv_launch_of("4,16,1,3", 40, 128, True, 2) == fused_layer.ConvLaunch(4, 16, 1, 6)
    for spec in ("default", "4,16,1,3"):
        for rope in (True, False):
            assert blk.check_conv(1, 40, 64, rope, torch.float32, blk.conv_launch_of(spec, 40, 64, rope, 2)) < 1e-5
    monkeypatch.setattr(blk, "DOC_LENS", (17, 1, 5, 30))  # --packed: 80 rows as documents of 17, 1, 5, 30, 17, 1, 5, 4
    assert torch.equal(blk.packed_docs(80).cpu(), torch.tensor([0, 17, 18, 23, 53, 70, 71, 76, 80]))
    for spec in ("default", "8,16,1,3"):
        for rope in (True, False):
            L = blk.conv_launch_of(spec, 40, 64, rope, 2)
            assert blk.check_conv(2, 40, 64, rope, torch.float32, L, packed=True) < 1e-5


def test_decode_gemm_benchmark_times_both_weight_placements(monkeypatch):
    """benchmarks/bench_layer_kernels.py --gemms: per GEMM one graph over distinct weight copies and one over a
    single weight (here on small shapes, with the graph timer stubbed)."""
    from benchmarks import bench_layer_kernels as blk
    monkeypatch.setattr(blk, "DEV", DEV)
    monkeypatch.setattr(blk, "DECODE_GEMMS", (("small", 40, 72),))
    calls = []
    monkeypatch.setattr(blk, "graphed_ms", lambda fns, **kw: (calls.append([fn() for fn in fns]), 1e-3)[1])
    rows = blk.bench_decode_gemms(B=3, dtype=torch.float32, copies=3)
    assert [r["weights_from"] for r in rows] == ["memory", "L2"] and all(r["us"] == 1.0 for r in rows)
    assert all(len(c) == 3 and c[0].shape == (3, 1, 40) for c in calls)
    assert not torch.equal(calls[0][0], calls[0][1]) and torch.equal(calls[1][0], calls[1][1])
    # --blas: each library's rows in turn, the preference set before them and given back after
    seen = []
    monkeypatch.setattr(torch.backends.cuda, "preferred_blas_library", lambda b=None: seen.append(b) or "before")
    rows = blk.bench_decode_gemms(B=3, dtype=torch.float32, copies=3, blas=("cublas", "cublaslt"))
    assert [r["blas"] for r in rows] == ["cublas", "cublas", "cublaslt", "cublaslt"]
    assert seen == [None, "cublas", "cublaslt", "before"]
    # --gemm-names: only those
    monkeypatch.setattr(blk, "DECODE_GEMMS", (("small", 40, 72), ("other", 24, 16)))
    rows = blk.bench_decode_gemms(B=3, dtype=torch.float32, copies=3, names=["other"])
    assert [(r["gemm"], r["N"]) for r in rows] == [("other", 24), ("other", 24)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rows_mm_equals_the_product(monkeypatch, dtype):
    """ttt.ops.rows_mm (a few-row GEMM, K optionally split over programs): every launch form against the fp32
    product, at masked tails of rows, outputs and K, every element written (poisoned buffers); the partials sum to
    it. fp16 / fp32: Triton's interpreter (3.9) multiplies bf16 tiles wrongly."""
    from ttt.ops import rows_mm as mod
    monkeypatch.setattr(mod, "torch", PoisonTorch())
    g = torch.Generator().manual_seed(3)
    for M, N, K in ((16, 200, 160), (5, 96, 300), (1, 64, 64), (3, 80, 296)):
        x = torch.randn(M, 1, K, generator=g).to(dtype).to(DEV)
        w = torch.randn(N, K, generator=g).to(dtype).to(DEV)
        ref = x.float() @ w.float().T  # [M, 1, N]
        for kw in (dict(BN=64, BK=64, splits=1, swap=True), dict(BN=32, BK=32, splits=3, swap=False),
                   dict(BN=64, BK=32, splits=4, swap=True), dict(BN=16, BK=128, splits=2, swap=False)):
            y = mod.rows_mm(x, w, **kw)
            assert y.shape == (M, 1, N) and y.dtype == dtype
            err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            assert err < (2e-3 if dtype == torch.float16 else 1e-5), (M, N, K, kw, err)
            p = mod.rows_mm(x, w, partials=True, **kw)
            ks = math.ceil(math.ceil(K / kw["BK"]) / kw["splits"]) * kw["BK"]  # each split's K, whole BK steps
            S = math.ceil(K / ks)  # the splits that K gives
            assert p.shape == (S, M, N) and p.dtype == torch.float32
            assert torch.allclose(p.sum(0), ref[:, 0], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="x, w: expected"):
        mod.rows_mm(torch.randn(17, 8, dtype=dtype, device=DEV), torch.randn(4, 8, dtype=dtype, device=DEV))
    with pytest.raises(ValueError, match="launch: expected"):
        mod.rows_mm(torch.randn(2, 32, dtype=dtype, device=DEV), torch.randn(4, 32, dtype=dtype, device=DEV), splits=0)


def test_decode_gemm_benchmark_times_rows_mm_launches(monkeypatch):
    """bench_layer_kernels --gemms --rows-mm: each launch checked against the product, then timed from memory (the
    split ones also without their sum); a failing launch is reported and not timed."""
    from benchmarks import bench_layer_kernels as blk
    monkeypatch.setattr(blk, "DEV", DEV)
    monkeypatch.setattr(blk, "DECODE_GEMMS", (("small", 40, 72),))
    monkeypatch.setattr(blk, "graphed_ms", lambda fns, **kw: ([fn() for fn in fns], 1e-3)[1])
    rows = blk.bench_decode_gemms(B=3, dtype=torch.float32, copies=2, rows_mm=["16,32,1,4,3,0", "64,16,2,4,3,1",
                                                                                 "16,32,0,4,3,0"])
    mm = [r for r in rows if r["blas"] == "rows_mm"]
    assert [r["launch"] for r in mm] == ["16,32,1,4,3,0", "64,16,2,4,3,1", "16,32,0,4,3,0"]
    assert mm[0]["ok"] and mm[0]["max_rel_err"] < 1e-5 and mm[0]["us"] == 1.0 and "us_partials" not in mm[0]
    assert mm[1]["ok"] and mm[1]["us_partials"] == 1.0
    assert not mm[2]["ok"] and "splits=0" in mm[2]["error"] and "us" not in mm[2]


def test_rows_mm_launch_fills_the_gpu_and_few_rows_linear_keeps_f_linear_elsewhere():
    """rows_mm.launch_for: K split over the most programs (1 to 4 splits, never more than K's steps) that keep blocks
    x splits within one program an SM; layers.merged.few_rows_linear: F.linear itself off CUDA, with autograd, or
    past 16 rows."""
    from ttt.layers.merged import few_rows_linear
    from ttt.ops.rows_mm import launch_for
    for N, K in ((6208, 2048), (2048, 2048), (11008, 2048), (2048, 5504), (128, 256), (100000, 4096)):
        for sms in (132, 78):
            L = launch_for(N, K, sms)
            blocks, cap = math.ceil(N / L["BN"]), min(4, math.ceil(K / L["BK"]))
            assert 1 <= L["splits"] <= cap
            assert L["splits"] == 1 or blocks * L["splits"] <= sms  # one wave
            assert L["splits"] == cap or blocks * (L["splits"] + 1) > sms  # the most that fit
    # the 1.3b decode's products on 132 SMs: gate|up and qk|v|gate|lr whole, o and down in 4 parts of K
    assert [launch_for(N, K, 132)["splits"] for N, K in ((11008, 2048), (6208, 2048), (2048, 2048), (2048, 5504))] \
        == [1, 1, 4, 4]
    x, w = torch.randn(3, 1, 40), torch.randn(24, 40)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert torch.equal(few_rows_linear(x, w), torch.nn.functional.linear(x, w))
