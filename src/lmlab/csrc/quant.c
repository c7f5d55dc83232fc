/* lmlab's quantized matmuls: y = x @ W.T where W is kept in low-bit blocks, never as floats.
 *
 * Compiled into the same library as native.c (lmlab/native.py builds both at once); native.c's
 * decoding step calls lmlab_q_quantize_x and lmlab_q_matmul_range for a block's quantized
 * matrices, and lmlab.quant calls lmlab_qlinear / lmlab_q_dequant_rows from Python.
 *
 * Two layouts of lmlab's own, into which lmlab.quant repacks every GGUF block type at load
 * (the values are exactly the GGUF file's; only the bytes move):
 *
 *   LMLAB_Q8: int8 quants q (N, K) and one scale per group of G = 32 or 16 values
 *             (N, K / G): w = scale * q.
 *             Q8_0 (G 32), Q6_K (q - 32, G 16, scale d * sc), lmlab's q8.
 *   LMLAB_Q4: 4-bit quants (N, K / 2 bytes) and, per group of 32, a scale d and a min m
 *             (N, K / 32) each: w = d * q + m. Interleaved by pairs of groups: the 32 bytes
 *             of groups 2c and 2c + 1 hold value j of the first in byte j's low nibble and value
 *             j of the second in its high nibble, so one unpacked register is one whole group.
 *             (A last group without a pair: byte j holds values j and j + 16, as in Q4_0.)
 *             Q4_0 (no min stored: m = -8 d), Q4_1, Q4_K (d = d * sc, m = -dmin * min), lmlab's q4;
 *             and Q5_0, with each group's 32 fifth bits beside (qh; no min: m = -16 d).
 *             Or tiled (lmlab_qpart.tile = 16, AVX512-VNNI builds): rows in blocks of 16, a
 *             group's values of the 16 rows side by side ("tiled Q4" below).
 *
 * Scales (and mins) are float16 where every one of a part's is a float16 value (Q8_0, Q4_0, Q4_1,
 * Q5_0 and lmlab's q8/q4 store them so: Q4_1's and Q8_0's bytes are then the file's), float32
 * otherwise (Q4_K and Q6_K multiply a float16 by a 6- or 8-bit scale); lmlab_qpart.scale16 says
 * which. The kernels widen them to float as they read them (once per group).
 *
 * A matrix (lmlab_qmat) is up to LMLAB_QPARTS parts stacked by rows, each of its own layout:
 * a model's q, k and v (or gate and up) projections stacked into one matrix may come from
 * tensors of different types (Gemma 3's Q4_K_M file: q, k Q5_0 and v Q8_0).
 *
 * The activation row is quantized once per matmul (lmlab_q_quantize_x): per group of 32 values,
 * sx = max|x| / 127 and qx = round(x / sx), as int8 (VNNI builds) or int16. Then each group's
 * dot product is an integer sum, turned into a float once per group:
 * sum_g (d_g * sx_g) * sum_i q_i * qx_i (+ m_g * sx_g * sum_i qx_i for LMLAB_Q4).
 *
 * The integer multiply-adds: with AVX512-VNNI (or AVX-VNNI) one vpdpbusd multiplies 64 weight
 * bytes (two groups) by 64 activation bytes, four products into each int32 lane. It wants one
 * side unsigned: Q4's nibbles are; a signed Q8 weight has its top bit flipped (w + 128) and the
 * sum starts at -128 times x's lane sums, once per x, so it stays exact. On AVX-512 the tile
 * takes four groups at a time (one 64-byte register of Q4 bytes, two of Q8) with one load and
 * conversion of their four scales; x keeps a second copy in Q4's nibble order for it.
 * On Arm the same product comes from NEON, 16 bytes at a time: usdot (i8mm) is vpdpbusd's own
 * semantics; with dotprod only, sdot on the weight's top bit flipped back plus 128 times x's lane
 * sums (dpbusd's comment). tests/quant_check.c checks those builds under qemu.
 * Without either, int16 lanes pair into int32 lanes (x86 pmaddwd: AVX-512BW or AVX2 intrinsics
 * behind #ifdef), with a plain C fallback the compiler vectorizes on any other CPU (GCC 12 makes
 * it smull/smlal on Arm). The path is chosen at compile time: the library is built with -march=native on
 * the machine that runs it (lmlab_q_isa names it). A tile walks R rows of W side by side
 * against M rows of x, so each weight byte is read once per M rows and R streams are in flight.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512BW__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>
#endif

/* The integer dot product this build runs (lmlab_q_isa names it): vpdpbusd (unsigned bytes times
 * signed bytes, four products summed into each int32 lane) where the compiler targets AVX512-VNNI
 * or AVX-VNNI; on Arm the same product from usdot (i8mm) or sdot (dotprod, see dpbusd); else
 * pmaddwd on int16 lanes (AVX-512BW, AVX2) or the portable C loop. With a 4-byte dot product
 * (QVNNI) the activations are held as int8 (their int16 buffer's first K bytes per row). */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define QVNNI 512
#elif defined(__AVXVNNI__)
#define QVNNI 256
#elif defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
#define QVNNI 128 /* NEON: four 16-byte registers per 64 bytes */
#elif defined(__AVX2__) && !defined(__AVX512BW__)
#define QVNNI 2 /* AVX2 without VNNI: pmaddubsw, then pmaddwd against ones (see dpbusd) */
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

#ifdef __FLT16_MAX__
typedef _Float16 qhalf;
static inline float half_to_float(qhalf h) { return (float)h; }
#else /* no _Float16 in this compiler: widen the IEEE half by hand */
typedef uint16_t qhalf;
static inline float half_to_float(qhalf h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, f = h & 1023;
    uint32_t bits;
    if (e == 31) bits = sign | 0x7f800000u | (f << 13);
    else if (e) bits = sign | ((e + 112) << 23) | (f << 13);
    else if (!f) bits = sign;
    else { /* subnormal half: a normal float */
        float v = (float)f * (1.0f / 16777216.0f);
        memcpy(&bits, &v, 4);
        bits |= sign;
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
}
#endif

/* scale (or min) i of a part: float16 or float32 as the part holds them (H constant where inlined) */
static inline __attribute__((always_inline)) float sc_at(const void *s, size_t i, int H) {
    return H ? half_to_float(((const qhalf *)s)[i]) : ((const float *)s)[i];
}

/* a Q4 group's min: the part's own, or where it has none -8 d (GGUF's Q4_0: w = d * (q - 8)),
 * -16 d with fifth bits (Q5_0: w = d * (q - 16)) */
static inline __attribute__((always_inline)) float min_factor(const lmlab_qpart *p) { return p->qh ? -16.0f : -8.0f; }
static inline __attribute__((always_inline)) float min_at(const lmlab_qpart *p, size_t i, int H) {
    return p->min ? sc_at(p->min, i, H) : min_factor(p) * sc_at(p->scale, i, H);
}

/* group i's fifth bits (bit j: value j) */
static inline __attribute__((always_inline)) uint32_t qh_at(const lmlab_qpart *p, size_t i) {
    uint32_t b;
    memcpy(&b, (const uint32_t *)p->qh + i, 4);
    return b;
}

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

/* byte j = 16 where bit j of b is set, else 0: a group's fifth bits as values to add */
static inline qu8x32 high_bits(uint32_t b) {
    const qu8x32 sel = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128,
                        1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    typedef uint8_t qu8x4 __attribute__((vector_size(4)));
    qu8x4 v;
    memcpy(&v, &b, 4);
    const qu8x32 by = __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2,
                                              3, 3, 3, 3, 3, 3, 3, 3); /* byte j = byte j / 8 of b (one shuffle) */
    return (qu8x32)((by & sel) != 0) & 16;
}

