/* AVX2 helpers shared by lorakit's kernels (included by attend.c and decode.c). */
#ifndef LORAKIT_SIMD_H
#define LORAKIT_SIMD_H

#include <immintrin.h>

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* sum a[i] * b[i]: 8 lanes of FMAs, then the lanes, then the tail (d not a multiple of 8). */
static inline float dot8(const float *a, const float *b, long d) {
    __m256 acc = _mm256_setzero_ps();
    long i = 0;
    for (; i + 8 <= d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum8(acc);
    for (; i < d; i++) s += a[i] * b[i];
    return s;
}

#endif
