"""Kernels compiled for sm_90 on the CPU (Triton's own compiler and ptxas, which the `triton` extra installs; no
GPU): launch-time specialisations that the interpreter never sees, such as an integer argument of 1 that Triton
turns into a constant. Compiled through `benchmarks/offline_compile.py` in a process without TRITON_INTERPRET."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the fused decode kernel with its position as a runtime integer and as the constants 0 and 1
DECODE = """
from benchmarks.offline_compile import compile_cost
from ttt.ops import fused_layer
const = dict(HD=64, BD=64, W=4, HAS_BIAS=True, LEARN_LR=True, COMMIT=True, EPS=1e-6)
for pos in (None, 0, 1):
    compile_cost(fused_layer._linear_decode_kernel, dict(const, **({} if pos is None else {"i_pos": pos})),
                 "bf16", 4, 3)
    print("compiled", pos)
"""


def test_fused_decode_kernel_compiles_at_constant_positions():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-c", DECODE], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["compiled", "None", "compiled", "0", "compiled", "1"]
