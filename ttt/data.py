"""Corpora -> tokenizer -> memory-mapped token shards, and the batch loaders that read them.

Sources (`prepare(sources, ...)`, `iter_documents(sources, ...)`), one or a list of:
  - a text file: one document;
  - a `.jsonl` file: one document per non-blank line, taken from the field `text_field` ("text");
  - a directory: searched recursively (sorted, hidden entries skipped) for files ending in
    `extensions`; each file is one document, `.jsonl` files are read as above;
  - the string "stdlib" (the default when `sources` is None): the built-in corpus, the `.py` files of
    the running interpreter's standard library (`sysconfig.get_paths()["stdlib"]`), sorted, without
    test directories or site-packages. It needs no download, but it varies a little with the Python
    version (about 12 MB in 730 files for CPython 3.11). A local directory named `stdlib` must be
    passed as "./stdlib" or as a Path.
Empty documents are skipped; `max_docs` / `max_bytes` stop the corpus after that many documents /
after the document that reaches that many UTF-8 bytes.

`prepare` writes to `out_dir`: `tokenizer.json`, `train.bin` and `val.bin` (documents kept whole,
concatenated in source order, each followed by EOS; uint16 when the vocabulary fits, else uint32) and
`meta.json` (dtype, counts, vocab size, sources, fingerprint). The train/val split is per document,
by a hash of (seed, document key), the key being "<dir name>/<relative path>", "<file name>" or
"<file name>:<line>" -- so it does not depend on listing or argument order. The BPE is trained on the
train documents only. The fingerprint hashes the resolved file list with sizes and mtimes, plus every
setting. `meta.json` is written last and marks a complete dataset: same fingerprint -> `prepare`
returns at once; another fingerprint -> ValueError unless `overwrite=True`. Shards are written to
`*.tmp` and renamed at the end. Run `prepare` from one process only (e.g. rank 0): there is no lock.

`Batcher` draws random windows (offsets seeded by (seed, step)), `eval_sequences` cuts contiguous
windows from the start of a shard for perplexity-by-position evaluation. For packed documents
(docs/packed.md): `document_bounds` finds the documents of a shard at its EOS tokens, `DocumentBatcher`
packs whole documents into each row (`pack_rows` turns a micro-batch into one packed sequence with its
cu_seqlens), `document_sequences` gives the first documents for evaluation by position within documents.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch

from .layers.head import IGNORE
from .tokenizer import Tokenizer, _check_vocab_size

log = logging.getLogger(__name__)

STDLIB = "stdlib"
TEXT_EXTENSIONS = (".txt", ".md", ".rst", ".py", ".jsonl")
FORMAT_VERSION = 1
SHARD_NAMES = ("train", "val")
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
_ENCODE_BATCH_BYTES = 4 << 20  # text handed to one encode_batch call
_SCAN_TOKENS = 1 << 24  # tokens compared with EOS at a time when finding documents

PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------- sources -> documents

@dataclass(frozen=True)
class _File:
    path: Path
    key: str  # stable name used by the split hash and in JSONL error messages
    jsonl: bool


def stdlib_files() -> list[Path]:
    """The `.py` files of the running interpreter's standard library, sorted, tests excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not _STDLIB_SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))


def _resolve(sources, extensions: Sequence[str]) -> list[_File]:
    if sources is None:
        sources = [STDLIB]
    elif isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = list(sources)
    if not sources:
        raise ValueError(f"sources: expected at least one path (or {STDLIB!r}), got an empty list")
    if isinstance(extensions, str) or not all(isinstance(e, str) and e.startswith(".") for e in extensions):
        raise ValueError(f"extensions: expected a list of suffixes like ['.txt', '.md'], got {extensions!r}")
    exts = tuple(e.lower() for e in extensions)
    files: list[_File] = []
    for src in sources:
        if isinstance(src, str) and src == STDLIB:
            root = Path(sysconfig.get_paths()["stdlib"])
            files += [_File(p, "stdlib/" + p.relative_to(root).as_posix(), False) for p in stdlib_files()]
            continue
        p = Path(src)
        if not p.exists():
            raise FileNotFoundError(f"sources: {str(src)!r} does not exist "
                                    f"(expected a text file, a .jsonl file, a directory or {STDLIB!r})")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in exts
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise ValueError(f"sources: directory {str(src)!r} holds no files ending in {', '.join(exts)}")
            files += [_File(f, f"{p.resolve().name}/{f.relative_to(p).as_posix()}", f.suffix.lower() == ".jsonl")
                      for f in found]
        elif p.is_file():
            files.append(_File(p, p.name, p.suffix.lower() == ".jsonl"))
        else:
            raise ValueError(f"sources: {str(src)!r} is neither a regular file nor a directory")
    return files


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"sources: cannot read {str(path)!r}: {e.strerror or e}") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"sources: {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from e


