"""Shared pieces of the TTT ops: the explicit state, input validation, and the inner-loop math helpers
(LayerNorm forward and its closed-form gradient, tanh-GELU and its derivative, the tau vector).

Every backend (naive, dual, triton, step) takes and returns the same `TTTState` (docs/math.md §5):
start-of-mini-batch weights, the gated gradient sums of the current partial mini-batch, and the
position. Weights and accumulators are fp32 (fp64 when the inputs are fp64).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

LN_EPS = 1e-6

# Names of the inner weights per kind, in the order they are stored in `TTTState.params`.
PARAM_NAMES = {"linear": ("W1", "b1"), "mlp": ("W1", "b1", "W2", "b2")}


@dataclass
class TTTState:
    """Explicit state of one TTT op over a batch.

    kind:   "linear", "mlp", or "generic" (any inner nn.Module, see ops/generic.py).
    params: start-of-mini-batch inner weights. linear: (W1 [B,H,d,d], b1 [B,H,d]);
            mlp: (W1 [B,H,d,F], b1 [B,H,F], W2 [B,H,F,d], b2 [B,H,d]).
    accum:  same shapes as params: sum over the tokens already seen in the current (partial)
            mini-batch of lr_j * grad l_j(params); all zero when pos % mini_batch == 0.
    pos:    number of tokens consumed so far (the in-batch index of the next token is pos % b); after packed
            documents (`TTTInputs.cu_seqlens`) one int per row, each document's own count.
    """

    kind: str
    params: tuple
    accum: tuple
    pos: int = 0

    @property
    def batch_size(self) -> int:
        return self.params[0].shape[0]

    @property
    def num_heads(self) -> int:
        return self.params[0].shape[1]

    @property
    def head_dim(self) -> int:
        return self.params[0].shape[2]

    @staticmethod
    def initial(kind: str, params, batch_size: int, dtype: torch.dtype = torch.float32) -> "TTTState":
        """Broadcast per-head initial weights ([H,...] each, e.g. learnable W0/b0) over the batch.

        The expansion is differentiable, so gradients flow back to the initial weights.
        """
        if kind not in (*PARAM_NAMES, "generic"):
            raise ValueError(f"kind: expected one of {[*PARAM_NAMES, 'generic']}, got {kind!r}")
        if kind in PARAM_NAMES and len(params) != len(PARAM_NAMES[kind]):
            raise ValueError(f"params: expected {len(PARAM_NAMES[kind])} tensors for kind {kind!r}, got {len(params)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        full = tuple(p.to(dtype).unsqueeze(0).expand(batch_size, *p.shape) for p in params)
        accum = tuple(torch.zeros_like(p) for p in full)
        return TTTState(kind, full, accum, 0)

    def detach(self) -> "TTTState":
        return replace(self, params=tuple(p.detach() for p in self.params),
                       accum=tuple(a.detach() for a in self.accum))

    def to(self, *args, **kwargs) -> "TTTState":
        return replace(self, params=tuple(p.to(*args, **kwargs) for p in self.params),
                       accum=tuple(a.to(*args, **kwargs) for a in self.accum))


@dataclass
class RowsState(TTTState):
    """A TTT-Linear state in the one-token decode's own form (`ops.fused_layer.linear_decode_step`): the
    accumulators kept as the rows they sum instead of their d x d sums, so that a step reads its mini-batch's
    earlier rows (at most b of 2 d each) instead of reading and writing an accumulator of d x d.

    accum: (A0 [B,H,d,d], a0 [B,H,d], K [B,H,b,d], G [B,H,b,d], pre [B,H]): the TTTState accumulators (A, a) =
    pre * (A0, a0) + sum over rows s < pos % b of (k_s^T g_s, g_s), where k_s is token s's (RoPE'd) key and g_s
    its inner gradient times its learning rate. A0, a0 hold the partial mini-batch a TTTState came with
    (`RowsState.of`); pre is 1 where they still count, 0 from that mini-batch's commit on. The other fields as
    TTTState's."""

    @staticmethod
    def of(state: TTTState, mini_batch: int) -> "RowsState":
        """`state` (kind "linear", fp32 accumulators) in the rows form; its accumulators become A0, a0."""
        if state.kind != "linear" or not isinstance(state.pos, int):
            raise ValueError(f"state: expected a TTT-Linear state of one position, got kind {state.kind!r}")
        A, a = state.accum
        B, H, d = a.shape
        rows = A.new_zeros(B, H, mini_batch, d)
        pre = A.new_full((B, H), float(state.pos % mini_batch != 0))
        return RowsState("linear", state.params, (A, a, rows, rows.clone(), pre), state.pos)

    def summed(self) -> TTTState:
        """This state as a TTTState (its accumulators summed from the rows)."""
        A0, a0, K, G, pre = self.accum
        r = self.pos % K.shape[2]
        on = pre[..., None] > 0
        A = torch.where(on[..., None], A0, 0.0) + torch.einsum("bhsd,bhse->bhde", K[:, :, :r], G[:, :, :r])
        a = torch.where(on, a0, 0.0) + G[:, :, :r].sum(2)
        return TTTState("linear", self.params, (A, a), self.pos)


