"""Compile the TTT Triton kernels for sm_90 on a machine without a GPU and print each one's registers, stack
(spill) bytes and shared memory from the cubin (`cuobjdump --dump-resource-usage`, which ships with Triton), so
that register pressure can be read before a GPU run. Run it with a Python whose Triton is the GPU machine's
version (3.6 there; the counts differ between versions), from the repository root:

    python3 -m benchmarks.offline_compile --kinds linear,mlp --d 64 96 --dtype bf16 [--only chain]

The signatures are generic (every integer argument an i32), so the counts can differ a little from the runtime's
specialised kernels; `--hints` marks every pointer and the integers of HINTED (shapes and strides that are
multiples of 16 at the benchmarked shapes) as the runtime does, which decides whether loads vectorise (the
fused layer kernels' numbers in docs/kernels_notes.md are with it). `--ints` specialises as the launcher does
instead (every pointer and integer divisible by 16 but the run's integers given, `--ints l_h=1,NGROUPS=66`, or
none: `--ints ""`), which the smem TTT-MLP backward needs: its cp.async copies of q, k, v, dO compile only where
the strides are known to be multiples of 16.
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

from ttt.ops import fused_layer
from ttt.ops.common import LN_EPS
from ttt.ops.triton_backend import GROUP
from ttt.ops.triton_utils import dot_mode, tile
from ttt.ops.ttt_linear import bwd_split, chunk as lin_chunk, step_triton as lin_step, walks_gluon as lin_walks_gluon
from ttt.ops.ttt_mlp import chunk as mlp_chunk, chunk_blocked as mlp_blocked, chunk_smem as mlp_smem, \
    step_triton as mlp_step

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
IO_PTRS = {"q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr",  # in the input dtype
           "x_ptr", "s_ptr", "ya_ptr", "yb_ptr", "dya_ptr", "dyb_ptr", "dx_ptr", "ds_ptr", "g_ptr", "y_ptr", "dy_ptr",
           "dg_ptr", "u_ptr", "gate_ptr", "win_ptr", "nwin_ptr",
           "ws1_ptr", "ws2_ptr", "kw_ptr"}  # (the smem TTT-MLP kernels' 16-bit weight scratch and kept weights)
FLOATS = {"log2_base", "eps", "base_lr"}  # float scalar arguments
HINTED = {"T", "D", "N", "SEG", "x_sb", "x_st", "s_sb", "s_st"}  # --hints: integers divisible by 16
# the TTT-Linear split backward's scratch rows (`bwd_split.scratch_dtype`: bf16 for bf16 inputs, else fp32; its
# G / dgy rows are g_ptr / dgy_ptr, g_ptr typed as an input pointer above, so in an fp16 run it reads as fp16)
SCRATCH_PTRS = {"xh_ptr", "dg0_ptr", "dzb_ptr", "dka_ptr", "dz_ptr", "dkb_ptr", "dgy_ptr"}
CONV_INT_PTRS = {"tok_ptr", "doc_ptr"}  # int32: the conv kernels' rows of packed documents
INT_PTRS = {"span_ptr", "cnt_ptr", "sched_ptr"}  # int32 (the rows of `triton_utils.Rows`; the split kernels' barrier
# counters; the smem kernels' schedule of packed documents)


def _cubin_tools(cubin: bytes, *tools: list[str]) -> list[str]:
    """The output of each of Triton's bundled CUDA tools (`[name, *flags]`) run on `cubin`."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return [subprocess.run([os.path.join(bin_dir, name), *flags, f.name], capture_output=True, text=True,
                               check=True).stdout for name, *flags in tools]


def resources(cubin: bytes) -> tuple[int, int, int]:
    """(registers, stack bytes, wgmma instructions in the SASS) of a cubin (n_regs / n_spills of a CompiledKernel
    exist only once it is loaded on a GPU)."""
    out, sass = _cubin_tools(cubin, ["cuobjdump", "--dump-resource-usage"], ["nvdisasm"])
    return (int(re.search(r"REG:(\d+)", out).group(1)), int(re.search(r"STACK:(\d+)", out).group(1)),
            sass.count("HGMMA"))


