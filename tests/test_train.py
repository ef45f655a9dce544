"""Tests of ttt.train, ttt.checkpoint and ttt.dist: the loss falls, resume continues the exact run
(after SIGINT and after on_step asks to stop), 2-process DDP and FSDP2 (CPU, gloo) match 1 process,
an FSDP2 checkpoint loads in one process, and bad input (corrupt checkpoints, another config or
vocabulary, another run's out_dir, an indivisible tokens_per_step) fails clearly without writing."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from ttt.checkpoint import load_model, read_checkpoint
from ttt.config import EXECUTION_FIELDS, RunOptions, get_config
from ttt.data import prepare
from ttt.train import GRAPHED_MIXERS, TrainConfig, decays, grad_accum_steps, lr_at, resolve_compile_mode, train

WORDS = "the cat sat on a mat and the dog ran to the big red house by a tall green tree".split()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(40):  # a small language: a few words in random order
        (root / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(150)))
    out = tmp_path_factory.mktemp("data")
    prepare(root, out, vocab_size=300, val_docs=4)
    return out


def vocab(data_dir: Path) -> int:
    return json.loads((data_dir / "meta.json").read_text())["vocab_size"]


def model_cfg(data_dir: Path, **kw):
    return get_config("debug", vocab_size=vocab(data_dir), **kw)


def train_cfg(data_dir: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data_dir=str(data_dir), out_dir=str(out), seq_len=16, micro_batch=2, tokens_per_step=64,
                max_steps=6, lr=3e-3, warmup_frac=0.2, eval_every=0, eval_batches=2, save_every=0,
                log_every=1, progress=False)
    return TrainConfig(**{**base, **kw})


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def curve(out: Path) -> list[tuple]:
    """Everything in the metrics that is deterministic (tokens_per_s is a timing), in file order."""
    return [(r["step"], r["tokens"], r["loss"], r["lr"], r["grad_norm"], r.get("val_loss")) for r in rows(out)]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory) -> Path:
    """A complete 2-step run; tests that change it work on a copy."""
    out = tmp_path_factory.mktemp("runs") / "done"
    train(model_cfg(data_dir), train_cfg(data_dir, out, max_steps=2))
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# ----------------------------------------------------------------------------- the loop

def test_loss_falls_and_outputs(data_dir, tmp_path):
    out = tmp_path / "run"
    s = train(model_cfg(data_dir), train_cfg(data_dir, out, max_steps=20, log_every=5, eval_every=10))
    r = rows(out)
    assert [x["step"] for x in r] == [5, 10, 15, 20]
    assert r[-1]["loss"] < r[0]["loss"] - 0.8, [x["loss"] for x in r]
    assert s["steps"] == 20 and s["tokens"] == 20 * 64 and s["stopped"] is None and s["tokens_per_s"] > 0
    assert s["train_loss"] == r[-1]["loss"] and s["val_loss"] == r[-1]["val_loss"] < r[1]["val_loss"]
    assert "val_loss" not in r[0] and r[1]["val_loss"] is not None
    csv = (out / "metrics.csv").read_text().splitlines()
    assert csv[0] == "step,tokens,loss,lr,tokens_per_s,grad_norm,val_loss"
    assert len(csv) == 5 and float(csv[-1].split(",")[2]) == r[-1]["loss"] and csv[1].endswith(",")
    assert r[-1]["lr"] == pytest.approx(1e-5)  # the cosine ends at min_lr
    # the checkpoint: tied weights stored once, every optimizer tensor, run config, trainer state
    ck = Path(s["checkpoint"])
    assert ck == out / "checkpoints" / "step_000020"
    assert json.loads((out / "latest.json").read_text())["step"] == 20
    weights = load_file(str(ck / "model.safetensors"))
    assert "embed.weight" in weights and not any(k.startswith("head") for k in weights)
    model, cfg = load_model(out)
    assert cfg == model_cfg(data_dir)
    assert set(weights) == set(model.state_dict())
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    opt = load_file(str(ck / "optimizer.safetensors"))
    assert {f"{n}/{k}" for n in weights for k in ("step", "exp_avg", "exp_avg_sq")} == set(opt)
    trainer = json.loads((ck / "trainer.json").read_text())
    assert trainer["step"] == 20 and trainer["batcher"]["step"] == 20 and "torch" in trainer["rng"]
    config = json.loads((ck / "config.json").read_text())
    assert config["vocab_size"] == vocab(data_dir) and config["model"]["d_model"] == 64


def test_schedule_and_weight_decay_groups(data_dir):
    cfg = train_cfg(data_dir, "unused", max_steps=100, warmup_frac=0.1, lr=1e-3, min_lr=1e-5)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-5) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    from ttt.model import TTTLM
    for mixer in ("ttt_linear", "ttt_mlp", "mamba"):
        named = dict(TTTLM(model_cfg(Path(data_dir), mixer=mixer)).named_parameters())
        decayed = {n for n, p in named.items() if decays(n, p)}
        assert "embed.weight" in decayed
        assert all(named[n].ndim >= 2 for n in decayed)
        for n in named:
            if n.endswith(("norm.weight", "bias", ".delta", ".ln_weight", ".ln_bias", ".b1", ".b2", "A_log")):
                assert n not in decayed, n
            if n.endswith((".W1", ".W2", "proj.weight", ".lr_weight")):
                assert n in decayed, n


def test_resume_continues_the_exact_run(data_dir, tmp_path):
    cfg = dict(max_steps=6, eval_every=2, save_every=0)
    straight = tmp_path / "straight"
    train(model_cfg(data_dir), train_cfg(data_dir, straight, **cfg))

    out = tmp_path / "interrupted"
    before = signal.getsignal(signal.SIGINT)

    def sigint_at_2(step, metrics):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: the step ends, a checkpoint is written

    s1 = train(model_cfg(data_dir), train_cfg(data_dir, out, **cfg), on_step=sigint_at_2)
    assert s1["stopped"] == "SIGINT" and s1["steps"] == 2
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    assert Path(s1["checkpoint"]).name == "step_000002"
    assert json.loads((out / "latest.json").read_text())["step"] == 2
    assert [r["step"] for r in rows(out)] == [1, 2]

    def crash_at_4(step, metrics):
        if step == 4:
            raise RuntimeError("simulated crash")  # after the checkpoint of step 3: no checkpoint now

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(model_cfg(data_dir), train_cfg(data_dir, out, **{**cfg, "save_every": 3}), on_step=crash_at_4)
    assert json.loads((out / "latest.json").read_text())["step"] == 3
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4]
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "los')  # a row cut short by the crash
    s2 = train(model_cfg(data_dir), train_cfg(data_dir, out, **cfg), on_step=lambda step, m: step == 5)
    assert s2["stopped"] == "on_step" and s2["steps"] == 5 and s2["resumed_from"] == 3
    s3 = train(model_cfg(data_dir), train_cfg(data_dir, out, **cfg))
    assert s3["stopped"] is None and s3["steps"] == 6 and s3["resumed_from"] == 5
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000005", "step_000006"]  # keep 2

    assert curve(out) == curve(straight)  # bitwise: same batches, optimizer and scheduler state
    a = load_file(str(straight / "checkpoints/step_000006/model.safetensors"))
    b = load_file(str(out / "checkpoints/step_000006/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "metrics.csv").read_text().count("\n") == 7
    # a finished run resumes to nothing
    s4 = train(model_cfg(data_dir), train_cfg(data_dir, out, **cfg))
    assert s4["steps"] == 6 and s4["train_loss"] == rows(out)[-1]["loss"] and curve(out) == curve(straight)


def test_sigterm_saves_and_stops(data_dir, tmp_path):
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    s = train(model_cfg(data_dir), train_cfg(data_dir, out, max_steps=3),
              on_step=lambda step, m: os.kill(os.getpid(), signal.SIGTERM))
    assert s["stopped"] == "SIGTERM" and s["steps"] == 1 and Path(s["checkpoint"]).name == "step_000001"
    assert signal.getsignal(signal.SIGTERM) is before
    assert read_checkpoint(out).trainer["step"] == 1


# ----------------------------------------------------------------------------- 2 processes (gloo)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, m_cfg, t_cfg, results):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    s = train(m_cfg, t_cfg)
    results.put((rank, s))


def run_2_procs(m_cfg, t_cfg, timeout=150) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    procs = mp.spawn(_worker, args=(2, _free_port(), m_cfg, t_cfg, results), nprocs=2, join=False)
    deadline = time.monotonic() + timeout
    try:
        while not procs.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"2-process training did not finish in {timeout}s")
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
    got = dict(results.get() for _ in range(2))
    return got


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(data_dir, tmp_path, parallel):
    """The model is built on the meta device, sharded (fsdp) or not, materialised and initialised on each
    rank: the same init, gradients, loss curve and weights as one process."""
    # global batch: 4 windows of 16 tokens; 1 process: 2 micro-batches of 2; 2 processes: 2 of 1 each
    one = tmp_path / "one"
    single = train(model_cfg(data_dir), train_cfg(data_dir, one, max_steps=2, lr=1e-3))
    two = tmp_path / "two"
    got = run_2_procs(model_cfg(data_dir), train_cfg(data_dir, two, max_steps=2, lr=1e-3, micro_batch=1,
                                                      parallel=parallel))
    assert got[0]["train_loss"] == got[1]["train_loss"]
    assert got[0]["train_loss"] == pytest.approx(single["train_loss"], abs=1e-5)
    for r1, r2 in zip(rows(one), rows(two), strict=True):  # the loss curve
        assert r2["loss"] == pytest.approx(r1["loss"], abs=1e-5)
        assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-4)
    ck1, ck2 = one / "checkpoints/step_000002", two / "checkpoints/step_000002"
    # the optimizer state (moments of the gradients)
    o1, o2 = load_file(str(ck1 / "optimizer.safetensors")), load_file(str(ck2 / "optimizer.safetensors"))
    assert set(o1) == set(o2)
    for k in o1:
        torch.testing.assert_close(o2[k], o1[k], atol=1e-6, rtol=1e-4, msg=k)
    # parameters after the step (Adam's first step is ~lr * sign(g), so allow a part of lr)
    w1, w2 = load_file(str(ck1 / "model.safetensors")), load_file(str(ck2 / "model.safetensors"))
    assert set(w1) == set(w2)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=0, msg=k)
    # the checkpoint written by 2 ranks loads in 1 process, and 1 process resumes it
    model, _ = load_model(two)
    assert all(torch.equal(v, w2[k]) for k, v in model.state_dict().items())
    s = train(model_cfg(data_dir), train_cfg(data_dir, two, max_steps=2, lr=1e-3, parallel=parallel))
    assert s["steps"] == 2 and s["resumed_from"] == 2


# ----------------------------------------------------------------------------- bad input

def test_tokens_per_step_must_divide(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"tokens_per_step: expected a multiple of .* = 32, got 48"):
        train(model_cfg(data_dir), train_cfg(data_dir, tmp_path / "run", tokens_per_step=48))
    assert not (tmp_path / "run").exists()
    assert grad_accum_steps(train_cfg(data_dir, "x", tokens_per_step=128), 2) == 2
    with pytest.raises(ValueError, match="micro_batch"):
        train(model_cfg(data_dir), train_cfg(data_dir, tmp_path / "run", micro_batch=0))


def test_vocab_must_match_data(data_dir, tmp_path):
    with pytest.raises(ValueError, match=rf"vocab_size.*{vocab(data_dir) + 1}.*tokenizer"):
        train(get_config("debug", vocab_size=vocab(data_dir) + 1), train_cfg(data_dir, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change", [
    dict(model=dict(d_model=32)),
    dict(train=dict(lr=1e-3)),
    dict(train=dict(warmup_frac=0.5)),
    dict(train=dict(resume=False)),
])
def test_out_dir_of_another_run_is_left_alone(data_dir, finished_run, tmp_path, change):
    out = copy_run(finished_run, tmp_path)
    before = snapshot(out)
    m = model_cfg(data_dir, **change.get("model", {}))
    t = replace(train_cfg(data_dir, out, max_steps=2), **change.get("train", {}))
    msg = "resume=False" if "resume" in change.get("train", {}) else "another run"
    with pytest.raises(ValueError, match=msg):
        train(m, t)
    assert snapshot(out) == before


def test_foreign_files_in_out_dir(data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("not ours\n")
    with pytest.raises(ValueError, match="no config.json"):
        train(model_cfg(data_dir), train_cfg(data_dir, out))
    assert (out / "metrics.jsonl").read_text() == "not ours\n"


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[:-100])


def _garble_middle(p: Path):
    b = bytearray(p.read_bytes())
    b[-50] ^= 0xFF  # a data byte: only the recorded sha256 can tell
    p.write_bytes(bytes(b))


def _garble_header(p: Path):
    p.write_bytes(b"\x07" * 8 + p.read_bytes()[8:])


def _bad_json(p: Path):
    p.write_text(p.read_text()[:-10])


@pytest.mark.parametrize("name,spoil,msg", [
    ("model.safetensors", _truncate, "corrupt safetensors"),
    ("model.safetensors", _garble_header, "corrupt safetensors"),
    ("model.safetensors", _garble_middle, "sha256"),
    ("optimizer.safetensors", _truncate, "corrupt safetensors"),
    ("optimizer.safetensors", _garble_middle, "sha256"),
    ("trainer.json", _bad_json, "corrupt JSON"),
    ("config.json", _bad_json, "corrupt JSON"),
    ("model.safetensors", Path.unlink, "missing"),
])
def test_corrupt_checkpoint(data_dir, finished_run, tmp_path, name, spoil, msg):
    out = copy_run(finished_run, tmp_path)
    bad = out / "checkpoints/step_000002" / name
    spoil(bad)
    with pytest.raises(ValueError, match=msg) as e:
        train(model_cfg(data_dir), train_cfg(data_dir, out, max_steps=2))
    assert name in str(e.value)
    if name != "optimizer.safetensors":
        with pytest.raises(ValueError, match=msg):
            load_model(out)


def test_checkpoint_of_another_config_or_vocab(data_dir, finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    cfg_path = out / "checkpoints/step_000002/config.json"
    good = json.loads(cfg_path.read_text())
    for key, value, named in (("model", {**good["model"], "n_layers": 3}, "model.n_layers"),
                              ("vocab_size", good["vocab_size"] + 7, "vocab_size")):
        cfg_path.write_text(json.dumps({**good, key: value}))
        with pytest.raises(ValueError, match=rf"step_000002/config.json.*{named}"):
            train(model_cfg(data_dir), train_cfg(data_dir, out, max_steps=2))
    # weights that do not fit the config they come with
    cfg_path.write_text(json.dumps({**good, "model": {**good["model"], "d_model": 32}}))
    with pytest.raises(ValueError, match="model.safetensors: weights do not fit"):
        load_model(out)


def test_checkpoints_hold_no_execution_options(data_dir, finished_run, tmp_path):
    """How a run ran (RunOptions) is not saved; an older run whose config.json holds the execution options as model
    fields still loads (they are ignored) and resumes with other ones."""
    out = copy_run(finished_run, tmp_path)
    for cfg_path in (out / "config.json", out / "checkpoints/step_000002/config.json"):
        saved = json.loads(cfg_path.read_text())
        assert not set(saved["model"]) & set(EXECUTION_FIELDS)
        old = {**saved["model"], "ttt_backend": "naive", "fused_layer": True, "mamba_backend": "torch"}
        cfg_path.write_text(json.dumps({**saved, "model": old}))  # as runs written before RunOptions
    model, cfg = load_model(out)
    assert cfg == model_cfg(data_dir) and model.run_options == RunOptions()
    assert model.blocks[0].mixer.backend == "auto" and model.blocks[0].mixer.fused is None  # the default: auto
    s = train(model_cfg(data_dir), train_cfg(data_dir, out, max_steps=2), run=RunOptions(ttt_backend="naive"))
    assert s["resumed_from"] == 2 and s["steps"] == 2  # the same run (finished): the old fields did not count


def test_tensorboard_missing_is_a_clear_error(data_dir, tmp_path):
    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed")
    with pytest.raises(ImportError, match="pip install tensorboard"):
        train(model_cfg(data_dir), train_cfg(data_dir, tmp_path / "run", tensorboard=True))
    assert not (tmp_path / "run").exists()


def test_read_checkpoint_round_trip(finished_run):
    ck = read_checkpoint(finished_run)
    assert ck.path.name == "step_000002" and ck.trainer["step"] == 2
    groups = ck.optim_state["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and groups[0]["betas"] == (0.9, 0.95)
    assert set(ck.optim_state["state"]) == set(ck.model_state)


def test_grad_checkpointing_in_the_loop_gives_the_same_curve(data_dir, tmp_path):
    train(model_cfg(data_dir), train_cfg(data_dir, tmp_path / "plain", max_steps=3))
    train(model_cfg(data_dir), train_cfg(data_dir, tmp_path / "ckpt", max_steps=3, grad_checkpointing=True))
    for a, b in zip(curve(tmp_path / "plain"), curve(tmp_path / "ckpt")):
        assert a[:2] == b[:2]
        assert a[2:5] == pytest.approx(b[2:5], rel=1e-5)


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(data_dir, tmp_path):
    """torch.compile of each block (inductor on the CPU: about a minute) follows the eager loss curve."""
    train(model_cfg(data_dir), train_cfg(data_dir, tmp_path / "eager", max_steps=2))
    train(model_cfg(data_dir), train_cfg(data_dir, tmp_path / "compiled", max_steps=2, compile=True))
    for a, b in zip(curve(tmp_path / "eager"), curve(tmp_path / "compiled")):
        assert a[2] == pytest.approx(b[2], rel=1e-4)


def test_inner_lr_ramp_for_ttt_mlp(data_dir, tmp_path):
    """TTT-MLP's inner base_lr ramps from 0.01 to base_lr over the warm-up (docs/math.md §3)."""
    from ttt.train import inner_lr_scale_at
    cfg = train_cfg(data_dir, tmp_path / "x", max_steps=10, warmup_frac=0.4)  # 4 warm-up steps
    assert [inner_lr_scale_at(s, cfg, 0.1) * 0.1 for s in range(6)] == pytest.approx(
        [0.01, 0.0325, 0.055, 0.0775, 0.1, 0.1])
    assert inner_lr_scale_at(0, replace(cfg, inner_lr_warmup=False), 0.1) == 1.0
    # the ramp reaches the model: the first step's loss differs from a run without it; TTT-Linear is untouched
    mlp = model_cfg(data_dir, mixer="ttt_mlp")
    train(mlp, train_cfg(data_dir, tmp_path / "ramp", max_steps=4, warmup_frac=0.5))
    train(mlp, train_cfg(data_dir, tmp_path / "flat", max_steps=4, warmup_frac=0.5, inner_lr_warmup=False))
    assert curve(tmp_path / "ramp")[0][2] != curve(tmp_path / "flat")[0][2]
    lin = model_cfg(data_dir)
    train(lin, train_cfg(data_dir, tmp_path / "lin_ramp", max_steps=4, warmup_frac=0.5))
    train(lin, train_cfg(data_dir, tmp_path / "lin_flat", max_steps=4, warmup_frac=0.5, inner_lr_warmup=False))
    assert curve(tmp_path / "lin_ramp") == curve(tmp_path / "lin_flat")


