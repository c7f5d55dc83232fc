/* lmlab's native code: the few-row matmul, and one whole decoding step of the Transformer.
 *
 * Decoding multiplies one row (or a few) by every weight matrix, so a step is bound by how fast
 * the weights stream from memory, plus whatever fixed cost each small operation adds. Two things
 * here attack those:
 *
 * 1. mv_range: y = x @ W.T for a few rows of x, reading W in its ordinary row-major layout. It
 *    walks R rows of W side by side (R = 8 for one row of x), so the prefetchers see R streams at
 *    once and R accumulator chains hide the FMA latency. bf16 weights use the AVX512-BF16 dot
 *    product where the CPU has it, else they are widened to fp32 with a shift.
 *
 * 2. lmlab_decode_step: a decoding step (one new token per sequence) through every block,
 *    following the same ModelConfig fields as lmlab/model.py, which is its reference and
 *    defines what each operation means. One OpenMP parallel region covers the whole step:
 *    the threads split each matmul's output features and meet at a barrier after it; the small
 *    per-token operations (norms, residual adds) each thread repeats on its own copy of the
 *    residual stream, which costs less than another barrier. A bf16 model rounds to bf16 at the
 *    same points as model.py does with bf16 tensors, so both paths give the same numbers up to
 *    the order of the sums.
 *
 * The vectors are GCC/Clang vector types, which the compiler maps onto the machine's registers
 * (AVX-512, AVX2, NEON); only bf16's dot product is an x86 intrinsic. Built by lmlab/native.py
 * with -march=native at first use; where there are no such vectors lmlab_isa() is 0 and lmlab
 * keeps its PyTorch routes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* ------------------------------------------------------------------------ the step's model */

typedef struct { /* one block's parameters, in the model's dtype; NULL where the config has none */
    const void *attn_norm_w, *attn_norm_b, *qkv_w, *qkv_b, *o_w, *o_b, *q_norm_w, *k_norm_w;
    const void *post_attn_norm_w, *post_attn_norm_b, *mlp_norm_w, *mlp_norm_b;
    const void *up_w, *up_b, *down_w, *down_b, *post_mlp_norm_w, *post_mlp_norm_b;
    int64_t rope_table; /* which cos/sin table this block uses; -1: no RoPE */
    int64_t window;     /* sliding window in tokens, 0: attends to every cached token */
} lmlab_block;

typedef struct { /* the ModelConfig fields a step needs (see lmlab/config.py) */
    int64_t n_layers, d_model, n_heads, n_kv_heads, head_dim, d_ff, vocab, rotary_dim;
    int64_t layernorm, sandwich, qk_norm, gated, act, parallel_residual, bf16;
    double norm_eps, norm_offset, attn_scale, attn_softcap, final_softcap;
    const void *final_norm_w, *final_norm_b, *lm_head_w;
    const lmlab_block *blocks;
} lmlab_model;

#define MAXM 8 /* rows of x one pass over W serves */

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__ARM_NEON)
#define LMLAB_VECTORS 1