@dataclass(frozen=True)
class TTTInputs:
    """The inputs of one TTT op call (docs/math.md §§3-5), one value instead of seven arguments.

    q, k, v:   [B, T, H, d], any float dtype (the output has q's dtype).
    lr:        [B, T, H], the per-token inner learning rate base_lr * sigma_j / d.
    tau:       [b], the per-position factor tau_i; its length is the mini-batch size b (`mini_batch`).
    ln_weight, ln_bias: [H, d], the inner LayerNorm, or both None for none.
    cu_seqlens: packed documents (docs/packed.md): int64 [N + 1] boundaries (or their `ttt.ops.packed.Packing`)
               of N documents in one sequence (B = 1), each run from its own row of the state (N rows, pos an int
               shared by all or one per row); None: B independent sequences. Every backend reads it from here.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    lr: torch.Tensor
    tau: torch.Tensor
    ln_weight: torch.Tensor | None = None
    ln_bias: torch.Tensor | None = None
    cu_seqlens: object = None  # torch.Tensor | Packing | None

    @property
    def mini_batch(self) -> int:
        return self.tau.shape[0]

    def __post_init__(self):
        if self.cu_seqlens is not None and isinstance(self.q, torch.Tensor) and self.q.dim() == 4:
            object.__setattr__(self, "cu_seqlens", self.packing)  # checked and derived once (frozen: no setattr)

    @property
    def packing(self):
        """The checked `ttt.ops.packed.Packing` of cu_seqlens (None without packed documents)."""
        if self.cu_seqlens is None:
            return None
        from .packed import Packing, packing  # packed.py builds on this module
        if isinstance(self.cu_seqlens, Packing) and self.cu_seqlens.total == self.q.shape[1]:
            return self.cu_seqlens
        return packing(self.cu_seqlens, self.q.shape[1], self.q.device, batch_size=self.q.shape[0])

    def tokens(self, start: int, stop: int | None = None) -> "TTTInputs":
        """The inputs of tokens [start, stop) (views) as plain sequences (any document boundaries dropped)."""
        s = slice(start, stop)
        return replace(self, q=self.q[:, s], k=self.k[:, s], v=self.v[:, s], lr=self.lr[:, s], cu_seqlens=None)

    def select(self, index: torch.Tensor, cu_seqlens=None) -> "TTTInputs":
        """The inputs of the tokens at `index` (int64 [n], along T; copies), with the boundaries `cu_seqlens`."""
        return replace(self, q=self.q.index_select(1, index), k=self.k.index_select(1, index),
                       v=self.v.index_select(1, index), lr=self.lr.index_select(1, index), cu_seqlens=cu_seqlens)

    def check(self, kind: str, state: "TTTState") -> None:
        """Validate the inputs and `state` for a `kind` op; raise ValueError/TypeError naming the argument,
        expected and received."""
        q, k, v, lr, tau, ln_weight, ln_bias = self.q, self.k, self.v, self.lr, self.tau, self.ln_weight, self.ln_bias
        if not isinstance(state, TTTState):
            raise TypeError(f"state: expected a TTTState, got {type(state).__name__}")
        if state.kind != kind:
            raise ValueError(f"state: expected a state of kind {kind!r}, got one of kind {state.kind!r}")
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{name}: expected shape [B, T, H, d] (4 dims), got {tuple(t.shape)}")
            if not t.is_floating_point():
                raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
        B, T, H, d = q.shape
        for name, t in (("k", k), ("v", v)):
            if t.shape != q.shape:
                raise ValueError(f"{name}: expected shape {tuple(q.shape)} like q, got {tuple(t.shape)}")
            if t.dtype != q.dtype:
                raise TypeError(f"{name}: expected dtype {q.dtype} like q, got {t.dtype}")
        if T == 0:
            raise ValueError("q: expected a non-empty sequence (T >= 1), got T = 0")
        if not isinstance(lr, torch.Tensor) or lr.shape != (B, T, H):
            got = tuple(lr.shape) if isinstance(lr, torch.Tensor) else type(lr).__name__
            raise ValueError(f"lr: expected shape {(B, T, H)} ([B, T, H]), got {got}")
        if not isinstance(tau, torch.Tensor) or tau.dim() != 1 or tau.shape[0] < 1:
            got = tuple(tau.shape) if isinstance(tau, torch.Tensor) else type(tau).__name__
            raise ValueError(f"tau: expected shape [mini_batch] (one dim, at least one entry), got {got}")
        if (ln_weight is None) != (ln_bias is None):  # both None means no inner LayerNorm
            name, other = ("ln_weight", "ln_bias") if ln_weight is None else ("ln_bias", "ln_weight")
            raise ValueError(f"{name}: expected shape {(H, d)} ([H, d]), or None together with {other} (no inner "
                             "LayerNorm), got None")
        for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or t.shape != (H, d):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected shape {(H, d)} ([H, d]), got {got}")
        for name, t in (("k", k), ("v", v), ("lr", lr), ("tau", tau), ("ln_weight", ln_weight), ("ln_bias", ln_bias),
                        *(("state", t) for t in (*state.params, *state.accum))):
            if t is not None and t.device != q.device:
                raise ValueError(f"{name}: expected device {q.device} like q, got {t.device}")
        pk = self.packing  # checks cu_seqlens against q
        if pk is not None:
            check_cu_seqlens(torch.tensor(pk.bounds), T, B, state.batch_size)  # host values: no device sync
            pk.row_positions(state.pos)
        elif state.batch_size != B:
            raise ValueError(f"state: expected batch size {B} like q, got a state of batch size {state.batch_size}")
        if state.num_heads != H or state.head_dim != d:
            raise ValueError(f"state: expected {H} heads of dim {d} like q, got {state.num_heads} heads of dim "
                             f"{state.head_dim}")
        if len(state.accum) != len(state.params) or any(a.shape != p.shape for a, p in zip(state.accum, state.params)):
            raise ValueError(f"state: expected accumulators shaped like the weights "
                             f"{[tuple(p.shape) for p in state.params]}, got {[tuple(a.shape) for a in state.accum]}")
        if any(not isinstance(p, int) or p < 0 for p in (pk.row_positions(state.pos) if pk else (state.pos,))):
            raise ValueError(f"state: expected a non-negative int pos{' (or one per document)' if pk else ''}, "
                             f"got {state.pos!r}")


def compute_dtype(q: torch.Tensor) -> torch.dtype:
    """Inner-loop precision: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def make_tau(delta: torch.Tensor) -> torch.Tensor:
    """tau_i = max(0, 1/i + delta_i), i = 1..b (docs/math.md §3). delta: [b] -> [b]."""
    i = torch.arange(1, delta.shape[-1] + 1, device=delta.device, dtype=delta.dtype)
    return torch.clamp(1.0 / i + delta, min=0.0)


