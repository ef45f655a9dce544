"""TTT-MLP Triton kernels == the PyTorch dual form, for every kernel pair the triton backend can pick
(`mlp_impl`: "regs", "blocked"): outputs, final state (params and accum) and every gradient (q, k, v,
lr, tau via delta, LN weight/bias, initial params, initial accum), at odd lengths (head and tail pieces in
PyTorch), from mid-mini-batch starts with pending accumulators, over several checkpoint groups, with every
kernel output NaN-poisoned before the kernel runs; a non-finite token reaching no earlier output; the fused
decode step. On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1) at small shapes; bf16 and
full-size shapes run on a GPU (marked `gpu`).
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from triton_env import DEV  # first: it sets TRITON_INTERPRET before anything imports Triton
from conftest import PoisonTorch, check_against_dual, random_inputs, rel
from ttt.ops import triton_backend
from ttt.ops.triton_utils import batch_rows
from ttt.ops.ttt_mlp import chunk, chunk_blocked, chunk_smem, step_triton

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
if DEV == "cpu":
    import gluon_shim

    _SMEM_FWD = gluon_shim.interpretable(chunk_smem.ttt_mlp_smem_fwd_kernel)
    _SMEM_BWD = gluon_shim.interpretable(chunk_smem.ttt_mlp_smem_bwd_kernel)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    for mod in (chunk, chunk_blocked, chunk_smem, step_triton):
        monkeypatch.setattr(mod, "torch", PoisonTorch())
    if DEV == "cpu":  # the Gluon kernel's own source, run in the interpreter (tests/gluon_shim.py)
        monkeypatch.setattr(chunk_smem, "ttt_mlp_smem_fwd_kernel", _SMEM_FWD)
        monkeypatch.setattr(chunk_smem, "ttt_mlp_smem_bwd_kernel", _SMEM_BWD)


def make(*, B, T, H, d, b, pos, dtype=torch.float32, grad=True, seed=0):
    inp = random_inputs("mlp", B=B, T=T, H=H, d=d, b=b, pos=pos, dtype=dtype, seed=seed, requires_grad=grad)
    if DEV != "cpu":
        for name in ("q", "k", "v", "lr", "delta", "ln_weight", "ln_bias"):
            x = getattr(inp, name)
            setattr(inp, name, x.detach().to(DEV).requires_grad_(x.requires_grad))
        inp.init = tuple(p.detach().to(DEV).requires_grad_(p.requires_grad) for p in inp.init)
        if inp.accum is not None:
            inp.accum = tuple(a.detach().to(DEV).requires_grad_(a.requires_grad) for a in inp.accum)
    return inp


def run_triton(inp, impl, warps=None, group=triton_backend.GROUP, keep=False, **replaced):
    """The triton backend on `inp` with the TTT-MLP kernel pair `impl` (None: the default for d; keep: the smem
    forward keeps every mini-batch's start weights for the backward); `replaced`: inputs (q, k, v, lr) to use
    instead of inp's."""
    op = triton_backend.TritonOp("mlp", triton_backend.MLPKernels(impl=impl, warps=warps, group=group, keep=keep))
    return op(replace(inp.inputs(), **replaced), inp.state())


def compare(impl, *, B, T, H, d, b, pos, dtype=torch.float32, grad=True, tol=1e-4, warps=None,
            group=triton_backend.GROUP, keep=False):
    inp = make(B=B, T=T, H=H, d=d, b=b, pos=pos, dtype=dtype, grad=grad)
    return check_against_dual(inp, lambda: run_triton(inp, impl, warps, group, keep), T=T, pos=pos, dtype=dtype,
                              grad=grad, tol=tol, label=f"{impl} B{B} T{T} H{H} d{d} b{b} pos{pos} keep={keep}")


# (B, T, H, d, b, pos): odd length with head and tail pieces from a mid-mini-batch start (pending accumulator);
# padded head dim (24 -> 32, F = 96 -> 128) and b = 8 (padded rows) over three checkpoint groups; a head dim and a
# mini-batch below the 16 that tl.dot takes on the GPU (d = 8 and b = 4 padded to 16).
CASES = [(2, 37, 2, 16, 16, 5), (1, 150, 1, 24, 8, 3), (1, 21, 2, 8, 4, 2)]


@pytest.mark.parametrize("B,T,H,d,b,pos", CASES)
def test_regs_matches_dual(B, T, H, d, b, pos):
    compare("regs", B=B, T=T, H=H, d=d, b=b, pos=pos)


def test_regs_16_warps_fp16_forward():
    compare("regs", B=1, T=48, H=2, d=16, b=16, pos=0, dtype=torch.float16, grad=False, tol=5e-3, warps=16)


def test_default_impl_by_head_dim():
    assert triton_backend.default_mlp_impl(64) == "regs" and triton_backend.default_mlp_impl(96) == "blocked"
    cpu = torch.device("cpu")  # smem only on a Hopper GPU: on the CPU (the interpreter) 16-bit training stays in regs
    assert triton_backend.default_mlp_impl(64, torch.bfloat16, cpu, 16, True) == "regs"
    # an fp32 backward on a GPU: the blocked pair (the register backward compiles for minutes there)
    cuda = torch.device("cuda")
    assert triton_backend.default_mlp_impl(64, torch.float32, cuda, 16, True) == "blocked"
    compare(None, B=1, T=20, H=1, d=16, b=16, pos=0)


def test_default_impl_on_hopper(monkeypatch):
    """Where smem can run (Hopper; stubbed here): it is the default in 16 bits with b = 16 at d 64 and 128, with and
    without gradients; fp32, other head dims and other mini-batches keep the Triton pairs."""
    monkeypatch.setattr(triton_backend, "_smem_runs_on", lambda device: True)
    f, cuda, bf16 = triton_backend.default_mlp_impl, torch.device("cuda"), torch.bfloat16
    assert f(64, bf16, cuda, 16, True) == f(64, bf16, cuda, 16, False) == f(128, bf16, cuda, 16, False) == "smem"
    assert f(64, torch.float16, cuda, 16, False) == f(128, bf16, cuda, 16, True) == "smem"
    assert f(96, bf16, cuda, 16, False) == f(96, bf16, cuda, 16, True) == "blocked"
    assert f(64, bf16, cuda, 8, False) == "regs" and f(64, torch.float32, cuda, 16, False) == "regs"
    assert f(64, torch.float32, cuda, 16, True) == "blocked"


def test_default_impl_traces_without_cache_warning(monkeypatch):
    """A compiled model asks `default_mlp_impl` while tracing: on a Hopper GPU (stubbed) the answer is a constant
    and Dynamo does not trace through the per-device cache (it warned about tracing an lru_cache wrapper on every
    compiled TTT-MLP training run)."""
    import warnings

    from torch._dynamo import utils as dynamo_utils
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(dynamo_utils, "warn_once_cache", set())  # warnings given earlier in this process count too

    def f(x):
        return x * (2 if triton_backend.default_mlp_impl(64, torch.bfloat16, torch.device("cuda"), 16, True)
                    == "smem" else 3)
    torch._dynamo.reset()
    triton_backend._smem_runs_on_cached.cache_clear()  # its answer for the stubbed GPU stays in this test
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out = torch.compile(f, backend="eager", fullgraph=True)(torch.ones(2))
    finally:
        torch._dynamo.reset()
        triton_backend._smem_runs_on_cached.cache_clear()
    assert not [w for w in seen if "lru_cache" in str(w.message)]
    assert out.tolist() == [2.0, 2.0]


def test_blocked_matches_dual():
    """d = 16: F = 64 in two 32-column blocks; an aligned start whose (zero) accumulator needs a gradient."""
    compare("blocked", B=1, T=64, H=1, d=16, b=16, pos=32)


def test_wide_head_runs_blocked_kernels():
    """d > 64 picks the F-blocked kernels by default (d = 72: padded to 128, F = 288 in 32-column blocks)."""
    compare(None, B=1, T=37, H=1, d=72, b=16, pos=3)


def test_impl_choice_is_checked():
    inp = make(B=1, T=16, H=1, d=72, b=16, pos=0, grad=False)
    with pytest.raises(ValueError, match=r"^mlp_impl: 'regs' holds the weights in registers only up to head dim 64"):
        run_triton(inp, "regs")
    with pytest.raises(ValueError, match=r"^mlp_impl: expected None or one of \('regs', 'blocked', 'smem'\), "
                                         r"got 'fast'"):
        run_triton(inp, "fast")


@pytest.mark.parametrize("impl", ["regs", "blocked"])
@pytest.mark.parametrize("where", ["k", "v", "lr"])
def test_nonfinite_token_reaches_no_earlier_output(impl, where):
    """A NaN (or inf) at token 20 (b = 16): outputs 0..19 equal a run without it; token 20 is non-finite."""
    inp = make(B=1, T=32, H=1, d=16, b=16, pos=0, grad=False)
    o_ref, _ = run_triton(inp, impl)
    x = getattr(inp, where).clone()
    x[0, 20, 0] = float("nan") if where != "v" else float("inf")
    o, _ = run_triton(inp, impl, **{where: x})
    torch.testing.assert_close(o[:, :20], o_ref[:, :20], rtol=0, atol=0)
    assert not torch.isfinite(o[:, 20]).all()


def _grads(inp, impl, tokens, state_loss, cut, keep=False, **replaced):
    """The gradients of a random weighting of the outputs at `tokens` (a [T] mask) and, with state_loss, of the
    final state, w.r.t. every leaf (the per-token ones cut at token `cut`); `replaced`: leaves (q, k, v, lr) to use
    instead of inp's."""
    leaves = {**inp.leaves(), **replaced}
    o, st = run_triton(inp, impl, keep=keep, **replaced)
    gen = torch.Generator(device=o.device).manual_seed(2)
    w = torch.randn(o.shape, generator=gen, device=o.device) * tokens.to(o.device)[None, :, None, None]
    loss = (o.float() * w).sum()
    if state_loss:
        loss = loss + sum((p * torch.randn(p.shape, generator=gen, device=o.device)).sum() for p in st.params)
    g = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {n: (x[:, :cut] if n in ("q", "k", "v", "lr") else x) for n, x in zip(leaves, g) if x is not None}


def _contained(inp, impl, where, at, ref_tokens, ref_state, keep=False):
    """With a NaN (inf for v) at token `at` of `where` and a loss on every output and the final state, the gradients
    (per-token ones up to `at`) equal, bit for bit, a clean run's whose loss has the outputs `ref_tokens` and, with
    ref_state, the final state."""
    ref = _grads(inp, impl, ref_tokens, ref_state, at, keep)
    x = getattr(inp, where).detach().clone()
    x[0, at, 0] = float("nan") if where != "v" else float("inf")
    got = _grads(inp, impl, torch.ones_like(ref_tokens), True, at, keep, **{where: x.requires_grad_()})
    assert ref.keys() == got.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=0, atol=0, msg=lambda m: f"d{n}: {m}")


