#!/usr/bin/env bash
# GPU tests and benchmarks, by part, each with its own time limit, printing as it goes (repository root):
#   OUT=/tmp/gpu timeout 540 bash benchmarks/run_on_gpu.sh "setup tests op"
# Parts:
#   setup     install the wheels carried in .whl/ (fla, mamba_ssm, lm_eval; how they are made: docs/benchmarks.md)
#             into /tmp/site, which is on PYTHONPATH for every part
#   tests     every test marked gpu (pytest -m gpu): kernels against the dual form at full shapes, the model,
#             CUDA-graph decode, the fused layer kernels, mamba_ssm
#   sanitize  compute-sanitizer memcheck over one small run of every kernel
#   op        benchmarks/bench_op.py: checks, then TTT-Linear and TTT-MLP forward and forward+backward at
#             B*T = 32k tokens, H = 32 x d = 64, beside SDPA (OP_ARGS="--skip ''" adds the fla and mamba_ssm peers)
#   linbwd    benchmarks/bench_linear_bwd.py (the split backward's variants);  mlp: benchmarks/bench_mlp.py
#   table     benchmarks/bench_table.py: every row of issue 16's table with its peers, checks first (TABLE_PARTS;
#             TABLE_ARGS: its case selection, default "--mixers ttt_linear+fused,ttt_linear+fused@graphs,attention,
#             mamba2_module": TTT-Linear as it runs by default (the fused layer; in training CUDA graphs of the
#             compiled blocks, `ttt train --compile`'s default in one process, and the default compile beside them)
#             and the milestones' peers (Transformer++'s graphs row reads the same as its default one); a selection
#             of one's own replaces it, e.g. "--mixers ttt_linear,ttt_linear+fused,attention" (the PyTorch layer
#             path too) or "--contexts 8192")
#   issue16   issue 16's short round (~7 min): the fused layer's tests on CUDA, the conv kernels at 125m B4 T8k,
#             then bench_table's checks and 125m training at 8k and 2k (ttt_linear+fused: the default; ttt_linear: the
#             PyTorch layer path; Transformer++), then the fused decode at 1k (I16_DECODE_MIXERS=ttt_linear,ttt_linear+fused
#             adds the PyTorch layer path's decode beside it)
#   decode16  the decode round (~9 min with a fresh machine): the GPU tests of the decode, generate and training
#             (8 workers), the decode table at 1k and 32k, the decode profile inside the graphs, the fused decode
#             kernel alone (arguments apart and as the model hands them over), the GEMMs alone (weights from memory and
#             from L2), Inductor's generated code of the decode step (decode_code.log.gz)
#   layer     benchmarks/bench_layer_kernels.py (the fused layer's conv + RoPE kernels; LAYER_ARGS)
#   gemms     the 1.3b decode's four products: cuBLAS, and ttt.ops.rows_mm at the launches of ROWS_MM (space-separated
#             "BN,BK,splits,warps,stages,swap"; default: ROWS_MM_DEFAULT below), one JSON line each (us, TB/s)
#   smem      the shared-memory TTT-MLP kernels (Gluon): their GPU tests, then bench_mlp's checks and fwd / fwd+bwd
#             timings of regs-w8, blocked and smem beside TTT-Linear and SDPA at B16 T2048, D = 2048 (d 64 and 128)
#   model     benchmarks/bench_model.py (MODEL_ARGS);  decode: its decode timings;  profile: profile_model.py
#   ncu       Nsight Compute on one launch (the second) of one kernel (NCU_KERNEL, a regex, default smem_bwd) of one
#             command (NCU_CMD, default bench_mlp's smem timing at B16 T2048 H32 d64): the details page's last 70 lines,
#             and per SASS instruction its samples and counters in $OUT/ncu_source.csv.gz, which
#             benchmarks/ncu_lines.py maps to source lines on a machine without a GPU (the report: $OUT/ncu.ncu-rep)
#   ab        one benchmark module (AB_MODULE, default benchmarks.bench_mlp; its arguments AB_ARGS) run in the working
#             tree, then in each snapshot of benchmarks/.ab/ (made by benchmarks/ab_snapshots.sh; AB_SNAPS: only these,
#             space-separated), lines prefixed with the snapshot's commit: earlier commits timed beside the working
#             tree in one command (two modules over different snapshots: call the part twice with AB_SNAPS)
#   packed    the packed-document GPU tests (tests/test_packed.py, tests/test_triton_packed.py; the fused layer's
#             packed tests on CUDA), then benchmarks/bench_packed.py: packed documents vs padded, training per mixer and the op (PACKED_ARGS)
#   train     `ttt train` of 125m TTT-Linear and Transformer++ for STEPS steps on DATA (a `ttt data` directory),
#             with TRAIN_ARGS (default --compile; TRAIN_ARGS= for eager)
# I16_CONTEXTS, I16_MIXERS: issue16's training contexts (default 8192,2048) and mixers (default
# ttt_linear+fused,ttt_linear,attention; bench_table's names, e.g. add mamba2_module).
# TESTS_ARGS: the tests part's pytest paths and options (default tests/). Serially tests/test_gpu.py alone compiles
# models for ~6 min; with the image's pytest-xdist, TESTS_ARGS="-n 8 tests/" ran every GPU test in 262 s (H200), and
# in more than 320 s later (H200, c40ab57): give it TESTS_S=540, alone in a command.
# Time limits (seconds): I16_TESTS_S, I16_LAYER_S, I16_TRAIN_S, I16_DECODE_S, D16_TESTS_S, D16_TABLE_S,
# D16_PROFILE_S, D16_KERNEL_S, D16_CODE_S, AB_S (each run), GEMMS_S, TESTS_S, SANITIZE_S, OP_S, LINBWD_S,
# MLP_S, SMEM_TESTS_S, SMEM_S, LAYER_S, TABLE_S, MODEL_S, DECODE_S, PROFILE_S, NCU_S, PACKED_TESTS_S, PACKED_FUSED_S,
# PACKED_S, TRAIN_S. PROFILE_LINES: the profile's output lines kept (default 80).
set -u
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/gpu}
PARTS=" ${1:-tests op} "
mkdir -p "$OUT"
has() { [[ $PARTS == *" $1 "* ]]; }
if has setup && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  # mamba_ssm built without its CUDA extension: its package __init__ imports that extension, the Triton kernels
  # ttt uses (mamba_ssm.ops.triton) do not
  if [[ -f /tmp/site/mamba_ssm/__init__.py ]]; then : > /tmp/site/mamba_ssm/__init__.py; fi