def layer_norm(z, weight, bias, eps: float = LN_EPS):
    """Per-head LayerNorm over the last dim. z: [..., H, n, d] with weight/bias [H, 1, d] broadcastable."""
    mu = z.mean(-1, keepdim=True)
    var = z.var(-1, keepdim=True, unbiased=False)
    return (z - mu) / torch.sqrt(var + eps) * weight + bias


def ln_fused_l2_grad(z, target, weight, bias, eps: float = LN_EPS):
    """d/dz of 0.5*||LN(z) - target||^2 in closed form (docs/math.md §2). All args broadcast to z's shape."""
    d = z.shape[-1]
    mu = z.mean(-1, keepdim=True)
    var = z.var(-1, keepdim=True, unbiased=False)
    std = torch.sqrt(var + eps)
    xhat = (z - mu) / std
    gy = weight * (weight * xhat + bias - target)
    return (d * gy - gy.sum(-1, keepdim=True) - xhat * (gy * xhat).sum(-1, keepdim=True)) / (d * std)


def inner_grad(z, target, weight, bias):
    """d/dz of the inner loss 0.5*||LN(z) - target||^2, or of 0.5*||z - target||^2 when weight is None
    (no inner LayerNorm)."""
    return z - target if weight is None else ln_fused_l2_grad(z, target, weight, bias)


