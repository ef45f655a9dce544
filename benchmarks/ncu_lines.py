"""Where a kernel's Nsight Compute samples go, by source line, without a GPU. Triton's cubins carry no line info, so
the profiled SASS has none: this compiles the kernel again for sm_90 (a kernel of offline_compile's lists,
specialised as Triton's launcher does: pointers and integer arguments divisible by 16, integers equal to 1 as
constants), checks that its SASS is the profiled one (the same opcode at the same offset), takes each instruction's
line from `nvdisasm -g` and sums the profile's columns per line. Run it with a Python whose Triton is the GPU
machine's version (3.6 there), from the repository root:

    python3 -m benchmarks.ncu_lines ncu_source.csv.gz --kernel "smem bwd x2" --d 64 --ints l_h=1,NGROUPS=66

The input is the profile's source page as CSV, per SASS instruction: `bash benchmarks/run_on_gpu.sh ncu` writes it
to $OUT/ncu_source.csv.gz (`ncu -i REPORT --page source --csv --print-source sass`). --ints gives the run's integer
arguments that are 1 or not multiples of 16, --types the pointers whose element type is not offline_compile's guess
(both change the SASS; a match rate under --min-match is refused).
"""
from __future__ import annotations

import argparse
import ast
import collections
import csv
import gzip
import inspect
import os
import re
import sys
import tempfile

import triton

from benchmarks.offline_compile import DTYPES, _compile, _cubin_tools, layer_kernels, linear_kernels, mlp_kernels

SAMPLES, EXECUTED = "Warp Stall Sampling (All Samples)", "Instructions Executed"
SH_X, GL_X = "L1 Wavefronts Shared Excessive", "L2 Theoretical Sectors Global Excessive"
OTHER = "other"  # samples that no stall_* column names (on Hopper: the wgmma instructions' own)


def compile_sass(fn, constexprs: dict, dtype: str, warps: int, stages: int, ints: dict | None = None,
                 types: dict | None = None, maxnreg: int | None = None):
    """(kernel name, [(offset, SASS text, file, line)]) of `fn` compiled for sm_90 as the launcher specialises it
    (ints: integer arguments' run-time values where they are 1 or not divisible by 16; types: signature types)."""
    cache = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory() as tmp:  # a cached cubin keeps the paths of the tree that compiled it
        os.environ["TRITON_CACHE_DIR"] = tmp
        try:
            k = _compile(fn, constexprs, dtype, warps, stages, maxnreg=maxnreg, ints=ints or {}, types=types)
        finally:
            os.environ.pop("TRITON_CACHE_DIR") if cache is None else os.environ.update(TRITON_CACHE_DIR=cache)
    sass, = _cubin_tools(k.asm["cubin"], ["nvdisasm", "-g", "-c"])
    out, where = [], ("?", 0)
    for text in sass.splitlines():
        if m := re.match(r'\s*//## File "(.*)", line (\d+)', text):
            where = (m.group(1), int(m.group(2)))
        elif m := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;", text):
            out.append((int(m.group(1), 16), m.group(2), *where))
    return k.metadata.name, out


