"""One small forward + backward of every Triton TTT kernel (for compute-sanitizer runs):
    compute-sanitizer --tool memcheck python benchmarks/kernel_smoke.py [linear,mlp,mlp_blocked,fused]
(fused: the layer kernels of ops/fused_layer.py through a whole (M) TTT-Linear layer, with a conv window;
(mlp at d = 96 runs the F-blocked kernels; mlp_blocked forces them at d = 64 too)."""
import sys

import torch

sys.path.insert(0, ".")
from benchmarks.bench_op import make, run  # noqa: E402
from ttt.ops.triton_backend import MLPKernels  # noqa: E402

kinds = sys.argv[1].split(",") if len(sys.argv) > 1 else ["linear", "mlp"]
for name in kinds:
    if name == "fused":
        from ttt.layers.ttt import TTTLinear
        layer = TTTLinear(128, 2, backend="triton", fused=True).cuda()
        x = torch.randn(2, 37, 128, device="cuda", requires_grad=True)
        y, st = layer(x[:, :20])
        y2, _ = layer(x[:, 20:], st)
        (y.sum() + y2.sum()).backward()
        torch.cuda.synchronize()
        print(name, "ok", flush=True)
        continue
    kind = "mlp" if name.startswith("mlp") else name
    kernels = MLPKernels(impl=name[4:]) if name.startswith("mlp_") else None  # mlp_blocked
    for d, pos, T in ((64, 0, 64), (96, 5, 83)):
        leaves, st = make(kind, 2, T, 2, d, torch.bfloat16, pos=pos, grad=True)
        o, s = run(kind, leaves, st, "triton", kernels)
        (o.float().sum() + sum(p.sum() for p in s.params)).backward()
        leaves, st = make(kind, 2, 1, 2, d, torch.bfloat16, pos=pos)
        run(kind, leaves, st, "triton")
    torch.cuda.synchronize()
    print(name, "ok", flush=True)
