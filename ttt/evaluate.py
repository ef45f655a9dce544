"""Perplexity overall and by token position, for one model or several checkpoints.

    nll = evaluate_model(model, x, y, chunk_len=256)   # [L] mean over sequences of -log p(y_t | x_<=t)
    rows = bucketize(nll, 16)                          # log-spaced position buckets
    results = evaluate_checkpoints(["ckpt_a", "ckpt_b"], "data", seq_len=1024, chunk_len=256,
                                   out_dir="eval_out")  # writes eval.json, eval.csv, eval.png

Contexts longer than a model's training length are handled the streaming way: the sequence is fed in
chunks of `chunk_len` tokens, each forward starting from the state the previous chunk returned. As
every mixer is causal and streams exactly, this gives the same numbers as one pass over the whole
sequence (tests/test_model.py checks it) while holding only one chunk of activations in memory.

Positions are 1-based: position p is the p-th predicted token, predicted from p tokens of context
(x[0..p-1]). The paper's long-context plots put position on a log x axis; `bucketize` and `plot` do
the same.

By document (`evaluate_documents`, `evaluate_checkpoints(by_document=True)`, docs/packed.md): positions count
from each document's first token, every document starts from a fresh state, documents are packed into one
sequence per forward (cu_seqlens); position p averages over the documents that reach it.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

RESULTS_JSON, RESULTS_CSV, POSITIONS_CSV, PLOT_PNG = "eval.json", "eval.csv", "eval_by_position.csv", "eval.png"


def _check_pos_int(name: str, v, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: expected a positive int{' or None' if allow_none else ''}, got {v!r}")


@torch.no_grad()
def evaluate_model(model, tokens: torch.Tensor, targets: torch.Tensor | None = None, *,
                   chunk_len: int | None = None, batch_size: int = 8, progress: str | None = None) -> torch.Tensor:
    """Per-position NLL (nats), float64 [L]: entry t is the mean over the N sequences of
    -log p(targets[:, t] | tokens[:, :t+1]).

    tokens:     int [N, L] model inputs. With `targets=None` the targets are the inputs shifted by one
                (tokens[:, 1:]) and the result has L-1 entries.
    chunk_len:  feed each sequence in chunks of this many tokens, carrying the model state between
                them (None: one pass). Any value gives the same result up to float rounding.
    batch_size: sequences per forward.
    progress:   when given, a progress bar (tqdm, on stderr) with this description, one tick per forward.
    The model is run in eval mode (its training flag is restored afterwards).
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
        got = f"{tokens.dtype} of shape {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens: expected an integer tensor [N, L], got {got}")
    if targets is None:
        if tokens.shape[1] < 2:
            raise ValueError(f"tokens: expected at least 2 tokens per sequence without targets, got {tokens.shape[1]}")
        tokens, targets = tokens[:, :-1], tokens[:, 1:]
    elif not isinstance(targets, torch.Tensor) or targets.shape != tokens.shape:
        got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets: expected a tensor of the shape of tokens {tuple(tokens.shape)}, got {got}")
    _check_pos_int("chunk_len", chunk_len, allow_none=True)
    _check_pos_int("batch_size", batch_size)
    N, L = tokens.shape
    if N == 0 or L == 0:
        raise ValueError(f"tokens: expected a non-empty [N, L] tensor, got shape {(N, L)}")
    chunk = chunk_len or L
    device = next(model.parameters()).device
    total = torch.zeros(L, dtype=torch.float64)
    with _evaluating(model, math.ceil(N / batch_size) * math.ceil(L / chunk), progress) as bar:
        for i in range(0, N, batch_size):
            x = tokens[i:i + batch_size].to(device)
            y = targets[i:i + batch_size].to(device)
            state = None
            for s in range(0, L, chunk):
                nll, state = model(x[:, s:s + chunk], state, targets=y[:, s:s + chunk], reduction="none")  # [b, c]
                total[s:s + chunk] += nll.sum(0).cpu()
                if bar is not None:
                    bar.update(1)
    return total / N


@contextlib.contextmanager
def _evaluating(model, forwards: int, progress: str | None):
    """The model in eval mode (its training flag restored afterwards) and a progress bar of `forwards` ticks
    described by `progress` (None without)."""
    was_training = model.training
    model.eval()
    bar = None
    if progress is not None:
        from tqdm import tqdm
        bar = tqdm(total=forwards, desc=progress, unit="fwd", leave=False, dynamic_ncols=True)
    try:
        yield bar
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()


