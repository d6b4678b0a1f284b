"""The tensors of a GGUF file as llama.cpp's converter writes them, and their sizes."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lwq_gguf.errors import ModelInputError

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


def materialize(name: str, src) -> np.ndarray:
    """A tensor of the converter's GGUFWriter (lazy or not) as a numpy array."""
    from gguf.lazy import LazyNumpyTensor

    data = LazyNumpyTensor.to_eager(src) if isinstance(src, LazyNumpyTensor) else src
    if not isinstance(data, np.ndarray):
        raise ModelInputError(f"tensor {name!r}: the converter streams it in chunks, which the "
                              "single-pass writer does not take: use --two-step")
    return data


def as_16bit(data: np.ndarray, src_type: GGMLQuantizationType) -> np.ndarray:
    """gguf-py hands BF16 data as bytes: as uint16 words (other types unchanged)."""
    if src_type == GGMLQuantizationType.BF16 and data.dtype == np.uint8:
        return np.ascontiguousarray(data).view(np.uint16)
    return data


def as_f32(rows: np.ndarray, src_type: GGMLQuantizationType) -> np.ndarray:
    """F32/F16/BF16 (as uint16 words) data widened to float32."""
    Q = GGMLQuantizationType
    if src_type == Q.BF16:
        return (rows.astype(np.uint32) << 16).view(np.float32)
    if src_type in (Q.F16, Q.F32):
        return rows.astype(np.float32, copy=False)
    raise ModelInputError(f"single-pass writer: source type {src_type.name} is not 16/32-bit float: "
                          "use --two-step")
