#!/usr/bin/env bash
# The GPU check in one device call: install the carried wheels, build the pinned llama.cpp with
# CUDA (sm_90) from the carried source, then `bench/gpu.py check` (CUDA score of the 1B shape,
# generated here; a mixed file from it; CUDA against CPU perplexity; llama-completion with every
# layer offloaded). Prepare on a machine with a registry, then run on the device:
#   bash bench/gpu_payload.sh                  # .whl/ and .xfer/ (git-excluded), under 64 MiB
#   run: bash bench/gpu_check.sh  carry: [".whl", ".xfer"]  timeout 600
# Writes $OUT/gpu-check.json and .md (each step saved as it ends, setup and build times
# included); copy them to bench/results/ as they are. Steps that would start after 9 minutes
# are skipped and say so.
set -uo pipefail
export PYTHONUNBUFFERED=1 LWQ_CACHE=/root/lwqcache PYTHONPATH=/tmp/site:$PWD
out=${OUT:-$PWD/out/gpu}; mkdir -p "$out"
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
  || { echo "gpu_check: wheel install failed" >&2; exit 1; }
cp -r .xfer/site/llama_cpp /tmp/site/
mkdir -p models/smollm2-135m && cp .xfer/tok/* models/smollm2-135m/  # the 1B shape's tokenizer
text=.xfer/wiki.test.raw
[ -f "$text" ] || text=$(python3 -c "from lwq_gguf.score.scores import default_calibration as d; print(d())")
b0=$(date +%s)
if ! LWQ_LLAMA_SRC=$PWD/.xfer/llama-src.tar.gz LWQ_CUDA=1 LWQ_CUDA_ARCH=90 LWQ_JOBS=$(nproc) \
     bash vendor/build_llama_cpp.sh >/tmp/build.out 2>/tmp/build.err; then
  tail -40 /tmp/build.err; cp /tmp/build.err "$out/gpu-check-build.err"; exit 1
fi
LWQ_LLAMA_CPP=$(cat /tmp/build.out) LWQ_GPU_SETUP_S=$((b0 - t0)) \
  LWQ_GPU_BUILD_S=$(($(date +%s) - b0)) \
  python3 bench/gpu.py check --work /tmp/gpuwork --text "$text" --chunks 8 \
    --deadline $((t0 + 540)) --results "$out/gpu-check.json"
echo "gpu_check: $(($(date +%s) - t0)) s in all"
