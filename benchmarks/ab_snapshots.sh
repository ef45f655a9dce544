#!/usr/bin/env bash
# Earlier commits' ttt/ and benchmarks/ as snapshots under benchmarks/.ab/<commit>/ (git-ignored; pass
# "benchmarks/.ab" in the device run's carry), so that one GPU command times them beside the working tree
# (`run_on_gpu.sh ab`). From the repository root:
#   bash benchmarks/ab_snapshots.sh 17b09d8 520e5a2
#   AB_ARGS="--skip-check --only fwd --variants smem --shapes 16x2048x32x64" bash benchmarks/run_on_gpu.sh "setup ab"
set -eu
rm -rf benchmarks/.ab
for c in "$@"; do
  mkdir -p "benchmarks/.ab/$c"
  git archive "$c" ttt benchmarks | tar -x -C "benchmarks/.ab/$c"
done
