"""The C text of lwq_gguf.quant.rebuilt's rewrites of the pinned ``ggml-quants.c``.

Each rewrite is a pair: the pinned text it replaces (matched exactly, once) and what replaces it,
or a function inserted before its first use. Every one gives the same bits as the code it
replaces (tests/quant/test_rebuilt.py); what each does and why it is exact is said above it.
"""

from string import Template

SEARCH = Template('''    for (int j = 1; j <= num_neighbors; ++j) {
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
TABLED = Template("""    float term[$n][8];  /* [i][l]: the term of q = 2*l + 1 (rows of 8: one 256-bit load each) */
#if LWQ_AVX512
    {   /* two coordinates' rows at a time, all 8 values of l (the same operations per float) */
        const __m512 sq = _mm512_mul_ps(_mm512_set1_ps(scale),
            _mm512_set_ps(15, 13, 11, 9, 7, 5, 3, 1, 15, 13, 11, 9, 7, 5, 3, 1));
        for (int i = 0; i < $n; i += 2) {
            const __m512 x = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(xval[i])),
                                                                 _mm256_castps_pd(_mm256_set1_ps(xval[i+1])), 1));
            const __m512 w = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(weight[i])),
                                                                 _mm256_castps_pd(_mm256_set1_ps(weight[i+1])), 1));
            const __m512 diff = _mm512_sub_ps(sq, x);
            _mm512_storeu_ps(term[i], _mm512_mul_ps(_mm512_mul_ps(w, diff), diff));
        }
    }
#else
    for (int i = 0; i < $n; ++i) {
        for (int l = 0; l < $levels; ++l) {
            float q = 2*l + 1;
            float diff = scale*q - xval[i];
            term[i][l] = weight[i]*diff*diff;
        }
    }
#endif
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
GATHER = {  # the 16 neighbours' grid points as two vectors of their bytes 0-3 and 4-7
    8: """        const __m512i g0 = _mm512_i32gather_epi64(_mm512_castsi512_si256(idx), (const void *)grid, 8);
        const __m512i g1 = _mm512_i32gather_epi64(_mm512_extracti64x4_epi64(idx, 1), (const void *)grid, 8);
        const __m512i lo = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(g0)),
                                              _mm512_cvtepi64_epi32(g1), 1);
        const __m512i hi = _mm512_inserti64x4(_mm512_castsi256_si512(
                                                  _mm512_cvtepi64_epi32(_mm512_srli_epi64(g0, 32))),
                                              _mm512_cvtepi64_epi32(_mm512_srli_epi64(g1, 32)), 1);""",
    4: """        const __m512i lo = _mm512_i32gather_epi32(idx, (const void *)grid, 4), hi = lo;""",
}
HEADER = """#if defined(__AVX512F__)
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
IQ4_TRIALS = """        for (int itry = -ntry; itry <= ntry; ++itry) {
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
IQ4_LANES = """#if LWQ_AVX512
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
QKX3_START = """        iscale = (rmin + rdelta*is + nmax)/(max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale*(x[i] - min));
            l = MAX(0, MIN(nmax, l));
            Laux[i] = l;
            float w = weights ? weights[i] : x[i]*x[i];"""
QKX3_LANES = """#if LWQ_AVX512
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
# IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S: the trial scales of a block are independent until the
# choice, so with AVX-512 16 of them run in lanes (TRIAL_LANES) - the rounding, the grid look-up
# and the sums vectorized (each lane's sums in the loop's order), the neighbour search of each
# lane's off-grid groups as before, the choice in the loop's order. The lanes past the last trial
# (19 trials take two rounds of 16) are copies of it, never chosen: they are not searched.
# The pinned loop, in each of the five (IQ2_XS and IQ2_S: the same text; ``on``, ``off``: the
# lines that keep is_on_grid_aux, which IQ2_XXS has not):
TRIALS = Template(r"""            for (int is = -$lim; is <= $lim; ++is) {
                float id = (2*kMaxQ-1+is*$step)/$div;
                float this_scale = 1/id;
                for (int k = 0; k < $groups; ++k) {
                    for (int i = 0; i < $c; ++i) {
                        int l = nearest_int(0.5f*(id*xval[$c*k+i]-1));
                        Laux[$c*k+i] = MAX(0, MIN(kMaxQ-1, l));
                    }
                    uint16_t u = 0;
                    for (int i = 0; i < $c; ++i) u |= (Laux[$c*k+i] << $bits*i);
                    int grid_index = kmap_$g[u];
$on                    if (grid_index < 0) {
$off                        const uint16_t * neighbours = kneighbors_$g - kmap_$g[u] - 1;
                        grid_index = ${f}_find_best_neighbour(neighbours, kgrid_$g, xval + $c*k, waux + $c*k, this_scale, Laux + $c*k);
                    }
                }
                float sumqx = 0, sumq2 = 0;
                for (int i = 0; i < $n; ++i) {
                    float w = weight[i];
                    float q = 2*Laux[i] + 1;
                    sumqx += w*xval[i]*q;
                    sumq2 += w*q*q;
                }
                if (sumq2 > 0 && sumqx*sumqx > best*sumq2) {
                    scale = sumqx/sumq2; best = scale*sumqx;
$keep                }
            }
""")
_ON = "                    is_on_grid_aux[k] = true;\n"
_OFF = "                        is_on_grid_aux[k] = false;\n"
_KEEP = ("                    for (int i = 0; i < {n}; ++i) L[i] = Laux[i];\n"
         "                    for (int k = 0; k {gap}{groups}; ++k) is_on_grid[k] = is_on_grid_aux[k];\n")
IQ3 = dict(step="0.2f", div="max", c=4, bits=3, g="q3xs", f="iq3", on=_ON, off=_OFF,
           on_grid="is_on_grid")
IQ2 = dict(step="0.1f", c=8, bits=2, g="q2xs", f="iq2")
TRIAL_LOOPS: dict[str, dict[str, object]] = {  # (IQ2_XS's text is IQ2_S's too)
    "iq3_xxs": {**IQ3, "lim": 15, "groups": "8", "n": "32",
                "keep": _KEEP.format(n="32", gap="<  ", groups="8")},
    "iq3_s": {**IQ3, "lim": 9, "groups": "bs4", "n": "block_size",
              "keep": _KEEP.format(n="block_size", gap="< ", groups="bs4")},
    "iq2_xxs": {**IQ2, "lim": 6, "div": "eff_max", "groups": 4, "n": 32, "on": "", "off": "",
                "on_grid": "NULL", "keep": "                    memcpy(L, Laux, 32);\n"},
    "iq2_xs": {**IQ2, "lim": 9, "div": "max", "groups": 2, "n": 16, "on": _ON, "off": _OFF,
               "on_grid": "is_on_grid", "keep": _KEEP.format(n=16, gap="<  ", groups=2)},
}
TRIALS_CALL = Template("""#if LWQ_AVX512
            lwq_${f}_trials($lim, $step, kMaxQ, $n, xval, weight, waux, $div, kmap_$g, kneighbors_$g,
                           kgrid_$g, &scale, &best, L, $on_grid);
#else
""")
# The lanes' function of IQ3's trials and IQ2's, one per grid family: nc
# coordinates of ``bits`` bits to a group, grid points of type ``grid``, its neighbour search
# ``search``; is_on_grid NULL where the caller keeps none (IQ2_XXS).
TRIAL_LANES = Template(r"""#if LWQ_AVX512
/* lwq-gguf: the trials -lim..lim of a block in 16 lanes (see lwq_gguf/quant/rebuilt_c.py) */
static void $name(int lim, float step, int kMaxQ, int n, const float * xval,
        const float * weight, const float * waux, float max, const int * kmap,
        const uint16_t * kneighbors, const $grid * kgrid, float * scale, float * best,
        int8_t * L, bool * is_on_grid) {
    int32_t la[32][16];
    bool aux[16][8];
    float idv[16], tsc[16], sx[16], s2[16];
    const int ngroups = n/$nc;
    for (int is0 = -lim; is0 <= lim; is0 += 16) {
        for (int t = 0; t < 16; ++t) {
            const int is = MIN(is0 + t, lim);
            idv[t] = (2*kMaxQ-1+is*step)/max;
            tsc[t] = 1/idv[t];
        }
        const __m512 id = _mm512_loadu_ps(idv);
        /* the lanes past the last trial (copies of it) are never chosen: no search for them */
        const unsigned live = lim - is0 >= 15 ? 0xffffu : (1u << (lim - is0 + 1)) - 1;
        for (int i = 0; i < n; ++i) {  /* nearest_int(0.5f*(id*xval[i]-1)), clamped */
            const __m512 f = _mm512_mul_ps(_mm512_set1_ps(0.5f),
                _mm512_sub_ps(_mm512_mul_ps(id, _mm512_set1_ps(xval[i])), _mm512_set1_ps(1.0f)));
            __m512i l = _mm512_castps_si512(_mm512_add_ps(f, _mm512_set1_ps(12582912.f)));
            l = _mm512_sub_epi32(_mm512_and_si512(l, _mm512_set1_epi32(0x007fffff)),
                                 _mm512_set1_epi32(0x00400000));
            l = _mm512_max_epi32(_mm512_setzero_si512(), _mm512_min_epi32(_mm512_set1_epi32(kMaxQ-1), l));
            _mm512_storeu_si512(la[i], l);
        }
        for (int k = 0; k < ngroups; ++k) {
            __m512i u = _mm512_loadu_si512(la[$nc*k]);
            for (int i = 1; i < $nc; ++i)
                u = _mm512_or_si512(u, _mm512_slli_epi32(_mm512_loadu_si512(la[$nc*k+i]), $bits*i));
            const __m512i gi = _mm512_i32gather_epi32(u, (const void *)kmap, 4);
            unsigned off = _mm512_cmplt_epi32_mask(gi, _mm512_setzero_si512()) & live;
            int32_t uu[16];
            _mm512_storeu_si512(uu, u);
            for (int t = 0; t < 16; ++t) aux[t][k] = !((off >> t) & 1);
            while (off) {
                const int t = __builtin_ctz(off);
                off &= off - 1;
                int8_t Lg[$nc];
                for (int i = 0; i < $nc; ++i) Lg[i] = la[$nc*k+i][t];
                const uint16_t * neighbours = kneighbors - kmap[uu[t]] - 1;
                $search(neighbours, kgrid, xval + $nc*k, waux + $nc*k, tsc[t], Lg);
                for (int i = 0; i < $nc; ++i) la[$nc*k+i][t] = Lg[i];
            }
        }
        __m512 sqx = _mm512_setzero_ps(), sq2 = _mm512_setzero_ps();
        for (int i = 0; i < n; ++i) {
            const float w = weight[i];
            const __m512 q = _mm512_cvtepi32_ps(_mm512_add_epi32(
                _mm512_slli_epi32(_mm512_loadu_si512(la[i]), 1), _mm512_set1_epi32(1)));
            sqx = _mm512_add_ps(sqx, _mm512_mul_ps(_mm512_set1_ps(w*xval[i]), q));
            sq2 = _mm512_add_ps(sq2, _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(w), q), q));
        }
        _mm512_storeu_ps(sx, sqx); _mm512_storeu_ps(s2, sq2);
        for (int t = 0; t < 16 && is0 + t <= lim; ++t) {
            const float sumqx = sx[t], sumq2 = s2[t];
            if (sumq2 > 0 && sumqx*sumqx > *best*sumq2) {
                *scale = sumqx/sumq2; *best = *scale*sumqx;
                for (int i = 0; i < n; ++i) L[i] = la[i][t];
                if (is_on_grid)
                    for (int k = 0; k < ngroups; ++k) is_on_grid[k] = aux[t][k];
            }
        }
    }
}
#endif

""")
IQ3_LANES = TRIAL_LANES.substitute(name="lwq_iq3_trials", nc=4, bits=3, grid="uint32_t",
                                   search="iq3_find_best_neighbour")
IQ2_LANES = TRIAL_LANES.substitute(name="lwq_iq2_trials", nc=8, bits=2, grid="uint64_t",
                                   search="iq2_find_best_neighbour")
COUNTING_SORT = '''
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
INIT = '''
/* lwq-gguf: ggml_quantize_init for this copy's grids, under its own lock */
#include <pthread.h>
static pthread_mutex_t lwq_init_lock = PTHREAD_MUTEX_INITIALIZER;
void lwq_quantize_init(enum ggml_type type) {
    pthread_mutex_lock(&lwq_init_lock);
    lwq_stable_qsort = lwq_glibc_sorts_stably();
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
