#!/usr/bin/env bash
# The GPU check of the paper configuration, in one run of under 8 minutes (needs one CUDA device):
#   0. bench_amp: ViT-S training images/s at fp32 and bf16 autocast (batch 128, 224 px), their
#      ratio and each one's peak memory (runtime.precision, issue 28);
#   1. the micro paper run (tests/stages/test_paper_path.py) with runtime.device cuda;
#   2. bench_speed and bench_mimicry on cuda;
#   3. bench_data on cuda (JPEG decode on the device vs a ViT-S training step).
# Each step has its own time limit (seconds below, 450 in all): one that overruns is stopped,
# marked failed, and the next one runs.
# Results go to benchmarks/results/gpu/ (JSON, the micro run's metrics and report, logs).
# Usage, from the repository root with the venv active:   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/gpu
mkdir -p "$OUT"
python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device visible")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" || true
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true TQDM_DISABLE=1
status=0
start=$SECONDS
timeout 90 python -m benchmarks.bench_amp --device cuda --batch 128 --json-out "$OUT/bench_amp.json" 2>&1 \
  | tee "$OUT/bench_amp.log" || status=1
RECAST_MICRO_DEVICE=cuda RECAST_MICRO_KEEP="$OUT/paper_micro" \
  timeout 210 python -m pytest -q -s -p no:cacheprovider tests/stages/test_paper_path.py 2>&1 \
  | tee "$OUT/paper_micro.log" || status=1
timeout 60 python -m benchmarks.bench_speed --device cuda --json-out "$OUT/bench_speed.json" 2>&1 \
  | tee "$OUT/bench_speed.log" || status=1
timeout 45 python -m benchmarks.bench_mimicry --device cuda --json-out "$OUT/bench_mimicry.json" 2>&1 \
  | tee "$OUT/bench_mimicry.log" || status=1
timeout 45 python -m benchmarks.bench_data --device cuda --json-out "$OUT/bench_data.json" 2>&1 \
  | tee "$OUT/bench_data.log" || status=1
echo "gpu_check: results in $OUT (exit $status, $((SECONDS - start)) s)"
exit $status
