"""Packed documents on the GPU (docs/packed.md): training on a realistic spread of document lengths packed into
one sequence with cu_seqlens, against the same documents padded to the longest, and the op-level cost of
cu_seqlens at one full-length document.

    python3 -m benchmarks.bench_packed --out /tmp/bench_packed.json      # about 5 minutes on an H200

Documents: lengths drawn log-normal with mean --mean-len (sigma --sigma), until --pack-len tokens are filled
(the last one cut). Per mixer (TTT-Linear, TTT-MLP, Transformer++, Mamba-2; --size preset, bf16 autocast):
one training step (forward, backward, AdamW) packed ([1, pack_len] with cu_seqlens) and padded ([N, longest]
with the padding's targets skipped); tokens/s counts real tokens only. Op: TTT-Linear and TTT-MLP forward +
backward through the triton backend on [1, pack_len, H, d], plain against packed with cu = [0, pack_len]
(the packed entry point: ttt.ops.packed.per_document, which the fused backends replace).

Correctness first: for every mixer, a debug-size fp32 model on the same documents gives the same per-token
loss and the same gradients packed and padded (on the GPU's own paths: FlexAttention, the triton op, mamba_ssm
when installed); a mixer that fails is not timed. The table comes last.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from benchmarks.common import timed
from ttt.config import get_config
from ttt.model import IGNORE, TTTLM
from ttt.ops import TTTInputs, TTTState, make_tau, resolve_op
from ttt.ops.packed import per_document

MIXERS = ("ttt_linear", "ttt_mlp", "attention", "mamba")


def document_lengths(pack_len, mean_len, sigma, seed):
    """Log-normal lengths with mean `mean_len`, drawn until they fill pack_len tokens (the last one cut)."""
    rng = np.random.default_rng(seed)
    lens = []
    while sum(lens) < pack_len:
        n = int(max(1, round(rng.lognormal(math.log(mean_len) - sigma ** 2 / 2, sigma))))
        lens.append(min(n, pack_len - sum(lens)))
    return lens


def batches(lens, vocab, seed=0):
    """The same documents packed (ids, targets [1, T], cu_seqlens) and padded (ids, targets [N, longest], the
    padding's targets IGNORE); each document's targets are its own next tokens, its last skipped."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, vocab, (n + 1,), generator=g) for n in lens]
    ids = torch.cat([d[:-1] for d in docs])[None]
    tg = torch.cat([torch.cat([d[1:-1], torch.tensor([IGNORE])]) for d in docs])[None]
    cu = torch.tensor([0, *lens]).cumsum(0)
    longest = max(lens)
    pad_ids = torch.zeros(len(lens), longest, dtype=torch.long)
    pad_tg = torch.full((len(lens), longest), IGNORE)
    for i, d in enumerate(docs):
        pad_ids[i, :lens[i]] = d[:-1]
        pad_tg[i, :lens[i] - 1] = d[1:-1]
    dev = "cuda"
    return (ids.to(dev), tg.to(dev), cu), (pad_ids.to(dev), pad_tg.to(dev), None)


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
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # true fp32 on both sides
    torch.manual_seed(0)
    model = TTTLM(get_config("debug", mixer=mixer, vocab_size=512)).cuda()
    packed, padded = batches(lens, 512)
    (a, ga), (b, gb) = nll_and_grads(model, packed), nll_and_grads(model, padded)
    loss_err = (a - b).abs().max().item()
    grad_err = max(((ga[n] - gb[n]).norm() / gb[n].norm().clamp_min(1e-12)).item() for n in gb)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    row = dict(check=mixer, max_nll_diff=loss_err, worst_grad_rel=grad_err, ok=loss_err < 2e-3 and grad_err < 2e-3)
    print(json.dumps(row), flush=True)
    return row


def train_row(mixer, size, lens, mode):
    """Median ms of one optimizer step on the documents, packed or padded (bf16 autocast)."""
    cfg = get_config(size, mixer=mixer)
    torch.manual_seed(0)
    model = TTTLM(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    ids, tg, cu = batches(lens, cfg.vocab_size)[0 if mode == "packed" else 1]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = model(ids, targets=tg, cu_seqlens=cu)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    try:
        ms = timed(step, warmup=2, iters=5)
        row = dict(mixer=mixer, mode=mode, shape=list(ids.shape), ms_per_step=ms, real_tokens=sum(lens),
                   real_tokens_per_s=sum(lens) / ms * 1e3, peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30)
    except torch.OutOfMemoryError as e:
        row = dict(mixer=mixer, mode=mode, shape=list(ids.shape), error=f"OOM: {e}"[:200])
    print(json.dumps(row), flush=True)
    model = opt = None  # free the memory before the next model
    torch.cuda.empty_cache()
    return row


def op_row(kind, T, H=12, d=64, b=16):
    """Forward + backward ms of the triton op on one sequence of T tokens, plain and as one packed document."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, T, H, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    lr = torch.rand(1, T, H, device="cuda", requires_grad=True) * 0.1
    tau = make_tau(torch.zeros(b, device="cuda"))
    lnw, lnb = torch.ones(H, d, device="cuda", requires_grad=True), torch.zeros(H, d, device="cuda", requires_grad=True)
    F = 4 * d
    shapes = [(H, d, d), (H, d)] if kind == "linear" else [(H, d, F), (H, F), (H, F, d), (H, d)]
    init = [(torch.randn(*s, device="cuda") * 0.02).requires_grad_() for s in shapes]
    cu = torch.tensor([0, T])
    w = torch.randn(1, T, H, d, device="cuda", dtype=torch.bfloat16)

    op = resolve_op(kind, "triton", q.device, q.dtype)

    def run(packed):
        st = TTTState.initial(kind, init, 1)
        x = TTTInputs(q, k, v, lr, tau, lnw, lnb)
        o, _ = per_document(op, x, st, cu) if packed else op(x, st)
        torch.autograd.backward((o * w).sum(), inputs=[q, k, v, lr, lnw, lnb, *init])

    plain, packed = timed(lambda: run(False), 3, 10), timed(lambda: run(True), 3, 10)
    row = dict(op=f"ttt_{kind}", T=T, H=H, d=d, plain_ms=plain, packed_ms=packed, overhead=packed / plain - 1)
    print(json.dumps(row), flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="125m")
    p.add_argument("--mixers", default=",".join(MIXERS))
    p.add_argument("--pack-len", type=int, default=8192)
    p.add_argument("--mean-len", type=float, default=1000.0)
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args()
    t0 = time.time()
    lens = document_lengths(a.pack_len, a.mean_len, a.sigma, a.seed)
    print(json.dumps(dict(documents=len(lens), lengths=lens, longest=max(lens),
                          padded_tokens=len(lens) * max(lens), real_tokens=sum(lens))), flush=True)
    mixers = a.mixers.split(",")
    checks = {m: check(m, lens) for m in mixers}
    rows = [train_row(m, a.size, lens, mode) for m in mixers if checks[m]["ok"] for mode in ("packed", "padded")]
    ops = [op_row(kind, a.pack_len) for kind in ("linear", "mlp")]
    res = dict(lengths=lens, checks=list(checks.values()), train=rows, op=ops, seconds=time.time() - t0)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)
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
    for r in ops:
        print(f"op {r['op']} fwd+bwd, T={r['T']}: plain {r['plain_ms']:.2f} ms, one packed document "
              f"{r['packed_ms']:.2f} ms ({100 * r['overhead']:+.1f}%)")
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
