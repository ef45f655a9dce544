"""TTT-Linear's kernels in Gluon (`ttt/ops/ttt_linear/walks_gluon.py`: the fused forward and the split forward's
walk, `LinearKernels(fwd="fused_gluon" | "split_gluon")`, the backward's pre pass, full chain and post pass,
`bwd="split_gluon"`, at their default warps and at 8) against the Triton kernels they stand in for on the same
inputs (every output, final state and gradient, close: the same 16-bit products, summed in another order) and
against the dual form: odd lengths with a
partial last mini-batch, a mid-mini-batch start, several checkpoint groups and time segments, head dim 128, packed
documents, every buffer NaN-poisoned. On the CPU the Gluon source runs in Triton's interpreter through
tests/gluon_shim.py (fp16); on a GPU in bf16 and fp16 at full size (marked `gpu`)."""
from __future__ import annotations

import pytest
import torch

from triton_env import DEV  # first: it sets TRITON_INTERPRET before anything imports Triton
from conftest import PoisonTorch, check_against_dual, random_inputs, rel
from ttt.ops import TTTInputs, TTTState, triton_backend
from ttt.ops.ttt_linear import bwd_split, chunk, walks_gluon

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
if DEV == "cpu":
    import gluon_shim

    _SHIMMED = {name: gluon_shim.interpretable(getattr(walks_gluon, name))
                for name in ("_fwd_kernel", "_pre_kernel", "_chain_kernel", "_post_kernel")}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    for mod in (chunk, bwd_split):
        monkeypatch.setattr(mod, "torch", PoisonTorch())
    if DEV == "cpu":  # the Gluon kernel's own source, run in the interpreter (tests/gluon_shim.py)
        for name, kernel in _SHIMMED.items():
            monkeypatch.setattr(walks_gluon, name, kernel)


def make(B, T, H, d, pos, dtype):
    """Random TTT-Linear inputs (`conftest.random_inputs`, a pending accumulator when pos is inside a mini-batch) on
    the device, every leaf requiring grad."""
    inp = random_inputs("linear", B=B, T=T, H=H, d=d, b=16, pos=pos, dtype=dtype, requires_grad=True)
    if DEV != "cpu":
        inp = inp.with_leaves({n: t.detach().to(DEV).requires_grad_() for n, t in inp.leaves().items()})
    return inp


def outputs_and_grads(inp, kernels, cu=None, wdtype=None, state=True):
    """[o, final params, final accumulators] of the triton op with `kernels` (cu: packed documents, each from the
    start state's first row), then the gradients of a fixed random weighting of all of them w.r.t. every leaf
    (the weights rounded to wdtype, so that an fp32 run can weigh exactly as a 16-bit one). state=False: o alone
    (weighed and returned), so that the final state has no gradient (the backward's chain starts from zeros)."""
    x, st = inp.inputs(), inp.state()
    if cu is not None:
        x = TTTInputs(x.q, x.k, x.v, x.lr, x.tau, x.ln_weight, x.ln_bias, cu)
        st = TTTState.initial("linear", inp.init, len(cu) - 1)
    o, s = triton_backend.TritonOp("linear", kernels)(x, st)
    outs = [o, *s.params, *s.accum] if state else [o]
    g = torch.Generator(device=o.device).manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=g, device=t.device).to(wdtype or t.dtype).to(t.dtype)).sum()
               for t in outs)
    leaves = list(inp.leaves().values())
    return [t.detach() for t in outs] + list(torch.autograd.grad(loss, leaves, allow_unused=True))


# which Gluon kernel against which Triton one (the other half of the op as the Triton default)
PAIRS = {"chain": (dict(bwd="split_gluon"), dict(bwd="split_full")),
         "walk": (dict(fwd="split_gluon"), dict(fwd="split")),
         "fused": (dict(fwd="fused_gluon"), dict(fwd="fused"))}


