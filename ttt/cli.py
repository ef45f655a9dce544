"""The `ttt` command line: demo, data, train, eval, generate, params.

    ttt demo --out demo_out                     # corpus -> tokenizer -> TTT-Linear vs Transformer -> plot
    ttt data stdlib --out data --vocab-size 4096
    ttt train --data data --out runs/a --size tiny --mixer ttt_linear --steps 300
    ttt eval runs/a runs/b --data data --seq-len 1024 --chunk-len 256 --out eval_out
    ttt generate runs/a --prompt "def main(" --max-new-tokens 200 --top-p 0.9 --seed 0
    ttt params                                  # every preset; or --size 125m --mixer ttt_linear

Model and training options are generated from the help metadata of the ModelConfig and TrainConfig
fields, so `--help` always lists every field. Bad input (missing or empty corpus, unreadable or
corrupt files, an out dir that belongs to another run) prints one line to stderr and exits with 2;
set TTT_DEBUG=1 to see the traceback instead. This module is the only place that prints.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
import typing
from pathlib import Path

EXIT_BAD_INPUT = 2


class CLIError(Exception):
    """Bad input found by the CLI itself; reported as one line, exit code 2."""


# ----------------------------------------------------------------------------- dataclass -> options

def _optional(conv):
    def parse(s: str):
        return None if s.lower() in ("none", "null", "") else conv(s)
    parse.__name__ = conv.__name__  # argparse names the type in its error messages
    return parse


def _field_kind(tp) -> tuple:
    """(converter, is_bool, nullable) for a dataclass field type."""
    args = typing.get_args(tp)
    nullable = type(None) in args
    if args:
        inner = [a for a in args if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else str
    if tp is bool:
        return None, True, nullable
    if tp in (int, float, str):
        return tp, False, nullable
    return str, False, nullable


def add_dataclass_options(parser, cls, *, prefix: str = "", skip=(), preset_fields=(), title: str | None = None,
                          defaults: dict | None = None, aliases: dict | None = None) -> list[tuple[str, str]]:
    """Add one option per field of `cls` (help from metadata["help"]), plus `aliases` {field: [flags]}.
    Every option defaults to None (= keep the config's value); returns [(field name, argparse dest)]."""
    group = parser.add_argument_group(title) if title else parser
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        conv, is_bool, nullable = _field_kind(hints[f.name])
        flags = ["--" + (prefix + f.name).replace("_", "-"), *(aliases or {}).get(f.name, ())]
        dest = (prefix + f.name).replace("-", "_")
        help_text = f.metadata.get("help", f.name)
        if f.name in preset_fields:
            help_text += " (default: from the --size preset)"
        elif f.name in (defaults or {}):
            help_text += f" (default: {defaults[f.name]})"
        else:
            help_text += f" (default: {f.default!r})"
        if is_bool:
            group.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            metavar = {int: "INT", float: "FLOAT", str: "STR"}.get(conv, "VALUE")
            if nullable:
                help_text += "; 'none' for None"
            group.add_argument(*flags, dest=dest, type=_optional(conv) if nullable else conv, default=None,
                               metavar=metavar, help=help_text)
        out.append((f.name, dest))
    return out


def _collect(args, mapping) -> dict:
    return {name: getattr(args, dest) for name, dest in mapping if getattr(args, dest) is not None}


# ----------------------------------------------------------------------------- model options

def _add_model_options(parser, *, with_vocab: bool = True):
    from .config import BACKBONES, MIXERS, SIZES, ModelConfig

    parser.add_argument("--size", default="125m", choices=list(SIZES),
                        help="model preset: layers, width, heads and FFN width (SPEC section 7); 'debug' and 'tiny' "
                             "are CPU sizes; the training defaults are the 125m recipe (default: 125m)")
    parser.add_argument("--mixer", default="ttt_linear", choices=list(MIXERS),
                        help="sequence mixer: TTT-Linear, TTT-MLP, or a baseline (attention = Transformer++, "
                             "mamba = Mamba-2 style) (default: ttt_linear)")
    parser.add_argument("--backbone", default="mamba", choices=list(BACKBONES),
                        help="TTT block style: mamba (M: extra conv, gated TTT) or transformer (T); baselines always "
                             "use plain pre-norm blocks (default: mamba)")
    skip = ("mixer", "backbone") + (() if with_vocab else ("vocab_size",))
    preset = ("d_model", "n_layers", "n_heads", "ffn_hidden", "mamba_head_dim")
    defaults = {"vocab_size": "the dataset's vocabulary"} if with_vocab else None
    return add_dataclass_options(parser, ModelConfig, prefix="", skip=skip, preset_fields=preset,
                                 title="model options (override the preset)", defaults=defaults)


def _model_config(args, mapping, vocab_size: int | None = None):
    from .config import get_config

    overrides = _collect(args, mapping)
    if vocab_size is not None:
        overrides.setdefault("vocab_size", vocab_size)
    return get_config(args.size, mixer=args.mixer, backbone=args.backbone, **overrides)


# ----------------------------------------------------------------------------- subcommands

def cmd_params(args) -> int:
    import torch

    from .config import BACKBONES, MIXERS, SIZES, get_config
    from .model import TTTLM

    sizes = [args.size] if args.size else list(SIZES)
    mixers = [args.mixer] if args.mixer else list(MIXERS)
    overrides = _collect(args, args._model_fields)
    overrides.setdefault("vocab_size", 32000)
    rows = []
    for size in sizes:
        for mixer in mixers:
            if not mixer.startswith("ttt"):
                backbones = ["transformer"]  # baselines: plain pre-norm blocks only
            else:
                backbones = [args.backbone] if args.backbone else list(BACKBONES)
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


def cmd_data(args) -> int:
    from .data import STDLIB, prepare

    sources = args.sources or [STDLIB]
    t0 = time.time()
    meta = prepare(sources, args.out, vocab_size=args.vocab_size, tokenizer_path=args.tokenizer,
                   val_fraction=args.val_fraction, val_docs=args.val_docs, seed=args.seed,
                   text_field=args.text_field, extensions=args.extensions, max_docs=args.max_docs,
                   max_bytes=args.max_bytes, overwrite=args.overwrite)
    print(f"prepared {args.out} in {time.time() - t0:.1f}s: vocab {meta['vocab_size']}, "
          f"train {meta['train_tokens']:,} tokens ({meta['train_docs']} docs), "
          f"val {meta['val_tokens']:,} tokens ({meta['val_docs']} docs), {meta['dtype']}")
    return 0


def cmd_train(args) -> int:
    from .data import load_meta
    from .train import TrainConfig, train

    train_cfg = TrainConfig(**_collect(args, args._train_fields))
    model_cfg = _model_config(args, args._model_fields, load_meta(train_cfg.data_dir)["vocab_size"])
    if train_cfg.init_from:  # fine-tuning: the model is the one of --init-from
        from .train import init_model_config
        model_cfg = init_model_config(train_cfg.init_from, model_cfg, load_meta(train_cfg.data_dir)["vocab_size"])
        args.size = f"the model of {train_cfg.init_from}"
    print(f"model: {model_cfg.mixer} ({args.size}, backbone {model_cfg.backbone}), "
          f"{_count_params(model_cfg):,} parameters; run dir {train_cfg.out_dir}", flush=True)
    summary = train(model_cfg, train_cfg)
    print(_fmt_summary(summary))
    return 0


def _count_params(cfg) -> int:
    import torch

    from .model import TTTLM
    with torch.device("meta"):
        return TTTLM(cfg).num_parameters()


def _fmt_summary(summary: dict) -> str:
    parts = [f"steps {summary['steps']}", f"tokens {summary['tokens']:,}"]
    for k in ("train_loss", "val_loss", "tokens_per_s"):
        if summary.get(k) is not None:
            parts.append(f"{k} {summary[k]:.4g}")
    if summary.get("stopped"):
        parts.append(f"stopped by {summary['stopped']}")
    parts.append(f"checkpoint {summary['checkpoint']}")
    return "done: " + ", ".join(parts)


def cmd_eval(args) -> int:
    from .evaluate import evaluate_checkpoints, write_results

    t0 = time.time()
    res = evaluate_checkpoints(args.checkpoints, args.data, seq_len=args.seq_len, chunk_len=args.chunk_len,
                               n_seqs=args.n_seqs, out_dir=None, split=args.split, batch_size=args.batch_size,
                               n_buckets=args.buckets, device=args.device, names=args.names)
    paths = write_results(res, args.out, train_len=args.train_len)
    _print_eval(res)
    print(f"wrote {paths['json']}, {paths['csv']}, {paths['positions_csv']}, {paths['plot']} "
          f"({time.time() - t0:.1f}s)")
    return 0


def _print_eval(res: dict) -> None:
    models = res["models"]
    buckets = [(b["start"], b["end"]) for b in models[0]["buckets"]]
    header = ["positions"] + [m["name"] for m in models]
    rows = [[f"{s}-{e}"] + [f"{m['buckets'][i]['nll']:.4f}" for m in models] for i, (s, e) in enumerate(buckets)]
    rows.append(["all (nll)"] + [f"{m['nll']:.4f}" for m in models])
    rows.append(["all (ppl)"] + [f"{m['ppl']:.2f}" for m in models])
    print(f"NLL by token position ({res['split']}, {res['n_seqs']} x {res['seq_len']} tokens, "
          f"chunk_len {res['chunk_len']}):")
    _print_table(header, rows)


def _find_tokenizer(args, ckpt_path: Path) -> Path:
    """--tokenizer, else tokenizer.json of --data, of the checkpoint dir, or of the run's training data."""
    from .checkpoint import CONFIG_FILE, read_json, resolve

    if args.tokenizer:
        return Path(args.tokenizer)
    ck = resolve(ckpt_path)
    candidates = [Path(args.data) / "tokenizer.json"] if args.data else []
    candidates += [ck / "tokenizer.json", ckpt_path / "tokenizer.json"]
    train = read_json(ck / CONFIG_FILE).get("train")  # the trainer records its data_dir there
    if isinstance(train, dict) and isinstance(train.get("data_dir"), str):
        candidates.append(Path(train["data_dir"]) / "tokenizer.json")
    for c in candidates:
        if c.is_file():
            return c
    raise CLIError(f"--tokenizer: no tokenizer.json found (looked in {', '.join(str(c) for c in candidates)}); "
                   f"pass --tokenizer or --data")


def cmd_generate(args) -> int:
    from .checkpoint import load_model
    from .generate import stream_text
    from .tokenizer import Tokenizer

    model, cfg = load_model(args.checkpoint, args.device)
    tok = Tokenizer.load(_find_tokenizer(args, Path(args.checkpoint)))
    if tok.vocab_size > cfg.vocab_size:
        raise CLIError(f"--tokenizer: its vocabulary ({tok.vocab_size}) is larger than the model's "
                       f"({cfg.vocab_size}); it is not the tokenizer this model was trained with")
    prompt = args.prompt
    if args.prompt_file:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CLIError(f"--prompt-file: cannot read {args.prompt_file!r} ({e})") from e
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        sys.stdout.write(prompt)
        seed = None if args.seed is None else args.seed + i
        for piece in stream_text(model, tok, prompt, args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, greedy=args.greedy, seed=seed,
                                 cuda_graph=args.cuda_graph, compile_decode=args.compile_decode):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, steps=args.steps, minutes=args.minutes, quick=args.quick, seed=args.seed,
             max_bytes=args.max_bytes, eval_len=args.eval_len, train_len=args.train_len,
             echo=lambda s: print(s, flush=True))
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

