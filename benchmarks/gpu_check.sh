#!/usr/bin/env bash
# The one GPU check of the flash kernel (at most 5.5 minutes on an H100), from the repo root:
#     bash benchmarks/gpu_check.sh
# It checks jattn.flash_attention against the float64 oracle on the GPU (bfloat16 and float32,
# forward and gradients, causal and BigBird) and against cuDNN at N=16384, and prints Markdown
# tables of TFLOP/s for jattn flash, jax.nn.dot_product_attention (xla, cudnn) and JAX's Pallas
# mha, the sliding-window speedup and the forward+backward temporary memory. Paste the output into
# benchmarks/RESULTS.md.
# CPU smoke test (tiny sizes, interpret mode): JATTN_GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh
# On the device, keep both streams (stderr has every measured cell in ms and TFLOP/s, and the
# traceback of anything that failed, should the run be cut short):
#     bash benchmarks/gpu_check.sh > gpu_check.md 2> gpu_check.err
# The correctness part and the throughput part run as two processes: a kernel that brings its
# process down (an illegal address is sticky) still leaves the throughput part its run. Both parts
# together cannot outlast JATTN_GPU_CHECK_TIMEOUT_S (default 330 s); output is unbuffered, so what
# was printed before a timeout is kept. The exit status is 1 if a correctness bar failed. Each part
# compiles its steps on threads (JATTN_COMPILE_THREADS, default the cores, at most 16); a part that
# dies by a signal runs once more on one compile thread.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export JATTN_GPU_CHECK_START="${JATTN_GPU_CHECK_START:-$(date +%s)}"
PYTHON="${PYTHON:-python3}"
deadline=$((JATTN_GPU_CHECK_START + ${JATTN_GPU_CHECK_TIMEOUT_S:-330}))
status=0
for part in correctness throughput; do
    left=$((deadline - $(date +%s)))
    if ((left <= 0)); then
        echo "gpu_check: no time left for the $part part" >&2
        status=1
        break
    fi
    timeout -k 10 "$left" "$PYTHON" benchmarks/gpu_bench.py --part "$part" "$@"
    code=$?
    # Killed by a signal of its own (not the timeout's): perhaps the compiling threads. Once more,
    # compiling one step at a time, in the time left.
    if ((code > 128 && code != 137)) && [ "${JATTN_COMPILE_THREADS:-}" != 1 ]; then
        left=$((deadline - $(date +%s)))
        if ((left > 0)); then
            echo "gpu_check: the $part part died (status $code); again on one compile thread" >&2
            JATTN_COMPILE_THREADS=1 timeout -k 10 "$left" "$PYTHON" benchmarks/gpu_bench.py --part "$part" "$@"
            code=$?
        fi
    fi
    if ((code != 0)); then
        echo "gpu_check: the $part part exited with status $code" >&2
        status=1
    fi
    if ((code == 2)); then  # no GPU: the other part would say the same
        status=2
        break
    fi
done
exit "$status"
