"""The one-token step's product kernels (ttt/ops/decode_products.py) == what they replace: the SwiGLU residual +
(silu(x Wg^T) * (x Wu^T)) Wd^T, in a block's form with the residual sum and the RMSNorm, and the TTT layer's
(LayerNorm(o) * gelu_tanh(g)) Wo^T; at partial row, column and K blocks, both product orientations, strided rows,
NaN-poisoned buffers; the model's SwiGLU and block on them against their PyTorch path; the refusals. On CPU the
kernels run in Triton's interpreter (fp16 and fp32: its bf16 products are wrong); on a GPU also bf16 at the 1.3b
decode's shapes.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed")

from conftest import PoisonTorch  # noqa: E402
from ttt.ops import decode_products as sw  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(sw, "torch", PoisonTorch())


def ref(x, wg, wu, wd, r, dtype):
    """The step in fp32 from the same rounded inputs, with the hidden activation rounded once, as the kernels do."""
    f = lambda t: t.float()  # noqa: E731
    h = (F.silu(f(x) @ f(wg).T) * (f(x) @ f(wu).T)).to(dtype).float()
    y = h @ f(wd).T
    return y if r is None else y + f(r)


def inputs(M, K, Fh, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype).to(DEV)  # noqa: E731
    wgu = r(2 * Fh + 5, K, scale=K ** -0.5)  # a merged copy with padding rows: gate, up as views of it
    return r(M, 1, K), wgu[:Fh], wgu[Fh:2 * Fh], r(N, Fh, scale=Fh ** -0.5), r(M, 1, N)


def err(a, b):
    assert torch.isfinite(a).all(), "non-finite values (an unwritten output?)"
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# (rows, K, hidden, N, launch): rows under one 16-row block, two 32-row blocks' worth (BM 64: one partial block and
# a second program row), K off the BK grid, hidden and N off the BN grid, both orientations of the products
CASES = [
    (1, 96, 48, 32, {"gate_up": (16, 32, 4, 2, False), "down": (16, 32, 4, 2, False)}),
    (5, 200, 80, 48, {"gate_up": (16, 64, 4, 2, True), "down": (32, 32, 2, 2, False)}),
    (16, 128, 64, 64, None),
    (70, 64, 40, 24, {"gate_up": (64, 32, 4, 2, True), "down": (16, 16, 4, 2, True)}),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M,K,Fh,N,launch", CASES)
def test_step_equals_products(M, K, Fh, N, launch, dtype):
    x, wg, wu, wd, r = inputs(M, K, Fh, N, dtype)
    tol = 5e-3 if dtype == torch.float16 else 1e-5
    for res in (r, None):
        y = sw.swiglu_step(x, wg, wu, wd, res, launch=launch)
        assert y.shape == (M, 1, N) and y.dtype == dtype
        assert err(y, ref(x, wg, wu, wd, res, dtype)) < tol


def test_step_reads_strided_rows():
    """x and the residual as column ranges of wider tensors (row stride > K), as a compiled step may hand them."""
    x, wg, wu, wd, r = inputs(6, 64, 32, 16, torch.float16, seed=1)
    xw = torch.zeros(6, 1, 100, dtype=x.dtype, device=DEV)
    rw = torch.zeros(6, 1, 40, dtype=x.dtype, device=DEV)
    xw[..., 10:74], rw[..., 3:19] = x, r
    y = sw.swiglu_step(xw[..., 10:74], wg, wu, wd, rw[..., 3:19])
    assert err(y, ref(x, wg, wu, wd, r, x.dtype)) < 5e-3


def rms_norm(s, w, eps, dtype):
    """`layers.norms.RMSNorm`'s formula: fp32 math, one rounding."""
    sf = s.float()
    return (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M,K,Fh,launch", [(5, 200, 80, {"gate_up": (16, 64, 4, 2, True), "down": (16, 32, 4, 2, False)}),
                                           (16, 64, 48, None),
                                           (5, 200, 80, {"gate_up": (16, 64, 4, 2, True, True)}),
                                           (40, 96, 48, {"gate_up": (32, 32, 4, 2, False, True)})])
