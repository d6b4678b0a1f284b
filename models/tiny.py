"""Tiny random test models (Llama, Mistral, Qwen2, Qwen3) made offline with transformers.

    python models/tiny.py OUT_DIR --arch qwen3 --layers 3

They reuse the demo model's tokenizer (models/smollm2-135m, known to llama.cpp's converter as
``smollm``), so ``make models`` must have run. Hidden 256, so every row takes K-quants.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
TOKENIZER_SOURCE = ROOT / "smollm2-135m"
ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def tiny_config(arch: str, layers: int, tied: bool):
    import transformers as tf

    common = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                  max_position_embeddings=1024, tie_word_embeddings=tied, bos_token_id=1,
                  eos_token_id=2, rms_norm_eps=1e-5)
    cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
           "qwen3": tf.Qwen3Config}[arch]
    extra = {"head_dim": 64} if arch in ("qwen3", "mistral") else {}
    return cls(**common, **extra)


def make_tiny(out: Path, arch: str = "llama", layers: int = 2, *, dtype: str = "float16",
              shards: int = 1, tied: bool = False, seed: int = 0) -> Path:
    """Write a random model folder; ``shards`` > 1 writes model-0000N-of-0000M + index."""
    from transformers import AutoModelForCausalLM

    if not (TOKENIZER_SOURCE / "tokenizer.json").is_file():
        raise SystemExit(f"tiny: {TOKENIZER_SOURCE} missing: run `make models` first")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, layers, tied))
    # random init leaves norms at 1 and attention near-uniform; widen it so layers differ
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for p in layer.parameters():
                if p.dim() == 2:
                    p.mul_(1.0 + 0.5 * i)
    model = model.to(getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    size = None
    if shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        size = f"{total // shards // 1000 + 1}KB"
    model.save_pretrained(out, safe_serialization=True, max_shard_size=size or "50GB")
    for f in TOKENIZER_SOURCE.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"], cfg
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--arch", choices=ARCHS, default="llama")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--shards", type=int, default=1)
    a = ap.parse_args()
    print(make_tiny(a.out, a.arch, a.layers, dtype=a.dtype, shards=a.shards))
