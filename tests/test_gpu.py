"""GPU-only checks of the pieces whose CUDA path differs from the CPU one: the cuDNN conv, the
Triton backend inside a whole model (outputs and gradients vs the dual form), CUDA-graph decode
(eager and torch.compile'd steps), and one small run of every Triton kernel (what compute-sanitizer checks:
`compute-sanitizer --tool memcheck python3 -m pytest -q -m gpu tests/test_gpu.py -k every_kernel`)."""
import pytest
import torch

from ttt.config import RunOptions, get_config
from ttt.layers.conv import CausalConv1d
from ttt.model import TTTLM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_conv_cuda_path_equals_cpu_path():
    torch.manual_seed(0)
    conv = CausalConv1d(48, 4)
    with torch.no_grad():
        conv.bias.normal_()
    x, s = torch.randn(3, 37, 48), torch.randn(3, 3, 48)
    y_cpu, st_cpu = conv(x, s)
    y_gpu, st_gpu = conv.cuda()(x.cuda(), s.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st_gpu.cpu(), st_cpu)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rmsnorm_cuda_inference_kernel_within_one_rounding(dtype):
    """RMSNorm's eager 16-bit inference path (PyTorch's fused kernel on CUDA) against the fp32 formula: at most one
    step of the dtype's rounding apart (the kernel sums x^2 in its own order), at a model's width and a prefill's
    token count; near zero one step is fp16's subnormal spacing (2^-24), below which no fp16 result can be closer."""
    from ttt.layers.norms import RMSNorm
    torch.manual_seed(0)
    norm = RMSNorm(2048).cuda().to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(2048))
    x = (torch.randn(8, 1024, 2048, device="cuda") * 3).to(dtype)
    xf, wf = x.float(), norm.weight.float()
    slow = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps) * wf
    with torch.no_grad():
        fast = norm(x).float()
    fi = torch.finfo(dtype)
    ulp = slow.abs() * (2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10) + fi.tiny * fi.eps
    bad = (fast - slow).abs() > ulp
    assert not bad.any(), f"{int(bad.sum())} values off by more than one rounding, e.g. {fast[bad][:3]} vs {slow[bad][:3]}"


@pytest.mark.parametrize("mixer", ["ttt_linear", "ttt_mlp"])
def test_model_triton_equals_dual(mixer):
    torch.manual_seed(0)
    cfg = get_config("debug", mixer=mixer, vocab_size=256)
    ref = TTTLM(cfg).cuda()
    fast = TTTLM(cfg, RunOptions(ttt_backend="triton")).cuda()
    fast.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 256, (2, 77), device="cuda")
    for blk in ref.blocks:
        blk.mixer.backend = "dual"
    lr, _ = ref(ids)
    lf, _ = fast(ids)
    torch.testing.assert_close(lf, lr, rtol=2e-3, atol=2e-3)
    lr.logsumexp(-1).mean().backward()
    lf.logsumexp(-1).mean().backward()
    for (n, pr), pf in zip(ref.named_parameters(), fast.parameters()):
        scale = pr.grad.abs().max().clamp_min(1e-6)
        assert (pf.grad - pr.grad).abs().max() / scale < 1e-2, n


def _decode_model(mixer):
    """A debug-size model on the GPU; the suffix "+fused" turns on the fused layer kernels (its decode step is the
    fused decode kernel)."""
    base, _, extra = mixer.partition("+")
    return TTTLM(get_config("debug", mixer=base, vocab_size=256, mini_batch=4),
                 RunOptions(fused_layer=extra == "fused")).cuda()


@pytest.mark.parametrize("mixer", ["ttt_linear", "ttt_linear+fused", "ttt_mlp", "mamba"])
def test_graphed_decode_equals_eager(mixer):
    from ttt.decode_graph import GraphedDecoder
    torch.manual_seed(0)
    model = _decode_model(mixer).eval()
    ids = torch.randint(0, 256, (2, 23), device="cuda")
    with torch.inference_mode():
        _, s = model(ids[:, :6])
        dec = GraphedDecoder(model, s)
        se = s
        for t in range(6, 23):
            le, se = model(ids[:, t:t + 1], se)
            lg = dec.step(ids[:, t:t + 1])
            torch.testing.assert_close(lg, le, rtol=1e-4, atol=1e-4)
        assert dec.state().pos == se.pos == 23