# ----------------------------------------------------------------------------- survive (issue 12)

def test_sigint_between_micro_batches(data_dir, tmp_path):
    """Ctrl-C in the middle of a step (4 micro-batches): no more forwards, the last whole step is saved, and
    resuming gives the uninterrupted run's curve."""
    from ttt.model import TTTLM
    cfg = dict(max_steps=3, micro_batch=1)  # 64 tokens / (1 * 16): 4 micro-batches per step
    train(model_cfg(data_dir), train_cfg(data_dir, tmp_path / "straight", **cfg))
    calls = []

    def count(module, args):
        if isinstance(module, TTTLM):
            calls.append(1)
            if len(calls) == 6:  # step 2's second micro-batch
                os.kill(os.getpid(), signal.SIGINT)
    out = tmp_path / "run"
    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        s = train(model_cfg(data_dir), train_cfg(data_dir, out, **cfg))
    finally:
        handle.remove()
    assert len(calls) == 6 and s["stopped"] == "SIGINT" and s["steps"] == 1
    assert Path(s["checkpoint"]).name == "step_000001" and read_checkpoint(out).trainer["batcher"]["step"] == 1
    s2 = train(model_cfg(data_dir), train_cfg(data_dir, out, **cfg))
    assert s2["resumed_from"] == 1 and s2["steps"] == 3
    assert curve(out) == curve(tmp_path / "straight")


