"""TTT-Linear backward kernels on the GPU: the split backward's variants (lean, full or Gluon chain, warps, segments).

First checks every output, final state and gradient of the triton backend with each backward against the
PyTorch dual form (fp32 reference on the same rounded inputs; bf16 and fp32; d = 64 and 128; lengths that are
not a multiple of b; a start in the middle of a mini-batch), and at every timed shape each variant's gradients
against the first one's. Then times forward (no grad) and forward + backward of each at the op shapes of
issue 8, and prints one table (medians of triton.testing.do_bench, ms).

    python3 -m benchmarks.bench_linear_bwd                  # checks + the four shapes
    python3 -m benchmarks.bench_linear_bwd --variants split split_lean::4 split_full:4,8,4:1
    python3 -m benchmarks.bench_linear_bwd --no-check --fwd-warps 8 --shapes 4x8192x12x64
    python3 -m benchmarks.bench_linear_bwd --no-check --variants split_gluon split_gluon:8,8,8 \
        --fwd-impls split_gluon split_gluon:8 --shapes 16x2048x12x64     # the Gluon kernels at 8 warps
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import torch

from benchmarks.common import bench, kernel_times, make, rel, run
from ttt.ops import TTTState
from ttt.ops.triton_backend import LinearKernels

SHAPES = [(16, 2048, 32, 64), (4, 8192, 32, 64), (1, 32768, 32, 64), (4, 8192, 12, 64)]


def kernels(impl, warps=None, seg=None, fwd="auto", scratch=None):
    """The TTT-Linear kernel choices of a backward variant ("dual": none, the PyTorch dual form)."""
    return None if impl == "dual" else LinearKernels(bwd=impl, bwd_warps=warps, bwd_segments=seg, fwd=fwd,
                                                     bwd_scratch=scratch)


def grads(leaves, st, impl, wo, warps=None, seg=None, fwd="auto", scratch=None):
    """[o, final params, gradients of every leaf] of one variant on `make`'s leaves and state."""
    backend = "dual" if impl == "dual" else "triton"
    o, s = run("linear", leaves, st, backend, kernels(impl, warps, seg, fwd, scratch))
    loss = (o.float() * wo).sum() + sum((p.float() * (i + 1)).sum() for i, p in enumerate(s.params))
    return [o.detach(), *(p.detach() for p in s.params), *torch.autograd.grad(loss, leaves)]


NAMES = ["o", "W_T", "c_T", "dq", "dk", "dv", "dlr", "dtau", "dln_w", "dln_b", "dW0", "dc0"]


def check(B, T, H, d, dtype, pos, impls, scratches=()):
    """Every variant's output, final state and gradients against the dual form on fp32 copies of the same
    (rounded) inputs; in 16 bits each impl also with the backward's scratch in each of `scratches` (the
    default forward)."""
    leaves, st = make("linear", B, T, H, d, dtype, pos=pos, grad=True)
    ref_leaves = [x.detach().float().requires_grad_() for x in leaves]
    ref_st = replace(st, params=TTTState.initial("linear", ref_leaves[7:], B).params)
    wo = torch.randn(B, T, H, d, device="cuda")
    ref = grads(ref_leaves, ref_st, "dual", wo)
    tol = 3e-2 if dtype != torch.float32 else 1e-4
    ok = True
    fwds = ("fused", "split") + (("fused_gluon", "split_gluon") if dtype != torch.float32 else ())  # (Gluon: 16-bit)
    runs = [(i, f, None) for i in impls for f in fwds]
    runs += [(i, "auto", s) for i in impls for s in scratches] if dtype != torch.float32 else []
    for impl, fwd, scratch in runs:
        got = grads(leaves, st, impl, wo, fwd=fwd, scratch=scratch)
        errs = {n: rel(x, y) for n, x, y in zip(NAMES, got, ref)}
        worst = max(errs.values())
        ok &= worst <= tol
        print(f"check {impl}+{fwd}-fwd{'+' + scratch if scratch else ''} B{B} T{T} H{H} d{d} {str(dtype)[6:]:8s} pos{pos}: "
              f"{'OK  ' if worst <= tol else 'FAIL'} worst {worst:.1e} ({max(errs, key=errs.get)}); "
              + " ".join(f"{n} {e:.1e}" for n, e in errs.items()), flush=True)
    return ok


