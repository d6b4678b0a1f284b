"""What lwq-gguf knows about each architecture, in one table.

A scored architecture is run by lwq-gguf one decoder layer at a time with transformers' own modules
(:mod:`lwq_gguf.model.stream`), which needs the few facts its model's ``forward`` holds outside the
layers: which masks the layers take, which rotary embeddings, whether the embedding output is
scaled outside the embedding module, which attention kernel keeps its soft-capping, and how its
mixture-of-experts block names its experts. Everything else (norm placement, biases, the experts'
routing) is the model's own modules' business; tied outputs and the final soft-capping are read
from config.json. Any other architecture that llama.cpp's converter knows is converted with a plan
from weight error alone (no forward pass); the converter refuses the rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

ROPE = (("position_embeddings", "rotary_emb"),)  # layer keyword <- the model's rotary module


@dataclass(frozen=True, kw_only=True)
class Arch:
    hf: str  # config.json "architectures"[0]
    gguf: str  # llama.cpp's architecture (a gguf.MODEL_ARCH member name)
    family: str  # how users call it
    masks: str = "causal"  # causal | window (every layer sliding when config.sliding_window is
    # set) | layer_types (per layer, config.layer_types: full_attention / sliding_attention)
    rope: tuple[tuple[str, str], ...] = ROPE
    embed_scale: bool = False  # hidden states times sqrt(hidden_size) after the embedding module
    attention: str = "sdpa"  # eager where sdpa would drop the attention logit soft-capping
    experts: str | None = None  # config key of the routed expert count (mixture-of-experts)
    experts_used: str = "num_experts_per_tok"  # config key of the experts used per token
    shared_experts: bool = False  # ffn_*_shexp tensors beside the routed experts
    own_output: bool = True  # False: llama.cpp reuses the token embedding as the output even when
    # config.json unties them (the converter drops lm_head), so lwq-gguf runs the model that way

    @property
    def moe(self) -> bool:
        return self.experts is not None


_GEMMA3_ROPE = (("position_embeddings_global", "rotary_emb"),
                ("position_embeddings_local", "rotary_emb_local"))

ARCHS: tuple[Arch, ...] = (
    Arch(hf="LlamaForCausalLM", gguf="LLAMA", family="Llama 2/3, SmolLM"),
    Arch(hf="MistralForCausalLM", gguf="LLAMA", family="Mistral", masks="window"),
    Arch(hf="Qwen2ForCausalLM", gguf="QWEN2", family="Qwen 2/2.5", masks="layer_types"),
    Arch(hf="Qwen3ForCausalLM", gguf="QWEN3", family="Qwen 3", masks="layer_types"),
    Arch(hf="Gemma2ForCausalLM", gguf="GEMMA2", family="Gemma 2", masks="layer_types",
         embed_scale=True, attention="eager", own_output=False),
    Arch(hf="Gemma3ForCausalLM", gguf="GEMMA3", family="Gemma 3 (text)", masks="layer_types",
         rope=_GEMMA3_ROPE),
    Arch(hf="Phi3ForCausalLM", gguf="PHI3", family="Phi-3, Phi-4", masks="window"),
    Arch(hf="MixtralForCausalLM", gguf="LLAMA", family="Mixtral (MoE)", masks="window",
         experts="num_local_experts"),
    Arch(hf="Qwen2MoeForCausalLM", gguf="QWEN2MOE", family="Qwen 1.5/2 MoE", experts="num_experts",
         shared_experts=True),
    Arch(hf="Qwen3MoeForCausalLM", gguf="QWEN3MOE", family="Qwen 3 MoE (30B-A3B, 235B-A22B)",
         masks="window", experts="num_experts"),
    Arch(hf="OlmoeForCausalLM", gguf="OLMOE", family="OLMoE", experts="num_experts"),
)

_BY_HF = {a.hf: a for a in ARCHS}
SCORED: tuple[str, ...] = tuple(_BY_HF)


def arch_of(hf_architecture: str) -> Arch | None:
    """The table's entry for a config.json architecture; None: weight-error plans only."""
    return _BY_HF.get(hf_architecture)


def layer_mask_kind(arch: Arch, config, layer: int) -> str:
    """full_attention or sliding_attention: the mask the model's forward gives ``layer``."""
    if arch.masks == "layer_types" and getattr(config, "layer_types", None):
        return config.layer_types[layer]
    if arch.masks == "window" and getattr(config, "sliding_window", None):
        return "sliding_attention"
    return "full_attention"


_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def gguf_names(lm, arch: Arch, n_layers: int) -> dict[str, tuple[str, int | None]]:
    """HF parameter name -> (GGUF tensor name, expert index or None), for the 2-D weights the
    converter writes; an expert's weight maps to the merged ``ffn_*_exps`` tensor of its layer."""
    import gguf

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf], n_layers)
    out = {}
    for name, p in lm.named_parameters(remove_duplicate=True):
        if p.dim() == 2:
            m = _EXPERT.search(name)
            merged = _EXPERT.sub(".experts.", name) if m else name
            g = tmap.get_name(merged, try_suffixes=(".weight",))
            if g:
                out[name] = (g, int(m.group(1)) if m else None)
    return out


def n_experts(names: dict[str, tuple[str, int | None]]) -> dict[str, int]:
    """GGUF name -> how many experts it merges (1: a dense weight)."""
    out: dict[str, int] = {}
    for g, e in names.values():
        out[g] = max(out.get(g, 1), (e or 0) + 1)
    return out


def merge_experts(parts: dict[int, np.ndarray]) -> np.ndarray:
    """Experts' [rows, cols] arrays -> the merged tensor's rows ([experts * rows, cols]), expert 0
    first, as the converter stacks them."""
    return np.concatenate([parts[e] for e in range(len(parts))])
