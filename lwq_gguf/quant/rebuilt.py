"""ggml's quantizers rebuilt from the pinned source, with exact speed-ups.

The sensitivity sweeps quantize each tensor's sampled rows to every candidate type, and most of
that time goes to the quantizers' searches. This module compiles the pinned llama.cpp's own
``ggml/src/ggml-quants.c`` once more, with some of its routines rewritten so that they give the
same bits faster (the C text, and why each is exact: :mod:`lwq_gguf.quant.rebuilt_c`):

* **the i-quant neighbour search** (IQ2, IQ3): each coordinate's term ``w_i * (s*q_i - x_i)^2``
  computed once per call for the few values a grid coordinate takes, then summed per neighbour
  in the same order (AVX-512: 16 neighbours at a time);
* **the grids' set-up** (about 8 s on 2 cores at every start, half of it for IQ1_S): a counting
  sort where ggml sorts (distance, index) pairs already in index order with ``qsort``;
* **independent trial scales in AVX-512 lanes** (IQ4's 15, IQ3's 19-31, IQ2's 13-19,
  ``make_qkx3_quants``'s 37 for Q2_K, Q4_1, Q5_1, Q5_K):
  each lane adds the same floats in the same order, and the choice between them is made in the
  loop's order; lanes past the last trial are not searched;
* **IQ1_S's and IQ1_M's split search** (every split of a block's sorted weights into three
  groups) in AVX-512 lanes the same way, and their sort of each block's weights by insertion
  where the C library's ``qsort`` is a stable merge sort, as glibc's up to 2.36
  (:mod:`lwq_gguf.quant.rebuilt_iq1`).

The file is compiled with ``-O3 -march=native -ffp-contract=off -fno-fast-math`` (no fused
multiply-add and no reassociation, so vectorized code computes the same floats) and linked
against the pinned ``libggml-base``. ``tests/quant/test_rebuilt.py`` checks every type's bytes
against ``ggml_quantize_chunk``. Where it cannot be built (a llama.cpp folder without its source,
no C compiler, a source the patch no longer matches), or with ``LWQ_QUANTIZERS=pinned``,
:class:`lwq_gguf.quant.ggml.Ggml` uses the pinned library's own quantizers: the same bytes,
slower.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import Any

from lwq_gguf.errors import ToolError
from lwq_gguf.llamacpp import LlamaCpp
from lwq_gguf.quant import rebuilt_c as C
from lwq_gguf.quant import rebuilt_iq1 as C1
from lwq_gguf.quant.cbuild import CompileError, compile_once
from lwq_gguf.quant.types import FLOAT_TYPES, QUANT_TYPES

FLAGS = ("-O3", "-DNDEBUG", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared",
         "-Wl,-Bsymbolic")


def wanted() -> bool:
    """Whether to use the rebuilt quantizers: ``LWQ_QUANTIZERS`` = ``rebuilt`` (default) or
    ``pinned`` (the pinned library's own: the same bytes, slower; a check, or a way round a
    machine where the rebuilt library misbehaves)."""
    v = os.environ.get("LWQ_QUANTIZERS", "rebuilt")
    if v not in ("rebuilt", "pinned"):
        raise ToolError(f"LWQ_QUANTIZERS={v!r}: use rebuilt or pinned")
    return v == "rebuilt"


class PatchError(Exception):
    """The pinned source no longer has the text a rewrite replaces."""


def _replace(src: str, old: str, new: str, count: int) -> str:
    if src.count(old) != count:
        raise PatchError(f"expected {count} of: {old.strip().splitlines()[0]}")
    return src.replace(old, new)


def patched_source(src: str) -> str:
    """``ggml-quants.c`` with the rewrites above (:class:`PatchError` where it does not match)."""
    for n, levels in ((8, 4), (4, 8)):  # (coordinates, values of l) of the IQ2 and IQ3 grids
        src = _replace(src, C.SEARCH.substitute(n=n),
                       C.TABLED.substitute(n=n, levels=levels, gather=C.GATHER[n]), 1)
    src = _replace(src, C.IQ4_TRIALS, C.IQ4_LANES + C.IQ4_TRIALS, 1)
    for name, trials in C.TRIAL_LOOPS.items():  # (IQ2_XS's loop is IQ2_S's too)
        loop = C.TRIALS.substitute(trials)
        src = _replace(src, loop, C.TRIALS_CALL.substitute(trials) + loop + "#endif\n",
                       2 if name == "iq2_xs" else 1)
    for first, lanes in (("static void quantize_row_iq2_xxs_impl(", C.IQ2_LANES),
                         ("static void quantize_row_iq3_xxs_impl(", C.IQ3_LANES)):
        src = _replace(src, first, lanes + first, 1)
    src = _replace(src, C1.IQ1S_SPLIT, C1.IQ1S_CALL + C1.IQ1S_SPLIT, 1)
    src = _replace(src, C1.IQ1M_SPLIT, C1.IQ1M_CALL + C1.IQ1M_SPLIT, 1)
    src = _replace(src, C1.IQ1_QSORT, "lwq_sort_pairs(pairs, block_size);", 2)
    first = "static void quantize_row_iq1_s_impl("
    src = _replace(src, first, C1.IQ1_SORT + C1.IQ1S_LANES + C1.IQ1M_LANES + first, 1)
    loop = "    for (int is = 0; is <= nstep; ++is) {\n"
    src = _replace(src, loop + C.QKX3_START, C.QKX3_LANES + loop + C.QKX3_START, 1)
    for name in ("iq2_compare_func", "iq3_compare_func"):
        src = _replace(src, f"qsort(dist2, grid_size, 2*sizeof(int), {name});",
                       "lwq_sort_dist2(dist2, grid_size);", 2)
    anchor = "typedef struct {\n    uint64_t * grid;"
    src = _replace(src, anchor, C.COUNTING_SORT + anchor, 1)
    return C.HEADER + src + C.INIT


class Rebuilt:
    """The rebuilt quantizers: ``quantize_<type>`` and ``lwq_quantize_init`` of the patched copy."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.lib.lwq_quantize_init.argtypes = [ctypes.c_int]
        self.lib.lwq_quantize_init.restype = None
        self.fns: dict[str, Callable[..., int]] = {}
        fp = ctypes.POINTER(ctypes.c_float)
        for name in QUANT_TYPES:
            if name in FLOAT_TYPES:
                continue
            fn = getattr(lib, "quantize_" + name.replace("_k", "_K"), None)
            if fn is not None:
                fn.restype = ctypes.c_size_t
                fn.argtypes = [fp, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, fp]
                self.fns[name] = fn

    @classmethod
    def load(cls, lc: LlamaCpp, extra: tuple[str, ...] = ()) -> tuple[Rebuilt | None, str]:
        """The rebuilt library, or None and why not (``extra``: more compiler flags, e.g.
        ``-mno-avx512f`` for the portable paths)."""
        ggml = lc.src / "ggml"
        path = ggml / "src" / "ggml-quants.c"
        try:
            src = patched_source(path.read_text())
        except OSError as e:
            return None, f"{path}: {e.strerror}"
        except PatchError as e:
            return None, f"{path}: {e}"
        flags = (*FLAGS, *extra, f"-I{ggml / 'include'}", f"-I{ggml / 'src'}", f"-L{lc.bin}",
                 "-lggml-base", f"-Wl,-rpath,{lc.bin}", "-lm", "-lpthread")
        try:
            lib = compile_once("ggml-quants", src, flags, origin=str(path), native=True)
            return cls(ctypes.CDLL(str(lib))), ""
        except (CompileError, OSError) as e:
            return None, str(e)

    def quantize(self, type_name: str, src: Any, dst: ctypes.Array, nrows: int, n: int,
                 imatrix: Any) -> int:
        """``ggml_quantize_chunk`` from row 0, in the rebuilt copy (``src``, ``imatrix``: float
        pointers, the latter None for none)."""
        self.lib.lwq_quantize_init(int(QUANT_TYPES[type_name].ggml))
        return int(self.fns[type_name](src, dst, nrows, n, imatrix))
