"""Triton kernels for the work around the TTT op, so a TTT layer costs little more than its GEMMs and the op.

    q, k, win = conv_rope(u, win, wq, bq, wk, bk, pos, mini_batch=16, head_dim=64, rope_base=1e4)
    y, win = causal_conv(x, win, w, b)                    # one depthwise causal conv (the (M) block's pre-conv)
    y = ln_gate(o, g, ln_weight, ln_bias, eps)            # LayerNorm(o) * GELU_tanh(g), over the last dim

conv_rope: u [B, T, D] (any row stride, last dim contiguous); win [B, W-1, D] the conv window (the last W-1
inputs before u; zeros at a sequence start); wq, wk [D, 1, W], bq, bk [D]. Two depthwise causal convs of the
same input (the (M) layer's conv_q and conv_k), then RoPE at position (pos + t) mod mini_batch rotating adjacent
pairs (2i, 2i+1) of every head by angle p * base^(-2i/head_dim). Returns q, k [B, T, D] contiguous in u's dtype
and the new window. The conv sums and the rotation run in fp32 with one rounding at the end (the PyTorch layer
path rounds after the conv too). The references are `layers/conv.py` (shifted products) and
`layers/attention.apply_rope`; tests/test_fused_layer.py compares them on outputs and every gradient.

ln_gate: o, g [N, D] (any leading dims); LayerNorm over D (fp32 statistics, biased variance) times the tanh-GELU
of g; output in o's dtype. Reference: F.layer_norm(o) * F.gelu(g, approximate="tanh").

Each is a torch.library custom op with a fake implementation and an autograd formula (hand-written Triton
backward kernels), so torch.compile traces through them. Weight gradients are reduced per program into fp32
partial sums and summed in PyTorch.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_utils import _gelu_parts


def _pick(n: int, cap: int) -> int:
    return max(8, min(cap, triton.next_power_of_2(n)))


# ---------------------------------------------------------------- causal conv (+ RoPE)
# Tiles are [BT time rows, BC contiguous channels] so every load and store is coalesced along the channels
# (an earlier version split even and odd channels into two stride-2 tiles: ptxas gave it 255 registers and
# 1.7 KB of spills, the layout ran its warps down the time axis, and it measured 4.3 ms per call on the H200
# at B4 T8192 D2048, ~40x its byte floor). RoPE's pairs (2i, 2i+1) meet through reshape + split.
@triton.jit
def _xs_tile(x_ptr, s_ptr, row, cols, rmask, cmask, x_off, s_off, x_st, s_st, j: tl.constexpr, W: tl.constexpr,
             HAS_STATE: tl.constexpr):
    """The [BT, BC] tile xs[row + j, cols] in fp32, xs = cat(window, x) along time: row + j - (W-1) < 0 reads the
    window (zeros without one), else x."""
    src = row + j - (W - 1)
    m = (src >= 0) & rmask
    xv = tl.load(x_ptr + x_off + src[:, None] * x_st + cols[None, :], mask=m[:, None] & cmask[None, :], other=0.0)
    xv = xv.to(tl.float32)
    if HAS_STATE:
        ms = (src < 0) & rmask
        sv = tl.load(s_ptr + s_off + (row + j)[:, None] * s_st + cols[None, :], mask=ms[:, None] & cmask[None, :],
                     other=0.0)
        xv += sv.to(tl.float32)
    return xv


@triton.jit
def _tap(w_ptr, cols, cmask, j: tl.constexpr, W: tl.constexpr):
    """Tap j of the depthwise weights [D, 1, W] for the channels cols, fp32 [BC]."""
    return tl.load(w_ptr + cols * W + j, mask=cmask, other=0.0).to(tl.float32)


@triton.jit
def _rotate(y, t, pos0, c0, log2_base, sign: tl.constexpr, MB: tl.constexpr, HD: tl.constexpr,
            BT: tl.constexpr, BC: tl.constexpr):
    """RoPE on a [BT, BC] tile whose first channel c0 is even: pairs (2i, 2i+1) rotated by sign * angle, angle =
    ((pos0 + t) mod MB) * base^(-2i/HD) with i the pair index inside its head."""
    ye, yo = tl.split(tl.reshape(y, [BT, BC // 2, 2]))  # [BT, BC] -> [BT, BC/2] even, odd channels
    pair = (c0 + 2 * tl.arange(0, BC // 2)) % HD // 2
    inv = tl.exp2(-(2.0 * pair.to(tl.float32) / HD) * log2_base)
    p = ((pos0 + t) % MB).to(tl.float32)
    ang = p[:, None] * inv[None, :]
    c, s = tl.cos(ang), sign * tl.sin(ang)
    return tl.reshape(tl.join(ye * c - yo * s, ye * s + yo * c), [BT, BC])  # [BT, BC/2, 2] -> [BT, BC]


@triton.jit
def _conv_fwd_kernel(
    x_ptr, s_ptr, wa_ptr, ba_ptr, wb_ptr, bb_ptr, ya_ptr, yb_ptr,
    T, D, x_sb, x_st, s_sb, s_st, pos0, log2_base,
    W: tl.constexpr, TWO: tl.constexpr, ROPE: tl.constexpr, HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr,
    MB: tl.constexpr, HD: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):
    # program: (time block, channel block, batch)
    pt, pc, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pt * BT + tl.arange(0, BT)
    cols = pc * BC + tl.arange(0, BC)
    tmask, cmask = t < T, cols < D
    x_off, s_off = b * x_sb, b * s_sb
    ya = tl.zeros([BT, BC], dtype=tl.float32)
    yb = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(W):
        xs = _xs_tile(x_ptr, s_ptr, t, cols, tmask, cmask, x_off, s_off, x_st, s_st, j, W, HAS_STATE)
        ya += xs * _tap(wa_ptr, cols, cmask, j, W)[None, :]
        if TWO:
            yb += xs * _tap(wb_ptr, cols, cmask, j, W)[None, :]
    if HAS_BIAS:
        ya += tl.load(ba_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if TWO:
            yb += tl.load(bb_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if ROPE:
        ya = _rotate(ya, t, pos0, pc * BC, log2_base, 1.0, MB, HD, BT, BC)
        if TWO:
            yb = _rotate(yb, t, pos0, pc * BC, log2_base, 1.0, MB, HD, BT, BC)
    m2 = tmask[:, None] & cmask[None, :]
    y_off = b * T * D + t[:, None] * D + cols[None, :]
    tl.store(ya_ptr + y_off, ya.to(ya_ptr.dtype.element_ty), mask=m2)
    if TWO:
        tl.store(yb_ptr + y_off, yb.to(yb_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _unrope(dy_ptr, y_off, t, cols, cmask, T, pos0, c0, log2_base, D, ROPE: tl.constexpr, MB: tl.constexpr,
            HD: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """The gradient w.r.t. the conv output at rows t (zero outside [0, T)): dy rotated back by -angle."""
    m = (t >= 0) & (t < T)
    g = tl.load(dy_ptr + y_off + t[:, None] * D + cols[None, :], mask=m[:, None] & cmask[None, :], other=0.0)
    g = g.to(tl.float32)
    if ROPE:
        g = _rotate(g, t, pos0, c0, log2_base, -1.0, MB, HD, BT, BC)
    return g


@triton.jit
def _conv_bwd_kernel(
    x_ptr, s_ptr, wa_ptr, wb_ptr, dya_ptr, dyb_ptr, dx_ptr, ds_ptr, dwa_ptr, dba_ptr, dwb_ptr, dbb_ptr,
    T, D, NTB, x_sb, x_st, s_sb, s_st, pos0, log2_base,
    W: tl.constexpr, TWO: tl.constexpr, ROPE: tl.constexpr, HAS_STATE: tl.constexpr,
    MB: tl.constexpr, HD: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):
    # program: rows r = pt*BT - (W-1) + [0, BT) of xs = cat(window, x) (r < 0: window rows), a channel block and
    # a batch. With g the un-rotated output gradient, dxs[r] = sum_j w[:, j] g[r + (W-1) - j]; it goes to dx
    # (r >= 0) or to the window's gradient (r < 0). The program's rows r in [0, T) also add their terms of
    # dw[:, j] = sum_t g[t] xs[t + j] and db = sum_t g[t] to its own fp32 partial sums (reduced in PyTorch).
    pt, pc, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r = pt * BT - (W - 1) + tl.arange(0, BT)
    cols = pc * BC + tl.arange(0, BC)
    cmask = cols < D
    c0 = pc * BC
    y_off = b * T * D
    gx = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(W):
        t = r + (W - 1) - j  # the output row that xs row r feeds through tap j
        gx += _unrope(dya_ptr, y_off, t, cols, cmask, T, pos0, c0, log2_base, D, ROPE, MB, HD, BT, BC) \
            * _tap(wa_ptr, cols, cmask, j, W)[None, :]
        if TWO:
            gx += _unrope(dyb_ptr, y_off, t, cols, cmask, T, pos0, c0, log2_base, D, ROPE, MB, HD, BT, BC) \
                * _tap(wb_ptr, cols, cmask, j, W)[None, :]
    xm = (r >= 0) & (r < T)
    tl.store(dx_ptr + y_off + r[:, None] * D + cols[None, :], gx.to(dx_ptr.dtype.element_ty),
             mask=xm[:, None] & cmask[None, :])
    if HAS_STATE:
        ds_off = b * (W - 1) * D + (r + W - 1)[:, None] * D + cols[None, :]
        tl.store(ds_ptr + ds_off, gx.to(ds_ptr.dtype.element_ty), mask=(r < 0)[:, None] & cmask[None, :])
    # weight and bias partial sums over this program's output rows t = r (rows outside [0, T) load zeros)
    prog = b * NTB + pt
    ga = _unrope(dya_ptr, y_off, r, cols, cmask, T, pos0, c0, log2_base, D, ROPE, MB, HD, BT, BC)
    tl.store(dba_ptr + prog * D + cols, tl.sum(ga, axis=0), mask=cmask)
    if TWO:
        gb = _unrope(dyb_ptr, y_off, r, cols, cmask, T, pos0, c0, log2_base, D, ROPE, MB, HD, BT, BC)
        tl.store(dbb_ptr + prog * D + cols, tl.sum(gb, axis=0), mask=cmask)
    for j in tl.static_range(W):
        xs = _xs_tile(x_ptr, s_ptr, r, cols, xm, cmask, b * x_sb, b * s_sb, x_st, s_st, j, W, HAS_STATE)
        tl.store(dwa_ptr + (prog * D + cols) * W + j, tl.sum(ga * xs, axis=0), mask=cmask)
        if TWO:
            tl.store(dwb_ptr + (prog * D + cols) * W + j, tl.sum(gb * xs, axis=0), mask=cmask)


def _conv_launch_cfg(T: int, D: int, backward: bool):
    """Rows and channels per program (BC even, so RoPE's pairs stay inside a tile). Chosen offline (Triton 3.6,
    sm_90, bf16, `ptxas` resource report): forward 16 x 128 takes 168 registers and 128-bit loads (32 x 128:
    255 registers); backward 8 x 128 takes 160 registers (16 x 128: 247). Not yet timed on a GPU."""
    BT = _pick(T, 8 if backward else 16)
    BC = _pick(D, 128)
    return BT, BC, triton.cdiv(D, BC)


def _conv_fwd(x, win, wa, ba, wb, bb, pos0: int, mini_batch: int, head_dim: int, rope_base: float, rope: bool):
    B, T, D = x.shape
    W = wa.shape[-1]
    BT, BC, npc = _conv_launch_cfg(T, D, backward=False)
    ya = torch.empty((B, T, D), dtype=x.dtype, device=x.device)
    yb = torch.empty_like(ya) if wb is not None else ya
    st = win if win is not None else x
    _conv_fwd_kernel[(triton.cdiv(T, BT), npc, B)](
        x, st, wa, ba if ba is not None else wa, wb if wb is not None else wa, bb if bb is not None else wa, ya, yb,
        T, D, x.stride(0), x.stride(1), st.stride(0), st.stride(1), pos0 % mini_batch, math.log2(rope_base),
        W=W, TWO=wb is not None, ROPE=rope, HAS_STATE=win is not None, HAS_BIAS=ba is not None,
        MB=mini_batch, HD=head_dim, BT=BT, BC=BC, num_warps=4)
    return ya, yb


def _conv_bwd(x, win, wa, wb, dya, dyb, pos0: int, mini_batch: int, head_dim: int, rope_base: float, rope: bool):
    B, T, D = x.shape
    W = wa.shape[-1]
    BT, BC, npc = _conv_launch_cfg(T + W - 1, D, backward=True)
    ntb = triton.cdiv(T + W - 1, BT)
    two = wb is not None
    dx = torch.empty((B, T, D), dtype=x.dtype, device=x.device)
    ds = torch.empty((B, W - 1, D), dtype=win.dtype, device=x.device) if win is not None else dx
    f32 = dict(dtype=torch.float32, device=x.device)
    dwa, dba = torch.empty((B * ntb, D, W), **f32), torch.empty((B * ntb, D), **f32)
    dwb, dbb = (torch.empty((B * ntb, D, W), **f32), torch.empty((B * ntb, D), **f32)) if two else (dwa, dba)
    st = win if win is not None else x
    dya = dya.contiguous()
    dyb = dyb.contiguous() if two else dya
    _conv_bwd_kernel[(ntb, npc, B)](
        x, st, wa, wb if two else wa, dya, dyb, dx, ds, dwa, dba, dwb, dbb,
        T, D, ntb, x.stride(0), x.stride(1), st.stride(0), st.stride(1), pos0 % mini_batch, math.log2(rope_base),
        W=W, TWO=two, ROPE=rope, HAS_STATE=win is not None, MB=mini_batch, HD=head_dim, BT=BT, BC=BC, num_warps=4)
    grads = [dx, ds if win is not None else None, dwa.sum(0).unsqueeze(1), dba.sum(0)]
    if two:
        grads += [dwb.sum(0).unsqueeze(1), dbb.sum(0)]
    return grads


# The custom ops take the conv window and biases as optional tensors and the RoPE settings as plain numbers.
@torch.library.custom_op("ttt::conv_rope_fwd", mutates_args=())
def _conv_rope_fwd_op(x: torch.Tensor, win: torch.Tensor | None, wa: torch.Tensor, ba: torch.Tensor | None,
                      wb: torch.Tensor | None, bb: torch.Tensor | None, pos0: int, mini_batch: int, head_dim: int,
                      rope_base: float, rope: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ya, yb = _conv_fwd(x, win, wa, ba, wb, bb, pos0, mini_batch, head_dim, rope_base, rope)
    return ya, (yb if wb is not None else ya.new_empty(0))


@_conv_rope_fwd_op.register_fake
def _(x, win, wa, ba, wb, bb, pos0, mini_batch, head_dim, rope_base, rope):
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return y, (torch.empty_like(y) if wb is not None else x.new_empty(0))


@torch.library.custom_op("ttt::conv_rope_bwd", mutates_args=())
def _conv_rope_bwd_op(x: torch.Tensor, win: torch.Tensor | None, wa: torch.Tensor, wb: torch.Tensor | None,
                      dya: torch.Tensor, dyb: torch.Tensor | None, pos0: int, mini_batch: int, head_dim: int,
                      rope_base: float, rope: bool) -> list[torch.Tensor]:
    g = _conv_bwd(x, win, wa, wb, dya, dyb, pos0, mini_batch, head_dim, rope_base, rope)
    return [t if t is not None else x.new_empty(0) for t in g]


@_conv_rope_bwd_op.register_fake
def _(x, win, wa, wb, dya, dyb, pos0, mini_batch, head_dim, rope_base, rope):
    out = [torch.empty_like(x), torch.empty_like(win) if win is not None else x.new_empty(0),
           wa.new_empty(wa.shape, dtype=torch.float32), wa.new_empty(wa.shape[0], dtype=torch.float32)]
    if wb is not None:
        out += [wb.new_empty(wb.shape, dtype=torch.float32), wb.new_empty(wb.shape[0], dtype=torch.float32)]
    return out


def _conv_setup(ctx, inputs, output):
    x, win, wa, ba, wb, bb, pos0, mini_batch, head_dim, rope_base, rope = inputs
    ctx.save_for_backward(x, win, wa, wb)
    ctx.meta = (ba is not None, bb is not None, pos0, mini_batch, head_dim, rope_base, rope)


def _conv_backward(ctx, dya, dyb):
    x, win, wa, wb = ctx.saved_tensors
    has_ba, has_bb, pos0, mini_batch, head_dim, rope_base, rope = ctx.meta
    dya = torch.zeros_like(x) if dya is None else dya
    if wb is not None:
        dyb = torch.zeros_like(x) if dyb is None or dyb.numel() == 0 else dyb
    else:
        dyb = None
    g = _conv_rope_bwd_op(x, win, wa, wb, dya, dyb, pos0, mini_batch, head_dim, rope_base, rope)
    dx, dwin, dwa, dba = g[:4]
    dwb, dbb = (g[4], g[5]) if wb is not None else (None, None)
    return (dx, dwin if win is not None else None, dwa.to(wa.dtype), dba.to(wa.dtype) if has_ba else None,
            None if wb is None else dwb.to(wb.dtype), dbb.to(wb.dtype) if has_bb else None,
            None, None, None, None, None)


_conv_rope_fwd_op.register_autograd(_conv_backward, setup_context=_conv_setup)


def _new_window(x: torch.Tensor, win: torch.Tensor | None, W: int) -> torch.Tensor:
    """The last W-1 rows of cat(win, x) along time (a copy, so the big x is not kept alive by the state)."""
    B, T, D = x.shape
    if T >= W - 1:
        return x[:, T - (W - 1):].clone()
    prev = win if win is not None else x.new_zeros(B, W - 1, D)
    return torch.cat([prev[:, T:].to(x.dtype), x], dim=1)


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


def conv_rope(x, win, wq, bq, wk, bk, pos: int, *, mini_batch: int, head_dim: int, rope_base: float = 10000.0):
    """Two depthwise causal convs of x [B, T, D] then RoPE at position mod mini_batch (module docstring).
    Returns (q, k [B, T, D] in x's dtype, new window [B, W-1, D])."""
    win_c = _window_in(x, win)
    if x.shape[-1] % 2 or head_dim % 2 or x.shape[-1] % head_dim:
        raise ValueError(f"head_dim: expected an even divisor of D = {x.shape[-1]}, got {head_dim}")
    _check_conv("wq", x, wq, bq)
    _check_conv("wk", x, wk, bk)
    q, k = _conv_rope_fwd_op(x, win_c, wq, bq, wk, bk, int(pos), int(mini_batch), int(head_dim), float(rope_base),
                             True)
    return q, k, _new_window(x, win, wq.shape[-1])


def causal_conv(x, win, w, b):
    """One depthwise causal conv of x [B, T, D] (no RoPE). Returns (y [B, T, D] in x's dtype, new window)."""
    win_c = _window_in(x, win)
    _check_conv("w", x, w, b)
    y, _ = _conv_rope_fwd_op(x, win_c, w, b, None, None, 0, 1, 2, 10000.0, False)
    return y, _new_window(x, win, w.shape[-1])


# ---------------------------------------------------------------- post-LayerNorm x GELU gate
@triton.jit
def _ln_gate_fwd_kernel(o_ptr, g_ptr, w_ptr, b_ptr, y_ptr, mu_ptr, rs_ptr, N, D, eps,
                        BD: tl.constexpr, ROWS: tl.constexpr):
    cols = tl.arange(0, BD)
    cm = cols < D
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    for i in range(ROWS):
        row = tl.program_id(0) * ROWS + i
        if row < N:
            o = tl.load(o_ptr + row * D + cols, mask=cm, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + row * D + cols, mask=cm, other=0.0).to(tl.float32)
            mu = tl.sum(o, axis=0) / D
            oc = tl.where(cm, o - mu, 0.0)
            rs = 1.0 / tl.sqrt(tl.sum(oc * oc, axis=0) / D + eps)
            gl, _dg = _gelu_parts(g)
            tl.store(y_ptr + row * D + cols, ((oc * rs * w + bias) * gl).to(y_ptr.dtype.element_ty), mask=cm)
            tl.store(mu_ptr + row, mu)
            tl.store(rs_ptr + row, rs)


@triton.jit
def _ln_gate_bwd_kernel(o_ptr, g_ptr, w_ptr, b_ptr, mu_ptr, rs_ptr, dy_ptr, do_ptr, dg_ptr, dw_ptr, db_ptr, N, D,
                        BD: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BD)
    cm = cols < D
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    dw = tl.zeros([BD], dtype=tl.float32)
    db = tl.zeros([BD], dtype=tl.float32)
    for i in range(ROWS):
        row = pid * ROWS + i
        if row < N:
            o = tl.load(o_ptr + row * D + cols, mask=cm, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + row * D + cols, mask=cm, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * D + cols, mask=cm, other=0.0).to(tl.float32)
            mu = tl.load(mu_ptr + row)
            rs = tl.load(rs_ptr + row)
            xh = tl.where(cm, (o - mu) * rs, 0.0)
            gl, dgl = _gelu_parts(g)
            a = dy * gl  # gradient w.r.t. the LayerNorm output
            dw += a * xh
            db += a
            dxh = a * w
            do = (dxh - tl.sum(dxh, axis=0) / D - xh * (tl.sum(dxh * xh, axis=0) / D)) * rs
            tl.store(do_ptr + row * D + cols, do.to(do_ptr.dtype.element_ty), mask=cm)
            tl.store(dg_ptr + row * D + cols, (dy * (xh * w + bias) * dgl).to(dg_ptr.dtype.element_ty), mask=cm)
    tl.store(dw_ptr + pid * BD + cols, dw)
    tl.store(db_ptr + pid * BD + cols, db)


_LN_ROWS = 4  # rows per program: the weight-gradient partial sums are reduced over programs in PyTorch


@torch.library.custom_op("ttt::ln_gate_fwd", mutates_args=())
def _ln_gate_fwd_op(o: torch.Tensor, g: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N, D = o.shape
    y = torch.empty_like(o)
    mu = torch.empty(N, dtype=torch.float32, device=o.device)
    rs = torch.empty_like(mu)
    BD = triton.next_power_of_2(D)
    _ln_gate_fwd_kernel[(triton.cdiv(N, _LN_ROWS),)](o, g, w, b, y, mu, rs, N, D, eps, BD=BD, ROWS=_LN_ROWS,
                                                    num_warps=4 if BD <= 1024 else 8)
    return y, mu, rs


@_ln_gate_fwd_op.register_fake
def _(o, g, w, b, eps):
    return torch.empty_like(o), o.new_empty(o.shape[0], dtype=torch.float32), o.new_empty(o.shape[0],
                                                                                          dtype=torch.float32)


@torch.library.custom_op("ttt::ln_gate_bwd", mutates_args=())
def _ln_gate_bwd_op(o: torch.Tensor, g: torch.Tensor, w: torch.Tensor, b: torch.Tensor, mu: torch.Tensor,
                    rs: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    N, D = o.shape
    BD = triton.next_power_of_2(D)
    nprog = triton.cdiv(N, _LN_ROWS)
    do, dg = torch.empty_like(o), torch.empty_like(g)
    dw = torch.empty((nprog, BD), dtype=torch.float32, device=o.device)
    db = torch.empty_like(dw)
    _ln_gate_bwd_kernel[(nprog,)](o, g, w, b, mu, rs, dy.contiguous(), do, dg, dw, db, N, D, BD=BD, ROWS=_LN_ROWS,
                                  num_warps=4 if BD <= 1024 else 8)
    return [do, dg, dw.sum(0)[:D], db.sum(0)[:D]]


@_ln_gate_bwd_op.register_fake
def _(o, g, w, b, mu, rs, dy):
    D = o.shape[1]
    return [torch.empty_like(o), torch.empty_like(g), o.new_empty(D, dtype=torch.float32),
            o.new_empty(D, dtype=torch.float32)]


def _ln_setup(ctx, inputs, output):
    o, g, w, b, eps = inputs
    ctx.save_for_backward(o, g, w, b, output[1], output[2])


def _ln_backward(ctx, dy, _dmu, _drs):
    o, g, w, b, mu, rs = ctx.saved_tensors
    do, dg, dw, db = _ln_gate_bwd_op(o, g, w, b, mu, rs, dy)
    return do, dg, dw.to(w.dtype), db.to(b.dtype), None


_ln_gate_fwd_op.register_autograd(_ln_backward, setup_context=_ln_setup)


def ln_gate(o: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm(o) * GELU_tanh(g) over the last dim D; o, g [..., D] of one shape; weight, bias [D]. Returns o's
    dtype and shape."""
    if o.shape != g.shape or o.shape[-1] != weight.shape[-1] or weight.shape != bias.shape:
        raise ValueError(f"g: expected the shape of o {tuple(o.shape)} and weight/bias [{o.shape[-1]}], got "
                         f"{tuple(g.shape)}, {tuple(weight.shape)}, {tuple(bias.shape)}")
    shape = o.shape
    o2 = o.reshape(-1, shape[-1]).contiguous()  # [..., D] -> [N, D]
    g2 = g.reshape(-1, shape[-1]).contiguous()
    if g2.dtype != o2.dtype:
        g2 = g2.to(o2.dtype)
    y, _mu, _rs = _ln_gate_fwd_op(o2, g2, weight, bias, float(eps))
    return y.reshape(shape)
