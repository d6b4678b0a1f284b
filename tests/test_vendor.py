"""The trimmed llama.cpp source tarball for machines without a registry (a GPU box)."""

import subprocess
import tarfile

from conftest import ROOT


def test_trimmed_source_tarball_configures(tmp_path):
    out = tmp_path / "llama-src.tar.gz"
    subprocess.run(["bash", str(ROOT / "vendor" / "pack_llama_src.sh"), str(out)], check=True,
                   capture_output=True)
    assert out.stat().st_size < 8 << 20  # vs the 76 MB sdist
    with tarfile.open(out) as t:
        names = set(t.getnames())
        t.extractall(tmp_path / "src", filter="data")
    for need in ("llama.cpp/convert_hf_to_gguf.py", "llama.cpp/gguf-py/gguf/constants.py",
                 "llama.cpp/tools/quantize/quantize.cpp", "llama.cpp/ggml/src/ggml-cuda/ggml-cuda.cu",
                 "llama.cpp/ggml/src/ggml-cpu/ggml-cpu.c"):
        assert need in names, need
    assert not any("/ggml-metal/" in n or "/ggml-vulkan/" in n for n in names)
    src = tmp_path / "src" / "llama.cpp"
    p = subprocess.run(["cmake", "-S", str(src), "-B", str(tmp_path / "build"), "-DLLAMA_OPENSSL=OFF",
                        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                        "-DLLAMA_BUILD_SERVER=OFF"], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    targets = subprocess.run(["cmake", "--build", str(tmp_path / "build"), "--target", "help"],
                             capture_output=True, text=True, check=True).stdout
    for t in ("llama-quantize", "llama-perplexity", "llama-imatrix"):
        assert t in targets


def test_cpu_build_has_no_amx_matmul():
    """-march=native on an AMX CPU turned on ggml's AMX matmul, which crashed here (SIGSEGV at
    ldtilecfg in a VM); the build turns AMX off wherever the compiler knows the flag."""
    import os
    import platform
    import shutil

    import pytest

    from lwq_gguf.llamacpp import find_llama_cpp

    lc = find_llama_cpp()
    if platform.machine() != "x86_64" or lc.has_cuda:
        pytest.skip("AMX is an x86_64 CPU-backend matter")
    knows = subprocess.run([os.environ.get("CC", "cc"), "-mno-amx-int8", "-mno-amx-bf16", "-E", "-"], input="",
                           capture_output=True, text=True).returncode == 0
    if knows:  # an older compiler never turns AMX on
        assert "-mno-amx-int8" in (lc.root / "flags").read_text()
    if shutil.which("nm"):
        syms = subprocess.run(["nm", "-C", str(lc.bin / "libggml-cpu.so")],
                              capture_output=True, text=True, check=True).stdout
        assert "ggml_backend_amx_mul_mat" not in syms
