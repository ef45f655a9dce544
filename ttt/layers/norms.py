"""Normalisation layers: RMSNorm (blocks) and the per-width LayerNorm used after the TTT op."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32 (fp64 for fp64 inputs) and cast back (eps 1e-6 as in docs/math.md §7)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and self.weight.dtype == x.dtype
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling()):
            # eager 16-bit inference on CUDA (prefill, eager decode): PyTorch's fused kernel (aten._fused_rms_norm),
            # the same fp32 math and one rounding, instead of seven element-wise kernels through fp32 copies
            # (~2.7 GB of traffic per call at 32k tokens x 2048). Not on the CPU: its rms_norm rounds the normalised
            # x before the weight (two roundings in 16 bits). Under torch.compile Inductor fuses the formula below.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        ct = torch.promote_types(x.dtype, torch.float32)  # fp32 math, fp64 for fp64 inputs
        xf = x.to(ct)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(ct)).to(x.dtype)