/* Q4 pair at w (groups at, at + 1 of part p): the first group's values in lo, the second's in
 * hi, each with its fifth bit where the part has them (Q5_0) */
static inline __attribute__((always_inline)) void q4_pair(const lmlab_qpart *p, const uint8_t *w, size_t at,
                                                          qu8x32 *lo, qu8x32 *hi) {
    typedef uint16_t qu16x16 __attribute__((vector_size(32)));
    qu8x32 v;
    memcpy(&v, w, 32);
    *lo = v & 15;
    *hi = (qu8x32)((qu16x16)v >> 4) & 15; /* a 16-bit shift: x86 has no 8-bit one, and GCC's stand-in is slow */
    if (p->qh) { /* fifth bits: + 16 where set */
        *lo |= high_bits(qh_at(p, at));
        *hi |= high_bits(qh_at(p, at + 1));
    }
}

typedef float qf32x8 __attribute__((vector_size(32)));
typedef float qf32x4 __attribute__((vector_size(16)));

static inline float qhsum(qf32x16 v) { /* a tree of halves: 4 adds deep, not 16 */
    const qf32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                     __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    const qf32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

/* lanes 0-7 a, lanes 8-15 b */
static inline qf32x16 halves(float a, float b) {
    qf32x16 v = {a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b};
    return v;
}

/* sum_g mins[at + g] * xs[g] for g < n: a Q4 part's min terms for one row of W and of x */
static inline __attribute__((always_inline)) float min_terms(const void *mins, size_t at, const float *xs, int n, int H) {
    qf32x16 acc = {0};
    int g = 0;
    for (; g + 16 <= n; g += 16) {
        qf32x16 m, x;
        if (H) {
#ifdef __FLT16_MAX__
            typedef qhalf qh16 __attribute__((vector_size(32)));
            qh16 h;
            memcpy(&h, (const qhalf *)mins + at + g, sizeof h);
            m = __builtin_convertvector(h, qf32x16);
#else
            for (int i = 0; i < 16; i++) m[i] = half_to_float(((const qhalf *)mins)[at + g + i]);
#endif
        } else {
            memcpy(&m, (const float *)mins + at + g, 64);
        }
        memcpy(&x, xs + g, 64);
        acc += m * x;
    }
    float sum = qhsum(acc);
    for (; g < n; g++) sum += sc_at(mins, at + g, H) * xs[g];
    return sum;
}

/* activation row m as int8 (VNNI builds: the first K bytes of its int16 row) */
static inline const int8_t *x8_row(const lmlab_qx *qx, int m) { return (const int8_t *)(qx->x16 + (size_t)m * qx->K); }

#ifdef QVNNI
typedef uint8_t qu8x64 __attribute__((vector_size(64)));
typedef int8_t qi8x64 __attribute__((vector_size(64)));

#if QVNNI == 128
/* acc + vpdpbusd's product on one 16-byte quarter: usdot where the CPU has i8mm; else sdot, which
 * takes signed bytes on both sides: w - 128 (w with its top bit flipped) times x, plus 128 times
 * each lane's sum of x (one more sdot against ones, shifted), is exactly w times x. */
static inline int32x4_t usdot4(int32x4_t acc, uint8x16_t w, int8x16_t x) {
#ifdef __ARM_FEATURE_MATMUL_INT8
    return vusdotq_s32(acc, w, x);
#else
    acc = vdotq_s32(acc, vreinterpretq_s8_u8(veorq_u8(w, vdupq_n_u8(128))), x);
    return vaddq_s32(acc, vshlq_n_s32(vdotq_s32(vdupq_n_s32(0), vdupq_n_s8(1), x), 7));
#endif
}

static inline qi32x16 usdot64(qi32x16 acc, qu8x64 w, qi8x64 x) {
    qi32x16 r;
    for (int c = 0; c < 4; c++) {
        int32x4_t a;
        uint8x16_t wc;
        int8x16_t xc;
        memcpy(&a, (const char *)&acc + 16 * c, 16);
        memcpy(&wc, (const char *)&w + 16 * c, 16);
        memcpy(&xc, (const char *)&x + 16 * c, 16);
        a = usdot4(a, wc, xc);
        memcpy((char *)&r + 16 * c, &a, 16);
    }
    return r;
}
#endif

#if QVNNI == 2
/* vpdpbusd's product from AVX2: pmaddubsw multiplies unsigned by signed bytes and adds pairs into
 * int16 lanes, saturating, then pmaddwd against ones adds pairs of those into int32 lanes. Exact
 * while a pair stays within int16: the weights this build passes are Q4's values (at most 31,
 * with Q5_0's fifth bit) and neg128's 128 (x is never -128: |x| <= 127). signed_w: w holds signed
 * bytes (Q8), taken as |w| (128 for -128, as an unsigned byte) times x negated where w < 0 and
 * zeroed where w is 0, so no pair leaves int16 either. */
static inline __attribute__((always_inline)) qi32x16 maddubs64(qu8x64 w, qi8x64 x, int signed_w) {
    qi32x16 r;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int c = 0; c < 2; c++) {
        __m256i wc, xc;
        memcpy(&wc, (const char *)&w + 32 * c, 32);
        memcpy(&xc, (const char *)&x + 32 * c, 32);
        if (signed_w) {
            xc = _mm256_sign_epi8(xc, wc);
            wc = _mm256_abs_epi8(wc);
        }
        const __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(wc, xc), ones);
        memcpy((char *)&r + 32 * c, &d, 32);
    }
    return r;
}
#endif

