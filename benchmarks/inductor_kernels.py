"""The element-wise kernels Inductor writes for one compiled 125m block, forward and backward, without a GPU.

    python3 -m benchmarks.inductor_kernels --mixers ttt_linear+fused,attention --B 16 --T 2048 [--rows 40]

A profile on the GPU (`profile_model`) says how long the Inductor kernels of a training step take, in hundreds of
launches whose names hide what they do. This lists them per block: each Triton kernel Inductor generates for the
block's forward and backward graphs (as `blk.compile()` in `ttt train --compile`, called as a training step calls
it: `state_out=False`), with the bytes it reads and writes (Inductor's own count, `kernel_num_gb`) and the ATen
operators it fuses, so that a change to the layer's element-wise work can be judged on the CPU by the traffic it
removes (the default shape is the 125m 2k training step's, B16 T2048: twelve such blocks a step; B4 T8192 moves the
same bytes); and per graph what it launches when it runs (`launches`: Inductor's kernels, some more than once, the
GEMMs and the custom ops: a step near the host's limit pays host work per launch).

How, on a machine without a GPU: the block is traced on the CPU under bf16 autocast with Inductor's Triton backend
for the CPU device (`cpu_backend="triton"`, Hopper as the target), Inductor's scheduler and code generator run as
they would for CUDA and the source is kept; then each graph returns zeros of its outputs' shapes instead of running
(so any B and T take seconds, and the fused layer's own kernels, extern calls in the graphs and not listed here,
never run: TRITON_INTERPRET=1 only lets the layer pick its kernel path on the CPU). Private Inductor hooks,
tested with the torch of the test suite; the device's properties are an sm_90 GPU's with 132 SMs (Inductor sizes
split reductions by them). Differences from a GPU run: CPU autocast's operator lists, attention's CPU SDPA (the
GPU's cuDNN/flash kernels take other layouts around them), and `cat` / `stack`: on the CPU device Inductor copies
each input in a kernel of its own, where on CUDA it makes one kernel of pointwise inputs (or of inputs a pointwise
consumer reads), so the lists here count a launch per input where a GPU run has one in all (the TTT layer's
forward: the merged input product's weights, 4 here; the rows' spans, 3 here).
"""
from __future__ import annotations

import os

if __name__ == "__main__":  # lets the layer take its kernel path on the CPU (before Triton is imported; not on import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import functools  # noqa: E402
import re  # noqa: E402

import torch  # noqa: E402

KERNEL = re.compile(r"^def (triton_\w+)\(")
GB = re.compile(r"'kernel_num_gb': ([0-9.e+-]+)")
SMS = 132  # the H100's and the H200's
NODES = re.compile(r"^# Topologically Sorted Source Nodes: .*Original ATen: \[(.*)\]$")
RUN = re.compile(r"^\s+(triton_\w+)\.run\(")  # a launch of a generated kernel in the graph's code
EXTERN = re.compile(r"^\s+(?:\w+ = )?extern_kernels\.\w+\(")  # a GEMM (or another ATen kernel) Inductor calls
OP = re.compile(r"^\s+(?:\w+ = )?torch\.ops\.(\w+)\.(\w+)\.\w+\(")  # an operator called as is (custom ops)


class _Generated(Exception):
    """Raised once Inductor has written a graph's source."""


@functools.cache
def _offline_inductor() -> None:
    """Once a process: Inductor's Triton backend for the CPU device, generating for an sm_90 GPU of SMS SMs, with
    each kernel's bytes (kernel_num_gb) in its metadata."""
    import torch._inductor.config as cfg
    import torch.utils._triton as tu
    from torch._inductor.runtime.hints import DeviceProperties
    from triton.backends.compiler import GPUTarget

    cfg.cpu_backend = "triton"
    cfg.benchmark_kernel = True
    cfg.compile_threads = 1
    tu.triton_backend = lambda: GPUTarget("cuda", 90, 32)
    tu.triton_hash_with_backend = lambda: "offline"
    real = DeviceProperties.create  # the CPU as an H100 / H200 where Inductor sizes its work by the device
    DeviceProperties.create = lambda device: (real(device)._replace(multi_processor_count=SMS, cc=90, major=9)
                                              if device.type == "cpu" else real(device))


