"""Issue 21 (the first hour of a new user) through the `ttt` command line: a step that would not fit in memory is
refused in one line naming the sizes that fit (or, on a CPU with no --micro-batch given, a fitting one is
picked); a start that wrote no checkpoint does not block the next; the quick demo does not block the real one
and the README's Quickstart states --help's times; a finished run is extended by raising --steps, with one
metrics history; non-UTF-8 prompt bytes and a damaged train.bin end in one line; a damaged newest checkpoint
or a latest.json pointing nowhere falls back to the newest valid one; a double Ctrl-C deletes nothing; option
errors come before any output and without the usage text; eval --out that is a file and --cuda-graph on a CPU
are refused before any work. Every test here fails when the fix it covers is removed."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sysconfig
from pathlib import Path

import pytest
import torch

from conftest import cli as run, one_line_error as bad
from ttt.cli import DEMO_OUT, DEMO_TIME, QUICK_OUT, QUICK_TIME, main
from ttt.config import get_config

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SIZES = ["--size", "debug", "--d-model", "32", "--n-heads", "2", "--seq-len", "32"]
TRAIN = [*SIZES, "--micro-batch", "4", "--tokens-per-step", "128", "--steps", "2", "--eval-every", "0",
         "--log-every", "1", "--no-progress", "--device", "cpu"]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A dataset and a finished 2-step debug run with a checkpoint at each step."""
    root = tmp_path_factory.mktemp("first_hour")
    (root / "corpus").mkdir()
    for n in ("textwrap.py", "string.py", "bisect.py", "heapq.py"):
        shutil.copyfile(STDLIB / n, root / "corpus" / n)
    assert main(["-q", "data", str(root / "corpus"), "--out", str(root / "data"), "--vocab-size", "300",
                 "--val-fraction", "0.3"]) == 0
    assert main(["-q", "train", "--data", str(root / "data"), "--out", str(root / "run"), *TRAIN, "--save-every", "1",
                 "--keep-checkpoints", "0"]) == 0
    return root


@pytest.fixture
def run_copy(w, tmp_path) -> Path:
    shutil.copytree(w / "run", tmp_path / "run")
    return tmp_path / "run"


def _debug_cfg(w):
    return get_config("debug", d_model=32, n_heads=2, vocab_size=json.loads((w / "data" / "meta.json").read_text())[
        "vocab_size"])


# ----------------------------------------------------------------------------- 1. memory, failed starts

def test_step_that_does_not_fit_is_refused_or_resized(capsys, w, tmp_path, monkeypatch):
    import ttt.memory as mem

    est = mem.step_memory(_debug_cfg(w), torch.device("cpu"))
    room = (est.total(2, 32) + est.total(4, 32)) // 2  # micro-batch 2 fits, 4 does not
    monkeypatch.setattr(mem, "available_memory", lambda device: room)
    base = ["train", "--data", w / "data", "--out", tmp_path / "r", *TRAIN]
    code, out, err = run(capsys, *base)  # --micro-batch 4 given: refused, before any output, nothing written
    bad(code, err, "--micro-batch: a training step at --micro-batch 4", "GB", "--micro-batch 2 fits")
    assert out == "" and not (tmp_path / "r").exists()
    # no --micro-batch on a CPU (default 8): the largest that fits is used, and said so; the same run
    auto = [a for a in base if a not in ("--micro-batch", "4")] + ["--tokens-per-step", "256"]
    code, out, err = run(capsys, *auto)
    assert code == 0, err
    assert "note: a step at --micro-batch 8 would not fit" in err and "using --micro-batch 2" in err
    assert json.loads((tmp_path / "r" / "config.json").read_text())["train"]["micro_batch"] == 2
    monkeypatch.setattr(mem, "available_memory", lambda device: 10_000)  # nothing fits
    code, out, err = run(capsys, *[a if a != tmp_path / "r" else tmp_path / "r2" for a in auto])
    bad(code, err, "--micro-batch", "smaller model")
    assert out == "" and not (tmp_path / "r2").exists()


