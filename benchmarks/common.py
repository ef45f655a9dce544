"""What the benchmark scripts share: random TTT-op inputs and a runner through the library's own op objects,
the relative error, timing (Triton's do_bench medians, CUDA-graph replays, CUDA-event medians, per-kernel profiler times), the
environment line every result starts with, and mamba_ssm's Triton SSD and its `Mamba2` module (the issue's peer)
loaded without its CUDA extension.

The scripts run from the repository root as modules, e.g. `python3 -m benchmarks.bench_op --quick`.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import platform
import subprocess
import sys
import types

import torch

from ttt.ops import TTTInputs, TTTState, make_tau, resolve_op
from ttt.train import own_grads


def make(kind, B, T, H, d, dtype, pos=0, b=16, seed=0, grad=False, dev="cuda"):
    """Random inputs of one op call on `dev`: leaves [q, k, v, lr, tau, ln_w, ln_b, *initial weights] (q, k, v in
    `dtype`, the rest fp32) and the start state at position `pos` (a random pending accumulator when pos is
    inside a mini-batch). grad: every leaf requires grad (the state's weights are their differentiable expansion)."""
    g = torch.Generator(device=dev).manual_seed(seed)
    F = 4 * d

    def r(*s, scale=1.0, shift=0.0):
        return torch.randn(*s, generator=g, device=dev) * scale + shift

    q, k, v = (r(B, T, H, d).to(dtype) for _ in range(3))
    lr = (torch.rand(B, T, H, generator=g, device=dev) * 0.9 + 0.05) / d ** 0.5
    tau = make_tau(0.01 * r(b))
    lnw, lnb = r(H, d, scale=0.2, shift=1.0), r(H, d, scale=0.2)
    if kind == "linear":
        init = (r(H, d, d, scale=d ** -0.5), r(H, d, scale=0.1))
    else:
        init = (r(H, d, F, scale=d ** -0.5), r(H, F, scale=0.1), r(H, F, d, scale=F ** -0.5), r(H, d, scale=0.1))
    leaves = [q, k, v, lr, tau, lnw, lnb, *init]
    if grad:
        for t in leaves:
            t.requires_grad_()
    st = TTTState.initial(kind, init, B)
    if pos:
        st = TTTState(kind, st.params, tuple(0.01 * r(*p.shape) if pos % b else torch.zeros_like(p)
                                             for p in st.params), pos)
    return leaves, st


def run(kind, leaves, st, backend, kernels=None):
    """The op on `make`'s leaves from state st, resolved as a layer resolves it. kernels: the triton backend's
    explicit kernel choices (`ttt.ops.triton_backend.LinearKernels` / `MLPKernels`); None: the defaults."""
    q = leaves[0]
    op = resolve_op(kind, backend, q.device, q.dtype, kernels=kernels)
    return op(TTTInputs(*leaves[:7]), st)


def rel(a, b):
    """Relative L2 error of a against b in fp64; inf when a has a non-finite entry (an unwritten output)."""
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def bench(fn, warmup=25, rep=100):
    """Median milliseconds of fn() by triton.testing.do_bench."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def graphed_ms(fns, rep=100):
    """Median ms per call of `fns` (callables, each run once in order) replayed as one CUDA graph: kernel time and
    the graph's launch gaps without the host's launch cost, as inside a graphed decode step. Give each call its own
    inputs (e.g. a weight copy each) where one call's inputs would otherwise sit in L2 for the next."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (autotuning, first compiles) outside the capture
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in fns:
            fn()
    return bench(g.replay, warmup=5, rep=rep) / len(fns)


def sdpa_ms(B, T, H, d, mode, dtype=torch.bfloat16):
    """Median ms of causal flash attention (PyTorch SDPA) at [B, H, T, d]: mode "fwd" (no grad) or "fwdbwd"."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = (torch.randn(B, H, T, d, device="cuda", dtype=dtype, requires_grad=(mode == "fwdbwd")) for _ in range(3))
    do = torch.randn_like(q)

    def fn():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            if mode == "fwd":
                with torch.no_grad():
                    torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                torch.autograd.backward(o, do)
                q.grad = k.grad = v.grad = None
    return bench(fn)


def train_step(model, micro_batches: list[dict], graphs: bool = False):
    """One optimizer step as `ttt train` takes it, to time: bf16 autocast, the loss averaged over the micro-batches
    (each a dict of the model's arguments, `targets=` included), gradients clipped at 1.0, fused AdamW. graphs: the
    blocks were compiled with mode="reduce-overhead" (CUDA graphs): each micro-batch starts a new graph step, the
    gradients keep buffers of their own where there are several micro-batches (`ttt.train.own_grads`)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step():
        if graphs:
            own_grads(model, len(micro_batches))
        for kw in micro_batches:
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = model(**kw)
            (loss / len(micro_batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=not graphs or len(micro_batches) == 1)
    return step


def timed(fn, warmup=3, iters=10, each: list | None = None):
    """Median milliseconds of fn() measured with CUDA events (model-level timings, several kernels and syncs);
    each: a list that receives every iteration's milliseconds, in order."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    if each is not None:
        each.extend(times)
    return sorted(times)[len(times) // 2]


def kernel_times(fn, calls=1, warmup=3) -> list[tuple[str, float, float]]:
    """[(kernel name, CUDA ms per call of fn, launches per call)], longest first, from torch.profiler over `calls`
    calls of fn."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out = []
    for e in p.key_averages():
        t = getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0)
        if t > 0 and e.device_type == torch.autograd.DeviceType.CUDA:
            out.append((e.key, t / 1e3 / calls, e.count / calls))
    return sorted(out, key=lambda kv: -kv[1])


def host_times(fn, calls=5, warmup=3, sync=None, top=30) -> dict:
    """Where the host (CPU) time of fn goes: `issue_ms`, the wall time of one call without waiting for the device,
    `wall_ms`, per call over `calls` back-to-back calls ending in `sync` (torch.cuda.synchronize on CUDA): a step
    whose issue time reaches its wall time is bound by the host, not the GPU; `top`, the operators (aten, custom
    ops, compiled graphs, autograd nodes; every thread, the backward's included) with the most host time in one
    call, inclusive: [(name, calls, ms)], longest first."""
    import time
    from torch.profiler import ProfilerActivity, profile
    sync = sync or (torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None))
    for _ in range(warmup):
        fn()
    sync()
    t = time.perf_counter()
    fn()
    issue = time.perf_counter() - t
    sync()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    wall = (time.perf_counter() - t) / calls
    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
        sync()
    rows = sorted(((e.key, e.count, e.cpu_time_total / 1e3) for e in p.key_averages()), key=lambda r: -r[2])
    return dict(issue_ms=issue * 1e3, wall_ms=wall * 1e3, top=rows[:top])


def source_hash(root: str | None = None) -> str:
    """The first 12 hex digits of a SHA-256 over the Python sources under ttt/ and benchmarks/ (paths and contents,
    in path order): which code ran, where the repository's .git is missing or stale (the GPU machine gets a copy of
    the working tree); the same command at a checkout of the commit says whether it matches."""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for top in ("ttt", "benchmarks"):
        paths = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(os.path.join(root, top))
                       for f in fs if f.endswith(".py"))
        for rel in paths:
            with open(os.path.join(root, rel), "rb") as fh:
                h.update(rel.replace(os.sep, "/").encode() + b"\0" + fh.read() + b"\0")
    return h.hexdigest()[:12]


