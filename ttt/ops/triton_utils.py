"""Triton helpers shared by every TTT kernel (chunk forward/backward, F-blocked MLP, decode steps), and
the Python glue they share. Kernel files import from here, never from each other.

The chunk kernels walk rows (`Rows`): one program per (row, head), row n holding the tokens [start_n, end_n)
of batch entry n (a batch of sequences) or of the one packed sequence (packed documents: the kernels get zero
batch strides). A row's mini-batches start at its first token; the last one may be partial (its missing rows
masked, its weights left uncommitted: the caller adds the accumulators).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import TTTInputs, TTTState
from .packed import upload


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of host ints. Launch glue uses these two instead of triton.cdiv / triton.next_power_of_2, which
    cost 6-9 us per call on the host (Triton 3.6, measured on the CPU) and run dozens of times per layer call."""
    return -(-a // b)


def sm_count(device) -> int | None:
    """The SM count of a CUDA device, which launches size their grids by; None for any other device (or None)."""
    if getattr(device, "type", None) != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def hopper(device) -> bool:
    """Whether device is a Hopper GPU (sm_90: wgmma, and the Gluon kernels written for it)."""
    return getattr(device, "type", None) == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def pow2(n: int) -> int:
    """The smallest power of two >= n, of a host int n >= 1 (`cdiv`); a loop, so that a traced symbolic size works
    too (a fake implementation under dynamic shapes)."""
    p = 1
    while p < n:
        p *= 2
    return p


def tile(n: int) -> int:
    """The tile side that holds n features or tokens: the next power of two, at least 16 (the smallest product
    dimension tl.dot takes on the GPU; the interpreter takes any). The padding is masked by the kernels."""
    return max(16, pow2(n))


@dataclass(frozen=True)
class Rows:
    """The rows a chunk kernel launch walks (module docstring).

    span:    int32 [N, 3] on the inputs' device: every row's first token, end (exclusive) and first checkpoint
             slot (row n owns slots span[n, 2] .. + cdiv(its mini-batches, group)).
    packed:  the rows are documents of batch entry 0 (the kernels read with zero batch strides).
    nmb:     the most mini-batches of any row (grids over checkpoint groups size by it).
    slots:   checkpoint slots of all rows.
    covered: every token of the inputs belongs to a row (else the backward zero-fills the others' gradients).
    group:   mini-batches per checkpoint.
    lengths: every row's tokens (end - first token), on the host (the smem kernels' schedule and the partial last
             mini-batches they leave to the backend); not passed to the kernels.
    """

    span: torch.Tensor
    packed: bool
    nmb: int
    slots: int
    covered: bool
    group: int
    lengths: tuple = ()

    @property
    def n(self) -> int:
        return self.span.shape[0]

    @property
    def nck(self) -> int:
        """Checkpoint groups of the longest row (the per-group grids)."""
        return cdiv(self.nmb, self.group)

    def strides(self, t: torch.Tensor) -> tuple:
        """t's (batch, time, head) strides as the kernels take them: no batch stride for packed rows."""
        return (0 if self.packed else t.stride(0)), t.stride(1), t.stride(2)


def batch_rows(B: int, T: int, mini_batch: int, group: int, device, start: int = 0) -> Rows:
    """B rows, tokens [start, T) of each batch entry (built on the device: no host-to-device copy)."""
    nmb = cdiv(T - start, mini_batch)
    nck = cdiv(nmb, group)
    n = torch.arange(B, device=device, dtype=torch.int32)
    span = torch.stack([torch.full_like(n, start), torch.full_like(n, T), n * nck], 1)  # [B, 3]
    return Rows(span, False, nmb, B * nck, start == 0, group, (T - start,) * B)


def document_rows(bounds, mini_batch: int, group: int, cu: torch.Tensor | None = None, heads=None,
                  device=None) -> Rows:
    """One row per packed document: document n's tokens bounds[n] + heads[n] .. bounds[n + 1] (heads: tokens
    run elsewhere, none by default). The spans are made on the host and copied without waiting for the device
    (`packed.upload`: one copy, where computing them from the boundaries on the device took seven launches); cu:
    the boundaries on the device (int64 [N + 1]), which name the device when `device` is None."""
    device = device if device is not None else cu.device
    lengths = [e - s - (heads[i] if heads else 0) for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))]
    per = mini_batch * group
    nck = [cdiv(n, per) for n in lengths]
    nmb = cdiv(max(lengths), mini_batch)
    first = [0]
    for c in nck[:-1]:
        first.append(first[-1] + c)
    span = upload([(e - n, e, f) for e, n, f in zip(bounds[1:], lengths, first)], torch.int32, device)  # [N, 3]
    return Rows(span, True, nmb, sum(nck), not heads or not any(heads), group, tuple(lengths))