def inner_out(x, z, weight, bias, residual: bool):
    """The inner model's output for input x and pre-norm prediction z: x + LN(z) (residual) or LN(z);
    LN is the identity when weight is None."""
    zn = z if weight is None else layer_norm(z, weight, bias)
    return x + zn if residual else zn


def causal_tril(n: int, device) -> torch.Tensor:
    """[n, n] bool, True on and below the diagonal (j <= i)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def causal_matmul(attn, G):
    """attn @ G for a lower-triangular attn [..., n, n] (zero above the diagonal) such that a non-finite
    G[j] reaches only rows i >= j: products 0 * NaN of masked-out entries would otherwise make earlier
    rows NaN. Rows that do sum a non-finite G[j] (j <= i) come out NaN, as the plain product would."""
    bad = ~torch.isfinite(G)  # [..., n, m]
    out = attn @ torch.where(bad, torch.zeros((), dtype=G.dtype, device=G.device), G)
    reached = bad.cumsum(-2) > 0  # [..., n, m]: some j <= i has a non-finite G[j]
    return torch.where(reached, torch.full((), float("nan"), dtype=out.dtype, device=out.device), out)


def gelu(x):
    return F.gelu(x, approximate="tanh")


def gelu_grad(x):
    """Exact derivative of tanh-GELU."""
    c = math.sqrt(2.0 / math.pi)
    inner = c * (x + 0.044715 * x ** 3)
    t = torch.tanh(inner)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x)


def segments(T: int, pos: int, b: int):
    """Split T tokens starting at absolute position `pos` into pieces that never cross a mini-batch
    boundary. Yields (start, length, offset) with offset = in-batch index of the piece's first token."""
    t = 0
    while t < T:
        off = (pos + t) % b
        n = min(b - off, T - t)
        yield t, n, off
        t += n


def step_inputs(x: TTTInputs, state: TTTState):
    """The one-token step's operands in the compute dtype, one token per row: q, k, v [R,H,1,d], lr [R,H,1,1],
    tau [b], the in-batch index i of every row's token (an int shared by the rows, or int64 [R] for rows at
    their own positions), tau_i (broadcastable to [R,H,1,d]), gamma/beta [H,1,d] (or None), and the state's
    params and accum. Rows: the batch (x [B,1,...]), or packed documents of one token each (x [1,N,...])."""
    ct = compute_dtype(x.q)
    pk = x.packing
    if pk is not None and pk.num_docs != x.q.shape[1]:
        raise ValueError(f"cu_seqlens: the one-token step takes documents of one token each, got lengths {pk.lengths}")
    row = (lambda t: t[:, 0]) if pk is None else (lambda t: t[0])  # [B,1,H,...] or [1,N,H,...] -> [R,H,...]
    qt, kt, vt = (row(t).to(ct).unsqueeze(-2) for t in (x.q, x.k, x.v))  # [R,H,1,d]
    lr_t = row(x.lr).to(ct)[..., None, None]  # [R,H,1,1]
    tau = x.tau.to(ct)
    if pk is None:
        i = state.pos % x.mini_batch
        t_i = tau[i]
    else:
        i = torch.tensor([p % x.mini_batch for p in pk.row_positions(state.pos)], device=tau.device)
        t_i = tau[i].view(-1, 1, 1, 1)  # [R,1,1,1]
    gam, bet = ln_operands(x, ct)
    params = tuple(p.to(ct) for p in state.params)
    accum = tuple(a.to(ct) for a in state.accum)
    return qt, kt, vt, lr_t, tau, i, t_i, gam, bet, params, accum


