"""Triton kernels == the PyTorch dual form: outputs, final state (params and accum) and every gradient
(q, k, v, lr, tau via delta, LN weight/bias, initial params, initial accum), at odd lengths, from
non-zero positions with pending accumulators, with every kernel output NaN-poisoned before the kernel
runs. On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/triton_env.py
before Triton is imported) in fp32/fp16 at small shapes; bf16 and full-size shapes run only on a GPU (marked `gpu`).
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from triton_env import DEV, triton  # first: it sets TRITON_INTERPRET before anything imports Triton
from conftest import PoisonTorch, check_against_dual, random_inputs, rel
from ttt.ops import TTTInputs, TTTState, resolve_op
from ttt.ops.ttt_linear import bwd_split as lin_bwd_split, chunk as lin_chunk
from ttt.ops.ttt_linear import step_triton as lin_step_triton
from ttt.ops import triton_backend
from ttt.ops.ttt_mlp import chunk as mlp_chunk, chunk_blocked as mlp_blocked
from ttt.ops.ttt_mlp import step_triton as mlp_step_triton

tl = triton.language
CPU_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    for mod in (lin_chunk, lin_bwd_split, mlp_chunk, mlp_blocked, lin_step_triton, mlp_step_triton):
        monkeypatch.setattr(mod, "torch", PoisonTorch())


def to_dev(inp):
    if DEV == "cpu":
        return inp
    for name in ("q", "k", "v", "lr", "delta", "ln_weight", "ln_bias"):
        setattr(inp, name, getattr(inp, name).detach().to(DEV).requires_grad_(getattr(inp, name).requires_grad))
    inp.init = tuple(p.detach().to(DEV).requires_grad_(p.requires_grad) for p in inp.init)
    if inp.accum is not None:
        inp.accum = tuple(a.detach().to(DEV).requires_grad_(a.requires_grad) for a in inp.accum)
    return inp


def run_triton(inp, linear=None):
    """The triton backend on the whole input, with explicit TTT-Linear kernel choices (None: the defaults)."""
    if linear is None:
        return inp.run("triton")
    return triton_backend.TritonOp(inp.kind, linear)(inp.inputs(), inp.state())


def compare(kind, *, B, T, H, d, b, pos, dtype=torch.float32, grad=True, tol=1e-4, seed=0, linear=None):
    inp = to_dev(random_inputs(kind, B=B, T=T, H=H, d=d, b=b, pos=pos, dtype=dtype, seed=seed,
                               requires_grad=grad))
    return check_against_dual(inp, lambda: run_triton(inp, linear), T=T, pos=pos, dtype=dtype, grad=grad, tol=tol,
                              label=f"{kind} B{B} T{T} H{H} d{d} b{b} pos{pos}")


@triton.jit
def _order_combine(a0, b0, a1, b1):  # order-sensitive in both values
    return a0 * 0.5 + a1, tl.maximum(b0, b1) - 0.25 * b1


@triton.jit
def _reduce_kernel(x_ptr, y_ptr, s_ptr, m_ptr, AX: tl.constexpr, KEEP: tl.constexpr):
    r = tl.arange(0, 8)
    c = tl.arange(0, 16)
    x = tl.load(x_ptr + r[:, None] * 16 + c[None, :])
    y = tl.load(y_ptr + r[:, None] * 16 + c[None, :])
    s, m = tl.reduce((x, y), AX, _order_combine, keep_dims=KEEP)
    o = tl.arange(0, 16 if AX == 0 else 8)
    tl.store(s_ptr + o, tl.reshape(s, [16 if AX == 0 else 8]))
    tl.store(m_ptr + o, tl.reshape(m, [16 if AX == 0 else 8]))


@pytest.mark.skipif(not CPU_INTERPRET, reason="a helper of Triton's CPU interpreter (tests/conftest.py)")
def test_interpreter_sliced_reduction_equals_its_own(monkeypatch):
    """conftest's faster generic reduction for the interpreter (`_sliced_reduce`) computes what the interpreter's own
    does, bit for bit: the same combines in the same order (an order-sensitive combine, both axes, keep_dims)."""
    from triton.runtime import interpreter
    assert interpreter.ReduceOps.generic_reduce.__name__ == "_sliced_reduce"  # installed
    x, y = torch.randn(8, 16), torch.randn(8, 16)
    for ax in (0, 1):
        for keep in (False, True):
            outs = []
            for reduce in (interpreter.ReduceOps.generic_reduce, interpreter.ReduceOps.original_generic_reduce):
                monkeypatch.setattr(interpreter.ReduceOps, "generic_reduce", reduce)
                s, m = torch.empty(16 if ax == 0 else 8), torch.empty(16 if ax == 0 else 8)
                _reduce_kernel[(1,)](x, y, s, m, AX=ax, KEEP=keep)
                outs.append((s, m))
            assert outs[0][0].equal(outs[1][0]) and outs[0][1].equal(outs[1][1]), (ax, keep)


# (B, T, H, d, b, pos): aligned; odd length with head and tail pieces and a padded head dim; b = 8
# (padded mini-batch rows) over several checkpoint groups; an aligned start whose (zero) accumulator
# requires grad; a start one token before a mini-batch boundary; b = 4 and b = 64 (the ablation's sweep); a head dim
# below the 16 that tl.dot takes on the GPU (d = 8 padded to 16).
LINEAR_CASES = [(2, 37, 2, 16, 16, 0), (1, 75, 2, 24, 16, 5), (1, 150, 1, 16, 8, 3), (1, 64, 1, 16, 16, 32),
                (1, 40, 1, 16, 16, 15), (1, 42, 2, 16, 4, 3), (1, 150, 1, 16, 64, 5), (1, 21, 2, 8, 4, 2)]


@pytest.mark.parametrize("fwd", ["split", "fused"])
@pytest.mark.parametrize("B,T,H,d,b,pos", LINEAR_CASES)
def test_linear_matches_dual(B, T, H, d, b, pos, fwd):
    """Both forwards (the walk with the outputs, or the walk alone and the outputs per checkpoint group: groups of
    3 mini-batches here, so that the cases end inside a group; 2 of 64, the most rows a split group takes) with the
    backward."""
    kernels = triton_backend.LinearKernels(fwd=fwd, group=3 if 3 * b <= 128 else 2)
    compare("linear", B=B, T=T, H=H, d=d, b=b, pos=pos, linear=kernels)


# the split backward through the backend: odd length with head/tail pieces and a padded head dim over two
# checkpoint groups (3 + 1 mini-batches); b = 8 (padded rows) over several groups from a mid-mini-batch start
@pytest.mark.parametrize("impl", ["split_lean", "split_full"])
@pytest.mark.parametrize("B,T,H,d,b,pos", [(1, 75, 2, 24, 16, 5), (1, 150, 1, 16, 8, 3)])
def test_linear_split_bwd_matches_dual(B, T, H, d, b, pos, impl):
    compare("linear", B=B, T=T, H=H, d=d, b=b, pos=pos, linear=triton_backend.LinearKernels(bwd=impl, group=3))


@pytest.mark.parametrize("fwd", ["split", "fused"])
@pytest.mark.parametrize("which", ["q", "k", "v", "lr"])
def test_linear_nan_does_not_leak_backwards(which, fwd):
    """A NaN at position 20 (b = 16: the fifth row of the second mini-batch) leaves outputs 0..19 exactly as in a
    run without it (masking by multiplication made rows 16..19 NaN: 0 * NaN); output 20 is NaN."""
    inp = to_dev(random_inputs("linear", B=1, T=48, H=1, d=16, b=16, pos=0, dtype=torch.float32))
    kernels = triton_backend.LinearKernels(fwd=fwd)
    o_clean, _ = run_triton(inp, kernels)
    x = getattr(inp, which).clone()
    x[:, 20] = float("nan")
    o, _ = run_triton(setattr(inp, which, x) or inp, kernels)
    assert torch.equal(o[:, :20], o_clean[:, :20])
    assert torch.isnan(o[:, 20]).all()


def test_linear_kernels_choice_is_checked():
    with pytest.raises(ValueError, match=r"^LinearKernels.bwd: expected one of \('auto', 'split', 'split_lean', "
                       r"'split_full', 'split_gluon'\), got 'v1'"):
        triton_backend.LinearKernels(bwd="v1")
    with pytest.raises(ValueError, match=r"^LinearKernels.fwd: expected one of \('auto', 'fused', 'split', "
                       r"'auto_gluon', 'fused_gluon', 'split_gluon'\), got 'x'"):
        triton_backend.LinearKernels(fwd="x")


# TTT-MLP: every kernel pair (mlp_impl) is compared with the dual form in tests/test_triton_mlp.py.


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_fp16_forward(kind):
    compare(kind, B=1, T=48, H=2, d=16, b=16, pos=0, dtype=torch.float16, grad=False, tol=5e-3)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_half_initial_state_with_a_partial_last_mini_batch(kind):
    """From position 0 with the initial state in the inputs' half dtype (a model cast to fp16/bf16) and a length
    that ends inside a mini-batch: the tail's accumulators are computed from that state (once a dtype error)."""
    compare(kind, B=1, T=40, H=2, d=16, b=16, pos=0, dtype=torch.float16, tol=3e-2)


