/* y = x @ W.T + b for a few rows of x: the matmul of one decoding step on the CPU.
 *
 * Decoding multiplies one row (or two) by every weight matrix, so a step is bound by how fast
 * the weights stream from memory. The general GEMM kernels read W in short interleaved runs,
 * or need it copied into a blocked layout first. This kernel reads each row of W, in its
 * ordinary row-major layout, once and front to back, which the hardware prefetchers follow:
 *
 *   for each block of 16 output features (split between the threads):
 *     for each of its 16 weight rows w:    acc[m][i] = sum_k w[k] * x[m][k]   (two FMA chains)
 *     one transpose-and-add turns the 16 accumulator vectors into the 16 outputs of each row m
 *
 * Weights and activations are float32 or bfloat16 (all the same type); bf16 is widened to fp32
 * on load (a shift), the sums are fp32 and the output is rounded to bf16 once, at the end.
 *
 * Built by lmlab.native with -march=native at first use; on a CPU without AVX-512 this file
 * compiles to lmlab_isa() == 0 and lmlab keeps its other matmul routes.
 */
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define LMLAB_MAX_ROWS 8

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

int lmlab_isa(void) { return 512; }

/* v[0..15] -> one vector whose lane i is the sum of the lanes of v[i]. */
static inline __m512 sum16(const __m512 v[16]) {
    __m512 s[8], t[4], u[2];
    for (int i = 0; i < 8; i++)  /* pairs of rows: lane pairs added */
        s[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)  /* each 128-bit lane now holds partial sums of 4 rows */
        t[i] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * i], s[2 * i + 1], 0x44), _mm512_shuffle_ps(s[2 * i], s[2 * i + 1], 0xEE));
    for (int i = 0; i < 2; i++)  /* 8 rows, two 128-bit lanes each */
        u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88), _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
}

static inline __m512 load16(const void *p, int bf16, __mmask16 m) {
    if (bf16)  /* bf16 is the top half of an fp32: widen and shift */
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
    return _mm512_maskz_loadu_ps(m, p);
}

static inline void store16(void *p, int bf16, __mmask16 m, __m512 v) {
    if (!bf16) {
        _mm512_mask_storeu_ps(p, m, v);
        return;
    }
#ifdef __AVX512BF16__
    _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
#else  /* round to nearest even: add 0x7FFF plus the lowest kept bit, keep the top half */
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
#endif
}

/* out[m] = 16 lanes whose sum is dot(w_row, x[m]); reads w_row once, front to back. */
static inline void row_dots(const float *x, int M, int K, const char *w_row, int bf16, __m512 *out) {
    const size_t es = bf16 ? 2 : 4;
    __m512 a0[LMLAB_MAX_ROWS], a1[LMLAB_MAX_ROWS];
    for (int m = 0; m < M; m++) a0[m] = a1[m] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 32 <= K; k += 32) {  /* two chains, so FMA latency does not bound one row */
        __m512 w0 = load16(w_row + k * es, bf16, 0xFFFF), w1 = load16(w_row + (k + 16) * es, bf16, 0xFFFF);
        for (int m = 0; m < M; m++) {
            a0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + (size_t)m * K + k), a0[m]);
            a1[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + (size_t)m * K + k + 16), a1[m]);
        }
    }
    for (; k < K; k += 16) {
        __mmask16 km = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512 w0 = load16(w_row + k * es, bf16, km);
        for (int m = 0; m < M; m++) a0[m] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(km, x + (size_t)m * K + k), a0[m]);
    }
    for (int m = 0; m < M; m++) out[m] = _mm512_add_ps(a0[m], a1[m]);
}

#ifdef __AVX512BF16__
/* The same for bf16 x and w on a CPU with AVX512-BF16: one instruction multiplies 32 pairs and
 * adds them into 16 fp32 lanes, with no widening. */
