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
 * The result never needs anything but llama.cpp's own dequantizer.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define QK 256
#define SB 32
#define NSB 8

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

/* round half up, for v that are clamped to >= 0 anyway (no libm call on baseline x86-64) */
static inline int rnd(float v) { return v <= 0 ? 0 : (int)(v + 0.5f); }

/* Step 1: one sub-block -> scale s >= 0 and min m >= 0 (value = s*q - m). */
static void fit_sub(const float *x, const float *w, float *s_out, float *m_out) {
    float mn = x[0], mx = x[0];
    for (int i = 1; i < SB; i++) { if (x[i] < mn) mn = x[i]; if (x[i] > mx) mx = x[i]; }
    if (mn > 0) mn = 0;
    if (mx <= mn) { *s_out = 0; *m_out = -mn; return; }
    float best = INFINITY, bs = (mx - mn) / 15, bm = -mn;
    for (int k = 0; k <= 20; k++) {
        const float isc = (14.0f + 0.1f * k) / (mx - mn);
        float sw = 0, sq = 0, sqq = 0, sx = 0, sqx = 0;
        int q[SB];
        for (int i = 0; i < SB; i++) {
            q[i] = clampi(rnd(isc * (x[i] - mn)), 0, 15);
            sw += w[i]; sq += w[i] * q[i]; sqq += w[i] * q[i] * q[i];
            sx += w[i] * x[i]; sqx += w[i] * q[i] * x[i];
        }
        const double det = sw * sqq - sq * sq;
        if (det <= 0) continue;
        double a = (sw * sqx - sq * sx) / det, b = (sqq * sx - sq * sqx) / det;
        if (b > 0) { b = 0; a = sqq > 0 ? sqx / sqq : 0; }  /* K-quant mins are subtracted */
        if (a < 0) a = 0;
        float err = 0;
        const float fa = (float)a, fb = (float)b;
        for (int i = 0; i < SB; i++) { const float e = fa * q[i] + fb - x[i]; err += w[i] * e * e; }
        if (err < best) { best = (float)err; bs = (float)a; bm = (float)-b; }
    }
    *s_out = bs; *m_out = bm;
}

/* Step 2: fp16 D among max/t that best rounds v[j] to D * (0..63), weighted by wt[j]. */
static float pick_scale(const float *v, const float *wt) {
    float vmax = 0;
    for (int j = 0; j < NSB; j++) if (v[j] > vmax) vmax = v[j];
    if (vmax <= 0) return 0;
    float best = INFINITY, bd = round_f16(vmax / 63);
    for (int k = 0; k < 64; k++) {
        const float d = round_f16(vmax / (63.0f - k * (23.0f / 63.0f)));
        if (d <= 0) continue;
        double e = 0;
        for (int j = 0; j < NSB; j++) {
            const double r = v[j] - d * clampi(rnd(v[j] / d), 0, 63);
            e += wt[j] * r * r;
        }
        if (e < best) { best = (float)e; bd = d; }
    }
    return bd;
}

/* Weighted error of one sub-block with effective scale a and min b; q filled. */
static float sub_err(const float *x, const float *w, float a, float b, uint8_t *q) {
    float err = 0;
    const float ia = a > 0 ? 1.0f / a : 0;
    for (int i = 0; i < SB; i++) {
        q[i] = (uint8_t)clampi(rnd((x[i] + b) * ia), 0, 15);
        const float e = a * q[i] - b - x[i];
        err += w[i] * e * e;
    }
    return err;
}

static void encode_block(const float *x, const float *w, uint8_t *out) {
    float s[NSB], m[NSB], ws[NSB], wm[NSB];
    for (int j = 0; j < NSB; j++) {
        fit_sub(x + j * SB, w + j * SB, &s[j], &m[j]);
        double a = 0, b = 0;
        for (int i = 0; i < SB; i++) {
            const float wi = w[j * SB + i];
            const float qi = s[j] > 0 ? clampi(rnd((x[j * SB + i] + m[j]) / s[j]), 0, 15) : 0;
            a += wi * qi * qi; b += wi;
        }
        ws[j] = (float)a; wm[j] = (float)b;
    }
    float d = pick_scale(s, ws), dmin = pick_scale(m, wm);
    int sc[NSB] = {0}, mn[NSB] = {0};
    uint8_t q[QK] = {0}, qt[SB];
    for (int it = 0; it < 3; it++) {
        for (int j = 0; j < NSB; j++) {
            const int sc0 = d > 0 ? clampi(rnd(s[j] / d), 0, 63) : 0;
            const int mn0 = dmin > 0 ? clampi(rnd(m[j] / dmin), 0, 63) : 0;
            float best = INFINITY;
            for (int ds = -1; ds <= 1; ds++) for (int dm = -1; dm <= 1; dm++) {
                const int a = clampi(sc0 + ds, 0, 63), b = clampi(mn0 + dm, 0, 63);
                const float e = sub_err(x + j * SB, w + j * SB, d * a, dmin * b, qt);
                if (e < best || (ds == -1 && dm == -1)) {  /* the first always: NaN-proof */ best = e; sc[j] = a; mn[j] = b; memcpy(q + j * SB, qt, SB); }
            }
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
