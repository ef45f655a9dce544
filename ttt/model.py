"""The language model: token embedding, a stack of blocks, final RMSNorm, (tied) output head.

Blocks (docs/math.md §7), with pre-RMSNorm residual sub-layers:
  backbone "mamba" (TTT mixers only):  h += conv(norm h);  h += TTT(norm h);  h += SwiGLU(norm h)
  backbone "transformer":              h += mixer(norm h); h += SwiGLU(norm h)   (no FFN if ffn_hidden=0)
The mixer is one of ttt_linear, ttt_mlp, attention (Transformer++ baseline) or mamba (Mamba-2 style
baseline). Every model streams: forward(ids, state) -> (logits, state), for chunked evaluation and
decoding; one token at a time is the decode step. forward(ids, cu_seqlens=cu) runs N documents packed
into ids [1, T], each as if alone (docs/packed.md).
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig, RunOptions
from .layers.attention import Attention
from .layers.conv import CausalConv1d
from .layers.head import IGNORE, linear_cross_entropy
from .layers.mamba import Mamba2
from .layers.merged import few_rows_linear, merged_for, merged_weight
from .layers.norms import RMSNorm
from .layers.ttt import TTTLayer
from .ops.packed import packing

log = logging.getLogger(__name__)


LOGITS = ("all", "last", "none")


def inner_lr_scale(frac: float, base_lr: float) -> float:
    """The factor on base_lr that TTT-MLP's inner-LR ramp applies with `frac` of the warm-up done:
    from min(0.01, base_lr) at frac = 0 linearly to base_lr at frac = 1."""
    if frac >= 1.0 or base_lr <= 0:
        return 1.0
    start = min(0.01, base_lr)
    return (start + (base_lr - start) * frac) / base_lr


def _init_part(part: nn.Module, std: float) -> None:
    """One part's init: each layer's own reset_parameters, then N(0, std) for every Linear/Embedding weight."""
    for m in part.modules():
        if hasattr(m, "reset_parameters") and not isinstance(m, (nn.Linear, nn.Embedding)):
            m.reset_parameters()
    for m in part.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)


def _copy_full(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the full-size CPU tensor `full` into parameter `p`: a plain tensor on any device, or this
    rank's shard of a DTensor (FSDP2)."""
    if hasattr(p, "device_mesh"):  # a DTensor: keep this rank's shard only (no communication)
        from torch.distributed.tensor import distribute_tensor
        full = full.to(p.device, p.dtype)
        try:
            local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
        except TypeError:  # an older torch: rank 0's copy is scattered (every rank holds the same one)
            local = distribute_tensor(full, p.device_mesh, p.placements)
        p.to_local().copy_(local.to_local())
    else:
        p.copy_(full)


