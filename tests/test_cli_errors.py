"""Issue 12 sections 1-3 through the `ttt` command line: a run keeps its own tokenizer (portable) and
eval/generate refuse one that is not the model's; weights are checked against the hash in their own
header; contradicting or absurd options are refused; full or read-only disks, an --out that is a
file, an unavailable --device or backend, a missing optional package and a demo --eval-len the corpus
cannot serve end in one line and exit status 2 with nothing half-written; error messages name the
flags as typed; eval uses what a small split holds and says so; `train` on a CPU says the defaults
are the GPU recipe. Every test here fails when the check it covers is removed."""
from __future__ import annotations

import errno
import json
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from conftest import cli as run, one_line_error as bad
from ttt import checkpoint as ckpt_mod
from ttt.checkpoint import check_tokenizer, load_model, read_checkpoint
from ttt.cli import (DataOptions, DemoOptions, EvalOptions, GenerateOptions, ParamsOptions, PresetOptions, build_parser,
                     cli_message, main)
from ttt.config import ModelConfig, RunOptions
from ttt.train import TrainConfig
from ttt.tokenizer import Tokenizer

TRAIN = ["--size", "debug", "--d-model", "32", "--n-heads", "2", "--seq-len", "32", "--micro-batch", "4",
         "--tokens-per-step", "128", "--steps", "2", "--eval-every", "0", "--no-progress", "--device", "cpu"]
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def corpus(root: Path, names) -> Path:
    root.mkdir()
    for n in names:
        shutil.copyfile(STDLIB / n, root / n)
    return root


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Two datasets of the same vocabulary size but different tokenizers, and a run trained on the first
    whose data directory was then moved away (so only the run's own tokenizer is left)."""
    root = tmp_path_factory.mktemp("errs")
    a = corpus(root / "ca", ("textwrap.py", "string.py", "bisect.py", "heapq.py"))
    b = corpus(root / "cb", ("fnmatch.py", "glob.py", "shlex.py", "colorsys.py"))
    for src, dst in ((a, "data"), (b, "other")):
        assert main(["-q", "data", str(src), "--out", str(root / dst), "--vocab-size", "300",
                     "--val-fraction", "0.3"]) == 0
    assert main(["-q", "train", "--data", str(root / "data"), "--out", str(root / "run"), *TRAIN]) == 0
    shutil.copytree(root / "data", root / "data_kept")
    shutil.rmtree(root / "data")  # the run must not need its training data to generate
    return root


# ----------------------------------------------------------------------------- section 1: tokenizer, integrity

def test_run_keeps_its_tokenizer_and_generates_from_anywhere(capsys, w, monkeypatch, tmp_path):
    ck = read_checkpoint(w / "run", optimizer=False)
    tok = Tokenizer.load(w / "data_kept" / "tokenizer.json")
    assert Tokenizer.load(ck.path / "tokenizer.json") == tok
    assert ck.meta["tokenizer_sha256"] == tok.sha256  # recorded in the weights' own header
    assert ck.meta["data_fingerprint"] == json.loads((w / "data_kept" / "meta.json").read_text())["fingerprint"]
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "-q", "generate", str(w / "run"), "--prompt", "def ", "--max-new-tokens", "4",
                         "--seed", "0")
    assert code == 0, err
    assert out.startswith("def ")


def test_eval_refuses_data_of_another_tokenizer(capsys, w, tmp_path):
    args = ["eval", str(w / "run"), "--seq-len", "16", "--n-seqs", "1", "--out", str(tmp_path / "ev")]
    assert Tokenizer.load(w / "other" / "tokenizer.json").vocab_size == Tokenizer.load(
        w / "data_kept" / "tokenizer.json").vocab_size  # same size, other merges
    code, _, err = run(capsys, *args, "--data", str(w / "other"))
    bad(code, err, "--data", "not the tokenizer this model was trained with", "--allow-other-tokenizer")
    assert not (tmp_path / "ev").exists()
    code, out, err = run(capsys, "-q", *args, "--data", str(w / "other"), "--allow-other-tokenizer")
    assert code == 0, err
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["models"][0]["trained_on_this_data"] is False
    code, out, err = run(capsys, "-q", *args, "--data", str(w / "data_kept"))
    assert code == 0, err
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["models"][0]["trained_on_this_data"] is True


