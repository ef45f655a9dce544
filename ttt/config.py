"""Typed model configuration and named presets (docs/math.md §7), and the execution options apart from it.

    cfg = get_config("125m", mixer="ttt_linear", backbone="mamba", vocab_size=32000)
    model = TTTLM(cfg, run=RunOptions(ttt_backend="triton"))

Presets size the model (layers, width, heads, FFN); the mixer picks the sequence layer. Baselines are
presets of the same LM class: `attention` (Transformer++) and `mamba` (Mamba-2 style, twice the
layers and no FFN, as Mamba stacks mixer-only blocks). `ModelConfig` says what the weights compute and goes
into checkpoints; `RunOptions` says how they run (backends, fused kernels) and never does, so a checkpoint
runs any way. Field help strings double as CLI help.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

MIXERS = ("ttt_linear", "ttt_mlp", "attention", "mamba")
BACKBONES = ("mamba", "transformer")
MAMBA_BACKENDS = ("auto", "torch", "mamba_ssm")
TTT_BACKENDS = ("auto", "naive", "dual", "triton")  # as ttt.ops.BACKENDS (this module imports no torch)
LOSS_IMPLS = ("auto", "torch", "triton")  # as ttt.layers.head.IMPLS


def help_field(default, help):
    """A dataclass field whose help text the CLI shows as its --option help."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RunOptions:
    """How a model runs, not what it computes: never stored in checkpoints (set at `TTTLM(cfg, run=...)` or
    with `model.set_run_options(...)`)."""

    ttt_backend: str = help_field("auto", "TTT op backend: auto, dual, naive, triton")
    fused_layer: bool | None = field(default=None, metadata=dict(
        help="run the Triton kernels around the TTT op (the (M) layer's causal convs + RoPE, the block pre-conv, the "
             "TTT-Linear decode step); --no-fused-layer runs the PyTorch layer path, --fused-layer insists (needs "
             "the op's triton backend)",
        default_text="auto: on where the op runs its triton backend on CUDA"))
    mlp_keep_weights: bool = help_field(False, "TTT-MLP training in the shared-memory kernels (Hopper, bf16/fp16): "
                                               "the forward keeps every mini-batch's inner weights for the backward, "
                                               "which then recomputes none: faster, and 4 x F x d bytes per head, layer "
                                               "and 16 tokens more memory (about 1.6 GB per layer at 125m, 4 x 8192 "
                                               "tokens); counted by the memory check")
    linear_gluon: bool = help_field(False, "TTT-Linear in the Gluon kernels (Hopper, head dim 64 or 128, mini-batch 16, "
                                           "bf16/fp16): the forward walk in Gluon too (the backward's three passes "
                                           "are Gluon by default there), the Gluon backward asked for "
                                           "explicitly: where the op runs its triton backend, other shapes are an "
                                           "error, not a fallback")
    loss_impl: str = help_field("auto", "the training loss head's cross-entropy: 'torch' (PyTorch over fp32 chunks "
                                        "of the logits), 'triton' (one kernel per chunk over the logits in the "
                                        "compute dtype; needs Triton) or 'auto' (triton on CUDA where Triton "
                                        "imports, else torch)")
    mamba_backend: str = help_field("auto", f"Mamba baseline scan: one of {MAMBA_BACKENDS}; 'torch' the chunked "
                                            "PyTorch reference, 'mamba_ssm' the Triton SSD kernels of the mamba-ssm "
                                            "package (pip install 'ttt-lm[mamba]'), 'auto' mamba_ssm on CUDA when it "
                                            "imports, else torch")

    def __post_init__(self):
        if self.ttt_backend not in TTT_BACKENDS:
            raise ValueError(f"ttt_backend: expected one of {TTT_BACKENDS}, got {self.ttt_backend!r}")
        for name in ("mlp_keep_weights", "linear_gluon"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if not isinstance(self.fused_layer, (bool, type(None))):
            raise ValueError(f"fused_layer: expected a bool or None (auto), got {self.fused_layer!r}")
        if self.loss_impl not in LOSS_IMPLS:
            raise ValueError(f"loss_impl: expected one of {LOSS_IMPLS}, got {self.loss_impl!r}")
        if self.mamba_backend not in MAMBA_BACKENDS:
            raise ValueError(f"mamba_backend: expected one of {MAMBA_BACKENDS}, got {self.mamba_backend!r}")


EXECUTION_FIELDS = tuple(f.name for f in dataclasses.fields(RunOptions))  # once ModelConfig fields, now RunOptions


def _moved(name: str) -> property:
    """ModelConfig.<name>, deprecated: the execution option moved to RunOptions. Reading gives the value set on
    this config (else the default); setting records it for `TTTLM(cfg)` without `run=` (never saved)."""
    def warn():
        warnings.warn(f"ModelConfig.{name} is deprecated: execution options are RunOptions, e.g. "
                      f"TTTLM(cfg, run=RunOptions({name}=...)); they are not saved in checkpoints",
                      DeprecationWarning, stacklevel=3)

    def get(self):
        warn()
        return getattr(self._legacy_run, name)

    def set(self, value):
        warn()
        object.__setattr__(self, "_legacy_run", dataclasses.replace(self._legacy_run, **{name: value}))
    return property(get, set)


@dataclass
class ModelConfig:
    vocab_size: int = help_field(32000, "vocabulary size (must match the tokenizer)")
    d_model: int = help_field(768, "model width D")
    n_layers: int = help_field(12, "number of blocks")
    n_heads: int = help_field(12, "heads of the sequence mixer (head dim = d_model / n_heads)")
    ffn_hidden: int = help_field(2048, "SwiGLU hidden width; 0 = no FFN sub-layer (the Mamba baseline)")
    mixer: str = help_field("ttt_linear", f"sequence mixer, one of {MIXERS}")
    backbone: str = help_field("mamba", "TTT block style: 'mamba' (M: extra conv, gated TTT) or 'transformer' (T)")
    mini_batch: int = help_field(16, "TTT inner-loop mini-batch size b")
    base_lr: float | None = help_field(None, "TTT inner learning rate base (default 1.0 linear, 0.1 mlp)")
    conv_width: int = help_field(4, "causal depthwise conv width")
    rope_base: float = help_field(10000.0, "RoPE base")
    norm_eps: float = help_field(1e-6, "RMSNorm epsilon")
    tie_embeddings: bool = help_field(True, "share input embedding and output head weights")
    ttt_learn_lr: bool = help_field(True, "TTT ablation: learnable inner learning rate (per-token gate and tau "
                                          "offsets); off = fixed eta = base_lr/d and tau_i = 1/i")
    ttt_learn_init: bool = help_field(True, "TTT ablation: learnable initial inner weights W0; off = W0 fixed at 0 "
                                            "(ttt_linear only)")
    ttt_inner_ln: bool = help_field(True, "TTT ablation: LayerNorm inside the inner model (off: the Triton "
                                          "kernels refuse, auto uses the dual form)")
    ttt_inner_residual: bool = help_field(True, "TTT ablation: residual inside the inner model, f(x) = x + LN(g(x)) "
                                                "(off: the Triton kernels refuse, auto uses the dual form)")
    mamba_d_state: int = help_field(64, "Mamba baseline: SSM state size per head")
    mamba_expand: int = help_field(2, "Mamba baseline: inner width = expand * d_model")
    mamba_head_dim: int = help_field(64, "Mamba baseline: head dim of the SSM")
    init_std: float = help_field(0.02, "std of the normal init of projections and embeddings")

    # deprecated: the execution options that were fields here (see `_moved`); `_legacy_run` holds what was set
    _legacy_run = RunOptions()
    ttt_backend = _moved("ttt_backend")
    fused_layer = _moved("fused_layer")
    mamba_backend = _moved("mamba_backend")

    def __post_init__(self):
        self.validate()

    def validate(self):
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer: expected one of {MIXERS}, got {self.mixer!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone: expected one of {BACKBONES}, got {self.backbone!r}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "mini_batch", "conv_width"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model: expected a multiple of n_heads={self.n_heads}, got {self.d_model}")
        if not self.ttt_learn_init and self.mixer == "ttt_mlp":
            raise ValueError("ttt_learn_init: False (W0 = 0) is for ttt_linear only: an MLP started at zero "
                             "never learns")
        if self.ffn_hidden < 0:
            raise ValueError(f"ffn_hidden: expected >= 0, got {self.ffn_hidden}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """The config of a dict of its fields; the execution options that older configs and checkpoints hold
        (EXECUTION_FIELDS) are ignored: they say how a run went, not what its weights compute."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - set(EXECUTION_FIELDS)
        if unknown:
            raise ValueError(f"config: unknown fields {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in names})


# name: (n_layers, d_model, n_heads, ffn_hidden); docs/math.md §7. "debug" is a CPU-test size.
SIZES = {
    "debug": (2, 64, 4, 128),
    "tiny": (4, 128, 4, 352),
    "125m": (12, 768, 12, 2048),
    "350m": (24, 1024, 16, 2736),
    "760m": (24, 1536, 16, 4096),
    "1.3b": (24, 2048, 32, 5504),
}
# training recipe per size (docs/math.md §7): peak LR, steps at 0.5M tokens per step
RECIPES = {"125m": (3e-3, 4800), "350m": (1.5e-3, 13500), "760m": (1.25e-3, 29000), "1.3b": (1e-3, 50000)}


def get_config(size: str = "125m", mixer: str = "ttt_linear", backbone: str = "mamba", **overrides) -> ModelConfig:
    """The named preset `size` with the given mixer. Mamba baselines get 2x layers and no FFN."""
    if size not in SIZES:
        raise ValueError(f"size: expected one of {tuple(SIZES)}, got {size!r}")
    n_layers, d_model, n_heads, ffn = SIZES[size]
    kw = dict(n_layers=n_layers, d_model=d_model, n_heads=n_heads, ffn_hidden=ffn, mixer=mixer, backbone=backbone)
    if mixer == "mamba":
        kw.update(n_layers=2 * n_layers, ffn_hidden=0, mamba_head_dim=min(64, d_model // 2))
    if mixer in ("attention", "mamba"):
        kw["backbone"] = "transformer"  # plain pre-norm residual blocks
    moved = {k: overrides.pop(k) for k in EXECUTION_FIELDS if k in overrides}
    kw.update(overrides)
    cfg = ModelConfig(**kw)
    if moved:  # deprecated: execution options as config fields
        warnings.warn(f"get_config({', '.join(f'{k}=...' for k in moved)}) is deprecated: execution options are "
                      f"RunOptions, e.g. TTTLM(cfg, run=RunOptions(...)); they are not saved in checkpoints",
                      DeprecationWarning, stacklevel=2)
        object.__setattr__(cfg, "_legacy_run", RunOptions(**moved))
    return cfg