def test_block_form_adds_and_normalises(M, K, Fh, launch, dtype):
    """add + norm_weight + residual=True: s + FFN(RMSNorm(s)) with s = x + add rounded (a pre-norm block's sum and
    sub-layer); each part alone too (add without the norm, the norm without add, the residual given apart); the
    RMSNorm's sums before the products' loop and inside it (one_pass)."""
    x, wg, wu, wd, r = inputs(M, K, Fh, K, dtype, seed=2)
    a = (torch.randn(M, 1, K) * 0.5).to(dtype).to(DEV)
    nw = (1 + 0.3 * torch.randn(K)).to(dtype).to(DEV)
    s = (x.float() + a.float()).to(dtype)
    tol = 5e-3 if dtype == torch.float16 else 1e-5
    cases = [(dict(add=a, norm_weight=nw, residual=True), ref(rms_norm(s, nw, 1e-5, dtype), wg, wu, wd, s, dtype)),
             (dict(add=a, residual=True), ref(s, wg, wu, wd, s, dtype)),
             (dict(add=a), ref(s, wg, wu, wd, None, dtype)),
             (dict(norm_weight=nw, residual=r), ref(rms_norm(x, nw, 1e-5, dtype), wg, wu, wd, r, dtype)),
             (dict(norm_weight=nw, residual=True), ref(rms_norm(x, nw, 1e-5, dtype), wg, wu, wd, x, dtype))]
    for kw, want in cases:
        assert err(sw.swiglu_step(x, wg, wu, wd, eps=1e-5, launch=launch, **kw), want) < tol, list(kw)


@pytest.mark.parametrize("bad", ["dtype", "fp64", "w_up", "w_down", "stride", "residual", "residual=True", "add",
                                 "norm_weight"])
def test_step_refuses_bad_arguments(bad):
    x, wg, wu, wd, r = inputs(4, 32, 16, 8, torch.float16)
    args = dict(x=x, w_gate=wg, w_up=wu, w_down=wd, residual=r)
    args.update({"dtype": dict(w_gate=wg.float()), "fp64": dict(x=x.double(), w_gate=wg.double(), w_up=wu.double(),
                                                                   w_down=wd.double()),
                 "w_up": dict(w_up=wu[:8]), "w_down": dict(w_down=wd[:, :8]), "stride": dict(w_down=wd.T.contiguous().T),
                 "residual": dict(residual=r[..., :4]), "residual=True": dict(residual=True),
                 "add": dict(add=x[..., :8]), "norm_weight": dict(norm_weight=x.new_ones(8))}[bad])
    first = bad if bad in ("residual", "residual=True", "add", "norm_weight") else "x, w_gate, w_up, w_down"
    with pytest.raises(ValueError, match=f"^{first}"):
        sw.swiglu_step(**args)


def ref_gated(x, g, lw, lb, w, dtype, eps=1e-6):
    """LayerNorm in fp32 times tanh-GELU of the gate, rounded once (as Inductor's fused kernel), then the product."""
    z = F.layer_norm(x.float(), (x.shape[-1],), lw.float(), lb.float(), eps) * F.gelu(g.float(), approximate="tanh")
    return z.to(dtype).float() @ w.float().T


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M,K,N,launch", [(3, 200, 48, (16, 64, 4, 2, False)), (16, 64, 80, None),
                                          (40, 96, 64, (64, 32, 4, 2, True)), (3, 200, 48, (16, 64, 4, 2, False, True)),
                                          (40, 96, 64, (64, 32, 4, 2, True, True))])
