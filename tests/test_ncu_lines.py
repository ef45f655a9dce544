"""benchmarks/ncu_lines.py on a made-up profile: a tiny kernel compiled for sm_90 on the CPU (as in
test_offline_compile.py: Triton's compiler and bundled tools, a process without TRITON_INTERPRET), a source-page CSV
with samples on three instructions found by opcode (its last load, exp and store), which must land on the lines that
hold those calls; a CSV of another kernel is refused."""
from __future__ import annotations

import json
import subprocess
import sys

from test_offline_compile import ROOT, compile_offline

TINY = '''
import triton
import triton.language as tl


@triton.jit
def _act(x):
    return tl.exp(x) * 3.0  # EXP


@triton.jit
def tiny_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)  # LOAD
    y = _act(x)
    tl.store(y_ptr + offs, y, mask=offs < n)  # STORE


@triton.jit
def other_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(4):
        acc += tl.sin(tl.load(x_ptr + i * n + offs, mask=offs < n))
    tl.store(y_ptr + offs, acc, mask=offs < n)
'''

SCRIPT = '''
import csv, gzip, json, os, sys
sys.path.insert(0, {tmp!r})
import tiny
from benchmarks import ncu_lines as nl

name, sass = nl.compile_sass(tiny.tiny_kernel, dict(BLOCK=256), "fp32", 4, 1, ints=dict(n=1000))
other, other_sass = nl.compile_sass(tiny.other_kernel, dict(BLOCK=256), "fp32", 4, 1, ints=dict(n=1000))
PICK = {{"LDG": (100, 90), "MUFU.EX2": (200, 10), "STG": (400, 0)}}  # opcode: samples, of them long_sb


def write(path, label, instrs):
    with gzip.open(path, "wt", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        if label:
            w.writerow(["Kernel Name", label])
        w.writerow(["Address", "Source", nl.SAMPLES, nl.EXECUTED, "stall_long_sb", "stall_wait",
                    "stall_long_sb (Not Issued)"])
        last = {{k: i for i, (_, text, _, _) in enumerate(instrs) for k in PICK if nl._opcode(text).startswith(k)}}
        for i, (off, text, _, _) in enumerate(instrs):  # samples on the last of each (its neighbours: other lines)
            s, lsb = next((PICK[k] for k, j in last.items() if j == i), (0, 0))
            w.writerow([hex(0x7F0000001000 + off), "  " + text, s, 0 if s else 7, lsb, s - lsb, lsb])


out = {{}}
write({tmp!r} + "/ok.csv.gz", name, sass)
rate, s, text = nl.analyse({tmp!r} + "/ok.csv.gz", name, sass)
out["rate"] = rate
out["lines"] = {{f"{{os.path.basename(f)}}:{{ln}}": a[nl.SAMPLES] for (f, ln), a in s["lines"].items() if a[nl.SAMPLES]}}
out["funcs"] = {{fn: v for (fn, f), v in s["funcs"].items() if v}}
out["reasons"] = {{r: s["totals"][r] for r in s["reasons"] if s["totals"][r]}}
for label in (None, other):  # another kernel's SASS, unnamed (refused by its opcodes) and named (by its name)
    write({tmp!r} + "/other.csv.gz", label, other_sass)
    try:
        nl.analyse({tmp!r} + "/other.csv.gz", name, sass)
        out.setdefault("refused", []).append("")
    except SystemExit as e:
        out.setdefault("refused", []).append(str(e))
print(json.dumps(out).replace(" ", ""))
'''


def test_samples_land_on_their_source_lines(tmp_path):
    (tmp_path / "tiny.py").write_text(TINY)
    out = json.loads("".join(compile_offline(SCRIPT.format(tmp=str(tmp_path)), 600)))
    line = {tag: f"tiny.py:{i}" for i, text in enumerate(TINY.splitlines(), 1) for tag in ("LOAD", "EXP", "STORE")
            if text.endswith(f"# {tag}")}
    assert out["rate"] == 1.0
    assert out["lines"] == {line["LOAD"]: 100, line["EXP"]: 200, line["STORE"]: 400}, (out["lines"], line)
    assert out["funcs"] == {"tiny_kernel": 500, "_act": 200}
    assert out["reasons"] == {"stall_long_sb": 100, "stall_wait": 600}
    unnamed, named = out["refused"]
    assert "ofthe" + "opcodesmatch" in unnamed and "checkthespecialisation" in unnamed, unnamed
    assert "theprofileisofother_kernel" in named, named


BAD_ARGS = """
import contextlib, io, json
from benchmarks import ncu_lines
res = []
for argv in {argvs!r}:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ncu_lines.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    res.append([code, err.getvalue()])
print(json.dumps(res))
"""


def test_bad_arguments_name_their_flag(tmp_path):
    """Each bad argument: exit status 2 and a last stderr line naming it. The first case through the command line
    itself (`python -m benchmarks.ncu_lines`), the others through its main() in one more process
    (`compile_offline`; each process imports torch and Triton for ~5 s)."""
    good, bad = tmp_path / "p.csv", tmp_path / "bad.csv"
    good.write_text('"Address","Source","Warp Stall Sampling (All Samples)"\n"0x7f00","  EXIT","3"\n')
    bad.write_text('"Address","Source"\n')
    cases = [([str(good), "--kernel", "no such kernel"], "--kernel"),
             ([str(good), "--kernel", "smem bwd x2", "--ints", "l_h"], "--ints"),
             ([str(good), "--kernel", "smem bwd x2", "--types", "nope_ptr=bf16"], "--types"),
             ([str(good), "--kernel", "smem bwd x2", "--top", "0"], "--top"),
             ([str(bad), "--kernel", "smem bwd x2"], "csv")]
    r = subprocess.run([sys.executable, "-m", "benchmarks.ncu_lines", *cases[0][0]], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    results = [(r.returncode, r.stderr)]
    script = BAD_ARGS.format(argvs=[argv for argv, _ in cases[1:]])
    results += json.loads("".join(compile_offline(script, 300)))  # (its words: the messages without their spaces)
    assert len(results) == len(cases)
    for (argv, flag), (code, err) in zip(cases, results):
        assert code == 2 and flag in err.splitlines()[-1], (argv, err[-500:])