def test_generate_refuses_another_tokenizer(capsys, w):
    args = ["generate", str(w / "run"), "--max-new-tokens", "3", "--seed", "0"]
    code, _, err = run(capsys, *args, "--tokenizer", str(w / "other" / "tokenizer.json"))
    bad(code, err, "--tokenizer", "not the tokenizer this model was trained with", "--allow-other-tokenizer")
    code, _, err = run(capsys, "-q", *args, "--tokenizer", str(w / "other" / "tokenizer.json"),
                       "--allow-other-tokenizer")
    assert code == 0, err


def test_check_tokenizer_without_a_recorded_hash(w):
    """Older checkpoints record no tokenizer hash: then the vocabulary size must match exactly."""
    tok = Tokenizer.load(w / "data_kept" / "tokenizer.json")
    assert check_tokenizer(tok, {}, tok.vocab_size) is None
    assert "vocabulary of" in check_tokenizer(tok, {}, tok.vocab_size + 5)  # smaller than the model's
    assert "larger than the model" in check_tokenizer(tok, {"tokenizer_sha256": tok.sha256}, tok.vocab_size - 1)
    assert check_tokenizer(tok, {"tokenizer_sha256": "0" * 64}, tok.vocab_size) is not None


def test_flipped_weight_byte_refused_without_trainer_json(capsys, w, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(w / "run", run_dir)
    ck = next((run_dir / "checkpoints").iterdir())
    (ck / "trainer.json").unlink()  # the optional file with the file hashes is gone
    f = ck / "model.safetensors"
    b = bytearray(f.read_bytes())
    b[-7] ^= 0x10  # a byte of the last tensor's data
    f.write_bytes(bytes(b))
    with pytest.raises(ValueError, match="model.safetensors: corrupt .*sha256"):
        load_model(run_dir)
    code, _, err = run(capsys, "generate", str(run_dir), "--max-new-tokens", "2")
    bad(code, err, "model.safetensors", "corrupt")


def test_tensor_hash_covers_names_shapes_and_bytes():
    a = {"x": torch.arange(6, dtype=torch.float32), "y": torch.ones(2, dtype=torch.bfloat16)}
    h = ckpt_mod.tensors_sha256(a)
    assert h == ckpt_mod.tensors_sha256({k: v.clone() for k, v in a.items()})
    assert h != ckpt_mod.tensors_sha256({**a, "x": a["x"].reshape(2, 3)})
    assert h != ckpt_mod.tensors_sha256({"z": a["x"], "y": a["y"]})
    b = a["x"].clone()
    b[3] = 3.0000002
    assert h != ckpt_mod.tensors_sha256({**a, "x": b})


@pytest.mark.parametrize("argv,words", [
    (["--greedy", "--temperature", "0.5"], ["--greedy", "--temperature"]),
    (["--greedy", "--top-p", "0.9"], ["--greedy", "--top-p"]),
    (["--temperature", "0", "--top-k", "5"], ["--temperature 0", "--top-k"]),
    (["--prompt-file", "PROMPT"], ["--prompt", "--prompt-file", "contradict"]),
    (["--temperature", "inf"], ["--temperature", "finite"]),
    (["--temperature", "nan"], ["--temperature", "finite"]),
    (["--top-p", "nan"], ["--top-p"]),
    (["--max-new-tokens", "-1"], ["--max-new-tokens"]),
])
def test_contradicting_or_absurd_generate_options(capsys, w, tmp_path, argv, words):
    (tmp_path / "p.txt").write_text("def ")
    argv = [str(tmp_path / "p.txt") if a == "PROMPT" else a for a in argv]
    code, out, err = run(capsys, "generate", str(w / "run"), "--prompt", "x", *argv)
    bad(code, err, *words)
    assert out == ""  # refused before anything is printed


def test_absurd_vocab_size_refused(capsys, tmp_path):
    code, _, err = run(capsys, "data", str(STDLIB / "bisect.py"), "--out", str(tmp_path / "d"),
                       "--vocab-size", "100000000")
    bad(code, err, "--vocab-size", "at most")
    assert not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------- section 2: environment errors

def _no_tmp_left(root: Path):
    return [p for p in root.rglob("*") if ".tmp" in p.name]


def test_full_disk_while_preparing_data(capsys, tmp_path, monkeypatch):
    import ttt.data as data

    real = data._write_shards

    def full(docs, val, tok, out):
        (out / "train.bin.tmp").write_bytes(b"\0" * 10)  # half-written, as a real full disk leaves it
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "train.bin.tmp"))

    monkeypatch.setattr(data, "_write_shards", full)
    code, _, err = run(capsys, "data", str(STDLIB / "bisect.py"), str(STDLIB / "heapq.py"), "--out",
                       str(tmp_path / "d"), "--vocab-size", "300", "--val-docs", "1")
    bad(code, err, "No space left on device", "free some space")
    assert not (tmp_path / "d").exists()  # nothing half-written: the directory it created is gone
    (tmp_path / "d").mkdir()
    code, _, err = run(capsys, "data", str(STDLIB / "bisect.py"), str(STDLIB / "heapq.py"), "--out",
                       str(tmp_path / "d"), "--vocab-size", "300", "--val-docs", "1")
    bad(code, err, "No space left on device")
    assert not _no_tmp_left(tmp_path / "d") and not (tmp_path / "d" / "meta.json").exists()
    monkeypatch.setattr(data, "_write_shards", real)


