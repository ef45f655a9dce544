"""benchmarks/replicate.py end to end at smoke size on the CPU: data, matched models at two contexts, the
ablation ladder and b sweep, and the report built from the run outputs; and its bad-input errors. The
script's main(argv) runs in the test's process (what `python benchmarks/replicate.py ARGS` runs)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "replicate.py"


def load_script():
    """benchmarks/replicate.py as a module: its main(argv) runs here, without an interpreter start per call."""
    spec = importlib.util.spec_from_file_location("replicate_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_smoke_runs_end_to_end(tmp_path, capsys):
    script = load_script()
    out = tmp_path / "rep"
    script.main(["--smoke", "--out", str(out)])  # a failure raises (SystemExit(2) for bad input)
    results = {p.parent.name: json.loads(p.read_text()) for p in (out / "runs").glob("*/result.json")}
    main = [v for k, v in results.items() if k.startswith("ctx")]
    assert sorted({v["ctx"] for v in main}) == [32, 64] and len(main) == 8
    for ctx in (32, 64):
        counts = [v["params"] for v in main if v["ctx"] == ctx]
        assert max(counts) <= 1.03 * min(counts) * 1.0001  # matched within 3%
        assert all(v["tokens"] == 2048 and len(v["loss_by_position"]) == ctx for v in main if v["ctx"] == ctx)
    assert {k for k in results if k.startswith("abl_")} == {
        *(f"abl_ctx32_ladder{i}" for i in range(6)), "abl_ctx32_b4", "abl_ctx32_b64"}
    assert results["abl_ctx32_ladder0"]["config"]["mini_batch"] == 32  # b = T
    assert not results["abl_ctx32_ladder0"]["config"]["ttt_inner_ln"]
    md = (out / "results.md").read_text()
    # the table is written from the run files: every run's loss appears with 4 decimals
    for v in results.values():
        assert f"{v['val_loss']:.4f}" in md
    assert (out / "loss_by_position_32.png").stat().st_size > 1000
    # a rerun skips finished runs and rewrites the same report
    capsys.readouterr()
    script.main(["--smoke", "--out", str(out)])
    assert "skipped" in capsys.readouterr().out
    assert (out / "results.md").read_text() == md


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    """The script's main() in this process (no interpreter start per case): every bad input is a SystemExit(2)
    with its message last on stderr; any other exception would fail the test."""
    script = load_script()
    f = tmp_path / "file"
    f.write_text("x")
    for args, flag in ((["--out", f, "--stage", "report"], "--out"),
                       (["--out", tmp_path / "o", "--models", "gpt"], "--models"),
                       (["--out", tmp_path / "o", "--ctx", "2k"], "--ctx"),
                       (["--out", tmp_path / "o", "--stage", "report"], "--out"),
                       (["--out", tmp_path / "o2", "--stage", "train", "--device", "cpu"], "--out")):
        with pytest.raises(SystemExit) as e:
            script.main([str(a) for a in args])
        err = capsys.readouterr().err
        assert e.value.code == 2, (args, err)
        assert flag in err.strip().splitlines()[-1], (args, err)