def _compile(fn, constexprs: dict, dtype: str, num_warps: int, num_stages: int, hints: bool = False,
             float_type: str = "fp32", maxnreg: int | None = None, ints: dict | None = None,
             types: dict | None = None):
    """The @triton.jit or @gluon.jit kernel `fn` compiled for sm_90 (float_type: how its float scalars are typed:
    Triton's launcher passes Python floats as fp32, Inductor's as fp64). ints: specialise as the launcher does for
    a run whose integer arguments are these where they are 1 or not divisible by 16 (1: a constant; every other
    integer and every pointer divisible by 16); types: signature types that replace the guessed ones."""
    names = list(inspect.signature(fn.fn).parameters)
    constexprs = {k: v for k, v in constexprs.items() if k in names}
    if ints is not None:
        constexprs.update({n: 1 for n, v in ints.items() if v == 1 and n not in constexprs})
    scratch = "*bf16" if dtype == "bf16" else "*fp32"
    sig = {n: "constexpr" if n in constexprs else (f"*{dtype}" if n in IO_PTRS else scratch if n in SCRATCH_PTRS
                                                     else "*i32" if n in INT_PTRS | CONV_INT_PTRS
                                                     else "*fp32") if n.endswith("_ptr")
           else float_type if n in FLOATS else "i32" for n in names}
    sig.update({n: t if t.startswith("*") or not n.endswith("_ptr") else "*" + t for n, t in (types or {}).items()})
    if "num_warps" in names:  # Gluon kernels take their warps as a constexpr argument
        sig["num_warps"] = "constexpr"
        constexprs["num_warps"] = num_warps
    if ints is not None:  # the launcher's divisibility
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in constexprs and (
            n.endswith("_ptr") or (sig[n] == "i32" and ints.get(n, 16) % 16 == 0))}
    else:
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
                 if hints and n not in constexprs and (n.endswith("_ptr") or n in HINTED)}
    source = GluonASTSource if getattr(fn, "is_gluon", lambda: False)() else triton.compiler.ASTSource
    src = source(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages, **({} if maxnreg is None else {"maxnreg": maxnreg})}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def compile_cost(fn, constexprs: dict, dtype: str, num_warps: int, num_stages: int,
                 hints: bool = False, maxnreg: int | None = None, ints: dict | None = None) -> tuple[int, int, int, int]:
    """(registers, stack bytes, wgmma instructions, shared bytes) of the @triton.jit or @gluon.jit kernel `fn`
    compiled for sm_90 (maxnreg: a register cap, as the conv launches set; ints: as `_compile`'s)."""
    k = _compile(fn, constexprs, dtype, num_warps, num_stages, hints, maxnreg=maxnreg, ints=ints)
    return (*resources(k.asm["cubin"]), k.metadata.shared)


def fp64_instructions(fn, constexprs: dict, dtype: str, num_warps: int, num_stages: int, float_type: str) -> int:
    """How many fp64 arithmetic instructions (DADD, DMUL, DFMA) the SASS of `fn` compiled for sm_90 has, its float
    scalars typed as float_type."""
    k = _compile(fn, constexprs, dtype, num_warps, num_stages, float_type=float_type)
    sass, = _cubin_tools(k.asm["cubin"], ["nvdisasm"])
    return len(re.findall(r"\b(?:DADD|DMUL|DFMA)\b", sass))


