/* Decode attention on the CPU: one new query per row over that row's cached keys/values (built with int8_gemm.c by
   lorakit.inference.native).

   q: fp32 (n, H, D) contiguous. Row r's keys and values: k + r * slot_stride + h * head_stride + t * D for kv head h
   and column t < valid[r]. Query head j reads kv head j / (H / Hkv) (grouped-query attention).
   out: fp32 (n, H, D) contiguous: softmax(q . k_t / sqrt(D)) weighted sum of v_t, all in fp32.
   Rows are split over threads (OpenMP). */

#include <immintrin.h>
#include "simd.h"
#include <math.h>
#include <stdlib.h>

void lk_attend_one(const float *q, const float *k, const float *v, long slot_stride, long head_stride,
                   const long *valid, float *out, long n, long H, long Hkv, long D, int threads) {
    long group = H / Hkv;
    float scale = 1.0f / sqrtf((float)D);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n > 1)
    for (long r = 0; r < n; r++) {
        long T = valid[r];
        float *p = malloc((size_t)(T > 0 ? T : 1) * sizeof(float));
        for (long j = 0; j < H; j++) {
            const float *qj = q + (r * H + j) * D;
            const float *kh = k + r * slot_stride + (j / group) * head_stride;
            const float *vh = v + r * slot_stride + (j / group) * head_stride;
            float *o = out + (r * H + j) * D;
            float top = -INFINITY;
            for (long t = 0; t < T; t++) {
                p[t] = dot8(qj, kh + t * D, D) * scale;
                if (p[t] > top) top = p[t];
            }
            float sum = 0.0f;
            for (long t = 0; t < T; t++) {
                p[t] = expf(p[t] - top);
                sum += p[t];
            }
            for (long i = 0; i < D; i++) o[i] = 0.0f;
            for (long t = 0; t < T; t++) {
                float w = p[t] / sum;
                const float *vt = vh + t * D;
                long i = 0;
                for (; i + 8 <= D; i += 8)
                    _mm256_storeu_ps(o + i, _mm256_fmadd_ps(_mm256_set1_ps(w), _mm256_loadu_ps(vt + i),
                                                            _mm256_loadu_ps(o + i)));
                for (; i < D; i++) o[i] += w * vt[i];
            }
        }
        free(p);
    }
}