@pytest.mark.parametrize("impl,d,dtype", [("regs", 16, torch.float32), ("blocked", 16, torch.float32),
                                           ("smem", 64, torch.float16)])
@pytest.mark.slow
@pytest.mark.parametrize("where", ["q", "k", "v", "lr"])
def test_nonfinite_token_reaches_no_earlier_gradient(impl, d, dtype, where, keep=False):
    """Backward NaN containment: a NaN (or inf) at token 20 (b = 16: inside the kernels' second of three
    mini-batches) with a loss on every output and the final state. A bad k, v or lr poisons the outputs from token
    20 on and the state: the gradients w.r.t. tokens 0..19, the initial state, tau and the LN weights are those of a
    clean run whose loss has only outputs 0..19. A bad q poisons only output 20: those of a clean run without it."""
    inp = make(B=1, T=48, H=1, d=d, b=16, pos=0, dtype=dtype, grad=True)
    t = torch.arange(48)
    _contained(inp, impl, where, 20, (t < 20) | ((t > 20) & (where == "q")), where == "q", keep)


@pytest.mark.parametrize("impl", ["regs", "blocked"])
@pytest.mark.parametrize("where", ["k", "v", "lr"])
def test_nonfinite_token_in_partial_last_mini_batch(impl, where):
    """A NaN (or inf) at token 36 of 40 (b = 16: in the kernels' partial, uncommitted last mini-batch) with a loss on
    every output and the final weights: it poisons outputs 36.. only, not the weights (the partial mini-batch does
    not update them), so every gradient up to token 35, of the initial state, tau and the LN weights is that of a
    clean run whose loss has outputs 0..35 and the final weights."""
    inp = make(B=1, T=40, H=1, d=16, b=16, pos=0, grad=True)
    _contained(inp, impl, where, 36, torch.arange(40) < 36, True)


