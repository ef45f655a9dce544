"""The primal form of a TTT op with any inner model (docs/math.md §§2, 3, 5), token by token.

Each token's inner gradient comes from `torch.autograd.grad` at the start-of-mini-batch weights; the
token's output uses its own explicit weights W - tau_i * sum_{j<=i} lr_j grad_j. This is the
specification in code: slow, obviously correct, and differentiable (create_graph=True).

`primal_forward` takes the inner model as a function `f_res(params, x)` over batched per-(B, H)
weights; `ttt_generic` makes that function from any `nn.Module` with `torch.func`.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, vmap

from .common import TTTInputs, TTTState, compute_dtype, layer_norm


def primal_forward(f_res, x: TTTInputs, params, accum, pos, residual: bool = True):
    """Run the primal TTT recurrence.

    f_res(params, x [B,H,d]) -> [B,H,d]; x: the op's inputs (`TTTInputs`: q, k, v [B,T,H,d], lr [B,T,H], tau [b],
    ln_weight/ln_bias [H,d] or None for no inner LayerNorm; with cu_seqlens, packed documents: each one's tokens
    from its own row of the state, at its own position); params/accum: tuples of [B,H,...] tensors (one row per
    document when packed); residual=False drops the residual (target v instead of v - k, output f_res(q) instead
    of q + LN(f_res(q))). Returns (o [B,T,H,d] in the compute dtype, params, accum, pos: an int, or one per document).
    """
    if torch.is_inference_mode_enabled():
        # the inner gradients need autograd, which inference mode switches off: run on normal copies
        with torch.inference_mode(False), torch.no_grad():
            copy = TTTInputs(*(t if t is None else t.clone() for t in (x.q, x.k, x.v, x.lr, x.tau, x.ln_weight,
                                                                       x.ln_bias)), cu_seqlens=x.cu_seqlens)
            return primal_forward(f_res, copy, [p.clone() for p in params], [a.clone() for a in accum], pos,
                                  residual)
    pk = x.packing
    if pk is None:
        return _primal(f_res, x, params, accum, pos, residual)
    # packed documents: token by token as the specification reads, document n's tokens on row n
    outs, rows = [], []
    for n, ((s, e), p) in enumerate(zip(pk.spans, pk.row_positions(pos))):
        o, pr, ar, _ = _primal(f_res, x.tokens(s, e), [t[n:n + 1] for t in params], [t[n:n + 1] for t in accum], p,
                               residual)
        outs.append(o)
        rows.append((pr, ar))
    params = tuple(torch.cat(r) for r in zip(*(pr for pr, _ in rows)))  # N x [1, ...] -> [N, ...]
    accum = tuple(torch.cat(r) for r in zip(*(ar for _, ar in rows)))
    return torch.cat(outs, dim=1), params, accum, pk.end_positions(pos)


def _primal(f_res, x: TTTInputs, params, accum, pos: int, residual: bool):
    q, k, v, lr, tau, ln_weight, ln_bias, mini_batch = x.q, x.k, x.v, x.lr, x.tau, x.ln_weight, x.ln_bias, x.mini_batch
    ct = compute_dtype(q)
    norm = (lambda z: z) if ln_weight is None else (lambda z: layer_norm(z, ln_weight.to(ct), ln_bias.to(ct)))
    params = [p.to(ct) for p in params]
    accum = [a.to(ct) for a in accum]
    tau = tau.to(ct)
    outs = []
    grad_on = torch.is_grad_enabled()
    with torch.enable_grad():
        # under no_grad: fresh leaves (views made under no_grad may report requires_grad without being in
        # any graph, and autograd.grad then fails on them)
        params = [p if grad_on and p.requires_grad else p.detach().requires_grad_() for p in params]
        for t in range(q.shape[1]):
            i = pos % mini_batch  # 0-based in-batch index of this token
            qt, kt, vt = (u[:, t].to(ct) for u in (q, k, v))  # [B,H,d]
            target = vt - kt if residual else vt
            loss = 0.5 * (norm(f_res(params, kt)) - target).pow(2).sum()  # sum of independent per-(B,H) losses
            grads = torch.autograd.grad(loss, params, create_graph=True)
            lr_t = lr[:, t].to(ct)  # [B,H]
            accum = [a + lr_t.reshape(*lr_t.shape, *([1] * (a.dim() - 2))) * g for a, g in zip(accum, grads)]
            w_t = [p - tau[i] * a for p, a in zip(params, accum)]
            z = norm(f_res(w_t, qt))
            outs.append(qt + z if residual else z)
            if i == mini_batch - 1:  # mini-batch complete: its last token's weights become the start weights
                params, accum = w_t, [torch.zeros_like(a) for a in accum]
            pos += 1
    if not grad_on:  # and the inner graph must not leak into the state, or it grows from call to call
        params, accum = [p.detach() for p in params], [a.detach() for a in accum]
    return torch.stack(outs, dim=1), tuple(params), tuple(accum), pos


def module_f_res(module: nn.Module, names):
    """f_res(params, x) evaluating `module` with per-(B, H) weights: params[i] is [B,H,*shape of names[i]]."""
    def single(p, x):  # p: tuple of one (B,H) slice's weights, x: [d]
        return functional_call(module, dict(zip(names, p)), (x,))

    batched = vmap(vmap(single))  # over B, then H

    def f_res(params, x):
        return batched(tuple(params), x)
    return f_res


def ttt_generic(module: nn.Module, q, k, v, lr, tau, ln_weight, ln_bias, state: TTTState | None = None,
                init_params=None, *, mini_batch: int | None = None, residual: bool = True):
    """TTT op whose inner model is any `nn.Module` mapping [d] -> [d] (written for one token).
    mini_batch: optional, = len(tau) (checked).

    init_params: tuple of per-head initial weights [H, *shape] in `module.named_parameters()` order
    (used when `state` is None); state.params hold [B, H, *shape]. ln_weight/ln_bias [H, d] or None.
    Returns (o [B,T,H,d] in q's dtype, new TTTState of kind "generic").
    """
    names = [n for n, _ in module.named_parameters()]
    B, T, H, d = q.shape
    if state is None:
        if init_params is None:
            raise ValueError("init_params: expected per-head initial weights when state is None, got None")
        if len(init_params) != len(names):
            raise ValueError(f"init_params: expected {len(names)} tensors ({names}), got {len(init_params)}")
        params = tuple(p.unsqueeze(0).expand(B, *p.shape) for p in init_params)
        state = TTTState("generic", params, tuple(torch.zeros_like(p) for p in params), 0)
    if state.params[0].shape[:2] != (B, H):
        raise ValueError(f"state: expected weights of leading shape {(B, H)}, got {tuple(state.params[0].shape[:2])}")
    if mini_batch is not None and tau.shape != (mini_batch,):
        raise ValueError(f"tau: expected shape {(mini_batch,)} ([mini_batch]), got {tuple(tau.shape)}")
    return GenericOp(module, residual)(TTTInputs(q, k, v, lr, tau, ln_weight, ln_bias), state)


class GenericOp:
    """The TTT op for any inner `nn.Module` (the primal form, the only backend for it): op(x, state) -> (o, new
    state of kind "generic"), as `ttt.ops.TTTOp`."""

    kind, backend = "generic", "naive"

    def __init__(self, module: nn.Module, residual: bool = True):
        self.module, self.residual = module, residual
        self.f_res = module_f_res(module, [n for n, _ in module.named_parameters()])

    def __call__(self, x: TTTInputs, state: TTTState):
        o, params, accum, pos = primal_forward(self.f_res, x, state.params, state.accum, state.pos, self.residual)
        return o.to(x.q.dtype), TTTState("generic", params, accum, pos)
