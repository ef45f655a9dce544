"""CUDA-graph capture of a whole model's one-token decode step.

A TTT model's decode step depends on the position only through pos mod b (which tau_i applies,
whether the mini-batch commits, RoPE at position mod b), and its state has a fixed size. So we
capture one graph per in-batch offset r = 0..b-1 over static state buffers and replay graph
pos mod b for each token: per-token latency is flat in context length, with no Python or launch
overhead. Mamba states are fixed-size and position-free too (one graph). Attention's KV cache grows
with the context, so attention models are refused here (decode them without graphs).
"""
from __future__ import annotations

import dataclasses

import torch

from .model import LMState, TTTLM


def flatten_state(s) -> list:
    """All tensors of a (nested dataclass / tuple / list) state, in a fixed order."""
    if isinstance(s, torch.Tensor):
        return [s]
    if dataclasses.is_dataclass(s):
        return [t for f in dataclasses.fields(s) for t in flatten_state(getattr(s, f.name))]
    if isinstance(s, (list, tuple)):
        return [t for x in s for t in flatten_state(x)]
    return []


def rebuild_state(s, tensors: list, pos: int | None = None):
    """A copy of state `s` whose tensors are taken in order from `tensors` (consumed); every int field
    named `pos` is set to `pos` when given."""
    if isinstance(s, torch.Tensor):
        return tensors.pop(0)
    if dataclasses.is_dataclass(s):
        kw = {}
        for f in dataclasses.fields(s):
            v = getattr(s, f.name)
            kw[f.name] = pos if (f.name == "pos" and pos is not None and isinstance(v, int)) else \
                rebuild_state(v, tensors, pos)
        return dataclasses.replace(s, **kw)
    if isinstance(s, (list, tuple)):
        return type(s)(rebuild_state(x, tensors, pos) for x in s)
    return s


class GraphedDecoder:
    """Replays captured CUDA graphs of `model`'s one-token step.

        dec = GraphedDecoder(model, state)      # state: after prefill (any position)
        logits = dec.step(next_ids)             # next_ids [B, 1]; advances the internal state
        state = dec.state()                     # a normal LMState again (copies of the buffers)
    """

    def __init__(self, model: TTTLM, state: LMState, warmup: int = 2):
        if model.cfg.mixer == "attention":
            raise ValueError("model: CUDA-graph decode needs a fixed-size state; attention's KV cache grows "
                             "(decode attention models with cuda_graph=False)")
        if not isinstance(state, LMState) or not flatten_state(state) or not flatten_state(state)[0].is_cuda:
            raise ValueError("state: expected an LMState on a CUDA device (run the prefill on CUDA first)")
        self.model, self.pos = model, state.pos
        self.period = model.cfg.mini_batch if model.cfg.mixer.startswith("ttt") else 1
        self.template = state
        self.buffers = [t.detach().clone() for t in flatten_state(state)]
        B = self.buffers[0].shape[0]
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=self.buffers[0].device)
        self.graphs, self.logits = [], []
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            saved = [b.clone() for b in self.buffers]
            for r in range(self.period):
                for _ in range(warmup):  # warm up kernels/allocator outside capture
                    self._step_eager(r)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, stream=stream):
                    out = self._step_eager(r)
                pool = g.pool()
                self.graphs.append(g)
                self.logits.append(out)
            for b, s in zip(self.buffers, saved):  # capture and warm-up ran the step: restore the state
                b.copy_(s)
        torch.cuda.current_stream().wait_stream(stream)

    def _step_eager(self, r: int):
        s = rebuild_state(self.template, list(self.buffers), pos=r)
        logits, new = self.model(self.ids, s)
        for b, t in zip(self.buffers, flatten_state(new)):
            b.copy_(t)
        return logits

    @torch.inference_mode()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [B, 1] -> logits [B, 1, V] (a view into a static buffer: copy it to keep it)."""
        self.ids.copy_(ids)
        r = self.pos % self.period
        self.graphs[r].replay()
        self.pos += 1
        return self.logits[r]

    def state(self) -> LMState:
        """The current state as a normal LMState (copies of the buffers, positions set)."""
        return rebuild_state(self.template, [b.clone() for b in self.buffers], pos=self.pos)
