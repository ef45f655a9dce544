"""The `ttt` command line: demo, data, train, eval, generate, params.

    ttt demo                                    # corpus -> tokenizer -> TTT-Linear vs Transformer -> plot
    ttt data stdlib --out data --vocab-size 4096
    ttt train --data data --out runs/a --size tiny --mixer ttt_linear --steps 300
    ttt eval runs/a runs/b --data data --seq-len 1024 --chunk-len 256 --out eval_out
    ttt generate runs/a --prompt "def main(" --max-new-tokens 200 --top-p 0.9 --seed 0
    ttt params                                  # every preset; or --size 125m --mixer ttt_linear

Every option comes from a dataclass field and its help text: ModelConfig and TrainConfig for train,
DemoOptions / DataOptions / EvalOptions / GenerateOptions (below) for the others, so `--help` always
lists every field. A new subcommand is an options dataclass of `opt(...)` fields, a `cmd_x(args)`
reading them with `_options(XOptions, args)`, and one `_add_subcommand(...)` line in build_parser.

Bad input and ordinary trouble (missing or empty corpus, unreadable or corrupt files, an out dir of
another run, a full or read-only disk, an unavailable device or backend, a missing optional package)
print one line to stderr and exit with 2; library argument names in the message are replaced by the
flags as typed (`cli_message`). Set TTT_DEBUG=1 to see the traceback instead. This module is the
only place that prints.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

from .config import BACKBONES, MIXERS, SIZES, TTT_BACKENDS, ModelConfig, RunOptions  # plain dataclasses: no torch

EXIT_BAD_INPUT = 2


class CLIError(Exception):
    """Bad input found by the CLI itself; reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line pointing at --help (not the whole usage text first)."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------- dataclass -> options

def opt(default, help: str, *, default_text: str | None = None, choices=None, positive: bool = False,
        required: bool = False, flags: tuple = (), metavar: str | None = None):
    """A dataclass field that becomes one CLI option: `help` is its --help text; `default_text` replaces
    the shown default; `positive` makes argparse refuse ints < 1; `flags` are extra option names."""
    meta = {"help": help, "default_text": default_text, "choices": choices, "positive": positive,
            "required": required, "flags": tuple(flags), "metavar": metavar}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _optional(conv):
    def parse(s: str):
        return None if s.lower() in ("none", "null", "") else conv(s)
    parse.__name__ = conv.__name__  # argparse names the type in its error messages
    return parse


def _pos_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {s}")
    return v


def _field_kind(tp) -> tuple:
    """(converter, is_bool, nullable, is_list) for a dataclass field type."""
    if typing.get_origin(tp) is list:
        return str, False, False, True
    args = typing.get_args(tp)
    nullable = type(None) in args
    if args:
        inner = [a for a in args if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else str
        if typing.get_origin(tp) is list:
            return str, False, nullable, True
    if tp is bool:
        return None, True, nullable, False
    if tp in (int, float, str):
        return tp, False, nullable, False
    return str, False, nullable, False


def add_dataclass_options(parser, cls, *, prefix: str = "", skip=(), preset_fields=(), title: str | None = None,
                          defaults: dict | None = None, aliases: dict | None = None) -> list[tuple[str, str]]:
    """Add one option per field of `cls` (help from metadata["help"]), plus `aliases` {field: [flags]}.
    Every option defaults to None (= keep the dataclass's value); returns [(field name, argparse dest)]."""
    group = parser.add_argument_group(title) if title else parser
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        md = f.metadata
        conv, is_bool, nullable, is_list = _field_kind(hints[f.name])
        flags = ["--" + (prefix + f.name).replace("_", "-"), *(aliases or {}).get(f.name, ()), *md.get("flags", ())]
        dest = (prefix + f.name).replace("-", "_")
        help_text = md.get("help", f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.name in preset_fields:
            help_text += " (default: from the --size preset)"
        elif f.name in (defaults or {}):
            help_text += f" (default: {defaults[f.name]})"
        elif md.get("default_text"):
            help_text += f" (default: {md['default_text']})"
        elif md.get("required"):
            help_text += " (required)"
        elif not (is_bool and default is False):
            shown = " ".join(default) if is_list else default
            help_text += f" (default: {shown})"
        kw = dict(dest=dest, default=None, help=help_text)
        if md.get("required"):
            kw["required"] = True
        if is_bool:
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        else:
            conv = _pos_int if md.get("positive") and conv is int else conv
            metavar = md.get("metavar") or {int: "INT", _pos_int: "INT", float: "FLOAT", str: "STR"}.get(conv, "VALUE")
            if md.get("choices"):
                kw["choices"], metavar = list(md["choices"]), None
            if nullable and not is_list and conv is not str and not md.get("default_text"):
                help_text += "; 'none' for None"
                kw["help"] = help_text
            nullable = nullable and conv is not str  # a str option takes any text, "none" included
            group.add_argument(*flags, type=_optional(conv) if nullable and not is_list else conv, metavar=metavar,
                               nargs="+" if is_list else None, **kw)
        out.append((f.name, dest))
    return out


def _collect(args, mapping) -> dict:
    return {name: getattr(args, dest) for name, dest in mapping if getattr(args, dest) is not None}


def _options(cls, args):
    """The `cls` dataclass from the options given on the command line (the others keep their defaults)."""
    return cls(**_collect(args, args._fields))


# ----------------------------------------------------------------------------- model options

@dataclass
class PresetOptions:
    size: str = opt("125m", "model preset: layers, width, heads and FFN width (the paper's sizes, plus 'debug' and "
                            "'tiny' for CPUs); the training defaults are the 125m GPU recipe", choices=tuple(SIZES))
    mixer: str = opt("ttt_linear", "sequence mixer: TTT-Linear, TTT-MLP, or a baseline (attention = Transformer++, "
                                   "mamba = Mamba-2 style)", choices=MIXERS)
    backbone: str = opt("mamba", "TTT block style: mamba (M: extra conv, gated TTT) or transformer (T); baselines "
                                 "always use plain pre-norm blocks", choices=BACKBONES)


@dataclass
class ParamsOptions:
    size: str | None = opt(None, "one preset", default_text="all", choices=tuple(SIZES))
    mixer: str | None = opt(None, "one mixer", default_text="all", choices=MIXERS)
    backbone: str | None = opt(None, "TTT backbone", default_text="both for TTT mixers", choices=BACKBONES)


_PRESET_FIELDS = ("d_model", "n_layers", "n_heads", "ffn_hidden", "mamba_head_dim")


def _add_model_options(parser, preset_cls=PresetOptions, *, vocab_default: str = "the dataset's vocabulary"):
    """--size/--mixer/--backbone (from `preset_cls`), then one option per other ModelConfig field."""
    parser.set_defaults(_preset_fields=add_dataclass_options(parser, preset_cls))
    return add_dataclass_options(parser, ModelConfig, skip=("mixer", "backbone"), preset_fields=_PRESET_FIELDS,
                                 title="model options (override the preset)", defaults={"vocab_size": vocab_default})


def _preset(args, cls=PresetOptions):
    return cls(**_collect(args, args._preset_fields))


def _model_config(args, mapping, vocab_size: int | None = None):
    from .config import get_config

    p = _preset(args)
    overrides = _collect(args, mapping)
    if vocab_size is not None:
        overrides.setdefault("vocab_size", vocab_size)
    return get_config(p.size, mixer=p.mixer, backbone=p.backbone, **overrides)


# ----------------------------------------------------------------------------- subcommands

def cmd_params(args) -> int:
    import torch

    from .config import get_config
    from .model import TTTLM

    f = _preset(args, ParamsOptions)
    sizes = [f.size] if f.size else list(SIZES)
    mixers = [f.mixer] if f.mixer else list(MIXERS)
    overrides = _collect(args, args._model_fields)
    overrides.setdefault("vocab_size", 32000)
    rows = []
    for size in sizes:
        for mixer in mixers:
            if not mixer.startswith("ttt"):
                backbones = ["transformer"]  # baselines: plain pre-norm blocks only
            else:
                backbones = [f.backbone] if f.backbone else list(BACKBONES)
            for backbone in backbones:
                cfg = get_config(size, mixer=mixer, backbone=backbone, **overrides)
                with torch.device("meta"):  # counts only: no memory, no init
                    model = TTTLM(cfg)
                n, n_body = model.num_parameters(), model.num_parameters(exclude_embedding=True)
                rows.append((size, mixer, cfg.backbone if mixer.startswith("ttt") else "-", cfg.n_layers, cfg.d_model,
                             cfg.n_heads, cfg.ffn_hidden, _fmt_count(n), _fmt_count(n_body), n))
    header = ("size", "mixer", "backbone", "layers", "d_model", "heads", "ffn", "params", "non-embedding")
    _print_table(header, [r[:-1] for r in rows])
    print(f"(vocab_size {overrides['vocab_size']}, tied embeddings: {overrides.get('tie_embeddings', True)})")
    return 0


def _fmt_count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _print_table(header, rows) -> None:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(r[i][:1].isdigit() and r[i][-1:].isdigit() or r[i][-1:] in "MB%" and r[i][:1].isdigit()
                   for r in cells[1:]) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))


