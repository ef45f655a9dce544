"""Packed documents (docs/packed.md): N documents in one sequence with `cu_seqlens`, each computed as if it
were alone. For the TTT op reference, both TTT layers (both backbones), the causal conv, attention, Mamba-2
and the model: packed == each document run separately, for lengths that are and are not multiples of the
mini-batch (length 1 and shorter than one mini-batch included), from fresh states and from states carried
over from an earlier packed call: outputs, every final state row and every gradient, in float64. Then the
contract's errors, the attention masks, the data pipeline (documents found at EOS, packed batches), training
with --pack-documents and evaluation by position within documents.

Removing any reset (the state carried from one document into the next, a conv window or an attention score
reaching across a boundary, RoPE positions not restarting, the boundary target kept) fails these tests."""
from __future__ import annotations

import json
import random
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import random_inputs
from ttt.config import RunOptions, get_config
from ttt.data import IGNORE, DocumentBatcher, document_bounds, document_sequences, pack_rows, prepare
from ttt.evaluate import evaluate_checkpoints, evaluate_documents
from ttt.layers.attention import Attention, PackedEnd, document_attention, document_block_mask
from ttt.layers.conv import CausalConv1d
from ttt.layers.mamba import Mamba2, MambaState
from ttt.layers.ttt import TTTLayerState, TTTLinear, TTTMLP
from ttt.model import TTTLM
from ttt.ops import TTTInputs, TTTState, resolve_op, ttt_op
from ttt.ops.common import check_cu_seqlens
from ttt.ops.packed import packing, per_document
from ttt.train import TrainConfig, train

B_MB = 4  # the mini-batch size of every TTT test here
LENGTHS = {"multiples": [4, 8, 4], "mixed": [1, 3, 6, 9, 2], "one": [5], "ones": [1, 1, 1]}
# "mixed": length 1 and < b included; "ones": documents of one token each (the op's one-token step)
TOL = dict(rtol=1e-10, atol=1e-12)


def cu_of(lens) -> torch.Tensor:
    return torch.tensor([0, *lens]).cumsum(0)


def spans(lens):
    cu = cu_of(lens).tolist()
    return list(zip(cu[:-1], cu[1:]))


def assert_same(packed, separate, wrt, tol=TOL):
    """Two equally long lists of tensors that must be equal, and the gradients w.r.t. `wrt` of one random
    weighting of each list (at least one of them non-zero)."""
    assert len(packed) == len(separate)
    for i, (a, b) in enumerate(zip(packed, separate)):
        torch.testing.assert_close(a, b, **tol, msg=f"value {i}")
    g = torch.Generator().manual_seed(7)
    ws = [torch.randn(b.shape, generator=g, dtype=b.dtype) for b in separate]
    gp = torch.autograd.grad(sum((a * w).sum() for a, w in zip(packed, ws)), wrt, allow_unused=True,
                             retain_graph=True)  # the two may share a part (e.g. tau from delta)
    gs = torch.autograd.grad(sum((b * w).sum() for b, w in zip(separate, ws)), wrt, allow_unused=True)
    nonzero = 0
    for i, (a, b) in enumerate(zip(gp, gs)):
        if b is None:
            assert a is None or not a.any(), f"gradient {i}"
            continue
        torch.testing.assert_close(a, b, **tol, msg=f"gradient {i}")
        nonzero += bool(b.any())
    assert nonzero


# ----------------------------------------------------------------------------- the contract

@pytest.mark.parametrize("cu,T,kw,msg", [
    ([0, 3, 5], 5, {}, r"cu_seqlens: expected an int64 tensor \[N \+ 1\], got list"),
    (torch.tensor([0, 3, 5], dtype=torch.int32), 5, {}, r"cu_seqlens: expected dtype torch.int64, got torch.int32"),
    (torch.tensor([[0, 5]]), 5, {}, r"cu_seqlens: expected shape \[N \+ 1\] with N >= 1 documents, got \(1, 2\)"),
    (torch.tensor([0]), 5, {}, r"cu_seqlens: expected shape \[N \+ 1\] with N >= 1 documents, got \(1,\)"),
    (torch.tensor([1, 3, 5]), 5, {}, r"cu_seqlens: expected to start at 0, got 1"),
    (torch.tensor([0, 3, 3, 5]), 5, {}, r"cu_seqlens: expected strictly increasing offsets .* got 3 then 3 at index 1"),
    (torch.tensor([0, 4, 2, 5]), 5, {}, r"cu_seqlens: expected strictly increasing offsets .* got 4 then 2 at index 1"),
    (torch.tensor([0, 3, 6]), 5, {}, r"cu_seqlens: expected to end at T = 5 \(the packed length\), got 6"),
    (torch.tensor([0, 3, 5]), 5, {"batch_size": 2}, r"cu_seqlens: expected a batch of one packed sequence, got batch "
                                                     r"size 2"),
    (torch.tensor([0, 3, 5]), 5, {"state_rows": 3}, r"cu_seqlens: 2 documents, but the given state has 3 rows"),
])
def test_bad_cu_seqlens_are_refused_naming_it(cu, T, kw, msg):
    with pytest.raises((TypeError, ValueError), match="^" + msg):
        check_cu_seqlens(cu, T, **kw)
    with pytest.raises((TypeError, ValueError), match="^" + msg):
        packing(cu, T, **kw)


