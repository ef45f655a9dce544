"""Kernels compiled for sm_90 on the CPU (Triton's own compiler and ptxas, no GPU): launch-time specialisations
that the interpreter never sees, such as an integer argument of 1 that Triton turns into a constant."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# compiles the fused decode kernel with its position as a runtime integer and as the constants 0 and 1
DECODE = """
import triton
from triton.backends.compiler import GPUTarget
from ttt.ops import fused_layer
fn = fused_layer._linear_decode_kernel
names = fn.arg_names
const = dict(HD=64, BD=64, W=4, HAS_BIAS=True, LEARN_LR=True, COMMIT=True, EPS=1e-6)
for pos in (None, 0, 1):
    cx = dict(const, **({} if pos is None else {"i_pos": pos}))
    sig = {n: "constexpr" if n in cx else "*bf16" if n.endswith("_ptr") else "fp32" if n == "log2_base" else "i32"
           for n in names}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=cx)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    print("compiled", pos)
"""


def test_fused_decode_kernel_compiles_at_constant_positions():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        import triton.backends.nvidia  # noqa: F401
    except ImportError as e:  # pragma: no cover
        pytest.skip(f"Triton without its CUDA backend: {e}")
    r = subprocess.run([sys.executable, "-c", DECODE], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["compiled", "None", "compiled", "0", "compiled", "1"]
