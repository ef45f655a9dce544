"""Mamba-2 baseline mixer: the SSD scan in PyTorch in two forms (`ssd_chunked` for sequences, `ssd_step`
for one-token decode), the glue to mamba_ssm's Triton SSD kernels (`load_mamba_ssm`, `ssd_chunked_kernel`,
`ssd_step_kernel`), its conv and gated RMSNorm, and the `Mamba2` layer with its `MambaState`.

Backends of the scan (`Mamba2(backend=...)`): "torch" the chunked PyTorch reference (any device);
"mamba_ssm" the kernels of the optional mamba-ssm package (CUDA; `pip install 'ttt-lm[mamba]'`);
"auto" mamba_ssm on CUDA when it imports, else torch. A backend named explicitly that cannot run raises.

The SSM, per head h with scalar decay A_h < 0, per token t:
    S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T      S: [head_dim, d_state]
    y_t = S_t C_t + D_h x_t
forward(x, state) over any split of a sequence, carrying the returned state, equals one forward.
forward(x, cu_seqlens=cu) on packed documents (docs/packed.md): the conv windows and the SSM state restart
at every document (the scans take `seq_idx`); the state has one row per document.
"""
from __future__ import annotations

import math
import logging
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.packed import Packing, packing
from .conv import CausalConv1d, check_input_dtype
from .norms import RMSNorm


def segsum(a: torch.Tensor) -> torch.Tensor:
    """a: [..., L] -> [..., L, L] with out[..., i, j] = a[j+1] + ... + a[i] for j <= i, -inf above.

    Summing the masked values directly (not cumsum differences) keeps exp(out) exact and in [0, 1].
    """
    L = a.shape[-1]
    a = a[..., None].expand(*a.shape, L)  # [..., L(i), L(j)], row i holds a[i]
    ones = torch.ones(L, L, dtype=torch.bool, device=a.device)
    s = a.masked_fill(~ones.tril(-1), 0).cumsum(-2)  # [..., i, j] = sum of a[k] for j < k <= i
    return s.masked_fill(~ones.tril(0), -math.inf)


def ssd_chunked(x, dt, A, Bm, Cm, state, chunk_size: int = 64, seq_idx=None):
    """The SSM over a sequence: quadratic attention-like form inside chunks, state carried between them.

    x: [B, T, H, P]; dt: [B, T, H] (positive); A: [H] (negative); Bm, Cm: [B, T, N];
    state: [B, H, P, N]. Returns y [B, T, H, P] (without the D skip) and the final state.
    All inputs must share one dtype; T need not be a multiple of chunk_size.
    seq_idx: int [T] with B = 1 (packed documents): the document of every token; the state restarts from
    zero at every document's first token, so `state` enters the first document only and the returned state
    is the last document's (as mamba_ssm's seq_idx); `document_states` gives every document's.
    """
    Bsz, T, H, P = x.shape
    N = Bm.shape[-1]
    pad = -T % chunk_size
    if pad:  # dt = 0 on padded tokens: no decay and no input, so the final state is unchanged
        x, Bm, Cm = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, Bm, Cm))
        dt = F.pad(dt, (0, 0, 0, pad))
    nc, cs = (T + pad) // chunk_size, chunk_size
    same = None
    if seq_idx is not None:  # padding joins the last document (dt = 0 there: it changes nothing)
        doc = torch.cat([seq_idx, seq_idx[-1:].expand(pad)]).view(nc, cs)  # [nc, cs]
        prev = torch.cat([doc[:1, 0], doc[:-1, -1]])  # [nc]: the document the carried state belongs to
        same = (doc[:, :, None] == doc[:, None, :], doc == doc[:, -1:], doc == prev[:, None], doc[:, -1] == prev)
    xdt = (x * dt[..., None]).view(Bsz, nc, cs, H, P)  # dt-weighted input per chunk
    a = (dt * A).view(Bsz, nc, cs, H).permute(0, 3, 1, 2)  # [B, H, nc, cs]: log-decay of each token
    Bm, Cm = Bm.view(Bsz, nc, cs, N), Cm.view(Bsz, nc, cs, N)
    acum = a.cumsum(-1)  # [B, H, nc, cs]: log-decay from the chunk start through token l

    # 1. inside each chunk: y_l = sum_{s<=l} (C_l . B_s) exp(a_{s+1} + ... + a_l) dt_s x_s
    decay = segsum(a).exp()  # [B, H, nc, cs(l), cs(s)]
    if same is not None:  # packed: nothing flows between documents
        decay = decay * same[0]
    scores = torch.einsum("bcln,bcsn->bcls", Cm, Bm)
    y = torch.einsum("bcls,bhcls,bcshp->bclhp", scores, decay, xdt)

    # 2. what each chunk adds to the state at its own end
    to_end = (acum[..., -1:] - acum).exp()  # [B, H, nc, cs]
    if same is not None:  # only the tokens of the document at the chunk's end
        to_end = to_end * same[1]
    chunk_states = torch.einsum("bcsn,bhcs,bcshp->bchpn", Bm, to_end, xdt)  # [B, nc, H, P, N]

    # 3. carry the state across chunks (a short sequential scan over nc)
    chunk_decay = acum[..., -1].exp()  # [B, H, nc]
    if same is not None:  # a chunk that ends in another document drops the carried state
        chunk_decay = chunk_decay * same[3]
    starts = []
    for c in range(nc):
        starts.append(state)
        state = chunk_decay[:, :, c, None, None] * state + chunk_states[:, c]
    starts = torch.stack(starts, dim=1)  # [B, nc, H, P, N]: state entering each chunk

    # 4. the state entering a chunk, decayed to token l, read out by C_l (packed: by its own document only)
    into = acum.exp() if same is None else acum.exp() * same[2]
    y = y + torch.einsum("bcln,bchpn,bhcl->bclhp", Cm, starts, into)
    return y.reshape(Bsz, nc * cs, H, P)[:, :T], state


