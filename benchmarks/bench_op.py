"""Op-level benchmark of the TTT Triton kernels against our PyTorch dual form, SDPA causal attention
(FlashAttention backend) and fla's kernels (when importable), all on [B, T, H, d] inputs.

Checks correctness against the dual form first (outputs, final state, gradients) and refuses to time a
kernel that fails. Prints a table last; writes JSON (and a PNG plot of time vs context length at a fixed
number of tokens) under --out.

    python3 -m benchmarks.bench_op --out /tmp/bench            # everything
    python3 -m benchmarks.bench_op --only check,fwd --quick
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from benchmarks.common import bench, environment, load_mamba_ssd, make, rel, run, sdpa_ms
from ttt.ops import TTTState
from ttt.checkpoint import write_json

class Log:
    """What one run measured: `data` = {"check": [rows], "time": [rows], "env": ...}, written to `path` (JSON)
    after every timing, so a run cut short still leaves its numbers. Every check and timing below records into
    the log it is given (a fresh one, kept by nobody, when none is)."""

    def __init__(self, path: str = ""):
        self.data: dict = {"check": [], "time": []}
        self.path = path

    def time(self, op, impl, B, T, H, d, ms, mode="fwd"):
        self.data["time"].append({"op": op, "impl": impl, "B": B, "T": T, "H": H, "d": d, "ms": ms, "mode": mode})
        if self.path:
            write_json(self.path, self.data)
        print(f"time {mode:7s} {op:10s} {impl:22s} B{B:<3d} T{T:<6d} H{H} d{d}: {ms:8.3f} ms", flush=True)


def check(kind, B, T, H, d, dtype, pos=0, grad=False, tol=None, log: Log | None = None):
    leaves, st = make(kind, B, T, H, d, dtype, pos=pos, grad=grad)
    name = f"{kind} B{B} T{T} H{H} d{d} {str(dtype)[6:]} pos{pos}{' grad' if grad else ''}"
    o1, s1 = run(kind, leaves, st, "triton")
    # reference: the dual form on fp32 copies of the same (16-bit-rounded) inputs
    ref_leaves = [x.detach().float().requires_grad_(grad) for x in leaves]
    st_ref = TTTState(kind, tuple(p.float() for p in st.params), st.accum, st.pos)
    if grad:  # rebuild the start state from the reference leaves so the init gradient reaches them
        st_ref = TTTState(kind, TTTState.initial(kind, ref_leaves[7:], B).params, st.accum, st.pos)
    o2, s2 = run(kind, ref_leaves, st_ref, "dual")
    errs = {"o": rel(o1, o2)}
    errs.update({f"state{i}": rel(a, c) for i, (a, c) in enumerate(zip(s1.params, s2.params))})
    if grad:
        wo = torch.randn_like(o2)
        g1 = torch.autograd.grad((o1.float() * wo).sum() + sum(p.sum() for p in s1.params), leaves)
        g2 = torch.autograd.grad((o2 * wo).sum() + sum(p.sum() for p in s2.params), ref_leaves)
        names = ["q", "k", "v", "lr", "tau", "ln_w", "ln_b"] + [f"init{i}" for i in range(len(leaves) - 7)]
        errs.update({f"d{n}": rel(a, c) for n, a, c in zip(names, g1, g2)})
    tol = tol if tol is not None else (5e-2 if dtype != torch.float32 else 2e-3)
    worst = max(errs.values())
    ok = worst <= tol
    (log or Log()).data["check"].append({"name": name, "ok": ok, "tol": tol, **errs})
    print(f"check {name}: {'OK' if ok else 'FAIL'} worst {worst:.2e} " +
          " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
    return ok


def time_ttt(kind, B, T, H, d, mode, dtype=torch.bfloat16, backend="triton", dot_mode=None, warps=None,
             linear_bwd=None, mlp_impl=None, log: Log | None = None):
    """Kernel choices go in as arguments: TTT-Linear through `triton_backend.LinearKernels` (dot_mode, warps of
    the forward, linear_bwd "split" | "split_lean" | "split_full"), TTT-MLP through `MLPKernels` (mlp_impl, see
    triton_backend.MLP_IMPLS; its variants are compared in benchmarks/bench_mlp.py)."""
    from ttt.ops import triton_backend
    kernels = None
    if kind == "linear" and (dot_mode is not None or warps is not None or linear_bwd is not None):
        kernels = triton_backend.LinearKernels(bwd=linear_bwd or "split", dot_mode=dot_mode, fwd_warps=warps)
    if kind == "mlp" and mlp_impl is not None:
        kernels = triton_backend.MLPKernels(impl=mlp_impl)
    leaves, st = make(kind, B, T, H, d, dtype, grad=(mode == "fwdbwd"))
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                run(kind, leaves, st, backend, kernels)
    else:
        do = torch.randn(B, T, H, d, device="cuda", dtype=dtype)

        def fn():
            o, _ = run(kind, leaves, st, backend, kernels)
            torch.autograd.backward(o, do)
            for t in leaves:
                t.grad = None
    ms = bench(fn)
    impl = backend + ("" if dot_mode is None else f"_dot{dot_mode}") + ("" if warps is None else f"_w{warps}") \
        + ("" if linear_bwd is None else f"_bwd_{linear_bwd}") + ("" if mlp_impl is None else f"_{mlp_impl}")
    (log or Log()).time(f"ttt_{kind}", impl, B, T, H, d, ms, mode)
    return ms


def time_sdpa(B, T, H, d, mode, dtype=torch.bfloat16, log: Log | None = None):
    ms = sdpa_ms(B, T, H, d, mode, dtype)
    (log or Log()).time("attention", "sdpa_flash", B, T, H, d, ms, mode)
    return ms


def time_fla(B, T, H, d, mode, dtype=torch.bfloat16, log: Log | None = None):
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.ttt import chunk_ttt_linear
    except Exception as e:  # fla missing or failing on this Triton
        print(f"fla unavailable: {type(e).__name__}: {e}", flush=True)
        return None
    gr = mode == "fwdbwd"
    q, k, v = (torch.randn(B, T, H, d, device="cuda", dtype=dtype, requires_grad=gr) for _ in range(3))
    eta = (torch.rand(B, T, H, 1, device="cuda", dtype=dtype) * 0.1).requires_grad_(gr)
    w = torch.ones(H, d, device="cuda", dtype=dtype, requires_grad=gr)
    bb = torch.zeros(H, d, device="cuda", dtype=dtype, requires_grad=gr)
    h0 = torch.zeros(B, H, d, d, device="cuda", dtype=torch.float32, requires_grad=gr)
    hb0 = torch.zeros(B, H, 1, d, device="cuda", dtype=torch.float32, requires_grad=gr)
    gg = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device="cuda", dtype=torch.float32)).requires_grad_(gr)
    beta = torch.rand(B, T, H, device="cuda", dtype=dtype).requires_grad_(gr)
    do = torch.randn(B, T, H, d, device="cuda", dtype=dtype)
    out = {}
    for name, call in (
        ("fla_chunk_ttt_linear", lambda: chunk_ttt_linear(q, k, v, w, bb, eta, scale=1.0, chunk_size=16,
                                                          initial_state=h0, initial_state_bias=hb0,
                                                          output_final_state=True)[0]),
        ("fla_gated_delta_rule", lambda: chunk_gated_delta_rule(q, k, v, gg, beta, use_qk_l2norm_in_kernel=True,
                                                                output_final_state=True)[0]),
    ):
        def fn():
            if mode == "fwd":
                with torch.no_grad():
                    call()
            else:
                o = call()
                torch.autograd.backward(o, do)
        try:
            fn()
            ms = bench(fn)
        except Exception as e:
            print(f"{name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        (log or Log()).time("fla", name, B, T, H, d, ms, mode)
        out[name] = ms
    return out


def time_mamba2(B, T, mode, dtype=torch.bfloat16, heads=64, headdim=64, d_state=128, chunk=256, log: Log | None = None):
    """mamba_ssm's SSD (Mamba-2) at the 1.3b Mamba-2 layer's shapes: 64 heads x 64, d_state 128, 1 group."""
    ssd = load_mamba_ssd()
    if ssd is None:
        return None
    gr = mode == "fwdbwd"
    x = torch.randn(B, T, heads, headdim, device="cuda", dtype=dtype, requires_grad=gr)
    dt = torch.randn(B, T, heads, device="cuda", dtype=dtype, requires_grad=gr)
    A = (-torch.rand(heads, device="cuda", dtype=torch.float32) - 0.5).requires_grad_(gr)
    Bm, Cm = (torch.randn(B, T, 1, d_state, device="cuda", dtype=dtype, requires_grad=gr) for _ in range(2))
    dt_bias = torch.zeros(heads, device="cuda", dtype=torch.float32, requires_grad=gr)
    do = torch.randn_like(x)

    def call():
        return ssd(x, dt, A, Bm, Cm, chunk_size=chunk, dt_bias=dt_bias, dt_softplus=True)

    def fn():
        if mode == "fwd":
            with torch.no_grad():
                call()
        else:
            torch.autograd.backward(call(), do)
    try:
        fn()
        ms = bench(fn)
    except Exception as e:
        print(f"mamba_ssm SSD failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return None
    (log or Log()).time("mamba2", "mamba_ssm_ssd", B, T, heads, headdim, ms, mode)
    return ms


def time_simple_gla(B, T, H, d, dtype=torch.bfloat16, log: Log | None = None):
    """fla's chunk_simple_gla forward (a Mamba-2-class scalar-gated linear recurrence) at the TTT shapes. Its
    backward refuses to run on Hopper with Triton < 3.7.1 (fla's own guard), so forward only."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:
        print(f"fla simple_gla unavailable: {type(e).__name__}: {e}", flush=True)
        return None
    q, k, v = (torch.randn(B, T, H, d, device="cuda", dtype=dtype) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device="cuda", dtype=torch.float32))

    def fn():
        with torch.no_grad():
            chunk_simple_gla(q, k, v, g, scale=d ** -0.5, output_final_state=True)
    try:
        fn()
        ms = bench(fn)
    except Exception as e:
        print(f"fla simple_gla failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return None
    (log or Log()).time("fla", "fla_chunk_simple_gla", B, T, H, d, ms, "fwd")
    return ms


def time_decode(kind, B, H, d, pos=5, log: Log | None = None):
    log = log or Log()
    leaves, st = make(kind, B, 1, H, d, torch.bfloat16, pos=pos)
    for backend in ("dual", "triton"):  # "dual" at T = 1 is the PyTorch step
        def fn():
            with torch.no_grad():
                run(kind, leaves, st, backend)
        ms = bench(fn)
        log.time(f"ttt_{kind}", f"step_{'torch' if backend == 'dual' else backend}", B, 1, H, d, ms, "decode")
        # a CUDA graph of the step removes launch overhead (what generation uses)
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            gph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(gph):
                fn()
            ms = bench(gph.replay)
            log.time(f"ttt_{kind}", f"step_{'torch' if backend == 'dual' else backend}_graph", B, 1, H, d, ms,
                   "decode")
        except Exception as e:
            print(f"graph capture failed for {backend}: {type(e).__name__}: {str(e)[:200]}", flush=True)


def plot(rows, path, tokens):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, mode in zip(axes, ("fwd", "fwdbwd")):
        series = {}
        for r in rows:
            if r["mode"] == mode and r["B"] * r["T"] == tokens and r["d"] == 64:
                series.setdefault(f"{r['op']}:{r['impl']}", []).append((r["T"], r["ms"]))
        for name, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length T (B*T = %d tokens, H=32, d=64, bf16)" % tokens)
        ax.set_ylabel("ms (median)")
        ax.set_title("forward" if mode == "fwd" else "forward + backward")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/bench"))
    ap.add_argument("--only", default="check,fwd,fwdbwd,decode,plot")
    ap.add_argument("--kinds", default="linear,mlp")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--variants", default="",
                    help="comma list of kernel variants to time too: dot1 (tf32 dots), w8 (TTT-Linear forward warps), "
                         "lbsplit_lean / lbsplit_full (TTT-Linear backward impl, fwdbwd only), mregs / "
                         "mblocked (TTT-MLP kernel pair)")
    ap.add_argument("--dims", default="64", help="comma list of head dims timed at D = 2048 (H = 2048 / d)")
    ap.add_argument("--skip", default="", help="comma list of baselines not to time: sdpa, fla, mamba")
    ap.add_argument("--Ts", default="", help="comma list of context lengths (B = 32768 / T)")
    ap.add_argument("--commit", default="")
    ap.add_argument("--plot-from", default="", help="only redraw the plot from a bench_op.json")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out, "bench_op.json"))
    if args.plot_from:
        plot(json.load(open(args.plot_from))["time"], os.path.join(args.out, "bench_op.png"), 32768)
        return 0
    only = set(args.only.split(","))
    kinds = args.kinds.split(",")
    torch.backends.cuda.matmul.allow_tf32 = False
    env = environment() | ({"commit": args.commit} if args.commit else {})
    log.data["env"] = env
    print(env, flush=True)
    good = {k: True for k in kinds}
    if "check" in only:
        t0 = time.time()
        for kind in kinds:
            ok = True
            try:
                ok &= check(kind, 4, 8192 if kind == "linear" else 2048, 32, 64, torch.bfloat16, log=log)
                ok &= check(kind, 2, 1024, 8, 64, torch.float32, tol=1e-4, log=log)
                ok &= check(kind, 2, 1003, 4, 128, torch.bfloat16, pos=5, log=log)
                ok &= check(kind, 2, 555, 16, 96, torch.bfloat16, pos=16, log=log)
                ok &= check(kind, 2, 2048, 8, 64, torch.bfloat16, grad=True, log=log)
                ok &= check(kind, 1, 777, 4, 64, torch.float32, pos=3, grad=True, tol=1e-4, log=log)
                if kind == "mlp":  # head dims > 64 run the F-blocked kernels (every MLP variant: bench_mlp.py)
                    ok &= check(kind, 1, 555, 4, 128, torch.bfloat16, pos=5, grad=True, log=log)
                    ok &= check(kind, 1, 300, 2, 96, torch.float32, pos=16, grad=True, tol=1e-4, log=log)
                ok &= check(kind, 1, 1, 4, 64, torch.float32, pos=3, tol=1e-4, log=log)
                ok &= check(kind, 16, 1, 32, 64, torch.bfloat16, pos=15, log=log)  # decode step with the commit
            except NotImplementedError as e:
                print(f"{kind}: not implemented: {e}", flush=True)
                ok = False
            good[kind] = ok
        print(f"checks took {time.time() - t0:.1f}s", flush=True)
    tokens = 32768
    Ts = [2048, 8192, 32768] if args.quick else [2048, 4096, 8192, 16384, 32768]
    if args.Ts:
        Ts = [int(t) for t in args.Ts.split(",")]
    skip = set(args.skip.split(","))
    for mode in ("fwd", "fwdbwd"):
        if mode not in only:
            continue
        for T in Ts:
            B = tokens // T
            if "sdpa" not in skip:
                time_sdpa(B, T, 32, 64, mode, log=log)
            if "mamba" not in skip:
                time_mamba2(B, T, mode, log=log)
            if "fla" not in skip and mode == "fwd":
                time_simple_gla(B, T, 32, 64, log=log)
            for kind in kinds:
                if not good[kind]:
                    continue
                for d in (int(x) for x in args.dims.split(",")):
                    time_ttt(kind, B, T, 2048 // d, d, mode, log=log)
                    for var in filter(None, args.variants.split(",")):
                        if var.startswith("m"):
                            if kind != "mlp":
                                continue
                            kw = {"mlp_impl": var[1:]}
                        elif var.startswith("lb"):
                            if mode != "fwdbwd" or kind != "linear":
                                continue
                            kw = {"linear_bwd": var[2:]}
                        elif kind != "linear":
                            continue
                        elif var.startswith("dot"):
                            kw = {"dot_mode": int(var[3:])}
                        else:
                            kw = {"warps": int(var[1:])}
                        try:
                            time_ttt(kind, B, T, 2048 // d, d, mode, log=log, **kw)
                        except Exception as e:  # e.g. a variant over the shared-memory limit
                            print(f"variant {var} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            if "fla" not in skip:
                time_fla(B, T, 32, 64, mode, log=log)
        if not args.quick:
            for kind in kinds:
                if good[kind]:
                    time_ttt(kind, 1, 2048, 32, 64, mode, backend="dual", log=log)
    if "decode" in only:
        for kind in kinds:
            if good[kind]:
                time_decode(kind, 16, 32, 64, log=log)
    write_json(log.path, log.data)
    if "plot" in only:
        try:
            plot(log.data["time"], os.path.join(args.out, "bench_op.png"), tokens)
        except Exception as e:
            print(f"plot failed: {e}", flush=True)
    print("\n=== summary (median ms) ===")
    for r in log.data["time"]:
        print(f"{r['mode']:7s} {r['op']:10s} {r['impl']:22s} B{r['B']:<3d} T{r['T']:<6d} H{r['H']} d{r['d']}: "
              f"{r['ms']:8.3f}")
    bad = [c["name"] for c in log.data["check"] if not c["ok"]]
    print("checks failed:", bad if bad else "none")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