# ----------------------------------------------------------------------------- options of demo, data, eval, generate

BOOL_HINT = "the flag alone"
# wall-clock times on 2 idle CPU cores, from a fresh clone (README.md's Quickstart states the same): `ttt demo --quick`
# 7.6, 7.7 and 8.1 s; the whole `ttt demo` 396 s (6:36; another machine's idle run: 7:44)
QUICK_TIME, DEMO_TIME = "about 8 s", "about 7 minutes"
DEMO_OUT, QUICK_OUT = "demo_out", "demo_quick"


@dataclass
class DemoOptions:
    out: str | None = opt(None, "output directory; a rerun with the same settings reuses its prepared data and "
                                "continues (or reuses) its training runs", metavar="DIR",
                          default_text=f"{DEMO_OUT}, {QUICK_OUT} with --quick")
    quick: bool = opt(False, f"a smoke run: a small corpus, 'debug'-size models and a few steps ({QUICK_TIME} on 2 "
                             f"CPU cores); without it, the real demo takes {DEMO_TIME}")
    steps: int | None = opt(None, "training steps per model", positive=True)
    minutes: float | None = opt(None, "wall-clock budget for training both models, in minutes (half each); a model "
                                      "whose budget runs out stops early and is evaluated as it is",
                                default_text="no budget")
    seed: int | None = opt(None, "seed of the data split and order, init and sampling", default_text="0")
    max_bytes: int | None = opt(None, "corpus size limit in bytes", positive=True)
    train_len: int | None = opt(None, "training context length", positive=True)
    eval_len: int | None = opt(None, "evaluation context length, fed in chunks of --train-len with the state "
                                     "carried over; checked against the validation split before training",
                               default_text="4 x --train-len", positive=True)


@dataclass
class DataOptions:
    out: str = opt("", "output directory of the prepared dataset", required=True, metavar="DIR")
    vocab_size: int = opt(8192, "BPE vocabulary size, from 257 (256 bytes + EOS) to 1048576", positive=True)
    tokenizer: str | None = opt(None, "use this tokenizer.json instead of training one", default_text="train one", metavar="FILE")
    val_fraction: float = opt(0.01, "fraction of documents held out for validation, by a hash of their name")
    val_docs: int | None = opt(None, "hold out exactly this many documents instead of --val-fraction",
                               default_text="use --val-fraction")
    seed: int = opt(0, "seed of the train/val split")
    text_field: str = opt("text", "JSON field holding the text in .jsonl files", metavar="FIELD")
    extensions: list[str] = opt([".txt", ".md", ".rst", ".py", ".jsonl"], "file suffixes read from directories", metavar="SUFFIX")
    max_docs: int | None = opt(None, "stop after this many documents", default_text="all", positive=True)
    max_bytes: int | None = opt(None, "stop after the document reaching this many bytes", default_text="all",
                                positive=True)
    overwrite: bool = opt(False, "replace a dataset of other sources/settings in --out")


