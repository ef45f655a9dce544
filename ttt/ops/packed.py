"""Packed documents (docs/packed.md): one sequence of T tokens holding N documents back to back, their
boundaries given as `cu_seqlens` (int64 [N + 1], 0 = cu[0] < ... < cu[N] = T), each document computed as if
it were alone: every state (TTT weights, conv windows, attention, SSM) starts afresh at its first token.

`packing(cu_seqlens, T, device)` checks the boundaries once (`common.check_cu_seqlens`) and returns a
`Packing`: the boundaries on the host and on the device, and what layers derive from them (the document index
and the position within its document of every token, made on first use: the TTT op alone needs neither). Layers
take either a cu_seqlens tensor or a `Packing`, so a model checks and derives once per forward, not once per
layer.

`per_document(op, x, state, cu_seqlens)` is the slowest reference for the TTT op on packed input: each
document alone through `op` (a `TTTOp`, or any callable op(x: TTTInputs, state)), the final state of every
document stacked into one row each. The ops themselves take packed inputs (`TTTInputs.cu_seqlens`).

`scan(body, x, state)` is the dual form's loop over mini-batches, for both kinds: aligned pieces of B sequences,
or the mini-batch windows of packed documents (`Window`: every document's j-th window at once, a document's
first window starting at its own first token, its last one partial), around `body`, the math of one piece.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .common import (TTTInputs, TTTState, advance, check_cu_seqlens, commit, compute_dtype, end_pos, ln_operands,
                     segments)


@dataclass(frozen=True, eq=False)
class Packing:
    """Checked boundaries of N documents packed into one sequence of T tokens (see `packing`)."""

    cu_seqlens: torch.Tensor  # int64 [N + 1] on the tokens' device
    bounds: tuple  # the same N + 1 offsets as host ints
    memo: dict = field(default_factory=dict, repr=False)  # what a layer derives once per call (attention masks)

    @property
    def seq_idx(self) -> torch.Tensor:
        """int64 [T]: the document of every token (made on first use)."""
        cu, n = self.cu_seqlens, self.num_docs
        return self.memoize("seq_idx", lambda: torch.repeat_interleave(
            torch.arange(n, device=cu.device), cu[1:] - cu[:-1], output_size=self.total))

    @property
    def positions(self) -> torch.Tensor:
        """int64 [T]: every token's position within its document, 0 at its first token (made on first use)."""
        cu = self.cu_seqlens
        return self.memoize("positions", lambda: torch.arange(self.total, device=cu.device) - cu[self.seq_idx])

    @property
    def num_docs(self) -> int:
        return len(self.bounds) - 1

    @property
    def total(self) -> int:
        return self.bounds[-1]

    @property
    def spans(self) -> list[tuple[int, int]]:
        """(start, end) of every document, end exclusive."""
        return list(zip(self.bounds[:-1], self.bounds[1:]))

    @property
    def lengths(self) -> list[int]:
        return [e - s for s, e in self.spans]

    def split(self, x: torch.Tensor, dim: int = 1) -> list[torch.Tensor]:
        """x cut into its documents along `dim` (views)."""
        return list(x.split(self.lengths, dim))

    def row_positions(self, pos) -> tuple:
        """The start position of every document: `pos` of a state, an int shared by every row or one int per
        row (what a packed call returns)."""
        if isinstance(pos, int):
            return (pos,) * self.num_docs
        if isinstance(pos, tuple) and len(pos) == self.num_docs and all(isinstance(p, int) for p in pos):
            return pos
        raise ValueError(f"state: expected a position shared by all rows (an int) or one per document "
                         f"({self.num_docs} ints), got {pos!r}")

    def end_positions(self, pos) -> tuple:
        """The position of every document after this call, from the state's `pos` (see `row_positions`)."""
        return tuple(p + n for p, n in zip(self.row_positions(pos), self.lengths))

    def token_positions(self, pos) -> torch.Tensor:
        """int64 [T]: every token's position counted from its document's start position (`row_positions`)."""
        starts = self.row_positions(pos)
        if not any(starts):
            return self.positions
        return upload(starts, torch.int64, self.positions.device)[self.seq_idx] + self.positions

    def memoize(self, key: str, make):
        """make() the first time `key` is asked for on this packing, the same object after that."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]


def upload(values, dtype: torch.dtype, device) -> torch.Tensor:
    """Host values (a list, or a CPU tensor) as a tensor of `dtype` on `device` without waiting for the device: on
    CUDA through pinned memory, copied asynchronously (the caching host allocator keeps the block until the copy
    has run; a plain `torch.tensor(..., device=cuda)` synchronizes the stream)."""
    if torch.device(device).type != "cuda" or torch.compiler.is_compiling():  # traced: a constant of the graph
        return torch.as_tensor(values, dtype=dtype).to(device)
    return torch.as_tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)


def packing(cu_seqlens, T: int, device=None, *, batch_size: int = 1, state_rows: int | None = None) -> Packing:
    """The `Packing` of `cu_seqlens` (an int64 tensor [N + 1] on any device, or a `Packing` already built)
    for a packed sequence of T tokens on `device`; raises naming cu_seqlens when the boundaries, the batch
    size (must be 1) or the rows of a given state (must be N) do not fit (docs/packed.md)."""
    if isinstance(cu_seqlens, Packing):  # built by a caller for this call: check that it fits
        check_cu_seqlens(torch.tensor(cu_seqlens.bounds), T, batch_size, state_rows)
        return cu_seqlens
    bounds = check_cu_seqlens(cu_seqlens, T, batch_size, state_rows)
    device = device if device is not None else cu_seqlens.device
    # boundaries from the host go through pinned memory (a pageable copy would wait for the stream to drain)
    cu = upload(cu_seqlens, torch.int64, device) if cu_seqlens.device.type == "cpu" else cu_seqlens.to(device)
    return Packing(cu, tuple(bounds))


def per_document(op, x: TTTInputs, state: TTTState, cu_seqlens):
    """The TTT op on packed documents, one document at a time: the reference (docs/packed.md).

    op(x: TTTInputs, state) -> (o, state): the op on one sequence (a `TTTOp`, a `GenericOp`, or any callable
    with that signature). x: one packed sequence (q, k, v [1, T, H, d], lr [1, T, H]); state: N rows, one per
    document, its pos an int (every document starts there) or one int per row. Returns (o [1, T, H, d], the
    final states stacked: row i is document i's, pos one int per row).
    """
    if not isinstance(state, TTTState):
        raise TypeError(f"state: expected a TTTState, got {type(state).__name__}")
    pk = packing(cu_seqlens, x.q.shape[1], x.q.device, batch_size=x.q.shape[0], state_rows=state.batch_size)
    outs, finals = [], []
    for i, ((s, e), pos) in enumerate(zip(pk.spans, pk.row_positions(state.pos))):
        row = TTTState(state.kind, tuple(p[i:i + 1] for p in state.params), tuple(a[i:i + 1] for a in state.accum),
                       pos)
        o, fin = op(x.tokens(s, e), row)
        outs.append(o)
        finals.append(fin)
    params = tuple(torch.cat(rows) for rows in zip(*(f.params for f in finals)))  # N x [1, ...] -> [N, ...]
    accum = tuple(torch.cat(rows) for rows in zip(*(f.accum for f in finals)))
    return torch.cat(outs, dim=1), TTTState(state.kind, params, accum, tuple(f.pos for f in finals))


@dataclass(frozen=True)
class Window:
    """R windows of b slots over a packed sequence: slot s of window r is token tokens[r, s] where valid[r, s]
    (elsewhere tokens holds some in-range index and the slot is empty)."""

    tokens: torch.Tensor  # int64 [R, b]
    valid: torch.Tensor  # bool [R, b]

    @staticmethod
    def of(first, lo, hi, b: int, device) -> "Window":
        """Window r covers tokens first[r] .. first[r] + b - 1 and holds those in [lo[r], hi[r]) (host int lists;
        hi[r] >= 1). Built on the host, copied without waiting for the device (`upload`)."""
        first, lo, hi = (torch.tensor(t, dtype=torch.int64) for t in (first, lo, hi))
        tok = first[:, None] + torch.arange(b)  # [R, b]
        valid = (tok >= lo[:, None]) & (tok < hi[:, None])
        return Window(upload(torch.where(valid, tok, hi[:, None] - 1), torch.int64, device),
                      upload(valid, torch.bool, device))

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """t [T, ...] (one packed sequence) -> [R, b, ...], zero in the empty slots (where: no 0 * NaN)."""
        valid = self.valid.view(*self.valid.shape, *[1] * (t.dim() - 1))
        return torch.where(valid, t[self.tokens], torch.zeros((), dtype=t.dtype, device=t.device))


def document_windows(pk: Packing, starts, b: int):
    """The dual form's schedule over packed documents: document n, at position starts[n], puts its tokens in
    slots starts[n] % b onwards of consecutive windows of b slots (so its mini-batches start where its own
    count says). Returns (order, steps, inverse): the documents by decreasing number of windows (int64 [N]);
    per step j, the j-th window of each document that has one (the first `count` in `order`, a `Window`) and
    whether it ends its mini-batch (bool [count]: commit); and the token order that undoes the steps (int64 [T]:
    position t of the concatenated valid slots holds token inverse[t])."""
    dev = pk.cu_seqlens.device
    off = [p % b for p in starts]
    n_win = [-(-(o + n) // b) for o, n in zip(off, pk.lengths)]
    order = sorted(range(pk.num_docs), key=lambda i: -n_win[i])  # stable: equal counts keep their order
    steps, placed = [], []
    for j in range(n_win[order[0]]):
        docs = [i for i in order if n_win[i] > j]
        first = [pk.bounds[i] - off[i] + j * b for i in docs]
        win = Window.of(first, [pk.bounds[i] for i in docs], [pk.bounds[i + 1] for i in docs], b, dev)
        done = upload([(j + 1) * b <= off[i] + pk.lengths[i] for i in docs], torch.bool, dev)
        steps.append((win, done))
        placed.append(win.tokens[win.valid])
    inverse = torch.argsort(torch.cat(placed))  # [T]
    return upload(order, torch.int64, dev), steps, inverse


def scan(body, x: TTTInputs, state: TTTState, residual: bool = True):
    """The dual form (docs/math.md §4) of one kind: o [B,T,H,d] (x's dtype) and the new state, with the math of
    one piece in `body`:

        body(q, k, v, lr, tau_i, gam, bet, params, accum, residual) -> (o, accum + the piece's gated gradients)

    on R rows of n tokens (q, k, v [R,H,n,d], lr [R,H,n] in the compute dtype; tau_i [n]: the tau of the piece's
    in-batch positions; gam, bet [H,1,d] or None; params, accum [R,H,...]); `scan` commits finished mini-batches.
    B sequences: pieces that never cross a mini-batch boundary (`segments`). Packed documents: the windows of
    `document_windows`, all documents' j-th at once (empty slots: zero tokens with lr 0, which add nothing).
    """
    ct = compute_dtype(x.q)
    tau = x.tau.to(ct)
    gam, bet = ln_operands(x, ct)
    params = tuple(p.to(ct) for p in state.params)
    accum = tuple(a.to(ct) for a in state.accum)
    pk, b = x.packing, x.mini_batch
    outs = []
    if pk is None:
        Q, K, V = (t.transpose(1, 2).to(ct) for t in (x.q, x.k, x.v))  # [B,T,H,d] -> [B,H,T,d]
        LR = x.lr.transpose(1, 2).to(ct)  # [B,T,H] -> [B,H,T]
        for t0, n, off in segments(x.q.shape[1], state.pos, b):
            s = slice(t0, t0 + n)
            o, accum = body(Q[:, :, s], K[:, :, s], V[:, :, s], LR[:, :, s], tau[off:off + n], gam, bet, params,
                            accum, residual)
            outs.append(o)
            params, accum = advance(params, accum, n, off, tau)
        o = torch.cat(outs, dim=2).transpose(1, 2)  # [B,H,T,d] -> [B,T,H,d]
    else:
        order, steps, inverse = document_windows(pk, pk.row_positions(state.pos), b)
        params, accum = (tuple(t.index_select(0, order) for t in ts) for ts in (params, accum))  # rows by order
        q, k, v, lr = (t[0] for t in (x.q, x.k, x.v, x.lr))  # [T,H,d], [T,H]
        for win, done in steps:
            c = done.shape[0]  # the documents with a j-th window: the first c rows
            q_, k_, v_ = (win.gather(t).to(ct).transpose(1, 2) for t in (q, k, v))  # [c,b,H,d] -> [c,H,b,d]
            lr_ = win.gather(lr).to(ct).transpose(1, 2)  # [c,b,H] -> [c,H,b]
            o, acc = body(q_, k_, v_, lr_, tau, gam, bet, tuple(p[:c] for p in params),
                          tuple(a[:c] for a in accum), residual)
            new, acc = commit(tuple(p[:c] for p in params), acc, done, tau)
            params = tuple(torch.cat([p_new, p[c:]]) for p_new, p in zip(new, params))
            accum = tuple(torch.cat([a_new, a[c:]]) for a_new, a in zip(acc, accum))
            outs.append(o.transpose(1, 2)[win.valid])  # [c,H,b,d] -> the valid slots' rows [n, H, d]
        o = torch.cat(outs)[inverse][None]  # [T,H,d] in token order -> [1,T,H,d]
        back = torch.argsort(order)
        params, accum = (tuple(t.index_select(0, back) for t in ts) for ts in (params, accum))
    return o.to(x.q.dtype), TTTState(state.kind, params, accum, end_pos(x, state))


def rows_of(state: TTTState, rows) -> TTTState:
    """The state of the given rows (host ints; pos: theirs when per row)."""
    idx = upload(rows, torch.int64, state.params[0].device)
    pos = state.pos if isinstance(state.pos, int) else tuple(state.pos[i] for i in rows)
    return TTTState(state.kind, tuple(p.index_select(0, idx) for p in state.params),
                    tuple(a.index_select(0, idx) for a in state.accum), pos)


def packed_windows(x: torch.Tensor, state: torch.Tensor | None, pk, n: int) -> torch.Tensor:
    """Every packed document's last n inputs [N, n, C] (its window after this call): x [T, C] the packed inputs,
    state [N, n, C] the documents' windows before it (None: zeros; in x's dtype), pk their `Packing`. A document
    shorter than n keeps the last n - length rows of its old window first."""
    N = pk.num_docs
    if state is None:
        state = x.new_zeros(N, n, x.shape[-1])
    if not n:
        return state
    ends, lengths = pk.cu_seqlens[1:], pk.cu_seqlens[1:] - pk.cu_seqlens[:-1]  # [N] each
    rows = torch.arange(N, device=x.device)
    window = [torch.where((lengths - n + k >= 0)[:, None], x[(ends - n + k).clamp(min=0)],
                          state[rows, (lengths + k).clamp(max=n - 1)]) for k in range(n)]  # n x [N, C]
    return torch.stack(window, dim=1)  # [N, n, C]
