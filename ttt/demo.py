"""The end-to-end demo behind `ttt demo`: built-in corpus -> tokenizer -> two small LMs trained on the
CPU -> evaluation by token position beyond the training length -> plot, results table, a sample.

    summary = run_demo("demo_out", echo=print)          # about 7 minutes on 2 idle CPU cores
    summary = run_demo("demo_quick", quick=True)        # a smoke run: about 8 s

The corpus is the Python standard library source of the running interpreter (`ttt.data`, "stdlib"),
cut at `max_bytes`. Both models are the same LM class: TTT-Linear with the Mamba backbone, and a
Transformer++ baseline (mixer "attention") whose FFN width is chosen so that the two parameter counts
match. Each is trained with the library's trainer (ttt.train) on windows of `train_len` tokens, then
evaluated on validation windows of `eval_len` tokens, fed in chunks of `train_len` with the state
carried over -- so positions past `train_len` show how each model uses context it never trained on.

out_dir layout:
    demo.json            the settings of this demo (a rerun with other settings is refused)
    data/                the prepared corpus (reused by a rerun with the same settings)
    runs/<model>/        the training runs (a rerun resumes them; a finished run is not retrained)
    eval/                eval.json, eval.csv, eval_by_position.csv, eval.png (per-position NLL)
    results.md, results.json, nll_by_position.png (a copy of eval/eval.png)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import write_text

log = logging.getLogger(__name__)

MANIFEST = "demo.json"
TTT_NAME, BASE_NAME = "ttt_linear", "transformer"
LABELS = {TTT_NAME: "TTT-Linear (M)", BASE_NAME: "Transformer"}


@dataclass
class DemoSettings:
    """Everything that defines a demo run's results (stored in demo.json)."""

    size: str = "tiny"
    max_bytes: int = 3_000_000
    vocab_size: int = 4096
    val_fraction: float = 0.05
    train_len: int = 256
    eval_len: int = 1024
    batch: int = 8
    steps: int = 500
    lr: float = 3e-3
    mini_batch: int = 16
    eval_seqs: int = 16
    sample_tokens: int = 160
    seed: int = 0

    @classmethod
    def make(cls, quick: bool = False, **overrides) -> "DemoSettings":
        base = cls(size="debug", max_bytes=120_000, vocab_size=384, train_len=32, eval_len=128, steps=16,
                   lr=3e-3, eval_seqs=4, sample_tokens=40) if quick else cls()
        given = {k: v for k, v in overrides.items() if v is not None}
        if "train_len" in given and "eval_len" not in given:
            given["eval_len"] = 4 * given["train_len"]
        s = dataclasses.replace(base, **given)
        for name in ("max_bytes", "vocab_size", "train_len", "eval_len", "batch", "steps", "eval_seqs"):
            v = getattr(s, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if s.eval_len < s.train_len:
            raise ValueError(f"eval_len: expected at least train_len={s.train_len}, got {s.eval_len}")
        return s


def matched_baseline(ttt_cfg, mixer: str = "attention", multiple: int = 8):
    """The baseline config (same size preset, width, layers, vocab) whose SwiGLU width makes its
    parameter count closest to `ttt_cfg`'s. Returns (config, its params, ttt params)."""
    from .config import get_config
    from .model import TTTLM

    def count(cfg):
        with torch.device("meta"):
            return TTTLM(cfg).num_parameters()

    base = dataclasses.replace(get_config("debug", mixer=mixer), **{
        k: getattr(ttt_cfg, k) for k in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_hidden",
                                         "tie_embeddings", "norm_eps", "rope_base", "init_std")})
    target, n0 = count(ttt_cfg), count(base)
    per_unit = 3 * base.d_model * base.n_layers  # one SwiGLU hidden unit: gate, up and down weights
    ffn = max(multiple, base.ffn_hidden + round((target - n0) / per_unit / multiple) * multiple)
    cfg = dataclasses.replace(base, ffn_hidden=ffn)
    return cfg, count(cfg), target


