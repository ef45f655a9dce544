"""Short GPU check of the TTT-Linear forward's NaN masking and the split backward (one shape, bf16):
    PYTHONPATH=. python benchmarks/gpu_nan_smoke.py"""
import sys

import torch

sys.path.insert(0, ".")
from benchmarks.bench_linear_bwd import check, make, run, state_of  # noqa: E402

ok = check(2, 1037, 4, 64, torch.bfloat16, 7, ["split_lean"])
leaves, _ = make(1, 64, 2, 64, torch.float32)
st = state_of(leaves, None, 1, 0)
with torch.no_grad():
    o0, _ = run(leaves, st, "split")
    for i in (1, 2):  # k, v
        x = leaves[i].clone()
        x[:, 20] = float("nan")
        lv = list(leaves)
        lv[i] = x
        o, _ = run(lv, st, "split")
        good = torch.equal(o[:, :20], o0[:, :20]) and bool(torch.isnan(o[:, 20]).all()) and bool(torch.isfinite(o0).all())
        print("nan at 20 in", "qkv"[i], "->", "OK" if good else "FAIL", flush=True)
        ok &= good
print("all OK" if ok else "FAILED")