def environment() -> dict:
    """Device, versions, commit and `source_hash`, printed and stored with every result."""
    env = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", torch=torch.__version__,
               python=platform.python_version(),
               commit=os.environ.get("COMMIT") or subprocess.run(  # "-dirty": the tree differs from that commit
                   ["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip(),
               source=source_hash())
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def _from_mamba_ssm(module: str, name: str, what: str):
    """`name` from mamba_ssm's `module`, or None (said why). A wheel built without its CUDA extension (the GPU
    machine has no toolchain for it) fails at `import mamba_ssm`; its Triton submodules do not need the extension,
    so its module name is stubbed first (a normal install needs no stub)."""
    try:
        sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
        return getattr(importlib.import_module(module), name)
    except Exception as e:
        print(f"{what} unavailable: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return None


def load_mamba_ssd():
    """mamba_ssm's Triton SSD function `mamba_chunk_scan_combined`, or None (said why)."""
    return _from_mamba_ssm("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined", "mamba_ssm")


def load_mamba2_module():
    """mamba_ssm's own `Mamba2` module class, or None (said why). It needs `einops` (a pure-Python wheel: carry it
    in .whl/ beside mamba_ssm's). Without the causal_conv1d extension it runs its nn.Conv1d and Triton kernels; it
    must be built with use_mem_eff_path=False (the fused path needs the extension)."""
    return _from_mamba_ssm("mamba_ssm.modules.mamba2", "Mamba2", "mamba_ssm Mamba2 module")


class ModuleMixer(torch.nn.Module):
    """A [B, T, D] -> [B, T, D] module (mamba_ssm's Mamba2) as a block mixer: (x, state) -> (y, None), no
    streaming state (training and prefill only)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x, state=None, cu_seqlens=None):
        if cu_seqlens is not None:
            raise ValueError("ModuleMixer: packed documents (cu_seqlens) are not supported")
        return self.module(x), None


def with_mamba2_module(model, cfg):
    """`model` (a `mixer="mamba"` TTTLM) with every block's mixer replaced by mamba_ssm's `Mamba2` module at the
    config's Mamba shapes (d_state, expand, head dim, conv width; use_mem_eff_path=False); raises if unavailable."""
    Mamba2 = load_mamba2_module()
    if Mamba2 is None:
        raise RuntimeError("mamba_ssm's Mamba2 module is unavailable (the line above says why)")
    for blk in model.blocks:
        blk.mixer = ModuleMixer(Mamba2(cfg.d_model, d_state=cfg.mamba_d_state, d_conv=cfg.conv_width,
                                       expand=cfg.mamba_expand, headdim=cfg.mamba_head_dim, use_mem_eff_path=False))
    return model
