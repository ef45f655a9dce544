"""Model-level benchmarks (GPU): training tokens/s and per-token decode latency vs context length.

    python3 -m benchmarks.bench_model --train --decode --out results.json

Training: one optimizer step (forward + backward + AdamW) of a 125m model under bf16 autocast, for
TTT-Linear (M), TTT-MLP (M), the Transformer++ baseline (SDPA/FlashAttention) and the Mamba-2-style
baseline, at 2k and 8k context with the same tokens per step. Decode: the 1.3b TTT-Linear model at
batch 16, one token per step through CUDA-graph replay of the eager step and of the torch.compile'd
step (`GraphedDecoder(compile=mode)`; --decode-compile off skips it), and eagerly, at several context
positions, next to the attention "KV cache alone" cost (24 layers of SDPA over a cache of that length).
Before timing, both graphed decodes are checked against the eager step.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F

from benchmarks.common import environment, timed, train_step, with_mamba2_module
from ttt.config import RunOptions, get_config
from ttt.decode_graph import GraphedDecoder, flatten_state, rebuild_state
from ttt.model import TTTLM
from ttt.checkpoint import write_json


def build(size, mixer, ttt_backend="auto"):
    """(config, model on the GPU) of a preset with `mixer`: a TTT mixer alone runs the PyTorch layer path
    (fused_layer=False), the suffix "+fused" (e.g. ttt_linear+fused) the library's default, fused_layer=None, which on
    CUDA runs the fused layer kernels (checked), "+fused+keep" (TTT-MLP) that with `mlp_keep_weights`,
    "+fused+gluon" (TTT-Linear) that with `linear_gluon` (the Gluon forward too; the backward is Gluon by default
    on Hopper);
    "mamba2_module": the Mamba preset with mamba_ssm's own Mamba2 module as every mixer."""
    base, _, extra = mixer.partition("+")
    extra, _, keep = extra.partition("+")
    if base == "mamba2_module":
        cfg = get_config(size, mixer="mamba")
        return cfg, with_mamba2_module(TTTLM(cfg), cfg).cuda()
    cfg = get_config(size, mixer=base)
    # "+fused": the library's default (fused_layer=None, auto), which must pick the fused kernels here
    model = TTTLM(cfg, RunOptions(ttt_backend=ttt_backend, fused_layer=None if extra == "fused" else False,
                                  mlp_keep_weights=keep == "keep", linear_gluon=keep == "gluon")).cuda()
    if extra == "fused" and not all(b.mixer.prepare().fused for b in model.blocks):
        raise RuntimeError(f"{mixer}: the default (fused_layer=None) did not pick the fused layer kernels here")
    return cfg, model


def bench_train(mixers, contexts, tokens_per_step, backend, compile_blocks=False):
    rows = []
    for T in contexts:
        for mixer in mixers:
            row = None
            for accum in (1, 2, 4):  # on OOM: the same tokens per step in smaller micro-batches
                row = train_row(mixer, T, tokens_per_step, accum, backend, compile_blocks)
                if "error" not in row:
                    break
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def fresh_compile():
    """Forget earlier rows' compiled code: each row is timed as a process that trains or reads one length would run
    it. Without this, the blocks' shared forward code recompiles at a second length with dynamic shapes (H200, 125m
    TTT-Linear at 2k after 8k: 291k tok/s against 319k alone, in CUDA graphs). Also lets the CUDA graphs' memory pools
    go (the reset frees the graph trees, torch 2.11 on): a row that ran out of memory in graphs left ~71 GiB in them,
    and the next attempt's model could not be built (H100, 1.3b, 2026-12-07)."""
    torch._dynamo.reset()