@triton.jit
def _row(span_ptr, n):
    """Row n of a `Rows` span: its first token, its length, its first checkpoint slot."""
    start = tl.load(span_ptr + 3 * n)
    end = tl.load(span_ptr + 3 * n + 1)
    slot = tl.load(span_ptr + 3 * n + 2)
    return start, end - start, slot


@triton.jit
def _when(mask, ok):
    """mask where the scalar condition ok holds, else all False (ok broadcast as a block first: Triton's
    interpreter refuses a block & a scalar as a load mask)."""
    return mask & (tl.zeros(mask.shape, tl.int32) + ok.to(tl.int32) != 0)


@triton.jit
def _mb_masks(t0, rt, L, cmask, MB: tl.constexpr):
    """The masks of the mini-batch tile whose first row is the row's token t0 (>= 0): the real rows (< b, within
    the row's L tokens) [BT] and the same by columns [BT, BD]."""
    tm = rt < tl.minimum(L - t0, MB)
    return tm, tm[:, None] & cmask[None, :]


def dot_mode(dtype: torch.dtype) -> int:
    """The _dot mode for inputs of `dtype`: their own 16-bit type, else tf32 when PyTorch allows it, else fp32."""
    if dtype == torch.bfloat16:
        return 2
    if dtype == torch.float16:
        return 3
    return 1 if torch.backends.cuda.matmul.allow_tf32 else 0


@triton.jit
def _dot(a, b, DOT_MODE: tl.constexpr):
    """a @ b with fp32 accumulation. DOT_MODE 0: full fp32, 1: tf32, 2: bf16 operands, 3: fp16 operands."""
    if DOT_MODE == 0:
        return tl.dot(a, b, input_precision="ieee")
    elif DOT_MODE == 1:
        return tl.dot(a, b, input_precision="tf32")
    elif DOT_MODE == 2:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))


