"""Transformer++ self-attention baseline (no biases, RoPE, causal SDPA) with a KV-cache state,
and `apply_rope`, the adjacent-pair rotary embedding that the TTT layer reuses.

forward(x, state) over any split of a sequence, carrying the returned KVCache, equals one forward
over the whole sequence. forward(x, cu_seqlens=cu) on packed documents (docs/packed.md): each token
attends within its own document only, RoPE positions restart at every document (`document_attention`:
FlexAttention with a block mask on CUDA, SDPA with a boolean mask elsewhere).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.packed import Packing, packing
from .conv import check_input_dtype


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate adjacent pairs (x[..., 2i], x[..., 2i+1]) by angle positions[t] * base^(-2i/d).

    x: [B, T, H, d] with d even; positions: [T] integer tensor of absolute positions.
    Angles are computed in fp32; cos, sin and the rotation in fp32 (fp64 for fp64 x), cast back to x's dtype.
    """
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"x: expected [B, T, H, d] with even d, got shape {tuple(x.shape)}")
    if positions.dim() != 1 or positions.shape[0] != x.shape[1] or positions.is_floating_point():
        raise ValueError(f"positions: expected an integer tensor of shape [{x.shape[1]}], "
                         f"got {positions.dtype} of shape {tuple(positions.shape)}")
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)  # [d/2]
    angles = positions.to(x.device, torch.float32)[:, None] * inv_freq  # [T, d/2]
    cd = torch.promote_types(x.dtype, torch.float32)
    cos = angles.to(cd).cos()[:, None, :]  # [T, 1, d/2], broadcast over heads
    sin = angles.to(cd).sin()[:, None, :]
    xf = x.to(cd)
    x1, x2 = xf[..., 0::2], xf[..., 1::2]  # [B, T, H, d/2] each: the two members of every pair
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # [B, T, H, d/2, 2]
    return out.flatten(-2).to(x.dtype)  # [B, T, H, d], pairs back in place