def document_states(x, dt, A, Bm, Cm, pk: Packing, init=None, finals: bool = True):
    """What a scan with resets at the boundaries (seq_idx, from zero) leaves out for packed documents, one
    document at a time: with `finals` each document's final state from a zero start; with `init` (one initial
    state per document, [N, H, P, N]) the output it adds and its decayed share of the final state.
    x: [1, T, H, P]; dt: [1, T, H]; A: [H]; Bm, Cm: [1, T, N]. Returns (the sum of those final-state parts
    [N, H, P, N], None when neither is asked for; the added output [1, T, H, P], None without init)."""
    states, ys = [], []
    for i, (s, e) in enumerate(pk.spans):
        a = dt[0, s:e] * A  # [L, H]: log-decay of each token
        parts = []
        if finals:  # token t reaches the end decayed by the tokens after it
            after = torch.cat([a[1:].flip(0).cumsum(0).flip(0), a.new_zeros(1, a.shape[1])])  # [L, H]
            parts.append(torch.einsum("th,thp,tn->hpn", after.exp() * dt[0, s:e], x[0, s:e], Bm[0, s:e]))
        if init is not None:
            upto = a.cumsum(0)  # [L, H]: log-decay of the initial state through token t
            ys.append(torch.einsum("tn,hpn,th->thp", Cm[0, s:e], init[i], upto.exp()))
            parts.append(upto[-1].exp()[:, None, None] * init[i])
        states.append(sum(parts[1:], parts[0]) if parts else None)
    return (torch.stack(states) if states[0] is not None else None), (torch.cat(ys)[None] if ys else None)


MAMBA_BACKENDS = ("auto", "torch", "mamba_ssm")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SSDKernels:
    """The two mamba_ssm entry points the layer uses: chunk = mamba_chunk_scan_combined (sequences,
    differentiable), step = selective_state_update (one token, in place, no backward)."""

    chunk: object
    step: object


def load_mamba_ssm() -> SSDKernels:
    """Import mamba_ssm's Triton SSD kernels; raise RuntimeError saying why they cannot be used."""
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as e:  # ImportError, or the package failing to initialise (e.g. no CUDA extension)
        raise RuntimeError(f"mamba_backend='mamba_ssm' is not available: mamba_ssm could not be imported "
                           f"({type(e).__name__}: {e}); pip install 'ttt-lm[mamba]' on a CUDA machine, or use "
                           f"mamba_backend='torch'") from e
    return SSDKernels(mamba_chunk_scan_combined, selective_state_update)


def resolve_mamba_backend(backend: str, device) -> str:
    """"auto" -> "mamba_ssm" on CUDA when it imports, else "torch"; a named backend that cannot run raises."""
    if backend not in MAMBA_BACKENDS:
        raise ValueError(f"mamba_backend: expected one of {MAMBA_BACKENDS}, got {backend!r}")
    dev_type = getattr(device, "type", str(device))
    if backend == "auto":
        if dev_type != "cuda":
            return "torch"
        try:
            load_mamba_ssm()
        except RuntimeError as e:
            log.info("Mamba-2: mamba_backend='auto' chose 'torch' (%s)", e)
            return "torch"
        return "mamba_ssm"
    if backend == "mamba_ssm":
        if dev_type != "cuda":
            raise RuntimeError(f"mamba_backend='mamba_ssm' needs CUDA tensors (got {dev_type}); use "
                               "mamba_backend='torch' on this device")
        load_mamba_ssm()
    return backend