def test_full_disk_while_saving_a_checkpoint(capsys, w, tmp_path, monkeypatch):
    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(ckpt_mod, "save_file", full)
    out = tmp_path / "run"
    code, _, err = run(capsys, "-q", "train", "--data", str(w / "data_kept"), "--out", str(out), *TRAIN)
    bad(code, err, "No space left on device")
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    assert not (out / "latest.json").exists()


def test_read_only_eval_output(capsys, w, tmp_path, monkeypatch):
    import ttt.evaluate as ev

    def ro(path, text):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(ev, "_atomic_write", ro)
    code, _, err = run(capsys, "-q", "eval", str(w / "run"), "--data", str(w / "data_kept"), "--seq-len", "16",
                       "--n-seqs", "1", "--out", str(tmp_path / "ev"))
    bad(code, err, "Read-only file system", "writable")


def test_out_that_is_a_file(capsys, w, tmp_path):
    f = tmp_path / "afile"
    f.write_text("mine")
    code, _, err = run(capsys, "data", str(STDLIB / "bisect.py"), "--out", str(f), "--vocab-size", "300")
    bad(code, err, "--out")
    code, _, err = run(capsys, "-q", "eval", str(w / "run"), "--data", str(w / "data_kept"), "--seq-len", "16",
                       "--n-seqs", "1", "--out", str(f))
    bad(code, err, "--out")
    code, _, err = run(capsys, "-q", "train", "--data", str(w / "data_kept"), "--out", str(f), *TRAIN)
    bad(code, err, "--out")
    assert f.read_text() == "mine"


