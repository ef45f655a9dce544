set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
: > /tmp/site/mamba_ssm/__init__.py
export PYTHONPATH=/tmp/site
timeout -s INT 120 python3 -m pytest -q -n 8 tests/test_gpu.py tests/test_fused_layer.py tests/test_decode_compile.py -k "decode or generate" -rA 2>&1 | grep -E "FAIL|ERROR|passed|failed" | tail -8
D16_TESTS_S=1 D16_TABLE_S=110 D16_PROFILE_S=100 D16_KERNEL_S=70 D16_CODE_S=1 OUT=$OUT timeout 300 bash benchmarks/run_on_gpu.sh "decode16" 2>&1 | grep -v "^=\|KeyboardInt"