def ssd_chunked_kernel(kernels: SSDKernels, x, dt, A, Bm, Cm, D, state, chunk_size: int = 256,
                       pk: Packing | None = None, varlen_states: bool = False):
    """ssd_chunked plus the D skip, by mamba_chunk_scan_combined. Same arguments as ssd_chunked and
    D [H]; returns y [B, T, H, P] (with D x) and the final state [B, H, P, N] (fp32).

    Our one group of B/C becomes the kernel's group dim; dt arrives already softplus-ed with its bias
    (the kernel's dt_bias/dt_softplus stay off), so both backends see the same dt.
    pk (packed documents, B = 1, state None: every document from zero): the kernel's seq_idx; the final states
    are every document's ([N, H, P, N], the kernel's varlen states from cu_seqlens) when `varlen_states`, else
    None (the kernel has no backward for them).
    """
    B, C = Bm[:, :, None], Cm[:, :, None]  # [B, T, N] -> [B, T, 1, N]
    if pk is None:
        return kernels.chunk(x, dt, A, B, C, chunk_size, D=D, initial_states=state, return_final_states=True)
    out = kernels.chunk(x, dt, A, B, C, chunk_size, D=D, seq_idx=pk.seq_idx.to(torch.int32)[None],
                        cu_seqlens=pk.cu_seqlens if varlen_states else None, return_varlen_states=varlen_states)
    return out if varlen_states else (out, None)


def ssd_step_kernel(kernels: SSDKernels, x, dt, A, Bm, Cm, D, state):
    """ssd_step plus the D skip, by selective_state_update (which writes the state in place: it gets a
    copy). x: [B, H, P]; dt: [B, H]; A, D: [H]; Bm, Cm: [B, N]; state: [B, H, P, N]."""
    H, P, N = x.shape[1], x.shape[2], Bm.shape[-1]
    new = state.clone()
    # per-(head, channel) dt, A, D and a zero dt_bias, all broadcast (stride 0) as the kernel expects for heads
    # sharing one dt; dt arrives with its bias and softplus applied, like the chunked path
    y = kernels.step(new, x, dt[..., None].expand(-1, H, P), A[:, None, None].expand(H, P, N),
                     Bm[:, None], Cm[:, None], D=D[:, None].expand(H, P),
                     dt_bias=dt.new_zeros(())[None, None].expand(H, P))  # B, C: [B, N] -> [B, 1, N]
    return y, new


def ssd_step(x, dt, A, Bm, Cm, state):
    """One token of the SSM. x: [B, H, P]; dt: [B, H]; A: [H]; Bm, Cm: [B, N]; state: [B, H, P, N].

    Returns y [B, H, P] (without the D skip) and the new state.
    """
    decay = torch.exp(dt * A)[..., None, None]  # [B, H, 1, 1]
    state = decay * state + torch.einsum("bhp,bn->bhpn", x * dt[..., None], Bm)
    return torch.einsum("bhpn,bn->bhp", state, Cm), state


class MambaConv1d(CausalConv1d):
    """CausalConv1d with nn.Conv1d's default init, which Mamba-2 keeps: weight and bias uniform(+-1/sqrt(width)).

    Its own reset_parameters (not a re-init in Mamba2's) keeps this init when a model resets every submodule.
    """

    def reset_parameters(self):
        bound = 1.0 / math.sqrt(self.width)  # fan_in of a depthwise conv = width
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)


class GatedRMSNorm(RMSNorm):
    """RMSNorm(y * silu(z)) * weight, computed in fp32 (fp64 for fp64 inputs) and cast back to z's dtype."""

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        cd = torch.promote_types(torch.promote_types(y.dtype, z.dtype), torch.float32)
        return super().forward(y.to(cd) * F.silu(z.to(cd))).to(z.dtype)


@dataclass
class MambaState:
    """conv: last conv_width-1 inputs of the conv, [B, conv_width-1, d_inner + 2*d_state];
    ssm: [B, nheads, head_dim, d_state], fp32 (fp64 when the layer runs in fp64); pos: tokens consumed (after packed
    documents: one count per document)."""

    conv: torch.Tensor
    ssm: torch.Tensor
    pos: int = 0

    def detach(self) -> "MambaState":
        return replace(self, conv=self.conv.detach(), ssm=None if self.ssm is None else self.ssm.detach())