@torch.no_grad()
def evaluate_documents(model, docs, max_len: int, *, pack_len: int, progress: str | None = None):
    """NLL by position within documents: (sum float64 [max_len], count int64 [max_len]); entry p sums
    -log p(y[p] | x[:p+1]) over the documents that reach it.

    docs:     (x, y) int64 [L] pairs as ttt.data.document_sequences gives them (y = next tokens, IGNORE where
              there is none). The last position of every document is not scored (the packed model skips it:
              its target would start the next document), so cut documents at max_len + 1 tokens.
    pack_len: tokens per forward; documents are packed greedily (in order) and the rest of each pack is one
              more document with no targets, so every forward has the same length.
    """
    from .data import IGNORE

    _check_pos_int("max_len", max_len)
    longest = max(len(x) for x, _ in docs)
    if longest >= pack_len:
        raise ValueError(f"pack_len: expected more than the longest document ({longest} tokens), got {pack_len}")
    packs, cur, used = [], [], 0
    for doc in docs:  # greedy, leaving at least one token for the filler
        if used + len(doc[0]) >= pack_len:
            packs.append(cur)
            cur, used = [], 0
        cur.append(doc)
        used += len(doc[0])
    packs.append(cur)
    device = next(model.parameters()).device
    sums, counts = torch.zeros(max_len, dtype=torch.float64), torch.zeros(max_len, dtype=torch.int64)
    with _evaluating(model, len(packs), progress) as bar:
        for pack in packs:
            fill = pack_len - sum(len(x) for x, _ in pack)
            xs = [x for x, _ in pack] + [torch.zeros(fill, dtype=torch.int64)]
            ys = [y[:-1] for _, y in pack]  # the scored targets: all but each document's last
            cu = torch.tensor([0] + [len(x) for x in xs]).cumsum(0)
            y = torch.cat([torch.cat([t, t.new_full((1,), IGNORE)]) for t in ys] + [torch.full((fill,), IGNORE)])
            nll, _ = model(torch.cat(xs)[None].to(device), targets=y[None].to(device), cu_seqlens=cu,
                           reduction="none")  # [1, pack_len]
            pos = torch.cat([torch.arange(len(x)) for x in xs])  # [pack_len]: the position within the document
            keep = (y != IGNORE) & (pos < max_len)
            sums.index_add_(0, pos[keep], nll[0].cpu().double()[keep])
            counts.index_add_(0, pos[keep], torch.ones_like(pos[keep]))
            if bar is not None:
                bar.update(1)
    return sums, counts


def bucket_edges(length: int, n_buckets: int, scheme: str = "log") -> list[int]:
    """Bucket boundaries over the 1-based positions 1..length: edges e_0=1 < ... < e_k=length+1, bucket
    j holding positions [e_j, e_{j+1}). "log": geometrically spaced (at most n_buckets, fewer where
    they would be narrower than one position); "linear": equal widths (the last may be shorter)."""
    _check_pos_int("length", length)
    _check_pos_int("n_buckets", n_buckets)
    if scheme == "log":
        raw = np.geomspace(1, length + 1, min(n_buckets, length) + 1)
        edges = sorted({int(round(e)) for e in raw} | {1, length + 1})
    elif scheme == "linear":
        width = math.ceil(length / n_buckets)
        edges = list(range(1, length + 1, width)) + [length + 1]
    else:
        raise ValueError(f"scheme: expected 'log' or 'linear', got {scheme!r}")
    return edges


def bucketize(nll, n_buckets: int = 16, scheme: str = "log") -> list[dict]:
    """Mean NLL per bucket of positions (see `bucket_edges`): a list of
    {"start": first position, "end": last position (inclusive), "nll": mean, "ppl": exp(mean)}."""
    nll = torch.as_tensor(nll, dtype=torch.float64).flatten()
    edges = bucket_edges(len(nll), n_buckets, scheme)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = nll[lo - 1:hi - 1].mean().item()
        rows.append({"start": lo, "end": hi - 1, "nll": m, "ppl": math.exp(m)})
    return rows


def _model_name(path: Path, taken: set) -> str:
    name = path.name or str(path)
    if name in taken:  # e.g. two runs whose checkpoints are both called "final"
        name = f"{path.parent.name}/{name}"
    base, k = name, 2
    while name in taken:
        name, k = f"{base}#{k}", k + 1
    taken.add(name)
    return name


