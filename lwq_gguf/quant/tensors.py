"""Sizes of GGUF tensors by type, and a converter tensor's data as float32 (what the quantizers
read). The tensor list itself is :mod:`lwq_gguf.model.inventory`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lwq_gguf.errors import ModelInputError

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