def _check_out_dir(out: Path, settings: DemoSettings) -> None:
    """Refuse an out dir that holds something else than this demo with these settings."""
    want = dataclasses.asdict(settings)
    if (out / MANIFEST).is_file():
        try:
            saved = json.loads((out / MANIFEST).read_text())["settings"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"out: {str(out / MANIFEST)!r} is not a readable demo manifest ({e}); "
                             f"use another --out") from e
        diffs = [f"{k}: {saved.get(k)!r} there, {want[k]!r} now" for k in want if saved.get(k) != want[k]]
        if diffs:
            raise ValueError(f"out: {str(out)!r} holds a demo run with other settings ({'; '.join(diffs)}); "
                             f"nothing was changed. Use another --out, or delete it to start over")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out: {str(out)!r} exists and is not an empty directory nor a demo output "
                         f"(no {MANIFEST}); nothing was changed. Use another --out")


def _checkpoint_step(run_dir: Path) -> int | None:
    """The step of a run's latest checkpoint (latest.json), or None."""
    try:
        return int(json.loads((run_dir / "latest.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _loss_curve(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]


def run_demo(out_dir="demo_out", *, quick: bool = False, steps: int | None = None, minutes: float | None = None,
             seed: int | None = None, max_bytes: int | None = None, train_len: int | None = None,
             eval_len: int | None = None, echo: Callable[[str], None] | None = None,
             progress: bool = False) -> dict:
    """Run the demo into out_dir (see the module docstring); returns the results dict (results.json).

    minutes: a wall-clock budget for the training of both models (half each); a model whose budget
    runs out stops early and is evaluated as it is. echo: receives the progress and summary lines
    (default: logging at INFO; pass tqdm.write-based printing when progress bars are on).
    progress: progress bars (tqdm, stderr) while training and evaluating.
    The validation split is checked to hold at least one eval_len window right after the data is
    prepared, before any training.
    """
    from .checkpoint import load_model
    from .config import get_config
    from .data import STDLIB, load_meta, prepare
    from .evaluate import evaluate_checkpoints, write_results
    from .generate import stream_text
    from .tokenizer import Tokenizer
    from .train import TrainConfig, train

    say = echo or log.info
    if minutes is not None and not minutes > 0:
        raise ValueError(f"minutes: expected a positive number, got {minutes!r}")
    s = DemoSettings.make(quick, steps=steps, seed=seed, max_bytes=max_bytes, train_len=train_len, eval_len=eval_len)
    out = Path(out_dir)
    _check_out_dir(out, s)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / MANIFEST, json.dumps({"settings": dataclasses.asdict(s)}, indent=2))
    t_start = time.perf_counter()
    timings = {}

    # 1. corpus -> tokenizer -> shards (prepare returns at once when out/data already holds them)
    t0 = time.perf_counter()
    say(f"[1/4] corpus: Python {'.'.join(map(str, __import__('sys').version_info[:3]))} standard library source, "
        f"first {s.max_bytes / 1e6:.1f} MB -> {s.vocab_size}-token BPE")
    meta = prepare(STDLIB, out / "data", vocab_size=s.vocab_size, max_bytes=s.max_bytes, val_fraction=s.val_fraction,
                   seed=s.seed)
    timings["data_s"] = time.perf_counter() - t0
    V = load_meta(out / "data")["vocab_size"]
    say(f"      {meta['train_tokens']:,} train tokens ({meta['train_docs']} files), {meta['val_tokens']:,} val tokens "
        f"({meta['val_docs']} files), vocab {V} ({timings['data_s']:.1f}s)")
    val_tokens = meta["val_tokens"]
    n_seqs = min(s.eval_seqs, (val_tokens - 1) // s.eval_len)
    if n_seqs < 1:  # checked before training, not after it
        raise ValueError(f"eval_len: the validation split holds only {val_tokens} tokens, fewer than eval_len + 1 = "
                         f"{s.eval_len + 1}; lower --eval-len (at most {max(val_tokens - 1, 0)}) or raise "
                         f"--max-bytes (nothing was trained)")

    # 2. two models of matched size
    ttt_cfg = get_config(s.size, mixer="ttt_linear", backbone="mamba", vocab_size=V, mini_batch=s.mini_batch)
    base_cfg, n_base, n_ttt = matched_baseline(ttt_cfg)
    cfgs = {TTT_NAME: ttt_cfg, BASE_NAME: base_cfg}
    params = {TTT_NAME: n_ttt, BASE_NAME: n_base}
    say(f"[2/4] models ({s.size}: {ttt_cfg.n_layers} layers, d_model {ttt_cfg.d_model}): "
        f"TTT-Linear (M) {n_ttt:,} params, Transformer {n_base:,} params (SwiGLU {base_cfg.ffn_hidden} vs "
        f"{ttt_cfg.ffn_hidden}; {100 * (n_base - n_ttt) / n_ttt:+.1f}%)")

    # 3. training, one model after the other
    budget = None if minutes is None else minutes * 60 / 2
    runs = {}
    for i, (name, cfg) in enumerate(cfgs.items()):
        tc = TrainConfig(data_dir=str(out / "data"), out_dir=str(out / "runs" / name), seq_len=s.train_len,
                         micro_batch=s.batch, tokens_per_step=s.batch * s.train_len, max_steps=s.steps, lr=s.lr,
                         eval_every=s.steps, eval_batches=4, save_every=0, keep_checkpoints=1, log_every=1,
                         seed=s.seed, device="cpu", amp="none", progress=progress, resume=True)
        say(f"[3/4] training {LABELS[name]}: {s.steps} steps of {s.batch} x {s.train_len} tokens, peak lr {s.lr}"
            + (f", time budget {budget / 60:.3g} min" if budget else ""))
        done = _checkpoint_step(Path(tc.out_dir))
        if done is not None and done < s.steps:
            say(f"      resumed from step {done} (the checkpoint in {tc.out_dir})")
        t0 = time.perf_counter()
        every = max(1, s.steps // 6)

        def on_step(step, row, t0=t0):
            if step % every == 0 or step == s.steps:
                say(f"      step {step:4d}/{s.steps}  loss {row['loss']:.3f}  {time.perf_counter() - t0:5.0f}s")
            return budget is not None and time.perf_counter() - t0 > budget

        summary = train(cfg, tc, on_step=on_step)
        secs = time.perf_counter() - t0
        if summary["stopped"] not in (None, "on_step"):  # Ctrl-C / SIGTERM: the trainer saved; stop the demo too
            raise KeyboardInterrupt(f"training stopped by {summary['stopped']} at step {summary['steps']}; the same "
                                    f"command continues it")
        curve = _loss_curve(Path(tc.out_dir))
        losses = [loss for _, loss in curve]
        k = max(1, min(10, len(losses) // 5))
        runs[name] = {"label": LABELS[name], "params": params[name], "steps": summary["steps"],
                      "stopped": summary["stopped"], "resumed_from": summary["resumed_from"], "train_s": secs,
                      "first_loss": losses[0] if losses else None,
                      "last_loss": sum(losses[-k:]) / k if losses else None, "last_k": k,
                      "val_loss": summary["val_loss"], "checkpoint": summary["checkpoint"],
                      "config": cfg.to_dict()}
        timings[f"train_{name}_s"] = secs
        r = runs[name]
        reused = summary["resumed_from"] == summary["steps"]
        say(f"      {LABELS[name]}: loss {_f(r['first_loss'])} (step 1) -> {_f(r['last_loss'])} (mean of the last "
            f"{k} steps), val loss {_f(r['val_loss'])}, {r['steps']} steps "
            + (f"(already trained in {tc.out_dir}: reused)" if reused else f"in {secs:.0f}s")
            + (" (stopped by the time budget; the same command continues it)" if summary["stopped"] else ""))

    # 4. evaluation by position beyond the training length, carrying state across chunks of train_len
    t0 = time.perf_counter()
    models = [load_model(runs[n]["checkpoint"], "cpu")[0] for n in cfgs]
    say(f"[4/4] evaluating both on {n_seqs} validation sequences of {s.eval_len} tokens, in chunks of {s.train_len} "
        f"with the state carried over")
    res = evaluate_checkpoints([], out / "data", seq_len=s.eval_len, chunk_len=s.train_len, n_seqs=n_seqs,
                               models=models, names=[LABELS[n] for n in cfgs], n_buckets=12, batch_size=s.batch,
                               progress=progress)
    paths = write_results(res, out / "eval", train_len=s.train_len)
    shutil.copyfile(paths["plot"], out / "nll_by_position.png")
    timings["eval_s"] = time.perf_counter() - t0
    for name, m in zip(cfgs, res["models"]):
        nll = m["per_position"]
        runs[name]["eval"] = {"nll": m["nll"], "ppl": m["ppl"],
                              "nll_within_train_len": sum(nll[:s.train_len]) / s.train_len,
                              "nll_beyond_train_len": (sum(nll[s.train_len:]) / (len(nll) - s.train_len)
                                                       if len(nll) > s.train_len else None),
                              "buckets": m["buckets"]}

    # a sample from the TTT model: prefill, then one-token steps carrying the state
    tok = Tokenizer.load(out / "data" / "tokenizer.json")
    prompt = "def "
    t0 = time.perf_counter()
    sample = prompt + "".join(stream_text(models[0], tok, prompt, s.sample_tokens, temperature=0.8, top_p=0.95,
                                          seed=s.seed))
    timings["sample_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start

    results = {"settings": dataclasses.asdict(s), "python": __import__("platform").python_version(),
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               "data": {k: meta[k] for k in ("vocab_size", "train_tokens", "val_tokens", "train_docs", "val_docs")},
               "models": runs, "eval": {"seq_len": s.eval_len, "chunk_len": s.train_len, "n_seqs": n_seqs,
                                        "files": paths},
               "sample": {"model": LABELS[TTT_NAME], "prompt": prompt, "temperature": 0.8, "top_p": 0.95,
                          "seed": s.seed, "text": sample},
               "timings": timings}
    write_text(out / "results.json", json.dumps(results, indent=1))
    table = results_table(results)
    write_text(out / "results.md", _results_md(results, table))
    say("")
    for line in table:
        say(line)
    say("")
    say(f"sample from {LABELS[TTT_NAME]} (prompt {prompt!r}, temperature 0.8, top-p 0.95, seed {s.seed}):")
    say(sample)
    say("")
    say(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'nll_by_position.png'} "
        f"(total {timings['total_s']:.0f}s)")
    return results


def _f(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def results_table(results: dict) -> list[str]:
    """The markdown table of the demo's results, one row per model."""
    s = results["settings"]
    T, L = s["train_len"], s["eval_len"]
    head = ["model", "params", "steps", "loss step 1", "loss last", "val loss", f"NLL pos 1-{T}",
            f"NLL pos {T + 1}-{L}", f"ppl 1-{L}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results["models"].values():
        e = r["eval"]
        lines.append("| " + " | ".join([r["label"], f"{r['params']:,}", str(r["steps"]), _f(r["first_loss"]),
                                        _f(r["last_loss"]), _f(r["val_loss"]), _f(e["nll_within_train_len"]),
                                        _f(e["nll_beyond_train_len"]), _f(e["ppl"], 2)]) + " |")
    return lines


def _results_md(results: dict, table: list[str]) -> str:
    s, t = results["settings"], results["timings"]
    buckets = list(results["models"].values())
    rows = ["| positions | " + " | ".join(r["label"] for r in buckets) + " |", "|---|" + "---|" * len(buckets)]
    for i, b in enumerate(buckets[0]["eval"]["buckets"]):
        rows.append(f"| {b['start']}-{b['end']} | " + " | ".join(_f(r["eval"]["buckets"][i]["nll"]) for r in buckets)
                    + " |")
    return "\n".join([
        "# ttt demo results", "",
        f"Corpus: Python {results['python']} standard library source (first {s['max_bytes']:,} bytes), "
        f"{s['vocab_size']}-token BPE: {results['data']['train_tokens']:,} train / {results['data']['val_tokens']:,} "
        f"val tokens. Models: size preset `{s['size']}`, trained {s['steps']} steps of {s['batch']} x "
        f"{s['train_len']} tokens on the CPU ({results['threads']} threads, torch {results['torch']}).",
        "", f"Evaluation: {results['eval']['n_seqs']} validation sequences of {s['eval_len']} tokens, fed in chunks "
        f"of {s['train_len']} with the model state carried over. 'loss last' is the mean training loss of the last "
        f"{buckets[0]['last_k']} steps; NLL in nats per token.", "",
        *table, "", "NLL by token position (log-spaced buckets):", "", *rows, "",
        "![NLL by position](nll_by_position.png)", "",
        f"Sample from {results['sample']['model']} (prompt `{results['sample']['prompt']}`, temperature "
        f"{results['sample']['temperature']}, top-p {results['sample']['top_p']}, seed {results['sample']['seed']}):",
        "", "```python", results["sample"]["text"], "```", "",
        "Time: " + ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in t.items()), ""])
