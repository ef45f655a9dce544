"""benchmarks/bench_table.py's case selection (--mixers, --contexts, --positions): bad values stop it with exit
status 2 and a line naming the flag, before anything is timed; good ones pick the cases of each part."""
from __future__ import annotations

import sys

import pytest

from benchmarks import bench_table


@pytest.mark.parametrize("argv, flag", [(["--mixers", "ttt_linear,gru"], "--mixers"),
                                        (["--contexts", "8k"], "--contexts"),
                                        (["--positions", "1024,x"], "--positions"),
                                        (["--parts", "check,speed"], "--parts")])
def test_bad_selection_exits_2_naming_the_flag(monkeypatch, capsys, argv, flag):
    monkeypatch.setattr(sys, "argv", ["bench_table", *argv])
    monkeypatch.setattr(bench_table, "PICK", dict(bench_table.PICK))
    with pytest.raises(SystemExit) as e:
        bench_table.main()
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_picked_keeps_the_parts_order_and_only_the_chosen_cases(monkeypatch):
    monkeypatch.setattr(bench_table, "PICK", dict(mixers=["attention", "ttt_linear+fused"], contexts=None))
    assert bench_table.picked(bench_table.TRAIN_MIXERS, "mixers") == ["ttt_linear+fused", "attention"]
    assert bench_table.picked((8192, 2048), "contexts") == [8192, 2048]
    monkeypatch.setattr(bench_table, "PICK", dict(mixers=None, contexts=[2048]))
    assert bench_table.picked((8192, 2048), "contexts") == [2048]
    assert bench_table.picked(bench_table.TRAIN_MIXERS, "mixers") == bench_table.TRAIN_MIXERS