class Mamba2(nn.Module):
    """Mamba-2 (SSD) mixer, one group for B and C. x: [B, T, D] -> [B, T, D].

    in_proj -> (z, xBC, dt); causal conv + SiLU on xBC -> (x, B, C); SSM per head;
    + D x; gated RMSNorm with z; out_proj. T == 1 takes the recurrent step, longer inputs the chunked form.
    """

    decode_period = 1  # decoding: one step for every position, over a fixed-size state
    static_decode_state = True

    def __init__(self, d_model: int, d_state: int = 64, expand: int = 2, head_dim: int = 64,
                 conv_width: int = 4, chunk_size: int = 64, backend: str = "auto", kernel_chunk_size: int = 256):
        super().__init__()
        if backend not in MAMBA_BACKENDS:
            raise ValueError(f"mamba_backend: expected one of {MAMBA_BACKENDS}, got {backend!r}")
        self.backend, self.kernel_chunk_size = backend, kernel_chunk_size
        self._kernels = {}  # (backend, device type) -> the loaded kernels or None (torch), resolved on first use
        d_inner = expand * d_model
        if d_inner % head_dim:
            raise ValueError(f"head_dim: must divide expand*d_model={d_inner}, got {head_dim}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size: expected a positive int, got {chunk_size}")
        self.d_model, self.d_state, self.d_inner = d_model, d_state, d_inner
        self.head_dim, self.nheads, self.chunk_size = head_dim, d_inner // head_dim, chunk_size
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * d_state + self.nheads, bias=False)
        self.conv = MambaConv1d(d_inner + 2 * d_state, conv_width, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # as in Mamba-2: the optimizer may exempt these from decay
        self.norm = GatedRMSNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self, dt_min: float = 1e-3, dt_max: float = 1e-1):
        nn.init.normal_(self.in_proj.weight, std=0.02)
        nn.init.normal_(self.out_proj.weight, std=0.02)
        self.conv.reset_parameters()
        with torch.no_grad():
            dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
            self.A_log.copy_(torch.log(torch.empty(self.nheads).uniform_(1, 16)))
            self.D.fill_(1.0)
        self.norm.reset_parameters()

    def init_state(self, batch_size: int, device=None, dtype=None) -> MambaState:
        device = device or self.in_proj.weight.device
        dtype = dtype or self.in_proj.weight.dtype
        conv = self.conv.init_state(batch_size, device, dtype)
        ssm = torch.zeros(batch_size, self.nheads, self.head_dim, self.d_state, device=device,
                          dtype=torch.promote_types(dtype, torch.float32))
        return MambaState(conv, ssm)

    def _check(self, x: torch.Tensor, state: MambaState | None, cu_seqlens=None) -> Packing | None:
        """Check x and state; the Packing of cu_seqlens (None without)."""
        if x.dim() != 3 or x.shape[-1] != self.d_model or x.shape[1] < 1:
            raise ValueError(f"x: expected [B, T>=1, {self.d_model}], got shape {tuple(x.shape)}")
        check_input_dtype(x, self.in_proj.weight)
        if state is not None and not isinstance(state, MambaState):
            raise TypeError(f"state: expected a MambaState, got {type(state).__name__}")
        pk = None if cu_seqlens is None else packing(cu_seqlens, x.shape[1], x.device, batch_size=x.shape[0],
                                                     state_rows=None if state is None else state.conv.shape[0])
        if state is None:
            return pk
        if state.ssm is None:
            raise ValueError("state: holds no SSM state: packed documents run with gradients through the mamba_ssm "
                             "kernels return none (the kernels' per-document states have no backward); start "
                             "afresh, or make the call that returns it under torch.no_grad()")
        B = x.shape[0] if pk is None else pk.num_docs
        want_conv = (B, self.conv.width - 1, self.conv.channels)
        want_ssm = (B, self.nheads, self.head_dim, self.d_state)
        if tuple(state.conv.shape) != want_conv or tuple(state.ssm.shape) != want_ssm:
            raise ValueError(f"state: expected conv {list(want_conv)} and ssm {list(want_ssm)}, "
                             f"got conv {list(state.conv.shape)} and ssm {list(state.ssm.shape)}")
        return pk

    def scan(self, xh, dt, A, Bm, Cm, D, ssm, kernels: SSDKernels | None = None, pk: Packing | None = None):
        """The SSM with the D skip on the chosen backend: xh [B, T, H, P], dt [B, T, H], A, D [H],
        Bm, Cm [B, T, N], ssm [B, H, P, N] -> (y [B, T, H, P], new ssm). `kernels` overrides the loaded
        mamba_ssm kernels (tests pass a stand-in with the same contract). pk: packed documents (B = 1), ssm
        one row per document or None (zeros), see `_scan_packed`."""
        T = xh.shape[1]
        if kernels is None:
            key = (self.backend, xh.device.type)
            if key not in self._kernels:  # resolve once per backend and device type (auto tries an import)
                use = resolve_mamba_backend(self.backend, xh.device) == "mamba_ssm"
                self._kernels[key] = load_mamba_ssm() if use else None
            kernels = self._kernels[key]
        if pk is not None:
            return self._scan_packed(xh, dt, A, Bm, Cm, D, ssm, kernels, pk)
        if kernels is not None:
            if T == 1 and not (torch.is_grad_enabled() and any(t.requires_grad for t in (xh, dt, Bm, Cm, ssm, D))):
                y, ssm = ssd_step_kernel(kernels, xh[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], D, ssm)
                return y[:, None], ssm  # [B, H, P] -> [B, 1, H, P]
            # sequences, and a token that needs gradients (the step kernel has no backward)
            return ssd_chunked_kernel(kernels, xh, dt, A, Bm, Cm, D, ssm, self.kernel_chunk_size)
        if T == 1:
            y, ssm = ssd_step(xh[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], ssm)
            y = y[:, None]  # [B, H, P] -> [B, 1, H, P]
        else:
            y, ssm = ssd_chunked(xh, dt, A, Bm, Cm, ssm, self.chunk_size)
        return y + D[:, None] * xh, ssm

    def _scan_packed(self, xh, dt, A, Bm, Cm, D, ssm, kernels, pk: Packing):
        """scan on packed documents: the backend's scan restarting from zero at every boundary (seq_idx), plus
        what each document's own start state adds, and every document's final state ([N, H, P, N]). With the
        kernels and gradients the final states are None (the kernels' per-document states have no backward)."""
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (xh, dt, Bm, Cm, D, ssm) if t is not None)
        if kernels is not None:
            y, finals = ssd_chunked_kernel(kernels, xh, dt, A, Bm, Cm, D, None, self.kernel_chunk_size, pk=pk,
                                           varlen_states=not grad)
        else:
            zero = xh.new_zeros(1, xh.shape[2], xh.shape[3], Bm.shape[-1])  # [1, H, P, N]
            y = ssd_chunked(xh, dt, A, Bm, Cm, zero, self.chunk_size, seq_idx=pk.seq_idx)[0] + D[:, None] * xh
            finals = None
        part, added = document_states(xh, dt, A, Bm, Cm, pk, init=ssm, finals=kernels is None)
        if added is not None:
            y = y + added
        if kernels is None:
            finals = part
        elif finals is not None and part is not None:
            finals = finals + part
        return y, finals

    def forward(self, x: torch.Tensor, state: MambaState | None = None, cu_seqlens=None):
        """x: [B, T, D] -> (y, MambaState). With cu_seqlens (int64 [N + 1], or a `Packing`): x [1, T, D] holds N
        packed documents, each run alone; the state has one row per document (None: zeros)."""
        pk = self._check(x, state, cu_seqlens)
        B, T, _ = x.shape
        H, P, N = self.nheads, self.head_dim, self.d_state
        if state is None and pk is None:
            state = self.init_state(B, x.device)
        z, xBC, dt = self.in_proj(x).split([self.d_inner, self.d_inner + 2 * N, H], dim=-1)
        xBC, conv_state = self.conv(xBC, None if state is None else state.conv, cu_seqlens=pk)
        xs, Bm, Cm = F.silu(xBC).split([self.d_inner, N, N], dim=-1)
        cd = torch.promote_types(xs.dtype, torch.float32)  # the scan runs in fp32 (fp64 for fp64)
        # autocast would turn the einsums into bf16 matmuls; the scan and its state stay in cd
        with torch.autocast(x.device.type, enabled=False):
            xh = xs.to(cd).view(B, T, H, P)  # [B, T, d_inner] -> [B, T, H, P]
            dt = F.softplus(dt.to(cd) + self.dt_bias.to(cd))  # [B, T, H]
            A = -torch.exp(self.A_log.to(cd))  # [H]
            ssm = None if state is None else state.ssm.to(cd)
            Bm, Cm = Bm.to(cd), Cm.to(cd)
            y, ssm = self.scan(xh, dt, A, Bm, Cm, self.D.to(cd), ssm, pk=pk)
            y = self.norm(y.reshape(B, T, self.d_inner), z)  # [B, T, H, P] -> [B, T, d_inner]
        pos = 0 if state is None else state.pos
        return self.out_proj(y), MambaState(conv_state, ssm, pos + T if pk is None else pk.end_positions(pos))