def gluon_against_triton(B, T, H, d, pos, dtype, tol, segments=None, cu=None, walk="chain", ref=False, warps=None,
                         state=True):
    """A Gluon walk (`PAIRS`) and the Triton kernel it stands in for on the same inputs: every output, state and
    gradient within tol (relative L2 error). ref: an entry over tol still passes if the Gluon kernel is as close
    as the Triton one (within 1.25x) to the Triton kernels run in fp32 on the same (upcast) inputs: two roundings
    of a sum with cancellation (dtau) can differ by more than tol while both are as accurate as 16 bits allow.
    warps: the Gluon kernel's (None: its default)."""
    inp = make(B, T, H, d, pos, dtype)
    kw = dict(group=2, bwd_segments=segments)
    gl_kw, tr_kw = PAIRS[walk]
    if warps is not None:
        gl_kw = dict(gl_kw, **({"bwd_warps": (warps,) * 3} if walk == "chain" else {"fwd_warps": warps}))
    got = outputs_and_grads(inp, triton_backend.LinearKernels(**gl_kw, **kw), cu, state=state)
    want = outputs_and_grads(inp, triton_backend.LinearKernels(**tr_kw, **kw), cu, state=state)
    assert all(torch.isfinite(t).all() for t in got + want if t is not None)  # (a NaN would drop out of errs)
    errs = {i: rel(a, b) for i, (a, b) in enumerate(zip(got, want)) if b is not None and b.abs().max() > 0}
    assert len(errs) >= (10 if state else 8)  # o (W, c) and the leaves' gradients
    bad = {i: e for i, e in errs.items() if not e <= tol}
    if bad and ref:
        inp32 = inp.with_leaves({n: t.detach().float().requires_grad_() for n, t in inp.leaves().items()})
        exact = outputs_and_grads(inp32, triton_backend.LinearKernels(**tr_kw, **kw), cu, wdtype=dtype, state=state)
        bad = {i: (e, rel(got[i], exact[i]), rel(want[i], exact[i])) for i, e in bad.items()
               if not rel(got[i], exact[i]) <= 1.25 * rel(want[i], exact[i])}
    assert not bad, f"over {tol}: {bad}"


# 7 mini-batches (the last partial) in 4 checkpoint groups of 2, from a start inside a mini-batch or not, in one
# time segment and in three
WALKS = pytest.mark.parametrize("walk", list(PAIRS))


@WALKS
@pytest.mark.parametrize("pos,segments", [(0, None), (5, 3)])
def test_gluon_walks_equal_the_triton_ones(pos, segments, walk):
    gluon_against_triton(B=1, T=101, H=2, d=64, pos=pos, dtype=torch.float16, tol=2e-3, segments=segments, walk=walk)


@pytest.mark.parametrize("segments", [None, 3])
def test_gluon_chain_without_a_final_state_gradient(segments):
    """A loss of the outputs alone (a training step's): the chain starts from zeros without reading a gradient of
    the final state, in one time segment and in three (only the last one starts so)."""
    gluon_against_triton(B=1, T=101, H=2, d=64, pos=0, dtype=torch.float16, tol=2e-3, segments=segments,
                         walk="chain", state=False)


@WALKS
def test_gluon_walks_head_dim_128_equal_the_triton_ones(walk):
    gluon_against_triton(B=1, T=53, H=1, d=128, pos=0, dtype=torch.float16, tol=2e-3, walk=walk)


@WALKS
def test_gluon_walks_packed_documents_equal_the_triton_ones(walk):
    """Documents of 20, 5, 37 and 16 tokens in one row (partial last mini-batches, starts off the mini-batch grid):
    each walked from its own first token and length."""
    cu = torch.tensor([0, 20, 25, 62, 78])
    gluon_against_triton(B=1, T=78, H=2, d=64, pos=0, dtype=torch.float16, tol=2e-3, cu=cu, walk=walk)


@WALKS
def test_gluon_walks_at_8_warps_equal_the_triton_ones(walk):
    """Head dim 64 at 8 warps (`walks_gluon.launch`: the updates' warps 4 x 2, registers capped at 128)."""
    gluon_against_triton(B=1, T=101, H=2, d=64, pos=5, dtype=torch.float16, tol=2e-3, segments=3, walk=walk, warps=8)


def test_gluon_warps_reach_every_launch(monkeypatch):
    """fwd_warps and each of bwd_warps (pre, chain, post) reach their Gluon launch; None takes the defaults (the
    split walk's `walks_gluon.walk_warps`, the backward's `walks_gluon.launch`)."""
    seen = []
    launch = walks_gluon.launch
    monkeypatch.setattr(walks_gluon, "launch", lambda d, w=None, arg="warps": seen.append((w, arg)) or launch(d, w, arg))
    inp = make(B=1, T=40, H=1, d=64, pos=0, dtype=torch.float16)
    for kernels in (triton_backend.LinearKernels(fwd="split_gluon", bwd="split_gluon", fwd_warps=8, bwd_warps=(8, 4, 8)),
                    triton_backend.LinearKernels(fwd="split_gluon", bwd="split_gluon")):
        outputs_and_grads(inp, kernels)
    f, b = "LinearKernels.fwd_warps", "LinearKernels.bwd_warps"
    assert seen == [(8, f), (8, b), (4, b), (8, b), (8, f), (None, b), (None, b), (None, b)]
    assert walks_gluon.launch(64, 8) == dict(num_warps=8, maxnreg=128)
    assert walks_gluon.launch(128, 8) == dict(num_warps=8) and walks_gluon.launch(64) == dict(num_warps=4)