def _pos_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {s}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ttt", description="Test-Time-Training layers and language models.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr (no progress log)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="the library's progress log on stderr for demo too (other commands show it unless -q)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    # demo
    d = sub.add_parser("demo", formatter_class=fmt, help="the end-to-end demo on the built-in corpus (CPU, minutes)",
                       description="Prepare the built-in corpus (Python standard library source) and a 4096-token "
                                   "BPE, train a small TTT-Linear LM and a Transformer of the same size on the CPU, "
                                   "evaluate both by token position at a context longer than the training length, "
                                   "and write a plot and a results table into --out.")
    d.add_argument("--out", default="demo_out", help="output directory; a rerun with the same settings reuses its "
                                                     "prepared data (default: demo_out)")
    from .demo import DemoSettings
    full, quick = DemoSettings.make(), DemoSettings.make(quick=True)
    d.add_argument("--steps", type=_pos_int, default=None,
                   help=f"training steps per model (default: {full.steps}, {quick.steps} with --quick)")
    d.add_argument("--minutes", type=float, default=None,
                   help="wall-clock budget for training both models, in minutes (half each); a model whose budget "
                        "runs out stops early and is evaluated as it is (default: no budget)")
    d.add_argument("--quick", action="store_true",
                   help=f"a smoke run for tests: a {quick.max_bytes // 1000} kB corpus, '{quick.size}'-size models, "
                        f"{quick.steps} steps, done in well under a minute")
    d.add_argument("--seed", type=int, default=None, help="seed of the data split and order, init and sampling "
                                                          "(default: 0)")
    d.add_argument("--max-bytes", type=_pos_int, default=None,
                   help=f"corpus size limit in bytes (default: {full.max_bytes}, {quick.max_bytes} with --quick)")
    d.add_argument("--train-len", type=_pos_int, default=None,
                   help=f"training context length (default: {full.train_len}, {quick.train_len} with --quick)")
    d.add_argument("--eval-len", type=_pos_int, default=None,
                   help="evaluation context length, fed in chunks of --train-len with the state carried over "
                        "(default: 4 x --train-len)")
    d.set_defaults(func=cmd_demo)

    # data
    d = sub.add_parser("data", formatter_class=fmt, help="corpus -> tokenizer -> token shards",
                       description="Tokenize corpora into OUT: tokenizer.json, train.bin, val.bin, meta.json. "
                                   "A rerun with the same sources and settings returns at once.")
    d.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="text files, .jsonl files (one document per line), directories (searched recursively), or "
                        "'stdlib' for the running Python's standard library source (default: stdlib)")
    d.add_argument("--out", required=True, help="output directory of the prepared dataset")
    d.add_argument("--vocab-size", type=_pos_int, default=8192, help="BPE vocabulary size, at least 257 (default: 8192)")
    d.add_argument("--tokenizer", default=None, help="use this tokenizer.json instead of training one")
    d.add_argument("--val-fraction", type=float, default=0.01,
                   help="fraction of documents held out for validation, by a hash of their name (default: 0.01)")
    d.add_argument("--val-docs", type=int, default=None, help="hold out exactly this many documents instead")
    d.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default: 0)")
    d.add_argument("--text-field", default="text", help="JSON field holding the text in .jsonl files (default: text)")
    d.add_argument("--extensions", nargs="+", default=[".txt", ".md", ".rst", ".py", ".jsonl"],
                   help="file suffixes read from directories (default: .txt .md .rst .py .jsonl)")
    d.add_argument("--max-docs", type=_pos_int, default=None, help="stop after this many documents")
    d.add_argument("--max-bytes", type=_pos_int, default=None, help="stop after the document reaching this many bytes")
    d.add_argument("--overwrite", action="store_true", help="replace a dataset of other sources/settings in --out")
    d.set_defaults(func=cmd_data)

    # train
    d = sub.add_parser("train", formatter_class=fmt, help="train a language model",
                       description="Train an LM on a prepared dataset (see `ttt data`). Single process on CPU or "
                                   "GPU; under torchrun, data parallel (DDP or FSDP2).")
    from .train import TrainConfig
    d.set_defaults(_train_fields=add_dataclass_options(
        d, TrainConfig, title="training options",
        aliases={"data_dir": ["--data"], "out_dir": ["--out"], "max_steps": ["--steps"]}), func=cmd_train)
    d.set_defaults(_model_fields=_add_model_options(d))

    # eval
    d = sub.add_parser("eval", formatter_class=fmt, help="perplexity overall and by token position",
                       description="Evaluate checkpoints on the first --n-seqs windows of --seq-len tokens; longer "
                                   "than the training length is fine: the model runs over chunks of --chunk-len, "
                                   "carrying its state. Writes eval.json, eval.csv, eval_by_position.csv, eval.png.")
    d.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="checkpoint directories, or training out dirs (their latest checkpoint)")
    d.add_argument("--data", required=True, help="a dataset directory prepared by `ttt data`")
    d.add_argument("--split", default="val", choices=["val", "train"], help="which shard (default: val)")
    d.add_argument("--seq-len", type=_pos_int, default=1024, help="tokens per evaluated sequence (default: 1024)")
    d.add_argument("--chunk-len", type=_pos_int, default=None,
                   help="tokens per forward, state carried between chunks (default: the whole sequence at once)")
    d.add_argument("--n-seqs", type=_pos_int, default=16, help="number of sequences (default: 16)")
    d.add_argument("--batch-size", type=_pos_int, default=8, help="sequences per forward (default: 8)")
    d.add_argument("--buckets", type=_pos_int, default=16, help="number of log-spaced position buckets (default: 16)")
    d.add_argument("--names", nargs="+", default=None, help="legend names, one per checkpoint (default: dir names)")
    d.add_argument("--train-len", type=_pos_int, default=None,
                   help="mark this training context length on the plot (default: the checkpoints' own, when they "
                        "agree)")
    d.add_argument("--out", default="eval_out", help="output directory (default: eval_out)")
    d.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    d.set_defaults(func=cmd_eval)

    # generate
    d = sub.add_parser("generate", formatter_class=fmt, help="sample text from a checkpoint (streamed)",
                       description="Prefill the prompt in one forward, then decode one token at a time carrying "
                                   "the model state; the text is printed as it is produced. Stops at EOS or after "
                                   "--max-new-tokens.")
    d.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint directory or a training out dir")
    d.add_argument("--prompt", default="", help="prompt text; empty starts a new document (default: empty)")
    d.add_argument("--prompt-file", default=None, help="read the prompt from this UTF-8 file instead")
    d.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most (default: 200)")
    d.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy (default: 0.8)")
    d.add_argument("--top-k", type=_pos_int, default=None, help="sample among the k most likely tokens (default: all)")
    d.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling: the smallest set of tokens holding this probability (default: 1, off)")
    d.add_argument("--greedy", action="store_true", help="always take the most likely token")
    d.add_argument("--seed", type=int, default=None, help="seed for reproducible samples (default: random)")
    d.add_argument("--num-samples", type=_pos_int, default=1, help="number of samples (seeds seed, seed+1, ...)")
    d.add_argument("--tokenizer", default=None,
                   help="tokenizer.json (default: the one of --data, of the checkpoint, or of its training data)")
    d.add_argument("--data", default=None, help="dataset directory whose tokenizer.json to use")
    d.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    d.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay each decode step as a captured CUDA graph (default: on for CUDA TTT/Mamba models)")
    d.add_argument("--compile-decode", action="store_true",
                   help="torch.compile the decode step before capturing its CUDA graphs (fuses the element-wise "
                        "work; compiles once per model and batch size)")
    d.set_defaults(func=cmd_generate)

    # params
    d = sub.add_parser("params", formatter_class=fmt, help="parameter counts of the presets",
                       description="Print parameter counts (built on the meta device: instant, no memory). Without "
                                   "--size / --mixer, every preset and mixer (both backbones for TTT).")
    from .config import BACKBONES, MIXERS, SIZES, ModelConfig
    d.add_argument("--size", default=None, choices=list(SIZES), help="one preset (default: all)")
    d.add_argument("--mixer", default=None, choices=list(MIXERS), help="one mixer (default: all)")
    d.add_argument("--backbone", default=None, choices=list(BACKBONES),
                   help="TTT backbone (default: both for TTT mixers)")
    d.set_defaults(_model_fields=add_dataclass_options(
        d, ModelConfig, skip=("mixer", "backbone"), preset_fields=("d_model", "n_layers", "n_heads", "ffn_hidden",
                                                                   "mamba_head_dim"),
        title="model options (override the preset)", defaults={"vocab_size": 32000}), func=cmd_params)
    _add_interop_parsers(sub, fmt)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet = args.quiet or (args.command == "demo" and not args.verbose)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt as e:
        print(f"ttt {args.command}: interrupted{f' ({e})' if str(e) else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `ttt params | head`: the reader has gone, nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (CLIError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
            UnicodeDecodeError) as e:
        if os.environ.get("TTT_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"ttt {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
