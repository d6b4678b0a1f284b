"""The tensors of a GGUF file as llama.cpp's converter writes them, and their sizes."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_BLK = re.compile(r"^blk\.(\d+)\.(.+?)(?:\.weight)?$")
# tensor_allows_quantization at the pin (src/llama-quant.cpp): name parts never quantized
_NEVER = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "position_embd", "token_types", "ssm_conv1d", "shortconv.conv.weight",
    "indexer.k_proj.weight", "indexer.q_proj.weight", "attn_rel_b.weight", "time_mix_first.weight",
    "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight", "time_mix_v0.weight",
    "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight",
    "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "sam.pos_embd", "sam.neck.",
    "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the GGUF as llama.cpp's converter writes it (ggml shape: ne0 first)."""

    name: str
    shape: tuple[int, ...]
    src_type: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def layer(self) -> int | None:
        m = _BLK.match(self.name)
        return int(m.group(1)) if m else None

    @property
    def kind(self) -> str:
        m = _BLK.match(self.name)
        return m.group(2) if m else self.name.removesuffix(".weight")

    @property
    def n_dims(self) -> int:
        """ggml_n_dims: trailing dimensions of 1 do not count (a [256, 1] gate is 1-D)."""
        n = len(self.shape)
        while n > 1 and self.shape[n - 1] == 1:
            n -= 1
        return n

    @property
    def experts(self) -> int:
        """The number of experts merged in a 3-D ``ffn_*_exps`` tensor (1 for any other)."""
        return self.shape[2] if self.n_dims == 3 else 1

    @property
    def quantizable(self) -> bool:
        """The same rule as llama-quantize (tensor_allows_quantization at the pin)."""
        return (self.n_dims >= 2 and self.name.endswith("weight")
                and not any(s in self.name for s in _NEVER))


def tensor_nbytes(type_name: str, shape: Sequence[int]) -> int:
    """Bytes of a tensor of ``shape`` stored as ``type_name`` (gguf's block sizes)."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]]
    return math.prod(shape) // block * size
