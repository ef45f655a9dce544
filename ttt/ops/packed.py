"""Packed documents (docs/packed.md): one sequence of T tokens holding N documents back to back, their
boundaries given as `cu_seqlens` (int64 [N + 1], 0 = cu[0] < ... < cu[N] = T), each document computed as if
it were alone: every state (TTT weights, conv windows, attention, SSM) starts afresh at its first token.

`packing(cu_seqlens, T, device)` checks the boundaries once (`common.check_cu_seqlens`) and returns a
`Packing`: the boundaries on the host and on the device, and what every layer derives from them (the
document index and the position within its document of every token). Layers take either a cu_seqlens
tensor or a `Packing`, so a model checks and derives once per forward, not once per layer.

`per_document(op, x, state, cu_seqlens)` is the reference for the TTT op on packed input: each document alone
through `op` (a `TTTOp`, or any callable op(x: TTTInputs, state)), the final state of every document stacked
into one row each.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .common import TTTInputs, TTTState, check_cu_seqlens


@dataclass(frozen=True, eq=False)
class Packing:
    """Checked boundaries of N documents packed into one sequence of T tokens (see `packing`)."""

    cu_seqlens: torch.Tensor  # int64 [N + 1] on the tokens' device
    bounds: tuple  # the same N + 1 offsets as host ints
    seq_idx: torch.Tensor  # int64 [T]: the document of every token
    positions: torch.Tensor  # int64 [T]: every token's position within its document (0 at its first token)
    memo: dict = field(default_factory=dict, repr=False)  # what a layer derives once per call (attention masks)

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
        return torch.tensor(starts, device=self.positions.device)[self.seq_idx] + self.positions

    def memoize(self, key: str, make):
        """make() the first time `key` is asked for on this packing, the same object after that."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]


def packing(cu_seqlens, T: int, device=None, *, batch_size: int = 1, state_rows: int | None = None) -> Packing:
    """The `Packing` of `cu_seqlens` (an int64 tensor [N + 1] on any device, or a `Packing` already built)
    for a packed sequence of T tokens on `device`; raises naming cu_seqlens when the boundaries, the batch
    size (must be 1) or the rows of a given state (must be N) do not fit (docs/packed.md)."""
    if isinstance(cu_seqlens, Packing):  # built by a caller for this call: check that it fits
        check_cu_seqlens(torch.tensor(cu_seqlens.bounds), T, batch_size, state_rows)
        return cu_seqlens
    bounds = check_cu_seqlens(cu_seqlens, T, batch_size, state_rows)
    device = device if device is not None else cu_seqlens.device
    cu = cu_seqlens.to(device)
    n = len(bounds) - 1
    seq_idx = torch.repeat_interleave(torch.arange(n, device=device), cu[1:] - cu[:-1], output_size=T)  # [T]
    positions = torch.arange(T, device=device) - cu[seq_idx]  # [T]
    return Packing(cu, tuple(bounds), seq_idx, positions)


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