def test_gluon_default_warps():
    """At d 64 the split walk runs at 8 warps, the fused one at 4; at d 128 both at 8."""
    assert (walks_gluon.walk_warps(64, True), walks_gluon.walk_warps(64, False)) == (8, 4)
    assert walks_gluon.walk_warps(128, False) == 8


def test_auto_forward_walks_split_in_gluon_on_hopper(monkeypatch):
    """fwd="auto" (the default) where it runs split: on a Hopper GPU (here a stand-in) the Gluon walk, bit for bit
    the explicit "split_gluon" one and told apart from the Triton walk by rounding; a fwd_warps the Gluon kernels
    do not take keeps the Triton walk; the fused branch stays Triton."""
    inp = make(B=1, T=45, H=2, d=64, pos=0, dtype=torch.float16)
    run = lambda **kw: outputs_and_grads(inp, triton_backend.LinearKernels(bwd="split", group=2, **kw))  # noqa: E731
    gluon, split, split2, fused = run(fwd="split_gluon"), run(fwd="split"), run(fwd="split", fwd_warps=2), run(fwd="fused")
    monkeypatch.setattr(chunk, "hopper", lambda device: True)
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b) if y is not None)  # noqa: E731
    assert same(run(), gluon) and not same(run(), split)
    assert same(run(fwd_warps=2), split2)
    assert chunk.fwd_plan(64, 12, 64, 16, 8, "auto") is False  # the fused branch
    monkeypatch.setattr(chunk, "fwd_plan", lambda *a: False)
    assert same(run(), fused)


@pytest.mark.parametrize("what,warps,shown", [("bwd", (4, 6, 4), "6"), ("fwd", 16, "16")])
def test_gluon_warps_refuse_other_counts(what, warps, shown):
    inp = make(B=1, T=40, H=1, d=64, pos=0, dtype=torch.float16)
    kernels = triton_backend.LinearKernels(fwd="split_gluon", bwd="split_gluon", **{f"{what}_warps": warps})
    with pytest.raises(ValueError, match=rf"^LinearKernels.{what}_warps: the Gluon kernels run at 4 or 8 warps, "
                                         rf"got {shown}$"):
        outputs_and_grads(inp, kernels)


@pytest.mark.parametrize("fwd", ["split_gluon", "fused_gluon", "auto_gluon"])
def test_gluon_walks_match_dual(fwd):
    inp = make(B=1, T=75, H=2, d=64, pos=3, dtype=torch.float16)
    kernels = triton_backend.LinearKernels(fwd=fwd, bwd="split_gluon", group=2)
    op = triton_backend.TritonOp("linear", kernels)
    check_against_dual(inp, lambda: op(inp.inputs(), inp.state()), T=75, pos=3, dtype=torch.float16, grad=True,
                       tol=3e-2, label="split_gluon")


def test_auto_gluon_splits_where_auto_does():
    """fwd="auto_gluon" picks the split or the fused Gluon walk by the rule "auto" picks the Triton ones by."""
    picks = {(n, H): chunk.fwd_plan(n, H, 64, 16, 8, "auto_gluon") for n, H in ((1, 2), (16, 64))}
    assert picks == {(n, H): chunk.fwd_plan(n, H, 64, 16, 8, "auto") for n, H in picks}
    assert sorted(picks.values()) == [False, True]  # both branches


def test_auto_backward_is_gluon_on_hopper_where_it_takes_the_shapes(monkeypatch):
    """bwd="auto" (the default) resolves to the Gluon chain on a Hopper GPU for the shapes it is written for, to
    the Triton split chain on other GPUs, on the CPU and for other shapes, dtypes or product precisions; an
    explicit choice stays as asked."""
    cap = {"now": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap["now"])
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    assert triton_backend.LinearKernels().bwd == "auto"
    assert chunk.bwd_impl("auto", 64, 16, bf16, None, cuda) == "split_gluon"
    assert chunk.bwd_impl("auto", 128, 16, torch.float16, 3, cuda) == "split_gluon"
    for args in ((32, 16, bf16, None), (64, 8, bf16, None), (64, 16, torch.float32, None), (64, 16, bf16, 1)):
        assert chunk.bwd_impl("auto", *args, cuda) == "split", args
    assert chunk.bwd_impl("auto", 64, 16, bf16, None, torch.device("cpu")) == "split"
    assert chunk.bwd_impl("split_lean", 64, 16, bf16, None, cuda) == "split_lean"
    cap["now"] = (8, 0)
    assert chunk.bwd_impl("auto", 64, 16, bf16, None, cuda) == "split"
    with pytest.raises(ValueError, match="impl"):
        chunk.bwd_impl("gluon", 64, 16, bf16, None, cuda)


