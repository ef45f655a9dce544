"""Small-scale replication of the paper's two findings with this library: loss by token position for
TTT-Linear (M), TTT-MLP (M), Transformer++ and Mamba-2 at matched parameter counts and token budgets,
trained at two context lengths; and the ablation ladder of its Table 1 plus mini-batch sizes b.

    python benchmarks/replicate.py --smoke --out DIR                 # everything, tiny, on the CPU (~1 min)
    python benchmarks/replicate.py --stage data --out DIR            # GPU runs: corpus + tokenizer, once
    python benchmarks/replicate.py --stage train --ctx 2048 --models ttt_linear,attention --out DIR --device cuda:0
    python benchmarks/replicate.py --stage ablation --rungs 0-3 --out DIR --device cuda:1
    python benchmarks/replicate.py --stage report --out DIR          # tables and plots from the run outputs

Corpus: the `.py` files under this interpreter's site-packages (`sysconfig.get_paths()["purelib"]`), long
documents present on any machine with a Python environment, no download; `--corpus DIR` takes another
directory, and `--smoke` uses the standard library's sources. Each (model, context) run writes
DIR/runs/<name>/result.json (config, parameter count, tokens trained, wall time, validation loss by
position); a run whose result exists is skipped, so a stage split over several device commands resumes.
`--minutes` caps each run's training time (the result records the tokens actually seen). The report
stage reads only those files: DIR/results.md and DIR/loss_by_position_<ctx>.png.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import sysconfig
import time
import types
from pathlib import Path

import torch

from ttt.config import get_config
from ttt.data import Batcher, eval_sequences, load_meta, load_tokens, prepare
from ttt.layers.mamba import load_mamba_ssm
from ttt.model import TTTLM

MODELS = ("ttt_linear", "ttt_mlp", "attention", "mamba")
LABELS = {"ttt_linear": "TTT-Linear (M)", "ttt_mlp": "TTT-MLP (M)", "attention": "Transformer++",
          "mamba": "Mamba-2"}
# name: (n_layers, d_model, n_heads, ffn_hidden) of the TTT-Linear reference model; others are matched to it
SIZES = {"smoke": (2, 64, 4, 176), "small": (6, 384, 6, 1024), "main": (12, 512, 8, 1376)}
MATCH_TOL = 0.03
# Table 1 rungs the layer switches reach: (name, config overrides); b = None means b = the context length
LADDER = [
    ("linear attention (b=T, no LN/residual, fixed eta, W0=0, (T))",
     dict(backbone="transformer", mini_batch=None, ttt_inner_ln=False, ttt_inner_residual=False,
          ttt_learn_lr=False, ttt_learn_init=False)),
    ("+ learnable W0", dict(backbone="transformer", mini_batch=None, ttt_inner_ln=False, ttt_inner_residual=False,
                            ttt_learn_lr=False)),
    ("+ LN and residual in f", dict(backbone="transformer", mini_batch=None, ttt_learn_lr=False)),
    ("+ mini-batch TTT (b=16)", dict(backbone="transformer", mini_batch=16, ttt_learn_lr=False)),
    ("+ learnable eta", dict(backbone="transformer", mini_batch=16)),
    ("+ Mamba backbone (M)", dict(backbone="mamba", mini_batch=16)),
]
BATCH_SIZES = (4, 16, 64)


def fail(msg: str):
    print(f"replicate.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def mamba_kernels_or_fail() -> None:
    """Make mamba_ssm's Triton SSD kernels importable for the Mamba-2 runs on CUDA. A normal install imports
    as is; the pure-Python wheel (no CUDA extension, whose absence breaks the package __init__) is loaded by
    registering the package without running its __init__ -- the Triton submodules do not need the extension."""
    try:
        load_mamba_ssm()
        return
    except RuntimeError as first:
        spec = importlib.util.find_spec("mamba_ssm") if "mamba_ssm" not in sys.modules else None
        if spec is None or spec.submodule_search_locations is None:
            fail(f"--models mamba on CUDA needs mamba_ssm ({first}); or run with --device cpu")
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["mamba_ssm"] = pkg
    try:
        load_mamba_ssm()
    except RuntimeError as e:
        fail(f"--models mamba on CUDA: {e}")
    print("mamba_ssm: Triton SSD kernels loaded without the package's CUDA extension", flush=True)


# ------------------------------------------------------------------------------------------ data

def stage_data(a) -> dict:
    if a.smoke:
        sources, exts, max_bytes, vocab = "stdlib", (".py",), 1_500_000, 512
    else:
        sources = a.corpus or sysconfig.get_paths()["purelib"]
        exts, max_bytes, vocab = (".py",), a.max_mb << 20, a.vocab
    meta = prepare(sources, a.out / "data", vocab_size=vocab, extensions=exts, max_bytes=max_bytes,
                   val_fraction=0.02 if a.smoke else 0.01)
    print(f"data: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens from {sources} "
          f"(vocab {vocab})", flush=True)
    return meta


def data_vocab(a) -> int:
    try:
        return load_meta(a.out / "data")["vocab_size"]
    except (OSError, ValueError, KeyError):
        fail(f"--out: no prepared corpus under {a.out / 'data'}; run `--stage data --out {a.out}` first")


# --------------------------------------------------------------------------------- model configs

def n_params(cfg) -> int:
    with torch.device("meta"):
        return TTTLM(cfg).num_parameters(exclude_embedding=True)


def matched_configs(size: str, vocab: int, models) -> dict:
    """Configs of `models` whose non-embedding parameter counts are within 3% of TTT-Linear (M)'s: the FFN
    width is tuned for TTT-MLP and the Transformer, the layer count and state size for Mamba-2."""
    L, D, H, F = SIZES[size]
    base = dict(vocab_size=vocab, n_layers=L, d_model=D, n_heads=H)
    ref = get_config("125m", mixer="ttt_linear", ffn_hidden=F, **base)
    target = n_params(ref)
    out = {}
    for m in models:
        if m == "ttt_linear":
            out[m] = ref
            continue
        if m == "mamba":
            cands = [get_config("125m", mixer="mamba", **{**base, "n_layers": nl}, mamba_d_state=ds)
                     for nl in range(L, 3 * L + 1) for ds in range(16, 257, 16)]
        else:
            cands = [get_config("125m", mixer=m, ffn_hidden=f, **base) for f in range(8, 4 * F, 8)]
        best = min(cands, key=lambda c: abs(n_params(c) - target))
        if abs(n_params(best) - target) > MATCH_TOL * target:
            raise RuntimeError(f"{m}: no config within 3% of {target} parameters (best {n_params(best)})")
        out[m] = best
    return out


# ------------------------------------------------------------------------------------ train + eval

def loss_by_position(model, x, y, micro: int, device, autocast) -> torch.Tensor:
    """Mean validation NLL at each position [T] over the sequences x, y [n, T]."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for i in range(0, len(x), micro):
            with autocast():
                nll, _ = model(x[i:i + micro].to(device), targets=y[i:i + micro].to(device), reduction="none")
            total += nll.double().sum(0).cpu()
    model.train()
    return total / len(x)


