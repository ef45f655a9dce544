"""TTT-MLP kernels with the inner weights in shared memory and the products on Hopper's tensor cores (Gluon).

Same contract and math as `chunk.py` (docs/math.md §4; the rows of `triton_utils.Rows`, the B sequences of a batch
or packed documents, each from its first token and a zero accumulator, its whole mini-batches only:
`ttt/ops/triton_backend.py` runs the partial pieces in PyTorch), for head dim 64 and 128, mini-batch 16, 16-bit
inputs (bf16 / fp16 operands, fp32 accumulation, statistics and state).

Why: the register kernels hold W1 and W2 (2 x d x 4d fp32, 128 KB at d = 64) in registers, which spill
(docs/kernels_notes.md). Here the fp32 weights live in shared memory for the whole sequence and every
weight-sized product is one warpgroup MMA (wgmma), the weights loaded from shared memory as the register
operand (converted to 16 bits on the way), the activations as the shared-memory operand.

Orientation: wgmma needs M >= 64 rows, a mini-batch has 16 tokens, so every tile is transposed: hidden units
(F) or features (d) are the rows, the 16 tokens the columns ("Z1t" = Z1^T, [F, 16]). The small token x token
products (Q K^T, X2b X2^T) are mma.sync products (m16n8k16, `_tok_dot`).

F split: d = 128 needs 512 KB of fp32 weights per head, more than one SM holds, so NSPLIT programs share a head,
each owning FS = F / NSPLIT hidden units (W1's columns, c1, W2's rows); at d = 64 the forward splits in two where
one program per head would leave most SMs idle (`nsplit`). Per mini-batch they exchange the
d x 16 partial sums of Z2 = X2 W2 through global memory (one barrier: an atomic counter per head, released and
acquired at GPU scope); the output's partial sums ride on the next mini-batch's exchange. The programs of a head
must be resident together: the grid is persistent (at most as many programs as the GPU holds at once, each
walking several heads) and launched cooperatively, so an oversized grid fails at launch instead of hanging.

Rows: a "head" of the grid is a (row, head) pair; its program reads the row's first token, its whole
mini-batches and its first checkpoint slot from the span. A group walks every NGROUPS-th pair, or, for rows of
unequal lengths (packed documents) with more pairs than groups, its own list from a schedule (`schedule`:
longest first, each to the least loaded group), so a long document and many short ones finish together.

Forward, per mini-batch, program s (W1s [d, FS], c1s [FS], W2s [FS, d] its slice; c2 [d] replicated):
  Z1t = W1s^T K^T + c1s;  QW1t = W1s^T Q^T;  X2t, D1t = GELU, GELU'(Z1t)
  Z2t = sum_s W2s^T X2t + c2 (exchange; saved for the backward);  G2t = LN-L2 gradient of Z2t (per token)
  H1t = W2s G2t;  G1t = H1t * D1t
  P1 = E * (Q K^T + 1), P2_s = E * (X2b_s X2_s^T + [s == 0]) (causal, E_ij = tau_i lr_j)
  Z1bt = QW1t + c1s - G1t P1^T;  X2bt = GELU(Z1bt)
  Z2bt = sum_s (W2s^T X2bt - G2t P2_s^T) + c2 (exchange);  o = q + LN(Z2b)
  W1s += K^T (-e_b G1), c1s -= sum e_b G1, W2s += X2 (-e_b G2), c2 -= sum e_b G2 (e_b = tau_b lr).
NaN containment as in `chunk.py`: token columns with a non-finite G enter the causal products as zeros and the
output columns from that token on are NaN (a program's partial sum is poisoned, so the sum is).

Backward (`ttt_mlp_smem_bwd_kernel`, twice the forward's programs per head: the carried weight gradients, fp32,
sit in shared memory beside the 16-bit weights): per checkpoint group, last first, the start weights of each
mini-batch are recomputed from the checkpoint into a per-program 16-bit scratch (or, KEEP, read from what the
forward kept of every mini-batch: `fwd(keep=True)`, more memory, no recompute), then the group is walked back
with `chunk.py`'s formulas, transposed. Z2 (+ c2), Z2b (+ c2) and X2b X2^T come from the forward, which saves
their sums over the head's programs with its checkpoints, so that the recompute and the walk need no exchange for
them: one exchange per mini-batch (dG2), dq, dk and dlr summed after the next one. The fp32 tiles a mini-batch
needs again at its end (GELU' and GELU'' terms, G1, G2, the LayerNorm's x^ and gy, dO, ...) are parked in shared
memory between their uses: in registers they spilled (docs/kernels_notes.md). Its NaN containment is the other
backward kernels' (docs/kernels_notes.md).

Tested on the CPU by running this source in Triton's interpreter through `tests/gluon_shim.py` (arithmetic,
indexing, the exchanges); layouts, budgets and the fences only on a GPU (tests marked `gpu`) and by the
offline sm_90 compile (`benchmarks/offline_compile.py`).
"""
from __future__ import annotations

import heapq

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from triton.experimental.gluon.language.nvidia.ampere.async_copy import commit_group, wait_group
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from ..common import LN_EPS
from ..gluon_utils import _async_load, _cta_barrier, _row
from ..triton_utils import _add2, _add3, batch_rows, sm_count

MB = 16  # the mini-batch size the kernels are written for (the tokens are the MMAs' N / K of 16)
HEAD_DIMS = (64, 128)


def nsplit(d: int, heads: int | None = None, device: torch.device | None = None) -> int:
    """Programs per head in the forward: four at d = 128 (each FS = 128); at d = 64 one (192 KB of shared memory),
    or two (each FS = 128, one exchange per mini-batch) where one per head would leave most of the GPU idle: a
    launch of `heads` (row, head) pairs on a CUDA `device` with at least twice as many SMs (125m at B4: 48 pairs on
    132 SMs). With heads or device None: one."""
    if d != 64:
        return 4
    sms = sm_count(device) if heads is not None else None
    return 2 if sms and 2 * heads <= sms else 1


@gluon.constexpr_function
def _across_warps(layout, dim):
    """Whether a reduction along `dim` of a `layout` tensor crosses warps (through shared memory and a barrier)."""
    return layout.warps_per_cta[dim] > 1


@gluon.constexpr_function
def _mma_layout(M, N, num_warps):
    """The wgmma accumulator layout of an [M, N] result: warps down M (16 rows each, at least 4) while M has
    rows for them, the rest across N; the widest instruction N (a multiple of 8, <= 256) that divides a warp's
    columns."""
    wm = 4
    while wm * 2 <= num_warps and M >= 32 * wm:
        wm *= 2
    wn = num_warps // wm
    cols = N // wn
    n = min(256, cols) // 8 * 8
    while cols % n:
        n -= 8
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[wm, wn], instr_shape=[16, n, 16])


@gluon.jit
def _ex2(x):
    """2^x, fp32, as one MUFU.EX2 (ex2.approx.ftz: results below 2^-126 flushed to zero; `gl.exp` adds a rescale
    around it for those)."""
    return gl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=gl.float32, is_pure=True,
                                     pack=1)


@gluon.jit
def _rcp(x):
    """1 / x, fp32, as one MUFU.RCP (rcp.approx.ftz: within 1 ulp; a division adds range checks around it)."""
    return gl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=gl.float32, is_pure=True,
                                     pack=1)


@gluon.jit
def _gelu_sig(x):
    """(s, x^2): s = sigmoid(2u) for the tanh-GELU's u = c (x + a x^3), so tanh(u) = 2 s - 1 and GELU(x) = x s; the
    constants folded (-2 c / ln 2 and its product with a), 2^ and 1/ as one MUFU each. Saturates as the division form
    did: s -> 0 (exp overflow to inf) for large negative x, -> 1 for large positive."""
    x2 = x * x
    s = _rcp(1.0 + _ex2(x * (-2.302208198144325 - 0.1029432395800235 * x2)))
    return s, x2


@gluon.jit
def _gelu_parts(x):
    """tanh-GELU(x) and its exact derivative, fp32 (tanh through a sigmoid, as `triton_utils._gelu_parts`):
    GELU = x s, GELU' = s + 2 x s (1 - s) c (1 + 3 a x^2) (`_gelu_sig`)."""
    s, x2 = _gelu_sig(x)
    y = x * s
    dy = s + 2.0 * x * s * (1.0 - s) * (0.7978845608028654 + 0.10703222440890037 * x2)
    return y, dy


@gluon.jit
def _normalize_cols(z, D: gl.constexpr, EPS: gl.constexpr):
    """LayerNorm of every column of z [D, 16] (one token each), without weight and bias: x^ and 1/std."""
    zc = z - (gl.sum(z, axis=0) / D)[None, :]
    rstd = 1.0 / gl.sqrt(gl.sum(zc * zc, axis=0) / D + EPS)
    return zc * rstd[None, :], rstd


@gluon.jit
def _proj_sums(g, xh, rstd, sg, sgx, D: gl.constexpr):
    """(g - mean g - x^ mean(g x^)) / std per column from the column sums sg of g and sgx of g x^."""
    return (g - (sg / D)[None, :] - xh * (sgx / D)[None, :]) * rstd[None, :]


@gluon.jit
def _proj_parts(g, xh, rstd, D: gl.constexpr):
    """((g - mean g - x^ mean(g x^)) / std, mean(g x^)) per column: the LayerNorm backward and its second mean (both
    column sums in one reduction)."""
    sg, sgx = gl.reduce((g, g * xh), 0, _add2)
    return _proj_sums(g, xh, rstd, sg, sgx, D), sgx / D


@gluon.jit
def _proj_cols(g, xh, rstd, D: gl.constexpr):
    """(g - mean g - x^ mean(g x^)) / std per column: the LayerNorm backward."""
    p, _mgx = _proj_parts(g, xh, rstd, D)
    return p


@gluon.jit
def _ln_l2_grad_cols(z, v, k, gam, bet, D: gl.constexpr, EPS: gl.constexpr):
    """d/dz of 0.5 ||LN(z) - (v - k)||^2 per column (docs/math.md §2): G, x^, 1/std, gy and mean(gy x^)."""
    xh, rstd = _normalize_cols(z, D, EPS)
    gy = gam[:, None] * (gam[:, None] * xh + bet[:, None] - (v - k))
    g, mgx = _proj_parts(gy, xh, rstd, D)
    return g, xh, rstd, gy, mgx


@gluon.jit
def _finite_cols(x):
    """[16] mask of the columns of x whose entries are all finite (|column sum| < inf; see kernels_notes)."""
    return gl.abs(gl.sum(x, axis=0)) < float("inf")


