"""The encoders a plan's types are written with.

Every type is written in ggml's own block layout, so any llama.cpp reads the file. Two encoders:

* ``ggml``: the pinned ggml's ``ggml_quantize_chunk`` (:mod:`lwq_gguf.quant.ggml`) - the bytes
  ``llama-quantize`` writes;
* ``lwq`` (default): the same, except Q4_K, which lwq-gguf encodes itself
  (``csrc/q4k_encoder.c``): the 6-bit sub-block scales and mins and the fp16 super-block scales are
  chosen together by least squares over the whole 256-weight block, instead of rounding each
  against the largest. Same format and size; lower (importance-weighted) error.

The C source is compiled once with the system's C compiler into the lwq-gguf cache folder
(:mod:`lwq_gguf.quant.cbuild`), keyed by its hash, without ``-march`` or FMA
contraction so that every x86_64 machine writes the same bytes (vectorized across candidates,
never across a sum: ``-fno-trapping-math`` only lets the compiler if-convert).
"""

from __future__ import annotations

import ctypes
import hashlib
from pathlib import Path

import numpy as np

from lwq_gguf.errors import ToolError
from lwq_gguf.llamacpp import LlamaCpp
from lwq_gguf.quant.cbuild import CompileError, compile_once
from lwq_gguf.quant.ggml import Ggml
from lwq_gguf.quant.types import ENCODERS

OWN_TYPES = ("q4_k",)  # types the lwq encoder writes itself
SOURCE = Path(__file__).parent / "csrc" / "q4k_encoder.c"
CFLAGS = ("-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math")


def _source_digest() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()


def encoder_tag(encoder: str) -> str:
    """The encoder and its source version: sensitivity tables and compare's file recipes are
    keyed by it, so a changed encoder is measured again."""
    return f"lwq-{_source_digest()[:8]}" if encoder == "lwq" else "ggml"


def damage_key(imatrix_key: str, encoder: str) -> str:
    """Key of a sensitivity table: the imatrix setting and the encoder that made the errors."""
    return f"{imatrix_key}@{encoder_tag(encoder)}"


def split_damage_key(key: str) -> tuple[str, str]:
    """(imatrix key, encoder) of a :func:`damage_key`."""
    im, _, tag = key.rpartition("@")
    return im, "ggml" if tag == "ggml" else "lwq"


def library() -> Path:
    """The compiled encoder (built on first use)."""
    try:
        return compile_once("q4k-encoder", SOURCE.read_text(), (*CFLAGS, "-lm"), origin=str(SOURCE))
    except CompileError as e:
        raise ToolError(f"{e}, or use --encoder ggml") from None


class Quantizer(Ggml):
    """ggml's quantize / dequantize / roundtrip, with lwq-gguf's Q4_K under ``encoder="lwq"``."""

    def __init__(self, lc: LlamaCpp, encoder: str) -> None:
        if encoder not in ENCODERS:
            raise ToolError(f"unknown encoder {encoder!r}: use one of {', '.join(ENCODERS)}")
        super().__init__(lc)
        self.encoder, self.own = encoder, None
        if encoder == "lwq":
            self.own = ctypes.CDLL(str(library()))
            fn = self.own.lwq_quantize_q4_k
            fn.restype = ctypes.c_int64
            fn.argtypes = [ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_int64,
                           ctypes.c_int64, ctypes.POINTER(ctypes.c_float)]

    def quantize(self, rows: np.ndarray, type_name: str, imatrix: np.ndarray | None) -> bytes:
        if self.own is None or type_name not in OWN_TYPES:
            return super().quantize(rows, type_name, imatrix)
        src = self.rows_f32(rows, type_name)
        nrows, n = src.shape
        dst = ctypes.create_string_buffer(self.row_size(type_name, n) * nrows)
        fptr = ctypes.POINTER(ctypes.c_float)
        imat = None
        if imatrix is not None:
            im = np.ascontiguousarray(imatrix, dtype=np.float32)
            imat = im.ctypes.data_as(fptr)
        done = self.own.lwq_quantize_q4_k(src.ctypes.data_as(fptr), dst, nrows, n, imat)
        assert done == len(dst), (done, len(dst))
        return dst.raw