/* lane i = sum_{j < 4} w[4i + j] * x[4i + j]: 64 unsigned bytes times 64 signed ones */
static inline qi32x16 dpbusd(qu8x64 w, qi8x64 x) {
#if QVNNI == 512
    return (qi32x16)_mm512_dpbusd_epi32(_mm512_setzero_si512(), (__m512i)w, (__m512i)x);
#elif QVNNI == 128
    return usdot64((qi32x16){0}, w, x);
#elif QVNNI == 2
    return maddubs64(w, x, 0);
#else
    __m256i w0, w1, x0, x1;
    memcpy(&w0, &w, 32); memcpy(&w1, (char *)&w + 32, 32);
    memcpy(&x0, &x, 32); memcpy(&x1, (char *)&x + 32, 32);
    __m256i r0 = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w0, x0);
    __m256i r1 = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w1, x1);
    qi32x16 r;
    memcpy(&r, &r0, 32); memcpy((char *)&r + 32, &r1, 32);
    return r;
#endif
}

/* signed weights: w + 128 (w with its top bit flipped, as unsigned bytes) times x, which
 * counts 128 * x once too many in each lane; xneg (lane i = -128 * sum of x[4i .. 4i + 3],
 * neg128(x), once per x) starts the sum, so the result is the exact signed dot product. One xor,
 * not the sign-and-absolute-value pair. */
static inline qi32x16 dpbusd_acc(qi32x16 acc, qu8x64 w, qi8x64 x) {
#if QVNNI == 512
    return (qi32x16)_mm512_dpbusd_epi32((__m512i)acc, (__m512i)w, (__m512i)x);
#elif QVNNI == 128
    return usdot64(acc, w, x);
#elif QVNNI == 2
    return acc + maddubs64(w, x, 0);
#else
    __m256i a0, a1, w0, w1, x0, x1;
    memcpy(&a0, &acc, 32); memcpy(&a1, (char *)&acc + 32, 32);
    memcpy(&w0, &w, 32); memcpy(&w1, (char *)&w + 32, 32);
    memcpy(&x0, &x, 32); memcpy(&x1, (char *)&x + 32, 32);
    __m256i r0 = _mm256_dpbusd_avx_epi32(a0, w0, x0);
    __m256i r1 = _mm256_dpbusd_avx_epi32(a1, w1, x1);
    qi32x16 r;
    memcpy(&r, &r0, 32); memcpy((char *)&r + 32, &r1, 32);
    return r;
#endif
}

static inline qi32x16 neg128(qi8x64 x) {
#if QVNNI == 2
    (void)x; /* dot_s8 needs no correction there */
    return (qi32x16){0};
#else
    const qu8x64 b = (qu8x64){0} + 128;
    return (qi32x16){0} - dpbusd(b, x);
#endif
}

static inline qi32x16 dot_s8(qi8x64 w, qi8x64 x, qi32x16 xneg) {
#if QVNNI == 2
    (void)xneg;
    return maddubs64((qu8x64)w, x, 1);
#else
    return dpbusd_acc(xneg, (qu8x64)w ^ 128, x);
#endif
}

/* scales s[at], s[at + 1] (float16 where H, else float32) spread as lanes 0-7 and 8-15 */
static inline __attribute__((always_inline)) qf32x16 scale_halves(const void *s, size_t at, int H) {
#if QVNNI == 512 /* two scales into one register, then one permute (no trip through memory) */
    __m128 v;
    if (H) {
        int32_t bits;
        memcpy(&bits, (const qhalf *)s + at, 4);
        v = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
    } else {
        double bits;
        memcpy(&bits, (const float *)s + at, 8);
        v = _mm_castpd_ps(_mm_set_sd(bits));
    }
    const __m512i idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    return (qf32x16)_mm512_permutexvar_ps(idx, _mm512_castps128_ps512(v));
#else
    return halves(sc_at(s, at, H), sc_at(s, at + 1, H));
#endif
}

#if QVNNI == 512
/* scales s[at .. at + 3] (float16 where H, else float32) as four floats */
static inline __attribute__((always_inline)) __m128 scales4(const void *s, size_t at, int H) {
    if (H) {
        int64_t bits;
        memcpy(&bits, (const qhalf *)s + at, 8);
        return _mm_cvtph_ps(_mm_cvtsi64_si128(bits));
    }
    return _mm_loadu_ps((const float *)s + at);
}
#endif

/* scales s[at .. at + 3] spread as lanes 0-3, 4-7, 8-11, 12-15 (groups of 16 in 64 values) */
static inline __attribute__((always_inline)) qf32x16 scale_quarters(const void *s, size_t at, int H) {
#if QVNNI == 512
    const __m128 v = scales4(s, at, H);
    const __m512i idx = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    return (qf32x16)_mm512_permutexvar_ps(idx, _mm512_castps128_ps512(v));
#else
    const float a = sc_at(s, at, H), b = sc_at(s, at + 1, H), c = sc_at(s, at + 2, H), d = sc_at(s, at + 3, H);
    qf32x16 v = {a, a, a, a, b, b, b, b, c, c, c, c, d, d, d, d};
    return v;
#endif
}
#endif

/* ------------------------------------------------------------------------ activations */

/* x (M, K) float32 -> qx: per group of 32, sx = max|x| / 127, q = round(x / sx) (nearest, ties
 * to even), as int16 (x16; int8 in VNNI builds); xsum = sx * sum(q) per group. K must be a
 * multiple of 32. */
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
#ifdef QVNNI
            int8_t *q = (int8_t *)x8_row(qx, m) + (size_t)g * 32;
#else
            int16_t *q = qx->x16 + (size_t)m * K + (size_t)g * 32;
#endif
            int sum = 0;
            for (int i = 0; i < 32; i++) {
                q[i] = (int16_t)nearbyintf(xg[i] * id);
                sum += q[i];
            }
            qx->sx[(size_t)m * G + g] = d;
            qx->xsum[(size_t)m * G + g] = d * (float)sum;
        }
#if QVNNI == 512
    /* the second copy, in the second K bytes of the row: groups 4j, 4j + 2, 4j + 1, 4j + 3 of each
     * whole four, the order of a Q4 register's low and high nibbles (qtile) */
    for (int m = 0; m < M; m++) {
        int8_t *row = (int8_t *)x8_row(qx, m);
        for (int j = 0; j + 4 <= G; j += 4)
            for (int i = 0; i < 4; i++) memcpy(row + K + (size_t)(j + i) * 32, row + (size_t)(j + (i % 2) * 2 + i / 2) * 32, 32);
    }
#endif
}

/* ------------------------------------------------------------------------ tiles */

/* One group of 32 values the slow way (a last group without a pair): the integer sum times the
 * scales, as the tiles compute it. */