def test_latest_json_missing_resumes_from_newest_valid_checkpoint(data_dir, tmp_path):
    cfg = dict(max_steps=4, save_every=1, keep_checkpoints=0)
    train(model_cfg(data_dir), train_cfg(data_dir, tmp_path / "straight", **cfg))
    out = tmp_path / "run"
    train(model_cfg(data_dir), train_cfg(data_dir, out, **cfg), on_step=lambda step, m: step == 3)
    (out / "latest.json").unlink()
    _garble_middle(out / "checkpoints/step_000003/model.safetensors")  # the newest is damaged: step 2 it is
    s = train(model_cfg(data_dir), train_cfg(data_dir, out, **cfg))
    assert s["resumed_from"] == 2 and s["steps"] == 4
    assert curve(out) == curve(tmp_path / "straight")  # the history up to step 2 was kept, then continued


def test_a_start_without_checkpoint_is_set_aside_and_none_valid_is_refused(data_dir, finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    (out / "latest.json").unlink()
    shutil.rmtree(out / "checkpoints")  # as a start killed before its first checkpoint leaves it
    before = {k: v[1] for k, v in snapshot(out).items()}
    s = train(model_cfg(data_dir), train_cfg(data_dir, out, max_steps=2, lr=1e-3))  # another run: no refusal
    assert s["steps"] == 2 and s["resumed_from"] is None and [r["step"] for r in rows(out)] == [1, 2]
    aside = list((out / "failed_starts").iterdir())
    assert len(aside) == 1 and {k: v[1] for k, v in snapshot(aside[0]).items()} == before  # nothing deleted
    shutil.rmtree(out)
    shutil.copytree(finished_run, out)
    for p in (out / "checkpoints").iterdir():
        _truncate(p / "model.safetensors")
    (out / "latest.json").unlink()
    with pytest.raises(ValueError, match="none of its checkpoints .* reads back whole"):
        train(model_cfg(data_dir), train_cfg(data_dir, out, max_steps=2))


def test_nan_loss_is_one_clear_error_and_the_rerun_works(data_dir, tmp_path, capsys):
    from ttt.cli import main
    from ttt.train import TrainingDiverged
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"training diverged: the loss is nan at step \d+ .*lower lr"):
        train(model_cfg(data_dir), train_cfg(data_dir, out, lr=1e6, max_steps=6))
    assert not out.exists()  # nothing left to block the rerun
    train(model_cfg(data_dir), train_cfg(data_dir, out, max_steps=1))  # the corrected rerun
    # through the CLI: one line, exit status 2
    args = ["train", "--data", str(data_dir), "--out", str(tmp_path / "cli"), "--size", "debug", "--seq-len", "16",
            "--micro-batch", "2", "--tokens-per-step", "64", "--max-steps", "6", "--lr", "1e6", "--eval-every", "0",
            "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ttt train: error: training diverged") and "Traceback" not in "".join(err)
    assert not (tmp_path / "cli").exists()
    # diverging after a checkpoint keeps the run, and says where it stands
    out2 = tmp_path / "later"
    with pytest.raises(TrainingDiverged, match=r"last checkpoint is .*step_00000\d.*another out_dir"):
        train(model_cfg(data_dir), train_cfg(data_dir, out2, max_steps=6, lr=1e6, save_every=1))
    ck = read_checkpoint(out2)  # never a checkpoint of non-finite weights
    assert (out2 / "config.json").exists() and all(v.isfinite().all() for v in ck.model_state.values())


