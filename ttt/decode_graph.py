"""CUDA-graph capture of a whole model's one-token decode step, optionally through torch.compile.

What is captured is the model's own step, `model(ids, state)`; the model says what makes that
possible: `model.decode_period` (the step depends on the position only through pos mod this period:
b for a TTT model, whose tau_i, mini-batch commit and RoPE go by pos mod b; 1 for Mamba) and
`model.static_decode_state` (every mixer's state has a fixed size). We capture one graph per offset
r = 0..period-1 over static state buffers and replay graph pos mod period for each token: per-token
latency is flat in context length, with no Python or launch overhead. A model whose state grows
(attention's KV cache) is refused here (decode it without graphs).

`GraphedDecoder(model, state, compile=True)` captures `compiled_step` instead of the eager step: the
model's step with each block run through torch.compile (`model(ids, state, run_block=...)`; Inductor
fuses the casts, norms, RoPE, gates, the causal conv (shifted products under compile, see
layers/conv.py), state writes and the block before's last residual sum into a few kernels; the GEMMs and
the fused Triton step kernels, which Dynamo traces as user kernels, stay as they are), with one compiled
function per model, batch size and dtype, shared by all blocks (same code and shapes). The offset r
enters the traced step as an int: the first offset is traced as a constant, the second makes Dynamo
trace it as a symbolic int (automatic dynamic: the kernels take it at run time), and the mini-batch's
last offset, where the step commits through a Python branch, gets a graph of its own: three compilations
for a TTT-Linear model whatever b is (b before: 75 s for the 1.3b model at b = 16). The CUDA graphs are
still one per offset (a captured kernel's arguments are fixed). fullgraph=True: a graph break raises
instead of falling back to eager.
"""
from __future__ import annotations

import contextlib
import dataclasses
import types
import weakref

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


def rebuild_state(s, tensors: list, pos: int | None = None, owned: bool | None = None):
    """A copy of state `s` whose tensors are taken in order from `tensors` (consumed); every int field
    named `pos` is set to `pos` when given, every `owned` flag to `owned` when given (owned: a step may write its
    new state into these tensors, `TTTLayerState.owned`)."""
    if isinstance(s, torch.Tensor):
        return tensors.pop(0)
    if dataclasses.is_dataclass(s):
        kw = {}
        for f in dataclasses.fields(s):
            v = getattr(s, f.name)
            if f.name == "pos" and pos is not None and isinstance(v, int):
                kw[f.name] = pos
            elif f.name == "owned" and owned is not None:
                kw[f.name] = owned
            else:
                kw[f.name] = rebuild_state(v, tensors, pos, owned)
        return dataclasses.replace(s, **kw)
    if isinstance(s, (list, tuple)):
        return type(s)(rebuild_state(x, tensors, pos, owned) for x in s)
    return s


def _block_step(blk, h, y, s):
    """One block's one-token step on the residual stream h + y (the block before's output, its last residual sum
    done here, inside this block's first kernel); returns this block's (h, y) (`Block.parts`) and its state,
    written into the tensors of `s` (the static buffers)."""
    h, y, new = blk.parts(h + y, s)
    for old, t in zip(flatten_state(s), flatten_state(new)):
        if t is not old:  # weights come back as the same tensors when the mini-batch does not commit
            old.copy_(t)
    return h, y, s


# model -> {key: compiled function}. A weak key: the compiled functions take the model as an argument
# and do not keep it alive. Each key has its own code object, so its own Dynamo cache entries.
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled(model, fn, key, backend, mode):
    fns = _COMPILED.setdefault(model, {})
    if (key, backend, mode) not in fns:
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{key}".replace(" ", ""))
        # dynamic=None: shapes stay static (they never change here); an int that changes between calls (the
        # offset r) is traced as a symbolic int from its second value on
        fns[key, backend, mode] = torch.compile(types.FunctionType(code, fn.__globals__, code.co_name),
                                                backend=backend, mode=mode, fullgraph=True, dynamic=None)
    return fns[key, backend, mode]


# torch.compile modes that leave CUDA graphs to us ("reduce-overhead" and "max-autotune" capture their own)
MODES = ("default", "max-autotune-no-cudagraphs")


