#!/usr/bin/env bash
# Issue 3's GPU figures in one prepared run for a lent device machine. Its python3 already holds torch
# with CUDA, numba, scipy, pandas, safetensors, click and tqdm, so nothing is installed. Results go under
# $OUT (default ./device-out). About 5 minutes on an H100/H200; give the run a timeout of 420 s.
#   bash benchmarks/device_check.sh
set -u
out=${OUT:-device-out}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
py=${PY:-python3}
nvidia-smi >"$out/nvidia-smi.txt" 2>&1
# per-matrix routes on Qwen2.5-7B shapes (naive fp32 svd vs exact vs fast)
timeout 120 "$py" benchmarks/bench_kernels.py --device cuda --model 7b 2>&1 | tee "$out/kernels_7b.txt"
# full analysis, 2 layers of 7B shapes, 2 steps, against the naive script in the same process
timeout 280 "$py" benchmarks/bench_analysis.py --model 7b --layers 2 --steps 2 --device cuda 2>&1 | tee "$out/analysis_7b.txt"
