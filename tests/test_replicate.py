"""benchmarks/replicate.py end to end at smoke size on the CPU: data, matched models at two contexts, the
ablation ladder and b sweep, and the report built from the run outputs; a whole study (probe, plan, equal
budgets); the plan's arithmetic; the committed results page; and its bad-input errors. The script's
main(argv) runs in the test's process (what `python benchmarks/replicate.py ARGS` runs); a study's jobs are
child processes of it."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "replicate.py"


def load_script():
    """benchmarks/replicate.py as a module: its main(argv) runs here, without an interpreter start per call."""
    spec = importlib.util.spec_from_file_location("replicate_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    sys.modules["replicate_script"] = script  # its dataclasses look their module up there
    spec.loader.exec_module(script)
    return script


@pytest.mark.slow
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
        for v in main:
            if v["ctx"] == ctx:  # the recurrent models are evaluated to twice the training context
                assert v["tokens"] == 2048 and len(v["loss_by_position"]) == (ctx if v["mixer"] == "attention" else 2 * ctx)
                assert abs(v["val_loss"] - sum(v["loss_by_position"][:ctx]) / ctx) < 1e-4
                assert len(v["doc_spans"]) == v["eval_docs"] and len(v["doc_spans"][0]) == 8 * v["eval_len"] // ctx
    assert {k for k in results if k.startswith("abl_")} == {
        *(f"abl_ctx32_ladder{i}" for i in range(6)), "abl_ctx32_b4", "abl_ctx32_b64"}
    assert results["abl_ctx32_ladder0"]["config"]["mini_batch"] == 32  # b = T
    assert not results["abl_ctx32_ladder0"]["config"]["ttt_inner_ln"]
    md = (out / "results.md").read_text()
    # the table is written from the run files: every run's loss appears with 4 decimals
    for v in results.values():
        assert f"{v['val_loss']:.4f}" in md
    assert (out / "loss_by_position.png").stat().st_size > 1000
    assert "## The paper's claims, at this scale" in md and "**" in md  # verdict lines generated
    # a rerun skips finished runs and rewrites the same report
    capsys.readouterr()
    script.main(["--smoke", "--out", str(out)])
    assert "skipped" in capsys.readouterr().out
    assert (out / "results.md").read_text() == md


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    """Every bad input is a SystemExit(2) with its message last on stderr; any other exception fails the test."""
    script = load_script()
    f = tmp_path / "file"
    f.write_text("x")
    for args, flag in ((["--out", f, "--stage", "report"], "--out"),
                       (["--out", tmp_path / "o", "--models", "gpt"], "--models"),
                       (["--out", tmp_path / "o", "--ctx", "2k"], "--ctx"),
                       (["--out", tmp_path / "o", "--lr", "3e-3,fast"], "--lr"),
                       (["--out", tmp_path / "o", "--lr", "1e-3,1e-3"], "--lr"),
                       (["--out", tmp_path / "o", "--lr", "-1e-3"], "--lr"),
                       (["--out", tmp_path / "o", "--inner-lr", "0.25,slow"], "--inner-lr"),
                       (["--out", tmp_path / "o", "--inner-lr", "0"], "--inner-lr"),
                       (["--out", tmp_path / "o", "--inner-lr", "0.5,0.5"], "--inner-lr"),
                       (["--out", tmp_path / "o", "--stage", "report"], "--out"),
                       (["--out", tmp_path / "o2", "--stage", "train", "--device", "cpu"], "--out"),
                       (["--out", tmp_path / "o3", "--stage", "ablation-study", "--ctx", "2048,8192"], "--ctx")):
        with pytest.raises(SystemExit) as e:
            script.main([str(a) for a in args])
        err = capsys.readouterr().err
        assert e.value.code == 2, (args, err)
        assert flag in err.strip().splitlines()[-1], (args, err)


def test_makespan_and_plan_arithmetic():
    rep = load_script()
    # one job at a time: the times add up; all at once with no slow-down: the slowest job decides
    assert abs(rep.makespan(100.0, [10.0, 20.0], 1, lambda k: 1.0) - (10 + 5)) < 1e-9
    assert abs(rep.makespan(100.0, [10.0, 20.0], 2, lambda k: 1.0) - 10) < 1e-9
    # the fast job finishes after 5 s; the slow one then runs twice as fast: 50 tokens in 5 s, 50 more in 2.5 s
    assert abs(rep.makespan(100.0, [10.0, 20.0], 2, lambda k: 2.0 / k) - 7.5) < 1e-9
    summary = {"phases": {"one": {"rows": {"j#0": {"tok_s": 100}}},
                          "two": {"rows": {"j#0": {"tok_s": 60}, "j#1": {"tok_s": 60}}},
                          "all": {"rows": {"j": {"tok_s": 30}, "k": {"tok_s": 10}, "l": {"tok_s": 40}, "m": {"tok_s": 50}}}}}
    assert abs(rep.per_process_factor(summary, 1, 4) - 100 / 30) < 1e-9
    # between 2 and 4 processes, linear in 1/k: 1/3 lies 2/3 of the way from 1/2 to 1/4
    assert abs(rep.per_process_factor(summary, 3, 4) - (60 - 30 * 2 / 3) / 30) < 1e-9
    solo = {"phases": {"all": {**summary["phases"]["all"], "solo": {"name": "k", "tok_s": 40}}}}
    assert abs(rep.per_process_factor(solo, 1, 4) - 4.0) < 1e-9  # the slowest job, timed alone and among 4
    assert abs(rep.per_process_factor(solo, 2, 4) - 2.0) < 1e-9  # GPU shared evenly: rate ~ 1/k
    assert abs(rep.per_process_factor(summary, 8, 4) - 0.5) < 1e-9  # past 4: the GPU shared evenly
    # a job's evaluation beside the others' training: extra work that delays the slower jobs
    assert abs(rep.makespan(100.0, [10.0, 20.0], 2, lambda k: 1.0, [0.0, 100.0]) - 10) < 1e-9
    assert abs(rep.makespan(100.0, [10.0, 20.0], 2, lambda k: 2.0 / k, [0.0, 100.0]) - 100 / 10) < 1e-9
    a = types.SimpleNamespace(batch_tokens=64, tokens=10 ** 9, eval_seqs=2)
    cfg = types.SimpleNamespace(mixer="attention")
    jobs = [types.SimpleNamespace(name=n, ctx=16, cfg=cfg) for n in "jklm"]
    p = rep.plan(a, jobs, summary, 100.0, 5.0)
    factor = lambda k: rep.per_process_factor(summary, k, 4)  # noqa: E731
    extra = [32 / 3, 0.0, 32 / 3, 32 / 3]  # everyone's evaluation but the slowest job's (k)
    assert p["tokens"] % 64 == 0 and p["continue"][0] == "k" and len(p["continue"]) == p["width"]
    fill = rep.PLAN_MARGIN * (100.0 - (-(-4 // p["width"]) - 1) * 5.0)  # later waves start fresh: 5 s each
    assert rep.makespan(p["tokens"], [30, 10, 40, 50], p["width"], factor, extra) <= fill  # fits
    assert rep.makespan(p["tokens"] + 64, [30, 10, 40, 50], p["width"], factor, extra) > fill  # the largest that does


@pytest.mark.slow
def test_study_on_cpu_probes_plans_and_trains_equal_budgets(tmp_path):
    out = tmp_path / "rep"
    load_script().main(["--smoke", "--stage", "study", "--ablation", "--models", "attention", "--rungs", "0",
                        "--batch-sizes", "", "--ctx", "32,64", "--tokens", "4096", "--wall-seconds", "900",
                        "--probe-seconds", "1", "--eval-reserve", "30", "--layout-probe", "--out", str(out)])
    plan = json.loads((out / "plan_ctx32+64_attention.json").read_text())  # both contexts in one study: one plan
    probe = json.loads((out / "probe_ctx32+64_attention.json").read_text())
    assert set(probe["phases"]) == {"one", "two", "all"} and len(probe["phases"]["two"]["rows"]) == 2
    results = [json.loads(p.read_text()) for p in (out / "runs").glob("*/result.json")]
    assert {v["name"] for v in results} == {"ctx32_attention", "ctx64_attention", "abl_ctx32_ladder0"}
    for v in results:  # one budget for every run of the study, from the plan
        assert v["token_budget"] == plan["tokens"] == 4096 and v["tokens"] == 4096 and not v["stopped"]
    # a second study in the same --out: the first one's probe signals must not stand for its own (a stale
    # 'which job runs alone' file made every process skip the solo timing and the parent wait it out)
    load_script().main(["--smoke", "--stage", "study", "--models", "attention,ttt_linear", "--ctx", "48",
                        "--tokens", "2048", "--wall-seconds", "900", "--probe-seconds", "1", "--eval-reserve", "30",
                        "--probe-timeout", "240", "--out", str(out)])
    second = json.loads((out / "probe_ctx48_attention+ttt_linear.json").read_text())["phases"]["all"]
    assert second["solo"]["name"] in second["rows"] and second["wall_s"] < 200, second


def test_committed_results_are_generated_from_the_committed_run_files(tmp_path):
    """docs/replication.md's results block is what the report stage writes from docs/replication/ (never typed)."""
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs" / "replication", docs / "replication")
    page = docs / "replication.md"
    committed = (ROOT / "docs" / "replication.md").read_text()
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    page.write_text(committed.split(begin)[0] + begin + "\n" + end + committed.split(end)[1])
    load_script().main(["--stage", "report", "--out", str(docs / "replication"), "--page", str(page)])
    assert page.read_text() == committed