def test_meta_build_gives_the_one_process_init(data_dir):
    """build_model (meta device, materialise, init_weights) equals TTTLM(cfg) after the same seed."""
    from ttt.model import TTTLM
    from ttt.train import build_model
    cfg = model_cfg(data_dir, mixer="ttt_mlp")
    t = train_cfg(data_dir, "unused", seed=3)
    model, wrapped = build_model(cfg, t, torch.device("cpu"), "none")
    assert wrapped is model and not any(p.is_meta for p in model.parameters())
    torch.manual_seed(3)
    ref = TTTLM(cfg)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    assert all(float(m.inner_lr_scale) == 1.0 for m in model.modules() if hasattr(m, "inner_lr_scale"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_loop_follows_the_cpu_loop(data_dir, tmp_path):
    """On a GPU: the meta-device build gives the CPU's initial weights exactly, and the loop (fused AdamW,
    pinned batches, loss read back only on metrics rows) follows the CPU loss curve (fp32, no autocast)."""
    from ttt.train import build_model
    cfg, t = model_cfg(data_dir), train_cfg(data_dir, "unused")
    cpu, _ = build_model(cfg, t, torch.device("cpu"), "none")
    gpu, _ = build_model(cfg, t, torch.device("cuda"), "none")
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu.state_dict().values(), gpu.state_dict().values()))
    kw = dict(max_steps=6, log_every=3, amp="none")
    train(cfg, train_cfg(data_dir, tmp_path / "cpu", device="cpu", **kw))
    s = train(cfg, train_cfg(data_dir, tmp_path / "gpu", device="cuda", **kw))
    assert s["steps"] == 6 and [r["step"] for r in rows(tmp_path / "gpu")] == [3, 6]
    for a, b in zip(curve(tmp_path / "cpu"), curve(tmp_path / "gpu"), strict=True):
        assert a[:2] == b[:2] and b[2] == pytest.approx(a[2], rel=2e-3)


