"""Compile the TTT-Linear Triton kernels for sm_90 on a machine without a GPU and print their resources
(registers, spill stores/loads, stack, shared memory) from the cubin (`cuobjdump --dump-resource-usage`, the tool
Triton ships), so that register pressure can be read before a GPU run. Use the Triton the device has (3.6):

    python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install -q triton==3.6.0 torch   # or a .pth to a torch elsewhere
    PYTHONPATH=. /tmp/t36/bin/python benchmarks/offline_compile.py [--d 64] [--b 16] [--dtype bf16]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget

from ttt.ops.common import LN_EPS
from ttt.ops.ttt_linear import bwd_split, chunk, step_triton

DOT = {"bf16": 2, "fp16": 3, "fp32": 0}
IO_PTRS = {"q_ptr", "k_ptr", "v_ptr", "do_ptr", "o_ptr", "dq_ptr", "dk_ptr", "dv_ptr"}


def signature(fn, dtype, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}" if name in IO_PTRS else "*fp32"
        else:
            sig[name] = "i32"
    return sig


def resources(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", out)
    return f"regs {m.group(1)} stack {m.group(2)} B" if m else out.strip()[-200:]


def spills(ptx_or_sass: str) -> int:
    return len(re.findall(r"\bst\.local", ptx_or_sass))


def compile_one(name, fn, dtype, warps, **const):
    const = {k: v for k, v in const.items() if k in fn.arg_names}
    src = triton.compiler.ASTSource(fn=fn, signature=signature(fn, dtype, const), constexprs=const)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    print(f"{name:28s} warps {warps}: {resources(k.asm['cubin'])}, shared {k.metadata.shared} B, "
          f"local stores in PTX {spills(k.asm['ptx'])}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--b", type=int, default=16)
    ap.add_argument("--dtype", default="bf16", choices=list(DOT))
    args = ap.parse_args()
    d, b = args.d, args.b
    BD, BT = triton.next_power_of_2(d), max(16, triton.next_power_of_2(b))
    base = dict(D=d, BD=BD, MB=b, BT=BT, DOT_MODE=DOT[args.dtype], EPS=LN_EPS, GROUP=8)
    print(f"triton {triton.__version__}, sm_90, d {d}, b {b}, {args.dtype}")
    compile_one("ttt_linear_fwd_kernel", chunk.ttt_linear_fwd_kernel, args.dtype, 4, SAVE=True, **base)
    for w in (4, 8):
        compile_one("split pre", bwd_split._pre_kernel, args.dtype, w, STORE_G=True, **base)
        compile_one("split chain (full)", bwd_split._chain_kernel, args.dtype, w, **base)
        compile_one("split post (full)", bwd_split._post_kernel, args.dtype, w, **base)
        compile_one("split chain (lean)", bwd_split._chain_lean_kernel, args.dtype, w, **base)
        compile_one("split post (lean)", bwd_split._post_lean_kernel, args.dtype, w, **base)
    compile_one("ttt_linear_step_kernel", step_triton.ttt_linear_step_kernel, args.dtype, 4 if d <= 64 else 8,
                COMMIT=True, D=d, BD=BD, EPS=LN_EPS)


if __name__ == "__main__":
    main()