def test_every_entry_point_checks_cu_seqlens():
    """Each layer and the model refuse bad boundaries, a batch other than one and a state of other rows."""
    torch.manual_seed(0)
    x = torch.randn(1, 6, 16)
    bad, short = torch.tensor([0, 2, 2, 6]), torch.tensor([0, 2, 5])
    layers = [TTTLinear(16, 2, mini_batch=B_MB), TTTMLP(16, 2, backbone="transformer"), Attention(16, 2),
              Mamba2(16, d_state=4, head_dim=8), CausalConv1d(16)]
    for layer in layers:
        for cu in (bad, short):
            with pytest.raises(ValueError, match="^cu_seqlens: expected"):
                layer(x, None, cu_seqlens=cu)
        with pytest.raises(ValueError, match="^cu_seqlens: expected a batch of one"):
            layer(x.expand(2, -1, -1), None, cu_seqlens=torch.tensor([0, 6]))
    two_rows = {0: layers[0].init_state(2), 3: layers[3].init_state(2), 4: layers[4].init_state(2)}
    for i, st in two_rows.items():
        with pytest.raises(ValueError, match="^cu_seqlens: 3 documents, but the given state has 2 rows"):
            layers[i](x, st, cu_seqlens=torch.tensor([0, 1, 3, 6]))
    model = TTTLM(get_config("debug", vocab_size=20))
    with pytest.raises(ValueError, match="^cu_seqlens: expected to end at T = 6"):
        model(torch.zeros(1, 6, dtype=torch.long), cu_seqlens=short)
    with pytest.raises(TypeError, match="^cu_seqlens: expected dtype torch.int64"):
        model(torch.zeros(1, 6, dtype=torch.long), cu_seqlens=short.int())


def test_packed_states_continue_packed_calls_only():
    layer = TTTLinear(16, 2, mini_batch=B_MB)
    _, st = layer(torch.randn(1, 5, 16), cu_seqlens=torch.tensor([0, 2, 5]))
    assert st.pos == (2, 3)
    with pytest.raises(ValueError, match="^state: a state of packed documents .* pass cu_seqlens"):
        layer(torch.randn(2, 3, 16), st)
    model = TTTLM(get_config("debug", vocab_size=20, mini_batch=B_MB))
    _, mst = model(torch.zeros(1, 5, dtype=torch.long), cu_seqlens=torch.tensor([0, 2, 5]))
    assert mst.pos == (2, 3)
    with pytest.raises(ValueError, match="^state: a state of packed documents"):
        model(torch.zeros(2, 3, dtype=torch.long), mst)
    attn = TTTLM(get_config("debug", mixer="attention", vocab_size=20))
    _, ast = attn(torch.zeros(1, 5, dtype=torch.long), cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="^state: attention starts every packed document afresh"):
        attn(torch.zeros(1, 5, dtype=torch.long), ast, cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="^state: attention over packed documents"):
        Attention(16, 2)(torch.randn(1, 5, 16), Attention(16, 2).init_state(1), cu_seqlens=torch.tensor([0, 5]))


# ----------------------------------------------------------------------------- the TTT op reference

