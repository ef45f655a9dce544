set -u
SMEM_TESTS_S=150 SMEM_S=150 OUT=$OUT timeout 330 bash benchmarks/run_on_gpu.sh "setup smem"
export PYTHONPATH=/tmp/site
timeout 170 ncu --clock-control none -k regex:smem_bwd -c 1 --section SourceCounters --section LaunchStats --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --import-source yes --export $OUT/smem_bwd python3 -m benchmarks.bench_mlp --skip-check --only fwd --variants smem --shapes 16x2048x32x64 2>&1 | grep -v Warn | tail -5
ncu --import $OUT/smem_bwd.ncu-rep --print-summary none 2>&1 | grep -E "Duration|Registers|Shared Memory|Throughput|Stall|Warp Cycles|Issued|Executed Ipc|Achieved" | head -40
ncu --import $OUT/smem_bwd.ncu-rep --page source --print-source sass --csv 2>/dev/null | gzip > $OUT/bwd_sass.csv.gz
ls -la $OUT
