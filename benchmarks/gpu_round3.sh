#!/usr/bin/env bash
# Round-3 GPU runs (H100). Each part has its own time limit and prints as it goes.
#   OUT=/tmp/r3 COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_round3.sh "tests linbwd mlp"
# Parts: tests (pytest -m gpu), check (bench_op correctness checks), linbwd (TTT-Linear fwd+bwd, backward
# kernels v1/v2/v3), mlp (TTT-MLP d = 64 register vs F-blocked kernels, d = 128), decode (bench_model decode,
# eager / graphed / compiled graphed), train (bench_model training tok/s), profile (125m training step).
set -u
export PYTHONPATH=.
OUT=${OUT:-/tmp/r3}
PARTS=" ${1:-tests} "
mkdir -p "$OUT"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
B="python3 benchmarks/bench_op.py --quick --skip fla --commit ${COMMIT:-}"
has() { [[ $PARTS == *" $1 "* ]]; }
has tests && timeout -s INT ${TESTS_S:-280} python3 -m pytest -q -m gpu tests/test_triton.py tests/test_gpu.py -rA --durations=8 2>&1 \
  | grep -E "PASS|FAIL|ERROR|passed|failed|s call" | tail -40
has check && timeout 200 $B --out "$OUT/check" --only check 2>&1 | grep -v Warn
has linbwd && timeout 150 $B --out "$OUT/linbwd" --only fwdbwd --kinds linear --skip fla,sdpa --Ts ${LIN_TS:-2048,8192,32768} \
  --variants bv1,bv3 2>&1 | grep -v Warn
has mlp && timeout 200 $B --out "$OUT/mlp" --only fwd,fwdbwd --kinds mlp --skip fla,sdpa --Ts 8192 --dims 64,128 \
  --variants "${MLP_VARIANTS:-blk1x32x4}" 2>&1 | grep -v Warn
has decode && timeout ${DECODE_S:-420} python3 benchmarks/bench_model.py --decode --positions 1024,8192,32768 \
  --out "$OUT/decode.json" 2>&1 | grep -v Warn | tail -30
has train && timeout 300 python3 benchmarks/bench_model.py --train --mixers ttt_linear,attention ${TRAIN_ARGS:-} \
  --out "$OUT/train.json" 2>&1 | tail -20
has profile && timeout 200 python3 benchmarks/profile_model.py --train --T 8192 2>&1 | head -40
exit 0
