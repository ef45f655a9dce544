"""Offline register / spill / shared-memory cost of the TTT-MLP kernels for sm_90, without a GPU.

Compiles each kernel variant with `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` and prints
registers, stack bytes (spills) and shared memory per launch configuration: the proxy used to choose designs before timing
on the device (a spilling kernel, or one over the 227 KB shared-memory limit, is slow or does not launch).
Needs Triton with its CUDA backend (ptxas ships with the wheel); no GPU. Usage:
  python benchmarks/offline_compile_mlp.py [--d 64] [--dtype bf16] [--only NAME]
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from ttt.ops.common import LN_EPS  # noqa: E402

# pointer arguments in the input dtype (the rest are fp32); every other non-constexpr argument is an i32
_IO = {"q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr", "lr_ptr"}


def compile_cost(fn, constexprs: dict, dtype: str, num_warps: int, num_stages: int):
    """(registers, stack bytes, shared bytes) of `fn` (a @triton.jit kernel) compiled for sm_90."""
    names = list(inspect.signature(fn.fn).parameters)
    constexprs = {k: v for k, v in constexprs.items() if k in names}
    sig = {}
    for n in names:
        if n in constexprs:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = f"*{dtype}" if n in _IO else "*fp32"
        else:
            sig[n] = "i32"
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps,
                                                                         "num_stages": num_stages})
    return (*_resource_usage(k.asm["cubin"]), k.metadata.shared)


def _resource_usage(cubin: bytes):
    """(registers, spill stores in bytes) of a cubin, by the cuobjdump that ships with Triton (n_regs and
    n_spills of a CompiledKernel are filled in only when it is loaded on a GPU)."""
    exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([exe, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    regs = int(re.search(r"REG:(\d+)", out).group(1))
    stack = int(re.search(r"STACK:(\d+)", out).group(1))
    return regs, stack


def _variants(d: int, dot_mode: int):
    from ttt.ops.ttt_mlp import chunk, chunk_blocked, step_triton
    F = 4 * d
    BD, BF = triton.next_power_of_2(d), triton.next_power_of_2(F)
    base = dict(D=d, BD=BD, FF=F, BF=BF, MB=16, BT=16, GROUP=8, DOT_MODE=dot_mode, EPS=LN_EPS)
    out = []
    if d <= 64:
        for w in (4, 8, 16):
            out.append(("regs fwd", chunk.ttt_mlp_fwd_kernel, dict(base, SAVE=True), w, 2))
            out.append(("regs bwd", chunk.ttt_mlp_bwd_kernel, base, w, 1))
    bf = 64 if d <= 64 else 32
    for w in (4,):
        out.append(("blocked fwd", chunk_blocked.ttt_mlp_fwd_blocked_kernel,
                    dict(base, SAVE=True, FB=bf), w, 3))
        out.append(("blocked bwd", chunk_blocked.ttt_mlp_bwd_blocked_kernel,
                    dict(base, FB=bf), w, 3))
    for w, blk in ((4, 64), (8, 32), (8, 64)):
        out.append((f"step blk{blk}", step_triton.ttt_mlp_step_kernel,
                    dict(D=d, BD=BD, FF=F, BF=blk, COMMIT=True, EPS=LN_EPS), w, 1))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, nargs="+", default=[64])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--only", default=None, help="compile only variants whose name contains this")
    a = ap.parse_args()
    dot_mode = {"bf16": 2, "fp16": 3, "fp32": 1}[a.dtype]
    print(f"triton {triton.__version__}, sm_90, {a.dtype}")
    print(f"{'kernel':14} {'d':>4} {'warps':>5} {'stages':>6} {'regs':>5} {'stack B':>7} {'shared':>8}")
    for d in a.d:
        for name, fn, cx, w, s in _variants(d, dot_mode):
            if a.only and a.only not in name:
                continue
            try:
                r, sp, sh = compile_cost(fn, cx, a.dtype, w, s)
                print(f"{name:14} {d:>4} {w:>5} {s:>6} {r:>5} {sp:>7} {sh:>8}", flush=True)
            except Exception as e:  # a variant that does not compile is a result too
                print(f"{name:14} {d:>4} {w:>5} {s:>6} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}",
                      flush=True)


if __name__ == "__main__":
    main()
