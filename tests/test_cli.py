"""The `ttt` command line, in-process through `ttt.cli.main([...])`: every subcommand at the debug size,
`--help` listing every option (every ModelConfig / TrainConfig field included), `ttt demo --quick`
end to end, and bad input exiting with 2 and one clear line on stderr."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import shutil
import sysconfig
from pathlib import Path

import pytest

from ttt.cli import build_parser, main
from ttt.config import ModelConfig
from ttt.train import TrainConfig

SUBCOMMANDS = ("demo", "data", "train", "eval", "generate", "params")
TRAIN = ["--size", "debug", "--d-model", "32", "--n-heads", "2", "--seq-len", "32", "--micro-batch", "4",
         "--tokens-per-step", "128", "--steps", "4", "--eval-every", "2", "--eval-batches", "1", "--no-progress",
         "--device", "cpu"]


def run(capsys, *argv):
    """(exit code, stdout, stderr) of `ttt argv`."""
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse: --help, usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_bad_input(code, err, *words):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("ttt ") and "error:" in lines[0]
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A small corpus, its prepared dataset and one trained debug run, shared by the tests below."""
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "string.py", "bisect.py", "heapq.py", "fnmatch.py", "glob.py"):
        shutil.copyfile(stdlib / name, corpus / name)
    assert main(["-q", "data", str(corpus), "--out", str(root / "data"), "--vocab-size", "300",
                 "--val-fraction", "0.3"]) == 0
    assert main(["-q", "train", "--data", str(root / "data"), "--out", str(root / "run"), *TRAIN]) == 0
    return root


