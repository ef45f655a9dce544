"""TTT-Linear mini-batch dual form as Triton kernels: forward and hand-derived backward.

Mirrors `ttt/ops/ttt_linear/dual.py` (docs/math.md §4) on whole, aligned mini-batches whose start state
has a zero accumulator; `ttt/ops/triton_backend.py` runs the partial pieces at either end with the
PyTorch dual form and calls these kernels on the aligned middle.

One program per (batch, head) walks the sequence one mini-batch (b rows, padded to BT >= 16) at a time.
What stays on chip: the inner weights W (d x d, fp32) and bias c (fp32) live in registers for the whole
sequence; q, k, v, lr of a mini-batch are read once, o written once. The head dim is padded to a power
of two BD with masks (d = 96 -> BD = 128); padded rows (b < 16) get lr = 0 and are never stored.
All statistics and the state are fp32; matrix products take fp32 operands (tf32 or full fp32, by
DOT_MODE) or the inputs' 16-bit dtype.

Backward: the forward saves (W, c) at the start of every GROUP mini-batches (not every mini-batch).
Two implementations, picked by `bwd(impl=)`: "split" (`bwd_split.py`: a sequential chain carrying dW, dc between
two passes parallel over checkpoint groups) and "v1" (`ttt_linear_bwd_kernel` below). v1 walks the groups in
reverse: it recomputes the group's per-mini-batch start weights from
the checkpoint into a small per-program scratch (GROUP x d x d), then walks the group's mini-batches in
reverse, carrying dW, dc (the gradient w.r.t. the weights after the mini-batch) in registers.
Per mini-batch, with x^ = LN-normalised rows, s = their std, gy = gam (gam x^ + bet - (v - k)),
G = (gy - mean gy - x^ mean(gy x^)) / s, P = E * (Q K^T + 1), Zb = Q W + c - P G, o = q + LN(Zb),
W' = W - K^T (e_b G), c' = c - sum e_b G  (e_b = tau_b lr):
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
from ..triton_utils import _center, _dot, _head_consts, _load_mb, _offsets, _proj, _tiles, dot_mode as _auto_dot_mode
from . import bwd_split

BWD_IMPLS = ("v1", "split", "split_lean", "split_full")


@triton.jit
def _inner(k, v, W, c, gam, bet, cmask, D: tl.constexpr, DOT_MODE: tl.constexpr, EPS: tl.constexpr):
    """Inner forward at the start weights and the closed-form LN-L2 gradient.
    Returns G [BT,BD], xh, rstd, gy, mgx = mean(gy xh)."""
    Z = _dot(k, W, DOT_MODE) + c[None, :]
    zc = _center(Z, cmask, D)
    rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, axis=1) / D + EPS)
    xh = zc * rstd[:, None]
    gy = gam[None, :] * (gam[None, :] * xh + bet[None, :] - (v - k))
    mg = tl.sum(gy, axis=1) / D
    mgx = tl.sum(gy * xh, axis=1) / D
    G = tl.where(cmask[None, :], (gy - mg[:, None] - xh * mgx[:, None]) * rstd[:, None], 0.0)
    return G, xh, rstd, gy, mgx


@triton.jit
def ttt_linear_fwd_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, w0_ptr, c0_ptr,
    o_ptr, wT_ptr, cT_ptr, ckw_ptr, ckc_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h, o_b, o_t, o_h,
    H, NMB, NCK,
    D: tl.constexpr, BD: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr, GROUP: tl.constexpr,
    SAVE: tl.constexpr, DOT_MODE: tl.constexpr, EPS: tl.constexpr,
):
    pid, bi, hi, rt, rd, cmask, tmask, m2 = _tiles(H, D, BD, MB, BT)
    wmask = cmask[:, None] & cmask[None, :]
    woff = rd[:, None] * D + rd[None, :]

    W = tl.load(w0_ptr + pid * D * D + woff, mask=wmask, other=0.0)
    c = tl.load(c0_ptr + pid * D + rd, mask=cmask, other=0.0)
    gam, bet, tau_r, tau_b, causal = _head_consts(lnw_ptr, lnb_ptr, tau_ptr, hi, rt, rd, cmask, tmask, D, MB)

    in_base, in_off, lr_base, out_base, out_off = _offsets(bi, hi, rt, rd, s_b, s_t, s_h, l_b, l_h, o_b, o_t, o_h)
    # software pipeline: the loads of mini-batch n + 1 are issued before the math of mini-batch n
    qn, kn, vn, lrn = _load_mb(q_ptr, k_ptr, v_ptr, lr_ptr, in_base + in_off, lr_base, rt, m2, tmask, l_t)
    for n in range(NMB):
        if SAVE:
            if n % GROUP == 0:
                ck = pid * NCK + n // GROUP
                tl.store(ckw_ptr + ck * D * D + woff, W, mask=wmask)
                tl.store(ckc_ptr + ck * D + rd, c, mask=cmask)
        t0 = n * MB
        t1 = tl.minimum(n + 1, NMB - 1) * MB
        q = qn.to(tl.float32)
        k = kn.to(tl.float32)
        v = vn.to(tl.float32)
        lr = lrn.to(tl.float32)
        qn, kn, vn, lrn = _load_mb(q_ptr, k_ptr, v_ptr, lr_ptr, in_base + t1 * s_t + in_off, lr_base + t1 * l_t,
                                   rt, m2, tmask, l_t)

        G, xh, rstd, gy, mgx = _inner(k, v, W, c, gam, bet, cmask, D, DOT_MODE, EPS)
        # causal masking by selection, not multiplication: a non-finite k_j / lr_j / G_j must not reach rows i < j
        # (0 * NaN = NaN). The product P G takes G with its non-finite rows zeroed; the rows from the first such
        # row on are NaN again afterwards (they depend on it).
        P = tl.where(causal, tau_r[:, None] * lr[None, :] * (_dot(q, tl.trans(k), DOT_MODE) + 1.0), 0.0)
        g_ok = tl.abs(tl.sum(G, axis=1)) < float("inf")  # rows of G all finite (not G - G == 0: FMA contraction)
        first_bad = tl.min(tl.where(g_ok, BT, rt), axis=0)
        Zb = _dot(q, W, DOT_MODE) + c[None, :] - _dot(P, tl.where(g_ok[:, None], G, 0.0), DOT_MODE)
        Zb = tl.where(rt[:, None] >= first_bad, float("nan"), Zb)
        zc = _center(Zb, cmask, D)
        rstdb = 1.0 / tl.sqrt(tl.sum(zc * zc, axis=1) / D + EPS)
        o = q + zc * rstdb[:, None] * gam[None, :] + bet[None, :]
        tl.store(o_ptr + out_base + t0 * o_t + out_off, o.to(o_ptr.dtype.element_ty), mask=m2)

        eG = (tau_b * lr)[:, None] * G
        W -= _dot(tl.trans(k), eG, DOT_MODE)
        c -= tl.sum(eG, axis=0)
    tl.store(wT_ptr + pid * D * D + woff, W, mask=wmask)
    tl.store(cT_ptr + pid * D + rd, c, mask=cmask)


@triton.jit
def ttt_linear_bwd_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, ckw_ptr, ckc_ptr,
    do_ptr, dwT_ptr, dcT_ptr,
    dq_ptr, dk_ptr, dv_ptr, dlr_ptr, dw0_ptr, dc0_ptr, dtau_ptr, dlnw_ptr, dlnb_ptr,
    scw_ptr, scc_ptr,
    s_b, s_t, s_h, l_b, l_t, l_h, o_b, o_t, o_h,
    H, NMB, NCK,
    D: tl.constexpr, BD: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr, GROUP: tl.constexpr,
    DOT_MODE: tl.constexpr, EPS: tl.constexpr,
):
    pid, bi, hi, rt, rd, cmask, tmask, m2 = _tiles(H, D, BD, MB, BT)
    wmask = cmask[:, None] & cmask[None, :]
    woff = rd[:, None] * D + rd[None, :]

    gam, bet, tau_r, tau_b, causal = _head_consts(lnw_ptr, lnb_ptr, tau_ptr, hi, rt, rd, cmask, tmask, D, MB)

    dW = tl.load(dwT_ptr + pid * D * D + woff, mask=wmask, other=0.0)
    dc = tl.load(dcT_ptr + pid * D + rd, mask=cmask, other=0.0)
    dgam = tl.zeros([BD], dtype=tl.float32)
    dbet = tl.zeros([BD], dtype=tl.float32)
    dtau = tl.zeros([BT], dtype=tl.float32)
    dtau_b = tl.zeros([BT], dtype=tl.float32)

    in_base, in_off, lr_base, out_base, out_off = _offsets(bi, hi, rt, rd, s_b, s_t, s_h, l_b, l_h, o_b, o_t, o_h)
    sc_base = pid * GROUP
    for gi in range(NCK):
        g = NCK - 1 - gi
        n0 = g * GROUP
        n1 = tl.minimum(n0 + GROUP, NMB)
        # recompute the start weights of every mini-batch of the group into the scratch
        W = tl.load(ckw_ptr + (pid * NCK + g) * D * D + woff, mask=wmask, other=0.0)
        c = tl.load(ckc_ptr + (pid * NCK + g) * D + rd, mask=cmask, other=0.0)
        for n in range(n0, n1):
            tl.store(scw_ptr + (sc_base + n - n0) * D * D + woff, W, mask=wmask)
            tl.store(scc_ptr + (sc_base + n - n0) * D + rd, c, mask=cmask)
            t0 = n * MB
            ptr = in_base + t0 * s_t + in_off
            k = tl.load(k_ptr + ptr, mask=m2, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + ptr, mask=m2, other=0.0).to(tl.float32)
            lr = tl.load(lr_ptr + lr_base + (t0 + rt) * l_t, mask=tmask, other=0.0).to(tl.float32)
            G, xh, rstd, gy, mgx = _inner(k, v, W, c, gam, bet, cmask, D, DOT_MODE, EPS)
            eG = (tau_b * lr)[:, None] * G
            W -= _dot(tl.trans(k), eG, DOT_MODE)
            c -= tl.sum(eG, axis=0)
        tl.debug_barrier()
        # walk the group back
        # software pipeline over the reverse walk: loads of the next (earlier) mini-batch go out first
        n = n1 - 1
        ptr = in_base + n * MB * s_t + in_off
        qn = tl.load(q_ptr + ptr, mask=m2, other=0.0)
        kn = tl.load(k_ptr + ptr, mask=m2, other=0.0)
        vn = tl.load(v_ptr + ptr, mask=m2, other=0.0)
        lrn = tl.load(lr_ptr + lr_base + (n * MB + rt) * l_t, mask=tmask, other=0.0)
        dOn = tl.load(do_ptr + out_base + n * MB * o_t + out_off, mask=m2, other=0.0)
        Wn = tl.load(scw_ptr + (sc_base + n - n0) * D * D + woff, mask=wmask, other=0.0)
        cn = tl.load(scc_ptr + (sc_base + n - n0) * D + rd, mask=cmask, other=0.0)
        for ni in range(n1 - n0):
            n = n1 - 1 - ni
            t0 = n * MB
            W = Wn
            c = cn
            q = qn.to(tl.float32)
            k = kn.to(tl.float32)
            v = vn.to(tl.float32)
            lr = lrn.to(tl.float32)
            dO = dOn.to(tl.float32)
            m = tl.maximum(n - 1, n0)
            ptr = in_base + m * MB * s_t + in_off
            qn = tl.load(q_ptr + ptr, mask=m2, other=0.0)
            kn = tl.load(k_ptr + ptr, mask=m2, other=0.0)
            vn = tl.load(v_ptr + ptr, mask=m2, other=0.0)
            lrn = tl.load(lr_ptr + lr_base + (m * MB + rt) * l_t, mask=tmask, other=0.0)
            dOn = tl.load(do_ptr + out_base + m * MB * o_t + out_off, mask=m2, other=0.0)
            Wn = tl.load(scw_ptr + (sc_base + m - n0) * D * D + woff, mask=wmask, other=0.0)
            cn = tl.load(scc_ptr + (sc_base + m - n0) * D + rd, mask=cmask, other=0.0)

            # forward recompute
            G, xh, rstd, gy, mgx = _inner(k, v, W, c, gam, bet, cmask, D, DOT_MODE, EPS)
            E = tl.where(causal, tau_r[:, None] * lr[None, :], 0.0)
            QK1 = _dot(q, tl.trans(k), DOT_MODE) + 1.0
            P = E * QK1
            Zb = _dot(q, W, DOT_MODE) + c[None, :] - _dot(P, G, DOT_MODE)
            zcb = _center(Zb, cmask, D)
            rstdb = 1.0 / tl.sqrt(tl.sum(zcb * zcb, axis=1) / D + EPS)
            xhb = zcb * rstdb[:, None]

            # output LayerNorm
            dgam += tl.sum(dO * xhb, axis=0)
            dbet += tl.sum(dO, axis=0)
            dZb = _proj(dO * gam[None, :], xhb, rstdb, cmask, D)
            # Zb = Q W + c - P G
            dq = dO + _dot(dZb, tl.trans(W), DOT_MODE)
            dP = -_dot(dZb, tl.trans(G), DOT_MODE)
            dG = -_dot(tl.trans(P), dZb, DOT_MODE)
            # carry W' = W - K^T (e_b G), c' = c - sum e_b G
            eb = tau_b * lr
            KdW = _dot(k, dW, DOT_MODE) + dc[None, :]
            S = tl.sum(KdW * G, axis=1)
            dG -= eb[:, None] * KdW
            dk = -_dot(eb[:, None] * G, tl.trans(dW), DOT_MODE)
            dlr = -tau_b * S
            dtau_b += -lr * S
            # P = E * (Q K^T + 1)
            dE = tl.where(causal, dP * QK1, 0.0)
            dA = dP * E
            dq += _dot(dA, k, DOT_MODE)
            dk += _dot(tl.trans(dA), q, DOT_MODE)
            dtau += tl.sum(dE * lr[None, :], axis=1)
            dlr += tl.sum(dE * tau_r[:, None], axis=0)
            # G = LN-L2 gradient at Z = K W + c
            dgy = _proj(dG, xh, rstd, cmask, D)
            mdgx = tl.sum(dG * xh, axis=1) / D
            dxh = (-mgx[:, None] * dG - mdgx[:, None] * gy) * rstd[:, None] + (gam * gam)[None, :] * dgy
            ds = -tl.sum(dG * G, axis=1) * rstd
            dZ = _proj(dxh, xh, rstd, cmask, D) + (ds / D)[:, None] * xh
            dgam += tl.sum(dgy * (2.0 * gam[None, :] * xh + bet[None, :] - (v - k)), axis=0)
            dbet += tl.sum(dgy * gam[None, :], axis=0)
            dv = -gam[None, :] * dgy
            dk += gam[None, :] * dgy + _dot(dZ, tl.trans(W), DOT_MODE)
            # gradient w.r.t. the start weights of this mini-batch
            dW += _dot(tl.trans(q), dZb, DOT_MODE) + _dot(tl.trans(k), dZ, DOT_MODE)
            dc += tl.sum(dZb, axis=0) + tl.sum(dZ, axis=0)

            optr = out_base + t0 * o_t + out_off
            tl.store(dq_ptr + optr, dq.to(dq_ptr.dtype.element_ty), mask=m2)
            tl.store(dk_ptr + optr, dk.to(dk_ptr.dtype.element_ty), mask=m2)
            tl.store(dv_ptr + optr, dv.to(dv_ptr.dtype.element_ty), mask=m2)
            tl.store(dlr_ptr + (bi * NMB * MB + t0 + rt) * H + hi, dlr, mask=tmask)
        tl.debug_barrier()
    tl.store(dw0_ptr + pid * D * D + woff, dW, mask=wmask)
    tl.store(dc0_ptr + pid * D + rd, dc, mask=cmask)
    dtau += tl.where(rt == MB - 1, tl.sum(dtau_b, axis=0), 0.0)
    tl.store(dtau_ptr + pid * BT + rt, dtau)
    tl.store(dlnw_ptr + pid * BD + rd, dgam)
    tl.store(dlnb_ptr + pid * BD + rd, dbet)


def _warps(d: int, backward: bool) -> int:
    # measured on H100 (docs/kernels_notes.md): d = 64 forward 0.91 ms with 4 warps vs 1.07 with 8;
    # forward + backward 6.55 ms with 4 vs 5.14 with 8 (the backward has ~3x the live tiles)
    return 8 if backward or triton.next_power_of_2(d) > 64 else 4


def fwd(q, k, v, lr, tau, ln_weight, ln_bias, W0, c0, mini_batch: int, group: int = 8, save: bool = True,
        dot_mode: int | None = None, warps: int | None = None, info: dict | None = None):
    """Aligned whole mini-batches. q, k, v [B,T,H,d] (last dim contiguous, same strides), T % b == 0;
    lr [B,T,H]; W0 [B,H,d,d], c0 [B,H,d] fp32 contiguous. Returns o [B,T,H,d] (q's dtype), W_T, c_T,
    and the checkpoints (W, c at the start of every `group` mini-batches) when `save`.
    dot_mode: the products' operand precision (None: by q's dtype, `triton_utils.dot_mode`); warps: None for
    the default by head dim; info: a dict that receives the compiled kernel (n_regs, n_spills, metadata)."""
    B, T, H, d = q.shape
    nmb = T // mini_batch
    nck = triton.cdiv(nmb, group)
    BD = triton.next_power_of_2(d)
    BT = max(16, triton.next_power_of_2(mini_batch))
    o = torch.empty((B, T, H, d), dtype=q.dtype, device=q.device)
    wT, cT = torch.empty_like(W0), torch.empty_like(c0)
    if save:
        ckw = torch.empty((B, H, nck, d, d), dtype=torch.float32, device=q.device)
        ckc = torch.empty((B, H, nck, d), dtype=torch.float32, device=q.device)
    else:
        ckw, ckc = wT, cT  # never written
    mode = _auto_dot_mode(q.dtype) if dot_mode is None else dot_mode
    kern = ttt_linear_fwd_kernel[(B * H,)](
        q, k, v, lr, tau, ln_weight, ln_bias, W0, c0, o, wT, cT, ckw, ckc,
        q.stride(0), q.stride(1), q.stride(2), lr.stride(0), lr.stride(1), lr.stride(2),
        o.stride(0), o.stride(1), o.stride(2), H, nmb, nck,
        D=d, BD=BD, MB=mini_batch, BT=BT, GROUP=group, SAVE=save, DOT_MODE=mode, EPS=LN_EPS,
        num_warps=warps or _warps(d, False))
    if info is not None:
        info["ttt_linear_fwd_kernel"] = kern
    return o, wT, cT, (ckw, ckc) if save else None


def bwd(q, k, v, lr, tau, ln_weight, ln_bias, ckpt, do, dwT, dcT, mini_batch: int, group: int = 8,
        dot_mode: int | None = None, impl: str = "v1", warps=None, info: dict | None = None,
        segments: int | None = None):
    """Gradients of the aligned forward. do [B,T,H,d]; dwT [B,H,d,d], dcT [B,H,d] (fp32) the gradients of
    the final state. Returns dq, dk, dv (q's dtype), dlr [B,T,H] fp32, dtau [b], dln_w, dln_b [H,d],
    dW0 [B,H,d,d], dc0 [B,H,d] (fp32).
    impl: "v1" (one program per (batch, head), this file) or "split" (`bwd_split.py`: a sequential chain
    between two passes parallel over checkpoint groups; "split_lean" / "split_full" force its two chain variants,
    "split" picks by B*H). warps: v1 an int, split a (pre, chain, post) tuple;
    None for the defaults. segments: split only, the time segments of its pipelined launch (None: by size).
    dot_mode, info: as in `fwd`."""
    if impl not in BWD_IMPLS:
        raise ValueError(f"impl: expected one of {BWD_IMPLS}, got {impl!r}")
    mode = _auto_dot_mode(q.dtype) if dot_mode is None else dot_mode
    do = do.contiguous()
    if impl.startswith("split"):
        lean = {"split": None, "split_lean": True, "split_full": False}[impl]
        return bwd_split.bwd(q, k, v, lr, tau, ln_weight, ln_bias, ckpt, do, dwT.contiguous(), dcT.contiguous(),
                             mini_batch, group, dot_mode=mode, eps=LN_EPS, warps=warps, info=info,
                             lean=lean, segments=segments)
    B, T, H, d = q.shape
    nmb = T // mini_batch
    nck = triton.cdiv(nmb, group)
    BD = triton.next_power_of_2(d)
    BT = max(16, triton.next_power_of_2(mini_batch))
    ckw, ckc = ckpt
    dq, dk, dv = (torch.empty((B, T, H, d), dtype=q.dtype, device=q.device) for _ in range(3))
    dlr = torch.empty((B, T, H), dtype=torch.float32, device=q.device)
    dw0 = torch.empty((B, H, d, d), dtype=torch.float32, device=q.device)
    dc0 = torch.empty((B, H, d), dtype=torch.float32, device=q.device)
    dtau = torch.empty((B * H, BT), dtype=torch.float32, device=q.device)
    dlnw = torch.empty((B * H, BD), dtype=torch.float32, device=q.device)
    dlnb = torch.empty((B * H, BD), dtype=torch.float32, device=q.device)
    scw = torch.empty((B * H * group, d, d), dtype=torch.float32, device=q.device)
    scc = torch.empty((B * H * group, d), dtype=torch.float32, device=q.device)
    kern = ttt_linear_bwd_kernel[(B * H,)](
        q, k, v, lr, tau, ln_weight, ln_bias, ckw, ckc, do, dwT.contiguous(), dcT.contiguous(),
        dq, dk, dv, dlr, dw0, dc0, dtau, dlnw, dlnb, scw, scc,
        q.stride(0), q.stride(1), q.stride(2), lr.stride(0), lr.stride(1), lr.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), H, nmb, nck,
        D=d, BD=BD, MB=mini_batch, BT=BT, GROUP=group, DOT_MODE=mode, EPS=LN_EPS,
        num_warps=warps or _warps(d, True))
    if info is not None:
        info["ttt_linear_bwd_kernel"] = kern
    dtau = dtau.sum(0)[:mini_batch]
    dlnw = dlnw.view(B, H, BD).sum(0)[:, :d]
    dlnb = dlnb.view(B, H, BD).sum(0)[:, :d]
    return dq, dk, dv, dlr, dtau, dlnw, dlnb, dw0, dc0
