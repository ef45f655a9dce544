"""Kernels compiled for sm_90 on the CPU (Triton's own compiler and ptxas, which the `triton` extra installs; no
GPU): launch-time specialisations that the interpreter never sees, such as an integer argument of 1 that Triton
turns into a constant, and shared memory that a GPU's SM cannot hold (the launch would fail there). Compiled
through `benchmarks/offline_compile.py` in a process without TRITON_INTERPRET."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# the fused decode kernel at its default launch (2 warps at d 64, the window in place) with its position as a
# runtime integer and as the constants 0 and 1
DECODE = """
from benchmarks.offline_compile import compile_cost
from ttt.ops import fused_layer
const = dict(HD=64, BD=64, MB=16, BB=16, W=4, WB=4, HAS_BIAS=True, LEARN_LR=True, COMMIT=True, WIN_INPLACE=True,
             EPS=1e-6)
for pos in (None, 0, 1):
    compile_cost(fused_layer._linear_decode_kernel, dict(const, **({} if pos is None else {"i_pos": pos})),
                 "bf16", 2, 3)
    print("compiled", pos)
"""


def compile_offline(script: str, timeout: int) -> list[str]:
    """Run `script` in a fresh interpreter at the repository root without TRITON_INTERPRET; its printed words."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.split()


def test_fused_decode_kernel_compiles_at_constant_positions():
    assert compile_offline(DECODE, 600) == ["compiled", "None", "compiled", "0", "compiled", "1"]


# the fused decode kernel as a compiled decode step launches it: Inductor types Python floats as fp64 (Triton's own
# launcher as fp32); the kernel casts its two float scalars, so the step stays fp32 either way (before, given fp64,
# it computed its whole step in fp64: 2,745 fp64 instructions and 5,520 B of stack against 136 B)
DECODE_FP64 = """
from benchmarks.offline_compile import fp64_instructions
from ttt.ops import fused_layer
const = dict(HD=64, BD=64, MB=16, BB=16, W=4, WB=4, HAS_BIAS=True, LEARN_LR=True, COMMIT=False, WIN_INPLACE=True,
             EPS=1e-6)
print(*(fp64_instructions(fused_layer._linear_decode_kernel, const, "bf16", 2, 3, t) for t in ("fp32", "fp64")))
"""


def test_fused_decode_kernel_stays_fp32_given_fp64_floats():
    n32, n64 = map(int, compile_offline(DECODE_FP64, 600))
    assert n64 <= n32 + 4, (n32, n64)


# rows_mm (the compiled decode step's few-row products) at launch_for's launches on 132 SMs, one whole-K product and
# one in 4 parts of K: no spills, the swapped product on wgmma, the stages in shared memory
ROWS_MM = """
from benchmarks.offline_compile import _compile, resources
from ttt.ops.rows_mm import MAX_ROWS, _rows_mm_kernel, launch_for
for N, K in ((11008, 2048), (2048, 5504)):
    L = launch_for(N, K, 132)
    types = {"w_ptr": "bf16", "y_ptr": "bf16" if L["splits"] == 1 else "fp32"}
    cx = dict(BM=MAX_ROWS, BN=L["BN"], BK=L["BK"], SWAP=L["swap"])
    k = _compile(_rows_mm_kernel, cx, "bf16", L["num_warps"], L["num_stages"], ints={}, types=types)
    regs, stack, wgmma = resources(k.asm["cubin"])
    print(L["splits"], stack, wgmma, k.metadata.shared)
"""


def test_rows_mm_kernel_compiles_at_its_launches():
    from ttt.ops.rows_mm import MAX_ROWS, launch_for
    L = launch_for(11008, 2048, 132)
    stage = (L["BN"] + MAX_ROWS) * L["BK"] * 2  # a stage's bf16 tiles of w and x
    rows = [list(map(int, compile_offline(ROWS_MM, 600)[i:i + 4])) for i in range(0, 8, 4)]
    assert [r[0] for r in rows] == [1, 4], rows
    for splits, stack, wgmma, shared in rows:
        assert stack == 0 and wgmma > 0 and (L["num_stages"] - 1) * stage <= shared <= 232_448, rows


