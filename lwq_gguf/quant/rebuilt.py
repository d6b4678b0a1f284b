"""ggml's quantizers rebuilt from the pinned source, with exact speed-ups of the i-quants.

The sensitivity sweeps quantize each tensor's sampled rows to every candidate type, and most of
that time goes to the i-quants' grid searches. This module compiles the pinned llama.cpp's own
``ggml/src/ggml-quants.c`` once more, with two of its routines rewritten so that they give the
same bits faster:

* **The neighbour search** (``iq2_find_best_neighbour``, ``iq3_find_best_neighbour``): for an
  8-weight (4-weight) group off the grid, ggml computes ``w_i * (s*q_i - x_i)^2`` for every
  coordinate of every neighbouring grid point. A coordinate takes only 4 (8) values, so the
  rewrite computes each term once per call, in the same operations, into a small table, and
  sums each neighbour's entries in the same order: the same floats added in the same order.
* **The grid set-up** (``iq2xs_init_impl``, ``iq3xs_init_impl``; about 8 s on 2 cores at every
  start, half of it for IQ1_S): each off-grid point's (distance, index) pairs are sorted with
  ``qsort``; they are already in index order, so a counting sort by distance gives the same
  order.

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
from string import Template
from typing import Any

from lwq_gguf.errors import ToolError
from lwq_gguf.llamacpp import LlamaCpp
from lwq_gguf.quant.cbuild import CompileError, compile_once
from lwq_gguf.quant.types import QUANT_TYPES

FLAGS = ("-O3", "-DNDEBUG", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared",
         "-Wl,-Bsymbolic")

_SEARCH = Template('''    for (int j = 1; j <= num_neighbors; ++j) {
        const int8_t * pg = (const int8_t *)(grid + neighbours[j]);
        float d2 = 0;
        for (int i = 0; i < $n; ++i) {
            float q = pg[i];
            float diff = scale*q - xval[i];
            d2 += weight[i]*diff*diff;
        }
        if (d2 < best_d2) {
            best_d2 = d2; grid_index = neighbours[j];
        }
    }''')
# A grid coordinate is 2*l + 1 (l < 4 on the IQ2 grids, 8 coordinates to a point; l < 8 on
# IQ3's, 4 coordinates): each coordinate's term for every value it can take, then per neighbour
# the same sum from that table - with AVX-512, 16 neighbours at a time (a gather of their grid
# points, a permute per coordinate, the lanes' sums in the same order, the first lane at the
# minimum: the element the scalar scan keeps; the last few one at a time).
_TABLED = Template("""    float term[$n][8];  /* [i][l]: the term of q = 2*l + 1 (rows of 8: one 256-bit load each) */
    for (int i = 0; i < $n; ++i) {
        for (int l = 0; l < $levels; ++l) {
            float q = 2*l + 1;
            float diff = scale*q - xval[i];
            term[i][l] = weight[i]*diff*diff;
        }
    }
    int j = 1;
#if LWQ_AVX512
    for (; j + 15 <= num_neighbors; j += 16) {
        const __m512i idx = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(neighbours + j)));
$gather
        __m512 d2 = _mm512_setzero_ps();
        for (int i = 0; i < $n; ++i) {
            __m512i l = _mm512_srl_epi32(i < 4 ? lo : hi, _mm_cvtsi32_si128(8*(i & 3) + 1));
            l = _mm512_and_si512(l, _mm512_set1_epi32(7));
            const __m512 t = _mm512_castps256_ps512(_mm256_loadu_ps(term[i]));
            d2 = _mm512_add_ps(d2, _mm512_permutexvar_ps(l, t));
        }
        const float m = _mm512_reduce_min_ps(d2);
        if (m < best_d2) {
            const unsigned at = _mm512_cmp_ps_mask(d2, _mm512_set1_ps(m), _CMP_EQ_OQ);
            best_d2 = m; grid_index = neighbours[j + __builtin_ctz(at)];
        }
    }