def test_a_second_model_size_is_a_study_of_its_own(tmp_path):
    """--size small names its runs small_ctx..., so they never take the place of the main study's; the report
    gives them their own sections and sets the deciding numbers of both sizes side by side."""
    script = load_script()
    a = types.SimpleNamespace(size="small", models=["ttt_linear", "mamba"], ctx=[2048], lr=[script.LR])
    assert [j.name for j in script.study_jobs(a, 8192)] == ["small_ctx2048_ttt_linear", "small_ctx2048_mamba"]
    a.lr = [script.LR, 1e-3]  # another learning rate is a study of its own too, trained at that rate
    jobs = script.study_jobs(a, 8192)
    assert [(j.name, j.lr) for j in jobs] == [("small_ctx2048_ttt_linear", script.LR), ("small_ctx2048_mamba", script.LR),
                                              ("small_lr0.001_ctx2048_ttt_linear", 1e-3),
                                              ("small_lr0.001_ctx2048_mamba", 1e-3)]
    out = tmp_path / "rep"
    shutil.copytree(ROOT / "docs" / "replication", out)
    for d in (out / "runs").glob("small_*"):  # the committed small runs give way to copies of the main ones
        shutil.rmtree(d)
    for m in ("ttt_linear", "mamba"):  # the main runs once more, as if trained at the small size
        r = json.loads((out / "runs" / f"ctx8192_{m}" / "result.json").read_text())
        r.update(name=f"small_ctx8192_{m}", params=r["params"] // 4)
        (out / "runs" / r["name"]).mkdir()
        (out / "runs" / r["name"] / "result.json").write_text(json.dumps(r))
    script.main(["--stage", "report", "--out", str(out)])
    text = (out / "results.md").read_text()
    assert text.count("### Context 8192\n") == 1 and "### Context 8192, size small\n" in text
    assert "### The paper's claims, at this scale (size small)" in text
    table = text.split("### The same numbers at each size (scale)")[1].split("###")[0]
    ratios = [float(v) for v in re.findall(r"\| (?:main|small) \(([0-9.]+) tokens/param\)", table)]
    assert len(ratios) == 2 and ratios[1] == pytest.approx(4 * ratios[0], rel=0.05)  # a quarter of the parameters
    rows = [r for r in table.splitlines() if r.startswith("| 8192 |") and "minus Mamba-2" in r]  # both sizes have these
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    assert len(rows) == 2 and all(c[2] == c[3] != "—" for c in cells)  # the same runs: the same numbers


def test_a_second_ablation_size_is_a_ladder_of_its_own(tmp_path):
    """--ablation-size tiny names its runs abl_tiny_ctx..., and --inner-lr 0.25 abl_[tiny_]ilr0.25_ctx..., so the
    committed ladder's runs never make them skip; the report gives each ladder and its b sweep their own tables,
    kept out of the loss-by-position studies."""
    script = load_script()
    a = types.SimpleNamespace(ablation_size="tiny", ctx=[2048], rungs=[0, 5], batch_sizes=[4, 16], lr=[script.LR],
                              inner_lr=[None])
    assert [j.name for j in script.ablation_jobs(a, 8192)] == [
        "abl_tiny_ctx2048_ladder0", "abl_tiny_ctx2048_ladder5", "abl_tiny_ctx2048_b4"]
    a.inner_lr = [None, 0.25]
    jobs = script.ablation_jobs(a, 8192)
    assert [j.name for j in jobs][3:] == [
        "abl_tiny_ilr0.25_ctx2048_ladder0", "abl_tiny_ilr0.25_ctx2048_ladder5", "abl_tiny_ilr0.25_ctx2048_b4"]
    assert [j.cfg.base_lr for j in jobs] == [None] * 3 + [0.25] * 3
    a.ablation_size, a.inner_lr = "small", [None]  # the default keeps the plain names
    assert [j.name for j in script.ablation_jobs(a, 8192)][0] == "abl_ctx2048_ladder0"
    out = tmp_path / "rep"
    shutil.copytree(ROOT / "docs" / "replication", out)
    made = {}
    for d in sorted((out / "runs").glob("abl_ctx2048_*")):  # the committed ladder once more, as if at inner LR 4
        r = json.loads((d / "result.json").read_text())
        r.update(name=r["name"].replace("abl_", "abl_ilr4_"), val_loss=r["val_loss"] + 0.5,
                 doc_spans=(np.asarray(r["doc_spans"]) + 0.5).tolist())
        (out / "runs" / r["name"]).mkdir()
        (out / "runs" / r["name"] / "result.json").write_text(json.dumps(r))
        made[r["name"]] = r
    assert len(made) == 8
    script.main(["--stage", "report", "--out", str(out)])
    text = (out / "results.md").read_text()
    assert "abl_ilr4" not in text.split("### Ablation ladder")[0]  # not a study of loss by position
    heads = [line for line in text.splitlines() if line.startswith(("### Ablation", "### Mini-batch"))]
    assert heads[:2] == ["### Ablation ladder (TTT-Linear, the paper's Table 1 rungs)",
                         "### Mini-batch size b (TTT-Linear (M))"]  # the default ladder first
    suffix = " (size small, inner base LR 4)"
    assert {"### Ablation ladder (TTT-Linear, the paper's Table 1 rungs)" + suffix,
            "### Mini-batch size b (TTT-Linear (M))" + suffix} <= set(heads)
    assert "### Ablation ladder (TTT-Linear, the paper's Table 1 rungs) (size tiny)" in heads  # the committed one
    part = text.split("### Ablation ladder (TTT-Linear, the paper's Table 1 rungs)" + suffix)[1]
    sweep = part.split("### Mini-batch size b (TTT-Linear (M))" + suffix)[1].split("###")[0]
    for r in made.values():  # every made-up run's own loss, in its own tables
        assert f"{r['val_loss']:.4f}" in part.split("###")[0] + sweep
    # each b at inner LR 4 against the default ladder's b = 16: +0.5 for b = 16 itself (its made-up copy)
    versus = text.split("### Inner base LR 4 against b = 16 at the default (size small)")[1].split("###")[0]
    rows = [r for r in versus.splitlines() if r.startswith("| ") and r[2].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["4", "16", "64"]
    assert "+0.5000 ± 0.0000 (higher)" in rows[1]
    assert sweep.count("\n| ") == 4  # header + b = 4, 16, 64


def test_each_model_at_its_best_peak_lr():
    """A size trained at several peak LRs gets the claims decided again from each model's lowest-loss run."""
    rep = load_script()
    rng = np.random.default_rng(0)

    def run(m, lr, loss):
        spans = loss + 0.01 * rng.standard_normal((8, 2 * rep.SPANS))  # 8 documents
        return dict(mixer=m, lr=lr, val_loss=float(spans[:, :rep.SPANS].mean()), doc_spans=spans.tolist())
    studies = {"tiny": {8192: {"ttt_linear": run("ttt_linear", 3e-3, 2.3), "attention": run("attention", 3e-3, 3.45)}},
               "tiny_lr0.001": {8192: {"attention": run("attention", 1e-3, 2.15)}}}
    lines = rep.best_lr_lines(studies)
    assert lines[0] == "### The paper's claims with each model at its best peak LR (size tiny)"
    assert any("Transformer++ **0.001: 2.1" in x and "0.003: 3.4" in x for x in lines)
    beats = next(x for x in lines if "TTT-Linear (M) beats Transformer++" in x)
    assert "(loss difference +0.1" in beats and beats.endswith("**does not hold at this scale**")  # against 1e-3's run
    assert rep.best_lr_lines({"tiny": studies["tiny"]}) == []  # one rate per model: nothing to add
