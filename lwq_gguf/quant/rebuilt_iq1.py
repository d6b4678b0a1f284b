"""The C text of lwq_gguf.quant.rebuilt's rewrites of the pinned ``ggml-quants.c`` for IQ1_S and
IQ1_M (the others: :mod:`lwq_gguf.quant.rebuilt_c`): their split search in AVX-512 lanes and
their pairs' sort. Each gives the same bits as the code it replaces (tests/quant/test_rebuilt.py).
"""

# IQ1_S: a 32-weight block's split of its sorted weights into three groups, every (i1, i2) with
# both signs of shift, in 16 lanes of i2: each lane's sums are the scalar loop's floats (the
# same operations in the same order). A chunk of lanes none of which beats the running best is
# skipped whole (the best did not move, so the scalar loop took none of them either); otherwise
# its lanes are taken in the loop's order, one at a time, as the scalar loop does.
IQ1S_SPLIT = """            for (int i1 = 0; i1 <= block_size; ++i1) {
                for (int i2 = i1; i2 <= block_size; ++i2) {
                    float sumqx = (sumx[i1] - sumx[0])*x_p[0] + (sumx[i2] - sumx[i1])*x_p[1] + (sumx[block_size] - sumx[i2])*x_p[2];"""
IQ1S_CALL = """#if LWQ_AVX512
            lwq_iq1s_split(sumx, sumw, block_size, x_p, x_m, &best_score, &scale, &besti1, &besti2, &best_shift);
            if (0)
#endif
"""
IQ1S_LANES = r"""#if LWQ_AVX512
/* lwq-gguf: IQ1_S's split search in 16 lanes (see lwq_gguf/quant/rebuilt_iq1.py) */
static void lwq_iq1s_split(const float * sumx, const float * sumw, int bs, const float * x_p,
        const float * x_m, float * best_score, float * scale, int * besti1, int * besti2,
        int * best_shift) {
    float best = *best_score;
    const __m512 zero = _mm512_setzero_ps();
    const __m512 sxb = _mm512_set1_ps(sumx[bs]), swb = _mm512_set1_ps(sumw[bs]);
    const __m512 p1 = _mm512_set1_ps(x_p[1]), p2 = _mm512_set1_ps(x_p[2]);
    const __m512 m1 = _mm512_set1_ps(x_m[1]), m2 = _mm512_set1_ps(x_m[2]);
    float qxp[16], q2p[16], qxm[16], q2m[16];
    for (int i1 = 0; i1 <= bs; ++i1) {
        const __m512 ap = _mm512_set1_ps((sumx[i1] - sumx[0])*x_p[0]);
        const __m512 am = _mm512_set1_ps((sumx[i1] - sumx[0])*x_m[0]);
        const __m512 wp = _mm512_set1_ps((sumw[i1] - sumw[0])*x_p[0]*x_p[0]);
        const __m512 wm = _mm512_set1_ps((sumw[i1] - sumw[0])*x_m[0]*x_m[0]);
        const __m512 sx1 = _mm512_set1_ps(sumx[i1]), sw1 = _mm512_set1_ps(sumw[i1]);
        for (int i2 = i1; i2 <= bs; i2 += 16) {
            const int n = MIN(16, bs + 1 - i2);
            const __mmask16 live = (__mmask16)((1u << n) - 1);
            const __m512 vx = _mm512_maskz_loadu_ps(live, sumx + i2);
            const __m512 vw = _mm512_maskz_loadu_ps(live, sumw + i2);
            const __m512 dx1 = _mm512_sub_ps(vx, sx1), dx2 = _mm512_sub_ps(sxb, vx);
            const __m512 dw1 = _mm512_sub_ps(vw, sw1), dw2 = _mm512_sub_ps(swb, vw);
            const __m512 xp = _mm512_add_ps(_mm512_add_ps(ap, _mm512_mul_ps(dx1, p1)), _mm512_mul_ps(dx2, p2));
            const __m512 xm = _mm512_add_ps(_mm512_add_ps(am, _mm512_mul_ps(dx1, m1)), _mm512_mul_ps(dx2, m2));
            const __m512 wq = _mm512_add_ps(_mm512_add_ps(wp, _mm512_mul_ps(_mm512_mul_ps(dw1, p1), p1)),
                                            _mm512_mul_ps(_mm512_mul_ps(dw2, p2), p2));
            const __m512 wn = _mm512_add_ps(_mm512_add_ps(wm, _mm512_mul_ps(_mm512_mul_ps(dw1, m1), m1)),
                                            _mm512_mul_ps(_mm512_mul_ps(dw2, m2), m2));
            const __m512 b = _mm512_set1_ps(best);
            const __mmask16 hit = live & (
                (_mm512_cmp_ps_mask(wq, zero, _CMP_GT_OQ) &
                 _mm512_cmp_ps_mask(_mm512_mul_ps(xp, xp), _mm512_mul_ps(b, wq), _CMP_GT_OQ)) |
                (_mm512_cmp_ps_mask(wn, zero, _CMP_GT_OQ) &
                 _mm512_cmp_ps_mask(_mm512_mul_ps(xm, xm), _mm512_mul_ps(b, wn), _CMP_GT_OQ)));
            if (!hit) continue;
            _mm512_storeu_ps(qxp, xp); _mm512_storeu_ps(q2p, wq);
            _mm512_storeu_ps(qxm, xm); _mm512_storeu_ps(q2m, wn);
            for (int l = __builtin_ctz(hit); l < n; ++l) {
                if (q2p[l] > 0 && qxp[l]*qxp[l] > best*q2p[l]) {
                    *scale = qxp[l]/q2p[l]; best = *scale*qxp[l];
                    *besti1 = i1; *besti2 = i2 + l; *best_shift = 1;
                }
                if (q2m[l] > 0 && qxm[l]*qxm[l] > best*q2m[l]) {
                    *scale = qxm[l]/q2m[l]; best = *scale*qxm[l];
                    *besti1 = i1; *besti2 = i2 + l; *best_shift = -1;
                }
            }
        }
    }
    *best_score = best;
}
#endif
"""
# IQ1_M: the same for its 16-weight blocks' split, four sign pairs per (i1, i2) in their order.
IQ1M_SPLIT = """                for (int i1 = 0; i1 <= block_size; ++i1) {
                    for (int i2 = i1; i2 <= block_size; ++i2) {
                        float qx_p[2], qx_m[2], q2_p[2], q2_m[2];"""
