#!/usr/bin/env bash
# Pack what bench/gpu_check.sh needs on a GPU machine without a package registry, under the
# device tool's 64 MiB carry (run from the repository root, after `make setup`):
#   .whl/    transformers 4.57.6, tokenizers 0.22.2, huggingface_hub 0.36.2, diskcache, gguf
#            (the pinned gguf-py)
#   .xfer/   the trimmed llama.cpp source (vendor/pack_llama_src.sh), the llama_cpp bindings
#            package, the demo tokenizer (the generated 1B shape's) and wiki.test.raw when
#            ../shared has it
# Both are listed in .git/info/exclude. Then one device call: bash bench/gpu_check.sh, carrying
# [".whl", ".xfer"].
set -euo pipefail
cd "$(dirname "$0")/.."
ex=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$ex")"
for d in /.whl/ /.xfer/; do grep -qx "$d" "$ex" 2>/dev/null || echo "$d" >>"$ex"; done
rm -rf .whl .xfer; mkdir -p .whl .xfer/tok
pip=(.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12
     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
     --platform manylinux2014_x86_64 -d .whl)
"${pip[@]}" transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 diskcache==5.6.3
lc=$(cat .venv/lwq-llama-cpp)
.venv/bin/python -m pip wheel -q --no-deps "$lc/src/gguf-py" -w .whl
bash vendor/pack_llama_src.sh .xfer/llama-src.tar.gz
sp=$(.venv/bin/python -c "import importlib.util as u; print(u.find_spec('llama_cpp').submodule_search_locations[0])")
mkdir -p .xfer/site && cp -r "$sp" .xfer/site/ && rm -rf .xfer/site/llama_cpp/{__pycache__,server}
cp models/smollm2-135m/{tokenizer.json,tokenizer_config.json,special_tokens_map.json} .xfer/tok/
text=../shared/data/wikitext-2-raw/wiki.test.raw
[ -f "$text" ] && cp "$text" .xfer/
du -sh .whl .xfer; du -shc .whl .xfer | tail -1