@dataclass
class KVCache:
    """Keys and values of every token seen so far, RoPE already applied.

    k, v: [B, H, L, d]; pos: absolute position of the next token (L when nothing was dropped).
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: int = 0

    def detach(self) -> "KVCache":
        return replace(self, k=self.k.detach(), v=self.v.detach())


@dataclass(frozen=True)
class PackedEnd:
    """What attention returns after packed documents: only where each one ended (pos, one int per document).
    It keeps no KV cache (caches of unequal lengths do not stack), so nothing continues from it."""

    pos: tuple

    def detach(self) -> "PackedEnd":
        return self


class Attention(nn.Module):
    """Causal multi-head self-attention, Transformer++ style. x: [B, T, D] -> [B, T, D]."""

    decode_period = 1  # decoding: every position runs the same step ...
    static_decode_state = False  # ... but the KV cache grows with the context (not CUDA-graph capturable)
    packed_state = False  # packed documents: no state in or out (KV caches of unequal lengths do not stack)

    def __init__(self, d_model: int, n_heads: int, rope_base: float = 10000.0):
        super().__init__()
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"n_heads: d_model={d_model} must split into heads of even width, got n_heads={n_heads}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.rope_base = rope_base
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o = nn.Linear(d_model, d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        for lin in (self.qkv, self.o):
            nn.init.normal_(lin.weight, std=0.02)

    def init_state(self, batch_size: int, device=None, dtype=None) -> KVCache:
        device = device or self.o.weight.device
        dtype = dtype or self.o.weight.dtype
        empty = torch.zeros(batch_size, self.n_heads, 0, self.head_dim, device=device, dtype=dtype)
        return KVCache(empty, empty.clone(), 0)

    def _check(self, x: torch.Tensor, state: KVCache | None):
        if x.dim() != 3 or x.shape[-1] != self.d_model or x.shape[1] < 1:
            raise ValueError(f"x: expected [B, T>=1, {self.d_model}], got shape {tuple(x.shape)}")
        check_input_dtype(x, self.qkv.weight)
        if state is None:
            return
        if not isinstance(state, KVCache):
            raise TypeError(f"state: expected a KVCache, got {type(state).__name__}")
        want = (x.shape[0], self.n_heads, self.head_dim)
        for name, t in (("k", state.k), ("v", state.v)):
            if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != want:
                raise ValueError(f"state: expected {name} of shape [{want[0]}, {want[1]}, L, {want[2]}], "
                                 f"got {tuple(t.shape)}")

    def forward(self, x: torch.Tensor, state: KVCache | None = None, cu_seqlens=None):
        """x: [B, T, D] -> (y, KVCache). With cu_seqlens (int64 [N + 1], or a `Packing`): x [1, T, D] holds N
        packed documents, each attended alone; no state is taken, and the one returned (`PackedEnd`) holds only their
        end positions."""
        self._check(x, state)
        B, T, D = x.shape
        H, d = self.n_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, T, 3, H, d).unbind(2)  # [B, T, H, d] each
        if cu_seqlens is not None:
            if state is not None:
                raise ValueError("state: attention over packed documents starts every document afresh and returns no "
                                 "KV cache; pass no state with cu_seqlens")
            pk = packing(cu_seqlens, T, x.device, batch_size=B)
            q, k = (apply_rope(t, pk.positions, self.rope_base).transpose(1, 2) for t in (q, k))  # [1, H, T, d]
            y = document_attention(q, k, v.transpose(1, 2), pk)
            return self.o(y.transpose(1, 2).reshape(B, T, D)), PackedEnd(pk.end_positions(0))  # [1,H,T,d] -> [1,T,H*d]
        pos = 0 if state is None else state.pos
        positions = torch.arange(pos, pos + T, device=x.device)
        q = apply_rope(q, positions, self.rope_base).transpose(1, 2)  # [B, H, T, d]
        k = apply_rope(k, positions, self.rope_base).transpose(1, 2)
        v = v.transpose(1, 2)
        L = 0 if state is None else state.k.shape[2]
        if L:
            k = torch.cat([state.k.to(k.dtype), k], dim=2)  # [B, H, L+T, d]
            v = torch.cat([state.v.to(v.dtype), v], dim=2)
            # query i sits at cache index L+i and sees every key up to and including itself
            mask = torch.arange(T, device=x.device)[:, None] + L >= torch.arange(L + T, device=x.device)  # [T, L+T]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, D)  # [B, H, T, d] -> [B, T, H*d]
        return self.o(y), KVCache(k, v, pos + T)


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: Packing, *,
                       flex: bool | None = None) -> torch.Tensor:
    """Causal attention inside each packed document. q, k, v: [1, H, T, d] -> [1, H, T, d].

    flex (default: on CUDA): FlexAttention, compiled, with a block mask listing per block of 128 queries only
    the key blocks of its own documents (blocks between documents are skipped, not masked); else SDPA with
    a boolean [T, T] mask. Both are PyTorch's own attention; a model builds each mask once per forward (memo
    on the Packing). Off CUDA FlexAttention runs uncompiled and without a backward (tests).
    """
    if flex if flex is not None else q.is_cuda:
        fn = _compiled_flex() if q.is_cuda else _flex_attention()
        return fn(q, k, v, block_mask=pk.memoize("flex_block_mask", lambda: document_block_mask(pk)))
    mask = pk.memoize("sdpa_mask", lambda: document_mask(pk))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def document_mask(pk: Packing) -> torch.Tensor:
    """[T, T] bool: query t sees key s when s <= t in the same document."""
    doc, T = pk.seq_idx, pk.total
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    return causal & (doc[:, None] == doc[None, :])


def document_block_mask(pk: Packing, block_size: int = 128):
    """The FlexAttention BlockMask of `document_mask`, built from the document boundaries of every block
    (never as a [T, T] tensor): key block j serves query block i when j <= i and they share a document; it
    is full (no mask_mod needed) when j < i and both lie inside one and the same document."""
    from torch.nn.attention.flex_attention import BlockMask

    T, dev = pk.total, pk.seq_idx.device
    nb = -(-T // block_size)
    doc = F.pad(pk.seq_idx, (0, nb * block_size - T), value=-1)  # [nb * block]: padding in no document
    first = pk.seq_idx[::block_size]  # [nb]: the document of each block's first token
    last = pk.seq_idx[(torch.arange(1, nb + 1, device=dev) * block_size - 1).clamp(max=T - 1)]  # [nb]: of its last
    i, j = torch.arange(nb, device=dev)[:, None], torch.arange(nb, device=dev)[None, :]  # [nb, 1], [1, nb]
    some = (j <= i) & (first[:, None] <= last[None, :])  # [nb, nb]: blocks j <= i share a document when this holds
    one_doc = first == last  # [nb]
    one_doc[-1] &= T % block_size == 0  # a block with padding is never full (as create_block_mask has it)
    full = (j < i) & one_doc[:, None] & one_doc[None, :] & (first[:, None] == first[None, :])

    def listed(m):  # [nb, nb] bool -> counts [1, 1, nb] and the listed columns first [1, 1, nb, nb], int32
        order = torch.argsort((~m).to(torch.uint8), dim=-1, stable=True)
        return m.sum(-1, dtype=torch.int32)[None, None], order.to(torch.int32)[None, None]

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    return BlockMask.from_kv_blocks(*listed(some & ~full), *listed(full), BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                    seq_lengths=(T, T))


def _flex_attention():
    from torch.nn.attention.flex_attention import flex_attention
    return flex_attention


@functools.cache
def _compiled_flex():
    """FlexAttention compiled once per process (uncompiled it falls back to a dense, slow reference)."""
    return torch.compile(_flex_attention(), dynamic=False)