def train_row(mixer, T, tokens_per_step, accum, backend, compile_blocks=False, size="125m"):
    """Time one optimizer step of a `size` model: `accum` micro-batches of tokens_per_step/accum tokens. A mixer
    name ending in "@graphs" (e.g. ttt_linear+fused@graphs) compiles the blocks with mode="reduce-overhead": CUDA
    graphs of each block's forward and backward (an experiment: no host launch work per kernel)."""
    B = tokens_per_step // T // accum
    torch.manual_seed(0)
    label = mixer  # the row's name, "@graphs" included
    mixer, _, how = mixer.partition("@")
    graphs = how == "graphs"
    compiled = compile_blocks or graphs
    cfg, model = build(size, mixer, backend)
    if compiled:  # as `ttt train --compile`: each block through torch.compile (fuses element-wise work)
        fresh_compile()
        for blk in model.blocks:
            blk.compile(mode="reduce-overhead" if graphs else None)
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), device="cuda")
    # targets=: the chunked head, no [B, T, V] fp32 logits
    step = train_step(model, [dict(ids=ids[:, :-1], targets=ids[:, 1:], state_out=False)] * accum, graphs=graphs)

    # (imported here: importing it imports Triton, which the CPU tests that import this module must first import
    # with TRITON_INTERPRET set)
    from torch._dynamo.utils import counters

    torch.cuda.reset_peak_memory_stats()
    skips = counters["inductor"]["cudagraph_skips"]
    try:
        each = []  # every timed step's ms (a row's median hides whether its steps agree)
        ms = timed(step, warmup=3 if graphs else 2, iters=5, each=each)  # graphs: warm-up, recording, replays
        row = dict(mixer=label, size=size, compiled=compiled, context=T,
                   batch=B, accum=accum, ms_per_step=ms, ms_each=[round(t, 2) for t in each],
                   tokens_per_s=B * accum * T / ms * 1e3,
                   peak_gib=torch.cuda.max_memory_allocated() / 2**30, params=model.num_parameters())
        if graphs:  # graphs Inductor declined to record (each logged by torch with its reason): 0 where all replay
            row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips
    except torch.OutOfMemoryError as e:
        row = dict(mixer=label, context=T, batch=B, accum=accum, error=f"OOM: {e}"[:200])
    del model, step  # free the memory (the step holds the optimizer) before the next model
    if compiled:
        fresh_compile()
    torch.cuda.empty_cache()
    return row


def check_model(mixer="ttt_linear", size="125m", T=1040, B=2):
    """The fast model (Triton op and fused layer kernels) against the reference path (the dual form and the
    PyTorch layer) before any timing: fp32 logits and every parameter gradient of a real-size model."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # true fp32 on both paths
    torch.manual_seed(0)
    cfg = get_config(size, mixer=mixer)
    ref = TTTLM(cfg, RunOptions(ttt_backend="dual")).cuda()
    fast = TTTLM(cfg, RunOptions(ttt_backend="triton", fused_layer=True)).cuda()
    fast.load_state_dict(ref.state_dict())
    ids = torch.randint(0, ref.cfg.vocab_size, (B, T + 1), device="cuda")
    out = {}
    for name, m in (("ref", ref), ("fast", fast)):
        logits, _ = m(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        out[name] = (logits.detach(), {n: p.grad for n, p in m.named_parameters()})
    lr_, gr = out["ref"]
    lf, gf = out["fast"]
    err = ((lf - lr_).norm() / lr_.norm()).item()
    gerr = max(((gf[n] - g).norm() / g.norm().clamp_min(1e-12)).item() for n, g in gr.items())
    worst = max(gr, key=lambda n: ((gf[n] - gr[n]).norm() / gr[n].norm().clamp_min(1e-12)).item())
    row = dict(check=f"{size} {mixer} fast vs reference (fp32, T={T})", logits_rel=err, worst_grad_rel=gerr,
               worst_grad=worst, ok=err < 1e-4 and gerr < 2e-3)
    print(json.dumps(row), flush=True)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    del ref, fast, out
    torch.cuda.empty_cache()
    return row


@torch.inference_mode()
def prefill_model(mixer, size):
    """(config, model) as `prefill_row` times it: `build`'s model (seed 0) in bf16, eval mode."""
    torch.manual_seed(0)
    cfg, model = build(size, mixer)
    return cfg, model.to(torch.bfloat16).eval()


