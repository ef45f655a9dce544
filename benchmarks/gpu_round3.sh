#!/usr/bin/env bash
# Round-3 GPU run (H100): GPU tests, then op-level checks and timings of the round-3 kernel variants.
#   OUT=/tmp/r3 COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_round3.sh "tests op"
# Parts: tests (pytest -m gpu), op (bench_op checks + fwd/fwdbwd variants), decode (bench_model decode),
# train (bench_model training tok/s, eager), profile (kernel-time tables of a 125m training step).
set -u
export PYTHONPATH=.
OUT=${OUT:-/tmp/r3}
PARTS=" ${1:-tests op} "
mkdir -p "$OUT"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
if [[ $PARTS == *" tests "* ]]; then
  timeout 300 python3 -m pytest -q -m gpu tests/test_triton.py tests/test_gpu.py -x 2>&1 | tail -25
fi
if [[ $PARTS == *" op "* ]]; then
  timeout 400 python3 benchmarks/bench_op.py --out "$OUT/op" --only check,fwd,fwdbwd --quick \
    --Ts 2048,8192,32768 --dims 64,128 --skip fla --commit "${COMMIT:-}" \
    --variants "${VARIANTS:-split,bv1,bv3,blk1x32x8,blk1x64x8,blk1x32x4,blk1x16x4}" 2>&1 | grep -v Warning
fi
if [[ $PARTS == *" decode "* ]]; then
  timeout 400 python3 benchmarks/bench_model.py --decode --out "$OUT/decode.json" 2>&1 | grep -v Warning | tail -30
fi
if [[ $PARTS == *" train "* ]]; then
  timeout 400 python3 benchmarks/bench_model.py --train --mixers ttt_linear,attention --out "$OUT/train.json" 2>&1 | tail -20
fi
if [[ $PARTS == *" profile "* ]]; then
  timeout 300 python3 benchmarks/profile_model.py --train --T 8192 2>&1 | head -45
  timeout 300 python3 benchmarks/profile_model.py --train --T 8192 --mixer attention 2>&1 | head -45
fi