@triton.jit
def _add2(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def _add3(a0, b0, c0, a1, b1, c1):
    return a0 + a1, b0 + b1, c0 + c1


@triton.jit
def _proj_from(g, xh, rstd, sg, sgx, cmask, D: tl.constexpr):
    """`_proj` from the row sums of g and g xh (sg, sgx [BT]), so that callers can sum them with others at once."""
    return tl.where(cmask[None, :], (g - (sg / D)[:, None] - xh * (sgx / D)[:, None]) * rstd[:, None], 0.0)


@triton.jit
def _proj(g, xh, rstd, cmask, D: tl.constexpr):
    """(g - mean g - xh mean(g xh)) * rstd, row-wise, zero on padded columns: the LayerNorm backward (both row sums
    in one reduction: where a row spans warps, each reduction is a round through shared memory and a barrier)."""
    sg, sgx = tl.reduce((g, g * xh), 1, _add2)
    return _proj_from(g, xh, rstd, sg, sgx, cmask, D)


@triton.jit
def _normalize(z, cmask, D: tl.constexpr, EPS: tl.constexpr):
    """Row-wise LayerNorm of z [BT, BD] over its first D columns, without weight and bias: x^ (zero on the padded
    columns) and 1/std per row."""
    zc = tl.where(cmask[None, :], z - (tl.sum(z, axis=1) / D)[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, axis=1) / D + EPS)
    return zc * rstd[:, None], rstd


@triton.jit
def _ln_l2_grad(z, v, k, gam, bet, cmask, D: tl.constexpr, EPS: tl.constexpr):
    """d/dz of the inner loss 0.5 ||LN(z) - (v - k)||^2 in closed form (docs/math.md §2), row-wise: G, and x^,
    1/std, gy = gam (gam x^ + bet - (v - k)) and mean(gy x^), which its backward (`_ln_l2_grad_bwd`) reuses."""
    xh, rstd = _normalize(z, cmask, D, EPS)
    gy = gam[None, :] * (gam[None, :] * xh + bet[None, :] - (v - k))
    sg, sgx = tl.reduce((gy, gy * xh), 1, _add2)
    return _proj_from(gy, xh, rstd, sg, sgx, cmask, D), xh, rstd, gy, sgx / D


@triton.jit
def _ln_l2_grad_bwd(dG, G, xh, rstd, gy, mgx, gam, cmask, D: tl.constexpr):
    """The backward of `_ln_l2_grad` from dG (the gradient w.r.t. its G): dgy (the target's gradient is
    -gam dgy; the LN weight and bias terms use it too) and dz."""
    sg, sgx, sgG = tl.reduce((dG, dG * xh, dG * G), 1, _add3)
    dgy = _proj_from(dG, xh, rstd, sg, sgx, cmask, D)
    dxh = (-mgx[:, None] * dG - (sgx / D)[:, None] * gy) * rstd[:, None] + (gam * gam)[None, :] * dgy
    return dgy, _proj(dxh, xh, rstd, cmask, D) - (sgG * rstd / D)[:, None] * xh  # (the last: ds x^ / D)


@triton.jit
def _tiles(H, D: tl.constexpr, BD: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr):
    """This program's (batch, head) and the mini-batch tile's indices: rows rt [BT], columns rd [BD], the masks
    of the real rows (< b) and columns (< d), and the [BT, BD] mask of both."""
    pid = tl.program_id(0)
    rt = tl.arange(0, BT)
    rd = tl.arange(0, BD)
    cmask = rd < D
    tmask = rt < MB
    return pid, pid // H, pid % H, rt, rd, cmask, tmask, tmask[:, None] & cmask[None, :]


@triton.jit
def _offsets(bi, hi, start, rt, rd, s_b, s_t, s_h, l_b, l_t, l_h, o_b, o_t, o_h):
    """Element offsets of this (row, head), whose first token is `start`: the start of its inputs and of its lr,
    the [BT, BD] offsets of a mini-batch tile within the inputs, and the same for the outputs (which have their
    own strides)."""
    return (bi * s_b + start * s_t + hi * s_h, rt[:, None] * s_t + rd[None, :], bi * l_b + start * l_t + hi * l_h,
            bi * o_b + start * o_t + hi * o_h, rt[:, None] * o_t + rd[None, :])


@triton.jit
def _head_consts(lnw_ptr, lnb_ptr, tau_ptr, hi, rt, rd, cmask, tmask, D: tl.constexpr, MB: tl.constexpr):
    """A head's constants, fp32: LN weight and bias [BD], tau_i per row [BT], tau_b, and the causal mask
    [BT, BT] of the real rows (j <= i, j < b)."""
    gam = tl.load(lnw_ptr + hi * D + rd, mask=cmask, other=0.0).to(tl.float32)
    bet = tl.load(lnb_ptr + hi * D + rd, mask=cmask, other=0.0).to(tl.float32)
    tau_r = tl.load(tau_ptr + rt, mask=tmask, other=0.0).to(tl.float32)
    tau_b = tl.load(tau_ptr + MB - 1).to(tl.float32)
    causal = (rt[:, None] >= rt[None, :]) & tmask[None, :]
    return gam, bet, tau_r, tau_b, causal


@triton.jit
def _load_mb(q_ptr, k_ptr, v_ptr, lr_ptr, x_off, lr_off, rt, m2, tmask, l_t, WITH_Q: tl.constexpr = True):
    """One mini-batch's q, k, v tiles [BT, BD] (element offsets x_off) and lr [BT] (from lr_off), in the input
    dtype, zero on padded rows and columns (WITH_Q False: q not read, k returned in its place)."""
    k = tl.load(k_ptr + x_off, mask=m2, other=0.0)
    if WITH_Q:
        q = tl.load(q_ptr + x_off, mask=m2, other=0.0)
    else:
        q = k
    v = tl.load(v_ptr + x_off, mask=m2, other=0.0)
    lr = tl.load(lr_ptr + lr_off + rt * l_t, mask=tmask, other=0.0)
    return q, k, v, lr


@triton.jit
def _gelu_parts(x):
    """tanh-GELU(x) and its exact derivative, fp32."""
    c = 0.7978845608028654
    u = c * (x + 0.044715 * x * x * x)
    t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
    y = 0.5 * x * (1.0 + t)
    dy = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)
    return y, dy


