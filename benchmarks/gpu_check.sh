#!/usr/bin/env bash
# GPU check for taskloom (GitHub issue 5), one run, under 8 minutes on one GPU:
#   1. the test suite (tests that build their own device use CPU; the batched-towers and
#      checkpointing tests run on CUDA via TASKLOOM_TEST_DEVICE=cuda),
#   2. the step-time benchmark on CUDA in fp32, with bf16 autocast, and with bf16 + channels_last.
# Worst case 60 + 150 + 3 x 90 s = 8 min. Results: benchmarks/results/gpu_*.json and gpu_check.log; copy the tables and the card into
# benchmarks/README.md. Usage, from the repository root:  bash benchmarks/gpu_check.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
exec > >(tee "$LOG") 2>&1
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1

echo "== tests on CUDA (batched towers, checkpointing, no waits inside a step) =="
TASKLOOM_TEST_DEVICE=cuda timeout 60 "$PY" -m pytest -q tests/test_batched_towers.py tests/test_checkpointing.py tests/test_epoch_sums.py
echo "== full test suite =="
timeout 150 "$PY" -m pytest -q -x

COMMON=(--device cuda --threads 4 --rounds 15 --warmup 3 --sections fusion batched checkpoint inference
        --backbones lenet tcdcn resnet18 --ks 3 5 --memory)
echo "== step time fp32 =="
timeout 90 "$PY" benchmarks/step_time.py "${COMMON[@]}" --json "$OUT/gpu_fp32.json"
echo "== step time bf16 autocast =="
timeout 90 "$PY" benchmarks/step_time.py "${COMMON[@]}" --bf16 --json "$OUT/gpu_bf16.json"
echo "== step time bf16 autocast + channels_last =="
timeout 90 "$PY" benchmarks/step_time.py "${COMMON[@]}" --bf16 --channels-last --json "$OUT/gpu_bf16_cl.json"
date -u