def test_gated_linear_equals_its_parts(M, K, N, launch, dtype):
    """gated_linear_step: the post-LayerNorm (its mean far from 0: the variance about the mean matters), the gate a
    column range of a wider product (as the merged projection's), o_proj; the norm's sums before the products' loop
    and inside it (one_pass: three products, the mean's part taken off after)."""
    g0 = torch.Generator().manual_seed(3)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g0) * scale).to(dtype).to(DEV)  # noqa: E731
    x = r(M, 1, K) + 3.0
    wide = r(M, 1, 3 * K)
    gate = wide[..., K:2 * K]
    lw, lb, w = 1 + r(K, scale=0.2), r(K, scale=0.2), r(N, K, scale=K ** -0.5)
    y = sw.gated_linear_step(x, gate, lw, lb, w, launch=launch)
    assert y.shape == (M, 1, N) and y.dtype == dtype
    assert err(y, ref_gated(x, gate, lw, lb, w, dtype)) < (5e-3 if dtype == torch.float16 else 1e-5)


@pytest.mark.parametrize("bad", ["gate", "w", "ln_bias", "dtype"])
def test_gated_linear_refuses_bad_arguments(bad):
    x = torch.randn(2, 1, 16, device=DEV)
    args = dict(x=x, gate=x.clone(), ln_weight=x.new_ones(16), ln_bias=x.new_zeros(16), w=x.new_ones(8, 16))
    args[{"gate": "gate", "w": "w", "ln_bias": "ln_bias", "dtype": "w"}[bad]] = {
        "gate": x[..., :8], "w": x.new_ones(8, 12), "ln_bias": x.new_zeros(15), "dtype": x.new_ones(8, 16).half()}[bad]
    with pytest.raises(ValueError, match="^x, gate, ln_weight, ln_bias, w: expected"):
        sw.gated_linear_step(**args)


def test_ttt_decode_output_on_the_kernel(monkeypatch):
    """The fused TTT-Linear (M) layer's one-token step (fused=True): its output (post-LN, x gate, o_proj) on
    gated_linear_step, equal to the layer's general path, merged projection weights or not."""
    from ttt.layers.ttt import TTTLinear
    torch.manual_seed(0)
    layer = TTTLinear(64, 2, backend="triton", fused=True, mini_batch=4).to(DEV).eval()
    ref = TTTLinear(64, 2, backend="triton", fused=False, mini_batch=4).to(DEV).eval()
    ref.load_state_dict(layer.state_dict())
    calls = []
    orig = sw.gated_linear_step
    monkeypatch.setattr(sw, "gated_linear_step", lambda *a, **k: calls.append(1) or orig(*a, **k))
    x = torch.randn(3, 6, 64, device=DEV)
    with torch.no_grad():
        for merge in (False, True):
            layer.merge_decode_weights(merge)
            s = sr = None
            for t in range(6):
                y, s = layer(x[:, t:t + 1], s)
                yr, sr = ref(x[:, t:t + 1], sr)
                assert err(y, yr) < 1e-5, (merge, t)
    assert len(calls) == 12


def test_model_swiglu_on_the_kernels_equals_its_pytorch_path():
    """model.SwiGLU's one-token step without gradients: fused=True (the kernels; with a merged copy present,
    which they do not need) against fused=False (its merged and unmerged cuBLAS path), residual given and not; with
    gradients, or T > 1, the PyTorch path runs whatever the option."""
    from ttt.model import SwiGLU
    torch.manual_seed(0)
    m = SwiGLU(48, 80).to(DEV)
    x, r = torch.randn(3, 1, 48, device=DEV), torch.randn(3, 1, 48, device=DEV)
    with torch.no_grad():
        m.fused = False
        want = [m(x), m(x, residual=r)]
        m.merge_decode_weights()
        assert all(err(a, b) < 1e-6 for a, b in zip((m(x), m(x, residual=r)), want))
        m.fused = True
        calls = []
        orig = sw.swiglu_step
        sw_step = lambda *a, **k: calls.append(1) or orig(*a, **k)  # noqa: E731
        sw.swiglu_step = sw_step
        try:
            got = [m(x), m(x, residual=r)]
            m(torch.randn(3, 2, 48, device=DEV))  # T > 1: not the kernels
        finally:
            sw.swiglu_step = orig
        assert len(calls) == 2
        assert all(err(a, b) < 1e-5 for a, b in zip(got, want))
    y = m(x.requires_grad_(True), residual=r)  # with gradients: the autograd path, its gradient flows
    y.sum().backward()
    assert x.grad is not None and err(y.detach(), want[1]) < 1e-6