IQ1M_CALL = """#if LWQ_AVX512
                lwq_iq1m_split(px, pw, txs, tws, p2, m2, cp1, cp2, cm1, cm2, block_size,
                               &best_score, &scale, &besti1, &besti2, &best_k);
                if (0)
#endif
"""
IQ1M_LANES = r"""#if LWQ_AVX512
/* lwq-gguf: IQ1_M's split search in 16 lanes (see lwq_gguf/quant/rebuilt_iq1.py) */
static void lwq_iq1m_split(float px[2][IQ1M_BLOCK_SIZE+1], float pw[2][IQ1M_BLOCK_SIZE+1],
        const float * txs, const float * tws, float p2, float m2, float cp1, float cp2, float cm1,
        float cm2, int bs, float * best_score, float * scale, int * besti1, int * besti2,
        int * best_k) {
    float best = *best_score;
    const __m512 zero = _mm512_setzero_ps();
    float qx[4][16], q2[4][16];
    for (int i1 = 0; i1 <= bs; ++i1) {
        for (int i2 = i1; i2 <= bs; i2 += 16) {
            const int n = MIN(16, bs + 1 - i2);
            const __mmask16 live = (__mmask16)((1u << n) - 1);
            __m512 xp[2], xm[2], wq[2], wn[2];
            for (int h = 0; h < 2; ++h) {
                const __m512 sx = _mm512_add_ps(_mm512_set1_ps(px[h][i1]),
                                                _mm512_maskz_loadu_ps(live, px[h] + i2));
                const __m512 w2 = _mm512_maskz_loadu_ps(live, pw[h] + i2);
                xp[h] = _mm512_sub_ps(_mm512_set1_ps(txs[h]*p2), sx);
                xm[h] = _mm512_sub_ps(_mm512_set1_ps(txs[h]*m2), sx);
                wq[h] = _mm512_add_ps(_mm512_set1_ps(tws[h]*p2*p2 + pw[h][i1]*cp1),
                                      _mm512_mul_ps(w2, _mm512_set1_ps(cp2)));
                wn[h] = _mm512_add_ps(_mm512_set1_ps(tws[h]*m2*m2 + pw[h][i1]*cm1),
                                      _mm512_mul_ps(w2, _mm512_set1_ps(cm2)));
            }
            const __m512 sqx[4] = {_mm512_add_ps(xp[0], xp[1]), _mm512_add_ps(xp[0], xm[1]),
                                   _mm512_add_ps(xm[0], xp[1]), _mm512_add_ps(xm[0], xm[1])};
            const __m512 sq2[4] = {_mm512_add_ps(wq[0], wq[1]), _mm512_add_ps(wq[0], wn[1]),
                                   _mm512_add_ps(wn[0], wq[1]), _mm512_add_ps(wn[0], wn[1])};
            const __m512 b = _mm512_set1_ps(best);
            __mmask16 hit = 0;
            for (int k = 0; k < 4; ++k) {
                hit |= _mm512_cmp_ps_mask(sq2[k], zero, _CMP_GT_OQ) &
                       _mm512_cmp_ps_mask(_mm512_mul_ps(sqx[k], sqx[k]), _mm512_mul_ps(b, sq2[k]), _CMP_GT_OQ);
            }
            hit &= live;
            if (!hit) continue;
            for (int k = 0; k < 4; ++k) {
                _mm512_storeu_ps(qx[k], sqx[k]);
                _mm512_storeu_ps(q2[k], sq2[k]);
            }
            for (int l = __builtin_ctz(hit); l < n; ++l) {
                for (int k = 0; k < 4; ++k) {
                    if (q2[k][l] > 0 && qx[k][l]*qx[k][l] > best*q2[k][l]) {
                        *scale = qx[k][l]/q2[k][l]; best = *scale*qx[k][l];
                        *besti1 = i1; *besti2 = i2 + l; *best_k = k;
                    }
                }
            }
        }
    }
    *best_score = best;
}
#endif
"""
# IQ1_S and IQ1_M sort each block's (weight, index) pairs by weight with qsort and a comparator
# that calls equal weights equal. glibc up to 2.36 sorts an array this small by a stable merge
# sort, so equal weights keep their order: an insertion sort (stable, and no calls through a
# pointer) gives the same order. glibc 2.37 and 2.38 sort in place, unstably, and other C
# libraries otherwise: there, or where a block holds a NaN, the pinned qsort runs.
IQ1_QSORT = "qsort(pairs, block_size, 2*sizeof(float), iq1_sort_helper);"
IQ1_SORT = r"""
/* lwq-gguf: the IQ1 pairs' sort (see lwq_gguf/quant/rebuilt_iq1.py) */
#if defined(__GLIBC__)
#include <gnu/libc-version.h>
#endif
static int lwq_stable_qsort = 0;  /* set by lwq_quantize_init */
static void lwq_sort_pairs(float * pairs, int n) {
    int nan = 0;
    for (int i = 0; i < n; ++i) nan |= pairs[2*i] != pairs[2*i];
    if (!lwq_stable_qsort || nan) {
        qsort(pairs, n, 2*sizeof(float), iq1_sort_helper);
        return;
    }
    char * e = (char *)pairs;  /* (8-byte elements moved as bytes: no aliasing of the pairs) */
    for (int i = 1; i < n; ++i) {
        char key[8];
        float v, u;
        memcpy(key, e + 8*i, 8);
        memcpy(&v, key, sizeof v);
        int j = i - 1;
        for (; j >= 0; --j) {
            memcpy(&u, e + 8*j, sizeof u);
            if (!(u > v)) break;
            memcpy(e + 8*(j + 1), e + 8*j, 8);
        }
        memcpy(e + 8*(j + 1), key, 8);
    }
}
static int lwq_glibc_sorts_stably(void) {
#if defined(__GLIBC__)
    int major = 0, minor = 0;
    if (sscanf(gnu_get_libc_version(), "%d.%d", &major, &minor) != 2) return 0;
    return major == 2 && minor <= 36;
#else
    return 0;
#endif
}
"""
