"""The Mamba-2 layer's scan backends: the glue to mamba_ssm's Triton SSD kernels (argument mapping, checked
on the CPU against stand-in kernels that follow the kernels' documented contract), backend choice and its
errors; and on a GPU (marked gpu) the real kernels against the chunked PyTorch reference: outputs, final
state, every gradient, and the decode step."""
from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from ttt.config import MAMBA_BACKENDS as CFG_BACKENDS, RunOptions, get_config
from ttt.layers.mamba import (MAMBA_BACKENDS, Mamba2, SSDKernels, load_mamba_ssm, resolve_mamba_backend)
from ttt.model import TTTLM
from ttt.ops.packed import packing


# --- stand-in kernels: the contract of mamba_chunk_scan_combined / selective_state_update, token by token ---

class FakeKernels:
    """Records the arguments and computes what the kernels document, one token at a time:
    s_t = exp(dt_t A) s_{t-1} + dt_t x_t B_t^T, y_t = s_t C_t + D x_t (per head; group g = 0 for every head).
    seq_idx: s restarts from zero where the document changes (initial_states enter the first document only);
    return_varlen_states: also every document's final state (cu_seqlens), which has no backward in the kernel."""

    def __init__(self):
        self.calls = []

    def chunk(self, x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
              cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False,
              return_varlen_states=False):
        b, L, h, p = x.shape
        self.calls.append(("chunk", dict(B=tuple(B.shape), C=tuple(C.shape), chunk_size=chunk_size, D=tuple(D.shape),
                                         z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, final=return_final_states,
                                         init=None if initial_states is None else tuple(initial_states.shape),
                                         seq_idx=seq_idx, cu_seqlens=cu_seqlens, varlen=return_varlen_states)))
        assert B.shape == C.shape == (b, L, 1, B.shape[-1]) and dt.shape == (b, L, h) and A.shape == (h,)
        if seq_idx is not None:
            assert seq_idx.shape == (b, L) and seq_idx.dtype == torch.int32
        if return_varlen_states:
            assert b == 1 and cu_seqlens is not None
            assert not (torch.is_grad_enabled() and x.requires_grad), "the kernel's varlen states have no backward"
        s = torch.zeros(b, h, p, B.shape[-1], dtype=x.dtype) if initial_states is None else initial_states.clone()
        ys, ends = [], []
        for t in range(L):
            if seq_idx is not None and t > 0 and bool((seq_idx[:, t] != seq_idx[:, t - 1]).any()):
                ends.append(s)
                s = s * (seq_idx[:, t] == seq_idx[:, t - 1])[:, None, None, None]
            s = torch.exp(dt[:, t] * A)[..., None, None] * s \
                + torch.einsum("bhp,bn->bhpn", x[:, t] * dt[:, t, :, None], B[:, t, 0])
            ys.append(torch.einsum("bhpn,bn->bhp", s, C[:, t, 0]) + D[:, None] * x[:, t])
        y = torch.stack(ys, 1)
        if return_varlen_states:
            varlen = torch.cat(ends + [s])  # [N, h, p, n]
            assert varlen.shape[0] == cu_seqlens.numel() - 1
            return (y, s, varlen) if return_final_states else (y, varlen)
        return (y, s) if return_final_states else y

    def step(self, state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, state_batch_indices=None):
        b, h, p = x.shape
        n = state.shape[-1]
        self.calls.append(("step", dict(dt=tuple(dt.shape), A=tuple(A.shape), B=tuple(B.shape), D=tuple(D.shape))))
        assert dt.shape == (b, h, p) and A.shape == (h, p, n) and B.shape == C.shape == (b, 1, n) and D.shape == (h, p)
        dt = dt + dt_bias if dt_bias is not None else dt
        assert not dt_softplus
        state.mul_(torch.exp(dt[..., None] * A)).add_((dt * x)[..., None] * B[:, :, None, :])  # in place, as the kernel
        return torch.einsum("bhpn,bn->bhp", state, C[:, 0]) + D * x

    def kernels(self):
        return SSDKernels(self.chunk, self.step)


