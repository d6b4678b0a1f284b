/* lwq-gguf's Q4_K encoder: the same block_q4_K bytes llama.cpp reads, chosen by a closer fit.
 *
 * ggml's quantize_row_q4_K fits each 32-weight sub-block (scale, min), then rounds the eight
 * scales and eight mins to 6 bits against the largest of each (d = max/63), and re-rounds the
 * 4-bit values. Here, per 256-weight super-block:
 *   1. each sub-block: scale/offset by weighted least squares over 21 trial grids (as ggml);
 *   2. the super-block scales d and dmin: the fp16 value, among 64 candidates max/t
 *      (t = 63 ... 40), that best rounds the eight sub-block values;
 *   3. three rounds of: each sub-block tries its 6-bit scale and min -1/0/+1 (9 pairs, 4-bit
 *      values re-rounded for each) and keeps the least weighted error; then d and dmin are
 *      re-fitted by least squares over the whole super-block (fp16).
 * Error measure: sum w_i (x_i - y_i)^2, w = the importance matrix column weight, or 1.
 * Speed: the trial grids of step 1, the candidates of step 2 and the 9 pairs of step 3 are
 * evaluated side by side, so the compiler vectorizes across candidates (-fno-trapping-math lets
 * it if-convert); every sum still runs in weight order, so the floats are those of a
 * one-candidate-at-a-time loop (tests/test_kquant.py pins the bytes).
 * The result never needs anything but llama.cpp's own dequantizer.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define QK 256
#define SB 32
#define NSB 8
#define NC 12   /* 9 candidate (scale, min) pairs, padded for vector width */

