"""Tests of ttt.tokenizer and ttt.data: BPE round trip, shard contents, split, resume, loaders, bad input."""
import json
import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from ttt import data
from ttt.data import Batcher, eval_sequences, iter_documents, load_meta, load_tokens, prepare, stdlib_files
from ttt.tokenizer import EOS, Tokenizer

VOCAB = 300
UNICODE = [
    "héllo wörld, ça va? Ünïcödé",
    "日本語のテキストと中文字符",
    "emoji 🎉🚀👩‍👩‍👧 and a ZWJ sequence",
    "tabs\tand\nnewlines\r\n  trailing spaces   ",
    "a literal <|eos|> in the text, and \x00 a NUL byte",
    "Ελληνικά, русский, עברית, العربية, हिन्दी",
    "combining e\u0301 and \U0001f600 and \ufeff BOM",
]
DOCS = {  # relative path -> text; sorted order is the document order of a directory source
    "a.txt": "def f(x):\n    return x + 1\n",
    "b.md": "# Title\n\nSome *markdown* text with ünïcödé and 日本語.\n",
    "c.py": "import os\nprint(os.getcwd())  # <|eos|> is only text here\n",
    "sub/d.txt": "nested document\n" * 5,
    "sub/deeper/e.txt": "🎉 emoji document 🚀\n",
    "sub/skip.bin": "not a text extension",
    ".hidden/f.txt": "in a hidden directory, skipped",
    "empty.txt": "",
}
EXPECTED = ["a.txt", "b.md", "c.py", "sub/d.txt", "sub/deeper/e.txt"]  # empty.txt is skipped


def write(root: Path, files: dict) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return root


def numbered_corpus(root: Path, n: int = 40) -> Path:
    return write(root, {f"doc{i:02d}.txt": f"document number {i}\n" + "word " * (i % 7 + 1) for i in range(n)})


def split_docs(tokens: np.ndarray, tok: Tokenizer) -> list[str]:
    """Decode a shard into its documents, cutting at EOS ids (so a literal '<|eos|>' text survives)."""
    assert len(tokens) == 0 or tokens[-1] == tok.eos_id, "every document must end with EOS"
    cuts = np.flatnonzero(np.asarray(tokens) == tok.eos_id)
    docs, start = [], 0
    for c in cuts:
        docs.append(tok.decode(tokens[start:c].tolist()))
        start = c + 1
    return docs


def shard_docs(out: Path) -> tuple[list[str], list[str]]:
    tok = Tokenizer.load(out / "tokenizer.json")
    return split_docs(load_tokens(out / "train.bin"), tok), split_docs(load_tokens(out / "val.bin"), tok)


def file_states(out: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.iterdir())}


# ----------------------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(list(DOCS.values()) * 3 + UNICODE, vocab_size=VOCAB)


def test_tokenizer_round_trip(tok):
    assert 257 <= tok.vocab_size <= VOCAB and tok.decode([tok.eos_id]) == EOS
    for s in UNICODE + list(DOCS.values()) + ["", " ", "never seen: ßŋ∂ƒ©˙∆˚¬ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0010ffff"]:
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert tok.eos_id not in ids, "a literal '<|eos|>' must not become the EOS id"
    assert tok.encode_batch(UNICODE) == [tok.encode(s) for s in UNICODE]
    assert len(tok.encode(DOCS["sub/d.txt"])) < len(DOCS["sub/d.txt"].encode()), "BPE learned no merges"