def scan_inputs(T, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    B, H, P, N = 2, 3, 4, 5
    t = dict(xh=torch.randn(B, T, H, P, generator=g, dtype=torch.float64),
             dt=torch.rand(B, T, H, generator=g, dtype=torch.float64) * 0.5 + 0.01,
             A=-torch.rand(H, generator=g, dtype=torch.float64) - 0.2,
             Bm=torch.randn(B, T, N, generator=g, dtype=torch.float64),
             Cm=torch.randn(B, T, N, generator=g, dtype=torch.float64),
             D=torch.randn(H, generator=g, dtype=torch.float64),
             ssm=torch.randn(B, H, P, N, generator=g, dtype=torch.float64))
    if requires_grad:
        for v in t.values():
            v.requires_grad_()
    return t


@pytest.mark.parametrize("T", [1, 9, 37])
@pytest.mark.parametrize("grad", [False, True])
def test_kernel_glue_maps_arguments_like_the_reference(T, grad):
    layer = Mamba2(12, d_state=5, head_dim=4, chunk_size=8, backend="torch", kernel_chunk_size=16)
    inp = scan_inputs(T, requires_grad=grad)
    fake = FakeKernels()
    with torch.set_grad_enabled(grad):
        y_ref, s_ref = layer.scan(**inp)
        y, s = layer.scan(**inp, kernels=fake.kernels())
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)
    kind, args = fake.calls[-1]
    # one token without gradients: the step kernel; else the chunked one (the step kernel has no backward)
    assert kind == ("step" if T == 1 and not grad else "chunk")
    if kind == "chunk":
        assert args["chunk_size"] == 16 and args["final"] and args["z"] is None and args["dt_bias"] is None
        assert not args["dt_softplus"] and args["D"] == (3,)
    if grad:
        w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
        g_ref = torch.autograd.grad((y_ref * w).sum() + s_ref.sum(), list(inp.values()))
        g = torch.autograd.grad((y * w).sum() + s.sum(), list(inp.values()))
        for name, a, b in zip(inp, g, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


PACKED_LENS = [1, 9, 3, 20, 4]  # documents across the kernel's chunks of 16 and the reference's of 8


def packed_inputs(given: bool, grad: bool, lens=PACKED_LENS, seed=0):
    """scan() arguments for one packed sequence of `lens` documents: ssm one row per document (given) or None."""
    inp = {k: (v[:1] if k not in ("A", "D", "ssm") else v) for k, v in scan_inputs(sum(lens), seed).items()}
    g = torch.Generator().manual_seed(seed + 1)
    inp["ssm"] = torch.randn(len(lens), *inp["ssm"].shape[1:], generator=g, dtype=torch.float64) if given else None
    if grad:
        for v in inp.values():
            if v is not None:
                v.requires_grad_()
    return inp, packing(torch.tensor([0, *lens]).cumsum(0), sum(lens))


@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_kernel_glue_on_packed_documents(given, grad):
    """seq_idx and cu_seqlens reach the kernel as it documents them; outputs, the documents' final states
    (without gradients: the kernel's varlen states have none, so with gradients the glue returns None) and
    every gradient equal the chunked reference's."""
    layer = Mamba2(12, d_state=5, head_dim=4, chunk_size=8, backend="torch", kernel_chunk_size=16)
    inp, pk = packed_inputs(given, grad)
    fake = FakeKernels()
    with torch.set_grad_enabled(grad):
        y_ref, s_ref = layer.scan(**inp, pk=pk)
        y, s = layer.scan(**inp, kernels=fake.kernels(), pk=pk)
    kind, args = fake.calls[-1]
    assert kind == "chunk" and args["init"] is None and args["varlen"] == (not grad)
    assert torch.equal(args["seq_idx"][0].long(), pk.seq_idx)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert s_ref.shape == (len(PACKED_LENS), 3, 4, 5)
    if grad:
        assert s is None
        leaves = [v for v in inp.values() if v is not None]
        w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
        for a, b in zip(torch.autograd.grad((y * w).sum(), leaves), torch.autograd.grad((y_ref * w).sum(), leaves)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)


def test_packed_state_without_ssm_is_refused():
    layer = Mamba2(12, d_state=5, head_dim=4, backend="torch")
    st = layer.init_state(2)
    with pytest.raises(ValueError, match=r"^state: holds no SSM state"):
        layer(torch.randn(1, 5, 12), type(st)(st.conv, None), cu_seqlens=torch.tensor([0, 2, 5]))


def test_step_glue_leaves_the_callers_state_alone():
    inp = scan_inputs(1)
    before = inp["ssm"].clone()
    layer = Mamba2(12, d_state=5, head_dim=4, backend="torch")
    with torch.no_grad():
        layer.scan(**inp, kernels=FakeKernels().kernels())
    assert torch.equal(inp["ssm"], before)


def hide_mamba_ssm(monkeypatch):
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # `import mamba_ssm...` now raises ImportError


def fake_mamba_ssm(monkeypatch):
    """A mamba_ssm package whose two kernel modules import (with stand-in functions)."""
    fake = FakeKernels()
    mods = {"mamba_ssm": types.ModuleType("mamba_ssm"), "mamba_ssm.ops": types.ModuleType("mamba_ssm.ops"),
            "mamba_ssm.ops.triton": types.ModuleType("mamba_ssm.ops.triton"),
            "mamba_ssm.ops.triton.ssd_combined": types.ModuleType("ssd_combined"),
            "mamba_ssm.ops.triton.selective_state_update": types.ModuleType("selective_state_update")}
    mods["mamba_ssm.ops.triton.ssd_combined"].mamba_chunk_scan_combined = fake.chunk
    mods["mamba_ssm.ops.triton.selective_state_update"].selective_state_update = fake.step
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return fake


def test_backend_choice_and_errors(monkeypatch):
    assert MAMBA_BACKENDS == CFG_BACKENDS
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_mamba_backend("auto", cpu) == "torch" and resolve_mamba_backend("torch", cuda) == "torch"
    with pytest.raises(RuntimeError, match=r"^mamba_backend='mamba_ssm' needs CUDA tensors \(got cpu\)"):
        resolve_mamba_backend("mamba_ssm", cpu)
    with pytest.raises(ValueError, match=r"^mamba_backend: expected one of"):
        resolve_mamba_backend("triton", cpu)
    with pytest.raises(ValueError, match=r"^mamba_backend: expected one of"):
        Mamba2(16, backend="fast")
    with pytest.raises(ValueError, match=r"^mamba_backend: expected one of"):
        RunOptions(mamba_backend="fast")
    hide_mamba_ssm(monkeypatch)
    with pytest.raises(RuntimeError, match=r"^mamba_backend='mamba_ssm' is not available: .*pip install"):
        load_mamba_ssm()
    with pytest.raises(RuntimeError, match="is not available"):
        resolve_mamba_backend("mamba_ssm", cuda)
    assert resolve_mamba_backend("auto", cuda) == "torch"  # auto: not importable -> the reference
    fake = fake_mamba_ssm(monkeypatch)
    assert resolve_mamba_backend("auto", cuda) == "mamba_ssm"  # importable on CUDA -> the kernels
    assert resolve_mamba_backend("mamba_ssm", cuda) == "mamba_ssm"
    assert load_mamba_ssm().chunk == fake.chunk
    # a layer asked for the kernels on the CPU refuses (no silent fallback), also inside a model
    layer = Mamba2(16, d_state=8, head_dim=8, backend="mamba_ssm")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        layer(torch.randn(1, 4, 16))
    model = TTTLM(get_config("debug", mixer="mamba", vocab_size=32), RunOptions(mamba_backend="mamba_ssm"))
    assert all(b.mixer.backend == "mamba_ssm" for b in model.blocks)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        model(torch.zeros(1, 3, dtype=torch.long))


# --- GPU: the real kernels against the reference -----------------------------------------------------------

def import_kernels_without_cuda_extension():
    """Load mamba_ssm's Triton SSD modules even where its CUDA extension is absent (the package __init__
    imports that extension; its Triton submodules do not need it): register the package without running
    its __init__. A normal install with the extension imports as is."""
    try:
        return load_mamba_ssm()
    except RuntimeError:
        spec = importlib.util.find_spec("mamba_ssm") if "mamba_ssm" not in sys.modules else None
        if spec is None or spec.submodule_search_locations is None:
            pytest.skip("mamba_ssm is not installed (pip install 'ttt-lm[mamba]')")
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["mamba_ssm"] = pkg
        return load_mamba_ssm()


gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def close(a, b, msg="", tol=5e-3):
    """a == b up to tol relative to b's largest entry: the kernels' fp32 matmuls run in TF32 on the GPU (about
    3 decimal digits), while a wrong argument mapping gives errors of order 1."""
    scale = b.abs().max().clamp_min(1e-6)
    torch.testing.assert_close(a / scale, b / scale, rtol=tol, atol=tol, msg=msg)


def pair(d_model=256, d_state=64, head_dim=64, seed=0):
    torch.manual_seed(seed)
    ref = Mamba2(d_model, d_state=d_state, head_dim=head_dim, backend="torch").cuda()
    ker = Mamba2(d_model, d_state=d_state, head_dim=head_dim, backend="mamba_ssm").cuda()
    ker.load_state_dict(ref.state_dict())
    return ref, ker


@pytest.mark.parametrize("T", [300, 1024])
def test_gpu_kernels_equal_reference_outputs_state_gradients(T):
    import_kernels_without_cuda_extension()
    ref, ker = pair()
    torch.manual_seed(1)
    x = torch.randn(2, T, 256, device="cuda")
    w = torch.randn(2, T, 256, device="cuda")
    st0 = ref.init_state(2)
    st0.ssm.normal_()  # start from a non-zero state, as in streaming
    st0.conv.normal_()
    res = {}
    for name, layer in (("ref", ref), ("ker", ker)):
        xi = x.clone().requires_grad_()
        ssm0 = st0.ssm.clone().requires_grad_()
        y, st = layer(xi, type(st0)(st0.conv, ssm0))
        ((y * w).sum() + st.ssm.square().sum()).backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        res[name] = (y.detach(), st.ssm.detach(), xi.grad, ssm0.grad, grads)
        layer.zero_grad()
    (y_r, s_r, gx_r, gs_r, g_r), (y_k, s_k, gx_k, gs_k, g_k) = res["ref"], res["ker"]
    close(y_k, y_r, "y")
    close(s_k, s_r, "final state")
    close(gx_k, gx_r, "grad x")
    close(gs_k, gs_r, "grad initial state")
    assert set(g_k) == set(g_r)
    for n in g_r:
        close(g_k[n], g_r[n], n)


def test_gpu_decode_step_equals_reference():
    import_kernels_without_cuda_extension()
    ref, ker = pair()
    torch.manual_seed(2)
    x = torch.randn(2, 40, 256, device="cuda")
    with torch.no_grad():
        _, st_r = ref(x[:, :33])
        _, st_k = ker(x[:, :33])
        close(st_k.ssm, st_r.ssm, "prefill state")
        for t in range(33, 40):  # token by token: the step kernel
            y_r, st_r = ref(x[:, t:t + 1], st_r)
            y_k, st_k = ker(x[:, t:t + 1], st_k)
            close(y_k, y_r, f"y at {t}")
            close(st_k.ssm, st_r.ssm, f"state at {t}")


def test_gpu_model_with_kernels_trains_like_reference():
    import_kernels_without_cuda_extension()
    torch.manual_seed(0)
    cfg = get_config("debug", mixer="mamba", vocab_size=256)
    ref = TTTLM(cfg, RunOptions(mamba_backend="torch")).cuda()
    ker = TTTLM(cfg, RunOptions(mamba_backend="mamba_ssm")).cuda()
    ker.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 256, (2, 257), device="cuda")
    losses = []
    for m in (ref, ker):
        loss, _ = m(ids[:, :-1], targets=ids[:, 1:])
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-3
    for (n, p), q in zip(ref.named_parameters(), ker.parameters()):
        close(q.grad, p.grad, n)