fi
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
if has issue16; then
  # the graphed decode tests are left to the decode step below (bench_decode checks its replays against eager steps)
  timeout -s INT "${I16_TESTS_S:-75}" python3 -m pytest -q -x tests/test_fused_layer.py tests/test_gpu.py -k \
    "(fused or conv) and not graphed_decode" -rA 2>&1 | grep -E "PASS|FAIL|ERROR|XFAIL|passed|failed|Error" | tail -50
  timeout "${I16_LAYER_S:-90}" python3 -m benchmarks.bench_layer_kernels --shapes 4x8192x768 \
    --launches default 8,64,1,12 16,64,1,8 --out "$OUT/layer16.json" 2>&1 | grep -v Warn | tail -12
  timeout "${I16_TRAIN_S:-210}" python3 -m benchmarks.bench_table --parts check,train --contexts "${I16_CONTEXTS:-8192,2048}" \
    --mixers "${I16_MIXERS:-ttt_linear+fused,ttt_linear,attention}" --out "$OUT/train16.json" 2>&1 | grep -v Warn | tail -12
  timeout "${I16_DECODE_S:-150}" python3 -m benchmarks.bench_table --parts decode --positions 1024 \
    --mixers "${I16_DECODE_MIXERS:-ttt_linear+fused}" --out "$OUT/decode16.json" 2>&1 | grep -v Warn | tail -8
fi
if has decode16; then
  # the decode round: the GPU tests of the decode, generate and the CUDA-graph training mode (8 workers), the decode
  # table, where the time goes inside the graphs, the fused decode kernel alone, Inductor's code
  timeout -s INT "${D16_TESTS_S:-240}" python3 -m pytest -q -n 8 -m gpu tests/test_gpu.py tests/test_fused_layer.py \
    tests/test_train.py -rA 2>&1 | grep -E "FAIL|ERROR|passed|failed" | tail -15
  timeout "${D16_TABLE_S:-110}" python3 -m benchmarks.bench_table --parts decode --mixers ttt_linear+fused \
    --positions 1024,32768 --out "$OUT/decode16.json" 2>&1 | grep -E "^\||rror|check"
  timeout "${D16_PROFILE_S:-110}" python3 -m benchmarks.profile_model --decode --decode-graphed --host \
    --decode-variants merged --mixers ttt_linear+fused 2>&1 | grep -A40 "compiled + CUDA graphs" | head -45
  timeout "${D16_KERNEL_S:-70}" python3 -m benchmarks.bench_layer_kernels --decode default 4 --gemms --out "$OUT/dk16.json" \
    2>&1 | grep -v '^{"device' | cut -c1-220
  TORCH_LOGS=output_code timeout "${D16_CODE_S:-100}" python3 -m benchmarks.profile_model --decode --decode-graphed \
    --mixers ttt_linear+fused > "$OUT/decode_code.log" 2>&1; gzip -f "$OUT/decode_code.log"
