"""TTT-Linear backward kernels on the GPU: the split backward's variants (lean or full chain, warps, segments).

First checks every output, final state and gradient of the triton backend with each backward against the
PyTorch dual form (fp32 reference on the same rounded inputs; bf16 and fp32; d = 64 and 128; lengths that are
not a multiple of b; a start in the middle of a mini-batch), and at every timed shape each variant's gradients
against the first one's. Then times forward (no grad) and forward + backward of each at the op shapes of
issue 8, and prints one table (medians of triton.testing.do_bench, ms).

    PYTHONPATH=. python benchmarks/bench_linear_bwd.py                  # checks + the four shapes
    PYTHONPATH=. python benchmarks/bench_linear_bwd.py --variants split split_lean::4 split_full:4,8,4:1
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from ttt.ops import TTTInputs, TTTState, make_tau
from ttt.ops import triton_backend as tb
from ttt.ops.ttt_linear import dual

SHAPES = [(16, 2048, 32, 64), (4, 8192, 32, 64), (1, 32768, 32, 64), (4, 8192, 12, 64)]


def make(B, T, H, d, dtype, pos=0, b=16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*s, scale=1.0, shift=0.0):
        return torch.randn(*s, generator=g, device="cuda") * scale + shift

    q, k, v = (r(B, T, H, d).to(dtype) for _ in range(3))
    lr = (torch.rand(B, T, H, generator=g, device="cuda") * 0.9 + 0.05) / d ** 0.5
    tau = make_tau(0.01 * r(b))
    lnw, lnb = r(H, d, scale=0.2, shift=1.0), r(H, d, scale=0.2)
    W0, c0 = r(H, d, d, scale=d ** -0.5), r(H, d, scale=0.1)
    accum = (0.01 * r(B, H, d, d), 0.01 * r(B, H, d)) if pos % b else None
    return [q, k, v, lr, tau, lnw, lnb, W0, c0], accum


def state_of(leaves, accum, B, pos):
    st = TTTState.initial("linear", leaves[7:9], B)
    if pos:
        st = TTTState("linear", st.params, accum if accum is not None else tuple(torch.zeros_like(p) for p in st.params),
                      pos)
    return st


def run(leaves, st, impl, warps=None, seg=None):
    x = TTTInputs(*leaves[:7])
    if impl == "dual":
        return dual.forward(x, st)
    return tb.TritonOp("linear", tb.LinearKernels(bwd=impl, bwd_warps=warps, bwd_segments=seg))(x, st)


def grads(leaves, accum, B, pos, impl, wo, warps=None, seg=None):
    leaves = [x.detach().requires_grad_() for x in leaves]
    st = state_of(leaves, accum, B, pos)
    o, s = run(leaves, st, impl, warps=warps, seg=seg)
    loss = (o.float() * wo).sum() + sum((p.float() * (i + 1)).sum() for i, p in enumerate(s.params))
    return [o.detach(), *(p.detach() for p in s.params), *torch.autograd.grad(loss, leaves)]


NAMES = ["o", "W_T", "c_T", "dq", "dk", "dv", "dlr", "dtau", "dln_w", "dln_b", "dW0", "dc0"]


def rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(B, T, H, d, dtype, pos, impls):
    leaves, accum = make(B, T, H, d, dtype, pos=pos)
    wo = torch.randn(B, T, H, d, device="cuda")
    ref = grads([x.float() for x in leaves], accum, B, pos, "dual", wo)
    tol = 3e-2 if dtype != torch.float32 else 1e-4
    ok = True
    for impl in impls:
        got = grads(leaves, accum, B, pos, impl, wo)
        errs = {n: rel(x, y) for n, x, y in zip(NAMES, got, ref)}
        worst = max(errs.values())
        ok &= worst <= tol
        print(f"check {impl:5s} B{B} T{T} H{H} d{d} {str(dtype)[6:]:8s} pos{pos}: "
              f"{'OK  ' if worst <= tol else 'FAIL'} worst {worst:.1e} ({max(errs, key=errs.get)})", flush=True)
    return ok


def bench(fn):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def profile(B, T, H, d, variants):
    """Per-kernel times (torch.profiler, CUDA time per call) and register/spill counts of each backward."""
    from torch.profiler import ProfilerActivity, profile as tprofile
    from ttt.ops.ttt_linear import chunk
    leaves, _ = make(B, T, H, d, torch.bfloat16)
    q, k, v, lr, tau, lnw, lnb, W0, c0 = leaves
    W0, c0 = W0.expand(B, H, d, d).contiguous(), c0.expand(B, H, d).contiguous()
    _, _, _, ck = chunk.fwd(q, k, v, lr, tau, lnw, lnb, W0, c0, 16, group=8)
    do = torch.randn_like(q)
    dwT, dcT = torch.zeros_like(W0), torch.zeros_like(c0)
    for name, impl, warps, seg in variants:
        info = {}
        call = lambda: chunk.bwd(q, k, v, lr, tau, lnw, lnb, ck, do, dwT, dcT, 16, group=8, impl=impl,  # noqa: E731
                                 warps=warps, info=info, segments=seg)
        call()
        torch.cuda.synchronize()
        with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                call()
            torch.cuda.synchronize()
        for ev in prof.key_averages():
            if ev.count >= 5 and ("ttt" in ev.key or "_kernel" in ev.key):
                t = getattr(ev, "device_time", None) or getattr(ev, "cuda_time", 0.0)
                print(f"profile B{B} T{T} H{H} {name:12s} {ev.key[:40]:40s} {t / 1000:8.3f} ms/call", flush=True)
        for kn, kern in info.items():
            md = getattr(kern, "metadata", None)
            print(f"resources {name:12s} {kn:24s} regs {getattr(kern, 'n_regs', '?')} spills "
                  f"{getattr(kern, 'n_spills', '?')} shared {getattr(md, 'shared', '?')} warps "
                  f"{getattr(md, 'num_warps', '?')}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="*", default=["split", "split_lean", "split_full"],
                    help="backward variants to time: split (picks lean/full by B*H), split_lean, "
                         "split_full, each as IMPL:PRE,CHAIN,POST (warps), IMPL:PRE,CHAIN,POST:SEGMENTS or IMPL::SEGMENTS")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-time", action="store_true")
    ap.add_argument("--profile", default="", help="shapes to profile per kernel, e.g. 4x8192x32x64,1x32768x32x64")
    ap.add_argument("--shapes", default="all", help="'all' or e.g. 4x8192x32x64,1x32768x32x64")
    args = ap.parse_args()
    t_start = time.time()
    torch.backends.cuda.matmul.allow_tf32 = False
    ok = True
    if not args.no_check:
        for dtype in (torch.bfloat16, torch.float32):
            for d, T, pos in ((64, 1037, 7), (128, 300, 0), (64, 2048, 16)):
                ok &= check(2, T, 4, d, dtype, pos, ["split_lean", "split_full"])
    shapes = SHAPES if args.shapes == "all" else [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    variants = []
    for v in args.variants:
        impl, _, rest = v.partition(":")
        w, _, seg = rest.partition(":")
        variants.append((v, impl, tuple(int(x) for x in w.split(",")) if w else None, int(seg) if seg else None))
    rows = []
    for shape in filter(None, args.profile.split(",")):
        profile(*(int(x) for x in shape.split("x")), variants)
    for B, T, H, d in ([] if args.no_time else shapes):
        leaves, _ = make(B, T, H, d, torch.bfloat16)
        st = state_of(leaves, None, B, 0)
        do = torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            fwd_ms = bench(lambda: run(leaves, st, "split"))
        # every variant's gradients == the first one's at this shape (bf16, same forward)
        wo = do.float()
        g_ref = None
        row = {"shape": f"B{B} T{T} H{H} d{d}", "fwd": fwd_ms}
        for name, impl, warps, seg in variants:
            lv = [x.detach().requires_grad_() for x in leaves]
            stv = state_of(lv, None, B, 0)
            g = grads(leaves, None, B, 0, impl, wo, warps=warps, seg=seg)[3:]
            if g_ref is None:
                g_ref = g
            else:
                errs = {n: rel(x, y) for n, x, y in zip(NAMES[3:], g, g_ref)}
                worst = max(errs.values())
                ok &= worst <= 2e-2
                print(f"check {name} vs {variants[0][0]} at {row['shape']}: worst {worst:.1e} "
                      f"({max(errs, key=errs.get)})", flush=True)

            def fn():
                o, _ = run(lv, stv, impl, warps=warps, seg=seg)
                torch.autograd.backward(o, do)
                for t in lv:
                    t.grad = None
            row[name] = bench(fn)
            print(f"time {row['shape']:22s} {name:14s} fwd+bwd {row[name]:8.3f} ms (fwd {fwd_ms:.3f})", flush=True)
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