def _step_equals_pytorch(inp):
    """The triton backend's decode step on `inp` (T = 1: the fused step kernel) == the PyTorch step: output, params
    and accumulators within 1e-5."""
    o1, s1 = inp.run("triton")
    o2, s2 = inp.run("dual")
    assert rel(o1, o2) < 1e-5
    for x, y in zip(s1.params + s1.accum, s2.params + s2.accum):
        assert (rel(x, y) if y.abs().max() > 0 else x.abs().max().item()) < 1e-5


@pytest.mark.parametrize("pos", [0, 3, 15, 31])
@pytest.mark.parametrize("d", [16, 24, 72])
def test_step_kernel(pos, d):
    """The fused decode kernel (T = 1) == the PyTorch step (through the backend), including the commit; d = 24
    has a padded head dim and F = 96 (a full and a partial 64-column block); d = 72 (over 64) takes 32-column
    blocks by default, F = 288 in nine."""
    assert step_triton.block_f_default(d, 4 * d) == (32 if d > 64 else 64)
    inp = make(B=2, T=1, H=3, d=d, b=16, pos=pos, grad=False)
    _step_equals_pytorch(inp)


@pytest.mark.parametrize("block_f,warps,d", [(16, 4, 16), (32, 8, 24)])
def test_step_kernel_blocks(block_f, warps, d):
    """Other F block widths and warps give the same step: 16 columns (four blocks over F = 64), 32 columns
    with 8 warps over F = 96 (three blocks)."""
    inp = make(B=1, T=1, H=2, d=d, b=16, pos=7, grad=False)
    o1, s1 = step_triton.forward(inp.inputs(), inp.state(), block_f=block_f, num_warps=warps)
    o2, s2 = inp.run("dual")
    assert rel(o1, o2) < 1e-5
    for x, y in zip(s1.accum, s2.accum):
        assert rel(x, y) < 1e-5


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("pos", [3, 15])
def test_gpu_step_kernel_default_blocks(d, pos):
    """The decode step kernel at the width it is timed at (B16, D = 2048) with its default blocks (64 columns at d
    64, 32 at d 128), before and at a commit, equals the PyTorch step (the CPU test's bound)."""
    inp = make(B=16, T=1, H=2048 // d, d=d, b=16, pos=pos, grad=False)
    _step_equals_pytorch(inp)


@pytest.mark.gpu
@gpu
def test_gpu_default_impl_trains_in_smem():
    """The default pair on Hopper: smem in 16 bits at head dims 64 and 128 (measured fastest there); regs in fp32
    without gradients and at another mini-batch, blocked for an fp32 backward (and for 16-bit training at d 128
    off Hopper); the default path equals the dual form, in bf16 (with and without gradients) and in fp32."""
    dev, f = torch.device("cuda"), triton_backend.default_mlp_impl
    hopper = torch.cuda.get_device_capability() == (9, 0)
    assert f(64, torch.bfloat16, dev, 16, True) == f(64, torch.bfloat16, dev, 16, False) == (
        "smem" if hopper else "regs")
    assert f(128, torch.bfloat16, dev, 16, False) == ("smem" if hopper else "blocked")
    assert f(64, torch.float32, dev, 16, False) == "regs"
    assert f(64, torch.bfloat16, dev, 8, True) == "regs" and f(64, torch.float32, dev, 16, True) == "blocked"
    assert f(128, torch.bfloat16, dev, 16, True) == ("smem" if hopper else "blocked")
    compare(None, B=2, T=533, H=2, d=64, b=16, pos=7, dtype=torch.bfloat16, tol=3e-2)
    compare(None, B=2, T=533, H=2, d=128, b=16, pos=7, dtype=torch.bfloat16, tol=3e-2)
    torch.backends.cuda.matmul.allow_tf32 = False
    compare(None, B=2, T=533, H=2, d=64, b=16, pos=7, dtype=torch.float32, tol=1e-4)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("impl,d", [("regs", 64), ("blocked", 64), ("blocked", 96), ("blocked", 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_full_shapes(impl, d, dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    compare(impl, B=2, T=533, H=2, d=d, b=16, pos=7, dtype=dtype, tol=tol)


@pytest.mark.parametrize("impl", ["regs", "blocked"])
def test_fp16_backward(impl):
    """16-bit inputs: fp16 operands in the products, fp32 statistics and state."""
    compare(impl, B=1, T=37, H=1, d=16, b=16, pos=5, dtype=torch.float16, tol=1e-2)


# ---- "smem": the Gluon kernel (weights in shared memory, wgmma). On the CPU its own source runs in the interpreter
# through tests/gluon_shim.py (mostly fp16; the shim widens bf16 operands of its products to fp32, which the
# interpreter's own bf16 dot misreads). Its forward splits F over 1 (d = 64) / 4
# (d = 128) programs per head, its backward over 2 / 8; they exchange partial sums through global memory.

@pytest.mark.slow
@pytest.mark.parametrize("d,T,pos", [(64, 85, 5), (128, 45, 3)])
def test_smem_matches_dual(d, T, pos):
    """Head and tail pieces in PyTorch around whole mini-batches in the kernel, from a mid-mini-batch start; group
    2 makes several checkpoint groups (d = 64: 4 kernel mini-batches)."""
    compare("smem", B=1, T=T, H=2, d=d, b=16, pos=pos, dtype=torch.float16, tol=1e-2, group=2)


def test_smem_recompute_of_longer_groups():
    """Group 4 over 6 kernel mini-batches: a whole group, whose recompute computes three mini-batches, then a partial
    group of two (with group 2 a recompute computes one mini-batch per group, so the other tests check nothing a
    recompute computes after its first mini-batch: a prefetch of the next mini-batch's k, v that copied the wrong
    one passed them all, and fails here)."""
    compare("smem", B=1, T=110, H=1, d=64, b=16, pos=5, dtype=torch.float16, tol=1e-2, group=4)


def test_smem_matches_dual_bf16():
    """The kernels' bf16 path (the dtype they train in on the GPU), forward and backward, one head, from a mid-mini-batch
    start over two checkpoint groups."""
    compare("smem", B=1, T=69, H=1, d=64, b=16, pos=5, dtype=torch.bfloat16, tol=3e-2, group=2)


@pytest.mark.parametrize("keep", [False, True])
def test_smem_ops_fake_match_the_kernels(keep):
    """The TTT-MLP ops' fake implementations (what torch.compile traces with) give the smem pair's saved tensors (its
    W1 checkpoints transposed, the sums, the kept start weights) and the backward's gradients the shapes, dtypes and
    strides the kernels make (torch.library.opcheck)."""
    inp = make(B=1, T=48, H=2, d=64, b=16, pos=0, dtype=torch.float16, grad=False)
    x, st = inp.inputs(), inp.state()
    params = tuple(p.float().contiguous() for p in st.params)
    rows = batch_rows(1, 48, 16, 2, torch.device(DEV))
    none = x.q.new_empty(0, dtype=torch.int32)
    args = (x.q, x.k, x.v, x.lr, x.tau, x.ln_weight, x.ln_bias, *params, *triton_backend._rows_args(rows), 16, 2, True,
            keep, "smem", 0, none, none)
    torch.library.opcheck(torch.ops.ttt.mlp_chunk_fwd, args, test_utils=("test_faketensor",))
    out = torch.ops.ttt.mlp_chunk_fwd(*args)
    dfin = [torch.randn_like(p) for p in params]
    bwd_args = (*args[:7], *out[5:14], torch.randn_like(x.q), *dfin, *triton_backend._rows_args(rows), 16, 2, "smem",
                0, none)
    torch.library.opcheck(torch.ops.ttt.mlp_chunk_bwd, bwd_args, test_utils=("test_faketensor",))


def test_smem_forward_only_matches_dual():
    """Without gradients (the kernel compiled with SAVE off: no checkpoints written): outputs and final state."""
    compare("smem", B=2, T=45, H=1, d=64, b=16, pos=3, dtype=torch.float16, grad=False, tol=1e-2)


def test_smem_forward_in_two_programs_per_head(monkeypatch):
    """d = 64 with the forward split over two programs per head (FS = 128, one exchange per mini-batch; what a GPU
    with SMs to spare gets): outputs, state and every gradient (the backward from its checkpoints and Z2) against
    the dual form; then a launch of one group walking both heads gives the same bits."""
    monkeypatch.setattr(chunk_smem, "nsplit", lambda d, heads=None, device=None: 2 if d == 64 else 4)
    compare("smem", B=1, T=41, H=2, d=64, b=16, pos=3, dtype=torch.float16, tol=1e-2, group=2)
    inp = make(B=1, T=32, H=2, d=64, b=16, pos=0, dtype=torch.float16, grad=False)
    x, st = inp.inputs(), inp.state()
    args = (x.q, x.k, x.v, x.lr, x.tau, x.ln_weight, x.ln_bias, tuple(p.float().contiguous() for p in st.params))
    one = chunk_smem.fwd(*args, 16, 2, split=1)
    two, grid = chunk_smem.fwd(*args, 16, 2, split=2), chunk_smem.fwd(*args, 16, 2, split=2, programs=2)
    flat = lambda r: (r[0], *r[1], *r[2])  # noqa: E731
    for a, b, c in zip(flat(one), flat(two), flat(grid)):
        torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(c, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="^split: expected 1 or 2 programs per head at head dim 64"):
        chunk_smem.fwd(*args, 16, 2, split=4)


def _smem_grids_agree(d, B, H, T, backward=True):
    """fwd (and bwd) with fewer programs than heads (one group of nsplit programs walking every head) give the same
    bits as one head per group."""
    inp = make(B=B, T=T, H=H, d=d, b=16, pos=0, dtype=torch.float16 if DEV == "cpu" else torch.bfloat16, grad=False)
    x, st = inp.inputs(), inp.state()
    params = tuple(p.float().contiguous() for p in st.params)
    args = (x.q, x.k, x.v, x.lr, x.tau, x.ln_weight, x.ln_bias)
    o1, fin1, ck1 = chunk_smem.fwd(*args, params, 16, 2)
    o2, fin2, ck2 = chunk_smem.fwd(*args, params, 16, 2, programs=chunk_smem.nsplit(d))
    for a, b in zip((o1, *fin1, *ck1), (o2, *fin2, *ck2)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if not backward:
        return
    g = torch.Generator(device=o1.device).manual_seed(3)
    do = torch.randn(o1.shape, generator=g, device=o1.device).to(o1.dtype)
    dfin = tuple(torch.randn(p.shape, generator=g, device=o1.device) for p in params)
    g1 = chunk_smem.bwd(*args, ck1, do, dfin, 16, 2)
    g2 = chunk_smem.bwd(*args, ck1, do, dfin, 16, 2, programs=chunk_smem.nsplit_bwd(d))
    for a, b in zip((*g1[:7], *g1[7]), (*g2[:7], *g2[7])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("d", [64, 128])
def test_smem_persistent_grid(d):
    """Each program (or each group of 2 / 4 / 8 sharing a head) walks every head; several checkpoint groups (the d =
    128 backward, eight programs per head, in the GPU test only: slow in the interpreter)."""
    _smem_grids_agree(d, B=1, H=3 if d == 64 else 2, T=48 if d == 64 else 32, backward=d == 64)


def test_smem_backward_takes_unaligned_inputs():
    """q, k, v, dO whose strides a launch cannot show 16-byte aligned (views of rows of 72 features) are copied
    before the backward (its cp.async token copies compile only for aligned ones): the same gradients as from
    contiguous copies of them."""
    inp = make(B=1, T=32, H=2, d=64, b=16, pos=0, dtype=torch.float16 if DEV == "cpu" else torch.bfloat16, grad=False)
    x, st = inp.inputs(), inp.state()
    params = tuple(p.float().contiguous() for p in st.params)
    args = (x.q, x.k, x.v, x.lr, x.tau, x.ln_weight, x.ln_bias)
    o, fin, ck = chunk_smem.fwd(*args, params, 16, 2)
    g = torch.Generator(device=o.device).manual_seed(3)
    do = torch.randn(o.shape, generator=g, device=o.device).to(o.dtype)
    dfin = tuple(torch.randn(p.shape, generator=g, device=o.device) for p in params)
    wide = [torch.cat([t, t[..., :8]], -1)[..., :64] for t in (x.q, x.k, x.v, do)]
    assert wide[0].stride(2) == 72
    g1 = chunk_smem.bwd(*args, ck, do, dfin, 16, 2)
    g2 = chunk_smem.bwd(*wide[:3], *args[3:], ck, wide[3], dfin, 16, 2)
    for a, b in zip((*g1[:7], *g1[7]), (*g2[:7], *g2[7])):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("d,where", [(64, "k"), (64, "v"), (64, "lr"), (128, "v")])
def test_smem_nonfinite_token_reaches_no_earlier_output(d, where):
    """As for the other kernels; at d = 128 the poison travels in one program's partial sum."""
    inp = make(B=1, T=32, H=1, d=d, b=16, pos=0, dtype=torch.float16, grad=False)
    o_ref, _ = run_triton(inp, "smem")
    x = getattr(inp, where).clone()
    x[0, 20, 0] = float("nan") if where != "v" else float("inf")
    o, _ = run_triton(inp, "smem", **{where: x})
    torch.testing.assert_close(o[:, :20], o_ref[:, :20], rtol=0, atol=0)
    assert not torch.isfinite(o[:, 20]).all()


def test_smem_kept_start_weights(monkeypatch):
    """keep: the forward also writes every whole mini-batch's 16-bit start weights and fp32 biases (in the row slots
    times the group: entry b's mini-batch m at b * nck * group + m) and the backward reads them instead of
    recomputing: at each group's first mini-batch they are the checkpoint rounded; the gradients equal the
    recomputing backward's and, through the backend, the dual form's (two programs per head in the forward)."""
    monkeypatch.setattr(chunk_smem, "nsplit", lambda d, heads=None, device=None: 2 if d == 64 else 4)
    compare("smem", B=1, T=41, H=2, d=64, b=16, pos=3, dtype=torch.float16, tol=1e-2, group=2, keep=True)
    inp = make(B=2, T=80, H=2, d=64, b=16, pos=0, dtype=torch.float16, grad=False)  # 5 mini-batches, 3 groups
    x, st = inp.inputs(), inp.state()
    params = tuple(p.float().contiguous() for p in st.params)
    args = (x.q, x.k, x.v, x.lr, x.tau, x.ln_weight, x.ln_bias)
    o, fin, ck = chunk_smem.fwd(*args, params, 16, 2)
    o_k, fin_k, ck_k = chunk_smem.fwd(*args, params, 16, 2, keep=True)
    assert len(ck) == 7 and len(ck_k) == 9
    for a, b in zip((o, *fin, *ck), (o_k, *fin_k, *ck_k)):  # keeping changes nothing else
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    kw, kc = ck_k[7:]
    F, d = params[0].shape[-1], 64
    assert kw.shape == (6 * 2, 2, 2, F, d) and kw.dtype == x.q.dtype and kc.shape == (6 * 2, 2, F + d)
    for slot in range(6):  # entry slot // 3, group slot % 3: its first mini-batch's start = the checkpoint
        i = slot * 2
        torch.testing.assert_close(kw[i, :, 0], ck[0][slot].to(kw.dtype), rtol=0, atol=0)  # (both W1^T [F, d])
        torch.testing.assert_close(kw[i, :, 1], ck[2][slot].to(kw.dtype), rtol=0, atol=0)
        torch.testing.assert_close(kc[i], torch.cat([ck[1][slot], ck[3][slot]], -1), rtol=0, atol=0)
    g = torch.Generator(device=o.device).manual_seed(3)
    do = torch.randn(o.shape, generator=g, device=o.device).to(o.dtype)
    dfin = tuple(torch.randn(p.shape, generator=g, device=o.device) for p in params)
    g1 = chunk_smem.bwd(*args, ck, do, dfin, 16, 2)
    g2 = chunk_smem.bwd(*args, ck_k, do, dfin, 16, 2)
    for a, b in zip((*g1[:7], *g1[7]), (*g2[:7], *g2[7])):
        assert rel(b, a) < 2e-3, rel(b, a)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["k", "lr"])
def test_smem_kept_weights_contain_nonfinite_tokens(where):
    """The backward from the kept start weights contains a NaN token as the recomputing one does (the weights after
    it are poisoned in what the forward kept)."""
    test_nonfinite_token_reaches_no_earlier_gradient("smem", 64, torch.float16, where, keep=True)


def test_keep_weights_reaches_the_op():
    """RunOptions(mlp_keep_weights=True): every TTT-MLP layer's triton op keeps the start weights (`MLPKernels.keep`);
    other run options take it back; a TTT-Linear model is unaffected; a non-bool is refused."""
    from ttt.config import RunOptions, get_config
    from ttt.model import TTTLM

    cfg = get_config("debug", mixer="ttt_mlp")
    model = TTTLM(cfg, RunOptions(ttt_backend="triton", mlp_keep_weights=True))
    assert all(b.mixer.prepare().op.kernels.keep for b in model.blocks)
    model.set_run_options(RunOptions(ttt_backend="triton"))
    assert not any(b.mixer.prepare().op.kernels.keep for b in model.blocks)
    lin = TTTLM(get_config("debug", mixer="ttt_linear"), RunOptions(ttt_backend="triton", mlp_keep_weights=True))
    assert all(isinstance(b.mixer.prepare().op.kernels, triton_backend.LinearKernels) for b in lin.blocks)
    with pytest.raises(ValueError, match="^keep_weights: expected a bool, got 1$"):
        model.blocks[0].mixer.keep_weights = 1


def test_smem_choice_is_checked():
    with pytest.raises(ValueError, match=r"^mlp_impl: 'smem' is written for head dim 64 or 128, got head dim 32$"):
        run_triton(make(B=1, T=16, H=1, d=32, b=16, pos=0, dtype=torch.float16, grad=False), "smem")
    with pytest.raises(ValueError, match=r"^mlp_impl: 'smem' is written for mini-batch 16, got mini_batch 8$"):
        run_triton(make(B=1, T=16, H=1, d=64, b=8, pos=0, dtype=torch.float16, grad=False), "smem")
    with pytest.raises(ValueError, match=r"^mlp_impl: 'smem' multiplies in 16 bits on the tensor cores; expected "
                                         r"bf16/fp16 inputs, got float32$"):
        run_triton(make(B=1, T=16, H=1, d=64, b=16, pos=0, grad=False), "smem")


def test_smem_checkpoints_in_row_slots():
    """The smem forward writes its checkpoints in the row kernels' slots ([B * nck, H]: entry b's group g at slot
    b * nck + g), W1's transposed ([F, d]: copied without bank conflicts): close to the register forward's (fp16
    products), B = H = 2, two groups."""
    inp = make(B=2, T=64, H=2, d=64, b=16, pos=0, dtype=torch.float16, grad=False)
    x, st = inp.inputs(), inp.state()
    params = tuple(p.float().contiguous() for p in st.params)
    args = (x.q, x.k, x.v, x.lr, x.tau, x.ln_weight, x.ln_bias, params, 16, 2)
    _o, _fin, ck_smem = chunk_smem.fwd(*args)
    _o, _fin, ck_regs = chunk.fwd(*args)
    for i, (a, b) in enumerate(zip(ck_smem, ck_regs)):
        b = b.transpose(-1, -2) if i == 0 else b  # W1 [.., d, F] -> [.., F, d]
        assert a.shape == b.shape == (4, 2, *a.shape[2:])
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("d,split", [(64, 1), (64, 2), (128, 4)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_smem_full_shapes(monkeypatch, d, split, dtype):
    """Every output, state and gradient against the dual form: odd T, a mid-mini-batch start, 33 kernel mini-batches
    (five checkpoint groups), outputs NaN-poisoned before the kernel runs; then without gradients (SAVE off). At
    d = 64 the forward in one and in two programs per head."""
    monkeypatch.setattr(chunk_smem, "nsplit", lambda d, heads=None, device=None: split)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-2
    compare("smem", B=2, T=533, H=2, d=d, b=16, pos=7, dtype=dtype, tol=tol)
    compare("smem", B=2, T=533, H=2, d=d, b=16, pos=7, dtype=dtype, tol=tol, grad=False)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("d,split", [(64, 1), (64, 2), (128, 4)])
def test_gpu_smem_kept_start_weights(monkeypatch, d, split):
    """keep: the backward reads the start weights the forward kept instead of recomputing them; every output, state
    and gradient against the dual form (33 kernel mini-batches, a mid-mini-batch start)."""
    monkeypatch.setattr(chunk_smem, "nsplit", lambda d, heads=None, device=None: split)
    compare("smem", B=2, T=533, H=2, d=d, b=16, pos=7, dtype=torch.bfloat16, tol=3e-2, keep=True)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_smem_nonfinite_and_grid(d):
    """On the GPU: a NaN token reaches no earlier output nor gradient (also with the start weights kept); a
    persistent grid smaller than the heads gives the same bits (B4 H8: 32 heads on one group of programs), forward
    and backward."""
    for where in ("q", "k", "v", "lr"):
        test_nonfinite_token_reaches_no_earlier_gradient("smem", d, torch.bfloat16, where)
        test_nonfinite_token_reaches_no_earlier_gradient("smem", d, torch.bfloat16, where, keep=True)
    for where in ("k", "v", "lr"):
        test_smem_nonfinite_token_reaches_no_earlier_output(d, where)
    _smem_grids_agree(d, B=4, H=8, T=96)
