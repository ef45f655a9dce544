"""The memory one training step needs, estimated before training starts, and the memory a device has free.

    est = step_memory(model_cfg, torch.device("cpu"))   # probes one block (a few hundred tokens)
    est.total(micro_batch=8, seq_len=2048), est.parts(8, 2048)   # bytes, for any micro-batch and length
    available_memory(device)      # bytes: MemAvailable (and a cgroup limit) on a CPU, mem_get_info on CUDA
    fit_micro_batch(model_cfg, device, micro_batch=8, seq_len=2048, rows=256)   # what `ttt train` checks

Counted for one process (fp32 parameters, AdamW):
  - parameters, gradients and AdamW's two moments: 4 + 4 + 8 bytes per parameter;
  - activations: one block is built on the device and run forward on three small batches (PROBES) under
    the run's autocast; the bytes it saves for the backward (`saved_tensors_hooks`, each storage once,
    parameters excluded) give a part per token, per sequence and a fixed part, scaled to micro_batch x
    seq_len. All blocks keep theirs, and the backward of a block allocates about BACKWARD_BLOCKS blocks'
    worth more (GROWTH: the Mamba scan and TTT-MLP hold more). With grad_checkpointing each block keeps only
    its input and one block at a time is recomputed (CKPT_BLOCKS blocks' worth);
  - the head's chunked loss (`layers/head.py`): the gradient of the hidden states and of the output weight
    it keeps, and one chunk's logits: two fp32 [rows, V] buffers in PyTorch's chunk, one [rows, V] in the
    activations' dtype where the Triton row kernel runs (the run's `loss_impl` as it resolves on the device).
Whatever the model's size, the estimate costs three forwards of one block over at most 512 tokens.

Calibration (CPU, torch 2.13, vocabulary 4096): the peak RSS of two real training steps (`ttt.train.train`)
minus the RSS before them, against `step_memory(...).total`:

    model            micro_batch x seq_len   measured GB   estimate GB
    tiny ttt_linear      8 x 256                 0.398         0.463
    tiny ttt_mlp         8 x 256                 1.096         1.269
    tiny attention       8 x 256                 0.233         0.247
    tiny mamba           8 x 256                 0.622         0.682
    125m ttt_linear      1 x 2048                6.304         6.606
    125m attention       2 x 1024                3.294         3.578
    125m mamba           1 x 1024                5.690         5.806
    125m ttt_mlp         1 x 512                 6.532         6.767
    125m ttt_linear      2 x 512, grad_ckpt      2.564         2.655

(the saved bytes alone scale to the whole model within 5%: tests/test_first_hour.py; the estimates are from the
probes at 256 and 512 tokens, which every estimate stays above). On CUDA (bf16
autocast) the same probe runs on the GPU; the constants are the CPU's.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig, RunOptions

PROBES = ((1, 256), (1, 512), (2, 256))  # (sequences, tokens) of the probe forwards: whole TTT checkpoint groups
# (16 mini-batches of 16: what the TTT kernels save per group, or per mini-batch with mlp_keep_weights, grows with the
# tokens in steps of 256) and whole SSD chunks
PAD = 64  # tokens per chunk of the Mamba baseline's scan
HEAD_CHUNK = 8192  # rows of logits the head forms at a time (TTTLM.forward's default `chunk`)
# calibrated on measured peaks (module docstring): blocks' worth of activations the backward holds beyond the
# saved ones (with grad checkpointing: in all, for the block recomputed), and a margin on all activations
BACKWARD_BLOCKS, CKPT_BLOCKS, SLACK = 2, 6, 1.03
GROWTH = {"mamba": 1.3, "ttt_mlp": 1.1}  # blocks' worth one block takes in the backward, where not 1
GB = 1e9


@dataclass(frozen=True)
class StepMemory:
    """The estimate's ingredients for one model on one device; `parts(micro_batch, seq_len)` in bytes."""

    n_params: int
    d_model: int
    n_layers: int
    vocab_size: int
    block_fixed: float  # bytes one block saves for its backward, whatever the batch
    block_per_seq: float  # ... per sequence (e.g. a TTT layer's inner weights per sequence)
    block_per_token: float  # ... and per token
    growth: float = 1.0  # blocks' worth each block holds in the backward (GROWTH)
    autocast: bool = False
    grad_checkpointing: bool = False
    head_kernel: bool = False  # the loss head's Triton row kernel (one 16-bit/fp32 logits chunk, written over)

    def block_bytes(self, micro_batch: int, seq_len: int) -> float:
        """What one block saves for its backward at this size."""
        padded = micro_batch * -(-seq_len // PAD) * PAD  # the SSD scan pads to whole chunks
        return self.block_fixed + self.block_per_seq * micro_batch + self.block_per_token * padded

    def parts(self, micro_batch: int, seq_len: int) -> dict[str, int]:
        L, N, D, V = self.n_layers, micro_batch * seq_len, self.d_model, self.vocab_size
        act = 2 if self.autocast else 4  # bytes of an activation element
        block = self.block_bytes(micro_batch, seq_len)
        if self.grad_checkpointing:  # every block keeps its input; one block at a time is recomputed
            acts = L * N * D * act + CKPT_BLOCKS * block
        else:  # every block's saved tensors, and what the backward of one block allocates on top
            acts = (self.growth * L + BACKWARD_BLOCKS) * block
        # the head: the final norm's output, the gradient it keeps for it and for W, one chunk's logits + gradient
        # (the row kernel writes the gradient over the logits in their dtype; PyTorch's chunk keeps two fp32 copies)
        logits = min(N, HEAD_CHUNK) * V * (act if self.head_kernel else 2 * 4)
        head = N * D * (4 + act) + V * D * 4 + logits
        return {"parameters, gradients and AdamW state": 16 * self.n_params,
                "activations": round(SLACK * (acts + head))}

    def total(self, micro_batch: int, seq_len: int) -> int:
        return sum(self.parts(micro_batch, seq_len).values())


def _saved_bytes(block: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes `block(x)` saves for its backward: each storage once, the block's parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = block(x)[0]
    del y
    return sum(seen.values())


def _block_bytes(cfg: ModelConfig, device: torch.device, autocast: bool,
                 run: RunOptions = RunOptions()) -> tuple[float, float, float, int]:
    """(fixed bytes, bytes per sequence, bytes per token) one block run as `run` says saves for its backward, from
    the probe forwards, and the block's parameter count."""
    from .model import Block  # programs import the model, not the other way round

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        block = Block(cfg, run)
        sizes = []
        for B, T in PROBES:
            x = torch.randn(B, T, cfg.d_model, device=device, requires_grad=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                sizes.append(_saved_bytes(block, x))
    n_params = sum(p.numel() for p in block.parameters())
    del block
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what the probe took goes back to the free memory the check reads
    ((_, t1), (_, t2), _), (s1, s2, s3) = PROBES, sizes
    per_token = max(0.0, (s2 - s1) / (t2 - t1))
    per_seq = max(0.0, s3 - s1 - per_token * t1)
    return max(0.0, s1 - per_seq - per_token * t1), per_seq, per_token, n_params


def step_memory(cfg: ModelConfig, device: torch.device, *, autocast: bool = False,
                grad_checkpointing: bool = False, run: RunOptions = RunOptions()) -> StepMemory:
    """The estimate of the module docstring for one process on `device` (autocast: bf16 autocast; run: how the
    model runs, e.g. `mlp_keep_weights`, which saves more)."""
    fixed, per_seq, per_token, block_params = _block_bytes(cfg, device, autocast, run)
    D, V = cfg.d_model, cfg.vocab_size  # + embedding (and an untied head) and the final norm: TTTLM's parameters
    n_params = cfg.n_layers * block_params + V * D * (1 if cfg.tie_embeddings else 2) + D
    from .layers.head import resolve_impl
    head_dtype = torch.bfloat16 if autocast else torch.float32  # the head's input
    kernel = resolve_impl(run.loss_impl, device, head_dtype) == "triton"
    return StepMemory(n_params, cfg.d_model, cfg.n_layers, cfg.vocab_size, fixed, per_seq, per_token,
                      GROWTH.get(cfg.mixer, 1.0), autocast, grad_checkpointing, kernel)


def _cgroup_free() -> int | None:
    """What the cgroup (v2 or v1) of this process still allows, when it has a limit."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            lim = Path(limit).read_text().strip()
            if lim == "max" or int(lim) >= 1 << 60:
                return None
            return int(lim) - int(Path(usage).read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a new allocation on `device` now, or None when unknown (another OS, another device)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    if device.type != "cpu":
        return None
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if avail is None and hasattr(os, "sysconf"):
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return None
    cg = _cgroup_free()
    return avail if cg is None or avail is None else min(avail, cg)


def fit_micro_batch(cfg: ModelConfig, device: torch.device, *, micro_batch: int, seq_len: int, rows: int,
                    autocast: bool = False, grad_checkpointing: bool = False, pick: bool = False,
                    run: RunOptions = RunOptions()) -> int:
    """micro_batch when a step of it fits the free memory of `device` (or that is unknown here). Otherwise,
    with `pick`, the largest divisor of `rows` (sequences per optimizer step) that fits; without, or when
    none fits, a ValueError naming what does: a smaller micro_batch (the same run), grad_checkpointing,
    a shorter seq_len (another run) or a smaller model."""
    room = available_memory(device)
    if room is None:
        return micro_batch
    est = step_memory(cfg, device, autocast=autocast, grad_checkpointing=grad_checkpointing, run=run)
    need = est.total(micro_batch, seq_len)
    if need <= room:
        return micro_batch
    divisors = [m for m in range(micro_batch - 1, 0, -1) if rows % m == 0]
    smaller = next((m for m in divisors if est.total(m, seq_len) <= room), None)
    if pick and smaller:
        return smaller
    parts = ", ".join(f"{k} {v / GB:.1f}" for k, v in est.parts(micro_batch, seq_len).items())
    what = (f"micro_batch: a training step at micro_batch={micro_batch} x seq_len={seq_len} needs about "
            f"{need / GB:.1f} GB ({parts}), more than the {room / GB:.1f} GB free on {device.type}")
    if smaller:
        raise ValueError(f"{what}; micro_batch={smaller} fits (the same run, with more gradient accumulation)")
    ckpt = dataclasses.replace(est, grad_checkpointing=True)
    m = None if grad_checkpointing else next((m for m in (micro_batch, *divisors) if ckpt.total(m, seq_len) <= room),
                                             None)
    if m:
        raise ValueError(f"{what}; grad_checkpointing=True with micro_batch={m} fits (the same run, slower)")
    lens = [seq_len >> k for k in range(1, 16) if (seq_len >> k) >= 16 and (rows * seq_len) % (seq_len >> k) == 0]
    t = next((t for t in lens if est.total(1, t) <= room), None)
    if t:
        raise ValueError(f"{what}; seq_len={t} with micro_batch=1 fits (another run), or a smaller model")
    raise ValueError(f"{what}; not even micro_batch=1 at a short seq_len fits: choose a smaller model")
