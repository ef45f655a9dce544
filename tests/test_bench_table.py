"""benchmarks/bench_table.py's case selection (--mixers, --contexts, --positions) and its bookkeeping: bad values stop
it with exit status 2 and a line naming the flag, before anything is timed; good ones pick the cases of each part;
every row goes to the JSON file as it comes, and a case that raises is recorded and the run goes on."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_model, bench_table


@pytest.mark.parametrize("argv, flag", [(["--mixers", "ttt_linear,gru"], "--mixers"),
                                        (["--contexts", "8k"], "--contexts"),
                                        (["--positions", "1024,x"], "--positions"),
                                        (["--parts", "check,speed"], "--parts")])
def test_bad_selection_exits_2_naming_the_flag(capsys, argv, flag):
    with pytest.raises(SystemExit) as e:
        bench_table.main(argv)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_picked_keeps_the_parts_order_and_only_the_chosen_cases():
    run = bench_table.Run(mixers=["attention", "ttt_linear+fused"])
    assert run.picked(bench_table.TRAIN_MIXERS, "mixers") == ["ttt_linear+fused", "attention"]
    assert run.picked((8192, 2048), "contexts") == [8192, 2048]
    run = bench_table.Run(contexts=[2048])
    assert run.picked((8192, 2048), "contexts") == [2048]
    assert run.picked(bench_table.TRAIN_MIXERS, "mixers") == bench_table.TRAIN_MIXERS
    assert run.picked(bench_table.TRAIN_MIXERS, "mixers", bench_table.TRAIN_EXTRA) == bench_table.TRAIN_MIXERS
    run = bench_table.Run(mixers=["ttt_mlp+fused", "attention"])  # an extra case only when named
    assert run.picked(bench_table.TRAIN_MIXERS, "mixers", bench_table.TRAIN_EXTRA) == ["attention", "ttt_mlp+fused"]


def test_a_run_keeps_every_row_and_a_failing_case_does_not_stop_it(monkeypatch, tmp_path, capsys):
    """The train and decode parts on stand-ins for bench_model's timings (no GPU): the picked cases in order, each row
    in the JSON file, one case's exception recorded as its row's error, the table's ratio to Transformer++."""
    calls = []

    def train_row(mixer, T, tokens, accum, backend, compile_blocks=False, size="125m"):
        calls.append((mixer, T))
        if mixer == "ttt_linear+fused":
            raise RuntimeError("no kernel here")
        return dict(tokens_per_s={"attention": 200e3, "ttt_linear": 100e3}[mixer], ms_per_step=1.0)

    monkeypatch.setattr(bench_model, "train_row", train_row)
    monkeypatch.setattr(bench_model, "bench_decode", lambda positions, batch, size, mode, mixer: [
        dict(model=f"{size} {mixer}", context=p, graphed_ms_per_token=2.0, compiled_graphed_ms_per_token=1.5,
             compiled_graphed_unmerged_ms_per_token=1.75) for p in positions])
    out = tmp_path / "table.json"
    bench_table.main(["--parts", "train,decode", "--mixers", "ttt_linear,ttt_linear+fused,attention", "--contexts",
                      "2048", "--positions", "1024", "--out", str(out)])
    assert calls == [("ttt_linear", 2048), ("ttt_linear+fused", 2048), ("attention", 2048)]
    rows = json.loads(out.read_text())
    train = [r for r in rows if r["part"] == "train" and "mixer" in r]
    assert [r["mixer"] for r in train] == ["ttt_linear", "ttt_linear+fused", "attention"]
    assert train[1]["error"] == "RuntimeError: no kernel here" and "tokens_per_s" not in train[1]
    decode = [r for r in rows if r["part"] == "decode" and "mixer" in r]
    assert [(r["mixer"], r["context"]) for r in decode] == [("ttt_linear", 1024), ("ttt_linear+fused", 1024)]
    assert rows[-1]["part"] == "total"
    out = capsys.readouterr().out
    assert "| train T2048 tok/s | ttt_linear 100k (0.50x) | attention 200k (1.00x) |" in out
    assert ("| decode 1.3b ttt_linear T1024 ms/token | graphed 2.000 | compiled+graphed 1.500 | same, weights unmerged "
            "1.750 | KV read alone nan |") in out


def test_prefill_builds_each_mixer_once_for_all_contexts(monkeypatch, tmp_path):
    """The prefill part on stand-ins (no GPU): each mixer's model built once and timed at every picked context, in
    the mixers' order; a mixer whose build raises gets one error row and the others still run."""
    builds, timed = [], []

    def prefill_model(mixer, size):
        builds.append(mixer)
        if mixer == "mamba2_module":
            raise ImportError("no mamba_ssm here")
        return "cfg", f"model of {mixer}"

    def prefill_row(mixer, size, T, tokens, compile_blocks, built=None):
        timed.append((mixer, T, built[1]))
        return dict(kind="prefill", tokens_per_s=1e5, ms=1.0)

    monkeypatch.setattr(bench_model, "prefill_model", prefill_model)
    monkeypatch.setattr(bench_model, "prefill_row", prefill_row)
    out = tmp_path / "table.json"
    bench_table.main(["--parts", "prefill", "--mixers", "ttt_linear+fused,attention,mamba2_module", "--contexts",
                      "8192,32768", "--out", str(out)])
    assert builds == ["ttt_linear+fused", "attention", "mamba2_module"]
    assert timed == [(m, T, f"model of {m}") for m in ("ttt_linear+fused", "attention") for T in (8192, 32768)]
    rows = [r for r in json.loads(out.read_text()) if r["part"] == "prefill" and "mixer" in r]
    assert [(r["mixer"], r.get("context")) for r in rows] == [(m, T) for m, T, _ in timed] + [("mamba2_module", None)]
    assert rows[-1]["error"] == "ImportError: no mamba_ssm here"