static uint16_t f32_to_f16(float f) {  /* round to nearest even, as ggml's scalar fallback */
    union { float f; uint32_t u; } in = { f };
    const float scale_to_inf = 0x1.0p+112f, scale_to_zero = 0x1.0p-110f;
    float base = (fabsf(f) * scale_to_inf) * scale_to_zero;
    const uint32_t w = in.u, shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    union { uint32_t u; float f; } b = { (bias >> 1) + 0x07800000u };
    base = b.f + base;
    union { float f; uint32_t u; } r = { base };
    const uint32_t bits = r.u, exp_bits = (bits >> 13) & 0x00007C00u, mant = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mant;
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

static float f16_to_f32(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    const uint32_t exp_offset = 0xE0u << 23;
    union { uint32_t u; float f; } a = { (two_w >> 4) + exp_offset }, m = { (two_w >> 17) | (126u << 23) };
    const float normalized = a.f * 0x1.0p-112f, denormalized = m.f - 0.5f;
    union { float f; uint32_t u; } r;
    r.f = two_w < (1u << 27) ? denormalized : normalized;
    union { uint32_t u; float f; } out = { sign | r.u };
    return out.f;
}

static float round_f16(float v) { return f16_to_f32(f32_to_f16(v)); }

static int clampi(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* v rounded half up and clamped to 0..hi (an integer), as a float; no libm call on baseline
 * x86-64, and branch-free so that loops over candidates vectorize. The value of the earlier
 * clampi((int)(v + 0.5f), 0, hi) for every v: an x86 (int) cast of v + 0.5 >= 2^31 gives
 * INT_MIN, clamped to 0; NaN and v <= 0 give 0. */
static inline float qround(float v, float hi) {
    const float t = v + 0.5f, c = t < hi ? t : hi;
    return ((v > 0) & (t < 2147483648.0f)) ? (float)(int)c : 0.0f;
}

/* Step 1: one sub-block -> scale s >= 0 and min m >= 0 (value = s*q - m). The 21 trial grids
 * are evaluated side by side (each sum still in weight order, so the same floats as one by one). */
#define NK 21
#define NKP 24
static void fit_sub(const float *x, const float *w, float *s_out, float *m_out) {
    float mn = x[0], mx = x[0];
    for (int i = 1; i < SB; i++) { if (x[i] < mn) mn = x[i]; if (x[i] > mx) mx = x[i]; }
    if (mn > 0) mn = 0;
    if (mx <= mn) { *s_out = 0; *m_out = -mn; return; }
    float isc[NKP], sq[NKP] = {0}, sqq[NKP] = {0}, sqx[NKP] = {0}, err[NKP] = {0};
    float fa[NKP] = {0}, fb[NKP] = {0};
    int ok[NKP] = {0};
    for (int k = 0; k < NKP; k++) isc[k] = (14.0f + 0.1f * k) / (mx - mn);
    float sw = 0, sx = 0;
    for (int i = 0; i < SB; i++) { sw += w[i]; sx += w[i] * x[i]; }
    for (int i = 0; i < SB; i++) {
        const float xm = x[i] - mn, wi = w[i], xi = x[i];
        for (int k = 0; k < NKP; k++) {
            const float q = qround(isc[k] * xm, 15.0f), wq = wi * q;
            sq[k] += wq; sqq[k] += wq * q; sqx[k] += wq * xi;
        }
    }
    for (int k = 0; k < NK; k++) {
        const double det = sw * sqq[k] - sq[k] * sq[k];
        if (det <= 0) continue;
        double a = (sw * sqx[k] - sq[k] * sx) / det, b = (sqq[k] * sx - sq[k] * sqx[k]) / det;
        if (b > 0) { b = 0; a = sqq[k] > 0 ? sqx[k] / sqq[k] : 0; }  /* K-quant mins are subtracted */
        if (a < 0) a = 0;
        fa[k] = (float)a; fb[k] = (float)b; ok[k] = 1;
    }
    for (int i = 0; i < SB; i++) {
        const float xm = x[i] - mn, wi = w[i], xi = x[i];
        for (int k = 0; k < NKP; k++) {
            const float q = qround(isc[k] * xm, 15.0f), e = fa[k] * q + fb[k] - xi;
            err[k] += wi * e * e;
        }
    }
    float best = INFINITY, bs = (mx - mn) / 15, bm = -mn;
    for (int k = 0; k < NK; k++)
        if (ok[k] && err[k] < best) { best = err[k]; bs = fa[k]; bm = -fb[k]; }
    *s_out = bs; *m_out = bm;
}

/* Step 2: fp16 D among max/t that best rounds v[j] to D * (0..63), weighted by wt[j]. */
#define ND 64
static float pick_scale(const float *v, const float *wt) {
    float vmax = 0;
    for (int j = 0; j < NSB; j++) if (v[j] > vmax) vmax = v[j];
    if (vmax <= 0) return 0;
    float dk[ND];
    double e[ND] = {0};
    for (int k = 0; k < ND; k++) dk[k] = round_f16(vmax / (63.0f - k * (23.0f / 63.0f)));
    for (int j = 0; j < NSB; j++) {
        const float vj = v[j];
        const double wj = wt[j];
        for (int k = 0; k < ND; k++) {
            const double r = vj - dk[k] * qround(vj / dk[k], 63.0f);
            e[k] += wj * r * r;
        }
    }
    float best = INFINITY, bd = round_f16(vmax / 63);
    for (int k = 0; k < ND; k++)
        if (dk[k] > 0 && e[k] < best) { best = (float)e[k]; bd = dk[k]; }
    return bd;
}

static void encode_block(const float *x, const float *w, uint8_t *out) {
    float s[NSB], m[NSB], ws[NSB], wm[NSB];
    for (int j = 0; j < NSB; j++) {
        fit_sub(x + j * SB, w + j * SB, &s[j], &m[j]);
        double a = 0, b = 0;
        for (int i = 0; i < SB; i++) {
            const float wi = w[j * SB + i];
            const float qi = s[j] > 0 ? qround((x[j * SB + i] + m[j]) / s[j], 15.0f) : 0;
            a += wi * qi * qi; b += wi;
        }
        ws[j] = (float)a; wm[j] = (float)b;
    }
    float d = pick_scale(s, ws), dmin = pick_scale(m, wm);
    int sc[NSB] = {0}, mn[NSB] = {0};
    uint8_t q[QK] = {0};
    for (int it = 0; it < 3; it++) {
        for (int j = 0; j < NSB; j++) {
            const float *xj = x + j * SB, *wj = w + j * SB;
            const int sc0 = d > 0 ? (int)qround(s[j] / d, 63.0f) : 0;
            const int mn0 = dmin > 0 ? (int)qround(m[j] / dmin, 63.0f) : 0;
            /* the 9 (scale, min) pairs sc0-1..sc0+1 x mn0-1..mn0+1, evaluated side by side */
            int ca[NC], cb[NC];
            float A[NC] = {0}, B[NC] = {0}, IA[NC] = {0}, E[NC] = {0};
            for (int c = 0; c < 9; c++) {
                ca[c] = clampi(sc0 + c / 3 - 1, 0, 63); cb[c] = clampi(mn0 + c % 3 - 1, 0, 63);
                A[c] = d * ca[c]; B[c] = dmin * cb[c]; IA[c] = A[c] > 0 ? 1.0f / A[c] : 0;
            }
            for (int i = 0; i < SB; i++) {
                const float xi = xj[i], wi = wj[i];
                for (int c = 0; c < NC; c++) {
                    const float e = A[c] * qround((xi + B[c]) * IA[c], 15.0f) - B[c] - xi;
                    E[c] += wi * e * e;
                }
            }
            int bc = 0;  /* the first always: NaN-proof */
            for (int c = 1; c < 9; c++) if (E[c] < E[bc]) bc = c;
            sc[j] = ca[bc]; mn[j] = cb[bc];
            for (int i = 0; i < SB; i++)
                q[j * SB + i] = (uint8_t)qround((xj[i] + B[bc]) * IA[bc], 15.0f);
        }
        if (it == 2) break;
        /* x ~ d * (sc q) - dmin * mn over the super-block: 2x2 weighted least squares */
        double a11 = 0, a12 = 0, a22 = 0, b1 = 0, b2 = 0;
        for (int j = 0; j < NSB; j++) for (int i = 0; i < SB; i++) {
            const double wi = w[j * SB + i], P = (double)sc[j] * q[j * SB + i], M = mn[j], X = x[j * SB + i];
            a11 += wi * P * P; a12 -= wi * P * M; a22 += wi * M * M; b1 += wi * P * X; b2 -= wi * M * X;
        }
        const double det = a11 * a22 - a12 * a12;
        if (det > 1e-30) {
            const double nd = (a22 * b1 - a12 * b2) / det, nm = (a11 * b2 - a12 * b1) / det;
            if (nd > 0 && nd < 65504) d = round_f16((float)nd);  /* fp16's range */
            if (nm >= 0 && nm < 65504) dmin = round_f16((float)nm);
        }
    }
    /* block_q4_K: fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of 4-bit values */
    const uint16_t hd = f32_to_f16(d), hm = f32_to_f16(dmin);
    memcpy(out, &hd, 2); memcpy(out + 2, &hm, 2);
    uint8_t *scales = out + 4, *qs = out + 16;
    memset(scales, 0, 12);
    for (int j = 0; j < NSB; j++) {
        if (j < 4) { scales[j] = (uint8_t)sc[j]; scales[j + 4] = (uint8_t)mn[j]; }
        else {
            scales[j + 4] = (uint8_t)((sc[j] & 0xF) | ((mn[j] & 0xF) << 4));
            scales[j - 4] |= (uint8_t)((sc[j] >> 4) << 6);
            scales[j] |= (uint8_t)((mn[j] >> 4) << 6);
        }
    }
    for (int c = 0; c < QK; c += 64)
        for (int l = 0; l < 32; l++) qs[c / 2 + l] = (uint8_t)(q[c + l] | (q[c + l + 32] << 4));
}

/* nrows rows of n (a multiple of 256) floats -> nrows * n / 256 blocks of 144 bytes.
 * imatrix: n per-column weights, or NULL (all 1). Returns bytes written. */
int64_t lwq_quantize_q4_k(const float *src, uint8_t *dst, int64_t nrows, int64_t n,
                          const float *imatrix) {
    float ones[QK];
    for (int i = 0; i < QK; i++) ones[i] = 1.0f;
    uint8_t *o = dst;
    for (int64_t r = 0; r < nrows; r++)
        for (int64_t c = 0; c < n; c += QK, o += 144)
            encode_block(src + r * n + c, imatrix ? imatrix + c : ones, o);
    return (int64_t)(o - dst);
}
