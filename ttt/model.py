"""The language model: token embedding, a stack of blocks, final RMSNorm, (tied) output head.

Blocks (SPEC section 6), with pre-RMSNorm residual sub-layers:
  backbone "mamba" (TTT mixers only):  h += conv(norm h);  h += TTT(norm h);  h += SwiGLU(norm h)
  backbone "transformer":              h += mixer(norm h); h += SwiGLU(norm h)   (no FFN if ffn_hidden=0)
The mixer is one of ttt_linear, ttt_mlp, attention (Transformer++ baseline) or mamba (Mamba-2 style
baseline). Every model streams: forward(ids, state) -> (logits, state), for chunked evaluation and
decoding; one token at a time is the decode step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .layers.attention import Attention
from .layers.conv import CausalConv1d
from .layers.head import linear_cross_entropy
from .layers.mamba import Mamba2
from .layers.norms import RMSNorm
from .layers.ttt import TTTLayer


LOGITS = ("all", "last", "none")


class SwiGLU(nn.Module):
    """FFN: (silu(x W_gate) * x W_up) W_down, no biases."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def make_mixer(cfg: ModelConfig) -> nn.Module:
    if cfg.mixer in ("ttt_linear", "ttt_mlp"):
        return TTTLayer(cfg.d_model, cfg.n_heads, inner=cfg.mixer[4:], backbone=cfg.backbone,
                        mini_batch=cfg.mini_batch, base_lr=cfg.base_lr, conv_width=cfg.conv_width,
                        rope_base=cfg.rope_base, backend=cfg.ttt_backend, learn_lr=cfg.ttt_learn_lr,
                        learn_init=cfg.ttt_learn_init, inner_ln=cfg.ttt_inner_ln, residual=cfg.ttt_inner_residual,
                        fused=cfg.fused_layer)
    if cfg.mixer == "attention":
        return Attention(cfg.d_model, cfg.n_heads, rope_base=cfg.rope_base)
    return Mamba2(cfg.d_model, d_state=cfg.mamba_d_state, expand=cfg.mamba_expand, head_dim=cfg.mamba_head_dim,
                  conv_width=cfg.conv_width, backend=cfg.mamba_backend)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.has_conv = cfg.backbone == "mamba" and cfg.mixer.startswith("ttt")
        if self.has_conv:
            self.conv_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.conv = CausalConv1d(cfg.d_model, cfg.conv_width, backend="triton" if cfg.fused_layer else "torch")
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = make_mixer(cfg)
        if cfg.ffn_hidden:
            self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def init_state(self, batch_size: int, device=None):
        conv = self.conv.init_state(batch_size, device) if self.has_conv else None
        return (conv, self.mixer.init_state(batch_size, device=device))

    def forward(self, h, state=None):
        conv_state, mixer_state = (None, None) if state is None else state
        if self.has_conv:
            y, conv_state = self.conv(self.conv_norm(h), conv_state)
            h = h + y
        y, mixer_state = self.mixer(self.mixer_norm(h), mixer_state)
        h = h + y
        if hasattr(self, "ffn"):
            h = h + self.ffn(self.ffn_norm(h))
        return h, (conv_state, mixer_state)


@dataclass
class LMState:
    """Per-block states ((conv window or None, mixer state) each) and the number of tokens consumed."""

    blocks: list
    pos: int = 0

    def detach(self) -> "LMState":
        def det(s):
            return None if s is None else (s.detach() if hasattr(s, "detach") else s)
        return LMState([(det(c), det(m)) for c, m in self.blocks], self.pos)


class TTTLM(nn.Module):
    """Language model over token ids.

    forward(ids [B, T], state=None) -> (logits [B, T, V] fp32, state); logits="last" gives [B, 1, V]
    (prefill before generation), "none" None (state only); targets=y gives (loss, state) through the
    chunked head, which never holds fp32 logits for every position (training, evaluation).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.grad_checkpointing = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Paper init: embeddings and projections N(0, init_std); each layer's own reset for the rest."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters") and not isinstance(m, (nn.Linear, nn.Embedding)):
                m.reset_parameters()
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.cfg.init_std)

    def init_state(self, batch_size: int, device=None) -> LMState:
        device = device or self.embed.weight.device
        return LMState([blk.init_state(batch_size, device) for blk in self.blocks], 0)

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are one parameter, counted once
        return n - self.embed.weight.numel() if exclude_embedding else n

    def hidden(self, ids: torch.Tensor, state: LMState | None = None):
        """ids [B, T] -> (final-normed hidden states [B, T, D], new state): everything but the head."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
            got = f"{ids.dtype} of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"ids: expected an integer tensor [B, T], got {got}")
        if ids.shape[1] == 0:
            raise ValueError("ids: expected a non-empty sequence (T >= 1), got T = 0")
        if state is not None and (not isinstance(state, LMState) or len(state.blocks) != len(self.blocks)):
            raise ValueError(f"state: expected an LMState of {len(self.blocks)} blocks from this model's init_state")
        B, T = ids.shape
        # a fresh start lets each block build its initial state inside its own forward (FSDP2
        # unshards a block's parameters only there)
        h = self.embed(ids)
        new_states = []
        pos = 0 if state is None else state.pos
        for blk, s in zip(self.blocks, [None] * len(self.blocks) if state is None else state.blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h, s = checkpoint(blk, h, s, use_reentrant=False)
            else:
                h, s = blk(h, s)
            new_states.append(s)
        return self.norm(h), LMState(new_states, pos + T)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.head is None else self.head.weight

    def forward(self, ids: torch.Tensor, state: LMState | None = None, *, logits: str = "all",
                targets: torch.Tensor | None = None, reduction: str = "mean", chunk: int = 8192):
        """ids [B, T] -> (logits, new state), or (loss, new state) when `targets` [B, T] is given: the
        next-token cross-entropy through the chunked head (`layers/head.py`), a scalar for reduction
        "mean"/"sum" or the per-token NLL [B, T] for "none", fp32 (fp64 for an fp64 model); at most
        `chunk` rows of logits exist at a time. Without targets, `logits` picks what the head computes:
        "all" [B, T, V], "last" [B, 1, V] (prefill before generation), "none" (None; state only)."""
        if logits not in LOGITS:
            raise ValueError(f"logits: expected one of {LOGITS}, got {logits!r}")
        if targets is not None and (not isinstance(targets, torch.Tensor) or targets.shape != ids.shape):
            got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise ValueError(f"targets: expected a tensor of the shape of ids {tuple(ids.shape)}, got {got}")
        h, state = self.hidden(ids, state)
        w = self.head_weight
        if targets is not None:
            dev = h.device.type
            if torch.is_autocast_enabled(dev):  # the head's products in the autocast dtype, as F.linear would
                h, w = h.to(torch.get_autocast_dtype(dev)), w.to(torch.get_autocast_dtype(dev))
            elif w.dtype != h.dtype:
                w = w.to(h.dtype)
            return linear_cross_entropy(h, w, targets, reduction=reduction, chunk=chunk), state
        if logits == "none":
            return None, state
        if logits == "last":
            h = h[:, -1:]  # [B, T, D] -> [B, 1, D]: the head only where generation reads it
        return F.linear(h, w).float(), state