static inline void row_dots_dp(const uint16_t *x, int M, int K, const uint16_t *w_row, __m512 *out) {
    __m512 a0[LMLAB_MAX_ROWS], a1[LMLAB_MAX_ROWS];
    for (int m = 0; m < M; m++) a0[m] = a1[m] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 64 <= K; k += 64) {
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(w_row + k), w1 = (__m512bh)_mm512_loadu_si512(w_row + k + 32);
        for (int m = 0; m < M; m++) {
            a0[m] = _mm512_dpbf16_ps(a0[m], w0, (__m512bh)_mm512_loadu_si512(x + (size_t)m * K + k));
            a1[m] = _mm512_dpbf16_ps(a1[m], w1, (__m512bh)_mm512_loadu_si512(x + (size_t)m * K + k + 32));
        }
    }
    for (; k < K; k += 32) {  /* zero-filled tails add nothing */
        __mmask32 km = K - k >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << (K - k)) - 1);
        __m512bh w0 = (__m512bh)_mm512_maskz_loadu_epi16(km, w_row + k);
        for (int m = 0; m < M; m++)
            a0[m] = _mm512_dpbf16_ps(a0[m], w0, (__m512bh)_mm512_maskz_loadu_epi16(km, x + (size_t)m * K + k));
    }
    for (int m = 0; m < M; m++) out[m] = _mm512_add_ps(a0[m], a1[m]);
}
#define DP 1
#else
#define DP 0
#endif

/* x is float32 (widened from bf16 if need be), or the original bf16 x where DP */
static void block(const void *x, int M, int K, const char *w, int N, const void *b, void *y, int bf16, int n) {
    const size_t es = bf16 ? 2 : 4;
    const int nr = N - n < 16 ? N - n : 16;
    const __mmask16 om = nr == 16 ? 0xFFFF : (__mmask16)((1u << nr) - 1);
    __m512 acc[LMLAB_MAX_ROWS][16], d[LMLAB_MAX_ROWS];
    for (int i = 0; i < 16; i++) {
        const char *row = w + (size_t)(n + (i < nr ? i : 0)) * K * es;
        if (i >= nr)
            for (int m = 0; m < M; m++) d[m] = _mm512_setzero_ps();
#ifdef __AVX512BF16__
        else if (bf16)
            row_dots_dp(x, M, K, (const uint16_t *)row, d);
#endif
        else
            row_dots(x, M, K, row, bf16, d);
        for (int m = 0; m < M; m++) acc[m][i] = d[m];
    }
    __m512 bias = b ? load16((const char *)b + n * es, bf16, om) : _mm512_setzero_ps();
    for (int m = 0; m < M; m++)
        store16((char *)y + ((size_t)m * N + n) * es, bf16, om, _mm512_add_ps(sum16(acc[m]), bias));
}

/* x (M, K), w (N, K), b (N,) or NULL, y (M, N): all contiguous, all float32 (bf16 = 0) or all
 * bfloat16 (bf16 = 1). Returns 0, or -1 when M is out of range or memory ran out. */
int lmlab_linear(const void *x, int M, int K, const void *w, int N, const void *b, void *y, int bf16, int threads) {
    if (M < 1 || M > LMLAB_MAX_ROWS || K < 1 || N < 1) return -1;
    const void *xf = x;
    float *tmp = NULL;
    if (bf16 && !DP) {  /* widen x once; every thread reads it */
        tmp = malloc(sizeof(float) * (size_t)M * K);
        if (!tmp) return -1;
        const uint16_t *xb = x;
        for (size_t i = 0; i < (size_t)M * K; i++) {
            uint32_t u = (uint32_t)xb[i] << 16;
            float f;
            __builtin_memcpy(&f, &u, 4);
            tmp[i] = f;
        }
        xf = tmp;
    }
    const int blocks = (N + 15) / 16;
    if (threads < 1) threads = 1;
    if (threads > blocks) threads = blocks;
#pragma omp parallel num_threads(threads)
    {
        int t = 0, T = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        T = omp_get_num_threads();
#endif
        /* contiguous ranges of blocks: each thread streams its own part of W */
        for (int i = (int)((long)blocks * t / T); i < (int)((long)blocks * (t + 1) / T); i++)
            block(xf, M, K, w, N, b, y, bf16, i * 16);
    }
    free(tmp);
    return 0;
}

#else

int lmlab_isa(void) { return 0; }

int lmlab_linear(const void *x, int M, int K, const void *w, int N, const void *b, void *y, int bf16, int threads) {
    (void)x; (void)M; (void)K; (void)w; (void)N; (void)b; (void)y; (void)bf16; (void)threads;
    return -1;
}

#endif