def train_one(name: str, cfg, a, ctx: int, device) -> dict:
    """Train one model for a.tokens tokens (or a.minutes) at context ctx; evaluate loss by position."""
    out = a.out / "runs" / name
    if (out / "result.json").exists():
        print(f"{name}: done before, skipped", flush=True)
        return json.loads((out / "result.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    data = a.out / "data"
    torch.manual_seed(a.seed)
    model = TTTLM(cfg).to(device)
    batch = max(1, a.batch_tokens // ctx)
    steps = max(1, a.tokens // (batch * ctx))
    micro = max(1, min(batch, a.micro_tokens // ctx))
    while batch % micro:
        micro -= 1
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.1 + 0.9 * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warm) / max(1, steps - warm))))))
    cuda = device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    batcher = Batcher(load_tokens(data / "train.bin"), batch, ctx, seed=a.seed)
    t0, seen, log = time.time(), 0, []
    for step in range(steps):
        x, y = batcher.batch(step)
        loss_sum = 0.0
        for i in range(0, batch, micro):
            with autocast():
                loss, _ = model(x[i:i + micro].to(device), targets=y[i:i + micro].to(device))
            (loss * (micro / batch)).backward()
            loss_sum += loss.item() * micro / batch
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        seen += batch * ctx
        log.append((step, round(loss_sum, 4)))
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            print(f"{name}: step {step + 1}/{steps} loss {loss_sum:.4f} {seen / (time.time() - t0):,.0f} tok/s",
                  flush=True)
        if a.minutes and time.time() - t0 > 60 * a.minutes:
            print(f"{name}: stopped by --minutes {a.minutes} after {seen:,} tokens", flush=True)
            break
    train_s = time.time() - t0
    vx, vy = eval_sequences(load_tokens(data / "val.bin"), ctx, None)
    vx, vy = vx[:a.eval_seqs], vy[:a.eval_seqs]
    curve = loss_by_position(model, vx, vy, micro, device, autocast)
    res = dict(name=name, mixer=cfg.mixer, ctx=ctx, config=cfg.to_dict(), params=n_params(cfg),
               params_total=model.num_parameters(), tokens=seen, token_budget=a.tokens, steps=len(log),
               batch=batch, lr=a.lr, train_seconds=round(train_s, 1), tokens_per_s=round(seen / train_s),
               device=str(torch.cuda.get_device_name(device) if cuda else "cpu"), eval_seqs=len(vx),
               val_loss=float(curve.mean()), loss_by_position=[round(float(v), 5) for v in curve],
               train_loss=log[-20:])
    write_json(out / "result.json", res)
    print(f"{name}: val loss {res['val_loss']:.4f} ({len(vx)} x {ctx} tokens), {train_s:.0f} s", flush=True)
    return res


