#!/usr/bin/env bash
# Issue 3's GPU figures in one prepared run for a lent device machine. Its python3 already holds torch
# with CUDA, numba, scipy, pandas, safetensors, click, tqdm and threadpoolctl, so nothing is installed.
# Results go under $OUT (default ./device-out), one file per part. Parts (default: all, in this order):
#   tests       the metric and engine tests on the CUDA device, against the float64 references (~1 min)
#   analysis28  the per-checkpoint figure: 28 layers of 7B shapes, base + 2 steps, exact (~3-4 min)
#   analysis2   2 layers of 7B shapes, 2 steps, exact and fast against the naive script (~2-3 min)
#   profile     where the time goes: per-operation timings on 7B matrices + torch.profiler of analyze (~1 min)
#   kernels     per-matrix routes on 7B shapes, naive fp32 SVD vs exact vs fast (~1 min)
#   bash benchmarks/device_check.sh [part ...]
set -u
out=${OUT:-device-out}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
py=${PY:-python3}
parts=${*:-tests analysis28 analysis2 profile kernels}
nvidia-smi >"$out/nvidia-smi.txt" 2>&1
for part in $parts; do
  echo "=== $part ($(date +%T))"
  case $part in
    tests) timeout 150 "$py" -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_metrics_spectrum.py \
             tests/test_metrics_geometry.py tests/test_metrics_subspace.py tests/test_metrics_norms.py -k cuda 2>&1 \
             | tee "$out/tests_cuda.txt" ;;
    profile) timeout 150 "$py" benchmarks/profile_analysis.py --device cuda --model 7b 2>&1 | tee "$out/profile_7b.txt" ;;
    kernels) timeout 120 "$py" benchmarks/bench_kernels.py --device cuda --model 7b --no-check 2>&1 | tee "$out/kernels_7b.txt" ;;
    analysis28) timeout 330 "$py" benchmarks/bench_analysis.py --model 7b --layers 28 --steps 2 --device cuda \
                  --skip-naive --exact-only 2>&1 | tee "$out/analysis_7b_28layers.txt" ;;
    analysis2) timeout 280 "$py" benchmarks/bench_analysis.py --model 7b --layers 2 --steps 2 --device cuda 2>&1 \
                 | tee "$out/analysis_7b.txt" ;;
    *) echo "unknown part: $part" ;;
  esac
done
echo "=== done ($(date +%T))"
