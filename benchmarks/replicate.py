"""Small-scale replication of the paper's two findings with this library: loss by token position for
TTT-Linear (M), TTT-MLP (M), Transformer++ and Mamba-2 at matched parameter counts and token budgets,
trained at two context lengths; and the ablation ladder of its Table 1 plus mini-batch sizes b.

    python benchmarks/replicate.py --smoke --out DIR                          # every stage, tiny, CPU (~1 min)
    # one GPU command per study: corpus, throughput probe, all runs of the study at once, report
    python benchmarks/replicate.py --stage study --ctx 2048 --out DIR --wall-seconds 540 --layout-probe
    python benchmarks/replicate.py --stage study --ctx 8192 --out DIR --wall-seconds 540
    # both contexts in one study: one token budget for all its runs (here three models of the small size)
    python benchmarks/replicate.py --stage study --size small --models ttt_linear,attention,mamba --ctx 2048,8192 \
        --out DIR --wall-seconds 540
    python benchmarks/replicate.py --stage ablation-study --ctx 2048 --size small --out DIR --wall-seconds 480
    python benchmarks/replicate.py --stage report --out DIR                   # tables, figure, verdicts

Corpus: the UTF-8 `.py` files under this interpreter's site-packages (`sysconfig.get_paths()["purelib"]`),
sorted by path and capped at --max-mb: long documents present on any machine with a Python environment, no
download; `--corpus DIR` takes another directory. They are tokenized with the byte-level BPE committed beside
this script (`replicate_tokenizer.json.gz`, 8192 tokens, trained on the standard library's sources by
`--stage tokenizer`), so a bare GPU machine only tokenizes. `--smoke` trains a tiny BPE on the standard library.

A study (`--stage study` / `ablation-study`) runs its jobs as separate processes on the GPU(s) at the same
time. It first measures throughput (`probe_*.json`): each job trains for --probe-seconds, all at once, and
with --layout-probe also one and two processes of TTT-Linear alone, which gives how per-process throughput
changes with the number of processes. From that it picks the number of processes to run at once and the
largest token budget that the slowest job finishes inside --wall-seconds, identical for every job of the
study. Each job writes DIR/runs/<name>/result.json (config, parameter count, tokens, wall time, validation
loss by position on held-out documents); a job whose result exists is skipped, so a study split over
several commands resumes. The report stage reads only those files: DIR/results.md, DIR/loss_by_position.png.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import types
from pathlib import Path

import numpy as np
import torch

from ttt import checkpoint
from ttt.config import RunOptions, get_config
from ttt.data import Batcher, iter_documents, load_meta, load_tokens, prepare
from ttt.layers.mamba import load_mamba_ssm
from ttt.model import TTTLM
from ttt.tokenizer import Tokenizer
from ttt.train import TrainConfig, lr_at, param_groups

T0 = time.time()
TOKENIZER = Path(__file__).with_name("replicate_tokenizer.json.gz")
MODELS = ("ttt_linear", "ttt_mlp", "attention", "mamba")
LABELS = {"ttt_linear": "TTT-Linear (M)", "ttt_mlp": "TTT-MLP (M)", "attention": "Transformer++",
          "mamba": "Mamba-2"}
COLORS = {"ttt_linear": "C0", "ttt_mlp": "C1", "attention": "C2", "mamba": "C3"}  # one colour per model in every panel
RECURRENT = ("ttt_linear", "ttt_mlp", "mamba")  # evaluated past the training context too
# name: (n_layers, d_model, n_heads, ffn_hidden) of the TTT-Linear reference model; others are matched to it
SIZES = {"smoke": (2, 64, 4, 176), "tiny": (4, 256, 4, 688), "small": (6, 384, 6, 1024),
         "main": (12, 512, 8, 1376)}
LR = 3e-3  # the peak learning rate of the recipe; a study at another --lr names its runs after it
MATCH_TOL = 0.03
# Table 1 rungs the layer switches reach: (name, paper perplexity, config overrides); b = None means b = T.
# Rung 0 is the paper's "TTT equivalence" row (TTT-Linear at b = T, W0 = 0, fixed eta, equal to its improved
# linear attention); the paper's first row, plain linear attention (15.91), has no switch here.
LADDER = [
    ("TTT equivalence to linear attention (b=T, no LN/residual, fixed eta, W0=0, (T))", 15.23,
     dict(backbone="transformer", mini_batch=None, ttt_inner_ln=False, ttt_inner_residual=False,
          ttt_learn_lr=False, ttt_learn_init=False)),
    ("+ learnable W0", 15.27, dict(backbone="transformer", mini_batch=None, ttt_inner_ln=False,
                                   ttt_inner_residual=False, ttt_learn_lr=False)),
    ("+ LN and residual in f", 14.05, dict(backbone="transformer", mini_batch=None, ttt_learn_lr=False)),
    ("+ mini-batch TTT (b=16)", 12.35, dict(backbone="transformer", mini_batch=16, ttt_learn_lr=False)),
    ("+ learnable eta", 11.99, dict(backbone="transformer", mini_batch=16)),
    ("+ Mamba backbone (M)", 11.09, dict(backbone="mamba", mini_batch=16)),
]
BATCH_SIZES = (4, 16, 64)
SPANS = 8  # loss reported over eighths of the training context


def fail(msg: str):
    print(f"replicate.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def say(msg: str) -> None:
    print(f"[{time.time() - T0:6.0f} s] {msg}", flush=True)


def process_age() -> float:
    """Seconds since this process started (Linux; 0 elsewhere): what the imports before T0 took."""
    try:
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return float(Path("/proc/uptime").read_text().split()[0]) - start / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def write_json(path: Path, obj) -> None:
    """`ttt.checkpoint.write_json` (temp name, then rename) into a directory made if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json(path, obj)


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


# ------------------------------------------------------------------------------------------ data

def stage_tokenizer(a) -> None:
    """Re-create the committed tokenizer: a byte-level BPE of --vocab tokens on the standard library."""
    tmp = a.out / "tokenizer_build"
    meta = prepare("stdlib", tmp, vocab_size=a.vocab, extensions=(".py",), val_fraction=0.0, overwrite=True)
    with open(TOKENIZER.with_suffix(".tmp"), "wb") as raw:  # mtime 0: the same bytes every time
        raw.write(gzip.compress((tmp / "tokenizer.json").read_bytes(), mtime=0))
    os.replace(TOKENIZER.with_suffix(".tmp"), TOKENIZER)
    say(f"tokenizer: {TOKENIZER} ({meta['vocab_size']} tokens, trained on {meta['train_tokens']:,} stdlib tokens)")