@dataclass
class EvalOptions:
    data: str = opt("", "a dataset directory prepared by `ttt data` (its tokenizer must be the checkpoints' own)",
                    required=True, metavar="DIR")
    split: str = opt("val", "which shard", choices=("val", "train"))
    seq_len: int = opt(1024, "tokens per evaluated sequence", positive=True)
    chunk_len: int | None = opt(None, "tokens per forward, state carried between chunks",
                                default_text="the whole sequence at once", positive=True)
    n_seqs: int | None = opt(None, "number of sequences", positive=True,
                             default_text="16, or as many as the split holds (said when fewer)")
    batch_size: int = opt(8, "sequences per forward", positive=True)
    buckets: int = opt(16, "number of log-spaced position buckets", positive=True)
    names: list[str] | None = opt(None, "legend names, one per checkpoint", default_text="directory names", metavar="NAME")
    train_len: int | None = opt(None, "mark this training context length on the plot",
                                default_text="the checkpoints' own, when they agree", positive=True)
    out: str = opt("eval_out", "output directory", metavar="DIR")
    device: str = opt("cpu", "torch device: cpu, cuda, cuda:N", metavar="DEVICE")
    ttt_backend: str | None = opt(None, "TTT op backend to run the checkpoints with", default_text="auto",
                                  choices=TTT_BACKENDS)
    allow_other_tokenizer: bool = opt(False, "evaluate even when the data's tokenizer is not the one the checkpoint "
                                             "was trained with (the NLLs then mean nothing)")
    by_document: bool = opt(False, "NLL by position within documents: the first --n-seqs documents (found at EOS), "
                                   "their first --seq-len positions, each from a fresh state, packed --batch-size "
                                   "documents' worth per forward (not with --chunk-len)")


DEFAULT_TEMPERATURE = 0.8


@dataclass
class GenerateOptions:
    prompt: str | None = opt(None, "prompt text", default_text="empty: start a new document", metavar="TEXT")
    prompt_file: str | None = opt(None, "read the prompt from this UTF-8 file instead of --prompt",
                                  default_text="none", metavar="FILE")
    max_new_tokens: int = opt(200, "tokens to generate at most (stops earlier at end of document)")
    temperature: float | None = opt(None, "softmax temperature, a finite number >= 0; 0 = greedy",
                                    default_text=str(DEFAULT_TEMPERATURE))
    top_k: int | None = opt(None, "sample among the k most likely tokens", default_text="all", positive=True)
    top_p: float | None = opt(None, "nucleus sampling: the smallest set of tokens holding this probability, in (0, 1]",
                              default_text="1, off")
    greedy: bool = opt(False, "always take the most likely token (not with --temperature, --top-k, --top-p)")
    seed: int | None = opt(None, "seed for reproducible samples", default_text="random")
    num_samples: int = opt(1, "number of samples (seeds --seed, --seed + 1, ...)", positive=True)
    tokenizer: str | None = opt(None, "tokenizer.json", default_text="the checkpoint's own, else that of --data or "
                                                                     "of the run's training data", metavar="FILE")
    data: str | None = opt(None, "dataset directory whose tokenizer.json to use", default_text="none", metavar="DIR")
    device: str = opt("cpu", "torch device: cpu, cuda, cuda:N", metavar="DEVICE")
    ttt_backend: str | None = opt(None, "TTT op backend to decode with", default_text="auto", choices=TTT_BACKENDS)
    allow_other_tokenizer: bool = opt(False, "use a tokenizer the checkpoint was not trained with (gibberish "
                                             "is likely)")
    cuda_graph: bool | None = opt(None, "replay each decode step as a captured CUDA graph",
                                  default_text="on for CUDA TTT/Mamba models")
    compile_decode: bool = opt(False, "torch.compile the decode step before capturing its CUDA graphs (fuses the "
                                      "element-wise work; compiles once per model and batch size)")
    merge_weights: bool | None = opt(None, "with CUDA graphs: read the weights that share an input as one copy, one "
                                            "GEMM per block instead of several (faster; those weights' memory "
                                            "again while decoding, ~1.7 GB at 1.3b in bf16)", default_text="on")


# ----------------------------------------------------------------------------- checks shared by the commands

