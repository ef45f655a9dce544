"""Every row of issue 16's table in one run on one GPU, each case beside its peers, checks first.

    python3 -m benchmarks.bench_table --out /tmp/gpu/table.json                  # check, op, train, prefill, decode
    python3 -m benchmarks.bench_table --parts check,train13b,mamba_layer         # the extra comparisons

Parts (in this order; each row is printed as JSON when measured and the file is rewritten, so a run cut short keeps
what it measured; a row that fails is recorded with its error and the run goes on):
  check        the fused 125m model vs the reference path (fp32 logits and every gradient) and the TTT-Linear op
               kernels vs the dual form (bf16 and fp32, with gradients); a failure stops the run before any timing
  op           op fwd+bwd at D 2048 (H 32 x d 64), B16 T2k and B4 T8k: TTT-Linear kernels, SDPA (FlashAttention),
               mamba_ssm's SSD (the 1.3b Mamba-2 layer's scan: 64 heads x 64, d_state 128)
  train        125m training tok/s, compiled blocks, loss through `targets=` (bf16 autocast, one AdamW step of 32k
               tokens), 8k and 2k: TTT-Linear on the PyTorch layer path (ttt_linear) and with the fused layer (the
               default on CUDA: ttt_linear+fused), Transformer++, Mamba-2 (our layer on mamba_ssm's SSD),
               mamba_ssm's own Mamba2 module in our blocks; "@graphs" (ttt_linear+fused@graphs, attention@graphs):
               the blocks compiled with mode="reduce-overhead", what `ttt train --compile` runs for TTT-Linear and
               Transformer++ in one process on windows of the data (compile_mode auto)
  prefill      1.3b prefill tok/s, bf16 weights, eager, logits="last", 2k / 8k / 32k, the same five
  decode       1.3b decode B16 ms/token, CUDA graphs of the compiled step, at 1k and 32k: TTT-Linear on the PyTorch
               layer path and fused (the fused decode kernel), next to attention's KV-cache read alone
  train13b     1.3b training tok/s at 8k (the paper's comparison size): TTT-Linear both paths, Transformer++,
               Mamba-2 (our layer and mamba_ssm's Mamba2 module)
  compile      the first forward+backward of the TTT-Linear op in a fresh process, with an empty Triton cache and then
               with the cache the first run left (TRITON_CACHE_DIR): bf16 head dim 64 and fp32 head dim 128
  mamba_layer  one Mamba-2 layer at the 1.3b shapes (d_state 64), B4 T8k bf16, forward and forward+backward: our
               layer (mamba_ssm's SSD) vs mamba_ssm's Mamba2 module (use_mem_eff_path=False)
The table at the end gives each case's ratio to Transformer++ (tok/s) or to the peer named in its row.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

from benchmarks import bench_model, bench_op
from benchmarks.common import bench, environment, load_mamba2_module
from ttt.checkpoint import write_json

TRAIN_MIXERS = ["ttt_linear", "ttt_linear+fused", "attention", "mamba", "mamba2_module"]
# timed only when --mixers names them: issue 17's TTT-MLP training rows (+keep: `mlp_keep_weights`); the blocks' CUDA
# graphs (mode="reduce-overhead", `ttt train --compile`'s default for TTT-Linear and Transformer++); TTT-Linear with
# the Gluon forward too (+gluon: `linear_gluon`; the backward is Gluon by default on Hopper)
TRAIN_EXTRA = ["ttt_mlp+fused", "ttt_linear+fused@graphs", "attention@graphs", "ttt_mlp+fused@graphs", "mamba@graphs",
               "ttt_mlp+fused+keep", "ttt_linear+fused+gluon", "ttt_linear+fused+gluon@graphs"]
PREFILL_MIXERS = TRAIN_MIXERS
DECODE_MIXERS = ["ttt_linear", "ttt_linear+fused"]
TOKENS = 32768  # tokens per training step and per prefill batch (B = TOKENS / T)


@dataclass
class Run:
    """One run's case selection (--mixers, --contexts: None keeps every case; --positions), its rows so far and the
    JSON file they are rewritten to after each row (--out; "" for none)."""

    out: str = ""
    mixers: list | None = None
    contexts: list | None = None
    positions: list = field(default_factory=lambda: [1024, 32768])
    rows: list = field(default_factory=list)

    def keep(self, row: dict) -> dict:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        if self.out:
            write_json(self.out, self.rows)
        return row

    def failed(self, part: str, e: Exception, **where) -> dict:
        """The row recording that a case failed with `e`."""
        return self.keep(dict(part=part, **where, error=f"{type(e).__name__}: {str(e)[:300]}"))

    def guarded(self, part: str, fn, **where):
        """fn() (a row dict, or a list of rows), or a row recording why it failed."""
        try:
            out = fn()
        except Exception as e:  # one failing case (a missing peer, an OOM) must not cost the others
            return [self.failed(part, e, **where)]
        for r in out if isinstance(out, list) else [out]:
            self.keep(dict(part=part, **{**where, **r}))
        return out

    def picked(self, cases, key: str, extra=()) -> list:
        """The cases kept by the selection `key` ("mixers" or "contexts"), in the part's own order; the `extra`
        cases only where the selection names them."""
        chosen = getattr(self, key)
        return [c for c in cases if chosen is None or c in chosen] + [c for c in extra if chosen and c in chosen]


def part_check(run: Run):
    rows = [bench_model.check_model("ttt_linear")]
    ok = rows[0]["ok"]
    log = bench_op.Log()
    for dtype, pos, T in ((torch.bfloat16, 0, 256), (torch.float32, 5, 83)):
        ok &= bench_op.check("linear", 2, T, 4, 64, dtype, pos=pos, grad=True, log=log)
    run.keep(dict(part="check", ok=bool(ok), op_checks=log.data["check"]))
    if not ok:
        raise SystemExit("a check failed: not timing")


def part_op(run: Run):
    for B, T in ((16, 2048), (4, 8192)):
        where = dict(B=B, T=T, H=32, d=64, mode="fwdbwd")
        run.guarded("op", lambda: dict(impl="ttt_linear triton",
                                       ms=bench_op.time_ttt("linear", B, T, 32, 64, "fwdbwd")), **where)
        run.guarded("op", lambda: dict(impl="sdpa flash", ms=bench_op.time_sdpa(B, T, 32, 64, "fwdbwd")), **where)
        run.guarded("op", lambda: dict(impl="mamba_ssm ssd", ms=bench_op.time_mamba2(B, T, "fwdbwd")), **where)


def part_train(run: Run, size="125m", contexts=(8192, 2048), mixers=TRAIN_MIXERS):
    for T in run.picked(contexts, "contexts"):
        for m in run.picked(mixers, "mixers", TRAIN_EXTRA):
            def row():
                for accum in (1, 2, 4):  # on OOM: the same tokens per step in smaller micro-batches
                    r = bench_model.train_row(m, T, TOKENS, accum, "auto", compile_blocks=True, size=size)
                    if "error" not in r:
                        break
                return r
            run.guarded("train" if size == "125m" else f"train {size}", row, mixer=m, context=T)


def part_prefill(run: Run):
    contexts = run.picked((2048, 8192, 32768), "contexts")
    for m in run.picked(PREFILL_MIXERS, "mixers") if contexts else ():
        # each mixer's 1.3b model built once for all contexts: its init on the CPU took most of a row's ~40 s on the
        # H100's host (2026-12-06), when every row built its own
        try:
            built = bench_model.prefill_model(m, "1.3b")
        except Exception as e:  # a missing peer: its rows fail, the others run
            run.failed("prefill", e, mixer=m)
            continue
        for T in contexts:
            run.guarded("prefill", lambda: bench_model.prefill_row(m, "1.3b", T, TOKENS, False, built), mixer=m,
                        context=T)
        built = None
        torch.cuda.empty_cache()


def part_decode(run: Run):
    for m in run.picked(DECODE_MIXERS, "mixers"):
        run.guarded("decode", lambda: bench_model.bench_decode(run.positions, 16, "1.3b", "default", mixer=m),
                    mixer=m)


def part_mamba_layer(run: Run, B=4, T=8192, D=2048, d_state=64):
    from ttt.layers.mamba import Mamba2 as OurMamba2
    Module = load_mamba2_module()
    x = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    layers = {"ours (mamba_ssm SSD)": lambda: OurMamba2(D, d_state=d_state, backend="mamba_ssm")}
    if Module is not None:
        layers["mamba_ssm Mamba2 module"] = lambda: Module(D, d_state=d_state, headdim=64, expand=2,
                                                           use_mem_eff_path=False)
    for name, make in layers.items():
        def row():
            layer = make().cuda().to(torch.bfloat16)
            call = (lambda: layer(x)[0]) if name.startswith("ours") else (lambda: layer(x))
            with torch.no_grad():
                fwd = bench(call)
            both = bench(lambda: torch.autograd.grad(call(), [x] + list(layer.parameters()), dy, allow_unused=True))
            return dict(layer=name, B=B, T=T, D=D, d_state=d_state, fwd_ms=fwd, fwd_bwd_ms=both)
        run.guarded("mamba_layer", row, layer=name)


FIRST_CALL = """
import time, torch
from benchmarks.common import make, run
t = time.time()
leaves, st = make("linear", 2, 256, 4, {d}, torch.{dtype}, grad=True)
o, _ = run("linear", leaves, st, "triton")
o.float().sum().backward()
torch.cuda.synchronize()
print(time.time() - t)
"""


def part_compile(run: Run):
    for dtype, d in (("bfloat16", 64), ("float32", 128)):
        with tempfile.TemporaryDirectory() as cache:
            for which in ("empty Triton cache", "cache of the run before"):
                def row():
                    out = subprocess.run([sys.executable, "-c", FIRST_CALL.format(d=d, dtype=dtype)], text=True,
                                         capture_output=True, timeout=240, env=dict(os.environ, TRITON_CACHE_DIR=cache))
                    if out.returncode:
                        raise RuntimeError(out.stderr[-300:])
                    return dict(first_fwd_bwd_s=float(out.stdout.split()[-1]))
                run.guarded("compile", row, dtype=dtype, d=d, cache=which)


def table(rows: list) -> str:
    """Markdown rows: each timed case with its ratio to Transformer++ (tok/s) where the row has one."""
    lines = []
    for part, key in (("train", "tokens_per_s"), ("prefill", "tokens_per_s")):
        rs = [r for r in rows if r.get("part") == part and key in r]
        for T in sorted({r["context"] for r in rs}):
            at = {r["mixer"]: r[key] for r in rs if r["context"] == T}
            ref = at.get("attention")
            cells = [f"{m} {v / 1e3:.0f}k" + (f" ({v / ref:.2f}x)" if ref else "") for m, v in at.items()]
            lines.append(f"| {part} T{T} tok/s | " + " | ".join(cells) + " |")
    for r in rows:
        if r.get("part") == "decode" and "graphed_ms_per_token" in r:
            lines.append(f"| decode {r['model']} T{r['context']} ms/token | graphed {r['graphed_ms_per_token']:.3f} | "
                         f"compiled+graphed {r.get('compiled_graphed_ms_per_token') or float('nan'):.3f} | "
                         f"same, weights unmerged {r.get('compiled_graphed_unmerged_ms_per_token') or float('nan'):.3f} | "
                         f"KV read alone {r.get('attention_kv_cache_alone_ms') or float('nan'):.3f} |")
        if r.get("part") == "op" and "ms" in r and r["ms"] is not None:
            lines.append(f"| op fwd+bwd B{r['B']} T{r['T']} | {r['impl']} {r['ms']:.2f} ms |")
        if r.get("part") == "compile" and "first_fwd_bwd_s" in r:
            lines.append(f"| first op fwd+bwd {r['dtype']} d{r['d']} | {r['cache']}: {r['first_fwd_bwd_s']:.1f} s |")
        if r.get("part") == "mamba_layer" and "fwd_ms" in r:
            lines.append(f"| Mamba-2 layer B{r['B']} T{r['T']} | {r['layer']} fwd {r['fwd_ms']:.2f} / "
                         f"fwd+bwd {r['fwd_bwd_ms']:.2f} ms |")
    return "\n".join(lines)


PARTS = {"check": part_check, "op": part_op, "train": part_train, "prefill": part_prefill, "decode": part_decode,
         "train13b": lambda run: part_train(run, "1.3b", (8192,), ["ttt_linear", "ttt_linear+fused", "attention",
                                                                  "mamba", "mamba2_module"]),
         "mamba_layer": part_mamba_layer, "compile": part_compile}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="check,op,train,prefill,decode", help=f"comma list of {', '.join(PARTS)}")
    ap.add_argument("--mixers", default="", help="comma list: only these mixers in train, prefill, decode (all if empty; "
                    f"in train {', '.join(TRAIN_EXTRA)} only when named)")
    ap.add_argument("--contexts", default="", help="comma list: only these contexts in train, prefill (all if empty)")
    ap.add_argument("--positions", default="1024,32768", help="comma list: decode positions")
    ap.add_argument("--out", default="", help="write every row here as JSON (rewritten after each row)")
    a = ap.parse_args(argv)
    run = Run(out=a.out, mixers=a.mixers.split(",") if a.mixers else None)
    try:
        run.contexts = [int(v) for v in a.contexts.split(",")] if a.contexts else None
        run.positions = [int(v) for v in a.positions.split(",")]
    except ValueError:
        ap.error(f"--contexts/--positions: expected comma lists of integers, got {a.contexts!r} / {a.positions!r}")
    if run.mixers and set(run.mixers) - set(TRAIN_MIXERS + TRAIN_EXTRA):
        ap.error(f"--mixers: expected names from {', '.join(TRAIN_MIXERS + TRAIN_EXTRA)}, got {a.mixers}")
    parts = a.parts.split(",")
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"--parts: expected names from {', '.join(PARTS)}, got {', '.join(bad)}")
    torch.backends.cuda.matmul.allow_tf32 = True
    run.keep(dict(part="env", **environment()))
    t0 = time.time()
    for p in parts:
        t = time.time()
        PARTS[p](run)
        run.keep(dict(part=p, wall_s=time.time() - t))
    run.keep(dict(part="total", wall_s=time.time() - t0))
    print(table(run.rows), flush=True)


if __name__ == "__main__":
    main()