static float group_scalar(const lmlab_qpart *p, int64_t row, int K, int g, const lmlab_qx *qx, int m) {
#ifdef QVNNI
    const int8_t *xq = x8_row(qx, m) + (size_t)g * 32;
#else
    const int16_t *xq = qx->x16 + (size_t)m * K + (size_t)g * 32;
#endif
    const float sx = qx->sx[(size_t)m * (K / 32) + g];
    if (p->type == LMLAB_Q8) {
        const int8_t *w = (const int8_t *)p->q + (size_t)row * K + (size_t)g * 32;
        const int G = (int)p->group;
        float out = 0;
        for (int s = 0; s < 32; s += G) {
            int sum = 0;
            for (int i = 0; i < G; i++) sum += w[s + i] * xq[s + i];
            out += (float)sum * (sc_at(p->scale, (size_t)row * (K / G) + (g * 32 + s) / G, (int)p->scale16) * sx);
        }
        return out;
    }
    const uint8_t *w = (const uint8_t *)p->q + (size_t)row * (K / 2) + (size_t)g * 16;
    const size_t at = (size_t)row * (K / 32) + g;
    const uint32_t hb = p->qh ? qh_at(p, at) : 0; /* alone, byte i holds values i and i + 16 */
    int sum = 0;
    for (int i = 0; i < 16; i++)
        sum += ((w[i] & 15) | ((hb >> i & 1) << 4)) * xq[i] + ((w[i] >> 4) | ((hb >> (i + 16) & 1) << 4)) * xq[i + 16];
    const int H = (int)p->scale16;
    return (float)sum * (sc_at(p->scale, at, H) * sx) + min_at(p, at, H) * qx->xsum[(size_t)m * (K / 32) + g];
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
 * (R * M <= QMAXT; H = p->scale16; all three constants where it is inlined). */
static inline __attribute__((always_inline)) void qtile(const lmlab_qpart *p, int64_t row0, int R, const lmlab_qx *qx,
                                                        int M, float *y, int ldy, int H) {
    const int K = qx->K, NG = K / 32, pairs = NG / 2;
    qf32x16 acc[QMAXT];
    for (int i = 0; i < R * M; i++) acc[i] = (qf32x16){0};
#ifdef QVNNI
    /* per pair of groups c: 64 activations of each x row (two groups: lanes 0-7 and 8-15 of a dot) */
#define QPAIR_X                                                                   \
    qi8x64 xv[QMAXT];                                                             \
    qi32x16 xn[QMAXT];                                                            \
    qf32x16 sxv[QMAXT];                                                           \
    for (int m = 0; m < M; m++) {                                                 \
        memcpy(&xv[m], x8_row(qx, m) + (size_t)c * 64, 64);                       \
        if (p->type == LMLAB_Q8) xn[m] = neg128(xv[m]);                           \
        const float *sx = qx->sx + (size_t)m * NG + 2 * c;                        \
        sxv[m] = halves(sx[0], sx[1]);                                            \
    }
    int c0 = 0; /* the first pair the loops below take: those before it went four groups at a time */
#if QVNNI == 512
    if (p->type == LMLAB_Q4 || p->group == 32) {
        /* four groups (128 values) per step: one register of Q4 bytes (its low nibbles are groups
         * 0 and 2, its high ones 1 and 3: x's second copy holds them in that order) or two of Q8,
         * one load and float16 conversion of the four scales, one multiply by x's four scales,
         * and a permute per half spreading them over its lanes */
        const int q4 = p->type == LMLAB_Q4;
        const __m512i ia = q4 ? _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0)
                              : _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        const __m512i ib = q4 ? _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1)
                              : _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
        const __m512i nib = _mm512_set1_epi8(15), top = _mm512_set1_epi8((char)0x80), sixteen = _mm512_set1_epi8(16);
        const size_t xoff = q4 ? (size_t)K : 0;
        const int quads = pairs / 2;
        for (int q = 0; q < quads; q++) {
            __m512i xa[QMAXT], xb[QMAXT], na[QMAXT], nb[QMAXT];
            __m128 s4[QMAXT];
            for (int m = 0; m < M; m++) {
                const int8_t *xr = x8_row(qx, m) + xoff + (size_t)q * 128;
                xa[m] = _mm512_loadu_si512(xr);
                xb[m] = _mm512_loadu_si512(xr + 64);
                na[m] = q4 ? _mm512_setzero_si512() : (__m512i)neg128((qi8x64)xa[m]);
                nb[m] = q4 ? _mm512_setzero_si512() : (__m512i)neg128((qi8x64)xb[m]);
                s4[m] = _mm_loadu_ps(qx->sx + (size_t)m * NG + 4 * q);
            }
            for (int r = 0; r < R; r++) {
                __m512i wa, wb;
                if (q4) {
                    const uint8_t *w = (const uint8_t *)p->q + (size_t)(row0 + r) * (K / 2) + (size_t)q * 64;
                    __builtin_prefetch(w + (size_t)4 * R * (K / 2), 0, 3);
                    const __m512i v = _mm512_loadu_si512(w);
                    wa = _mm512_and_si512(v, nib);
                    wb = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
                    if (p->qh) { /* fifth bits: + 16 where set (groups 0 and 2 in wa, 1 and 3 in wb) */
                        const size_t g0 = (size_t)(row0 + r) * NG + 4 * (size_t)q;
                        const uint64_t h0 = qh_at(p, g0), h1 = qh_at(p, g0 + 1), h2 = qh_at(p, g0 + 2), h3 = qh_at(p, g0 + 3);
                        wa = _mm512_mask_add_epi8(wa, _cvtu64_mask64(h0 | h2 << 32), wa, sixteen);
                        wb = _mm512_mask_add_epi8(wb, _cvtu64_mask64(h1 | h3 << 32), wb, sixteen);
                    }
                } else {
                    const int8_t *w = (const int8_t *)p->q + (size_t)(row0 + r) * K + (size_t)q * 128;
                    __builtin_prefetch(w + (size_t)4 * R * K, 0, 3);
                    __builtin_prefetch(w + (size_t)4 * R * K + 64, 0, 3);
                    wa = _mm512_xor_si512(_mm512_loadu_si512(w), top);
                    wb = _mm512_xor_si512(_mm512_loadu_si512(w + 64), top);
                }
                const size_t at = (size_t)(row0 + r) * NG + 4 * (size_t)q;
                const __m128 d4 = scales4(p->scale, at, H);
                for (int m = 0; m < M; m++) {
                    const __m512 s = _mm512_castps128_ps512(_mm_mul_ps(d4, s4[m]));
                    const __m512 da = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(na[m], wa, xa[m]));
                    const __m512 db = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(nb[m], wb, xb[m]));
                    acc[r * M + m] = (qf32x16)_mm512_fmadd_ps(da, _mm512_permutexvar_ps(ia, s), (__m512)acc[r * M + m]);
                    acc[r * M + m] = (qf32x16)_mm512_fmadd_ps(db, _mm512_permutexvar_ps(ib, s), (__m512)acc[r * M + m]);
                }
            }
        }
        c0 = 2 * quads;
    }