def test_auto_backward_runs_the_gluon_chain_where_it_resolves_to_it(monkeypatch):
    """The default kernels' backward launches what `bwd_impl` picks: with the pick forced to the Gluon chain (a
    Hopper GPU, here by a stand-in) the gradients are the explicit "split_gluon" ones, bit for bit, and differ
    from the Triton split chain's in rounding (so the two picks are told apart)."""
    inp = make(B=1, T=45, H=2, d=64, pos=0, dtype=torch.float16)
    run = lambda bwd: outputs_and_grads(inp, triton_backend.LinearKernels(bwd=bwd, group=2))  # noqa: E731
    gluon, split = run("split_gluon"), run("split")
    monkeypatch.setattr(chunk, "bwd_impl", lambda impl, *a: "split_gluon" if impl == "auto" else impl)
    auto = run("auto")
    assert all(torch.equal(a, b) for a, b in zip(auto, gluon) if b is not None)
    assert any(not torch.equal(a, b) for a, b in zip(auto, split) if b is not None)


def test_linear_gluon_reaches_the_op():
    """RunOptions(linear_gluon=True): every TTT-Linear layer's triton op runs the Gluon kernels (`LinearKernels(
    fwd="auto_gluon", bwd="split_gluon")`), other run options take them back, a TTT-MLP model is unaffected, a head
    dim they are not written for is a one-line error at the first call, and a non-bool is refused."""
    from ttt.config import RunOptions, get_config
    from ttt.model import TTTLM

    cfg = get_config("debug", mixer="ttt_linear")  # head dim 16
    model = TTTLM(cfg, RunOptions(ttt_backend="triton", linear_gluon=True))
    gluon = triton_backend.LinearKernels(fwd="auto_gluon", bwd="split_gluon")
    assert all(b.mixer.prepare().op.kernels == gluon for b in model.blocks)
    with pytest.raises(ValueError, match=r"^LinearKernels\((bwd='split_gluon'|fwd='auto_gluon')\): takes head dim "
                                         r"\(64, 128\)"):
        model(torch.randint(0, cfg.vocab_size, (1, 32)))
    model.set_run_options(RunOptions(ttt_backend="triton"))
    assert all(b.mixer.prepare().op.kernels == triton_backend.LinearKernels() for b in model.blocks)
    mlp = TTTLM(get_config("debug", mixer="ttt_mlp"), RunOptions(ttt_backend="triton", linear_gluon=True))
    assert all(isinstance(b.mixer.prepare().op.kernels, triton_backend.MLPKernels) for b in mlp.blocks)
    with pytest.raises(ValueError, match="^linear_gluon: expected a bool, got 1$"):
        RunOptions(linear_gluon=1)
    with pytest.raises(ValueError, match="^gluon: expected a bool, got 1$"):
        model.blocks[0].mixer.gluon = 1


@pytest.mark.parametrize("what,impl", [("fwd", "split_gluon"), ("fwd", "fused_gluon"), ("bwd", "split_gluon")])
@pytest.mark.parametrize("d,dtype,mini_batch", [(32, torch.float16, 16), (64, torch.float32, 16),
                                                (64, torch.float16, 8)])
def test_gluon_walks_refuse_what_they_are_not_written_for(d, dtype, mini_batch, what, impl):
    inp = random_inputs("linear", B=1, T=40, H=1, d=d, b=mini_batch, pos=0, dtype=dtype, requires_grad=True)
    op = triton_backend.TritonOp("linear", triton_backend.LinearKernels(**{what: impl}))
    with pytest.raises(ValueError, match=rf"^LinearKernels\({what}='{impl}'\): takes head dim \(64, 128\), "
                                         r"mini-batch 16, bf16 or fp16 inputs"):
        op(inp.inputs(), inp.state())


