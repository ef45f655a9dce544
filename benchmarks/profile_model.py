"""Where the time goes (GPU): kernel time by category for a 1.3b prefill, a 125m training step and a 1.3b
decode step, for TTT-Linear and the Transformer++ baseline side by side.

    python3 -m benchmarks.profile_model [--prefill] [--train] [--decode] [--mixers ttt_linear,attention]
A "+fused" suffix (ttt_linear+fused) runs the fused layer kernels (benchmarks.bench_model.build).
Categories: GEMMs, the TTT op's kernels, the fused layer kernels, attention (flash), copies and casts, the
depthwise conv (PyTorch's), Inductor-fused element-wise, other element-wise/reductions. The top kernels follow.
"""
from __future__ import annotations

import argparse
import re

import torch

from benchmarks.common import host_times, kernel_times
from benchmarks.bench_model import build

CATEGORIES = [  # first match wins
    ("ttt op kernels", r"ttt_(linear|mlp)_.*kernel|^_(pre|chain|chain_lean|post|post_lean)_kernel"),
    ("fused layer kernels", r"_conv_(fwd|bwd)_kernel|_linear_decode_kernel"),
    ("attention (flash)", r"flash|fmha|attention"),
    ("GEMMs", r"gemm|cutlass|xmma|nvjet|cublas|matmul|sm90_|wgmma"),
    ("depthwise conv (PyTorch)", r"conv_depthwise|depthwise"),
    ("copies and casts", r"copy|cast|Memcpy|to_copy|cat_|CatArray"),
    ("Inductor-fused", r"^triton_"),
]


def category(name: str) -> str:
    for cat, pat in CATEGORIES:
        if re.search(pat, name, re.IGNORECASE):
            return cat
    return "other element-wise / reductions"


def show(fn, label, rows=12, host=False):
    if host:
        h = host_times(fn)
        print(f"==== {label}: host issue {h['issue_ms']:.1f} ms of a {h['wall_ms']:.1f} ms wall per call"
              + (" (host-bound)" if h["issue_ms"] > 0.9 * h["wall_ms"] else ""), flush=True)
        for name, n, ms in h["top"]:
            print(f"    {ms:9.2f} ms  {n:6d} x  {name[:100]}")
    kernels = kernel_times(fn)
    totals, launches = {}, {}
    for name, ms, n in kernels:
        totals[category(name)] = totals.get(category(name), 0.0) + ms
        launches[category(name)] = launches.get(category(name), 0) + n
    print(f"==== {label}: kernel time {sum(totals.values()):.1f} ms in {sum(launches.values()):.0f} launches",
          flush=True)
    for cat, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:34s} {ms:9.2f} ms  {launches[cat]:6.0f} launches")
    for name, ms, n in kernels[:rows]:
        print(f"    {ms:9.2f} ms  {n:6.0f} x  {name[:100]}")
    return totals


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefill", action="store_true", help="1.3b, bf16 weights, eager, head at the last position")
    ap.add_argument("--train", action="store_true", help="125m forward+backward under bf16 autocast")
    ap.add_argument("--decode", action="store_true", help="1.3b decode step, B16, eager")
    ap.add_argument("--decode-graphed", action="store_true", help="with --decode: also the compiled, CUDA-graphed "
                                                                   "decode (per-kernel times inside the graphs)")
    ap.add_argument("--decode-variants", default="merged",
                    help="with --decode-graphed: comma list of merged (the merged decode weights, GraphedDecoder's "
                         "default), unmerged, autotune (merged, compiled with max-autotune-no-cudagraphs)")
    ap.add_argument("--mixers", default="ttt_linear,attention")
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--compile", action="store_true", help="torch.compile each block (training)")
    ap.add_argument("--rows", type=int, default=None, help="top kernels listed per case (default 12; the graphed "
                    "decode 30)")
    ap.add_argument("--host", action="store_true", help="also the host side of each case: the time to issue one call "
                    "against its wall time, and the operators with the most host time")
    a = ap.parse_args()
    if a.rows is not None and a.rows < 0:
        raise SystemExit(f"--rows: expected a count >= 0, got {a.rows}")
    rows = dict(rows=a.rows) if a.rows is not None else {}
    B = 32768 // a.T
    for mixer in a.mixers.split(","):
        if a.prefill:
            cfg, model = build("1.3b", mixer)
            model = model.to(torch.bfloat16).eval()
            ids = torch.randint(0, cfg.vocab_size, (B, a.T), device="cuda")
            with torch.inference_mode():
                show(lambda: model(ids, logits="last"), f"1.3b {mixer} prefill B{B} T{a.T} (eager, bf16)", **rows)
            del model
        if a.train:
            cfg, model = build("125m", mixer)
            if a.compile:
                for blk in model.blocks:
                    blk.compile()
            ids = torch.randint(0, cfg.vocab_size, (B, a.T + 1), device="cuda")

            def step():
                # the gradients dropped first, as the training step's zero_grad(set_to_none=True) does (kept, each
                # backward would add into them: one more add kernel and its launch per parameter)
                model.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss, _ = model(ids[:, :-1], targets=ids[:, 1:], state_out=False)
                loss.backward()
            show(step, f"125m {mixer} fwd+bwd B{B} T{a.T}{' (compiled blocks)' if a.compile else ''}", host=a.host,
                 **rows)
            del model
        if a.decode and mixer != "attention":
            cfg, model = build("1.3b", mixer)
            model = model.to(torch.bfloat16).eval()
            with torch.inference_mode():
                _, s = model(torch.randint(0, cfg.vocab_size, (16, 64), device="cuda"), logits="none")
                tok = torch.randint(0, cfg.vocab_size, (16, 1), device="cuda")
                show(lambda: model(tok, s), f"1.3b {mixer} decode step B16 (eager)", **rows)
                if a.decode_graphed:  # what bench_model times: CUDA graphs of the compiled step (16 tokens)
                    from ttt.decode_graph import GraphedDecoder
                    variants = dict(merged=(True, True), unmerged=(True, False),
                                    autotune=("max-autotune-no-cudagraphs", True))
                    for name in a.decode_variants.split(","):
                        if name not in variants:
                            raise SystemExit(f"--decode-variants: expected names of {sorted(variants)}, got {name!r}")
                        comp, merge = variants[name]
                        dec = GraphedDecoder(model, s, compile=comp, merge=merge)
                        show(lambda: [dec.step(tok) for _ in range(cfg.mini_batch)],
                             f"1.3b {mixer} decode B16, compiled + CUDA graphs ({name}), {cfg.mini_batch} tokens "
                             "(one mini-batch)", host=a.host, **{"rows": 30, **rows})
                        dec = None
            del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
