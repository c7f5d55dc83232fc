/* lmlab's quantized matmuls: y = x @ W.T where W is kept in low-bit blocks, never as floats.
 *
 * Compiled into the same library as native.c (lmlab/native.py builds both at once); native.c's
 * decoding step calls lmlab_q_quantize_x and lmlab_q_matmul_range for a block's quantized
 * matrices, and lmlab.quant calls lmlab_qlinear / lmlab_q_dequant_rows from Python.
 *
 * Two layouts of lmlab's own, into which lmlab.quant repacks every GGUF block type at load
 * (the values are exactly the GGUF file's; only the bytes move):
 *
 *   LMLAB_Q8: int8 quants q (N, K) and one float scale per group of G = 32 or 16 values
 *             (N, K / G): w = scale * q.
 *             Q8_0 (G 32), Q5_0 (q - 16, G 32), Q6_K (q - 32, G 16, scale d * sc), lmlab's q8.
 *   LMLAB_Q4: 4-bit quants (N, K / 2 bytes) and, per group of 32, a float scale d and a float
 *             min m (N, K / 32) each: w = d * q + m. Interleaved by pairs of groups: the 32 bytes
 *             of groups 2c and 2c + 1 hold value j of the first in byte j's low nibble and value
 *             j of the second in its high nibble, so one unpacked register is one whole group.
 *             (A last group without a pair: byte j holds values j and j + 16, as in Q4_0.)
 *             Q4_0 (m = -8 d), Q4_1, Q4_K (d = d * sc, m = -dmin * min), lmlab's q4.
 *
 * A matrix (lmlab_qmat) is up to LMLAB_QPARTS parts stacked by rows, each of its own layout:
 * a model's q, k and v (or gate and up) projections stacked into one matrix may come from
 * tensors of different types (Gemma 3's Q4_K_M file: q, k Q5_0 and v Q8_0).
 *
 * The activation row is quantized once per matmul (lmlab_q_quantize_x): per group of 32 values,
 * sx = max|x| / 127 and qx = round(x / sx), as int16 (so the products below need no widening
 * step). Then each group's dot product is an integer sum, turned into a float once per group:
 * sum_g (d_g * sx_g) * sum_i q_i * qx_i (+ m_g * sx_g * sum_i qx_i for LMLAB_Q4).
 *
 * The integer multiply-adds pair int16 lanes into int32 lanes (x86 pmaddwd: AVX-512BW or AVX2
 * intrinsics behind #ifdef), with a plain C fallback the compiler vectorizes on any other CPU
 * (NEON included). A tile walks R rows of W side by side against M rows of x, so each weight
 * byte is read once per M rows and R streams are in flight.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512BW__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include "quant.h"

typedef float qf32x16 __attribute__((vector_size(64)));
typedef int32_t qi32x16 __attribute__((vector_size(64)));
typedef int16_t qi16x32 __attribute__((vector_size(64)));
typedef int8_t qi8x32 __attribute__((vector_size(32)));
typedef uint8_t qu8x32 __attribute__((vector_size(32)));

#define QMAXT 8 /* accumulators per tile: R rows of W times M rows of x */

static inline qi32x16 madd(qi16x32 a, qi16x32 b) { /* lane i = a[2i] b[2i] + a[2i+1] b[2i+1] */
#if defined(__AVX512BW__)
    return (qi32x16)_mm512_madd_epi16((__m512i)a, (__m512i)b);
#elif defined(__AVX2__)
    __m256i a0, a1, b0, b1;
    memcpy(&a0, &a, 32); memcpy(&a1, (char *)&a + 32, 32);
    memcpy(&b0, &b, 32); memcpy(&b1, (char *)&b + 32, 32);
    __m256i r0 = _mm256_madd_epi16(a0, b0), r1 = _mm256_madd_epi16(a1, b1);
    qi32x16 r;
    memcpy(&r, &r0, 32); memcpy((char *)&r + 32, &r1, 32);
    return r;
#else
    qi32x16 r;
    for (int i = 0; i < 16; i++) r[i] = (int32_t)a[2 * i] * b[2 * i] + (int32_t)a[2 * i + 1] * b[2 * i + 1];
    return r;
#endif
}

