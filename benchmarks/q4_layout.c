/* The Q4 weight layout, measured: lmlab's current one against a 16-row interleaved one, on a
 * matrix too large for the caches (512 MiB of 4-bit values, Q4_0's rule: w = d * (q - 8)).
 *
 *   gcc -O3 -march=native -fopenmp benchmarks/q4_layout.c -o /tmp/q4_layout && OMP_NUM_THREADS=2 /tmp/q4_layout
 *
 * Needs AVX512-VNNI. Not a test, and not lmlab's kernel: a measurement for the next change to it.
 *
 * A (csrc/quant.c today): each row's bytes in order, two groups of 32 per 32 bytes (low and high
 *   nibbles), a float16 scale per group in a separate array; a tile of 4 rows, four groups a
 *   step, one vpdpbusd per 64 values, then a float convert and fma per two groups and row.
 * B: blocks of 16 rows; per group, 4 registers of 64 bytes in which lane r (4 bytes) holds 8
 *   values of row r (4 in the low nibbles, 4 in the high), then the 16 rows' scales. x's 4
 *   values are broadcast to every lane, so a group's 8 vpdpbusd add into one int32 register
 *   (started at -8 * sum(x), the offset, exact), and one convert and one fma serve 16 rows.
 *   One stream per block, half A's instructions per byte.
 *
 * Prints each layout's GB/s (bytes of its weights and scales per second) beside a plain read of
 * the same bytes, three times, and the largest difference between the two results. Measured on
 * the 2-core Xeon, 2 threads, quiet, two runs an hour apart: A 11.8-14.9 GB/s, B 21.2-29.1 GB/s,
 * a read 26.9-32.6 GB/s (B at 79-93% of the read, A at 44-48%); the results agree within 6e-6.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

// ---------------- layout A: per row K/2 bytes (pairs), fp16 scale per group; x second copy in nibble order
static void matvec_a(const uint8_t *q, const uint16_t *sc, const int8_t *xn, const float *sx, const float *xsum,
                     int64_t N, int K, float *y) {
    const int NG = K / 32, quads = NG / 4;
    const __m512i nib = _mm512_set1_epi8(15);
    const __m512i ia = _mm512_set_epi32(2,2,2,2,2,2,2,2,0,0,0,0,0,0,0,0), ib = _mm512_set_epi32(3,3,3,3,3,3,3,3,1,1,1,1,1,1,1,1);
#pragma omp parallel for schedule(static)
    for (int64_t r0 = 0; r0 < N; r0 += 4) {
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int qd = 0; qd < quads; qd++) {
            const __m512i xa = _mm512_loadu_si512(xn + qd * 128), xb = _mm512_loadu_si512(xn + qd * 128 + 64);
            const __m128 s4 = _mm_loadu_ps(sx + 4 * qd);
            for (int r = 0; r < 4; r++) {
                const uint8_t *w = q + (r0 + r) * (K / 2) + qd * 64;
                __builtin_prefetch(w + 16 * (K / 2), 0, 3);
                const __m512i v = _mm512_loadu_si512(w);
                const __m512i wa = _mm512_and_si512(v, nib), wb = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
                const __m128 d4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(sc + (r0 + r) * NG + 4 * qd)));
                const __m512 s = _mm512_castps128_ps512(_mm_mul_ps(d4, s4));
                const __m512 da = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wa, xa));
                const __m512 db = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wb, xb));
                acc[r] = _mm512_fmadd_ps(da, _mm512_permutexvar_ps(ia, s), acc[r]);
                acc[r] = _mm512_fmadd_ps(db, _mm512_permutexvar_ps(ib, s), acc[r]);
            }
        }
        for (int r = 0; r < 4; r++) {
            float m = 0;
            for (int g = 0; g < NG; g++) m += _cvtsh_ss(sc[(r0 + r) * NG + g]) * xsum[g];
            y[r0 + r] = _mm512_reduce_add_ps(acc[r]) - 8 * m;
        }
    }
}

// ---------------- layout B: blocks of 16 rows; per group 256 bytes (4 registers: lane r byte b: lo = value 8j+b, hi = 8j+4+b)
// then the 16 rows' fp16 scales of that group (32 bytes), so one stream per block.
static void matvec_b(const uint8_t *q, const int8_t *x, const float *sx, const int32_t *xs, int64_t N, int K, float *y) {
    const int NG = K / 32;
    const __m512i nib = _mm512_set1_epi8(15);
    const size_t gbytes = 256 + 32;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < N / 16; b++) {
        const uint8_t *blk = q + (size_t)b * NG * gbytes;
        __m512 acc = _mm512_setzero_ps();
        for (int g = 0; g < NG; g++) {
            const uint8_t *w = blk + (size_t)g * gbytes;
            __builtin_prefetch(w + 8 * gbytes, 0, 3);
            __builtin_prefetch(w + 8 * gbytes + 64, 0, 3);
            __builtin_prefetch(w + 8 * gbytes + 128, 0, 3);
            __builtin_prefetch(w + 8 * gbytes + 192, 0, 3);
            __builtin_prefetch(w + 8 * gbytes + 256, 0, 3);
            const int32_t *x4 = (const int32_t *)(x + g * 32);
            __m512i dot = _mm512_set1_epi32(-8 * xs[g]);  // the offset 8, exact, in the integer sum
            for (int j = 0; j < 4; j++) {
                const __m512i v = _mm512_loadu_si512(w + 64 * j);
                dot = _mm512_dpbusd_epi32(dot, _mm512_and_si512(v, nib), _mm512_set1_epi32(x4[2 * j]));
                dot = _mm512_dpbusd_epi32(dot, _mm512_and_si512(_mm512_srli_epi16(v, 4), nib), _mm512_set1_epi32(x4[2 * j + 1]));
            }
            const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + 256)));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, _mm512_set1_ps(sx[g])), acc);
        }
        _mm512_storeu_ps(y + b * 16, acc);
    }
}

static double bw_sum(const uint8_t *p, size_t n) {
    double t = now(); __m512i s = _mm512_setzero_si512();
#pragma omp parallel
    { __m512i ls = _mm512_setzero_si512();
#pragma omp for schedule(static)
      for (size_t i = 0; i < n; i += 64) ls = _mm512_add_epi64(ls, _mm512_sad_epu8(_mm512_loadu_si512(p + i), _mm512_setzero_si512()));
#pragma omp critical
      s = _mm512_add_epi64(s, ls); }
    volatile long long z = _mm512_reduce_add_epi64(s); (void)z;
    return n / (now() - t) / 1e9;
}

int main(void) {
    const int K = 2048, NG = K / 32;
    const int64_t N = 1 << 19;  // 512k rows x 2048: 512 MiB of nibbles + scales (beyond what the cache keeps)
    srand(1);
    // layout A data
    uint8_t *qa = aligned_alloc(64, (size_t)N * K / 2); uint16_t *sc = aligned_alloc(64, (size_t)N * NG * 2);
    for (size_t i = 0; i < (size_t)N * K / 2; i++) qa[i] = rand();
    for (size_t i = 0; i < (size_t)N * NG; i++) sc[i] = _cvtss_sh(0.01f * (1 + (rand() % 100) / 100.0f), 0);
    // x: int8 per group, natural order and nibble order (A's second copy), scales, sums
    int8_t x[2048], xn[2048]; float sx[64], xsum[64]; int32_t xs[64];
    for (int i = 0; i < K; i++) x[i] = (rand() % 255) - 127;
    for (int g = 0; g < NG; g++) { sx[g] = 0.01f; int s = 0; for (int i = 0; i < 32; i++) s += x[g * 32 + i]; xs[g] = s; xsum[g] = sx[g] * s; }
    for (int j = 0; j + 4 <= NG; j += 4) for (int i = 0; i < 4; i++) memcpy(xn + (j + i) * 32, x + (j + (i % 2) * 2 + i / 2) * 32, 32);
    // layout B from A's values: value v of row r in group g
    const size_t gbytes = 256 + 32;
    uint8_t *qb = aligned_alloc(64, (size_t)N / 16 * NG * gbytes);
    for (int64_t b = 0; b < N / 16; b++)
        for (int g = 0; g < NG; g++) {
            uint8_t *w = qb + ((size_t)b * NG + g) * gbytes;
            for (int r = 0; r < 16; r++) {
                const uint8_t *row = qa + (b * 16 + r) * (K / 2);
                // A's value i of group g: pair c = g/2, low nibble if g even; byte = c*32 + i
                uint8_t v[32];
                for (int i = 0; i < 32; i++) { uint8_t byte = row[(g / 2) * 32 + i]; v[i] = g % 2 ? byte >> 4 : byte & 15; }
                for (int j = 0; j < 4; j++) for (int bb = 0; bb < 4; bb++)
                    w[64 * j + 4 * r + bb] = v[8 * j + bb] | (v[8 * j + 4 + bb] << 4);
                memcpy(w + 256 + 2 * r, &sc[(b * 16 + r) * NG + g], 2);
            }
        }
    float *ya = malloc(N * 4), *yb = malloc(N * 4);
    matvec_a(qa, sc, xn, sx, xsum, N, K, ya); matvec_b(qb, x, sx, xs, N, K, yb);
    double maxd = 0, maxy = 0;
    for (int64_t i = 0; i < N; i++) { double d = ya[i] - yb[i]; if (d < 0) d = -d; if (d > maxd) maxd = d; if (ya[i] > maxy) maxy = ya[i]; }
    printf("threads %d; max |A - B| %.3g (max y %.3g)\n", omp_get_max_threads(), maxd, maxy);
    const double bytes_a = (double)N * K / 2 + (double)N * NG * 2, bytes_b = (double)N / 16 * NG * gbytes;
    for (int rep = 0; rep < 3; rep++) {
        double t = now(); matvec_a(qa, sc, xn, sx, xsum, N, K, ya); double ta = now() - t;
        t = now(); matvec_b(qb, x, sx, xs, N, K, yb); double tb = now() - t;
        double bw = bw_sum(qb, (size_t)(bytes_b));
        printf("A %.1f GB/s   B %.1f GB/s   read %.1f GB/s\n", bytes_a / ta / 1e9, bytes_b / tb / 1e9, bw);
    }
    return 0;
}
