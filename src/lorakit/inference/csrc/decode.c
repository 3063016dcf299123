/* The small per-layer steps of a CPU decode step, fused (built with int8_gemm.c and attend.c by
   lorakit.inference.native). Each replaces several PyTorch calls whose fixed cost outweighs their arithmetic at a
   handful of rows. All arithmetic is fp32. */

#include <immintrin.h>
#include "simd.h"
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

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

/* ---- one whole decoder layer over int8 weights (the steps above and lk_int8_gemm / lk_attend_one in turn) ---- */

void lk_int8_gemm(const float *x, long M, long K, long ldx, const int8_t *packed, const float *scale,
                  const float *bias, float *y, long N, long ldy, int threads);
void lk_attend_one(const float *q, const float *k, const float *v, long slot_stride, long head_stride,
                   const long *valid, float *out, long n, long H, long Hkv, long D, int threads);

typedef struct {
    const int8_t *packed; /* lk_int8_gemm's tiles */
    const float *scale;
    const float *bias; /* or NULL */
    long out;
    const float *a_t;  /* the batch's stacked adapters (R, in), or NULL: none */
    const float *b;    /* (R, out) */
    long rank;
    const float *mask; /* (n, R) 1/0, or NULL: every row uses every rank column */
} lk_proj;

static void project(const lk_proj *p, const float *x, long n, long in, float *y, int threads) {
    lk_int8_gemm(x, n, in, in, p->packed, p->scale, p->bias, y, p->out, p->out, threads);
    if (p->a_t) lk_lora(x, n, in, p->a_t, p->b, p->rank, p->out, p->mask, y, threads);
}

/* x (n, hidden) is updated in place: x += attention(norm1(x)); x += mlp(norm2(x)). proj: qkv, o, gate_up, down.
   Returns 0, or -1 when scratch memory could not be allocated (x unchanged then). */
int lk_decode_layer(float *x, long n, long hidden, const float *ln1, const float *ln2, float eps,
                    const lk_proj *proj, const float *cos, const float *sin, float *keys, float *values, long size,
                    long first, const long *pos, const long *valid, long H, long Hkv, long D, int threads) {
    long width = (H + 2 * Hkv) * D, inter = proj[2].out / 2;
    long big = width > 2 * inter ? width : 2 * inter;
    float *h = malloc(sizeof(float) * n * (hidden + big + H * D + H * D + inter + hidden));
    if (!h) return -1;
    float *wide = h + n * hidden, *q = wide + n * big, *attn = q + n * H * D, *act = attn + n * H * D;
    float *out = act + n * inter;

    lk_rms_norm(x, n, hidden, ln1, eps, h);
    project(&proj[0], h, n, hidden, wide, threads);
    lk_rope_cache(wide, n, H, Hkv, D, cos, sin, q, keys, values, size, first, pos);
    long slot = Hkv * size * D;
    lk_attend_one(q, keys + first * slot, values + first * slot, slot, size * D, valid, attn, n, H, Hkv, D, threads);
    project(&proj[1], attn, n, H * D, out, threads);
    for (long i = 0; i < n * hidden; i++) x[i] += out[i];

    lk_rms_norm(x, n, hidden, ln2, eps, h);
    project(&proj[2], h, n, hidden, wide, threads);
    for (long r = 0; r < n; r++) {
        const float *g = wide + r * 2 * inter, *u = g + inter;
        float *a = act + r * inter;
        for (long i = 0; i < inter; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
    project(&proj[3], act, n, inter, out, threads);
    for (long i = 0; i < n * hidden; i++) x[i] += out[i];
    free(h);
    return 0;
}