static inline qi16x32 load_i8(const int8_t *p) { /* 32 int8 -> 32 int16 */
    qi8x32 v;
    memcpy(&v, p, 32);
    return __builtin_convertvector(v, qi16x32);
}

static inline qi16x32 load_x(const int16_t *p) {
    qi16x32 v;
    memcpy(&v, p, 64);
    return v;
}

static inline float qhsum(qf32x16 v) {
    float s = 0;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
}

/* lanes 0-7 a, lanes 8-15 b */
static inline qf32x16 halves(float a, float b) {
    qf32x16 v = {a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b};
    return v;
}

/* ------------------------------------------------------------------------ activations */

/* x (M, K) float32 -> qx: per group of 32, sx = max|x| / 127, q = round(x / sx) (nearest, ties
 * to even), as int16 (x16); xsum = sx * sum(q) per group. K must be a multiple of 32. */
void lmlab_q_quantize_x(const float *x, int M, int K, lmlab_qx *qx) {
    const int G = K / 32;
    qx->M = M;
    qx->K = K;
    for (int m = 0; m < M; m++)
        for (int g = 0; g < G; g++) {
            const float *xg = x + (size_t)m * K + (size_t)g * 32;
            float amax = 0;
            for (int i = 0; i < 32; i++) amax = fabsf(xg[i]) > amax ? fabsf(xg[i]) : amax;
            const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            int16_t *q = qx->x16 + (size_t)m * K + (size_t)g * 32;
            int sum = 0;
            for (int i = 0; i < 32; i++) {
                q[i] = (int16_t)nearbyintf(xg[i] * id);
                sum += q[i];
            }
            qx->sx[(size_t)m * G + g] = d;
            qx->xsum[(size_t)m * G + g] = d * (float)sum;
        }
}

/* ------------------------------------------------------------------------ tiles */

/* One group of 32 values the slow way (a last group without a pair): the integer sum times the
 * scales, as the tiles compute it. */
static float group_scalar(const lmlab_qpart *p, int64_t row, int K, int g, const lmlab_qx *qx, int m) {
    const int16_t *xq = qx->x16 + (size_t)m * K + (size_t)g * 32;
    const float sx = qx->sx[(size_t)m * (K / 32) + g];
    if (p->type == LMLAB_Q8) {
        const int8_t *w = (const int8_t *)p->q + (size_t)row * K + (size_t)g * 32;
        const int G = (int)p->group;
        float out = 0;
        for (int s = 0; s < 32; s += G) {
            int sum = 0;
            for (int i = 0; i < G; i++) sum += w[s + i] * xq[s + i];
            out += (float)sum * (p->scale[(size_t)row * (K / G) + (g * 32 + s) / G] * sx);
        }
        return out;
    }
    const uint8_t *w = (const uint8_t *)p->q + (size_t)row * (K / 2) + (size_t)g * 16;
    int sum = 0;
    for (int i = 0; i < 16; i++) sum += (w[i] & 15) * xq[i] + (w[i] >> 4) * xq[i + 16];
    const size_t at = (size_t)row * (K / 32) + g;
    return (float)sum * (p->scale[at] * sx) + p->min[at] * qx->xsum[(size_t)m * (K / 32) + g];
}

/* Pair c of 32-value groups (values 64c .. 64c+63) of each of the M input rows, and their scales. */
static inline __attribute__((always_inline)) void load_pair(const lmlab_qx *qx, int c, int M, qi16x32 *xa,
                                                            qi16x32 *xb, float *sxa, float *sxb) {
    const int K = qx->K, NG = K / 32;
    for (int m = 0; m < M; m++) {
        xa[m] = load_x(qx->x16 + (size_t)m * K + (size_t)c * 64);
        xb[m] = load_x(qx->x16 + (size_t)m * K + (size_t)c * 64 + 32);
        sxa[m] = qx->sx[(size_t)m * NG + 2 * c];
        sxb[m] = qx->sx[(size_t)m * NG + 2 * c + 1];
    }
}

