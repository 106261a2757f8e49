#!/usr/bin/env bash
# Every GPU figure in docs/benchmarks.md, in one go, on a machine with one CUDA GPU (about 6-8 minutes):
#
#   bash benchmarks/gpu_suite.sh [results-folder]      # default: ./gpu-results
#
# 1. training throughput of configs/gpu-124m.yaml, lmforge and transformers' LlamaForCausalLM, eager and compiled;
# 2. batch-1 decoding on the GPU, lmforge (eager and compiled step) against transformers' generate, and the
#    recurrent and convolutional models.
# Each stage has its own time limit so that one stuck stage still leaves the others' results.
set -u
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$out/gpu.txt"
timeout 300 "$py" benchmarks/gpu_throughput.py --vs-transformers --steps 15 --warmup 3 \
  --out "$out/train.json" 2>&1 | tee "$out/train.log"
timeout 170 "$py" benchmarks/decode_speed.py --device cuda --repeats 3 2>&1 | grep -v "Loading weights" \
  | tee "$out/decode.log"