def _jsonl_docs(f: _File, text_field: str) -> Iterator[tuple[str, str]]:
    try:
        fh = open(f.path, "rb")
    except OSError as e:
        raise ValueError(f"sources: cannot read {str(f.path)!r}: {e.strerror or e}") from e
    with fh:
        for i, raw in enumerate(fh, 1):
            where = f"sources: {str(f.path)!r} line {i}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 ({e.reason})") from e
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
            if not isinstance(obj, dict) or text_field not in obj:
                got = f"keys {sorted(obj)}" if isinstance(obj, dict) else type(obj).__name__
                raise ValueError(f"{where}: expected a JSON object with a {text_field!r} field (text_field), got {got}")
            text = obj[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
            yield f"{f.key}:{i}", text


def _documents(files: list[_File], text_field: str, max_docs: int | None,
               max_bytes: int | None) -> Iterator[tuple[str, str]]:
    n_docs = n_bytes = 0
    for f in files:
        docs = _jsonl_docs(f, text_field) if f.jsonl else [(f.key, _read_text(f.path))]
        for key, text in docs:
            if not text:
                continue
            yield key, text
            n_docs += 1
            n_bytes += len(text.encode("utf-8"))
            if (max_docs is not None and n_docs >= max_docs) or (max_bytes is not None and n_bytes >= max_bytes):
                return


def iter_documents(sources=None, *, text_field: str = "text", extensions: Sequence[str] = TEXT_EXTENSIONS,
                   max_docs: int | None = None, max_bytes: int | None = None) -> Iterator[tuple[str, str]]:
    """Yield (key, text) for every non-empty document of `sources`, in order (see module docstring)."""
    _check_limits(max_docs, max_bytes)
    return _documents(_resolve(sources, extensions), text_field, max_docs, max_bytes)


def _check_limits(max_docs, max_bytes) -> None:
    for name, v in (("max_docs", max_docs), ("max_bytes", max_bytes)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"{name}: expected a positive int or None, got {v!r}")


# ----------------------------------------------------------------------------- prepare

def _split_u(key: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, key): the document's place in the split."""
    digest = hashlib.blake2b(f"{seed}\0{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def _fingerprint(files: list[_File], settings: dict) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for f in files:
        st = f.path.stat()
        h.update(f"{f.path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def load_meta(data_dir: PathLike) -> dict:
    """The `meta.json` of a prepared dataset directory."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"data_dir: {str(data_dir)!r} holds no meta.json (not a prepared dataset)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"data_dir: {str(path)!r} is not a readable meta.json ({e})") from e


def _is_complete(out: Path, meta: dict) -> bool:
    """Whether the shards that `meta` describes are all there, with the sizes it records."""
    if not (out / "tokenizer.json").is_file():
        return False
    itemsize = np.dtype(meta["dtype"]).itemsize
    for name in SHARD_NAMES:
        p = out / f"{name}.bin"
        if not p.is_file() or p.stat().st_size != meta[f"{name}_tokens"] * itemsize:
            return False
    return True


def prepare(sources, out_dir: PathLike, *, vocab_size: int = 8192,
            tokenizer_path: PathLike | None = None, val_fraction: float = 0.01, val_docs: int | None = None,
            seed: int = 0, text_field: str = "text", extensions: Sequence[str] = TEXT_EXTENSIONS,
            max_docs: int | None = None, max_bytes: int | None = None, overwrite: bool = False) -> dict:
    """Tokenize `sources` into `out_dir` (see module docstring) and return its meta dict.

    vocab_size:      size of the BPE trained on the training documents (ignored with tokenizer_path).
    tokenizer_path:  an existing tokenizer.json to use instead of training one (copied into out_dir).
    val_fraction:    each document goes to val when its hash falls below this (at least one document
                     goes to val when > 0). val_docs: exactly that many documents (smallest hashes) instead.
    overwrite:       replace a dataset of another fingerprint in out_dir instead of raising.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a float in [0, 1), got {val_fraction!r}")
    if val_docs is not None and (not isinstance(val_docs, int) or val_docs < 0):
        raise ValueError(f"val_docs: expected a non-negative int or None, got {val_docs!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    _check_limits(max_docs, max_bytes)
    if tokenizer_path is None:
        _check_vocab_size(vocab_size)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir: {str(out_dir)!r} exists and is not a directory")
    files = _resolve(sources, extensions)
    tok = None
    if tokenizer_path is not None:
        tok = Tokenizer.load(tokenizer_path)  # validates the path before anything is written
    settings = {
        "format": FORMAT_VERSION, "vocab_size": None if tok else vocab_size,
        "tokenizer": hashlib.sha256(tok.to_str().encode()).hexdigest() if tok else None,
        "val_fraction": val_fraction, "val_docs": val_docs, "seed": seed, "text_field": text_field,
        "extensions": sorted(e.lower() for e in extensions), "max_docs": max_docs, "max_bytes": max_bytes,
    }
    fingerprint = _fingerprint(files, settings)

    stale_meta = (out / "meta.json").exists()
    if stale_meta:
        try:
            old = load_meta(out)
        except ValueError:
            old = {}
        if old.get("fingerprint") == fingerprint and _is_complete(out, old):
            log.info("%s already prepared (same fingerprint); nothing to do", out)
            return old
        if old.get("fingerprint") != fingerprint and not overwrite:
            raise ValueError(
                f"out_dir: {str(out)!r} holds a dataset prepared from other sources or settings "
                f"(fingerprint {str(old.get('fingerprint'))[:12]} != {fingerprint[:12]}; its sources: "
                f"{old.get('sources')}, settings: {old.get('settings')}); pass overwrite=True or another out_dir")

    def docs():
        return _documents(files, text_field, max_docs, max_bytes)

    # The split: fixed by (seed, key) only, so listing or argument order does not change it.
    u = {key: _split_u(key, seed) for key, _ in docs()}
    if not u:
        raise ValueError(f"sources: no non-empty documents found in {[str(s) for s in _as_list(sources)]}")
    if val_docs is not None:
        val = set(sorted(u, key=u.get)[:val_docs])
    else:
        val = {k for k, x in u.items() if x < val_fraction}
        if not val and val_fraction > 0:
            val = {min(u, key=u.get)}
    if len(val) >= len(u):
        raise ValueError(f"val_fraction/val_docs: would put all {len(u)} documents in val, none left to train on")

    if stale_meta:
        (out / "meta.json").unlink()  # from here on the directory is not a complete dataset
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmps = [out / f"{n}.tmp" for n in ("tokenizer.json", "train.bin", "val.bin", "meta.json")]
    for t in tmps:
        t.unlink(missing_ok=True)  # leftovers of an interrupted run
    try:
        if tok is None:
            log.info("training a %d-token byte-level BPE on %d documents", vocab_size, len(u) - len(val))
            tok = Tokenizer.train((t for k, t in docs() if k not in val), vocab_size)
        tok.save(out / "tokenizer.json")
        meta = _write_shards(docs(), val, tok, out)
    except BaseException:
        for t in tmps:
            t.unlink(missing_ok=True)
        if created:  # e.g. a full disk: leave nothing behind that was not there before
            shutil.rmtree(out, ignore_errors=True)
        raise
    meta.update(fingerprint=fingerprint, sources=[str(s) for s in _as_list(sources)], num_files=len(files),
                settings=settings)
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / "meta.json")
    log.info("prepared %s: %d train tokens (%d docs), %d val tokens (%d docs)", out,
             meta["train_tokens"], meta["train_docs"], meta["val_tokens"], meta["val_docs"])
    return meta


def _as_list(sources) -> list:
    if sources is None:
        return [STDLIB]
    return [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)


def _write_shards(docs: Iterator[tuple[str, str]], val: set, tok: Tokenizer, out: Path) -> dict:
    dtype = _dtype_for(tok.vocab_size)
    counts = {f"{n}_{c}": 0 for n in SHARD_NAMES for c in ("tokens", "docs")}
    fhs = {n: open(out / f"{n}.bin.tmp", "wb") for n in SHARD_NAMES}
    try:
        batch: list[tuple[str, str]] = []
        size = 0

        def flush():
            parts = {n: [] for n in SHARD_NAMES}
            for (key, _), ids in zip(batch, tok.encode_batch([t for _, t in batch])):
                name = "val" if key in val else "train"
                parts[name].append(np.asarray(ids + [tok.eos_id], dtype=dtype))
                counts[f"{name}_docs"] += 1
                counts[f"{name}_tokens"] += len(ids) + 1
            for name, arrs in parts.items():
                if arrs:
                    np.concatenate(arrs).tofile(fhs[name])
            batch.clear()

        for key, text in docs:
            batch.append((key, text))
            size += len(text)
            if size >= _ENCODE_BATCH_BYTES:
                flush()
                size = 0
        flush()
    finally:
        for fh in fhs.values():
            fh.close()
    for name in SHARD_NAMES:
        os.replace(out / f"{name}.bin.tmp", out / f"{name}.bin")
    return {"format": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
            **counts}


# ----------------------------------------------------------------------------- reading shards

def load_tokens(path: PathLike, dtype=None) -> np.ndarray:
    """A read-only np.memmap of a shard; dtype from the `meta.json` beside it unless given.

    An empty shard (e.g. val.bin with val_fraction=0) comes back as an empty ndarray, since an empty
    file cannot be memory-mapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: expected a token shard file, {str(path)!r} does not exist")
    if dtype is None:
        if not (path.parent / "meta.json").is_file():
            raise ValueError(f"dtype: no meta.json beside {str(path)!r} to read it from; pass dtype=")
        dtype = load_meta(path.parent)["dtype"]
    dtype = np.dtype(dtype)
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise ValueError(f"path: {str(path)!r} has {size} bytes, not a multiple of {dtype.name}'s {dtype.itemsize}")
    if size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _tokens(source) -> np.ndarray:
    return source if isinstance(source, np.ndarray) else load_tokens(source)


class Batcher:
    """Training batches of random windows from one shard, a pure function of (seed, step).

    Step s draws the global batch: B*world_size window starts, uniform in [0, N-T-1], from
    numpy's default_rng([seed, s]); rank r takes rows r*B .. (r+1)*B. A row is x = tokens[o : o+T],
    y = tokens[o+1 : o+T+1] as int64 [B, T] tensors; windows may cross document boundaries (EOS).
    The only state is the step counter: `state_dict()` / `load_state_dict()` resume exactly.
    """

    def __init__(self, tokens, batch_size: int, seq_len: int, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        for name, v, lo in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1), ("world_size", world_size, 1),
                            ("seed", seed, 0)):
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank: expected an int in [0, world_size={world_size}), got {rank!r}")
        self.tokens = _tokens(tokens)
        if len(self.tokens) < seq_len + 1:
            raise ValueError(f"seq_len: the shard holds {len(self.tokens)} tokens, "
                             f"fewer than seq_len + 1 = {seq_len + 1}")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.step = 0

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x, y) for `step`, each int64 [B, T]; does not move the step counter."""
        B, T = self.batch_size, self.seq_len
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - T, size=B * self.world_size)[self.rank * B:(self.rank + 1) * B]
        idx = starts[:, None] + np.arange(T + 1)  # [B, T+1]
        w = torch.from_numpy(self.tokens[idx].astype(np.int64))
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def __iter__(self) -> "Batcher":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        xy = self.batch(self.step)
        self.step += 1
        return xy

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for name in ("batch_size", "seq_len", "world_size"):
            if state.get(name, getattr(self, name)) != getattr(self, name):
                raise ValueError(f"state_dict: saved with {name}={state[name]}, this Batcher has "
                                 f"{name}={getattr(self, name)}; the batches would differ")
        self.seed = int(state["seed"])
        self.step = int(state["step"])


def eval_sequences(tokens, seq_len: int, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` (default: all that fit) contiguous, non-overlapping windows of a shard.

    Returns (x, y), int64 [n, seq_len], y shifted by one: row i covers tokens[i*T : (i+1)*T + 1].
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len: expected a positive int, got {seq_len!r}")
    toks = _tokens(tokens)
    avail = (len(toks) - 1) // seq_len if len(toks) else 0
    if n is None:
        n = avail
    if not isinstance(n, int) or n < 1 or n > avail:
        raise ValueError(f"n: the shard holds {len(toks)} tokens, room for {avail} sequences of "
                         f"seq_len={seq_len}; got n={n!r}")
    w = torch.from_numpy(np.asarray(toks[: n * seq_len + 1]).astype(np.int64))
    return w[:-1].reshape(n, seq_len), w[1:].reshape(n, seq_len)


# ----------------------------------------------------------------------------- packed documents

def document_bounds(tokens, eos_id: int) -> np.ndarray:
    """int64 [n_docs + 1]: 0, the offset after every EOS of a shard, and its length (a trailing piece without
    EOS is a document too). Document i is tokens[b[i]:b[i + 1]], its EOS last. Scans the shard in pieces."""
    toks = _tokens(tokens)
    ends = [np.flatnonzero(toks[s:s + _SCAN_TOKENS] == eos_id) + (s + 1) for s in range(0, len(toks), _SCAN_TOKENS)]
    b = np.concatenate([np.zeros(1, np.int64), *ends]).astype(np.int64)
    return b if b[-1] == len(toks) else np.append(b, np.int64(len(toks)))


def _take(toks: np.ndarray, a: int, n: int, ends_doc: bool) -> tuple[np.ndarray, np.ndarray]:
    """x = toks[a : a+n] and its next tokens y, y's last IGNORE when the piece ends its document (the next
    token starts another document, or is past the shard)."""
    x = np.asarray(toks[a:a + n], dtype=np.int64)
    y = np.empty(n, dtype=np.int64)
    y[:-1] = x[1:]
    y[-1] = IGNORE if ends_doc else toks[a + n]
    return x, y


class DocumentBatcher(Batcher):
    """Training batches of whole documents packed into rows (docs/packed.md), a pure function of (seed, step).

    Documents are found at EOS (`document_bounds`); one longer than seq_len is cut into pieces of seq_len.
    Step s fills the B*world_size rows in order from numpy's default_rng([seed, s]): each draw is a token
    offset, uniform over the shard, and adds the piece holding it (so every token is drawn as often as random
    windows draw it), until the row holds seq_len tokens; the last piece is cut there. Rank r takes rows
    r*B .. (r+1)*B. batch(step) -> (x, y, starts), each [B, T]: x int64 tokens, y their next tokens (IGNORE
    after a document's EOS: the next token belongs to another document), starts bool, True at every piece's
    first token (every row starts one). State and resume as Batcher.
    """

    def __init__(self, tokens, eos_id: int, batch_size: int, seq_len: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        super().__init__(tokens, batch_size, seq_len, seed=seed, rank=rank, world_size=world_size)
        docs = document_bounds(self.tokens, eos_id)
        n_pieces = -(-np.diff(docs) // seq_len)  # [n_docs]
        first = np.cumsum(n_pieces) - n_pieces  # [n_docs]: index of each document's first piece
        within = np.arange(n_pieces.sum()) - np.repeat(first, n_pieces)  # [n_pieces]: piece index in its document
        self.pieces = np.append(np.repeat(docs[:-1], n_pieces) + within * seq_len, docs[-1])  # [n_pieces + 1]
        self.ends_doc = np.zeros(len(self.pieces) - 1, dtype=bool)
        self.ends_doc[first + n_pieces - 1] = True

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's (x, y, starts) for `step`, each [B, T]; does not move the step counter."""
        B, T, n = self.batch_size, self.seq_len, len(self.tokens)
        rng = np.random.default_rng([self.seed, step])
        rows = B * self.world_size
        x, y = np.empty((rows, T), dtype=np.int64), np.empty((rows, T), dtype=np.int64)
        starts = np.zeros((rows, T), dtype=bool)
        for r in range(rows):
            t = 0
            while t < T:
                u = int(np.searchsorted(self.pieces, rng.integers(0, n), side="right")) - 1
                a, size = int(self.pieces[u]), int(self.pieces[u + 1] - self.pieces[u])
                take = min(size, T - t)
                x[r, t:t + take], y[r, t:t + take] = _take(self.tokens, a, take, take == size and self.ends_doc[u])
                starts[r, t] = True
                t += take
        mine = slice(self.rank * B, (self.rank + 1) * B)
        return torch.from_numpy(x[mine]), torch.from_numpy(y[mine]), torch.from_numpy(starts[mine])


def pack_rows(x: torch.Tensor, y: torch.Tensor, starts: torch.Tensor):
    """Rows [R, T] of a DocumentBatcher batch as one packed sequence: (x [1, R*T], y [1, R*T], cu_seqlens int64
    [N + 1]), every row's start a document start. cu_seqlens stays on the CPU (the model reads it there)."""
    flat = starts.reshape(-1).cpu()  # [R*T]
    cu = torch.cat([torch.nonzero(flat).flatten(), torch.tensor([flat.numel()])])
    return x.reshape(1, -1), y.reshape(1, -1), cu  # [R, T] -> [1, R*T]


def document_sequences(tokens, eos_id: int, max_len: int, n: int | None = None) -> list[tuple[torch.Tensor, ...]]:
    """The first `n` documents of a shard (default: all), each cut to its first max_len tokens: a list of
    (x, y) int64 [L] pairs, y the next tokens (IGNORE after the document's EOS)."""
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len: expected a positive int, got {max_len!r}")
    toks = _tokens(tokens)
    docs = document_bounds(toks, eos_id)
    avail = len(docs) - 1
    if n is None:
        n = avail
    if not isinstance(n, int) or n < 1 or n > avail:
        raise ValueError(f"n: the shard holds {avail} documents; got n={n!r}")
    out = []
    for a, b in zip(docs[:n].tolist(), docs[1:n + 1].tolist()):
        take = min(b - a, max_len)
        out.append(tuple(torch.from_numpy(t) for t in _take(toks, a, take, take == b - a)))
    return out