#endif
    for (; j <= num_neighbors; ++j) {
        const int8_t * pg = (const int8_t *)(grid + neighbours[j]);
        float d2 = 0;
        for (int i = 0; i < $n; ++i) d2 += term[i][pg[i] >> 1];
        if (d2 < best_d2) {
            best_d2 = d2; grid_index = neighbours[j];
        }
    }""")
_GATHER = {  # the 16 neighbours' grid points as two vectors of their bytes 0-3 and 4-7
    8: """        const __m512i g0 = _mm512_i32gather_epi64(_mm512_castsi512_si256(idx), (const void *)grid, 8);
        const __m512i g1 = _mm512_i32gather_epi64(_mm512_extracti64x4_epi64(idx, 1), (const void *)grid, 8);
        const __m512i lo = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(g0)),
                                              _mm512_cvtepi64_epi32(g1), 1);
        const __m512i hi = _mm512_inserti64x4(_mm512_castsi256_si512(
                                                  _mm512_cvtepi64_epi32(_mm512_srli_epi64(g0, 32))),
                                              _mm512_cvtepi64_epi32(_mm512_srli_epi64(g1, 32)), 1);""",
    4: """        const __m512i lo = _mm512_i32gather_epi32(idx, (const void *)grid, 4), hi = lo;""",
}
_HEADER = """#if defined(__AVX512F__)
#define LWQ_AVX512 1
#include <immintrin.h>
#else
#define LWQ_AVX512 0
#endif
"""
# IQ4_NL / IQ4_XS: a 32-weight block's 2*ntry + 1 trial scales are independent until the choice,
# so with AVX-512 they run in 16 lanes (ggml's bisection of the 16 sorted values as a count of
# the values below, NaN included; each lane's sums in the loop's order), then the loop's choice
# is made from the lanes' sums in the loop's order.
_IQ4_TRIALS = """        for (int itry = -ntry; itry <= ntry; ++itry) {
            id = (itry + values[0])/max;
            sumqx = sumq2 = 0;
            for (int j = 0; j < block_size; ++j) {
                float al = id*xb[j];
                int l = best_index_int8(16, values, al);
                float q = values[l];
                float w = weight[j];
                sumqx += w*q*xb[j];
                sumq2 += w*q*q;
            }
            if (sumq2 > 0 && sumqx*sumqx > best*sumq2) {
                d = sumqx/sumq2; best = d * sumqx;
            }
        }"""
_IQ4_LANES = """#if LWQ_AVX512
        if (2*ntry + 1 <= 16) {
            float ida[16], vf[16], sx[16], s2[16];
            for (int k = 0; k < 16; ++k) ida[k] = (MIN(k, 2*ntry) - ntry + values[0])/max;
            for (int v = 0; v < 16; ++v) vf[v] = values[v];
            const __m512 idv = _mm512_loadu_ps(ida), vals = _mm512_loadu_ps(vf);
            const __m512i one = _mm512_set1_epi32(1);
            __m512 sqx = _mm512_setzero_ps(), sq2 = _mm512_setzero_ps();
            for (int j = 0; j < block_size; ++j) {
                const __m512 x = _mm512_set1_ps(xb[j]);
                const __m512 al = _mm512_mul_ps(idv, x);
                __m512i ml = _mm512_setzero_si512();
                for (int v = 1; v < 15; ++v) {
                    const __mmask16 up = _mm512_cmp_ps_mask(al, _mm512_set1_ps(vf[v]), _CMP_NLT_UQ);
                    ml = _mm512_mask_add_epi32(ml, up, ml, one);
                }
                const __m512i mu = _mm512_add_epi32(ml, one);
                const __m512 below = _mm512_sub_ps(al, _mm512_permutexvar_ps(ml, vals));
                const __m512 above = _mm512_sub_ps(_mm512_permutexvar_ps(mu, vals), al);
                __m512i l = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(below, above, _CMP_LT_OQ), mu, ml);
                l = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(al, _mm512_set1_ps(vf[15]), _CMP_GE_OQ),
                                            l, _mm512_set1_epi32(15));
                l = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(al, _mm512_set1_ps(vf[0]), _CMP_LE_OQ),
                                            l, _mm512_setzero_si512());
                const __m512 q = _mm512_permutexvar_ps(l, vals);
                const __m512 wq = _mm512_mul_ps(_mm512_set1_ps(weight[j]), q);
                sqx = _mm512_add_ps(sqx, _mm512_mul_ps(wq, x));
                sq2 = _mm512_add_ps(sq2, _mm512_mul_ps(wq, q));
            }
            _mm512_storeu_ps(sx, sqx); _mm512_storeu_ps(s2, sq2);
            for (int k = 0; k <= 2*ntry; ++k) {
                sumqx = sx[k]; sumq2 = s2[k];
                if (sumq2 > 0 && sumqx*sumqx > best*sumq2) {
                    d = sumqx/sumq2; best = d * sumqx;
                }
            }
            id = ida[2*ntry];
        } else
