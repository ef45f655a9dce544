"""Evaluation by position (against a hand computation), bucketing, the plot and result files, and
generation: greedy == argmax of the full forward, top-k=1 and tiny top-p == greedy, seeds, EOS,
streaming text."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from ttt.config import get_config
from ttt.evaluate import bucket_edges, bucketize, evaluate_checkpoints, evaluate_model, plot
from ttt.generate import filter_logits, generate, sample_next, stream, stream_text
from ttt.model import TTTLM

V = 53


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TTTLM(get_config("debug", mixer="ttt_linear", vocab_size=V, mini_batch=4)).eval()


def rand_ids(shape, seed=0):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- evaluation

def test_per_position_nll_equals_hand_computation(model):
    x = rand_ids((5, 12))
    with torch.no_grad():
        logits, _ = model(x[:, :-1])
    logp = torch.log_softmax(logits.double(), dim=-1)
    target = x[:, 1:]
    hand = torch.zeros(11, dtype=torch.float64)
    for t in range(11):
        for n in range(5):
            hand[t] -= logp[n, t, target[n, t]] / 5
    got = evaluate_model(model, x, chunk_len=4, batch_size=2)
    torch.testing.assert_close(got, hand, rtol=0, atol=1e-5)
    # explicit targets: the same numbers
    torch.testing.assert_close(evaluate_model(model, x[:, :-1], x[:, 1:], batch_size=5), hand, rtol=0, atol=1e-5)


def test_evaluate_model_restores_training_flag_and_validates(model):
    model.train()
    evaluate_model(model, rand_ids((1, 5)))
    assert model.training
    model.eval()
    with pytest.raises(ValueError, match="tokens"):
        evaluate_model(model, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="chunk_len"):
        evaluate_model(model, rand_ids((1, 5)), chunk_len=0)
    with pytest.raises(ValueError, match="targets"):
        evaluate_model(model, rand_ids((1, 5)), rand_ids((1, 4)))


def test_bucket_edges_cover_every_position_once():
    for L in (1, 2, 7, 100, 1024):
        for n in (1, 3, 16):
            for scheme in ("log", "linear"):
                e = bucket_edges(L, n, scheme)
                assert e[0] == 1 and e[-1] == L + 1 and all(a < b for a, b in zip(e, e[1:]))
                assert len(e) - 1 <= n
    assert bucket_edges(8, 4, "linear") == [1, 3, 5, 7, 9]
    assert bucket_edges(1023, 10, "log") == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


def test_bucketize_means():
    nll = torch.arange(1, 9, dtype=torch.float64)  # positions 1..8
    rows = bucketize(nll, 4, scheme="linear")
    assert [(r["start"], r["end"]) for r in rows] == [(1, 2), (3, 4), (5, 6), (7, 8)]
    assert [r["nll"] for r in rows] == [1.5, 3.5, 5.5, 7.5]
    assert rows[0]["ppl"] == pytest.approx(math.exp(1.5))
    rows = bucketize(nll, 3, scheme="log")  # edges round(1, 2.08, 4.33, 9)
    assert [(r["start"], r["end"]) for r in rows] == [(1, 1), (2, 3), (4, 8)]
    assert [r["nll"] for r in rows] == [1.0, 2.5, 6.0]
    with pytest.raises(ValueError, match="scheme"):
        bucketize(nll, 3, scheme="cubic")


def test_plot_writes_png(tmp_path):
    nll = torch.linspace(5, 3, 64, dtype=torch.float64)
    results = {"seq_len": 64, "chunk_len": 16, "n_seqs": 2, "split": "val", "models": [
        {"name": n, "params": 1000, "nll": nll.mean().item() + k, "ppl": math.exp(nll.mean().item() + k),
         "buckets": bucketize(nll + k, 6)} for k, n in enumerate(("a", "b"))]}
    out = plot(results, tmp_path / "p.png", train_len=16)
    data = open(out, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_evaluate_checkpoints_writes_json_csv_png(model, tmp_path):
    from ttt.data import prepare

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 400)
    data = tmp_path / "data"
    prepare(corpus, data, vocab_size=300, val_fraction=0.0)
    meta = json.loads((data / "meta.json").read_text())
    m = TTTLM(get_config("debug", vocab_size=meta["vocab_size"], mini_batch=4))
    res = evaluate_checkpoints([], data, seq_len=32, chunk_len=8, n_seqs=3, out_dir=tmp_path / "ev",
                               split="train", models=[m, m], names=["m1", "m2"], n_buckets=4)
    assert [r["name"] for r in res["models"]] == ["m1", "m2"]
    r = res["models"][0]
    assert len(r["per_position"]) == 32 and r["nll"] == pytest.approx(sum(r["per_position"]) / 32)
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["models"][1]["name"] == "m2"
    rows = list(csv.reader(open(tmp_path / "ev" / "eval.csv")))
    assert rows[0] == ["model", "bucket_start", "bucket_end", "nll", "ppl"] and len(rows) > 4
    pos = list(csv.reader(open(tmp_path / "ev" / "eval_by_position.csv")))
    assert pos[0] == ["position", "m1", "m2"] and len(pos) == 33
    assert (tmp_path / "ev" / "eval.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- generation

def test_greedy_equals_argmax_of_full_forward(model):
    prompt = rand_ids((2, 5), seed=3)
    out = generate(model, prompt, 9, greedy=True)
    assert len(out) == 2 and all(len(r) == 9 for r in out)
    seq = torch.cat([prompt, torch.tensor(out)], 1)
    with torch.no_grad():
        logits, _ = model(seq)
    torch.testing.assert_close(logits[:, 4:-1].argmax(-1), seq[:, 5:])
    assert generate(model, prompt, 9, greedy=True) == out  # deterministic
    assert generate(model, prompt, 9, temperature=0) == out


def test_topk1_and_tiny_topp_equal_greedy(model):
    prompt = rand_ids((7,), seed=4).tolist()
    greedy = generate(model, prompt, 8, greedy=True)
    assert isinstance(greedy, list) and len(greedy) == 8 and isinstance(greedy[0], int)
    assert generate(model, prompt, 8, top_k=1, seed=5) == greedy
    assert generate(model, prompt, 8, top_p=1e-6, seed=6) == greedy
    assert generate(model, prompt, 8, top_k=1, temperature=5.0) == greedy


def test_seed_reproducibility(model):
    prompt = [[1, 2, 3], [4, 5, 6]]
    a = generate(model, prompt, 12, temperature=1.5, seed=123)
    b = generate(model, prompt, 12, temperature=1.5, seed=123)
    c = generate(model, prompt, 12, temperature=1.5, seed=124)
    assert a == b and a != c


def test_seed_leaves_global_rng_alone(model):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    generate(model, [1, 2], 5, seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_eos_stops_and_is_not_returned(model):
    prompt = [3, 1, 4]
    greedy = generate(model, prompt, 10, greedy=True)
    eos = greedy[3]
    out = generate(model, prompt, 10, greedy=True, eos_id=eos)
    assert out == greedy[:greedy.index(eos)]
    steps = list(stream(model, prompt, 10, greedy=True, eos_id=eos))
    assert len(steps) == greedy.index(eos) + 1 and int(steps[-1][0]) == eos
    seen = []
    generate(model, prompt, 4, greedy=True, callback=seen.append)
    assert torch.cat(seen).tolist() == greedy[:4]
    assert generate(model, prompt, 0) == []


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]])
    f = filter_logits(logits, top_k=2)
    assert torch.isinf(f[0, [0, 3]]).all() and torch.isfinite(f[0, [1, 2]]).all()
    p = torch.softmax(logits, -1)[0]  # [0.032, 0.644, 0.237, 0.087]
    f = filter_logits(logits, top_p=0.7)  # 0.644 < 0.7, so the second token is needed too
    assert torch.isfinite(f[0, [1, 2]]).all() and torch.isinf(f[0, [0, 3]]).all()
    f = filter_logits(logits, top_p=float(p[1]) - 1e-3)
    assert torch.isfinite(f).sum() == 1
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, top_k=2, generator=g) for _ in range(200)])
    assert set(draws.flatten().tolist()) == {1, 2}
    assert sample_next(logits[0], greedy=True).item() == 1
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            sample_next(logits, **bad)


def test_bad_prompts(model):
    for bad, word in (([], "prompt"), ([[1, 2], [3]], "prompt"), ([V + 5], "prompt"), (torch.zeros(2, 2), "prompt")):
        with pytest.raises(ValueError, match=word):
            generate(model, bad, 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [1], -1)


class _ByteTok:
    """A stand-in tokenizer: id = byte value (< 256), decode like byte-level BPE (U+FFFD for broken UTF-8)."""
    eos_id = 0

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_stream_text_pieces_concatenate_to_decode():
    torch.manual_seed(1)
    m = TTTLM(get_config("debug", mixer="attention", vocab_size=256)).eval()
    tok = _ByteTok()
    pieces = list(stream_text(m, tok, "ab", 30, seed=0, top_k=40))
    ids = generate(m, tok.encode("ab"), 30, seed=0, top_k=40, eos_id=0)
    assert "".join(pieces) == tok.decode(ids)
    assert len(pieces) > 1 and all(pieces)


def test_cuda_graph_decode_needs_cuda():
    from ttt.config import get_config
    from ttt.generate import generate
    from ttt.model import TTTLM
    model = TTTLM(get_config("debug", vocab_size=64))
    with pytest.raises(ValueError, match=r"^cuda_graph: expected a model on a CUDA device"):
        generate(model, [1, 2, 3], 4, greedy=True, cuda_graph=True)
    assert len(generate(model, [1, 2, 3], 4, greedy=True)) == 4  # auto: eager steps on the CPU
