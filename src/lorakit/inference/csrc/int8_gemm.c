/* lorakit's int8-weight GEMM for x86 CPUs with AVX2 + FMA (built on first use by lorakit.inference.native).

   y[m, n] = scale[n] * sum_k x[m, k] * q[n, k] + bias[n]

   x: fp32 (M, K), row stride ldx; q: int8 weights with one fp32 scale per output row (symmetric per-channel), packed
   as tiles of 16 output rows, k-major inside a tile: packed[t][k][j] = q[16 t + j, k] (rows past N are zero);
   scale and bias are padded to a multiple of 16; bias may be NULL. y: fp32 (M, N), row stride ldy.

   The weights are widened to fp32 in registers (8 at a time) and every product is accumulated in fp32: only the
   weights are rounded (to int8), never the activations. Decode reads each weight once per step, so the kernel is
   built around that read: a 16-column tile of weights is loaded once per k and multiplied into up to 6 rows' fp32
   accumulators (12 of the 16 vector registers); batches of more rows take the tile again from the L1/L2 cache.
   With one row the k loop is unrolled with separate accumulators, so the FMA latency is hidden while the weights
   stream from memory. Tiles are split over threads (OpenMP). */

#include <immintrin.h>
#include <stdint.h>
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
                                                       long K, __m256 out[MR_MAX][2]) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (long k = 0; k < K; k++) {
        __m256 lo, hi;
        widen(w + k * NT, &lo, &hi);
        FMA_ROW(0, lo, hi, k) FMA_ROW(1, lo, hi, k) FMA_ROW(2, lo, hi, k)
        FMA_ROW(3, lo, hi, k) FMA_ROW(4, lo, hi, k) FMA_ROW(5, lo, hi, k)
    }
    out[0][0] = c00, out[0][1] = c01, out[1][0] = c10, out[1][1] = c11, out[2][0] = c20, out[2][1] = c21;
    out[3][0] = c30, out[3][1] = c31, out[4][0] = c40, out[4][1] = c41, out[5][0] = c50, out[5][1] = c51;
}

/* One row: the weights stream from memory, so the k loop is unrolled 4 ways with separate accumulators to hide the
   FMA latency (one chain per k would wait on it). */
static void tile1(const float *x, const int8_t *w, long K, __m256 out[MR_MAX][2]) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0, d0 = a0, d1 = a0;
    long k = 0;
    for (; k + 4 <= K; k += 4) {
        __m256 lo, hi;
        widen(w + k * NT, &lo, &hi);
        a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k), lo, a0);
        a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k), hi, a1);
        widen(w + (k + 1) * NT, &lo, &hi);
        b0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 1), lo, b0);
        b1 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 1), hi, b1);
        widen(w + (k + 2) * NT, &lo, &hi);
        c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 2), lo, c0);
        c1 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 2), hi, c1);
        widen(w + (k + 3) * NT, &lo, &hi);
        d0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 3), lo, d0);
        d1 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 3), hi, d1);
    }
    for (; k < K; k++) {
        __m256 lo, hi;
        widen(w + k * NT, &lo, &hi);
        a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k), lo, a0);
        a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k), hi, a1);
    }
    out[0][0] = _mm256_add_ps(_mm256_add_ps(a0, b0), _mm256_add_ps(c0, d0));
    out[0][1] = _mm256_add_ps(_mm256_add_ps(a1, b1), _mm256_add_ps(c1, d1));
}

static void rows_tile(int mr, const float *x, long ldx, const int8_t *w, long K, const float *scale,
                      const float *bias, float *y, long ldy, long n0, long N) {
    __m256 out[MR_MAX][2];
    switch (mr) {
        case 1: tile1(x, w, K, out); break;
        case 2: tile(2, x, ldx, w, K, out); break;
        case 3: tile(3, x, ldx, w, K, out); break;
        case 4: tile(4, x, ldx, w, K, out); break;
        case 5: tile(5, x, ldx, w, K, out); break;
        default: tile(6, x, ldx, w, K, out); break;
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

/* Rows are split into chunks of at most 6, as even as possible (16 rows: 6, 5, 5). */
void lk_int8_gemm(const float *x, long M, long K, long ldx, const int8_t *packed, const float *scale,
                  const float *bias, float *y, long N, long ldy, int threads) {
    long tiles = (N + NT - 1) / NT;
    long chunks = (M + MR_MAX - 1) / MR_MAX;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && tiles > 1)
    for (long t = 0; t < tiles; t++) {
        const int8_t *w = packed + t * K * NT;
        long m = 0;
        for (long c = 0; c < chunks; c++) {
            long mr = (M - m) / (chunks - c);
            if ((M - m) % (chunks - c)) mr++;
            rows_tile((int)mr, x + m * ldx, ldx, w, K, scale, bias, y + m * ldy, ldy, t * NT, N);
            m += mr;
        }
    }
}