@triton.jit
def _gelu_parts2(x):
    """tanh-GELU(x), its derivative and its second derivative, fp32."""
    c = 0.7978845608028654
    a = 0.044715
    u = c * (x + a * x * x * x)
    t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
    du = c * (1.0 + 3.0 * a * x * x)
    y = 0.5 * x * (1.0 + t)
    s = 1.0 - t * t
    dy = 0.5 * (1.0 + t) + 0.5 * x * s * du
    ddy = s * (du - x * t * du * du + 3.0 * a * c * x * x)
    return y, dy, ddy


@triton.jit
def _step_token(q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, s_b, s_h, l_b, l_h, H, i_pos,
                D: tl.constexpr, BD: tl.constexpr):
    """A decode step program's token: its (batch, head) pid, bi, hi, the columns rd [BD] and their mask, q, k, v
    [BD], lr, this position's tau_i and the head's LN weight and bias [BD], all fp32."""
    pid = tl.program_id(0)
    bi = pid // H
    hi = pid % H
    rd = tl.arange(0, BD)
    cmask = rd < D
    x_off = bi * s_b + hi * s_h + rd
    q = tl.load(q_ptr + x_off, mask=cmask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + x_off, mask=cmask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + x_off, mask=cmask, other=0.0).to(tl.float32)
    lr = tl.load(lr_ptr + bi * l_b + hi * l_h).to(tl.float32)
    t_i = tl.load(tau_ptr + i_pos).to(tl.float32)
    gam = tl.load(lnw_ptr + hi * D + rd, mask=cmask, other=0.0).to(tl.float32)
    bet = tl.load(lnb_ptr + hi * D + rd, mask=cmask, other=0.0).to(tl.float32)
    return pid, bi, hi, rd, cmask, q, k, v, lr, t_i, gam, bet


@triton.jit
def _normalize_vec(z, cmask, D: tl.constexpr, EPS: tl.constexpr):
    """LayerNorm of one vector z [BD] over its first D entries, without weight and bias: x^ (zero on the padding)
    and 1/std."""
    zc = tl.where(cmask, z - tl.sum(z, axis=0) / D, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, axis=0) / D + EPS)
    return zc * rstd, rstd


@triton.jit
def _ln_l2_grad_vec(z, v, k, gam, bet, cmask, D: tl.constexpr, EPS: tl.constexpr):
    """`_ln_l2_grad` for one token: d/dz of 0.5 ||LN(z) - (v - k)||^2, [BD] (zero on the padding)."""
    xh, rstd = _normalize_vec(z, cmask, D, EPS)
    gy = gam * (gam * xh + bet - (v - k))
    return tl.where(cmask, (gy - tl.sum(gy, axis=0) / D - xh * (tl.sum(gy * xh, axis=0) / D)) * rstd, 0.0)


@triton.jit
def _linear_step(q, k, v, qr, kr, lr, t_i, gam, bet, W, c, A, a, cmask, D: tl.constexpr, EPS: tl.constexpr):
    """One TTT-Linear one-token step on chip (docs/math.md §5, primal form), fp32: q, k, v [BD] and qr, kr, the same
    q and k indexing the rows of W [BD, BD]; c, a [BD]; A [BD, BD]. Returns the output o [BD] and the new
    accumulators A, a (the weights a commit gives are W - t_i A, c - t_i a)."""
    g = _ln_l2_grad_vec(tl.sum(kr[:, None] * W, axis=0) + c, v, k, gam, bet, cmask, D, EPS)  # at k W + c
    A = A + (lr * kr)[:, None] * g[None, :]
    a = a + lr * g
    xh, _rstd = _normalize_vec(tl.sum(qr[:, None] * (W - t_i * A), axis=0) + c - t_i * a, cmask, D, EPS)
    return q + xh * gam + bet, A, a