def test_compile_mode_reduce_overhead_is_refused_where_it_cannot_run(data_dir, tmp_path):
    """compile_mode reduce-overhead (CUDA graphs of the blocks) needs compile, one process on CUDA, windows of the
    data and no gradient checkpointing: anything else is a one-line error naming the field, before any training."""
    ok = dict(compile=True, compile_mode="reduce-overhead")
    for kw, why in ((dict(compile=False), "needs compile"), (dict(pack_documents=True), "pack_documents"),
                    (dict(grad_checkpointing=True), "grad_checkpointing"), (dict(device="cpu"), "needs CUDA"),
                    (dict(parallel="ddp"), "one process"), (dict(compile_mode="max-autotune"), "expected one of")):
        with pytest.raises(ValueError, match="^compile_mode: ") as e:
            train_cfg(data_dir, tmp_path / "x", **{**ok, **kw}).validate()
        assert why in str(e.value)
    if not torch.cuda.is_available():  # device auto on a machine without CUDA: refused when the device is known
        with pytest.raises(ValueError, match="^compile_mode: reduce-overhead runs in one process on CUDA"):
            train(model_cfg(data_dir), train_cfg(data_dir, tmp_path / "auto", **ok))
        assert not (tmp_path / "auto" / "metrics.jsonl").exists()


