#!/usr/bin/env bash
# Pack a trimmed copy of the pinned llama.cpp source for machines without a package registry
# (a GPU box, an air-gapped server): ggml with the CPU and CUDA backends only, src, include,
# common, vendor, cmake, the tools lwq-gguf uses (quantize, perplexity, imatrix, and completion
# for bench/gpu.py check),
# convert_hf_to_gguf.py with its conversion/ package, and gguf-py. About 4 MB instead of 76.
#
#   vendor/pack_llama_src.sh OUT.tar.gz
#   # on the other machine:
#   LWQ_LLAMA_SRC=OUT.tar.gz LWQ_CUDA=1 vendor/build_llama_cpp.sh
set -euo pipefail
out=$(realpath -m "${1:?usage: vendor/pack_llama_src.sh OUT.tar.gz}")
here=$(cd "$(dirname "$0")" && pwd)
root=$(bash "$here/build_llama_cpp.sh")
src="$root/src"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/llama.cpp"
cd "$src"
keep=(CMakeLists.txt LICENSE licenses cmake common include src ggml vendor tools/quantize
      tools/perplexity tools/imatrix tools/completion convert_hf_to_gguf.py conversion gguf-py)
tar -cf - --exclude=vendor/llama.cpp --exclude='*/__pycache__' \
    $(for b in ggml/src/ggml-*/; do case $b in */ggml-cpu/|*/ggml-cuda/) ;; *) echo "--exclude=${b%/}";; esac; done) \
    "${keep[@]}" | tar -xf - -C "$tmp/llama.cpp"
cat >"$tmp/llama.cpp/tools/CMakeLists.txt" <<'CM'
# trimmed by lwq-gguf vendor/pack_llama_src.sh: only the tools lwq-gguf runs
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(completion)
add_subdirectory(imatrix)
add_subdirectory(perplexity)
add_subdirectory(quantize)
CM
mkdir -p "$tmp/llama.cpp/app"  # the all-in-one `llama` app links tools left out here
echo "# trimmed by lwq-gguf vendor/pack_llama_src.sh" >"$tmp/llama.cpp/app/CMakeLists.txt"
tar -czf "$out.partial" -C "$tmp" llama.cpp
mv "$out.partial" "$out"
echo "$out ($(du -h "$out" | cut -f1))"