def test_tokenizer_save_load(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    assert loaded == tok and loaded.vocab_size == tok.vocab_size and loaded.eos_id == tok.eos_id
    for s in UNICODE:
        assert loaded.encode(s) == tok.encode(s) and loaded.decode(tok.encode(s)) == s
    assert not list(tmp_path.glob("*.tmp"))
    assert Tokenizer.train(list(DOCS.values()) * 3 + UNICODE, vocab_size=VOCAB) == tok, "training is not deterministic"


def test_tokenizer_bad_input(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["abc"], vocab_size=100)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Tokenizer.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        Tokenizer.load(tmp_path / "bad.json")


# ----------------------------------------------------------------------------- prepare: contents

def test_prepare_shards_decode_to_documents(tmp_path):
    corpus = write(tmp_path / "corpus", DOCS)
    out = tmp_path / "out"
    meta = prepare(corpus, out, vocab_size=VOCAB, val_docs=2)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert meta == load_meta(out) and meta["dtype"] == "uint16" and load_tokens(out / "train.bin").dtype == np.uint16
    train, val = shard_docs(out)
    expected = [DOCS[k] for k in EXPECTED]
    assert len(val) == 2 and sorted(train + val) == sorted(expected)
    assert train == [d for d in expected if d in train], "documents must keep source order"
    tok = Tokenizer.load(out / "tokenizer.json")
    assert tok.decode(load_tokens(out / "train.bin").tolist()) == "".join(d + EOS for d in train)
    assert (meta["train_docs"], meta["val_docs"]) == (3, 2)
    assert meta["train_tokens"] == len(load_tokens(out / "train.bin"))
    assert meta["val_tokens"] == len(load_tokens(out / "val.bin"))
    assert meta["vocab_size"] == tok.vocab_size and meta["eos_id"] == tok.eos_id
    assert meta["sources"] == [str(corpus)]


def test_prepare_jsonl_and_files_and_given_tokenizer(tmp_path, tok):
    lines = [json.dumps({"body": t, "id": i}) for i, t in enumerate(UNICODE)]
    lines.insert(2, "   ")  # blank lines are skipped
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write(tmp_path, {"single.txt": "a single file document"})
    tok.save(tmp_path / "tok.json")
    meta = prepare([tmp_path / "docs.jsonl", str(tmp_path / "single.txt")], tmp_path / "out",
                   tokenizer_path=tmp_path / "tok.json", text_field="body", val_docs=1)
    assert Tokenizer.load(tmp_path / "out" / "tokenizer.json") == tok
    train, val = shard_docs(tmp_path / "out")
    assert sorted(train + val) == sorted(UNICODE + ["a single file document"])
    assert meta["train_docs"] + meta["val_docs"] == len(UNICODE) + 1
    keys = [k for k, _ in iter_documents(tmp_path / "docs.jsonl", text_field="body")]
    assert keys == [f"docs.jsonl:{i}" for i in (1, 2, 4, 5, 6, 7, 8)]


def test_stdlib_default_corpus(tmp_path):
    meta = prepare(None, tmp_path / "out", vocab_size=VOCAB, max_bytes=30_000)
    train, val = shard_docs(tmp_path / "out")
    n = meta["train_docs"] + meta["val_docs"]
    paths = stdlib_files()
    expected = [t for t in (p.read_text(encoding="utf-8") for p in paths[:n + 5]) if t][:n]
    assert meta["sources"] == ["stdlib"] and sorted(train + val) == sorted(expected)
    assert sum(len(t.encode()) for t in expected[:-1]) < 30_000 <= sum(len(t.encode()) for t in expected)
    root = Path(sysconfig.get_paths()["stdlib"])
    assert paths == sorted(paths) and not any({"test", "tests", "site-packages"} & set(p.relative_to(root).parts)
                                              for p in paths)
    assert len(list(iter_documents(max_docs=3))) == 3


# ----------------------------------------------------------------------------- split

def val_set(tmp_path, name, sources, **kw) -> tuple[set, set]:
    prepare(sources, tmp_path / name, vocab_size=VOCAB, **kw)
    train, val = shard_docs(tmp_path / name)
    return set(train), set(val)


def test_split_deterministic_disjoint_order_independent(tmp_path):
    corpus = numbered_corpus(tmp_path / "corpus")
    files = sorted(corpus.iterdir())
    all_docs = {f.read_text() for f in files}
    train, val = val_set(tmp_path, "a", files, val_fraction=0.25)
    assert not train & val and train | val == all_docs and 3 <= len(val) <= 20
    shuffled = files[:]
    random.Random(1).shuffle(shuffled)
    assert val_set(tmp_path, "b", shuffled, val_fraction=0.25)[1] == val, "split depends on input order"
    assert val_set(tmp_path, "c", files, val_fraction=0.25, seed=1)[1] != val, "seed does not change the split"
    train_dir, val_dir = val_set(tmp_path, "dir", corpus, val_fraction=0.25)  # keys are "corpus/<name>" here
    assert not train_dir & val_dir and train_dir | val_dir == all_docs and val_dir
    train5, val5 = val_set(tmp_path, "d", shuffled, val_docs=5)
    assert len(val5) == 5 and not train5 & val5 and train5 | val5 == all_docs
    assert val_set(tmp_path, "e", files, val_docs=5)[1] == val5
    assert len(val_set(tmp_path, "f", files, val_fraction=0.001)[1]) == 1, "val_fraction > 0 must give a val doc"
    assert val_set(tmp_path, "g", files, val_fraction=0.0) == (all_docs, set())
    assert load_meta(tmp_path / "g")["val_tokens"] == 0 and len(load_tokens(tmp_path / "g" / "val.bin")) == 0


# ----------------------------------------------------------------------------- resume / safety

def test_resume_is_a_no_op(tmp_path):
    corpus = write(tmp_path / "corpus", DOCS)
    meta = prepare(corpus, tmp_path / "out", vocab_size=VOCAB)
    before = file_states(tmp_path / "out")
    assert prepare(corpus, tmp_path / "out", vocab_size=VOCAB) == meta
    assert file_states(tmp_path / "out") == before


def test_interrupted_run_is_redone(tmp_path):
    corpus = write(tmp_path / "corpus", DOCS)
    prepare(corpus, tmp_path / "ref", vocab_size=VOCAB)
    ref = {k: v[1] for k, v in file_states(tmp_path / "ref").items()}
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.bin.tmp").write_bytes(b"\x01\x02half written")  # killed while tokenizing ...
    (out / "val.bin").write_bytes(b"\x07\x07")  # ... or between renames, before meta.json
    prepare(corpus, out, vocab_size=VOCAB)
    assert {k: v[1] for k, v in file_states(out).items()} == ref
    (out / "train.bin").write_bytes(ref["train.bin"][:10])  # a shard that no longer matches meta.json
    prepare(corpus, out, vocab_size=VOCAB)
    assert {k: v[1] for k, v in file_states(out).items()} == ref


def test_interrupted_run_leaves_no_dataset(tmp_path, monkeypatch):
    corpus = write(tmp_path / "corpus", DOCS)
    prepare(corpus, tmp_path / "ref", vocab_size=VOCAB)
    ref = {k: v[1] for k, v in file_states(tmp_path / "ref").items()}

    def interrupt(self, texts):
        raise KeyboardInterrupt

    monkeypatch.setattr(Tokenizer, "encode_batch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, tmp_path / "out", vocab_size=VOCAB)
    assert not (tmp_path / "out" / "meta.json").exists() and not list((tmp_path / "out").glob("*.bin*"))
    monkeypatch.undo()
    prepare(corpus, tmp_path / "out", vocab_size=VOCAB)
    assert {k: v[1] for k, v in file_states(tmp_path / "out").items()} == ref


def test_other_corpus_raises_and_leaves_files(tmp_path):
    one = write(tmp_path / "one", DOCS)
    two = numbered_corpus(tmp_path / "two")
    out = tmp_path / "out"
    prepare(one, out, vocab_size=VOCAB)
    before = file_states(out)
    for sources, kw in ((two, {}), (one, {"seed": 3}), (one, {"vocab_size": VOCAB + 10})):
        with pytest.raises(ValueError, match="overwrite=True"):
            prepare(sources, out, **{"vocab_size": VOCAB, **kw})
        assert file_states(out) == before
    (one / "a.txt").write_text("edited")  # a changed source file is another corpus too
    with pytest.raises(ValueError, match="other sources"):
        prepare(one, out, vocab_size=VOCAB)
    assert file_states(out) == before
    meta = prepare(two, out, vocab_size=VOCAB, overwrite=True)
    assert meta["train_docs"] + meta["val_docs"] == 40 and sorted(sum(shard_docs(out), [])) == sorted(
        p.read_text() for p in two.iterdir())


# ----------------------------------------------------------------------------- loaders

@pytest.fixture()
def shard(tmp_path) -> np.ndarray:
    tokens = np.arange(1000, dtype=np.uint16) * 7 % 997
    tokens.tofile(tmp_path / "train.bin")
    return load_tokens(tmp_path / "train.bin", dtype=np.uint16)


def test_batcher_deterministic_and_resumable(shard):
    B, T = 3, 16
    a = Batcher(shard, B, T, seed=5)
    batches = [next(a) for _ in range(6)]
    for x, y in batches:
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y):
            o = int(np.flatnonzero(shard == row_x[0].item())[0])  # shard values are distinct
            assert row_x.tolist() == shard[o:o + T].tolist() and row_y.tolist() == shard[o + 1:o + T + 1].tolist()
    assert not torch.equal(batches[0][0], batches[1][0])
    b = Batcher(shard, B, T, seed=5)
    for _ in range(2):
        next(b)
    state = b.state_dict()
    c = Batcher(shard, B, T, seed=0)
    c.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip too
    for want in batches[2:]:
        got_b, got_c = next(b), next(c)
        assert torch.equal(got_b[0], want[0]) and torch.equal(got_c[0], want[0]) and torch.equal(got_c[1], want[1])
    assert not torch.equal(Batcher(shard, B, T, seed=6).batch(0)[0], batches[0][0])
    with pytest.raises(ValueError, match="seq_len"):
        Batcher(shard, B, T + 1).load_state_dict(state)


def test_batcher_rank_sharding_covers_global_batch(shard):
    B, T, W = 2, 8, 3
    full = Batcher(shard, B * W, T, seed=1)
    ranks = [Batcher(shard, B, T, seed=1, rank=r, world_size=W) for r in range(W)]
    for step in range(4):
        gx, gy = full.batch(step)
        parts = [r.batch(step) for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), gx) and torch.equal(torch.cat([p[1] for p in parts]), gy)
    assert not torch.equal(ranks[0].batch(0)[0], ranks[1].batch(0)[0])