def test_step_kernels_rules(monkeypatch):
    """`ops.step_kernels`, through model.SwiGLU: the default (None) and False never run the kernels; True wherever
    Triton runs (CUDA, or the interpreter on the CPU) and refuses elsewhere, naming the run option; fp64 and weights
    in another dtype than the input (autocast) take F.linear's path whatever the option. (TRITON_INTERPRET is never
    set here on a GPU machine: a Triton module first imported under it would keep interpreted kernels for the rest
    of the process.)"""
    from ttt.model import SwiGLU
    m = SwiGLU(16, 32).to(DEV)
    x = torch.randn(2, 1, 16, device=DEV)
    assert not m._kernels(x)
    m.fused = False
    assert not m._kernels(x)
    m.fused = True
    assert m._kernels(x)
    assert not m._kernels(x.half())  # fp32 weights, fp16 input
    assert not SwiGLU(16, 32, fused=True).to(DEV).double()._kernels(x.double())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="fused_layer=True"):
        m.cpu()._kernels(x.cpu())


def test_no_ffn_copy_where_the_kernels_run():
    """merge_decode_weights with the decode's batch size (as the graphed decoder calls it): an FFN whose one-token
    steps run on the kernels (fused_layer=True where Triton runs) gets no merged gate|up copy, which they would not
    read; without the batch size, or on the cuBLAS path (fused_layer=False or None), it does."""
    from ttt.config import RunOptions, get_config
    from ttt.model import TTTLM
    cfg = get_config("debug", vocab_size=64, mixer="attention", backbone="transformer")
    for fused, batch_size, copy in ((True, 2, False), (True, None, True), (False, 2, True), (None, 2, True)):
        model = TTTLM(cfg, RunOptions(fused_layer=fused)).to(DEV)
        model.merge_decode_weights(True, batch_size=batch_size)
        assert all((blk.ffn.merged is not None) == copy for blk in model.blocks), (fused, batch_size)


def test_block_passes_its_residual():
    """A decode-shaped block step (one token, no gradients) on the kernels equals the PyTorch path: the residual
    reaches the FFN's second kernel once (not added twice, not dropped)."""
    from ttt.config import RunOptions, get_config
    from ttt.model import TTTLM
    cfg = get_config("debug", vocab_size=64, mixer="attention", backbone="transformer")
    torch.manual_seed(0)
    ref_m = TTTLM(cfg, RunOptions(fused_layer=False)).to(DEV).eval()
    fast = TTTLM(cfg, RunOptions(fused_layer=True)).to(DEV).eval()
    fast.load_state_dict(ref_m.state_dict())
    ids = torch.randint(0, 64, (2, 5), device=DEV)
    with torch.no_grad():
        _, s_ref = ref_m(ids[:, :4])
        _, s_fast = fast(ids[:, :4])
        a, _ = ref_m(ids[:, 4:], s_ref)
        b, _ = fast(ids[:, 4:], s_fast)
    assert err(b, a) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [16, 3, 40])