@pytest.mark.parametrize("pos", [0, 3, 15, 31])
def test_linear_step_kernel(pos):
    """The fused decode kernel (T = 1), including the commit at the last token of a mini-batch."""
    compare("linear", B=2, T=1, H=3, d=24, b=16, pos=pos, grad=False)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_step_chain_equals_forward(kind):
    """Steps through two mini-batches one token at a time == one forward, outputs and state."""
    inp = to_dev(random_inputs(kind, B=1, T=20, H=2, d=16, b=8, pos=0, dtype=torch.float32))
    o_ref, s_ref = inp.run("dual")
    st, outs = inp.state(), []
    for t in range(inp.q.shape[1]):
        o, st = inp.run("triton", start=t, stop=t + 1, state=st)
        outs.append(o)
    assert rel(torch.cat(outs, 1), o_ref) < 1e-5
    for x, y in zip(st.params, s_ref.params):
        assert rel(x, y) < 1e-5


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_split_calls_equal_one_call(kind):
    """Prefill in two calls (the split inside a mini-batch) == one call."""
    inp = to_dev(random_inputs(kind, B=1, T=53, H=1, d=16, b=16, pos=0, dtype=torch.float32))
    o_ref, s_ref = inp.run("triton")
    o_a, st = inp.run("triton", 0, 21)
    o_b, st = inp.run("triton", 21, None, state=st)
    assert rel(torch.cat([o_a, o_b], 1), o_ref) < 1e-5
    for x, y in zip(st.params + st.accum, s_ref.params + s_ref.accum):
        assert (x - y).abs().max() < 1e-5