#endif
    if (p->type == LMLAB_Q4) {
        for (int c = c0; c < pairs; c++) {
            QPAIR_X
            for (int r = 0; r < R; r++) {
                const uint8_t *w = (const uint8_t *)p->q + (size_t)(row0 + r) * (K / 2) + (size_t)c * 32;
                __builtin_prefetch(w + (size_t)4 * R * (K / 2), 0, 3);
                const size_t at = (size_t)(row0 + r) * NG + 2 * c;
#if QVNNI == 512 /* the 32 bytes in both halves, the upper half shifted down a nibble */
                const __m512i b2 = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)w));
                __m512i wn = _mm512_and_si512(_mm512_mask_srli_epi16(b2, 0xFFFF0000u, b2, 4), _mm512_set1_epi8(15));
                if (p->qh) /* fifth bits: + 16 where set */
                    wn = _mm512_mask_add_epi8(wn, _cvtu64_mask64(qh_at(p, at) | (uint64_t)qh_at(p, at + 1) << 32), wn,
                                              _mm512_set1_epi8(16));
                const qu8x64 wv = (qu8x64)wn;
#else
                qu8x32 lo, hi;
                q4_pair(p, w, at, &lo, &hi);
                qu8x64 wv; /* lo then hi (GCC turns a 64-byte shufflevector into bytes through the stack on AVX2) */
                memcpy(&wv, &lo, 32);
                memcpy((char *)&wv + 32, &hi, 32);
#endif
                const qf32x16 dv = scale_halves(p->scale, at, H);
                for (int m = 0; m < M; m++)
                    acc[r * M + m] += __builtin_convertvector(dpbusd(wv, xv[m]), qf32x16) * (dv * sxv[m]);
            }
        }
    } else if (p->group == 32) {
        for (int c = c0; c < pairs; c++) {
            QPAIR_X
            for (int r = 0; r < R; r++) {
                const int8_t *w = (const int8_t *)p->q + (size_t)(row0 + r) * K + (size_t)c * 64;
                __builtin_prefetch(w + (size_t)4 * R * K, 0, 3);
                qi8x64 wv;
                memcpy(&wv, w, 64);
                const size_t at = (size_t)(row0 + r) * NG + 2 * c;
                const qf32x16 dv = scale_halves(p->scale, at, H);
                for (int m = 0; m < M; m++)
                    acc[r * M + m] += __builtin_convertvector(dot_s8(wv, xv[m], xn[m]), qf32x16) * (dv * sxv[m]);
            }
        }
    } else { /* LMLAB_Q8, groups of 16: four per 64 values */
        for (int c = 0; c < pairs; c++) {
            QPAIR_X
            for (int r = 0; r < R; r++) {
                const int8_t *w = (const int8_t *)p->q + (size_t)(row0 + r) * K + (size_t)c * 64;
                __builtin_prefetch(w + (size_t)4 * R * K, 0, 3);
                qi8x64 wv;
                memcpy(&wv, w, 64);
                const size_t at = (size_t)(row0 + r) * (K / 16) + 4 * c;
                const qf32x16 dv = scale_quarters(p->scale, at, H);
                for (int m = 0; m < M; m++)
                    acc[r * M + m] += __builtin_convertvector(dot_s8(wv, xv[m], xn[m]), qf32x16) * (dv * sxv[m]);
            }
        }
    }
#undef QPAIR_X
#else
    if (p->type == LMLAB_Q8 && p->group == 32) {
        for (int c = 0; c < pairs; c++) {
            qi16x32 xa[QMAXT], xb[QMAXT];
            float sxa[QMAXT], sxb[QMAXT];
            load_pair(qx, c, M, xa, xb, sxa, sxb);
            for (int r = 0; r < R; r++) {
                const int8_t *w = (const int8_t *)p->q + (size_t)(row0 + r) * K + (size_t)c * 64;
                __builtin_prefetch(w + (size_t)4 * R * K, 0, 3);
                const qi16x32 wa = load_i8(w), wb = load_i8(w + 32);
                const size_t at = (size_t)(row0 + r) * NG + 2 * c;
                const float s0 = sc_at(p->scale, at, H), s1 = sc_at(p->scale, at + 1, H);
                for (int m = 0; m < M; m++)
                    acc[r * M + m] += __builtin_convertvector(madd(wa, xa[m]), qf32x16) * (s0 * sxa[m]) +
                                      __builtin_convertvector(madd(wb, xb[m]), qf32x16) * (s1 * sxb[m]);
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
                const size_t at = (size_t)(row0 + r) * (K / 16) + 4 * c;
                float sc[4];
                for (int j = 0; j < 4; j++) sc[j] = sc_at(p->scale, at + j, H);
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
                const size_t at = (size_t)(row0 + r) * NG + 2 * c;
                qu8x32 lo, hi;
                q4_pair(p, w, at, &lo, &hi);
                const qi16x32 wa = __builtin_convertvector(lo, qi16x32), wb = __builtin_convertvector(hi, qi16x32);
                const float d0 = sc_at(p->scale, at, H), d1 = sc_at(p->scale, at + 1, H);
                for (int m = 0; m < M; m++)
                    acc[r * M + m] += __builtin_convertvector(madd(wa, xa[m]), qf32x16) * (d0 * sxa[m]) +
                                      __builtin_convertvector(madd(wb, xb[m]), qf32x16) * (d1 * sxb[m]);
            }
        }
    }
#endif
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) {
            float sum = qhsum(acc[r * M + m]);
            if (NG % 2) sum += group_scalar(p, row0 + r, K, NG - 1, qx, m);
            if (p->type == LMLAB_Q4) /* the mins: sum_g m_g * sx_g * sum(qx_g); the last group's is in group_scalar */
                sum += p->min ? min_terms(p->min, (size_t)(row0 + r) * NG, qx->xsum + (size_t)m * NG, NG - NG % 2, H)
                              : min_factor(p) * min_terms(p->scale, (size_t)(row0 + r) * NG, qx->xsum + (size_t)m * NG, NG - NG % 2, H);
            y[(size_t)m * ldy + r] = sum;
        }
}

/* CALL(MM) with MM the constant 1..8 that equals M (more rows: 8), so each inlined kernel is
 * compiled for its own number of x rows */
#define QPER_M(CALL)                                                                           \
    switch (M) {                                                                               \
    case 1: CALL(1); break;                                                                    \
    case 2: CALL(2); break;                                                                    \
    case 3: CALL(3); break;                                                                    \
    case 4: CALL(4); break;                                                                    \
    case 5: CALL(5); break;                                                                    \
    case 6: CALL(6); break;                                                                    \
    case 7: CALL(7); break;                                                                    \
    default: CALL(8); break;                                                                   \
    }

/* ------------------------------------------------------------------------ tiled Q4 */