def test_compile_mode_auto_takes_graphs_where_they_run_for_the_measured_mixers(data_dir, tmp_path):
    """compile_mode auto (the default) resolves to reduce-overhead with compile, one process on CUDA, windows of the
    data, no gradient checkpointing and a mixer of GRAPHED_MIXERS; to default otherwise. An explicit mode is kept."""
    assert TrainConfig.__dataclass_fields__["compile_mode"].default == "auto"
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    ok = dict(compile=True)
    for mixer in GRAPHED_MIXERS:
        assert resolve_compile_mode(train_cfg(data_dir, tmp_path, **ok), mixer, "none", cuda) == "reduce-overhead"
    for kw, mixer, parallel, device in ((dict(compile=False), "ttt_linear", "none", cuda),
                                        (dict(pack_documents=True), "ttt_linear", "none", cuda),
                                        (dict(grad_checkpointing=True), "attention", "none", cuda),
                                        ({}, "ttt_linear", "ddp", cuda), ({}, "ttt_linear", "fsdp", cuda),
                                        ({}, "ttt_linear", "none", cpu), ({}, "ttt_mlp", "none", cuda),
                                        ({}, "mamba", "none", cuda), (dict(compile_mode="default"), "ttt_linear",
                                                                      "none", cuda)):
        assert resolve_compile_mode(train_cfg(data_dir, tmp_path, **{**ok, **kw}), mixer, parallel, device) == \
            "default", (kw, mixer, parallel, device)
    explicit = train_cfg(data_dir, tmp_path, compile=True, compile_mode="reduce-overhead")
    assert resolve_compile_mode(explicit, "ttt_mlp", "none", cuda) == "reduce-overhead"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mixer,tokens_per_step", [("ttt_linear", 128), ("ttt_linear", 32), ("attention", 32),
                                                   ("ttt_mlp", 32), ("mamba", 32)])