fi
# pytest stopped by SIGINT reports what ran; -k: killed if it does not stop. With pytest-xdist (-n) a worker can
# outlive its parent and keep the GPU busy under the next part's timings: `reap` ends every process on the GPU
reap() { nvidia-smi --query-compute-apps=pid --format=csv,noheader | xargs -r kill -9 2>/dev/null; sleep 1; }
# Each test's result is logged as it finishes (-v), so that a run stopped by its limit still says what passed (a
# killed pytest prints no summary: the full GPU suite with -n 8 ran past 320 s on an H200 and said nothing)
if has tests; then
  timeout -s INT -k 30 "${TESTS_S:-300}" python3 -m pytest -v -m gpu ${TESTS_ARGS:-tests/} -rfE > "$OUT/tests.log" 2>&1
  rc=$?
  echo "tests: exit $rc$([[ $rc == 124 || $rc == 137 ]] && echo " (stopped at TESTS_S)"), $(grep -c " PASSED" \
    "$OUT/tests.log") passed as they finished (the whole log: tests.log)"
  grep -E "FAILED|ERROR|^=+ .* in [0-9.]+s" "$OUT/tests.log" | tail -40
  reap
fi
has sanitize && timeout "${SANITIZE_S:-200}" compute-sanitizer --tool memcheck --print-limit 5 \
  python3 -m pytest -q -m gpu tests/test_gpu.py -k every_kernel 2>&1 | grep -vE "Warn|^$" | tail -8
has op && timeout "${OP_S:-200}" python3 -m benchmarks.bench_op --quick --only "${OP_ONLY:-check,fwd,fwdbwd}" \
  --kinds "${KINDS:-linear,mlp}" --Ts "${OP_TS:-2048,8192}" --skip "${OP_SKIP:-fla,mamba}" ${OP_ARGS:-} \
  --out "$OUT/op" 2>&1 | grep -vE "Warn" | tail -60
has linbwd && timeout "${LINBWD_S:-300}" python3 -m benchmarks.bench_linear_bwd 2>&1 | grep -v Warn | tail -40
has mlp && timeout "${MLP_S:-300}" python3 -m benchmarks.bench_mlp 2>&1 | grep -v Warn | tail -40
if has smem; then  # a hang in the tests (an exchange that never completes) leaves smem out of the timings
  timeout -s INT -k 10 "${SMEM_TESTS_S:-150}" python3 -m pytest -q -m gpu tests/test_triton_mlp.py tests/test_triton_packed.py -k smem -rA \
    >"$OUT/smem_tests.txt" 2>&1
  rc=$?
  grep -E "PASS|FAIL|ERROR|passed|failed|Error" "$OUT/smem_tests.txt" | tail -20
  variants=regs-w8,blocked,smem
  [[ $rc == 124 || $rc == 137 ]] && { echo "smem tests timed out: smem not timed"; variants=regs-w8,blocked; }
  timeout -k 10 "${SMEM_S:-140}" python3 -m benchmarks.bench_mlp --only fwd --variants "$variants" \
    --shapes 16x2048x32x64,16x2048x16x128 2>&1 | grep -v Warn | tail -30
