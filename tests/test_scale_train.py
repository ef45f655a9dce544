"""benchmarks/scale_train.py on the CPU (gloo processes, tiny model): the same global batch at every process
count, the first logged loss equal across layouts, the table it prints and the profiler traces of every process."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ttt.data import prepare

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_scale_train_runs_the_matrix_with_one_global_batch(tmp_path):
    data = tmp_path / "data"
    prepare("stdlib", data, vocab_size=512, extensions=(".py",), max_bytes=300_000)
    out = tmp_path / "scale"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale_train.py"), "--data", str(data), "--out",
                        str(out), "--sizes", "debug", "--seq-lens", "64", "--gpus", "1,2", "--layouts", "ddp",
                        "--steps", "6", "--log-every", "2",
                        "--profile-steps", "1", "--device", "cpu", "--no-compile", "--timeout", "300"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads((out / "scale_train.json").read_text())
    assert [(x["procs"], x["layout_name"]) for x in rows] == [(1, "none"), (2, "ddp")]
    assert all(x["rc"] == 0 and x["tokens_per_step"] == 1 * 64 * 2 for x in rows)  # micro x context x max GPUs
    # the same batch and the same initial weights: the first logged loss agrees up to reduction-order rounding
    assert abs(rows[0]["loss_first"] - rows[1]["loss_first"]) < 1e-4
    assert "| debug | 64 | ttt_linear | 2 | ddp |" in r.stdout
    # --profile-steps: every process of every run traced its window, and the slowed row is not timed
    traces = sorted(p.relative_to(out).parts[-1] for p in out.glob("*/profile/trace_rank*.json"))
    assert traces == ["trace_rank0.json", "trace_rank0.json", "trace_rank1.json"], traces
    assert all([r["step"] for r in x["rows"]] == [2, 4, 6] for x in rows)
