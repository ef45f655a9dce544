"""TTT-Linear mini-batch dual form as Triton kernels: forward and hand-derived backward.

Mirrors `ttt/ops/ttt_linear/dual.py` (docs/math.md §4) on rows (`triton_utils.Rows`: the sequences of a batch,
or packed documents) from a zero accumulator, each row's mini-batches from its first token, the missing rows
of its last one masked (and that mini-batch left uncommitted); `ttt/ops/triton_backend.py` runs what finishes a
mini-batch begun in an earlier call with the PyTorch dual form and adds a partial last mini-batch's accumulators.

One program per (row, head) walks its row one mini-batch (b rows, padded to BT >= 16) at a time.
What stays on chip: the inner weights W (d x d, fp32) and bias c (fp32) live in registers for the whole
sequence; q, k, v, lr of a mini-batch are read once, o written once. The head dim is padded to a power
of two BD with masks (d = 96 -> BD = 128); padded rows (b < 16) get lr = 0 and are never stored.
All statistics and the state are fp32; matrix products take fp32 operands (tf32 or full fp32, by
DOT_MODE) or the inputs' 16-bit dtype.

Backward (`bwd_split.py`): the forward saves (W, c) at the start of every `group` mini-batches (not every
mini-batch); the backward recomputes from those checkpoints. Its gradients, per mini-batch, with x^ =
LN-normalised rows, s = their std, gy = gam (gam x^ + bet - (v - k)), G = (gy - mean gy - x^ mean(gy x^)) / s,
P = E * (Q K^T + 1), Zb = Q W + c - P G, o = q + LN(Zb), W' = W - K^T (e_b G), c' = c - sum e_b G  (e_b = tau_b lr):
  dZb = LN-backward(dO gam)                      dgam += dO x^b, dbet += dO
  dQ = dO + dZb W^T + (dP*E) K    dP = -dZb G^T   dG = -P^T dZb - e_b (K dW' + dc')
  dK = -(e_b G) dW'^T + (dP*E)^T Q + gam dgy + dZ W^T,   dV = -gam dgy
  dgy = (dG - mean dG - x^ mean(dG x^)) / s,  dx^ = (-mean(gy x^) dG - mean(dG x^) gy) / s + gam^2 dgy
  ds = -sum(dG G) / s,  dZ = (dx^ - mean dx^ - x^ mean(dx^ x^)) / s + ds x^ / d
  dW = dW' + Q^T dZb + K^T dZ,  dc = dc' + sum dZb + sum dZ
  dE = dP * (Q K^T + 1) (lower triangle) -> dtau_i, dlr_j;  e_b -> dlr_j, dtau_b.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import LN_EPS
from ..triton_utils import (Rows, _dot, _head_consts, _ln_l2_grad, _load_mb, _mb_masks, _normalize, _offsets, _row,
                            _tiles, batch_rows, dot_mode as _auto_dot_mode, hopper, pow2, tile)
from . import bwd_split, walks_gluon

FWD_IMPLS = ("auto", "fused", "split", "auto_gluon", "fused_gluon", "split_gluon")
BWD_IMPLS = ("auto", "split", "split_lean", "split_full", "split_gluon")


@triton.jit
def ttt_linear_fwd_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, w0_ptr, c0_ptr,
    o_ptr, wT_ptr, cT_ptr, ckw_ptr, ckc_ptr, gs_ptr, span_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h, o_b, o_t, o_h, sc_b, w_sb, c_sb,
    H, T,
    D: tl.constexpr, BD: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr, GROUP: tl.constexpr,
    SAVE: tl.constexpr, DOT_MODE: tl.constexpr, EPS: tl.constexpr, OUT: tl.constexpr,
):
    """OUT: the outputs too; else the chain alone, storing every mini-batch's G (fp32 rows [B*H or H, T, d]) for
    `_fwd_out_kernel`."""
    pid, bi, hi, rt, rd, cmask, tmask, m2 = _tiles(H, D, BD, MB, BT)
    start, L, slot = _row(span_ptr, bi)
    NMB = tl.cdiv(L, MB)
    wmask = cmask[:, None] & cmask[None, :]
    woff = rd[:, None] * D + rd[None, :]

    W = tl.load(w0_ptr + bi * w_sb + hi * D * D + woff, mask=wmask, other=0.0)  # (w_sb 0: one W0 for every row)
    c = tl.load(c0_ptr + bi * c_sb + hi * D + rd, mask=cmask, other=0.0)
    gam, bet, tau_r, tau_b, causal = _head_consts(lnw_ptr, lnb_ptr, tau_ptr, hi, rt, rd, cmask, tmask, D, MB)

    in_base, in_off, lr_base, out_base, out_off = _offsets(bi, hi, start, rt, rd, s_b, s_t, s_h, l_b, l_t, l_h,
                                                           o_b, o_t, o_h)
    sc_off = ((bi * sc_b + hi) * T + start + rt)[:, None] * D + rd[None, :]  # G rows of this (row, head)
    # software pipeline: the loads of mini-batch n + 1 are issued before the math of mini-batch n
    tm, m2 = _mb_masks(0, rt, L, cmask, MB)
    qn, kn, vn, lrn = _load_mb(q_ptr, k_ptr, v_ptr, lr_ptr, in_base + in_off, lr_base, rt, m2, tm, l_t, OUT)
    for n in range(NMB):
        if SAVE:
            if n % GROUP == 0:
                ck = (slot + n // GROUP) * H + hi
                tl.store(ckw_ptr + ck * D * D + woff, W, mask=wmask)
                tl.store(ckc_ptr + ck * D + rd, c, mask=cmask)
        t0 = n * MB
        t1 = tl.minimum(n + 1, NMB - 1) * MB
        tm, m2 = _mb_masks(t0, rt, L, cmask, MB)
        # a partial last mini-batch (the row ends inside it) leaves the weights uncommitted (tau_b -> 0)
        tau_e = tl.where(t0 + MB <= L, tau_b, 0.0)
        q = qn.to(tl.float32)
        k = kn.to(tl.float32)
        v = vn.to(tl.float32)
        lr = lrn.to(tl.float32)
        tm1, m21 = _mb_masks(t1, rt, L, cmask, MB)
        qn, kn, vn, lrn = _load_mb(q_ptr, k_ptr, v_ptr, lr_ptr, in_base + t1 * s_t + in_off, lr_base + t1 * l_t,
                                   rt, m21, tm1, l_t, OUT)

        G, xh, rstd, gy, mgx = _ln_l2_grad(_dot(k, W, DOT_MODE) + c[None, :], v, k, gam, bet, cmask, D, EPS)
        if OUT:
            P = tl.where(causal, tau_r[:, None] * lr[None, :] * (_dot(q, tl.trans(k), DOT_MODE) + 1.0), 0.0)
            o = _output(q, W, c, P, G, gam, bet, rt, rt, cmask, BT, D, DOT_MODE, EPS)
            tl.store(o_ptr + out_base + t0 * o_t + out_off, o.to(o_ptr.dtype.element_ty), mask=m2)
        else:
            tl.store(gs_ptr + sc_off + t0 * D, G, mask=m2)

        eG = (tau_e * lr)[:, None] * G
        W -= _dot(tl.trans(k), eG, DOT_MODE)
        c -= tl.sum(eG, axis=0)
    tl.store(wT_ptr + pid * D * D + woff, W, mask=wmask)
    tl.store(cT_ptr + pid * D + rd, c, mask=cmask)


@triton.jit
def _output(q, W, c, P, G, gam, bet, rq, rg, cmask, BG: tl.constexpr, D: tl.constexpr, DOT_MODE: tl.constexpr,
            EPS: tl.constexpr):
    """o = q + LN(Zb) * gam + bet with Zb = q W + c - P G, for the rows rq of q and P against the rows rg [BG] of G
    (indices in one tile; P: the causal weights, zero where masked). Causal masking by selection, not
    multiplication: a non-finite k_j / lr_j / G_j must not reach rows i < j (0 * NaN = NaN). The product P G
    takes G with its non-finite rows zeroed; the rows from the first such row on are NaN again afterwards (they
    depend on it)."""
    g_ok = tl.abs(tl.sum(G, axis=1)) < float("inf")  # rows of G all finite (not G - G == 0: FMA contraction)
    first_bad = tl.min(tl.where(g_ok, BG, rg), axis=0)
    Zb = _dot(q, W, DOT_MODE) + c[None, :] - _dot(P, tl.where(g_ok[:, None], G, 0.0), DOT_MODE)
    Zb = tl.where(rq[:, None] >= first_bad, float("nan"), Zb)
    xhb, _rstdb = _normalize(Zb, cmask, D, EPS)
    return q.to(tl.float32) + xhb * gam[None, :] + bet[None, :]


@triton.jit
def _fwd_out_kernel(
    q_ptr, k_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, ckw_ptr, ckc_ptr, gs_ptr, o_ptr, span_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h, o_b, o_t, o_h, sc_b,
    H, NCK, T,
    D: tl.constexpr, BD: tl.constexpr, MB: tl.constexpr, GT: tl.constexpr, RB: tl.constexpr, GROUP: tl.constexpr,
    DOT_MODE: tl.constexpr, EPS: tl.constexpr,
):
    """The outputs of RB rows of one checkpoint group (GROUP mini-batches, GT >= GROUP * MB rows) from its
    checkpoint (W, c) and the chain's G: the group's weight updates folded into one causal product,
    Zb = Q W_g + c_g - (E * (Q K^T + 1)) G,  E_ij = tau_b lr_j (j in an earlier mini-batch), tau_i lr_j (the same
    mini-batch, j <= i), 0 (j > i)."""
    NRB: tl.constexpr = GT // RB
    pid = tl.program_id(0) // (NCK * NRB)
    g = tl.program_id(0) // NRB % NCK
    rq = tl.program_id(0) % NRB * RB + tl.arange(0, RB)  # this program's rows of the group
    bi, hi = pid // H, pid % H
    start, L, slot = _row(span_ptr, bi)
    t0 = g * GROUP * MB
    if t0 >= L:  # a shorter row has no such group
        return
    rt = tl.arange(0, GT)
    rd = tl.arange(0, BD)
    cmask = rd < D
    tm = (rt < GROUP * MB) & (rt < L - t0)
    qm = (rq < GROUP * MB) & (rq < L - t0)
    m2 = tm[:, None] & cmask[None, :]
    mq = qm[:, None] & cmask[None, :]
    in_base, in_off, lr_base, out_base, out_off = _offsets(bi, hi, start + t0, rq, rd, s_b, s_t, s_h, l_b, l_t, l_h,
                                                           o_b, o_t, o_h)
    q = tl.load(q_ptr + in_base + in_off, mask=mq, other=0.0)  # in the input dtype (the products' operands)
    k = tl.load(k_ptr + in_base + rt[:, None] * s_t + rd[None, :], mask=m2, other=0.0)
    lr = tl.load(lr_ptr + lr_base + rt * l_t, mask=tm, other=0.0).to(tl.float32)
    G = tl.load(gs_ptr + ((bi * sc_b + hi) * T + start + t0 + rt)[:, None] * D + rd[None, :], mask=m2, other=0.0)
    ck = (slot + g) * H + hi
    W = tl.load(ckw_ptr + ck * D * D + rd[:, None] * D + rd[None, :], mask=cmask[:, None] & cmask[None, :], other=0.0)
    c = tl.load(ckc_ptr + ck * D + rd, mask=cmask, other=0.0)
    gam = tl.load(lnw_ptr + hi * D + rd, mask=cmask, other=0.0).to(tl.float32)
    bet = tl.load(lnb_ptr + hi * D + rd, mask=cmask, other=0.0).to(tl.float32)
    tau_i = tl.load(tau_ptr + rq % MB).to(tl.float32)
    tau_b = tl.load(tau_ptr + MB - 1).to(tl.float32)
    same = (rq // MB)[:, None] == (rt // MB)[None, :]
    causal = (rq[:, None] >= rt[None, :]) & tm[None, :]
    E = tl.where(same, tau_i[:, None], tau_b) * lr[None, :]
    P = tl.where(causal, E * (_dot(q, tl.trans(k), DOT_MODE) + 1.0), 0.0)
    o = _output(q, W, c, P, G, gam, bet, rq, rt, cmask, GT, D, DOT_MODE, EPS)
    tl.store(o_ptr + out_base + out_off, o.to(o_ptr.dtype.element_ty), mask=mq)


def _warps(d: int) -> int:
    # measured on H100 (docs/kernels_notes.md): d = 64 forward 0.91 ms with 4 warps vs 1.07 with 8
    return 4 if pow2(d) <= 64 else 8


# The forward runs split (the walk, then the outputs per checkpoint group) when at most this many (row, head)
# programs walk (measured on the H200, docs/kernels_notes.md), the group fits one output tile and the head dim is
# at most SPLIT_MAX_D (above it the outputs' kernel spills: offline sm_90 compile)
SPLIT_MAX_PROGRAMS = 48
SPLIT_MAX_ROWS = 128
SPLIT_MAX_D = 64
OUT_ROWS, OUT_WARPS = 64, 8  # rows per program of the outputs' launch, its warps (d 64: 254 registers, no spill)


def fwd_plan(n: int, H: int, d: int, mini_batch: int, group: int, impl: str) -> bool:
    """Whether `fwd` over n rows x H heads of dim d runs split: impl "split" | "split_gluon" | "fused" |
    "fused_gluon" as asked, "auto" | "auto_gluon" by size."""
    if impl not in FWD_IMPLS:
        raise ValueError(f"impl: expected one of {FWD_IMPLS}, got {impl!r}")
    fits = tile(group * mini_batch) <= SPLIT_MAX_ROWS
    if impl.startswith("split") and not fits:
        raise ValueError(f"impl: {impl!r} takes checkpoint groups of at most {SPLIT_MAX_ROWS} rows, got {group} "
                         f"mini-batches of {mini_batch}")
    return impl.startswith("split") or (impl.startswith("auto") and fits and n * H <= SPLIT_MAX_PROGRAMS
                                        and tile(d) <= SPLIT_MAX_D)


def fwd(q, k, v, lr, tau, ln_weight, ln_bias, W0, c0, mini_batch: int, group: int, save: bool = True,
        dot_mode: int | None = None, warps: int | None = None, info: dict | None = None, rows: Rows | None = None,
        impl: str = "auto"):
    """The rows' mini-batches (`triton_utils.Rows`; None: every batch entry whole) from a zero accumulator. q, k, v
    [B,T,H,d] (last dim contiguous, same strides); lr [B,T,H]; W0 [N,H,d,d], c0 [N,H,d] fp32, one per row (read in
    place where all but the row stride are contiguous: a row stride 0, as `TTTState.initial` expands them, reads one
    for every row). Returns o [B,T,H,d] (q's dtype; tokens in no row unwritten), W_T, c_T [N,H,d,d], [N,H,d] (a row
    ending in a partial mini-batch: the weights at its start), and the checkpoints (W, c at the start of every
    `group` mini-batches of every row, [slots, H, ...]) when `save`. dot_mode: the products' operand precision
    (None: by q's dtype, `triton_utils.dot_mode`); warps: None for the default by head dim; info: a dict that
    receives the compiled kernels (n_regs, n_spills, metadata). impl "fused": one program per (row, head) computes
    everything; "split": it walks the chain alone (storing every mini-batch's G and the checkpoints) and a second
    launch computes the outputs per (row, head, checkpoint group), all of a group's rows at once (the walk keeps two
    of its five products); "fused_gluon", "split_gluon": the same with the walk in Gluon (`walks_gluon`: head dim 64
    or 128, mini-batch 16, 16-bit inputs); "auto" ("auto_gluon"): split (split_gluon) when the walk has few programs
    (`fwd_plan`), else fused (fused_gluon); "auto" walks split in Gluon on a Hopper GPU where `walks_gluon.takes`
    the shapes (measured there: faster, docs/kernels_notes.md). The Gluon walk's warps: `walks_gluon.walk_warps`
    unless given."""
    B, T, H, d = q.shape
    rows = rows or batch_rows(B, T, mini_batch, group, q.device)
    assert rows.group == group
    split = fwd_plan(rows.n, H, d, mini_batch, group, impl)
    if impl.endswith("_gluon"):
        walks_gluon.check(d, mini_batch, q.dtype, dot_mode, f"fwd={impl!r}")
    gluon = impl.endswith("_gluon") or (impl == "auto" and split and hopper(q.device) and warps in (None, *walks_gluon.WARPS)
                                        and walks_gluon.takes(d, mini_batch, q.dtype, dot_mode))
    BD, BT = tile(d), tile(mini_batch)
    o = torch.empty((B, T, H, d), dtype=q.dtype, device=q.device)
    if W0.stride()[1:] != (d * d, d, 1) or c0.stride()[1:] != (d, 1):  # else read in place (no copy of W0)
        W0, c0 = W0.contiguous(), c0.contiguous()
    wT, cT = (torch.empty(t.shape, dtype=torch.float32, device=q.device) for t in (W0, c0))
    if save or split:
        ckw = torch.empty((rows.slots, H, d, d), dtype=torch.float32, device=q.device)
        ckc = torch.empty((rows.slots, H, d), dtype=torch.float32, device=q.device)
    else:
        ckw, ckc = wT, cT  # never written
    sc_b = 0 if rows.packed else H  # G rows [B*H or H, T, d]: per head, every row's tokens at their own positions
    gs = torch.empty(((H if rows.packed else B * H), T, d), dtype=torch.float32, device=q.device) if split else o
    mode = _auto_dot_mode(q.dtype) if dot_mode is None else dot_mode
    meta = dict(D=d, BD=BD, MB=mini_batch, GROUP=group, DOT_MODE=mode, EPS=LN_EPS)
    if gluon:
        kern = walks_gluon._fwd_kernel[(rows.n * H,)](
            q, k, v, lr, tau, ln_weight, ln_bias, W0, c0, o, wT, cT, ckw, ckc, gs, rows.span,
            *rows.strides(q), *rows.strides(lr), *rows.strides(o), sc_b, W0.stride(0), c0.stride(0), H, T, D=d,
            MB=mini_batch, GROUP=group,
            SAVE=save or split, OUT=not split, EPS=LN_EPS,
            **walks_gluon.launch(d, warps or walks_gluon.walk_warps(d, split), "LinearKernels.fwd_warps"))
    else:
        kern = ttt_linear_fwd_kernel[(rows.n * H,)](
            q, k, v, lr, tau, ln_weight, ln_bias, W0, c0, o, wT, cT, ckw, ckc, gs, rows.span,
            *rows.strides(q), *rows.strides(lr), *rows.strides(o), sc_b, W0.stride(0), c0.stride(0), H, T,
            BT=BT, SAVE=save or split, OUT=not split, num_warps=warps or _warps(d), **meta)
    if info is not None:
        info["ttt_linear_fwd_kernel"] = kern
    if split:
        GT = tile(group * mini_batch)
        RB = min(OUT_ROWS, GT)
        kern = _fwd_out_kernel[(rows.n * H * rows.nck * (GT // RB),)](
            q, k, lr, tau, ln_weight, ln_bias, ckw, ckc, gs, o, rows.span,
            *rows.strides(q), *rows.strides(lr), *rows.strides(o), sc_b, H, rows.nck, T,
            GT=GT, RB=RB, num_warps=OUT_WARPS, **meta)
        if info is not None:
            info["ttt_linear_fwd_out_kernel"] = kern
    return o, wT, cT, (ckw, ckc) if save else None


def bwd(q, k, v, lr, tau, ln_weight, ln_bias, ckpt, do, dwT, dcT, mini_batch: int, group: int,
        dot_mode: int | None = None, impl: str = "split", warps=None, info: dict | None = None,
        segments: int | None = None, rows: Rows | None = None):
    """Gradients of `fwd` (`bwd_split.py`) over the same rows. do [B,T,H,d]; dwT [N,H,d,d], dcT [N,H,d] (fp32)
    the gradients of the final state (both None: none, zeros without a read). Returns dq, dk, dv (q's dtype; zero
    at tokens in no row), dlr [B,T,H] fp32, dtau [b], dln_w, dln_b [H,d], dW0 [N,H,d,d], dc0 [N,H,d] (fp32). impl:
    "split" (the lean chain when N*H <= bwd_split.LEAN_MAX_PROGRAMS, else the full chain), or "split_lean" /
    "split_full" to force one. warps:
    (pre, chain, post), None for the defaults; segments: the time segments of the pipelined launch (None: by
    size); impl "auto": `bwd_impl`; dot_mode, info: as in `fwd`."""
    B, T, H, d = q.shape
    rows = rows or batch_rows(B, T, mini_batch, group, q.device)
    dq, dk, dv, dw0, dc0, parts = bwd_parts(q, k, v, lr, tau, ln_weight, ln_bias, ckpt, do, dwT, dcT, mini_batch,
                                            group, dot_mode, impl, warps, info, segments, rows)
    return (dq, dk, dv, *bwd_split.sums(parts, B, H, mini_batch, d, rows.n), dw0, dc0)


def bwd_impl(impl: str, d: int, mini_batch: int, dtype: torch.dtype, dot_mode: int | None,
             device: torch.device) -> str:
    """The backward that runs for impl: "auto" is "split_gluon" where the Gluon kernels take the shapes
    (`walks_gluon.takes`) on a Hopper GPU (measured there: faster than "split" at every shape timed,
    docs/kernels_notes.md), else "split"; any other impl as asked."""
    if impl not in BWD_IMPLS:
        raise ValueError(f"impl: expected one of {BWD_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    return "split_gluon" if hopper(device) and walks_gluon.takes(d, mini_batch, dtype, dot_mode) else "split"


def bwd_plan(n: int, H: int, nck: int, impl: str, segments: int | None) -> tuple[bool, int]:
    """(lean, segments) that `bwd_parts` runs with for impl (not "auto": `bwd_impl` resolves it) and segments
    (`bwd_split.plan`)."""
    if impl not in BWD_IMPLS[1:]:
        raise ValueError(f"impl: expected one of {BWD_IMPLS[1:]}, got {impl!r}")
    return bwd_split.plan(n, H, nck, {"split": None, "split_lean": True, "split_full": False, "split_gluon": False}[impl],
                          segments)


def bwd_parts(q, k, v, lr, tau, ln_weight, ln_bias, ckpt, do, dwT, dcT, mini_batch: int, group: int,
              dot_mode: int | None = None, impl: str = "split", warps=None, info: dict | None = None,
              segments: int | None = None, rows: Rows | None = None, scratch: str | None = None):
    """`bwd` before its reductions: dq, dk, dv, dW0, dc0 and the partial sums that `bwd_split.sums` adds up
    into dlr, dtau, dln_w, dln_b (the op's autograd formula adds them in traced code)."""
    B, T, H, _ = q.shape
    rows = rows or batch_rows(B, T, mini_batch, group, q.device)
    impl = bwd_impl(impl, q.shape[-1], mini_batch, q.dtype, dot_mode, q.device)
    lean, nseg = bwd_plan(rows.n, H, rows.nck, impl, segments)
    if impl == "split_gluon":
        walks_gluon.check(q.shape[-1], mini_batch, q.dtype, dot_mode)
    mode = _auto_dot_mode(q.dtype) if dot_mode is None else dot_mode
    dwT, dcT = (None if t is None else t.contiguous() for t in (dwT, dcT))
    return bwd_split.bwd_parts(q, k, v, lr, tau, ln_weight, ln_bias, ckpt, do.contiguous(), dwT, dcT, mini_batch,
                               group, dot_mode=mode, eps=LN_EPS, warps=warps, info=info, lean=lean, segments=nseg,
                               rows=rows, gluon=impl == "split_gluon", scratch=scratch)