@pytest.mark.parametrize("compile", [False, True])
def test_graphed_decode_follows_weights_changed_in_place(compile):
    """GraphedDecoder's merged weight copies (merge=None, the default, merges normal weights: one GEMM for the TTT
    layer's qk, v, gate and lr projections, one for SwiGLU's gate and up) == an unmerged model's eager steps, also
    after source weights change in place between two tokens (the decoder rewrites the copies before the replay), and
    after the model drops its copies (the decoder keeps the ones its graphs read). A model made under inference_mode
    (inference tensors) is left unmerged by the default and refused by merge=True."""
    import copy

    from ttt.decode_graph import GraphedDecoder
    torch.manual_seed(0)
    model = _decode_model("ttt_linear+fused").eval()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 256, (2, 16), device="cuda")
    with torch.inference_mode():
        _, s = ref(ids[:, :6])
        dec = GraphedDecoder(model, s, compile=compile)
        assert model.blocks[0].mixer.merged is not None and model.blocks[0].ffn.merged is not None
        for t in range(6, 16):
            if t == 9:
                for m in (model, ref):
                    m.blocks[0].mixer.qk_proj.weight.mul_(1.1)
                    m.blocks[1].ffn.up.weight.mul_(0.9)
            if t == 12:  # the model drops its copies: the decoder keeps (and refreshes) the ones its graphs read
                model.merge_decode_weights(False)
                torch.cuda.empty_cache()
                ref.blocks[0].ffn.gate.weight.mul_(1.05)
                model.blocks[0].ffn.gate.weight.mul_(1.05)
            le, s = ref(ids[:, t:t + 1], s)
            torch.testing.assert_close(dec.step(ids[:, t:t + 1]), le, rtol=1e-4, atol=1e-4, msg=f"token {t}")
    with torch.inference_mode():
        frozen = copy.deepcopy(ref).float()  # inference tensors
        _, s = frozen(ids[:, :6])
        dec = GraphedDecoder(frozen, s, compile=compile)
        assert dec.merged == [] and frozen.blocks[0].mixer.merged is None
        torch.testing.assert_close(dec.step(ids[:, 6:7]), frozen(ids[:, 6:7], s)[0], rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="^weights: inference tensors"):
            GraphedDecoder(frozen, s, compile=compile, merge=True)


@pytest.mark.parametrize("mixer", ["ttt_linear", "ttt_linear+fused", "ttt_mlp", "mamba"])
def test_compiled_graphed_decode_equals_eager(mixer):
    """GraphedDecoder(compile=True): Inductor-compiled blocks around the fused Triton step kernels,
    captured; bf16, so Inductor's fused casts differ from eager's by bf16 rounding."""
    from ttt.decode_graph import GraphedDecoder, flatten_state
    torch.manual_seed(0)
    model = _decode_model(mixer).to(torch.bfloat16).eval()
    ids = torch.randint(0, 256, (2, 23), device="cuda")

    def rel(a, b):
        return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()
    with torch.inference_mode():
        _, s = model(ids[:, :6])
        compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        dec = GraphedDecoder(model, s, compile=True)
        # not one compilation per offset: r constant, r symbolic, the commit (decode_graph's docstring)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - compiled <= 3
        se = s
        for t in range(6, 23):  # every offset of the 4, the commits, from a prefill ending mid mini-batch
            le, se = model(ids[:, t:t + 1], se)
            lg = dec.step(ids[:, t:t + 1])
            assert rel(lg, le) < 2e-2, (t, rel(lg, le))
        assert dec.state().pos == se.pos == 23
        for a, b in zip(flatten_state(dec.state()), flatten_state(se), strict=True):
            assert rel(a, b) < 2e-2
        with torch.compiler.set_stance("fail_on_recompile"):  # a second decoder reuses the compiled steps
            GraphedDecoder(model, s, compile=True)


def test_graphed_decode_refuses_attention():
    from ttt.decode_graph import GraphedDecoder
    model = TTTLM(get_config("debug", mixer="attention", vocab_size=256)).cuda()
    with torch.inference_mode():
        _, s = model(torch.randint(0, 256, (1, 5), device="cuda"))
    with pytest.raises(ValueError, match="^model: CUDA-graph decode needs a fixed-size state"):
        GraphedDecoder(model, s)


@pytest.mark.parametrize("kw", [dict(cuda_graph=True), dict(compile_decode=True),
                                dict(compile_decode=True, merge_weights=False)],
                         ids=["graphed", "compiled", "compiled_unmerged"])
def test_generate_with_cuda_graph_equals_eager(kw):
    """generate() through the graphed decode (plain or compiled step; merged weights by default, and without)
    == eager decode, greedy, fp32; the merged copies a generate() made are dropped when it ends."""
    from ttt.generate import generate
    torch.manual_seed(0)
    model = TTTLM(get_config("debug", vocab_size=256, mini_batch=4)).cuda()
    prompt = torch.randint(0, 256, (2, 9))
    a = generate(model, prompt, 20, greedy=True, **kw)
    assert model.decode_weight_copies() == []
    b = generate(model, prompt, 20, greedy=True, cuda_graph=False)
    assert a == b