def test_kernels_at_decode_shapes_gpu(rows, dtype):
    """The 1.3b decode's FFN sub-layer (2048 -> 5504 -> 2048, with the residual sum and the RMSNorm; and the plain
    FFN with a residual) and the TTT output (2048 -> 2048) at the default launches and every launch the benchmark
    times (bf16 too: the interpreter cannot)."""
    from benchmarks.bench_layer_kernels import MLP_LAUNCHES, mlp_launch
    x, wg, wu, wd, r = inputs(rows, 2048, 5504, 2048, dtype)
    a = (torch.randn(rows, 1, 2048, device=DEV) * 0.5).to(dtype)
    nw = (1 + 0.3 * torch.randn(2048, device=DEV)).to(dtype)
    s = (x.float() + a.float()).to(dtype)
    want_plain = ref(x, wg, wu, wd, None, dtype)
    want_block = ref(rms_norm(s, nw, 1e-6, dtype), wg, wu, wd, None, dtype)
    g0 = torch.Generator(device=DEV).manual_seed(5)
    o, g = (torch.randn(rows, 1, 2048, device=DEV, generator=g0).to(dtype) for _ in range(2))
    lw, lb = (1 + 0.1 * torch.randn(2048, device=DEV)).to(dtype), (0.1 * torch.randn(2048, device=DEV)).to(dtype)
    wo = (torch.randn(2048, 2048, device=DEV) * 2048 ** -0.5).to(dtype)
    want_out = ref_gated(o, g, lw, lb, wo, dtype)
    for spec in MLP_LAUNCHES:
        L = mlp_launch(spec)
        if spec.startswith("out:") or spec == "default":
            assert err(sw.gated_linear_step(o, g, lw, lb, wo, launch=(L or {}).get("out")), want_out) < 1e-2, spec
        if not spec.startswith("out:"):
            y = sw.swiglu_step(x, wg, wu, wd, r, launch=L)
            assert err(y.float() - r.float(), want_plain) < 1e-2, spec
            y = sw.swiglu_step(x, wg, wu, wd, True, add=a, norm_weight=nw, launch=L)
            assert err(y.float() - s.float(), want_block) < 1e-2, spec


def test_sublayer_benchmark_checks_every_variant(monkeypatch):
    """benchmarks/bench_layer_kernels.py --mlp at small shapes (graph timer and torch.compile stubbed): the FFN
    sub-layer's and the TTT output's cuBLAS paths and each launch checked against fp32 products and timed over
    distinct weight copies; a wrong kernel fails its check and is not timed."""
    from benchmarks import bench_layer_kernels as blk
    monkeypatch.setattr(blk, "DEV", DEV)
    monkeypatch.setattr(torch, "compile", lambda **kw: (lambda f: f))
    calls = []
    monkeypatch.setattr(blk, "graphed_ms", lambda fns, **kw: (calls.append([fn() for fn in fns]), 1e-3)[1])
    launches = ["default", "gate_up:16,32,4,2", "down:16,16,2,2,swap", "out:16,16,2,2,swap"]
    rows = blk.bench_decode_mlp(launches, B=3, D=32, hidden=40, dtype=torch.float32, copies=2)
    assert [r["variant"].split()[-1] for r in rows] == ["path)", *launches[:3], "path)", "default", launches[3]]
    assert [r["kernel"][:13] for r in rows] == ["decode swiglu"] * 4 + ["decode output"] * 3
    assert all(r["ok"] and r["max_rel_err"] < 1e-5 and r["us"] == 1.0 for r in rows)
    assert all(len(c) == 2 and not torch.equal(c[0], c[1]) for c in calls)  # a weight copy each
    orig = sw._launch  # the down kernel leaves the mixer's output out of the residual
    monkeypatch.setattr(sw, "_launch", lambda k, *a, **m: orig(k, *a, **({**m, "R_ADD": False} if "R_ADD" in m else m)))
    rows = blk.bench_decode_mlp(["default"], B=3, D=32, hidden=40, dtype=torch.float32, copies=2)
    assert rows[0]["ok"] and not rows[1]["ok"] and "us" not in rows[1] and all(r["ok"] for r in rows[2:])