def test_gpu_compile_mode_auto_replays_graphs_that_follow_default_compile(data_dir, tmp_path, mixer, tokens_per_step,
                                                                           caplog):
    """On a GPU: `--compile` alone (compile_mode auto) replays the blocks as CUDA graphs for TTT-Linear and
    Transformer++ models, and the graphs' run (four micro-batches per step with gradients in buffers of their own,
    or one that adopts the backward graphs' outputs; and a validation) follows compile_mode default's losses,
    gradient norms and validation loss. TTT-MLP and Mamba-2 (not in auto's mixers) the same when reduce-overhead is
    asked for."""
    kw = dict(max_steps=4, log_every=1, amp="none", compile=True, tokens_per_step=tokens_per_step, eval_every=2,
              device="cuda")
    train(model_cfg(data_dir, mixer=mixer), train_cfg(data_dir, tmp_path / "default", compile_mode="default", **kw))
    # (imported here: importing it imports Triton, which the Triton tests must import first, with TRITON_INTERPRET set
    # on a CPU)
    from torch._dynamo.utils import counters

    asked = {} if mixer in GRAPHED_MIXERS else dict(compile_mode="reduce-overhead")
    skips = counters["inductor"]["cudagraph_skips"]
    with caplog.at_level("INFO", logger="ttt.train"):
        train(model_cfg(data_dir, mixer=mixer), train_cfg(data_dir, tmp_path / "graphs", **asked, **kw))
    assert "compiling the blocks with torch.compile's reduce-overhead mode" in caplog.text
    # every compiled graph replays as a CUDA graph: Inductor declined none (it would run them without graphs, and
    # the comparison below would hold without testing any)
    assert counters["inductor"]["cudagraph_skips"] == skips, [m for m in caplog.messages if "cudagraph" in m.lower()]
    for a, b in zip(curve(tmp_path / "default"), curve(tmp_path / "graphs"), strict=True):
        assert a[:2] == b[:2] and b[2:5] == pytest.approx(a[2:5], rel=1e-4)
        assert (a[5] is None) == (b[5] is None) and (a[5] is None or b[5] == pytest.approx(a[5], rel=1e-4))


