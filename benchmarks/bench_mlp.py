"""TTT-MLP kernel variants side by side on the GPU: first each variant against the dual form, then timings.

Variants are the triton backend's TTT-MLP kernel pairs (`mlp_impl`, `mlp_warps`): at d = 64 "regs" (the
register kernels, tokens as the row dimension, 8 warps; also at 16 warps) and "blocked"; at d = 96, 128
"blocked" (F-blocked, weights in a global scratch); at d = 64, 128 "smem" (Gluon: weights in shared memory,
wgmma, Hopper; F split across programs). Each variant is checked against the PyTorch dual
form (bf16; T = 2062, not a multiple of b = 16; a mid-mini-batch start with a pending accumulator; the output,
the final state and every gradient), and a variant that fails is not timed. Then fwd and fwd+bwd
(triton.testing.do_bench medians, bf16) at B16 T2048 H32 d64, B16 T2048 H16 d128 (both D = 2048) and B4 T8192
H32 d64, with TTT-Linear and causal SDPA (flash) at the same shape beside, and the fused decode step (B16, D = 2048 at
d 64 and 128, CUDA-graphed) for a few (block_f, warps) against TTT-Linear's step. One table at the end.

    python3 -m benchmarks.bench_mlp            # everything (about 5 minutes on an H200)
    python3 -m benchmarks.bench_mlp --skip-check --only fwd
    python3 -m benchmarks.bench_mlp --only fwd --variants regs-w8,smem --shapes 16x2048x32x64,16x2048x16x128
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import bench, make as _op_make, rel, run as _op_run, sdpa_ms
from ttt.ops import TTTState, triton_backend

B_MB = 16  # mini-batch size
DEV = "cuda"  # (a CPU smoke run of the checks under TRITON_INTERPRET=1 sets "cpu")
# (name, mlp_impl, mlp_warps, head dims it serves, dtypes checked); "smem" is the default on Hopper; "smem+keep":
# the smem pair whose forward keeps every mini-batch's start weights for the backward (`MLPKernels(keep=True)`).
# fp32 is checked by `pytest -m gpu tests/test_triton_mlp.py` (each dtype compiles its own kernels, and the
# whole run must stay under 4 minutes).
BF16, FP32 = torch.bfloat16, torch.float32
VARIANTS = [("regs-w8", "regs", 8, (64,), (BF16,)), ("regs-w16", "regs", 16, (64,), (BF16,)),
            ("blocked", "blocked", None, (64, 96, 128), (BF16,)), ("smem", "smem", None, (64, 128), (BF16,)),
            ("smem-keep", "smem+keep", None, (64, 128), (BF16,))]
# the check's shape: B1 H16, T = 2062 from position 7 (9 tokens to the mini-batch boundary in PyTorch, 128
# aligned mini-batches in the kernels, a 5-token tail): its integer arguments (H, mini-batch and checkpoint
# counts) have the divisibility by 16 of the timed shapes, so Triton compiles each kernel once for both
CHECK = dict(B=1, T=2062, H=16, pos=7)
SHAPES = [(16, 2048, 32, 64), (16, 2048, 16, 128), (4, 8192, 32, 64)]
# (block_f, num_warps) of the fused TTT-MLP decode step: the default up to head dim 64, the spill-free offline pick,
# the default above 64 (step_triton.block_f_default)
STEP_CONFIGS = [(64, 4), (32, 8), (32, 4)]


def make(kind, B, T, H, d, dtype, pos=0, seed=0, grad=False):
    """Random op inputs on DEV: leaves [q, k, v, lr, tau, ln_w, ln_b, *init] and the start state (bench_op's)."""
    return _op_make(kind, B, T, H, d, dtype, pos=pos, b=B_MB, seed=seed, grad=grad, dev=DEV)


def run(kind, leaves, st, impl=None, warps=None):
    impl, _, opt = (impl or "").partition("+")  # "smem+keep": MLPKernels(impl="smem", keep=True)
    kernels = triton_backend.MLPKernels(impl=impl or None, warps=warps, keep=opt == "keep") if kind == "mlp" else None
    return _op_run(kind, leaves, st, "triton", kernels)


def check(impl, warps, d, dtype):
    """Largest relative error of the variant against the dual form over the output, the final params and
    every gradient (q, k, v, lr, tau, LN weight/bias, initial params)."""
    leaves, st = make("mlp", CHECK["B"], CHECK["T"], CHECK["H"], d, dtype, pos=CHECK["pos"], grad=True)
    o1, s1 = run("mlp", leaves, st, impl, warps)
    o2, s2 = _op_run("mlp", leaves, st, "dual")
    g = torch.Generator(device=DEV).manual_seed(1)
    wo = torch.randn(o2.shape, generator=g, device=DEV).to(dtype)
    ws = [torch.randn(p.shape, generator=g, device=DEV) for p in s2.params]

    def loss(o, s):
        return (o.float() * wo.float()).sum() + sum((p.float() * w).sum() for p, w in zip(s.params, ws))

    g1 = torch.autograd.grad(loss(o1, s1), leaves)
    g2 = torch.autograd.grad(loss(o2, s2), leaves)
    errs = [rel(o1, o2)] + [rel(x, y) for x, y in zip(s1.params, s2.params)] + [rel(x, y) for x, y in zip(g1, g2)]
    return max(errs)


def time_op(kind, shape, impl=None, warps=None):
    B, T, H, d = shape
    leaves, st = make(kind, B, T, H, d, torch.bfloat16, grad=True)
    with torch.no_grad():
        t_fwd = bench(lambda: run(kind, leaves, st, impl, warps), warmup=10, rep=60)
    w = torch.randn(B, T, H, d, device=DEV, dtype=torch.bfloat16)

    def fb():
        o, s = run(kind, leaves, st, impl, warps)
        torch.autograd.grad((o * w).sum() + sum(p.sum() for p in s.params), leaves)
    return t_fwd, bench(fb, warmup=10, rep=60)


def time_step(kind, pos, block_f=None, warps=None, d=64):
    """One decode step (B16, D = 2048: H32 d64 or H16 d128; fp32 state, bf16 tokens), captured in a CUDA graph."""
    import triton.testing
    leaves, st = make(kind, 16, 1, 2048 // d, d, torch.bfloat16)
    st = TTTState(kind, st.params, tuple(torch.zeros_like(p) for p in st.params), pos)
    kernels = triton_backend.MLPKernels(step_block_f=block_f, step_warps=warps) if kind == "mlp" else None
    fn = lambda: _op_run(kind, leaves, st, "triton", kernels)  # noqa: E731  (T = 1: the fused step kernel)
    with torch.no_grad():
        fn()
        return triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median")


def main():
    ap = argparse.ArgumentParser(description="TTT-MLP kernel variants: correctness, then timings (GPU)")
    ap.add_argument("--skip-check", action="store_true", help="time without checking against the dual form")
    ap.add_argument("--only", default="fwd,step", help="comma list of: fwd (fwd and fwd+bwd), step")
    ap.add_argument("--variants", default=",".join(v[0] for v in VARIANTS),
                    help="comma list of the TTT-MLP variants to check and time (default: all)")
    ap.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES),
                    help="comma list of BxTxHxd shapes to time (default: %(default)s)")
    a = ap.parse_args()
    names = [v[0] for v in VARIANTS]
    if not set(a.variants.split(",")) <= set(names):
        ap.error(f"--variants: expected a comma list of {names}, got {a.variants!r}")
    variants = [v for v in VARIANTS if v[0] in a.variants.split(",")]
    try:
        shapes = [tuple(int(n) for n in s.split("x")) for s in a.shapes.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 4 for s in shapes):
        ap.error(f"--shapes: expected a comma list of BxTxHxd, got {a.shapes!r}")
    if not torch.cuda.is_available():
        raise SystemExit("bench_mlp: needs a CUDA GPU")
    t_start = time.time()
    torch.backends.cuda.matmul.allow_tf32 = False
    ok = {}
    rows = []
    for name, impl, warps, dims, dtypes in variants:
        for d in dims:
            ok[name, d] = True
            if a.skip_check:
                continue
            for dtype in dtypes:
                tol = 3e-2 if dtype == BF16 else 1e-4
                try:
                    err = check(impl, warps, d, dtype)
                except Exception as e:  # a variant that does not compile or launch is reported, not timed
                    err, msg = float("inf"), f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
                    print(f"check {name} d{d} {dtype}: {msg}", flush=True)
                good = err <= tol
                ok[name, d] &= good
                print(f"check {name:10} d{d:<4} {str(dtype)[6:]:9} max rel err {err:.2e} (tol {tol:.0e}) "
                      f"{'ok' if good else 'FAIL'}   [{time.time() - t_start:.0f} s]", flush=True)
    if "fwd" in a.only:
        for shape in shapes:
            B, T, H, d = shape
            tag = f"B{B} T{T} H{H} d{d}"
            for name, fn in (("ttt-linear", lambda: time_op("linear", shape)),
                             ("sdpa-flash", lambda: (sdpa_ms(*shape, "fwd"), sdpa_ms(*shape, "fwdbwd")))):
                t = fn()
                rows.append((tag, name, *t))
                print(f"{tag:22} {name:12} fwd {t[0]:8.3f} ms  fwd+bwd {t[1]:8.3f} ms   "
                      f"[{time.time() - t_start:.0f} s]", flush=True)
            for name, impl, warps, dims, _dtypes in variants:
                if d not in dims:
                    continue
                if not ok[name, d]:
                    rows.append((tag, name, float("nan"), float("nan")))
                    continue
                try:
                    t = time_op("mlp", shape, impl, warps)
                except Exception as e:  # e.g. out of shared memory at launch: reported, the run goes on
                    print(f"{tag} {name}: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
                    t = (float("nan"), float("nan"))
                rows.append((tag, name, *t))
                print(f"{tag:22} {name:12} fwd {t[0]:8.3f} ms  fwd+bwd {t[1]:8.3f} ms   "
                      f"[{time.time() - t_start:.0f} s]", flush=True)
    steps = []
    if "step" in a.only:
        for d in (64, 128):
            for pos in (3, 15):
                steps.append((d, pos, "ttt-linear", time_step("linear", pos, d=d)))
                for bf, w in STEP_CONFIGS:
                    try:
                        t = time_step("mlp", pos, bf, w, d=d)
                    except Exception as e:
                        print(f"step d{d} blk{bf} w{w}: {type(e).__name__}: {str(e).splitlines()[0][:100]}",
                              flush=True)
                        t = float("nan")
                    steps.append((d, pos, f"mlp blk{bf} w{w}", t))
    print(f"\n## TTT-MLP kernels, {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, b = {B_MB} "
          f"(do_bench medians, ms)\n")
    if rows:
        print("| shape | kernel | fwd | fwd+bwd |\n|---|---|---|---|")
        for tag, name, f, fb in rows:
            print(f"| {tag} | {name} | {f:.3f} | {fb:.3f} |")
    if steps:
        print("\n| decode step B16 D2048 (CUDA graph) | pos in mini-batch | kernel | ms |\n|---|---|---|---|")
        for d, pos, name, t in steps:
            print(f"| d{d} | {pos} {'(commit)' if pos % B_MB == B_MB - 1 else ''} | {name} | {t:.4f} |")
    print(f"\ntotal {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