def _hooks(sources: list[str]):
    """A torch.compile backend: Inductor up to its generated source (appended to `sources`); the compiled graph then
    returns zeros of its outputs' shapes, strides and dtypes (nothing runs)."""
    import torch._inductor.graph as graph
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    _offline_inductor()

    def keep_source(self):
        code = self.codegen()[0]
        sources.append(getattr(code, "value", code))
        raise _Generated

    graph.GraphLowering._compile_to_module = keep_source

    def inner(gm, example_inputs, **kw):
        outs = [_blank(n) for n in gm.graph.output_node().args[0]]  # before Inductor's passes rewrite gm
        try:
            compile_fx_inner(gm, example_inputs, **kw)
        except Exception as e:  # noqa: BLE001 (Inductor wraps the exception)
            if "_Generated" not in repr(e):
                raise
        return make_boxed_func(lambda *args: [o() for o in outs])

    return functools.partial(compile_fx, inner_compile=inner)


def _blank(node):
    """A maker of a zero tensor shaped, strided and typed as the graph output `node` (its value from tracing)."""
    val = node.meta["val"] if hasattr(node, "meta") else node
    if isinstance(val, torch.Tensor):
        shape, stride, dtype = tuple(val.shape), tuple(val.stride()), val.dtype
        return lambda: torch.empty_strided(shape, stride, dtype=dtype).zero_()
    return lambda: val


def kernels(source: str) -> list[tuple[str, float, str]]:
    """[(kernel name, MB read and written, the ATen operators it fuses)] of one generated graph's source, in order
    of definition (each kernel's comment of operators and its metadata precede its `def`)."""
    out, ops, mb = [], "", 0.0
    for line in source.splitlines():
        if m := NODES.match(line):
            ops = m.group(1).replace("aten.", "")
        elif m := GB.search(line):
            mb = float(m.group(1)) * 1e3
        elif m := KERNEL.match(line):
            out.append((m.group(1), mb, ops))
            ops, mb = "", 0.0
    return out


def launches(source: str) -> dict:
    """What one generated graph's code launches when it runs (after the kernels' definitions, each of which carries a
    benchmark harness of its own): {"triton": launches of Inductor's kernels (a kernel may run more than once),
    "extern": GEMMs and other ATen kernels called, "ops": {"namespace::name": calls} of operators called as they
    are (the custom ops: one launch or more each)}."""
    body = source.rsplit("async_compile.wait(", 1)[-1]
    out = {"triton": 0, "extern": 0, "ops": {}}
    for line in body.splitlines():
        if RUN.match(line):
            out["triton"] += 1
        elif EXTERN.match(line):
            out["extern"] += 1
        elif m := OP.match(line):
            name = f"{m.group(1)}::{m.group(2)}"
            out["ops"][name] = out["ops"].get(name, 0) + 1
    return out


def block_graphs(mixer: str, B: int, T: int) -> dict[str, str]:
    """{"forward": source, "backward": source}: Inductor's code for one block of the 125m preset with `mixer` (a TTT
    mixer alone: the PyTorch layer path; "+fused": the fused layer kernels), called as a training step calls it."""
    from ttt.config import RunOptions, get_config
    from ttt.model import Block

    base, _, extra = mixer.partition("+")
    run = RunOptions(ttt_backend="triton", fused_layer=True) if extra == "fused" else RunOptions(fused_layer=False)
    torch.manual_seed(0)
    cfg = get_config("125m", mixer=base)
    blk = Block(cfg, run)
    sources: list[str] = []
    blk.compile(backend=_hooks(sources))
    h = torch.randn(B, T, cfg.d_model, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = blk(h, state_out=False)
    y.float().sum().backward()
    torch._dynamo.reset()
    if len(sources) != 2:
        raise RuntimeError(f"{mixer}: expected a forward and a backward graph, got {len(sources)} (graph breaks?)")
    return {"forward": sources[0], "backward": sources[1]}


def block_kernels(mixer: str, B: int, T: int) -> dict[str, list[tuple[str, float, str]]]:
    """{"forward": [...], "backward": [...]}: `kernels` of each of `block_graphs`."""
    return {part: kernels(src) for part, src in block_graphs(mixer, B, T).items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mixers", default="ttt_linear+fused,attention", help="comma list (bench_model's names)")
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=40, help="kernels listed per graph (largest first)")
    a = ap.parse_args()
    for mixer in a.mixers.split(","):
        for part, src in block_graphs(mixer, a.B, a.T).items():
            ks, n = kernels(src), launches(src)
            ops = ", ".join(f"{k} x{v}" for k, v in n["ops"].items()) or "none"
            print(f"== {mixer} {part}, B{a.B} T{a.T}: {len(ks)} kernels, {sum(mb for _, mb, _ in ks):.1f} MB; launches: "
                  f"{n['triton']} of them, {n['extern']} extern (GEMMs), operators called as they are: {ops}")
            for name, mb, ops in sorted(ks, key=lambda k: -k[1])[:a.rows]:
                print(f"   {mb:8.2f} MB  {name[:60]:60s}  {ops[:90]}")


if __name__ == "__main__":
    main()