/* A tiled Q4 part (tile = LMLAB_QTILE = 16): its rows in blocks of 16, and in a block, group g of
 * all 16 rows in 256 bytes: byte 64 j + 4 r + i holds row r's value 8 j + i in its low nibble
 * and value 8 j + 4 + i in its high one (j < 4, i < 4). So lane r of a 64-byte register is row
 * r, and one vpdpbusd against x's four values 8 j .. 8 j + 3 (or 8 j + 4 ..), broadcast to every
 * lane, adds four products to each of the 16 rows: a group's eight add into one int32 register,
 * then one conversion and one fma serve all 16 rows (the pair layout needs them per row and a
 * horizontal sum at the end). A block is one stream of bytes, group after group.
 * The scales and mins go by (block, group, row): a group's 16 side by side. Q5_0's fifth bits
 * are 8 masks of 64 bits per block and group: bit 4 r + i of mask 2 j + h is the fifth bit of
 * row r's value 8 j + 4 h + i, one mask per register of nibbles.
 * Only AVX512-VNNI builds tile (lmlab.quant asks lmlab_q_tiles); the others compute a tiled part
 * correctly with the portable loop below, which the tests run on every build. */

/* row r's value k of one block's group (blk: its 256 bytes, masks: its fifth bits or NULL) */
static inline int tiled_value(const uint8_t *blk, const uint64_t *masks, int r, int k) {
    const int j = k / 8, h = (k % 8) / 4, i = k % 4;
    const uint8_t byte = blk[64 * j + 4 * r + i];
    int v = h ? byte >> 4 : byte & 15;
    if (masks) {
        uint64_t mk;
        memcpy(&mk, masks + 2 * j + h, 8);
        v |= (int)(mk >> (4 * r + i) & 1) << 4;
    }
    return v;
}

static inline const uint8_t *tiled_group(const lmlab_qpart *p, size_t at) {
    return (const uint8_t *)p->q + at * (p->type == LMLAB_Q8 ? 512 : 256);
}

/* a tiled Q8 part: group g's 512 bytes of a block hold at 64 j + 4 r + i row r's value 4 j + i
 * plus 128 (j < 8): unsigned, as vpdpbusd wants, and the sum starts at -128 times x's sum */
static inline int tiled8_value(const uint8_t *blk, int r, int k) { return (int)blk[64 * (k / 4) + 4 * r + k % 4] - 128; }
static inline const uint64_t *tiled_masks(const lmlab_qpart *p, size_t at) {
    return p->qh ? (const uint64_t *)p->qh + at * 8 : NULL;
}

/* y[m * ldy + r] = dot(row 16 b + r, x row m) for the 16 rows of block b: the plain loop */
static void qtiled_portable(const lmlab_qpart *p, int64_t b, const lmlab_qx *qx, int M, float *y, int ldy) {
    const int K = qx->K, NG = K / 32, H = (int)p->scale16;
    for (int m = 0; m < M; m++)
        for (int r = 0; r < LMLAB_QTILE; r++) {
            float out = 0;
            for (int g = 0; g < NG; g++) {
                const size_t at = (size_t)b * NG + g, s = at * LMLAB_QTILE + r;
#ifdef QVNNI
                const int8_t *xq = x8_row(qx, m) + (size_t)g * 32;
#else
                const int16_t *xq = qx->x16 + (size_t)m * K + (size_t)g * 32;
#endif
                int sum = 0;
                for (int k = 0; k < 32; k++)
                    sum += (p->type == LMLAB_Q8 ? tiled8_value(tiled_group(p, at), r, k)
                                                : tiled_value(tiled_group(p, at), tiled_masks(p, at), r, k)) * xq[k];
                out += (float)sum * (sc_at(p->scale, s, H) * qx->sx[(size_t)m * NG + g]);
                if (p->type == LMLAB_Q4) out += min_at(p, s, H) * qx->xsum[(size_t)m * NG + g];
            }
            y[(size_t)m * ldy + r] = out;
        }
}

#if QVNNI == 512
static inline __attribute__((always_inline)) __m512 tiled_scales(const void *s, size_t at, int H) {
    return H ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)s + at * LMLAB_QTILE)))
             : _mm512_loadu_ps((const float *)s + at * LMLAB_QTILE);
}

/* the same with vpdpbusd: M rows of x (M, H constants where inlined) */
static inline __attribute__((always_inline)) void qtiled(const lmlab_qpart *p, int64_t b, const lmlab_qx *qx, int M,
                                                         float *y, int ldy, int H) {
    const int K = qx->K, NG = K / 32;
    const __m512i nib = _mm512_set1_epi8(15), sixteen = _mm512_set1_epi8(16);
    const __m512 mf = _mm512_set1_ps(min_factor(p));
    __m512 acc[QMAXT];
    for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
    for (int g = 0; g < NG; g++) {
        const size_t at = (size_t)b * NG + g;
        const uint8_t *w = tiled_group(p, at);
        for (int j = 0; j < 4; j++) __builtin_prefetch(w + 8 * 256 + 64 * j, 0, 3); /* 8 groups ahead */
        __m512i lo[4], hi[4];
        for (int j = 0; j < 4; j++) {
            const __m512i v = _mm512_loadu_si512(w + 64 * j);
            lo[j] = _mm512_and_si512(v, nib);
            hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
        }
        if (p->qh) { /* fifth bits: + 16 where set */
            uint64_t mk[8];
            memcpy(mk, tiled_masks(p, at), 64);
            for (int j = 0; j < 4; j++) {
                lo[j] = _mm512_mask_add_epi8(lo[j], _cvtu64_mask64(mk[2 * j]), lo[j], sixteen);
                hi[j] = _mm512_mask_add_epi8(hi[j], _cvtu64_mask64(mk[2 * j + 1]), hi[j], sixteen);
            }
        }
        const __m512 d = tiled_scales(p->scale, at, H);
        const __m512 mn = p->min ? tiled_scales(p->min, at, H) : _mm512_mul_ps(d, mf);
        for (int m = 0; m < M; m++) {
            int32_t x4[8]; /* x's 32 values of group g as eight words of four */
            memcpy(x4, x8_row(qx, m) + (size_t)g * 32, 32);
            __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[0], _mm512_set1_epi32(x4[0]));
            dot = _mm512_dpbusd_epi32(dot, hi[0], _mm512_set1_epi32(x4[1]));
            for (int j = 1; j < 4; j++) {
                dot = _mm512_dpbusd_epi32(dot, lo[j], _mm512_set1_epi32(x4[2 * j]));
                dot = _mm512_dpbusd_epi32(dot, hi[j], _mm512_set1_epi32(x4[2 * j + 1]));
            }
            const float *sx = qx->sx + (size_t)m * NG, *xs = qx->xsum + (size_t)m * NG;
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, _mm512_set1_ps(sx[g])), acc[m]);
            acc[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xs[g]), acc[m]);
        }
    }
    for (int m = 0; m < M; m++) _mm512_storeu_ps(y + (size_t)m * ldy, acc[m]);
}