def profile(B, T, H, d, variants):
    """Per-kernel CUDA times of one forward + backward of each variant (torch.profiler, ms per call)."""
    leaves, st = make("linear", B, T, H, d, torch.bfloat16, grad=True)
    do = torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16)
    for name, impl, warps, seg, scratch in variants:
        def fn():
            o, _ = run("linear", leaves, st, "triton", kernels(impl, warps, seg, scratch=scratch))
            torch.autograd.backward(o, do)
        for kern, ms, _ in kernel_times(fn, calls=5):
            if "kernel" in kern:
                print(f"profile B{B} T{T} H{H} {name:12s} {kern[:40]:40s} {ms:8.3f} ms/call", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="*", default=["split", "split_lean", "split_full"],
                    help="backward variants to time: split (picks lean/full by B*H), split_lean, "
                         "split_full, split_gluon (the full chain in Gluon), each as IMPL:PRE,CHAIN,POST (warps), "
                         "IMPL:PRE,CHAIN,POST:SEGMENTS or IMPL::SEGMENTS, and the backward's scratch dtype last: "
                         "IMPL:::bf16")
    ap.add_argument("--scratch", nargs="*", default=[], help="also check each impl with these bwd_scratch dtypes")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-time", action="store_true")
    ap.add_argument("--profile", default="", help="shapes to profile per kernel, e.g. 4x8192x32x64,1x32768x32x64")
    ap.add_argument("--fwd-warps", type=lambda v: [int(x) for x in v.split(",")], default=[],
                    help="also time the forward kernel at these warp counts, e.g. 8 or 2,8")
    ap.add_argument("--fwd-impls", nargs="*", default=[],
                    help="also time the forward this way (fused, split, fused_gluon, split_gluon, each as IMPL or "
                         "IMPL:WARPS) beside the default (auto), after checking its outputs against the default's")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds over the variants (the median is kept)")
    ap.add_argument("--shapes", default="all", help="'all' or e.g. 4x8192x32x64,1x32768x32x64")
    args = ap.parse_args()
    t_start = time.time()
    torch.backends.cuda.matmul.allow_tf32 = False
    ok = True
    if not args.no_check:
        for dtype in (torch.bfloat16, torch.float32):
            for d, T, pos in ((64, 1037, 7), (128, 300, 0), (64, 2048, 16)):
                ok &= check(2, T, 4, d, dtype, pos, ["split_lean", "split_full"]
                            + (["split_gluon"] if dtype != torch.float32 else []), args.scratch)  # (16-bit only)
    shapes = SHAPES if args.shapes == "all" else [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    variants = []
    for v in args.variants:
        impl, _, rest = v.partition(":")
        w, _, rest = rest.partition(":")
        seg, _, scratch = rest.partition(":")
        variants.append((v, impl, tuple(int(x) for x in w.split(",")) if w else None, int(seg) if seg else None,
                         scratch or None))
    rows = []
    for shape in filter(None, args.profile.split(",")):
        profile(*(int(x) for x in shape.split("x")), variants)
    for B, T, H, d in ([] if args.no_time else shapes):
        leaves, st = make("linear", B, T, H, d, torch.bfloat16, grad=True)
        do = torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            fwd_ms = bench(lambda: run("linear", leaves, st, "triton"), warmup=10, rep=50)
            for w in args.fwd_warps:  # the forward kernel at other warp counts (no grad: the same kernel, SAVE off)
                ms = bench(lambda: run("linear", leaves, st, "triton", LinearKernels(fwd_warps=w)), warmup=10, rep=50)
                print(f"time B{B} T{T} H{H} d{d} forward at {w} warps {ms:8.3f} ms (default {fwd_ms:.3f})", flush=True)
            o_ref = run("linear", leaves, st, "triton")[0].float()
            for spec in args.fwd_impls:
                impl, _, w = spec.partition(":")
                kern = LinearKernels(fwd=impl, fwd_warps=int(w) if w else None)
                err = rel(run("linear", leaves, st, "triton", kern)[0].float(), o_ref)
                ok &= err <= 2e-2
                ms = bench(lambda: run("linear", leaves, st, "triton", kern), warmup=10, rep=50)
                print(f"time B{B} T{T} H{H} d{d} forward {spec:6s} {ms:8.3f} ms (default {fwd_ms:.3f}; o vs default "
                      f"{err:.1e})", flush=True)
        # every variant's gradients == the first one's at this shape (bf16, same forward)
        wo = do.float()
        g_ref = None
        row = {"shape": f"B{B} T{T} H{H} d{d}", "fwd": fwd_ms}
        fns = {}
        for name, impl, warps, seg, scratch in variants:
            g = grads(leaves, st, impl, wo, warps=warps, seg=seg, scratch=scratch)[3:]
            if g_ref is None:
                g_ref = g
            else:
                errs = {n: rel(x, y) for n, x, y in zip(NAMES[3:], g, g_ref)}
                worst = max(errs.values())
                ok &= worst <= 2e-2
                print(f"check {name} vs {variants[0][0]} at {row['shape']}: worst {worst:.1e} "
                      f"({max(errs, key=errs.get)})", flush=True)

            def fn(impl=impl, warps=warps, seg=seg, scratch=scratch):
                o, _ = run("linear", leaves, st, "triton", kernels(impl, warps, seg, scratch=scratch))
                torch.autograd.backward(o, do)
                for t in leaves:
                    t.grad = None
            fns[name] = fn
        # the variants in turn, args.rounds times, the median of each: at small shapes a variant's time moved by
        # up to 0.5 ms with its place in a one-pass order (the same launch timed first and last)
        times = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                times[name].append(bench(fn, warmup=5, rep=max(10, 50 // args.rounds)))
        for name in fns:
            row[name] = sorted(times[name])[len(times[name]) // 2]
            print(f"time {row['shape']:22s} {name:14s} fwd+bwd {row[name]:8.3f} ms (fwd {fwd_ms:.3f}; rounds "
                  f"{' '.join(f'{t:.3f}' for t in times[name])})", flush=True)
        rows.append(row)
        leaves = st = do = g_ref = None
        torch.cuda.empty_cache()
    names = [v[0] for v in variants]
    print(f"\n=== TTT-Linear fwd+bwd, bf16, median ms ({torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}, triton {__import__('triton').__version__}) ===")
    print("| shape | fwd | " + " | ".join(f"{n} fwd+bwd" for n in names) + " | " +
          " | ".join(f"{n} bwd" for n in names) + " |")
    print("|---" * (2 + 2 * len(names)) + "|")
    for r in rows:
        print(f"| {r['shape']} | {r['fwd']:.3f} | " + " | ".join(f"{r[n]:.3f}" for n in names) + " | " +
              " | ".join(f"{r[n] - r['fwd']:.3f}" for n in names) + " |")
    print(f"checks: {'all OK' if ok else 'FAILED'}; total {time.time() - t_start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
