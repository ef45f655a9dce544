"""Packed documents on the GPU (docs/packed.md): training on a realistic spread of document lengths packed into
one sequence with cu_seqlens, against the same documents padded to the longest, and the op-level cost of
cu_seqlens at one full-length document.

    python3 -m benchmarks.bench_packed --out /tmp/bench_packed.json      # GPU; a few minutes (the rows print as they come)
    python3 -m benchmarks.bench_packed --ops mlp --mixers ttt_mlp        # a part: TTT-MLP's op and model only

Documents: lengths drawn log-normal with mean --mean-len (sigma --sigma), until --pack-len tokens are filled
(the last one cut). Per mixer (TTT-Linear, TTT-MLP, Transformer++, Mamba-2; --size preset, bf16 autocast):
one training step (forward, backward, AdamW) packed ([1, pack_len] with cu_seqlens) and padded ([N, longest]
with the padding's targets skipped); tokens/s counts real tokens only. Op (TTT-Linear and TTT-MLP through the
triton backend, H = 12 x d = 64, bf16): forward + backward of one sequence of pack_len tokens without
cu_seqlens and as one packed document (cu = [0, pack_len]; the same kernels, so the overhead is the packed
path's bookkeeping; target <= 5%), and of the documents packed against padded.

Correctness first: for every mixer, a debug-size fp32 model on the same documents gives the same per-token
loss and the same gradients packed and padded (on the GPU's own paths: FlexAttention, the triton op, mamba_ssm
when installed); for both kinds the triton op on the packed documents equals each document alone through the
dual form (outputs, final states, every gradient; fp32, tf32 off). Whatever fails its check is not timed. The
op part runs first, then each mixer's check and timings (Mamba-2 last); the JSON is rewritten after every row, so a
run cut short keeps what it measured; the table comes last.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from benchmarks.common import environment, kernel_times, rel, timed, train_step
from ttt.config import get_config
from ttt.model import IGNORE, TTTLM
from ttt.ops import TTTInputs, TTTState, make_tau, resolve_op
from ttt.ops.packed import per_document
from ttt.checkpoint import write_json

MIXERS = ("ttt_linear", "ttt_mlp", "attention", "mamba")


def document_lengths(pack_len, mean_len, sigma, seed):
    """Log-normal lengths with mean `mean_len`, drawn until they fill pack_len tokens (the last one cut)."""
    rng = np.random.default_rng(seed)
    lens = []
    while sum(lens) < pack_len:
        n = int(max(1, round(rng.lognormal(math.log(mean_len) - sigma ** 2 / 2, sigma))))
        lens.append(min(n, pack_len - sum(lens)))
    return lens


def cu_of(lens) -> torch.Tensor:
    return torch.tensor([0, *lens]).cumsum(0)


def batches(lens, vocab, seed=0):
    """The same documents packed (ids, targets [1, T], cu_seqlens) and padded (ids, targets [N, longest], the
    padding's targets IGNORE); each document's targets are its own next tokens, its last skipped."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, vocab, (n + 1,), generator=g) for n in lens]
    ids = torch.cat([d[:-1] for d in docs])[None]
    tg = torch.cat([torch.cat([d[1:-1], torch.tensor([IGNORE])]) for d in docs])[None]
    longest = max(lens)
    pad_ids = torch.zeros(len(lens), longest, dtype=torch.long)
    pad_tg = torch.full((len(lens), longest), IGNORE)
    for i, d in enumerate(docs):
        pad_ids[i, :lens[i]] = d[:-1]
        pad_tg[i, :lens[i] - 1] = d[1:-1]
    dev = "cuda"
    return (ids.to(dev), tg.to(dev), cu_of(lens)), (pad_ids.to(dev), pad_tg.to(dev), None)


def nll_and_grads(model, batch):
    ids, tg, cu = batch
    nll, _ = model(ids, targets=tg, cu_seqlens=cu, reduction="none")
    keep = tg != IGNORE
    (nll.sum() / keep.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return nll[keep].detach(), grads


def check(mixer, lens):
    """Packed == padded on a debug-size fp32 model: per-token loss and every gradient."""
    torch.manual_seed(0)
    model = TTTLM(get_config("debug", mixer=mixer, vocab_size=512)).cuda()
    packed, padded = batches(lens, 512)
    (a, ga), (b, gb) = nll_and_grads(model, packed), nll_and_grads(model, padded)
    loss_err = (a - b).abs().max().item()
    grad_err = max(rel(ga[n], gb[n]) for n in gb)
    row = dict(check=mixer, max_nll_diff=loss_err, worst_grad_rel=grad_err, ok=loss_err < 2e-3 and grad_err < 2e-3)
    print(json.dumps(row), flush=True)
    return row


def train_row(mixer, size, lens, mode):
    """Median ms of one optimizer step on the documents, packed or padded (bf16 autocast)."""
    cfg = get_config(size, mixer=mixer)
    torch.manual_seed(0)
    model = TTTLM(cfg).cuda()
    ids, tg, cu = batches(lens, cfg.vocab_size)[0 if mode == "packed" else 1]
    step = train_step(model, [dict(ids=ids, targets=tg, cu_seqlens=cu, state_out=False)])

    torch.cuda.reset_peak_memory_stats()
    try:
        ms = timed(step, warmup=2, iters=5)
        row = dict(mixer=mixer, mode=mode, shape=list(ids.shape), ms_per_step=ms, real_tokens=sum(lens),
                   real_tokens_per_s=sum(lens) / ms * 1e3, peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30)
    except torch.OutOfMemoryError as e:
        row = dict(mixer=mixer, mode=mode, shape=list(ids.shape), error=f"OOM: {e}"[:200])
    print(json.dumps(row), flush=True)
    model = step = None  # free the memory (the step holds the optimizer) before the next model
    torch.cuda.empty_cache()
    return row


def op_case(kind, B, T, H, d, dtype, rows, b=16, seed=0):
    """Random leaves of one op call ([q, k, v, lr, delta, ln_w, ln_b, *initial weights], all requiring grad)
    and a fresh state of `rows` rows."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, device="cuda") * scale  # noqa: E731
    F = 4 * d
    shapes = [(H, d, d), (H, d)] if kind == "linear" else [(H, d, F), (H, F), (H, F, d), (H, d)]
    leaves = [r(B, T, H, d).to(dtype) for _ in range(3)] + [
        (torch.rand(B, T, H, generator=g, device="cuda") * 0.9 + 0.05) / d ** 0.5, r(b, scale=0.01),
        1 + r(H, d, scale=0.2), r(H, d, scale=0.2)] + [r(*s, scale=s[-2] ** -0.5 if len(s) == 3 else 0.1)
                                                       for s in shapes]
    for t in leaves:
        t.requires_grad_()
    return leaves, (lambda: TTTState.initial(kind, leaves[7:], rows))


def op_call(op, leaves, st, cu=None):
    q, k, v, lr, delta, lnw, lnb = leaves[:7]
    return op(TTTInputs(q, k, v, lr, make_tau(delta), lnw, lnb, cu), st)


def op_check(kind, lens, H=4, d=64):
    """The triton op on the packed documents == each document alone through the dual form (fp32, tf32 off):
    outputs, final states and the gradients of a random weighting w.r.t. every leaf."""
    leaves, state = op_case(kind, 1, sum(lens), H, d, torch.float32, len(lens))
    cu = cu_of(lens)
    tri = op_call(resolve_op(kind, "triton", "cuda"), leaves, state(), cu)
    q, k, v, lr, delta, lnw, lnb = leaves[:7]
    ref = per_document(resolve_op(kind, "dual", "cuda"), TTTInputs(q, k, v, lr, make_tau(delta), lnw, lnb), state(),
                       cu)
    outs = [[o, *s.params, *s.accum] for o, s in (tri, ref)]
    ws = [torch.randn_like(t) for t in outs[1]]
    grads = [torch.autograd.grad(sum((t * w).sum() for t, w in zip(ts, ws)), leaves) for ts in outs]
    err = max([rel(a, b) for a, b in zip(*outs) if b.abs().max() > 0] + [rel(a, b) for a, b in zip(*grads)])
    row = dict(check=f"op_{kind}", documents=len(lens), worst_rel=err, ok=err < 1e-3)
    print(json.dumps(row), flush=True)
    return row


def op_rows(kind, lens, H=12, d=64, dtype=torch.bfloat16, profile=False):
    """Forward + backward ms of the triton op: one sequence of pack_len tokens without and with cu = [0, T];
    the documents packed ([1, T]) and padded to the longest ([N, longest]); profile: also each kernel's time per
    call, packed and padded (where packed documents lose or win at the op level)."""
    T = sum(lens)
    op = resolve_op(kind, "triton", "cuda", dtype)

    def fwd_bwd(leaves, state, cu):
        o, s = op_call(op, leaves, state(), cu)
        torch.autograd.backward([o, *s.params], [torch.ones_like(o), *(torch.ones_like(p) for p in s.params)],
                                inputs=leaves)

    one, one_state = op_case(kind, 1, T, H, d, dtype, 1)
    docs, docs_state = op_case(kind, 1, T, H, d, dtype, len(lens))
    pad, pad_state = op_case(kind, len(lens), max(lens), H, d, dtype, len(lens))
    plain = timed(lambda: fwd_bwd(one, one_state, None), 3, 10)
    one_doc = timed(lambda: fwd_bwd(one, one_state, cu_of([T])), 3, 10)
    packed = timed(lambda: fwd_bwd(docs, docs_state, cu_of(lens)), 3, 10)
    padded = timed(lambda: fwd_bwd(pad, pad_state, None), 3, 10)
    if profile:
        for mode, fn in (("packed", lambda: fwd_bwd(docs, docs_state, cu_of(lens))),
                         ("padded", lambda: fwd_bwd(pad, pad_state, None))):
            for name, ms, n in kernel_times(fn, calls=3)[:10]:
                print(f"profile ttt_{kind} {mode:6s} {ms:8.3f} ms {n:4.0f} x  {name[:90]}", flush=True)
    row = dict(op=f"ttt_{kind}", T=T, H=H, d=d, plain_ms=plain, one_document_ms=one_doc, overhead=one_doc / plain - 1,
               packed_ms=packed, padded_ms=padded, padded_shape=[len(lens), max(lens)])
    print(json.dumps(row), flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="125m")
    p.add_argument("--mixers", default=",".join(MIXERS), help="models trained packed vs padded ('' for none)")
    p.add_argument("--ops", default="linear,mlp", help="TTT op kinds checked and timed packed vs padded ('' for none)")
    p.add_argument("--pack-len", type=int, default=8192)
    p.add_argument("--mean-len", type=float, default=1000.0)
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="with --ops: each kernel's time, packed and padded")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args()
    t0 = time.time()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    env = environment()
    print(json.dumps(env), flush=True)
    lens = document_lengths(a.pack_len, a.mean_len, a.sigma, a.seed)
    print(json.dumps(dict(documents=len(lens), lengths=lens, longest=max(lens),
                          padded_tokens=len(lens) * max(lens), real_tokens=sum(lens))), flush=True)
    mixers, kinds = ([x for x in v.split(",") if x] for v in (a.mixers, a.ops))
    for flag, got, known in (("--mixers", mixers, MIXERS), ("--ops", kinds, ("linear", "mlp"))):
        if bad := [x for x in got if x not in known]:
            p.error(f"{flag}: expected names from {','.join(known)}, got {','.join(bad)}")
    checks, op_checks, ops, rows = {}, {}, [], []
    res = dict(env=env, lengths=lens, checks=[], train=rows, op=ops)

    def save():  # after every row, so a run cut by its time limit still leaves what it measured
        res.update(checks=[*checks.values(), *op_checks.values()], seconds=time.time() - t0)
        if a.out:
            write_json(a.out, res)

    # the short op part first, then each mixer's check and its two timings, Mamba-2 last (mamba_ssm's autotuned
    # kernels compile for minutes on a fresh machine); fp32 checks with tf32 off, timings with the caller's setting
    for kind in kinds:
        torch.backends.cuda.matmul.allow_tf32 = False
        op_checks[kind] = op_check(kind, lens)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        if op_checks[kind]["ok"]:
            ops.append(op_rows(kind, lens, profile=a.profile))
        save()
    for m in sorted(mixers, key=lambda m: m == "mamba"):
        torch.backends.cuda.matmul.allow_tf32 = False
        checks[m] = check(m, lens)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        save()
        for mode in ("packed", "padded") if checks[m]["ok"] else ():
            rows.append(train_row(m, a.size, lens, mode))
            save()
    print(f"\n{len(lens)} documents, {sum(lens)} real tokens (mean {sum(lens) / len(lens):.0f}, longest {max(lens)}); "
          f"padded: {len(lens)} x {max(lens)} = {len(lens) * max(lens)} tokens; {a.size}, bf16, one step (fwd+bwd+AdamW)")
    print(f"{'mixer':<12}{'check':>7}{'packed ms':>11}{'padded ms':>11}{'packed tok/s':>14}{'padded tok/s':>14}{'ratio':>7}")
    by = {(r["mixer"], r["mode"]): r for r in rows}
    for m in mixers:
        pk, pd = by.get((m, "packed"), {}), by.get((m, "padded"), {})
        ratio = pk.get("real_tokens_per_s", 0) / pd["real_tokens_per_s"] if pd.get("real_tokens_per_s") else float("nan")
        print(f"{m:<12}{'ok' if checks[m]['ok'] else 'FAIL':>7}{pk.get('ms_per_step', float('nan')):>11.1f}"
              f"{pd.get('ms_per_step', float('nan')):>11.1f}{pk.get('real_tokens_per_s', 0):>14,.0f}"
              f"{pd.get('real_tokens_per_s', 0):>14,.0f}{ratio:>7.2f}")
    for kind, c in op_checks.items():
        if not c["ok"]:
            print(f"op ttt_{kind}: FAILED its check (worst relative error {c['worst_rel']:.2e}), not timed")
    for r in ops:
        print(f"op {r['op']} fwd+bwd, T={r['T']}: plain {r['plain_ms']:.2f} ms, one packed document "
              f"{r['one_document_ms']:.2f} ms ({100 * r['overhead']:+.1f}%, target <= +5%); the documents packed "
              f"{r['packed_ms']:.2f} ms, padded {r['padded_shape'][0]} x {r['padded_shape'][1]} {r['padded_ms']:.2f} ms")
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
