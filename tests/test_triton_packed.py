"""The Triton kernels on packed documents (cu_seqlens, docs/packed.md) == every document run alone through the
PyTorch dual form (`ttt.ops.packed.per_document`): outputs, every final state row (weights, accumulators,
position) and the gradients w.r.t. every input and the initial state, for both kinds and every kernel variant
(TTT-Linear's lean and full backward chains in one and several time segments; TTT-MLP's register, F-blocked and
shared-memory kernels), documents whose lengths are and are not multiples of the mini-batch (length 1, shorter than
one mini-batch, several checkpoint groups), from fresh rows and from rows carried to unequal positions; fp16 inputs;
one full-length document == no cu_seqlens (the same kernels and launches, bit for bit); the shared-memory kernels'
schedule of documents over fewer program groups than (document, head) pairs; both TTT layers on both backbones.
Every kernel output is NaN-poisoned before the kernels run. On CPU the kernels run in Triton's interpreter
(TRITON_INTERPRET=1, set by tests/triton_env.py before Triton is imported) at small shapes, the Gluon (smem) ones through
tests/gluon_shim.py.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from triton_env import DEV  # first: it sets TRITON_INTERPRET before anything imports Triton
from conftest import PoisonTorch, RoundProducts, random_inputs, rel
from ttt.ops import TTTInputs, TTTState, make_tau, resolve_op, triton_backend
from ttt.ops.packed import packing, per_document
from ttt.ops.triton_utils import document_rows
from ttt.ops.ttt_linear import bwd_split as lin_bwd_split, chunk as lin_chunk
from ttt.ops.ttt_mlp import chunk as mlp_chunk, chunk_blocked as mlp_blocked, chunk_smem as mlp_smem

if DEV == "cpu":
    import gluon_shim

    _SMEM = {name: gluon_shim.interpretable(getattr(mlp_smem, name))
             for name in ("ttt_mlp_smem_fwd_kernel", "ttt_mlp_smem_bwd_kernel")}

B_MB = 8
# length 1, shorter than b, a multiple of b, 2 + 2 checkpoint groups of 2 mini-batches (the last one partial)
LENS = [1, 5, 16, 27, 3]
# TTT-Linear: both forwards ("fused": the walk with the outputs; "split": the walk alone, then the outputs per group)
KERNELS = {
    "lean": triton_backend.LinearKernels(bwd="split_lean", group=2, fwd="split"),
    "full": triton_backend.LinearKernels(bwd="split_full", group=2, fwd="fused"),
    "full-segments": triton_backend.LinearKernels(bwd="split_full", group=2, bwd_segments=3),
    "lean-segments": triton_backend.LinearKernels(bwd="split_lean", group=2, bwd_segments=2),
    "regs": triton_backend.MLPKernels(impl="regs", group=2),
    "blocked": triton_backend.MLPKernels(impl="blocked", group=2),
}
KIND = {"lean": "linear", "full": "linear", "full-segments": "linear", "lean-segments": "linear", "regs": "mlp",
        "blocked": "mlp"}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    for mod in (lin_chunk, lin_bwd_split, mlp_chunk, mlp_blocked, mlp_smem):
        monkeypatch.setattr(mod, "torch", PoisonTorch())
    if DEV == "cpu":  # the Gluon kernels' own source, run in the interpreter (tests/gluon_shim.py)
        for name, kernel in _SMEM.items():
            monkeypatch.setattr(mlp_smem, name, kernel)


def cu_of(lens) -> torch.Tensor:
    return torch.tensor([0, *lens]).cumsum(0)


# the GPU-only tests (marked gpu): full-size heads and the hardware paths (wgmma, cooperative programs) that the
# interpreter cannot reach; the CPU tests in this file run the same checks at small shapes
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def packed_case(kind, lens, start, dtype=torch.float32, seed=0, b=B_MB, d=16, H=2):
    """Inputs of one packed sequence and a state of one row per document: "fresh" rows at 0 (as a layer starts
    them: the weights require grad, the zero accumulators do not), or "carried": rows at unequal positions, the
    mid-mini-batch ones with a pending accumulator, weights and accumulators requiring grad."""
    n = len(lens)
    inp = random_inputs(kind, B=1, T=sum(lens), H=H, d=d, b=b, dtype=dtype, seed=seed)
    st = TTTState.initial(kind, inp.init, n)
    if start == "carried":
        g = torch.Generator().manual_seed(seed + 1)
        pos = tuple(b if i == 3 else (7 * i + 3) % (3 * b) for i in range(n))  # row 3 aligned, the others not
        live = torch.tensor([float(p % b != 0) for p in pos])
        params = tuple(p + 0.05 * torch.randn(p.shape, generator=g) for p in st.params)
        accum = tuple(0.05 * torch.randn(p.shape, generator=g) * live.view(-1, *[1] * (p.dim() - 1)) for p in params)
        st = TTTState(kind, params, accum, pos)
    inputs = [inp.q, inp.k, inp.v, inp.lr, inp.delta, inp.ln_weight, inp.ln_bias]
    leaves = [t.detach().to(DEV).requires_grad_() for t in inputs + list(st.params)]
    accum = tuple(a.detach().to(DEV) for a in st.accum)
    if start == "carried":
        accum = tuple(a.requires_grad_() for a in accum)
        leaves += list(accum)
    return leaves, TTTState(kind, tuple(leaves[7:7 + len(st.params)]), accum, st.pos)


def run(op, leaves, st, cu):
    q, k, v, lr, delta, lnw, lnb = leaves[:7]
    return op(TTTInputs(q, k, v, lr, make_tau(delta), lnw, lnb, cu), st)


def compare(leaves, st, cu, fast, ref, tol, grad=True):
    """fast and ref: (o, state) of two paths; every output, state row and (grad) gradient within tol."""
    (o1, s1), (o2, s2) = fast, ref
    assert s1.pos == s2.pos
    outs1, outs2 = [o1, *s1.params, *s1.accum], [o2, *s2.params, *s2.accum]
    errs = {f"out{i}": rel(a, b) if b.abs().max() > 0 else a.abs().max().item() for i, (a, b) in
            enumerate(zip(outs1, outs2))}
    if grad:
        g = torch.Generator(device=o2.device).manual_seed(1)
        ws = [torch.randn(b.shape, generator=g, device=b.device).to(b.dtype) for b in outs2]
        g1 = torch.autograd.grad(sum((a * w).sum() for a, w in zip(outs1, ws)), leaves, allow_unused=True,
                                 retain_graph=True)
        g2 = torch.autograd.grad(sum((b * w).sum() for b, w in zip(outs2, ws)), leaves, allow_unused=True)
        for i, (a, b) in enumerate(zip(g1, g2)):
            if b is None or b.abs().max() == 0:
                assert a is None or a.abs().max() == 0, f"grad{i}"
                continue
            errs[f"grad{i}"] = rel(a, b)
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"over {tol}: {bad}"


def _flat(out, leaves, ws):
    """[o, state params, state accumulators] of a path's (o, state), then the gradients of sum(w * each) w.r.t.
    its leaves (None where unused)."""
    o, s = out
    outs = [o, *s.params, *s.accum]
    loss = sum((t * w.to(t.dtype)).sum() for t, w in zip(outs, ws))
    return outs + list(torch.autograd.grad(loss, leaves, allow_unused=True))


def compare_16bit(kind, leaves, st, cu, fast, floor=1e-2):
    """A 16-bit path against the dual form in fp32 on the same (rounded) inputs: every output, state row and
    gradient at most twice as far from it as the dual form is in 16 bits, or within `floor` (at least two units in
    the last place of the 16-bit dtype: a result rounded to it is that far apart when its computation rounds
    differently). The dual form in 16 bits rounds only its inputs and outputs (it computes in fp32); a kernel also
    rounds every product's operands to 16 bits, as tensor cores do. So the dual form's error is taken both ways,
    plain and with every product's operands rounded (`RoundProducts`), and the larger one counts, or the two's
    distance from each other where it is larger: on a sum that cancels (tau's gradient: b values summed over every
    token, one entry often dominating) a 16-bit error is one draw of a wide spread, and these are its three samples.
    (A fixed tolerance against the 16-bit dual form fails on such sums, where both round alike far from the exact
    value; H200, bf16 TTT-MLP, packed: tau's gradient 0.0013-0.070 from fp32 across kernels and seeds, 0.005-0.023 for
    the dual form.)"""
    dt = leaves[0].dtype
    ref16 = run(resolve_op(kind, "dual", DEV, dt), leaves, st, cu)
    leaves32 = [t.detach().float().requires_grad_(t.requires_grad) for t in leaves]
    n = len(st.params)
    accum32 = tuple(leaves32[7 + n:]) if len(leaves) > 7 + n else tuple(a.float() for a in st.accum)
    st32 = TTTState(kind, tuple(leaves32[7:7 + n]), accum32, st.pos)
    ref32 = run(resolve_op(kind, "dual", DEV, torch.float32), leaves32, st32, cu)
    assert fast[1].pos == ref32[1].pos
    g = torch.Generator(device=DEV).manual_seed(1)
    ws = [torch.randn(t.shape, generator=g, device=DEV) for t in [ref32[0], *ref32[1].params, *ref32[1].accum]]
    with RoundProducts(dt) as mode:
        ref16r = run(resolve_op(kind, "dual", DEV, dt), leaves, st, cu)
        forward = mode.rounded
        flat16r = _flat(ref16r, leaves, ws)  # its backward's products rounded too
    assert mode.rounded > forward  # (autograd's backward ran inside the mode)
    errs = {}
    for i, (x, y, yr, z) in enumerate(zip(_flat(fast, leaves, ws), _flat(ref16, leaves, ws), flat16r,
                                          _flat(ref32, leaves32, ws))):
        if z is None or z.abs().max() == 0:
            assert x is None or x.abs().max() == 0, f"item {i}"
            continue
        spread = ((y.double() - yr.double()).norm() / z.double().norm()).item()  # the two references apart
        errs[i] = (rel(x, z), max(rel(y, z), rel(yr, z), spread))
    floor = max(floor, 2 * torch.finfo(dt).eps)  # bf16: 2 ** -6
    bad = {i: e for i, e in errs.items() if not e[0] <= max(floor, 2 * e[1])}
    ratios = {i: round(ex / ey, 2) for i, (ex, ey) in errs.items() if ey > 0}
    assert not bad, (f"(error, the 16-bit dual form's error) against fp32 over the bound: {bad}; every item's error "
                     f"over the dual form's: {ratios}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_products_rounds_every_product(dtype):
    """RoundProducts (compare_16bit's second reference): every product in it, forward and backward, batched or not,
    with a bias or not, equals the fp32 product of the operands rounded to 16 bits, and differs from the plain one."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(2, 3, 8, 8, generator=g, device="cpu").requires_grad_() for _ in range(2))
    c, w = torch.randn(5, 8, generator=g), torch.randn(4, 8, generator=g)
    r = lambda t: t.detach().to(dtype).float()  # noqa: E731
    with RoundProducts(dtype) as mode:
        y = a @ b
        lin = torch.nn.functional.linear(c, w, torch.ones(4))
        da, = torch.autograd.grad((y * y.detach()).sum(), a)
    assert mode.rounded == 3  # the forward's two, the backward's one (the gradient of a only)
    torch.testing.assert_close(y, r(a) @ r(b), rtol=0, atol=0)
    torch.testing.assert_close(lin, r(c) @ r(w).T + 1, rtol=0, atol=0)
    torch.testing.assert_close(da, r(y) @ r(b).transpose(-1, -2), rtol=0, atol=0)
    assert (y - a @ b).abs().max() > 0 and (da - y.detach() @ b.detach().transpose(-1, -2)).abs().max() > 0
    with pytest.raises(NotImplementedError, match="does not round"):
        with RoundProducts(dtype):
            torch.mv(c, w[0])


@pytest.mark.parametrize("variant,start", [("lean", "fresh"), ("lean", "carried"), ("full", "fresh"),
                                           ("full-segments", "carried"), ("lean-segments", "fresh"),
                                           ("regs", "fresh"), ("regs", "carried"), ("blocked", "fresh"),
                                           ("blocked", "carried")])
@pytest.mark.slow
def test_packed_kernels_equal_documents_alone(variant, start):
    kind = KIND[variant]
    leaves, st = packed_case(kind, LENS, start)
    cu = cu_of(LENS)
    fast = run(triton_backend.TritonOp(kind, KERNELS[variant]), leaves, st, cu)
    dual = resolve_op(kind, "dual", DEV, torch.float32)
    q, k, v, lr, delta, lnw, lnb = leaves[:7]
    ref = per_document(dual, TTTInputs(q, k, v, lr, make_tau(delta), lnw, lnb), st, cu)
    compare(leaves, st, cu, fast, ref, tol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_packed_fp16(kind):
    """fp16 inputs (16-bit products, fp32 statistics and state) against the dual form on the same inputs."""
    leaves, st = packed_case(kind, [7, 24, 2], "fresh", dtype=torch.float16)
    cu = cu_of([7, 24, 2])
    fast = run(resolve_op(kind, "triton", DEV, torch.float16), leaves, st, cu)
    ref = run(resolve_op(kind, "dual", DEV, torch.float16), leaves, st, cu)
    compare(leaves, st, cu, fast, ref, tol=1e-2)
    compare_16bit(kind, leaves, st, cu, run(resolve_op(kind, "triton", DEV, torch.float16), leaves, st, cu))


@pytest.mark.slow
@pytest.mark.parametrize("split", [1, 2])
def test_packed_smem_bf16_as_accurate_as_the_dual_form(monkeypatch, split):
    """The smem kernels (TTT-MLP's default on Hopper in bf16) on carried documents of up to 260 tokens in bf16, the
    forward in one and in two programs per head: `compare_16bit`. (On the CPU through the shim: bf16 operands, exact
    products, fp32 sums. The carried weights rounded to bf16 after each update fail it: 2-10x the dual form's
    error, over the floor.)"""
    monkeypatch.setattr(mlp_smem, "nsplit", lambda d, heads=None, device=None: split)
    lens = [150, 1, 47, 260, 16]
    leaves, st = packed_case("mlp", lens, "carried", dtype=torch.bfloat16, b=16, d=64, H=2)
    fast = run(triton_backend.TritonOp("mlp", triton_backend.MLPKernels(impl="smem")), leaves, st, cu_of(lens))
    compare_16bit("mlp", leaves, st, cu_of(lens), fast)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_one_full_length_document_is_no_cu_seqlens(kind, T=43):
    """cu_seqlens = [0, T] runs the very kernels a plain call runs (one row; T % b != 0: the partial last
    mini-batch too): the same bits, forward and backward."""
    leaves, st = packed_case(kind, [T], "fresh")
    op = resolve_op(kind, "triton", DEV, torch.float32)
    res = []
    for cu in (cu_of([T]), None):
        o, s = run(op, leaves, st, cu)
        outs = [o, *s.params, *s.accum]
        res.append(outs + list(torch.autograd.grad(sum(t.square().sum() for t in outs), leaves)))
    for a, b in zip(*res):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind,backbone", [("linear", "mamba"), ("mlp", "transformer")])
def test_layer_on_the_kernels_packed_equals_separate(kind, backbone):
    """A TTT layer on the triton backend: packed documents (one op call) == each document alone, outputs and the
    gradients w.r.t. the input and every parameter."""
    from ttt.layers.ttt import TTTLinear, TTTMLP

    torch.manual_seed(0)
    layer = (TTTLinear if kind == "linear" else TTTMLP)(32, 2, backbone=backbone, mini_batch=B_MB,
                                                         backend="triton").to(DEV)
    lens = [9, 1, 20]
    x = torch.randn(1, sum(lens), 32, device=DEV, requires_grad=True)
    y, st = layer(x, cu_seqlens=cu_of(lens))
    parts = [layer(x[:, s:e]) for s, e in zip(cu_of(lens)[:-1].tolist(), cu_of(lens)[1:].tolist())]
    alone = torch.cat([p[0] for p in parts], 1)
    assert rel(y, alone) < 1e-5
    assert st.pos == tuple(lens)
    for i, p in enumerate(parts):
        for a, b in zip(st.op.params + st.op.accum, p[1].op.params + p[1].op.accum):
            assert (a[i] - b[0]).abs().max() < 1e-5
    w = torch.randn_like(y)
    wrt = [x, *layer.parameters()]
    g1 = torch.autograd.grad((y * w).sum(), wrt, allow_unused=True)
    g2 = torch.autograd.grad((alone * w).sum(), wrt, allow_unused=True)
    for a, b in zip(g1, g2):
        if b is not None and b.abs().max() > 0:
            assert rel(a, b) < 1e-4


def test_packed_call_derives_only_what_the_kernels_read():
    """A packed call on the kernels builds its rows and its documents' partial last mini-batches once per packing,
    each from the host boundaries (one copy, `packed.upload`), and neither the document index nor the position of
    every token (the layers' `Packing.seq_idx` / `positions`, made on first use)."""
    lens = [5, 16, 27]
    leaves, st = packed_case("linear", lens, "fresh")
    pk = packing(cu_of(lens), sum(lens), DEV)
    run(resolve_op("linear", "triton", DEV, torch.float32), leaves, st, pk)
    assert set(pk.memo) == {("ttt_rows", B_MB, triton_backend.GROUP), ("ttt_tails", B_MB)}
    rows = pk.memo[("ttt_rows", B_MB, triton_backend.GROUP)]
    assert rows.span.dtype == torch.int32 and rows.span.tolist() == [[0, 5, 0], [5, 21, 1], [21, 48, 2]]
    win = pk.memo[("ttt_tails", B_MB)]  # the last L % b tokens of each document
    assert win.valid.sum(1).tolist() == [5, 0, 3] and win.tokens[win.valid].tolist() == [0, 1, 2, 3, 4, 45, 46, 47]
    assert torch.equal(pk.seq_idx.cpu(), torch.tensor([0] * 5 + [1] * 16 + [2] * 27))
    assert torch.equal(pk.positions.cpu(), torch.cat([torch.arange(n) for n in lens]))


# ---- the shared-memory TTT-MLP pair (`ttt_mlp/chunk_smem.py`: head dim 64, b = 16, 16-bit inputs; the default for
# training on Hopper, packed or not): its whole mini-batches in the kernels, every document's partial last one in
# the dual form. fp16 on the CPU (the interpreter's bf16 is not faithful).

SMEM = triton_backend.MLPKernels(impl="smem", group=2)
# shorter than b, one whole mini-batch, four (two checkpoint groups) + 6, one token, two + 5
SMEM_LENS = [5, 16, 70, 1, 37]


@pytest.mark.parametrize("start,keep", [("fresh", False), pytest.param("carried", False, marks=pytest.mark.slow),
                                        ("carried", True)])
def test_packed_smem_equals_documents_alone(start, keep):
    """keep: the backward reads the start weights the forward kept, each document's mini-batches at its own slots."""
    leaves, st = packed_case("mlp", SMEM_LENS, start, dtype=torch.float16, b=16, d=64, H=1)
    cu = cu_of(SMEM_LENS)
    fast = run(triton_backend.TritonOp("mlp", replace(SMEM, keep=keep)), leaves, st, cu)
    q, k, v, lr, delta, lnw, lnb = leaves[:7]
    ref = per_document(resolve_op("mlp", "dual", DEV, torch.float16), TTTInputs(q, k, v, lr, make_tau(delta), lnw, lnb),
                       st, cu)
    compare(leaves, st, cu, fast, ref, tol=1e-2)


class _Launches:
    """Stands in for a kernel and records every launch's grid and schedule switch (SCHED) before running it."""

    def __init__(self, kernel, log, name):
        self.kernel, self.log, self.name = kernel, log, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, tuple(grid), kwargs["SCHED"]))
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_one_full_length_document_takes_the_plain_smem_launches(monkeypatch, T=43):
    """cu_seqlens = [0, T] on the smem pair: the launches of a plain call (same grids, no schedule), the same output
    and state bits, and the same gradients up to the order of their 16-bit sums (T % 16 != 0: the partial last
    mini-batch in the dual form both ways)."""
    log = []
    for name in ("ttt_mlp_smem_fwd_kernel", "ttt_mlp_smem_bwd_kernel"):
        monkeypatch.setattr(mlp_smem, name, _Launches(getattr(mlp_smem, name), log, name))
    leaves, st = packed_case("mlp", [T], "fresh", dtype=torch.float16, b=16, d=64, H=2)
    op = triton_backend.TritonOp("mlp", SMEM)
    res, launches = [], []
    for cu in (cu_of([T]), None):
        log.clear()
        o, s = run(op, leaves, st, cu)
        outs = [o, *s.params, *s.accum]
        res.append(outs + list(torch.autograd.grad(sum(t.float().square().sum() for t in outs), leaves)))
        launches.append(list(log))
    assert launches[0] == launches[1]
    assert [(name, sched) for name, _grid, sched in launches[0]] == [("ttt_mlp_smem_fwd_kernel", False),
                                                                   ("ttt_mlp_smem_bwd_kernel", False)]
    n = len(res[0]) - len(leaves)
    for a, b in zip(res[0][:n], res[1][:n]):  # outputs and final states: the same bits
        assert torch.equal(a, b)
    for a, b in zip(res[0][n:], res[1][n:]):  # gradients: autograd sums the kernels' and the tail's parts in its
        assert rel(a, b) < 2e-3  # own order (index_select / index_copy with cu_seqlens, slicing without), in 16 bits