def _check_device(name: str, flag: str = "--device"):
    """torch.device(name) when it can run here, else CLIError naming `flag`."""
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise CLIError(f"{flag}: unknown device {name!r}; expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise CLIError(f"{flag}: {name!r} is not available here ({why}; torch {torch.__version__}); "
                           f"use {flag} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"{flag}: {name!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise CLIError(f"{flag}: 'mps' is not available here; use {flag} cpu")
    elif dev.type != "cpu":
        raise CLIError(f"{flag}: device type {dev.type!r} is not supported; expected cpu, cuda or cuda:N")
    return dev


def _check_backend(backend: str, mixer: str, device) -> None:
    """CLIError when the TTT op backend cannot run on `device` (checked before any work)."""
    if not str(mixer).startswith("ttt"):
        return
    from .ops import resolve_backend

    try:
        resolve_backend(backend, device)
    except RuntimeError as e:
        raise CLIError(f"--ttt-backend: {e}; pass --ttt-backend dual (or auto)") from None


def _check_out_is_dir(path: str, flag: str = "--out") -> None:
    """CLIError when `path`, a directory to create or write into, is a file or lies under one."""
    for p in (Path(path), *Path(path).parents):
        if p.exists():
            if not p.is_dir():
                raise CLIError(f"{flag}: {str(p)!r} is a file; expected a directory to write into (nothing was done)")
            return


def _checkpoint_model_config(path) -> dict:
    from .checkpoint import CONFIG_FILE, read_json, resolve

    model = read_json(resolve(path) / CONFIG_FILE).get("model")
    return model if isinstance(model, dict) else {}


def _note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data, train, eval, generate, demo

def cmd_data(args) -> int:
    from .data import STDLIB, prepare

    o = _options(DataOptions, args)
    sources = args.sources or [STDLIB]
    t0 = time.time()
    meta = prepare(sources, o.out, vocab_size=o.vocab_size, tokenizer_path=o.tokenizer,
                   val_fraction=o.val_fraction, val_docs=o.val_docs, seed=o.seed, text_field=o.text_field,
                   extensions=o.extensions, max_docs=o.max_docs, max_bytes=o.max_bytes, overwrite=o.overwrite)
    print(f"prepared {o.out} in {time.time() - t0:.1f}s: vocab {meta['vocab_size']}, "
          f"train {meta['train_tokens']:,} tokens ({meta['train_docs']} docs), "
          f"val {meta['val_tokens']:,} tokens ({meta['val_docs']} docs), {meta['dtype']}")
    return 0


CPU_SUGGESTION = ("--size tiny --seq-len 256 --micro-batch 8 --tokens-per-step 2048 --steps 500 --eval-every 100 "
                  "--eval-batches 4")


def cmd_train(args) -> int:
    from .checkpoint import EXECUTION_ONLY
    from .config import ModelConfig
    from .data import load_meta
    from .train import TrainConfig, preflight, train

    given = _collect(args, args._train_fields)
    saved = _continued_run(given.get("out_dir", TrainConfig.out_dir))
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"out_dir", "resume", "progress", "init_from",
                                                               "profile_steps"}
    inherited = {k: v for k, v in (saved or {}).get("train", {}).items() if k in fields}
    train_cfg = TrainConfig(**{**inherited, **given})  # options not typed: the run's own, when --out holds one
    train_cfg.validate()
    run = RunOptions(**_collect(args, args._run_fields))
    meta = load_meta(train_cfg.data_dir)
    model_given = {**_collect(args, args._model_fields), **_collect(args, args._preset_fields)}
    if saved and set(model_given) <= set(EXECUTION_ONLY):  # only how it runs: the run's model
        model_cfg = dataclasses.replace(ModelConfig.from_dict(saved["model"]), **model_given)
        size = f"as in {train_cfg.out_dir}"
    else:
        model_cfg = _model_config(args, args._model_fields, meta["vocab_size"])
        size = _preset(args).size
    if train_cfg.init_from:  # fine-tuning: the model is the one of --init-from
        from .train import init_model_config
        model_cfg = init_model_config(train_cfg.init_from, meta["vocab_size"])
        size = f"the model of {train_cfg.init_from}"
    device = _check_device(("cuda" if _cuda() else "cpu") if train_cfg.device == "auto" else train_cfg.device)
    _check_backend(run.ttt_backend, model_cfg.mixer, device)
    # every check that needs no model before the first line of output; on a CPU, a --micro-batch left to its
    # default becomes the largest that fits in memory (the same run: only the gradient accumulation changes)
    micro_batch = preflight(model_cfg, train_cfg, device, pick_micro_batch=device.type == "cpu" and
                            "micro_batch" not in given, run=run)
    if micro_batch != train_cfg.micro_batch:
        from .memory import available_memory
        _note(f"a step at --micro-batch {train_cfg.micro_batch} would not fit in the "
              f"{available_memory(device) / 1e9:.1f} GB of free memory: using --micro-batch {micro_batch} (the same "
              f"run, with {train_cfg.micro_batch // micro_batch}x the gradient accumulation)")
        train_cfg = dataclasses.replace(train_cfg, micro_batch=micro_batch)
    n_params = _count_params(model_cfg)
    if device.type == "cpu" and (train_cfg.tokens_per_step > 65536 or n_params > 30e6):
        _note(f"training on the CPU with GPU-sized settings ({n_params / 1e6:.0f}M parameters, "
              f"{train_cfg.tokens_per_step:,} tokens per step, {train_cfg.max_steps} steps: the defaults are the "
              f"paper's GPU recipe); one step may take minutes. For a CPU try: {CPU_SUGGESTION}")
    print(f"model: {model_cfg.mixer} ({size}, backbone {model_cfg.backbone}), "
          f"{n_params:,} parameters; run dir {train_cfg.out_dir}", flush=True)
    summary = train(model_cfg, train_cfg, run=run)
    print(_fmt_summary(summary))
    return 130 if summary["stopped"] == "SIGINT" else 0  # Ctrl-C: stopped (after step 0, saved), exit as interrupted


def _continued_run(out_dir: str) -> dict | None:
    """The config.json of the run in `out_dir` when it has a checkpoint to continue from, else None."""
    from .checkpoint import CKPT_DIR, CONFIG_FILE, read_json

    out = Path(out_dir)
    if not (out / CONFIG_FILE).is_file() or not any((out / CKPT_DIR).glob("step_*")):
        return None
    saved = read_json(out / CONFIG_FILE)
    return saved if isinstance(saved.get("train"), dict) and isinstance(saved.get("model"), dict) else None


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _count_params(cfg) -> int:
    import torch

    from .model import TTTLM
    with torch.device("meta"):
        return TTTLM(cfg).num_parameters()


def _fmt_summary(summary: dict) -> str:
    parts = [f"steps {summary['steps']}", f"tokens {summary['tokens']:,}"]
    if summary.get("resumed_from") is not None:
        parts.append(f"resumed from step {summary['resumed_from']}")
    for k in ("train_loss", "val_loss", "tokens_per_s"):
        if summary.get(k) is not None:
            parts.append(f"{k} {summary[k]:.4g}")
    if summary.get("stopped"):
        parts.append(f"stopped by {summary['stopped']}")
    parts.append(f"checkpoint {summary['checkpoint']}" if summary["checkpoint"] else "no checkpoint")
    return "done: " + ", ".join(parts)


DEFAULT_N_SEQS = 16


def cmd_eval(args) -> int:
    from .evaluate import evaluate_checkpoints, write_results

    o = _options(EvalOptions, args)
    _check_out_is_dir(o.out)
    device = _check_device(o.device)
    for p in args.checkpoints if o.ttt_backend else ():
        _check_backend(o.ttt_backend, _checkpoint_model_config(p).get("mixer", ""), device)
    n_seqs = _documents_to_eval(o) if o.by_document else _windows_to_eval(o)
    t0 = time.time()
    res = evaluate_checkpoints(args.checkpoints, o.data, seq_len=o.seq_len, chunk_len=o.chunk_len, n_seqs=n_seqs,
                               out_dir=None, split=o.split, batch_size=o.batch_size, n_buckets=o.buckets,
                               device=str(device), names=o.names, allow_other_tokenizer=o.allow_other_tokenizer,
                               ttt_backend=o.ttt_backend, progress=not args.quiet, by_document=o.by_document)
    paths = write_results(res, o.out, train_len=o.train_len)
    _print_eval(res)
    print(f"wrote {paths['json']}, {paths['csv']}, {paths['positions_csv']}, {paths['plot']} "
          f"({time.time() - t0:.1f}s)")
    return 0


def _how_many(o: EvalOptions, room: int, what: str) -> int:
    """--n-seqs, or its default (DEFAULT_N_SEQS, fewer when the split has `room` for fewer, said so)."""
    if o.n_seqs is None:
        if room < DEFAULT_N_SEQS:
            _note(f"the {o.split} split holds {what}; evaluating {room} (not {DEFAULT_N_SEQS})")
        return min(DEFAULT_N_SEQS, room)
    if o.n_seqs > room:
        raise CLIError(f"--n-seqs: the {o.split} split of {o.data} holds {what}; got --n-seqs {o.n_seqs}")
    return o.n_seqs


def _windows_to_eval(o: EvalOptions) -> int:
    from .data import load_meta

    held = int(load_meta(o.data).get(f"{o.split}_tokens", 0))
    room = max(held - 1, 0) // o.seq_len
    if room < 1:
        raise CLIError(f"--seq-len: the {o.split} split of {o.data} holds {held} tokens, not enough for one sequence "
                       f"of {o.seq_len} (+1 target); use --seq-len {max(held - 1, 1)} or less")
    return _how_many(o, room, f"{held:,} tokens, room for {room} sequence(s) of --seq-len {o.seq_len}")


def _documents_to_eval(o: EvalOptions) -> int:
    """--by-document: how many of the split's documents (found at EOS) to evaluate."""
    from .data import document_bounds, load_meta, load_tokens

    if o.chunk_len is not None:
        raise CLIError("--chunk-len: not with --by-document (each pack of documents runs in one forward)")
    meta = load_meta(o.data)
    if "eos_id" not in meta:
        raise CLIError(f"--by-document: {Path(o.data) / 'meta.json'} records no eos_id; prepare the data again "
                       f"with `ttt data`")
    room = len(document_bounds(load_tokens(Path(o.data) / f"{o.split}.bin"), meta["eos_id"])) - 1
    if room < 1:
        raise CLIError(f"--by-document: the {o.split} split of {o.data} holds no document")
    return _how_many(o, room, f"{room} document(s)")


def _print_eval(res: dict) -> None:
    models = res["models"]
    buckets = [(b["start"], b["end"]) for b in models[0]["buckets"]]
    header = ["positions"] + [m["name"] for m in models]
    rows = [[f"{s}-{e}"] + [f"{m['buckets'][i]['nll']:.4f}" for m in models] for i, (s, e) in enumerate(buckets)]
    rows.append(["all (nll)"] + [f"{m['nll']:.4f}" for m in models])
    rows.append(["all (ppl)"] + [f"{m['ppl']:.2f}" for m in models])
    if res.get("by_document"):
        print(f"NLL by position within documents ({res['split']}, {res['n_seqs']} documents, positions up to "
              f"{res['seq_len']}):")
    else:
        print(f"NLL by token position ({res['split']}, {res['n_seqs']} x {res['seq_len']} tokens, "
              f"chunk_len {res['chunk_len']}):")
    _print_table(header, rows)


def _find_tokenizer(o: GenerateOptions, ck) -> tuple[Path, str]:
    """(tokenizer.json, how it was chosen): --tokenizer, else the checkpoint's own, else that of --data,
    else that of the run's training data (config.json records its data_dir)."""
    if o.tokenizer:
        return Path(o.tokenizer), "--tokenizer"
    candidates = [(ck.path / "tokenizer.json", "the checkpoint's tokenizer.json")]
    if o.data:
        candidates.append((Path(o.data) / "tokenizer.json", "the tokenizer of --data"))
    train = ck.config.get("train")
    if isinstance(train, dict) and isinstance(train.get("data_dir"), str):
        candidates.append((Path(train["data_dir"]) / "tokenizer.json", "the tokenizer of the run's training data"))
    for c, how in candidates:
        if c.is_file():
            return c, how
    raise CLIError(f"--tokenizer: no tokenizer.json found (looked in {', '.join(str(c) for c, _ in candidates)}); "
                   f"pass --tokenizer or --data")


def _generate_options(args) -> GenerateOptions:
    import math

    o = _options(GenerateOptions, args)
    if o.prompt is not None and o.prompt_file is not None:
        raise CLIError("--prompt and --prompt-file contradict each other; give one of them")
    if o.prompt is not None:
        try:
            o.prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes that are not UTF-8 reach Python as lone surrogates
            raw = o.prompt[e.start:e.end].encode("utf-8", "surrogateescape")
            raise CLIError(f"--prompt: not UTF-8 text (the bytes {raw.hex(' ')} at character {e.start}); pass "
                           f"UTF-8 text, or a UTF-8 file with --prompt-file") from None
    if o.merge_weights and o.cuda_graph is False:
        raise CLIError("--merge-weights contradicts --no-cuda-graph (the merged weights serve the CUDA-graphed "
                       "decoder); give one of them")
    if o.compile_decode and o.cuda_graph is False:
        raise CLIError("--compile-decode contradicts --no-cuda-graph (the compiled step runs in CUDA graphs); "
                       "give one of them")
    if o.temperature is not None and not (math.isfinite(o.temperature) and o.temperature >= 0):
        raise CLIError(f"--temperature: expected a finite number >= 0, got {o.temperature}")
    if o.top_p is not None and not 0 < o.top_p <= 1:  # nan fails this too
        raise CLIError(f"--top-p: expected a number in (0, 1], got {o.top_p}")
    if o.max_new_tokens < 0:
        raise CLIError(f"--max-new-tokens: expected an int >= 0, got {o.max_new_tokens}")
    sampling = [f for f, v in (("--temperature", o.temperature), ("--top-k", o.top_k), ("--top-p", o.top_p))
                if v is not None]
    if o.greedy and sampling:
        raise CLIError(f"--greedy contradicts {', '.join(sampling)} (greedy decoding always takes the most likely "
                       f"token); give one or the other")
    if o.temperature == 0 and len(sampling) > 1:
        raise CLIError(f"--temperature 0 is greedy decoding and contradicts {', '.join(sampling[1:])}; give one or "
                       f"the other")
    return o


def cmd_generate(args) -> int:
    from .checkpoint import check_tokenizer, load_model
    from .generate import stream_text
    from .tokenizer import Tokenizer

    o = _generate_options(args)
    device = _check_device(o.device)
    for flag, on in (("--cuda-graph", o.cuda_graph), ("--compile-decode", o.compile_decode),
                     ("--merge-weights", o.merge_weights)):
        if on and device.type != "cuda":
            raise CLIError(f"{flag}: CUDA-graph decoding needs a CUDA device, got --device {o.device}")
    if o.ttt_backend:
        _check_backend(o.ttt_backend, _checkpoint_model_config(args.checkpoint).get("mixer", ""), device)
    run = RunOptions(ttt_backend=o.ttt_backend or "auto")
    model, cfg, ck = load_model(args.checkpoint, device, with_checkpoint=True, run=run)
    tok_path, how = _find_tokenizer(o, ck)
    tok = Tokenizer.load(tok_path)
    why = check_tokenizer(tok, ck.meta, cfg.vocab_size, what=f"{how} ({tok_path})", where=str(ck.path))
    if why and (not o.allow_other_tokenizer or tok.vocab_size > cfg.vocab_size):
        hint = "" if tok.vocab_size > cfg.vocab_size else "; pass --allow-other-tokenizer to use it anyway"
        raise CLIError(f"--tokenizer: {why}{hint}")
    if o.cuda_graph and not model.static_decode_state:
        raise CLIError(f"--cuda-graph: a {cfg.mixer} model's decode state grows with the text (its KV cache), so "
                       f"its steps cannot be captured as CUDA graphs; leave --cuda-graph out")
    prompt = o.prompt or ""
    if o.prompt_file:
        try:
            prompt = Path(o.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CLIError(f"--prompt-file: cannot read {o.prompt_file!r} ({e})") from e
    ids = tok.encode(prompt) or [tok.eos_id]  # before any output: an error leaves nothing half-printed
    temperature = DEFAULT_TEMPERATURE if o.temperature is None else o.temperature
    for i in range(o.num_samples):
        seed = None if o.seed is None else o.seed + i
        pieces = stream_text(model, tok, ids, o.max_new_tokens, temperature=temperature, top_k=o.top_k,
                             top_p=o.top_p, greedy=o.greedy, seed=seed, cuda_graph=o.cuda_graph,
                             compile_decode=o.compile_decode, merge_weights=o.merge_weights)
        first = next(pieces, "")  # the prefill and the first step run before the prompt is echoed
        if o.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        sys.stdout.write(prompt + first)
        sys.stdout.flush()
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def _echo(line: str) -> None:
    """Print a line to stdout without tearing a progress bar on stderr."""
    from tqdm import tqdm
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def cmd_demo(args) -> int:
    from .demo import run_demo

    o = _options(DemoOptions, args)
    out = o.out or (QUICK_OUT if o.quick else DEMO_OUT)  # apart: the quick demo never blocks the real one
    run_demo(out, steps=o.steps, minutes=o.minutes, quick=o.quick, seed=o.seed, max_bytes=o.max_bytes,
             eval_len=o.eval_len, train_len=o.train_len, echo=_echo, progress=not args.quiet)
    return 0


# ----------------------------------------------------------------------------- convert / export / lm-eval

def cmd_convert(args) -> int:
    from .convert import convert

    cfg, source = convert(args.src, args.out, tokenizer=args.tokenizer, config=args.config)
    print(f"converted {source['format']} checkpoint {args.src} -> {args.out}: {cfg.mixer}, backbone {cfg.backbone}, "
          f"{cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}"
          + ("" if args.tokenizer else " (no --tokenizer: pass one to `ttt generate` / `ttt lm-eval`)"))
    return 0


def cmd_export(args) -> int:
    from .convert import export_official_pytorch

    export_official_pytorch(args.run, args.out, max_position_embeddings=args.max_position_embeddings)
    print(f"exported {args.run} -> {args.out} ({args.format}: config.json, model.safetensors)")
    return 0


def cmd_lm_eval(args) -> int:
    import json as _json

    from .lm_eval_harness import run_lm_eval

    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks:
        raise CLIError("--tasks: expected a comma-separated list of task names, got nothing")
    try:
        results = run_lm_eval(args.run, tasks, include_path=args.include_path, limit=args.limit,
                              batch_size=args.batch_size, device=args.device, tokenizer=args.tokenizer,
                              max_length=args.max_length)
    except ImportError as e:
        raise CLIError(str(e)) from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(_json.dumps(results, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, out)
    for task, metrics in results["results"].items():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                          if isinstance(v, (int, float)) and "stderr" not in k)
        print(f"{task}: {shown}")
    print(f"wrote {out}")
    return 0


def _add_interop_parsers(sub, fmt) -> None:
    d = sub.add_parser("convert", formatter_class=fmt, help="official TTT checkpoint (JAX or PyTorch) -> run dir",
                       description="Convert a checkpoint of the paper's official code into a run directory that "
                                   "eval, generate, lm-eval and train --init-from load. The format is detected: an "
                                   "EasyLM/JAX streaming checkpoint directory (streaming_train_state, metadata.pkl) "
                                   "or an official PyTorch/transformers folder (config.json + model.safetensors or "
                                   "pytorch_model.bin). See docs/convert.md.")
    d.add_argument("src", metavar="SRC", help="checkpoint directory (or the streaming_train_state file)")
    d.add_argument("--out", required=True, help="run directory to create (must not exist or be empty)")
    d.add_argument("--tokenizer", default=None,
                   help="tokenizer.json to store with the model (the released models use Llama-2's, 32000 tokens)")
    d.add_argument("--config", default=None,
                   help="JSON file of official config fields overriding the checkpoint's (or replacing inference "
                        "from shapes when there is no metadata.pkl)")
    d.set_defaults(func=cmd_convert)

    d = sub.add_parser("export", formatter_class=fmt, help="run dir -> the official PyTorch (transformers) layout",
                       description="Write a model of ours as an official ttt-lm-pytorch folder (config.json, "
                                   "generation_config.json, model.safetensors with the official names).")
    d.add_argument("run", metavar="RUN_DIR", help="a run directory or checkpoint directory")
    d.add_argument("--format", default="official-pytorch", choices=["official-pytorch"], help="target layout")
    d.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    d.add_argument("--max-position-embeddings", type=_pos_int, default=2048,
                   help="max_position_embeddings written to config.json (the official code reads it only for RoPE "
                        "tables; default: 2048)")
    d.set_defaults(func=cmd_export)

    d = sub.add_parser("lm-eval", formatter_class=fmt, help="score a model with lm-evaluation-harness tasks",
                       description="Run lm-evaluation-harness (pip install 'ttt-lm[lm_eval]') on a run directory "
                                   "through its Python API. Documents longer than --max-length are scored in "
                                   "windows with the recurrent state carried across them.")
    d.add_argument("run", metavar="RUN_DIR", help="a run directory or checkpoint directory")
    d.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    d.add_argument("--include-path", default=None, help="directory of extra task YAML files")
    d.add_argument("--limit", type=_pos_int, default=None, help="at most this many documents per task")
    d.add_argument("--batch-size", type=_pos_int, default=8, help="requests per forward (default: 8)")
    d.add_argument("--max-length", type=_pos_int, default=2048,
                   help="tokens per forward window; longer inputs continue with the carried state (default: 2048)")
    d.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run directory's)")
    d.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    d.add_argument("--out", required=True, help="results JSON file to write")
    d.set_defaults(func=cmd_lm_eval)


# ----------------------------------------------------------------------------- parser

def _add_subcommand(sub, name: str, options_cls, func, help: str, description: str, defaults: dict | None = None):
    """A subparser whose options are the fields of `options_cls` (read back with `_options`)."""
    d = sub.add_parser(name, help=help, description=description)
    fields = add_dataclass_options(d, options_cls, defaults=defaults) if options_cls else []
    d.set_defaults(_fields=fields, func=func)
    return d


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ttt", description="Test-Time-Training layers and language models. Start with `ttt demo "
                                        f"--quick` ({QUICK_TIME} on a CPU), then `ttt demo` ({DEMO_TIME}).",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-q", "--quiet", action="store_true",
                   help="only warnings and errors on stderr (no progress log, no progress bars)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="the library's progress log on stderr for demo too (other commands show it unless -q)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from .demo import DemoSettings
    full, quick = DemoSettings.make(), DemoSettings.make(quick=True)
    _add_subcommand(sub, "demo", DemoOptions, cmd_demo, f"the end-to-end demo on the built-in corpus (CPU, {DEMO_TIME})",
                    "Prepare the built-in corpus (Python standard library source) and a BPE, train a small "
                    "TTT-Linear LM and a Transformer of the same size on the CPU, evaluate both by token position "
                    "at a context longer than the training length, and write a plot and a results table into --out.",
                    defaults={k: f"{getattr(full, k)}, {getattr(quick, k)} with --quick"
                              for k in ("steps", "max_bytes", "train_len")})

    d = _add_subcommand(sub, "data", DataOptions, cmd_data, "corpus -> tokenizer -> token shards",
                        "Tokenize corpora into --out: tokenizer.json, train.bin, val.bin, meta.json. A rerun with "
                        "the same sources and settings returns at once.")
    d.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="text files, .jsonl files (one document per line), directories (searched recursively), or "
                        "'stdlib' for the running Python's standard library source (default: stdlib)")

    d = sub.add_parser("train", formatter_class=argparse.RawDescriptionHelpFormatter, help="train a language model",
                       description="Train an LM on a prepared dataset (see `ttt data`). Single process on CPU or "
                                   "GPU; under torchrun, data parallel (DDP or FSDP2). The defaults are the paper's "
                                   f"125m GPU recipe; on a CPU try: {CPU_SUGGESTION}\n\n"
                                   "A run in --out continues from its latest checkpoint: `ttt train --out RUN` takes "
                                   "the options not given from RUN's config.json, and `--steps N` extends (or "
                                   "shortens) it: the learning rate follows the N-step schedule from the resumed "
                                   "step on. Before training, the memory of one step is estimated and a step that "
                                   "does not fit is refused (on a CPU without --micro-batch, the largest micro-batch "
                                   "that fits is taken).")
    from .train import TrainConfig
    d.set_defaults(_train_fields=add_dataclass_options(
        d, TrainConfig, title="training options",
        aliases={"data_dir": ["--data"], "out_dir": ["--out"], "max_steps": ["--steps"]}), func=cmd_train)
    fields = _add_model_options(d)
    d.set_defaults(_model_fields=fields, _run_fields=add_dataclass_options(
        d, RunOptions, title="execution options (how the model runs; not saved in checkpoints)"))

    d = _add_subcommand(sub, "eval", EvalOptions, cmd_eval, "perplexity overall and by token position",
                        "Evaluate checkpoints on the first --n-seqs windows of --seq-len tokens; longer than the "
                        "training length is fine: the model runs over chunks of --chunk-len, carrying its state. "
                        "Writes eval.json, eval.csv, eval_by_position.csv, eval.png.")
    d.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="checkpoint directories, or training out dirs (their latest checkpoint)")

    d = _add_subcommand(sub, "generate", GenerateOptions, cmd_generate, "sample text from a checkpoint (streamed)",
                        "Prefill the prompt in one forward, then decode one token at a time carrying the model "
                        "state; the text is printed as it is produced. Stops at end of document or after "
                        "--max-new-tokens. Uses the tokenizer the checkpoint was trained with (kept in it).")
    d.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint directory or a training out dir")

    d = sub.add_parser("params", formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="parameter counts of the presets",
                       description="Print parameter counts (built on the meta device: instant, no memory). Without "
                                   "--size / --mixer, every preset and mixer (both backbones for TTT).")
    d.set_defaults(_model_fields=_add_model_options(d, ParamsOptions, vocab_default="32000"), func=cmd_params)
    _add_interop_parsers(sub, argparse.RawDescriptionHelpFormatter)
    return p


