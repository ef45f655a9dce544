"""The training loop: one loop for 1 CPU, 1 GPU and torchrun (DDP or FSDP2, applied by ttt.dist).

    summary = train(get_config("125m", vocab_size=8192), TrainConfig(data_dir="data", out_dir="runs/125m"))
    torchrun --nproc_per_node 8 -m ttt.cli train ...       # the same loop on 8 GPUs

Recipe (docs/math.md §7, the paper's): AdamW (beta1 0.9, beta2 0.95), weight decay 0.1, gradient
clipping at 1.0, linear warm-up over the first warmup_frac of the steps, then cosine decay to min_lr.
TTT-MLP layers also ramp their inner base_lr from 0.01 over the warm-up (`inner_lr_warmup`,
applied through `TTTLM.set_inner_lr_warmup`).
The defaults are the 125m recipe (peak lr 3e-3, 4800 steps of 0.5M tokens); `ttt.config.RECIPES`
has the others.

Weight decay applies to matrices only: every parameter with two or more dims (projections, the
(tied) embedding, conv kernels, the TTT inner initial weights W1/W2 and the inner learning-rate gate
projection lr_weight), except the TTT inner biases b1/b2 and the per-head inner LayerNorm
ln_weight/ln_bias, which are [H, d] but are biases and norm parameters. No decay on anything 1-D:
norm scales and biases, biases, the TTT gate bias lr_bias and tau offsets delta, Mamba's A_log, D
and dt_bias.

Batches: every optimizer step uses tokens_per_step / seq_len windows drawn by ttt.data.Batcher from
(seed, step); rank r takes its share of rows and splits it into micro-batches (gradient accumulation
= tokens_per_step / (micro_batch * seq_len * world_size)). So the step's batch does not depend on the
number of processes or on micro_batch, and a resumed run sees the batches the uninterrupted one would.
With pack_documents, ttt.data.DocumentBatcher packs whole documents into the rows instead (docs/packed.md),
and each micro-batch runs as one packed sequence of micro_batch * seq_len tokens whose documents each start
from a fresh state (cu_seqlens); the validation windows stay as they are.

The model is built on the meta device, sharded there (FSDP2, see ttt.dist), materialised on the
device and initialised from `seed` (the same values in any process count), then wrapped (DDP).
The loop is a few named steps: _forward_backward, _optimizer_step, _after_step (read, evaluate, log,
save, stop). The loss and gradient norm stay on the device until a metrics row, an evaluation, a save
or on_step needs them, so a GPU is not made to wait every step.

out_dir holds config.json (the run), metrics.jsonl and metrics.csv (one row every log_every steps,
at every evaluation and at the last step), checkpoints (see ttt.checkpoint) and tensorboard/.
resume=True continues the run found in out_dir from its latest checkpoint (latest.json's; when that
one is missing or does not read back whole, the newest one that does, with a warning); an out_dir
holding another run (another model, data, vocabulary or recipe) is refused and left untouched. An
out_dir holding a start that wrote no checkpoint (killed, or aborted by a second Ctrl-C) cannot be
continued: its config and metrics are moved to out_dir/failed_starts/<time>/ and the run starts over.

Extending a run: resuming with another max_steps (at least the checkpoint's step) changes the step
budget. The steps already taken keep the learning rates they had; from the resumed step on, the rate
is that of the new budget's schedule (`lr_at` with the new max_steps: warm-up and cosine over the new
length), so a run extended from 20 to 40 steps continues at lr_at(20) of a 40-step run. config.json
records each change under "budget_changes", and metrics.jsonl stays one history.

Before building anything, one process checks that a step fits in the device's free memory
(`ttt.memory`; check_memory=False skips it). A token id outside the vocabulary in a batch (a damaged
train.bin) is a ValueError naming the file. A loss that is not finite raises TrainingDiverged (a
ValueError); a run that fails before its first checkpoint removes what it wrote, so nothing blocks the
corrected rerun. SIGINT / SIGTERM (or on_step returning True) save a checkpoint and return: in one
process between micro-batches (the unfinished step is dropped and done again on resume), with several
processes at the end of the step at which the ranks next agree; a second Ctrl-C aborts at once and
leaves what was written (an interrupt never deletes anything).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import importlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import dist
from .checkpoint import (CONFIG_FILE, CKPT_DIR, LATEST, check_weights, compare_runs, decode_bytes, encode_bytes,
                         latest_checkpoint, read_checkpoint, read_json, save_checkpoint, write_json, write_text)
from .config import ModelConfig, RunOptions, help_field
from .data import Batcher, DocumentBatcher, eval_sequences, load_meta, load_tokens, pack_rows
from .model import TTTLM, inner_lr_scale
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

METRIC_FIELDS = ("step", "tokens", "loss", "lr", "tokens_per_s", "grad_norm", "val_loss")
# the TrainConfig fields that define a run (change the trajectory); the others may change on resume
RUN_FIELDS = ("seq_len", "tokens_per_step", "max_steps", "lr", "min_lr", "warmup_frac", "weight_decay", "beta1",
              "beta2", "grad_clip", "seed", "inner_lr_warmup")
# run fields recorded only when not at their default, so that runs from before they existed still resume
OPTIONAL_RUN_FIELDS = {"pack_documents": False}
DEVICES, AMPS = ("auto", "cpu", "cuda"), ("auto", "bf16", "none")
COMPILE_MODES = ("auto", "default", "reduce-overhead")
# the mixers whose blocks compile_mode auto replays as CUDA graphs: those whose graphs' runs a GPU test compares with the
# default compile, and that were timed in both (TTT-Linear faster, Transformer++ the same; docs/training.md)
GRAPHED_MIXERS = ("ttt_linear", "attention")


@dataclass
class TrainConfig:
    data_dir: str = help_field("data", "dataset prepared by ttt.data.prepare "
                                       "(train.bin, val.bin, meta.json, tokenizer.json)")
    out_dir: str = help_field("runs/ttt", "run directory: config, metrics, checkpoints")
    seq_len: int = help_field(2048, "training context length T")
    micro_batch: int = help_field(8, "sequences per device per forward/backward")
    tokens_per_step: int = help_field(524288, "global tokens per optimizer step; a multiple of "
                                              "micro_batch*seq_len*world_size "
                                              "(the quotient is the gradient accumulation)")
    max_steps: int = help_field(4800, "optimizer steps in the run (also the length of the LR schedule); another value "
                                      "when resuming changes the budget: the LR follows the new schedule from there")
    lr: float = help_field(3e-3, "peak learning rate (after warm-up)")
    min_lr: float = help_field(1e-5, "learning rate at the end of the cosine decay")
    warmup_frac: float = help_field(0.1, "fraction of max_steps spent in linear warm-up")
    weight_decay: float = help_field(0.1, "AdamW weight decay (matrices only; see ttt.train)")
    beta1: float = help_field(0.9, "AdamW beta1")
    beta2: float = help_field(0.95, "AdamW beta2")
    grad_clip: float = help_field(1.0, "clip the global gradient norm to this (0 = no clipping)")
    inner_lr_warmup: bool = help_field(True, "TTT-MLP: ramp the inner base_lr linearly from 0.01 to its value over the "
                                     "warm-up, as the paper's recipe does (TTT-Linear keeps its base_lr)")
    eval_every: int = help_field(250, "validate on val.bin every this many steps and at the end (0 = never)")
    eval_batches: int = help_field(20, "validation batches (of micro_batch sequences per device)")
    save_every: int = help_field(500, "checkpoint every this many steps (0 = only at the end or when stopped)")
    keep_checkpoints: int = help_field(2, "keep the newest this many checkpoints (0 = keep all)")
    log_every: int = help_field(10, "write a metrics row every this many steps")
    seed: int = help_field(0, "seed of the model init and of the batch draws")
    pack_documents: bool = help_field(False, "pack whole documents (found at EOS) into each sequence, every one "
                                             "starting from a fresh state, instead of windows across documents; "
                                             "no loss predicts a document's first token from the document before; "
                                             "a document longer than seq_len is cut into seq_len pieces")
    device: str = help_field("auto", f"one of {DEVICES}; auto = cuda when available")
    amp: str = help_field("auto", f"one of {AMPS}; auto = bf16 autocast on CUDA, none on CPU")
    compile: bool = help_field(False, "torch.compile each block")
    compile_mode: str = help_field("auto", f"one of {COMPILE_MODES}: torch.compile's mode for the blocks (with "
                                           "compile); reduce-overhead replays each block's forward and backward as "
                                           "CUDA graphs (less host time per step; one process on CUDA, without "
                                           "pack_documents or grad_checkpointing); auto = reduce-overhead where it "
                                           f"can run and the mixer is one of {GRAPHED_MIXERS}, else default")
    fsdp_reshard: bool = help_field(True, "parallel=fsdp: free each block's gathered parameters after its forward "
                                          "(less memory; off keeps them for the backward: one all-gather less)")
    grad_checkpointing: bool = help_field(False, "recompute each block in the backward pass (less memory)")
    parallel: str = help_field("auto", f"one of {dist.PARALLEL}; auto = ddp with several processes (torchrun), "
                                       "else none")
    tensorboard: bool = help_field(False, "also log to out_dir/tensorboard (needs the tensorboard package)")
    resume: bool = help_field(True, "continue the run in out_dir from its latest checkpoint (same config required)")
    progress: bool = help_field(True, "show a progress bar (loss, tokens/s, lr, ETA) on stderr")
    profile_steps: int = help_field(0, "trace this many optimizer steps with the PyTorch profiler, starting after the "
                                       "first log_every steps of this start (compilation, warm-up): every process "
                                       "writes out_dir/profile/trace_rank<R>.json (Chrome trace: CPU ops, GPU kernels, "
                                       "NCCL) and kernels_rank<R>.txt (the top kernels by GPU time); 0 = off")
    check_memory: bool = help_field(True, "before starting, estimate the memory of one step (parameters, gradients, "
                                          "AdamW state, activations) and refuse one that does not fit the device's "
                                          "free memory (one process only)")
    init_from: str | None = help_field(None, "fine-tune: start from the weights of this run or checkpoint dir "
                                             "(e.g. from `ttt convert`), with a fresh optimizer and schedule; the "
                                             "model config is that run's")

    def validate(self) -> None:
        for name in ("seq_len", "micro_batch", "tokens_per_step", "max_steps", "eval_batches", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        for name in ("eval_every", "save_every", "keep_checkpoints", "seed", "profile_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr: expected a positive float, got {self.lr!r}")
        if not (isinstance(self.min_lr, (int, float)) and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"min_lr: expected a float in [0, lr={self.lr}], got {self.min_lr!r}")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"warmup_frac: expected a float in [0, 1), got {self.warmup_frac!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a float in [0, 1), got {getattr(self, name)!r}")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected a float >= 0, got {getattr(self, name)!r}")
        for name, allowed in (("device", DEVICES), ("amp", AMPS), ("parallel", dist.PARALLEL),
                              ("compile_mode", COMPILE_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        if self.compile_mode == "reduce-overhead":
            clashes = (("needs compile", not self.compile),
                       ("is not for pack_documents (a new graph per batch's document lengths)", self.pack_documents),
                       ("is not for grad_checkpointing", self.grad_checkpointing),
                       ("needs CUDA, got device cpu", self.device == "cpu"),
                       (f"runs in one process, got parallel {self.parallel}", self.parallel in ("ddp", "fsdp")))
            for why, on in clashes:
                if on:
                    raise ValueError(f"compile_mode: reduce-overhead {why}")


def resolve_compile_mode(cfg: TrainConfig, mixer: str, parallel: str, device: torch.device) -> str:
    """The blocks' torch.compile mode, "default" or "reduce-overhead": cfg.compile_mode, auto resolved to
    reduce-overhead where it can run (compile, one process on CUDA, windows of the data, no grad_checkpointing) and
    the mixer is one of GRAPHED_MIXERS, else default."""
    if cfg.compile_mode != "auto":
        return cfg.compile_mode
    graphs = (cfg.compile and device.type == "cuda" and parallel == "none" and not cfg.pack_documents
              and not cfg.grad_checkpointing and mixer in GRAPHED_MIXERS)
    return "reduce-overhead" if graphs else "default"


def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    """tokens_per_step / (micro_batch * seq_len * world_size); ValueError unless it divides."""
    per = cfg.micro_batch * cfg.seq_len * world_size
    if cfg.tokens_per_step % per:
        raise ValueError(f"tokens_per_step: expected a multiple of micro_batch*seq_len*world_size = "
                         f"{cfg.micro_batch}*{cfg.seq_len}*{world_size} = {per}, got {cfg.tokens_per_step}")
    return cfg.tokens_per_step // per


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up to cfg.lr over
    int(warmup_frac * max_steps) steps, then cosine from cfg.lr down to min_lr at the last step."""
    warm = int(cfg.warmup_frac * cfg.max_steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    p = min(1.0, (step - warm) / max(1, cfg.max_steps - warm - 1))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


def inner_lr_scale_at(step: int, cfg: TrainConfig, base_lr: float) -> float:
    """The TTT-MLP inner learning-rate ramp at optimizer step `step` (0-based), as a factor on base_lr:
    from 0.01 at step 0 linearly to base_lr at the end of the warm-up, then 1 (`TTTLM.set_inner_lr_warmup`)."""
    warm = int(cfg.warmup_frac * cfg.max_steps)
    return inner_lr_scale(step / warm if cfg.inner_lr_warmup and step < warm else 1.0, base_lr)


def decays(name: str, p: torch.Tensor) -> bool:
    """Whether parameter `name` gets weight decay (see the module docstring)."""
    leaf = name.rsplit(".", 1)[-1]
    return p.ndim >= 2 and not (leaf.endswith("bias") or leaf.startswith("ln_") or re.fullmatch(r"b\d+", leaf))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but torch.cuda.is_available() is False; use 'cpu' or 'auto'")
    return torch.device(name)


class _StopRequests:
    """While active: SIGINT/SIGTERM set `reason` instead of killing the process (main thread only);
    a second SIGINT raises KeyboardInterrupt. The previous handlers come back on exit."""

    def __init__(self):
        self.reason: str | None = None
        self._old: dict = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = name
        log.warning("%s: finishing this step, saving a checkpoint, then stopping (Ctrl-C again aborts)", name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


class _Metrics:
    """metrics.jsonl + metrics.csv (+ tensorboard) of rank 0. On resume, rows after the checkpoint's
    step are dropped, so the files hold exactly one curve."""

    def __init__(self, out: Path, keep_until: int, tensorboard: bool):
        jl = out / "metrics.jsonl"
        rows = []
        if keep_until > 0 and jl.exists():
            for line in jl.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:  # a line cut short by a crash: it is after the checkpoint anyway
                    continue
                if row["step"] <= keep_until:
                    rows.append(row)
        self.rows = rows
        self._jsonl = open(jl, "w")
        self._csv_fh = open(out / "metrics.csv", "w", newline="")
        self._csv = csv.DictWriter(self._csv_fh, fieldnames=METRIC_FIELDS, restval="")
        self._csv.writeheader()
        for r in rows:
            self._write(r)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(out / "tensorboard"), purge_step=keep_until + 1)

    def _write(self, row: dict) -> None:
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        self._csv.writerow({k: row.get(k) for k in METRIC_FIELDS})
        self._csv_fh.flush()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self._write(row)
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and v is not None:
                    self._tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self._jsonl.close()
        self._csv_fh.close()
        if self._tb is not None:
            self._tb.close()


def init_model_config(init_from: str, data_vocab: int) -> ModelConfig:
    """The model config of `init_from` (a run or checkpoint dir) for fine-tuning; ValueError when the data's
    vocabulary does not fit it."""
    from .checkpoint import model_config

    src = read_checkpoint(init_from, optimizer=False)
    cfg = model_config(src)
    if data_vocab != cfg.vocab_size:
        raise ValueError(f"init_from: the model of {init_from!r} has vocab_size {cfg.vocab_size}, the dataset's "
                         f"tokenizer {data_vocab}; prepare the data with that model's tokenizer (ttt data --tokenizer)")
    return cfg


def _run_config(model_cfg: ModelConfig, cfg: TrainConfig, meta: dict) -> dict:
    """The content of config.json: what identifies the run, plus the full train config for reference."""
    return {"format": 1, "model_type": "ttt_lm", "model": model_cfg.to_dict(), "vocab_size": meta["vocab_size"],
            "data": {"fingerprint": meta.get("fingerprint"), "vocab_size": meta["vocab_size"]},
            "run": {**{k: getattr(cfg, k) for k in RUN_FIELDS},
                    **{k: getattr(cfg, k) for k, default in OPTIONAL_RUN_FIELDS.items() if getattr(cfg, k) != default}},
            "train": dataclasses.asdict(cfg)}


def _checkpoint_dirs(out: Path) -> list[Path]:
    """out/checkpoints/step_* directories, newest first."""
    return sorted((p for p in (out / CKPT_DIR).glob("step_*") if p.is_dir()), reverse=True)


def _check_out_dir(out: Path, run_cfg: dict, resume: bool) -> tuple[list[Path], str | None, bool]:
    """Refuse an out_dir of another run (or this run with resume=False), without changing anything.
    Returns (the checkpoints to resume from, latest.json's first, then the others newest first; why
    latest.json cannot be followed, or None; whether out_dir holds a start that wrote no checkpoint)."""
    cfg_path = out / CONFIG_FILE
    found = _checkpoint_dirs(out)
    if cfg_path.exists():
        if not found:  # killed or aborted before its first checkpoint: nothing to continue, start over
            return [], None, True
        diffs = compare_runs(read_json(cfg_path), run_cfg)
        if resume:  # another step budget extends (or shortens) the run; see the module docstring
            diffs = [d for d in diffs if not d.startswith("train.max_steps:")]
        if diffs:
            raise ValueError(f"out_dir: {str(out)!r} holds another run ({cfg_path} differs: {'; '.join(diffs)}); "
                             f"nothing was changed. Use another out_dir, or delete this one to start over")
        if not resume:
            raise ValueError(f"out_dir: {str(out)!r} already holds this run and resume=False; nothing was changed. "
                             f"Pass resume=True to continue it, or use another out_dir")
        first, problem = None, None
        if (out / LATEST).exists():
            try:
                first = latest_checkpoint(out)
                at = int(read_json(out / LATEST).get("step", 0))
            except (ValueError, TypeError) as e:
                problem = " ".join(str(e).split())
            else:
                if run_cfg["run"]["max_steps"] < at:
                    raise ValueError(f"max_steps: the run in {str(out)!r} is at step {at}; expected max_steps >= "
                                     f"{at} to continue it, got {run_cfg['run']['max_steps']}; nothing was changed")
        else:
            problem = f"{out / LATEST} is missing"
        return ([first] if first else []) + [p for p in found if p != first], problem, False
    leftovers = [n for n in (LATEST, CKPT_DIR, "metrics.jsonl", "metrics.csv") if (out / n).exists()]
    if leftovers:
        raise ValueError(f"out_dir: {str(out)!r} holds {leftovers} but no {CONFIG_FILE} (not a run of this trainer, "
                         f"or a damaged one); nothing was changed. Use another out_dir")
    return [], None, False


def _set_aside_failed_start(out: Path) -> None:
    """Move the files of a start that wrote no checkpoint to out/failed_starts/<time>/ (nothing is deleted)."""
    names = [n for n in (CONFIG_FILE, LATEST, "metrics.jsonl", "metrics.csv", "tensorboard", CKPT_DIR)
             if (out / n).exists()]
    dest = out / "failed_starts" / time.strftime("%Y%m%d-%H%M%S")
    while dest.exists():
        dest = dest.with_name(dest.name + "+")
    dest.mkdir(parents=True)
    for n in names:
        os.replace(out / n, dest / n)
    rows = 0
    if (dest / "metrics.jsonl").exists():
        rows = sum(1 for line in (dest / "metrics.jsonl").read_text().splitlines() if line.strip())
    log.warning("%s held a start that wrote no checkpoint (%d metrics rows): moved to %s; starting the run over",
                out, rows, dest)


def _read_resume_checkpoint(out: Path, candidates: list[Path], problem: str | None, run_cfg: dict):
    """(the first of `candidates` that reads back whole and belongs to this run, whether it is not the one
    latest.json names: said in a warning); ValueError when none does."""
    for path in candidates:
        try:
            ckpt = read_checkpoint(path)
        except (ValueError, OSError) as e:
            problem = " ".join(str(e).split())
            log.warning("%s: skipped (%s)", path, problem)
            continue
        diffs = [d for d in compare_runs(ckpt.config, run_cfg) if not d.startswith("train.max_steps:")]
        if diffs:
            raise ValueError(f"{ckpt.path / CONFIG_FILE}: checkpoint from another run: {'; '.join(diffs)}")
        if problem:
            log.warning("%s; resuming from the newest valid checkpoint, %s", problem, path)
        return ckpt, bool(problem)
    raise ValueError(f"out_dir: {str(out)!r}: none of its checkpoints ({', '.join(p.name for p in candidates)}) "
                     f"reads back whole ({problem}); nothing was changed")


class TrainingDiverged(ValueError):
    """The training loss became NaN or infinite (a ValueError: the CLI reports it in one line, exit 2)."""


def _check_configs(model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    model_cfg.validate()
    cfg.validate()
    if cfg.tensorboard:
        try:
            importlib.import_module("torch.utils.tensorboard")  # a plain import here would shadow `torch`
        except ImportError as e:
            raise ImportError("tensorboard=True needs the tensorboard package: pip install tensorboard "
                              "(or pip install 'ttt-lm[tensorboard]'), or pass tensorboard=False") from e


def _check_data(model_cfg: ModelConfig, cfg: TrainConfig, world: int) -> dict:
    """The dataset's meta.json, after checking the step's divisibility, the vocabulary and that each shard
    has the size meta.json records (a replaced or cut shard is refused before training)."""
    grad_accum_steps(cfg, world)
    data_dir = Path(cfg.data_dir)
    meta = load_meta(data_dir)
    if model_cfg.vocab_size != meta["vocab_size"]:
        raise ValueError(f"vocab_size: the model config has vocab_size={model_cfg.vocab_size}, the data's tokenizer "
                         f"({data_dir / 'tokenizer.json'}) has {meta['vocab_size']}; they must be equal")
    if cfg.pack_documents and "eos_id" not in meta:
        raise ValueError(f"pack_documents: {data_dir / 'meta.json'} records no eos_id to find the documents by; "
                         f"prepare the data again with `ttt data`")
    for name in ("train", "val"):
        path, count = data_dir / f"{name}.bin", meta.get(f"{name}_tokens")
        if path.is_file() and isinstance(count, int) and isinstance(meta.get("dtype"), str):
            want = count * np.dtype(meta["dtype"]).itemsize
            if path.stat().st_size != want:
                raise ValueError(f"{path}: {path.stat().st_size} bytes, but meta.json records {count} {meta['dtype']} "
                                 f"tokens ({want} bytes): the file was changed or damaged; prepare the dataset again")
    return meta


def _check_ids(ids: torch.Tensor, vocab_size: int, where: Path) -> None:
    """ValueError naming `where` when a token id of `ids` is outside the vocabulary (a damaged shard)."""
    top = int(ids.max()) if ids.numel() else 0
    if top >= vocab_size:
        raise ValueError(f"{where}: token id {top} is outside the vocabulary ({vocab_size} ids): the file is damaged "
                         f"or not of this dataset; prepare the dataset again")


def _check_memory(model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device, pick: bool = False,
                  run: RunOptions | None = None) -> int:
    """The micro-batch to use: cfg.micro_batch when a step (the model run as `run` says) fits the device's free
    memory; with `pick`, the largest one that fits; else a ValueError naming the sizes that fit
    (`ttt.memory.fit_micro_batch`)."""
    from .memory import fit_micro_batch

    return fit_micro_batch(model_cfg, device, micro_batch=cfg.micro_batch, seq_len=cfg.seq_len,
                           rows=cfg.tokens_per_step // cfg.seq_len, autocast=_amp(cfg, device) == "bf16",
                           grad_checkpointing=cfg.grad_checkpointing, pick=pick, run=run or RunOptions())


def preflight(model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device, *, pick_micro_batch: bool = False,
              run: RunOptions | None = None) -> int:
    """What `train` checks before it writes or builds anything, for a caller that wants errors before its own
    output: the configs, the data, out_dir and (one process, check_memory) whether a step fits in memory (the
    model run as `run` says). Returns the micro-batch to use: cfg.micro_batch, or with pick_micro_batch the largest
    that fits."""
    _check_configs(model_cfg, cfg)
    world = dist.world_size() if dist.is_distributed() else dist.launched_world_size()
    meta = _check_data(model_cfg, cfg, world)
    _check_out_dir(Path(cfg.out_dir), _run_config(model_cfg, cfg, meta), cfg.resume)
    if cfg.check_memory and world == 1:
        return _check_memory(model_cfg, cfg, device, pick_micro_batch, run)
    return cfg.micro_batch


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, *,
          on_step: Callable[[int, dict], bool | None] | None = None, run: RunOptions | None = None) -> dict:
    """Train (or continue training) `model_cfg` with `train_cfg`; see the module docstring. run: how the model
    runs (backends, fused kernels; None: the defaults); not part of the run's identity, so a resume may change it.

    on_step(step, metrics) is called on every rank after every optimizer step (metrics: step,
    tokens, loss, lr, grad_norm, val_loss when evaluated); returning True stops the run like SIGINT.
    Returns {"steps", "tokens", "train_loss", "val_loss", "tokens_per_s", "out_dir", "checkpoint",
    "stopped" (None, "SIGINT", "SIGTERM" or "on_step"), "resumed_from" (a step or None)}.
    Raises TrainingDiverged when the loss is not finite (nothing is saved after the last finite step).
    """
    if not isinstance(model_cfg, ModelConfig):
        raise ValueError(f"model_cfg: expected a ModelConfig, got {type(model_cfg).__name__}")
    if not isinstance(train_cfg, TrainConfig):
        raise ValueError(f"train_cfg: expected a TrainConfig, got {type(train_cfg).__name__}")
    _check_configs(model_cfg, train_cfg)
    device = resolve_device(train_cfg.device)
    info = dist.init_distributed(device.type)
    try:
        if device.type == "cuda":
            device = torch.device("cuda", info.local_rank if info.world_size > 1 else torch.cuda.current_device())
        return _train(model_cfg, train_cfg, device, on_step, run)
    finally:
        dist.shutdown(info)


@dataclass
class _Loop:
    """What the named steps of the loop share."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    rank: int
    world: int
    accum: int
    model: TTTLM  # unwrapped (FSDP2: sharded in place)
    wrapped: torch.nn.Module  # what the forward goes through (DDP wrapper, or the model)
    optim: torch.optim.Optimizer
    batcher: Batcher
    run_cfg: dict
    autocast: Callable
    val: tuple | None
    metrics: _Metrics | None
    step: int
    saved_step: int | None  # the step of the newest checkpoint of this run (None: none yet)
    pending: list = dataclasses.field(default_factory=list)  # (step, lr, loss, grad_norm) not yet read
    last_read: list = dataclasses.field(default_factory=list)  # (step, lr, loss, grad_norm) read last
    last_path: str | None = None
    tokenizer: object | None = None  # the data's Tokenizer, saved into every checkpoint
    train_loss: float | None = None
    val_loss: float | None = None
    t_log: float = 0.0
    step_log: int = 0


def build_model(model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device, parallel: str,
                run: RunOptions | None = None):
    """(model, wrapped): built on the meta device, FSDP2-sharded there (parallel='fsdp'), materialised on
    `device` and initialised from cfg.seed (the same values as one process), then DDP-wrapped
    (parallel='ddp'). `model` is the (sharded) model itself, `wrapped` what the forward goes through."""
    with torch.device("meta"):
        model = TTTLM(model_cfg, run)
    model.grad_checkpointing = cfg.grad_checkpointing
    if cfg.compile:
        mode = resolve_compile_mode(cfg, model_cfg.mixer, parallel, device)
        for blk in model.blocks:
            blk.compile(mode=None if mode == "default" else mode)
    amp = _amp(cfg, device)
    if parallel == "fsdp":
        dist.parallelize(model, parallel, device, param_dtype=torch.bfloat16 if amp == "bf16" else None,
                         reshard_after_forward=cfg.fsdp_reshard)
    model.to_empty(device=device)
    torch.manual_seed(cfg.seed)
    model.init_weights()
    wrapped = dist.parallelize(model, parallel, device) if parallel == "ddp" else model
    return model, wrapped


def _amp(cfg: TrainConfig, device: torch.device) -> str:
    return cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "none")


def _setup(model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device,
           run: RunOptions | None = None) -> tuple[_Loop, Path | None, bool]:
    """Check the data and out_dir, build the model and optimizer, restore a checkpoint; (loop, the
    checkpoint resumed from, whether this call created config.json)."""
    rank, world = dist.rank(), dist.world_size()
    data_dir, out = Path(cfg.data_dir), Path(cfg.out_dir)
    meta = _check_data(model_cfg, cfg, world)
    accum = grad_accum_steps(cfg, world)
    if cfg.pack_documents:
        batcher = DocumentBatcher(load_tokens(data_dir / "train.bin"), meta["eos_id"], cfg.micro_batch * accum,
                                  cfg.seq_len, seed=cfg.seed, rank=rank, world_size=world)
    else:
        batcher = Batcher(load_tokens(data_dir / "train.bin"), cfg.micro_batch * accum, cfg.seq_len, seed=cfg.seed,
                          rank=rank, world_size=world)
    tok_path = data_dir / "tokenizer.json"  # kept in every checkpoint: a run carries its own tokenizer
    tokenizer = Tokenizer.load(tok_path) if tok_path.is_file() else None
    run_cfg = _run_config(model_cfg, cfg, meta)
    candidates, problem, failed_start = _check_out_dir(out, run_cfg, cfg.resume)
    if cfg.check_memory and world == 1:
        _check_memory(model_cfg, cfg, device, run=run)
    ckpt, fell_back = _read_resume_checkpoint(out, candidates, problem, run_cfg) if candidates else (None, False)
    resume_from = None if ckpt is None else ckpt.path
    if ckpt is not None:
        _change_budget(run_cfg, ckpt.config, int(ckpt.trainer["step"]), out)
    val = _val_windows(data_dir, cfg, rank, world)
    dist.barrier()  # every rank has checked out_dir before rank 0 writes into it
    if failed_start and rank == 0:
        _set_aside_failed_start(out)
    if fell_back and rank == 0:  # latest.json names the checkpoint the run continues from
        write_json(out / LATEST, {"step": int(ckpt.trainer["step"]), "checkpoint": f"{CKPT_DIR}/{ckpt.path.name}"})

    parallel = dist.resolve_parallel(cfg.parallel, world)
    if cfg.compile_mode == "reduce-overhead" and (parallel != "none" or device.type != "cuda"):
        raise ValueError(f"compile_mode: reduce-overhead runs in one process on CUDA, got parallel {parallel} on "
                         f"{device.type}")
    # the loop's config carries the mode the blocks run in (auto resolved); config.json keeps what was asked for
    cfg = dataclasses.replace(cfg, compile_mode=resolve_compile_mode(cfg, model_cfg.mixer, parallel, device))
    if cfg.compile:
        log.info("compiling the blocks with torch.compile's %s mode", cfg.compile_mode)
    model, wrapped = build_model(model_cfg, cfg, device, parallel, run)
    # on a GPU, one fused kernel for the whole AdamW step (FSDP2's sharded DTensors keep the default)
    fused = {"fused": True} if device.type == "cuda" and parallel != "fsdp" else {}
    optim = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **fused)
    step = 0
    if ckpt is not None:
        step = int(ckpt.trainer["step"])
        check_weights(model, ckpt.model_state, ckpt.path / "model.safetensors")
        dist.load_full_state_dicts(model, optim, ckpt.model_state, ckpt.optim_state)
        _restore_batcher(batcher, ckpt.trainer.get("batcher", {}), step, ckpt.path)
        _restore_rng(ckpt.trainer.get("rng", {}))
        del ckpt
        log.info("resumed from %s at step %d", resume_from, step)
    elif cfg.init_from:  # fine-tuning: weights only; optimizer, schedule and data order start fresh
        src = read_checkpoint(cfg.init_from, optimizer=False)
        check_weights(model, src.model_state, src.path / "model.safetensors")
        dist.load_full_state_dicts(model, None, src.model_state, None)
        del src
        log.info("initialised the weights from %s", cfg.init_from)

    created = False
    if rank == 0:
        created = not (out / CONFIG_FILE).exists()
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / CONFIG_FILE, run_cfg)
    metrics = _Metrics(out, step, cfg.tensorboard) if rank == 0 else None
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if _amp(cfg, device) == "bf16" \
        else contextlib.nullcontext
    rows = metrics.rows if metrics else []
    loop = _Loop(cfg, out, device, rank, world, accum, model, wrapped, optim, batcher, run_cfg, autocast,
                 val, metrics, step, None if resume_from is None else step,
                 tokenizer=tokenizer, train_loss=rows[-1]["loss"] if rows else None,
                 val_loss=next((r["val_loss"] for r in reversed(rows) if r.get("val_loss") is not None), None))
    return loop, resume_from, created


def _change_budget(run_cfg: dict, saved: dict, step: int, out: Path) -> None:
    """Resuming at `step` with run_cfg's max_steps, from a checkpoint whose config is `saved`: refuse a budget
    below the step; record a changed budget in run_cfg["budget_changes"] (see the module docstring)."""
    new, old = run_cfg["run"]["max_steps"], (saved.get("run") or {}).get("max_steps", run_cfg["run"]["max_steps"])
    if new < step:
        raise ValueError(f"max_steps: the run in {str(out)!r} is at step {step}; expected max_steps >= {step} to "
                         f"continue it, got {new}; nothing was changed")
    changes = list(saved.get("budget_changes", []))
    if new != old:
        changes.append({"step": step, "from": old, "to": new})
        cfg = TrainConfig(**{**run_cfg["train"], "max_steps": new})
        log.warning("max_steps: the step budget changes from %d to %d at step %d; from here the learning rate "
                    "follows the %d-step schedule (%.3g now)", old, new, step, new, lr_at(step, cfg))
    if changes:
        run_cfg["budget_changes"] = changes


class _Profile:
    """The profiler window of TrainConfig.profile_steps: from the step log_every steps after this start's first
    to profile_steps later (or the end of the run); the trace and a kernel table then go to out_dir/profile/,
    each written under a temporary name and renamed."""

    def __init__(self, cfg: TrainConfig, first_step: int, device: torch.device, rank: int):
        self.start, self.stop = first_step + cfg.log_every, first_step + cfg.log_every + cfg.profile_steps
        self.on, self.cuda, self.rank, self.prof = cfg.profile_steps > 0, device.type == "cuda", rank, None
        self.written = False
        self.out = Path(cfg.out_dir) / "profile"

    def before_step(self, step: int) -> None:
        if self.on and step == self.start and self.prof is None:
            acts = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * self.cuda
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()

    def after_step(self, step: int) -> None:
        if self.prof is not None and step >= self.stop:
            self.finish(step)

    def finish(self, step: int) -> None:
        if self.prof is None:
            if self.on and not self.written and self.rank == 0:
                log.warning("profile_steps: the run ended at step %d, before the profiled window (from step %d); "
                            "no trace written", step, self.start)
            return
        if self.cuda:
            torch.cuda.synchronize()
        prof, self.prof, self.written = self.prof, None, True
        prof.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        trace, table = self.out / f"trace_rank{self.rank}.json", self.out / f"kernels_rank{self.rank}.txt"
        prof.export_chrome_trace(str(trace) + ".tmp")
        os.replace(str(trace) + ".tmp", trace)
        sort = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        head = f"steps {self.start}..{step - 1} (rank {self.rank}), sorted by {sort}\n"
        write_text(table, head + prof.key_averages().table(sort_by=sort, row_limit=40) + "\n")
        if self.rank == 0:
            log.info("profile of steps %d..%d written to %s", self.start, step - 1, self.out)


def _train(model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device, on_step, run=None) -> dict:
    out = Path(cfg.out_dir)
    loop, resume_from, created = None, None, False
    bar = None
    try:
        loop, resume_from, created = _setup(model_cfg, cfg, device, run)
        if cfg.progress and loop.rank == 0:
            from tqdm import tqdm
            bar = tqdm(total=cfg.max_steps, initial=loop.step, file=sys.stderr, dynamic_ncols=True, unit="step")
        start_step, stopped = loop.step, None
        profile = _Profile(cfg, loop.step, device, loop.rank)
        t0 = loop.t_log = time.perf_counter()
        loop.step_log = loop.step
        loop.wrapped.train()
        with _StopRequests() as stop:
            while loop.step < cfg.max_steps:
                profile.before_step(loop.step)
                loss = _forward_backward(loop, stop)
                if loss is None:  # stopped between micro-batches: this step is dropped
                    stopped = stop.reason
                    _read_pending(loop)
                    if loop.step == 0:  # nothing trained: a step-0 checkpoint would only block the next start
                        log.warning("stopped before the first step (%s): no checkpoint written; the next start "
                                    "sets this one aside", stopped)
                        break
                    if loop.saved_step != loop.step:
                        loop.last_path = _save(loop)
                    log.warning("stopped at step %d (%s); checkpoint %s", loop.step, stopped, loop.last_path)
                    break
                grad_norm = _optimizer_step(loop)
                if bar is not None:
                    bar.update(1)
                stopped = _after_step(loop, loss, grad_norm, on_step, stop)
                profile.after_step(loop.step)
                if bar is not None and loop.train_loss is not None and not loop.pending:
                    rate = (loop.step - start_step) * cfg.tokens_per_step / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(loss=f"{loop.train_loss:.4f}", lr=f"{lr_at(loop.step - 1, cfg):.2e}",
                                    tok_s=bar.format_sizeof(rate), refresh=False)
                if stopped:
                    log.warning("stopped at step %d (%s); checkpoint %s", loop.step, stopped, loop.last_path)
                    break
            _read_pending(loop)
            profile.finish(loop.step)
    except BaseException as e:
        if dist.rank() == 0 and not isinstance(e, KeyboardInterrupt):  # an interrupt never deletes anything
            _discard_unsaved_run(out, created)
        raise
    finally:
        if bar is not None:
            bar.close()
        if loop is not None and loop.metrics:
            loop.metrics.close()
    elapsed = time.perf_counter() - t0
    if loop.last_path is None and loop.rank == 0:
        loop.last_path = latest_checkpoint(out)
    step = loop.step
    return {"steps": step, "tokens": step * cfg.tokens_per_step, "train_loss": loop.train_loss,
            "val_loss": loop.val_loss,
            "tokens_per_s": (step - start_step) * cfg.tokens_per_step / elapsed if step > start_step else 0.0,
            "out_dir": str(out), "checkpoint": None if loop.last_path is None else str(loop.last_path),
            "stopped": stopped, "resumed_from": None if resume_from is None else start_step}


def _forward_backward(loop: _Loop, stop: _StopRequests) -> torch.Tensor | None:
    """Set this step's learning rates, then forward and backward over the step's micro-batches
    (gradients reduced across ranks on the last one); the mean loss (on the device, not read).
    In one process a stop request ends it between micro-batches: None, the gradients dropped and the
    batch draw rewound (the step is done again on resume)."""
    cfg, step = loop.cfg, loop.step
    for g in loop.optim.param_groups:
        g["lr"] = lr_at(step, cfg)
    warm = int(cfg.warmup_frac * cfg.max_steps)
    loop.model.set_inner_lr_warmup(step / warm if cfg.inner_lr_warmup and step < warm else 1.0)
    x, y, *starts = next(loop.batcher)  # starts: packed documents (DocumentBatcher)
    for ids in (x, y):  # a damaged train.bin: a clear error, not an IndexError deep in the embedding
        _check_ids(ids, loop.model.cfg.vocab_size, Path(cfg.data_dir) / "train.bin")
    if loop.device.type == "cuda":  # a copy from pinned memory does not wait for the queued GPU work
        x, y = x.pin_memory().to(loop.device, non_blocking=True), y.pin_memory().to(loop.device, non_blocking=True)
    xs, ys = x.to(loop.device).chunk(loop.accum), y.to(loop.device).chunk(loop.accum)  # [rows, T] -> accum x
    packs = starts[0].chunk(loop.accum) if starts else [None] * loop.accum
    loss_sum = torch.zeros((), device=loop.device)
    if cfg.compile_mode == "reduce-overhead":
        own_grads(loop.model, loop.accum)
    for i in range(loop.accum):
        if stop.reason is not None and loop.world == 1:
            loop.optim.zero_grad(set_to_none=True)
            loop.batcher.step = step
            return None
        with dist.grad_sync(loop.wrapped, i == loop.accum - 1):
            _graph_step(cfg.compile_mode == "reduce-overhead")
            with loop.autocast():
                if packs[i] is None:
                    loss, _ = loop.wrapped(xs[i], targets=ys[i], state_out=False)
                else:  # the micro-batch's rows as one packed sequence, every document from a fresh state
                    xp, yp, cu = pack_rows(xs[i], ys[i], packs[i])
                    loss, _ = loop.wrapped(xp, targets=yp, cu_seqlens=cu, state_out=False)
            (loss / loop.accum).backward()
        loss_sum += loss.detach()
    return loss_sum / loop.accum


def _optimizer_step(loop: _Loop) -> torch.Tensor:
    """Clip the gradient norm, take the AdamW step, clear the gradients; the norm (on the device)."""
    cfg = loop.cfg
    grad_norm = torch.nn.utils.clip_grad_norm_(loop.model.parameters(), cfg.grad_clip or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    loop.optim.step()
    # the graphs' mode keeps its buffers where a step has several micro-batches (`own_grads`)
    loop.optim.zero_grad(set_to_none=cfg.compile_mode != "reduce-overhead" or loop.accum == 1)
    loop.step += 1
    return grad_norm.detach()


def _read_pending(loop: _Loop) -> None:
    """Bring the losses and gradient norms of the steps not yet read to the host (one transfer, one
    all-reduce); TrainingDiverged at the first step whose loss is not finite."""
    if not loop.pending:
        return
    losses = dist.all_reduce_sum(torch.stack([p[2] for p in loop.pending]).float()) / loop.world
    norms = torch.stack([p[3].float() for p in loop.pending]).tolist()  # the same on every rank
    losses = losses.tolist()
    for (step, lr, _, _), loss, norm in zip(loop.pending, losses, norms):
        if not (math.isfinite(loss) and math.isfinite(norm)):  # a non-finite norm: non-finite weights now
            loop.pending.clear()
            raise TrainingDiverged(_diverged_message(loop, step, loss if not math.isfinite(loss) else
                                                     f"{loss} with a gradient norm of {norm}", lr))
    loop.last_read = [(p[0], p[1], loss, norm) for p, loss, norm in zip(loop.pending, losses, norms)]
    loop.train_loss = losses[-1]
    loop.pending.clear()


def _diverged_message(loop: _Loop, step: int, loss, lr: float) -> str:
    saved = loop.last_path or (latest_checkpoint(loop.out) if loop.rank == 0 and loop.saved_step is not None
                               else None)
    where = (f"the last checkpoint is {saved} (step {loop.saved_step}); a rerun with another lr is another run: "
             f"use another out_dir") if loop.saved_step is not None else \
        f"no checkpoint was written, so {str(loop.out)!r} was left as it was: rerun with a lower lr"
    return f"training diverged: the loss is {loss} at step {step} (lr {lr:.3g}); {where}"


def _after_step(loop: _Loop, loss: torch.Tensor, grad_norm: torch.Tensor, on_step, stop: _StopRequests) -> str | None:
    """After an optimizer step: evaluate, log, save and decide whether to stop (a reason, or None).
    The loss and gradient norm are read on the host only when something needs them (a metrics row,
    an evaluation, a save, on_step, the last step): other steps queue the next one without waiting."""
    cfg, step = loop.cfg, loop.step
    loop.pending.append((step, lr_at(step - 1, cfg), loss, grad_norm))
    last = step == cfg.max_steps
    evaluate = loop.val is not None and cfg.eval_every and (step % cfg.eval_every == 0 or last)
    save = last or bool(cfg.save_every and step % cfg.save_every == 0)
    log_row = step % cfg.log_every == 0 or last or evaluate
    if not (log_row or save or on_step is not None):
        # a stop request is seen by the next step's first micro-batch (one process), or agreed on by the
        # ranks at the next read (several)
        return None
    _read_pending(loop)
    _, lr, train_loss, norm = loop.last_read[-1]
    row = {"step": step, "tokens": step * cfg.tokens_per_step, "loss": train_loss, "lr": lr, "grad_norm": norm}
    if evaluate:
        loop.val_loss = row["val_loss"] = _evaluate(loop.model, loop.val, cfg.micro_batch, loop.autocast, loop.device,
                                                    graphs=cfg.compile_mode == "reduce-overhead")
    if log_row:
        now = time.perf_counter()
        row["tokens_per_s"] = (step - loop.step_log) * cfg.tokens_per_step / max(now - loop.t_log, 1e-9)
        loop.t_log, loop.step_log = now, step
        if loop.metrics:
            loop.metrics.add({k: row.get(k) for k in METRIC_FIELDS if k in row})
    if on_step is not None and on_step(step, dict(row)):
        stop.reason = stop.reason or "on_step"
    stopped = None
    flag = torch.tensor(float(stop.reason is not None), device=loop.device)
    if dist.all_reduce_sum(flag).item() > 0:
        stopped = stop.reason or "signal on another rank"
    if save or stopped:
        loop.last_path = _save(loop)
    return stopped


def _save(loop: _Loop) -> str | None:
    """A checkpoint of the current step (collective; rank 0 writes it); its path on rank 0."""
    cfg, at = loop.cfg, loop.step
    model_state, optim_state = dist.full_state_dicts(loop.model, loop.optim)  # collective
    path = None
    if loop.rank == 0:
        trainer = {"tokens": at * cfg.tokens_per_step, "world_size": loop.world, "batcher": loop.batcher.state_dict(),
                   "scheduler": {"kind": "warmup_cosine", "step": at, "lr": lr_at(max(at - 1, 0), cfg),
                                 "warmup_steps": int(cfg.warmup_frac * cfg.max_steps)},
                   "rng": _rng_state()}
        path = str(save_checkpoint(loop.out, at, model_state, optim_state, loop.run_cfg, trainer,
                                   cfg.keep_checkpoints, tokenizer=loop.tokenizer))
    loop.saved_step = at
    dist.barrier()
    return path


def _discard_unsaved_run(out: Path, created: bool) -> None:
    """After a failure before any checkpoint: remove what this call wrote (config.json, metrics,
    tensorboard/), so that nothing blocks the corrected rerun. A run with a checkpoint is kept."""
    if not created or (out / LATEST).exists() or any((out / CKPT_DIR).glob("step_*")):
        return
    for name in (CONFIG_FILE, "metrics.jsonl", "metrics.csv"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "tensorboard", ignore_errors=True)
    shutil.rmtree(out / CKPT_DIR, ignore_errors=True)  # only temporary dirs of a failed save can be left here
    with contextlib.suppress(OSError):
        out.rmdir()  # when empty


def _val_windows(data_dir: Path, cfg: TrainConfig, rank: int, world: int):
    """This rank's validation windows (x, y), the same count on every rank; None when val.bin is too small."""
    if not cfg.eval_every:
        return None
    toks = load_tokens(data_dir / "val.bin")
    avail = (len(toks) - 1) // cfg.seq_len if len(toks) else 0
    n = min(cfg.eval_batches * cfg.micro_batch * world, avail) // world * world
    if n == 0:
        log.warning("val.bin holds %d tokens, too few for %d windows of seq_len=%d: no validation",
                    len(toks), world, cfg.seq_len)
        return None
    x, y = eval_sequences(toks, cfg.seq_len, n)
    for ids in (x, y):
        _check_ids(ids, int(load_meta(data_dir)["vocab_size"]), data_dir / "val.bin")
    per = n // world
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def own_grads(model: torch.nn.Module, accum: int) -> None:
    """Before a step's first backward through CUDA-graph replays (compile_mode reduce-overhead) of `accum`
    micro-batches: with more than one, every gradient in a buffer of its own. A missing `.grad` would adopt a backward
    graph's output, which the next micro-batch's replay overwrites in place ("accessing tensor output of CUDAGraphs
    that has been overwritten", PyTorch issue 169545); an existing one is added into. Zeros: the sums are bit for bit
    the adopted ones. With one micro-batch, nothing: its backward adopts the outputs (no zero fill and no addition per
    parameter), the clip and the optimizer read them before the next step's replays, and the step's
    `zero_grad(set_to_none=True)` lets them go."""
    if accum == 1:
        return
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def _graph_step(on: bool) -> None:
    """With compile_mode reduce-overhead (on), before each forward: a new step of the blocks' CUDA graphs (the
    outputs of the last replay may be overwritten from here on)."""
    if on:
        torch.compiler.cudagraph_mark_step_begin()


@torch.no_grad()
def _evaluate(model, val, micro_batch: int, autocast, device, graphs: bool = False) -> float:
    """Mean next-token loss over every rank's validation windows (graphs: the blocks replay CUDA graphs, a new
    step before each forward)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [loss sum, token count]
    for x, y in zip(val[0].split(micro_batch), val[1].split(micro_batch)):
        x, y = x.to(device), y.to(device)
        _graph_step(graphs)
        with autocast():
            loss, _ = model(x, targets=y, reduction="sum", state_out=False)
        total[0] += loss.double()
        total[1] += y.numel()
    model.train()
    dist.all_reduce_sum(total)
    return (total[0] / total[1]).item()


def _rng_state() -> dict:
    state = {"torch": encode_bytes(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [encode_bytes(s) for s in torch.cuda.get_rng_state_all()]
    return state


def _restore_rng(state: dict) -> None:
    if "torch" in state:
        torch.set_rng_state(decode_bytes(state["torch"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([decode_bytes(s) for s in state["cuda"]])


def _restore_batcher(batcher: Batcher, saved: dict, step: int, where: Path) -> None:
    """Continue the batch draws at `step`. Another process count is fine when the global batch is equal."""
    rows = saved.get("batch_size", 0) * saved.get("world_size", 0)
    if rows != batcher.batch_size * batcher.world_size or saved.get("seq_len") != batcher.seq_len \
            or saved.get("seed") != batcher.seed or saved.get("step") != step:
        raise ValueError(f"{where / 'trainer.json'}: batcher state {saved} does not continue this run's batches "
                         f"({batcher.batch_size * batcher.world_size} rows of seq_len {batcher.seq_len}, seed "
                         f"{batcher.seed}, step {step})")
    batcher.load_state_dict({**saved, "batch_size": batcher.batch_size, "world_size": batcher.world_size})
