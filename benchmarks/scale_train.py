"""Training throughput on 1, 2, 4 and 8 GPUs (DDP, FSDP2) with the `ttt train` CLI, as users run it.

    NCCL_NVLS_ENABLE=0 python3 benchmarks/scale_train.py --data .gpudata/stdlib32k --out /tmp/scale \
        --sizes 125m,1.3b --seq-lens 2048,8192 --mixers ttt_linear,attention --gpus 1,2

Every (size, context, mixer) trains the same model from scratch for --steps optimizer steps on 1 GPU and
on each larger GPU count in each --layouts (ddp, fsdp, fsdp-noreshard), with the SAME global batch: tokens
per step = micro-batch x context x the largest GPU count asked for, so one GPU accumulates that many
micro-batches and N GPUs that many / N. Blocks are compiled by default. A metrics row is logged every
--log-every steps; the table gives the median tokens/s of the rows after the first (compilation and
warm-up), the speed-up over one GPU, the loss of the first logged row (equal across layouts up to
reduction-order rounding: the check column gives the largest difference from the one-GPU run), and
the peak GPU memory per GPU (polled with nvidia-smi, so it includes the CUDA context and PyTorch's cache).
Multi-GPU runs go through `torchrun --standalone`; NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and
the related settings are set for every run). Each run has its own time limit; a failed run is reported
with the end of its log. A dataset missing at --data is prepared first (`ttt data stdlib --vocab-size
32000`). Writes OUT/scale_train.json (all rows) and prints a markdown table. `--device cpu` runs the same
matrix with CPU processes (gloo) at tiny sizes: the CPU test of this script.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

LAYOUTS = {"ddp": ["--parallel", "ddp"], "fsdp": ["--parallel", "fsdp"],
           "fsdp-noreshard": ["--parallel", "fsdp", "--no-fsdp-reshard"]}
# micro-batch per GPU by (size, context): what fits an H200 with compiled blocks at bf16
MICRO = {("125m", 2048): 8, ("125m", 8192): 2, ("1.3b", 2048): 4, ("1.3b", 8192): 1}
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class MemoryPoll:
    """Peak memory.used (MiB) per GPU, read by nvidia-smi every 0.5 s while a run lasts (nothing on the CPU)."""

    def __init__(self, on: bool):
        self.peak: dict[int, int] = {}
        self.proc = None
        if on and shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits",
                                          "-lms", "500"], stdout=subprocess.PIPE, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                i, used = (int(v) for v in line.split(","))
            except ValueError:
                continue
            self.peak[i] = max(self.peak.get(i, 0), used)

    def stop(self) -> dict:
        if self.proc:
            self.proc.terminate()
            self.proc.wait()
        return {str(k): round(v / 1024, 1) for k, v in sorted(self.peak.items())}


def run(name: str, procs: int, flags: list[str], case: dict, args, env) -> dict:
    """One `ttt train` run; its metrics rows, median tokens/s after the first row, first loss, peak memory."""
    out = Path(args.out) / name.replace(" ", "_").replace(",", "").replace("/", "-")
    shutil.rmtree(out, ignore_errors=True)
    launch = [sys.executable, "-m", "ttt.cli"] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m", "ttt.cli"]
    cmd = launch + ["train", "--data", args.data, "--out", str(out), "--size", case["size"], "--mixer", case["mixer"],
                    "--seq-len", str(case["seq_len"]), "--micro-batch", str(case["micro"]),
                    "--tokens-per-step", str(case["tokens_per_step"]), "--max-steps", str(args.steps),
                    "--eval-every", "0", "--save-every", "0", "--log-every", str(args.log_every), "--no-progress",
                    "--device", args.device, "--compile" if args.compile else "--no-compile",
                    "--profile-steps", str(args.profile_steps)] + flags
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    mem = MemoryPoll(args.device == "cuda")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        rc, log = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        rc, log = "timeout", text(e.stdout) + text(e.stderr)
    wall = time.perf_counter() - t0
    res = {"name": name, **case, "procs": procs, "layout": flags, "rc": rc, "wall_s": round(wall, 1),
           "peak_mem_gb": mem.stop()}
    rows = []
    if (out / "metrics.jsonl").exists():
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    res["rows"] = rows
    skip = 1 + -(-args.profile_steps // args.log_every)  # the first row, and the rows the profiler slowed
    timed = [r for r in rows[skip:] if r.get("tokens_per_s")]
    if timed:
        res["median_tok_s"] = statistics.median(r["tokens_per_s"] for r in timed)
        res["loss_first"] = rows[0]["loss"]
    if rc != 0 or not timed:
        res["log_tail"] = log[-3000:]
        print(f"[{name}] failed (rc {rc}):\n{log[-3000:]}", flush=True)
    else:
        print(f"[{name}] median {res['median_tok_s']:,.0f} tok/s, wall {wall:.0f} s, peak GB {res['peak_mem_gb']}",
              flush=True)
    return res


def table(results: list[dict]) -> list[str]:
    lines = ["| size | context | mixer | GPUs | layout | median tokens/s | vs 1 GPU | first loss (max diff vs 1 GPU) | "
             "peak GB per GPU | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, group in itertools.groupby(results, key=lambda r: (r["size"], r["seq_len"], r["mixer"])):
        group = list(group)
        one = next((r for r in group if r["procs"] == 1 and "median_tok_s" in r), None)
        for r in group:
            head = f"| {key[0]} | {key[1]} | {key[2]} | {r['procs']} | {r['layout_name']} |"
            if "median_tok_s" not in r:
                lines.append(f"{head} failed (rc {r['rc']}) | | | | {r['wall_s']} |")
                continue
            rel = f"{r['median_tok_s'] / one['median_tok_s']:.2f}x" if one else "-"
            diff = f" ({abs(r['loss_first'] - one['loss_first']):.1e})" if one and r is not one else ""
            mem = max(r["peak_mem_gb"].values(), default=None)
            lines.append(f"{head} {r['median_tok_s']:,.0f} | {rel} | {r['loss_first']:.4f}{diff} | "
                         f"{mem if mem is not None else '-'} | {r['wall_s']} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="dataset dir (prepared here with `ttt data stdlib` when missing)")
    ap.add_argument("--out", default="/tmp/scale_train", help="run dirs and scale_train.json")
    ap.add_argument("--sizes", default="125m", help="comma-separated presets (default 125m)")
    ap.add_argument("--seq-lens", default="2048", help="comma-separated contexts (default 2048)")
    ap.add_argument("--mixers", default="ttt_linear", help="comma-separated mixers (default ttt_linear)")
    ap.add_argument("--gpus", default="1,2", help="comma-separated process counts (default 1,2)")
    ap.add_argument("--layouts", default="ddp,fsdp", help=f"for more than one process, of {tuple(LAYOUTS)}")
    ap.add_argument("--micro-batch", type=int, default=0, help="micro-batch per GPU (default: by size and context)")
    ap.add_argument("--steps", type=int, default=25, help="optimizer steps per run (default 25)")
    ap.add_argument("--log-every", type=int, default=5, help="steps per metrics row (default 5; row 1 is not timed)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="trace this many steps of every run after its first metrics row (ttt train --profile-steps): "
                         "each run dir gets profile/trace_rank<R>.json and kernels_rank<R>.txt (default 0: off)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--timeout", type=int, default=240, help="seconds per run (default 240)")
    args = ap.parse_args(argv)
    try:
        gpus = sorted({int(g) for g in args.gpus.split(",") if g})
    except ValueError:
        ap.error(f"--gpus: expected comma-separated integers, got {args.gpus!r}")
    layouts = [x for x in args.layouts.split(",") if x]
    if bad := [x for x in layouts if x not in LAYOUTS]:
        ap.error(f"--layouts: expected names from {tuple(LAYOUTS)}, got {bad}")
    env = {**os.environ, **NO_MULTICAST, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if not (Path(args.data) / "meta.json").exists():
        print(f"preparing {args.data} (ttt data stdlib --vocab-size 32000)", flush=True)
        subprocess.run([sys.executable, "-m", "ttt.cli", "data", "stdlib", "--out", args.data, "--vocab-size", "32000"],
                       env=env, check=True)
    import torch
    if args.device == "cuda":
        have = torch.cuda.device_count()
        if skipped := [g for g in gpus if g > have]:
            print(f"this machine has {have} GPU(s): skipping --gpus {skipped}", flush=True)
        gpus = [g for g in gpus if g <= have]
        print(f"torch {torch.__version__}, {have} x {torch.cuda.get_device_name() if have else 'no GPU'}", flush=True)
    results = []
    for size, seq, mixer in itertools.product(args.sizes.split(","), [int(s) for s in args.seq_lens.split(",")],
                                              args.mixers.split(",")):
        micro = args.micro_batch or MICRO.get((size, seq), 1)
        case = dict(size=size, seq_len=seq, mixer=mixer, micro=micro, tokens_per_step=micro * seq * max(gpus))
        for procs in gpus:
            for layout in (["none"] if procs == 1 else layouts):
                flags = ["--parallel", "none"] if procs == 1 else LAYOUTS[layout]
                name = f"{size} {mixer} {seq} {procs}x {layout}"
                results.append({**run(name, procs, flags, case, args, env), "layout_name": layout})
                tmp = Path(args.out) / "scale_train.json.tmp"  # a temp name, then renamed: never half a file
                tmp.write_text(json.dumps(results, indent=1))
                os.replace(tmp, tmp.with_suffix(""))
    print(f"\ncompile {args.compile}, {args.steps} steps, tokens/s of the metrics rows after the first "
          f"(each {args.log_every} steps); the same global batch at every GPU count")
    print("\n".join(table(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
