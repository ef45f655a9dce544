"""Where the time goes (GPU): kernel-time breakdown of a 125m training step and a 1.3b decode step.

    PYTHONPATH=. python3 benchmarks/profile_model.py [--train] [--decode]
Prints torch.profiler tables (CUDA time per kernel) so optimisations target the largest terms.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from ttt.config import get_config
from ttt.model import TTTLM


def show(fn, label, rows=25):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        fn()
        torch.cuda.synchronize()
    print(f"==== {label}")
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--decode", action="store_true")
    ap.add_argument("--mixer", default="ttt_linear")
    ap.add_argument("--T", type=int, default=8192)
    a = ap.parse_args()
    if a.train:
        cfg = get_config("125m", mixer=a.mixer)
        model = TTTLM(cfg).cuda()
        B = 32768 // a.T
        ids = torch.randint(0, cfg.vocab_size, (B, a.T + 1), device="cuda")

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits, _ = model(ids[:, :-1])
            F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        show(step, f"125m {a.mixer} fwd+bwd B{B} T{a.T}")
    if a.decode:
        cfg = get_config("1.3b", mixer="ttt_linear")
        model = TTTLM(cfg).cuda().to(torch.bfloat16).eval()
        with torch.inference_mode():
            _, s = model(torch.randint(0, cfg.vocab_size, (16, 64), device="cuda"))
            tok = torch.randint(0, cfg.vocab_size, (16, 1), device="cuda")
            show(lambda: model(tok, s), "1.3b ttt_linear decode step B16 (eager)")


if __name__ == "__main__":
    main()