def linear_kernels(d: int, b: int, dot: int):
    """(name, kernel, constexprs, warps, stages) of every TTT-Linear kernel."""
    BD, BT = tile(d), tile(b)  # as the launches pad them; the step kernels (no tl.dot) pad d to a power of two
    base = dict(D=d, BD=BD, MB=b, BT=BT, DOT_MODE=dot, EPS=LN_EPS, GROUP=GROUP)
    out = []
    for w in (4, 8):
        out += [("fwd", lin_chunk.ttt_linear_fwd_kernel, dict(base, SAVE=True, OUT=True), w, 3),
                ("fwd split walk", lin_chunk.ttt_linear_fwd_kernel, dict(base, SAVE=True, OUT=False), w, 3),
                ("fwd split out", lin_chunk._fwd_out_kernel, dict(base, GT=tile(GROUP * b), RB=64), w, 3),
                ("split pre", bwd_split._pre_kernel, dict(base, STORE_G=True), w, 3),
                ("split chain (full)", bwd_split._chain_kernel, base, w, 3),
                ("split post (full)", bwd_split._post_kernel, base, w, 3),
                ("split chain (lean)", bwd_split._chain_lean_kernel, base, w, 3),
                ("split post (lean)", bwd_split._post_lean_kernel, base, w, 3)]
    if d in lin_walks_gluon.HEAD_DIMS and b == lin_walks_gluon.MB and dot >= 2:  # Gluon, 16-bit operands
        g = dict(D=d, MB=b, GROUP=GROUP, EPS=LN_EPS, SAVE=True)
        for w in sorted({lin_walks_gluon.warps(d), 8}):  # the default launch, and 8 warps (`walks_gluon.launch`)
            opts = lin_walks_gluon.launch(d, w)
            tag, cap = "" if w == lin_walks_gluon.warps(d) else f" x{w}", [opts["maxnreg"]] if "maxnreg" in opts else []
            out += [(f"fwd (gluon){tag}", lin_walks_gluon._fwd_kernel, dict(g, OUT=True), w, 1, *cap),
                    (f"fwd split walk (gluon){tag}", lin_walks_gluon._fwd_kernel, dict(g, OUT=False), w, 1, *cap),
                    (f"split pre (gluon){tag}", lin_walks_gluon._pre_kernel, dict(D=d, MB=b, GROUP=GROUP, EPS=LN_EPS,
                                                                               STORE_G=False), w, 1, *cap),
                    (f"split chain (gluon){tag}", lin_walks_gluon._chain_kernel, dict(D=d, MB=b, GROUP=GROUP), w, 1,
                     *cap),
                    (f"split post (gluon){tag}", lin_walks_gluon._post_kernel, dict(D=d, MB=b, GROUP=GROUP,
                                                                                 EPS=LN_EPS), w, 1, *cap)]
    return out + [("step", lin_step.ttt_linear_step_kernel, dict(D=d, BD=triton.next_power_of_2(d), COMMIT=True, EPS=LN_EPS),
                   4 if d <= 64 else 8, 3)]


def mlp_kernels(d: int, b: int, dot: int):
    """(name, kernel, constexprs, warps, stages) of every TTT-MLP kernel (the register ones for d <= 64)."""
    F = 4 * d
    base = dict(D=d, BD=tile(d), FF=F, BF=tile(F), MB=b, BT=tile(b), GROUP=GROUP, DOT_MODE=dot,
                EPS=LN_EPS)
    out = []
    if d <= 64:
        for w in (4, 8, 16):
            out += [("regs fwd", mlp_chunk.ttt_mlp_fwd_kernel, dict(base, SAVE=True), w, 2),
                    ("regs bwd", mlp_chunk.ttt_mlp_bwd_kernel, base, w, 1)]
    out += [("blocked fwd", mlp_blocked.ttt_mlp_fwd_blocked_kernel, dict(base, SAVE=True, FB=32), 4, 3),
            ("blocked bwd", mlp_blocked.ttt_mlp_bwd_blocked_kernel, dict(base, FB=32), 4, 3)]
    for w, blk in ((4, 64), (8, 32), (8, 64)):
        out.append((f"step blk{blk}", mlp_step.ttt_mlp_step_kernel,
                    dict(D=d, BD=triton.next_power_of_2(d), FF=F, BF=blk, COMMIT=True, EPS=LN_EPS), w, 1))
    if d in mlp_smem.HEAD_DIMS and b == mlp_smem.MB and dot >= 2:  # Gluon, 16-bit operands
        smem = dict(D=d, FF=F, GROUP=GROUP, EPS=LN_EPS, SCHED=False)
        for w in (4, 8):
            for keep in (False, True):  # keep: the forward writes every mini-batch's start weights, the backward reads
                k = " keep" if keep else ""
                out += [(f"smem fwd x{ns}{k}", mlp_smem.ttt_mlp_smem_fwd_kernel,
                         dict(smem, NSPLIT=ns, SAVE=True, KEEP=keep), w, 1) for ns in ((1, 2) if d == 64 else (4,))]
                out.append((f"smem bwd x{mlp_smem.nsplit_bwd(d)}{k}", mlp_smem.ttt_mlp_smem_bwd_kernel,
                            dict(smem, NSPLIT=mlp_smem.nsplit_bwd(d), KEEP=keep), w, 1))
    return out