def stage_train(a, device) -> None:
    vocab = data_vocab(a)
    cfgs = matched_configs(a.size, vocab, a.models)
    if "mamba" in cfgs:  # the Mamba-2 baseline runs mamba_ssm's kernels on CUDA, named explicitly
        if device.type == "cuda":
            mamba_kernels_or_fail()
        cfgs["mamba"].mamba_backend = "mamba_ssm" if device.type == "cuda" else "torch"
    for ctx in a.ctx:
        for m, cfg in cfgs.items():
            train_one(f"ctx{ctx}_{m}", cfg, a, ctx, device)


def stage_ablation(a, device) -> None:
    vocab = data_vocab(a)
    L, D, H, F = SIZES[a.size]
    ctx = a.ctx[0]
    runs = [(f"ladder{i}", over) for i, (_, over) in enumerate(LADDER) if i in a.rungs]
    last = len(LADDER) - 1  # the last rung is (M) with b = 16: the b = 16 run of the mini-batch sweep
    runs += [(f"b{b}", dict(backbone="mamba", mini_batch=b)) for b in a.batch_sizes
             if not (b == 16 and last in a.rungs)]
    for name, over in runs:
        over = {**over, "mini_batch": over["mini_batch"] or ctx}
        cfg = get_config("125m", mixer="ttt_linear", vocab_size=vocab, n_layers=L, d_model=D, n_heads=H,
                         ffn_hidden=F, **over)
        train_one(f"abl_ctx{ctx}_{name}", cfg, a, ctx, device)


# ---------------------------------------------------------------------------------------- report