#endif
"""
# make_qkx3_quants (Q2_K, Q4_1, Q5_1, Q5_K; Q4_K with --encoder ggml): its nstep + 1 trial
# scales depend on each other only through the min, which changes where a trial is taken. With
# AVX-512, 16 trials run in lanes from the current min (each lane's sums in the loop's order),
# the loop's test is made in its order, and after a taken trial the next 16 start from it.
_QKX3_START = """        iscale = (rmin + rdelta*is + nmax)/(max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale*(x[i] - min));
            l = MAX(0, MIN(nmax, l));
            Laux[i] = l;
            float w = weights ? weights[i] : x[i]*x[i];"""
_QKX3_LANES = """#if LWQ_AVX512
    if (n <= 32 && !use_mad) {
        int la[32][16];
        float wv[32], isc[16], dv[16], tsv[16], tmv[16], madv[16];
        for (int i = 0; i < n; ++i) wv[i] = weights ? weights[i] : x[i]*x[i];
        const __m512 sumw = _mm512_set1_ps(sum_w), sumx = _mm512_set1_ps(sum_x);
        int is = 0;
        while (is <= nstep) {
            for (int k = 0; k < 16; ++k) isc[k] = (rmin + rdelta*(is + k) + nmax)/(max - min);
            const __m512 iscv = _mm512_loadu_ps(isc);
            __m512 sl = _mm512_setzero_ps(), sl2 = _mm512_setzero_ps(), sxl = _mm512_setzero_ps();
            for (int i = 0; i < n; ++i) {
                const __m512 f = _mm512_mul_ps(iscv, _mm512_set1_ps(x[i] - min));
                __m512i l = _mm512_castps_si512(_mm512_add_ps(f, _mm512_set1_ps(12582912.f)));
                l = _mm512_sub_epi32(_mm512_and_si512(l, _mm512_set1_epi32(0x007fffff)),
                                     _mm512_set1_epi32(0x00400000));
                l = _mm512_max_epi32(_mm512_setzero_si512(), _mm512_min_epi32(_mm512_set1_epi32(nmax), l));
                _mm512_storeu_si512(la[i], l);
                const __m512 lf = _mm512_cvtepi32_ps(l);
                const __m512 wl = _mm512_mul_ps(_mm512_set1_ps(wv[i]), lf);
                sl = _mm512_add_ps(sl, wl);
                sl2 = _mm512_add_ps(sl2, _mm512_mul_ps(wl, lf));
                sxl = _mm512_add_ps(sxl, _mm512_mul_ps(wl, _mm512_set1_ps(x[i])));
            }
            const __m512 D = _mm512_sub_ps(_mm512_mul_ps(sumw, sl2), _mm512_mul_ps(sl, sl));
            __m512 ts = _mm512_div_ps(_mm512_sub_ps(_mm512_mul_ps(sumw, sxl), _mm512_mul_ps(sumx, sl)), D);
            __m512 tm = _mm512_div_ps(_mm512_sub_ps(_mm512_mul_ps(sl2, sumx), _mm512_mul_ps(sl, sxl)), D);
            const __mmask16 above = _mm512_cmp_ps_mask(tm, _mm512_setzero_ps(), _CMP_GT_OQ);
            tm = _mm512_mask_blend_ps(above, tm, _mm512_setzero_ps());
            ts = _mm512_mask_blend_ps(above, ts, _mm512_div_ps(sxl, sl2));
            __m512 mad = _mm512_setzero_ps();
            for (int i = 0; i < n; ++i) {
                const __m512 lf = _mm512_cvtepi32_ps(_mm512_loadu_si512(la[i]));
                __m512 diff = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(ts, lf), tm), _mm512_set1_ps(x[i]));
                diff = _mm512_mul_ps(diff, diff);
                mad = _mm512_add_ps(mad, _mm512_mul_ps(_mm512_set1_ps(wv[i]), diff));
            }
            _mm512_storeu_ps(dv, D); _mm512_storeu_ps(tsv, ts); _mm512_storeu_ps(tmv, tm);
            _mm512_storeu_ps(madv, mad);
            int next = is + 16;
            for (int k = 0; k < 16 && is + k <= nstep; ++k) {
                if (dv[k] > 0 && madv[k] < best_mad) {
                    for (int i = 0; i < n; ++i) L[i] = la[i][k];
                    best_mad = madv[k]; scale = tsv[k]; min = tmv[k];
                    next = is + k + 1;
                    break;
                }
            }
            is = next;
        }
        *the_min = -min;
        return scale;
    }
