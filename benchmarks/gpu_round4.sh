#!/usr/bin/env bash
# Round-4 GPU runs (H200). Each part has its own time limit and prints as it goes.
#   OUT=/tmp/r4 COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_round4.sh "setup tests model op"
# Parts: setup (install carried wheels from .whl/: fla, mamba_ssm), tests (pytest -m gpu), sanitize
# (compute-sanitizer memcheck on one small run of each kernel), model (bench_model: fast-vs-reference check,
# 125m training tok/s eager+compiled, 1.3b prefill), op (bench_op with SDPA, fla, mamba_ssm peers), decode,
# profile (kernel-time tables of the 1.3b prefill and the 125m training step).
set -u
export PYTHONPATH=/tmp/site:.
OUT=${OUT:-/tmp/r4}
PARTS=" ${1:-tests} "
mkdir -p "$OUT"
has() { [[ $PARTS == *" $1 "* ]]; }
if has setup && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
has tests && timeout -s INT ${TESTS_S:-240} python3 -m pytest -q -m gpu ${TEST_FILES:-tests/test_gpu.py tests/test_fused_layer.py} \
  -x -rA 2>&1 | grep -E "PASS|FAIL|ERROR|passed|failed|Error" | tail -40
has sanitize && timeout 120 compute-sanitizer --tool memcheck --print-limit 5 python3 benchmarks/kernel_smoke.py \
  ${SMOKE:-fused} 2>&1 | grep -vE "Warn|^$" | tail -8
has model && timeout ${MODEL_S:-420} python3 benchmarks/bench_model.py ${MODEL_ARGS:---check --train --prefill} \
  --out "$OUT/model.json" 2>&1 | grep -v Warn | tail -60
has op && timeout ${OP_S:-300} python3 benchmarks/bench_op.py --quick --only ${OP_ONLY:-fwd,fwdbwd} --kinds ${KINDS:-linear} \
  ${OP_ARGS:-} --out "$OUT/op" --commit "${COMMIT:-}" 2>&1 | grep -vE "Warn" | tail -60
has decode && timeout ${DECODE_S:-300} python3 benchmarks/bench_model.py --decode --positions 1024,32768 \
  --out "$OUT/decode.json" 2>&1 | grep -v Warn | tail -20
has profile && timeout 200 python3 benchmarks/profile_model.py ${PROFILE_ARGS:---prefill --train} 2>&1 | head -80
exit 0