@pytest.mark.parametrize("which", ["q", "k", "v", "lr"])
def test_gluon_fused_forward_contains_a_nan_as_the_triton_one_does(which):
    """A NaN at token 20 (the fifth row of the second mini-batch): outputs 0..19 as without it, 20 NaN, and the
    Triton fused forward's pattern of NaNs after it (v reaches the outputs through G alone: the rows from G's first
    non-finite row on)."""
    inp = make(B=1, T=48, H=1, d=64, pos=0, dtype=torch.float16)
    x = getattr(inp, which).detach().clone()
    x[:, 20] = float("nan")
    inp = inp.with_leaves({**inp.leaves(), which: x})
    with torch.no_grad():
        o, _ = triton_backend.TritonOp("linear", triton_backend.LinearKernels(fwd="fused_gluon"))(
            inp.inputs(), inp.state())
        want, _ = triton_backend.TritonOp("linear", triton_backend.LinearKernels(fwd="fused"))(
            inp.inputs(), inp.state())
    assert torch.equal(torch.isnan(o), torch.isnan(want))
    assert torch.isnan(o[:, 20]).all() and not torch.isnan(o[:, :20]).any()
    ok = ~torch.isnan(want)
    assert rel(o[ok], want[ok]) < 2e-3


@pytest.mark.gpu
@gpu
@WALKS
@pytest.mark.parametrize("d,warps", [(64, None), (64, 8), (128, None)])
def test_gpu_gluon_walks_equal_the_triton_ones(d, warps, walk):
    gluon_against_triton(B=2, T=1037, H=4, d=d, pos=5, dtype=torch.bfloat16, tol=1e-2, segments=3, walk=walk, ref=True,
                         warps=warps)
    gluon_against_triton(B=2, T=1037, H=4, d=d, pos=0, dtype=torch.float16, tol=2e-3, walk=walk, ref=True,
                         warps=warps)


@WALKS
def test_gluon_walks_are_as_accurate_as_the_triton_ones(walk):
    """tol 0 sends every entry to the fp32 yardstick (`gluon_against_triton`'s ref): each within 1.25x of the
    Triton kernel's error there."""
    gluon_against_triton(B=1, T=101, H=2, d=64, pos=5, dtype=torch.float16, tol=0.0, segments=3, walk=walk, ref=True)


@pytest.mark.parametrize("bwd", ["split_lean", "split_full", "split_gluon"])
def test_bf16_scratch_rows(bwd):
    """bwd_scratch="bf16": the backward's [rows, T, d] scratch rounded to bf16 between its passes (each kernel loads
    it into fp32). On fp16 inputs (the interpreter has no bf16 arithmetic; on a GPU bf16 inputs take bf16 rows by
    default and meet the dual form there): the outputs and final state are untouched (bit for bit), the gradients
    differ from the fp32 rows' (the rows did round) and stay within 1e-2 of the Triton kernels run in fp32 (dtau,
    a sum with cancellation, within 6e-2; measured 4e-3 and 4e-2). The default on fp16 inputs is fp32 rows."""
    inp = make(B=1, T=101, H=2, d=64, pos=5, dtype=torch.float16)
    run = lambda **kw: outputs_and_grads(inp, triton_backend.LinearKernels(bwd=bwd, group=2, **kw))  # noqa: E731
    f32, b16, default = run(bwd_scratch="fp32"), run(bwd_scratch="bf16"), run()
    assert all(torch.equal(a, b) for a, b in zip(default, f32) if b is not None)
    n_out = 5  # o, the final params W, c and accumulators (`outputs_and_grads`), then the leaves' gradients
    assert all(torch.equal(a, b) for a, b in zip(b16[:n_out], f32[:n_out]))
    assert not all(torch.equal(a, b) for a, b in zip(b16[n_out:], f32[n_out:]) if b is not None)
    inp32 = inp.with_leaves({n: t.detach().float().requires_grad_() for n, t in inp.leaves().items()})
    exact = outputs_and_grads(inp32, triton_backend.LinearKernels(bwd="split_full", group=2), wdtype=torch.float16)
    errs = {n: rel(a, e) for n, a, e in zip(inp.leaves(), b16[n_out:], exact[n_out:])
            if e is not None and e.abs().max() > 0}
    assert len(errs) >= 7
    assert not {n: e for n, e in errs.items() if not e <= (6e-2 if n == "delta" else 1e-2)}, errs


def test_scratch_dtype_defaults_and_refusals():
    """None: bf16 rows for bf16 inputs, fp32 for fp16 and fp32 ones; a name as asked; another name a one-line
    error naming the field, when the kernels are chosen."""
    sd = bwd_split.scratch_dtype
    assert (sd(None, torch.bfloat16), sd(None, torch.float16), sd(None, torch.float32)) == \
        (torch.bfloat16, torch.float32, torch.float32)
    assert (sd("fp32", torch.bfloat16), sd("bf16", torch.float32)) == (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match=r"^LinearKernels.bwd_scratch: expected one of \('fp32', 'bf16'\) or None, "
                                         r"got 'fp16'$"):
        triton_backend.LinearKernels(bwd_scratch="fp16")