class SwiGLU(nn.Module):
    """FFN: (silu(x W_gate) * x W_up) W_down, no biases."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.merged = None  # MergedWeights of gate and up for one-token steps (`merge_decode_weights`)

    def merge_decode_weights(self, on: bool = True) -> None:
        """on: a one-token step without gradients reads gate and up as one concatenated copy, one GEMM
        (`layers/merged.py`); off: drops it."""
        ws = [self.gate.weight, self.up.weight]
        self.merged = merged_for(self.merged, ws) if on else None

    def forward(self, x):
        w = merged_weight(self.merged, x) if x.shape[-2] == 1 and not torch.is_grad_enabled() else None
        if w is not None:  # a one-token step: its few-row products (`few_rows_linear`)
            g, u = self.merged.split(few_rows_linear(x, w))
            return few_rows_linear(F.silu(g) * u, self.down.weight)
        return self.down(F.silu(self.gate(x)) * self.up(x))


def make_mixer(cfg: ModelConfig, run: RunOptions = RunOptions()) -> nn.Module:
    if cfg.mixer in ("ttt_linear", "ttt_mlp"):
        return TTTLayer(cfg.d_model, cfg.n_heads, inner=cfg.mixer[4:], backbone=cfg.backbone,
                        mini_batch=cfg.mini_batch, base_lr=cfg.base_lr, conv_width=cfg.conv_width,
                        rope_base=cfg.rope_base, backend=run.ttt_backend, learn_lr=cfg.ttt_learn_lr,
                        learn_init=cfg.ttt_learn_init, inner_ln=cfg.ttt_inner_ln, residual=cfg.ttt_inner_residual,
                        fused=run.fused_layer)
    if cfg.mixer == "attention":
        return Attention(cfg.d_model, cfg.n_heads, rope_base=cfg.rope_base)
    return Mamba2(cfg.d_model, d_state=cfg.mamba_d_state, expand=cfg.mamba_expand, head_dim=cfg.mamba_head_dim,
                  conv_width=cfg.conv_width, backend=run.mamba_backend)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, run: RunOptions = RunOptions()):
        super().__init__()
        self.has_conv = cfg.backbone == "mamba" and cfg.mixer.startswith("ttt")
        if self.has_conv:
            self.conv_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.conv = CausalConv1d(cfg.d_model, cfg.conv_width)
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = make_mixer(cfg, run)
        if cfg.ffn_hidden:
            self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden)
        self.set_run_options(run)

    def set_run_options(self, run: RunOptions) -> None:
        """The block's share of `TTTLM.set_run_options`: the pre-conv's kernel and the mixer's backends."""
        if self.has_conv:
            self.conv.backend = {True: "triton", False: "torch", None: "auto"}[run.fused_layer]
        if isinstance(self.mixer, TTTLayer):
            self.mixer.backend, self.mixer.fused = run.ttt_backend, run.fused_layer
            self.mixer.keep_weights = run.mlp_keep_weights
            self.mixer.gluon = run.linear_gluon
        elif isinstance(self.mixer, Mamba2):
            self.mixer.backend = run.mamba_backend

    def init_state(self, batch_size: int, device=None) -> "BlockState":
        conv = self.conv.init_state(batch_size, device) if self.has_conv else None
        return BlockState(conv, self.mixer.init_state(batch_size, device=device))

    def forward(self, h, state: "BlockState | None" = None, cu_seqlens=None, *, state_out: bool = True):
        """h [B, T, D] -> (h after the block, its new `BlockState`; None when not state_out: a training step's
        forward, whose compiled graph then drops the work that only builds the state)."""
        h, y, state = self.parts(h, state, cu_seqlens, state_out=state_out)
        return h + y, state

    def parts(self, h, state: "BlockState | None" = None, cu_seqlens=None, *, state_out: bool = True):
        """As forward, with the last residual sum left to the caller: (h, y, new state), the block's output h + y
        (y: the FFN's output, or the mixer's without an FFN). The compiled decode step adds it in the next block,
        where Inductor fuses the sum into that block's first norm (one kernel less per block)."""
        conv_state, mixer_state = (None, None) if state is None else (state.conv, state.mixer)
        owned = state is not None and state.owned  # an owned window stays owned (the same tensor, pushed in place)
        if self.has_conv:
            y, conv_state = self.conv(self.conv_norm(h), conv_state, cu_seqlens=cu_seqlens, owned=owned)
            h = h + y
        y, mixer_state = self.mixer(self.mixer_norm(h), mixer_state, cu_seqlens=cu_seqlens)
        if hasattr(self, "ffn"):
            h = h + y
            y = self.ffn(self.ffn_norm(h))
        return h, y, (BlockState(conv_state, mixer_state, owned) if state_out else None)


@dataclass
class BlockState:
    """One block's state. conv: the window of the block's pre-conv (its last width-1 inputs, [B, width-1, D];
    TTT blocks of the (M) backbone, else None); mixer: the mixer's own state (`TTTLayerState`, `KVCache` or
    `MambaState`), which counts the tokens consumed (`pos`); owned: the caller gives `conv` up to the next step,
    which may write the new window into it (`ttt.decode_graph.GraphedDecoder`'s buffers, as `TTTLayerState.owned`)."""

    conv: torch.Tensor | None
    mixer: object
    owned: bool = False

    @property
    def pos(self) -> int:
        return self.mixer.pos

    def detach(self) -> "BlockState":
        return BlockState(None if self.conv is None else self.conv.detach(), self.mixer.detach())


@dataclass
class LMState:
    """The model's state: one `BlockState` per block. pos (tokens consumed) is the blocks' own count (after
    packed documents: one count per document, the states one row per document)."""

    blocks: list[BlockState]

    @property
    def pos(self) -> int:
        return self.blocks[0].pos

    def detach(self) -> "LMState":
        return LMState([b.detach() for b in self.blocks])