def test_eval_sequences(shard, tmp_path):
    x, y = eval_sequences(shard, 100, 4)
    assert x.shape == y.shape == (4, 100) and x.dtype == torch.int64
    assert x.flatten().tolist() == shard[:400].tolist() and y.flatten().tolist() == shard[1:401].tolist()
    assert eval_sequences(shard, 100)[0].shape == (9, 100)  # 999 // 100 windows fit
    with pytest.raises(ValueError, match="room for 9"):
        eval_sequences(shard, 100, 10)
    corpus = write(tmp_path / "corpus", DOCS)
    prepare(corpus, tmp_path / "out", vocab_size=VOCAB, val_docs=2)
    x, _ = eval_sequences(tmp_path / "out" / "val.bin", 4, 2)  # dtype read from meta.json
    assert x.flatten().tolist() == load_tokens(tmp_path / "out" / "val.bin")[:8].tolist()


# ----------------------------------------------------------------------------- bad input

def test_bad_sources(tmp_path, monkeypatch):
    out = tmp_path / "out"
    corpus = write(tmp_path / "corpus", DOCS)

    def bad(match, sources, exc=ValueError, **kw):
        with pytest.raises(exc, match=match):
            prepare(sources, out, **{"vocab_size": VOCAB, **kw})
        assert not out.exists(), "a failed prepare must not create out_dir"

    bad("missing.txt.*does not exist", tmp_path / "missing.txt", FileNotFoundError)
    bad("missing_dir", [corpus, tmp_path / "missing_dir"], FileNotFoundError)
    bad("empty list", [])
    write(tmp_path / "empties", {"a.txt": "", "b/c.md": ""})
    bad("no non-empty documents", tmp_path / "empties")
    write(tmp_path / "nomatch", {"a.bin": "x", "b.csv": "y"})
    bad("nomatch.*no files ending in", tmp_path / "nomatch")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    bad("latin1.txt.*not UTF-8", tmp_path / "latin1.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    bad("bad.jsonl' line 2: not valid JSON", tmp_path / "bad.jsonl")
    (tmp_path / "nofield.jsonl").write_text('{"text": "ok"}\n{"content": "no text field"}\n')
    bad("nofield.jsonl' line 2: expected a JSON object with a 'text' field", tmp_path / "nofield.jsonl")
    bad("line 1: .*'body' field", tmp_path / "nofield.jsonl", text_field="body")
    (tmp_path / "notstr.jsonl").write_text('{"text": 3}\n')
    bad("notstr.jsonl' line 1: field 'text' must be a string", tmp_path / "notstr.jsonl")
    (tmp_path / "list.jsonl").write_text('["text"]\n')
    bad("list.jsonl' line 1: expected a JSON object", tmp_path / "list.jsonl")
    bad("val_fraction", corpus, val_fraction=1.5)
    bad("val_docs", corpus, val_docs=-1)
    bad("none left to train on", corpus, val_docs=5)
    bad("vocab_size", corpus, vocab_size=10)
    bad("max_bytes", corpus, max_bytes=0)
    bad("extensions", corpus, extensions=".txt")
    bad("nope.json", corpus, FileNotFoundError, tokenizer_path=tmp_path / "nope.json")

    real = Path.read_bytes

    def unreadable(self):
        if self.name == "b.md":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", unreadable)
    bad("cannot read .*b.md.*Permission denied", corpus)
    monkeypatch.undo()

    out.write_text("a file, not a directory")
    with pytest.raises(ValueError, match="not a directory"):
        prepare(corpus, out, vocab_size=VOCAB)


def test_bad_loader_input(tmp_path, shard):
    with pytest.raises(FileNotFoundError, match="nothing.bin"):
        load_tokens(tmp_path / "nothing.bin")
    with pytest.raises(ValueError, match="no meta.json"):
        load_tokens(tmp_path / "train.bin")
    with pytest.raises(ValueError, match="rank"):
        Batcher(shard, 2, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        Batcher(shard, 0, 8)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        Batcher(shard, 2, 1000)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        load_meta(tmp_path / "nowhere")
    assert data.load_tokens(tmp_path / "train.bin", dtype="uint16").shape == (1000,)
