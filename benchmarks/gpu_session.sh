#!/usr/bin/env bash
# Every GPU measurement of this project in one prepared run, for a lent GPU machine (an H200
# there has JAX, numba and h5py but no TensorFlow and no Keras 3: Keras travels as wheels).
#
# Prepare on the development machine, once per checkout (about 2 MB of wheels):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl keras==3.15.1 namex==0.1.0 optree==0.20.0
# Then, with the device tool: run(command="bash benchmarks/gpu_session.sh", carry=[".whl"],
# timeout_s=580). Results come back under $OUT: unet_throughput.json, train_throughput.json
# and the logs; copy the figures into README.md (finetuning section's GPU table, the
# pretraining section's GPU paragraph and "Benchmarks at a glance").
#
# Smoke test on a CPU (both scripts' --tiny), e.g. here:
#   PATH=.venv/bin:$PATH EXTRA=--tiny OUT=/tmp/gpu_smoke bash benchmarks/gpu_session.sh
#
# Each step has its own time limit, so one slow compilation cannot cost the other's figures.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
EXTRA=${EXTRA:-}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
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