def op_rows(kind, n, d=4, H=2, seed=3):
    """A state of n rows at unequal positions, mid-mini-batch rows with a pending accumulator."""
    g = torch.Generator().manual_seed(seed)
    ref = random_inputs(kind, B=n, T=1, H=H, d=d, b=B_MB, pos=1, seed=seed)
    pos = tuple(int(p) for p in torch.randint(0, 2 * B_MB, (n,), generator=g))
    live = torch.tensor([float(p % B_MB != 0) for p in pos], dtype=torch.float64)
    params = tuple(p.expand(n, *p.shape).clone() + 0.1 * torch.randn(n, *p.shape, generator=g, dtype=torch.float64)
                   for p in ref.init)
    accum = tuple(a * live.view(-1, *[1] * (a.dim() - 1)) for a in ref.accum)
    return TTTState(kind, params, accum, pos)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("route,backend,lens", [
    ("per_document", "dual", LENGTHS["mixed"]), ("per_document", "naive", LENGTHS["mixed"]),
    ("native", "dual", LENGTHS["multiples"]), ("native", "dual", LENGTHS["mixed"]), ("native", "dual", LENGTHS["one"]),
    ("native", "dual", LENGTHS["ones"]), ("native", "naive", LENGTHS["mixed"])],
    ids=["reference-dual", "reference-naive", "dual-multiples", "dual-mixed", "dual-one", "step-ones", "naive-mixed"])
@pytest.mark.parametrize("start", ["fresh", "carried"])
def test_op_packed_equals_separate(kind, route, backend, lens, start):
    """The op on packed documents (native: ttt_op with cu_seqlens; per_document: the reference's loop) == every
    document run alone from its own row of the state: outputs, every final state row (weights, accumulators,
    position) and the gradients w.r.t. every input and the initial state (weights and accumulators), fp64.
    "carried": rows at unequal positions, mid-mini-batch ones with a pending accumulator."""
    inp = random_inputs(kind, B=1, T=sum(lens), H=2, d=4, b=B_MB, seed=1)
    n = len(lens)
    st = op_rows(kind, n) if start == "carried" else TTTState.initial(kind, inp.init, n, dtype=torch.float64)
    leaves = [inp.q, inp.k, inp.v, inp.lr, inp.delta, inp.ln_weight, inp.ln_bias, *st.params, *st.accum]
    for t in leaves:
        t.requires_grad_()

    op = resolve_op(kind, backend, "cpu", torch.float64)
    x = TTTInputs(inp.q, inp.k, inp.v, inp.lr, inp.tau, inp.ln_weight, inp.ln_bias)
    if route == "native":
        o, fin = ttt_op(kind, inp.q, inp.k, inp.v, inp.lr, inp.tau, inp.ln_weight, inp.ln_bias, st, backend=backend,
                        cu_seqlens=cu_of(lens))
    else:
        o, fin = per_document(op, x, st, cu_of(lens))
    outs, packed_rows, separate_rows = [], [], []
    rows = st.pos if isinstance(st.pos, tuple) else (st.pos,) * n
    for i, (s, e) in enumerate(spans(lens)):
        row = TTTState(kind, tuple(p[i:i + 1] for p in st.params), tuple(a[i:i + 1] for a in st.accum), rows[i])
        oi, fi = op(x.tokens(s, e), row)
        outs.append(oi)
        packed_rows += [p[i] for p in fin.params + fin.accum]
        separate_rows += [p[0] for p in fi.params + fi.accum]
        assert fin.pos[i] == fi.pos == rows[i] + e - s
    assert_same([o] + packed_rows, [torch.cat(outs, 1)] + separate_rows, leaves)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_op_resets_at_every_boundary(kind):
    """The same tokens as one sequence give other outputs after the first boundary (so a missing reset would show
    in the tests above), and the packed call equals the reference's."""
    lens = LENGTHS["mixed"]
    inp = random_inputs(kind, B=1, T=sum(lens), H=2, d=4, b=B_MB, seed=1)
    st = TTTState.initial(kind, inp.init, len(lens), dtype=torch.float64)
    args = (inp.q, inp.k, inp.v, inp.lr, inp.tau, inp.ln_weight, inp.ln_bias)
    o, _ = ttt_op(kind, *args, st, backend="dual", cu_seqlens=cu_of(lens))
    whole, _ = ttt_op(kind, *args, TTTState.initial(kind, inp.init, 1, dtype=torch.float64), backend="dual")
    ref, _ = per_document(resolve_op(kind, "dual"), TTTInputs(*args), st, cu_of(lens))
    torch.testing.assert_close(o, ref, **TOL)
    torch.testing.assert_close(o[:, :lens[0]], whole[:, :lens[0]], **TOL)
    for s, e in spans(lens)[1:]:
        assert (o[:, s:e] - whole[:, s:e]).abs().amax() > 1e-3