def test_estimate_scales_the_probed_block_to_the_model():
    """The activations of the estimate are built from one block probed at 256 and 512 tokens: scaled to the
    model's blocks and tokens they equal (within 3-5%) what the whole model saves for its backward at another size."""
    from ttt.memory import _saved_bytes, step_memory
    from ttt.model import TTTLM

    class Body(torch.nn.Module):  # the model's blocks, as one module for _saved_bytes
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            for blk in self.model.blocks:
                x, _ = blk(x)
            return (x,)

    for mixer, tol in (("ttt_linear", 0.03), ("mamba", 0.05)):
        cfg = get_config("debug", mixer=mixer, vocab_size=300)
        est = step_memory(cfg, torch.device("cpu"))
        B, T = 3, 768
        saved = _saved_bytes(Body(TTTLM(cfg)), torch.randn(B, T, cfg.d_model, requires_grad=True))
        assert saved == pytest.approx(cfg.n_layers * est.block_bytes(B, T), rel=tol)
        assert est.total(2 * B, T) > est.total(B, T) > est.n_params * 16


def test_estimate_counts_the_head_chunk_its_impl_keeps():
    """The head's chunk of logits: two fp32 [rows, V] buffers in PyTorch's chunk, one in the activations' dtype
    where the row kernel runs; the impl as the run's loss_impl resolves on the device ("auto": PyTorch on a CPU)."""
    import dataclasses

    from ttt.config import RunOptions
    from ttt.memory import HEAD_CHUNK, SLACK, step_memory

    cfg = get_config("debug", mixer="attention", vocab_size=300)
    cpu = torch.device("cpu")
    est = step_memory(cfg, cpu)
    assert not est.head_kernel and not step_memory(cfg, cpu, run=RunOptions(loss_impl="torch")).head_kernel
    assert step_memory(cfg, cpu, run=RunOptions(loss_impl="triton")).head_kernel
    for autocast, act in ((False, 4), (True, 2)):
        e = dataclasses.replace(est, autocast=autocast)
        for B, T in ((2, 64), (40, 512)):  # fewer rows than a chunk, more
            drop = (e.parts(B, T)["activations"] - dataclasses.replace(e, head_kernel=True).parts(B, T)["activations"])
            assert drop == pytest.approx(SLACK * min(B * T, HEAD_CHUNK) * 300 * (8 - act), abs=1)


def test_a_start_without_checkpoint_does_not_block_the_next(capsys, caplog, w, run_copy):
    """A start killed before its first checkpoint (here: a run whose checkpoints are gone) leaves config.json and
    metrics; the next start, of other settings, sets them aside and runs."""
    shutil.rmtree(run_copy / "checkpoints")
    (run_copy / "latest.json").unlink()
    old_metrics = (run_copy / "metrics.jsonl").read_text()
    code, out, err = run(capsys, "train", "--data", w / "data", "--out", run_copy, *TRAIN, "--lr", "1e-3")
    assert code == 0, err
    assert "held a start that wrote no checkpoint" in caplog.text  # a warning on stderr (pytest takes the log)
    (aside,) = (run_copy / "failed_starts").iterdir()
    assert (aside / "metrics.jsonl").read_text() == old_metrics and (aside / "config.json").is_file()


def test_ctrl_c_in_the_first_step_writes_no_checkpoint_that_blocks_the_next(capsys, caplog, w, tmp_path):
    """A first step that takes minutes (GPU-sized defaults on a CPU), stopped by Ctrl-C: nothing was trained, so
    no step-0 checkpoint; the next start, with CPU-sized settings in the same --out, sets the start aside."""
    from ttt.model import TTTLM

    def ctrl_c(module, args):
        if isinstance(module, TTTLM):
            os.kill(os.getpid(), signal.SIGINT)
    out = tmp_path / "r"
    handle = torch.nn.modules.module.register_module_forward_pre_hook(ctrl_c)
    try:
        code, _, err = run(capsys, "train", "--data", w / "data", "--out", out, *TRAIN, "--micro-batch", "1")
    finally:
        handle.remove()
    assert code == 130, err
    assert not any((out / "checkpoints").glob("step_*")) and "no checkpoint written" in caplog.text
    code, _, err = run(capsys, "train", "--data", w / "data", "--out", out, *TRAIN, "--lr", "1e-3")
    assert code == 0, err
    assert len(list((out / "failed_starts").iterdir())) == 1 and (out / "checkpoints" / "step_000002").is_dir()