def layer_kernels(d: int, b: int, dot: int):
    """(name, kernel, constexprs, warps, stages) of the fused layer kernels at their default launch (D = 768)."""
    out = []
    for name, two_rope in (("conv+rope", True), ("conv", False)):
        for packed in (False, True):  # packed documents (cu_seqlens): positions per row, no PERIODIC
            tag = " packed" if packed else ""
            for k, fn in (("fwd", fused_layer._conv_fwd_kernel), ("bwd", fused_layer._conv_bwd_kernel)):
                L = fused_layer.conv_launch(768, None, k, two_rope, packed)
                body = L.body(b, packed)
                cx = dict(W=4, HAS_STATE=False, HAS_BIAS=True, MB=b, HD=d, TWO=two_rope, ROPE=two_rope, PACKED=packed,
                          PERIODIC=body % b == 0 and not packed, R=L.R, BODY=body, BC=L.BC)
                out.append((f"{name} {k}{tag}", fn, cx, L.warps, 3))  # (_compile keeps a kernel's own constexprs)
    dec = dict(HD=d, BD=triton.next_power_of_2(d), MB=b, BB=triton.next_power_of_2(b), W=4, WB=4,
               HAS_BIAS=True, LEARN_LR=True, COMMIT=True, WIN_INPLACE=True, EPS=LN_EPS)
    warps = 2 if d <= 64 else 8  # linear_decode_step's default
    return out + [("decode step", fused_layer._linear_decode_kernel, dec, warps, 3),
                  ("decode step, new window apart", fused_layer._linear_decode_kernel, dict(dec, WIN_INPLACE=False),
                   warps, 3)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="linear,mlp", help="comma list of: linear, mlp, layer (the fused layer kernels)")
    ap.add_argument("--hints", action="store_true", help="divisibility hints as at run time (see the docstring)")
    ap.add_argument("--d", type=int, nargs="+", default=[64], help="head dims")
    ap.add_argument("--b", type=int, default=16, help="mini-batch size")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--only", default=None, help="compile only the kernels whose name contains this")
    ap.add_argument("--ints", default=None, help="specialise as the launcher does, the run's integers that are 1 or "
                    "not multiples of 16 given as name=value,... (see the docstring)")
    a = ap.parse_args()
    ints = None if a.ints is None else {k: int(v) for k, v in (p.split("=") for p in a.ints.split(",") if p)}
    import torch
    dot = dot_mode(getattr(torch, DTYPES[a.dtype]))
    print(f"triton {triton.__version__}, sm_90, {a.dtype}, b {a.b}")
    print(f"{'kind':6} {'kernel':20} {'d':>4} {'warps':>5} {'stages':>6} {'regs':>5} {'stack B':>7} {'wgmma':>5} "
          f"{'shared B':>8}")
    for kind in a.kinds.split(","):
        table = {"linear": linear_kernels, "mlp": mlp_kernels, "layer": layer_kernels}[kind]
        for d in a.d:
            for name, fn, cx, w, s, *cap in table(d, a.b, dot):
                if a.only and a.only not in name:
                    continue
                head = f"{kind:6} {name:20} {d:>4} {w:>5} {s:>6}"
                try:
                    r, sp, mma, sh = compile_cost(fn, cx, a.dtype, w, s, a.hints, *cap, ints=ints)
                    print(f"{head} {r:>5} {sp:>7} {mma:>5} {sh:>8}", flush=True)
                except Exception as e:  # a kernel that does not compile is a result too
                    print(f"{head} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}", flush=True)


if __name__ == "__main__":
    main()