@pytest.mark.parametrize("cu,kw,msg", [
    (torch.tensor([0, 2, 6], dtype=torch.int32), {}, r"cu_seqlens: expected dtype torch.int64, got torch.int32"),
    (torch.tensor([0, 2, 5]), {}, r"cu_seqlens: expected to end at T = 6"),
    (torch.tensor([0, 2, 2, 6]), {}, r"cu_seqlens: expected strictly increasing offsets"),
    (torch.tensor([1, 6]), {}, r"cu_seqlens: expected to start at 0, got 1"),
    (torch.tensor([0, 2, 6]), {"rows": 3}, r"cu_seqlens: 2 documents, but the given state has 3 rows"),
    (torch.tensor([0, 2, 6]), {"pos": (1, 2, 3)}, r"state: expected a position shared by all rows .* got \(1, 2, 3\)"),
    (torch.tensor([0, 6]), {"batch": 2}, r"cu_seqlens: expected a batch of one packed sequence, got batch size 2"),
])
def test_op_refuses_bad_cu_seqlens(cu, kw, msg):
    inp = random_inputs("linear", B=kw.get("batch", 1), T=6, H=2, d=4, b=B_MB)
    st = TTTState.initial("linear", inp.init, kw.get("rows", cu.numel() - 1))
    if "pos" in kw:
        st = replace(st, pos=kw["pos"])
    with pytest.raises((TypeError, ValueError), match="^" + msg):
        ttt_op("linear", inp.q, inp.k, inp.v, inp.lr, inp.tau, inp.ln_weight, inp.ln_bias, st, cu_seqlens=cu)


def test_op_reference_refuses_a_state_of_other_rows():
    inp = random_inputs("linear", B=1, T=6, H=2, d=4, b=B_MB)
    st = TTTState.initial("linear", inp.init, 3)
    x = TTTInputs(inp.q, inp.k, inp.v, inp.lr, inp.tau, inp.ln_weight, inp.ln_bias)
    with pytest.raises(ValueError, match="^cu_seqlens: 2 documents, but the given state has 3 rows"):
        per_document(lambda *a: None, x, st, torch.tensor([0, 2, 6]))
    with pytest.raises(TypeError, match="^state: expected a TTTState"):
        per_document(lambda *a: None, x, None, torch.tensor([0, 6]))


# ----------------------------------------------------------------------------- layers

def ttt_layer(kind, backbone, seed=0):
    from test_layers import perturb_  # the layer tests' perturbation: every parameter off its init

    torch.manual_seed(seed)
    layer = (TTTLinear if kind == "linear" else TTTMLP)(16, 2, backbone=backbone, mini_batch=B_MB).double()
    layer.base_lr *= 4.0
    return perturb_(layer, seed + 1)


def ttt_rows(st: TTTLayerState, i: int) -> list:
    return [t[i] for t in (*st.op.params, *st.op.accum, *([] if st.conv is None else [st.conv]))]


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("backbone", ["mamba", "transformer"])
@pytest.mark.parametrize("lens", [LENGTHS["multiples"], LENGTHS["mixed"]], ids=["multiples", "mixed"])
@pytest.mark.parametrize("start", ["fresh", "carried"])
def test_ttt_layer_packed_equals_separate(kind, backbone, lens, start):
    """Outputs, every state row (inner weights, accumulators, conv window) and the gradients w.r.t. x and every
    parameter. "carried": the documents continue from a packed call over prefixes of unequal lengths, so
    every row starts at another position (RoPE mod b, tau and the commit point per document)."""
    layer = ttt_layer(kind, backbone)
    g = torch.Generator().manual_seed(5)
    pre = [3, 5, 1, 4, 2][:len(lens)] if start == "carried" else None
    x = torch.randn(1, sum(lens), 16, generator=g, dtype=torch.float64, requires_grad=True)
    xp = None if pre is None else torch.randn(1, sum(pre), 16, generator=g, dtype=torch.float64)
    st = None if pre is None else layer(xp, cu_seqlens=cu_of(pre))[1]
    y, fin = layer(x, st, cu_seqlens=cu_of(lens))
    packed, separate_y, separate = [y], [], []
    for i, (s, e) in enumerate(spans(lens)):
        sti = None
        if pre is not None:
            a, b = spans(pre)[i]
            sti = layer(xp[:, a:b])[1]
        yi, fi = layer(x[:, s:e], sti)
        separate_y.append(yi)
        packed += ttt_rows(fin, i)
        separate += ttt_rows(fi, 0)
        assert fin.pos[i] == fi.pos
    assert_same(packed, [torch.cat(separate_y, 1)] + separate, [x, *layer.parameters()])


