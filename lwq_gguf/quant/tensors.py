"""The tensors of a GGUF file as llama.cpp's converter writes them, and their sizes."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_BLK = re.compile(r"^blk\.(\d+)\.(.+?)(?:\.weight)?$")
_NEVER = ("_norm.weight", "ffn_gate_inp.weight", "pos_embd", "token_types")


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
    def quantizable(self) -> bool:
        """The same rule as llama-quantize (tensor_allows_quantization at the pin)."""
        return (len(self.shape) >= 2 and self.name.endswith("weight")
                and not any(s in self.name for s in _NEVER))


def tensor_nbytes(type_name: str, shape: Sequence[int]) -> int:
    """Bytes of a tensor of ``shape`` stored as ``type_name`` (gguf's block sizes)."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]]
    return math.prod(shape) // block * size