# the shared-memory TTT-MLP kernels (Gluon) at their launch (8 warps, head dims 64 and 128; the d 64 forward in one
# and in two programs per head): they compile with this Triton (Gluon's API moves: thread_barrier became barrier
# and async_copy_global_to_shared async_load after 3.6) and their shared memory fits an SM of sm_90. Specialised
# as the launcher does at B16 T2048 H32 (pointers and integers divisible by 16, lr's head stride 1): the
# backward's cp.async copies (its own scratch; q, k, v, dO) need their 16-byte alignment to be known, as it is at
# such a launch (`chunk_smem.bwd` copies inputs that are not), or they do not compile
SMEM = """
from benchmarks.offline_compile import _compile, mlp_kernels
for d in (64, 128):
    for name, fn, cx, w, s in mlp_kernels(d, 16, 2):
        if name.startswith("smem") and w == 8:
            print(_compile(fn, cx, "bf16", w, s, ints=dict(l_h=1, NGROUPS=66)).metadata.shared)
"""


def test_smem_mlp_kernels_compile_and_fit_shared_memory():
    shared = [int(v) for v in compile_offline(SMEM, 900)]
    assert len(shared) == 10 and max(shared) <= 232_448, shared


# TTT-Linear's kernels in Gluon (the fused forward, the split forward's walk, the backward's three passes)
# at d 64 (4 warps, and 8 with their register cap) and 128 (8 warps): they compile with this Triton and their shared
# memory (double-buffered operands, two 16-bit copies of the weights or their gradient, fp32 hand-over tiles) fits
# an SM of sm_90; capped, they hold the cap
WALKS = """
from benchmarks.offline_compile import compile_cost, linear_kernels
for d in (64, 128):
    for name, fn, cx, w, s, *cap in linear_kernels(d, 16, 2):
        if "(gluon)" in name:
            regs, _, _, shared = compile_cost(fn, cx, "bf16", w, s, False, *cap)
            print(shared, regs, (cap or [255])[0])
"""


def test_gluon_linear_walks_compile_and_fit_shared_memory():
    out = [int(v) for v in compile_offline(WALKS, 900)]
    shared, regs, caps = out[0::3], out[1::3], out[2::3]
    assert len(shared) == 15 and max(shared) <= 232_448, shared
    assert caps.count(128) == 5 and all(r <= c for r, c in zip(regs, caps)), (regs, caps)


# TTT-MLP's register backward in fp32 at its launch (8 warps, 1 stage): its shared memory must fit an SM of sm_90
# (232,448 bytes), or the default pair for fp32 training on a GPU cannot launch (it once needed 329,728)
REGS_BWD = """
from benchmarks.offline_compile import compile_cost, mlp_kernels
for name, fn, cx, w, s in mlp_kernels(64, 16, 0):
    if name == "regs bwd" and w == 8:
        print(compile_cost(fn, cx, "fp32", w, s)[3])
"""


@pytest.mark.slow  # one fp32 compile: ~3 minutes on 2 cores
def test_mlp_register_backward_fits_shared_memory_in_fp32():
    assert int(compile_offline(REGS_BWD, 900)[-1]) <= 232_448


# the conv kernels at their default launch (packed or not): their registers per thread, rounded up to 8 as an SM
# allocates them, leave room for the programs per SM that `fused_layer.ROWS` sizes their grids by (a grid sized
# for more would run a partial second wave; at most 32 programs per SM), compiled with the divisibility hints of
# the shapes they are sized for (D a multiple of 16)
CONV = """
from benchmarks.offline_compile import compile_cost, layer_kernels
for name, fn, cx, w, s in layer_kernels(64, 16, 2):
    if name.startswith("conv"):
        print(name.replace(" ", "_"), compile_cost(fn, cx, "bf16", w, s, True)[0], w)
"""


def test_conv_kernels_stay_resident_as_their_grids_assume():
    from ttt.ops.fused_layer import ROWS
    words = compile_offline(CONV, 900)
    assert len(words) == 24, words
    for name, regs, warps in zip(words[::3], words[1::3], words[2::3]):
        per_sm = 65536 // (-(-int(regs) // 8) * 8 * 32 * int(warps))
        want = ROWS[("bwd" if "bwd" in name else "fwd", name.startswith("conv+rope"), name.endswith("packed"))][1]
        assert want <= 32 and per_sm >= want, (name, regs)