def _smem_split_forwards_agree(lens, H, dtype, group):
    """The smem forward in one and in two programs per head (d 64) over packed documents with a start state of their
    own each (as carried rows have): the same outputs, final states and saved tensors (checkpoints, Z2, Z2b,
    X2b X2^T) where written, up to the order of fp32 sums (fp16), or within 1e-2 in bf16, where a sum's order
    flips some 16-bit roundings of the products' operands and the two walks drift apart by ~1e-3 (H200: final states
    6.4e-4, Z2b 1.8e-3); a wrong slice or slot is off by far more."""
    leaves, _ = packed_case("mlp", lens, "fresh", dtype=dtype, b=16, d=64, H=H)
    q, k, v, lr, delta, lnw, lnb = (t.detach() for t in leaves[:7])
    g = torch.Generator().manual_seed(5)
    N, F = len(lens), 4 * 64
    params = tuple((0.02 + 0.05 * torch.randn((N, H, *sh), generator=g)).to(DEV) for sh in ((64, F), (F,), (F, 64), (64,)))
    bounds = [0, *torch.tensor(lens).cumsum(0).tolist()]
    rows = document_rows(bounds, 16, group, cu=cu_of(lens).to(DEV))
    tau = make_tau(delta)
    o1, fin1, ck1 = mlp_smem.fwd(q, k, v, lr, tau, lnw, lnb, params, 16, group, rows=rows, split=1)
    o2, fin2, ck2 = mlp_smem.fwd(q, k, v, lr, tau, lnw, lnb, params, 16, group, rows=rows, split=2)
    tok = torch.zeros(sum(lens), dtype=torch.bool, device=DEV)  # tokens of whole mini-batches (written)
    slot = torch.zeros(rows.slots, dtype=torch.bool, device=DEV)  # checkpoint slots written
    for i, (s, n) in enumerate(zip(bounds[:-1], lens)):
        tok[s:s + n // 16 * 16] = True
        first = int(rows.span[i, 2])
        slot[first:first + -(-(n // 16) // group)] = True
    floor = 1e-2 if dtype == torch.bfloat16 else 0.0
    pairs = [(o1[0, tok], o2[0, tok], 2e-2)] + [(a, b, max(1e-4, floor)) for a, b in zip(fin1, fin2)]
    pairs += [(a[slot], b[slot], max(1e-4, floor)) for a, b in zip(ck1[:4], ck2[:4])]
    pairs += [(a[0, tok], b[0, tok], max(1e-3, floor)) for a, b in zip(ck1[4:], ck2[4:])]
    for i, (a, b, tol) in enumerate(pairs):
        assert rel(b.float(), a.float()) <= tol, (i, rel(b.float(), a.float()))


def test_smem_split_forward_saves_what_one_program_does():
    _smem_split_forwards_agree(SMEM_LENS, 2, torch.float16, 2)


@pytest.mark.gpu
@needs_cuda
def test_gpu_smem_split_forward_saves_what_one_program_does():
    """The GPU test of the packed kernels' documents (where the bf16 comparison with carried rows fails with the
    split forward: docs/kernels_notes.md), bf16, 4 heads."""
    _smem_split_forwards_agree([300, 1, 47, 1029, 16, 640, 15], 4, torch.bfloat16, triton_backend.GROUP)


def test_default_mlp_pair_is_smem_for_packed_documents(monkeypatch):
    """Packed documents take the pair a plain call takes (on Hopper with gradients at d 64, 16-bit: smem; the choice
    does not see the packing); they once fell to the register pair (one 8k document: 47.2 ms against 29.2 plain,
    H200)."""
    monkeypatch.setattr(triton_backend, "_smem_runs_on", lambda device: True)
    chosen = []
    monkeypatch.setattr(triton_backend.MLPKernels, "_smem_body", lambda self, x, params, rows, save: chosen.append(
        x.packing is not None) or (x.q, params))
    kernels = triton_backend.MLPKernels()
    lens = [5, 27]
    for cu in (None, torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])):
        leaves, st = packed_case("mlp", lens, "fresh", dtype=torch.bfloat16, b=16, d=64, H=2)
        q, k, v, lr, delta, lnw, lnb = leaves[:7]
        kernels.body(TTTInputs(q, k, v, lr, make_tau(delta), lnw, lnb, cu), st.params, None, True)
    assert chosen == [False, True]


def test_smem_schedule_longest_first():
    """Pairs by decreasing work, each to the least loaded group: the longest document's pairs alone in their
    groups; None where the plain walk is as good (a group per pair, or equal work)."""
    sched = mlp_smem.schedule([139, 97, 7], 2, 4)  # 6 (row, head) pairs on 4 groups
    offsets, pairs = sched[:5], sched[5:]
    assert sorted(pairs) == list(range(6)) and offsets[0] == 0 and offsets[-1] == 6
    lists = [pairs[offsets[g]:offsets[g + 1]] for g in range(4)]
    assert [0] in lists and [1] in lists  # row 0 (139 mini-batches): its two pairs alone
    assert max(sum([140, 140, 98, 98, 8, 8][p] for p in ls) for ls in lists) == 140
    assert mlp_smem.schedule([9, 1], 2, 4) is None
    assert mlp_smem.schedule([3, 3, 3], 2, 4) is None


def _scheduled_walk_equals_plain(lens, H, groups, group=2, skip=None):
    """The smem kernels on packed rows of unequal lengths with `groups` program groups walking a schedule give the
    bits of the plain launch (forward: outputs at the rows' whole mini-batches, final weights, checkpoints;
    backward: every gradient); skip: a schedule listing some pairs twice and others never, whose missing rows'
    final weights stay unwritten (the kernel walks the schedule it is given)."""
    inp = random_inputs("mlp", B=1, T=sum(lens), H=H, d=64, b=16, dtype=torch.float16, seed=3)
    x, st = inp.inputs(), TTTState.initial("mlp", inp.init, len(lens))
    x = TTTInputs(*(t.to(DEV) for t in (x.q, x.k, x.v, x.lr, x.tau, x.ln_weight, x.ln_bias)))
    params = tuple(p.float().contiguous().to(DEV) for p in st.params)
    cu = cu_of(lens)
    rows = document_rows(cu.tolist(), 16, group, cu=cu.to(DEV))
    work = [n // 16 for n in rows.lengths]
    sched = torch.tensor(mlp_smem.schedule(work, H, groups), dtype=torch.int32, device=DEV)
    assert max(sched[g + 1] - sched[g] for g in range(groups)) > 1  # groups walk several pairs
    args = (x.q, x.k, x.v, x.lr, x.tau, x.ln_weight, x.ln_bias)
    whole = torch.zeros(sum(lens), dtype=torch.bool)
    for s0, n in zip(cu.tolist(), work):
        whole[s0:s0 + 16 * n] = True
    for split in (1, 2):  # the forward in one and in two programs per head (groups of `split` programs)
        o1, fin1, ck1 = mlp_smem.fwd(*args, params, 16, group, rows=rows, split=split)
        o2, fin2, ck2 = mlp_smem.fwd(*args, params, 16, group, rows=rows, programs=split * groups, sched=sched,
                                     split=split)
        torch.testing.assert_close(o1[:, whole], o2[:, whole], rtol=0, atol=0)
        for a, b in zip((*fin1, *ck1[:4]), (*fin2, *ck2[:4])):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # slots of partial groups: unwritten
        torch.testing.assert_close(ck1[4][:, whole], ck2[4][:, whole], rtol=0, atol=0)  # Z2: whole mini-batches
    if skip is not None:
        listed, sched_skip = skip
        _o, fin3, _ck = mlp_smem.fwd(*args, params, 16, group, rows=rows, programs=groups, save=False, split=1,
                                     sched=torch.tensor(sched_skip, dtype=torch.int32, device=DEV))
        unlisted = [n for n in range(len(lens)) if n not in listed]
        assert fin3[0][listed].isfinite().all() and fin3[0][unlisted].isnan().all()
    g = torch.Generator().manual_seed(4)
    do = torch.randn(o1.shape, generator=g).to(o1.dtype).to(DEV)
    dfin = tuple(torch.randn(p.shape, generator=g).to(DEV) for p in params)
    g1 = mlp_smem.bwd(*args, ck1, do, dfin, 16, group, rows=rows)
    g2 = mlp_smem.bwd(*args, ck1, do, dfin, 16, group, rows=rows, programs=2 * groups, sched=sched)
    for a, b in zip((*g1[:7], *g1[7]), (*g2[:7], *g2[7])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_smem_scheduled_walk_equals_one_pair_per_group():
    """4 (row, head) pairs on 2 groups; a schedule listing pairs 0 and 3 twice each leaves rows 1 and 2 unwritten."""
    _scheduled_walk_equals_plain([35, 16, 5, 33], H=1, groups=2, skip=([0, 3], [0, 2, 4, 0, 0, 3, 3]))


@pytest.mark.gpu
@needs_cuda
def test_gpu_smem_scheduled_walk():
    """On the GPU (wgmma, the backward's cooperative pairs of programs): 28 (document, head) pairs on 5 groups."""
    _scheduled_walk_equals_plain([300, 1, 47, 1029, 16, 640, 15], H=4, groups=5, group=8)


@pytest.mark.gpu
@needs_cuda
def test_gpu_packed_smem_scheduled_equals_dual():
    """Through the op with its default kernels (on Hopper: smem), more (document, head) pairs than the backward's
    program groups (9 documents x 12 heads = 108 pairs, 66 groups on an H200's 132 SMs): the scheduled walk, the
    documents' partial last mini-batches, every output, state row and gradient == the dual form (bf16)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    lens = [300, 1, 47, 1029, 16, 640, 15, 200, 77]
    if triton_backend.default_mlp_impl(64, torch.bfloat16, torch.device(DEV), 16, True) == "smem":
        work = [n // 16 for n in lens]
        assert mlp_smem.schedules(work, 12, 64, torch.device(DEV))[1] is not None  # the backward walks a schedule
    leaves, st = packed_case("mlp", lens, "fresh", dtype=torch.bfloat16, b=16, d=64, H=12)
    fast = run(resolve_op("mlp", "triton", DEV, torch.bfloat16), leaves, st, cu_of(lens))
    compare_16bit("mlp", leaves, st, cu_of(lens), fast)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("start", ["fresh", "carried"])
def test_gpu_packed_kernels(kind, dtype, start):
    """Full-size heads (d = 64, b = 16, the default kernels) on documents of realistic lengths: the kernels == the
    dual form on the same packed inputs (itself == the documents alone, tests/test_packed.py); bf16 as accurate as
    the dual form in bf16 (`compare_16bit`)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    lens = [300, 1, 47, 1029, 16, 640, 15]
    leaves, st = packed_case(kind, lens, start, dtype=dtype, b=16, d=64, H=4)
    fast = run(resolve_op(kind, "triton", DEV, dtype), leaves, st, cu_of(lens))
    if dtype == torch.bfloat16:
        compare_16bit(kind, leaves, st, cu_of(lens), fast)
    else:
        compare(leaves, st, cu_of(lens), fast, run(resolve_op(kind, "dual", DEV, dtype), leaves, st, cu_of(lens)),
                tol=1e-4)
