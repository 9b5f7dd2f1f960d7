#!/usr/bin/env bash
# Every GPU benchmark in one go: the U-Net alone, then pre-training end to end (real input
# pipeline), the GPU step alone and the pipeline alone. Figures go to $OUT (default gpu_out/):
# machine.txt, unet_throughput.json, train_throughput.json and the logs; docs/benchmarks.md
# says how to read them.
#
# On a GPU machine with the requirements installed and JAX with CUDA (TensorFlow is not needed):
#   KERAS_BACKEND=jax bash benchmarks/run_gpu_benchmarks.sh
# Smoke test on a CPU (both benchmarks' --tiny):
#   PATH=.venv/bin:$PATH EXTRA=--tiny OUT=/tmp/gpu_smoke bash benchmarks/run_gpu_benchmarks.sh
#
# Each step has its own time limit, so one slow compilation cannot cost the other's figures.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
EXTRA=${EXTRA:-}
mkdir -p "$OUT"
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc;
  python3 -c "import jax, keras; print('jax', jax.__version__, jax.devices()); print('keras', keras.__version__)"; } \
    2>&1 | tee "$OUT/machine.txt"

# U-Net alone: forward+backward cubes/s, batch 6 and 32, float32 and mixed bfloat16, both layouts.
timeout 220 python3 benchmarks/gpu_unet_throughput.py $EXTRA --json "$OUT/unet_throughput.json" \
    2>&1 | tee "$OUT/unet.log"
echo "gpu_unet_throughput exit: $?" | tee -a "$OUT/unet.log"

# Pre-training end to end (real pipeline feeding the GPU), GPU step alone, pipeline alone.
timeout 320 python3 benchmarks/gpu_train_throughput.py $EXTRA --sweep --workers "$(nproc)" \
    --json "$OUT/train_throughput.json" 2>&1 | tee "$OUT/train.log"
echo "gpu_train_throughput exit: $?" | tee -a "$OUT/train.log"