def test_no_grad_skips_checkpoints():
    """Inference forward saves no checkpoints (nothing requires grad) and still matches."""
    compare("linear", B=1, T=32, H=1, d=16, b=16, pos=0, grad=False)


def test_auto_picks_triton_on_cuda_only():
    from ttt.ops import resolve_backend, triton_available
    assert triton_available()[0]
    assert resolve_backend("auto", torch.device("cpu")) == "dual"
    if torch.cuda.is_available():
        assert resolve_backend("auto", torch.device("cuda")) == "triton"


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("d,pos", [(64, 0), (128, 5), (96, 16)])
def test_gpu_bf16(kind, d, pos):
    compare(kind, B=2, T=300, H=4, d=d, b=16, pos=pos, dtype=torch.bfloat16, tol=3e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("which", ["k", "v"])
def test_gpu_nonfinite_token_reaches_no_earlier_output(kind, which):
    """On the GPU's compiler (FMA contraction made a first finiteness test wrong there, not in the interpreter):
    a NaN at token 20 (b = 16, d = 64, bf16) leaves outputs 0..19 bit-identical and makes output 20 NaN."""
    inp = to_dev(random_inputs(kind, B=1, T=64, H=2, d=64, b=16, pos=0, dtype=torch.bfloat16))
    with torch.no_grad():
        o_clean, _ = inp.run("triton")
        x = getattr(inp, which).clone()
        x[:, 20] = float("nan")
        o, _ = (setattr(inp, which, x) or inp).run("triton")
    assert torch.isfinite(o_clean).all()
    assert torch.equal(o[:, :20], o_clean[:, :20]) and torch.isnan(o[:, 20]).all()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_gpu_fp32_long(kind):
    torch.backends.cuda.matmul.allow_tf32 = False
    compare(kind, B=2, T=1037, H=4, d=64, b=16, pos=7, tol=1e-4)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("fwd", ["split", "fused"])
def test_gpu_linear_fwd_impls(fwd, d, dtype, tol):
    """Both TTT-Linear forwards on the GPU's compiler (tensor-core products, the split's 64-row output tiles):
    outputs, final state and every gradient against the dual form, over several checkpoint groups and a partial
    last mini-batch."""
    torch.backends.cuda.matmul.allow_tf32 = False
    compare("linear", B=2, T=1037, H=4, d=d, b=16, pos=7, dtype=dtype, tol=tol,
            linear=triton_backend.LinearKernels(fwd=fwd))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fwd", ["split", "fused"])
def test_gpu_linear_nonfinite_both_forwards(fwd):
    """As above for TTT-Linear's two forwards, the NaN in k at token 150 (the second checkpoint group's output
    tile): outputs 0..149 bit-identical, 150 on NaN."""
    inp = to_dev(random_inputs("linear", B=1, T=300, H=2, d=64, b=16, pos=0, dtype=torch.bfloat16))
    kernels = triton_backend.LinearKernels(fwd=fwd)
    with torch.no_grad():
        o_clean, _ = run_triton(inp, kernels)
        x = inp.k.clone()
        x[:, 150] = float("nan")
        o, _ = run_triton(setattr(inp, "k", x) or inp, kernels)
    assert torch.isfinite(o_clean).all()
    assert torch.equal(o[:, :150], o_clean[:, :150]) and torch.isnan(o[:, 150:]).all()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("d,pos", [(64, 0), (128, 5)])
@pytest.mark.parametrize("impl", ["split_lean", "split_full"])
def test_gpu_linear_split_bwd(dtype, tol, d, pos, impl):
    torch.backends.cuda.matmul.allow_tf32 = False
    compare("linear", B=2, T=1037, H=4, d=d, b=16, pos=pos, dtype=dtype, tol=tol,
            linear=triton_backend.LinearKernels(bwd=impl))


@pytest.mark.parametrize("impl,segments,scratch", [("split_lean", 0, ""), ("split_full", 0, ""), ("split_full", 3, ""),
                                                    ("split_lean", 2, "bf16")])
def test_linear_bwd_op_fake_matches_the_kernels(impl, segments, scratch):
    """The TTT-Linear backward op returns partial sums (one row per row, head and checkpoint group, whichever chain
    and however many segments run): its fake implementation (what torch.compile traces with) gives every output's
    shape, dtype and strides as the kernels make them (torch.library.opcheck)."""
    from ttt.ops.triton_utils import batch_rows
    inp = to_dev(random_inputs("linear", B=2, T=80, H=2, d=16, b=8, pos=0, dtype=torch.float32))
    W0, c0 = inp.state().params
    rows = batch_rows(2, 80, 8, 2, DEV)
    meta = (rows.span, False, rows.nmb, rows.slots, True, 8, 2)
    x = (inp.q, inp.k, inp.v, inp.lr, inp.tau, inp.ln_weight, inp.ln_bias)
    _, wT, cT, ckw, ckc = torch.ops.ttt.linear_chunk_fwd(*x, W0, c0, *meta, True, -1, 0, "auto", impl, [], segments,
                                                         scratch)
    args = (*x, ckw, ckc, torch.randn_like(inp.q), torch.randn_like(wT), torch.randn_like(cT), *meta, -1, impl, [],
            segments, scratch)
    torch.library.opcheck(torch.ops.ttt.linear_chunk_bwd, args, test_utils=("test_faketensor",))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_torch_compile_traces_custom_ops(kind):
    """The kernels are torch.library custom ops (fake impl + autograd formula): torch.compile traces a
    whole-sequence call with fullgraph=True (no graph break), forward and backward match eager."""
    import torch._dynamo
    torch._dynamo.reset()
    inp = to_dev(random_inputs(kind, B=1, T=32, H=2, d=16, b=16, pos=0, dtype=torch.float32, requires_grad=True))
    leaves = list(inp.leaves().values())

    op = triton_backend.TritonOp(kind)

    def fn(q, k, v, lr, tau, lnw, lnb, *params):
        st = TTTState(kind, tuple(params), tuple(torch.zeros_like(p) for p in params), 0)
        o, st2 = op(TTTInputs(q, k, v, lr, tau, lnw, lnb), st)
        return o, st2.params

    def call(f):
        st = inp.state()
        return f(inp.q, inp.k, inp.v, inp.lr, inp.tau, inp.ln_weight, inp.ln_bias, *st.params)

    cfn = torch.compile(fn, backend="aot_eager", fullgraph=True)
    o1, p1 = call(cfn)
    o2, p2 = call(fn)
    assert rel(o1, o2) < 1e-6
    for x, y in zip(p1, p2):
        assert rel(x, y) < 1e-6
    g1 = torch.autograd.grad(o1.square().sum() + sum(p.sum() for p in p1), leaves)
    g2 = torch.autograd.grad(o2.square().sum() + sum(p.sum() for p in p2), leaves)
    for x, y in zip(g1, g2):
        assert rel(x, y) < 1e-5
    assert hasattr(torch.ops.ttt, f"{kind}_chunk_fwd") and hasattr(torch.ops.ttt, f"{kind}_chunk_bwd")


def test_float64_resolves_to_the_dual_form_with_a_warning():
    """Explicit backend="triton" never changes path silently: float64 inputs resolve to the dual form (the
    documented rule), with a warning when the op is resolved, and still equal the dual form; the triton op itself
    refuses them."""
    inp = random_inputs("mlp", B=1, T=8, H=1, d=8, b=4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="float64 inputs run in the PyTorch dual form"):
        op = resolve_op("mlp", "triton", DEV, torch.float64)
    assert op.backend == "dual"
    o_t, _ = op(inp.inputs(), inp.state())
    o_d, _ = inp.run("dual")
    torch.testing.assert_close(o_t, o_d, rtol=0, atol=0)
    with pytest.raises(ValueError, match="^q: the Triton kernels compute in fp32"):
        triton_backend.TritonOp("mlp")(inp.inputs(), inp.state())
    inp = random_inputs("linear", B=1, T=8, H=1, d=8, b=4, dtype=torch.float32)
    no_ln = dataclasses.replace(inp.inputs(), ln_weight=None, ln_bias=None)
    with pytest.raises(ValueError, match="^ln_weight: the Triton kernels implement the inner LayerNorm"):
        triton_backend.TritonOp("linear")(no_ln, inp.state())


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_one_token_with_grad_runs_the_pytorch_step(kind):
    """A T = 1 call that needs gradients goes to the differentiable PyTorch step; the kernel itself refuses."""
    inp = to_dev(random_inputs(kind, B=1, T=1, H=2, d=16, b=8, pos=3, dtype=torch.float32, requires_grad=True))
    o_t, _ = inp.run("triton")
    o_d, _ = inp.run("dual")
    torch.testing.assert_close(o_t, o_d)
    assert o_t.requires_grad
    step = lin_step_triton if kind == "linear" else mlp_step_triton
    with pytest.raises(ValueError, match="no backward"):
        step.forward(inp.inputs(), inp.state())


def test_host_int_helpers_match_triton():
    """The launch glue's cdiv / pow2 / tile (plain ints: Triton's own helpers cost microseconds per call) give
    Triton's values; tile pads to at least 16."""
    from ttt.ops.triton_utils import cdiv, pow2, tile
    assert [pow2(n) for n in range(1, 2100)] == [triton.next_power_of_2(n) for n in range(1, 2100)]
    assert [cdiv(a, b) for a in range(0, 200) for b in range(1, 33)] == \
        [triton.cdiv(a, b) for a in range(0, 200) for b in range(1, 33)]
    assert [tile(n) for n in (1, 8, 16, 17, 24, 64, 96)] == [16, 16, 16, 32, 32, 64, 128]