# ----------------------------------------------------------------------------- errors: library names -> CLI flags

# library argument names whose CLI flag is not simply --name-with-dashes
_LIBRARY_NAMES = {"out_dir": "--out", "data_dir": "--data", "tokenizer_path": "--tokenizer", "max_steps": "--steps",
                  "n": "--n-seqs", "sources": "SOURCE", "n_buckets": "--buckets"}


def _flags_of(parser: argparse.ArgumentParser, command: str) -> tuple[dict, set]:
    """({argument name: flag as typed}, {names of on/off flags}) of one subcommand."""
    sub = parser._subparsers._group_actions[0].choices[command]  # argparse keeps its subparsers there
    names, bools = {}, set()
    for a in sub._actions:
        longs = [o for o in a.option_strings if o.startswith("--") and not o.startswith("--no-")]
        if longs and a.dest != "help":
            names[a.dest] = longs[-1]  # the alias when there is one: --out, --data, --steps
            if isinstance(a, argparse.BooleanOptionalAction):
                bools.add(a.dest)
    for k, v in _LIBRARY_NAMES.items():
        if v == "SOURCE" or v in names.values():
            names.setdefault(k, v)
    return names, bools


def cli_message(msg: str, names: dict, bools: set) -> str:
    """A library error message with argument names replaced by the CLI flags the user typed:
    'n_seqs: ...' -> '--n-seqs: ...', 'overwrite=True' -> '--overwrite', 'seq_len=32' -> '--seq-len 32'."""
    import re

    def lead(m):
        parts = m.group(1).split("/")
        return "/".join(names[p] for p in parts) + ":" if all(p in names for p in parts) else m.group(0)

    msg = re.sub(r"^([A-Za-z_]\w*(?:/[A-Za-z_]\w*)*):", lead, msg)

    def assign(m):
        name, value = m.group(1), m.group(2)
        if name not in names:
            return m.group(0)
        if name in bools and value in ("True", "False"):
            return names[name] if value == "True" else "--no-" + names[name][2:]
        return f"{names[name]} {value}"

    msg = re.sub(r"(?<![\w/.\-'\"])([a-z_][a-z0-9_]*)=(True|False|[\w.\-]+)", assign, msg)
    # argument names in prose ("or another out_dir"); only identifiers with "_", never inside paths/quotes
    msg = re.sub(r"(?<![\w/.\-'\"*])([a-z]+_[a-z0-9_]*)(?![\w/.\-'\"*=])",
                 lambda m: names.get(m.group(1), m.group(0)), msg)
    if "holds no meta.json" in msg:
        msg += "; run `ttt data` first to prepare it"
    return msg


class _TqdmHandler(logging.Handler):
    """Log lines to stderr through tqdm.write, so they do not tear a progress bar."""

    def emit(self, record):
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet = args.quiet or (args.command == "demo" and not args.verbose)
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, handlers=[handler])
    try:
        return args.func(args) or 0
    except KeyboardInterrupt as e:
        print(f"ttt {args.command}: interrupted{f' ({e})' if str(e) else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `ttt params | head`: the reader has gone, nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (CLIError, ValueError, OSError, UnicodeDecodeError, ImportError) as e:
        if os.environ.get("TTT_DEBUG"):
            raise
        if isinstance(e, OSError) and e.strerror:  # raised by the system, not by the library's own checks
            msg = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                msg += " (the disk is full: free some space, or choose another output directory); nothing half-written was left"
            elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                msg += " (choose a writable output directory)"
            elif e.errno in (errno.EEXIST, errno.ENOTDIR):
                msg += " (a path that should be a directory is a file; choose another --out)"
        else:
            msg = " ".join(str(e).split()) or type(e).__name__
        names, bools = _flags_of(parser, args.command)
        print(f"ttt {args.command}: error: {cli_message(msg, names, bools)}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
