"""The pinned ggml's own quantizers, through ctypes: exactly what llama-quantize writes.

``quantize(rows, type, imatrix)`` calls ``ggml_quantize_chunk`` (the function llama-quantize
calls, with the same per-column importance weights) and ``dequantize`` the type's ``to_float``, so
the quantization error of a tensor for any type is measured, not modelled. The quantizers are
those of the pinned source rebuilt with exact speed-ups (:mod:`lwq_gguf.quant.rebuilt`: the same
bytes) where that library can be built, else the pinned library's own.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable

import numpy as np

from lwq_gguf.errors import ToolError
from lwq_gguf.llamacpp import LlamaCpp
from lwq_gguf.quant.rebuilt import Rebuilt, wanted
from lwq_gguf.quant.types import FLOAT_TYPES, GGML_NEEDS_IMATRIX, QUANT_TYPES

_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


class _Traits(ctypes.Structure):
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


class Ggml:
    """ggml's quantize/dequantize from the pinned build's libggml-base."""

    def __init__(self, lc: LlamaCpp, rebuilt: bool | None = None) -> None:
        """``rebuilt``: use the rebuilt quantizers where they can be built (None: unless
        ``LWQ_QUANTIZERS=pinned``)."""
        path = lc.bin / "libggml-base.so"
        try:
            self.lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise ToolError(f"{path}: cannot load ggml ({e}): run `make setup`") from None
        self.lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_int64,
            ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_float)]
        self.lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
        self.lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        self.lib.ggml_quantize_init.restype = None
        self.lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        self.lib.ggml_row_size.restype = ctypes.c_size_t
        self.lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        # why_not_rebuilt: "" where the rebuilt quantizers are in use
        why = "not asked"
        if rebuilt is None:
            rebuilt, why = wanted(), "LWQ_QUANTIZERS=pinned"
        self.rebuilt, self.why_not_rebuilt = Rebuilt.load(lc) if rebuilt else (None, why)

    def prepare(self, types: Iterable[str]) -> None:
        """Set up the grids of those types that have one (IQ1-IQ3: about 0.5 s of one core, done
        otherwise by their first quantize), e.g. on a thread while the cores have other work."""
        for name in types:
            ty = int(QUANT_TYPES[name].ggml)
            if self.rebuilt is not None and name in self.rebuilt.fns:
                self.rebuilt.lib.lwq_quantize_init(ty)
            elif name not in FLOAT_TYPES:
                self.lib.ggml_quantize_init(ty)

    def row_size(self, type_name: str, n: int) -> int:
        """Bytes of one row of ``n`` weights in the type."""
        return int(self.lib.ggml_row_size(int(QUANT_TYPES[type_name].ggml), n))

    @staticmethod
    def rows_f32(rows: np.ndarray, type_name: str) -> np.ndarray:
        """``rows`` as contiguous float32, refused when the type's block does not divide a row."""
        src = np.ascontiguousarray(rows, dtype=np.float32)
        block = QUANT_TYPES[type_name].block
        if src.shape[1] % block:
            raise ValueError(f"{type_name}: row of {src.shape[1]} is not a multiple of {block}")
        return src

    def quantize(self, rows: np.ndarray, type_name: str, imatrix: np.ndarray | None) -> bytes:
        """Quantize a 2-D float32 array (rows of ggml ne0 weights) to ``type_name``'s blocks."""
        q = QUANT_TYPES[type_name]
        src = self.rows_f32(rows, type_name)
        if imatrix is None and type_name in GGML_NEEDS_IMATRIX:
            raise ValueError(f"{type_name}: ggml quantizes it only with an importance matrix")
        nrows, n = src.shape
        size = self.row_size(type_name, n) * nrows
        dst = ctypes.create_string_buffer(size)
        imat = None
        if imatrix is not None:
            imat_arr = np.ascontiguousarray(imatrix, dtype=np.float32)
            imat = imat_arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        fsrc = src.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        if self.rebuilt is not None and type_name in self.rebuilt.fns:
            done = self.rebuilt.quantize(type_name, fsrc, dst, nrows, n, imat)
        else:
            done = self.lib.ggml_quantize_chunk(int(q.ggml), fsrc, dst, 0, nrows, n, imat)
        assert done == size, (done, size)
        return dst.raw

    def dequantize(self, data: bytes, type_name: str, shape: tuple[int, int]) -> np.ndarray:
        q = QUANT_TYPES[type_name]
        traits = self.lib.ggml_get_type_traits(int(q.ggml)).contents
        out = np.empty(shape, dtype=np.float32)
        if type_name == "f32":
            return np.frombuffer(data, dtype=np.float32).reshape(shape).copy()
        to_float = _TO_FLOAT(traits.to_float)
        buf = ctypes.create_string_buffer(data, len(data))
        to_float(buf, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.size)
        return out

    def roundtrip(self, rows: np.ndarray, type_name: str, imatrix: np.ndarray | None) -> np.ndarray:
        """The float32 weights llama.cpp computes with after quantizing ``rows`` to the type."""
        if type_name == "f32":
            return np.asarray(rows, dtype=np.float32)
        return self.dequantize(self.quantize(rows, type_name, imatrix), type_name, rows.shape)