# ----------------------------------------------------------------------------- 2. the Quickstart

def test_readme_quickstart_states_the_times_of_help(capsys):
    readme = (ROOT / "README.md").read_text()
    code, out, _ = run(capsys, "demo", "--help")
    assert code == 0
    text = " ".join(out.split())
    assert QUICK_TIME in text and DEMO_TIME in text and QUICK_OUT in text and DEMO_OUT in text
    lines = [line for line in readme.splitlines() if line.startswith("ttt demo")]
    assert QUICK_TIME in lines[0] and "--quick" in lines[0] and QUICK_OUT in lines[0]
    assert DEMO_TIME in lines[1] and "--quick" not in lines[1] and DEMO_OUT in lines[1]


# ----------------------------------------------------------------------------- 3. extending a finished run

def test_extending_a_finished_run(capsys, caplog, w, run_copy, tmp_path):
    from ttt.train import TrainConfig, lr_at

    before = rows(run_copy)
    code, out, err = run(capsys, "train", "--out", run_copy, "--steps", "4")  # every other option: the run's own
    assert code == 0, err
    assert "resumed from step 2" in out and "steps 4" in out
    assert "step budget changes from 2 to 4 at step 2" in caplog.text
    r = rows(run_copy)
    assert [x["step"] for x in r] == [1, 2, 3, 4] and r[:2] == before  # one history
    saved = json.loads((run_copy / "config.json").read_text())
    assert saved["budget_changes"] == [{"step": 2, "from": 2, "to": 4}] and saved["run"]["max_steps"] == 4
    cfg4 = TrainConfig(**saved["train"])
    assert [x["lr"] for x in r[2:]] == pytest.approx([lr_at(2, cfg4), lr_at(3, cfg4)])  # the 4-step schedule
    code, out, err = run(capsys, "train", "--out", run_copy, "--steps", "3")
    bad(code, err, "--steps", "at step 4", "--steps >= 4")
    assert out == ""
    # fine-tuning a small run is not "GPU-sized settings"
    code, out, err = run(capsys, "train", "--data", w / "data", "--out", tmp_path / "ft", "--init-from", run_copy,
                         "--seq-len", "32", *TRAIN[len(SIZES):], "--steps", "1")
    assert code == 0, err
    assert "GPU-sized" not in err


# ----------------------------------------------------------------------------- 4. tracebacks

def test_prompt_bytes_that_are_not_utf8(capsys, w):
    code, out, err = run(capsys, "generate", w / "run", "--prompt", "caf\udce9", "--max-new-tokens", "2")
    bad(code, err, "--prompt", "not UTF-8", "e9")
    assert out == ""


@pytest.mark.parametrize("damage,words", [
    ("random", ["train.bin", "outside the vocabulary"]),
    ("cut", ["train.bin", "bytes", "meta.json records"]),
])
def test_damaged_train_bin(capsys, w, tmp_path, damage, words):
    data = tmp_path / "data"
    shutil.copytree(w / "data", data)
    f = data / "train.bin"
    size = f.stat().st_size
    f.write_bytes(os.urandom(size) if damage == "random" else f.read_bytes()[: size - 3])
    code, out, err = run(capsys, "train", "--data", data, "--out", tmp_path / "r", *TRAIN)
    bad(code, err, *words)
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- 5. damaged checkpoints, Ctrl-C

def test_damaged_newest_checkpoint_falls_back(capsys, caplog, run_copy):
    weights = run_copy / "checkpoints" / "step_000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated; latest.json points at it
    code, out, err = run(capsys, "train", "--out", run_copy, "--steps", "3")
    assert code == 0, err
    log = caplog.text
    assert "step_000002" in log and "resuming from the newest valid checkpoint" in log and "step_000001" in log
    assert "resumed from step 1" in out
    caplog.clear()
    (run_copy / "latest.json").write_text(json.dumps({"step": 9, "checkpoint": "checkpoints/step_000009"}))
    code, out, err = run(capsys, "train", "--out", run_copy)
    assert code == 0, err
    assert "does not exist" in caplog.text and "newest valid checkpoint" in caplog.text and "step_000003" in caplog.text
    assert [r["step"] for r in rows(run_copy)] == [1, 2, 3]