def evaluate_checkpoints(paths: Sequence, data_dir, seq_len: int = 1024, chunk_len: int | None = None,
                         n_seqs: int | None = 16, out_dir=None, *, split: str = "val", batch_size: int = 8,
                         n_buckets: int = 16, device="cpu", names: Sequence[str] | None = None,
                         models: Sequence | None = None, allow_other_tokenizer: bool = False,
                         ttt_backend: str | None = None, progress: bool = False, by_document: bool = False) -> dict:
    """Evaluate checkpoints on the first `n_seqs` windows of `seq_len` tokens of a prepared dataset.

    paths:     checkpoint directories (see ttt.checkpoint); or pass already-built `models` instead
               (nn.Modules, evaluated under `names`).
    data_dir:  a directory made by ttt.data.prepare; the `split` shard ("val" or "train") is read.
    chunk_len: feed the model this many tokens per forward, carrying state (None: one pass).
    n_seqs:    number of windows (None: all that fit in the shard).
    allow_other_tokenizer: evaluate even when data_dir's tokenizer.json is not the one a checkpoint
               was trained with (refused by default: the NLLs would look plausible and mean nothing).
    ttt_backend: run the checkpoints with this TTT op backend (None: "auto"; checkpoints hold no backend).
    progress:  show a progress bar per model (stderr).
    by_document: instead of windows, the first `n_seqs` documents (all with None), their first `seq_len`
               positions, each from a fresh state, packed batch_size documents' worth per forward
               (`evaluate_documents`); per_position then averages over the documents that reach each
               position ("count_by_position"), and "nll" is the mean over all scored tokens.
    out_dir:   when given, writes eval.json, eval.csv (buckets), eval_by_position.csv and eval.png.
    Returns {"seq_len", "chunk_len", "n_seqs", "split", "data_dir", "models": [{"name", "path",
    "train_len" (the checkpoint's training seq_len, if recorded), "trained_on_this_data" (whether the
    checkpoint's recorded data fingerprint is data_dir's; None if unknown), "params", "config", "nll", "ppl",
    "per_position": [L floats], "buckets": [...]}, ...]}.
    """
    from .data import document_sequences, eval_sequences, load_meta

    if split not in ("val", "train"):
        raise ValueError(f"split: expected 'val' or 'train', got {split!r}")
    _check_pos_int("seq_len", seq_len)
    _check_pos_int("n_seqs", n_seqs, allow_none=True)
    meta = load_meta(data_dir)
    shard = Path(data_dir) / f"{split}.bin"
    if by_document:
        if chunk_len is not None:
            raise ValueError("chunk_len: evaluation by_document runs each pack of documents in one forward; "
                             "leave chunk_len out")
        if "eos_id" not in meta:
            raise ValueError(f"by_document: {Path(data_dir) / 'meta.json'} records no eos_id to find the documents "
                             f"by; prepare the data again with `ttt data`")
        docs = document_sequences(shard, meta["eos_id"], seq_len + 1, n_seqs)  # +1: a document's last is not scored
        count = len(docs)
    else:
        x, y = eval_sequences(shard, seq_len, n_seqs)
        count = int(x.shape[0])
    entries = []  # (name, path, load() -> (model, config), train_len); checkpoints are loaded one at a time
    if models is not None:
        if names is None or len(names) != len(models):
            raise ValueError("names: expected one name per model when models are given")
        entries = [(str(n), None, (lambda m=m: (m, getattr(m, "cfg", None))), None) for n, m in zip(names, models)]
    else:
        if not paths:
            raise ValueError("paths: expected at least one checkpoint directory")
        from .checkpoint import CONFIG_FILE, load_model, read_json, resolve
        from .config import RunOptions
        if names is not None and len(names) != len(paths):
            raise ValueError(f"names: expected one name per checkpoint ({len(paths)}), got {len(names)}")
        taken: set = set()
        run_options = RunOptions(ttt_backend=ttt_backend or "auto")
        for i, p in enumerate(paths):
            run = read_json(resolve(p) / CONFIG_FILE)  # a bad path or config fails here, before any evaluation
            train = run.get("train")
            train_len = train.get("seq_len") if isinstance(train, dict) else None
            name = names[i] if names else _model_name(Path(p), taken)
            entries.append((name, str(p), (lambda p=p: load_model(p, device, with_checkpoint=True,
                                                                       run=run_options)), train_len))
    tok_path = Path(data_dir) / "tokenizer.json"
    data_tok = None
    if tok_path.is_file() and models is None and not allow_other_tokenizer:
        from .tokenizer import Tokenizer
        data_tok = Tokenizer.load(tok_path)
    results = {"data_dir": str(data_dir), "split": split, "seq_len": seq_len, "chunk_len": chunk_len,
               "n_seqs": count, "by_document": by_document, "models": []}
    for name, path, load, train_len in entries:
        model, cfg, *ck = load()
        if data_tok is not None and ck:
            from .checkpoint import MODEL_FILE, check_tokenizer
            why = check_tokenizer(data_tok, ck[0].meta, cfg.vocab_size, what=f"the tokenizer of the data ({tok_path})",
                                  where=str(ck[0].path / MODEL_FILE))
            if why:
                raise ValueError(f"data_dir: checkpoint {name!r}: {why}; evaluate on data tokenized with the run's "
                                 f"tokenizer, or pass allow_other_tokenizer=True")
        vocab = getattr(cfg, "vocab_size", None)
        if vocab is not None and vocab < meta["vocab_size"]:
            raise ValueError(f"checkpoint {name!r}: vocab_size {vocab} is smaller than the dataset's "
                             f"{meta['vocab_size']} (data_dir {str(data_dir)!r}); was it trained on other data?")
        bar = f"eval {name}" if progress else None
        extra = {}
        if by_document:
            log.info("evaluating %s on %d documents, their first %d positions", name, len(docs), seq_len)
            sums, counts = evaluate_documents(model, docs, seq_len, pack_len=batch_size * (seq_len + 2), progress=bar)
            reached = int(torch.nonzero(counts).max()) + 1  # positions some document reaches
            nll = sums[:reached] / counts[:reached].clamp(min=1)
            mean = (sums.sum() / counts.sum()).item()
            extra["count_by_position"] = counts[:reached].tolist()
        else:
            log.info("evaluating %s on %d x %d tokens (chunk %s)", name, x.shape[0], seq_len, chunk_len)
            nll = evaluate_model(model, x, y, chunk_len=chunk_len, batch_size=batch_size, progress=bar)
            mean = nll.mean().item()
        trained_on = ck[0].meta.get("data_fingerprint") if ck else None
        results["models"].append({
            "name": name, "path": path, "train_len": train_len,
            "trained_on_this_data": None if trained_on is None else trained_on == meta.get("fingerprint"),
            "params": sum(p.numel() for p in model.parameters()),
            "config": cfg.to_dict() if hasattr(cfg, "to_dict") else None,
            "nll": mean, "ppl": math.exp(mean),
            "per_position": nll.tolist(),
            "buckets": bucketize(nll, n_buckets),
            **extra,
        })
    if out_dir is not None:
        write_results(results, out_dir)
    return results