@pytest.mark.parametrize("command", ["eval", "generate", "train"])
def test_unavailable_or_unknown_device(capsys, w, monkeypatch, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = {"eval": ["eval", str(w / "run"), "--data", str(w / "data_kept")],
            "generate": ["generate", str(w / "run")],
            "train": ["train", "--data", str(w / "data_kept"), "--out", str(w / "never"), *TRAIN]}[command]
    code, _, err = run(capsys, *base, "--device", "cuda")
    bad(code, err, "--device", "not available")
    code, _, err = run(capsys, *base, "--device", "warp9")
    bad(code, err, "--device")
    assert not (w / "never").exists()


def test_backend_that_cannot_run_here(capsys, w, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, _, err = run(capsys, "generate", str(w / "run"), "--ttt-backend", "triton")
    bad(code, err, "--ttt-backend", "CUDA")
    code, _, err = run(capsys, "train", "--data", str(w / "data_kept"), "--out", str(w / "never2"), *TRAIN,
                       "--ttt-backend", "triton")
    bad(code, err, "--ttt-backend", "CUDA")
    assert not (w / "never2").exists()


def test_missing_tensorboard(capsys, w, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    code, _, err = run(capsys, "train", "--data", str(w / "data_kept"), "--out", str(w / "never3"), *TRAIN,
                       "--tensorboard")
    bad(code, err, "pip install tensorboard", "--tensorboard")
    assert not (w / "never3").exists()


def test_demo_eval_len_checked_before_training(capsys, tmp_path):
    out = tmp_path / "demo"
    code, _, err = run(capsys, "-q", "demo", "--quick", "--eval-len", "100000", "--out", str(out))
    bad(code, err, "--eval-len", "nothing was trained")
    assert not (out / "runs").exists()


def test_messages_name_cli_flags(capsys, w, tmp_path):
    # a library ValueError about `n` / `overwrite=True` / `out_dir` comes out with the flags as typed
    code, _, err = run(capsys, "eval", str(w / "run"), "--data", str(w / "data_kept"), "--seq-len", "16",
                       "--n-seqs", "100000")
    bad(code, err, "--n-seqs")
    code, _, err = run(capsys, "data", str(STDLIB / "glob.py"), "--out", str(w / "data_kept"), "--vocab-size", "300")
    line = bad(code, err, "--overwrite")
    assert "overwrite=True" not in line and "out_dir" not in line
    code, _, err = run(capsys, "eval", str(w / "run"), "--data", str(tmp_path))
    bad(code, err, "--data", "run `ttt data` first")


def test_cli_message_mapping():
    names = {"n_seqs": "--n-seqs", "n": "--n-seqs", "overwrite": "--overwrite", "out_dir": "--out",
             "resume": "--resume", "seq_len": "--seq-len"}
    bools = {"overwrite", "resume"}
    assert cli_message("n: room for 4 sequences of seq_len=32; got n=16", names, bools) == \
        "--n-seqs: room for 4 sequences of --seq-len 32; got --n-seqs 16"
    assert cli_message("out_dir: 'x/out_dir' exists; pass overwrite=True", names, bools) == \
        "--out: 'x/out_dir' exists; pass --overwrite"
    assert cli_message("resume=False; pass resume=True", names, bools) == "--no-resume; pass --resume"
    assert cli_message("backend='triton' needs CUDA", names, bools) == "backend='triton' needs CUDA"
    assert cli_message("use another out_dir, not /a/out_dir or 'out_dir'", names, bools) == \
        "use another --out, not /a/out_dir or 'out_dir'"


# ----------------------------------------------------------------------------- section 3: first run on a CPU

def test_eval_uses_what_a_small_split_holds(capsys, w, tmp_path):
    data = tmp_path / "data"  # the dataset with its val split cut to 200 tokens (a small split, quick to evaluate)
    shutil.copytree(w / "data_kept", data)
    held = 200
    (data / "val.bin").write_bytes((data / "val.bin").read_bytes()[:2 * held])
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "val_tokens": held}))
    seq = (held - 1) // 3  # room for 3 sequences, fewer than the default 16
    code, out, err = run(capsys, "eval", str(w / "run"), "--data", str(data), "--seq-len", str(seq),
                         "--out", str(tmp_path / "ev"))
    assert code == 0, err
    assert "evaluating 3 (not 16)" in err
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["n_seqs"] == 3
    code, _, err = run(capsys, "eval", str(w / "run"), "--data", str(data), "--seq-len", str(held + 5))
    bad(code, err, "--seq-len", f"--seq-len {held - 1} or less")