def corpus_farm(root: Path, farm: Path, max_bytes: int) -> dict:
    """Symlinks under `farm` to the non-empty UTF-8 `.py` files of `root` (sorted by path, hidden parts
    skipped), up to max_bytes: site-packages holds a few files in other encodings, which `prepare` refuses."""
    if farm.exists():
        shutil.rmtree(farm)
    n = size = skipped = 0
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        raw = p.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped += 1
            continue
        if not raw.strip():
            continue
        (farm / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(p.resolve(), farm / rel)
        n, size = n + 1, size + len(raw)
        if size >= max_bytes:
            break
    return dict(root=str(root), files=n, bytes=size, skipped_not_utf8=skipped)


SMOKE_BYTES = 1_500_000  # the smoke run's slice of the standard library


def study_tokenizer(a) -> Path:
    """DIR/tokenizer.json: the committed BPE (--tokenizer), or for --smoke a 512-token BPE trained on the smoke
    corpus. It exists before the corpus is tokenized, so a study's processes can start meanwhile."""
    tok = a.out / "tokenizer.json"
    if not tok.exists():
        if a.smoke:
            docs = (t for _, t in iter_documents("stdlib", extensions=(".py",), max_bytes=SMOKE_BYTES))
            Tokenizer.train(docs, 512).save(tok)
        else:
            try:
                raw = gzip.decompress(Path(a.tokenizer).read_bytes())
            except (OSError, EOFError, gzip.BadGzipFile) as e:
                fail(f"--tokenizer: cannot read {a.tokenizer} as a gzipped tokenizer.json ({e})")
            tok.with_suffix(".tmp").write_bytes(raw)
            os.replace(tok.with_suffix(".tmp"), tok)
    return tok


def study_vocab(a) -> int:
    """The vocabulary size of the prepared corpus, or of the study's tokenizer before the corpus exists."""
    try:
        return load_meta(a.out / "data")["vocab_size"]
    except (OSError, ValueError, KeyError):
        return Tokenizer.load(study_tokenizer(a)).vocab_size


def stage_data(a) -> dict:
    tok = study_tokenizer(a)
    if a.smoke:
        meta = prepare("stdlib", a.out / "data", tokenizer_path=tok, extensions=(".py",), max_bytes=SMOKE_BYTES,
                       val_fraction=0.05, overwrite=True)
    else:
        root = Path(a.corpus or sysconfig.get_paths()["purelib"])
        if not root.is_dir():
            fail(f"--corpus: {str(root)!r} is not a directory")
        farm = corpus_farm(root, a.out / "corpus", a.max_mb << 20)
        meta = prepare(a.out / "corpus", a.out / "data", tokenizer_path=tok, extensions=(".py",),
                       val_fraction=a.val_fraction, overwrite=True)
        write_json(a.out / "corpus.json", farm)
    say(f"data: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens ({meta['val_docs']} held-out "
        f"documents), vocab {meta['vocab_size']}")
    return meta


def data_meta(a) -> dict:
    try:
        return load_meta(a.out / "data")
    except (OSError, ValueError, KeyError):
        fail(f"--out: no prepared corpus under {a.out / 'data'}; run `--stage data --out {a.out}` first")


def eval_documents(a, meta: dict, length: int) -> torch.Tensor:
    """int64 [n, length + 1]: the first length + 1 tokens of each held-out document that has that many
    (at most --eval-seqs of them, in shard order). Positions are then positions within a document."""
    val = load_tokens(a.out / "data" / "val.bin")
    ends = np.flatnonzero(np.asarray(val) == meta["eos_id"])
    starts = np.concatenate([[0], ends[:-1] + 1])
    long = [s for s, e in zip(starts, ends) if e - s >= length + 1][:a.eval_seqs]
    if len(long) < min(8, a.eval_seqs):
        fail(f"--eval-doc-min: only {len(long)} held-out documents have {length + 1} tokens; lower "
             f"--eval-doc-min or raise --val-fraction")
    return torch.from_numpy(np.stack([np.asarray(val[s:s + length + 1]) for s in long]).astype(np.int64))


# --------------------------------------------------------------------------------- model configs

def n_params(cfg) -> int:
    with torch.device("meta"):
        return TTTLM(cfg).num_parameters(exclude_embedding=True)


def _closest(make, lo: int, step: int, target: int):
    """The config make(x), x = lo + step * i, whose parameter count is closest to target; counts are linear in
    x (FFN width, layer count), so two counts place it and its neighbours decide."""
    a, b = n_params(make(lo)), n_params(make(lo + step))
    x = lo + max(0, round((target - a) / (b - a))) * step if b != a else lo
    return min((make(v) for v in (x - step, x, x + step) if v >= lo), key=lambda c: abs(n_params(c) - target))


def matched_configs(size: str, vocab: int, models) -> dict:
    """Configs of `models` whose non-embedding parameter counts are within 3% of each other, around TTT-Linear
    (M)'s: the FFN width is tuned for TTT-MLP and the Transformer, the layer count for Mamba-2 with the state
    size nearest Mamba-2's usual 128 that keeps the whole set within 3%."""
    L, D, H, F = SIZES[size]
    base = dict(vocab_size=vocab, n_layers=L, d_model=D, n_heads=H)
    ref = get_config("125m", mixer="ttt_linear", ffn_hidden=F, **base)
    target = n_params(ref)
    out = {"ttt_linear": ref}
    for m in [m for m in models if m not in ("ttt_linear", "mamba")]:
        out[m] = _closest(lambda f: get_config("125m", mixer=m, ffn_hidden=f, **base), 8, 8, target)
    if "mamba" in models:
        for ds in sorted(range(16, 257, 16), key=lambda v: abs(v - 128)):
            out["mamba"] = _closest(lambda n: get_config("125m", mixer="mamba", **{**base, "n_layers": n},
                                                         mamba_d_state=ds), 1, 1, target)
            counts = [n_params(c) for c in out.values()]
            if max(counts) <= (1 + MATCH_TOL) * min(counts):
                break
    counts = {m: n_params(c) for m, c in out.items()}
    if max(counts.values()) > (1 + MATCH_TOL) * min(counts.values()):
        raise RuntimeError(f"no configs within 3% of each other: {counts}")
    return {m: out[m] for m in models}


@dataclasses.dataclass
class Job:
    name: str
    cfg: object
    ctx: int
    label: str
    run: RunOptions = RunOptions()  # how it runs (ttt.config.RunOptions), never part of the architecture
    lr: float = LR  # peak learning rate


def study_jobs(a, vocab: int) -> list[Job]:
    cfgs = matched_configs(a.size, vocab, a.models)
    # the default size (main; smoke with --smoke) and LR keep the plain names; another size or LR is a study of
    # its own: small_ctx2048_x, small_lr0.001_ctx2048_x
    size = "" if a.size in ("main", "smoke") else f"{a.size}_"
    return [Job(f"{size}{'' if lr == LR else f'lr{lr:g}_'}ctx{ctx}_{m}", cfg, ctx, LABELS[m], lr=lr)
            for lr in a.lr for ctx in a.ctx for m, cfg in cfgs.items()]


def ablation_jobs(a, vocab: int) -> list[Job]:
    L, D, H, F = SIZES[a.ablation_size]
    ctx = a.ctx[0]
    runs = [(f"ladder{i}", name, over) for i, (name, _, over) in enumerate(LADDER) if i in a.rungs]
    last = len(LADDER) - 1  # the last rung is (M) with b = 16: the b = 16 run of the mini-batch sweep
    runs += [(f"b{b}", f"(M), b = {b}", dict(backbone="mamba", mini_batch=b)) for b in a.batch_sizes
             if not (b == 16 and last in a.rungs)]
    # the default ablation size and inner LR keep the plain names; another is a ladder of its own:
    # abl_tiny_ctx2048_b4, abl_tiny_ilr0.25_ctx2048_b4
    size = "" if a.ablation_size in ("small", "smoke") else f"{a.ablation_size}_"
    jobs = []
    for ilr in a.inner_lr:
        for key, label, over in runs:
            over = {**over, "mini_batch": over["mini_batch"] or ctx, "base_lr": ilr}
            cfg = get_config("125m", mixer="ttt_linear", vocab_size=vocab, n_layers=L, d_model=D, n_heads=H,
                             ffn_hidden=F, **over)
            # b = T: the kernels hold a b x b tile on chip; the dual form runs any b
            run = RunOptions(ttt_backend="dual") if cfg.mini_batch > 64 else RunOptions()
            tag = "" if ilr is None else f"ilr{ilr:g}_"
            jobs.append(Job(f"abl_{size}{tag}ctx{ctx}_{key}", cfg, ctx, label, run, lr=a.lr[0]))
    return jobs


# ------------------------------------------------------------------------------------ train + eval

def evaluate(model, docs: torch.Tensor, length: int, ctx: int, micro: int, device, autocast) -> dict:
    """Next-token loss of each document at positions 0..length-1 (a document's first `length` predictions):
    the mean over documents at each position, and each document's mean over spans of ctx/8 positions."""
    span = max(1, ctx // SPANS)
    total = torch.zeros(length, dtype=torch.float64)
    doc_spans = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(docs), micro):
            d = docs[i:i + micro, :length + 1].to(device)
            with autocast():
                nll, _ = model(d[:, :-1], targets=d[:, 1:], reduction="none")  # [n, length]
            nll = nll.double().cpu()
            total += nll.sum(0)
            doc_spans += nll[:, :length // span * span].reshape(len(nll), -1, span).mean(-1).tolist()  # [n, spans]
    model.train()
    curve = (total / len(docs)).tolist()
    return dict(curve=curve, doc_spans=[[round(v, 5) for v in row] for row in doc_spans])


def log_bins(curve: list, top: int, n: int = 48) -> list:
    """The mean of `curve` over n position bins with geometric edges from 1 to top (positions 1-based),
    None past the curve's end: the plot's x axis is log position, and the file stays small."""
    edges = sorted({min(top, round(top ** (i / n))) for i in range(n + 1)} | {0})
    return [dict(lo=lo + 1, hi=hi, loss=round(sum(curve[lo:hi]) / (hi - lo), 5) if hi <= len(curve) else None)
            for lo, hi in zip(edges, edges[1:]) if hi > lo]


def _autocast(cuda: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_job(job: Job, a, device, tokens: int) -> dict | None:
    """Train job.cfg on `tokens` tokens at context job.ctx with the library's recipe (ttt.train: AdamW
    0.9/0.95, weight decay on matrices, clip 1.0, 10% warm-up, cosine to 1e-5, TTT-MLP's inner-LR ramp), then
    evaluate loss by position on held-out documents and write runs/<name>/result.json.

    With --probe-tag (a study's probe): first time --probe-seconds of steady steps (after two that compile and
    warm up) and write probe/<tag>_<name>.json; then, with --await-plan, wait for the study's plan, and if it
    names this job, restore the initial weights and train the planned budget in this same process (its
    compiled blocks and kernels ready), as a fresh run of the same seed would."""
    out = a.out / "runs" / job.name
    if not a.probe_tag and (out / "result.json").exists():
        say(f"{job.name}: done before, skipped")
        return json.loads((out / "result.json").read_text())
    cfg, run = job.cfg, job.run
    cuda = device.type == "cuda"
    if cfg.mixer == "mamba":  # the Mamba-2 baseline runs mamba_ssm's kernels on CUDA, named explicitly
        if cuda:
            mamba_kernels_or_fail()
        run = dataclasses.replace(run, mamba_backend="mamba_ssm" if cuda else "torch")
    ctx = job.ctx
    length = 2 * ctx if cfg.mixer in RECURRENT else ctx
    if length > a.eval_doc_min:
        fail(f"--eval-doc-min: {a.eval_doc_min} is shorter than {job.name}'s evaluation length {length}")
    batch = max(1, a.batch_tokens // ctx)
    # b = T holds [micro, H, T, T] products per layer in the dual form: an eighth of the micro-batch
    micro = max(1, min(batch, a.micro_tokens // ctx // (8 if cfg.mini_batch > 64 else 1)))
    while batch % micro:
        micro -= 1
    torch.manual_seed(a.seed)
    model = TTTLM(cfg, run=run).to(device)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # the b = T rungs (the dual form at b = 2048) stay eager: Inductor failed on them in the H200 pilot
    compiled = cuda and not a.no_compile and run.ttt_backend != "dual"
    if compiled:  # as `ttt train --compile`: each block through torch.compile
        for blk in model.blocks:
            blk.compile()
    batcher = None  # the corpus may still be being tokenized while a study's probe runs: random tokens then

    def make_opt(tc):
        return torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                                 **({"fused": True} if cuda else {}))

    def step_fn(step, tc, opt):
        warm = int(tc.warmup_frac * tc.max_steps)
        for g in opt.param_groups:
            g["lr"] = lr_at(min(step, tc.max_steps - 1), tc)
        model.set_inner_lr_warmup(step / warm if tc.inner_lr_warmup and step < warm else 1.0)
        if batcher is None:
            xy = torch.randint(0, cfg.vocab_size, (batch, ctx + 1), generator=torch.Generator().manual_seed(step))
            x, y = xy[:, :-1], xy[:, 1:]
        else:
            x, y = batcher.batch(step)
        loss_sum = torch.zeros((), device=device)
        for i in range(0, batch, micro):
            with _autocast(cuda):
                loss, _ = model(x[i:i + micro].to(device, non_blocking=True),
                                targets=y[i:i + micro].to(device, non_blocking=True), state_out=False)
            (loss * (micro / batch)).backward()
            loss_sum += loss.detach() * (micro / batch)
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss_sum

    def config(n_tokens):
        steps = max(1, n_tokens // (batch * ctx))
        return TrainConfig(seq_len=ctx, micro_batch=micro, tokens_per_step=batch * ctx, max_steps=steps, lr=job.lr)

    if a.probe_tag:
        tc = config(10 ** 12)
        opt = make_opt(tc)
        step, timed = 0, 0
        while True:
            step_fn(step, tc, opt)
            step += 1
            if step == 2:  # steps 0 and 1 compile and warm up
                _sync(device)
                startup = time.time() - T0
                if a.go_file:  # time the same window as the study's other processes: all warmed up
                    (a.out / "probe" / f"{a.probe_tag}_{job.name}.ready").touch()
                    while not Path(a.go_file).exists():
                        time.sleep(0.2)
                t_probe = time.time()
            elif step > 2:
                timed += batch * ctx
                if time.time() - t_probe >= a.probe_seconds:
                    _sync(device)
                    dt = time.time() - t_probe
                    break
        res = dict(name=job.name, tag=a.probe_tag, tok_s=round(timed / dt), startup_s=round(startup, 1),
                   timed_s=round(dt, 1), compiled=compiled,
                   peak_mem_gb=round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if cuda else 0)
        write_json(a.out / "probe" / f"{a.probe_tag}_{job.name}.json", res)
        say(f"{job.name}: probe {a.probe_tag}: {res['tok_s']:,} tok/s")
        if a.go_file:  # the study names one job to time again while the others wait: its rate alone
            solo = Path(a.go_file).with_suffix(".solo")
            while not solo.exists():
                time.sleep(0.2)
            if solo.read_text().strip() == job.name:
                t_probe, timed = time.time(), 0
                while time.time() - t_probe < a.probe_seconds:
                    step_fn(step, tc, opt)
                    step, timed = step + 1, timed + batch * ctx
                _sync(device)
                rate = round(timed / (time.time() - t_probe))
                write_json(a.out / "probe" / f"{a.probe_tag}_{job.name}.solo.json", dict(name=job.name, tok_s=rate))
                say(f"{job.name}: probe {a.probe_tag} alone: {rate:,} tok/s")
        if not a.await_plan:
            return None
        plan_path = Path(a.await_plan)
        while not plan_path.exists():
            time.sleep(0.5)
        p = json.loads(plan_path.read_text())
        if job.name not in p["continue"]:
            return None
        tokens, a.stop_at = p["tokens"], p["stop_at"]
        model.load_state_dict(init)  # the same weights as a fresh process of this seed
        model.zero_grad(set_to_none=True)
    del init
    meta = data_meta(a)
    batcher = Batcher(load_tokens(a.out / "data" / "train.bin"), batch, ctx, seed=a.seed)
    tc = config(tokens)
    opt = make_opt(tc)
    steps = tc.max_steps
    t_start, seen, log, stopped = time.time(), 0, [], None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(steps):
        loss_sum = step_fn(step, tc, opt)
        seen += batch * ctx
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            lv = loss_sum.item()
            log.append((step, round(lv, 4)))
            say(f"{job.name}: step {step + 1}/{steps} loss {lv:.4f} {seen / (time.time() - t_start):,.0f} tok/s")
            if not math.isfinite(lv):
                fail(f"{job.name}: the loss is {lv} at step {step + 1}")
        if a.stop_at and time.time() > a.stop_at and step < steps - 1:
            stopped = f"stopped at the study's deadline after {seen:,} of {steps * batch * ctx:,} tokens"
            say(f"{job.name}: {stopped}")
            break
    train_s = time.time() - t_start
    docs = eval_documents(a, meta, a.eval_doc_min)
    # other shapes than training's: run the compiled blocks eagerly instead of compiling them again
    with torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext():
        ev = evaluate(model, docs, length, ctx, max(1, a.micro_tokens // length), device, lambda: _autocast(cuda))
    curve = ev.pop("curve")
    res = dict(name=job.name, label=job.label, mixer=cfg.mixer, ctx=ctx, config=cfg.to_dict(),
               run=dataclasses.asdict(run), params=n_params(cfg),
               params_total=model.num_parameters(), tokens=seen, token_budget=steps * batch * ctx, steps=step + 1,
               batch_tokens=batch * ctx, micro_batch=micro, lr=job.lr, compiled=compiled, stopped=stopped,
               train_seconds=round(train_s, 1), tokens_per_s=round(seen / train_s),
               device=str(torch.cuda.get_device_name(device) if cuda else "cpu"),
               peak_mem_gb=round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if cuda else 0,
               eval_docs=len(docs), eval_len=length, val_loss=float(np.mean(curve[:ctx])),
               val_loss_past=float(np.mean(curve[ctx:])) if length > ctx else None,
               loss_by_position=[round(v, 5) for v in curve] if a.smoke else None,
               curve_bins=log_bins(curve, 2 * ctx), **ev, train_loss=log)
    write_json(out / "result.json", res)
    say(f"{job.name}: val loss {res['val_loss']:.4f} ({len(docs)} documents x {ctx} positions), {train_s:.0f} s "
        f"training, {res['tokens_per_s']:,} tok/s")
    return res


# --------------------------------------------------------------------------------- the launcher

def child_argv(a, job: Job, **extra) -> list[str]:
    """This script's command line for one job of the study (the same settings, --only that job)."""
    stage = "ablation" if job.name.startswith("abl_") else "train"
    argv = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--only", job.name, "--out", str(a.out),
            "--size", a.size, "--ablation-size", a.ablation_size, "--models", ",".join(a.models),
            "--ctx", ",".join(map(str, a.ctx)), "--rungs", ",".join(map(str, sorted(a.rungs))),
            "--batch-sizes", ",".join(map(str, a.batch_sizes)), "--batch-tokens", str(a.batch_tokens),
            "--micro-tokens", str(a.micro_tokens), "--lr", ",".join(map(str, a.lr)), "--eval-seqs", str(a.eval_seqs),
            "--eval-doc-min", str(a.eval_doc_min), "--seed", str(a.seed), "--probe-seconds", str(a.probe_seconds),
            "--inner-lr", ",".join("default" if x is None else str(x) for x in a.inner_lr)]
    if a.smoke:
        argv.append("--smoke")
    if a.no_compile or extra.pop("no_compile", False):
        argv.append("--no-compile")
    for k, v in extra.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


class Pool:
    """Child processes of this script, one per job, round-robin over the GPUs; logs under DIR/logs."""

    def __init__(self, a):
        self.a, self.running, self.status = a, [], {}
        self.gpus = max(1, torch.cuda.device_count()) if a.device.startswith("cuda") else 1
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCHINDUCTOR_COMPILE_THREADS": "4",
                    "OMP_NUM_THREADS": "2"}
        (a.out / "logs").mkdir(parents=True, exist_ok=True)
        self.started = 0

    def start(self, job: Job, log_name: str, **extra) -> None:
        dev = self.a.device if self.gpus == 1 else f"cuda:{self.started % self.gpus}"
        self.started += 1
        fh = open(self.a.out / "logs" / f"{log_name}.log", "a")
        p = subprocess.Popen(child_argv(self.a, job, device=dev, **extra), stdout=fh, stderr=subprocess.STDOUT,
                             env=self.env)
        self.running.append((p, fh, log_name))

    def poll(self) -> None:
        for p, fh, log_name in list(self.running):
            if p.poll() is not None:
                fh.close()
                self.running.remove((p, fh, log_name))
                self.status[log_name] = p.returncode
                if p.returncode:
                    tail = (self.a.out / "logs" / f"{log_name}.log").read_text().strip().splitlines()[-3:]
                    say(f"{log_name}: exit {p.returncode}: {' | '.join(tail)}")

    def kill(self, log_name: str) -> None:
        for p, _, n in self.running:
            if n == log_name:
                p.kill()

    def alive(self, log_name: str) -> bool:
        return any(n == log_name for _, _, n in self.running)

    def run(self, specs: list[tuple[Job, str, dict]], width: int) -> dict:
        """Start (job, log name, extra args) `width` at a time (counting those already running); wait for all."""
        pending = list(specs)
        while pending or self.running:
            while pending and len(self.running) < width:
                job, log_name, extra = pending.pop(0)
                self.start(job, log_name, **extra)
            time.sleep(1)
            self.poll()
        return self.status


def read_probe(a, tag: str, job: Job):
    p = a.out / "probe" / f"{tag}_{job.name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def probe_phase(a, pool: "Pool", tag: str, members: list[tuple[Job, str]], summary: dict, before_wait=None,
                **extra) -> dict:
    """Start one probing process per (job, log name); once every one has compiled and warmed up, let them
    time the same --probe-seconds window; return {log name: probe result}. A job whose compiled probe dies
    is probed again without torch.compile (named in summary["no_compile"]); one that dies again is left out
    of the study (named in summary["failed"]), so the others still run."""
    (a.out / "probe").mkdir(parents=True, exist_ok=True)
    go = a.out / "probe" / f"{tag}.go"
    # an earlier study in this --out leaves this phase's signals and probe files: none may stand for this one's
    for f in (a.out / "probe").glob(f"{tag}*"):
        f.unlink()
    t = time.time()
    for k, (j, log_name) in enumerate(members):
        pool.start(j, log_name, probe_tag=f"{tag}{k}", go_file=go, **extra)
    if before_wait:  # e.g. tokenize the corpus while they start and compile
        before_wait()
    rows, failed = {}, summary.setdefault("failed", [])
    while len(rows) + len([n for _, n in members if n in failed]) < len(members):
        time.sleep(0.5)
        pool.poll()
        ready = 0
        for k, (j, log_name) in enumerate(members):
            if log_name in failed:
                continue
            r = read_probe(a, f"{tag}{k}", j)
            if r is not None:
                rows[log_name] = r
            ready += (a.out / "probe" / f"{tag}{k}_{j.name}.ready").exists()
            if r is None and not pool.alive(log_name):
                if a.no_compile or j.name in summary["no_compile"] or go.exists():
                    say(f"{j.name}: its probe failed; left out (see {a.out / 'logs' / (log_name + '.log')})")
                    failed.append(log_name)
                    continue
                say(f"{j.name}: the compiled probe failed; it runs without torch.compile")
                summary["no_compile"].append(j.name)
                pool.start(j, log_name, probe_tag=f"{tag}{k}", go_file=go, no_compile=True, **extra)
        if not go.exists() and time.time() - t > a.probe_timeout:  # e.g. a compile that hangs
            for k, (j, log_name) in enumerate(members):
                if log_name not in failed and not (a.out / "probe" / f"{tag}{k}_{j.name}.ready").exists():
                    say(f"{j.name}: not warmed up after --probe-timeout {a.probe_timeout:.0f} s; left out")
                    pool.kill(log_name)
                    failed.append(log_name)
            ready = sum((a.out / "probe" / f"{tag}{k}_{j.name}.ready").exists() for k, (j, n) in enumerate(members)
                        if n not in failed)
        if ready + len([n for _, n in members if n in failed]) == len(members) and not go.exists():
            go.touch()
    summary["phases"][tag] = dict(wall_s=round(time.time() - t, 1), rows=rows)
    say(f"probe {tag}: " + ", ".join(f"{n} {r['tok_s']:,}" for n, r in rows.items()) + " tok/s per process")
    # the slowest job once more, alone (the others wait): how much faster it runs once the rest are done
    slow = min(rows, key=lambda n: rows[n]["tok_s"]) if len(rows) > 1 else "-"
    go.with_suffix(".solo").write_text(slow)
    if slow != "-":
        k, j = next((k, j) for k, (j, n) in enumerate(members) if n == slow)
        path = a.out / "probe" / f"{tag}{k}_{j.name}.solo.json"
        while not path.exists() and pool.alive(slow) and time.time() - t < a.probe_timeout + 60:
            time.sleep(0.2)
            pool.poll()
        if path.exists():
            summary["phases"][tag]["solo"] = json.loads(path.read_text())
            say(f"probe {tag}: {slow} alone {summary['phases'][tag]['solo']['tok_s']:,} tok/s")
    return rows


def layout_probe(a, job: Job, summary: dict, before_wait=None) -> None:
    """Throughput of one process of `job` alone and of two copies at once (then the study's own all-at-once
    phase gives the third point): how per-process throughput changes with the number of processes."""
    pool = Pool(a)
    for tag, copies in (("one", 1), ("two", 2)):
        rows = probe_phase(a, pool, tag, [(job, f"probe_{tag}{k}_{job.name}") for k in range(copies)], summary,
                           before_wait if tag == "one" else None)
        pool.run([], 1)  # wait for the processes to exit
        if len(rows) < copies:  # no layout numbers: the plan takes per-process rates as constant
            say("layout probe failed; planning without it")
            summary["phases"].pop("one", None)
            summary["phases"].pop("two", None)
            summary["failed"] = []
            return
        summary["phases"][tag]["rows"] = {f"{job.name}#{k}": rows[f"probe_{tag}{k}_{job.name}"] for k in range(copies)}


def per_process_factor(summary: dict, k: int, ref_k: int) -> float:
    """How much faster one process runs with k processes at once than with ref_k. Measured points: the
    slowest job alone and among all (the study's probe), or else one job alone, as two copies and among all
    (a layout probe); between points interpolated linearly in 1/k (exact when the GPU is shared evenly, rate
    proportional to 1/k), past the largest count proportional to 1/k. Without measurements, 1."""
    ph = summary["phases"]
    every = ph.get("all", {})
    if "solo" in every:
        name = every["solo"]["name"]
        pts = {1: every["solo"]["tok_s"], len(every["rows"]): every["rows"][name]["tok_s"]}
    elif "one" in ph:
        name = next(iter(ph["one"]["rows"])).split("#")[0]
        pts = {1: ph["one"]["rows"][f"{name}#0"]["tok_s"],
               2: sum(r["tok_s"] for r in ph["two"]["rows"].values()) / 2}
        layout_all = summary.get("layout_all", every).get("rows", {})
        if name in layout_all and len(layout_all) > 2:
            pts[len(layout_all)] = layout_all[name]["tok_s"]
    else:
        return 1.0

    def g(k):
        ks = sorted(pts)
        if k >= ks[-1]:
            return pts[ks[-1]] * ks[-1] / k
        lo = max(x for x in ks if x <= k)
        hi = min(x for x in ks if x >= k)
        if lo == hi:
            return pts[lo]
        w = (1 / k - 1 / lo) / (1 / hi - 1 / lo)
        return pts[lo] + (pts[hi] - pts[lo]) * w
    return g(k) / g(ref_k)


def makespan(tokens: float, rates: list[float], width: int, factor, extra: list[float] | None = None) -> float:
    """Seconds until the last of the jobs finishes `tokens` (+ extra[i]: its evaluation, in training-token
    equivalents) each, run `width` at a time, slowest first, when job i runs at rates[i] * factor(running)."""
    extra = extra or [0.0] * len(rates)
    left = sorted(([tokens + e, r] for r, e in zip(rates, extra)), key=lambda x: x[1])
    queue, active, t = left[width:], left[:width], 0.0
    while active:
        k = len(active)
        dt = min(rem / (r * factor(k)) for rem, r in active)
        t += dt
        for job in active:
            job[0] -= job[1] * factor(k) * dt
        active = [j for j in active if j[0] > 1e-9 * (tokens + 1)]
        while queue and len(active) < width:
            active.append(queue.pop(0))
    return t


PLAN_MARGIN = 0.95  # of the training time the plan fills: rates drift a little from the probe's window


def plan(a, jobs: list[Job], summary: dict, seconds: float, startup: float) -> dict:
    """The number of processes at once and the token budget (a multiple of every job's tokens per step) that
    finish the study's training inside `seconds`, from the probe's rates. The evaluations of the jobs that
    finish first run beside the others' training (a third of a training token's cost per evaluated token);
    processes beyond the first wave start fresh and pay `startup` seconds each wave."""
    rows = summary["phases"]["all"]["rows"]
    K = len(jobs)
    rates = [rows[j.name]["tok_s"] for j in jobs]
    slowest = min(range(K), key=lambda i: rates[i])
    extra = [0.0 if i == slowest else a.eval_seqs * (2 if j.cfg.mixer in RECURRENT else 1) * j.ctx / 3
             for i, j in enumerate(jobs)]
    step_tokens = max(max(1, a.batch_tokens // j.ctx) * j.ctx for j in jobs)
    best = None
    for width in sorted({1, 2, 4, K} & set(range(1, K + 1))):
        usable = PLAN_MARGIN * (seconds - (math.ceil(K / width) - 1) * startup)

        def span(n):
            return makespan(n, rates, width, lambda k: per_process_factor(summary, k, K), extra)
        lo, hi = 0, max(1, a.tokens // step_tokens)  # the most steps whose makespan fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if span(mid * step_tokens) <= usable else (lo, mid - 1)
        tokens = lo * step_tokens
        if best is None or tokens > best["tokens"]:
            order = sorted(range(K), key=lambda i: rates[i])
            best = dict(width=width, tokens=tokens, seconds=round(seconds), startup_s=round(startup, 1),
                        rates={j.name: r for j, r in zip(jobs, rates)},
                        later=[jobs[i].name for i in order[width:]])
            best["continue"] = [jobs[i].name for i in order[:width]]
    if best is None or best["tokens"] < step_tokens:
        fail(f"--wall-seconds: no time left to train after the probe ({seconds:.0f} s)")
    return best


def stage_study(a, jobs: list[Job]) -> None:
    """Probe (every job at once; with --layout-probe first one and two processes of the first job), plan one
    token budget, and train: the probing processes go on to train, so nothing compiles twice."""
    todo = [j for j in jobs if not (a.out / "runs" / j.name / "result.json").exists()]
    if not todo:
        say("study: every run is done")
        return
    # the probe and plan files: ctx2048, small_ctx8192; small_ctx2048+8192 for two contexts at once; a ladder's
    # command names its rungs (abl_tiny_ctx2048_ladder0+ladder1+ladder2) and a study of some of the models names
    # them (ctx2048_ttt_mlp), so the commands of one study keep their own files when their outputs are merged
    tag = re.match(r"(.*?)ctx\d+", todo[0].name)[1] + "ctx" + "+".join(str(c) for c in sorted({j.ctx for j in todo}))
    if todo[0].name.startswith("abl_"):
        tag += "_" + "+".join(dict.fromkeys(j.name.rsplit("_", 1)[1] for j in todo))
    elif len(models := dict.fromkeys(j.cfg.mixer for j in todo if not j.name.startswith("abl_"))) < len(MODELS):
        tag += "_" + "+".join(models)
    study_tokenizer(a)
    data_ready = []

    def prepare_data():  # while the first probes start: their warm-up steps draw random tokens
        if not data_ready:
            if not (a.out / "data" / "meta.json").exists():
                stage_data(a)
            eval_documents(a, data_meta(a), a.eval_doc_min)  # enough long held-out documents, before training
            data_ready.append(True)
    summary = dict(probe_seconds=a.probe_seconds, phases={}, no_compile=[], failed=[])
    if a.layout_probe:
        layout_probe(a, todo[0], summary, prepare_data)
    elif a.layout_from:  # the per-process scaling measured by an earlier study's --layout-probe
        try:
            earlier = json.loads(Path(a.layout_from).read_text())
            summary["phases"].update({k: earlier["phases"][k] for k in ("one", "two")})
            summary["layout_all"], summary["layout_from"] = earlier["phases"]["all"], str(a.layout_from)
        except (OSError, ValueError, KeyError) as e:
            fail(f"--layout-from: {a.layout_from} is not a probe file with a layout probe ({e})")
    plan_path = a.out / f"plan_{tag}.json"
    plan_path.unlink(missing_ok=True)
    pool = Pool(a)
    rows = probe_phase(a, pool, "all", [(j, j.name) for j in todo], summary, prepare_data, await_plan=plan_path)
    write_json(a.out / f"probe_{tag}.json", summary)
    todo = [j for j in todo if j.name in rows]
    if not todo:
        fail(f"study: every probe failed (see {a.out / 'logs'})")
    left = a.wall_seconds - (time.time() - T0) - a.eval_reserve
    startup = max(r["startup_s"] for r in rows.values())
    p = plan(a, todo, summary, left, startup)
    p["stop_at"] = T0 + a.wall_seconds - a.eval_reserve
    say(f"plan: {p['width']} processes at once, {p['tokens']:,} tokens per run, {left:.0f} s for training")
    write_json(plan_path, p)
    later = [j for j in todo if j.name not in p["continue"]]
    status = pool.run([(j, j.name, dict(tokens=p["tokens"], stop_at=p["stop_at"],
                                        **({"no_compile": True} if j.name in summary["no_compile"] else {})))
                       for j in sorted(later, key=lambda j: p["rates"][j.name])], p["width"])
    say("study: " + ", ".join(f"{n} exit {s}" for n, s in status.items()))


# ---------------------------------------------------------------------------------------- report

def _stat(diffs) -> tuple[float, float]:
    """Mean and standard error of per-document values."""
    d = np.asarray(diffs, dtype=np.float64)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")


def _verdict(mean: float, se: float, expect_negative: bool = True) -> str:
    """holds / does not hold / inconclusive at 2 standard errors, for a difference the claim says is < 0."""
    m = mean if expect_negative else -mean
    if m < -2 * se:
        return "holds"
    if m > 2 * se:
        return "does not hold at this scale"
    return "inconclusive"


def _ctx_loss(r) -> np.ndarray:
    """Per-document mean loss over the training context's positions."""
    return np.asarray(r["doc_spans"])[:, :SPANS].mean(1)


def _late_gain(r) -> np.ndarray:
    """Per-document loss of the last eighth of the training context minus the mean of its first half."""
    s = np.asarray(r["doc_spans"])
    return s[:, SPANS - 1] - s[:, :SPANS // 2].mean(1)


def _fmt(mean, se):
    return f"{mean:+.4f} ± {se:.4f}"


def verdicts(main: dict) -> list[str]:
    """One line per claim of the paper, decided from the run files (2 standard errors over documents)."""
    out = []
    for ctx in sorted(main):
        rs = main[ctx]
        gains = {m: _stat(_late_gain(r)) for m, r in rs.items()}
        if {"ttt_linear", "mamba"} <= set(rs):
            for m in ("ttt_linear", "ttt_mlp"):
                if m in rs:
                    d = _stat(_late_gain(rs[m]) - _late_gain(rs["mamba"]))
                    out.append(f"- ctx {ctx}: {LABELS[m]} keeps lowering its loss later in the context more than "
                               f"Mamba-2 (late gain difference {_fmt(*d)} nats; gains: {LABELS[m]} "
                               f"{_fmt(*gains[m])}, Mamba-2 {_fmt(*gains['mamba'])}): **{_verdict(*d)}**")
        if "attention" in rs:
            for m in ("ttt_linear", "ttt_mlp", "mamba"):
                if m in rs:
                    d = _stat(_ctx_loss(rs[m]) - _ctx_loss(rs["attention"]))
                    want = "matches or beats" if ctx <= 2048 else "beats"
                    v = _verdict(*d) if ctx > 2048 else ("holds" if d[0] < 2 * d[1] + 0.02 else
                                                          "does not hold at this scale")
                    out.append(f"- ctx {ctx}: {LABELS[m]} {want} Transformer++ (loss difference {_fmt(*d)}"
                               + ("; 'matches' = within 0.02 nats + 2 SE" if ctx <= 2048 else "") + f"): **{v}**")
        for m in ("ttt_linear", "ttt_mlp"):
            if m in rs and "mamba" in rs:
                d = _stat(_ctx_loss(rs[m]) - _ctx_loss(rs["mamba"]))
                out.append(f"- ctx {ctx}: {LABELS[m]} vs Mamba-2, loss difference {_fmt(*d)} nats "
                           f"(the paper: comparable at 2k, TTT ahead at 8k)")
        for m in RECURRENT:
            if m in rs and rs[m].get("val_loss_past") is not None:
                s = np.asarray(rs[m]["doc_spans"])
                d = _stat(s[:, SPANS:].mean(1) - s[:, SPANS - 1])
                out.append(f"- ctx {ctx}: {LABELS[m]} past its training context (positions {ctx}..{2 * ctx}): loss "
                           f"minus its last trained eighth {_fmt(*d)} nats "
                           f"({'still improving' if d[0] < -2 * d[1] else 'rising' if d[0] > 2 * d[1] else 'flat'})")
    if len(main) >= 2:
        lo, hi = sorted(main)[0], sorted(main)[-1]
        for m in ("ttt_linear", "ttt_mlp"):
            if all({m, "mamba"} <= set(main[c]) for c in (lo, hi)):
                gap = (_ctx_loss(main[hi][m]) - _ctx_loss(main[hi]["mamba"])) - \
                      (_ctx_loss(main[lo][m]) - _ctx_loss(main[lo]["mamba"]))
                d = _stat(gap)  # the same documents at both contexts: paired
                out.append(f"- {LABELS[m]}'s advantage over Mamba-2 grows from {lo} to {hi} context (the {hi}-minus-{lo} "
                           f"gap of (TTT - Mamba-2) loss: {_fmt(*d)} nats): **{_verdict(*d)}**")
    return out


def study_size(key: str) -> str:
    """The model size of a study's key (its runs' name prefix: '', 'small', 'tiny_lr0.001'): 'main', 'small', 'tiny'."""
    return next((p for p in key.split("_") if not p.startswith("lr")), "main")


def study_name(key: str) -> str:
    """A study's key as the report names it: 'main', 'small', 'tiny, peak LR 0.001'."""
    lr = next((p[2:] for p in key.split("_") if p.startswith("lr")), None)
    return study_size(key) + (f", peak LR {lr}" if lr else "")


def ladder_key(key: str) -> tuple[str, str | None]:
    """A ladder's key (its runs' name between 'abl_' and 'ctx': 'tiny', 'tiny_ilr0.25', 'ilr4') as (size, inner base
    LR or None): ('tiny', None), ('tiny', '0.25'), ('small', '4')."""
    parts = key.split("_")
    return (next((p for p in parts if not p.startswith("ilr")), "small"),
            next((p[3:] for p in parts if p.startswith("ilr")), None))


def ladder_name(key: str) -> str:
    """How the report names a ladder: 'tiny', 'tiny, inner base LR 0.25', 'small, inner base LR 4'."""
    size, ilr = ladder_key(key)
    return size + (f", inner base LR {ilr}" if ilr else "")


def tokens_per_param(main: dict) -> float:
    """Median training tokens per non-embedding parameter over a study's runs (ctx -> mixer -> result)."""
    return float(np.median([r["tokens"] / r["params"] for rs in main.values() for r in rs.values()]))


def scale_lines(studies: dict) -> list[str]:
    """The deciding numbers of the claims side by side across model sizes (and so tokens per parameter) at each
    context both sizes ran: whether a finding moves toward the paper's as training goes further (scale)."""
    if len(studies) < 2:
        return []
    lines = ["### The same numbers at each size (scale)", "",
             "| context | number (the paper's sign) | " + " | ".join(
                 f"{study_name(size)} ({tokens_per_param(m):.2f} tokens/param)" for size, m in studies.items()) + " |",
             "|---|---|" + "---|" * len(studies)]
    numbers = [("TTT-Linear (M) minus Mamba-2, loss (< 0 at 8k)", "ttt_linear", "mamba", _ctx_loss),
               ("TTT-Linear (M) minus Transformer++, loss (<= 0)", "ttt_linear", "attention", _ctx_loss),
               ("TTT-Linear (M) minus Mamba-2, late gain (< 0)", "ttt_linear", "mamba", _late_gain)]
    for ctx in sorted({c for m in studies.values() for c in m}):
        for text, x, y, f in numbers:
            cells = [_fmt(*_stat(f(m[ctx][x]) - f(m[ctx][y]))) if ctx in m and {x, y} <= set(m[ctx]) else "—"
                     for m in studies.values()]
            if sum(c != "—" for c in cells) >= 2:
                lines.append(f"| {ctx} | {text} | " + " | ".join(cells) + " |")
    return lines + [""] if len(lines) > 4 else []


def best_lr_lines(studies: dict) -> list[str]:
    """For a size trained at several peak LRs: per context, each model's run with the lowest validation loss, and
    the claims decided from those runs (each model at its best rate; every run sees the same documents)."""
    by_size: dict = {}  # size -> ctx -> mixer -> [results at each LR]
    for key, main in studies.items():
        for ctx, rs in main.items():
            for m, r in rs.items():
                by_size.setdefault(study_size(key), {}).setdefault(ctx, {}).setdefault(m, []).append(r)
    lines = []
    for size, main in by_size.items():
        if all(len(runs) < 2 for rs in main.values() for runs in rs.values()):
            continue
        best = {ctx: {m: min(runs, key=lambda r: r["val_loss"]) for m, runs in rs.items()} for ctx, rs in main.items()}
        lines += [f"### The paper's claims with each model at its best peak LR (size {size})", "",
                  "Peak LRs trained (validation loss; the lowest in bold):", ""]
        for ctx, rs in sorted(main.items()):
            cells = [f"{LABELS[m]} " + ", ".join((f"**{r['lr']:g}: {r['val_loss']:.4f}**" if r is best[ctx][m] else
                                                   f"{r['lr']:g}: {r['val_loss']:.4f}")
                                                  for r in sorted(rs[m], key=lambda r: r["lr"]))
                     for m in MODELS if m in rs]
            lines.append(f"- ctx {ctx}: " + "; ".join(cells))
        lines += [""] + verdicts(best) + [""]
    return lines


def _sweep(abl: dict) -> dict:
    """A ladder's mini-batch sweep: b -> result (the last rung is its b = 16 run)."""
    sweep = {r["config"]["mini_batch"]: r for k, r in abl.items() if k.startswith("b")}
    if f"ladder{len(LADDER) - 1}" in abl:
        sweep.setdefault(16, abl[f"ladder{len(LADDER) - 1}"])
    return sweep


def inner_lr_lines(ladders: dict) -> list[str]:
    """Each b of a ladder at another inner base LR against b = 16 of the same size at the default rate (1.0):
    whether a smaller b wins once its inner rate is lowered (recipe) or not (scale)."""
    lines = []
    for key, abl in ladders.items():
        size, ilr = ladder_key(key)
        base = _sweep(ladders.get(size, {})).get(16)
        if ilr is None or base is None:
            continue
        lines += [f"### Inner base LR {ilr} against b = 16 at the default (size {size})", "",
                  "| b | val loss | minus b = 16 at inner base LR 1.0 (± SE) |", "|---|---|---|"]
        for b, r in sorted(_sweep(abl).items()):
            d = _stat(_ctx_loss(r) - _ctx_loss(base))
            word = "lower" if d[0] < -2 * d[1] else "higher" if d[0] > 2 * d[1] else "level"
            lines.append(f"| {b} | {r['val_loss']:.4f} | {_fmt(*d)} ({word}) |")
        lines.append("")
    return lines


def ladder_lines(abl: dict, suffix: str = "") -> list[str]:
    rows = [(i, name, paper, abl.get(f"ladder{i}")) for i, (name, paper, _) in enumerate(LADDER)]
    rows = [r for r in rows if r[3]]
    if len(rows) < 2:  # one rung (or none): no change to show, only the b sweep below
        rows = []
    lines = [f"### Ablation ladder (TTT-Linear, the paper's Table 1 rungs){suffix}", "",
             "| rung | paper ppl (125M, Pile 2k) | paper change | our loss | our ppl | our change in loss (± SE) | "
             "tokens | verdict |", "|---|---|---|---|---|---|---|---|"] if rows else []
    prev = None
    for i, name, paper, r in rows:
        ch_p = f"{paper - prev[2]:+.2f}" if prev else ""
        if prev:
            d = _stat(_ctx_loss(r) - _ctx_loss(prev[3]))
            ch = _fmt(*d)
            v = (_verdict(*d, expect_negative=paper < prev[2]) if abs(paper - prev[2]) >= 0.1 else
                 "paper: no change" + (" (ours: none either)" if abs(d[0]) <= 2 * d[1] else ""))
        else:
            ch, v = "", ""
        lines.append(f"| {name} | {paper:.2f} | {ch_p} | {r['val_loss']:.4f} | {math.exp(r['val_loss']):.2f} | {ch} | "
                     f"{r['tokens']:,} | {v} |")
        prev = (i, name, paper, r)
    if lines:
        lines += ["", "Verdict per rung: whether our change has the paper's sign at 2 standard errors over held-out "
                  "documents (paired: every run is evaluated on the same documents).", ""]
    sweep = _sweep(abl)
    if sweep:
        lines += [f"### Mini-batch size b (TTT-Linear (M)){suffix}", "", "| b | val loss | perplexity | tokens |",
                  "|---|---|---|---|"]
        lines += [f"| {b} | {sweep[b]['val_loss']:.4f} | {math.exp(sweep[b]['val_loss']):.2f} | {sweep[b]['tokens']:,} |"
                  for b in sorted(sweep)]
        bs = sorted(sweep)
        for lo, hi in zip(bs, bs[1:]):
            d = _stat(_ctx_loss(sweep[lo]) - _ctx_loss(sweep[hi]))
            lines.append(f"- b = {lo} vs b = {hi} (the paper: smaller b, lower perplexity): loss difference "
                         f"{_fmt(*d)}: **{_verdict(*d)}**")
        lines.append("")
    return lines


def figure(studies: dict, path: Path) -> None:
    """Loss by position, one column per (size, context) study; bottom row: the difference to Transformer++."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [(size, ctx, rs) for size, main in studies.items() for ctx, rs in sorted(main.items())]
    fig, axes = plt.subplots(2, len(cols), figsize=(6 * len(cols), 7.5), squeeze=False, sharex="col")
    for col, (size, ctx, rs) in enumerate(cols):
        att = rs.get("attention")
        for m in MODELS:
            if m not in rs:
                continue
            b = [x for x in rs[m]["curve_bins"] if x["loss"] is not None]
            xs = [math.sqrt(x["lo"] * x["hi"]) for x in b]
            axes[0][col].plot(xs, [x["loss"] for x in b], label=f"{LABELS[m]} ({rs[m]['params'] / 1e6:.1f}M)",
                               color=COLORS[m])
            if att and m != "attention":
                ref = {(x["lo"], x["hi"]): x["loss"] for x in att["curve_bins"] if x["loss"] is not None}
                pairs = [(xv, x["loss"] - ref[(x["lo"], x["hi"])]) for xv, x in zip(xs, b) if (x["lo"], x["hi"]) in ref]
                axes[1][col].plot([p[0] for p in pairs], [p[1] for p in pairs], label=LABELS[m], color=COLORS[m])
        tokens = max(r["tokens"] for r in rs.values())
        axes[0][col].set_title(f"trained at context {ctx}, {tokens / 1e6:.1f}M tokens each"
                               + ("" if size == "main" else f" (size {study_name(size)})"))
        for row in (0, 1):
            ax = axes[row][col]
            ax.set_xscale("log")
            ax.axvline(ctx, color="grey", lw=0.8, ls="--")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        axes[0][col].set_ylabel("validation loss (nats/token)")
        axes[1][col].set_ylabel("loss minus Transformer++ (nats)")
        axes[1][col].axhline(0, color="black", lw=0.6)
        axes[1][col].set_xlabel("token position in the document (log scale; dashed: training context)")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".tmp.png"), dpi=90)
    os.replace(path.with_suffix(".tmp.png"), path)
    plt.close(fig)


def throughput_lines(a) -> list[str]:
    """The studies' probes (DIR/probe_*.json): tokens/s per process with 1, 2 or all jobs at once, the slowest
    job alone, and each study's plan."""
    lines = []
    for path in sorted(a.out.glob("probe_*.json")):
        tag = path.stem.split("_", 1)[1]
        pr = json.loads(path.read_text())
        if not lines:
            lines += ["### Throughput per process (the studies' probes)", "",
                      "| study | processes at once | job | tok/s per process | compiled | peak GPU memory (GB) |",
                      "|---|---|---|---|---|---|"]
        for phase, ph in pr["phases"].items():
            k = {"one": 1, "two": 2}.get(phase, len(ph["rows"]))
            for n, r in ph["rows"].items():
                lines.append(f"| {tag} | {k} | {n.split('#')[0]} | {r['tok_s']:,} | {r['compiled']} | {r['peak_mem_gb']} |")
            if "solo" in ph:
                lines.append(f"| {tag} | 1 (the others paused) | {ph['solo']['name']} | {ph['solo']['tok_s']:,} | | |")
        plan_path = a.out / f"plan_{tag}.json"
        if plan_path.exists():
            p = json.loads(plan_path.read_text())
            lines.append(f"| {tag} | plan | {p['width']} processes at once, {p['tokens']:,} tokens per run, "
                         f"{p['seconds']} s for training | | | |")
    return lines + ([""] if lines else [])


def stage_report(a) -> None:
    """DIR/results.md and DIR/loss_by_position.png from DIR/runs/*/result.json (and the probe files); with
    --page, the same text also replaces what lies between the page's results markers."""
    runs = sorted((json.loads(p.read_text()) for p in (a.out / "runs").glob("*/result.json")),
                  key=lambda r: r["name"])
    if not runs:
        fail(f"--out: no run results under {a.out / 'runs'}; run the train stage first")
    page = Path(a.page) if a.page else None
    fig_link = os.path.relpath(a.out / "loss_by_position.png", page.parent if page else a.out)
    studies: dict = {}  # size -> ctx -> mixer -> result; the default size first
    ladders: dict = {}  # ablation size -> rung key -> result
    for r in sorted(runs, key=lambda r: r["name"].startswith("ctx"), reverse=True):
        # ctx2048_x: main, small_ctx2048_x: small; abl_ctx2048_b4: the ladder at small, abl_tiny_ctx2048_b4: at tiny
        prefix, rest = r["name"].split("ctx", 1)
        prefix = prefix.rstrip("_")
        if prefix == "abl" or prefix.startswith("abl_"):
            ladders.setdefault(prefix[4:] or "small", {})[rest.split("_", 1)[1]] = r
        else:
            studies.setdefault(prefix or "main", {}).setdefault(r["ctx"], {})[r["mixer"]] = r
    lines = ["Generated by `benchmarks/replicate.py --stage report` from the run files "
             f"(`{os.path.relpath(a.out / 'runs', page.parent) if page else 'runs'}/*/result.json`); validation loss "
             "in nats per token at each position of held-out documents.", ""]
    for size, ctx, rs in [(size, ctx, rs) for size, main in studies.items() for ctx, rs in sorted(main.items())]:
        lines += [f"### Context {ctx}" + ("" if size == "main" else f", size {study_name(size)}"), "",
                  "| model | params (non-emb.) | tokens | val loss | loss by position, 8 equal "
                  "spans (first .. last) | last span - first-half mean | past the context (.. 2x) | tok/s | "
                  "train s | device |", "|---|---|---|---|---|---|---|---|---|---|"]
        for m in MODELS:
            if m not in rs:
                continue
            r = rs[m]
            s = np.asarray(r["doc_spans"]).mean(0)
            gain = _stat(_late_gain(r))
            past = f"{r['val_loss_past']:.4f}" if r.get("val_loss_past") is not None else "—"
            note = " (stopped early)" if r.get("stopped") else ""
            lines.append(f"| {LABELS[m]} | {r['params']:,} | {r['tokens']:,}{note} | {r['val_loss']:.4f} | "
                         f"{' '.join(f'{v:.3f}' for v in s[:SPANS])} | {_fmt(*gain)} | {past} | "
                         f"{r['tokens_per_s']:,} | {r['train_seconds']:.0f} | {r['device']} |")
        lines.append("")
    if studies:
        figure(studies, a.out / "loss_by_position.png")
        several = len(studies) > 1
        sizes = "; ".join(f"{study_name(size)}: " * several + ", ".join(f"{LABELS[m]} {r['params'] / 1e6:.1f}M"
                                                              for m, r in next(iter(main.values())).items())
                          for size, main in studies.items())
        lines += [f"![loss by position]({fig_link})", "",
                  f"Figure: validation loss at each position of {runs[0]['eval_docs']} held-out documents (mean over "
                  f"geometric position bins), one column per training context{' and model size' * several}, the "
                  f"recurrent models evaluated to 2x the training context; bottom: difference to Transformer++. "
                  f"Non-embedding parameters: {sizes}; tokens per run in each column's title.", ""]
    for size, main in studies.items():
        tpp = tokens_per_param(main)
        lines += ["### The paper's claims, at this scale" + ("" if size == "main" else f" (size {study_name(size)})"), "",
                  f"Budget: {tpp:.2f} training tokens per non-embedding parameter (median over the runs above); the "
                  "paper's recipe trains about 20 (Chinchilla)."
                  + (" At under one token per parameter these runs measure early training: the verdicts below hold "
                     "for this budget only, not for the paper's claims." if tpp < 1 else ""), ""]
        lines += verdicts(main) + [""]
    lines += scale_lines(studies)
    lines += best_lr_lines(studies)
    for size, abl in sorted(ladders.items(), key=lambda kv: kv[0] != "small"):
        lines += ladder_lines(abl, "" if size == "small" else f" (size {ladder_name(size)})")
    lines += inner_lr_lines(ladders)
    lines += throughput_lines(a)
    text = "\n".join(lines).rstrip() + "\n"
    (a.out / "results.md").write_text("# Replication results\n\n" + text)
    if page:
        begin, end = "<!-- results:begin -->", "<!-- results:end -->"
        old = page.read_text() if page.exists() else ""
        if begin not in old or end not in old:
            fail(f"--page: {page} has no {begin} ... {end} markers to write between")
        head, rest = old.split(begin, 1)
        new = head + begin + "\n" + text + end + rest.split(end, 1)[1]
        page.with_suffix(".tmp").write_text(new)
        os.replace(page.with_suffix(".tmp"), page)
    say(f"report: {a.out / 'results.md'} ({len(runs)} runs)" + (f", {page}" if page else ""))


# ------------------------------------------------------------------------------------------- main

def parse_list(s: str, kind=str):
    return [kind(v) for v in s.split(",") if v]


def parse_rungs(s: str):
    out = set()
    for part in s.split(","):
        if part:
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output directory (data, runs, results.md, plots)")
    p.add_argument("--smoke", action="store_true", help="every stage at a tiny size on the CPU (CI)")
    p.add_argument("--stage", default="all", choices=("tokenizer", "data", "train", "ablation", "study",
                                                      "ablation-study", "report", "all"),
                   help="study / ablation-study: data, probe and every run at once on the GPU, then the report")
    p.add_argument("--corpus", help="directory of .py files (default: this interpreter's site-packages)")
    p.add_argument("--max-mb", type=int, default=300, help="corpus size cap in MB (default 300)")
    p.add_argument("--val-fraction", type=float, default=0.06, help="held-out share of documents (default 0.06)")
    p.add_argument("--tokenizer", type=Path, default=TOKENIZER, help="gzipped tokenizer.json (default: the committed one)")
    p.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary size of --stage tokenizer (default 8192)")
    p.add_argument("--size", choices=tuple(SIZES), default="main", help="model size (default main, ~40M)")
    p.add_argument("--ablation-size", choices=tuple(SIZES), default="small",
                   help="model size of the ablation ladder and b sweep (default small)")
    p.add_argument("--ablation", action="store_true",
                   help="study: the ladder and b sweep at the first --ctx too, in the same runs")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    p.add_argument("--ctx", default="2048,8192", help="training context lengths (default 2048,8192)")
    p.add_argument("--tokens", type=int, default=100_000_000, help="training tokens per run (a study: at most this many)")
    p.add_argument("--batch-tokens", type=int, default=65_536, help="tokens per optimizer step (default 65,536)")
    p.add_argument("--micro-tokens", type=int, default=65_536, help="tokens per forward/backward")
    p.add_argument("--lr", default=str(LR), help=f"peak AdamW learning rate; a study takes several, "
                   f"comma-separated, each a study of its own (default {LR:g})")
    p.add_argument("--eval-seqs", type=int, default=64, help="held-out documents evaluated (default 64)")
    p.add_argument("--eval-doc-min", type=int, default=2 * 8192,
                   help="evaluate on documents of at least this many tokens (default 16384: 2x the longest context)")
    p.add_argument("--rungs", default=f"0-{len(LADDER) - 1}", help="ablation ladder rungs to run, e.g. 0-2,5")
    p.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)), help="mini-batch sizes b to run")
    p.add_argument("--inner-lr", default="default",
                   help="ablation: TTT-Linear's inner base learning rate, comma-separated, each a ladder of its own "
                        "('default': the config's 1.0)")
    p.add_argument("--wall-seconds", type=float, default=540, help="study: finish everything within this (default 540)")
    p.add_argument("--eval-reserve", type=float, default=60, help="study: seconds kept for evaluation (default 60)")
    p.add_argument("--probe-seconds", type=float, default=15, help="study: timed seconds per probe (default 15)")
    p.add_argument("--probe-timeout", type=float, default=300,
                   help="study: leave out a job not warmed up (compiled) after this many seconds (default 300)")
    p.add_argument("--layout-probe", action="store_true", help="study: also time 1 and 2 processes of the first job")
    p.add_argument("--layout-from", help="study: take the 1- and 2-process timings from this earlier probe file")
    p.add_argument("--no-compile", action="store_true", help="train eagerly (default on CUDA: blocks compiled)")
    p.add_argument("--only", help=argparse.SUPPRESS)
    p.add_argument("--probe-tag", default="", help=argparse.SUPPRESS)
    p.add_argument("--await-plan", default="", help=argparse.SUPPRESS)
    p.add_argument("--go-file", default="", help=argparse.SUPPRESS)
    p.add_argument("--stop-at", type=float, default=0, help=argparse.SUPPRESS)
    p.add_argument("--page", help="report: also write the results between the markers of this markdown page")
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
    try:
        a.lr = parse_list(a.lr, float)
        if not a.lr or min(a.lr) <= 0 or len(set(a.lr)) < len(a.lr):
            raise ValueError("positive and distinct")
    except ValueError as e:
        fail(f"--lr: expected comma-separated positive learning rates, got {a.lr!r} ({e})")
    try:
        a.inner_lr = [None if x == "default" else float(x) for x in parse_list(a.inner_lr)]
        if not a.inner_lr or any(x is not None and x <= 0 for x in a.inner_lr) or len(set(a.inner_lr)) < len(a.inner_lr):
            raise ValueError("positive and distinct")
    except ValueError as e:
        fail(f"--inner-lr: expected comma-separated positive rates or 'default', got {a.inner_lr!r} ({e})")
    if bad := [m for m in a.models if m not in MODELS]:
        fail(f"--models: expected names from {MODELS}, got {bad}")
    if a.out.exists() and not a.out.is_dir():
        fail(f"--out: {a.out} exists and is not a directory")
    if a.smoke:  # tiny everything: CPU, stdlib corpus, context 32 and 64, about a minute
        a.size, a.ablation_size, a.batch_tokens, a.micro_tokens = "smoke", "smoke", 512, 512
        a.tokens = 2048 if a.tokens == p.get_default("tokens") else a.tokens  # a study's children get theirs
        a.eval_seqs, a.eval_doc_min, a.device = 4, 128, "cpu"
        a.ctx = [c for c in a.ctx if c <= 64] or [32, 64]
    try:
        device = torch.device(a.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available here")
    except RuntimeError as e:
        fail(f"--device: {a.device!r} cannot be used ({e})")
    a.out.mkdir(parents=True, exist_ok=True)
    say(f"{a.only or a.stage}: started, {process_age():.1f} s after the process")
    if a.stage == "tokenizer":
        return stage_tokenizer(a)
    if a.stage == "ablation-study" and len(a.ctx) != 1:
        fail(f"--ctx: the ablation study trains at one context per command, got {a.ctx}")
    if a.stage in ("data", "all"):
        stage_data(a)
    if a.stage in ("study", "ablation-study") or a.probe_tag:  # the corpus may come while they start
        vocab = study_vocab(a)
    else:
        vocab = data_meta(a)["vocab_size"] if a.stage != "report" else 0
    if a.stage in ("train", "ablation", "all"):  # in this process, one after another
        jobs = study_jobs(a, vocab) if a.stage in ("train", "all") else []
        jobs += ablation_jobs(a, vocab) if a.stage in ("ablation", "all") else []
        for j in jobs:
            if not a.only or j.name == a.only:
                train_job(j, a, device, a.tokens)
    if a.stage in ("study", "ablation-study"):  # every job as its own process, at the same time
        jobs = study_jobs(a, vocab) if a.stage == "study" else []
        jobs += ablation_jobs(a, vocab) if a.stage == "ablation-study" or a.ablation else []
        stage_study(a, jobs)
    if a.stage in ("report", "all", "study", "ablation-study"):
        stage_report(a)


if __name__ == "__main__":
    main()