def write_results(results: dict, out_dir, train_len: int | None = None) -> dict:
    """Write eval.json, eval.csv (one row per model and bucket), eval_by_position.csv (one column per
    model) and eval.png (see `plot`) into out_dir; returns {kind: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / RESULTS_JSON, "csv": out / RESULTS_CSV, "positions_csv": out / POSITIONS_CSV,
             "plot": out / PLOT_PNG}
    _atomic_write(paths["json"], json.dumps(results, indent=1))
    rows = [["model", "bucket_start", "bucket_end", "nll", "ppl"]]
    for m in results["models"]:
        rows += [[m["name"], b["start"], b["end"], f"{b['nll']:.6f}", f"{b['ppl']:.4f}"] for b in m["buckets"]]
        rows.append([m["name"], 1, len(m["per_position"]), f"{m['nll']:.6f}", f"{m['ppl']:.4f}"])  # overall
    _write_csv(paths["csv"], rows)
    names = [m["name"] for m in results["models"]]
    cols = [m["per_position"] for m in results["models"]]
    _write_csv(paths["positions_csv"], [["position"] + names] +
               [[i + 1] + [f"{c[i]:.6f}" for c in cols] for i in range(len(cols[0]) if cols else 0)])
    plot(results, paths["plot"], train_len=train_len)
    return {k: str(v) for k, v in paths.items()}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_csv(path: Path, rows: list) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    os.replace(tmp, path)


def plot(results: dict, path, *, metric: str = "nll", train_len: int | None = None, title: str | None = None) -> str:
    """One PNG with a line per model: bucketed NLL (or perplexity, metric="ppl") against token position
    on a log axis. `train_len` draws a dashed line at the training context length (default: the
    models' common "train_len", when they have one)."""
    if metric not in ("nll", "ppl"):
        raise ValueError(f"metric: expected 'nll' or 'ppl', got {metric!r}")
    # The object API with an explicit Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if train_len is None:
        lens = {m.get("train_len") for m in results["models"]}
        train_len = lens.pop() if len(lens) == 1 else None
    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for m in results["models"]:
        b = m["buckets"]
        xs = [math.sqrt(r["start"] * r["end"]) for r in b]  # geometric centre of the bucket
        ys = [r[metric] for r in b]
        what = "mean NLL" if metric == "nll" else "perplexity"
        ax.plot(xs, ys, marker="o", markersize=3, label=f"{m['name']} ({m['params'] / 1e6:.2f}M params; {what} "
                                                       f"over all positions {m[metric]:.3f})")
    if train_len:
        ax.axvline(train_len, color="grey", linestyle="--", linewidth=1, label=f"training length {train_len}")
    ax.set_xscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel("NLL (nats / token)" if metric == "nll" else "perplexity")
    chunk = results.get("chunk_len")
    name = metric.upper() if metric == "nll" else "perplexity"
    what = (f"{results.get('n_seqs')} documents, positions within each up to {results.get('seq_len')}"
            if results.get("by_document") else
            f"{results.get('n_seqs')} seqs x {results.get('seq_len')} tokens{f', chunks of {chunk}' if chunk else ''}")
    ax.set_title(title or f"{name} by token position ({results.get('split', 'val')}, {what})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return str(path)
