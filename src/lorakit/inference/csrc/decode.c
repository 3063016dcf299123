/* The small per-layer steps of a CPU decode step, fused (built with int8_gemm.c and attend.c by
   lorakit.inference.native). Each replaces several PyTorch calls whose fixed cost outweighs their arithmetic at a
   handful of rows. All arithmetic is fp32. */

#include <immintrin.h>
#include <math.h>

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float dot8(const float *a, const float *b, long d) {
    __m256 acc = _mm256_setzero_ps();
    long i = 0;
    for (; i + 8 <= d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum8(acc);
    for (; i < d; i++) s += a[i] * b[i];
    return s;
}

/* RMSNorm as transformers computes it: y = w * (x * 1 / sqrt(mean(x^2) + eps)), per row of x (n, d). */
void lk_rms_norm(const float *x, long n, long d, const float *w, float eps, float *y) {
    for (long r = 0; r < n; r++) {
        const float *xr = x + r * d;
        float *yr = y + r * d;
        float inv = 1.0f / sqrtf(dot8(xr, xr, d) / (float)d + eps);
        for (long i = 0; i < d; i++) yr[i] = w[i] * (xr[i] * inv);
    }
}

/* After the fused q/k/v projection of one new token per row (qkv: (n, (H + 2 Hkv) D)): rotate q and k by the row's
   rotary tables (cos, sin_signed: (n, D); out = x cos + roll(x, D / 2) sin_signed), write q to q_out (n, H, D), and
   k and v into the layer's cache (slots, Hkv, size, D) at slot first + r, column pos[r]. */
void lk_rope_cache(const float *qkv, long n, long H, long Hkv, long D, const float *cos, const float *sin,
                   float *q_out, float *keys, float *values, long size, long first, const long *pos) {
    long half = D / 2, width = (H + 2 * Hkv) * D;
    for (long r = 0; r < n; r++) {
        const float *row = qkv + r * width, *c = cos + r * D, *s = sin + r * D;
        for (long h = 0; h < H + Hkv; h++) {
            const float *x = row + h * D;
            float *o = h < H ? q_out + (r * H + h) * D : keys + (((first + r) * Hkv + h - H) * size + pos[r]) * D;
            for (long i = 0; i < D; i++) {
                float rolled = x[i < half ? i + half : i - half];
                o[i] = x[i] * c[i] + rolled * s[i];
            }
        }
        for (long h = 0; h < Hkv; h++) {
            const float *x = row + (H + Hkv + h) * D;
            float *o = values + (((first + r) * Hkv + h) * size + pos[r]) * D;
            for (long i = 0; i < D; i++) o[i] = x[i];
        }
    }
}

/* Per-row LoRA update y += ((x A) * mask) B for x (n, in) with stacked factors at = A^T (R, in) and b (R, out);
   mask (n, R) of 1/0 or NULL (every rank column). A row computes only its own rank columns (mask 1). */
void lk_lora(const float *x, long n, long in, const float *at, const float *b, long R, long out, const float *mask,
             float *y, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n > 1)
    for (long m = 0; m < n; m++) {
        const float *xm = x + m * in, *mk = mask ? mask + m * R : 0;
        float *ym = y + m * out;
        for (long r = 0; r < R; r++) {
            if (mk && mk[r] == 0.0f) continue;
            float h = dot8(xm, at + r * in, in) * (mk ? mk[r] : 1.0f);
            const float *br = b + r * out;
            __m256 hv = _mm256_set1_ps(h);
            long i = 0;
            for (; i + 8 <= out; i += 8)
                _mm256_storeu_ps(ym + i, _mm256_fmadd_ps(hv, _mm256_loadu_ps(br + i), _mm256_loadu_ps(ym + i)));
            for (; i < out; i++) ym[i] += h * br[i];
        }
    }
}
