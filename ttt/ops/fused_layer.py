"""Triton kernels for the work around the TTT op, so a TTT layer costs little more than its GEMMs and the op.

    q, k, win = conv_rope(u, win, wq, bq, wk, bk, pos, mini_batch=16, head_dim=64, rope_base=1e4)
    y, win = causal_conv(x, win, w, b)                    # one depthwise causal conv (the (M) block's pre-conv)
    window_push_(win, x_t)                                # one token x_t [B, 1, D]: win's next window, in place
    q, k, wins = conv_rope(u, wins, ..., pos, ..., cu_seqlens=cu)  # packed documents (docs/packed.md)

conv_rope: u [B, T, D] (any row stride, last dim contiguous); win [B, W-1, D] the conv window (the last W-1
inputs before u; zeros at a sequence start); wq, wk [D, 1, W], bq, bk [D]. Two depthwise causal convs of the
same input (the (M) layer's conv_q and conv_k), then RoPE at position (pos + t) mod mini_batch rotating adjacent
pairs (2i, 2i+1) of every head by angle p * base^(-2i/head_dim). Returns q, k [B, T, D] contiguous in u's dtype
and the new window. The conv sums and the rotation run in fp32 with one rounding at the end (the PyTorch layer
path rounds after the conv too). The references are `layers/conv.py` (shifted products) and
`layers/attention.apply_rope`; tests/test_fused_layer.py compares them on outputs and every gradient.

Packed documents (`cu_seqlens=`, int64 [N + 1] or a `ttt.ops.packed.Packing`; both functions): u [1, T, D] holds N
documents, win [N, W-1, D] one window row per document (None: zeros) and pos an int or one start position per
document. Each document is computed alone, as `layers/conv.CausalConv1d`'s packed path defines it: a tap never
reaches across a boundary (a document's first W-1 rows read its own window row), RoPE at (start + position in the
document) mod mini_batch; the new windows [N, W-1, D] are gathered in PyTorch (`packed.packed_windows`). The
kernels take every row's position (and document, with a window) as int32 [T] under a constexpr PACKED, so the
unpacked specialisation compiles to the same code as without it; RoPE's once-per-program angles (PERIODIC) do not
apply to packed rows. The window's gradient is summed in PyTorch from the output gradient of every document's first
W-1 rows, which the backward kernel writes out (`_window_grads`).

The post-LayerNorm x GELU gate after the op stays in PyTorch in the layer (`TTTLayer._out`: under torch.compile
Inductor fuses its forward into one kernel, its backward into two; one-pass kernels lost to it twice,
docs/kernels_notes.md). Each kernel above is a torch.library custom op with a fake implementation and an autograd
formula (hand-written Triton backward kernels), so torch.compile traces through them. Weight gradients are reduced
per program into fp32 partial sums and summed in PyTorch.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import LN_EPS, RowsState, TTTState
from .triton_utils import _ln_l2_grad_vec, _normalize_vec, cdiv, pow2, sm_count


def _sms(device) -> int:
    """The SM count of a CUDA device (programs per launch are sized by it); 2 elsewhere (Triton's interpreter)."""
    return sm_count(device) or 2


def _pick(n: int, cap: int) -> int:
    return max(8, min(cap, pow2(n)))


# ---------------------------------------------------------------- causal conv (+ RoPE)
# A program owns a block of BC channels of one sequence and walks a segment of SEG rows of time one row at a time;
# each thread owns whole RoPE pairs of channels (2i, 2i+1) (one at the default launch: 64 channels on one warp).
# A row is loaded (and in the backward un-rotated) once and kept in registers for the next W - 1 rows that read
# it, the tap weights and RoPE's angles (which depend only on the channels and the position mod b) are set up once
# per program, the weight gradients are summed per thread over the whole segment, and nothing crosses threads.
# The loads of R rows are issued together, so that enough bytes are in flight. (Earlier designs: stride-2 tiles of
# even and odd channels, one 8-row tile per program recomputing cos/sin per tap, then [16, 32] tiles walked along
# the segment, which re-read each tap's rows and re-rotated them in the backward: docs/kernels_notes.md.)
@triton.jit
def _taps(w_ptr, cols, cmask, W: tl.constexpr):
    """The W taps of the depthwise weights [D, 1, W] for the channels cols: a tuple of fp32 [BC]."""
    out = ()
    for j in tl.static_range(W):
        out = out + (tl.load(w_ptr + cols * W + j, mask=cmask, other=0.0).to(tl.float32),)
    return out


@triton.jit
def _rot(y, c, s):
    """The pairs (2i, 2i+1) of y [..., BC] rotated by the angles whose cos and sin [..., BC/2] are given."""
    shape: tl.constexpr = y.shape
    ye, yo = tl.split(tl.reshape(y, shape[:-1] + [shape[-1] // 2, 2]))  # [..., BC] -> [..., BC/2] even, odd channels
    return tl.reshape(tl.join(ye * c - yo * s, ye * s + yo * c), shape)  # [..., BC/2, 2] -> [..., BC]


@triton.jit
def _row_angles(p, inv):
    """cos and sin [BC/2] of RoPE's angles p * inv for one integer position p."""
    ang = inv * p  # (p: an int32 scalar or a constant)
    return tl.cos(ang), tl.sin(ang)


@triton.jit
def _angle_table(first, inv, N: tl.constexpr, MB: tl.constexpr):
    """cos and sin of the positions (first + r) mod MB, r < N: two tuples of N [BC/2] (computed once per program)."""
    cs = ()
    sn = ()
    for r in tl.static_range(N):
        c, s = _row_angles((first + r) % MB, inv)
        cs = cs + (c,)
        sn = sn + (s,)
    return cs, sn


@triton.jit
def _rope_tables(cols, pos0, log2_base, ROPE: tl.constexpr, PERIODIC: tl.constexpr, TAB: tl.constexpr,
                 MB: tl.constexpr, HD: tl.constexpr, BODY: tl.constexpr, BC: tl.constexpr):
    """A row-walking program's RoPE setup for its channels cols [BC]: the inverse frequencies inv [BC/2] of its
    pairs and the angle tables `_rope_at` reads (PERIODIC: the BODY rows of a loop iteration from pos0; TAB: every
    position; else none)."""
    inv, _ = tl.split(tl.reshape(tl.exp2(-(2.0 * ((cols % HD) // 2).to(tl.float32) / HD) * log2_base), [BC // 2, 2]))
    cs, sn = (), ()
    if ROPE and PERIODIC:
        cs, sn = _angle_table(pos0, inv, BODY, MB)
    elif TAB:
        cs, sn = _angle_table(0, inv, MB, MB)
    return inv, cs, sn


@triton.jit
def _rope_at(p, r: tl.constexpr, inv, cs, sn, PERIODIC: tl.constexpr, TAB: tl.constexpr, MB: tl.constexpr):
    """cos and sin [BC/2] of one row's angles: PERIODIC, entry r of the program's table (`_angle_table` from pos0);
    else at the position p in [0, MB) (a runtime value), picked from the table of every position (TAB: MB - 1
    selects, against ~80 instructions for sin and cos at full accuracy) or computed."""
    if PERIODIC:
        c, s = cs[r], sn[r]
    elif TAB:
        c, s = cs[0], sn[0]
        for k in tl.static_range(1, MB):
            c = tl.where(p == k, cs[k], c)
            s = tl.where(p == k, sn[k], s)
    else:
        c, s = _row_angles(p, inv)
    return c, s


@triton.jit
def _rmask(cmask, ok):
    """cmask [BC] where the row condition ok (a scalar) holds, else all false (a select: Triton's interpreter
    types a tensor & scalar of booleans int32)."""
    return tl.where(ok, cmask, False)


@triton.jit
def _shift_in(h, x, W: tl.constexpr):
    """The history of the last W - 1 rows (newest first) with x in front and the oldest dropped."""
    out = (x,)
    for k in tl.static_range(W - 2):
        out = out + (h[k],)
    return out


@triton.jit
def _xs_row(x_ptr, s_ptr, u, cols, cmask, x_off, s_off, x_st, s_st, T, W: tl.constexpr, HAS_STATE: tl.constexpr):
    """Row u of xs = cat(window, x) along time, [BC] in the input dtype: x row u - (W-1), or (HAS_STATE) window row u
    for u < W - 1 (zeros without one, and past the end)."""
    xs = tl.load(x_ptr + x_off + (u - (W - 1)) * x_st + cols, mask=_rmask(cmask, (u >= W - 1) & (u < T + W - 1)),
                 other=0.0)
    if HAS_STATE:
        xs += tl.load(s_ptr + s_off + u * s_st + cols, mask=_rmask(cmask, u < W - 1), other=0.0)
    return xs


@triton.jit
def _g_row(dy_ptr, y_off, t, cols, cmask, T, D, c, s, ROPE: tl.constexpr):
    """The un-rotated output gradient at row t, fp32 [BC] (zero outside [0, T))."""
    g = tl.load(dy_ptr + y_off + t * D + cols, mask=_rmask(cmask, (t >= 0) & (t < T)), other=0.0).to(tl.float32)
    if ROPE:
        g = _rot(g, c, -s)
    return g


@triton.jit
def _conv_bwd_kernel(
    x_ptr, s_ptr, wa_ptr, wb_ptr, dya_ptr, dyb_ptr, dx_ptr, ds_ptr, dw_ptr,
    tok_ptr, doc_ptr, gwa_ptr, gwb_ptr,
    T, D, SEG, x_sb, x_st, s_sb, s_st, pos0, log2_base,
    W: tl.constexpr, TWO: tl.constexpr, ROPE: tl.constexpr, HAS_STATE: tl.constexpr, PERIODIC: tl.constexpr,
    MB: tl.constexpr, HD: tl.constexpr, R: tl.constexpr, BODY: tl.constexpr, BC: tl.constexpr,
    PACKED: tl.constexpr = False,
):
    # program: a channel block, a batch, a segment of SEG rows u of xs = cat(window, x), walked one row u at a time:
    # g[u] is loaded and un-rotated once and kept for the next W - 1 rows (ha, hb: g[u - 1], ..., g[u - W + 1]), the
    # segment's first rows start from the W - 1 rows before it.
    # The loop takes BODY rows (SEG % BODY == 0) in groups of R, each group's loads issued together. PERIODIC
    # (BODY % MB == 0, so SEG % MB == 0): row u0 + i has the RoPE position (pos0 + i) mod MB and the BODY angles are
    # computed once per program; else picked per row from every position's (TAB: MB <= 16) or computed.
    pc, b = tl.program_id(0), tl.program_id(1)
    lo = tl.program_id(2) * SEG
    hi = tl.minimum(lo + SEG, T + W - 1)
    cols = pc * BC + tl.arange(0, BC)
    cmask = cols < D
    x_off, s_off, y_off = b * x_sb, b * s_sb, b * T * D
    wa = _taps(wa_ptr, cols, cmask, W)
    wb = _taps(wb_ptr, cols, cmask, W)  # wb_ptr = wa_ptr without a second conv
    TAB: tl.constexpr = ROPE and not PERIODIC and MB <= 16  # every position's angles, picked per row
    inv, cs, sn = _rope_tables(cols, pos0, log2_base, ROPE, PERIODIC, TAB, MB, HD, BODY, BC)
    XS_STATE: tl.constexpr = HAS_STATE and not PACKED  # packed: xs has no window rows (gw takes their part)
    # the W - 1 rows before the segment (positions kept for packed documents' masks)
    ha = ()
    hb = ()
    hp = ()
    for k in tl.static_range(1, W):
        t = lo - k
        c = inv
        s = inv
        p = t
        if PACKED:
            tk = tl.load(tok_ptr + t, mask=(t >= 0) & (t < T), other=0)
            p = tk // MB
            if ROPE:
                c, s = _rope_at(tk % MB, 0, inv, cs, sn, False, TAB, MB)
        elif ROPE:  # (PERIODIC: position (pos0 - k) mod MB, entry -k mod BODY)
            c, s = _rope_at((pos0 + t + MB * W) % MB, (BODY - k % BODY) % BODY, inv, cs, sn, PERIODIC, TAB, MB)
        ha = ha + (_g_row(dya_ptr, y_off, t, cols, cmask, T, D, c, s, ROPE),)
        if TWO:
            hb = hb + (_g_row(dyb_ptr, y_off, t, cols, cmask, T, D, c, s, ROPE),)
        hp = hp + (p,)
    dwa = ()
    dwb = ()
    for j in tl.static_range(W):
        dwa = dwa + (tl.zeros([BC], dtype=tl.float32),)
        dwb = dwb + (tl.zeros([BC], dtype=tl.float32),)
    dba = tl.zeros([BC], dtype=tl.float32)
    dbb = tl.zeros([BC], dtype=tl.float32)
    for u0 in range(lo, hi, BODY):
        for gi in tl.static_range(BODY // R):  # a group's loads first (R rows in flight), then its rows one by one
            ra = ()
            rb = ()
            rx = ()
            for r in tl.static_range(R):
                u = u0 + gi * R + r
                ym = _rmask(cmask, u < T)
                ra = ra + (tl.load(dya_ptr + y_off + u * D + cols, mask=ym, other=0.0),)
                if TWO:
                    rb = rb + (tl.load(dyb_ptr + y_off + u * D + cols, mask=ym, other=0.0),)
                rx = rx + (_xs_row(x_ptr, s_ptr, u, cols, cmask, x_off, s_off, x_st, s_st, T, W, XS_STATE),)
            for r in tl.static_range(R):
                u = u0 + gi * R + r
                c = inv
                s = inv
                p = u
                if PACKED:
                    tk = tl.load(tok_ptr + u, mask=u < T, other=0)
                    p = tk // MB
                    if ROPE:
                        c, s = _rope_at(tk % MB, 0, inv, cs, sn, False, TAB, MB)
                elif ROPE:
                    c, s = _rope_at((pos0 + u) % MB, gi * R + r, inv, cs, sn, PERIODIC, TAB, MB)
                ga = ra[r].to(tl.float32)
                if ROPE:
                    ga = _rot(ga, c, -s)
                dba += ga  # the bias takes every row
                if TWO:
                    gb = rb[r].to(tl.float32)
                    if ROPE:
                        gb = _rot(gb, c, -s)
                    dbb += gb
                if PACKED and HAS_STATE:  # every document's first W - 1 rows: their g by (document, position)
                    wm = (p < W - 1) & (u < T)
                    dc = tl.load(doc_ptr + u, mask=wm, other=0)
                    g_off = (dc * (W - 1) + p) * D + cols
                    tl.store(gwa_ptr + g_off, ga, mask=_rmask(cmask, wm))
                    if TWO:
                        tl.store(gwb_ptr + g_off, gb, mask=_rmask(cmask, wm))
                xs = rx[r].to(tl.float32)
                gx = tl.zeros([BC], dtype=tl.float32)
                ndwa = ()
                ndwb = ()
                for j in tl.static_range(W):  # tap j: g[u - j] (xs row u feeds output row u - j)
                    if j == 0:
                        tga, tp = ga, p
                        if TWO:
                            tgb = gb
                    else:
                        tga, tp = ha[j - 1], hp[j - 1]
                        if TWO:
                            tgb = hb[j - 1]
                    if PACKED:  # only where output row u - j is in x row u - (W-1)'s document
                        same = tp >= W - 1 - j
                        tga = tl.where(same, tga, 0.0)
                        if TWO:
                            tgb = tl.where(same, tgb, 0.0)
                    gx += tga * wa[j]
                    ndwa = ndwa + (dwa[j] + tga * xs,)
                    if TWO:
                        gx += tgb * wb[j]
                        ndwb = ndwb + (dwb[j] + tgb * xs,)
                    else:
                        ndwb = ndwb + (dwb[j],)
                dwa = ndwa
                dwb = ndwb
                ha = _shift_in(ha, ga, W)
                if TWO:
                    hb = _shift_in(hb, gb, W)
                hp = _shift_in(hp, p, W)
                rr = u - (W - 1)  # the x row of xs row u
                tl.store(dx_ptr + y_off + rr * D + cols, gx.to(dx_ptr.dtype.element_ty), mask=_rmask(cmask, (rr >= 0) & (rr < T)))
                if XS_STATE:
                    tl.store(ds_ptr + b * (W - 1) * D + u * D + cols, gx.to(ds_ptr.dtype.element_ty),
                             mask=_rmask(cmask, rr < 0))
    # this program's row of the partial sums: [taps of conv a (channel-major) | its bias | the same of conv b]
    NC: tl.constexpr = 2 if TWO else 1
    row = dw_ptr + (b * tl.num_programs(2) + tl.program_id(2)) * (NC * D * (W + 1))
    tl.store(row + D * W + cols, dba, mask=cmask)
    for j in tl.static_range(W):
        tl.store(row + cols * W + j, dwa[j], mask=cmask)
    if TWO:
        tl.store(row + D * (2 * W + 1) + cols, dbb, mask=cmask)
        for j in tl.static_range(W):
            tl.store(row + D * (W + 1) + cols * W + j, dwb[j], mask=cmask)


@triton.jit
def _conv_fwd_kernel(
    x_ptr, s_ptr, wa_ptr, ba_ptr, wb_ptr, bb_ptr, ya_ptr, yb_ptr, tok_ptr, doc_ptr,
    T, D, SEG, x_sb, x_st, s_sb, s_st, pos0, log2_base,
    W: tl.constexpr, TWO: tl.constexpr, ROPE: tl.constexpr, HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr,
    PERIODIC: tl.constexpr, MB: tl.constexpr, HD: tl.constexpr, R: tl.constexpr, BODY: tl.constexpr,
    BC: tl.constexpr, PACKED: tl.constexpr = False,
):
    # program: a channel block, a batch, a segment of SEG output rows t, walked one row at a time: xs row t + W - 1
    # (= x row t) is loaded once and kept for the next W - 1 rows (hx: xs rows t + W - 2, ..., t); BODY rows per
    # loop in groups of R, and RoPE's angles, as in `_conv_bwd_kernel`.
    # PACKED: a tap reaching before the document's first row reads the document's window row (or zero).
    pc, b = tl.program_id(0), tl.program_id(1)
    lo = tl.program_id(2) * SEG
    hi = tl.minimum(lo + SEG, T)
    cols = pc * BC + tl.arange(0, BC)
    cmask = cols < D
    x_off, s_off, y_off = b * x_sb, b * s_sb, b * T * D
    wa = _taps(wa_ptr, cols, cmask, W)
    wb = _taps(wb_ptr, cols, cmask, W)  # wb_ptr = wa_ptr without a second conv
    if HAS_BIAS:
        bias_a = tl.load(ba_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        bias_b = tl.load(bb_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        bias_a = tl.zeros([BC], dtype=tl.float32)
        bias_b = bias_a
    TAB: tl.constexpr = ROPE and not PERIODIC and MB <= 16  # every position's angles, picked per row
    inv, cs, sn = _rope_tables(cols, pos0, log2_base, ROPE, PERIODIC, TAB, MB, HD, BODY, BC)
    XS_STATE: tl.constexpr = HAS_STATE and not PACKED
    # xs rows lo, ..., lo + W - 2 (x rows lo - W + 1, ..., lo - 1; unpacked, window rows before x), newest first
    hx = ()
    for k in tl.static_range(1, W):
        u = lo + W - 1 - k
        hx = hx + (_xs_row(x_ptr, s_ptr, u, cols, cmask, x_off, s_off, x_st, s_st, T, W, XS_STATE).to(tl.float32),)
    for t0 in range(lo, hi, BODY):
        for gi in tl.static_range(BODY // R):
            rx = ()
            for r in tl.static_range(R):  # the group's x rows first (R rows in flight)
                t = t0 + gi * R + r
                rx = rx + (tl.load(x_ptr + x_off + t * x_st + cols, mask=_rmask(cmask, t < T), other=0.0),)
            for r in tl.static_range(R):
                t = t0 + gi * R + r
                xn = rx[r].to(tl.float32)
                c = inv
                s = inv
                if PACKED:
                    tk = tl.load(tok_ptr + t, mask=t < T, other=0)
                    p = tk // MB
                    if HAS_STATE:
                        dc = tl.load(doc_ptr + t, mask=t < T, other=0)
                    if ROPE:
                        c, s = _rope_at(tk % MB, 0, inv, cs, sn, False, TAB, MB)
                elif ROPE:
                    c, s = _rope_at((pos0 + t) % MB, gi * R + r, inv, cs, sn, PERIODIC, TAB, MB)
                ya = bias_a
                yb = bias_b
                for j in tl.static_range(W):  # tap j reads xs row t + j: x row t + j - (W - 1)
                    if j == W - 1:
                        xv = xn
                    else:
                        xv = hx[W - 2 - j]
                    if PACKED:  # before the document's first row: its window row p + j, or zero
                        if j < W - 1:
                            xv = tl.where(p >= W - 1 - j, xv, 0.0)
                            if HAS_STATE:
                                xv += tl.load(s_ptr + (dc * s_sb + (p + j) * s_st) + cols,
                                              mask=_rmask(cmask, (p < W - 1 - j) & (t < T)), other=0.0).to(tl.float32)
                    ya += xv * wa[j]
                    if TWO:
                        yb += xv * wb[j]
                hx = _shift_in(hx, xn, W)
                if ROPE:
                    ya = _rot(ya, c, s)
                    if TWO:
                        yb = _rot(yb, c, s)
                ym = _rmask(cmask, t < T)
                tl.store(ya_ptr + y_off + t * D + cols, ya.to(ya_ptr.dtype.element_ty), mask=ym)
                if TWO:
                    tl.store(yb_ptr + y_off + t * D + cols, yb.to(yb_ptr.dtype.element_ty), mask=ym)


@dataclass(frozen=True)
class ConvLaunch:
    """How a conv kernel is launched: R rows loaded at once (a power of two), BC channels per program (even, so
    that RoPE's pairs stay in one program), `warps`, and `programs`, the programs resident at once (the time axis is
    cut into segments, each walked by one program, bound by latency: `_segments` picks their number; a segment is
    a multiple of 16 rows and of the loop's rows)."""

    R: int
    BC: int
    warps: int
    programs: int

    def grid(self, rows: int, D: int, B: int, mini_batch: int, packed: bool = False):
        """(grid, SEG rows per segment, PERIODIC) for `rows` rows of D channels in B sequences (or packed
        documents, whose positions are per row: PERIODIC is for unpacked rows only)."""
        npc = cdiv(D, self.BC)
        body = self.body(mini_batch, packed)
        step = math.lcm(body, 16)  # SEG a multiple of the loop's rows and of 16 (Triton's divisibility hint)
        seg = cdiv(cdiv(rows, _segments(rows, npc * B, self.programs, step)), step) * step
        return (npc, B, cdiv(rows, seg)), seg, body % mini_batch == 0

    def body(self, mini_batch: int, packed: bool = False) -> int:
        """The kernels' rows per loop iteration: for unpacked rows a multiple of R and of b if that is at most 16
        rows (or R), so that the positions mod b repeat every iteration (PERIODIC), else R. (Packed rows take R: a
        longer body only lengthens the code and, offline, its registers: 255 against 167 for the backward with
        RoPE at 16 rows of 8.)"""
        m = math.lcm(self.R, mini_batch)
        return m if m <= max(self.R, 16) and not packed else self.R


@functools.lru_cache(maxsize=256)
def _segments(rows: int, columns: int, programs: int, BT: int) -> int:
    """How many segments to cut `rows` into for `columns` (channel block, sequence) pairs on `programs` resident
    programs: the fewest whose waves x tiles per segment is within 10% of the least (a latency-bound program walks
    its tiles at the same pace however full the wave is, so a partial last wave costs a whole one; more, shorter
    segments add per-program work that this count leaves out), up to four waves' worth. 125m B4 T8k D 768 (96 pairs,
    396 programs): 4 segments, one wave of 129 tiles (cutting as many as 396 programs would need, 5, is 1.2 waves
    of 103: 206); 1.3b D 2048 at B4: 3 (2 waves of 171) instead of 1 (513) or 2 (2 waves of 257)."""
    tiles = cdiv(rows, BT)
    cost = [cdiv(columns * n, programs) * cdiv(tiles, n) for n in range(1, min(tiles, 4 * cdiv(programs, columns)) + 1)]
    return next(n for n, c in enumerate(cost, 1) if c <= 1.1 * min(cost))


# the conv kernels' default launch (1 warp, 64 channels) by (kernel, two convs and RoPE, packed): (R rows
# loaded at once, programs per SM). Programs per SM: the residency at that launch (16 rows per loop unpacked, R packed;
# at most 32 programs per SM), compiled with the divisibility hints of a D that is a multiple of 16 (without them up to
# 40 registers more), the most registers of Triton 3.6 and 3.9: forward 123 / 118 unpacked / packed, one conv 64 / 64;
# backward at R 16 228 (3.9: 220), packed at R 8 168 (3.6: 167), one conv 110 / 72. R: on the H200 (125m B4 T8k / B16
# T2k) the backward with RoPE took 0.101 / 0.098 ms at R 16 (8 per SM) against 0.146 / 0.109 at R 8 (12 per SM) and
# 0.144 / 0.141 for the [16, 32] tiles the kernels walked before; the others are fastest at R 8
# (docs/kernels_notes.md). tests/test_offline_compile.py checks the residency with the installed Triton.
ROWS = {("fwd", True, False): (8, 16), ("fwd", True, True): (8, 17), ("fwd", False, False): (8, 32),
        ("fwd", False, True): (8, 32), ("bwd", True, False): (16, 8), ("bwd", True, True): (8, 12),
        ("bwd", False, False): (8, 18), ("bwd", False, True): (8, 28)}


def conv_launch(D: int, device: torch.device, kernel: str = "bwd", two: bool = True, packed: bool = False) -> ConvLaunch:
    """The default launch of the forward or backward kernel (`kernel`) with two convs and RoPE or one (`two`):
    one warp per 64 channels, R rows loaded at once and the grid sized by `ROWS` (packed: documents)."""
    R, per_sm = ROWS[(kernel, two, packed)]
    return ConvLaunch(R=R, BC=_pick(D, 64), warps=1, programs=per_sm * _sms(device))


def _conv_fwd(x, win, wa, ba, wb, bb, pos0: int, mini_batch: int, head_dim: int, rope_base: float, rope: bool,
              launch: ConvLaunch | None = None, tok=None, doc=None):
    """The forward kernel's launch. Packed documents (B = 1): tok, doc int32 [T] (`_packed_rows`; doc only with a
    window, whose rows are the documents'), pos0 unused (tok carries the RoPE positions)."""
    B, T, D = x.shape
    W = wa.shape[-1]
    L = launch or conv_launch(D, x.device, "fwd", wb is not None, tok is not None)
    packed = tok is not None
    grid, seg, periodic = L.grid(T, D, B, mini_batch, packed)
    if wb is not None and (ba is None) != (bb is None):  # one bias flag for both convs
        ba, bb = (torch.zeros_like(wa[:, 0, 0]) if ba is None else ba), (torch.zeros_like(wb[:, 0, 0]) if bb is None else bb)
    ya = torch.empty((B, T, D), dtype=x.dtype, device=x.device)
    yb = torch.empty_like(ya) if wb is not None else ya
    st = win if win is not None else x
    _conv_fwd_kernel[grid](
        x, st, wa, ba if ba is not None else wa, wb if wb is not None else wa, bb if bb is not None else wa, ya, yb,
        tok if packed else x, doc if doc is not None else x,
        T, D, seg, x.stride(0), x.stride(1), st.stride(0), st.stride(1), pos0 % mini_batch, math.log2(rope_base),
        W=W, TWO=wb is not None, ROPE=rope, HAS_STATE=win is not None, HAS_BIAS=ba is not None,
        PERIODIC=periodic and not packed, MB=mini_batch, HD=head_dim, R=L.R, BODY=L.body(mini_batch, packed), BC=L.BC,
        PACKED=packed, num_warps=L.warps)
    return ya, yb


def _window_grads(gw, win, w):
    """Packed documents with a window: the window's gradient [N, W-1, D] and the weights' share of it [D, W] (fp32)
    from gw [N, W-1, D], the un-rotated output gradient at every document's first W - 1 rows (zero past its end),
    which tap j reads from window row p + j at the positions p < W - 1 - j."""
    n = w.shape[-1] - 1
    wf, sf = w[:, 0].float(), win.float()
    ds, dw = torch.zeros_like(gw), torch.zeros_like(wf)
    for j in range(n):
        g = gw[:, :n - j]  # [N, n - j, D]: the positions that read window rows j ..
        ds[:, j:] += g * wf[:, j]
        dw[:, j] = (g * sf[:, j:]).sum((0, 1))
    return ds, dw


def _conv_bwd_parts(x, win, wa, wb, dya, dyb, pos0: int, mini_batch: int, head_dim: int, rope_base: float,
                    rope: bool, launch: ConvLaunch | None = None, tok=None, doc=None):
    """The backward kernel's launch: [dx, ds, dw, gwa, gwb]: dw the weight gradients as the kernel's per-program
    partial sums, fp32 [P, convs * D * (W + 1)] (a row: conv a's taps [D, W], its bias [D], then conv b's), ds the
    window's gradient (None without a window or with packed documents), gwa / gwb the un-rotated output gradients
    at every document's first W - 1 rows (packed documents with a window, else None; `_window_grads`).
    `_conv_bwd_sums` finishes them (one reduction for every weight and bias); the custom op returns the parts so
    that these sums are traced (compiled: fused with the casts)."""
    B, T, D = x.shape
    W = wa.shape[-1]
    two, packed = wb is not None, tok is not None
    L = launch or conv_launch(D, x.device, "bwd", two, packed)
    grid, seg, periodic = L.grid(T + W - 1, D, B, mini_batch, packed)
    P = B * grid[2]  # rows of the weight-gradient partial sums
    dx = torch.empty((B, T, D), dtype=x.dtype, device=x.device)
    ds = torch.empty((B, W - 1, D), dtype=win.dtype, device=x.device) if win is not None and not packed else None
    f32 = dict(dtype=torch.float32, device=x.device)
    dw = torch.empty((P, (2 if two else 1) * D * (W + 1)), **f32)
    gwa = gwb = None
    if packed and win is not None:  # written at each document's first W - 1 rows only: zeros past its end
        gwa = torch.zeros((win.shape[0], W - 1, D), **f32)
        gwb = torch.zeros_like(gwa) if two else None
    st = win if win is not None else x
    dya = dya.contiguous()
    dyb = dyb.contiguous() if two else dya
    _conv_bwd_kernel[grid](
        x, st, wa, wb if two else wa, dya, dyb, dx, dx if ds is None else ds, dw, tok if packed else x,
        doc if doc is not None else x, dw if gwa is None else gwa, dw if gwb is None else gwb,
        T, D, seg, x.stride(0), x.stride(1), st.stride(0), st.stride(1), pos0 % mini_batch, math.log2(rope_base),
        W=W, TWO=two, ROPE=rope, HAS_STATE=win is not None, PERIODIC=periodic and not packed, MB=mini_batch,
        HD=head_dim, R=L.R, BODY=L.body(mini_batch, packed), BC=L.BC, PACKED=packed, num_warps=L.warps)
    return [dx, ds, dw, gwa, gwb]


def _conv_bwd_sums(parts, win, wa, wb, packed: bool):
    """[dx, dwin or None, dwa [D, 1, W], dba [D] (, dwb, dbb)] (weights' gradients fp32) from `_conv_bwd_parts` of
    the same call (win, wb, packed as there; the parts it leaves out are never read)."""
    dx, ds, dw, gwa, gwb = parts
    D, W = wa.shape[0], wa.shape[-1]
    dw = dw.sum(0)  # [convs * D * (W + 1)]: one reduction
    dwa, dba = dw[:D * W].view(D, W), dw[D * W:D * (W + 1)]
    dwb, dbb = (dw[D * (W + 1):D * (2 * W + 1)].view(D, W), dw[D * (2 * W + 1):]) if wb is not None else (None, None)
    if packed and win is not None:
        ds, dw_win = _window_grads(gwa, win, wa)
        dwa = dwa + dw_win
        if wb is not None:
            ds_b, dw_win = _window_grads(gwb, win, wb)
            ds, dwb = ds + ds_b, dwb + dw_win
        ds = ds.to(win.dtype)
    grads = [dx, ds if win is not None else None, dwa.unsqueeze(1), dba]
    return grads + [dwb.unsqueeze(1), dbb] if wb is not None else grads


def _conv_bwd(x, win, wa, wb, dya, dyb, pos0: int, mini_batch: int, head_dim: int, rope_base: float, rope: bool,
              launch: ConvLaunch | None = None, tok=None, doc=None):
    """The backward: [dx, dwin or None, dwa, dba (, dwb, dbb)]; packed documents as in `_conv_fwd`."""
    return _conv_bwd_sums(_conv_bwd_parts(x, win, wa, wb, dya, dyb, pos0, mini_batch, head_dim, rope_base, rope,
                                          launch, tok, doc), win, wa, wb, tok is not None)


# The custom ops take the conv window, the biases and the packed rows (tok, doc) as optional tensors and the RoPE
# settings as plain numbers.
@torch.library.custom_op("ttt::conv_rope_fwd", mutates_args=())
def _conv_rope_fwd_op(x: torch.Tensor, win: torch.Tensor | None, wa: torch.Tensor, ba: torch.Tensor | None,
                      wb: torch.Tensor | None, bb: torch.Tensor | None, pos0: int, mini_batch: int, head_dim: int,
                      rope_base: float, rope: bool, tok: torch.Tensor | None,
                      doc: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    ya, yb = _conv_fwd(x, win, wa, ba, wb, bb, pos0, mini_batch, head_dim, rope_base, rope, tok=tok, doc=doc)
    return ya, (yb if wb is not None else ya.new_empty(0))


@_conv_rope_fwd_op.register_fake
def _(x, win, wa, ba, wb, bb, pos0, mini_batch, head_dim, rope_base, rope, tok, doc):
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return y, (torch.empty_like(y) if wb is not None else x.new_empty(0))


@torch.library.custom_op("ttt::conv_rope_bwd", mutates_args=())
def _conv_rope_bwd_op(x: torch.Tensor, win: torch.Tensor | None, wa: torch.Tensor, wb: torch.Tensor | None,
                      dya: torch.Tensor, dyb: torch.Tensor | None, pos0: int, mini_batch: int, head_dim: int,
                      rope_base: float, rope: bool, tok: torch.Tensor | None,
                      doc: torch.Tensor | None) -> list[torch.Tensor]:
    parts = _conv_bwd_parts(x, win, wa, wb, dya, dyb, pos0, mini_batch, head_dim, rope_base, rope, tok=tok, doc=doc)
    return [t if t is not None else x.new_empty(0) for t in parts]


@_conv_rope_bwd_op.register_fake
def _(x, win, wa, wb, dya, dyb, pos0, mini_batch, head_dim, rope_base, rope, tok, doc):
    # symbolic lengths (torch.compile's dynamic mode) are specialised here: the launch's segment count, which sizes
    # the partial sums, is a search over ints (a data-dependent size instead made Dynamo break the graph at the op)
    B, T, D, W = (int(n) for n in (*x.shape, wa.shape[-1]))
    packed = tok is not None
    P = B * conv_launch(D, x.device, "bwd", wb is not None, packed).grid(T + W - 1, D, B, mini_batch, packed)[0][2]
    f32 = dict(dtype=torch.float32, device=x.device)
    part = lambda *shape: torch.empty(shape, **f32)  # noqa: E731
    gw = [part(win.shape[0], W - 1, D) if packed and win is not None and (i == 0 or wb is not None)
          else x.new_empty(0) for i in range(2)]  # distinct tensors: an output repeated would be taken as an alias
    return [torch.empty_like(x), torch.empty_like(win) if win is not None and not packed else x.new_empty(0),
            part(P, (2 if wb is not None else 1) * D * (W + 1)), *gw]


def _conv_setup(ctx, inputs, output):
    x, win, wa, ba, wb, bb, pos0, mini_batch, head_dim, rope_base, rope, tok, doc = inputs
    ctx.save_for_backward(x, win, wa, wb, tok, doc)
    ctx.meta = (ba is not None, bb is not None, pos0, mini_batch, head_dim, rope_base, rope)


def _conv_backward(ctx, dya, dyb):
    x, win, wa, wb, tok, doc = ctx.saved_tensors
    has_ba, has_bb, pos0, mini_batch, head_dim, rope_base, rope = ctx.meta
    dya = torch.zeros_like(x) if dya is None else dya
    if wb is not None:
        dyb = torch.zeros_like(x) if dyb is None or dyb.numel() == 0 else dyb
    else:
        dyb = None
    parts = _conv_rope_bwd_op(x, win, wa, wb, dya, dyb, pos0, mini_batch, head_dim, rope_base, rope, tok, doc)
    g = _conv_bwd_sums(parts, win, wa, wb, tok is not None)
    dx, dwin, dwa, dba = g[:4]
    dwb, dbb = (g[4], g[5]) if wb is not None else (None, None)
    return (dx, dwin if win is not None else None, dwa.to(wa.dtype), dba.to(wa.dtype) if has_ba else None,
            None if wb is None else dwb.to(wb.dtype), dbb.to(wb.dtype) if has_bb else None,
            None, None, None, None, None, None, None)


_conv_rope_fwd_op.register_autograd(_conv_backward, setup_context=_conv_setup)


def _new_window(x: torch.Tensor, win: torch.Tensor | None, W: int) -> torch.Tensor:
    """The last W-1 rows of cat(win, x) along time (a copy, so the big x is not kept alive by the state)."""
    B, T, D = x.shape
    if T >= W - 1:
        return x[:, T - (W - 1):].clone()
    prev = win if win is not None else x.new_zeros(B, W - 1, D)
    return torch.cat([prev[:, T:].to(x.dtype), x], dim=1)


def _packed_rows(cu_seqlens, x, win, pos, mini_batch: int):
    """Packed documents: (the `Packing`, tok, doc) for the kernels: tok int32 [T] = every row's position in its
    document * mini_batch + its RoPE position mod mini_batch (the document's start position `pos`, an int or one
    per document, plus that position), doc int32 [T] every row's document (None without a window). Made once
    per packing (and start positions), so the layers of a model share them."""
    from .packed import packing
    B, T, _ = x.shape
    pk = packing(cu_seqlens, T, x.device, batch_size=B, state_rows=None if win is None else win.shape[0])
    if T * mini_batch >= 2 ** 31:
        raise ValueError(f"x: packed documents of T * mini_batch < 2^31 rows for the conv kernels, got T = {T}")
    key = ("fused_layer.tok", mini_batch, pos if isinstance(pos, int) else pk.row_positions(pos))
    tok = pk.memoize(key, lambda: (pk.positions * mini_batch + pk.token_positions(pos) % mini_batch).to(torch.int32))
    doc = None if win is None else pk.memoize("fused_layer.doc", lambda: pk.seq_idx.to(torch.int32))
    return pk, tok, doc


def _packed_new_window(x: torch.Tensor, win: torch.Tensor | None, pk, W: int) -> torch.Tensor:
    """Packed documents: every document's last W-1 inputs [N, W-1, D] (`packed.packed_windows`)."""
    from .packed import packed_windows
    return packed_windows(x[0], None if win is None else win.to(x.dtype), pk, W - 1)


def _check_conv(name, x, w, b):
    if w.dim() != 3 or w.shape[0] != x.shape[-1] or w.shape[1] != 1:
        raise ValueError(f"{name}: expected depthwise weights [{x.shape[-1]}, 1, W], got {tuple(w.shape)}")
    if b is not None and b.shape != (x.shape[-1],):
        raise ValueError(f"{name} bias: expected shape [{x.shape[-1]}], got {tuple(b.shape)}")


def _window_in(x, win):
    """Check x [B, T, D] and give the window in x's dtype, contiguous (None stays None)."""
    if x.dim() != 3 or x.stride(-1) != 1:
        raise ValueError(f"x: expected [B, T, D] with a contiguous last dim, got shape {tuple(x.shape)}")
    return None if win is None else win.to(x.dtype).contiguous()


def conv_rope(x, win, wq, bq, wk, bk, pos, *, mini_batch: int, head_dim: int, rope_base: float = 10000.0,
              cu_seqlens=None):
    """Two depthwise causal convs of x [B, T, D] then RoPE at position mod mini_batch (module docstring).
    Returns (q, k [B, T, D] in x's dtype, new window [B, W-1, D]). With cu_seqlens (int64 [N + 1] or a `Packing`):
    x [1, T, D] holds N packed documents, win [N, W-1, D] or None, pos an int or one per document; the new
    window [N, W-1, D]."""
    win_c = _window_in(x, win)
    if x.shape[-1] % 2 or head_dim % 2 or x.shape[-1] % head_dim:
        raise ValueError(f"head_dim: expected an even divisor of D = {x.shape[-1]}, got {head_dim}")
    _check_conv("wq", x, wq, bq)
    _check_conv("wk", x, wk, bk)
    args = (int(mini_batch), int(head_dim), float(rope_base), True)
    if cu_seqlens is None:
        q, k = _conv_rope_fwd_op(x, win_c, wq, bq, wk, bk, int(pos), *args, None, None)
        return q, k, _new_window(x, win, wq.shape[-1])
    pk, tok, doc = _packed_rows(cu_seqlens, x, win, pos, int(mini_batch))
    q, k = _conv_rope_fwd_op(x, win_c, wq, bq, wk, bk, 0, *args, tok, doc)
    return q, k, _packed_new_window(x, win, pk, wq.shape[-1])


def causal_conv(x, win, w, b, cu_seqlens=None, push: bool = False):
    """One depthwise causal conv of x [B, T, D] (no RoPE). Returns (y [B, T, D] in x's dtype, new window).
    With cu_seqlens: packed documents as in `conv_rope`. push (one token, a window in x's dtype, contiguous): the
    new window is written into win itself (`window_push_`) and win returned."""
    win_c = _window_in(x, win)
    _check_conv("w", x, w, b)
    if cu_seqlens is None:
        y, _ = _conv_rope_fwd_op(x, win_c, w, b, None, None, 0, 1, 2, 10000.0, False, None, None)
        if push:
            return y, window_push_(win, x, after=y)
        return y, _new_window(x, win, w.shape[-1])
    pk, tok, doc = _packed_rows(cu_seqlens, x, win, 0, 1)
    y, _ = _conv_rope_fwd_op(x, win_c, w, b, None, None, 0, 1, 2, 10000.0, False, tok, doc)
    return y, _packed_new_window(x, win, pk, w.shape[-1])


@triton.jit
def _window_push_kernel(win_ptr, x_ptr, after_ptr, D, x_sb, N: tl.constexpr, BD: tl.constexpr):
    """win [B, N, D] (contiguous) <- its rows 1..N-1, then x [B, 1, D] (row stride x_sb): the window after one
    token, in place. A program owns BD channels of one batch row; each thread reads a row before it overwrites it.
    after_ptr is not read (see `window_push_`)."""
    b = tl.program_id(0)
    c = tl.program_id(1) * BD + tl.arange(0, BD)
    m = c < D
    base = win_ptr + b * N * D + c
    for j in tl.static_range(N - 1):
        tl.store(base + j * D, tl.load(base + (j + 1) * D, mask=m), mask=m)
    tl.store(base + (N - 1) * D, tl.load(x_ptr + b * x_sb + c, mask=m).to(win_ptr.dtype.element_ty), mask=m)


def window_push_(win: torch.Tensor, x: torch.Tensor, after: torch.Tensor | None = None) -> torch.Tensor:
    """A one-token step's new conv window written into win itself (one launch): win [B, W-1, D] contiguous <- (its
    last W-2 rows, x [B, 1, D]). For states the caller owns (a graphed decode's buffers), where a functional
    shift would cost two kernels (a concatenation into a buffer and a copy back). Returns win.
    after: what was computed from win's old rows (the step's conv output), handed to the kernel unread so that
    torch.compile orders the push after it: Inductor moves reads next to their users, and a read of win left after
    the push makes it push into a copy of win and copy that back (the two kernels again)."""
    B, N, D = win.shape
    if not win.is_contiguous() or x.shape != (B, 1, D) or x.stride(-1) != 1:
        raise ValueError(f"win, x: expected a contiguous window [B, W-1, D] and x [B, 1, D] with contiguous rows, got "
                         f"{tuple(win.shape)} and {tuple(x.shape)}")
    BD = min(1024, pow2(D))
    _window_push_kernel[(B, cdiv(D, BD))](win, x, win if after is None else after, D, x.stride(0), N=N, BD=BD)
    return win


# ---------------------------------------------------------------- TTT-Linear (M) layer decode step
@triton.jit
def _token_conv_rope(u_ptr, win_ptr, w_ptr, b_ptr, u_off, win_off, cols, idx, m, i_pos, log2_base, D,
                     W: tl.constexpr, HAS_BIAS: tl.constexpr, HD: tl.constexpr, BD: tl.constexpr):
    """One token's depthwise causal conv over cat(window rows, u) at the channels cols = c0 + idx of one head
    (m: idx < head dim), then RoPE at position i_pos (pairs (2p, 2p+1) of the head), fp32 [BD]."""
    y = tl.zeros([BD], dtype=tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=m, other=0.0).to(tl.float32)
    for j in tl.static_range(W):
        if j < W - 1:
            xv = tl.load(win_ptr + win_off + j * D + cols, mask=m, other=0.0)
        else:
            xv = tl.load(u_ptr + u_off + cols, mask=m, other=0.0)
        y += xv.to(tl.float32) * tl.load(w_ptr + cols * W + j, mask=m, other=0.0).to(tl.float32)
    c, s = _row_angles(i_pos, tl.exp2(-(2.0 * tl.arange(0, BD // 2).to(tl.float32) / HD) * log2_base))
    return _rot(y, c, s)


# i_pos is not specialised: the 16 offsets of a mini-batch share one compiled kernel (and a position of 1, which
# Triton would otherwise turn into a constant, needs no separate compile)
@triton.jit(do_not_specialize=["i_pos"])
def _linear_decode_kernel(
    u_ptr, v_ptr, gate_ptr, win_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, lrb_ptr, lrs_ptr, delta_ptr, lnw_ptr, lnb_ptr,
    w_ptr, c_ptr, a0_ptr, ab0_ptr, k_ptr, g_ptr, pre_ptr, o_ptr, nwin_ptr,
    u_sb, v_sb, g_sb, u_c, v_c, g_c, H, D, i_pos, log2_base, base_lr,
    HD: tl.constexpr, BD: tl.constexpr, MB: tl.constexpr, BB: tl.constexpr, W: tl.constexpr, WB: tl.constexpr,
    HAS_BIAS: tl.constexpr, LEARN_LR: tl.constexpr, COMMIT: tl.constexpr, WIN_INPLACE: tl.constexpr,
    EPS: tl.constexpr,
):
    # program: one (batch, head). q, k: the conv + RoPE of u, computed twice, once in the layout of W's columns and
    # once in that of its rows (cheaper than moving one through shared memory); lr: the head's gate; tau_i from
    # delta; then the step on the rows form of the state (`RowsState`): the gradient at k W + c, the output from W,
    # the mini-batch's earlier rows (k_s, lr_s g_s), s < i, this token's and, while pre is set, the sums A0, a0
    # the state came with; a commit (i = b - 1) writes W - t_i (pre A0 + K^T G), else this token's row is
    # written (state written in place: each program owns its (batch, head)); the new conv window: the old one's
    # last W - 2 rows, then u (in place when WIN_INPLACE: after a barrier, so that every read of the window, in
    # either layout, comes first).
    # fp32 whatever the caller typed them as: a compiled step (Inductor) passes Python floats as fp64, which made the
    # whole step fp64 (offline sm_90: 2,745 fp64 instructions and 5,520 B of stack against 136)
    log2_base = tl.cast(log2_base, tl.float32)
    base_lr = tl.cast(base_lr, tl.float32)
    pid = tl.program_id(0)
    bi, hi = pid // H, pid % H
    rd = tl.arange(0, BD)
    rr = tl.arange(0, BD)
    cmask = rd < HD
    cols, rcols = hi * HD + rd, hi * HD + rr
    u_off, win_off = bi * u_sb + u_c, bi * (W - 1) * D  # u_c, v_c, g_c: the inputs' first columns
    q = _token_conv_rope(u_ptr, win_ptr, wq_ptr, bq_ptr, u_off, win_off, cols, rd, cmask, i_pos, log2_base, D, W,
                         HAS_BIAS, HD, BD)
    k = _token_conv_rope(u_ptr, win_ptr, wk_ptr, bk_ptr, u_off, win_off, cols, rd, cmask, i_pos, log2_base, D, W,
                         HAS_BIAS, HD, BD)
    qr = _token_conv_rope(u_ptr, win_ptr, wq_ptr, bq_ptr, u_off, win_off, rcols, rr, rr < HD, i_pos, log2_base, D,
                          W, HAS_BIAS, HD, BD)
    kr = _token_conv_rope(u_ptr, win_ptr, wk_ptr, bk_ptr, u_off, win_off, rcols, rr, rr < HD, i_pos, log2_base, D,
                          W, HAS_BIAS, HD, BD)
    v = tl.load(v_ptr + bi * v_sb + v_c + cols, mask=cmask, other=0.0).to(tl.float32)
    lr = base_lr * tl.load(lrs_ptr).to(tl.float32) / HD  # base_lr * inner_lr_scale / d, as the layer's formula
    if LEARN_LR:
        gl = tl.load(gate_ptr + bi * g_sb + g_c + hi).to(tl.float32) + tl.load(lrb_ptr + hi).to(tl.float32)
        lr = lr * tl.sigmoid(gl)
        t_i = tl.maximum(1.0 / tl.cast(i_pos + 1, tl.float32) + tl.load(delta_ptr + i_pos).to(tl.float32), 0.0)
    else:
        t_i = 1.0 / tl.cast(i_pos + 1, tl.float32)
    gam = tl.load(lnw_ptr + hi * HD + rd, mask=cmask, other=0.0).to(tl.float32)
    bet = tl.load(lnb_ptr + hi * HD + rd, mask=cmask, other=0.0).to(tl.float32)
    wmask = cmask[:, None] & cmask[None, :]
    woff = rr[:, None] * HD + rd[None, :]
    Wt = tl.load(w_ptr + pid * HD * HD + woff, mask=wmask, other=0.0)
    c = tl.load(c_ptr + pid * HD + rd, mask=cmask, other=0.0)
    rs = tl.arange(0, BB)
    roff = pid * MB * HD + rs[:, None] * HD + rd[None, :]  # rows s of K and G: [BB, BD]
    earlier = (rs[:, None] < i_pos) & cmask[None, :]
    K = tl.load(k_ptr + roff, mask=earlier, other=0.0)
    G = tl.load(g_ptr + roff, mask=earlier, other=0.0)
    pre = tl.load(pre_ptr + pid)
    g = lr * _ln_l2_grad_vec(tl.sum(kr[:, None] * Wt, axis=0) + c, v, k, gam, bet, cmask, HD, EPS)  # at k W + c
    # q (A, a) summed from the rows, this token's included: sum_s (q . k_s + 1) g_s
    acc = tl.sum((tl.sum(K * q[None, :], axis=1) + 1.0)[:, None] * G, axis=0) + (tl.sum(q * k, axis=0) + 1.0) * g
    if pre != 0.0:
        A0 = tl.load(a0_ptr + pid * HD * HD + woff, mask=wmask, other=0.0)
        a0 = tl.load(ab0_ptr + pid * HD + rd, mask=cmask, other=0.0)
        acc += tl.sum(qr[:, None] * A0, axis=0) + a0
    xh, _rstd = _normalize_vec(tl.sum(qr[:, None] * Wt, axis=0) + c - t_i * acc, cmask, HD, EPS)
    o = q + xh * gam + bet
    tl.store(o_ptr + bi * D + cols, o.to(o_ptr.dtype.element_ty), mask=cmask)
    if COMMIT:  # i = b - 1: W - t_i sum_s k_s^T g_s over the earlier rows (read again, k_s in W's row layout) and
        # this token's; the next mini-batch starts empty
        upd = kr[:, None] * g[None, :]
        for s in tl.static_range(MB - 1):
            ks = tl.load(k_ptr + pid * MB * HD + s * HD + rr, mask=rr < HD, other=0.0)
            gs = tl.load(g_ptr + pid * MB * HD + s * HD + rd, mask=cmask, other=0.0)
            upd += ks[:, None] * gs[None, :]
        bupd = tl.sum(G, axis=0) + g
        if pre != 0.0:
            upd += tl.load(a0_ptr + pid * HD * HD + woff, mask=wmask, other=0.0)
            bupd += tl.load(ab0_ptr + pid * HD + rd, mask=cmask, other=0.0)
            tl.store(pre_ptr + pid, 0.0)
        tl.store(w_ptr + pid * HD * HD + woff, Wt - t_i * upd, mask=wmask)
        tl.store(c_ptr + pid * HD + rd, c - t_i * bupd, mask=cmask)
    else:
        tl.store(k_ptr + pid * MB * HD + i_pos * HD + rd, k, mask=cmask)
        tl.store(g_ptr + pid * MB * HD + i_pos * HD + rd, g, mask=cmask)
    rw = tl.arange(0, WB)[:, None]  # the new window's rows j: the old row j + 1, the last one u
    old = tl.load(win_ptr + win_off + (rw + 1) * D + cols[None, :], mask=(rw < W - 2) & cmask[None, :], other=0.0)
    un = tl.load(u_ptr + u_off + cols, mask=cmask, other=0.0)
    new = tl.where(rw == W - 2, un[None, :].to(old.dtype), old)  # [WB, BD]
    if WIN_INPLACE:
        tl.debug_barrier()
    tl.store(nwin_ptr + win_off + rw * D + cols[None, :], new.to(nwin_ptr.dtype.element_ty),
             mask=(rw < W - 1) & cmask[None, :])


def linear_decode_step(u, v, gate, win, wq, bq, wk, bk, lr_bias, lr_scale, delta, ln_weight, ln_bias,
                       state: TTTState, *, mini_batch: int, base_lr: float = 1.0, rope_base: float = 10000.0,
                       inplace: bool = False, cols: tuple[int, int, int] = (0, 0, 0), launch: tuple | None = None):
    """One token of a TTT-Linear (M) layer between its input projections and its post-LayerNorm, in one kernel:
    the Q/K convs over the window and u, RoPE at position mod b, the learnable inner learning rate and tau_i, the
    TTT step (and the commit at a mini-batch's end) and the new conv window. Inference only (no backward).

    u = x theta_QK, v = x theta_V [B, 1, D] (last dim contiguous); gate [B, 1, H] = x . lr_weight_h (None:
    learn_lr off); cols: the first columns of u, v and gate in those tensors' last dims (u, v and gate may be one
    tensor, the merged projection's output, passed whole: a compiled step then hands the kernel the GEMM's own
    buffer instead of views it may copy first); win [B, W-1, D] the conv window (u's dtype); wq, wk [D, 1, W],
    bq, bk [D] or None; lr_bias [H]; lr_scale the layer's 0-d inner_lr_scale: the inner learning rate is base_lr *
    lr_scale / d (times the gate's sigmoid), computed in the kernel; delta [b] (tau_i = max(0, 1/i + delta_i);
    None: 1/i); ln_weight, ln_bias [H, d]; state the op's fp32 state, a TTTState or the same in the rows form
    (`RowsState`: what the kernel reads and writes; a TTTState is converted there and back). Returns (o [B, 1, D]
    in u's dtype, the op's new state in the form given, the new window).
    inplace: the new weights, rows and flags are written into a RowsState's own tensors where they are fp32 and
    contiguous, and the new window into `win` where it is in u's dtype and contiguous (each program reads its slice
    before it writes it; the caller gives the old state up: a CUDA-graphed decoder's buffers, which then need no
    copy). launch: (warps, registers per thread or None) of the kernel, None for the default
    (benchmarks/bench_layer_kernels.py --decode times the choices). The reference is the layer's own path
    (tests/test_fused_layer.py)."""
    H, d = ln_weight.shape
    B, D, W = u.shape[0], H * d, wq.shape[-1]
    cu, cv, cg = cols
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in
                                       (u, v, gate, win, wq, wk, ln_weight, *state.params, *state.accum)):
        raise ValueError("u: the fused decode kernel has no backward; run it under torch.no_grad()")
    if (u.stride(-1) != 1 or v.stride(-1) != 1 or win.shape != (B, W - 1, D) or d % 2 or u.shape[1:2] != (1,)
            or v.shape[:2] != (B, 1) or min(cols) < 0 or u.shape[-1] < cu + D or v.shape[-1] < cv + D
            or (gate is not None and gate.shape[-1] < cg + H)):
        raise ValueError(f"u, v, win: expected [B, 1, D] (from columns {cols} on) with a contiguous last dim and a "
                         f"window [B, {W - 1}, D], got {tuple(u.shape)}, {tuple(v.shape)}, {tuple(win.shape)}")
    i = state.pos % mini_batch
    commit = i == mini_batch - 1
    rows = isinstance(state, RowsState)
    st = state if rows else RowsState.of(state, mini_batch)
    if st.accum[2].shape[2] != mini_batch:
        raise ValueError(f"state: expected rows for a mini-batch of {mini_batch}, got {st.accum[2].shape[2]}")
    # the kernel writes the state it is given: its own tensors in place, else copies of what it writes (the weights
    # on a commit, the rows and pre); A0, a0 are only read; the rows RowsState.of made are this call's own
    own = inplace and rows and all(t.dtype == torch.float32 and t.is_contiguous() for t in (*st.params, *st.accum))

    def arg(t, written):  # (written may be a traced offset's SymBool: a Python branch, not an argument)
        return t if own else (t.to(torch.float32, copy=True) if written else t.to(torch.float32)).contiguous()
    Wt, c = (arg(t, commit) for t in st.params)
    A0, a0 = (arg(t, False) for t in st.accum[:2])
    K, G, pre = (arg(t, rows) for t in st.accum[2:])
    win_inplace = inplace and win.dtype == u.dtype and win.is_contiguous()
    win = win.to(u.dtype).contiguous()
    o = torch.empty((B, 1, D), dtype=u.dtype, device=u.device)
    nwin = win if win_inplace else torch.empty_like(win)
    learn = gate is not None
    warps, maxnreg = launch or (2 if d <= 64 else 8, None)  # 2 at d 64: docs/kernels_notes.md, "Decode"
    _linear_decode_kernel[(B * H,)](
        u, v, gate if learn else u, win, wq, bq if bq is not None else wq, wk, bk if bk is not None else wk,
        lr_bias if learn else u, lr_scale, delta if learn else u, ln_weight, ln_bias, Wt, c, A0, a0, K, G, pre, o,
        nwin, u.stride(0), v.stride(0), gate.stride(0) if learn else 0, cu, cv, cg, H, D, i, math.log2(rope_base),
        float(base_lr), HD=d, BD=pow2(d), MB=mini_batch, BB=pow2(mini_batch), W=W, WB=pow2(max(W - 1, 1)),
        HAS_BIAS=bq is not None, LEARN_LR=learn, COMMIT=commit, WIN_INPLACE=win_inplace, EPS=LN_EPS,
        num_warps=warps, **({} if maxnreg is None else {"maxnreg": maxnreg}))
    new = RowsState("linear", (Wt, c), (A0, a0, K, G, pre), state.pos + 1)
    return o, (new if rows else new.summed()), nwin
