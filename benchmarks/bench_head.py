"""The loss head (layers/head.py) on the GPU: linear_cross_entropy's loss + backward and its forward alone (no
gradients: evaluation), impl "torch" against "triton", at the 125m training step's shape (32768 tokens, D 768,
V 32000, bf16) and the 1.3b one (D 2048).

    python3 -m benchmarks.bench_head                       # check both against fp32 F.cross_entropy, then time
    python3 -m benchmarks.bench_head --tokens 32768 --dims 768,2048 --profile
    python3 -m benchmarks.bench_head --reduction none      # per-token losses (summed here), as `ttt eval` takes them
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import bench, kernel_times, rel
from ttt.layers.head import IGNORE, linear_cross_entropy

IMPLS = ("torch", "triton")  # the two that "auto" picks between


def head_inputs(tokens: int, D: int, V: int, seed: int = 0):
    """bf16 h [tokens, D] and weight [V, D] (logits of order 1) and targets [tokens], every 97th ignored (CUDA)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = (torch.randn(tokens, D, device="cuda", generator=g) / D ** 0.5).bfloat16().requires_grad_()
    w = (torch.randn(V, D, device="cuda", generator=g) / 2).bfloat16().requires_grad_()
    t = torch.randint(0, V, (tokens,), device="cuda", generator=g)
    t[::97] = IGNORE
    return h, w, t


def fp32_reference(h, w, t):
    """[loss, dh, dW] of F.cross_entropy (mean) on fp32 copies of h and w."""
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = F.cross_entropy(h32 @ w32.T, t)
    return [ref.detach(), *torch.autograd.grad(ref, (h32, w32))]


def loss_and_grads(h, w, t, impl, reduction="mean"):
    """[mean loss, dh, dW]; with reduction "none" the per-token losses summed and divided by the kept rows."""
    out = linear_cross_entropy(h, w, t, impl=impl, reduction=reduction)
    loss = out if reduction == "mean" else out.sum() / (t != IGNORE).sum()
    return [loss.detach(), *torch.autograd.grad(loss, (h, w))]


def loss_only(h, w, t, impl, reduction="mean"):
    with torch.no_grad():
        return linear_cross_entropy(h, w, t, impl=impl, reduction=reduction)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--dims", default="768,2048", help="comma list of model widths D")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--profile", action="store_true", help="also the kernels of one call (torch.profiler)")
    ap.add_argument("--reduction", choices=("mean", "none"), default="mean")
    args = ap.parse_args()
    ok = True
    print(f"=== loss head fwd+bwd, bf16, {args.tokens} tokens, V {args.vocab} ({torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}, triton {__import__('triton').__version__}) ===")
    for D in (int(x) for x in args.dims.split(",")):
        h, w, t = head_inputs(args.tokens, D, args.vocab)
        want = fp32_reference(h, w, t)
        for impl in IMPLS:
            r = args.reduction
            errs = [rel(a.float(), b) for a, b in zip(loss_and_grads(h, w, t, impl, r), want)]
            ok &= max(errs) <= 2e-2
            ms = bench(lambda: loss_and_grads(h, w, t, impl, r), warmup=3, rep=20)
            fwd = bench(lambda: loss_only(h, w, t, impl, r), warmup=3, rep=20)
            print(f"D {D:5d} {impl:7s} {r}: fwd+bwd {ms:8.3f} ms, fwd alone {fwd:8.3f} ms; rel err loss {errs[0]:.1e} "
                  f"dh {errs[1]:.1e} dW {errs[2]:.1e}", flush=True)
            if args.profile:
                for kern, k_ms, _ in kernel_times(lambda: loss_and_grads(h, w, t, impl, r), calls=3)[:8]:
                    print(f"  {impl:7s} {kern[:70]:70s} {k_ms:8.3f} ms/call", flush=True)
        h = w = want = None
        torch.cuda.empty_cache()
    print(f"checks: {'all OK' if ok else 'FAILED'}")


if __name__ == "__main__":
    main()
