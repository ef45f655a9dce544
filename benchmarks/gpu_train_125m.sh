#!/usr/bin/env bash
# Issue-3 GPU run: a few hundred steps of 125m TTT-Linear (M) and the Transformer++ baseline with the
# `ttt train` CLI on the same data, recording tokens/s; then the model-level benchmark.
#   usage (on the GPU machine, repo root): DATA=.gpudata/stdlib32k OUT=/some/dir bash benchmarks/gpu_train_125m.sh
# DATA: a dataset from `ttt data stdlib --out DATA --vocab-size 32000` (prepared on the CPU machine).
set -uo pipefail
export PYTHONPATH=.
STEPS=${STEPS:-300}
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
for mixer in ${MIXERS:-ttt_linear attention}; do
  run=/tmp/run_$mixer
  rm -rf "$run"
  timeout 300 python3 -m ttt.cli train --data "$DATA" --out "$run" --size 125m --mixer "$mixer" \
    --seq-len 2048 --micro-batch 16 --tokens-per-step 32768 --max-steps "$STEPS" --lr 3e-3 \
    --eval-every 100 --eval-batches 3 --save-every 0 --log-every 10 --no-progress 2>&1 | tail -4
  cp "$run/metrics.csv" "$OUT/train_${mixer}.csv" 2>/dev/null
done
timeout ${BENCH_TIMEOUT:-240} python3 benchmarks/bench_model.py --train --decode --out "$OUT/bench_model.json" 2>&1 | tail -30