def test_generic_inner_layer_packed_equals_separate():
    from torch import nn

    from ttt.layers.ttt import TTTLayer

    torch.manual_seed(0)
    layer = TTTLayer(16, 2, inner=nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)), mini_batch=B_MB).double()
    lens = LENGTHS["mixed"]
    x = torch.randn(1, sum(lens), 16, dtype=torch.float64, requires_grad=True)
    y, st = layer(x, cu_seqlens=cu_of(lens))
    assert st.pos == tuple(lens)
    assert_same([y], [torch.cat([layer(x[:, s:e])[0] for s, e in spans(lens)], 1)], [x, *layer.parameters()])


@pytest.mark.parametrize("lens", LENGTHS.values(), ids=LENGTHS.keys())
def test_conv_packed_equals_separate(lens):
    torch.manual_seed(0)
    conv = CausalConv1d(6, 4).double()
    x = torch.randn(1, sum(lens), 6, dtype=torch.float64, requires_grad=True)
    st = torch.randn(len(lens), 3, 6, dtype=torch.float64, requires_grad=True)
    y, fin = conv(x, st, cu_seqlens=cu_of(lens))
    parts = [conv(x[:, s:e], st[i:i + 1]) for i, (s, e) in enumerate(spans(lens))]
    assert_same([y, fin], [torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts])],
                [x, st, conv.weight, conv.bias])
    y0, fin0 = conv(x, None, cu_seqlens=cu_of(lens))  # no state: zeros
    parts = [conv(x[:, s:e]) for s, e in spans(lens)]
    torch.testing.assert_close(y0, torch.cat([p[0] for p in parts], 1), **TOL)
    torch.testing.assert_close(fin0, torch.cat([p[1] for p in parts]), **TOL)


@pytest.mark.parametrize("lens", LENGTHS.values(), ids=LENGTHS.keys())
def test_attention_packed_equals_separate(lens):
    torch.manual_seed(0)
    attn = Attention(16, 2).double()
    x = torch.randn(1, sum(lens), 16, dtype=torch.float64, requires_grad=True)
    y, st = attn(x, cu_seqlens=cu_of(lens))
    assert st == PackedEnd(tuple(lens))
    sep = torch.cat([attn(x[:, s:e])[0] for s, e in spans(lens)], 1)
    assert_same([y], [sep], [x, *attn.parameters()])


@pytest.mark.parametrize("lens", [[1, 3, 4, 7, 9, 2, 30, 1, 1], [8, 8, 8], [5], [13, 2, 40], [4, 4, 4, 4, 1]])
def test_flex_block_mask_equals_create_block_mask(lens):
    """The BlockMask built from the boundaries equals the one FlexAttention derives from the dense mask
    (small blocks, so that many blocks are full, partial and empty)."""
    from torch.nn.attention.flex_attention import create_block_mask

    pk = packing(cu_of(lens), sum(lens))
    doc = pk.seq_idx
    ref = create_block_mask(lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv), None, None, pk.total, pk.total,
                            device="cpu", BLOCK_SIZE=4)
    mine = document_block_mask(pk, block_size=4)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices",
                 "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(mine, name), getattr(ref, name)), name