@pytest.mark.parametrize("what", ["linear", "mlp", "mlp_blocked", "fused"])
def test_every_kernel_runs_once(what):
    """One small forward + backward and one decode step of each kernel family, bf16, at head dims 64 and 96
    (96: padded, and the F-blocked TTT-MLP kernels) from positions 0 and 5 (partial mini-batches); "fused": the
    layer kernels through a whole (M) TTT-Linear layer streamed with a conv window."""
    from ttt.layers.ttt import TTTLinear
    from ttt.ops import TTTInputs, TTTState, make_tau, resolve_op
    from ttt.ops.triton_backend import MLPKernels
    torch.manual_seed(0)
    if what == "fused":
        layer = TTTLinear(128, 2, backend="triton", fused=True).cuda()
        x = torch.randn(2, 37, 128, device="cuda", requires_grad=True)
        y, st = layer(x[:, :20])
        y2, _ = layer(x[:, 20:], st)
        (y.sum() + y2.sum()).backward()
        assert torch.isfinite(x.grad).all()
        with torch.no_grad():  # one token: the fused decode kernel
            y3, _ = layer(x[:, :1].detach(), st.detach())
        assert torch.isfinite(y3).all()
        return
    kind = "linear" if what == "linear" else "mlp"
    kernels = MLPKernels(impl="blocked") if what == "mlp_blocked" else None
    for d, pos, T in ((64, 0, 64), (96, 5, 83)):
        H, b = 2, 16
        shapes = [(d, d), (d,)] if kind == "linear" else [(d, 4 * d), (4 * d,), (4 * d, d), (d,)]
        init = [(0.1 * torch.randn(H, *s, device="cuda")).requires_grad_() for s in shapes]
        st = TTTState.initial(kind, init, 2)
        st = TTTState(kind, st.params, tuple(torch.zeros_like(p) for p in st.params), pos)
        q, k, v = (torch.randn(2, T, H, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        lr = torch.full((2, T, H), 0.1, device="cuda")
        x = TTTInputs(q, k, v, lr, make_tau(torch.zeros(b, device="cuda")), torch.ones(H, d, device="cuda"),
                      torch.zeros(H, d, device="cuda"))
        op = resolve_op(kind, "triton", "cuda", torch.bfloat16, kernels=kernels)
        o, s = op(x, st)
        (o.float().sum() + sum(p.sum() for p in s.params)).backward()
        assert torch.isfinite(o).all() and all(torch.isfinite(t.grad).all() for t in (q, k, v, *init))
        with torch.no_grad():
            o1, _ = op(x.tokens(0, 1), st.detach())  # the fused decode step
        assert torch.isfinite(o1).all()


def test_fused_layer_auto_on_cuda_equals_fused():
    """RunOptions(fused_layer=None) on CUDA runs the fused layer kernels (the same outputs as fused_layer=True)."""
    torch.manual_seed(0)
    cfg = get_config("debug", vocab_size=256, mini_batch=4)
    auto = TTTLM(cfg, RunOptions(fused_layer=None)).cuda()
    fused = TTTLM(cfg, RunOptions(fused_layer=True)).cuda()
    fused.load_state_dict(auto.state_dict())
    ids = torch.randint(0, 256, (2, 37), device="cuda")
    assert all(blk.mixer.prepare(ids.device, torch.float32).fused for blk in auto.blocks)
    torch.testing.assert_close(auto(ids)[0], fused(ids)[0], rtol=0, atol=0)


def test_default_runs_the_fused_layer_on_cuda():
    """The default RunOptions run the fused layer kernels on CUDA (fused_layer=None: auto)."""
    model = TTTLM(get_config("debug", vocab_size=256)).cuda()
    assert all(blk.mixer.prepare(torch.device("cuda"), torch.bfloat16).fused for blk in model.blocks)


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_few_rows_products_at_the_decode_shapes(rows):
    """ops.rows_mm at rows_mm.launch_for's launch (what layers.merged.few_rows_linear runs in a compiled step) at
    the 1.3b decode's four products, bf16, against the fp32 product of the same operands; few_rows_linear compiled
    equals it, and eager is F.linear itself."""
    import torch.nn.functional as F

    from ttt.layers.merged import few_rows_linear
    from ttt.ops.rows_mm import launch_for, rows_mm
    g = torch.Generator(device="cuda").manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for N, K in ((6208, 2048), (2048, 2048), (11008, 2048), (2048, 5504)):
        x = torch.randn(rows, 1, K, device="cuda", generator=g).bfloat16()
        w = (torch.randn(N, K, device="cuda", generator=g) * K ** -0.5).bfloat16()
        y = rows_mm(x, w, **launch_for(N, K, sms))
        ref = F.linear(x.float(), w.float())
        assert y.shape == (rows, 1, N) and y.dtype == torch.bfloat16
        assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < 1e-2, (N, K)
        with torch.no_grad():
            assert torch.equal(few_rows_linear(x, w), F.linear(x, w))
            if (N, K) in ((11008, 2048), (2048, 5504)):  # (a whole and a split launch: each compiles)
                yc = torch.compile(few_rows_linear, fullgraph=True, dynamic=False)(x, w)
                assert ((yc.float() - ref).abs().max() / ref.abs().max()).item() < 1e-2
                if launch_for(N, K, sms)["splits"] <= 2:  # the same sums as rows_mm's (two partials: any order)
                    assert torch.equal(yc, y)