int lmlab_openmp(void) { /* 1 when built with OpenMP: the step runs on torch's thread count */
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int lmlab_isa(void) {
#if defined(__AVX512F__)
    return 512;
#elif defined(__AVX2__)
    return 256;
#else
    return 128;
#endif
}

#if defined(__AVX512F__) || defined(__AVX2__)
#define ACC 8 /* accumulators a tile keeps in registers: 8 vectors of 16 floats (AVX2 spills a little, and is still faster so) */
#else
#define ACC 4 /* NEON: each 16-float vector takes 4 of its 32 registers */
#endif

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

static inline f32x16 load_f32(const float *p) {
    f32x16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline f32x16 load_bf16(const uint16_t *p) { /* bf16 is the top half of an fp32: widen and shift */
    u16x16 h;
    memcpy(&h, p, sizeof h);
    u32x16 u = __builtin_convertvector(h, u32x16) << 16;
    f32x16 f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float hsum(f32x16 v) {
    f32x8 a, b;
    memcpy(&a, &v, 32);
    memcpy(&b, (char *)&v + 32, 32);
    a += b;
    f32x4 c, d;
    memcpy(&c, &a, 16);
    memcpy(&d, (char *)&a + 16, 16);
    c += d;
    return (c[0] + c[2]) + (c[1] + c[3]);
}

typedef int32_t i32x16 __attribute__((vector_size(64)));

/* exp(x) for 16 floats at once, within 2 ulp for x in [-87, 88] (smaller x gives ~1e-38, not 0):
 * x = k ln2 + r with |r| <= ln2/2, exp(r) by its degree-6 Taylor-like polynomial, times 2^k.
 * A softmax over a long context calls exp for every cached slot of every head. */
static inline f32x16 exp16(f32x16 x) {
    const f32x16 lo = {0}, shift = lo + 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    i32x16 below = x < -87.0f, above = x > 88.0f;
    x = (f32x16)((below & (i32x16)(lo - 87.0f)) | (~below & (i32x16)x));
    x = (f32x16)((above & (i32x16)(lo + 88.0f)) | (~above & (i32x16)x));
    f32x16 t = x * 1.44269504088896341f + shift, k = t - shift;
    f32x16 r = x - k * 0.693359375f + k * 2.12194440e-4f; /* ln 2 in two parts, so r is exact */
    f32x16 p = lo + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    i32x16 ki = (i32x16)t - (i32x16)shift; /* k as an integer: the low bits of t */
    return (f32x16)((i32x16)p + (ki << 23));
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* what storing a float into a tensor of the model's dtype does to it */
static inline float rnd(float f, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(f)) : f; }

static inline float param(const void *p, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* ------------------------------------------------------------------------ mat-vec tiles */

/* Each tile also prefetches the same place in the rows this many rows further on: the rows are
 * short (a few KB), too short for the hardware prefetchers to ramp up on each. About 18 KB
 * ahead for a 576-wide model; measured on SmolLM2-135M's bf16 step, 10.5 -> 7.3 ms of matmuls
 * (2-core Xeon); fp32 gains ~3%. Prefetching past the end of W is harmless (it never faults). */
#define AHEAD_F32 8
#define AHEAD_BF16 16

/* y[m * ldy + r] = dot(w row r, x row m) for R rows of w and M rows of x (float32 x).
 * wbf16: w holds bf16 (widened on load), else float32. R and M are constants at each call. */
static inline __attribute__((always_inline)) void tile_f32(const float *x, int K, const void *w, int wbf16,
                                                           int R, int M, float *y, int ldy) {
    f32x16 acc[MAXM];
    for (int i = 0; i < R * M; i++) acc[i] = (f32x16){0};
    const float *wf = w;
    const uint16_t *wh = w;
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        f32x16 xv[MAXM];
        for (int m = 0; m < M; m++) xv[m] = load_f32(x + (size_t)m * K + k);
        for (int r = 0; r < R; r++) {
            f32x16 wv;
            if (wbf16) {
                wv = load_bf16(wh + (size_t)r * K + k);
                __builtin_prefetch(wh + (size_t)(r + AHEAD_BF16) * K + k, 0, 3);
            } else {
                wv = load_f32(wf + (size_t)r * K + k);
                __builtin_prefetch(wf + (size_t)(r + AHEAD_F32) * K + k, 0, 3);
            }
            for (int m = 0; m < M; m++) acc[r * M + m] += wv * xv[m];
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) {
            float sum = hsum(acc[r * M + m]);
            for (int kk = k; kk < K; kk++) /* the tail, fewer than 16 */
                sum += (wbf16 ? bf16_to_f32(wh[(size_t)r * K + kk]) : wf[(size_t)r * K + kk]) * x[(size_t)m * K + kk];
            y[(size_t)m * ldy + r] = sum;
        }
}

#ifdef __AVX512BF16__
#include <immintrin.h>
#define HAVE_DP 1
/* The same for bf16 x and w: one instruction multiplies 32 pairs into 16 fp32 lanes. */
static inline __attribute__((always_inline)) void tile_dp(const uint16_t *x, int K, const uint16_t *w, int R, int M,
                                                          float *y, int ldy) {
    __m512 acc[MAXM];
    for (int i = 0; i < R * M; i++) acc[i] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512i xv[MAXM];
        for (int m = 0; m < M; m++) xv[m] = _mm512_loadu_si512(x + (size_t)m * K + k);
        for (int r = 0; r < R; r++) {
            __m512i wv = _mm512_loadu_si512(w + (size_t)r * K + k);
            __builtin_prefetch(w + (size_t)(r + AHEAD_BF16) * K + k, 0, 3);
            for (int m = 0; m < M; m++) acc[r * M + m] = _mm512_dpbf16_ps(acc[r * M + m], (__m512bh)wv, (__m512bh)xv[m]);
        }
    }
    if (k < K) { /* zero-filled tails add nothing */
        __mmask32 km = (__mmask32)((1ull << (K - k)) - 1);
        __m512i xv[MAXM];
        for (int m = 0; m < M; m++) xv[m] = _mm512_maskz_loadu_epi16(km, x + (size_t)m * K + k);
        for (int r = 0; r < R; r++) {
            __m512i wv = _mm512_maskz_loadu_epi16(km, w + (size_t)r * K + k);
            for (int m = 0; m < M; m++) acc[r * M + m] = _mm512_dpbf16_ps(acc[r * M + m], (__m512bh)wv, (__m512bh)xv[m]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) y[(size_t)m * ldy + r] = _mm512_reduce_add_ps(acc[r * M + m]);
}
#else
#define HAVE_DP 0
#endif

/* R rows of W side by side for M rows of x: as many accumulators as registers allow (R * M <= MAXM). */
#define ROWS_FOR(M) ((M) >= ACC ? 1 : ACC / (M))

#define TILE_CASES(CALL) \
    switch (M) {         \
    case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; case 4: CALL(4); break; \
    case 5: CALL(5); break; case 6: CALL(6); break; case 7: CALL(7); break; default: CALL(8); break; }

/* y[m * ldy + n] = dot(W[n], x[m]) for n in [n0, n1) and m < M (M <= MAXM).
 * W is (N, K) row-major, float32 or bf16 (wbf16). x is float32 (xf), or bf16 (xb) where the
 * AVX512-BF16 dot product is used for bf16 weights; the caller passes both where it can. */
static void mv_range(const float *xf, const uint16_t *xb, int M, int K, const void *w, int wbf16, int n0, int n1,
                     float *y, int ldy) {
    const size_t es = wbf16 ? 2 : 4;
    const int use_dp = HAVE_DP && wbf16 && xb;
    int n = n0;
#if HAVE_DP
#define DP_CALL(MM) for (; n + ROWS_FOR(MM) <= n1; n += ROWS_FOR(MM)) \
        tile_dp(xb, K, (const uint16_t *)w + (size_t)n * K, ROWS_FOR(MM), MM, y + n, ldy); \
    for (; n < n1; n++) tile_dp(xb, K, (const uint16_t *)w + (size_t)n * K, 1, MM, y + n, ldy);
    if (use_dp) {
        TILE_CASES(DP_CALL)
        return;
    }
#endif
    (void)use_dp;
#define F32_CALL(MM) for (; n + ROWS_FOR(MM) <= n1; n += ROWS_FOR(MM)) \
        tile_f32(xf, K, (const char *)w + (size_t)n * K * es, wbf16, ROWS_FOR(MM), MM, y + n, ldy); \
    for (; n < n1; n++) tile_f32(xf, K, (const char *)w + (size_t)n * K * es, wbf16, 1, MM, y + n, ldy);
    if (wbf16) {
        TILE_CASES(F32_CALL)
    } else {
        TILE_CASES(F32_CALL)
    }
}

/* this thread's share [n0, n1) of N outputs, in multiples of 8 so tiles stay whole */
static inline void split(int N, int t, int T, int *n0, int *n1) {
    int chunks = (N + 7) / 8;
    *n0 = (int)((long)chunks * t / T) * 8;
    *n1 = (int)((long)chunks * (t + 1) / T) * 8;
    if (*n1 > N) *n1 = N;
    if (*n0 > N) *n0 = N;
}

static inline int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static inline int thread_count(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

static void to_bf16(const float *src, uint16_t *dst, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = f32_to_bf16(src[i]);
}

/* ------------------------------------------------------------------------ lmlab_linear */

/* x (M, K), w (N, K), b (N,) or NULL, y (M, N): contiguous, all float32 (bf16 = 0) or all
 * bfloat16 (bf16 = 1); M <= 8. Returns 0, or -1 when a size is out of range or memory ran out. */
int lmlab_linear(const void *x, int M, int K, const void *w, int N, const void *b, void *y, int bf16, int threads) {
    if (M < 1 || M > MAXM || K < 1 || N < 1) return -1;
    float *xf = NULL, *yf = malloc(sizeof(float) * (size_t)M * N);
    if (!yf) return -1;
    if (bf16) { /* fp32 x for the widening route; the dot-product route reads x as it is */
        xf = malloc(sizeof(float) * (size_t)M * K);
        if (!xf) { free(yf); return -1; }
        for (size_t i = 0; i < (size_t)M * K; i++) xf[i] = bf16_to_f32(((const uint16_t *)x)[i]);
    }
    if (threads < 1) threads = 1;
    if (threads > (N + 7) / 8) threads = (N + 7) / 8;
#pragma omp parallel num_threads(threads)
    {
        int n0, n1;
        split(N, thread_id(), thread_count(), &n0, &n1);
        mv_range(bf16 ? xf : x, bf16 ? x : NULL, M, K, w, bf16, n0, n1, yf, N);
        for (int m = 0; m < M; m++)
            for (int n = n0; n < n1; n++) {
                float v = yf[(size_t)m * N + n] + (b ? param(b, bf16, n) : 0.0f);
                if (bf16) ((uint16_t *)y)[(size_t)m * N + n] = f32_to_bf16(v);
                else ((float *)y)[(size_t)m * N + n] = v;
            }
    }
    free(xf);
    free(yf);
    return 0;
}

/* ------------------------------------------------------------------------ the decoding step */

/* out = norm(x) over n features, rounded where model.py rounds (Norm.forward). */
static void norm(const lmlab_model *m, const float *x, int n, const void *w, const void *b, int rms_only, float *out) {
    const int bf16 = (int)m->bf16;
    const float eps = (float)m->norm_eps;
    if (m->layernorm && !rms_only) {
        double s = 0, ss = 0;
        for (int i = 0; i < n; i++) s += x[i];
        const float mean = (float)(s / n);
        for (int i = 0; i < n; i++) ss += (double)(x[i] - mean) * (x[i] - mean);
        const float r = 1.0f / sqrtf((float)(ss / n) + eps);
        for (int i = 0; i < n; i++) out[i] = rnd((x[i] - mean) * r * param(w, bf16, i) + (b ? param(b, bf16, i) : 0.0f), bf16);
        return;
    }
    double ss = 0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    const float r = 1.0f / sqrtf((float)(ss / n) + eps);
    const float off = (float)m->norm_offset;
    for (int i = 0; i < n; i++) {
        if (off != 0.0f) out[i] = rnd(x[i] * r * (off + param(w, bf16, i)), bf16); /* gemma: (1 + w), in fp32 */
        else if (!bf16) out[i] = x[i] * r * param(w, 0, i);
        else out[i] = rnd(param(w, 1, i) * rnd(x[i] * r, 1), 1); /* w * normed(x), each a bf16 tensor */
    }
}

static inline float activation(int act, float x) {
    switch (act) {
    case 0: return x / (1.0f + expf(-x));                                  /* silu */
    case 1: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));     /* gelu (exact) */
    default: return 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x))); /* gelu_tanh */
    }
}

/* RoPE on the first R features of one head, in place (model.apply_rope): pair j is (x[j], x[j + R/2]);
 * sin carries the sign (its first half is -sin). */
static void rope(float *x, int R, const float *cos, const float *sin, int bf16) {
    const int h = R / 2;
    for (int j = 0; j < h; j++) {
        float a = x[j], b = x[j + h];
        x[j] = rnd(rnd(a * cos[j], bf16) + rnd(b * sin[j], bf16), bf16);
        x[j + h] = rnd(rnd(b * cos[j + h], bf16) + rnd(a * sin[j + h], bf16), bf16);
    }
}

/* Attention of the G query heads q (G, D) that share one k/v head, over slots [s0, s1) of that
 * head's cache: the part of softmax(q.k * scale) @ v these slots contribute, left unnormalised,
 * so parts over other slots can be merged (each thread takes a range of slots):
 * part[h] = (max score, sum of exp(score - max), sum of exp(score - max) * v (D floats)).
 * Each cached key and value is read once for all G heads. The newest slot, S - 1, comes from
 * klast, vlast (this step's own key and value, which another thread may be writing into the
 * cache at the same time). */
static void attend_part(const lmlab_model *m, const float *q, int G, const float *kc, const float *vc, const float *klast,
                        const float *vlast, int s0, int s1, int S, int D, float *scores, float *part) {
    const float scale = (float)m->attn_scale, cap = (float)m->attn_softcap;
    const int n = s1 - s0;
    for (int h = 0; h < G; h++) {
        part[h * (D + 2)] = -INFINITY;
        part[h * (D + 2) + 1] = 0;
        for (int d = 0; d < D; d++) part[h * (D + 2) + 2 + d] = 0;
    }
    if (n <= 0) return;
    for (int s = s0; s < s1; s++) {
        const float *k = s == S - 1 ? klast : kc + (size_t)s * D;
        for (int h = 0; h < G; h++) {
            const float *qh = q + (size_t)h * D;
            f32x16 acc = {0};
            int d = 0;
            for (; d + 16 <= D; d += 16) acc += load_f32(qh + d) * load_f32(k + d);
            float dot = hsum(acc);
            for (; d < D; d++) dot += qh[d] * k[d];
            float sc = dot * scale;
            if (cap > 0) sc = cap * tanhf(sc / cap);
            scores[(size_t)h * n + (s - s0)] = sc;
        }
    }
    for (int h = 0; h < G; h++) {
        float *sc = scores + (size_t)h * n, mx = -INFINITY, sum = 0;
        for (int i = 0; i < n; i++) mx = sc[i] > mx ? sc[i] : mx;
        int i = 0;
        f32x16 acc = {0};
        for (; i + 16 <= n; i += 16) {
            f32x16 e = exp16(load_f32(sc + i) - mx);
            memcpy(sc + i, &e, sizeof e);
            acc += e;
        }
        sum = hsum(acc);
        for (; i < n; i++) sum += (sc[i] = expf(sc[i] - mx));
        part[h * (D + 2)] = mx;
        part[h * (D + 2) + 1] = sum;
    }
    for (int s = s0; s < s1; s++) {
        const float *v = s == S - 1 ? vlast : vc + (size_t)s * D;
        for (int h = 0; h < G; h++) {
            const float p = scores[(size_t)h * n + (s - s0)];
            float *o = part + h * (D + 2) + 2;
            for (int d = 0; d < D; d++) o[d] += p * v[d];
        }
    }
}

/* y[:, n0:n1] = rnd(y + bias) for B rows of width ld */
static void bias_round(float *y, int B, int ld, int n0, int n1, const void *bias, int bf16) {
    for (int b = 0; b < B; b++)
        for (int n = n0; n < n1; n++) y[(size_t)b * ld + n] = rnd(y[(size_t)b * ld + n] + (bias ? param(bias, bf16, n) : 0.0f), bf16);
}

/* x @ W.T for B rows, this thread's share of the N outputs, bias added and rounded; B may exceed MAXM. */
static void matmul_share(const lmlab_model *m, const float *xf, const uint16_t *xb, int B, int K, const void *w,
                         const void *bias, int r0, int r1, float *y, int ld) {
    for (int b = 0; b < B; b += MAXM) {
        int M = B - b < MAXM ? B - b : MAXM;
        mv_range(xf + (size_t)b * K, xb ? xb + (size_t)b * K : NULL, M, K, w, (int)m->bf16, r0, r1, y + (size_t)b * ld, ld);
    }
    bias_round(y, B, ld, r0, r1, bias, (int)m->bf16);
}

/* One decoding step: x_in (B, C) embeddings of the new tokens (model dtype) -> logits (B, V)
 * (model dtype). Keys and values are written at slot `length` of the caches kc, vc
 * (L, B, K, max_len, D) float32; row b attends to slots [first_slot[b], length] (first_slot
 * NULL: from 0), narrowed to the block's window. cos/sin: (tables, B, rotary_dim) float32.
 * Returns 0, or -1 when memory ran out or a size is out of range. */
int lmlab_decode_step(const lmlab_model *m, int B, const void *x_in, float *kc, float *vc, int64_t max_len, int64_t length,
                      const int64_t *first_slot, const float *cos, const float *sin, void *logits, int threads) {
    const int C = (int)m->d_model, H = (int)m->n_heads, KH = (int)m->n_kv_heads, D = (int)m->head_dim;
    const int F = (int)m->d_ff, V = (int)m->vocab, R = (int)m->rotary_dim, L = (int)m->n_layers;
    const int NQKV = (H + 2 * KH) * D, NUP = (m->gated ? 2 : 1) * F, G = H / KH, S = (int)length + 1;
    const int bf16 = (int)m->bf16, dp = HAVE_DP && bf16;
    if (B < 1 || length < 0 || length >= max_len || H % KH || R > D || R % 2) return -1;
    if (threads < 1) threads = 1;

    /* shared: each thread writes its share of a matmul's outputs; everyone reads them after a barrier */
    const size_t n_parts = (size_t)B * H * threads * (D + 2); /* attention's per-range parts */
    const size_t n_shared = (size_t)B * (NQKV + H * D + C + NUP + F + C + V) + n_parts;
    float *shared = malloc(sizeof(float) * n_shared);
    /* private, per thread: the residual stream and the inputs of the next matmul */
    const int widest = C > H * D ? (C > F ? C : F) : (H * D > F ? H * D : F);
    const size_t n_private = (size_t)B * (3 * C + widest) + (size_t)G * max_len + (size_t)(G + 1) * D + (size_t)B * widest / 2 + 8;
    float *priv = malloc(sizeof(float) * n_private * threads);
    if (!shared || !priv) {
        free(shared);
        free(priv);
        return -1;
    }
    float *qkv = shared, *att = qkv + (size_t)B * NQKV, *o_out = att + (size_t)B * H * D, *up = o_out + (size_t)B * C;
    float *hact = up + (size_t)B * NUP, *d_out = hact + (size_t)B * F, *lg = d_out + (size_t)B * C, *parts = lg + (size_t)B * V;

#pragma omp parallel num_threads(threads)
    {
        const int t = thread_id(), T = thread_count();
        float *x = priv + n_private * t, *mid = x + (size_t)B * C, *xn = mid + (size_t)B * C;
        float *xin = xn + (size_t)B * C, *scores = xin + (size_t)B * widest, *qh = scores + (size_t)G * max_len, *kh = qh + (size_t)G * D;
        uint16_t *xb = dp ? (uint16_t *)(kh + D) : NULL; /* bf16 copy of a matmul's input */
        int r0, r1;

        for (size_t i = 0; i < (size_t)B * C; i++) x[i] = bf16 ? bf16_to_f32(((const uint16_t *)x_in)[i]) : ((const float *)x_in)[i];

        for (int l = 0; l < L; l++) {
            const lmlab_block *blk = &m->blocks[l];
            /* ---- attention: qkv = attn_norm(x) @ Wqkv.T */
            for (int b = 0; b < B; b++) norm(m, x + (size_t)b * C, C, blk->attn_norm_w, blk->attn_norm_b, 0, xn + (size_t)b * C);
            if (dp) to_bf16(xn, xb, (size_t)B * C);
            split(NQKV, t, T, &r0, &r1);
            matmul_share(m, xn, xb, B, C, blk->qkv_w, blk->qkv_b, r0, r1, qkv, NQKV);
#pragma omp barrier
            /* per (row, k/v head, range of slots), spread over the threads: the group's new key
             * (normed and rotated; cheap, so each thread makes its own copy) and its query heads,
             * then attention over the range. The first range's thread writes the new key and
             * value into the cache. Then the ranges' parts merge into each head's output. */
            for (int item = t; item < B * KH * T; item += T) {
                const int b = item / (KH * T), g = (item / T) % KH, part_i = item % T;
                const float *row = qkv + (size_t)b * NQKV, *vnew = row + (size_t)(H + KH + g) * D;
                const size_t base = ((((size_t)l * B + b) * KH + g) * max_len) * D;
                float *kcache = kc + base, *vcache = vc + base;
                const float *c = blk->rope_table >= 0 ? cos + ((size_t)blk->rope_table * B + b) * R : NULL;
                const float *s = blk->rope_table >= 0 ? sin + ((size_t)blk->rope_table * B + b) * R : NULL;
                memcpy(kh, row + (size_t)(H + g) * D, sizeof(float) * D);
                if (m->qk_norm) norm(m, kh, D, blk->k_norm_w, NULL, 1, kh);
                if (c) rope(kh, R, c, s, bf16);
                if (part_i == 0) {
                    memcpy(kcache + (size_t)length * D, kh, sizeof(float) * D);
                    memcpy(vcache + (size_t)length * D, vnew, sizeof(float) * D);
                }
                for (int j = 0; j < G; j++) {
                    float *qj = qh + (size_t)j * D;
                    memcpy(qj, row + (size_t)(g * G + j) * D, sizeof(float) * D);
                    if (m->qk_norm) norm(m, qj, D, blk->q_norm_w, NULL, 1, qj);
                    if (c) rope(qj, R, c, s, bf16);
                }
                int lo = first_slot ? (int)first_slot[b] : 0;
                if (blk->window > 0 && S - blk->window > lo) lo = S - (int)blk->window;
                const int s0 = lo + (int)((long)(S - lo) * part_i / T), s1 = lo + (int)((long)(S - lo) * (part_i + 1) / T);
                /* parts: (B, KH, T ranges, G heads, D + 2) */
                attend_part(m, qh, G, kcache, vcache, kh, vnew, s0, s1, S, D, scores,
                            parts + ((size_t)(b * KH + g) * T + part_i) * G * (D + 2));
            }
#pragma omp barrier
            for (int item = t; item < B * H; item += T) { /* merge: softmax over all ranges */
                const int b = item / H, h = item % H, g = h / G, j = h % G;
                const float *p0 = parts + ((size_t)(b * KH + g) * T) * G * (D + 2) + (size_t)j * (D + 2);
                float mx = -INFINITY, sum = 0, *out = att + ((size_t)b * H + h) * D;
                for (int pi = 0; pi < T; pi++) mx = p0[(size_t)pi * G * (D + 2)] > mx ? p0[(size_t)pi * G * (D + 2)] : mx;
                for (int d = 0; d < D; d++) out[d] = 0;
                for (int pi = 0; pi < T; pi++) {
                    const float *p = p0 + (size_t)pi * G * (D + 2);
                    if (p[1] == 0) continue; /* an empty range */
                    const float w = expf(p[0] - mx);
                    sum += w * p[1];
                    for (int d = 0; d < D; d++) out[d] += w * p[2 + d];
                }
                for (int d = 0; d < D; d++) out[d] = rnd(out[d] / sum, bf16);
            }
#pragma omp barrier
            /* ---- o projection */
            memcpy(xin, att, sizeof(float) * B * H * D);
            if (dp) to_bf16(xin, xb, (size_t)B * H * D);
            split(C, t, T, &r0, &r1);
            matmul_share(m, xin, xb, B, H * D, blk->o_w, blk->o_b, r0, r1, o_out, C);
#pragma omp barrier
            for (int b = 0; b < B; b++) {
                float *a = xn + (size_t)b * C; /* attn_out */
                memcpy(a, o_out + (size_t)b * C, sizeof(float) * C);
                if (m->sandwich) norm(m, a, C, blk->post_attn_norm_w, blk->post_attn_norm_b, 0, a);
                float *xb_ = x + (size_t)b * C, *mb = mid + (size_t)b * C;
                for (int i = 0; i < C; i++) mb[i] = rnd(xb_[i] + a[i], bf16);
                /* the MLP reads the block's input (parallel residual) or the residual after attention */
                norm(m, m->parallel_residual ? xb_ : mb, C, blk->mlp_norm_w, blk->mlp_norm_b, 0, xn + (size_t)b * C);
            }
            if (dp) to_bf16(xn, xb, (size_t)B * C);
            /* ---- MLP: this thread's features j in [r0, r1): gate and up rows, then the activation */
            split(F, t, T, &r0, &r1);
            matmul_share(m, xn, xb, B, C, blk->up_w, blk->up_b, r0, r1, up, NUP);
            if (m->gated) matmul_share(m, xn, xb, B, C, blk->up_w, blk->up_b, F + r0, F + r1, up, NUP);
            for (int b = 0; b < B; b++)
                for (int j = r0; j < r1; j++) {
                    const float *u = up + (size_t)b * NUP;
                    float a = rnd(activation((int)m->act, u[j]), bf16);
                    hact[(size_t)b * F + j] = m->gated ? rnd(a * u[F + j], bf16) : a;
                }
#pragma omp barrier
            memcpy(xin, hact, sizeof(float) * B * F);
            if (dp) to_bf16(xin, xb, (size_t)B * F);
            split(C, t, T, &r0, &r1);
            matmul_share(m, xin, xb, B, F, blk->down_w, blk->down_b, r0, r1, d_out, C);
#pragma omp barrier
            for (int b = 0; b < B; b++) {
                float *mm = xn + (size_t)b * C;
                memcpy(mm, d_out + (size_t)b * C, sizeof(float) * C);
                if (m->sandwich) norm(m, mm, C, blk->post_mlp_norm_w, blk->post_mlp_norm_b, 0, mm);
                float *xb_ = x + (size_t)b * C, *mb = mid + (size_t)b * C;
                for (int i = 0; i < C; i++) xb_[i] = rnd(mb[i] + mm[i], bf16);
            }
        }
        /* ---- final norm and the head */
        for (int b = 0; b < B; b++) norm(m, x + (size_t)b * C, C, m->final_norm_w, m->final_norm_b, 0, xn + (size_t)b * C);
        if (dp) to_bf16(xn, xb, (size_t)B * C);
        split(V, t, T, &r0, &r1);
        matmul_share(m, xn, xb, B, C, m->lm_head_w, NULL, r0, r1, lg, V);
        const float cap = (float)m->final_softcap;
        for (int b = 0; b < B; b++)
            for (int n = r0; n < r1; n++) {
                float v = lg[(size_t)b * V + n];
                if (cap > 0) v = rnd(cap * rnd(tanhf(rnd(v / cap, bf16)), bf16), bf16);
                if (bf16) ((uint16_t *)logits)[(size_t)b * V + n] = f32_to_bf16(v);
                else ((float *)logits)[(size_t)b * V + n] = v;
            }
    }
    free(shared);
    free(priv);
    return 0;
}

#else

int lmlab_openmp(void) { return 0; }
int lmlab_isa(void) { return 0; }

int lmlab_linear(const void *x, int M, int K, const void *w, int N, const void *b, void *y, int bf16, int threads) {
    (void)x; (void)M; (void)K; (void)w; (void)N; (void)b; (void)y; (void)bf16; (void)threads;
    return -1;
}

int lmlab_decode_step(const lmlab_model *m, int B, const void *x_in, float *kc, float *vc, int64_t max_len, int64_t length,
                      const int64_t *first_slot, const float *cos, const float *sin, void *logits, int threads) {
    (void)m; (void)B; (void)x_in; (void)kc; (void)vc; (void)max_len; (void)length; (void)first_slot;
    (void)cos; (void)sin; (void)logits; (void)threads;
    return -1;
}

#endif