def test_train_on_cpu_with_gpu_defaults_says_so(capsys, w, monkeypatch):
    import ttt.train

    def stop(*a, **k):
        raise ValueError("stopped by the test before training")

    monkeypatch.setattr(ttt.train, "train", stop)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run(capsys, "train", "--data", str(w / "data_kept"), "--out", str(w / "never4"))
    assert code == 2
    assert "note: training on the CPU" in err and "--size tiny" in err and "GPU recipe" in err
    code, _, err = run(capsys, "train", "--data", str(w / "data_kept"), "--out", str(w / "never4"), *TRAIN)
    assert "note: training on the CPU" not in err  # CPU-sized settings: no note


def test_eval_progress_bar_and_plot_legend(capsys, w, tmp_path, monkeypatch):
    import tqdm.std

    from ttt.evaluate import evaluate_checkpoints, write_results

    ticks = []
    real_update = tqdm.std.tqdm.update
    monkeypatch.setattr(tqdm.std.tqdm, "update", lambda self, n=1: ticks.append(n) or real_update(self, n))
    res = evaluate_checkpoints([w / "run"], w / "data_kept", seq_len=16, chunk_len=8, n_seqs=1, progress=True)
    assert "eval run" in capsys.readouterr().err  # the tqdm bar, named after the model
    assert sum(ticks) == 2  # one tick per forward: 1 sequence x 2 chunks
    labels = []
    import matplotlib.axes
    real = matplotlib.axes.Axes.plot

    def spy(self, *a, **k):
        labels.append(k.get("label"))
        return real(self, *a, **k)

    matplotlib.axes.Axes.plot = spy
    try:
        write_results(res, tmp_path / "ev")
    finally:
        matplotlib.axes.Axes.plot = real
    assert labels and "mean NLL over all positions" in labels[0] and "params" in labels[0]


def test_log_lines_do_not_tear_a_progress_bar(capsys):
    """The CLI's log handler writes through tqdm.write: the bar is cleared first, redrawn after."""
    import logging

    from tqdm import tqdm

    from ttt.cli import _TqdmHandler

    log = logging.getLogger("ttt.test_bar")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(_TqdmHandler())
    bar = tqdm(total=3, desc="bar", file=sys.stderr)
    log.info("a log line")
    bar.close()
    err = capsys.readouterr().err
    assert "\ra log line\n" in err  # starts on a cleared line, not glued to the bar


# ----------------------------------------------------------------------------- section 5: options from dataclasses

@pytest.mark.parametrize("command,classes,aliases", [
    ("demo", [DemoOptions], ()), ("data", [DataOptions], ()), ("eval", [EvalOptions], ()),
    ("generate", [GenerateOptions], ()), ("params", [ParamsOptions, ModelConfig], ()),
    ("train", [PresetOptions, ModelConfig, RunOptions, TrainConfig], ("--data", "--out", "--steps"))])
def test_every_option_comes_from_a_dataclass(capsys, command, classes, aliases):
    import dataclasses

    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    text = "".join(out.split())  # argparse wraps lines, at hyphens too
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    flags = {o for a in sub._actions for o in a.option_strings if o.startswith("--") and not o.startswith("--no-")}
    fields = {f for cls in classes for f in dataclasses.fields(cls)
              if not (cls is ModelConfig and f.name in ("mixer", "backbone"))}  # those come from the preset class
    names = {"--" + f.name.replace("_", "-") for f in fields}
    assert flags - {"--help"} == names | set(aliases)  # no hand-written option beside the dataclasses
    for f in fields:
        assert "".join(f.metadata["help"].split()) in text, f.name