/* y[m * ldy + r] = dot(W row row0 + r, x row m) for R rows of part p and M rows of x
 * (R * M <= QMAXT; both constants where it is inlined). */
static inline __attribute__((always_inline)) void qtile(const lmlab_qpart *p, int64_t row0, int R, const lmlab_qx *qx,
                                                        int M, float *y, int ldy) {
    const int K = qx->K, NG = K / 32, pairs = NG / 2;
    qf32x16 acc[QMAXT];
    for (int i = 0; i < R * M; i++) acc[i] = (qf32x16){0};
    if (p->type == LMLAB_Q8 && p->group == 32) {
        for (int c = 0; c < pairs; c++) {
            qi16x32 xa[QMAXT], xb[QMAXT];
            float sxa[QMAXT], sxb[QMAXT];
            load_pair(qx, c, M, xa, xb, sxa, sxb);
            for (int r = 0; r < R; r++) {
                const int8_t *w = (const int8_t *)p->q + (size_t)(row0 + r) * K + (size_t)c * 64;
                __builtin_prefetch(w + (size_t)4 * R * K, 0, 3);
                const qi16x32 wa = load_i8(w), wb = load_i8(w + 32);
                const float *sc = p->scale + (size_t)(row0 + r) * NG + 2 * c;
                for (int m = 0; m < M; m++)
                    acc[r * M + m] += __builtin_convertvector(madd(wa, xa[m]), qf32x16) * (sc[0] * sxa[m]) +
                                      __builtin_convertvector(madd(wb, xb[m]), qf32x16) * (sc[1] * sxb[m]);
            }
        }
    } else if (p->type == LMLAB_Q8) { /* group 16: each 32 values hold two groups, one per half of the lanes */
        for (int c = 0; c < pairs; c++) {
            qi16x32 xa[QMAXT], xb[QMAXT];
            float sxa[QMAXT], sxb[QMAXT];
            load_pair(qx, c, M, xa, xb, sxa, sxb);
            for (int r = 0; r < R; r++) {
                const int8_t *w = (const int8_t *)p->q + (size_t)(row0 + r) * K + (size_t)c * 64;
                __builtin_prefetch(w + (size_t)4 * R * K, 0, 3);
                const qi16x32 wa = load_i8(w), wb = load_i8(w + 32);
                const float *sc = p->scale + (size_t)(row0 + r) * (K / 16) + 4 * c;
                for (int m = 0; m < M; m++)
                    acc[r * M + m] += __builtin_convertvector(madd(wa, xa[m]), qf32x16) * halves(sc[0] * sxa[m], sc[1] * sxa[m]) +
                                      __builtin_convertvector(madd(wb, xb[m]), qf32x16) * halves(sc[2] * sxb[m], sc[3] * sxb[m]);
            }
        }
    } else { /* LMLAB_Q4: 32 bytes hold groups a (low nibbles) and b (high nibbles) */
        for (int c = 0; c < pairs; c++) {
            qi16x32 xa[QMAXT], xb[QMAXT];
            float sxa[QMAXT], sxb[QMAXT];
            load_pair(qx, c, M, xa, xb, sxa, sxb);
            for (int r = 0; r < R; r++) {
                const uint8_t *w = (const uint8_t *)p->q + (size_t)(row0 + r) * (K / 2) + (size_t)c * 32;
                __builtin_prefetch(w + (size_t)4 * R * (K / 2), 0, 3);
                qu8x32 v;
                memcpy(&v, w, 32);
                const qi16x32 wa = __builtin_convertvector(v & 15, qi16x32), wb = __builtin_convertvector(v >> 4, qi16x32);
                const float *d = p->scale + (size_t)(row0 + r) * NG + 2 * c;
                for (int m = 0; m < M; m++)
                    acc[r * M + m] += __builtin_convertvector(madd(wa, xa[m]), qf32x16) * (d[0] * sxa[m]) +
                                      __builtin_convertvector(madd(wb, xb[m]), qf32x16) * (d[1] * sxb[m]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) {
            float sum = qhsum(acc[r * M + m]);
            if (NG % 2) sum += group_scalar(p, row0 + r, K, NG - 1, qx, m);
            if (p->type == LMLAB_Q4) { /* the mins: sum_g m_g * sx_g * sum(qx_g); the last group's is in group_scalar */
                const float *mn = p->min + (size_t)(row0 + r) * NG, *xs = qx->xsum + (size_t)m * NG;
                for (int g = 0; g < NG - NG % 2; g++) sum += mn[g] * xs[g];
            }
            y[(size_t)m * ldy + r] = sum;
        }
}

#define QROWS(M) ((M) >= 4 ? 1 : 4 / (M))

/* rows [r0, r1) of one part against up to QMAXT rows of x */
static void qpart_range(const lmlab_qpart *p, int64_t r0, int64_t r1, const lmlab_qx *qx, int m0, int M, float *y,
                        int ldy) {
    lmlab_qx sub = *qx; /* rows m0.. of x */
    const int K = qx->K;
    sub.x16 += (size_t)m0 * K;
    sub.sx += (size_t)m0 * (K / 32);
    sub.xsum += (size_t)m0 * (K / 32);
    y += (size_t)m0 * ldy;
    int64_t r = r0;
#define QCALL(MM)                                                                                           \
    for (; r + QROWS(MM) <= r1; r += QROWS(MM)) qtile(p, r, QROWS(MM), &sub, MM, y + (r - r0), ldy);       \
    for (; r < r1; r++) qtile(p, r, 1, &sub, MM, y + (r - r0), ldy);
    switch (M) {
    case 1: QCALL(1); break;
    case 2: QCALL(2); break;
    case 3: QCALL(3); break;
    case 4: QCALL(4); break;
    case 5: QCALL(5); break;
    case 6: QCALL(6); break;
    case 7: QCALL(7); break;
    default: QCALL(8); break;
    }
#undef QCALL
}

/* y[m * ldy + n] = dot(W row n, x row m) for n in [n0, n1) and every row of qx: the rows of each
 * part that fall in the range. */
void lmlab_q_matmul_range(const lmlab_qmat *w, const lmlab_qx *qx, int64_t n0, int64_t n1, float *y, int ldy) {
    int64_t start = 0;
    for (int i = 0; i < w->n_parts; i++) {
        const lmlab_qpart *p = &w->parts[i];
        const int64_t a = n0 > start ? n0 : start, b = n1 < start + p->rows ? n1 : start + p->rows;
        if (a < b)
            for (int m0 = 0; m0 < qx->M; m0 += QMAXT) {
                const int M = qx->M - m0 < QMAXT ? qx->M - m0 : QMAXT;
                qpart_range(p, a - start, b - start, qx, m0, M, y + a, ldy);
            }
        start += p->rows;
    }
}

/* ------------------------------------------------------------------------ whole matmuls, from Python */

int64_t lmlab_q_rows(const lmlab_qmat *w) {
    int64_t n = 0;
    for (int i = 0; i < w->n_parts; i++) n += w->parts[i].rows;
    return n;
}

/* x (M, K) float32, W a quantized (N, K), bias (N,) float32 or NULL -> y (M, N) float32.
 * Returns 0, or -1 for a size out of range or no memory. */
int lmlab_qlinear(const float *x, int M, int K, const lmlab_qmat *w, int N, const float *bias, float *y, int threads) {
    if (M < 1 || K < 32 || K % 32 || N != lmlab_q_rows(w) || w->n_parts < 1 || w->n_parts > LMLAB_QPARTS) return -1;
    lmlab_qx qx;
    qx.x16 = malloc(sizeof(int16_t) * (size_t)M * K);
    qx.sx = malloc(sizeof(float) * (size_t)M * (K / 32));
    qx.xsum = malloc(sizeof(float) * (size_t)M * (K / 32));
    int rc = -1;
    if (qx.x16 && qx.sx && qx.xsum) {
        lmlab_q_quantize_x(x, M, K, &qx);
        if (threads < 1) threads = 1;
        if (threads > (N + 15) / 16) threads = (N + 15) / 16;
#pragma omp parallel num_threads(threads)
        {
#ifdef _OPENMP
            const int t = omp_get_thread_num(), T = omp_get_num_threads();
#else
            const int t = 0, T = 1;
#endif
            const int64_t chunks = (N + 7) / 8;
            int64_t n0 = chunks * t / T * 8, n1 = chunks * (t + 1) / T * 8;
            if (n1 > N) n1 = N;
            if (n0 < n1) {
                lmlab_q_matmul_range(w, &qx, n0, n1, y, N);
                if (bias)
                    for (int m = 0; m < M; m++)
                        for (int64_t n = n0; n < n1; n++) y[(size_t)m * N + n] += bias[n];
            }
        }
        rc = 0;
    }
    free(qx.x16); free(qx.sx); free(qx.xsum);
    return rc;
}

/* out (r1 - r0, K) float32 = rows [r0, r1) of W as floats: what prefill multiplies (a tile at a
 * time) and what the embedding lookup reads (a row at a time). */
void lmlab_q_dequant_rows(const lmlab_qmat *w, int K, int64_t r0, int64_t r1, float *out) {
    int64_t start = 0;
    for (int i = 0; i < w->n_parts; i++) {
        const lmlab_qpart *p = &w->parts[i];
        const int64_t a = r0 > start ? r0 : start, b = r1 < start + p->rows ? r1 : start + p->rows;
#pragma omp parallel for schedule(static) if (b - a >= 64)
        for (int64_t r = a; r < b; r++) {
            const int64_t row = r - start;
            float *o = out + (size_t)(r - r0) * K;
            if (p->type == LMLAB_Q8) {
                const int8_t *q = (const int8_t *)p->q + (size_t)row * K;
                const int G = (int)p->group;
                const float *sc = p->scale + (size_t)row * (K / G);
                for (int g = 0; g < K / G; g++)
                    for (int j = 0; j < G; j++) o[g * G + j] = sc[g] * (float)q[g * G + j];
            } else {
                const uint8_t *q = (const uint8_t *)p->q + (size_t)row * (K / 2);
                const float *d = p->scale + (size_t)row * (K / 32), *mn = p->min + (size_t)row * (K / 32);
                const int NG = K / 32;
                for (int g = 0; g + 1 < NG; g += 2) /* pairs: group g in the low nibbles, g + 1 in the high */
                    for (int j = 0; j < 32; j++) {
                        const uint8_t byte = q[g * 16 + j];
                        o[g * 32 + j] = d[g] * (float)(byte & 15) + mn[g];
                        o[g * 32 + 32 + j] = d[g + 1] * (float)(byte >> 4) + mn[g + 1];
                    }
                if (NG % 2) /* a last group alone: values j and j + 16 in byte j */
                    for (int j = 0, g = NG - 1; j < 16; j++) {
                        const uint8_t byte = q[g * 16 + j];
                        o[g * 32 + j] = d[g] * (float)(byte & 15) + mn[g];
                        o[g * 32 + j + 16] = d[g] * (float)(byte >> 4) + mn[g];
                    }
            }
        }
        start += p->rows;
    }
}

int lmlab_q_parts_max(void) { return LMLAB_QPARTS; }