def bins(curve, n=8):
    """Mean loss over n equal spans of positions."""
    T = len(curve)
    return [sum(curve[i * T // n:(i + 1) * T // n]) / max(1, (i + 1) * T // n - i * T // n) for i in range(n)]


def stage_report(a) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted((json.loads(p.read_text()) for p in (a.out / "runs").glob("*/result.json")),
                  key=lambda r: r["name"])
    if not runs:
        fail(f"--out: no run results under {a.out / 'runs'}; run the train stage first")
    lines = ["# Replication results", "", "Generated by `benchmarks/replicate.py --stage report` from "
             "runs/*/result.json; validation loss (nats/token) on held-out documents.", ""]
    main = [r for r in runs if r["name"].startswith("ctx")]
    for ctx in sorted({r["ctx"] for r in main}):
        rs = [r for r in main if r["ctx"] == ctx]
        lines += [f"## Context {ctx}", "", "| model | params (non-emb.) | tokens | val loss | loss by position, "
                  "8 equal spans (first .. last) | last span - first-half mean | tok/s | device |",
                  "|---|---|---|---|---|---|---|---|"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in rs:
            c = r["loss_by_position"]
            b = bins(c)
            gain = b[-1] - sum(b[:4]) / 4
            lines.append(f"| {LABELS.get(r['mixer'], r['mixer'])} | {r['params']:,} | {r['tokens']:,} | "
                         f"{r['val_loss']:.4f} | {' '.join(f'{v:.3f}' for v in b)} | {gain:+.4f} | "
                         f"{r['tokens_per_s']:,} | {r['device']} |")
            k = max(1, len(c) // 64)  # smooth over spans of len/64 positions for the plot
            xs = [min(len(c), (i + 1) * k) for i in range(len(c) // k)]
            ys = [sum(c[i * k:(i + 1) * k]) / k for i in range(len(c) // k)]
            ax.plot(xs, ys, label=LABELS.get(r["mixer"], r["mixer"]))
        ax.set_xscale("log")
        ax.set_xlabel("token position")
        ax.set_ylabel("validation loss (nats)")
        ax.set_title(f"Loss by position, trained at context {ctx}")
        ax.legend()
        fig.tight_layout()
        png = a.out / f"loss_by_position_{ctx}.png"
        fig.savefig(png.with_suffix(".tmp.png"), dpi=100)
        os.replace(png.with_suffix(".tmp.png"), png)
        plt.close(fig)
        lines += ["", f"![loss by position at {ctx}](loss_by_position_{ctx}.png)", ""]
    abl = {r["name"].split("_", 2)[2]: r for r in runs if r["name"].startswith("abl_")}
    ladder = [(n, abl[f"ladder{i}"]) for i, (n, _) in enumerate(LADDER) if f"ladder{i}" in abl]
    sweep = {r["config"]["mini_batch"]: r for k, r in abl.items() if k.startswith("b")}
    if f"ladder{len(LADDER) - 1}" in abl:  # the last rung is the (M), b = 16 run of the sweep
        sweep.setdefault(16, abl[f"ladder{len(LADDER) - 1}"])
    for title, rows in (("Ablation ladder (TTT-Linear, Table 1 rungs)", ladder),
                        ("Mini-batch size b (TTT-Linear (M))", [(f"b = {b}", sweep[b]) for b in sorted(sweep)])):
        if rows:
            lines += [f"## {title}", "", "| run | b | val loss | perplexity | tokens |", "|---|---|---|---|---|"]
            lines += [f"| {n} | {r['config']['mini_batch']} | {r['val_loss']:.4f} | {math.exp(r['val_loss']):.2f} | "
                      f"{r['tokens']:,} |" for n, r in rows]
            lines.append("")
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"report: {a.out / 'results.md'} ({len(runs)} runs)")


# ------------------------------------------------------------------------------------------- main

def parse_list(s: str, kind=str):
    return [kind(v) for v in s.split(",") if v]


def parse_rungs(s: str):
    out = set()
    for part in s.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output directory (data, runs, results.md, plots)")
    p.add_argument("--smoke", action="store_true", help="every stage at a tiny size on the CPU (CI)")
    p.add_argument("--stage", choices=("data", "train", "ablation", "report", "all"), default="all")
    p.add_argument("--corpus", help="directory of .py files (default: this interpreter's site-packages)")
    p.add_argument("--max-mb", type=int, default=400, help="corpus size cap in MB (default 400)")
    p.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary size (default 8192)")
    p.add_argument("--size", choices=tuple(SIZES), default="main", help="model size (default main, ~40M)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    p.add_argument("--ctx", default="2048,8192", help="training context lengths (default 2048,8192)")
    p.add_argument("--tokens", type=int, default=100_000_000, help="training tokens per run (default 1e8)")
    p.add_argument("--minutes", type=float, default=0, help="cap on each run's training time (0: none)")
    p.add_argument("--batch-tokens", type=int, default=262_144, help="tokens per optimizer step")
    p.add_argument("--micro-tokens", type=int, default=65_536, help="tokens per forward/backward")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (default 3e-3)")
    p.add_argument("--eval-seqs", type=int, default=64, help="validation sequences per run (default 64)")
    p.add_argument("--rungs", default=f"0-{len(LADDER) - 1}", help="ablation ladder rungs to run, e.g. 0-2,5")
    p.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)), help="mini-batch sizes b to run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        a.models = parse_list(a.models)
        a.ctx = parse_list(a.ctx, int)
        a.rungs = parse_rungs(a.rungs)
        a.batch_sizes = parse_list(a.batch_sizes, int)
    except ValueError as e:
        fail(f"--ctx/--rungs/--batch-sizes: expected comma-separated integers ({e})")
    if bad := [m for m in a.models if m not in MODELS]:
        fail(f"--models: expected names from {MODELS}, got {bad}")
    if a.out.exists() and not a.out.is_dir():
        fail(f"--out: {a.out} exists and is not a directory")
    if a.smoke:  # tiny everything: CPU, stdlib corpus, context 32 and 64, about a minute
        a.size, a.ctx, a.tokens, a.batch_tokens, a.micro_tokens = "smoke", [32, 64], 2048, 512, 512
        a.eval_seqs, a.device, a.lr = 4, "cpu", 3e-3
    try:
        device = torch.device(a.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available here")
    except RuntimeError as e:
        fail(f"--device: {a.device!r} cannot be used ({e})")
    a.out.mkdir(parents=True, exist_ok=True)
    if a.stage in ("data", "all"):
        stage_data(a)
    if a.stage in ("train", "all"):
        stage_train(a, device)
    if a.stage in ("ablation", "all"):
        stage_ablation(a, device)
    if a.stage in ("report", "all"):
        stage_report(a)


if __name__ == "__main__":
    main()