def read_profile(path: str):
    """(kernel name or None, rows as dicts) of ncu's source page CSV (gzipped or not)."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", newline="") as f:
        rows = list(csv.reader(f))
    name = None
    if rows and rows[0][:1] == ["Kernel Name"]:
        name, rows = rows[0][1], rows[1:]
    header = rows[0] if rows else []
    return name, [dict(zip(header, r)) for r in rows[1:] if len(r) == len(header)]


def _opcode(text: str) -> str:
    words = re.sub(r"^@!?U?P\w+\s+", "", text.strip()).split()
    return words[0].rstrip(";") if words else ""


def join(rows: list[dict], sass: list):
    """(match rate, [(file, line, row)]): each profiled instruction with the line of the offline instruction at its
    offset; the rate is the share of instructions with the same opcode at the same offset."""
    base = int(rows[0]["Address"], 16)
    offline = {off: (text, f, ln) for off, text, f, ln in sass}
    joined, same = [], 0
    for r in rows:
        text, f, ln = offline.get(int(r["Address"], 16) - base, ("", "?", 0))
        same += _opcode(text) == _opcode(r["Source"])
        joined.append((f, ln, r))
    return same / max(len(rows), len(sass)), joined


def _num(v: str) -> float:
    v = v.replace(",", "")
    return float(v) if v and v != "-" else 0.0


class _Source:
    """Source text and enclosing functions of the files that instructions point at."""

    def __init__(self):
        self.files = {}

    def _load(self, path):
        if path not in self.files:
            try:
                text = open(path).read()
                funcs = [(n.lineno, n.end_lineno, n.name) for n in ast.walk(ast.parse(text))
                         if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
                self.files[path] = (text.splitlines(), funcs)
            except (OSError, SyntaxError, ValueError):
                self.files[path] = ([], [])
        return self.files[path]

    def code(self, path, line):
        lines = self._load(path)[0]
        return re.sub(r"\s+#.*$", "", lines[line - 1].strip()) if 0 < line <= len(lines) else ""

    def function(self, path, line):
        inside = [(a, n) for a, b, n in self._load(path)[1] if a <= line <= b]
        return max(inside)[1] if inside else "?"


def summarise(joined: list) -> dict:
    """Per-line and per-function sums of the profile columns, and the stall-reason totals."""
    src = _Source()
    reasons = [c for c in joined[0][2] if c.startswith("stall_") and "Not Issued" not in c] if joined else []
    lines = collections.defaultdict(collections.Counter)
    funcs, totals = collections.Counter(), collections.Counter()
    for f, ln, r in joined:
        vals = {c: _num(r.get(c, "")) for c in [SAMPLES, EXECUTED, SH_X, GL_X, *reasons]}
        vals[OTHER] = max(vals[SAMPLES] - sum(vals[c] for c in reasons), 0.0)
        lines[(f, ln)].update(vals)
        totals.update(vals)
        funcs[(src.function(f, ln), os.path.basename(f))] += vals[SAMPLES]
    return dict(lines=lines, funcs=funcs, totals=totals, reasons=[*reasons, OTHER], src=src)


def report(s: dict, top: int) -> str:
    t, total = s["totals"], s["totals"][SAMPLES] or 1.0
    out = [f"samples {t[SAMPLES]:.0f}, warp instructions executed {t[EXECUTED]:.4g}", "stall reasons (all samples):"]
    for r in sorted(s["reasons"], key=lambda r: -t[r]):
        if t[r]:
            out.append(f"  {r.removeprefix('stall_'):18} {t[r]:10.0f} {100 * t[r] / total:5.1f}%")
    out.append(f"top {top} source lines: % of samples, top reasons, warp instructions executed, excessive shared "
               f"wavefronts (shX) and global sectors (gX)")
    for i, ((f, ln), a) in enumerate(sorted(s["lines"].items(), key=lambda kv: -kv[1][SAMPLES])[:top], 1):
        why = " ".join(f"{r.removeprefix('stall_')} {100 * a[r] / a[SAMPLES]:.0f}%"
                       for r in sorted(s["reasons"], key=lambda r: -a[r])[:2] if a[r])
        extra = " ".join(f"{k} {a[c] / 1e6:.1f}M" for k, c in (("shX", SH_X), ("gX", GL_X)) if a[c])
        out.append(f"{i:3} {100 * a[SAMPLES] / total:5.1f}% {os.path.basename(f)}:{ln:<5} {why:26} "
                   f"{a[EXECUTED] / 1e6:7.1f}M {extra:22} {s['src'].code(f, ln)[:80]}")
    out.append("samples per function (the innermost line's):")
    for (fn, f), v in s["funcs"].most_common():
        if v:
            out.append(f"  {100 * v / total:5.1f}% {fn} ({f})")
    return "\n".join(out)


def analyse(csv_path: str, name: str, sass: list, top: int = 30, min_match: float = 0.95,
            what: str = "") -> tuple[float, dict, str]:
    """(match rate, summary, report) of a profile against the offline SASS of kernel `name`; SystemExit (one line)
    when the profile is of another kernel or its SASS does not match."""
    prof_name, rows = read_profile(csv_path)
    if not rows:
        sys.exit(f"ncu_lines: {csv_path} has no instruction rows")
    if prof_name and prof_name != name:
        sys.exit(f"ncu_lines: the profile is of {prof_name}, not {name}")
    rate, joined = join(rows, sass)
    if rate < min_match:
        sys.exit(f"ncu_lines: {what}only {100 * rate:.1f}% of the opcodes match ({len(rows)} profiled instructions, "
                 f"{len(sass)} offline): check the specialisation (--warps, --ints, --types) and the Triton version")
    s = summarise(joined)
    head = f"{name}: {100 * rate:.2f}% of {len(rows)} instructions have the offline opcode at their offset"
    return rate, s, head + "\n" + report(s, top)


def _pairs(kind):
    def parse(text):
        try:
            pairs = dict(p.split("=") for p in text.split(",") if p)
            return {k.strip(): int(v) for k, v in pairs.items()} if kind is int else \
                {k.strip(): v.strip().lstrip("*") for k, v in pairs.items()}
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE,... ({'integers' if kind is int else 'types'}), "
                                             f"got {text!r}") from None
    return parse


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", help="ncu's source page as CSV (.gz or not), one row per SASS instruction")
    ap.add_argument("--kernel", required=True, help="a kernel name of offline_compile's lists, e.g. 'smem bwd x2'")
    ap.add_argument("--d", type=int, default=64, help="head dim")
    ap.add_argument("--b", type=int, default=16, help="mini-batch size")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--warps", type=int, default=None, help="the launch's warps (default: try the list's, most first)")
    ap.add_argument("--ints", type=_pairs(int), default={}, help="integer arguments that are 1 or not divisible by 16")
    ap.add_argument("--types", type=_pairs(str), default={}, help="signature types, e.g. kw_ptr=bf16")
    ap.add_argument("--top", type=int, default=30, help="source lines shown")
    ap.add_argument("--min-match", type=float, default=0.95, help="the least share of matching opcodes")
    a = ap.parse_args(argv)
    if not os.path.isfile(a.csv):
        ap.error(f"csv: no file {a.csv}")
    rows = read_profile(a.csv)[1]
    if not rows or not {"Address", "Source", SAMPLES} <= rows[0].keys():
        ap.error(f"csv: {a.csv} is not ncu's source page with instruction rows (--page source --csv)")
    if a.top < 1:
        ap.error("--top: must be at least 1")
    import torch
    from ttt.ops.triton_utils import dot_mode
    dot = dot_mode(getattr(torch, DTYPES[a.dtype]))
    table = [e for kinds in (linear_kernels, mlp_kernels, layer_kernels) for e in kinds(a.d, a.b, dot)]
    found = sorted((e for e in table if e[0] == a.kernel and a.warps in (None, e[3])), key=lambda e: -e[3])
    if not found:
        ap.error(f"--kernel: no {a.kernel!r} at d {a.d}{'' if a.warps is None else f', {a.warps} warps'} "
                 f"(names: {', '.join(sorted({e[0] for e in table}))})")
    params = set(inspect.signature(found[0][1].fn).parameters)
    for flag, given in (("--ints", a.ints), ("--types", a.types)):
        if set(given) - params:
            ap.error(f"{flag}: {found[0][1].fn.__name__} has no argument {', '.join(sorted(set(given) - params))}")
    tried = []
    for _, fn, cx, warps, stages, *cap in found:  # (without --warps: the first that matches)
        name, sass = compile_sass(fn, cx, a.dtype, warps, stages, a.ints, a.types, *cap)
        tried.append((join(rows, sass)[0], warps, stages, name, sass))
        if tried[-1][0] >= a.min_match:
            break
    _, warps, stages, name, sass = max(tried, key=lambda t: t[0])
    text = analyse(a.csv, name, sass, a.top, a.min_match, f"at {warps} warps, ")[2]
    print(f"{a.kernel} at d {a.d}, {warps} warps, {stages} stages, triton {triton.__version__}\n{text}")


if __name__ == "__main__":
    main()