class TTTLM(nn.Module):
    """Language model over token ids.

    forward(ids [B, T], state=None) -> (logits [B, T, V] fp32, state); logits="last" gives [B, 1, V]
    (prefill before generation), "none" None (state only); targets=y gives (loss, state) through the
    chunked head, which never holds fp32 logits for every position (training, evaluation).
    cfg says what the weights compute; run (`RunOptions`: backends, fused kernels; `set_run_options` changes it)
    how they run.
    """

    def __init__(self, cfg: ModelConfig, run: RunOptions | None = None):
        super().__init__()
        cfg.validate()
        if run is not None and not isinstance(run, RunOptions):
            raise ValueError(f"run: expected a RunOptions, got {type(run).__name__}")
        self.cfg = cfg
        # how it runs: `run`, else what deprecated ModelConfig fields were set to (RunOptions() when none was)
        self.run_options = cfg._legacy_run if run is None else run
        with torch.random.fork_rng(devices=[]):  # the layers' own resets do not move the generator:
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)  # init_weights alone draws from it
            self.blocks = nn.ModuleList(Block(cfg, self.run_options) for _ in range(cfg.n_layers))
            self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.grad_checkpointing = False
        self._prepared: set = set()  # the (device type, dtype) keys `prepare` has run for
        self._merging: list = []  # the modules `merge_decode_weights` has asked
        if not self.embed.weight.is_meta:  # built on the meta device: materialise, then init_weights()
            self.init_weights()

    def _parts(self) -> list[tuple[str, nn.Module]]:
        """The model's top-level parts in a fixed order: the unit of initialisation (and of FSDP sharding)."""
        parts = [("embed", self.embed)] + [(f"blocks.{i}", b) for i, b in enumerate(self.blocks)]
        return parts + [("norm", self.norm)] + ([("head", self.head)] if self.head is not None else [])

    def _new_part(self, name: str) -> nn.Module:
        cfg = self.cfg
        if name == "embed":
            return nn.Embedding(cfg.vocab_size, cfg.d_model)
        if name == "norm":
            return RMSNorm(cfg.d_model, cfg.norm_eps)
        if name == "head":
            return nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        return Block(cfg, self.run_options)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Paper init: embeddings and projections N(0, init_std), each layer's own reset for the rest.

        Part by part (embedding, each block, final norm, head), each from its own seed drawn from the
        global CPU generator, on the CPU: the values depend on that generator only, not on the device
        nor on how the parameters are sharded. A model built on the meta device, sharded (FSDP2) and
        materialised (`to_empty`) gets on every rank its shard of the one-process init: each part is
        initialised as a full-size CPU twin, one part at a time, and each rank keeps its own shard."""
        parts = self._parts()
        seeds = torch.randint(0, 2 ** 62, (len(parts),), device="cpu").tolist()
        for (name, part), seed in zip(parts, seeds):
            params = list(part.parameters())
            in_place = all(type(p.data) is torch.Tensor and p.device.type == "cpu" and p.dtype == torch.get_default_dtype()
                           for p in params)
            if in_place:
                twin = part
            else:  # on another device or dtype, or sharded: a full-size CPU copy of this part only
                with torch.device("meta"):
                    twin = self._new_part(name)
                twin.to_empty(device="cpu")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                _init_part(twin, self.cfg.init_std)
            if not in_place:
                for p, t in zip(params, twin.parameters(), strict=True):
                    _copy_full(p, t)
        self.set_inner_lr_warmup(1.0)  # resets the ramp's buffers (garbage after `to_empty`)

    @torch.no_grad()
    def set_inner_lr_warmup(self, frac: float) -> None:
        """TTT-MLP's inner learning-rate ramp (the paper's recipe): with `frac` of the warm-up done
        (0 <= frac <= 1), each TTT-MLP mixer's inner base_lr is min(0.01, base_lr) + (base_lr - that)
        * frac; frac = 1 (and every other mixer, always) uses base_lr as is."""
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"frac: expected a float in [0, 1], got {frac!r}")
        for m in self.modules():
            if isinstance(m, TTTLayer):
                m.inner_lr_scale.fill_(inner_lr_scale(frac, m.base_lr) if m.kind == "mlp" else 1.0)

    @property
    def decode_period(self) -> int:
        """How many distinct one-token steps the model has: its step depends on the position only
        through pos mod this (the lcm of what each mixer declares: b for TTT, 1 for the others)."""
        return math.lcm(*(getattr(blk.mixer, "decode_period", 1) for blk in self.blocks))

    @property
    def static_decode_state(self) -> bool:
        """Whether every mixer's decode state has a fixed size (attention's KV cache grows)."""
        return all(getattr(blk.mixer, "static_decode_state", True) for blk in self.blocks)

    def set_run_options(self, run: RunOptions) -> None:
        """Run the same weights another way (backends, fused kernels): every block takes `run`, and the layers
        decide again on their next call."""
        if not isinstance(run, RunOptions):
            raise ValueError(f"run: expected a RunOptions, got {type(run).__name__}")
        self.run_options = run
        for blk in self.blocks:
            blk.set_run_options(run)
        self._prepared.clear()

    def prepare(self, device=None, dtype: torch.dtype | None = None) -> None:
        """Decide now how every TTT layer runs for hidden states of `dtype` on `device` (default: the embedding's
        device and dtype), not inside a traced, compiled or captured step (`TTTLayer.prepare`); says once which
        backend each choice of the layers became. The forward calls it for the dtype and device it sees."""
        device = self.embed.weight.device if device is None else torch.device(device)
        dtype = self.embed.weight.dtype if dtype is None else dtype
        chosen = {}
        for m in self.modules():
            if isinstance(m, TTTLayer):
                chosen[m.backend] = m.prepare(device, dtype).op.backend
        if chosen and (device.type, dtype) not in self._prepared:
            log.info("TTT layers on %s %s: %s", device.type, str(dtype).replace("torch.", ""),
                     ", ".join(f"backend {k!r} runs {v!r}" for k, v in chosen.items()))
        self._prepared.add((device.type, dtype))

    def decode_state(self, state: LMState) -> LMState:
        """`state` with each TTT layer's state in the form its one-token steps run fastest on
        (`TTTLayer.decode_state`: the fused decode kernel's rows form; the CUDA-graphed decoder's buffers), for the
        embedding's dtype; the other blocks' states as they are. Every call takes either form; `plain_state`
        converts back."""
        dtype = self.embed.weight.dtype
        return LMState([replace(bs, mixer=blk.mixer.decode_state(bs.mixer, dtype)) if isinstance(blk.mixer, TTTLayer)
                        else bs for blk, bs in zip(self.blocks, state.blocks)])

    @staticmethod
    def plain_state(state: LMState) -> LMState:
        """`state` with every decode form (`decode_state`) converted back to the plain one."""
        return LMState([replace(bs, mixer=bs.mixer.plain()) if hasattr(bs.mixer, "plain") else bs
                        for bs in state.blocks])

    def merge_decode_weights(self, on: bool = True) -> None:
        """on: one-token steps without gradients read the weights that multiply the same input as one
        concatenated copy each, one GEMM instead of several (TTT-Linear (M) layers' qk, v, gate and lr projections
        on the fused decode path; every SwiGLU's gate and up): more memory (those weights again), fewer and
        larger GEMMs. The copies follow their weights (`layers/merged.py`); a compiled or CUDA-graphed step calls
        `refresh_decode_weights` first (`ttt.decode_graph` does). off: drops the copies."""
        self._merging = [m for m in self.modules() if isinstance(m, (TTTLayer, SwiGLU))]
        for m in self._merging:
            m.merge_decode_weights(on)

    def decode_weight_copies(self) -> list:
        """The merged copies the modules hold now (`merge_decode_weights`; `layers/merged.MergedWeights`)."""
        return [m.merged for m in self._merging if m.merged is not None]

    def refresh_decode_weights(self) -> None:
        """Rewrite every merged copy whose weights changed since (`merge_decode_weights`); nothing when none."""
        for m in self.decode_weight_copies():
            m.fresh()

    def prepare_decode(self) -> None:
        """Deprecated: `prepare()`."""
        warnings.warn("TTTLM.prepare_decode() is deprecated; use TTTLM.prepare()", DeprecationWarning, stacklevel=2)
        self.prepare()

    def init_state(self, batch_size: int, device=None) -> LMState:
        device = device or self.embed.weight.device
        return LMState([blk.init_state(batch_size, device) for blk in self.blocks])

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are one parameter, counted once
        return n - self.embed.weight.numel() if exclude_embedding else n

    @staticmethod
    def _check_ids(ids) -> None:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
            got = f"{ids.dtype} of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"ids: expected an integer tensor [B, T], got {got}")
        if ids.shape[1] == 0:
            raise ValueError("ids: expected a non-empty sequence (T >= 1), got T = 0")

    def hidden(self, ids: torch.Tensor, state: LMState | None = None, run_block=None, cu_seqlens=None,
               state_out: bool = True):
        """ids [B, T] -> (final-normed hidden states [B, T, D], new state; None when not state_out): everything but
        the head.
        run_block(block, h, block_state) -> (h, new block state), when given, runs each block instead of
        block(h, block_state) (the compiled decode step of `ttt.decode_graph`). cu_seqlens: packed documents
        (int64 [N + 1], or a `Packing`; ids [1, T]), checked once here for every block."""
        self._check_ids(ids)
        if state is not None and (not isinstance(state, LMState) or len(state.blocks) != len(self.blocks)
                                  or not all(isinstance(b, BlockState) for b in state.blocks)):
            raise ValueError(f"state: expected an LMState of {len(self.blocks)} blocks from this model's init_state")
        B, T = ids.shape
        pk = None
        if cu_seqlens is not None:
            if run_block is not None:
                raise ValueError("cu_seqlens: the decode step (run_block) runs one token per row, not packed documents")
            pk = packing(cu_seqlens, T, ids.device, batch_size=B)
            if state is not None and not all(getattr(blk.mixer, "packed_state", True) for blk in self.blocks):
                raise ValueError("state: attention starts every packed document afresh and keeps no KV cache; pass "
                                 "no state with cu_seqlens")
        elif state is not None and not isinstance(state.pos, int):
            raise ValueError("state: a state of packed documents (one position per document) continues packed "
                             "documents only; pass cu_seqlens")
        # a fresh start lets each block build its initial state inside its own forward (FSDP2
        # unshards a block's parameters only there)
        h = self.embed(ids)
        if (h.device.type, h.dtype) not in self._prepared:  # decided here, outside any compiled block
            self.prepare(h.device, h.dtype)
        new_states = []
        for blk, s in zip(self.blocks, [None] * len(self.blocks) if state is None else state.blocks):
            if run_block is not None:
                h, s = run_block(blk, h, s)
            elif self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h, s = checkpoint(blk, h, s, pk, state_out=state_out, use_reentrant=False)
            else:
                h, s = blk(h, s, pk, state_out=state_out)
            new_states.append(s)
        return self.norm(h), (LMState(new_states) if state_out else None)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.head is None else self.head.weight

    def forward(self, ids: torch.Tensor, state: LMState | None = None, *, logits: str = "all",
                targets: torch.Tensor | None = None, reduction: str = "mean", chunk: int = 8192, run_block=None,
                cu_seqlens=None, state_out: bool = True):
        """ids [B, T] -> (logits, new state), or (loss, new state) when `targets` [B, T] is given: the
        next-token cross-entropy through the chunked head (`layers/head.py`), a scalar for reduction
        "mean"/"sum" or the per-token NLL [B, T] for "none", fp32 (fp64 for an fp64 model); at most
        `chunk` rows of logits exist at a time; targets equal to IGNORE (-100) are skipped. Without
        targets, `logits` picks what the head computes: "all" [B, T, V], "last" [B, 1, V] (prefill before
        generation), "none" (None; state only). run_block: see `hidden`.
        cu_seqlens (int64 [N + 1]; ids [1, T]): N packed documents, each run as if alone (docs/packed.md);
        targets are the next tokens of the packed stream, and the target of every document's last token but
        the last document's (the next document's first token) is skipped (counts as IGNORE).
        state_out=False: no new state (None in its place), for a training step, which never reads it: the compiled
        blocks then skip the work that only builds it (the conv windows' copies, the TTT accumulators' zeros)."""
        if logits not in LOGITS:
            raise ValueError(f"logits: expected one of {LOGITS}, got {logits!r}")
        if targets is not None and (not isinstance(targets, torch.Tensor) or targets.shape != ids.shape):
            got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise ValueError(f"targets: expected a tensor of the shape of ids {tuple(ids.shape)}, got {got}")
        if cu_seqlens is not None:
            self._check_ids(ids)
            cu_seqlens = packing(cu_seqlens, ids.shape[1], ids.device, batch_size=ids.shape[0])
            if targets is not None:  # never predict a document's first token from the one before it
                targets = targets.index_fill(1, cu_seqlens.cu_seqlens[1:-1] - 1, IGNORE)
        h, state = self.hidden(ids, state, run_block, cu_seqlens, state_out)
        w = self.head_weight
        if targets is not None:
            dev = h.device.type
            if torch.is_autocast_enabled(dev):  # the head's products in the autocast dtype, as F.linear would
                h, w = h.to(torch.get_autocast_dtype(dev)), w.to(torch.get_autocast_dtype(dev))
            elif w.dtype != h.dtype:
                w = w.to(h.dtype)
            return linear_cross_entropy(h, w, targets, reduction=reduction, chunk=chunk,
                                        impl=self.run_options.loss_impl), state
        if logits == "none":
            return None, state
        if logits == "last":
            h = h[:, -1:]  # [B, T, D] -> [B, 1, D]: the head only where generation reads it
        return F.linear(h, w).float(), state
