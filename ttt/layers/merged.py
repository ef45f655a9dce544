"""Several weights that multiply the same input, as one concatenated copy, so that a one-token decode step reads
them in one GEMM instead of one each (at batch 16 a 2048-wide GEMM of a 1.3b block runs far below the memory
bandwidth: docs/kernels_notes.md, "Decode"). `TTTLM.merge_decode_weights` makes the copies (the fast decoders,
`ttt.decode_graph`, ask for them); the modules use them only without gradients, at T = 1.

The copy is kept equal to its sources: `fresh()` rewrites it in place when a source changed (its version counter,
which every in-place write bumps: an optimizer step, load_state_dict; or its storage, dtype or device: `.to()`).
A compiled or CUDA-graphed step reads `weight` as it is: its caller refreshes first (`TTTLM.refresh_decode_weights`).
Sources that became inference tensors after the merge (e.g. `model.float()` under torch.inference_mode) have no
version counter: `merged_weight` then declines the copy and the caller multiplies by the sources themselves.
In training, `merged_linear` makes the same concatenation inside the autograd graph at every call (one GEMM for the
products and one each for x's and the weights' gradients; the fused (M) layer's input products).

The copy's rows are padded with zeros to a multiple of ALIGN_ROWS: the product's row stride is then one Inductor
keeps (on CUDA it pads an unaligned intermediate's stride, and a Triton kernel that reads the product by column
offsets, the fused decode step, would get a copy materialised per argument instead: three per block at 1.3b).
"""
from __future__ import annotations

import torch

ALIGN_ROWS = 64  # Inductor's stride alignment for 16-bit tensors (128 bytes)


def few_rows_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) (no bias) of a one-token step without autograd: for CUDA tensors of 16 bits with at most
    `ops.rows_mm.MAX_ROWS` rows and contiguous last dims, in a step that torch.compile traces (the graphed decoder's compiled
    step: the kernel is compiled before any capture, its launch's host time is not paid per token, and Inductor
    fuses the sum of K's splits into the next element-wise kernel), `ops.rows_mm` at `rows_mm.launch_for`'s launch
    (K split where the blocks of outputs alone leave most SMs idle; faster than cuBLAS at the 1.3b decode's four
    products on the H100, docs/kernels_notes.md); else F.linear."""
    if (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype and w.dim() == 2
            and x.stride(-1) == 1 and w.stride(-1) == 1 and not torch.is_grad_enabled()
            and torch.compiler.is_compiling()):
        from ..ops import triton_available
        if triton_available()[0]:
            from ..ops.rows_mm import MAX_ROWS, launch_for, rows_mm  # (imports Triton: not at this module's import)
            from ..ops.triton_utils import sm_count
            if x.numel() <= MAX_ROWS * x.shape[-1]:
                return rows_mm(x, w, **launch_for(w.shape[0], w.shape[1], sm_count(x.device)))
    return torch.nn.functional.linear(x, w)


def aligned_rows(n: int) -> int:
    """n rows rounded up to a multiple of ALIGN_ROWS."""
    return -(-n // ALIGN_ROWS) * ALIGN_ROWS


def split_rows(y: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    """A product y [..., rows] over weights of `sizes` rows concatenated (and padded) -> the product with each
    (views along the last dim; the pad dropped)."""
    return y.split([*sizes, y.shape[-1] - sum(sizes)], dim=-1)[:len(sizes)]


def merged_linear(x: torch.Tensor, sources: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """x's products with each of `sources` (2-D [out_i, in]) as one differentiable GEMM over their concatenation,
    padded with zero rows to `aligned_rows` as `MergedWeights` is: views of the product [..., rows]."""
    sizes = [w.shape[0] for w in sources]
    pad = aligned_rows(sum(sizes)) - sum(sizes)
    ws = (sources + [sources[0].new_zeros(pad, sources[0].shape[1])]) if pad else sources
    return split_rows(torch.nn.functional.linear(x, torch.cat(ws)), sizes)


class MergedWeights:
    """The rows of `sources` (2-D weights [out_i, in], one in-dim, dtype and device), concatenated: `weight`
    [rows, in], rows = sum out_i rounded up to ALIGN_ROWS (zero rows after the sources'); `sizes` the out_i (`split`
    the product with them)."""

    def __init__(self, sources: list[torch.Tensor]):
        first = sources[0]
        if any(w.dim() != 2 or w.shape[1] != first.shape[1] or w.dtype != first.dtype or w.device != first.device
               for w in sources):
            raise ValueError("sources: expected 2-D weights of one in-dim, dtype and device, got "
                             + ", ".join(f"{tuple(w.shape)} {w.dtype} {w.device}" for w in sources))
        self.sources = list(sources)
        self.sizes = [w.shape[0] for w in sources]
        self.rows = aligned_rows(sum(self.sizes))
        self.weight = None
        self._key = None
        self.fresh()

    def _state(self):
        return tuple((w._version, w.data_ptr(), w.dtype, w.device) for w in self.sources)

    def fresh(self) -> torch.Tensor:
        """`weight`, rewritten first if a source changed since it was written."""
        key = self._state()
        if key != self._key:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, writable in and out of both
                w0 = self.sources[0]
                if self.weight is None or self.weight.dtype != w0.dtype or self.weight.device != w0.device:
                    self.weight = torch.zeros((self.rows, w0.shape[1]), dtype=w0.dtype, device=w0.device)
                torch.cat([w.detach() for w in self.sources], out=self.weight[:sum(self.sizes)])
            self._key = key
        return self.weight

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x @ weight.T [..., rows] -> the products with each source (`split_rows`)."""
        return split_rows(y, self.sizes)


def merged_for(existing: MergedWeights | None, sources: list[torch.Tensor]) -> MergedWeights:
    """`existing` when it already concatenates these very sources (refreshed), else a new copy: merging twice keeps
    one copy, the one a compiled or captured step reads. Inference tensors are refused: they have no version
    counter, so the copy could not follow their in-place changes."""
    if any(w.is_inference() for w in sources):
        raise ValueError("weights: inference tensors (made or converted under torch.inference_mode) cannot be "
                         "merged, their in-place changes are not tracked; build or convert the model outside "
                         "inference_mode, or do not merge (GraphedDecoder(merge=False))")
    if existing is not None and len(existing.sources) == len(sources) and all(
            a is b for a, b in zip(existing.sources, sources)):
        existing.fresh()
        return existing
    return MergedWeights(sources)


def merged_weight(m: MergedWeights | None, x: torch.Tensor) -> torch.Tensor | None:
    """m's weight for a step on x: as it is inside a traced step (its caller refreshed it), else refreshed; None
    when there is none, it is not in x's dtype or a source is an inference tensor (the caller multiplies by the
    sources themselves)."""
    if m is None:
        return None
    if torch.compiler.is_compiling():
        w = m.weight
    elif any(w.is_inference() for w in m.sources):
        return None
    else:
        w = m.fresh()
    return w if w.dtype == x.dtype else None
