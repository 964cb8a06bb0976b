#!/usr/bin/env bash
# The one GPU check of the flash kernel (at most 5 minutes on an H100), from the repo root:
#     bash benchmarks/gpu_check.sh
# It checks jattn.flash_attention against the float64 oracle on the GPU (bfloat16 and float32,
# forward and gradients, causal and BigBird) and against cuDNN at N=16384, and prints Markdown
# tables of TFLOP/s for jattn flash, jax.nn.dot_product_attention (xla, cudnn) and JAX's Pallas
# mha, the sliding-window speedup and the forward+backward temporary memory. Paste the output into
# benchmarks/RESULTS.md.
# CPU smoke test (tiny sizes, interpret mode): JATTN_GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh
# On the device, keep both streams (stderr has every measured cell in ms and TFLOP/s, should the
# run be cut short):
#     bash benchmarks/gpu_check.sh > gpu_check.md 2> gpu_check.err
# A hang cannot outlast JATTN_GPU_CHECK_TIMEOUT_S (default 330 s); output is unbuffered, so what was
# printed before a timeout is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"
exec timeout -k 10 "${JATTN_GPU_CHECK_TIMEOUT_S:-330}" "$PYTHON" benchmarks/gpu_bench.py "$@"