def test_double_ctrl_c_before_the_first_checkpoint_deletes_nothing(capsys, w, tmp_path, monkeypatch):
    import ttt.train as train_mod

    real = train_mod.train

    def twice(model_cfg, cfg, on_step=None, run=None):
        def ctrl_c(step, row):
            os.kill(os.getpid(), signal.SIGINT)  # "finishing this step, saving a checkpoint"...
            os.kill(os.getpid(), signal.SIGINT)  # ... "Ctrl-C again aborts"
        return real(model_cfg, cfg, on_step=ctrl_c, run=run)

    monkeypatch.setattr(train_mod, "train", twice)
    out = tmp_path / "r"
    code, _, err = run(capsys, "train", "--data", w / "data", "--out", out, *TRAIN)
    assert code == 130, err
    assert [r["step"] for r in rows(out)] == [1] and (out / "config.json").is_file()
    monkeypatch.setattr(train_mod, "train", real)
    code, _, err = run(capsys, "train", "--data", w / "data", "--out", out, *TRAIN)  # the rerun starts over
    assert code == 0, err
    assert [r["step"] for r in rows(next((out / "failed_starts").iterdir()))] == [1]


# ----------------------------------------------------------------------------- 6. errors before any work

@pytest.mark.parametrize("argv,flag", [
    (["--lr", "-1"], "--lr"),
    (["--tokens-per-step", "100"], "--tokens-per-step"),
    (["--warmup-frac", "2"], "--warmup-frac"),
])
def test_train_option_errors_come_before_any_output(capsys, w, tmp_path, argv, flag):
    code, out, err = run(capsys, "train", "--data", w / "data", "--out", tmp_path / "r", *TRAIN, *argv)
    bad(code, err, flag)
    assert out == "" and not (tmp_path / "r").exists()


def test_usage_errors_are_one_line(capsys):
    for argv, words in ((["train", "--steps", "abc"], ["ttt train: error:", "--steps", "ttt train --help"]),
                        (["params", "--size", "huge"], ["ttt params: error:", "invalid choice"])):
        code, out, err = run(capsys, *argv)
        bad(code, err, *words)
        assert "usage:" not in err


def test_eval_out_that_is_a_file_is_refused_before_evaluating(capsys, w, tmp_path, monkeypatch):
    import ttt.evaluate

    monkeypatch.setattr(ttt.evaluate, "evaluate_checkpoints", lambda *a, **k: pytest.fail("evaluated"))
    f = tmp_path / "afile"
    f.write_text("mine")
    code, _, err = run(capsys, "eval", w / "run", "--data", w / "data", "--seq-len", "16", "--out", f / "sub")
    bad(code, err, "--out", "is a file")
    assert f.read_text() == "mine"


@pytest.mark.parametrize("flag", ["--cuda-graph", "--compile-decode", "--merge-weights"])
def test_cuda_graph_on_a_cpu_is_refused_before_the_prompt(capsys, w, flag):
    code, out, err = run(capsys, "generate", w / "run", "--prompt", "def ", flag, "--max-new-tokens", "2")
    bad(code, err, flag, "CUDA-graph decoding needs a CUDA device")
    assert out == ""


@pytest.mark.parametrize("flag", ["--compile-decode", "--merge-weights"])
def test_graph_options_contradicting_no_cuda_graph_are_refused(capsys, w, flag):
    code, out, err = run(capsys, "generate", w / "run", "--prompt", "def ", flag, "--no-cuda-graph",
                         "--max-new-tokens", "2")
    bad(code, err, flag, "contradicts --no-cuda-graph")
    assert out == ""


@pytest.mark.parametrize("content", ["random", "pickle"])
def test_convert_garbage_never_advises_unsafe_loading(capsys, tmp_path, content):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "tests/data/official/pt_linear_mamba/checkpoint/config.json", src)
    (src / "pytorch_model.bin").write_bytes(os.urandom(4096) if content == "random" else pickle.dumps({"x": Evil()}))
    code, out, err = run(capsys, "convert", src, "--out", tmp_path / "out")
    bad(code, err, "pytorch_model.bin", "not a file of plain tensors")
    assert "weights_only=False" not in err and "likely succeed" not in err and "pwned" not in out
    assert not (tmp_path / "out").exists()