@pytest.mark.parametrize("grad", [False, True])
def test_gpu_kernels_on_packed_documents_equal_reference(grad):
    """The real kernels with seq_idx (and cu_seqlens for the documents' states) against the chunked reference
    with resets: outputs, every gradient, and (without gradients) every document's final state."""
    import_kernels_without_cuda_extension()
    ref, ker = pair()
    torch.manual_seed(3)
    lens = [700, 1, 130, 2000, 15, 256]
    cu = torch.tensor([0, *lens]).cumsum(0)
    x = torch.randn(1, sum(lens), 256, device="cuda")
    w = torch.randn_like(x)
    st = ref.init_state(len(lens))
    st.ssm.normal_()
    st.conv.normal_()
    res = {}
    for name, layer in (("ref", ref), ("ker", ker)):
        xi = x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            y, s = layer(xi, st, cu_seqlens=cu)
        if grad:
            (y * w).sum().backward()
            res[name] = (y.detach(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters()})
            layer.zero_grad()
        else:
            res[name] = (y, s.ssm)
    close(res["ker"][0], res["ref"][0], "y")
    if grad:
        close(res["ker"][1], res["ref"][1], "grad x")
        for n in res["ref"][2]:
            close(res["ker"][2][n], res["ref"][2][n], n)
    else:
        close(res["ker"][1], res["ref"][1], "final states")


for _name in [n for n in list(globals()) if n.startswith("test_gpu_")]:
    for _mark in gpu:
        globals()[_name] = _mark(globals()[_name])