@triton.jit
def _step_store(wn_ptr, cn_ptr, an_ptr, abn_ptr, pid, woff, wmask, rd, cmask, W, c, A, a, t_i, D: tl.constexpr,
                BD: tl.constexpr, COMMIT: tl.constexpr):
    """Write one (batch, head)'s state after a step: on a commit the new weights W - t_i A, c - t_i a and zero
    accumulators, else the accumulators."""
    if COMMIT:
        tl.store(wn_ptr + pid * D * D + woff, W - t_i * A, mask=wmask)
        tl.store(cn_ptr + pid * D + rd, c - t_i * a, mask=cmask)
        tl.store(an_ptr + pid * D * D + woff, tl.zeros([BD, BD], dtype=tl.float32), mask=wmask)
        tl.store(abn_ptr + pid * D + rd, tl.zeros([BD], dtype=tl.float32), mask=cmask)
    else:
        tl.store(an_ptr + pid * D * D + woff, A, mask=wmask)
        tl.store(abn_ptr + pid * D + rd, a, mask=cmask)


def step_operands(x: TTTInputs, state: TTTState):
    """Checks shared by the fused step kernels (fp32 compute, no backward) and their token operands:
    q0, k0, v0 [B,H,d] with equal strides and a contiguous last dim, lr0 [B,H]."""
    q, k, v, lr, tau, ln_weight, ln_bias = x.q, x.k, x.v, x.lr, x.tau, x.ln_weight, x.ln_bias
    if q.dtype == torch.float64:
        raise ValueError("q: the fused step kernel computes in fp32; expected fp32/fp16/bf16 inputs, got float64 "
                         "(the triton backend sends float64 to the dual form)")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (q, k, v, lr, tau, ln_weight, ln_bias, *state.params, *state.accum)):
        raise ValueError("q: the fused step kernel has no backward; run it under torch.no_grad() or use the "
                         "PyTorch step (the triton backend does so for calls that need gradients)")
    q0, k0, v0 = (x[:, 0] for x in (q, k, v))  # [B,1,H,d] -> [B,H,d]
    if not (q0.stride() == k0.stride() == v0.stride()) or q0.stride(-1) != 1:
        q0, k0, v0 = q0.contiguous(), k0.contiguous(), v0.contiguous()
    return q0, k0, v0, lr[:, 0]


@triton.jit
def _finite_rows(x):
    """[BT] mask of the rows of x whose entries are all finite."""
    s = tl.sum(x, axis=1)
    return (s - s) == 0.0


@triton.jit
def _finite_or_0(x):
    """x with its non-finite entries replaced by 0."""
    return tl.where(tl.abs(x) < float("inf"), x, 0.0)


@triton.jit
def _live_rows(q, k, v, lr, gsum, causal):
    """The backward's NaN containment, for one mini-batch: which rows (tokens) pass gradient into the state path
    (`live`) and from their outputs (`out`), and whether the state after the mini-batch does (`keep`). A token
    whose k, v, lr or inner gradients are not all finite poisons its own and every later output and the state (as
    in the forward): it ends all three. A non-finite q reaches only its own output: only that output is dropped.
    gsum [BT]: the row sums of the inner gradients (non-finite when a row has a non-finite entry)."""
    ok = _finite_rows(k) & _finite_rows(v) & (tl.abs(lr) < float("inf")) & (tl.abs(gsum) < float("inf"))
    live = tl.sum(tl.where(causal & (~ok)[None, :], 1.0, 0.0), axis=1) == 0.0
    return live, live & _finite_rows(q), tl.sum(tl.where(ok, 0.0, 1.0), axis=0) == 0.0