def test_flex_attention_equals_sdpa_mask_on_cpu():
    """The FlexAttention path (eager here: forward only on the CPU) against SDPA with the boolean mask, over
    three blocks of 128 queries with documents inside and across blocks."""
    lens = [100, 3, 140, 57, 60]
    pk = packing(cu_of(lens), sum(lens))
    q, k, v = (torch.randn(1, 2, sum(lens), 16) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = document_attention(q, k, v, pk, flex=True)
    torch.testing.assert_close(flex, document_attention(q, k, v, pk, flex=False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lens", [[1, 3, 6, 9, 2], [12, 20, 1], [40]], ids=["short", "across-chunks", "one"])
@pytest.mark.parametrize("start", ["fresh", "given"])
def test_mamba_packed_equals_separate(lens, start):
    """The chunked reference with resets (chunks of 8: documents start and end inside chunks and span them):
    outputs, every document's final conv window and SSM state, every gradient (given states included)."""
    torch.manual_seed(0)
    m = Mamba2(16, d_state=5, head_dim=4, chunk_size=8, backend="torch").double()
    x = torch.randn(1, sum(lens), 16, dtype=torch.float64, requires_grad=True)
    st = None
    if start == "given":
        st = m.init_state(len(lens))
        st = MambaState(torch.randn_like(st.conv).requires_grad_(), torch.randn_like(st.ssm).requires_grad_())
    y, fin = m(x, st, cu_seqlens=cu_of(lens))
    parts = [m(x[:, s:e], None if st is None else MambaState(st.conv[i:i + 1], st.ssm[i:i + 1]))
             for i, (s, e) in enumerate(spans(lens))]
    wrt = [x, *m.parameters()] + ([] if st is None else [st.conv, st.ssm])
    assert_same([y, fin.conv, fin.ssm], [torch.cat([p[0] for p in parts], 1), torch.cat([p[1].conv for p in parts]),
                                         torch.cat([p[1].ssm for p in parts])], wrt)


# ----------------------------------------------------------------------------- the model

MODELS = [("ttt_linear", "mamba"), ("ttt_mlp", "transformer"), ("attention", "transformer"), ("mamba", "transformer")]


@pytest.mark.parametrize("mixer,backbone", MODELS)
def test_model_packed_equals_separate(mixer, backbone):
    """Logits, and the loss with targets: packed (the target at every boundary skipped) == the documents
    alone, each scoring all its targets but the last (the next document's first token): per token NLL and
    every parameter gradient."""
    torch.manual_seed(0)
    model = TTTLM(get_config("debug", mixer=mixer, backbone=backbone, vocab_size=40, mini_batch=B_MB,
                             mamba_head_dim=16)).double()
    lens = LENGTHS["mixed"]
    ids = torch.randint(0, 40, (1, sum(lens)))
    tg = torch.randint(0, 40, (1, sum(lens)))
    cu = cu_of(lens)
    with torch.no_grad():
        logits, st = model(ids, cu_seqlens=cu)
        sep = [model(ids[:, s:e])[0] for s, e in spans(lens)]
    torch.testing.assert_close(logits, torch.cat(sep, 1), rtol=1e-6, atol=1e-6)  # logits come out in fp32
    assert st.pos == tuple(lens)
    nll, _ = model(ids, cu_seqlens=cu, targets=tg, reduction="none")
    last = len(lens) - 1
    parts = [model(ids[:, s:e], targets=tg[:, s:e] if i == last else tg[:, s:e].index_fill(1, torch.tensor([e - s - 1]),
                                                                                              IGNORE),
                   reduction="none")[0] for i, (s, e) in enumerate(spans(lens))]
    assert (nll[0, cu[1:-1] - 1] == 0).all()  # the boundaries count nothing
    assert_same([nll], [torch.cat(parts, 1)], list(model.parameters()))
    mean, _ = model(ids, cu_seqlens=cu, targets=tg)  # the mean skips the boundaries
    torch.testing.assert_close(mean, nll.sum() / (sum(lens) - (len(lens) - 1)), **TOL)


def test_model_with_grad_checkpointing_packed():
    """The packing (and the attention mask made from it once) reaches the recomputed blocks."""
    torch.manual_seed(0)
    model = TTTLM(get_config("debug", mixer="attention", vocab_size=40)).double()
    ids = torch.randint(0, 40, (1, 21))
    cu = cu_of(LENGTHS["mixed"])
    grads = []
    for ckpt in (False, True):
        model.grad_checkpointing = ckpt
        model.zero_grad()
        model(ids, cu_seqlens=cu, targets=ids)[0].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL)


# ----------------------------------------------------------------------------- data

EOS = 9


def shard(seed=0, n_docs=30, max_len=25) -> np.ndarray:
    """Documents of tokens 0..8 each ending in EOS; the last one without EOS."""
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(0, 9, rng.integers(0, max_len)), EOS) for _ in range(n_docs)]
    return np.concatenate(docs + [rng.integers(0, 9, 4)]).astype(np.uint16)


def test_document_bounds():
    toks = np.array([1, 2, EOS, 3, EOS, EOS, 4, 5], dtype=np.uint16)
    assert document_bounds(toks, EOS).tolist() == [0, 3, 5, 6, 8]
    assert document_bounds(toks[:6], EOS).tolist() == [0, 3, 5, 6]
    assert document_bounds(np.zeros(0, np.uint16), EOS).tolist() == [0]