def compiled_step(model: TTTLM, backend: str = "inductor", mode: str = "default"):
    """The model's one-token step, `model(ids, state)`, with every block through torch.compile.

        step = compiled_step(model)
        logits = step(ids, state)    # ids [B, 1]; logits [B, 1, V] fp32, as model(ids, state)[0]

    Unlike model(ids, state), the new state is written into `state`'s own tensors and state.pos is
    left as is (the caller advances it). The first calls compile (Dynamo traces one block, the other
    blocks reuse it): the first offset r = state.pos mod b, a second one (r symbolic from then on) and
    the committing offset b - 1; later calls reuse those. The
    embedding, final norm and head run eagerly (inside a CUDA graph that costs no launch overhead).
    mode: a torch.compile mode of MODES ("max-autotune-no-cudagraphs" also tunes the GEMMs; longer
    compiles, once per GEMM shape).
    """
    if not isinstance(model, TTTLM):
        raise ValueError(f"model: expected a TTTLM, got {type(model).__name__}")
    if not (isinstance(backend, str) or callable(backend)):
        raise ValueError(f"backend: expected a torch.compile backend (a name or a callable), got {backend!r}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    mode = None if backend != "inductor" else mode  # modes are Inductor's options
    period, last = model.decode_period, model.blocks[-1]
    model.prepare()  # the layers decide their backends here, not in the traced step

    def step(ids, state: LMState):
        model.refresh_decode_weights()  # merged weight copies (`TTTLM.merge_decode_weights`), outside the trace
        r = state.pos % period
        s = rebuild_state(state, flatten_state(state), pos=r)  # the same tensors; pos = r, as the graph's
        sig = f"B{ids.shape[0]}_{model.embed.weight.dtype}".replace("torch.", "")  # one code object each
        fn, pending = _compiled(model, _block_step, sig, backend, mode), []

        def run_block(blk, h, bs):  # each block's last residual sum moved into the next block's compiled step
            h, y, bs = fn(blk, h, pending.pop() if pending else torch.zeros_like(h), bs)
            if blk is last:
                return h + y, bs
            pending.append(y)
            return h, bs

        logits, _ = model(ids, s, run_block=run_block)
        return logits

    return step


class GraphedDecoder:
    """Replays captured CUDA graphs of `model`'s one-token step.

        dec = GraphedDecoder(model, state)      # state: after prefill (any position)
        logits = dec.step(next_ids)             # next_ids [B, 1]; advances the internal state
        state = dec.state()                     # a normal LMState again (copies of the buffers)

    compile=True captures `compiled_step` (torch.compile per block; at most three compilations, done
    before the capture, on first use per model and batch size) instead of the eager step; a mode name of MODES
    compiles in that torch.compile mode (True = "default"). merge=True first gives the model merged copies of the
    weights that share an input (`TTTLM.merge_decode_weights`: fewer, larger GEMMs per token, those weights' memory
    again; refreshed before each replay when a weight changed in place); it raises for inference tensors (weights
    made under torch.inference_mode), which None (the default) leaves unmerged; merge=False drops the copies the
    model had, so that the graphs read the weights themselves.
    """

    def __init__(self, model: TTTLM, state: LMState, warmup: int = 2, compile: bool | str = False,
                 merge: bool | None = None):
        if not isinstance(merge, (bool, type(None))):
            raise ValueError(f"merge: expected a bool or None (merge unless the weights are inference tensors), "
                             f"got {merge!r}")
        if not (isinstance(compile, bool) or compile in MODES):
            raise ValueError(f"compile: expected a bool or a torch.compile mode of {MODES}, got {compile!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup: expected an int >= 0, got {warmup!r}")
        if not isinstance(model, TTTLM):
            raise ValueError(f"model: expected a TTTLM, got {type(model).__name__}")
        if not model.static_decode_state:
            raise ValueError("model: CUDA-graph decode needs a fixed-size state; attention's KV cache grows "
                             "(decode attention models with cuda_graph=False)")
        if not isinstance(state, LMState) or not flatten_state(state) or not flatten_state(state)[0].is_cuda:
            raise ValueError("state: expected an LMState on a CUDA device (run the prefill on CUDA first)")
        self.model, self.pos = model, state.pos
        self.period = model.decode_period
        model.prepare()
        state = model.decode_state(state)  # the fused decode kernel's rows form where it runs: the buffers' form
        if merge is None:
            merge = not any(p.is_inference() for p in model.parameters())
        model.merge_decode_weights(merge)  # False drops copies the model had: the graphs read its own weights
        # the merged copies the graphs will read: kept alive and refreshed by this decoder, whatever the model's
        # modules hold later (merging again keeps them; unmerging drops the modules' references, not these)
        self.merged = model.decode_weight_copies()
        self.template = state
        self.buffers = [t.detach().clone() for t in flatten_state(state)]
        B = self.buffers[0].shape[0]
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=self.buffers[0].device)
        if compile:
            step = compiled_step(model, mode="default" if compile is True else compile)
            # the buffers are the decoder's: the fused decode step writes the new state into them (no copy back)
            states = [rebuild_state(state, list(self.buffers), pos=r, owned=True) for r in range(self.period)]
            run = lambda r: step(self.ids, states[r])  # noqa: E731
            warmup = max(warmup, 1)  # the first call compiles: never inside the capture
            # a guard that failed during the capture would recompile there: raise instead
            no_recompile = lambda: torch.compiler.set_stance("fail_on_recompile")  # noqa: E731
        else:
            run, no_recompile = self._step_eager, contextlib.nullcontext
        self.graphs, self.logits = [], []
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            saved = [b.clone() for b in self.buffers]
            for r in range(self.period):
                for _ in range(warmup):  # warm up kernels/allocator (and compile) outside capture
                    run(r)
                g = torch.cuda.CUDAGraph()
                with no_recompile(), torch.cuda.graph(g, pool=pool, stream=stream):
                    out = run(r)
                pool = g.pool()
                self.graphs.append(g)
                self.logits.append(out)
            for b, s in zip(self.buffers, saved):  # capture and warm-up ran the step: restore the state
                b.copy_(s)
        torch.cuda.current_stream().wait_stream(stream)

    def _step_eager(self, r: int):
        s = rebuild_state(self.template, list(self.buffers), pos=r, owned=True)
        logits, new = self.model(self.ids, s)
        for b, t in zip(self.buffers, flatten_state(new)):
            b.copy_(t)
        return logits

    @torch.inference_mode()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [B, 1] -> logits [B, 1, V] (a view into a static buffer: copy it to keep it)."""
        self.ids.copy_(ids)
        for m in self.merged:  # the graphs read the merged copies as they are
            m.fresh()
        r = self.pos % self.period
        self.graphs[r].replay()
        self.pos += 1
        return self.logits[r]

    def state(self) -> LMState:
        """The current state as a normal LMState (copies of the buffers, positions set, in the plain form)."""
        return self.model.plain_state(rebuild_state(self.template, [b.clone() for b in self.buffers], pos=self.pos))
