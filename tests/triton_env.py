"""The preamble of the Triton kernel test modules, imported by each before anything that imports Triton.

Without a CUDA GPU it sets TRITON_INTERPRET=1 (Triton reads it when first imported), so the kernels run in Triton's
interpreter at the tests' small shapes; it skips the importing module where Triton is not installed, or where there
is no GPU and TRITON_INTERPRET was set to something other than 1. `DEV` is the device the module's tensors go to.
"""
from __future__ import annotations

import os

import pytest
import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

triton = pytest.importorskip("triton", reason="Triton is not installed")

if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    # (the kernels cannot run on CPU tensors outside the interpreter: every kernel test of the module would fail)
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)