@pytest.mark.parametrize("T", [7, 16])
def test_document_batcher_packs_whole_documents(T):
    toks = shard()
    docs = document_bounds(toks, EOS)
    b = DocumentBatcher(toks, EOS, 3, T, seed=4)
    for step in range(5):
        x, y, starts = b.batch(step)
        assert x.shape == y.shape == starts.shape == (3, T) and starts[:, 0].all()
        for r in range(3):
            cuts = torch.nonzero(starts[r]).flatten().tolist() + [T]
            for a, e in zip(cuts[:-1], cuts[1:]):
                piece = x[r, a:e].numpy()
                hits = [o for o in b.pieces[:-1] if np.array_equal(toks[o:o + len(piece)], piece)]
                assert hits, "every piece is a piece of a document, from its start"
                o = hits[0]
                assert (o in docs) or (o - docs[np.searchsorted(docs, o, "right") - 1]) % T == 0
                whole_doc_end = o + len(piece) in docs
                for j in range(a, e):  # y: the next token, IGNORE after a document's end
                    want = IGNORE if (j == e - 1 and whole_doc_end) else int(toks[o + j - a + 1])
                    assert y[r, j] == want
                assert not (x[r, a:e - 1] == EOS).any(), "no document boundary inside a piece"
    assert torch.equal(b.batch(3)[0], DocumentBatcher(toks, EOS, 3, T, seed=4).batch(3)[0])
    ranks = [DocumentBatcher(toks, EOS, 1, T, seed=4, rank=r, world_size=3).batch(2) for r in range(3)]
    for i in range(3):
        assert torch.equal(torch.cat([rk[i] for rk in ranks]), b.batch(2)[i])


def test_pack_rows():
    x = torch.arange(12).view(2, 6)
    starts = torch.zeros(2, 6, dtype=torch.bool)
    starts[:, 0] = True
    starts[0, 4] = starts[1, 1] = True
    xp, yp, cu = pack_rows(x, -x, starts)
    assert xp.shape == (1, 12) and torch.equal(yp, -xp) and cu.tolist() == [0, 4, 6, 7, 12] and cu.dtype == torch.int64


def test_document_sequences():
    toks = np.array([1, 2, EOS, 3, 4, 5, 6, EOS, 7], dtype=np.uint16)
    docs = document_sequences(toks, EOS, 3)
    assert [(x.tolist(), y.tolist()) for x, y in docs] == [([1, 2, EOS], [2, EOS, IGNORE]), ([3, 4, 5], [4, 5, 6]),
                                                           ([7], [IGNORE])]
    with pytest.raises(ValueError, match=r"^n: the shard holds 3 documents; got n=4"):
        document_sequences(toks, EOS, 3, 4)


@torch.no_grad()
def test_evaluate_documents_equals_documents_alone():
    torch.manual_seed(0)
    model = TTTLM(get_config("debug", mixer="attention", vocab_size=10)).double()
    docs = document_sequences(shard(1, 8), EOS, 21)
    sums, counts = evaluate_documents(model, docs, 20, pack_len=50)
    want_s, want_c = torch.zeros(20, dtype=torch.float64), torch.zeros(20, dtype=torch.int64)
    for x, y in docs:
        nll = model(x[None], targets=y[None], reduction="none")[0][0, :-1]  # the last position is not scored
        keep = (y[:-1] != IGNORE) & (torch.arange(len(x) - 1) < 20)
        want_s[:len(x) - 1] += torch.where(keep, nll, 0.0)[:20].double() if len(x) > 1 else 0.0
        want_c[:len(x) - 1] += keep[:20].long()
    torch.testing.assert_close(sums, want_s, **TOL)
    assert torch.equal(counts, want_c) and counts[0] > 0


# ----------------------------------------------------------------------------- training and evaluation

