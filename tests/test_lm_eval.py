"""`ttt lm-eval` through lm-evaluation-harness, offline: a local YAML task pair over local JSONL files
(multiple choice and rolling perplexity), scored by our adapter with windows of 8 tokens (the state
carried across them) and checked against a hand computation from one full forward of the model."""
from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("lm_eval")

from ttt.cli import main  # noqa: E402
from ttt.config import get_config  # noqa: E402
from ttt.model import TTTLM  # noqa: E402
from ttt.tokenizer import Tokenizer  # noqa: E402

MC = [{"question": "The cat sat on the", "choices": ["mat", "moon", "cloud"], "answer": 0},
      {"question": "Two plus two is", "choices": ["five", "four"], "answer": 1},
      {"question": "Water is", "choices": ["wet", "dry", "loud"], "answer": 0}]
DOCS = [{"text": "A long document about cats and mats, long enough to span several windows of eight tokens."},
        {"text": "Short one."}]


def _task_dir(root):
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC))
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (root / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    (root / "tiny_ppl.yaml").write_text(f"""task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'docs.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""")
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("lmeval")
    tok = Tokenizer.train([d["text"] for d in DOCS] + [m["question"] + " " + " ".join(m["choices"]) for m in MC],
                          vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    cfg = get_config("debug", mixer="ttt_linear", vocab_size=tok.vocab_size, mini_batch=4)
    model = TTTLM(cfg)
    run = root / "run"
    run.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "model.safetensors"))
    (run / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "vocab_size": cfg.vocab_size}))
    tok.save(run / "tokenizer.json")
    return run, model.eval(), tok, _task_dir(root)


def _ll(model, ids: list[int], n_cont: int) -> tuple[float, bool]:
    """Hand computation: one full forward, log-softmax, sum over the last n_cont targets."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0][0]
    lp = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    greedy = bool((logits.argmax(-1)[-n_cont:] == torch.tensor(ids[-n_cont:])).all())
    return float(lp[-n_cont:].sum()), greedy


def test_local_tasks_match_hand_computation(run_dir, tmp_path, capsys):
    run, model, tok, tasks = run_dir
    out = tmp_path / "res.json"
    code = main(["-q", "lm-eval", str(run), "--tasks", "tiny_mc,tiny_ppl", "--include-path", str(tasks),
                 "--batch-size", "2", "--max-length", "8", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    res = json.loads(out.read_text())["results"]
    eos = tok.eos_id
    # multiple choice: continuation " choice" after the question, prefixed by EOS (no BOS in this tokenizer)
    correct = 0
    for d in MC:
        ctx = [eos] + tok.encode(d["question"])
        lls = [_ll(model, ctx + tok.encode(" " + c), len(tok.encode(" " + c)))[0] for c in d["choices"]]
        correct += int(max(range(len(lls)), key=lls.__getitem__) == d["answer"])
    assert res["tiny_mc"]["acc,none"] == pytest.approx(correct / len(MC))
    # rolling perplexity over whole documents (longer than the 8-token window: the state is carried)
    total_ll = sum(_ll(model, [eos] + tok.encode(d["text"]), len(tok.encode(d["text"])))[0] for d in DOCS)
    words = sum(len(re.split(r"\s+", d["text"])) for d in DOCS)
    nbytes = sum(len(d["text"].encode()) for d in DOCS)
    assert len(tok.encode(DOCS[0]["text"])) > 3 * 8
    assert res["tiny_ppl"]["word_perplexity,none"] == pytest.approx(math.exp(-total_ll / words), rel=1e-4)
    assert res["tiny_ppl"]["bits_per_byte,none"] == pytest.approx(-total_ll / nbytes / math.log(2), rel=1e-4)


def test_loglikelihood_and_generate_direct(run_dir):
    """The adapter's three request kinds against the hand computation and our own greedy generate."""
    from ttt.generate import generate
    from ttt.lm_eval_harness import eval_lm_class

    run, model, tok, _ = run_dir
    lm = eval_lm_class().from_run(run, batch_size=3, max_length=5)

    class Req:
        def __init__(self, *args):
            self.args = args

    reqs = [Req(d["question"], " " + c) for d in MC for c in d["choices"]]
    got = lm.loglikelihood(reqs)
    for r, (ll, greedy) in zip(reqs, got):
        n = len(tok.encode(r.args[1]))
        want = _ll(model, [tok.eos_id] + tok.encode(r.args[0] + r.args[1]), n)
        assert ll == pytest.approx(want[0], rel=1e-5, abs=1e-5) and greedy == want[1]
    text = lm.generate_until([Req("The cat", {"until": ["\n\n"], "max_gen_toks": 12})])[0]
    ids = generate(model, [tok.eos_id] + tok.encode("The cat"), 12, greedy=True, eos_id=tok.eos_id)
    assert text == tok.decode(ids).split("\n\n")[0]


@pytest.mark.slow  # indexes lm-eval's ~15k built-in tasks (about 20 s)
def test_unknown_task(run_dir, tmp_path, capsys):
    run, _, _, tasks = run_dir
    code = main(["-q", "lm-eval", str(run), "--tasks", "tiny_mc,no_such_task_xyz", "--include-path", str(tasks),
                 "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and "--tasks" in err and "no_such_task_xyz" in err and "tiny_mc" not in err, err
    assert not (tmp_path / "r.json").exists()


def test_missing_tokenizer(run_dir, tmp_path, capsys):
    run, _, _, tasks = run_dir
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("model.safetensors", "config.json"):
        (bare / f).write_bytes((run / f).read_bytes())
    code = main(["-q", "lm-eval", str(bare), "--tasks", "tiny_mc", "--include-path", str(tasks),
                 "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and "--tokenizer" in err, err


def test_without_lm_eval_says_what_to_install(run_dir, tmp_path, capsys, monkeypatch):
    import sys

    run, _, _, tasks = run_dir
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    code = main(["-q", "lm-eval", str(run), "--tasks", "tiny_mc", "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'ttt-lm[lm_eval]'" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_scores_match_cpu(run_dir):
    """The adapter on CUDA (the auto op backend: the Triton kernels) scores like the CPU reference."""
    from ttt.lm_eval_harness import eval_lm_class

    run, _, _, _ = run_dir

    class Req:
        def __init__(self, *args):
            self.args = args

    reqs = [Req(d["question"], " " + c) for d in MC for c in d["choices"]]
    rolling = [Req(d["text"]) for d in DOCS]
    cpu = eval_lm_class().from_run(run, batch_size=4, max_length=8)
    gpu = eval_lm_class().from_run(run, batch_size=4, max_length=8, device="cuda")
    for (a, _), (b, _) in zip(cpu.loglikelihood(reqs), gpu.loglikelihood(reqs)):
        assert b == pytest.approx(a, rel=1e-3, abs=1e-3)
    assert gpu.loglikelihood_rolling(rolling) == pytest.approx(cpu.loglikelihood_rolling(rolling), rel=1e-3)