def step_output(x: TTTInputs, o: torch.Tensor) -> torch.Tensor:
    """The step's rows [R,H,1,d] back in x's layout ([B,1,H,d], or [1,N,H,d] for packed documents), x's dtype."""
    o = o.squeeze(-2).to(x.q.dtype)  # [R,H,d]
    return o.unsqueeze(1) if x.cu_seqlens is None else o.unsqueeze(0)


def end_pos(x: TTTInputs, state: TTTState):
    """The state's pos after x: pos + T, or every document's own end position when x holds packed documents."""
    return state.pos + x.q.shape[1] if x.packing is None else x.packing.end_positions(state.pos)


def ln_operands(x: TTTInputs, ct: torch.dtype):
    """The inner LayerNorm's weight and bias as [H,1,d] in dtype ct, or (None, None) without one."""
    if x.ln_weight is None:
        return None, None
    return x.ln_weight.to(ct)[:, None, :], x.ln_bias.to(ct)[:, None, :]


def advance(params, accum, n: int, off, tau) -> tuple:
    """After a piece of n tokens at in-batch offset `off` (an int, or int64 [R] per row): commit the mini-batch
    where it is complete (`commit`)."""
    return commit(params, accum, off + n == tau.shape[0], tau)


def commit(params, accum, done, tau) -> tuple:
    """End of a mini-batch where `done` (a bool, or bool [R] per row): W <- W - tau_b * accum, accum <- 0; the
    other rows keep their start weights and accumulators."""
    t_b = tau[-1]
    if isinstance(done, bool):
        if not done:
            return params, accum
        return tuple(p - t_b * a for p, a in zip(params, accum)), tuple(torch.zeros_like(a) for a in accum)
    rows = [done.view(-1, *[1] * (a.dim() - 1)) for a in accum]  # [R] -> [R,1,...] per tensor
    params = tuple(torch.where(m, p - t_b * a, p) for p, a, m in zip(params, accum, rows))
    accum = tuple(torch.where(m, torch.zeros_like(a), a) for a, m in zip(accum, rows))
    return params, accum


def check_cu_seqlens(cu_seqlens, T: int, batch_size: int = 1, state_rows: int | None = None) -> list[int]:
    """Check the boundaries of packed documents (docs/packed.md) and return them as host ints.

    cu_seqlens: int64 [N + 1] on any device: 0 = cu[0] < cu[1] < ... < cu[N] = T, document i holding tokens
    cu[i] .. cu[i+1]-1 of one packed sequence (batch_size 1); zero-length documents are refused. state_rows:
    the rows of a given state, which must be N (one per document). Reads the values on the host (a device
    sync when cu_seqlens lives on a GPU: pass it on the CPU to avoid one).
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens: expected an int64 tensor [N + 1], got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int64:
        raise TypeError(f"cu_seqlens: expected dtype torch.int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected shape [N + 1] with N >= 1 documents, got {tuple(cu_seqlens.shape)}")
    if batch_size != 1:
        raise ValueError(f"cu_seqlens: expected a batch of one packed sequence, got batch size {batch_size}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens: expected to start at 0, got {cu[0]}")
    bad = next((i for i in range(len(cu) - 1) if cu[i + 1] <= cu[i]), None)
    if bad is not None:
        raise ValueError(f"cu_seqlens: expected strictly increasing offsets (every document at least one token), "
                         f"got {cu[bad]} then {cu[bad + 1]} at index {bad}")
    if cu[-1] != T:
        raise ValueError(f"cu_seqlens: expected to end at T = {T} (the packed length), got {cu[-1]}")
    if state_rows is not None and state_rows != len(cu) - 1:
        raise ValueError(f"cu_seqlens: {len(cu) - 1} documents, but the given state has {state_rows} rows; "
                         f"expected one row per document")
    return cu