def test_losses_read_back_only_for_rows_follow_the_same_run(data_dir, tmp_path):
    """Steps between metrics rows leave the loss on the device: the rows are those of a run that reads
    every step, a NaN on such a step is reported at that step, and Ctrl-C there still stops and saves."""
    every = tmp_path / "every"
    train(model_cfg(data_dir), train_cfg(data_dir, every, max_steps=6, log_every=1))
    out = tmp_path / "sparse"
    s = train(model_cfg(data_dir), train_cfg(data_dir, out, max_steps=6, log_every=3))
    assert [r["step"] for r in rows(out)] == [3, 6] and s["train_loss"] == rows(every)[-1]["loss"]
    assert [c for c in curve(every) if c[0] in (3, 6)] == curve(out)
    from ttt.train import TrainingDiverged
    with pytest.raises(TrainingDiverged) as e:  # the first non-finite step, not the next row's
        train(model_cfg(data_dir), train_cfg(data_dir, tmp_path / "nan", lr=1e6, max_steps=12, log_every=12))
    step = int(str(e.value).split(" at step ")[1].split()[0])
    assert step < 12
    from ttt.model import TTTLM
    calls = []

    def sigint_in_step_2(module, args):
        if isinstance(module, TTTLM):
            calls.append(1)
            if len(calls) == 4:  # step 2's last micro-batch (of 2): step 2 ends, then the stop (no row due)
                os.kill(os.getpid(), signal.SIGINT)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(sigint_in_step_2)
    try:
        s = train(model_cfg(data_dir), train_cfg(data_dir, tmp_path / "stop", max_steps=6, log_every=5))
    finally:
        handle.remove()
    assert s["stopped"] == "SIGINT" and s["steps"] == 2 and s["train_loss"] == rows(every)[1]["loss"]
    assert read_checkpoint(tmp_path / "stop").trainer["step"] == 2


def test_profile_steps_write_a_trace_of_the_window(data_dir, tmp_path, caplog):
    out = tmp_path / "run"
    curve_plain = tmp_path / "plain"
    train(model_cfg(data_dir), train_cfg(data_dir, curve_plain, max_steps=5, log_every=2))
    train(model_cfg(data_dir), train_cfg(data_dir, out, max_steps=5, log_every=2, profile_steps=2))
    trace = json.loads((out / "profile" / "trace_rank0.json").read_text())
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep")}
    ops = {e["name"] for e in trace["traceEvents"] if e.get("cat") == "cpu_op"}
    assert not steps and {"aten::mm", "aten::embedding_backward"} <= ops, sorted(ops)[:20]
    table = (out / "profile" / "kernels_rank0.txt").read_text()
    assert table.startswith("steps 2..3 (rank 0)") and "aten::" in table
    assert not list((out / "profile").glob("*.tmp"))
    assert curve(out) == curve(curve_plain)  # profiling changes no number of the run
    # a window past the end of the run: a warning, no trace, the run itself unchanged
    late = tmp_path / "late"
    with caplog.at_level("WARNING"):
        train(model_cfg(data_dir), train_cfg(data_dir, late, max_steps=2, log_every=2, profile_steps=1))
    assert "no trace written" in caplog.text and not (late / "profile").exists()


def test_own_grads_gives_missing_gradients_zero_buffers_and_keeps_the_rest():
    """compile_mode reduce-overhead's guard against adopted graph outputs (`ttt.train.own_grads`), for steps of
    several micro-batches: a parameter without a gradient gets zeros of its own, an existing gradient stays the same
    tensor, a frozen parameter gets none. With one micro-batch a step it gives none (its backward adopts the outputs)."""
    from ttt.train import own_grads
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    m[1].bias.requires_grad_(False)
    own_grads(m, 1)
    assert all(p.grad is None for p in m.parameters())
    kept = m[0].weight.grad = torch.ones_like(m[0].weight)
    own_grads(m, 2)
    assert m[0].weight.grad is kept and m[1].bias.grad is None
    for p in (m[0].bias, m[1].weight):
        assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any()
        assert p.grad.data_ptr() != p.data_ptr()