@gluon.jit
def _tok_dot(a_s, b_s, K: gl.constexpr, LT: gl.constexpr, LE: gl.constexpr):
    """A B^T for A, B stored transposed in shared memory (a_s, b_s [K, 16], 16-bit): [16, 16] fp32 in layout LE, on
    the tensor cores (mma.sync m16n8k16, LT its accumulator layout; fp32 accumulation), 64 rows of K at a time.
    (As FMA dots in a blocked layout, these products were 60% of the forward's shared-memory loads: one 16-bit
    element per load; H200 profile in docs/kernels_notes.md.)"""
    KC: gl.constexpr = 64 if K > 64 else K
    EA: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=LT, k_width=2)
    EB: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=LT, k_width=2)
    # one accumulator per chunk, summed at the end: independent chains of mma.sync (one chain of K / 16 dependent
    # instructions was 8% of the forward's samples, H200 profile)
    acc = gl.zeros([16, 16], gl.float32, LT)
    for c in gl.static_range(K // KC):
        a = a_s.slice(c * KC, KC, dim=0).permute((1, 0)).load(EA)  # [16 tokens, KC of K]
        b = b_s.slice(c * KC, KC, dim=0).load(EB)  # [KC of K, 16 tokens]
        if c == 0:
            acc = mma_v2(a, b, acc)
        else:
            acc += mma_v2(a, b, gl.zeros([16, 16], gl.float32, LT))
    return gl.convert_layout(acc, LE)


@gluon.jit
def _arrive(cnt_ptr):
    """The first half of `_sync`: every thread's writes are published (bar.sync, then one release increment at GPU
    scope). Work that reads nothing the other programs write may run before `_wait`."""
    _cta_barrier()
    gl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")


@gluon.jit
def _wait(cnt_ptr, target):
    """The second half of `_sync`: the others' writes seen (acquire loads until the counter reaches `target`)."""
    while gl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu") < target:
        pass
    _cta_barrier()


@gluon.jit
def _sync(cnt_ptr, target):
    """Barrier of the programs sharing a head (`_arrive`, then `_wait`)."""
    _arrive(cnt_ptr)
    _wait(cnt_ptr, target)


@gluon.jit
def _sum_parts(x_ptr, offs, NSPLIT: gl.constexpr, NUMEL: gl.constexpr):
    """The sum of the NSPLIT partials at x_ptr (each NUMEL values, `offs` their layout), in program order (every
    program gets the same bits); .cg loads: written by other SMs, so not from this SM's L1."""
    tot = gl.load(x_ptr + offs, cache_modifier=".cg")
    for r in gl.static_range(1, NSPLIT):
        tot += gl.load(x_ptr + r * NUMEL + offs, cache_modifier=".cg")
    return tot


@gluon.jit
def _tok_tile(rd, rt, t0, stride):
    """Offsets of a transposed token tile [D, 16]: element (c, t) at c + (t0 + t) * stride (rd: the D rows, rt:
    the 16 token columns; an exchange tile: t0 = 0, stride D). Built where used: loop-invariant
    [D, 16] offsets kept across the mini-batch loop cost registers."""
    return rd[:, None] + (t0 + rt)[None, :] * stride


@gluon.constexpr_function
def _tok_copy_layout(D, num_warps):
    """The layout a 16-bit transposed token tile [D, 16] is copied in as it lies in memory (feature c contiguous):
    each thread 8 consecutive features, one 16-byte copy (at d 64 and 8 warps the layout covers 32 tokens: the
    compiler masks off the threads that would copy a second time; 8-byte copies instead: more instructions)."""
    tpw = min(32, D // 8)
    return gl.BlockedLayout([8, 1], [tpw, 32 // tpw], [1, num_warps], [0, 1])


@gluon.jit
def _tok_in_async(t_s, ptr, t0, stride, D: gl.constexpr, num_warps: gl.constexpr):
    """A 16-bit transposed token tile [D, 16] at ptr (`_tok_tile`'s offsets) -> t_s (feature-contiguous, as in
    memory) by asynchronous vector copies (`_tok_copy_layout`; the caller commits and waits for them)."""
    L: gl.constexpr = _tok_copy_layout(D, num_warps)
    _async_load(t_s, ptr + _tok_tile(gl.arange(0, D, layout=gl.SliceLayout(1, L)),
                                     gl.arange(0, 16, layout=gl.SliceLayout(0, L)), t0, stride))


@gluon.jit
def _walk(sched_ptr, g, NHEADS, NGROUPS, SCHED: gl.constexpr):
    """The positions group g walks, as range(first, last, step): with a schedule (SCHED; `schedule`) its own
    stretch sched[g] .. sched[g + 1] of the head list, else every NGROUPS-th head from g (`_head_at` maps a
    position to its head)."""
    if SCHED:
        first = gl.load(sched_ptr + g)
        last = gl.load(sched_ptr + g + 1)
        step = 1
    else:
        first = g
        last = NHEADS
        step = NGROUPS
    return first, last, step


@gluon.jit
def _head_at(sched_ptr, it, NGROUPS, SCHED: gl.constexpr):
    """The (row, head) index row * H + head at position `it` of a group's walk (`_walk`)."""
    if SCHED:
        head = gl.load(sched_ptr + NGROUPS + 1 + it)
    else:
        head = it
    return head


@gluon.jit
def _row_whole(span_ptr, n, BT: gl.constexpr):
    """Row n of a `triton_utils.Rows` span as these kernels walk it: its first token, its whole mini-batches (a
    partial last one is left to the caller) and its first checkpoint slot."""
    start, length, slot = _row(span_ptr, n)
    return start, length // BT, slot


@gluon.jit
def _s2_tile(o_base, t0, o_t, riE, rjE, D: gl.constexpr):
    """Offsets of a mini-batch's X2b X2^T [16, 16] in the saved [B, T, H, 16] (its row i at token t0 + i of the
    head whose [B, T, H, d] offset is o_base: the o strides / d * 16)."""
    return o_base // D * 16 + (t0 + riE)[:, None] * (o_t // D * 16) + rjE[None, :]


@gluon.jit
def _save_zb(zbs_ptr, s2s_ptr, zb, s2, o_base, t0, o_t, rdD, rtD, riE, rjE, D: gl.constexpr):
    """Save a mini-batch's Z2b + c2 [D, 16] (into [B, T, H, d], like o) and X2b X2^T [16, 16] (`_s2_tile`), both
    summed over the head's programs: the backward reads them instead of exchanging its programs' parts."""
    gl.store(zbs_ptr + o_base + _tok_tile(rdD, rtD, t0, o_t), zb)
    gl.store(s2s_ptr + _s2_tile(o_base, t0, o_t, riE, rjE, D), s2)


@gluon.jit
def _kept_at(kw_ptr, kc_ptr, slot, n, H, hi, s, GROUP: gl.constexpr, FF: gl.constexpr, FS: gl.constexpr,
             D: gl.constexpr):
    """Where the start weights of a row's mini-batch n are kept (`fwd(keep=True)`; the row's first checkpoint slot
    `slot`, head hi, program s's slice): (W1s^T [FS, D], W2s [FS, D], c1s [FS], c2 [D]) pointers. 64-bit: the
    offsets pass 2^31 at B16 T2k H16 d 128."""
    kx = ((slot * GROUP + n) * H + hi).to(gl.int64)  # [slots * GROUP, H]: mini-batch m at span[row, 2] * GROUP + m
    return (kw_ptr + (kx * 2 * FF + s * FS) * D, kw_ptr + ((kx * 2 + 1) * FF + s * FS) * D,
            kc_ptr + kx * (FF + D) + s * FS, kc_ptr + kx * (FF + D) + FF)


@gluon.jit
def _emit_output(xo_ptr, q_ptr, o_ptr, zbs_ptr, s2s_ptr, o_base, t0, s_t, o_t, rdD, rtD, riE, rjE, gam, bet,
                 NSPLIT: gl.constexpr, RO: gl.constexpr, D: gl.constexpr, SAVE: gl.constexpr, EPS: gl.constexpr):
    """o = q + LN(sum of the programs' Z2b partials) for the mini-batch at token t0 (q_ptr, o_ptr: this head's; each
    program's record RO values: Z2b [D, 16], then X2b X2^T [16, 16]); SAVE: that sum and the sum of the X2b X2^T
    partials saved for the backward (`_save_zb`)."""
    zb = _sum_parts(xo_ptr, _tok_tile(rdD, rtD, 0, D), NSPLIT, RO)
    if SAVE:
        _save_zb(zbs_ptr, s2s_ptr, zb, _sum_parts(xo_ptr + D * 16, riE[:, None] * 16 + rjE[None, :], NSPLIT, RO),
                 o_base, t0, o_t, rdD, rtD, riE, rjE, D)
    xhb, _r = _normalize_cols(zb, D, EPS)
    q = gl.load(q_ptr + _tok_tile(rdD, rtD, t0, s_t)).to(gl.float32)
    o = q + xhb * gam[:, None] + bet[:, None]
    gl.store(o_ptr + _tok_tile(rdD, rtD, t0, o_t), o.to(o_ptr.dtype.element_ty))


@gluon.jit
def _mirror(h_s, w_s, FS: gl.constexpr, FC: gl.constexpr, L: gl.constexpr):
    """h_s [FS, D] 16-bit = w_s [FS, D] fp32 rounded (the copy wgmma reads as its A operand), FC rows at a time."""
    for c in gl.static_range(FS // FC):
        h_s.slice(c * FC, FC, dim=0).store(w_s.slice(c * FC, FC, dim=0).load(L).to(h_s.dtype))


@gluon.jit
def _w2t_mma(w2_s, x_s, acc, FS: gl.constexpr, FC: gl.constexpr, AD: gl.constexpr, OPT: gl.constexpr):
    """acc + W2s^T X for X [FS, 16] in shared memory: [D, 16], FC rows of F (the MMA's K) at a time."""
    for c in gl.static_range(FS // FC):
        a = w2_s.slice(c * FC, FC, dim=0).permute((1, 0)).load(AD).to(OPT)  # [D, FC]
        acc = warpgroup_mma(a, x_s.slice(c * FC, FC, dim=0), acc)
    return acc


@gluon.jit
def _update_chunk(w_s, a_s, b_s, c, FC: gl.constexpr, LW: gl.constexpr, a2_s, b2_s, a3_s, b3_s):
    """Issue chunk c's products of `_update` (asynchronous wgmma, chained on the chunk's fp32 accumulator)."""
    w = warpgroup_mma(a_s.slice(c * FC, FC, dim=0), b_s.permute((1, 0)), w_s.slice(c * FC, FC, dim=0).load(LW),
                      is_async=True)
    if a2_s is not None:
        w = warpgroup_mma(a2_s.slice(c * FC, FC, dim=0), b2_s.permute((1, 0)), w, is_async=True)
    if a3_s is not None:
        w = warpgroup_mma(a3_s.slice(c * FC, FC, dim=0), b3_s.permute((1, 0)), w, is_async=True)
    return w


@gluon.jit
def _update(w_s, a_s, b_s, FS: gl.constexpr, FC: gl.constexpr, LW: gl.constexpr, h_s=None, a2_s=None, b2_s=None,
            a3_s=None, b3_s=None):
    """w_s [FS, D] fp32 += A B with A = a_s [FS, 16], B = b_s^T (b_s [D, 16]), both 16-bit in shared memory (+ A2 B2
    + A3 B3 when given: chained on the same accumulator, one load and store of w_s for all); FC rows at a time (a
    [FC, D] fp32 accumulator in registers), the next chunk's load and products in flight while a chunk is stored;
    h_s: a 16-bit copy of w_s kept equal to it (its rounding), or None. No barrier between a chunk's load and its
    store: each thread stores the elements it loaded (the accumulator's layout both ways), and w_s, h_s are none of
    the operands; one barrier after the last chunk."""
    NC: gl.constexpr = FS // FC
    w = _update_chunk(w_s, a_s, b_s, 0, FC, LW, a2_s, b2_s, a3_s, b3_s)
    for c in gl.static_range(NC):
        if c + 1 < NC:  # the next chunk's products issued, then this chunk's awaited (its 1-3 groups in flight)
            nxt = _update_chunk(w_s, a_s, b_s, c + 1, FC, LW, a2_s, b2_s, a3_s, b3_s)
            if a3_s is not None:
                w = warpgroup_mma_wait(3, deps=[w])
            elif a2_s is not None:
                w = warpgroup_mma_wait(2, deps=[w])
            else:
                w = warpgroup_mma_wait(1, deps=[w])
        else:
            w = warpgroup_mma_wait(0, deps=[w])
        w_s.slice(c * FC, FC, dim=0).store(w)
        if h_s is not None:
            h_s.slice(c * FC, FC, dim=0).store(w.to(h_s.dtype))
        if c + 1 < NC:
            w = nxt
    _cta_barrier()


@gluon.jit
def _commit(w1t_s, w2_s, eg1_s, eg2_s, kT_s, x2_s, g1, g2, c1, c2, ebF, ebD, FS: gl.constexpr, FC: gl.constexpr,
            LW: gl.constexpr, h1_s=None, h2_s=None):
    """A mini-batch's weight update (e_b = tau_b lr: ebF, ebD in G1t's and G2t's column layouts): W1s^T += (-e_b
    G1)^T K, W2s += X2^T (-e_b G2) through the operand buffers eg1_s, eg2_s (h1_s, h2_s: the 16-bit copies kept
    equal, or None); returns c1 - sum e_b G1, c2 - sum e_b G2."""
    eg1_s.store((-ebF[None, :] * g1).to(eg1_s.dtype))
    eg2_s.store((-ebD[None, :] * g2).to(eg2_s.dtype))
    c1 -= gl.sum(ebF[None, :] * g1, axis=1)
    c2 -= gl.sum(ebD[None, :] * g2, axis=1)
    fence_async_shared()
    _cta_barrier()
    _update(w1t_s, eg1_s, kT_s, FS, FC, LW, h1_s)
    _update(w2_s, x2_s, eg2_s, FS, FC, LW, h2_s)
    return c1, c2


@gluon.jit
def _w_mma(w_s, x_s, acc, D: gl.constexpr, AF: gl.constexpr, OPT: gl.constexpr):
    """acc + W X for W = w_s [FS, D] fp32 and X [D, 16] 16-bit in shared memory, 32 columns of W at a time."""
    for c in gl.static_range(D // 32):
        acc = warpgroup_mma(w_s.slice(c * 32, 32, dim=1).load(AF).to(OPT), x_s.slice(c * 32, 32, dim=0), acc)
    return acc


@gluon.jit
def _weights_io(w1t_s, w2_s, w1_ptr, w2_ptr, s, TO_SMEM: gl.constexpr, FS: gl.constexpr, D: gl.constexpr,
                FF: gl.constexpr, FC: gl.constexpr, L1: gl.constexpr, L2: gl.constexpr, W1T: gl.constexpr = False):
    """Copy program s's slices between global W1 [D, FF] (its columns s*FS.., as W1s^T [FS, D]; L1 walks F
    fastest), W2 [FF, D] (its rows) and shared memory, FC rows at a time (a whole [FS, D] tile and its 64-bit
    addresses would take most of the registers); TO_SMEM: global -> shared, else shared -> global. W1T: W1 is held
    transposed in global memory ([FF, D], as the checkpoints are) and copied as W2 is (L2, D fastest: no bank
    conflicts on the swizzled fp32 tiles, which L1's walk along F has 8-way)."""
    for c in gl.static_range(FS // FC):
        f2 = gl.arange(0, FC, layout=gl.SliceLayout(1, L2))
        d2 = gl.arange(0, D, layout=gl.SliceLayout(0, L2))
        off2 = (s * FS + c * FC + f2[:, None]) * D + d2[None, :]
        if TO_SMEM:
            if W1T:
                w1t_s.slice(c * FC, FC, dim=0).store(gl.load(w1_ptr + off2))
            else:
                w1t_s.slice(c * FC, FC, dim=0).store(gl.load(w1_ptr + _w1_offsets(s, c, FS, FC, D, FF, L1)))
            w2_s.slice(c * FC, FC, dim=0).store(gl.load(w2_ptr + off2))
        else:
            if W1T:
                gl.store(w1_ptr + off2, w1t_s.slice(c * FC, FC, dim=0).load(L2))
            else:
                gl.store(w1_ptr + _w1_offsets(s, c, FS, FC, D, FF, L1), w1t_s.slice(c * FC, FC, dim=0).load(L1))
            gl.store(w2_ptr + off2, w2_s.slice(c * FC, FC, dim=0).load(L2))


@gluon.jit
def _w1_offsets(s, c, FS: gl.constexpr, FC: gl.constexpr, D: gl.constexpr, FF: gl.constexpr, L1: gl.constexpr):
    """Offsets of chunk c of program s's W1s^T [FC, D] in W1 [D, FF] (layout L1, F fastest)."""
    f1 = gl.arange(0, FC, layout=gl.SliceLayout(1, L1))
    d1 = gl.arange(0, D, layout=gl.SliceLayout(0, L1))
    return d1[None, :] * FF + (s * FS + c * FC) + f1[:, None]


@gluon.jit
def ttt_mlp_smem_fwd_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, w1_ptr, c1_ptr, w2_ptr, c2_ptr,
    o_ptr, w1T_ptr, c1T_ptr, w2T_ptr, c2T_ptr, ck1_ptr, ckc1_ptr, ck2_ptr, ckc2_ptr, z2s_ptr, zbs_ptr, s2s_ptr,
    kw_ptr, kc_ptr, xz_ptr, xo_ptr, cnt_ptr, span_ptr, sched_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h, o_b, o_t, o_h,
    H, NHEADS, NGROUPS,
    D: gl.constexpr, FF: gl.constexpr, NSPLIT: gl.constexpr, GROUP: gl.constexpr, SAVE: gl.constexpr,
    KEEP: gl.constexpr, SCHED: gl.constexpr, EPS: gl.constexpr, num_warps: gl.constexpr,
):
    OPT: gl.constexpr = q_ptr.dtype.element_ty  # the products' 16-bit operand type
    FS: gl.constexpr = FF // NSPLIT
    BT: gl.constexpr = 16
    # register layouts: the wgmma accumulators of [FS, 16], [D, 16], [D, FS], [FS, D] tiles, their A operands,
    # a [16, 16] token x token tile (element-wise work; LT: its mma.sync products), blocked layouts for the weight
    # copies
    LF: gl.constexpr = _mma_layout(FS, BT, num_warps)
    LD: gl.constexpr = _mma_layout(D, BT, num_warps)
    FC: gl.constexpr = min(FS, 8192 // D)  # rows of F per weight-update / W2^T-product chunk (8 K fp32 values)
    RO: gl.constexpr = D * BT + BT * BT  # a program's output record: its parts of Z2b [D, 16] and X2b X2^T
    LW: gl.constexpr = _mma_layout(FC, D, num_warps)  # a chunk of a weight slice [FC, D]
    AF: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=LF, k_width=2)
    AD: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=LD, k_width=2)
    LE: gl.constexpr = gl.BlockedLayout([1, 1], [2, 16], [num_warps, 1], [1, 0])
    LT: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, num_warps], instr_shape=[16, 8])
    LB: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [num_warps, 1], [1, 0])  # [FS, D], D contiguous
    LBt: gl.constexpr = gl.BlockedLayout([4, 1], [8, 4], [1, num_warps], [0, 1])  # [FS, D], FS contiguous
    # shared memory: the fp32 weight slices for the whole sequence, and this mini-batch's 16-bit MMA operands
    SW: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 8, [1, 0])  # fp32 weights: LW, LB accesses conflict-free
    w1t_s = gl.allocate_shared_memory(gl.float32, [FS, D], SW)  # W1s^T
    w2_s = gl.allocate_shared_memory(gl.float32, [FS, D], SW)
    # W1s^T and W2s rounded to 16 bits (kept equal to the fp32 slices by their updates), wgmma's A operand straight
    # from shared memory in their products instead of the fp32 loaded and converted each time
    w1h_s = gl.allocate_shared_memory(OPT, [FS, D], gl.NVMMASharedLayout.get_default_for([FS, D], OPT))
    w2h_s = gl.allocate_shared_memory(OPT, [FS, D], gl.NVMMASharedLayout.get_default_for([FS, D], OPT))
    SLF: gl.constexpr = gl.NVMMASharedLayout.get_default_for([FS, BT], OPT)
    SLD: gl.constexpr = gl.NVMMASharedLayout.get_default_for([D, BT], OPT)
    SLE: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BT, BT], OPT)
    qT_s = gl.allocate_shared_memory(OPT, [D, BT], SLD)
    kT_s = gl.allocate_shared_memory(OPT, [D, BT], SLD)
    x2_s = gl.allocate_shared_memory(OPT, [FS, BT], SLF)
    x2b_s = gl.allocate_shared_memory(OPT, [FS, BT], SLF)
    g2_s = gl.allocate_shared_memory(OPT, [D, BT], SLD)
    eg1_s = x2b_s  # the updates' operands -e_b G1, -e_b G2 reuse X2b's and G2's buffers (read by then; room for
    eg2_s = g2_s  # w1h_s at d 64)
    p1_s = gl.allocate_shared_memory(OPT, [BT, BT], SLE)
    p2_s = gl.allocate_shared_memory(OPT, [BT, BT], SLE)

    pid = gl.program_id(0)
    s = pid % NSPLIT
    # index vectors in the layouts they meet
    rdD = gl.arange(0, D, layout=gl.SliceLayout(1, LD))
    rtD = gl.arange(0, BT, layout=gl.SliceLayout(0, LD))
    rfF = gl.arange(0, FS, layout=gl.SliceLayout(1, LF))
    rtF = gl.arange(0, BT, layout=gl.SliceLayout(0, LF))
    riE = gl.arange(0, BT, layout=gl.SliceLayout(1, LE))
    rjE = gl.arange(0, BT, layout=gl.SliceLayout(0, LE))
    causal = riE[:, None] >= rjE[None, :]
    tau_i = gl.load(tau_ptr + riE).to(gl.float32)
    tau_b = gl.load(tau_ptr + BT - 1).to(gl.float32)

    w_lo, w_hi, w_step = _walk(sched_ptr, pid // NSPLIT, NHEADS, NGROUPS, SCHED)
    for it in range(w_lo, w_hi, w_step):
        head = _head_at(sched_ptr, it, NGROUPS, SCHED)
        bi = head // H  # the row (a batch entry or a packed document)
        hi = head % H
        start, nmb, slot = _row_whole(span_ptr, bi, BT)
        gam = gl.load(lnw_ptr + hi * D + rdD).to(gl.float32)
        bet = gl.load(lnb_ptr + hi * D + rdD).to(gl.float32)
        _cta_barrier()  # the previous head's last reads of w1t_s / w2_s are done
        _weights_io(w1t_s, w2_s, w1_ptr + head * D * FF, w2_ptr + head * FF * D, s, True, FS, D, FF, FC, LBt, LB)
        _cta_barrier()
        _mirror(w1h_s, w1t_s, FS, FC, LB)
        _mirror(w2h_s, w2_s, FS, FC, LB)
        c1 = gl.load(c1_ptr + head * FF + s * FS + rfF)
        c2 = gl.load(c2_ptr + head * D + rdD)
        xz = xz_ptr + head * 2 * NSPLIT * D * BT
        xo = xo_ptr + head * 2 * NSPLIT * RO
        cnt = cnt_ptr + head
        x_base = bi * s_b + start * s_t + hi * s_h
        o_base = bi * o_b + start * o_t + hi * o_h
        l_base = bi * l_b + start * l_t + hi * l_h
        _cta_barrier()
        # the next mini-batch's inputs, loaded half a mini-batch ahead (mini-batch 0's in its own iteration)
        nq = gl.zeros([D, BT], q_ptr.dtype.element_ty, LD)
        nk = nq
        nv = nq
        nlD = gl.zeros([BT], lr_ptr.dtype.element_ty, gl.SliceLayout(0, LD))
        nlF = gl.zeros([BT], lr_ptr.dtype.element_ty, gl.SliceLayout(0, LF))
        nlE = gl.zeros([BT], lr_ptr.dtype.element_ty, gl.SliceLayout(0, LE))
        for n in range(nmb):
            t0 = n * BT
            if SAVE:
                if n % GROUP == 0:
                    ck = (slot + n // GROUP) * H + hi  # the row kernels' slots [slots, H]
                    _weights_io(w1t_s, w2_s, ck1_ptr + ck * D * FF, ck2_ptr + ck * FF * D, s, False, FS, D, FF, FC,
                                LBt, LB, True)
                    gl.store(ckc1_ptr + ck * FF + s * FS + rfF, c1)
                    if s == 0:  # c2 is replicated: one program writes it
                        gl.store(ckc2_ptr + ck * D + rdD, c2)
            if KEEP:  # this mini-batch's 16-bit start weights and fp32 biases, for the backward's walk
                kw1, kw2, kc1, kc2 = _kept_at(kw_ptr, kc_ptr, slot, n, H, hi, s, GROUP, FF, FS, D)
                _tile_out(kw1, w1h_s, FS, D, FC, LB)
                _tile_out(kw2, w2h_s, FS, D, FC, LB)
                gl.store(kc1 + rfF, c1)
                if s == 0:
                    gl.store(kc2 + rdD, c2)
            if n == 0:
                nq, nk, nv, nlD, nlF, nlE = _inputs_at(q_ptr, k_ptr, v_ptr, lr_ptr, x_base, l_base, t0, s_t, l_t,
                                                       rdD, rtD, rtF, rjE)
            qT = nq  # input dtype
            kT = nk
            vT = nv.to(gl.float32)
            lrD = nlD.to(gl.float32)
            lrF = nlF.to(gl.float32)
            lrE = nlE.to(gl.float32)
            qT_s.store(qT.to(OPT))
            kT_s.store(kT.to(OPT))
            kT = kT.to(gl.float32)
            fence_async_shared()
            _cta_barrier()

            # inner forward / backward at the start weights
            zero_f = gl.zeros([FS, BT], gl.float32, LF)
            z1 = warpgroup_mma(w1h_s, kT_s, zero_f + c1[:, None], is_async=True)  # [FS, 16]
            qw1 = warpgroup_mma(w1h_s, qT_s, zero_f + c1[:, None], is_async=True)  # (both in flight at once)
            z1, qw1 = warpgroup_mma_wait(0, deps=[z1, qw1])
            x2, d1 = _gelu_parts(z1)
            x2_s.store(x2.to(OPT))
            fence_async_shared()
            _cta_barrier()
            z2 = warpgroup_mma(w2h_s.permute((1, 0)), x2_s, gl.zeros([D, BT], gl.float32, LD))  # this slice's Z2t part
            if NSPLIT > 1:
                gl.store(xz + ((n % 2) * NSPLIT + s) * D * BT + _tok_tile(rdD, rtD, 0, D), z2)
                _sync(cnt, (n + 1) * NSPLIT)
                z2 = _sum_parts(xz + (n % 2) * NSPLIT * D * BT, _tok_tile(rdD, rtD, 0, D), NSPLIT, D * BT)
                if n > 0:
                    if s == 0:  # the previous mini-batch's output, now that every partial of it is written
                        tp = t0 - BT
                        _emit_output(xo + ((n - 1) % 2) * NSPLIT * RO, q_ptr + x_base, o_ptr + o_base, zbs_ptr,
                                     s2s_ptr, o_base, tp, s_t, o_t, rdD, rtD, riE, rjE, gam, bet, NSPLIT, RO, D, SAVE,
                                     EPS)
            z2 += c2[:, None]
            if SAVE:
                if s == 0:  # Z2 (every program has the sum) for the backward, which then needs no exchange for it
                    gl.store(z2s_ptr + o_base + _tok_tile(rdD, rtD, t0, o_t), z2)
            g2, _xh, _rstd, _gy, _mgx = _ln_l2_grad_cols(z2, vT, kT, gam, bet, D, EPS)  # [D, 16]
            # (the last mini-batch loads its own tokens again: in bounds, unused)
            t1 = (n + 1 - (n + 1) // nmb) * BT
            nq, nk, nv, nlD, nlF, nlE = _inputs_at(q_ptr, k_ptr, v_ptr, lr_ptr, x_base, l_base, t1, s_t, l_t,
                                                   rdD, rtD, rtF, rjE)
            g2_s.store(g2.to(OPT))
            fence_async_shared()
            _cta_barrier()
            g1 = warpgroup_mma(w2h_s, g2_s, zero_f) * d1  # (W2s G2t) * GELU'(Z1t) [FS, 16]

            # output path; token columns with a non-finite G enter the causal products as zeros. G1t's columns tell
            # for G2t's too: a non-finite entry of G2t makes its whole column of W2s G2t non-finite (inf - inf,
            # 0 * inf and NaN are NaN) in every program, and GELU'(Z1t) keeps it so
            ok = gl.convert_layout(_finite_cols(g1), gl.SliceLayout(0, LE))
            E = tau_i[:, None] * lrE[None, :]
            qk = _tok_dot(qT_s, kT_s, D, LT, LE)
            p1_s.store(gl.where(causal, E * (qk + 1.0), 0.0).to(OPT))  # P1 [i, j]
            okF2 = gl.convert_layout(ok, gl.SliceLayout(0, LF))
            mg1 = gl.convert_layout(gl.where(okF2[None, :], -g1, 0.0).to(OPT), AF)
            fence_async_shared()
            _cta_barrier()
            z1b = warpgroup_mma(mg1, p1_s.permute((1, 0)), qw1)  # QW1t + c1 - G1t P1^T
            x2b, _d1b = _gelu_parts(z1b)
            x2b_s.store(x2b.to(OPT))
            fence_async_shared()
            _cta_barrier()
            first = (s == 0).to(gl.float32)
            # W2s^T X2b in flight while X2b X2^T and P2 are formed
            zb = warpgroup_mma(w2h_s.permute((1, 0)), x2b_s, gl.zeros([D, BT], gl.float32, LD) + (first * c2)[:, None],
                               is_async=True)
            s2 = _tok_dot(x2b_s, x2_s, FS, LT, LE)  # this slice's X2b X2^T
            p2_s.store(gl.where(causal, E * (s2 + first), 0.0).to(OPT))
            okD2 = gl.convert_layout(ok, gl.SliceLayout(0, LD))
            mg2 = gl.convert_layout(gl.where(okD2[None, :], -g2, 0.0).to(OPT), AD)
            zb = warpgroup_mma_wait(0, deps=[zb])
            fence_async_shared()
            _cta_barrier()
            zb = warpgroup_mma(mg2, p2_s.permute((1, 0)), zb)  # this slice's part of Z2bt
            bad = gl.sum(gl.where(causal & (~ok)[None, :], 1.0, 0.0), axis=1) > 0.0  # a bad token at or before i
            zb = gl.where(gl.convert_layout(bad, gl.SliceLayout(0, LD))[None, :], float("nan"), zb)
            if NSPLIT == 1:
                if SAVE:
                    _save_zb(zbs_ptr, s2s_ptr, zb, s2, o_base, t0, o_t, rdD, rtD, riE, rjE, D)
                xhb, _rb = _normalize_cols(zb, D, EPS)
                o = qT.to(gl.float32) + xhb * gam[:, None] + bet[:, None]
                gl.store(o_ptr + o_base + _tok_tile(rdD, rtD, t0, o_t), o.to(o_ptr.dtype.element_ty))
            else:  # this program's parts of Z2b and X2b X2^T, summed by program 0 after the next exchange
                rec_o = xo + ((n % 2) * NSPLIT + s) * RO
                gl.store(rec_o + _tok_tile(rdD, rtD, 0, D), zb)
                if SAVE:
                    gl.store(rec_o + D * BT + riE[:, None] * BT + rjE[None, :], s2)

            # carry: W1s^T += (-e_b G1)^T K, W2s += X2^T (-e_b G2) (the state takes G unmasked, as in chunk.py)
            ebF = tau_b * lrF
            ebD = tau_b * lrD
            _cta_barrier()  # every warp's reads of X2b and G2 are done: their buffers take -e_b G1, -e_b G2
            c1, c2 = _commit(w1t_s, w2_s, eg1_s, eg2_s, kT_s, x2_s, g1, g2, c1, c2, ebF, ebD, FS, FC, LW, w1h_s, w2h_s)
        if NSPLIT > 1:  # the last mini-batch's output
            _sync(cnt, (nmb + 1) * NSPLIT)
            if s == 0:
                if nmb > 0:
                    tp = (nmb - 1) * BT
                    _emit_output(xo + ((nmb - 1) % 2) * NSPLIT * RO, q_ptr + x_base, o_ptr + o_base, zbs_ptr,
                                 s2s_ptr, o_base, tp, s_t, o_t, rdD, rtD, riE, rjE, gam, bet, NSPLIT, RO, D, SAVE, EPS)
        _weights_io(w1t_s, w2_s, w1T_ptr + head * D * FF, w2T_ptr + head * FF * D, s, False, FS, D, FF, FC, LBt, LB)
        gl.store(c1T_ptr + head * FF + s * FS + rfF, c1)
        if s == 0:
            gl.store(c2T_ptr + head * D + rdD, c2)


@gluon.jit
def _inputs_at(q_ptr, k_ptr, v_ptr, lr_ptr, x_base, l_base, t0, s_t, l_t, rdD, rtD, rtF, rjE):
    """A mini-batch's inputs at token t0 in their own dtypes: q, k, v transposed [D, 16] and lr in the three
    layouts it meets."""
    xT = _tok_tile(rdD, rtD, t0, s_t)  # transposed token tile [D, 16]
    return (gl.load(q_ptr + x_base + xT), gl.load(k_ptr + x_base + xT), gl.load(v_ptr + x_base + xT),
            gl.load(lr_ptr + l_base + (t0 + rtD) * l_t), gl.load(lr_ptr + l_base + (t0 + rtF) * l_t),
            gl.load(lr_ptr + l_base + (t0 + rjE) * l_t))


@gluon.jit
def _gelu_parts2(x):
    """tanh-GELU(x), its derivative and its second derivative, fp32 (`triton_utils._gelu_parts2`)."""
    s, x2 = _gelu_sig(x)
    t = 2.0 * s - 1.0  # tanh(u)
    du = 0.7978845608028654 + 0.10703222440890037 * x2  # u' = c (1 + 3 a x^2)
    y = x * s
    sech2 = 4.0 * s * (1.0 - s)  # 1 - tanh(u)^2
    dy = s + 0.5 * x * sech2 * du
    ddy = sech2 * (du - x * t * du * du + 0.10703222440890037 * x2)  # + 3 a c x^2
    return y, dy, ddy


@gluon.jit
def _ln_l2_grad_bwd_cols(dG, G, xh, rstd, gy, mgx, gam, D: gl.constexpr):
    """The backward of `_ln_l2_grad_cols` from dG: dgy and dz (columns: tokens; `triton_utils._ln_l2_grad_bwd`)."""
    sg, sgx, sgG = gl.reduce((dG, dG * xh, dG * G), 0, _add3)  # _proj_cols' two column sums and a third, in one
    mdgx = sgx / D
    dgy = _proj_sums(dG, xh, rstd, sg, sgx, D)
    dxh = (-mgx[None, :] * dG - mdgx[None, :] * gy) * rstd[None, :] + (gam * gam)[:, None] * dgy
    ds = -sgG * rstd
    return dgy, _proj_cols(dxh, xh, rstd, D) + (ds / D)[None, :] * xh


@gluon.jit
def _zero_smem(w_s, FS: gl.constexpr, D: gl.constexpr, FC: gl.constexpr, L: gl.constexpr):
    for c in gl.static_range(FS // FC):
        w_s.slice(c * FC, FC, dim=0).store(gl.zeros([FC, D], gl.float32, L))


@gluon.jit
def _emit_grads(rec, dq_ptr, dk_ptr, dlr_ptr, o_off, dlr_off, rdD, rtD, rjE, s, NSPLIT: gl.constexpr, D: gl.constexpr,
                REC: gl.constexpr, R_DQ: gl.constexpr, R_DK: gl.constexpr, R_DLR: gl.constexpr):
    """dq, dk, dlr of one mini-batch: the sums of the programs' parts in the exchange record `rec`, shared out
    among the programs (s: this one): dq by program 0, dk by program 1, dlr by program 2 (mod NSPLIT), so that no
    program waits at the next exchange for another's loads of all three."""
    offD = _tok_tile(rdD, rtD, 0, D)
    if s == 0:
        gl.store(dq_ptr + o_off, _sum_parts(rec + R_DQ, offD, NSPLIT, REC).to(dq_ptr.dtype.element_ty))
    if s == 1 % NSPLIT:
        gl.store(dk_ptr + o_off, _sum_parts(rec + R_DK, offD, NSPLIT, REC).to(dk_ptr.dtype.element_ty))
    if s == 2 % NSPLIT:
        gl.store(dlr_ptr + dlr_off, _sum_parts(rec + R_DLR, rjE, NSPLIT, REC))


@gluon.jit
def _tile_out(ptr, w_s, FS: gl.constexpr, D: gl.constexpr, FC: gl.constexpr, L: gl.constexpr,
              FINITE: gl.constexpr = False):
    """Shared [FS, D] -> a contiguous [FS, D] tile at ptr (cast to its type; FINITE: then non-finite entries as 0,
    what the backward's walk multiplies with), FC rows at a time."""
    for c in gl.static_range(FS // FC):
        r = gl.arange(0, FC, layout=gl.SliceLayout(1, L))
        col = gl.arange(0, D, layout=gl.SliceLayout(0, L))
        x = w_s.slice(c * FC, FC, dim=0).load(L).to(ptr.dtype.element_ty)
        if FINITE:
            x = gl.where(gl.abs(x.to(gl.float32)) < float("inf"), x, 0.0).to(ptr.dtype.element_ty)
        gl.store(ptr + (c * FC + r[:, None]) * D + col[None, :], x)


@gluon.jit
def _tile_in_finite(w_s, ptr, FS: gl.constexpr, D: gl.constexpr, FC: gl.constexpr, L: gl.constexpr):
    """A contiguous [FS, D] tile at ptr -> shared memory, non-finite entries as 0."""
    for c in gl.static_range(FS // FC):
        r = gl.arange(0, FC, layout=gl.SliceLayout(1, L))
        col = gl.arange(0, D, layout=gl.SliceLayout(0, L))
        x = gl.load(ptr + (c * FC + r[:, None]) * D + col[None, :])
        w_s.slice(c * FC, FC, dim=0).store(gl.where(gl.abs(x.to(gl.float32)) < float("inf"), x, 0.0).to(w_s.dtype))


@gluon.jit
def _tile_in_async(w_s, ptr, FS: gl.constexpr, D: gl.constexpr, FC: gl.constexpr, L: gl.constexpr):
    """A contiguous [FS, D] tile at ptr -> shared memory by asynchronous copies (no registers; the caller commits
    and waits for them), FC rows at a time."""
    for c in gl.static_range(FS // FC):
        r = gl.arange(0, FC, layout=gl.SliceLayout(1, L))
        col = gl.arange(0, D, layout=gl.SliceLayout(0, L))
        _async_load(w_s.slice(c * FC, FC, dim=0), ptr + (c * FC + r[:, None]) * D + col[None, :])


@gluon.jit
def _walk_in(q_s, k_s, v_s, do_s, wh1_s, wh2_s, z2_s, zb_s, q_ptr, k_ptr, v_ptr, do_ptr, w1, w2, z2s_ptr, zbs_ptr,
             x_base, o_base, t0, s_t, o_t, KEEP: gl.constexpr, FS: gl.constexpr, D: gl.constexpr,
             FC: gl.constexpr, LC: gl.constexpr, num_warps: gl.constexpr):
    """Issue the asynchronous copies of a walked mini-batch's inputs (committed as one group): its q, k, v, dO tiles
    (first token t0), the forward's Z2 + c2 and Z2b + c2 of it (fp32, summed over the head's programs) and, unless
    KEEP (the kept weights are read through registers, `_tile_in_finite`), its start weights from the recompute's
    scratch (w1, w2: W1s^T, W2s; non-finite entries already written as 0)."""
    _tok_in_async(q_s, q_ptr + x_base, t0, s_t, D, num_warps)
    _tok_in_async(k_s, k_ptr + x_base, t0, s_t, D, num_warps)
    _tok_in_async(v_s, v_ptr + x_base, t0, s_t, D, num_warps)
    _tok_in_async(do_s, do_ptr + o_base, t0, o_t, D, num_warps)
    if not KEEP:
        _tile_in_async(wh1_s, w1, FS, D, FC, LC)
        _tile_in_async(wh2_s, w2, FS, D, FC, LC)
    # Z2 + c2, Z2b + c2 [D, 16]: 4 bytes a copy (the shared tiles are token-contiguous), 8 features x 8 tokens a warp
    LZ: gl.constexpr = gl.BlockedLayout([1, 2], [8, 4], [num_warps, 1], [1, 0])
    off = o_base + _tok_tile(gl.arange(0, D, layout=gl.SliceLayout(1, LZ)),
                             gl.arange(0, 16, layout=gl.SliceLayout(0, LZ)), t0, o_t)
    _async_load(z2_s, z2s_ptr + off)
    _async_load(zb_s, zbs_ptr + off)
    commit_group()


@gluon.jit
def _rec_in(k_s, v_s, k_ptr, v_ptr, x_base, t0, s_t, D: gl.constexpr, num_warps: gl.constexpr):
    """Issue the asynchronous copies of a recomputed mini-batch's k, v tiles (first token t0), committed as one
    group. (Its Z2 + c2 stays a load at the top of the mini-batch: copied in with these into z2_s, offline sm_90
    at d 64 the stack grew by 40 B, wherever the copy was issued.)"""
    _tok_in_async(k_s, k_ptr + x_base, t0, s_t, D, num_warps)
    _tok_in_async(v_s, v_ptr + x_base, t0, s_t, D, num_warps)
    commit_group()


@gluon.jit
def _warp_parts(x, p_s, W: gl.constexpr):
    """Each warp's part of the column sums of x [R, 16] (W warps down its rows) -> p_s [W, 16]: a reshape puts the
    warps on a leading axis, so that the sum over a warp's rows stays in it (no shared round trip, no barrier)."""
    p_s.store(gl.sum(gl.reshape(x, [W, x.shape[0] // W, x.shape[1]]), axis=1))


@gluon.jit
def _parts_sum(p_s, W: gl.constexpr, LE: gl.constexpr, num_warps: gl.constexpr):
    """The column sums whose parts `_warp_parts` stored, in the column layout of LE's tiles (the kernels' [16, 16]
    layout): loaded in a layout holding all of a column's parts in one thread and spreading the columns as LE does
    (the conversion asserted trivial)."""
    L: gl.constexpr = gl.BlockedLayout([W, 1], [2, 16], [num_warps, 1], [1, 0])
    return gl.convert_layout(gl.sum(p_s.load(L), axis=0), gl.SliceLayout(0, LE), assert_trivial=True)


@gluon.jit
def _col_vec(v, L: gl.constexpr):
    """A [16] per-token vector moved to the column layout of L's tiles."""
    return gl.convert_layout(v, gl.SliceLayout(0, L))


@gluon.jit
def ttt_mlp_smem_bwd_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, ck1_ptr, ckc1_ptr, ck2_ptr, ckc2_ptr, z2s_ptr, zbs_ptr,
    s2s_ptr, kw_ptr, kc_ptr, do_ptr, dw1_ptr, dc1_ptr, dw2_ptr, dc2_ptr, dq_ptr, dk_ptr, dv_ptr, dlr_ptr, dtau_ptr,
    dlnw_ptr, dlnb_ptr,
    ws1_ptr, ws2_ptr, cs1_ptr, xb_ptr, cnt_ptr, span_ptr, sched_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h, o_b, o_t, o_h, dl_b,
    H, NHEADS, NGROUPS,
    D: gl.constexpr, FF: gl.constexpr, NSPLIT: gl.constexpr, GROUP: gl.constexpr, KEEP: gl.constexpr,
    SCHED: gl.constexpr, EPS: gl.constexpr, num_warps: gl.constexpr,
):
    OPT: gl.constexpr = q_ptr.dtype.element_ty
    FS: gl.constexpr = FF // NSPLIT
    BT: gl.constexpr = 16
    FC: gl.constexpr = min(FS, 8192 // D)
    LF: gl.constexpr = _mma_layout(FS, BT, num_warps)
    LD: gl.constexpr = _mma_layout(D, BT, num_warps)
    LW: gl.constexpr = _mma_layout(FC, D, num_warps)
    AF: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=LF, k_width=2)
    AD: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=LD, k_width=2)
    LE: gl.constexpr = gl.BlockedLayout([1, 1], [2, 16], [num_warps, 1], [1, 0])
    LT: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, num_warps], instr_shape=[16, 8])
    LB: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [num_warps, 1], [1, 0])
    LBt: gl.constexpr = gl.BlockedLayout([4, 1], [8, 4], [1, num_warps], [0, 1])
    LC: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])  # 16-byte asynchronous copies
    # sums over a mini-batch's tokens that only accumulate to the walk's end are summed there, where they cross warps
    # (offline sm_90 at d 64: 75 instructions and 6 barriers less per mini-batch; at d 128, where they do not, the
    # [D, 16] accumulators spill)
    LATE_SUMS: gl.constexpr = _across_warps(LD, 1)
    # the exchange record of one program for one mini-batch (fp32): dG2, dq, dk [D, 16], dlr [16] (Z2, Z2b and
    # X2b X2^T need none: the forward saved their sums); three slots by mini-batch (mod 3): a mini-batch's dq, dk,
    # dlr are summed after the next one's dG2 exchange, while the other programs may already write the one after
    R_DG2: gl.constexpr = 0
    R_DQ: gl.constexpr = D * BT
    R_DK: gl.constexpr = 2 * D * BT
    R_DLR: gl.constexpr = 3 * D * BT
    REC: gl.constexpr = 3 * D * BT + BT
    # shared memory: the carried weight gradients (fp32; during a group's recompute the weights themselves),
    # this mini-batch's start weights (16-bit), and the 16-bit MMA operands
    SW: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 8, [1, 0])  # fp32 weights: LW, LB accesses conflict-free
    SWH: gl.constexpr = gl.NVMMASharedLayout.get_default_for([FS, D], OPT)
    SLF: gl.constexpr = gl.NVMMASharedLayout.get_default_for([FS, BT], OPT)
    SLD: gl.constexpr = gl.NVMMASharedLayout.get_default_for([D, BT], OPT)
    SLE: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BT, BT], OPT)
    g1t_s = gl.allocate_shared_memory(gl.float32, [FS, D], SW)  # dW1s^T (recompute: W1s^T)
    g2w_s = gl.allocate_shared_memory(gl.float32, [FS, D], SW)  # dW2s (recompute: W2s)
    wh1_s = gl.allocate_shared_memory(OPT, [FS, D], SWH)  # W1s^T of this mini-batch
    wh2_s = gl.allocate_shared_memory(OPT, [FS, D], SWH)  # W2s
    qT_s = gl.allocate_shared_memory(OPT, [D, BT], SLD)
    kT_s = gl.allocate_shared_memory(OPT, [D, BT], SLD)
    g2_s = gl.allocate_shared_memory(OPT, [D, BT], SLD)
    dz2b_s = gl.allocate_shared_memory(OPT, [D, BT], SLD)
    eg2_s = gl.allocate_shared_memory(OPT, [D, BT], SLD)
    dz2_s = gl.allocate_shared_memory(OPT, [D, BT], SLD)
    x2_s = gl.allocate_shared_memory(OPT, [FS, BT], SLF)
    x2b_s = gl.allocate_shared_memory(OPT, [FS, BT], SLF)
    g1_s = gl.allocate_shared_memory(OPT, [FS, BT], SLF)
    dz1b_s = gl.allocate_shared_memory(OPT, [FS, BT], SLF)
    eg1_s = gl.allocate_shared_memory(OPT, [FS, BT], SLF)
    dh1_s = gl.allocate_shared_memory(OPT, [FS, BT], SLF)
    dz1_s = gl.allocate_shared_memory(OPT, [FS, BT], SLF)
    p1_s = gl.allocate_shared_memory(OPT, [BT, BT], SLE)
    p2_s = gl.allocate_shared_memory(OPT, [BT, BT], SLE)
    # fp32 tiles of the recompute kept to the end of the walk, parked here between their uses (in registers they
    # spill: the kernel is at 255 registers), each thread reading back what it wrote
    SP: gl.constexpr = gl.SwizzledSharedLayout(4, 1, 4, [1, 0])  # no bank conflicts for LF, LD (gl.bank_conflicts)
    pF_s = gl.allocate_shared_memory(gl.float32, [6, FS, BT], SP)  # GELU'(Z1t), H1t GELU''(Z1t), G1t, GELU'(Z1bt), dX2t, dG1t
    pD_s = gl.allocate_shared_memory(gl.float32, [4, D, BT], SP)  # G2t, x^, gy, the LN target
    # the forward's Z2 + c2 and Z2b + c2, copied in with the mini-batch's other inputs (`_walk_in`), then over them
    # -(P2^T dZ2b)^T and dkt: loaded just before their uses, their latency was ~3% of the backward's stall samples
    # (H100, B16 T2048 H32 d 64); two allocations, not one: the compiler puts a barrier between two copies into one
    z2_s = gl.allocate_shared_memory(gl.float32, [D, BT], SP)
    zb_s = gl.allocate_shared_memory(gl.float32, [D, BT], SP)
    da1_s = gl.allocate_shared_memory(OPT, [BT, BT], SLE)
    da2_s = gl.allocate_shared_memory(OPT, [BT, BT], SLE)
    # the per-warp parts of S's column sums over G1t's and G2t's rows (WF, WD warps down them; `_warp_parts`)
    WF: gl.constexpr = LF.warps_per_cta[0]
    WD: gl.constexpr = LD.warps_per_cta[0]
    sF_s = gl.allocate_shared_memory(gl.float32, [WF, BT], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    sD_s = gl.allocate_shared_memory(gl.float32, [WD, BT], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    # a mini-batch's q, k, v, dO [D, 16] as they lie in memory (feature-contiguous), copied in by cp.async with the
    # weights and read in the MMA layout from here (dO, its dead tokens' columns zeroed, to the walk's end): loaded
    # straight in that layout, 2 bytes a load each just before its use, they were ~14% of the backward's stall samples
    # and 78% of its excess global sectors (H100, B16 T2048 H32 d 64); 16-byte chunks swizzled by token so that the
    # reads (8 features x 4 tokens) hit distinct banks; four buffers, not one [4, D, 16]: the compiler puts a barrier
    # between two copies into one
    STK: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 8, [0, 1])
    q_s = gl.allocate_shared_memory(OPT, [D, BT], STK)
    k_s = gl.allocate_shared_memory(OPT, [D, BT], STK)
    v_s = gl.allocate_shared_memory(OPT, [D, BT], STK)
    do_s = gl.allocate_shared_memory(OPT, [D, BT], STK)

    pid = gl.program_id(0)
    s = pid % NSPLIT
    first = (s == 0).to(gl.float32)  # terms every program computes alike are added by program 0 only
    rdD = gl.arange(0, D, layout=gl.SliceLayout(1, LD))
    rtD = gl.arange(0, BT, layout=gl.SliceLayout(0, LD))
    rfF = gl.arange(0, FS, layout=gl.SliceLayout(1, LF))
    riE = gl.arange(0, BT, layout=gl.SliceLayout(1, LE))
    rjE = gl.arange(0, BT, layout=gl.SliceLayout(0, LE))
    causal = riE[:, None] >= rjE[None, :]
    tau_i = gl.load(tau_ptr + riE).to(gl.float32)
    tau_b = gl.load(tau_ptr + BT - 1).to(gl.float32)
    ws1 = ws1_ptr + pid * GROUP * FS * D  # this program's scratch: the start weights of a group's mini-batches
    ws2 = ws2_ptr + pid * GROUP * FS * D
    cs1 = cs1_ptr + pid * GROUP * FS
    nsync = 0  # barriers passed (the counter of the head's programs reaches nsync * NSPLIT)

    w_lo, w_hi, w_step = _walk(sched_ptr, pid // NSPLIT, NHEADS, NGROUPS, SCHED)
    for it in range(w_lo, w_hi, w_step):
        head = _head_at(sched_ptr, it, NGROUPS, SCHED)
        bi = head // H  # the row (a batch entry or a packed document)
        hi = head % H
        start, nmb, slot = _row_whole(span_ptr, bi, BT)
        nck = (nmb + GROUP - 1) // GROUP
        x_base = bi * s_b + start * s_t + hi * s_h
        o_base = bi * o_b + start * o_t + hi * o_h
        l_base = bi * l_b + start * l_t + hi * l_h
        d_base = bi * dl_b + start * H + hi  # dlr [B, T, H] contiguous (packed rows: dl_b = 0)
        gam = gl.load(lnw_ptr + hi * D + rdD).to(gl.float32)
        bet = gl.load(lnb_ptr + hi * D + rdD).to(gl.float32)
        xb = xb_ptr + head * 3 * NSPLIT * REC
        cnt = cnt_ptr + head
        # the LN weights' gradients (every program has the same; program 0 stores them); where a sum over the tokens
        # crosses warps (d 64), per (dim, token) over the walk and summed over the tokens once at its end
        if LATE_SUMS:
            dgamT = gl.zeros([D, BT], gl.float32, LD)
            dbetT = gl.zeros([D, BT], gl.float32, LD)
        else:
            dgam = gl.zeros([D], gl.float32, gl.SliceLayout(1, LD))
            dbet = gl.zeros([D], gl.float32, gl.SliceLayout(1, LD))
        dtau = gl.zeros([BT], gl.float32, gl.SliceLayout(1, LE))  # this program's part of dtau
        dc2 = gl.load(dc2_ptr + head * D + rdD)  # the carried gradient of c2 (every program alike)
        nsync = 0
        for gi in range(nck):
            g = nck - 1 - gi
            n0 = g * GROUP
            n1 = gl.minimum(n0 + GROUP, nmb)
            # ---- recompute (unless the forward kept them: KEEP): the start weights of every mini-batch of the group,
            # from its checkpoint, into the scratch (16-bit; c1 fp32), non-finite entries as 0 (the walk needs no c2:
            # see its poisoned-state note); g1t_s / g2w_s hold the fp32 weights meanwhile
            if not KEEP:
                _cta_barrier()
                # the k, v of the group's first mini-batch, copied while the checkpoint loads; every later one's are
                # issued by the mini-batch before it. Their buffers' last reads (the previous group's walk, whose
                # copies are drained before the barrier after it) are before the barrier above
                _rec_in(k_s, v_s, k_ptr, v_ptr, x_base, n0 * BT, s_t, D, num_warps)
                ck = (slot + g) * H + hi
                _weights_io(g1t_s, g2w_s, ck1_ptr + ck * D * FF, ck2_ptr + ck * FF * D, s, True, FS, D, FF, FC, LBt,
                            LB, True)
                c1 = gl.load(ckc1_ptr + ck * FF + s * FS + rfF)
                c2 = gl.load(ckc2_ptr + ck * D + rdD)
                _cta_barrier()
                for n in range(n0, n1):
                    j = n - n0
                    _tile_out(ws1 + j * FS * D, g1t_s, FS, D, FC, LB, True)
                    _tile_out(ws2 + j * FS * D, g2w_s, FS, D, FC, LB, True)
                    gl.store(cs1 + j * FS + rfF, gl.where(gl.abs(c1) < float("inf"), c1, 0.0))
                    if n < n1 - 1:
                        t0 = n * BT
                        lrD = gl.load(lr_ptr + l_base + (t0 + rtD) * l_t).to(gl.float32)
                        # Z2 + c2, the forward's: loaded here, its latency hidden by the wait, the barriers and the Z1
                        # product (just before its use it was 1-2% of the backward's stall samples, H100 d 64; the
                        # same registers and stack, offline sm_90)
                        z2 = gl.load(z2s_ptr + o_base + _tok_tile(rdD, rtD, t0, o_t))
                        wait_group(0)  # this mini-batch's k, v (`_rec_in`: issued before the loop or by the one before)
                        _cta_barrier()
                        kT = k_s.load(LD)
                        vT = v_s.load(LD).to(gl.float32)
                        kT_s.store(kT.to(OPT))
                        fence_async_shared()
                        _cta_barrier()
                        # the next mini-batch's k, v copied while this one computes and commits its update (the
                        # waits at its top: ~1.3% of the backward's stall samples, H100 d 64). Their buffers' last
                        # reads (kT, vT just above) are before the barrier above (BAR.SYNC before the LDGSTS in the
                        # offline sm_90 SASS); the next reads follow the wait and barrier at the next top. The group's
                        # last computing mini-batch copies those of its last (n1 - 1, whole: a valid address), which
                        # computes nothing: drained (wait) after the loop, before the barrier that precedes the walk
                        # (whose first copies write k_s, v_s). No branch, no clamp: n + 1 <= n1 - 1 here
                        _rec_in(k_s, v_s, k_ptr, v_ptr, x_base, t0 + BT, s_t, D, num_warps)
                        z1 = _w_mma(g1t_s, kT_s, gl.zeros([FS, BT], gl.float32, LF) + c1[:, None], D, AF, OPT)
                        x2, d1 = _gelu_parts(z1)
                        x2_s.store(x2.to(OPT))
                        g2, _xh, _rstd, _gy, _mgx = _ln_l2_grad_cols(z2, vT, kT.to(gl.float32), gam, bet, D, EPS)
                        g2_s.store(g2.to(OPT))
                        fence_async_shared()
                        _cta_barrier()
                        g1 = _w_mma(g2w_s, g2_s, gl.zeros([FS, BT], gl.float32, LF), D, AF, OPT) * d1
                        ebD = tau_b * lrD
                        c1, c2 = _commit(g1t_s, g2w_s, eg1_s, eg2_s, kT_s, x2_s, g1, g2, c1, c2, _col_vec(ebD, LF),
                                         ebD, FS, FC, LW)
                wait_group(0)  # the last copies (`_rec_in`) done before the barrier below

            # ---- walk the group back; g1t_s / g2w_s carry the gradients w.r.t. the weights after the mini-batch
            _cta_barrier()
            _weights_io(g1t_s, g2w_s, dw1_ptr + head * D * FF, dw2_ptr + head * FF * D, s, True, FS, D, FF, FC, LBt,
                        LB)
            dc1 = gl.load(dc1_ptr + head * FF + s * FS + rfF)
            # the inputs of the group's first walked mini-batch (its last); every later one's are issued at the end of
            # the one walked before it. No barrier before these copies: the last reads of their buffers (the
            # recompute's k_s, v_s, whose own copies are drained before it; the previous group's walk) are before
            # the barrier above
            _walk_in(q_s, k_s, v_s, do_s, wh1_s, wh2_s, z2_s, zb_s, q_ptr, k_ptr, v_ptr, do_ptr,
                     ws1 + (n1 - 1 - n0) * FS * D, ws2 + (n1 - 1 - n0) * FS * D, z2s_ptr, zbs_ptr, x_base, o_base,
                     (n1 - 1) * BT, s_t, o_t, KEEP, FS, D, FC, LC, num_warps)
            for ni in range(n1 - n0):
                n = n1 - 1 - ni
                j = n - n0
                t0 = n * BT
                # this mini-batch's q, k, v, dO, Z2, Z2b and (unless KEEP) start weights are in flight (cp.async,
                # `_walk_in`: issued before the walk or at the end of the mini-batch walked before this one; for the
                # weights the synchronous copy was 11% of the walk's stall samples on an H100, its loads serialised),
                # waited for below. The kept weights are read here: their buffers' last reads (the previous
                # mini-batch's dx2, dk) are before the barriers at its end (or the walk's start)
                if KEEP:  # the forward's (the same rounding of the same weights)
                    kw1, kw2, kc1, kc2 = _kept_at(kw_ptr, kc_ptr, slot, n, H, hi, s, GROUP, FF, FS, D)
                    _tile_in_finite(wh1_s, kw1, FS, D, FC, LB)
                    _tile_in_finite(wh2_s, kw2, FS, D, FC, LB)
                    c1 = gl.load(kc1 + rfF)
                    c2 = gl.load(kc2 + rdD)
                    # a state poisoned by an earlier mini-batch has every entry non-finite (each update is a sum of
                    # outer products), its biases too: they tell
                    wbad = gl.sum(gl.where(gl.abs(c1) < float("inf"), 0.0, 1.0), axis=0) \
                        + gl.sum(gl.where(gl.abs(c2) < float("inf"), 0.0, 1.0), axis=0)
                    c1 = gl.where(gl.abs(c1) < float("inf"), c1, 0.0)
                else:  # the recompute's, its non-finite entries written as 0. No poisoned-state check: a start state
                    # with a non-finite c1s or c2 entry was the forward's too, whose Z2 + c2 of this mini-batch (read
                    # below) then has a non-finite entry in every column (c2[f]: row f; c1s[i]: X2 row i, which
                    # every W2 entry multiplies, inf * 0 = NaN), so G2 is NaN for every token and program, as the
                    # check made it (the tests' poisoned states pass through it; the check, two sums across warps on
                    # the c1, c2 loads, was ~2% of the backward's stall samples, H100 d 64; offline sm_90 it also
                    # kept the recompute's c2 alive)
                    c1 = gl.load(cs1 + j * FS + rfF)
                lrD = gl.load(lr_ptr + l_base + (t0 + rtD) * l_t).to(gl.float32)
                wait_group(0)
                _cta_barrier()
                qT = q_s.load(LD).to(gl.float32)
                kT = k_s.load(LD).to(gl.float32)
                vT = v_s.load(LD).to(gl.float32)
                dOT = do_s.load(LD).to(gl.float32)
                kT_s.store(kT.to(OPT))
                fence_async_shared()
                _cta_barrier()

                # forward recompute, state path: Z1, X2, G2 (from the forward's Z2)
                z1 = warpgroup_mma(wh1_s, kT_s, gl.zeros([FS, BT], gl.float32, LF) + c1[:, None])
                x2, d1, dd1 = _gelu_parts2(z1)
                x2_s.store(x2.to(OPT))
                fence_async_shared()
                _cta_barrier()
                z2 = z2_s.load(LD)  # Z2 + c2, the forward's (summed)
                if KEEP:
                    z2 = gl.where(wbad > 0.0, float("nan"), z2)  # poisoned start weights: every program sees NaN G2
                g2, xh, rstd, gy, mgx = _ln_l2_grad_cols(z2, vT, kT, gam, bet, D, EPS)

                # NaN containment (as in chunk.py): which tokens pass gradient; their values enter as zeros
                # (a column sum is finite iff its entries are, _finite_cols: k, v and G2 in one, q beside it)
                skvg, sq = gl.reduce((kT + vT + g2, qT), 0, _add2)
                okD = (gl.abs(skvg) < float("inf")) & (gl.abs(lrD) < float("inf"))
                ok = gl.convert_layout(okD, gl.SliceLayout(0, LE))
                live = _col_vec(gl.sum(gl.where(causal & (~ok)[None, :], 1.0, 0.0), axis=1) == 0.0, LD)
                out = live & (gl.abs(sq) < float("inf"))
                keep = gl.sum(gl.where(ok, 0.0, 1.0), axis=0) == 0.0
                do_s.store(gl.where(out[None, :], dOT, 0.0).to(OPT))  # (16-bit as loaded: the same values)
                qT = gl.where(out[None, :], qT, 0.0)
                kT = gl.where(live[None, :], kT, 0.0)
                vT = gl.where(live[None, :], vT, 0.0)
                tgt = bet[:, None] - (vT - kT)  # the LN weight's gradient needs only this of v and k
                lrD = gl.where(live, lrD, 0.0)
                g2 = gl.where(live[None, :], g2, 0.0)
                xh = gl.where(live[None, :], xh, 0.0)
                gy = gl.where(live[None, :], gy, 0.0)
                rstd = gl.where(live, rstd, 0.0)
                mgx = gl.where(live, mgx, 0.0)
                liveF = _col_vec(live, LF)
                x2 = gl.where(liveF[None, :], x2, 0.0)
                d1 = gl.where(liveF[None, :], d1, 0.0)
                dd1 = gl.where(liveF[None, :], dd1, 0.0)
                dc1 = gl.where(keep, dc1, 0.0)
                dc2 = gl.where(keep, dc2, 0.0)
                if keep.to(gl.int32) == 0:  # the state after this mini-batch is poisoned: it passes no gradient
                    _zero_smem(g1t_s, FS, D, FC, LW)
                    _zero_smem(g2w_s, FS, D, FC, LW)
                _cta_barrier()
                qT_s.store(qT.to(OPT))
                kT_s.store(kT.to(OPT))
                x2_s.store(x2.to(OPT))
                g2_s.store(g2.to(OPT))
                fence_async_shared()
                _cta_barrier()
                h1 = warpgroup_mma(wh2_s, g2_s, gl.zeros([FS, BT], gl.float32, LF))  # W2s G2t
                g1 = h1 * d1
                h1dd1 = h1 * dd1  # for dZ1 = dG1 H1 GELU''(Z1)
                g1_s.store(g1.to(OPT))
                pF_s.index(0).store(d1)
                pF_s.index(1).store(h1dd1)
                pF_s.index(2).store(g1)
                pD_s.index(0).store(g2)
                pD_s.index(1).store(xh)
                pD_s.index(2).store(gy)
                pD_s.index(3).store(tgt)

                # output path: Z1b, X2b; Z2b and X2b X2^T as the forward saved them
                lrE = gl.convert_layout(lrD, gl.SliceLayout(0, LE))
                E = gl.where(causal, tau_i[:, None] * lrE[None, :], 0.0)
                qk1 = _tok_dot(qT_s, kT_s, D, LT, LE) + 1.0
                P1 = E * qk1
                p1_s.store((-P1).to(OPT))  # -P1 here, so that G1t is read from g1_s: the same products, exactly
                fence_async_shared()
                _cta_barrier()
                z1b = warpgroup_mma(wh1_s, qT_s, gl.zeros([FS, BT], gl.float32, LF) + c1[:, None])
                z1b = warpgroup_mma(g1_s, p1_s.permute((1, 0)), z1b)  # - G1t P1^T
                x2b, d1b = _gelu_parts(z1b)
                pF_s.index(3).store(d1b)
                x2b_s.store(x2b.to(OPT))
                # Z2b + c2 and X2b X2^T summed over the head's programs: the forward's (saved; no exchange). The
                # entries of tokens that pass no gradient enter as zeros (the forward's are NaN there, or made from
                # a q this backward zeroes): finite, and only ever multiplied by zero gradients
                zb = gl.where(out[None, :], zb_s.load(LD), 0.0)
                s2 = gl.load(s2s_ptr + _s2_tile(o_base, t0, o_t, riE, rjE, D))
                outE = gl.convert_layout(out, gl.SliceLayout(1, LE))
                s2 = gl.where(causal & outE[:, None] & ok[None, :], s2, 0.0)
                xx1 = s2 + 1.0
                P2 = E * xx1
                xhb, rstdb = _normalize_cols(zb, D, EPS)

                # backward through o = q + LN(Z2b), Z2b = X2b W2 + c2 - P2 G2
                dOT = do_s.load(LD).to(gl.float32)
                if LATE_SUMS:
                    dgamT += dOT * xhb
                    dbetT += dOT
                else:
                    sgam, sbet = gl.reduce((dOT * xhb, dOT), 1, _add2)
                    dgam += sgam
                    dbet += sbet
                dz2b = _proj_cols(dOT * gam[:, None], xhb, rstdb, D)
                dz2b = gl.where(live[None, :], dz2b, 0.0)
                _cta_barrier()
                p2_s.store(P2.to(OPT))
                dz2b_s.store(dz2b.to(OPT))
                fence_async_shared()
                _cta_barrier()
                dP2 = -_tok_dot(dz2b_s, g2_s, D, LT, LE)
                dA2 = dP2 * E
                dE = first * dP2 * xx1
                da2_s.store(dA2.to(OPT))
                fence_async_shared()
                _cta_barrier()
                z2_s.store(-warpgroup_mma(dz2b_s, p2_s, gl.zeros([D, BT], gl.float32, LD)))  # -(P2^T dZ2b)^T
                dx2b = warpgroup_mma(wh2_s, dz2b_s, gl.zeros([FS, BT], gl.float32, LF))  # W2 dZ2bt
                dx2b = warpgroup_mma(x2_s, da2_s.permute((1, 0)), dx2b)  # + X2t dA2^T
                pF_s.index(4).store(warpgroup_mma(x2b_s, da2_s, gl.zeros([FS, BT], gl.float32, LF)))  # X2bt dA2
                dz1b = dx2b * pF_s.index(3).load(LF)
                dz1b_s.store(dz1b.to(OPT))
                fence_async_shared()
                _cta_barrier()
                dP1 = -_tok_dot(dz1b_s, g1_s, FS, LT, LE)  # this slice's
                dE += dP1 * qk1
                dA1 = dP1 * E
                da1_s.store(dA1.to(OPT))
                p1_s.store(P1.to(OPT))
                fence_async_shared()
                _cta_barrier()
                pF_s.index(5).store(-warpgroup_mma(dz1b_s, p1_s, gl.zeros([FS, BT], gl.float32, LF)))  # dG1t: -(P1^T dZ1b)^T
                dq = warpgroup_mma(wh1_s.permute((1, 0)), dz1b_s, first * do_s.load(LD).to(gl.float32))
                dq = warpgroup_mma(kT_s, da1_s.permute((1, 0)), dq)  # + K^T dA1^T
                if NSPLIT > 1:  # this program's part of dq, summed after the next mini-batch's dG2 exchange
                    gl.store(xb + ((n % 3) * NSPLIT + s) * REC + R_DQ + _tok_tile(rdD, rtD, 0, D), dq)
                else:
                    gl.store(dq_ptr + o_base + _tok_tile(rdD, rtD, t0, o_t), dq.to(dq_ptr.dtype.element_ty))
                zb_s.store(warpgroup_mma(qT_s, da1_s, gl.zeros([D, BT], gl.float32, LD)))  # dkt: Q^T dA1

                # the carried gradients seen through the weight update of this mini-batch
                ebD = tau_b * lrD
                ebF = _col_vec(ebD, LF)
                kdw1 = _w_mma(g1t_s, kT_s, gl.zeros([FS, BT], gl.float32, LF) + dc1[:, None], D, AF, OPT)
                xdw2 = _w2t_mma(g2w_s, x2_s, gl.zeros([D, BT], gl.float32, LD) + (first * dc2)[:, None], FS, FC,
                                AD, OPT)
                g1 = pF_s.index(2).load(LF)
                g2 = pD_s.index(0).load(LD)
                # S's column sums: each warp's part here ([W, rows / W, 16]: a warp's rows summed in it), their sum
                # where S is used, after the barriers between
                _warp_parts(kdw1 * g1, sF_s, WF)
                _warp_parts(xdw2 * g2, sD_s, WD)
                dg1 = pF_s.index(5).load(LF) - ebF[None, :] * kdw1
                dh1 = dg1 * pF_s.index(0).load(LF)
                pF_s.index(1).store(dg1 * pF_s.index(1).load(LF))  # dZ1's first term, parked over H1t GELU''(Z1t)
                _cta_barrier()
                eg1_s.store((-ebF[None, :] * g1).to(OPT))
                eg2_s.store((-ebD[None, :] * g2).to(OPT))
                dh1_s.store(dh1.to(OPT))
                fence_async_shared()
                _cta_barrier()
                dg2 = warpgroup_mma(wh2_s.permute((1, 0)), dh1_s, first * z2_s.load(LD) - ebD[None, :] * xdw2)
                if NSPLIT > 1:  # this program's part of dG2 published; the two products below read nothing the
                    # other programs write, so they run while the exchange completes
                    rec = xb + (n % 3) * NSPLIT * REC
                    gl.store(rec + s * REC + R_DG2 + _tok_tile(rdD, rtD, 0, D), dg2)
                    _arrive(cnt)
                dk = _w2t_mma(g1t_s, eg1_s, zb_s.load(LD), FS, FC, AD, OPT)  # - dW1' (e_b G1)^T
                dx2 = _w_mma(g2w_s, eg2_s, pF_s.index(4).load(LF), D, AF, OPT)  # - dW2' (e_b G2)^T
                if NSPLIT > 1:
                    nsync += 1
                    _wait(cnt, nsync * NSPLIT)
                    dg2 = _sum_parts(rec + R_DG2, _tok_tile(rdD, rtD, 0, D), NSPLIT, REC)
                    if ni > 0:  # the gradients of the mini-batch walked before this one (every program has
                        # finished it, so its parts of them are written; slot (n + 1) % 3, which no program writes
                        # before the next exchange)
                        _emit_grads(xb + ((n + 1) % 3) * NSPLIT * REC, dq_ptr, dk_ptr, dlr_ptr,
                                    o_base + _tok_tile(rdD, rtD, t0 + BT, o_t), d_base + (t0 + BT + rjE) * H,
                                    rdD, rtD, rjE, s, NSPLIT, D, REC, R_DQ, R_DK, R_DLR)

                # G2 = LN-L2 gradient at Z2 (target v - k)
                xh = pD_s.index(1).load(LD)
                dgy, dz2 = _ln_l2_grad_bwd_cols(dg2, pD_s.index(0).load(LD), xh, rstd, pD_s.index(2).load(LD), mgx,
                                                gam, D)
                if LATE_SUMS:
                    dgamT += dgy * (2.0 * gam[:, None] * xh + pD_s.index(3).load(LD))
                    dbetT += dgy * gam[:, None]
                else:
                    sgam, sbet = gl.reduce((dgy * (2.0 * gam[:, None] * xh + pD_s.index(3).load(LD)),
                                            dgy * gam[:, None]), 1, _add2)
                    dgam += sgam
                    dbet += sbet
                if s == NSPLIT - 1:  # (every program has it; the last one, which emits no dq)
                    gl.store(dv_ptr + o_base + _tok_tile(rdD, rtD, t0, o_t),
                             (-gam[:, None] * dgy).to(dv_ptr.dtype.element_ty))
                dk += first * gam[:, None] * dgy
                dz2_s.store(dz2.to(OPT))
                fence_async_shared()
                _cta_barrier()
                dx2 = warpgroup_mma(wh2_s, dz2_s, dx2)  # + W2 dZ2t
                dz1 = pF_s.index(1).load(LF) + dx2 * pF_s.index(0).load(LF)
                dz1_s.store(dz1.to(OPT))
                fence_async_shared()
                _cta_barrier()
                dk = warpgroup_mma(wh1_s.permute((1, 0)), dz1_s, dk)  # + W1 dZ1t
                S = _parts_sum(sF_s, WF, LE, num_warps) + _parts_sum(sD_s, WD, LE, num_warps)
                dlr = -tau_b * S + gl.sum(gl.where(causal, dE, 0.0) * tau_i[:, None], axis=0)
                dE = gl.where(causal, dE, 0.0)
                dtau += gl.sum(dE * lrE[None, :], axis=1)
                dtau += gl.where(riE == BT - 1, -gl.sum(lrE * S, axis=0), 0.0)
                dc1 += gl.sum(dz1b + dz1, axis=1)
                dc2 += gl.sum(dz2b + dz2, axis=1)

                # this mini-batch's dk, dlr: summed over the programs after the next exchange
                if NSPLIT > 1:
                    rec = xb + (n % 3) * NSPLIT * REC
                    gl.store(rec + s * REC + R_DK + _tok_tile(rdD, rtD, 0, D), dk)
                    gl.store(rec + s * REC + R_DLR + rjE, dlr)
                else:
                    gl.store(dk_ptr + o_base + _tok_tile(rdD, rtD, t0, o_t), dk.to(dk_ptr.dtype.element_ty))
                    gl.store(dlr_ptr + d_base + (t0 + rjE) * H, dlr)

                # the next mini-batch's (n - 1) inputs copied while this one's weight gradients update (the two
                # `_update`s read none of their buffers). Their buffers' last reads (wh1_s: dk; wh2_s: dx2; do_s: dq;
                # z2_s: dg2; zb_s: dk's first product; q_s, k_s, v_s: the top) are before the barriers of the sums
                # above (dlr's crosses the warps at every d; the compiler's barrier analysis puts one before the
                # copies where none is: offline, copies right after dk get a BAR.SYNC), and their next reads follow
                # the wait, fence and barrier at the next top. The group's last walked mini-batch (n0) copies its own
                # inputs again, drained (wait) before the barrier after the walk: the recompute between two groups'
                # walks writes the scratch these copies read and the buffers k_s, v_s. Unconditional: a branch
                # around the copies costs stack (offline sm_90, d 64: 296 B instead of 224 B), these clamped indices
                # do not; issued after the sums and stores above, whose operands would otherwise be live across the
                # copies' addresses
                nn = gl.maximum(n - 1, n0)
                _walk_in(q_s, k_s, v_s, do_s, wh1_s, wh2_s, z2_s, zb_s, q_ptr, k_ptr, v_ptr, do_ptr,
                         ws1 + (nn - n0) * FS * D, ws2 + (nn - n0) * FS * D, z2s_ptr, zbs_ptr, x_base, o_base, nn * BT,
                         s_t, o_t, KEEP, FS, D, FC, LC, num_warps)

                # gradients w.r.t. the start weights of this mini-batch
                _update(g1t_s, dz1b_s, qT_s, FS, FC, LW, a2_s=dz1_s, b2_s=kT_s)  # dW1^T += dZ1bt Q + dZ1t K
                _update(g2w_s, x2b_s, dz2b_s, FS, FC, LW, a2_s=dh1_s, b2_s=g2_s, a3_s=x2_s,
                        b3_s=dz2_s)  # dW2 += X2bt dZ2b + dH1t G2 + X2t dZ2
            if NSPLIT > 1:  # the group's first mini-batch's gradients
                nsync += 1
                _sync(cnt, nsync * NSPLIT)
                _emit_grads(xb + (n0 % 3) * NSPLIT * REC, dq_ptr, dk_ptr, dlr_ptr,
                            o_base + _tok_tile(rdD, rtD, n0 * BT, o_t), d_base + (n0 * BT + rjE) * H,
                            rdD, rtD, rjE, s, NSPLIT, D, REC, R_DQ, R_DK, R_DLR)
            wait_group(0)  # the last mini-batch's copies (of its own inputs again) done before this barrier
            _cta_barrier()
            _weights_io(g1t_s, g2w_s, dw1_ptr + head * D * FF, dw2_ptr + head * FF * D, s, False, FS, D, FF, FC,
                        LBt, LB)
            gl.store(dc1_ptr + head * FF + s * FS + rfF, dc1)
        gl.store(dtau_ptr + (head * NSPLIT + s) * BT + riE, dtau)
        if s == 0:  # c2's gradient and the LN weights' are the same in every program
            if LATE_SUMS:
                dgam, dbet = gl.reduce((dgamT, dbetT), 1, _add2)
            gl.store(dc2_ptr + head * D + rdD, dc2)
            gl.store(dlnw_ptr + head * D + rdD, dgam)
            gl.store(dlnb_ptr + head * D + rdD, dbet)


def _groups(device: torch.device, heads: int, nsplit_: int, programs: int | None) -> int:
    """How many groups of nsplit_ programs (one group per head at a time) the persistent grid has: as many as run
    at once on `device` (one program per SM: each takes most of its shared memory; the interpreter on the CPU
    runs every program at once), at most `programs` programs, at most one group per head."""
    cap = sm_count(device) or 1 << 30
    if programs is not None:
        cap = min(cap, programs)
    return max(1, min(heads, cap // nsplit_))


def check(d: int, mini_batch: int, dtype: torch.dtype) -> None:
    """The shapes and dtypes these kernels take; a one-line error naming the kernel choice otherwise."""
    if d not in HEAD_DIMS:
        raise ValueError(f"mlp_impl: 'smem' is written for head dim 64 or 128, got head dim {d}")
    if mini_batch != MB:
        raise ValueError(f"mlp_impl: 'smem' is written for mini-batch {MB}, got mini_batch {mini_batch}")
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"mlp_impl: 'smem' multiplies in 16 bits on the tensor cores; expected bf16/fp16 inputs, "
                         f"got {str(dtype).replace('torch.', '')}")


def schedule(work, H: int, groups: int) -> list[int] | None:
    """Which (row, head) pairs each group of a persistent launch walks, when rows differ in length (packed
    documents): greedy longest-first (each pair, by decreasing work, to the group with the least work so far; a
    pair's work is its row's whole mini-batches + 1), as a flat int list: groups + 1 offsets, then the N * H pair
    indices (row * H + head), group g's at offsets[g] .. offsets[g + 1] - 1. work: every row's whole mini-batches
    (host ints). None where the plain walk (group g: every groups-th pair from g) is as good: no group takes two
    pairs, or every row has the same work."""
    heads = len(work) * H
    if heads <= groups or len(set(work)) <= 1:
        return None
    order = sorted(range(heads), key=lambda h: -work[h // H])  # stable: equal work keeps the index order
    load = [(0, g) for g in range(groups)]  # a heap of (work so far, group)
    lists = [[] for _ in range(groups)]
    for h in order:
        w, g = heapq.heappop(load)
        lists[g].append(h)
        heapq.heappush(load, (w + work[h // H] + 1, g))
    offsets = [0]
    for ls in lists:
        offsets.append(offsets[-1] + len(ls))
    return offsets + [h for ls in lists for h in ls]


def schedules(work, H: int, d: int, device: torch.device) -> tuple:
    """The (forward, backward) schedules (`schedule`, or None) of rows with `work` whole mini-batches each (host
    ints) at head dim d on `device`, for the launches `fwd` and `bwd` make there (programs None)."""
    heads = len(work) * H
    return tuple(schedule(work, H, _groups(device, heads, ns, None))
                 for ns in (nsplit(d, heads, device), nsplit_bwd(d)))


def _rows_and_sched(rows, B: int, T: int, group: int, device, sched, H: int, ns: int, programs: int | None):
    """A launch's rows (None: every batch entry, tokens 0..T), its (row, head) pairs, its groups of ns programs and
    its schedule (None or an empty tensor: the plain walk; else checked against the groups)."""
    rows = rows if rows is not None else batch_rows(B, T, MB, group, device)
    if rows.group != group:
        raise ValueError(f"rows: built for checkpoint groups of {rows.group} mini-batches, got group {group}")
    heads = rows.n * H
    groups = _groups(device, heads, ns, programs)
    if sched is not None and sched.numel() == 0:
        sched = None
    if sched is not None and sched.numel() != groups + 1 + heads:
        raise ValueError(f"sched: expected {groups + 1 + heads} entries (a schedule of {heads} (row, head) pairs "
                         f"over {groups} groups), got {sched.numel()}")
    return rows, heads, groups, sched


def fwd(q, k, v, lr, tau, ln_weight, ln_bias, params, mini_batch: int, group: int, save: bool = True,
        num_warps: int | None = None, programs: int | None = None, rows=None, sched=None, split: int | None = None,
        keep: bool = False):
    """The rows' whole mini-batches (`triton_utils.Rows`: the B batch entries, or packed documents; None: every
    batch entry whole), each row's from its first token and a zero accumulator; a row's partial last mini-batch
    is not computed (its outputs unwritten, the weights returned those at its start: the caller runs it). Same
    contract as `chunk.fwd` otherwise. q, k, v [B,T,H,d] 16-bit (last dim contiguous, same strides); params =
    (W1 [N,H,d,F], c1 [N,H,F], W2 [N,H,F,d], c2 [N,H,d]) fp32 contiguous, one per row. num_warps None: 8;
    programs: at most this many programs (None: what the GPU holds at once); sched: which heads each group of
    programs walks (`schedule` for this launch's groups, int32 on the device; None: every groups-th); split:
    programs per head (None: `nsplit`'s choice; 1 or 2 at d = 64, 4 at d = 128). Returns o, the final params, and when
    `save` the checkpoints (params every `group` mini-batches, in the row kernels' slots [rows.slots, H]: row n's
    group g at slot span[n, 2] + g; W1's transposed, [.., F, d], unlike the other pairs') followed by Z2 + c2 and Z2b
    + c2 [B,T,H,d] fp32 and X2b X2^T [B,T,H,16] fp32 (row i of each mini-batch at its token i) at the whole
    mini-batches' tokens (`bwd` reads them instead of recomputing them, which needs exchanges between the programs of
    a head). keep (with save): also every whole mini-batch's start weights, W1^T and W2 rounded to q's dtype
    [rows.slots * group, H, 2, F, d] and c1 | c2 fp32 [rows.slots * group, H, F + d] (row n's mini-batch m at span[n,
    2] * group + m), appended to the saved tensors: `bwd` then reads them instead of recomputing them from the
    checkpoints (faster; 4 F d + 4 (F + d) bytes per (row, head, mini-batch))."""
    B, T, H, d = q.shape
    F = params[0].shape[-1]
    check(d, mini_batch, q.dtype)
    rows = rows if rows is not None else batch_rows(B, T, MB, group, q.device)
    ns = split or nsplit(d, rows.n * H, q.device)
    if ns not in ((1, 2) if d == 64 else (4,)):
        raise ValueError(f"split: expected 1 or 2 programs per head at head dim 64, 4 at 128, got {ns} at {d}")
    rows, heads, groups, sched = _rows_and_sched(rows, B, T, group, q.device, sched, H, ns, programs)
    o = torch.empty((B, T, H, d), dtype=q.dtype, device=q.device)
    fin = tuple(torch.empty_like(p) for p in params)
    if save:
        # (W1's checkpoints transposed, [F, d], as W2's: the kernels copy them without bank conflicts)
        ck = tuple(torch.empty((rows.slots, H, *(p.shape[:1:-1] if i == 0 else p.shape[2:])), dtype=torch.float32,
                               device=q.device) for i, p in enumerate(params))
    else:
        ck = fin  # never written
    z2 = torch.empty((B, T, H, d), dtype=torch.float32, device=q.device) if save else o  # (o: never written)
    zb = torch.empty((B, T, H, d), dtype=torch.float32, device=q.device) if save else o
    s2 = torch.empty((B, T, H, MB), dtype=torch.float32, device=q.device) if save else o
    keep = keep and save
    kept = (torch.empty((rows.slots * group, H, 2, F, d), dtype=q.dtype, device=q.device),
            torch.empty((rows.slots * group, H, F + d), dtype=torch.float32, device=q.device)) if keep else (o, o)
    xz = torch.empty((heads, 2, ns, d, MB) if ns > 1 else (1,), dtype=torch.float32, device=q.device)
    xo = torch.empty((heads, 2, ns, d * MB + MB * MB) if ns > 1 else (1,), dtype=torch.float32, device=q.device)
    cnt = torch.zeros((heads,), dtype=torch.int32, device=q.device)
    launch = dict(launch_cooperative_grid=True) if ns > 1 else {}
    ttt_mlp_smem_fwd_kernel[(groups * ns,)](
        q, k, v, lr, tau, ln_weight, ln_bias, *params, o, *fin, *ck, z2, zb, s2, *kept, xz, xo, cnt, rows.span,
        cnt if sched is None else sched, *rows.strides(q), *rows.strides(lr), *rows.strides(o), H, heads, groups,
        D=d, FF=F, NSPLIT=ns, GROUP=group, SAVE=save, KEEP=keep, SCHED=sched is not None, EPS=LN_EPS,
        num_warps=num_warps or 8, **launch)
    return o, fin, ((*ck, z2, zb, s2, *kept) if keep else (*ck, z2, zb, s2) if save else None)


def nsplit_bwd(d: int) -> int:
    """Programs per head in the backward: it holds the carried weight gradients (fp32) beside the weights (16-bit),
    so twice the forward's usual: two at d = 64, eight at d = 128 (each FS = 128 / 64, about 215 KB of shared memory)."""
    return 2 if d == 64 else 8


def bwd(q, k, v, lr, tau, ln_weight, ln_bias, ckpt, do, dfin, mini_batch: int, group: int,
        num_warps: int | None = None, programs: int | None = None, rows=None, sched=None):
    """Gradients of `fwd` from its checkpoints and saved sums (ckpt: what `fwd` returned for them, seven tensors, or
    nine with the start weights it kept: then nothing is recomputed), over the same rows (same contract as `chunk.bwd`
    otherwise): do [B,T,H,d] (or None), dfin the gradients of the final (W1, c1, W2, c2) [N,H,...] (entries may be
    None). Returns dq, dk,
    dv (q's dtype; zero at tokens in no row's whole mini-batches), dlr [B,T,H] fp32, dtau [b], dln_w, dln_b [H,d],
    and the gradients of the start params (fp32). num_warps None: 8; programs: at most this many programs (None:
    what the GPU holds at once); sched: as in `fwd`, for this launch's groups (`nsplit_bwd` programs each)."""
    B, T, H, d = q.shape
    if len(ckpt) not in (7, 9):
        raise ValueError(f"ckpt: expected the seven tensors `fwd` saved (W1, c1, W2, c2 checkpoints, Z2, Z2b, "
                         f"X2b X2^T) or nine (and the kept start weights), got {len(ckpt)}")
    keep = len(ckpt) == 9
    kept = ckpt[7:] if keep else (q, q)  # (never read without KEEP)
    F = ckpt[1].shape[-1]
    check(d, mini_batch, q.dtype)
    ns = nsplit_bwd(d)
    rows, heads, groups, sched = _rows_and_sched(rows, B, T, group, q.device, sched, H, ns, programs)
    N = rows.n
    FS = F // ns
    nprog = groups * ns
    dev = q.device
    shapes = ((d, F), (F,), (F, d), (d,))
    # the carried gradients start as those of the final params and end as those of the start params (in place)
    dps = tuple(torch.zeros((N, H, *sh), dtype=torch.float32, device=dev) if g is None
                else g.to(torch.float32).contiguous().clone() for g, sh in zip(dfin, shapes))
    do = torch.zeros_like(q) if do is None else do.contiguous()
    # the walk copies q, k, v, dO in 16-byte pieces (cp.async), which compile only where the launch shows them
    # aligned (pointers at 16 bytes, strides divisible by 16: Triton's specialisation); other layouts are copied first
    if any(t.data_ptr() % 16 for t in (q, k, v, do)) or any(x % 16 for x in rows.strides(q)):
        q, k, v, do = (t.clone(memory_format=torch.contiguous_format) for t in (q, k, v, do))
    # tokens in no row's whole mini-batches get zero gradients (packed rows: documents end anywhere)
    whole = not rows.packed and rows.covered and T % MB == 0
    fill = torch.empty if whole else torch.zeros
    dq, dk, dv = (fill((B, T, H, d), dtype=q.dtype, device=dev) for _ in range(3))
    dlr = fill((B, T, H), dtype=torch.float32, device=dev)
    dtau = torch.empty((heads * ns, MB), dtype=torch.float32, device=dev)
    dlnw = torch.empty((heads, d), dtype=torch.float32, device=dev)
    dlnb = torch.empty((heads, d), dtype=torch.float32, device=dev)
    ng = 0 if keep else group  # (no recompute: no scratch)
    scratch = (torch.empty((nprog, ng, FS, d), dtype=q.dtype, device=dev),  # W1s^T, W2s of a group's mini-batches
               torch.empty((nprog, ng, FS, d), dtype=q.dtype, device=dev),
               torch.empty((nprog, ng, FS), dtype=torch.float32, device=dev))  # c1s
    rec = 3 * d * MB + MB
    xb = torch.empty((heads, 3, ns, rec) if ns > 1 else (1,), dtype=torch.float32, device=dev)
    cnt = torch.zeros((heads,), dtype=torch.int32, device=dev)
    launch = dict(launch_cooperative_grid=True) if ns > 1 else {}
    ttt_mlp_smem_bwd_kernel[(nprog,)](
        q, k, v, lr, tau, ln_weight, ln_bias, *ckpt[:7], *kept, do, *dps, dq, dk, dv, dlr, dtau, dlnw, dlnb, *scratch,
        xb, cnt, rows.span, cnt if sched is None else sched, *rows.strides(q), *rows.strides(lr), *rows.strides(dq),
        0 if rows.packed else T * H, H, heads, groups,
        D=d, FF=F, NSPLIT=ns, GROUP=group, KEEP=keep, SCHED=sched is not None, EPS=LN_EPS, num_warps=num_warps or 8,
        **launch)
    return (dq, dk, dv, dlr, dtau.sum(0), dlnw.view(N, H, d).sum(0), dlnb.view(N, H, d).sum(0), dps)