/* the same for a tiled Q8 part: a group's 8 registers against x's 8 words of four, the sum
 * started at xneg = -128 times the sum of x's group (the +128 of the stored bytes) */
static inline __attribute__((always_inline)) void qtiled8(const lmlab_qpart *p, int64_t b, const lmlab_qx *qx, int M,
                                                          const int32_t *xneg, float *y, int ldy, int H) {
    const int K = qx->K, NG = K / 32;
    __m512 acc[QMAXT];
    for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
    for (int g = 0; g < NG; g++) {
        const size_t at = (size_t)b * NG + g;
        const uint8_t *w = tiled_group(p, at);
        __m512i v[8];
        for (int j = 0; j < 8; j++) {
            __builtin_prefetch(w + 4 * 512 + 64 * j, 0, 3); /* 4 groups ahead */
            v[j] = _mm512_loadu_si512(w + 64 * j);
        }
        const __m512 d = tiled_scales(p->scale, at, H);
        for (int m = 0; m < M; m++) {
            int32_t x4[8];
            memcpy(x4, x8_row(qx, m) + (size_t)g * 32, 32);
            __m512i dot = _mm512_set1_epi32(xneg[(size_t)m * NG + g]);
            for (int j = 0; j < 8; j++) dot = _mm512_dpbusd_epi32(dot, v[j], _mm512_set1_epi32(x4[j]));
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, _mm512_set1_ps(qx->sx[(size_t)m * NG + g])), acc[m]);
        }
    }
    for (int m = 0; m < M; m++) _mm512_storeu_ps(y + (size_t)m * ldy, acc[m]);
}

/* row rr's 32 values of one block's Q8 group as floats d * v */
static inline void tiled8_row_values(const uint8_t *blk, int rr, float d, float *og) {
    uint32_t w[8];
    for (int j = 0; j < 8; j++) memcpy(&w[j], blk + 64 * j + 4 * rr, 4);
    const __m512i off = _mm512_set1_epi32(128);
    const __m512 dv = _mm512_set1_ps(d);
    for (int h = 0; h < 2; h++) {
        const __m512i a = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + 4 * h))), off);
        _mm512_storeu_ps(og + 16 * h, _mm512_mul_ps(_mm512_cvtepi32_ps(a), dv));
    }
}

/* row rr's 32 values of one block's group (its bytes blk, fifth-bit masks mk or NULL) as floats
 * d * v + mn (exact products: d has at most 17 significant bits, v 5) */
static inline void tiled_row_values(const uint8_t *blk, const uint64_t *mk, int rr, float d, float mn, float *og) {
    uint32_t w[4];
    for (int j = 0; j < 4; j++) memcpy(&w[j], blk + 64 * j + 4 * rr, 4);
    const __m128i v = _mm_loadu_si128((const __m128i *)w), nib = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(v, nib), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
    __m512i a = _mm512_cvtepu8_epi32(_mm_unpacklo_epi32(lo, hi)); /* values 0..15: j 0 low, j 0 high, j 1 ... */
    __m512i b = _mm512_cvtepu8_epi32(_mm_unpackhi_epi32(lo, hi)); /* values 16..31 */
    if (mk) {
        uint32_t bits = 0; /* bit k: value k's fifth bit */
        for (int j = 0; j < 4; j++)
            bits |= (uint32_t)(mk[2 * j] >> (4 * rr) & 15) << (8 * j) | (uint32_t)(mk[2 * j + 1] >> (4 * rr) & 15) << (8 * j + 4);
        a = _mm512_mask_add_epi32(a, (__mmask16)(bits & 0xFFFF), a, _mm512_set1_epi32(16));
        b = _mm512_mask_add_epi32(b, (__mmask16)(bits >> 16), b, _mm512_set1_epi32(16));
    }
    const __m512 dv = _mm512_set1_ps(d), mv = _mm512_set1_ps(mn);
    _mm512_storeu_ps(og, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), dv, mv));
    _mm512_storeu_ps(og + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(b), dv, mv));
}
#endif

/* block b of a tiled part against M rows of x */
static void qtiled_block(const lmlab_qpart *p, int64_t b, const lmlab_qx *qx, int M, const int32_t *xneg, float *y,
                         int ldy) {
#if QVNNI == 512
#define QTCALL(MM)                                                     \
    if (p->type == LMLAB_Q8) {                                         \
        if (p->scale16) qtiled8(p, b, qx, MM, xneg, y, ldy, 1);        \
        else qtiled8(p, b, qx, MM, xneg, y, ldy, 0);                   \
    } else if (p->scale16) qtiled(p, b, qx, MM, y, ldy, 1);            \
    else qtiled(p, b, qx, MM, y, ldy, 0);
    QPER_M(QTCALL)
#undef QTCALL
#else
    (void)xneg;
    qtiled_portable(p, b, qx, M, y, ldy);
#endif
}

/* rows [r0, r1) of a tiled part: whole blocks straight into y, a block cut by the range through
 * a scratch tile */