WORDS = "the cat sat on a mat and the dog ran to the big red house by a tall green tree".split()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    rng = random.Random(0)
    for i in range(30):  # documents of very different lengths
        (root / f"d{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))))
    out = tmp_path_factory.mktemp("data")
    prepare(root, out, vocab_size=300, val_docs=5)
    return out


def test_training_packs_documents(data_dir, tmp_path, monkeypatch):
    """--pack-documents: every micro-batch reaches the model as one packed sequence whose boundaries are its
    rows' document starts; the run records the choice (and a windows run does not, as before it existed)."""
    import ttt.train as train_mod

    seen = []

    def spy(x, y, starts):
        out = pack_rows(x, y, starts)
        seen.append((out[0].shape, out[2]))
        return out

    monkeypatch.setattr(train_mod, "pack_rows", spy)
    vocab = json.loads((data_dir / "meta.json").read_text())["vocab_size"]
    cfg = TrainConfig(data_dir=str(data_dir), out_dir=str(tmp_path / "run"), seq_len=16, micro_batch=2,
                      tokens_per_step=64, max_steps=3, eval_every=0, save_every=0, log_every=1, progress=False,
                      pack_documents=True)
    summary = train(get_config("debug", vocab_size=vocab, mini_batch=B_MB), cfg)
    assert summary["steps"] == 3 and np.isfinite(summary["train_loss"])
    assert len(seen) == 3 * 2  # steps x gradient accumulation
    for shape, cu in seen:
        assert shape == (1, 32) and cu[0] == 0 and cu[-1] == 32 and 16 in cu.tolist()
    assert any(len(cu) > 3 for _, cu in seen), "some row holds more than one document"
    run = json.loads((tmp_path / "run" / "config.json").read_text())["run"]
    assert run["pack_documents"] is True
    meta = json.loads((data_dir / "meta.json").read_text())
    windows = train_mod._run_config(get_config("debug", vocab_size=vocab), replace(cfg, pack_documents=False), meta)
    assert "pack_documents" not in windows["run"]  # as runs from before the option: they still resume


def test_evaluation_by_document(data_dir, tmp_path):
    torch.manual_seed(0)
    vocab = json.loads((data_dir / "meta.json").read_text())["vocab_size"]
    model = TTTLM(get_config("debug", vocab_size=vocab, mini_batch=B_MB))
    res = evaluate_checkpoints(None, data_dir, seq_len=24, n_seqs=4, models=[model], names=["m"], by_document=True,
                               batch_size=2, out_dir=tmp_path)
    m = res["models"][0]
    assert res["by_document"] and res["n_seqs"] == 4
    counts = m["count_by_position"]
    assert len(m["per_position"]) == len(counts) <= 24 and counts[0] == 4 and counts == sorted(counts, reverse=True)
    assert m["nll"] == pytest.approx(sum(p * c for p, c in zip(m["per_position"], counts)) / sum(counts))
    with pytest.raises(ValueError, match="^chunk_len: evaluation by_document"):
        evaluate_checkpoints(None, data_dir, seq_len=24, chunk_len=8, models=[model], names=["m"], by_document=True)


# ----------------------------------------------------------------------------- GPU

gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)])
def test_gpu_flex_attention_equals_sdpa_mask(dtype, tol):
    """The compiled FlexAttention path with the block mask against SDPA with the dense boolean mask: outputs and
    the gradients of q, k, v, over documents inside one block, across blocks and longer than many blocks."""
    lens = [700, 1, 130, 2000, 15, 256, 1000, 3]
    pk = packing(cu_of(lens), sum(lens), "cuda")
    torch.manual_seed(0)
    qkv = [torch.randn(1, 4, sum(lens), 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)]
    w = torch.randn(1, 4, sum(lens), 64, device="cuda", dtype=dtype)
    res = []
    for flex in (True, False):
        y = document_attention(*qkv, pk, flex=flex)
        res.append([y.detach(), *torch.autograd.grad((y * w).sum(), qkv)])
    for name, a, b in zip(("y", "dq", "dk", "dv"), *res):
        scale = b.float().abs().max()
        torch.testing.assert_close(a.float() / scale, b.float() / scale, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("mixer", ["attention", "ttt_linear", "ttt_linear+auto", "mamba"])
def test_gpu_model_packed_equals_separate(mixer):
    """On the GPU's own paths (FlexAttention, the TTT op's triton kernels on the packed sequence, mamba_ssm when
    installed; +auto: RunOptions(fused_layer=None), the fused layer kernels (the convs + RoPE, the pre-conv) for the
    packed sequence and for the documents alone): the packed model's logits equal the documents' alone, and
    training steps run."""
    torch.manual_seed(0)
    mixer, _, auto = mixer.partition("+")
    model = TTTLM(get_config("debug", mixer=mixer, vocab_size=64), RunOptions(fused_layer=None if auto else False)).cuda()
    lens = [300, 1, 47, 129, 16]
    ids = torch.randint(0, 64, (1, sum(lens)), device="cuda")
    cu = cu_of(lens)
    with torch.no_grad():
        packed = model(ids, cu_seqlens=cu)[0]
        alone = torch.cat([model(ids[:, s:e])[0] for s, e in spans(lens)], 1)
    torch.testing.assert_close(packed, alone, rtol=2e-3, atol=2e-3)
    loss, _ = model(ids, targets=ids, cu_seqlens=cu)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


for _name in [n for n in list(globals()) if n.startswith("test_gpu_")]:
    for _mark in gpu:
        globals()[_name] = _mark(globals()[_name])