#endif
"""
_COUNTING_SORT = '''
/* lwq-gguf: the (d2, j) pairs arrive in j order, so a stable counting sort by d2 gives
   qsort's (d2, j) order */
static void lwq_sort_dist2(int * dist2, int n) {
    int maxd = 0;
    for (int j = 0; j < n; ++j) if (dist2[2*j] > maxd) maxd = dist2[2*j];
    int * count = (int *)calloc(maxd + 2, sizeof(int));
    int * tmp = (int *)malloc(2*n*sizeof(int));
    GGML_ASSERT(count && tmp);
    for (int j = 0; j < n; ++j) count[dist2[2*j] + 1]++;
    for (int d = 1; d <= maxd + 1; ++d) count[d] += count[d-1];
    for (int j = 0; j < n; ++j) {
        int p = count[dist2[2*j]]++;
        tmp[2*p] = dist2[2*j]; tmp[2*p+1] = dist2[2*j+1];
    }
    memcpy(dist2, tmp, 2*n*sizeof(int));
    free(tmp); free(count);
}

'''
_INIT = '''
/* lwq-gguf: ggml_quantize_init for this copy's grids, under its own lock */
#include <pthread.h>
static pthread_mutex_t lwq_init_lock = PTHREAD_MUTEX_INITIALIZER;
void lwq_quantize_init(enum ggml_type type) {
    pthread_mutex_lock(&lwq_init_lock);
    switch (type) {
        case GGML_TYPE_IQ2_XXS:
        case GGML_TYPE_IQ2_XS:
        case GGML_TYPE_IQ2_S:
        case GGML_TYPE_IQ1_S:
        case GGML_TYPE_IQ1_M:   iq2xs_init_impl(type); break;
        case GGML_TYPE_IQ3_XXS: iq3xs_init_impl(256); break;
        case GGML_TYPE_IQ3_S:   iq3xs_init_impl(512); break;
        default: break;
    }
    pthread_mutex_unlock(&lwq_init_lock);
}
'''


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
        src = _replace(src, _SEARCH.substitute(n=n),
                       _TABLED.substitute(n=n, levels=levels, gather=_GATHER[n]), 1)
    src = _replace(src, _IQ4_TRIALS, _IQ4_LANES + _IQ4_TRIALS, 1)
    loop = "    for (int is = 0; is <= nstep; ++is) {\n"
    src = _replace(src, loop + _QKX3_START, _QKX3_LANES + loop + _QKX3_START, 1)
    for name in ("iq2_compare_func", "iq3_compare_func"):
        src = _replace(src, f"qsort(dist2, grid_size, 2*sizeof(int), {name});",
                       "lwq_sort_dist2(dist2, grid_size);", 2)
    anchor = "typedef struct {\n    uint64_t * grid;"
    src = _replace(src, anchor, _COUNTING_SORT + anchor, 1)
    return _HEADER + src + _INIT


class Rebuilt:
    """The rebuilt quantizers: ``quantize_<type>`` and ``lwq_quantize_init`` of the patched copy."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.lib.lwq_quantize_init.argtypes = [ctypes.c_int]
        self.lib.lwq_quantize_init.restype = None
        self.fns: dict[str, Callable[..., int]] = {}
        fp = ctypes.POINTER(ctypes.c_float)
        for name in QUANT_TYPES:
            if name in ("f32", "f16", "bf16"):
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
