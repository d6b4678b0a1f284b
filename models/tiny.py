"""Tiny random test models of every architecture lwq-gguf scores, made offline with transformers.

    python models/tiny.py OUT_DIR --arch qwen3moe --layers 3

Dense: llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3; mixture-of-experts: mixtral, qwen2moe
(with a shared expert), qwen3moe, olmoe (4 experts, 2 active); and stablelm, which llama.cpp's
converter knows but lwq-gguf runs no forward pass of (plans from weight error). Hidden 256, so
every row takes K-quants.

Tokenizers: Llama, Mistral, Qwen2, Qwen3 and the Gemmas get a 2,048-token SentencePiece model,
trained here once on the packaged calibration text (small embeddings, so the layers carry most of
the weights and a conversion costs seconds); the others reuse the demo model's 49,152-token BPE
tokenizer (models/smollm2-135m, known to llama.cpp's converter as ``smollm``, so ``make models``
must have run): Qwen2-MoE, Qwen3-MoE, OLMoE and StableLM
(the converter reads them as BPE only), Phi-3 (the converter's SentencePiece path expects Phi-3's
own added tokens) and Mixtral (tests/test_moe.py compares its imatrix with llama-imatrix's token
by token, and with this SentencePiece model llama.cpp puts a space before a text's first word,
which the fast tokenizer does not). ``vocab="bpe"`` forces BPE for any architecture.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
TOKENIZER_SOURCE = ROOT / "smollm2-135m"
CALIBRATION = ROOT.parent / "lwq_gguf" / "data" / "calibration.txt"
SP_VOCAB = 2048
DENSE = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
MOE = ("mixtral", "qwen2moe", "qwen3moe", "olmoe")
UNSCORED = ("stablelm",)  # the converter knows it, lwq-gguf's table does not: weight-error plans
ARCHS = DENSE + MOE + UNSCORED
# the converter reads these as BPE only (Phi-3: its SentencePiece path expects Phi-3's own tokens)
BPE_ONLY = ("qwen2moe", "qwen3moe", "olmoe", "stablelm", "phi3")
BPE_DEFAULT = BPE_ONLY + ("mixtral",)
N_EXPERTS, TOP_K = 4, 2


def default_vocab(arch: str) -> str:
    return "bpe" if arch in BPE_DEFAULT else "sp"


def tiny_config(arch: str, layers: int, tied: bool, vocab: str = "sp"):
    import transformers as tf

    vocab = SP_VOCAB if vocab == "sp" else 49152
    common = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                  max_position_embeddings=1024, tie_word_embeddings=tied, bos_token_id=1,
                  eos_token_id=2, rms_norm_eps=1e-5)
    moe = dict(num_experts=N_EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=256)
    # sliding windows shorter than the 512-token calibration windows, so masks are exercised
    local = ["sliding_attention" if (i + 1) % 3 else "full_attention" for i in range(layers)]
    extra = {
        "llama": (tf.LlamaConfig, {}),
        "mistral": (tf.MistralConfig, {"head_dim": 64}),
        "qwen2": (tf.Qwen2Config, {}),
        "qwen3": (tf.Qwen3Config, {"head_dim": 64}),
        "gemma2": (tf.Gemma2Config, {"head_dim": 64, "query_pre_attn_scalar": 64,
                                     "sliding_window": 128, "final_logit_softcapping": 30.0,
                                     "attn_logit_softcapping": 50.0, "pad_token_id": 0}),
        "gemma3": (tf.Gemma3TextConfig, {"head_dim": 64, "query_pre_attn_scalar": 64,
                                         "sliding_window": 128, "layer_types": local,
                                         "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                                         "pad_token_id": 0}),
        "phi3": (tf.Phi3Config, {"pad_token_id": 0}),
        "mixtral": (tf.MixtralConfig, {"num_local_experts": N_EXPERTS, "intermediate_size": 256,
                                       "num_experts_per_tok": TOP_K}),
        "qwen2moe": (tf.Qwen2MoeConfig, {**moe, "shared_expert_intermediate_size": 512}),
        "qwen3moe": (tf.Qwen3MoeConfig, {**moe, "head_dim": 64}),
        # llama.cpp's OLMoE takes its k-norm over all heads: no grouped KV
        "olmoe": (tf.OlmoeConfig, {"num_experts": N_EXPERTS, "num_experts_per_tok": TOP_K,
                                   "intermediate_size": 256, "num_key_value_heads": 4}),
        "stablelm": (tf.StableLmConfig, {"num_key_value_heads": 4}),
    }
    cls, kw = extra[arch]
    return cls(**{**common, **kw})


def _sentencepiece(out: Path) -> None:
    """A SentencePiece tokenizer (tokenizer.model + its fast tokenizer.json), trained once on the
    packaged calibration text and kept beside this script."""
    import sentencepiece as spm
    from transformers import GemmaTokenizerFast

    cache = ROOT / f"sp-{SP_VOCAB}"
    if not (cache / "tokenizer.json").is_file():
        # made in a folder of its own and renamed into place: parallel test workers may race
        tmp = Path(tempfile.mkdtemp(prefix=f".sp-{SP_VOCAB}-", dir=ROOT))
        spm.SentencePieceTrainer.train(
            input=str(CALIBRATION), model_prefix=str(tmp / "tokenizer"), vocab_size=SP_VOCAB,
            model_type="bpe", pad_id=0, bos_id=1, eos_id=2, unk_id=3, byte_fallback=True,
            num_threads=1, minloglevel=2)
        tok = GemmaTokenizerFast(vocab_file=str(tmp / "tokenizer.model"))
        tok.save_pretrained(str(tmp))
        try:
            tmp.rename(cache)
        except OSError:  # another worker was first: use its folder (the same bytes)
            shutil.rmtree(tmp)
    for f in cache.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)


def make_tiny(out: Path, arch: str = "llama", layers: int = 2, *, dtype: str = "float16",
              shards: int = 1, tied: bool = False, seed: int = 0, vocab: str | None = None) -> Path:
    """Write a random model folder; ``shards`` > 1 writes model-0000N-of-0000M + index;
    ``vocab``: "sp" (2,048 SentencePiece tokens) or "bpe" (the demo model's), default by arch."""
    from transformers import AutoModelForCausalLM

    vocab = vocab or default_vocab(arch)
    if vocab == "sp" and arch in BPE_ONLY:
        raise SystemExit(f"tiny: llama.cpp's converter reads {arch} with a BPE vocabulary only")
    if not (TOKENIZER_SOURCE / "tokenizer.json").is_file():
        raise SystemExit(f"tiny: {TOKENIZER_SOURCE} missing: run `make models` first")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, layers, tied, vocab))
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
    if vocab == "sp":
        _sentencepiece(out)
    else:
        for f in TOKENIZER_SOURCE.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(f, out / f.name)
    if arch == "phi3":  # the converter reads a Phi-3 vocabulary as BPE only when told so
        tc = out / "tokenizer_config.json"
        tc.write_text(json.dumps({**json.loads(tc.read_text()), "tokenizer_class": "GPT2Tokenizer"}))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"], cfg
    if arch == "phi3":  # llama.cpp applies Phi-3's special-token rules to any model whose name
        # (else its folder's) says phi3, and those tokens are not in this vocabulary
        cfg["_name_or_path"] = "lwq-tiny-random"
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--arch", choices=ARCHS, default="llama")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--vocab", choices=["sp", "bpe"], default=None)
    a = ap.parse_args()
    print(make_tiny(a.out, a.arch, a.layers, dtype=a.dtype, shards=a.shards, vocab=a.vocab))
