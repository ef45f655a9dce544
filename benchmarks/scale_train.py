"""Training throughput on 1 GPU and 2 GPUs (DDP, FSDP2) with the `ttt train` CLI, as users run it.

    NCCL_NVLS_ENABLE=0 python3 benchmarks/scale_train.py --data .gpudata/stdlib32k --out /tmp/scale

Each configuration trains the same model from scratch for --steps optimizer steps (125m TTT-Linear,
2k context, micro-batch 8, 32k tokens per step, compiled blocks by default) and logs a metrics row
every 5 steps; the table gives the median and the mean tokens/s of the steps after the first 5
(compilation and warm-up), and the speed-up over one GPU. 2-GPU runs go through
`torchrun --standalone --nproc_per_node 2`. A dataset missing at --data is prepared first
(`ttt data stdlib --vocab-size 32000`, a minute or two on the CPU). Each run has its own time limit;
a failed run is reported in the table with the end of its log. Writes OUT/scale_train.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {  # name -> (processes, extra CLI flags)
    "1 GPU": (1, ["--parallel", "none"]),
    "2 GPUs DDP": (2, ["--parallel", "ddp"]),
    "2 GPUs FSDP2": (2, ["--parallel", "fsdp"]),
    "2 GPUs FSDP2 no-reshard": (2, ["--parallel", "fsdp", "--no-fsdp-reshard"]),
}


def run(name: str, procs: int, flags: list[str], args, env) -> dict:
    out = Path(args.out) / name.replace(" ", "_").replace(",", "")
    shutil.rmtree(out, ignore_errors=True)
    launch = [sys.executable, "-m", "ttt.cli"] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m", "ttt.cli"]
    cmd = launch + ["train", "--data", args.data, "--out", str(out), "--size", args.size, "--mixer", args.mixer,
                    "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
                    "--tokens-per-step", str(args.tokens_per_step), "--max-steps", str(args.steps),
                    "--eval-every", "0", "--save-every", "0", "--log-every", "5", "--no-progress",
                    "--compile" if args.compile else "--no-compile"] + flags
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        rc, log = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        rc, log = "timeout", text(e.stdout) + text(e.stderr)
    wall = time.perf_counter() - t0
    rows = []
    if (out / "metrics.jsonl").exists():
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = [r for r in rows if r["step"] > 5 and r.get("tokens_per_s")]
    res = {"name": name, "procs": procs, "rc": rc, "wall_s": round(wall, 1), "rows": rows}
    if timed:
        res["median_tok_s"] = statistics.median(r["tokens_per_s"] for r in timed)
        # every row covers 5 steps: the mean rate over all of them is total tokens / total time
        res["mean_tok_s"] = len(timed) / sum(1 / r["tokens_per_s"] for r in timed)
        res["loss_last"] = rows[-1]["loss"]
    if rc != 0 or not timed:
        res["log_tail"] = log[-3000:]
        print(f"[{name}] failed (rc {rc}):\n{log[-3000:]}", flush=True)
    else:
        print(f"[{name}] median {res['median_tok_s']:,.0f} tok/s, wall {wall:.0f} s", flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="dataset dir (prepared here with `ttt data stdlib` when missing)")
    ap.add_argument("--out", default="/tmp/scale_train", help="run dirs and scale_train.json")
    ap.add_argument("--size", default="125m")
    ap.add_argument("--mixer", default="ttt_linear")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--tokens-per-step", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=25, help="optimizer steps per run (timed: those after step 5)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--only", default=None, help="comma-separated subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--timeout", type=int, default=150, help="seconds per run")
    args = ap.parse_args()
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if not (Path(args.data) / "meta.json").exists():
        print(f"preparing {args.data} (ttt data stdlib --vocab-size 32000)", flush=True)
        subprocess.run([sys.executable, "-m", "ttt.cli", "data", "stdlib", "--out", args.data, "--vocab-size", "32000"],
                       env=env, check=True)
    import torch
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (CPU processes, gloo)"
    print(f"torch {torch.__version__}, {torch.cuda.device_count()} x {gpu}", flush=True)
    names = list(CONFIGS) if args.only is None else [n.strip() for n in args.only.split(",")]
    results = [run(n, *CONFIGS[n], args, env) for n in names]
    base = next((r.get("median_tok_s") for r in results if r["procs"] == 1), None)
    print(f"\n{args.size} {args.mixer}, seq {args.seq_len}, micro-batch {args.micro_batch}, "
          f"{args.tokens_per_step} tokens/step, compile {args.compile}; tokens/s of steps 6-{args.steps}")
    print("| configuration | median tokens/s | mean tokens/s | vs 1 GPU | loss at the last step | wall s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "median_tok_s" not in r:
            print(f"| {r['name']} | failed (rc {r['rc']}) | | | | {r['wall_s']} |")
            continue
        rel = f"{r['median_tok_s'] / base:.2f}x" if base else "-"
        print(f"| {r['name']} | {r['median_tok_s']:,.0f} | {r['mean_tok_s']:,.0f} | {rel} | {r['loss_last']:.4f} "
              f"| {r['wall_s']} |")
    (Path(args.out) / "scale_train.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