@torch.inference_mode()
def prefill_row(mixer, size, T, tokens, compile_blocks, built=None):
    """Tokens/s of a forward over `tokens` tokens in B = tokens/T sequences of T, bf16 weights, the head at the
    last position only (what generation needs). built: `prefill_model(mixer, size)`'s pair, made once for several
    contexts (a 1.3b model's init on the CPU takes longer than its timing); None builds it here."""
    cfg, model = built or prefill_model(mixer, size)
    if compile_blocks:
        fresh_compile()
        for blk in model.blocks:
            blk.compile()
    B = max(1, tokens // T)
    ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
    try:
        ms = timed(lambda: model(ids, logits="last"), warmup=2, iters=5)
        row = dict(kind="prefill", mixer=mixer, size=size, compiled=compile_blocks, context=T, batch=B, ms=ms,
                   tokens_per_s=B * T / ms * 1e3)
    except torch.OutOfMemoryError as e:
        row = dict(kind="prefill", mixer=mixer, size=size, context=T, batch=B, error=f"OOM: {e}"[:200])
    print(json.dumps(row), flush=True)
    model = None
    if built is None:
        torch.cuda.empty_cache()
    return row


@torch.inference_mode()
def bench_decode(positions, batch, size="1.3b", compiled: str | None = "default", mixer="ttt_linear"):
    """compiled: the torch.compile mode of the compiled graphed decode timed next to the others (None: skip it),
    with the merged decode weights (GraphedDecoder's default) and without ("compiled_unmerged");
    mixer: ttt_linear, or ttt_linear+fused (the fused layer kernels: one fused decode kernel per layer step)."""
    rows = []
    torch.manual_seed(0)
    with torch.inference_mode(False):  # normal weights: inference tensors cannot be merged (GraphedDecoder)
        cfg, model = build(size, mixer)
        model = model.to(torch.bfloat16).eval()
    model.merge_decode_weights()  # the eager reference steps run the GEMMs that the merged decoders capture
    prompt = torch.randint(0, cfg.vocab_size, (batch, 64), device="cuda")
    _, state = model(prompt)
    # correctness over 2 mini-batches of steps: the plain graphed replay == the eager bf16 steps (same kernels);
    # the compiled one rounds differently (Inductor keeps fused element-wise chains in fp32), so it is held to
    # the eager bf16 step's own distance from an fp32 copy of the model run on the same tokens
    # name: (compile, merge)
    variants = {"graphed": (False, True)}
    if compiled:
        variants.update(compiled=(compiled, True), compiled_unmerged=(compiled, False))

    compile_s = None
    nxt = torch.randint(0, cfg.vocab_size, (batch, 2 * cfg.mini_batch), device="cuda")
    ref_model = copy.deepcopy(model).float()
    s_ref = rebuild_state(state, [t.float() if t.is_floating_point() else t for t in flatten_state(state)])
    # the eager steps on the state's decode form, as the graphed decoder holds it (the fused decode's rows form)
    s_eager, ref, eager = model.decode_state(state), [], []
    for t in range(nxt.shape[1]):
        lg_r, s_ref = ref_model(nxt[:, t:t + 1], s_ref)
        lg_e, s_eager = model(nxt[:, t:t + 1], s_eager)
        ref.append(lg_r.float())
        eager.append(lg_e.float())
    ref_model = s_ref = None

    def dist(a, b):
        return max((x - y).abs().max().item() / y.abs().max().item() for x, y in zip(a, b))

    eager_vs_fp32 = dist(eager, ref)
    for name, (comp, merge) in variants.items():
        t0 = time.time()
        dec = GraphedDecoder(model, state, compile=comp, merge=merge)
        if comp and compile_s is None:  # the first compiled decoder compiles the b steps; later ones reuse them
            compile_s = time.time() - t0
        got = [dec.step(nxt[:, t:t + 1]).float().clone() for t in range(nxt.shape[1])]
        err, err32 = dist(got, eager), dist(got, ref)
        print(json.dumps(dict(check=f"{mixer} {name} decode (max rel err of logits)", vs_eager_bf16=err, vs_fp32=err32,
                              eager_bf16_vs_fp32=eager_vs_fp32,
                              **({"compile_and_capture_s": compile_s} if comp else {}))), flush=True)
        if comp:
            assert err32 <= 1.5 * eager_vs_fp32 + 1e-3, f"{name} decode is further from fp32 than eager bf16: {err32}"
        else:
            assert err == 0.0, f"{name} decode differs from the eager steps: {err}"
    # the TTT state has a fixed size: to time at context position P we set the position (pos mod b is
    # what the step depends on) on the state reached after the real prompt
    for P in positions:
        s = rebuild_state(state, [t.clone() for t in flatten_state(state)], pos=P)
        tok = torch.randint(0, cfg.vocab_size, (batch, 1), device="cuda")
        ms = {}
        for name, (comp, merge) in variants.items():
            dec = GraphedDecoder(model, s, compile=comp, merge=merge)
            ms[name] = timed(lambda: [dec.step(tok) for _ in range(cfg.mini_batch)], warmup=2,
                             iters=10) / cfg.mini_batch
            dec = None
        model.merge_decode_weights(False)
        sd = model.decode_state(s)  # the eager steps on the decode form, as `generate` runs them
        eager_ms = timed(lambda: model(tok, sd), warmup=2, iters=5)
        # attention's KV cache alone at this context: one SDPA per layer over P cached keys/values
        H, d = cfg.n_heads, cfg.d_model // cfg.n_heads
        try:
            q = torch.randn(batch, H, 1, d, device="cuda", dtype=torch.bfloat16)
            kv = torch.randn(2, batch, H, P, d, device="cuda", dtype=torch.bfloat16)
            attn_ms = timed(lambda: [F.scaled_dot_product_attention(q, kv[0], kv[1]) for _ in range(cfg.n_layers)])
            kv = None  # free the cache before the next, longer one
        except torch.OutOfMemoryError:
            attn_ms = None
        row = dict(model=f"{size} {mixer}", batch=batch, context=P, graphed_ms_per_token=ms["graphed"],
                   compiled_graphed_ms_per_token=ms.get("compiled"),
                   compiled_graphed_unmerged_ms_per_token=ms.get("compiled_unmerged"), compile_mode=compiled,
                   eager_ms_per_token=eager_ms,
                   attention_kv_cache_alone_ms=attn_ms)
        print(json.dumps(row), flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fast model vs reference path (logits, gradients) first")
    ap.add_argument("--train", action="store_true", help="time training steps")
    ap.add_argument("--train-modes", default="eager,compiled", help="training timed eagerly and/or compiled")
    ap.add_argument("--prefill", action="store_true", help="time prefill (forward, last-position logits)")
    ap.add_argument("--prefill-size", default="1.3b")
    ap.add_argument("--prefill-contexts", default="2048,8192,32768")
    ap.add_argument("--prefill-mixers", default="ttt_linear,ttt_linear+fused,attention,mamba")
    ap.add_argument("--prefill-modes", default="eager,compiled")
    ap.add_argument("--decode", action="store_true", help="time decode steps")
    ap.add_argument("--mixers", default="ttt_linear,ttt_linear+fused,ttt_mlp,attention,mamba",
                    help="comma list; ttt_linear: the PyTorch layer path, ttt_linear+fused: the fused layer kernels (the "
                         "default on CUDA); "
                         "mamba2_module: mamba_ssm's Mamba2 module in our blocks")
    ap.add_argument("--contexts", default="2048,8192")
    ap.add_argument("--tokens-per-step", type=int, default=32768)
    ap.add_argument("--backend", default="auto", help="TTT op backend for training")
    ap.add_argument("--compile", action="store_true", help="torch.compile each block for the training timings")
    ap.add_argument("--positions", default="1024,4096,8192,16384,32768")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--decode-size", default="1.3b")
    ap.add_argument("--decode-mixers", default="ttt_linear,ttt_linear+fused",
                    help="comma list of ttt_linear, ttt_linear+fused (the fused decode kernel)")
    ap.add_argument("--decode-compile", default="default", choices=("default", "max-autotune-no-cudagraphs", "off"),
                    help="torch.compile mode of the compiled graphed decode (GraphedDecoder(compile=mode)); "
                         "off: skip it")
    ap.add_argument("--out", default=None, help="write results JSON here")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    env = environment()
    print(json.dumps(env), flush=True)
    res = dict(env=env)
    t0 = time.time()
    if a.check:
        res["check"] = [check_model("ttt_linear"), check_model("ttt_mlp", T=520)]
        if not all(r["ok"] for r in res["check"]):
            raise SystemExit("the fast model differs from the reference path: not timing")
    if a.train:
        res["train"] = []
        for mode in a.train_modes.split(","):
            res["train"] += bench_train(a.mixers.split(","), [int(x) for x in a.contexts.split(",")],
                                        a.tokens_per_step, a.backend, mode == "compiled" or a.compile)
    if a.prefill:
        res["prefill"] = []
        for mode in a.prefill_modes.split(","):
            for m in a.prefill_mixers.split(","):  # one model per mixer and mode (compiling changes its blocks)
                built = prefill_model(m, a.prefill_size)
                res["prefill"] += [prefill_row(m, a.prefill_size, int(T), a.tokens_per_step, mode == "compiled", built)
                                   for T in a.prefill_contexts.split(",")]
                built = None
                torch.cuda.empty_cache()
    if a.decode:
        res["decode"] = [row for m in a.decode_mixers.split(",")
                         for row in bench_decode([int(x) for x in a.positions.split(",")], a.batch, a.decode_size,
                                                 compiled=None if a.decode_compile == "off" else a.decode_compile,
                                                 mixer=m)]
    res["wall_s"] = time.time() - t0
    if a.out:
        write_json(a.out, res)


if __name__ == "__main__":
    main()
