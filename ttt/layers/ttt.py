"""TTT layers (docs/math.md §6): projections, causal convs, RoPE at position mod b, the learnable
inner learning rate (per-head gate and tau offsets), learnable initial inner weights, the TTT op,
post-LayerNorm, output gate and projection.

    layer = TTTLinear(d_model=256, n_heads=4)            # or TTTMLP, or TTTLayer(inner=my_module)
    y, state = layer(x)                                   # x: [B, T, D]
    y2, state = layer(x_next, state)                      # streaming: continue where it stopped
    y, state = layer(x_packed, cu_seqlens=cu)             # packed documents ([1, T, D]), each run alone

`backbone="mamba"` ("(M)"): shared theta_QK followed by two depthwise causal convs, and an output gate.
`backbone="transformer"` ("(T)"): separate theta_Q, theta_K, theta_V; no convs, no gate.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import BACKENDS as OP_BACKENDS, RowsState, TTTInputs, TTTOp, TTTState, make_tau, resolve_op
from ..ops.generic import GenericOp
from ..ops.packed import packing
from .attention import apply_rope
from .conv import CausalConv1d, check_input_dtype
from .merged import few_rows_linear, merged_for, merged_linear, merged_weight

BACKBONES = ("mamba", "transformer")


@dataclass
class TTTLayerState:
    """op: the inner-model state (TTTState); conv: the last conv_width-1 inputs of the Q/K convs
    ([B, width-1, D], Mamba backbone only, else None); owned: the caller gives these tensors up to the next step,
    which may write the new state into them (`ttt.decode_graph.GraphedDecoder`'s buffers: no copy back)."""

    op: TTTState
    conv: torch.Tensor | None = None
    owned: bool = False

    @property
    def pos(self) -> int:
        return self.op.pos

    def detach(self) -> "TTTLayerState":
        return replace(self, op=self.op.detach(), conv=None if self.conv is None else self.conv.detach())

    def plain(self) -> "TTTLayerState":
        """This state with a decode form's op state (`TTTLayer.decode_state`) as a plain TTTState again."""
        return replace(self, op=self.op.summed()) if isinstance(self.op, RowsState) else self


class Plan(NamedTuple):
    """How a TTT layer runs for one device type and dtype, decided once (`TTTLayer.prepare`): the TTT op and
    whether the fused layer kernels run around it."""

    op: TTTOp | GenericOp
    fused: bool


class TTTLayer(nn.Module):
    """A TTT layer whose inner model is "linear", "mlp", or any nn.Module mapping [d] -> [d] (run
    through the primal generic op). See the module docstring for usage.

    Execution (not architecture, never saved with the weights): `backend`, the TTT op's backend (see
    `ttt.ops`), `fused`, the Triton kernels around the op (None: auto, the default; True: on; False: off; see
    `prepare`), `keep_weights` (TTT-MLP in the shared-memory kernels: more memory, a faster backward) and `gluon`
    (TTT-Linear in the Gluon kernels). All can be set after construction; how the layer runs is decided once per
    device type and dtype (`prepare`, which the first forward on a new one calls) and looked up on every later
    call."""

    static_decode_state = True  # decoding: the state has a fixed size (CUDA-graph capturable)

    @property
    def decode_period(self) -> int:
        """The one-token step depends on the position only through pos mod mini_batch (tau, the commit, RoPE)."""
        return self.mini_batch

    def __init__(self, d_model: int, n_heads: int, inner="linear", backbone: str = "mamba",
                 mini_batch: int = 16, base_lr: float | None = None, conv_width: int = 4,
                 rope_base: float = 10000.0, mlp_ratio: int = 4, backend: str = "auto", learn_lr: bool = True,
                 learn_init: bool = True, inner_ln: bool = True, residual: bool = True, fused: bool | None = None):
        super().__init__()
        if not isinstance(d_model, int) or not isinstance(n_heads, int) or n_heads < 1 or d_model < 1:
            raise ValueError(f"d_model, n_heads: expected positive ints, got {d_model!r}, {n_heads!r}")
        if d_model % n_heads:
            raise ValueError(f"d_model: expected a multiple of n_heads={n_heads}, got {d_model}")
        if backbone not in BACKBONES:
            raise ValueError(f"backbone: expected one of {BACKBONES}, got {backbone!r}")
        if not (inner in ("linear", "mlp") or isinstance(inner, nn.Module)):
            raise ValueError(f"inner: expected 'linear', 'mlp' or an nn.Module, got {inner!r}")
        if not isinstance(mini_batch, int) or mini_batch < 1:
            raise ValueError(f"mini_batch: expected a positive int, got {mini_batch!r}")
        if not learn_init and inner != "linear":
            raise ValueError("learn_init: False (W0 = 0) is for the linear inner model only: an MLP started at zero "
                             "has zero inner gradients and never learns")
        self.learn_lr, self.learn_init, self.inner_ln, self.residual = learn_lr, learn_init, inner_ln, residual
        D, H = d_model, n_heads
        d = D // H
        if d % 2:
            raise ValueError(f"d_model: expected an even head dim for RoPE, got d_model/n_heads = {d}")
        self.d_model, self.n_heads, self.head_dim = D, H, d
        self.kind = inner if isinstance(inner, str) else "generic"
        self.backbone, self.mini_batch, self.rope_base = backbone, mini_batch, rope_base
        self._plans: dict = {}  # (device type, dtype) -> Plan
        self.backend, self.fused = backend, fused
        self.keep_weights = False
        self.gluon = False
        self.base_lr = base_lr if base_lr is not None else (0.1 if self.kind == "mlp" else 1.0)

        if backbone == "mamba":
            self.qk_proj = nn.Linear(D, D, bias=False)
            # the reference path's convs; the kernel path reads their weights in ops/fused_layer.conv_rope
            self.conv_q = CausalConv1d(D, conv_width, backend="torch")
            self.conv_k = CausalConv1d(D, conv_width, backend="torch")
            self.gate_proj = nn.Linear(D, D, bias=False)
        else:
            self.q_proj = nn.Linear(D, D, bias=False)
            self.k_proj = nn.Linear(D, D, bias=False)
        self.v_proj = nn.Linear(D, D, bias=False)
        self.o_proj = nn.Linear(D, D, bias=False)
        if learn_lr:  # else eta = base_lr / d for every token and tau_i = 1/i (no gate, no offsets)
            self.lr_weight = nn.Parameter(torch.empty(H, D))  # per-head gate sigma = sigmoid(x . w_h + b_h)
            self.lr_bias = nn.Parameter(torch.zeros(H))
            self.delta = nn.Parameter(torch.zeros(mini_batch))  # tau_i = max(0, 1/i + delta_i)
        if inner_ln:
            self.ln_weight = nn.Parameter(torch.ones(H, d))  # inner LayerNorm, per head
            self.ln_bias = nn.Parameter(torch.zeros(H, d))
        else:
            self.ln_weight = self.ln_bias = None
        self.post_norm = nn.LayerNorm(D, eps=1e-6)
        self.merged = None  # MergedWeights of the fused decode step's input projections (`merge_decode_weights`)
        # multiplies base_lr; the trainer ramps it during warm-up (TTT-MLP recipe); 1.0 = exact base_lr
        self.register_buffer("inner_lr_scale", torch.ones(()), persistent=False)
        if self.kind == "linear":
            shapes = {"W1": (H, d, d), "b1": (H, d)}
        elif self.kind == "mlp":
            Fh = mlp_ratio * d
            shapes = {"W1": (H, d, Fh), "b1": (H, Fh), "W2": (H, Fh, d), "b2": (H, d)}
        else:  # any module: one copy of its weights per head, stacked on a leading H dim
            self._template = [inner]  # a list keeps it out of this module's parameters
            shapes = {n.replace(".", "_"): (H, *p.shape) for n, p in inner.named_parameters()}
        self.inner_names = tuple(shapes)
        for name, shape in shapes.items():
            if learn_init:
                setattr(self, name, nn.Parameter(torch.empty(shape)))
            else:  # W0 = 0, not trained
                self.register_buffer(name, torch.zeros(shape), persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        """Paper init: projections and inner weight matrices N(0, 0.02), biases 0, LN gamma 1 / beta 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, (CausalConv1d, nn.LayerNorm)):
                m.reset_parameters()
        if self.learn_lr:
            nn.init.normal_(self.lr_weight, std=0.02)
            nn.init.zeros_(self.lr_bias)
            nn.init.zeros_(self.delta)
        if self.inner_ln:
            nn.init.ones_(self.ln_weight)
            nn.init.zeros_(self.ln_bias)
        if not self.learn_init:
            for name in self.inner_names:
                nn.init.zeros_(getattr(self, name))
        elif self.kind == "generic":
            for name, (_, p) in zip(self.inner_names, self._template[0].named_parameters()):
                getattr(self, name).data.copy_(p.detach().unsqueeze(0).expand_as(getattr(self, name)))
        else:
            for name in self.inner_names:
                p = getattr(self, name)
                nn.init.normal_(p, std=0.02) if name.startswith("W") else nn.init.zeros_(p)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, backend: str) -> None:
        if backend not in OP_BACKENDS:
            raise ValueError(f"backend: expected one of {OP_BACKENDS}, got {backend!r}")
        if self.kind == "generic" and backend not in ("auto", "naive"):
            raise ValueError(f"backend: a generic inner model runs the primal form only ('auto' or 'naive'), "
                             f"got {backend!r}")
        self._backend = backend
        self._plans.clear()

    @property
    def fused(self) -> bool | None:
        return self._fused

    @fused.setter
    def fused(self, fused: bool | None) -> None:
        if not isinstance(fused, (bool, type(None))):
            raise ValueError(f"fused: expected a bool or None (auto), got {fused!r}")
        if fused and self.kind == "generic":
            raise ValueError("fused: the fused layer kernels serve the 'linear' and 'mlp' inner models only")
        self._fused = fused
        self._plans.clear()

    @property
    def keep_weights(self) -> bool:
        """TTT-MLP in the triton backend's kernels: the smem forward keeps every mini-batch's start weights for the
        backward (`MLPKernels(keep=True)`; faster training, more memory). Ignored elsewhere."""
        return self._keep_weights

    @keep_weights.setter
    def keep_weights(self, keep: bool) -> None:
        if not isinstance(keep, bool):
            raise ValueError(f"keep_weights: expected a bool, got {keep!r}")
        self._keep_weights = keep
        self._plans.clear()

    @property
    def gluon(self) -> bool:
        """TTT-Linear in the triton backend: its Gluon kernels (`LinearKernels(fwd="auto_gluon", bwd="split_gluon")`:
        Hopper, head dim 64 or 128, mini-batch 16, 16-bit inputs; other shapes raise). Ignored elsewhere."""
        return self._gluon

    @gluon.setter
    def gluon(self, gluon: bool) -> None:
        if not isinstance(gluon, bool):
            raise ValueError(f"gluon: expected a bool, got {gluon!r}")
        self._gluon = gluon
        self._plans.clear()

    def prepare(self, device=None, dtype: torch.dtype | None = None) -> Plan:
        """Decide how this layer runs for `dtype` inputs on `device` (default: those of its weights), once: the
        TTT op (`ttt.ops.resolve_op`) and whether the fused layer kernels run: `fused=True` asks for them (they need
        the op's triton backend on fp32/fp16/bf16 inputs, else this raises: no silent fallback); `fused=None` (auto)
        runs them where the op runs its triton backend on CUDA; False never."""
        device = self.v_proj.weight.device if device is None else torch.device(device)
        dtype = self.v_proj.weight.dtype if dtype is None else dtype
        key = (device.type, dtype)
        if key not in self._plans:
            if self.kind == "generic":
                op = GenericOp(self._template[0], self.residual)
            else:
                op = resolve_op(self.kind, self.backend, device, dtype, inner_ln=self.inner_ln, residual=self.residual)
                if op.backend == "triton" and ((self.kind == "mlp" and self.keep_weights)
                                               or (self.kind == "linear" and self.gluon)):
                    from ..ops import triton_backend as tb  # imports Triton: only on that path
                    kernels = tb.MLPKernels(keep=True) if self.kind == "mlp" else \
                        tb.LinearKernels(fwd="auto_gluon", bwd="split_gluon")
                    op = resolve_op(self.kind, "triton", device, dtype, inner_ln=self.inner_ln, residual=self.residual,
                                    kernels=kernels)
            if self.fused and op.backend != "triton":
                raise ValueError(f"fused: the fused layer kernels run with the op's triton backend on fp32/fp16/bf16 "
                                 f"inputs; got backend={self.backend!r} on {device.type} with {dtype}")
            fused = self.fused if self.fused is not None else (op.backend == "triton" and device.type == "cuda"
                                                               and self.kind != "generic")
            self._plans[key] = Plan(op, fused)
        return self._plans[key]

    def inner_params(self):
        return tuple(getattr(self, n) for n in self.inner_names)

    def init_state(self, batch_size: int, device=None) -> TTTLayerState:
        """The state at position 0: learnable initial weights broadcast over the batch (differentiable)."""
        params = self.inner_params()
        # fp32 state, fp64 for an fp64 layer (rounding an fp64 W0 to fp32 would break fp64 exactness)
        op = TTTState.initial(self.kind, params, batch_size, dtype=torch.promote_types(params[0].dtype, torch.float32))
        conv = self.conv_q.init_state(batch_size, device) if self.backbone == "mamba" else None
        if device is not None:
            op = op.to(device)
        return TTTLayerState(op, conv)

    def _check(self, x, state):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected shape [B, T, {self.d_model}], got {got}")
        if x.shape[1] == 0:
            raise ValueError("x: expected a non-empty sequence (T >= 1), got T = 0")
        check_input_dtype(x, self.v_proj.weight)
        if state is None:
            return
        if not isinstance(state, TTTLayerState):
            raise TypeError(f"state: expected a TTTLayerState, got {type(state).__name__}")
        if state.op.kind != self.kind:
            raise ValueError(f"state: expected the state of a {self.kind!r} TTT layer, got one of kind {state.op.kind!r}")
        want = tuple(p.shape[1:] for p in self.inner_params())
        got = tuple(p.shape[2:] for p in state.op.params)
        if want != got:
            raise ValueError(f"state: expected inner weights of per-head shapes {want}, got {got}")
        if state.op.params[0].device != x.device:
            raise ValueError(f"state: expected tensors on {x.device} like x, got {state.op.params[0].device}")
        if (state.conv is None) != (self.backbone != "mamba"):
            raise ValueError(f"state: expected {'a' if self.backbone == 'mamba' else 'no'} conv window for "
                             f"backbone {self.backbone!r}")

    def forward(self, x: torch.Tensor, state: TTTLayerState | None = None, cu_seqlens=None):
        """x: [B, T, D] -> (y [B, T, D], new state). With cu_seqlens (int64 [N + 1], or a `Packing`) x holds
        N packed documents ([1, T, D]), each run alone; the state has one row per document (docs/packed.md).
        Packed documents take the same path as any call: the fused layer kernels where the plan runs them."""
        self._check(x, state)
        B, T, D = x.shape
        H, d = self.n_heads, self.head_dim
        pk = None
        if cu_seqlens is not None:
            pk = packing(cu_seqlens, T, x.device, batch_size=B, state_rows=None if state is None else state.op.batch_size)
        elif state is not None and not isinstance(state.pos, int):
            raise ValueError("state: a state of packed documents (one position per document) continues packed "
                             "documents only; pass cu_seqlens")
        rows = B if pk is None else pk.num_docs
        fresh = state is None
        if state is None:
            state = self.init_state(rows, x.device)
        elif state.op.batch_size != rows:
            raise ValueError(f"state: expected batch size {rows} like x, got {state.op.batch_size}")
        plan = self._plans.get((x.device.type, x.dtype)) or self.prepare(x.device, x.dtype)
        fused = plan.fused
        if fused and pk is None and T == 1 and self.kind == "linear" and self.backbone == "mamba" \
                and not torch.is_grad_enabled():
            return self._decode_fused(x, state)
        state = state.plain()  # every other path takes the plain form
        g = gate = None
        if self.backbone == "mamba" and fused:
            from ..ops.fused_layer import conv_rope  # imports Triton: only on the kernel path
            cq, ck = self.conv_q, self.conv_k
            u, g, gate = self._merged_inputs(x)
            # a fresh state's window is zeros: none, so the kernels skip reading and differentiating it
            win = None if fresh else state.conv
            q, k, conv = conv_rope(u, win, cq.weight, cq.bias, ck.weight, ck.bias, state.pos,
                                   mini_batch=self.mini_batch, head_dim=d, rope_base=self.rope_base, cu_seqlens=pk)
            q, k = q.view(B, T, H, d), k.view(B, T, H, d)  # [B,T,D] -> [B,T,H,d], RoPE already applied
        else:
            if self.backbone == "mamba":
                u = self.qk_proj(x)
                q, conv = self.conv_q(u, state.conv, cu_seqlens=pk)
                k, _ = self.conv_k(u, state.conv, cu_seqlens=pk)  # same input u: one window serves both convs
            else:
                q, k, conv = self.q_proj(x), self.k_proj(x), None
            q, k = q.reshape(B, T, H, d), k.reshape(B, T, H, d)  # [B,T,D] -> [B,T,H,d]
            pos = torch.arange(T, device=x.device) + state.pos if pk is None else pk.token_positions(state.pos)
            pos = pos % self.mini_batch  # RoPE at position mod b (packed: the position within the document)
            q, k = apply_rope(q, pos, self.rope_base), apply_rope(k, pos, self.rope_base)
        v = self.v_proj(x).reshape(B, T, H, d)  # [B,T,D] -> [B,T,H,d]
        ct = torch.promote_types(x.dtype, torch.float32)  # the gate and tau in fp32 (fp64 for fp64 x)
        if self.learn_lr:
            if fused:  # the gate's product in x's dtype (no fp32 copy of x), the sigmoid in fp32
                gate = (F.linear(x, self.lr_weight.to(x.dtype)) if gate is None else gate).to(ct) + self.lr_bias.to(ct)
            else:
                gate = torch.einsum("btD,hD->bth", x.to(ct), self.lr_weight.to(ct)) + self.lr_bias.to(ct)
            lr = self.base_lr * self.inner_lr_scale.to(ct) * torch.sigmoid(gate) / d  # [B,T,H]
            tau = make_tau(self.delta.to(ct))
        else:  # fixed eta = base_lr / d, tau_i = 1/i
            lr = (self.base_lr * self.inner_lr_scale.to(ct) / d).expand(B, T, H).contiguous()  # kernels want strides
            tau = make_tau(torch.zeros(self.mini_batch, dtype=ct, device=x.device))
        o, op_state = plan.op(TTTInputs(q, k, v, lr, tau, self.ln_weight, self.ln_bias, pk), state.op)
        o = o.reshape(B, T, D)  # [B,T,H,d] -> [B,T,D]
        return self._out(o, x, g), TTTLayerState(op_state, conv)

    def _merged_inputs(self, x: torch.Tensor):
        """(u, g, gate): x's products with qk_proj, gate_proj and (learn_lr) the lr gate's weight as one GEMM over
        their concatenation (`merged.merged_linear`: one product and, in the backward, one for x's gradient and one
        for the weights' instead of three each); gate None without learn_lr."""
        ws = [self.qk_proj.weight, self.gate_proj.weight] + ([self.lr_weight.to(x.dtype)] if self.learn_lr else [])
        u, g, *gate = merged_linear(x, ws)
        return u, g, (gate[0] if gate else None)

    def _out(self, o: torch.Tensor, x: torch.Tensor, g: torch.Tensor | None = None,
             one_token: bool = False) -> torch.Tensor:
        """The post-LayerNorm, the (M) block's GELU gate (g: x's gate_proj product when already made), the output
        projection (every path; under torch.compile Inductor fuses the norm and the gate into one kernel; one_token:
        a decode step's, as `few_rows_linear`)."""
        o = self.post_norm(o)
        if self.backbone == "mamba":
            o = F.gelu(self.gate_proj(x) if g is None else g, approximate="tanh") * o
        return few_rows_linear(o, self.o_proj.weight) if one_token else self.o_proj(o)

    def merge_decode_weights(self, on: bool = True) -> None:
        """on: the fused decode step reads qk_proj, v_proj, gate_proj (and lr_weight, in the same dtype) as one
        concatenated copy, one GEMM (`layers/merged.py`; the copy costs their memory again; merging again keeps
        it); off: drops it. Only
        where that step runs (TTT-Linear, (M) backbone, the fused layer kernels on the weights' device and dtype)
        and for weights that are not inference tensors."""
        if not on or self.kind != "linear" or self.backbone != "mamba" or not self.prepare().fused:
            self.merged = None
            return
        ws = [self.qk_proj.weight, self.v_proj.weight, self.gate_proj.weight]
        if self.learn_lr and self.lr_weight.dtype == ws[0].dtype:
            ws.append(self.lr_weight)
        self.merged = merged_for(self.merged, ws)

    def decode_state(self, state: TTTLayerState, dtype: torch.dtype | None = None) -> TTTLayerState:
        """`state` in the form this layer's one-token steps run fastest on: where they run the fused decode kernel
        (TTT-Linear, (M) backbone, the fused layer kernels for `dtype` inputs, default the weights' dtype) its op
        state in the rows form (`ops.RowsState`: a step reads the mini-batch's earlier rows instead of reading and
        writing d x d accumulators; the CUDA-graphed decoder's buffers), else `state` itself. Every call takes
        either form (`TTTLayerState.plain` converts back)."""
        if (self.kind != "linear" or self.backbone != "mamba" or isinstance(state.op, RowsState)
                or not isinstance(state.pos, int) or not self.prepare(state.op.params[0].device, dtype).fused):
            return state
        return replace(state, op=RowsState.of(state.op, self.mini_batch))

    def _decode_fused(self, x: torch.Tensor, state: TTTLayerState):
        """One token of a TTT-Linear (M) layer on the fused path without gradients: the projections, then one kernel
        for the convs, RoPE, the inner learning rate and the TTT step (`fused_layer.linear_decode_step`), then the
        post-LN x gate and the output projection. The same math as `forward`'s general path (tested)."""
        from ..ops.fused_layer import linear_decode_step
        cq, ck = self.conv_q, self.conv_k
        w = merged_weight(self.merged, x)
        gate, cols = None, (0, 0, 0)
        if w is not None:  # one GEMM: y [B, 1, 3D (+ H)] = u | v | g (| the lr gate); the kernel reads y itself
            y = few_rows_linear(x, w)
            g = self.merged.split(y)[2]  # the x gate's product, for the output
            n_u, n_v, n_g = self.merged.sizes[:3]
            u = v = y
            cols = (0, n_u, n_u + n_v + n_g)
            gate = y if len(self.merged.sizes) > 3 else None
        else:
            u, v, g = self.qk_proj(x), self.v_proj(x), None
        if gate is None and self.learn_lr:
            gate = F.linear(x, self.lr_weight.to(x.dtype))  # [B, 1, H]
        o, op_state, conv = linear_decode_step(
            u, v, gate, state.conv, cq.weight, cq.bias, ck.weight, ck.bias,
            self.lr_bias if self.learn_lr else None, self.inner_lr_scale, self.delta if self.learn_lr else None,
            self.ln_weight, self.ln_bias, state.op, mini_batch=self.mini_batch, base_lr=self.base_lr,
            rope_base=self.rope_base, inplace=state.owned, cols=cols)
        return self._out(o, x, g, one_token=True), TTTLayerState(op_state, conv, state.owned)


class TTTLinear(TTTLayer):
    """TTT-Linear layer: inner model x W + b (base_lr 1.0)."""

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, inner="linear", **kw)


class TTTMLP(TTTLayer):
    """TTT-MLP layer: inner model GELU(x W1 + b1) W2 + b2, hidden 4d (base_lr 0.1)."""

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, inner="mlp", **kw)