static void qtiled_range(const lmlab_qpart *p, int64_t r0, int64_t r1, const lmlab_qx *qx, int M, float *y, int ldy) {
    float tmp[QMAXT * LMLAB_QTILE];
    const int NG = qx->K / 32;
    int32_t xneg[p->type == LMLAB_Q8 ? M * NG : 1]; /* Q8: -128 times each group's sum of x */
    if (p->type == LMLAB_Q8)
        for (int m = 0; m < M; m++)
            for (int g = 0; g < NG; g++) {
                int sum = 0;
#ifdef QVNNI
                const int8_t *xq = x8_row(qx, m) + (size_t)g * 32;
#else
                const int16_t *xq = qx->x16 + (size_t)m * qx->K + (size_t)g * 32;
#endif
                for (int k = 0; k < 32; k++) sum += xq[k];
                xneg[m * NG + g] = -128 * sum;
            }
    for (int64_t r = r0; r < r1;) {
        const int64_t b = r / LMLAB_QTILE, lo = b * LMLAB_QTILE, hi = lo + LMLAB_QTILE, e = hi < r1 ? hi : r1;
        if (r == lo && hi <= r1) {
            qtiled_block(p, b, qx, M, xneg, y + (r - r0), ldy);
        } else {
            qtiled_block(p, b, qx, M, xneg, tmp, LMLAB_QTILE);
            for (int m = 0; m < M; m++)
                for (int64_t i = r; i < e; i++) y[(size_t)m * ldy + (i - r0)] = tmp[m * LMLAB_QTILE + (i - lo)];
        }
        r = e;
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
    if (p->tile) {
        qtiled_range(p, r0, r1, &sub, M, y, ldy);
        return;
    }
    int64_t r = r0;
#define QCALL(MM)                                                                                           \
    if (p->scale16) {                                                                                       \
        for (; r + QROWS(MM) <= r1; r += QROWS(MM)) qtile(p, r, QROWS(MM), &sub, MM, y + (r - r0), ldy, 1); \
        for (; r < r1; r++) qtile(p, r, 1, &sub, MM, y + (r - r0), ldy, 1);                                 \
    } else {                                                                                                \
        for (; r + QROWS(MM) <= r1; r += QROWS(MM)) qtile(p, r, QROWS(MM), &sub, MM, y + (r - r0), ldy, 0); \
        for (; r < r1; r++) qtile(p, r, 1, &sub, MM, y + (r - r0), ldy, 0);                                 \
    }
    QPER_M(QCALL)
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
        /* shares in multiples of 16 rows: a tiled part's blocks stay whole */
#pragma omp parallel num_threads(threads)
        {
#ifdef _OPENMP
            const int t = omp_get_thread_num(), T = omp_get_num_threads();
#else
            const int t = 0, T = 1;
#endif
            const int64_t chunks = (N + 15) / 16;
            int64_t n0 = chunks * t / T * 16, n1 = chunks * (t + 1) / T * 16;
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
            const int H = (int)p->scale16;
            float *o = out + (size_t)(r - r0) * K;
            if (p->tile) { /* the row's 4 bytes of each 64 of a group: values 8 j + i and 8 j + 4 + i */
                const int NG = K / 32, rr = (int)(row % LMLAB_QTILE);
                for (int g = 0; g < NG; g++) {
                    const size_t at = (size_t)(row / LMLAB_QTILE) * NG + g, s = at * LMLAB_QTILE + rr;
                    const uint8_t *blk = tiled_group(p, at);
                    if (p->type == LMLAB_Q8) {
                        const float d = sc_at(p->scale, s, H);
#if QVNNI == 512
                        tiled8_row_values(blk, rr, d, o + g * 32);
#else
                        for (int k = 0; k < 32; k++) o[g * 32 + k] = d * (float)tiled8_value(blk, rr, k);
#endif
                        continue;
                    }
                    const float d = sc_at(p->scale, s, H), mn = min_at(p, s, H);
                    uint64_t mk[8] = {0};
                    if (p->qh) memcpy(mk, tiled_masks(p, at), 64);
                    float *og = o + g * 32;
#if QVNNI == 512
                    tiled_row_values(blk, p->qh ? mk : NULL, rr, d, mn, og);
                    continue;
#endif
                    for (int j = 0; j < 4; j++) {
                        const uint8_t *b4 = blk + 64 * j + 4 * rr;
                        const uint32_t hlo = (uint32_t)(mk[2 * j] >> (4 * rr)), hhi = (uint32_t)(mk[2 * j + 1] >> (4 * rr));
                        for (int i = 0; i < 4; i++) {
                            og[8 * j + i] = d * (float)((b4[i] & 15) | (hlo >> i & 1) << 4) + mn;
                            og[8 * j + 4 + i] = d * (float)((b4[i] >> 4) | (hhi >> i & 1) << 4) + mn;
                        }
                    }
                }
            } else if (p->type == LMLAB_Q8) {
                const int8_t *q = (const int8_t *)p->q + (size_t)row * K;
                const int G = (int)p->group;
                for (int g = 0; g < K / G; g++) {
                    const float sc = sc_at(p->scale, (size_t)row * (K / G) + g, H);
                    for (int j = 0; j < G; j++) o[g * G + j] = sc * (float)q[g * G + j];
                }
            } else {
                const uint8_t *q = (const uint8_t *)p->q + (size_t)row * (K / 2);
                const int NG = K / 32;
                const size_t at = (size_t)row * NG;
                for (int g = 0; g + 1 < NG; g += 2) { /* pairs: group g in the low nibbles, g + 1 in the high */
                    const float d0 = sc_at(p->scale, at + g, H), d1 = sc_at(p->scale, at + g + 1, H);
                    const float m0 = min_at(p, at + g, H), m1 = min_at(p, at + g + 1, H);
                    const uint32_t h0 = p->qh ? qh_at(p, at + g) : 0, h1 = p->qh ? qh_at(p, at + g + 1) : 0;
                    for (int j = 0; j < 32; j++) {
                        const uint8_t byte = q[g * 16 + j];
                        o[g * 32 + j] = d0 * (float)((byte & 15) | (h0 >> j & 1) << 4) + m0;
                        o[g * 32 + 32 + j] = d1 * (float)((byte >> 4) | (h1 >> j & 1) << 4) + m1;
                    }
                }
                if (NG % 2) { /* a last group alone: values j and j + 16 in byte j */
                    const int g = NG - 1;
                    const float d0 = sc_at(p->scale, at + g, H), m0 = min_at(p, at + g, H);
                    const uint32_t h = p->qh ? qh_at(p, at + g) : 0;
                    for (int j = 0; j < 16; j++) {
                        const uint8_t byte = q[g * 16 + j];
                        o[g * 32 + j] = d0 * (float)((byte & 15) | (h >> j & 1) << 4) + m0;
                        o[g * 32 + j + 16] = d0 * (float)((byte >> 4) | (h >> (j + 16) & 1) << 4) + m0;
                    }
                }
            }
        }
        start += p->rows;
    }
}

int lmlab_q_parts_max(void) { return LMLAB_QPARTS; }

/* rows per block lmlab.quant tiles Q4 parts in for this build: LMLAB_QTILE where the tiled
 * kernel is the fast one (AVX512-VNNI), else 0 (a tiled part still computes right) */
int lmlab_q_tiles(void) {
#if QVNNI == 512
    return LMLAB_QTILE;
#else
    return 0;
#endif
}

/* the integer dot product this build runs, for lmlab bench --machine and native.status() */
const char *lmlab_q_isa(void) {
#if QVNNI == 512
    return "int8 dot: AVX512-VNNI vpdpbusd";
#elif QVNNI == 128
#ifdef __ARM_FEATURE_MATMUL_INT8
    return "int8 dot: NEON usdot (i8mm)";
#else
    return "int8 dot: NEON sdot (dotprod)";
#endif
#elif QVNNI == 2
    return "int8 dot: AVX2 pmaddubsw";
#elif defined(QVNNI)
    return "int8 dot: AVX-VNNI vpdpbusd";
#elif defined(__AVX512BW__)
    return "int8 dot: AVX-512BW pmaddwd";
#elif defined(__AVX2__)
    return "int8 dot: AVX2 pmaddwd";
#else
    return "int8 dot: portable C";
#endif
}
