#!/usr/bin/env bash
# Build the pinned llama.cpp once, outside the clone, and print the install folder.
#
#   vendor/build_llama_cpp.sh            -> prints e.g. ~/.cache/lwq-gguf/llama.cpp-0.3.36-cpu-1a2b3c4d
#
# The folder is keyed by the pin, the cmake flags and the CPU model and feature flags (the build
# uses -march=native, without AMX: see below),
# so a fresh clone or a CI run on the same machine reuses it. It holds:
#   src/        the llama.cpp source vendored in the llama-cpp-python sdist (convert_hf_to_gguf.py, gguf-py)
#   bin/        llama-quantize, llama-perplexity, llama-imatrix (CUDA: llama-completion too) and
#               the shared libraries
#   sdist.tar.gz  the sdist itself (the Python bindings are installed from it)
#   .done       stamp written last
# Environment: LWQ_CACHE (default $XDG_CACHE_HOME/lwq-gguf, else ~/.cache/lwq-gguf), LWQ_CUDA=auto|0|1 (auto: on when nvcc is found
# and nvidia-smi lists a GPU), LWQ_CUDA_ARCH (default native; 90 for H100/H200), LWQ_JOBS (default:
# number of cores), LWQ_LLAMA_SRC=FILE.tar.gz: build from a trimmed source tarball made by
# vendor/pack_llama_src.sh instead of downloading the sdist (machines without a registry; no
# sdist.tar.gz is kept, so `make setup` cannot install the Python bindings from that folder).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck disable=SC1091
source <(grep -E '^[A-Z0-9_]+=' "$here/llama_cpp.pin")
cache=${LWQ_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lwq-gguf}
cuda=${LWQ_CUDA:-auto}
if [ "$cuda" = auto ]; then
  cuda=0
  if command -v nvcc >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then cuda=1; fi
fi
flags="-DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF"
if [ "$cuda" = 1 ]; then flags="$flags -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${LWQ_CUDA_ARCH:-native}"; fi
# No AMX: on a CPU that lists amx_int8 (Sapphire Rapids and later) -march=native turns on ggml's
# AMX matmul, which crashed here in a VM (SIGSEGV at ldtilecfg in ggml_backend_amx_mul_mat on a
# Q3_K_M file). AVX-512/VNNI stay on.
noamx=""
if [ "$(uname -m)" = x86_64 ] && echo | "${CC:-cc}" -mno-amx-int8 -mno-amx-bf16 -E - >/dev/null 2>&1; then
  noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  flags="$flags -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
fi
cpu=$( (grep -m1 'model name' /proc/cpuinfo; grep -m1 '^flags' /proc/cpuinfo) 2>/dev/null || uname -m)
key=$(printf '%s|%s|%s|%s' "$LLAMA_CPP_PYTHON_VERSION" "$flags" "$noamx" "$cpu" | sha256sum | cut -c1-10)
kind=cpu; [ "$cuda" = 1 ] && kind=cuda
[ -n "${LWQ_LLAMA_SRC:-}" ] && kind="$kind-src"  # no sdist (bindings) in a tarball build
dest="$cache/llama.cpp-$LLAMA_CPP_PYTHON_VERSION-$kind-$key"
if [ -f "$dest/.done" ]; then echo "$dest"; exit 0; fi

work="$dest.partial"
rm -rf "$work"; mkdir -p "$work/src"
if [ -n "${LWQ_LLAMA_SRC:-}" ]; then
  tar -xzf "$LWQ_LLAMA_SRC" -C "$work/src" --strip-components=1 \
    || { echo "lwq-gguf: cannot unpack LWQ_LLAMA_SRC=$LWQ_LLAMA_SRC (make it with vendor/pack_llama_src.sh)" >&2; exit 1; }
else
mkdir -p "$cache/dl"
sdist="$cache/dl/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
if ! echo "$LLAMA_CPP_PYTHON_SHA256  $sdist" | sha256sum -c --status 2>/dev/null; then
  echo "lwq-gguf: downloading llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist (76 MB)" >&2
  tmpdl=$(mktemp -d "$cache/dl/tmp.XXXX")
  python3 -m pip download -q --no-deps --no-binary :all: \
      "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$tmpdl" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  mv "$tmpdl"/llama_cpp_python-*.tar.gz "$sdist"; rm -rf "$tmpdl"
  echo "$LLAMA_CPP_PYTHON_SHA256  $sdist" | sha256sum -c --status \
    || { echo "lwq-gguf: sdist checksum mismatch: $sdist" >&2; exit 1; }
fi

tar -xzf "$sdist" -C "$work/src" --strip-components=3 --wildcards '*/vendor/llama.cpp/*'
cp "$sdist" "$work/sdist.tar.gz"
fi
[ -f "$work/src/convert_hf_to_gguf.py" ] || { echo "lwq-gguf: unexpected llama.cpp source layout in $work/src" >&2; exit 1; }
echo "lwq-gguf: building llama.cpp ($kind) in $work/build, about 5 min on 2 cores" >&2
cmake -S "$work/src" -B "$work/build" $flags -DCMAKE_C_FLAGS="$noamx" -DCMAKE_CXX_FLAGS="$noamx" >"$work/cmake.log" 2>&1 \
  || { tail -20 "$work/cmake.log" >&2; exit 1; }
targets="llama-quantize llama-perplexity llama-imatrix"
# a CUDA build also makes llama-completion (the pin's non-interactive llama-cli: its llama-cli
# needs the server build), which bench/gpu.py check runs with every layer offloaded
[ "$cuda" = 1 ] && targets="$targets llama-completion"
# shellcheck disable=SC2086
cmake --build "$work/build" -j "${LWQ_JOBS:-$(nproc)}" \
    --target $targets >"$work/build.log" 2>&1 \
  || { tail -30 "$work/build.log" >&2; exit 1; }
mkdir -p "$work/bin"
cp -a "$work/build/bin/." "$work/bin/"
rm -rf "$work/build"
echo "$flags $noamx" >"$work/flags"
touch "$work/.done"
rm -rf "$dest"; mv "$work" "$dest"
echo "$dest"
