"""Depthwise causal 1-D convolution with an explicit window state, so streaming works chunk by chunk, and
on packed documents (`cu_seqlens`, docs/packed.md) one window per document; and the input-dtype check
every layer runs at its entry."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


BACKENDS = ("auto", "torch", "triton")
# std of a standard normal truncated to [-2, 2]; dividing by it gives the truncated draw the wanted variance
TRUNC_STD = 0.87962566103423978


def check_input_dtype(x: torch.Tensor, weight: torch.Tensor, name: str = "x") -> None:
    """Raise a one-line TypeError when x's dtype differs from the layer's weights (outside autocast,
    which casts for the layer): float64 or half input into float32 weights would otherwise fail deep
    inside a matmul."""
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{name}: expected dtype {weight.dtype} like the layer's weights, got {x.dtype}; convert "
                        f"the input (x.to({weight.dtype})) or the layer (.to({x.dtype})), or run under torch.autocast")


class CausalConv1d(nn.Module):
    """Depthwise causal conv over time. x: [B, T, C] -> [B, T, C].

    The state is the last `width - 1` inputs, [B, width-1, C]; zeros at the start of a sequence.
    forward(x, state) over any split of a sequence equals one forward over the whole sequence.
    forward(x, state, cu_seqlens=cu) on packed documents (x: [1, T, C]): no window reaches across a boundary;
    the state has one row per document ([N, width-1, C], or None for zeros), and so has the returned one (both
    backends; `_packed` is the reference).
    backend: "torch" (cuDNN on CUDA in eager mode, else shifted products), "triton" (the fused kernel of
    ops/fused_layer.py: CUDA, or Triton's interpreter), "auto" ("triton" for CUDA fp32/fp16/bf16 inputs when
    Triton imports, else "torch"; the default).
    """

    def __init__(self, channels: int, width: int = 4, bias: bool = True, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self.channels, self.width, self.backend = channels, width, backend
        self._use: dict = {}  # (backend, device type, dtype) -> whether the Triton kernel runs (`_use_kernel`)
        self.weight = nn.Parameter(torch.empty(channels, 1, width))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        """LeCun normal (as flax's default conv init): a normal truncated at +-2 std, rescaled so that the
        weight's variance is 1 / fan_in, fan_in = width (one input channel per group); bias 0."""
        std = math.sqrt(1.0 / self.width) / TRUNC_STD
        nn.init.trunc_normal_(self.weight, std=std, a=-2 * std, b=2 * std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def init_state(self, batch_size: int, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(batch_size, self.width - 1, self.channels, device=device or self.weight.device,
                           dtype=dtype or self.weight.dtype)

    def _use_kernel(self, x: torch.Tensor) -> bool:
        """Whether the Triton kernel runs for x's device type and dtype, decided on the first such call."""
        key = (self.backend, x.device.type, x.dtype)
        if key not in self._use:
            self._use[key] = self._decide(x.device, x.dtype)
        return self._use[key]

    def _decide(self, device, dtype) -> bool:
        if self.backend == "torch":
            return False
        from ..ops import triton_runs_on  # the op's rule: CUDA (or Triton's interpreter), and Triton imports
        ok, why = triton_runs_on(device)
        if self.backend == "triton":
            if not ok:
                raise RuntimeError(f"backend='triton' {why}")
            if dtype == torch.float64 or self.channels % 2:
                raise ValueError(f"x: the Triton conv kernel takes fp32/fp16/bf16 inputs with an even channel count, "
                                 f"got {dtype} with {self.channels} channels")
            return True
        return ok and device.type == "cuda" and dtype != torch.float64 and not self.channels % 2

    def _pushes(self, x: torch.Tensor, state: torch.Tensor | None, owned: bool, cu_seqlens) -> bool:
        """Whether a one-token step writes its new window into `state` itself (`fused_layer.window_push_`, one
        launch): the caller owns the state (a graphed decode's buffers), it is x's dtype and contiguous, and the
        Triton kernels run here."""
        return (owned and x.shape[1] == 1 and cu_seqlens is None and state is not None and self.width > 1
                and state.dtype == x.dtype and state.is_contiguous() and x.stride(-1) == 1 and self._use_kernel(x))

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None, cu_seqlens=None, owned: bool = False):
        """owned: the caller gives `state` up (a graphed decode's buffers): a one-token step may write the new
        window into it and return it (see `_pushes`)."""
        B, T, C = x.shape
        if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
            # under autocast the conv runs in the autocast dtype, as F.conv1d does: the (M) block's pre-conv gets its
            # RMSNorm's fp32 output, and would otherwise move twice the bytes through its kernels and save an fp32 copy
            x = x.to(torch.get_autocast_dtype(x.device.type))
        push = self._pushes(x, state, owned, cu_seqlens)
        # auto at T = 1 under torch.compile (the compiled decode step): the 4-tap sum below, which Inductor fuses
        # with the RMSNorm before it and the residual after it (one launch fewer per block and token)
        if self._use_kernel(x) and not (self.backend == "auto" and T == 1 and torch.compiler.is_compiling()):
            from ..ops.fused_layer import causal_conv
            return causal_conv(x if x.stride(-1) == 1 else x.contiguous(), state, self.weight, self.bias,
                               cu_seqlens=cu_seqlens, push=push)
        if cu_seqlens is not None:
            return self._packed(x, state, cu_seqlens)
        if state is None:
            state = self.init_state(B, x.device, x.dtype)
        state = state.to(x.dtype)
        w = self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if T == 1 and (not x.is_cuda or torch.compiler.is_compiling()):
            # one token (decode): the products below without concatenating first (the same sum, in the same
            # order), so that under torch.compile the norm, the conv and the residual fuse into one kernel
            n = self.width - 1
            y = sum(state[:, j:j + 1] * w[:, 0, j] for j in range(n)) + x * w[:, 0, n]  # [B, 1, C]
            y = y if b is None else y + b
            if push:  # (the window is x's dtype: `state` is the caller's tensor) after the sum has read it
                from ..ops.fused_layer import window_push_
                return y, window_push_(state, x, after=y)
            return y, (torch.cat([state[:, 1:], x], dim=1) if n else state)
        xs = torch.cat([state, x], dim=1)  # [B, width-1+T, C]
        # cuDNN's depthwise conv on CUDA in eager mode; under torch.compile the shifted products below fuse
        # with their neighbours (H100 profile, 125m B4 T8192: cuDNN's backward took 0.8 ms per call)
        if x.is_cuda and not torch.compiler.is_compiling():
            y = F.conv1d(xs.transpose(1, 2), w, b, groups=C).transpose(1, 2)  # [B, T, C]
        else:  # CPU: a sum of shifted products, fast in every dtype (conv1d is very slow in fp64 here)
            y = sum(xs[:, j:j + T] * w[:, 0, j] for j in range(self.width))  # [B, T, C]
            if b is not None:
                y = y + b
        return y, xs[:, xs.shape[1] - (self.width - 1):]

    def _packed(self, x: torch.Tensor, state: torch.Tensor | None, cu_seqlens):
        """forward on packed documents: tap j of token t reads x[t - s] (s = width-1-j tokens back) when that
        token is in t's document, else its document's own start window; the final windows are gathered the
        same way at every document's end (`packed_windows`). The reference of the kernel's packed path."""
        from ..ops.packed import packed_windows, packing

        T, C, n = x.shape[1], self.channels, self.width - 1
        pk = packing(cu_seqlens, T, x.device, batch_size=x.shape[0],
                     state_rows=None if state is None else state.shape[0])
        N = pk.num_docs
        state = torch.zeros(N, n, C, device=x.device, dtype=x.dtype) if state is None else state.to(x.dtype)
        xs, pos, doc = x[0], pk.positions, pk.seq_idx  # [T, C], [T], [T]
        w = self.weight.to(x.dtype)
        y = xs * w[:, 0, n]
        for s in range(1, n + 1):  # the taps that reach s tokens back
            back = F.pad(xs, (0, 0, s, 0))[:T]  # [T, C]: x[t - s]
            own = state[doc, (n - s + pos).clamp(max=n - 1)]  # [T, C]: the document's start window, where t - s is before it
            y = y + torch.where((pos >= s)[:, None], back, own) * w[:, 0, n - s]
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y[None], packed_windows(xs, state, pk, n)
