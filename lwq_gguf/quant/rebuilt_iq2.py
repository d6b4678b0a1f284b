"""The C text of lwq_gguf.quant.rebuilt's rewrites of the pinned ``ggml-quants.c`` for IQ2_XXS,
IQ2_XS and IQ2_S (the others: :mod:`lwq_gguf.quant.rebuilt_c`, :mod:`lwq_gguf.quant.rebuilt_iq1`):
their trial scales in AVX-512 lanes. Each gives the same bits as the code it replaces
(tests/quant/test_rebuilt.py).
"""

# The trial scales of an IQ2 block (13 for IQ2_XXS, 19 for IQ2_XS and IQ2_S) are independent
# until the choice, so with AVX-512 16 of them run in lanes, as IQ3's do: the rounding, the
# grid look-up and the sums vectorized (each lane's sums in the loop's order), the neighbour
# search of each lane's off-grid groups as before (independent calls, no longer one after
# another's sums), the choice in the loop's order. Lanes past the last trial are not searched.
XXS_TRIALS = """            for (int is = -6; is <= 6; ++is) {
                float id = (2*kMaxQ-1+is*0.1f)/eff_max;
                float this_scale = 1/id;
                for (int k = 0; k < 4; ++k) {
                    for (int i = 0; i < 8; ++i) {
                        int l = nearest_int(0.5f*(id*xval[8*k+i]-1));
                        Laux[8*k+i] = MAX(0, MIN(kMaxQ-1, l));
                    }
                    uint16_t u = 0;
                    for (int i = 0; i < 8; ++i) u |= (Laux[8*k+i] << 2*i);
                    int grid_index = kmap_q2xs[u];
                    if (grid_index < 0) {
                        const uint16_t * neighbours = kneighbors_q2xs - kmap_q2xs[u] - 1;
                        grid_index = iq2_find_best_neighbour(neighbours, kgrid_q2xs, xval + 8*k, waux + 8*k, this_scale, Laux + 8*k);
                    }
                }
                float sumqx = 0, sumq2 = 0;
                for (int i = 0; i < 32; ++i) {
                    float w = weight[i];
                    float q = 2*Laux[i] + 1;
                    sumqx += w*xval[i]*q;
                    sumq2 += w*q*q;
                }
                if (sumq2 > 0 && sumqx*sumqx > best*sumq2) {
                    scale = sumqx/sumq2; best = scale*sumqx;
                    memcpy(L, Laux, 32);
                }
            }
"""
XS_TRIALS = """            for (int is = -9; is <= 9; ++is) {
                float id = (2*kMaxQ-1+is*0.1f)/max;
                float this_scale = 1/id;
                for (int k = 0; k < 2; ++k) {
                    for (int i = 0; i < 8; ++i) {
                        int l = nearest_int(0.5f*(id*xval[8*k+i]-1));
                        Laux[8*k+i] = MAX(0, MIN(kMaxQ-1, l));
                    }
                    uint16_t u = 0;
                    for (int i = 0; i < 8; ++i) u |= (Laux[8*k+i] << 2*i);
                    int grid_index = kmap_q2xs[u];
                    is_on_grid_aux[k] = true;
                    if (grid_index < 0) {
                        is_on_grid_aux[k] = false;
                        const uint16_t * neighbours = kneighbors_q2xs - kmap_q2xs[u] - 1;
                        grid_index = iq2_find_best_neighbour(neighbours, kgrid_q2xs, xval + 8*k, waux + 8*k, this_scale, Laux + 8*k);
                    }
                }
                float sumqx = 0, sumq2 = 0;
                for (int i = 0; i < 16; ++i) {
                    float w = weight[i];
                    float q = 2*Laux[i] + 1;
                    sumqx += w*xval[i]*q;
                    sumq2 += w*q*q;
                }
                if (sumq2 > 0 && sumqx*sumqx > best*sumq2) {
                    scale = sumqx/sumq2; best = scale*sumqx;
                    for (int i = 0; i < 16; ++i) L[i] = Laux[i];
                    for (int k = 0; k <  2; ++k) is_on_grid[k] = is_on_grid_aux[k];
                }
            }
"""  # (IQ2_XS and IQ2_S: the same text)
XXS_CALL = """#if LWQ_AVX512
            lwq_iq2_trials(6, kMaxQ, 32, xval, weight, waux, eff_max, kmap_q2xs, kneighbors_q2xs,
                           kgrid_q2xs, &scale, &best, L, NULL);
#else
"""
XS_CALL = """#if LWQ_AVX512
            lwq_iq2_trials(9, kMaxQ, 16, xval, weight, waux, max, kmap_q2xs, kneighbors_q2xs,
                           kgrid_q2xs, &scale, &best, L, is_on_grid);
#else
"""
IQ2_LANES = r"""#if LWQ_AVX512
/* lwq-gguf: the trials -lim..lim of an IQ2 block in 16 lanes (see lwq_gguf/quant/rebuilt_iq2.py) */
static void lwq_iq2_trials(int lim, int kMaxQ, int n, const float * xval, const float * weight,
        const float * waux, float max, const int * kmap, const uint16_t * kneighbors,
        const uint64_t * kgrid, float * scale, float * best, int8_t * L, bool * is_on_grid) {
    int32_t la[32][16];
    bool aux[16][4];
    float idv[16], tsc[16], sx[16], s2[16];
    const int ngroups = n/8;
    for (int is0 = -lim; is0 <= lim; is0 += 16) {
        for (int t = 0; t < 16; ++t) {
            const int is = MIN(is0 + t, lim);
            idv[t] = (2*kMaxQ-1+is*0.1f)/max;
            tsc[t] = 1/idv[t];
        }
        const __m512 id = _mm512_loadu_ps(idv);
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
            __m512i u = _mm512_loadu_si512(la[8*k]);
            for (int i = 1; i < 8; ++i)
                u = _mm512_or_si512(u, _mm512_slli_epi32(_mm512_loadu_si512(la[8*k+i]), 2*i));
            const __m512i gi = _mm512_i32gather_epi32(u, (const void *)kmap, 4);
            unsigned off = _mm512_cmplt_epi32_mask(gi, _mm512_setzero_si512()) & live;
            int32_t uu[16];
            _mm512_storeu_si512(uu, u);
            for (int t = 0; t < 16; ++t) aux[t][k] = !((off >> t) & 1);
            while (off) {
                const int t = __builtin_ctz(off);
                off &= off - 1;
                int8_t Lg[8];
                for (int i = 0; i < 8; ++i) Lg[i] = la[8*k+i][t];
                const uint16_t * neighbours = kneighbors - kmap[uu[t]] - 1;
                iq2_find_best_neighbour(neighbours, kgrid, xval + 8*k, waux + 8*k, tsc[t], Lg);
                for (int i = 0; i < 8; ++i) la[8*k+i][t] = Lg[i];
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

"""