def test_host_times_counts_the_backward_too():
    """profile_model --host: the host-time table counts every operator of a call, the backward's included."""
    from benchmarks.common import host_times
    x = torch.randn(8, 8, requires_grad=True)

    def step():
        (x @ x).relu().sum().backward()
    h = host_times(step, calls=2, warmup=1)
    rows = {name: n for name, n, _ in h["top"]}
    assert rows["aten::mm"] == 3  # one in the forward, two in MmBackward0
    assert "autograd::engine::evaluate_function: MmBackward0" in rows
    assert h["issue_ms"] > 0 and h["wall_ms"] > 0 and h["top"] == sorted(h["top"], key=lambda r: -r[2])


def test_profile_kernel_table_sums_times_and_launches(monkeypatch, capsys):
    """profile_model's kernel table: time and launches per call summed by class (the decode analysis counts
    launches per token)."""
    from benchmarks import profile_model
    monkeypatch.setattr(profile_model, "kernel_times", lambda fn: [("_pre_kernel", 2.0, 3.0), ("_chain_kernel", 1.0, 1.0),
                                                                  ("nvjet_sm90_tst_x", 0.5, 2.0)])
    totals = profile_model.show(lambda: None, "case")
    out = capsys.readouterr().out
    assert totals == {"ttt op kernels": 3.0, "GEMMs": 0.5}
    assert "==== case: kernel time 3.5 ms in 6 launches" in out
    assert "ttt op kernels" in out and "4 launches" in out


def test_bench_op_runs_keep_their_own_rows(tmp_path, monkeypatch):
    """bench_op.main writes each timing to the JSON as it comes, and a second run in the same process starts
    from an empty log (no module-level results carried from one run to the next)."""
    from benchmarks import bench_op

    def fake_ttt(kind, B, T, H, d, mode, log=None, **kw):
        log.time(f"ttt_{kind}", "triton", B, T, H, d, 1.0, mode)
        assert json.loads((tmp_path / "bench_op.json").read_text())["time"][-1]["op"] == f"ttt_{kind}"  # saved
        return 1.0
    monkeypatch.setattr(bench_op, "time_ttt", fake_ttt)
    monkeypatch.setattr(bench_op, "time_sdpa", lambda B, T, H, d, mode, log=None: log.time(
        "attention", "sdpa_flash", B, T, H, d, 2.0, mode))
    for Ts in ("2048,8192", "4096"):
        assert bench_op.main(["--out", str(tmp_path), "--only", "fwd", "--kinds", "linear", "--Ts", Ts, "--quick",
                              "--skip", "mamba,fla"]) == 0
        rows = json.loads((tmp_path / "bench_op.json").read_text())["time"]
        assert [(r["op"], r["T"]) for r in rows] == [(op, int(T)) for T in Ts.split(",")
                                                     for op in ("attention", "ttt_linear")]


def test_the_extra_train_mixer_is_accepted_on_the_command_line(monkeypatch):
    """--mixers takes the extra train row's name (ttt_mlp+fused) as well as the main ones (it was refused once)."""
    seen = {}
    parts = {**bench_table.PARTS, "train": lambda run: seen.setdefault("m", run.mixers)}
    monkeypatch.setattr(bench_table, "PARTS", parts)
    bench_table.main(["--parts", "train", "--mixers", "ttt_mlp+fused,attention"])
    assert seen["m"] == ["ttt_mlp+fused", "attention"]


def test_module_mixer_runs_in_a_block_and_refuses_packing():
    """benchmarks.common.ModuleMixer (how mamba_ssm's Mamba2 module joins the model) takes the block's call, packed
    documents refused by name (the block passes cu_seqlens; once a TypeError)."""
    from benchmarks.common import ModuleMixer
    from ttt.config import get_config
    from ttt.model import TTTLM
    model = TTTLM(get_config("debug", mixer="attention", vocab_size=64))
    D = model.cfg.d_model
    model.blocks[0].mixer = ModuleMixer(torch.nn.Linear(D, D))
    ids = torch.randint(0, 64, (2, 8))
    out = model(ids)
    assert (out.logits if hasattr(out, "logits") else out[0]).shape == (2, 8, 64)
    with pytest.raises(ValueError, match="ModuleMixer: packed documents"):
        model.blocks[0].mixer(torch.zeros(1, 8, D), None, cu_seqlens=torch.tensor([0, 3, 8]))


def test_source_hash_names_the_code_that_ran(tmp_path):
    """benchmarks.common.source_hash: the same for the same sources, another after any change of a file's content
    or name (the GPU machine's .git can be stale: the results carry this beside the commit)."""
    from benchmarks.common import environment, source_hash
    for top in ("ttt", "benchmarks"):
        (tmp_path / top).mkdir()
        (tmp_path / top / "a.py").write_text("x = 1\n")
    (tmp_path / "ttt" / "notes.txt").write_text("not source")
    h = source_hash(str(tmp_path))
    assert len(h) == 12 and h == source_hash(str(tmp_path))
    (tmp_path / "ttt" / "notes.txt").write_text("changed")
    assert source_hash(str(tmp_path)) == h  # only Python sources count
    (tmp_path / "ttt" / "a.py").write_text("x = 2\n")
    h2 = source_hash(str(tmp_path))
    assert h2 != h
    (tmp_path / "ttt" / "a.py").rename(tmp_path / "ttt" / "b.py")
    assert source_hash(str(tmp_path)) not in (h, h2)
    assert environment()["source"] == source_hash()
