#!/usr/bin/env bash
# The GPU part of issue 13, ready to run on the GPU machine (16 cores) from the repo root:
# the small model's REST and gRPC throughput from 1 to 8 workers at c=64, appended to
# bench/RESULTS_GPU.md with date, machine, commit and torch version. The models load on
# cuda (device: auto); every worker holds its own copy and its own CUDA context.
# Then the heavy model with batching on, c=64, perf_analyzer over gRPC and HTTP, against
# its in-process batch-32 forward (the issue's >= 50 % target), at 1 and 4 workers
# (bench/run.py rows; bench/RESULTS_GPU_heavy_w*.md).
# Usage: bash bench/gpu_workers.sh [python]   (default: .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" bench/workers.py --workers 1 2 4 8 --concurrency 64 --duration 15 --append \
      --results bench/RESULTS_GPU.md
for n in 1 4; do
  "$PY" bench/run.py --workloads heavy --concurrency 64 --rounds 1 --duration 5 --no-mlserver \
        --no-install --no-release --serve-flags "--workers $n" --out "bench/RESULTS_GPU_heavy_w$n.md"
done