fi
if has ab; then  # the working tree (".") first, then each snapshot, its lines prefixed with where they ran
  for dir in . benchmarks/.ab/*/; do
    [[ -d $dir ]] || continue
    label=$([[ $dir == . ]] && echo "working tree" || basename "$dir")
    [[ $dir == . || -z ${AB_SNAPS:-} || " $AB_SNAPS " == *" $label "* ]] || continue
    # Inductor's and Triton's caches per tree: a compiled graph cached by one tree was reused by another whose custom
    # ops' fake kernels give other shapes (the conv's partial sums), and its training step failed
    cache=/tmp/ab_cache/${label// /_}
    # the whole output kept in $OUT (ab_<label>.txt): the tables of every tree printed together at the end, so that
    # a command's output tail holds all of them
    (cd "$dir" && PYTHONPATH=.:$PYTHONPATH TORCHINDUCTOR_CACHE_DIR=$cache/inductor TRITON_CACHE_DIR=$cache/triton \
      timeout "${AB_S:-150}" python3 -m "${AB_MODULE:-benchmarks.bench_mlp}" \
      ${AB_ARGS:-} 2>&1 | grep -v Warn > "$OUT/ab_${label// /_}.txt")
    tail -3 "$OUT/ab_${label// /_}.txt" | sed "s/^/$label /"
  done
  for f in "$OUT"/ab_*.txt; do grep -E "^\|" "$f" | tail -24 | sed "s/^/$(basename "$f" .txt | cut -c4-) /"; done
fi
has table && timeout "${TABLE_S:-560}" python3 -m benchmarks.bench_table --parts "${TABLE_PARTS:-check,op,train,prefill,decode}" \
  ${TABLE_ARGS:---mixers ttt_linear+fused,ttt_linear+fused@graphs,attention,mamba2_module} --out "$OUT/table.json" 2>&1 | grep -v Warn | tail -80
ROWS_MM_DEFAULT="64,128,1,4,4,1 64,128,1,4,6,1 128,64,1,4,6,1 128,128,1,4,4,1 64,256,1,4,3,1 16,256,1,4,4,0
  64,128,4,4,4,1 64,128,4,4,6,1 64,128,2,4,4,1 64,128,2,4,6,1"
has gemms && timeout "${GEMMS_S:-150}" python3 -m benchmarks.bench_layer_kernels --gemms --rows-mm ${ROWS_MM:-$ROWS_MM_DEFAULT} \
  --out "$OUT/gemms.json" 2>&1 | grep -v -e Warn -e '^{"device' | cut -c1-260
has layer && timeout "${LAYER_S:-240}" python3 -m benchmarks.bench_layer_kernels ${LAYER_ARGS:-} --out "$OUT/layer.json" 2>&1 \
  | grep -v Warn | tail -60
has model && timeout "${MODEL_S:-420}" python3 -m benchmarks.bench_model ${MODEL_ARGS:---check --train --prefill} \
  --out "$OUT/model.json" 2>&1 | grep -v Warn | tail -60
has decode && timeout "${DECODE_S:-300}" python3 -m benchmarks.bench_model --decode --positions 1024,32768 \
  --out "$OUT/decode.json" 2>&1 | grep -v Warn | tail -20
has profile && timeout "${PROFILE_S:-200}" python3 -m benchmarks.profile_model ${PROFILE_ARGS:---prefill --train} 2>&1 \
  | head -"${PROFILE_LINES:-80}"
if has ncu; then  # (the source page's SASS has no line info: ncu_lines.py recompiles the kernel offline for it)
  rm -f "$OUT/ncu.ncu-rep" "$OUT/ncu_source.csv.gz"
  timeout "${NCU_S:-200}" ncu --clock-control none -k "regex:${NCU_KERNEL:-smem_bwd}" --launch-skip 1 -c 1 \
    --import-source yes --section SpeedOfLight --section Occupancy --section WarpStateStats --section SourceCounters \
    -o "$OUT/ncu" ${NCU_CMD:-python3 -m benchmarks.bench_mlp --skip-check --only fwd --variants smem --shapes 16x2048x32x64} \
    2>&1 | grep -v Warn | tail -8
  if [[ -f $OUT/ncu.ncu-rep ]]; then
    ncu -i "$OUT/ncu.ncu-rep" --page details | tail -70
    ncu -i "$OUT/ncu.ncu-rep" --page source --csv --print-source sass | gzip > "$OUT/ncu_source.csv.gz"
  fi
fi
has packed && timeout -s INT "${PACKED_TESTS_S:-120}" python3 -m pytest -q -m gpu tests/test_packed.py \
  tests/test_triton_packed.py -rA 2>&1 | grep -E "PASS|FAIL|ERROR|passed|failed|Error" | tail -30
has packed && timeout -s INT "${PACKED_FUSED_S:-120}" python3 -m pytest -q tests/test_fused_layer.py -k packed -rA 2>&1 \
  | grep -E "PASS|FAIL|ERROR|passed|failed|Error" | tail -30
has packed && timeout "${PACKED_S:-300}" python3 -m benchmarks.bench_packed ${PACKED_ARGS:-} --out "$OUT/packed.json" \
  2>&1 | grep -v Warn | tail -30
if has train; then
  for mixer in ${MIXERS:-ttt_linear attention}; do
    rm -rf "$OUT/train_$mixer"
    timeout "${TRAIN_S:-300}" python3 -m ttt.cli train --data "${DATA:?DATA: a dataset from ttt data}" \
      --out "$OUT/train_$mixer" --size 125m --mixer "$mixer" --seq-len 2048 --micro-batch 16 \
      --tokens-per-step 32768 --max-steps "${STEPS:-300}" --lr 3e-3 --eval-every 100 --eval-batches 3 \
      --save-every 0 --log-every 10 --no-progress ${TRAIN_ARGS---compile} 2>&1 | tail -4
  done
fi
exit 0
