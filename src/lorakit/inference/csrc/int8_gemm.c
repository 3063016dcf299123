/* lorakit's int8-weight GEMM for x86 CPUs with AVX2 + FMA (built on first use by lorakit.inference.native).

   y[m, n] = scale[n] * sum_k x[m, k] * q[n, k] + bias[n]

   x: fp32 (M, K), row stride ldx; q: int8 weights with one fp32 scale per output row (symmetric per-channel), packed
   as tiles of 16 output rows, k-major inside a tile: packed[t][k][j] = q[16 t + j, k] (rows past N are zero);
   scale and bias are padded to a multiple of 16; bias may be NULL. y: fp32 (M, N), row stride ldy.

   The weights are widened to fp32 in registers (8 at a time) and every product is accumulated in fp32: only the
   weights are rounded (to int8), never the activations. Decode reads each weight once per step, so the kernel is
   built around that read: a 16-column tile of weights is loaded once per k and multiplied into up to 6 rows' fp32
   accumulators (12 of the 16 vector registers); batches of more rows widen the tile once into a buffer that each
   chunk of rows reads from the L1/L2 cache. Every row sums its products in the same order (k = 0..K-1, one
   accumulator per 8 columns) whatever the batch, so a row's result does not depend on its batch-mates.
   Tiles are split over threads (OpenMP). */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NT 16 /* output rows per tile */
#define MR_MAX 6

static inline __attribute__((always_inline)) void widen(const int8_t *p, __m256 *lo, __m256 *hi) {
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    *lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
    *hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(v, v)));
}

/* One tile of 16 output columns for MR rows (a compile-time constant after inlining: the unused accumulators and
   their FMAs are dropped). Accumulators are named variables, not an array, so they stay in registers. */
#define FMA_ROW(i, lo, hi, kk)                                         \
    if (MR > i) {                                                      \
        __m256 xb = _mm256_broadcast_ss(x + i * ldx + (kk));           \
        c##i##0 = _mm256_fmadd_ps(xb, lo, c##i##0);                    \
        c##i##1 = _mm256_fmadd_ps(xb, hi, c##i##1);                    \
    }

static inline __attribute__((always_inline)) void tile(const int MR, const float *x, long ldx, const int8_t *w,
                                                       const float *wf, long K, __m256 out[MR_MAX][2]) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (long k = 0; k < K; k++) {
        __m256 lo, hi;
        if (wf) { /* the tile already widened (several row chunks share it) */
            lo = _mm256_loadu_ps(wf + k * NT);
            hi = _mm256_loadu_ps(wf + k * NT + 8);
        } else {
            widen(w + k * NT, &lo, &hi);
        }
        FMA_ROW(0, lo, hi, k) FMA_ROW(1, lo, hi, k) FMA_ROW(2, lo, hi, k)
        FMA_ROW(3, lo, hi, k) FMA_ROW(4, lo, hi, k) FMA_ROW(5, lo, hi, k)
    }
    out[0][0] = c00, out[0][1] = c01, out[1][0] = c10, out[1][1] = c11, out[2][0] = c20, out[2][1] = c21;
    out[3][0] = c30, out[3][1] = c31, out[4][0] = c40, out[4][1] = c41, out[5][0] = c50, out[5][1] = c51;
}

static void rows_tile(int mr, const float *x, long ldx, const int8_t *w, const float *wf, long K,
                      const float *scale, const float *bias, float *y, long ldy, long n0, long N) {
    __m256 out[MR_MAX][2];
    switch (mr) {
        case 1: tile(1, x, ldx, w, wf, K, out); break;
        case 2: tile(2, x, ldx, w, wf, K, out); break;
        case 3: tile(3, x, ldx, w, wf, K, out); break;
        case 4: tile(4, x, ldx, w, wf, K, out); break;
        case 5: tile(5, x, ldx, w, wf, K, out); break;
        default: tile(6, x, ldx, w, wf, K, out); break;
    }
    __m256 s0 = _mm256_loadu_ps(scale + n0), s1 = _mm256_loadu_ps(scale + n0 + 8);
    __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
    if (bias) {
        b0 = _mm256_loadu_ps(bias + n0);
        b1 = _mm256_loadu_ps(bias + n0 + 8);
    }
    long valid = N - n0 < NT ? N - n0 : NT;
    for (int i = 0; i < mr; i++) {
        float *dst = y + i * ldy + n0;
        __m256 r0 = _mm256_fmadd_ps(out[i][0], s0, b0), r1 = _mm256_fmadd_ps(out[i][1], s1, b1);
        if (valid == NT) {
            _mm256_storeu_ps(dst, r0);
            _mm256_storeu_ps(dst + 8, r1);
        } else {
            float tmp[NT];
            _mm256_storeu_ps(tmp, r0);
            _mm256_storeu_ps(tmp + 8, r1);
            memcpy(dst, tmp, (size_t)valid * sizeof(float));
        }
    }
}

/* Rows are split into chunks of at most 6, as even as possible (16 rows: 6, 5, 5). With several chunks, each tile
   is widened to fp32 once (into a per-thread buffer: K * 64 bytes) and the chunks read that. */
void lk_int8_gemm(const float *x, long M, long K, long ldx, const int8_t *packed, const float *scale,
                  const float *bias, float *y, long N, long ldy, int threads) {
    long tiles = (N + NT - 1) / NT;
    long chunks = (M + MR_MAX - 1) / MR_MAX;
#pragma omp parallel num_threads(threads) if (threads > 1 && tiles > 1)
    {
        float *wf = chunks > 1 ? aligned_alloc(64, (size_t)K * NT * sizeof(float) + 64) : NULL;
#pragma omp for schedule(static)
        for (long t = 0; t < tiles; t++) {
            const int8_t *w = packed + t * K * NT;
            if (wf)
                for (long k = 0; k < K; k++) {
                    __m256 lo, hi;
                    widen(w + k * NT, &lo, &hi);
                    _mm256_store_ps(wf + k * NT, lo);
                    _mm256_store_ps(wf + k * NT + 8, hi);
                }
            long m = 0;
            for (long c = 0; c < chunks; c++) {
                long mr = (M - m) / (chunks - c);
                if ((M - m) % (chunks - c)) mr++;
                rows_tile((int)mr, x + m * ldx, ldx, w, wf, K, scale, bias, y + m * ldy, ldy, t * NT, N);
                m += mr;
            }
        }
        free(wf);
    }
}