def test_params_table_and_one_preset(capsys):
    code, out, _ = run(capsys, "params", "--mixer", "attention")  # the table of every size (the full one
    assert code == 0                                                 # adds the other mixers: slower, same code)
    for size in ("debug", "tiny", "125m", "350m", "760m", "1.3b"):
        assert any(line.split()[:2] == [size, "attention"] for line in out.splitlines()), size
    code, out, _ = run(capsys, "params", "--size", "125m", "--mixer", "ttt_linear", "--backbone", "mamba")
    assert code == 0
    row = [line for line in out.splitlines() if line.startswith("125m")]
    assert len(row) == 1 and "110.42M" in row[0]
    code, out, _ = run(capsys, "params", "--size", "debug", "--mixer", "attention", "--vocab-size", "100")
    assert code == 0 and "vocab_size 100" in out


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_lists_every_option(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    text = " ".join(out.split())
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        for flag in action.option_strings:
            assert flag in out, f"{command} --help lacks {flag}"
        if action.option_strings or action.dest != "help":
            assert action.help and len(action.help) > 10, f"{command}: {action.dest} has no help"
    fields = {"train": [ModelConfig, TrainConfig], "params": [ModelConfig]}.get(command, [])
    for cls in fields:
        for f in dataclasses.fields(cls):
            if f.name in ("mixer", "backbone"):  # the --mixer / --backbone choices, with their own help
                continue
            assert "--" + f.name.replace("_", "-") in out, f"{command} --help lacks the field {f.name}"
            assert " ".join(f.metadata["help"].split()) in text, f"{command} --help lacks the help of {f.name}"


def test_train_eval_generate(capsys, workdir):
    run_dir, data = workdir / "run", workdir / "data"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 4
    code, out, err = run(capsys, "-q", "eval", str(run_dir), str(run_dir), "--data", str(data), "--seq-len", "48",
                         "--chunk-len", "16", "--n-seqs", "2", "--buckets", "4", "--out", str(workdir / "ev"),
                         "--train-len", "32")
    assert code == 0, err
    assert "all (ppl)" in out
    res = json.loads((workdir / "ev" / "eval.json").read_text())
    assert len(res["models"]) == 2 and len(res["models"][0]["per_position"]) == 48
    assert res["models"][0]["nll"] == pytest.approx(res["models"][1]["nll"])
    assert res["models"][0]["train_len"] == 32 and res["models"][1]["name"] != res["models"][0]["name"]
    assert (workdir / "ev" / "eval.png").read_bytes()[:4] == b"\x89PNG"
    code, out, err = run(capsys, "-q", "generate", str(run_dir), "--prompt", "def ", "--max-new-tokens", "12",
                         "--seed", "1", "--top-k", "20")
    assert code == 0, err
    assert out.startswith("def ")
    code2, out2, _ = run(capsys, "-q", "generate", str(run_dir), "--prompt", "def ", "--max-new-tokens", "12",
                         "--seed", "1", "--top-k", "20")
    assert out2 == out  # seeded: reproducible


def test_train_interrupted_exits_130(capsys, workdir, tmp_path, monkeypatch):
    """Ctrl-C during `ttt train` (the loop reports stopped="SIGINT" after saving) exits with status 130."""
    import ttt.train as train_mod
    real = train_mod.train

    def interrupted(model_cfg, cfg, on_step=None, **kw):
        def stop(step, row):
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C in the first step
        return real(model_cfg, cfg, on_step=stop, **kw)
    monkeypatch.setattr(train_mod, "train", interrupted)
    code, out, _ = run(capsys, "-q", "train", "--data", str(workdir / "data"), "--out", str(tmp_path / "run"), *TRAIN)
    assert code == 130
    assert (tmp_path / "run" / "latest.json").is_file()


def test_train_refuses_out_dir_of_another_run(capsys, workdir):
    code, _, err = run(capsys, "-q", "train", "--data", str(workdir / "data"), "--out", str(workdir / "run"),
                       *TRAIN, "--lr", "0.001")
    assert_bad_input(code, err, "another run")


def test_missing_and_empty_corpus(capsys, tmp_path):
    code, _, err = run(capsys, "data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "d"))
    assert_bad_input(code, err, "nope.txt", "does not exist")
    (tmp_path / "empty.txt").write_text("")
    code, _, err = run(capsys, "data", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "d"))
    assert_bad_input(code, err, "no non-empty documents")
    assert not (tmp_path / "d").exists()


def test_unreadable_inputs(capsys, tmp_path, workdir):
    code, _, err = run(capsys, "eval", str(tmp_path / "nockpt"), "--data", str(workdir / "data"))
    assert_bad_input(code, err, "nockpt")
    code, _, err = run(capsys, "eval", str(workdir / "run"), "--data", str(tmp_path))
    assert_bad_input(code, err, "meta.json")
    (tmp_path / "prompt.txt").write_bytes(b"\xff\xfe\xfa")
    code, _, err = run(capsys, "generate", str(workdir / "run"), "--prompt-file", str(tmp_path / "prompt.txt"))
    assert_bad_input(code, err, "prompt")


def test_corrupt_checkpoint(capsys, tmp_path, workdir):
    bad = tmp_path / "run"
    shutil.copytree(workdir / "run", bad)
    ckpt = next((bad / "checkpoints").iterdir())
    weights = ckpt / "model.safetensors"
    weights.write_bytes(b"\x00garbage" + weights.read_bytes()[64:])
    for argv in (["eval", str(bad), "--data", str(workdir / "data"), "--seq-len", "16", "--n-seqs", "1"],
                 ["generate", str(bad), "--max-new-tokens", "2"]):
        code, _, err = run(capsys, *argv)
        assert_bad_input(code, err, "model.safetensors", "corrupt")
    (ckpt / "config.json").write_text("{not json")
    code, _, err = run(capsys, "generate", str(ckpt), "--max-new-tokens", "2")
    assert_bad_input(code, err, "config.json", "corrupt")


def test_demo_quick_end_to_end_and_rerun(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the Quickstart as written: `ttt demo --quick`, then `ttt demo`, no --out
    out = tmp_path / "demo_quick"
    code, stdout, err = run(capsys, "demo", "--quick")
    assert code == 0, err
    for f in ("results.md", "results.json", "nll_by_position.png", "eval/eval.csv", "data/meta.json"):
        assert (out / f).is_file(), f
    res = json.loads((out / "results.json").read_text())
    ttt, base = res["models"]["ttt_linear"], res["models"]["transformer"]
    assert abs(ttt["params"] - base["params"]) / ttt["params"] < 0.05
    for r in (ttt, base):
        assert r["last_loss"] < r["first_loss"]  # training made progress
    assert "TTT-Linear (M)" in stdout and "Transformer" in stdout and "sample from" in stdout
    assert (out / "nll_by_position.png").read_bytes()[:4] == b"\x89PNG"
    # a rerun with the same settings reuses the data and the finished runs
    meta_before = (out / "data" / "meta.json").stat().st_mtime_ns
    code, stdout, err = run(capsys, "demo", "--quick", "--out", str(out))  # --out as the default
    assert code == 0, err
    assert "already trained" in stdout and (out / "data" / "meta.json").stat().st_mtime_ns == meta_before
    # other settings in the same out dir are refused, and nothing is touched
    code, _, err = run(capsys, "demo", "--quick", "--steps", "3", "--out", str(out))
    assert_bad_input(code, err, "other settings", "steps")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "demo", "--quick", "--out", str(tmp_path / "other"))
    assert_bad_input(code, err, "demo.json")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    # then `ttt demo` (the real one) is not blocked by the quick one: it gets as far as preparing its corpus
    import ttt.data

    def stop(*a, **k):
        raise ValueError("stopped by the test at the corpus")
    monkeypatch.setattr(ttt.data, "prepare", stop)
    code, _, err = run(capsys, "demo")
    assert_bad_input(code, err, "stopped by the test")
    assert (tmp_path / "demo_out" / "demo.json").is_file() and (out / "results.md").is_file()


def test_usage_errors_exit_2(capsys):
    code, _, err = run(capsys, "params", "--size", "huge")
    assert code == 2 and "invalid choice" in err
    code, _, err = run(capsys, "eval")
    assert code == 2
