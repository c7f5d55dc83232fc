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
 *    defines what each operation means. It reads like Transformer.forward: attention_layer and
 *    mlp_layer per block, then lm_head, each with the model.py lines it transcribes in comments.
 *    One OpenMP parallel region covers the whole step: the threads split each matmul's output
 *    features and meet at a barrier after it; the small per-token operations (norms, residual
 *    adds) each thread repeats on its own copy of the residual stream, which costs less than
 *    another barrier. A bf16 model rounds to bf16 at the same points as model.py does with bf16
 *    tensors, so both paths give the same numbers up to the order of the sums.
 *    lmlab_decode_layers runs a range of layers of that step and hands the residual stream back,
 *    so that Python can call hooks on it between ranges (native.py: quantized models' resid hooks).
 *
 * Three structs, as in llama2.c's run.c: lmlab_model (the config and pointers to the weights,
 * filled by native.py), lmlab_state (every buffer a step works in, each with its shape; made
 * once per model by lmlab_state_new and grown only when a call needs more rows, threads or
 * cache slots than it was sized for) and lmlab_thread_state (one thread's own buffers).
 *
 * Shapes use model.py's letters: B rows (sequences), C d_model, H query heads, K k/v heads,
 * G = H / K query heads per k/v head, D head_dim, F d_ff, V vocab, L layers; and P, the slot
 * ranges attention splits each k/v head's cache into (one per thread).
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

#include "quant.h" /* quantized matrices: csrc/quant.c, built into the same library */

/* ------------------------------------------------------------------------ the model */

/* ModelConfig.act. native.py's ACT_CODES gives these codes to the same names; its load checks
 * that they agree through lmlab_act_code. */
typedef enum { LMLAB_ACT_SILU = 0, LMLAB_ACT_GELU = 1, LMLAB_ACT_GELU_TANH = 2 } lmlab_act;

static const char *const ACT_NAMES[] = {[LMLAB_ACT_SILU] = "silu", [LMLAB_ACT_GELU] = "gelu", [LMLAB_ACT_GELU_TANH] = "gelu_tanh"};
#define N_ACTS ((int)(sizeof ACT_NAMES / sizeof ACT_NAMES[0]))

int lmlab_act_code(const char *name) { /* the lmlab_act of a ModelConfig.act name, -1 for none */
    for (int i = 0; i < N_ACTS; i++)
        if (strcmp(name, ACT_NAMES[i]) == 0) return i;
    return -1;
}

typedef struct { /* one block's parameters, in the model's dtype; NULL where the config has none */
    const void *attn_norm_w, *attn_norm_b, *qkv_w, *qkv_b, *o_w, *o_b, *q_norm_w, *k_norm_w;
    const void *post_attn_norm_w, *post_attn_norm_b, *mlp_norm_w, *mlp_norm_b;
    const void *up_w, *up_b, *down_w, *down_b, *post_mlp_norm_w, *post_mlp_norm_b;
    int64_t rope_table; /* which cos/sin table this block uses; -1: no RoPE */
    int64_t window;     /* sliding window in tokens, 0: attends to every cached token */
    /* the same matrices kept quantized (lmlab.quant), read instead of qkv_w... where not NULL */
    const lmlab_qmat *qkv_q, *o_q, *up_q, *down_q;
} lmlab_block;

typedef struct { /* the ModelConfig fields a step needs (see lmlab/config.py) */
    int64_t n_layers, d_model, n_heads, n_kv_heads, head_dim, d_ff, vocab, rotary_dim;
    int64_t layernorm, sandwich, qk_norm, gated, act /* lmlab_act */, parallel_residual, bf16;
    double norm_eps, norm_offset, attn_scale, attn_softcap, final_softcap;
    const void *final_norm_w, *final_norm_b, *lm_head_w;
    const lmlab_block *blocks;
    const lmlab_qmat *lm_head_q; /* the head kept quantized, or NULL */
    int64_t quant;               /* 1 when any matrix is quantized: the threads get buffers for quantized inputs */
} lmlab_model;

/* ------------------------------------------------------------------------ the run state */

typedef struct { /* one thread's own buffers: what each thread repeats rather than wait at a barrier */
    float *x;              /* (B, C) the residual stream */
    float *resid_mid;      /* (B, C) the residual stream after attention: x + attn_out */
    float *xn;             /* (B, C) a matmul's normed input (attn_norm(x), ...); then a branch's output */
    uint16_t *dot_in;      /* (B, max(C, H * D, F)) a matmul's input in bf16, for the AVX512-BF16 dot product */
    float *q;              /* (G, D) one k/v head's query heads, normed and rotated */
    float *k;              /* (D,) that k/v head's new key, normed and rotated */
    float *scores;         /* (G, max_len) scores, then exp(score - max), over this thread's range of slots */
    lmlab_qx qx;           /* a matmul's input quantized to int8 per 32 (B rows of up to max(C, H * D, F)) */
} lmlab_thread_state;

typedef struct {
    const lmlab_model *model; /* the model the buffers are shaped for */
    int batch, threads;       /* rows and threads they are sized for */
    int64_t max_len;          /* and cache slots */
    /* shared: each thread writes its share of a matmul's outputs; every thread reads them after a barrier */
    float *qkv;      /* (B, (H + 2K) * D) q heads, k heads, v heads: attn_norm(x) @ Wqkv.T */
    float *att;      /* (B, H * D) attention output per head, softmax(q.k * scale) @ v, in the model dtype */
    float *attn_out; /* (B, C) att @ Wo.T */
    float *up;       /* (B, 2F) gate rows then up rows (gated MLP), or (B, F): mlp_norm(.) @ Wup.T */
    float *hidden;   /* (B, F) act(gate) * up, or act(up) */
    float *mlp_out;  /* (B, C) hidden @ Wdown.T */
    float *logits;   /* (B, V) final_norm(x) @ Wlm_head.T, before the softcap */
    /* attention over P slot ranges per k/v head, each range unnormalised, merged into att */
    float *part_max; /* (B, K, P, G) per query head: the largest score in the range */
    float *part_sum; /* (B, K, P, G) sum of exp(score - part_max) */
    float *part_out; /* (B, K, P, G, D) sum of exp(score - part_max) * v */
    lmlab_thread_state *per_thread; /* (threads,) */
} lmlab_state;

static void state_release(lmlab_state *s) { /* frees the buffers; the sizes go back to 0 */
    for (int t = 0; s->per_thread && t < s->threads; t++) {
        lmlab_thread_state *ts = &s->per_thread[t];
        free(ts->x); free(ts->resid_mid); free(ts->xn); free(ts->dot_in); free(ts->q); free(ts->k); free(ts->scores);
        free(ts->qx.x16); free(ts->qx.sx); free(ts->qx.xsum);
    }
    free(s->per_thread);
    free(s->qkv); free(s->att); free(s->attn_out); free(s->up); free(s->hidden); free(s->mlp_out); free(s->logits);
    free(s->part_max); free(s->part_sum); free(s->part_out);
    const lmlab_model *m = s->model;
    memset(s, 0, sizeof *s);
    s->model = m;
}

/* n zeroed elements of `size` bytes, on a 64-byte boundary (a cache line, an AVX-512 vector) */
static void *buffer(size_t n, size_t size, int *failed) {
    const size_t bytes = (n * size + 63) / 64 * 64;
    void *p = aligned_alloc(64, bytes ? bytes : 64);
    if (p) memset(p, 0, bytes);
    else *failed = 1;
    return p;
}

static float *floats(size_t n, int *failed) { return buffer(n, sizeof(float), failed); }

/* Sizes the buffers for B rows, `threads` threads and max_len cache slots; they only grow, so
 * calls that alternate between sizes do not allocate back and forth. Returns 0, or -1 when
 * memory ran out (the state is then empty, and the next call tries again). */
static int state_reserve(lmlab_state *s, int B, int threads, int64_t max_len) {
    if (B <= s->batch && threads <= s->threads && max_len <= s->max_len) return 0;
    if (B < s->batch) B = s->batch;
    if (threads < s->threads) threads = s->threads;
    if (max_len < s->max_len) max_len = s->max_len;
    state_release(s);
    const lmlab_model *m = s->model;
    const size_t C = m->d_model, H = m->n_heads, K = m->n_kv_heads, D = m->head_dim, F = m->d_ff, G = H / K;
    const size_t widest = C > H * D ? (C > F ? C : F) : (H * D > F ? H * D : F), P = threads;
    int failed = 0;
    s->qkv = floats(B * (H + 2 * K) * D, &failed);
    s->att = floats(B * H * D, &failed);
    s->attn_out = floats(B * C, &failed);
    s->up = floats(B * (m->gated ? 2 : 1) * F, &failed);
    s->hidden = floats(B * F, &failed);
    s->mlp_out = floats(B * C, &failed);
    s->logits = floats(B * (size_t)m->vocab, &failed);
    s->part_max = floats(B * K * P * G, &failed);
    s->part_sum = floats(B * K * P * G, &failed);
    s->part_out = floats(B * K * P * G * D, &failed);
    s->per_thread = calloc(threads, sizeof(lmlab_thread_state));
    s->threads = threads; /* state_release walks per_thread up to here */
    failed |= !s->per_thread;
    for (int t = 0; s->per_thread && t < threads; t++) {
        lmlab_thread_state *ts = &s->per_thread[t];
        ts->x = floats(B * C, &failed);
        ts->resid_mid = floats(B * C, &failed);
        ts->xn = floats(B * C, &failed);
        if (m->bf16) ts->dot_in = buffer(B * widest, sizeof(uint16_t), &failed);
        ts->q = floats(G * D, &failed);
        ts->k = floats(D, &failed);
        ts->scores = floats(G * (size_t)max_len, &failed);
        if (m->quant) {
            ts->qx.x16 = buffer(B * widest, sizeof(int16_t), &failed);
            ts->qx.sx = floats(B * widest / 32 + 1, &failed);
            ts->qx.xsum = floats(B * widest / 32 + 1, &failed);
        }
    }
    if (failed) {
        state_release(s);
        return -1;
    }
    s->batch = B;
    s->max_len = max_len;
    return 0;
}

/* A step's buffers for this model, empty until its first step (native.py's DecodePlan owns it). */
lmlab_state *lmlab_state_new(const lmlab_model *m) {
    lmlab_state *s = calloc(1, sizeof *s);
    if (s) s->model = m;
    return s;
}

void lmlab_state_free(lmlab_state *s) {
    if (!s) return;
    state_release(s);
    free(s);
}

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

/* A vector loaded once and read by several FMAs stays in its register. Left alone, GCC folds the
 * load into every FMA that reads it (a memory operand each): a 4 x 4 attention tile then issues 16
 * vector loads per 16 FMAs, which an AMD Zen 4, with two 256-bit load ports, cannot feed. */
#if defined(__AVX512F__)
#define IN_REGISTER(v) __asm__("" : "+v"(v))
#else
#define IN_REGISTER(v) ((void)0)
#endif

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

#if defined(__AVX512F__)
#include <immintrin.h>
static inline float hmax(f32x16 v) {
    __m512 m;
    memcpy(&m, &v, sizeof m);
    return _mm512_reduce_max_ps(m);
}
#else
static inline float hmax(f32x16 v) {
    float m = v[0];
    for (int l = 1; l < 16; l++) m = fmaxf(m, v[l]);
    return m;
}
#endif

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
 * W is (N, K) row-major, float32 or bf16 (wbf16). x is float32, and x_bf16 the same rows in bf16
 * or NULL: with bf16 weights, the AVX512-BF16 dot product reads x_bf16 where the CPU has it. */
static void mv_range(const float *x, const uint16_t *x_bf16, int M, int K, const void *w, int wbf16, int n0, int n1,
                     float *y, int ldy) {
    const size_t es = wbf16 ? 2 : 4;
    const int use_dp = HAVE_DP && wbf16 && x_bf16;
    int n = n0;
#if HAVE_DP
#define DP_CALL(MM) for (; n + ROWS_FOR(MM) <= n1; n += ROWS_FOR(MM)) \
        tile_dp(x_bf16, K, (const uint16_t *)w + (size_t)n * K, ROWS_FOR(MM), MM, y + n, ldy); \
    for (; n < n1; n++) tile_dp(x_bf16, K, (const uint16_t *)w + (size_t)n * K, 1, MM, y + n, ldy);
    if (use_dp) {
        TILE_CASES(DP_CALL)
        return;
    }
#endif
    (void)use_dp;
#define F32_CALL(MM) for (; n + ROWS_FOR(MM) <= n1; n += ROWS_FOR(MM)) \
        tile_f32(x, K, (const char *)w + (size_t)n * K * es, wbf16, ROWS_FOR(MM), MM, y + n, ldy); \
    for (; n < n1; n++) tile_f32(x, K, (const char *)w + (size_t)n * K * es, wbf16, 1, MM, y + n, ldy);
    /* Two identical arms on purpose: tile_f32 is inlined into each, where wbf16 is a constant,
     * so neither copy of its inner loop tests wbf16 per load. */
    if (wbf16) {
        TILE_CASES(F32_CALL)
    } else {
        TILE_CASES(F32_CALL)
    }
}

/* this thread's share [n0, n1) of N outputs, in multiples of 16 so tiles (and a tiled quantized
 * part's blocks of 16 rows) stay whole */
static inline void split(int N, int t, int T, int *n0, int *n1) {
    int chunks = (N + 15) / 16;
    *n0 = (int)((long)chunks * t / T) * 16;
    *n1 = (int)((long)chunks * (t + 1) / T) * 16;
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

/* ------------------------------------------------------------------------ the step's operations */

typedef struct { /* what one call decodes: B new tokens, one per row, against the KV cache */
    int B;
    float *k_cache, *v_cache;  /* (L, B, K, max_len, D) float32 */
    int64_t max_len, length;   /* slots per row; this step's slot (every row's new key goes there) */
    const int64_t *first_slot; /* (B,) the first slot each row attends to (after its left padding), or NULL: 0 */
    const float *cos, *sin;    /* (tables, B, rotary_dim) float32, or NULL without RoPE */
} step_args;

/* out = norm(x) over n features, rounded where model.py rounds (Norm.forward). rms_only: the
 * q/k norms, RMSNorm even in a LayerNorm model. out may be x. */
static void norm(const lmlab_model *m, const float *x, int n, const void *w, const void *b, int rms_only, float *out) {
    const int bf16 = (int)m->bf16;
    const float eps = (float)m->norm_eps;
    if (m->layernorm && !rms_only) { /* F.layer_norm(x, (n,), w, b, eps) */
        double s = 0, ss = 0;
        for (int i = 0; i < n; i++) s += x[i];
        const float mean = (float)(s / n);
        for (int i = 0; i < n; i++) ss += (double)(x[i] - mean) * (x[i] - mean);
        const float r = 1.0f / sqrtf((float)(ss / n) + eps);
        for (int i = 0; i < n; i++) out[i] = rnd((x[i] - mean) * r * param(w, bf16, i) + (b ? param(b, bf16, i) : 0.0f), bf16);
        return;
    }
    double ss = 0; /* x * rsqrt(mean(x^2) + eps) */
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    const float r = 1.0f / sqrtf((float)(ss / n) + eps);
    const float off = (float)m->norm_offset;
    for (int i = 0; i < n; i++) {
        if (off != 0.0f) out[i] = rnd(x[i] * r * (off + param(w, bf16, i)), bf16); /* gemma: (1 + w), in fp32 */
        else if (!bf16) out[i] = x[i] * r * param(w, 0, i);
        else out[i] = rnd(param(w, 1, i) * rnd(x[i] * r, 1), 1); /* w * normed(x), each a bf16 tensor */
    }
}

/* norm over each of B rows of C features */
static void norm_rows(const lmlab_model *m, const float *x, int B, const void *w, const void *b, float *out) {
    const int C = (int)m->d_model;
    for (int row = 0; row < B; row++) norm(m, x + (size_t)row * C, C, w, b, 0, out + (size_t)row * C);
}

/* out = x + branch, in the model dtype: the residual add (mid = x + a; out = mid + m). out may be x. */
static void residual_add(const float *x, const float *branch, float *out, size_t n, int bf16) {
    for (size_t i = 0; i < n; i++) out[i] = rnd(x[i] + branch[i], bf16);
}

static inline float activation(int act, float x) {
    switch (act) {
    case LMLAB_ACT_SILU: return x / (1.0f + expf(-x));                                    /* F.silu */
    case LMLAB_ACT_GELU: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));       /* F.gelu */
    default: /* LMLAB_ACT_GELU_TANH (lmlab_decode_step takes no other code): F.gelu(x, approximate="tanh") */
        return 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
    }
}

/* RoPE on the first R features of one head, in place (model.apply_rope): pair j is (x[j], x[j + R/2]);
 * sin carries the sign (its first half is -sin). out = x * cos + swapped(x) * sin. */
static void rope(float *x, int R, const float *cos, const float *sin, int bf16) {
    const int h = R / 2;
    for (int j = 0; j < h; j++) {
        float a = x[j], b = x[j + h];
        x[j] = rnd(rnd(a * cos[j], bf16) + rnd(b * sin[j], bf16), bf16);
        x[j + h] = rnd(rnd(b * cos[j + h], bf16) + rnd(a * sin[j + h], bf16), bf16);
    }
}

/* The input of a matmul in bf16, where the AVX512-BF16 dot product will read it (a bf16 model on
 * a CPU that has it), else NULL: mv_range then widens the weights and reads x in fp32. */
static const uint16_t *dot_input(const lmlab_model *m, lmlab_thread_state *ts, const float *x, size_t n) {
    if (!(HAVE_DP && m->bf16)) return NULL;
    to_bf16(x, ts->dot_in, n);
    return ts->dot_in;
}

/* y[:, n0:n1] = rnd(x @ W[n0:n1].T + bias[n0:n1]) for B rows of x (K wide; x_bf16 from
 * dot_input): this thread's share of a matmul's outputs. B may exceed MAXM. */
static void matmul_share(const lmlab_model *m, lmlab_thread_state *ts, const float *x, const uint16_t *x_bf16, int B,
                         int K, const void *w, const lmlab_qmat *wq, const void *bias, int n0, int n1, float *y, int ld) {
    const int bf16 = (int)m->bf16;
    if (wq) { /* quantized W: x to int8 per 32 on this thread's own copy, then integer dot products */
        lmlab_q_quantize_x(x, B, K, &ts->qx);
        if (n0 < n1) lmlab_q_matmul_range(wq, &ts->qx, n0, n1, y, ld);
        for (int row = 0; row < B; row++)
            for (int n = n0; n < n1; n++) y[(size_t)row * ld + n] += bias ? param(bias, 0, n) : 0.0f;
        return;
    }
    for (int row = 0; row < B; row += MAXM) { /* passes of up to MAXM rows over this share of W */
        const int rows = B - row < MAXM ? B - row : MAXM;
        mv_range(x + (size_t)row * K, x_bf16 ? x_bf16 + (size_t)row * K : NULL, rows, K, w, bf16, n0, n1, y + (size_t)row * ld, ld);
    }
    for (int row = 0; row < B; row++)
        for (int n = n0; n < n1; n++) y[(size_t)row * ld + n] = rnd(y[(size_t)row * ld + n] + (bias ? param(bias, bf16, n) : 0.0f), bf16);
}

/* The part of softmax(q.k * scale) @ v that slots [s0, s1) of one k/v head's cache contribute
 * to each of the G query heads q (G, D) that share that k/v head, left unnormalised so parts
 * over other slots can be merged: per head, the largest score (*max), the sum of
 * exp(score - max) (*sum) and the sum of exp(score - max) * v (out, D floats).
 * Each cached key and value is read once for all G heads. The newest slot, S - 1, comes from
 * k_new, v_new (this step's own key and value, which another thread may be writing into the
 * cache at the same time). */
static void attend_slots(const lmlab_model *m, const float *q, int G, const float *k_cache, const float *v_cache,
                         const float *k_new, const float *v_new, int s0, int s1, int S, int D, float *scores,
                         float *part_max, float *part_sum, float *part_out) {
    const float scale = (float)m->attn_scale, cap = (float)m->attn_softcap;
    const int n = s1 - s0;
    for (int h = 0; h < G; h++) {
        part_max[h] = -INFINITY;
        part_sum[h] = 0;
        for (int d = 0; d < D; d++) part_out[(size_t)h * D + d] = 0;
    }
    if (n <= 0) return;
    for (int s = s0; s < s1; s++) { /* scores = q @ k.T * scale, softcapped (gemma2) */
        const float *k = s == S - 1 ? k_new : k_cache + (size_t)s * D;
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
    for (int h = 0; h < G; h++) { /* scores = exp(scores - max) */
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
        part_max[h] = mx;
        part_sum[h] = sum;
    }
    for (int s = s0; s < s1; s++) { /* out = scores @ v */
        const float *v = s == S - 1 ? v_new : v_cache + (size_t)s * D;
        for (int h = 0; h < G; h++) {
            const float p = scores[(size_t)h * n + (s - s0)];
            float *o = part_out + (size_t)h * D;
            for (int d = 0; d < D; d++) o[d] += p * v[d];
        }
    }
}

/* One work item of attention: row b's k/v head g, over the p-th of P ranges of the slots it
 * attends to. The new key (normed and rotated) and the G query heads are cheap, so each thread
 * makes its own copy; the first range's thread writes the new key and value into the cache. */
static void attend_range(const lmlab_model *m, lmlab_state *s, lmlab_thread_state *ts, const step_args *a, int l, int b,
                         int g, int p, int P) {
    const lmlab_block *blk = &m->blocks[l];
    const int H = (int)m->n_heads, K = (int)m->n_kv_heads, D = (int)m->head_dim, G = H / K, R = (int)m->rotary_dim;
    const int bf16 = (int)m->bf16, S = (int)a->length + 1;
    const float *qkv = s->qkv + (size_t)b * (H + 2 * K) * D, *v_new = qkv + (size_t)(H + K + g) * D;
    const size_t cache_at = ((((size_t)l * a->B + b) * K + g) * a->max_len) * D; /* k_cache[l, b, g] */
    float *k_cache = a->k_cache + cache_at, *v_cache = a->v_cache + cache_at;
    const float *cos = NULL, *sin = NULL;
    if (blk->rope_table >= 0) {
        cos = a->cos + ((size_t)blk->rope_table * a->B + b) * R;
        sin = a->sin + ((size_t)blk->rope_table * a->B + b) * R;
    }
    /* k = apply_rope(k_norm(k)); cache.update(layer, k, v) */
    memcpy(ts->k, qkv + (size_t)(H + g) * D, sizeof(float) * D);
    if (m->qk_norm) norm(m, ts->k, D, blk->k_norm_w, NULL, 1, ts->k);
    if (cos) rope(ts->k, R, cos, sin, bf16);
    if (p == 0) {
        memcpy(k_cache + (size_t)a->length * D, ts->k, sizeof(float) * D);
        memcpy(v_cache + (size_t)a->length * D, v_new, sizeof(float) * D);
    }
    /* q = apply_rope(q_norm(q)) for the query heads g * G .. g * G + G - 1 */
    for (int j = 0; j < G; j++) {
        float *q = ts->q + (size_t)j * D;
        memcpy(q, qkv + (size_t)(g * G + j) * D, sizeof(float) * D);
        if (m->qk_norm) norm(m, q, D, blk->q_norm_w, NULL, 1, q);
        if (cos) rope(q, R, cos, sin, bf16);
    }
    /* the slots row b attends to: after its left padding, within the block's window (model._masks) */
    int first = a->first_slot ? (int)a->first_slot[b] : 0;
    if (blk->window > 0 && S - blk->window > first) first = S - (int)blk->window;
    const int s0 = first + (int)((long)(S - first) * p / P), s1 = first + (int)((long)(S - first) * (p + 1) / P);
    const size_t part = ((size_t)b * K + g) * P + p; /* part_*[b, g, p] */
    attend_slots(m, ts->q, G, k_cache, v_cache, ts->k, v_new, s0, s1, S, D, ts->scores, s->part_max + part * G,
                 s->part_sum + part * G, s->part_out + part * G * D);
}

/* att[b, h] = the softmax over all P ranges of row b's query head h: each range's part weighted
 * by exp(its max - the overall max). */
static void merge_ranges(const lmlab_model *m, lmlab_state *s, int b, int h, int P) {
    const int H = (int)m->n_heads, K = (int)m->n_kv_heads, D = (int)m->head_dim, G = H / K, g = h / G, j = h % G;
    const size_t first_part = ((size_t)b * K + g) * P; /* part_*[b, g, 0] */
    const float *part_max = s->part_max + first_part * G + j, *part_sum = s->part_sum + first_part * G + j;
    const float *part_out = s->part_out + first_part * G * D + (size_t)j * D;
    float mx = -INFINITY, sum = 0, *out = s->att + ((size_t)b * H + h) * D;
    for (int p = 0; p < P; p++) mx = part_max[(size_t)p * G] > mx ? part_max[(size_t)p * G] : mx;
    for (int d = 0; d < D; d++) out[d] = 0;
    for (int p = 0; p < P; p++) {
        if (part_sum[(size_t)p * G] == 0) continue; /* an empty range */
        const float w = expf(part_max[(size_t)p * G] - mx);
        sum += w * part_sum[(size_t)p * G];
        for (int d = 0; d < D; d++) out[d] += w * part_out[(size_t)p * G * D + d];
    }
    for (int d = 0; d < D; d++) out[d] = rnd(out[d] / sum, (int)m->bf16);
}

/* ------------------------------------------------------------------------ the step, layer by layer */

/* Block.forward's first half: resid_mid = x + attn_out, where
 *   attn_out = post_attn_norm(o(attention(attn_norm(x))))    (post_attn_norm: sandwich norm only)
 * and this step's key and value go into slot `length` of layer l's cache. */
static void attention_layer(const lmlab_model *m, lmlab_state *s, lmlab_thread_state *ts, const step_args *a, int l) {
    const lmlab_block *blk = &m->blocks[l];
    const int B = a->B, C = (int)m->d_model, H = (int)m->n_heads, K = (int)m->n_kv_heads, D = (int)m->head_dim;
    const int NQKV = (H + 2 * K) * D, t = thread_id(), T = thread_count();
    int n0, n1;

    /* qkv = self.qkv(attn_norm(x))    (B, (H + 2K) * D) */
    norm_rows(m, ts->x, B, blk->attn_norm_w, blk->attn_norm_b, ts->xn);
    split(NQKV, t, T, &n0, &n1);
    matmul_share(m, ts, ts->xn, dot_input(m, ts, ts->xn, (size_t)B * C), B, C, blk->qkv_w, blk->qkv_q, blk->qkv_b, n0, n1, s->qkv, NQKV);
#pragma omp barrier
    /* att = softmax(q @ k.T * scale) @ v    (B, H * D): one work item per (row, k/v head, range
     * of slots), P = T ranges, spread over the threads; then the ranges merge into each head */
    for (int item = t; item < B * K * T; item += T) attend_range(m, s, ts, a, l, item / (K * T), (item / T) % K, item % T, T);
#pragma omp barrier
    for (int item = t; item < B * H; item += T) merge_ranges(m, s, item / H, item % H, T);
#pragma omp barrier
    /* attn_out = self.o(att)    (B, C) */
    split(C, t, T, &n0, &n1);
    matmul_share(m, ts, s->att, dot_input(m, ts, s->att, (size_t)B * H * D), B, H * D, blk->o_w, blk->o_q, blk->o_b, n0, n1, s->attn_out, C);
#pragma omp barrier
    /* every thread: resid_mid = x + post_attn_norm(attn_out), on its own copy */
    for (int b = 0; b < B; b++) {
        float *attn_out = ts->xn + (size_t)b * C;
        memcpy(attn_out, s->attn_out + (size_t)b * C, sizeof(float) * C);
        if (m->sandwich) norm(m, attn_out, C, blk->post_attn_norm_w, blk->post_attn_norm_b, 0, attn_out);
        residual_add(ts->x + (size_t)b * C, attn_out, ts->resid_mid + (size_t)b * C, C, (int)m->bf16);
    }
}

/* Block.forward's second half: x = resid_mid + post_mlp_norm(mlp(mlp_norm(h))), where h is the
 * block's input x (parallel residual, pythia) or resid_mid; post_mlp_norm: sandwich norm only. */
static void mlp_layer(const lmlab_model *m, lmlab_state *s, lmlab_thread_state *ts, const step_args *a, int l) {
    const lmlab_block *blk = &m->blocks[l];
    const int B = a->B, C = (int)m->d_model, F = (int)m->d_ff, NUP = (m->gated ? 2 : 1) * F, bf16 = (int)m->bf16;
    const int t = thread_id(), T = thread_count();
    int n0, n1;

    norm_rows(m, m->parallel_residual ? ts->x : ts->resid_mid, B, blk->mlp_norm_w, blk->mlp_norm_b, ts->xn);
    const uint16_t *xn_bf16 = dot_input(m, ts, ts->xn, (size_t)B * C);
    /* h = self.up(xn): this thread's gate rows [n0, n1) and, gated, their up rows [F + n0, F + n1),
     * so it can apply the activation to its own features without waiting for the others */
    split(F, t, T, &n0, &n1);
    matmul_share(m, ts, ts->xn, xn_bf16, B, C, blk->up_w, blk->up_q, blk->up_b, n0, n1, s->up, NUP);
    if (m->gated) matmul_share(m, ts, ts->xn, xn_bf16, B, C, blk->up_w, blk->up_q, blk->up_b, F + n0, F + n1, s->up, NUP);
    /* hidden = act(gate) * up, or act(h)    (B, F) */
    for (int b = 0; b < B; b++)
        for (int j = n0; j < n1; j++) {
            const float *up = s->up + (size_t)b * NUP;
            const float act = rnd(activation((int)m->act, up[j]), bf16);
            s->hidden[(size_t)b * F + j] = m->gated ? rnd(act * up[F + j], bf16) : act;
        }
#pragma omp barrier
    /* mlp_out = self.down(hidden)    (B, C) */
    split(C, t, T, &n0, &n1);
    matmul_share(m, ts, s->hidden, dot_input(m, ts, s->hidden, (size_t)B * F), B, F, blk->down_w, blk->down_q, blk->down_b, n0, n1, s->mlp_out, C);
#pragma omp barrier
    /* every thread: x = resid_mid + post_mlp_norm(mlp_out), on its own copy */
    for (int b = 0; b < B; b++) {
        float *mlp_out = ts->xn + (size_t)b * C;
        memcpy(mlp_out, s->mlp_out + (size_t)b * C, sizeof(float) * C);
        if (m->sandwich) norm(m, mlp_out, C, blk->post_mlp_norm_w, blk->post_mlp_norm_b, 0, mlp_out);
        residual_add(ts->resid_mid + (size_t)b * C, mlp_out, ts->x + (size_t)b * C, C, bf16);
    }
}

/* Transformer.head: logits = lm_head(final_norm(x)), softcapped (gemma2): cap * tanh(logits / cap);
 * this thread's share of the V outputs, written to `out` (B, V) in the model dtype. */
static void lm_head(const lmlab_model *m, lmlab_state *s, lmlab_thread_state *ts, const step_args *a, void *out) {
    const int B = a->B, C = (int)m->d_model, V = (int)m->vocab, bf16 = (int)m->bf16;
    const float cap = (float)m->final_softcap;
    int n0, n1;
    norm_rows(m, ts->x, B, m->final_norm_w, m->final_norm_b, ts->xn);
    split(V, thread_id(), thread_count(), &n0, &n1);
    matmul_share(m, ts, ts->xn, dot_input(m, ts, ts->xn, (size_t)B * C), B, C, m->lm_head_w, m->lm_head_q, NULL, n0, n1, s->logits, V);
    for (int b = 0; b < B; b++)
        for (int n = n0; n < n1; n++) {
            float v = s->logits[(size_t)b * V + n];
            if (cap > 0) v = rnd(cap * rnd(tanhf(rnd(v / cap, bf16)), bf16), bf16);
            if (bf16) ((uint16_t *)out)[(size_t)b * V + n] = f32_to_bf16(v);
            else ((float *)out)[(size_t)b * V + n] = v;
        }
}

/* Layers [l0, l1) of one decoding step, Transformer.forward for one new token per row. x_in: the
 * residual stream (B, C) entering layer l0 in the model dtype (at l0 = 0, Transformer.embed's
 * output). Then either x_out (B, C) float32 receives the residual stream leaving layer l1 - 1
 * (Python calls hooks on it there and passes it back as x_in of the next range), or, with x_out
 * NULL and l1 = L, logits (B, V) (model dtype) receives the head's output. Keys and values are
 * written at slot `length` of the caches k_cache, v_cache (L, B, K, max_len, D) float32; row b
 * attends to slots [first_slot[b], length] (first_slot NULL: from 0), narrowed to the block's
 * window. cos/sin: (tables, B, rotary_dim) float32. s: the state lmlab_state_new made for m.
 * Returns 0, or -1 when memory ran out or a size is out of range. */
int lmlab_decode_layers(const lmlab_model *m, lmlab_state *s, int B, const void *x_in, float *k_cache, float *v_cache,
                        int64_t max_len, int64_t length, const int64_t *first_slot, const float *cos, const float *sin,
                        int l0, int l1, float *x_out, void *logits, int threads) {
    if (B < 1 || length < 0 || length >= max_len || m->n_heads % m->n_kv_heads || m->rotary_dim > m->head_dim ||
        m->rotary_dim % 2 || m->act < 0 || m->act >= N_ACTS || l0 < 0 || l1 < l0 || l1 > m->n_layers ||
        (!x_out && (l1 != m->n_layers || !logits)))
        return -1;
    if (threads < 1) threads = 1;
    if (!s || s->model != m || state_reserve(s, B, threads, max_len)) return -1;
    const step_args a = {B, k_cache, v_cache, max_len, length, first_slot, cos, sin};

#pragma omp parallel num_threads(threads)
    {
        lmlab_thread_state *ts = &s->per_thread[thread_id()];
        for (size_t i = 0; i < (size_t)B * m->d_model; i++) /* x = embed(input_ids) or the stream so far, in fp32 */
            ts->x[i] = m->bf16 ? bf16_to_f32(((const uint16_t *)x_in)[i]) : ((const float *)x_in)[i];
        for (int l = l0; l < l1; l++) {
            attention_layer(m, s, ts, &a, l); /* resid_mid = x + attn_out */
            mlp_layer(m, s, ts, &a, l);       /* x = resid_mid + mlp_out */
        }
        if (x_out) { /* every thread holds the same stream: the first one hands it back */
            if (thread_id() == 0) memcpy(x_out, ts->x, sizeof(float) * (size_t)B * m->d_model);
        } else {
            lm_head(m, s, ts, &a, logits);
        }
    }
    return 0;
}

/* One whole decoding step: lmlab_decode_layers over every layer, then the head. embeddings: (B, C)
 * of the new tokens (model dtype, Transformer.embed's output) -> logits (B, V) (model dtype). */
int lmlab_decode_step(const lmlab_model *m, lmlab_state *s, int B, const void *embeddings, float *k_cache, float *v_cache,
                      int64_t max_len, int64_t length, const int64_t *first_slot, const float *cos, const float *sin,
                      void *logits, int threads) {
    return lmlab_decode_layers(m, s, B, embeddings, k_cache, v_cache, max_len, length, first_slot, cos, sin, 0,
                               (int)m->n_layers, NULL, logits, threads);
}

/* ------------------------------------------------------------------------ training's elementwise steps
 *
 * The forward and backward of three steps that autograd would otherwise take several passes over
 * memory for, each pass a kernel of its own: RMSNorm, the MLP's activation (a GLU's act(gate) * up,
 * or act alone), and RoPE on the q and k heads of a qkv projection, whose backward also gathers the
 * q, k and v gradients into the projection's layout (autograd would rotate, then concatenate). Each
 * is one pass over its rows. lmlab/fused.py holds the autograd Functions that call them, and
 * model.py's PyTorch lines are their reference (tests compare both, values and gradients). */

static inline void store_f32(float *p, f32x16 v) { memcpy(p, &v, sizeof v); }

/* act(x) and act'(x) for 16 floats: SiLU x * sigmoid(x), or GELU's tanh form
 * 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2 / pi) (x + 0.044715 x^3). */
static inline void act16(int act, f32x16 x, f32x16 *y, f32x16 *dy) {
    if (act == LMLAB_ACT_SILU) {
        const f32x16 s = 1.0f / (1.0f + exp16(-x));
        *y = x * s;
        if (dy) *dy = s * (1.0f + x * (1.0f - s));
        return;
    }
    /* 0.5 (1 + tanh(u)) = sigmoid(2u): the same exp and division as SiLU's */
    const f32x16 x2 = x * x, u2 = x * (1.5957691216057308f + 0.0713548162726f * x2); /* 2u */
    const f32x16 s = 1.0f / (1.0f + exp16(-u2));
    *y = x * s;
    if (dy) *dy = s + x * s * (1.0f - s) * (1.5957691216057308f + 0.2140644488178f * x2); /* s + x s (1 - s) d(2u)/dx */
}

static inline void act1(int act, float x, float *y, float *dy) { /* the same for one float (tails) */
    f32x16 v = {0}, a, d;
    v[0] = x;
    act16(act, v, &a, dy ? &d : NULL);
    *y = a[0];
    if (dy) *dy = d[0];
}

/* A gradient summed over rows (a bias's, a norm's weight's): each thread adds its rows into its own
 * n floats of part (zeroed here), then finish_parts adds the threads' sums in thread order into out,
 * so the result does not depend on which thread finished first. */
static float *thread_parts(int threads, int64_t n) { return calloc((size_t)threads * (size_t)n, sizeof(float)); }

static void finish_parts(float *part, int threads, int64_t n, float *out) {
    for (int64_t j = 0; j < n; j++) {
        float sum = 0.0f;
        for (int t = 0; t < threads; t++) sum += part[(size_t)t * (size_t)n + j];
        out[j] = sum;
    }
    free(part);
}

static inline f32x16 load_bias(const float *bias, int64_t i) { return bias ? load_f32(bias + i) : (f32x16){0}; }

/* The MLP's activation over rows of F features. glu: h (rows, 2F) is [gate | up] and
 * out = act(gate) * up; else h (rows, F) and out = act(h). out (rows, F). bias: NULL, or the up
 * projection's bias (h's row length), added to each row of h first (the projection then runs
 * without one, and no pass writes the bias into its output). */
int lmlab_act_forward(const float *h, const float *bias, int64_t rows, int64_t F, int glu, int act, float *out,
                      int threads) {
    if (rows < 0 || F < 1 || (act != LMLAB_ACT_SILU && act != LMLAB_ACT_GELU_TANH)) return -1;
    const int64_t in_row = glu ? 2 * F : F;
#pragma omp parallel for schedule(static) num_threads(threads < 1 ? 1 : threads)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = h + r * in_row, *u = g + F;
        float *o = out + r * F;
        int64_t i = 0;
        for (; i + 16 <= F; i += 16) {
            f32x16 y;
            act16(act, load_f32(g + i) + load_bias(bias, i), &y, NULL);
            store_f32(o + i, glu ? y * (load_f32(u + i) + load_bias(bias, F + i)) : y);
        }
        for (; i < F; i++) {
            float y;
            act1(act, g[i] + (bias ? bias[i] : 0.0f), &y, NULL);
            o[i] = glu ? y * (u[i] + (bias ? bias[F + i] : 0.0f)) : y;
        }
    }
    return 0;
}

/* Its gradient: go (rows, F), the gradient of out -> dh, the gradient of h (h's shape), and with
 * bias, dbias = the sum of dh's rows (each thread sums its rows, then the threads' sums are
 * added in order). glu: d gate = go * up * act'(gate), d up = go * act(gate); else dh = go * act'(h). */
int lmlab_act_backward(const float *h, const float *bias, const float *go, int64_t rows, int64_t F, int glu, int act,
                       float *dh, float *dbias, int threads) {
    if (rows < 0 || F < 1 || (act != LMLAB_ACT_SILU && act != LMLAB_ACT_GELU_TANH) || (bias && !dbias)) return -1;
    if (threads < 1) threads = 1;
    const int64_t in_row = glu ? 2 * F : F;
    float *part = NULL;
    if (bias && !(part = thread_parts(threads, in_row))) return -1;
#pragma omp parallel num_threads(threads)
    {
        float *mine = part ? part + (size_t)thread_id() * (size_t)in_row : NULL;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const float *g = h + r * in_row, *u = g + F, *gr = go + r * F;
            float *dg = dh + r * in_row, *du = dg + F;
            int64_t i = 0;
            for (; i + 16 <= F; i += 16) {
                f32x16 y, d, o = load_f32(gr + i);
                act16(act, load_f32(g + i) + load_bias(bias, i), &y, &d);
                if (glu) {
                    const f32x16 dgv = o * (load_f32(u + i) + load_bias(bias, F + i)) * d, duv = o * y;
                    store_f32(dg + i, dgv);
                    store_f32(du + i, duv);
                    if (mine) {
                        store_f32(mine + i, load_f32(mine + i) + dgv);
                        store_f32(mine + F + i, load_f32(mine + F + i) + duv);
                    }
                } else {
                    const f32x16 dgv = o * d;
                    store_f32(dg + i, dgv);
                    if (mine) store_f32(mine + i, load_f32(mine + i) + dgv);
                }
            }
            for (; i < F; i++) {
                float y, d;
                act1(act, g[i] + (bias ? bias[i] : 0.0f), &y, &d);
                if (glu) {
                    dg[i] = gr[i] * (u[i] + (bias ? bias[F + i] : 0.0f)) * d;
                    du[i] = gr[i] * y;
                    if (mine) mine[i] += dg[i], mine[F + i] += du[i];
                } else {
                    dg[i] = gr[i] * d;
                    if (mine) mine[i] += dg[i];
                }
            }
        }
    }
    if (bias) finish_parts(part, threads, in_row, dbias);
    return 0;
}

/* RMSNorm over rows of C features (model.RMSNormFunction): out = x r w, r = 1 / sqrt(mean(x^2) + eps),
 * r (rows,) kept for the backward. */
int lmlab_rmsnorm_forward(const float *x, int64_t rows, int64_t C, const float *w, float eps, float *out, float *r,
                          int threads) {
    if (rows < 0 || C < 1) return -1;
#pragma omp parallel for schedule(static) num_threads(threads < 1 ? 1 : threads)
    for (int64_t i = 0; i < rows; i++) {
        const float *xr = x + i * C;
        float *o = out + i * C;
        f32x16 acc = {0};
        int64_t j = 0;
        for (; j + 16 <= C; j += 16) {
            const f32x16 v = load_f32(xr + j);
            acc += v * v;
        }
        float ss = hsum(acc);
        for (; j < C; j++) ss += xr[j] * xr[j];
        const float ri = 1.0f / sqrtf(ss / (float)C + eps);
        r[i] = ri;
        for (j = 0; j + 16 <= C; j += 16) store_f32(o + j, load_f32(xr + j) * ri * load_f32(w + j));
        for (; j < C; j++) o[j] = xr[j] * ri * w[j];
    }
    return 0;
}

/* Its gradient from g (rows, C): with n = x r and gw = g w, dx = (gw - n mean(gw n)) r; and, where
 * dw is not NULL, dw = the sum over rows of g n (each thread sums its rows, then the threads' sums
 * are added in order). */
int lmlab_rmsnorm_backward(const float *x, const float *w, const float *r, const float *g, int64_t rows, int64_t C,
                           float *dx, float *dw, int threads) {
    if (rows < 0 || C < 1) return -1;
    if (threads < 1) threads = 1;
    float *part = NULL;
    if (dw && !(part = thread_parts(threads, C))) return -1;
#pragma omp parallel num_threads(threads)
    {
        float *mine = part ? part + (size_t)thread_id() * (size_t)C : NULL;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; i++) {
            const float *xr = x + i * C, *gr = g + i * C;
            const float ri = r[i];
            f32x16 acc = {0};
            int64_t j = 0;
            for (; j + 16 <= C; j += 16) acc += load_f32(gr + j) * load_f32(w + j) * load_f32(xr + j);
            float dot = hsum(acc);
            for (; j < C; j++) dot += gr[j] * w[j] * xr[j];
            const float m = dot * ri / (float)C; /* mean(gw n) */
            float *d = dx + i * C;
            for (j = 0; j + 16 <= C; j += 16) {
                const f32x16 n = load_f32(xr + j) * ri, gv = load_f32(gr + j);
                store_f32(d + j, (gv * load_f32(w + j) - n * m) * ri);
                if (mine) store_f32(mine + j, load_f32(mine + j) + gv * n);
            }
            for (; j < C; j++) {
                const float n = xr[j] * ri;
                d[j] = (gr[j] * w[j] - n * m) * ri;
                if (mine) mine[j] += gr[j] * n;
            }
        }
    }
    if (dw) finish_parts(part, threads, C, dw);
    return 0;
}

/* One head's pairs (x[j], x[j + half]), j < half: out[j] = x[j] c[j] + x[j + half] s_lo[j],
 * out[j + half] = x[j + half] c[j + half] + x[j] s_hi[j]. */
static inline void turn(const float *x, const float *c, const float *s_lo, const float *s_hi, int64_t half,
                        float *out) {
    int64_t j = 0;
    for (; j + 16 <= half; j += 16) {
        const f32x16 a = load_f32(x + j), b = load_f32(x + j + half);
        store_f32(out + j, a * load_f32(c + j) + b * load_f32(s_lo + j));
        store_f32(out + j + half, b * load_f32(c + j + half) + a * load_f32(s_hi + j));
    }
    for (; j < half; j++) {
        const float a = x[j], b = x[j + half];
        out[j] = a * c[j] + b * s_lo[j];
        out[j + half] = b * c[j + half] + a * s_hi[j];
    }
}

/* RoPE on a qkv projection (model.apply_rope): x (B, T, NH, D), every token's heads side by side;
 * the first n_rot heads (q's and k's) turn over their first R features, pair j being (x[j],
 * x[j + R/2]): out[j] = x[j] cos[j] + x[j ^ half] sin[j], sin's first half negated as
 * rope_cos_sin makes it. Everything else is copied. cos, sin: (B or 1, T, R); cs_b, their
 * stride between rows of the batch (0 when one table serves every row). out: x's shape. */
int lmlab_rope_forward(const float *x, int64_t B, int64_t T, int64_t NH, int64_t D, int64_t n_rot, int64_t R,
                       const float *cos, const float *sin, int64_t cs_b, float *out, int threads) {
    if (B < 0 || T < 0 || R < 2 || R > D || R % 2 || n_rot > NH) return -1;
    const int64_t half = R / 2;
#pragma omp parallel for schedule(static) num_threads(threads < 1 ? 1 : threads)
    for (int64_t bt = 0; bt < B * T; bt++) {
        const int64_t b = bt / T, t = bt % T;
        const float *c = cos + b * cs_b + t * R, *s = sin + b * cs_b + t * R;
        const float *xr = x + bt * NH * D;
        float *o = out + bt * NH * D;
        for (int64_t n = 0; n < n_rot; n++) {
            const float *xh = xr + n * D;
            float *oh = o + n * D;
            turn(xh, c, s, s + half, half, oh);
            memcpy(oh + R, xh + R, sizeof(float) * (size_t)(D - R));
        }
        memcpy(o + n_rot * D, xr + n_rot * D, sizeof(float) * (size_t)((NH - n_rot) * D));
    }
    return 0;
}

/* Its gradient, into the projection's layout: g[0..2] the gradients of the q, k and v heads,
 * each (B, heads, T, D) with element strides st[3 p + 0..2] for b, head, t (D contiguous);
 * heads[p] their counts (heads[0] + heads[1] = n_rot, all three = NH). dx (B, T, NH, D):
 * dx[j] = g[j] cos[j] + g[j ^ half] sin[j ^ half] on the rotated heads (the rotation's
 * transpose), g itself elsewhere. */
int lmlab_rope_backward(const float *const *g, const int64_t *st, const int64_t *heads, int64_t B, int64_t T,
                        int64_t D, int64_t R, const float *cos, const float *sin, int64_t cs_b, float *dx,
                        int threads) {
    const int64_t NH = heads[0] + heads[1] + heads[2], n_rot = heads[0] + heads[1], half = R / 2;
    if (B < 0 || T < 0 || R < 2 || R > D || R % 2) return -1;
#pragma omp parallel for schedule(static) num_threads(threads < 1 ? 1 : threads)
    for (int64_t bt = 0; bt < B * T; bt++) {
        const int64_t b = bt / T, t = bt % T;
        const float *c = cos + b * cs_b + t * R, *s = sin + b * cs_b + t * R;
        float *o = dx + bt * NH * D;
        int64_t n = 0;
        for (int p = 0; p < 3; p++)
            for (int64_t hh = 0; hh < heads[p]; hh++, n++) {
                const float *gh = g[p] + b * st[3 * p] + hh * st[3 * p + 1] + t * st[3 * p + 2];
                float *oh = o + n * D;
                if (n >= n_rot) {
                    memcpy(oh, gh, sizeof(float) * (size_t)D);
                    continue;
                }
                turn(gh, c, s + half, s, half, oh); /* the transpose: each half takes the other's sin */
                memcpy(oh + R, gh + R, sizeof(float) * (size_t)(D - R));
            }
    }
    return 0;
}


/* ------------------------------------------------------------------------ training's causal attention
 *
 * model.Attention's F.scaled_dot_product_attention(q, k, v, is_causal=True) for a training batch,
 * forward and backward, reading q, k and v where the qkv projection (or RoPE) left them: x (B, T,
 * NH, D), every token's H query heads, then K key heads, then K value heads (NH = H + 2K; query
 * head h reads k/v head h / G). The output y is (B, T, H, D), what the output projection reads,
 * and the backward writes the gradient of x in x's layout, so neither direction copies q, k or v
 * into heads-first tensors and back.
 *
 * PyTorch's CPU kernel computes every key block of a 256-token row, the masked half too; here a
 * block of 4 query rows computes the keys up to its last row only, which halves the work. Each
 * (batch row, k/v head) is one task for a thread, with the G query heads that share it, so the
 * key and value gradients add up in one place. A task holds the whole (T, T) probability matrix
 * of one head in its own buffer: the forward keeps only each row's log-sum-exp, and the backward
 * recomputes the probabilities from it (as flash attention does).
 *
 * The products are register tiles of 4 rows by up to 4 vectors of 16 floats:
 *   rows x keys    S[i, j] = sum_d A[i, d] Bt[d, j]     (Bt: a head transposed, in panels of keys)
 *   rows x dims    O[i, :] = sum_j P[i, j] M[j, :]      over j < keys, P rows of Tp floats
 *   keys x dims    O[j, :] = sum_i P[i, j] M[i, :]      over i >= j (the transposed product)
 * D must be a multiple of 16; lmlab/fused.py keeps PyTorch's kernel otherwise. */

#define ATT_ROWS 4
#define ATT_MAX_D 512 /* the largest head the kernels take (one row's scratch on the stack) */
#define ATT_PANEL 64 /* keys per panel of a transposed head: one tile's width */

static inline int64_t att_panels(int64_t T) { return (T + ATT_PANEL - 1) / ATT_PANEL * ATT_PANEL; }
#define ATT_LANES ((i32x16){0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15})

/* S tile: rows 0..nr-1 of A (row stride as) times keys j0..j0+16 nv of Bt (panels of 64 keys, each
 * D rows of 64 floats), into S (rows of Tp). With rd, S holds the rows' probabilities P, and
 * becomes dS = P (A Bt - rd[row]) scale. */
static inline __attribute__((always_inline)) void att_tile_s(const float *A, int64_t as, int nr, const float *Bt,
                                                              int64_t Tp, int64_t D, int64_t j0, int nv, float *S,
                                                              const float *rd, float scale) {
    f32x16 acc[ATT_ROWS][4];
    for (int r = 0; r < ATT_ROWS; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = (f32x16){0};
    for (int64_t d = 0; d < D; d++) {
        const float *b = Bt + j0 * D + d * ATT_PANEL; /* j0 starts a panel */
        f32x16 bv[4];
        for (int c = 0; c < nv; c++) {
            bv[c] = load_f32(b + 16 * c);
            IN_REGISTER(bv[c]);
        }
        for (int r = 0; r < nr; r++) {
            const float a = A[r * as + d];
            for (int c = 0; c < nv; c++) acc[r][c] += a * bv[c];
        }
    }
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nv; c++) {
            float *o = S + r * Tp + j0 + 16 * c;
            store_f32(o, rd ? load_f32(o) * (acc[r][c] - rd[r]) * scale : acc[r][c]);
        }
}

/* A row block's tiles over every key block up to `keys` (rounded up to 16). */
static void att_scores(const float *A, int64_t as, int nr, const float *Bt, int64_t Tp, int64_t D, int64_t keys,
                       float *S, const float *rd, float scale) {
    const int64_t nvec = (keys + 15) / 16;
    int64_t v = 0;
    for (; v + 4 <= nvec; v += 4) {
        if (nr == ATT_ROWS) att_tile_s(A, as, ATT_ROWS, Bt, Tp, D, 16 * v, 4, S, rd, scale);
        else att_tile_s(A, as, nr, Bt, Tp, D, 16 * v, 4, S, rd, scale);
    }
    switch (nvec - v) {
    case 3: att_tile_s(A, as, nr, Bt, Tp, D, 16 * v, 3, S, rd, scale); break;
    case 2: att_tile_s(A, as, nr, Bt, Tp, D, 16 * v, 2, S, rd, scale); break;
    case 1: att_tile_s(A, as, nr, Bt, Tp, D, 16 * v, 1, S, rd, scale); break;
    default: break;
    }
}

/* O tile, rows x dims: O[r, d0 + 16c] (+)= sum_{j < n} P[r * ps + j] M[j * ms + d0 + 16c]. */
static inline __attribute__((always_inline)) void att_tile_pm(const float *P, int64_t ps, int nr, int64_t n,
                                                               const float *M, int64_t ms, int nv, float *O,
                                                               int64_t os, int add) {
    f32x16 acc[ATT_ROWS][4];
    for (int r = 0; r < ATT_ROWS; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = (f32x16){0};
    for (int64_t j = 0; j < n; j++) {
        const float *m = M + j * ms;
        f32x16 mv[4];
        for (int c = 0; c < nv; c++) {
            mv[c] = load_f32(m + 16 * c);
            IN_REGISTER(mv[c]);
        }
        for (int r = 0; r < nr; r++) {
            const float p = P[r * ps + j];
            for (int c = 0; c < nv; c++) acc[r][c] += p * mv[c];
        }
    }
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nv; c++) {
            float *o = O + r * os + 16 * c;
            store_f32(o, add ? load_f32(o) + acc[r][c] : acc[r][c]);
        }
}

/* Transposed tile, keys x dims: O[r, d0 + 16c] (+)= sum_{i in [i0, n)} P[i * ps + r] M[i * ms + d0 + 16c]. */
static inline __attribute__((always_inline)) void att_tile_ptm(const float *P, int64_t ps, int nr, int64_t i0,
                                                                int64_t n, const float *M, int64_t ms, int nv,
                                                                float *O, int64_t os, int add) {
    f32x16 acc[ATT_ROWS][4];
    for (int r = 0; r < ATT_ROWS; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = (f32x16){0};
    for (int64_t i = i0; i < n; i++) {
        const float *m = M + i * ms, *p = P + i * ps;
        f32x16 mv[4];
        for (int c = 0; c < nv; c++) {
            mv[c] = load_f32(m + 16 * c);
            IN_REGISTER(mv[c]);
        }
        for (int r = 0; r < nr; r++)
            for (int c = 0; c < nv; c++) acc[r][c] += p[r] * mv[c];
    }
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nv; c++) {
            float *o = O + r * os + 16 * c;
            store_f32(o, add ? load_f32(o) + acc[r][c] : acc[r][c]);
        }
}

/* Rows [i0, i0 + nr) of P M over the first n rows of M, every 16-float column block of D. */
static void att_pm(const float *P, int64_t ps, int nr, int64_t n, const float *M, int64_t ms, int64_t D, float *O,
                   int64_t os, int add) {
    int64_t d = 0;
    for (; d + 64 <= D; d += 64) {
        if (nr == ATT_ROWS) att_tile_pm(P, ps, ATT_ROWS, n, M + d, ms, 4, O + d, os, add);
        else att_tile_pm(P, ps, nr, n, M + d, ms, 4, O + d, os, add);
    }
    switch ((D - d) / 16) {
    case 3: att_tile_pm(P, ps, nr, n, M + d, ms, 3, O + d, os, add); break;
    case 2: att_tile_pm(P, ps, nr, n, M + d, ms, 2, O + d, os, add); break;
    case 1: att_tile_pm(P, ps, nr, n, M + d, ms, 1, O + d, os, add); break;
    default: break;
    }
}

/* Key rows [j0, j0 + nr) of P^T M, over the rows i in [j0, n) of P (the rows above j0 are masked). */
static void att_ptm(const float *P, int64_t ps, int nr, int64_t j0, int64_t n, const float *M, int64_t ms, int64_t D,
                    float *O, int64_t os, int add) {
    const float *Pj = P + j0;
    int64_t d = 0;
    for (; d + 64 <= D; d += 64) {
        if (nr == ATT_ROWS) att_tile_ptm(Pj, ps, ATT_ROWS, j0, n, M + d, ms, 4, O + d, os, add);
        else att_tile_ptm(Pj, ps, nr, j0, n, M + d, ms, 4, O + d, os, add);
    }
    switch ((D - d) / 16) {
    case 3: att_tile_ptm(Pj, ps, nr, j0, n, M + d, ms, 3, O + d, os, add); break;
    case 2: att_tile_ptm(Pj, ps, nr, j0, n, M + d, ms, 2, O + d, os, add); break;
    case 1: att_tile_ptm(Pj, ps, nr, j0, n, M + d, ms, 1, O + d, os, add); break;
    default: break;
    }
}

/* RoPE inside the attention (model.apply_rope on q and k): cos, sin (B or 1, T, R) tables as
 * rope_cos_sin makes them, cs_b their stride between batch rows (0: one table for all); cos NULL
 * for a model without RoPE. */
typedef struct {
    const float *cos, *sin;
    int64_t cs_b, R;
} att_rope;

/* Token t's row of one head, turned by RoPE (rp->cos set) into out, which may be x; inverse turns
 * it back (the rotation's transpose, as lmlab_rope_backward applies it to a gradient). */
static void att_turn_row(const att_rope *rp, int64_t b, int64_t t, const float *x, int64_t D, int inverse,
                         float *out) {
    const int64_t R = rp->R, half = R / 2;
    const float *c = rp->cos + b * rp->cs_b + t * R, *sn = rp->sin + b * rp->cs_b + t * R;
    float tmp[ATT_MAX_D];
    turn(x, c, inverse ? sn + half : sn, inverse ? sn : sn + half, half, tmp);
    memcpy(out, tmp, sizeof(float) * (size_t)R);
    if (out != x) memcpy(out + R, x + R, sizeof(float) * (size_t)(D - R));
}

/* A head's T rows (stride xs) turned by RoPE into Xr (T, D), contiguous. */
static void att_turn_head(const att_rope *rp, int64_t b, const float *x, int64_t xs, int64_t T, int64_t D, float *Xr) {
    for (int64_t t = 0; t < T; t++) att_turn_row(rp, b, t, x + t * xs, D, 0, Xr + t * D);
}

/* A head's rows as the products read them: turned by RoPE into Xr (stride D), or where they are
 * (stride xs) for a model without RoPE. */
static const float *att_rows(const att_rope *rp, int64_t b, const float *x, int64_t xs, int64_t T, int64_t D,
                             float *Xr, int64_t *stride) {
    if (!rp->cos) {
        *stride = xs;
        return x;
    }
    att_turn_head(rp, b, x, xs, T, D, Xr);
    *stride = D;
    return Xr;
}

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define ATT_SHUFFLE 1
#endif
#endif

#ifdef ATT_SHUFFLE
/* Rows i and j = i | k of a 16 x 16 block, swapping bit k of the row index with bit k of the column
 * index: row i keeps its columns without bit k and takes row j's, shifted down by k, for the rest. */
#define ATT_SWAP(r, i, k, LO, HI)                                                                 \
    do {                                                                                          \
        const f32x16 a_ = r[i], b_ = r[(i) | (k)];                                                \
        r[i] = __builtin_shufflevector(a_, b_, LO);                                               \
        r[(i) | (k)] = __builtin_shufflevector(a_, b_, HI);                                       \
    } while (0)
#define ATT_LO1 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30
#define ATT_HI1 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31
#define ATT_LO2 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define ATT_HI2 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define ATT_LO4 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27
#define ATT_HI4 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define ATT_LO8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define ATT_HI8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31

/* A 16 x 16 block of floats transposed in registers: one round per bit of the index. */
static inline void att_transpose16(f32x16 r[16]) {
    for (int i = 0; i < 16; i++)
        if (!(i & 1)) ATT_SWAP(r, i, 1, ATT_LO1, ATT_HI1);
    for (int i = 0; i < 16; i++)
        if (!(i & 2)) ATT_SWAP(r, i, 2, ATT_LO2, ATT_HI2);
    for (int i = 0; i < 16; i++)
        if (!(i & 4)) ATT_SWAP(r, i, 4, ATT_LO4, ATT_HI4);
    for (int i = 0; i < 8; i++) ATT_SWAP(r, i, 8, ATT_LO8, ATT_HI8);
}
#endif

/* Bt = the head at x (T rows of stride xs, D floats each) transposed, in panels of 64 keys: key j's
 * feature d at Bt[(j / 64) 64 D + 64 d + j % 64], so a tile reads one contiguous panel. Keys from T to
 * the last panel's end are zero. 16 tokens by 16 features at a time, transposed in registers (one
 * float at a time, the scalar loop took 6% of the attention's time at 8 x 256 tokens). */
static void att_transpose(const float *x, int64_t xs, int64_t T, int64_t D, float *Bt) {
    for (int64_t t0 = 0; t0 < att_panels(T); t0 += 16) {
        const int64_t n = T - t0 < 0 ? 0 : (T - t0 < 16 ? T - t0 : 16); /* real tokens; the rest pad the panel */
        float *panel = Bt + (t0 / ATT_PANEL) * ATT_PANEL * D + t0 % ATT_PANEL;
#ifdef ATT_SHUFFLE
        for (int64_t d0 = 0; d0 < D; d0 += 16) { /* D is a multiple of 16 */
            f32x16 r[16];
            for (int64_t t = 0; t < 16; t++) r[t] = t < n ? load_f32(x + (t0 + t) * xs + d0) : (f32x16){0};
            att_transpose16(r);
            for (int64_t d = 0; d < 16; d++) store_f32(panel + (d0 + d) * ATT_PANEL, r[d]);
        }
#else
        for (int64_t d = 0; d < D; d++) {
            float *b = panel + d * ATT_PANEL;
            for (int64_t t = 0; t < n; t++) b[t] = x[(t0 + t) * xs + d];
            for (int64_t t = n; t < 16; t++) b[t] = 0.0f;
        }
#endif
    }
}

/* The probabilities of one query head, every row: P[i, j] = exp(scale S[i, j] - lse[i]) for
 * j <= i, 0 for the masked keys up to the row block's padded end. With lse NULL, each row's
 * softmax is computed and its log-sum-exp written to lse_out. */
static void att_probs(const float *q, int64_t xs, const float *Kt, int64_t T, int64_t D, int64_t Tp, float scale,
                      const float *lse, float *lse_out, float *P) {
    for (int64_t i0 = 0; i0 < T; i0 += ATT_ROWS) {
        const int nr = (int)(T - i0 < ATT_ROWS ? T - i0 : ATT_ROWS);
        const int64_t keys = i0 + nr; /* causal: the block's last row sees keys [0, i0 + nr) */
        att_scores(q + i0 * xs, xs, nr, Kt, Tp, D, keys, P + i0 * Tp, NULL, 0.0f);
        const int64_t padded = (keys + 15) / 16 * 16;
        for (int r = 0; r < nr; r++) {
            const int64_t i = i0 + r, n = i + 1, nvec = (n + 15) / 16; /* row i sees keys [0, n) */
            float *p = P + i * Tp;
            const i32x16 limit = (i32x16){0} + (int32_t)n, none = (i32x16)((f32x16){0} - INFINITY);
            float m;
            if (lse) {
                m = lse[i];
            } else {
                f32x16 mx = (f32x16){0} - INFINITY;
                for (int64_t v = 0; v < nvec; v++) {
                    const i32x16 ok = ATT_LANES + (int32_t)(16 * v) < limit;
                    const f32x16 sv = (f32x16)((ok & (i32x16)(load_f32(p + 16 * v) * scale)) | (~ok & none));
                    const i32x16 gt = sv > mx;
                    mx = (f32x16)((gt & (i32x16)sv) | (~gt & (i32x16)mx));
                }
                m = hmax(mx);
            }
            f32x16 sum = {0};
            for (int64_t v = 0; v < nvec; v++) {
                const i32x16 ok = ATT_LANES + (int32_t)(16 * v) < limit;
                const f32x16 e = (f32x16)(ok & (i32x16)exp16(load_f32(p + 16 * v) * scale - m));
                store_f32(p + 16 * v, e);
                sum += e;
            }
            for (int64_t j = 16 * nvec; j < padded; j++) p[j] = 0.0f;
            if (!lse) {
                const float s = hsum(sum), inv = 1.0f / s;
                for (int64_t v = 0; v < nvec; v++) store_f32(p + 16 * v, load_f32(p + 16 * v) * inv);
                lse_out[i] = m + logf(s);
            }
        }
    }
}

/* Forward. x (B, T, H + 2K, D) contiguous; y (B, T, H, D); lse (B, H, T), each row's
 * log-sum-exp of its scaled scores, for the backward. cos, sin (NULL: no RoPE), cs_b, R: the
 * RoPE tables (att_rope) q and k are turned by as they are read. */
int lmlab_attn_forward(const float *x, int64_t B, int64_t T, int64_t H, int64_t K, int64_t D, float scale,
                       const float *cos, const float *sin, int64_t cs_b, int64_t R, float *y, float *lse,
                       int threads) {
    if (B < 0 || T < 1 || H < 1 || K < 1 || H % K || D < 16 || D % 16 || D > ATT_MAX_D) return -1;
    if (cos && (R < 2 || R > D || R % 2)) return -1;
    const int64_t NH = H + 2 * K, G = H / K, xs = NH * D, Tp = (T + 15) / 16 * 16;
    const att_rope rp = {cos, sin, cs_b, R};
    int failed = 0;
#pragma omp parallel num_threads(threads < 1 ? 1 : threads) reduction(| : failed)
    {
        float *Kt = malloc(sizeof(float) * (size_t)(D * att_panels(T) + T * Tp + 2 * T * D));
        if (!Kt) failed = 1;
        float *P = Kt ? Kt + D * att_panels(T) : NULL, *Qr = Kt ? P + T * Tp : NULL, *Kr = Kt ? Qr + T * D : NULL;
#pragma omp for schedule(static)
        for (int64_t u = 0; u < B * K; u++) {
            if (!Kt) continue;
            const int64_t b = u / K, kh = u % K;
            const float *xb = x + b * T * xs;
            int64_t ks, qs;
            const float *k = att_rows(&rp, b, xb + (H + kh) * D, xs, T, D, Kr, &ks);
            att_transpose(k, ks, T, D, Kt);
            for (int64_t g = 0; g < G; g++) {
                const int64_t h = kh * G + g;
                const float *q = att_rows(&rp, b, xb + h * D, xs, T, D, Qr, &qs);
                att_probs(q, qs, Kt, T, D, Tp, scale, NULL, lse + (b * H + h) * T, P);
                const float *v = xb + (H + K + kh) * D;
                for (int64_t i0 = 0; i0 < T; i0 += ATT_ROWS) {
                    const int nr = (int)(T - i0 < ATT_ROWS ? T - i0 : ATT_ROWS);
                    att_pm(P + i0 * Tp, Tp, nr, i0 + nr, v, xs, D, y + ((b * T + i0) * H + h) * D, H * D, 0);
                }
            }
        }
        free(Kt);
    }
    return failed ? -1 : 0;
}

/* Backward, from dy (B, T, H, D) contiguous and the forward's x, y and lse (and its RoPE tables):
 * dx (x's shape). With P the probabilities and dP = dy v^T: dv = P^T dy, dS = P (dP - rowsum(dy y))
 * scale, dq = dS k, dk = dS^T q (q and k turned by RoPE; their gradients are turned back); a
 * k/v head's gradients add over its G query heads. */
int lmlab_attn_backward(const float *x, const float *y, const float *lse, const float *dy, int64_t B, int64_t T,
                        int64_t H, int64_t K, int64_t D, float scale, const float *cos, const float *sin, int64_t cs_b,
                        int64_t R, float *dx, int threads) {
    if (B < 0 || T < 1 || H < 1 || K < 1 || H % K || D < 16 || D % 16 || D > ATT_MAX_D) return -1;
    if (cos && (R < 2 || R > D || R % 2)) return -1;
    const int64_t NH = H + 2 * K, G = H / K, xs = NH * D, ys = H * D, Tp = (T + 15) / 16 * 16;
    const att_rope rp = {cos, sin, cs_b, R};
    int failed = 0;
#pragma omp parallel num_threads(threads < 1 ? 1 : threads) reduction(| : failed)
    {
        float *Kt = malloc(sizeof(float) * (size_t)(2 * D * att_panels(T) + T * Tp + T + 2 * T * D));
        if (!Kt) failed = 1;
        float *Vt = Kt ? Kt + D * att_panels(T) : NULL, *P = Kt ? Vt + D * att_panels(T) : NULL;
        float *rowdot = Kt ? P + T * Tp : NULL, *Qr = Kt ? rowdot + T : NULL, *Kr = Kt ? Qr + T * D : NULL;
#pragma omp for schedule(static)
        for (int64_t u = 0; u < B * K; u++) {
            if (!Kt) continue;
            const int64_t b = u / K, kh = u % K;
            const float *xb = x + b * T * xs, *v = xb + (H + K + kh) * D;
            float *dxb = dx + b * T * xs, *dk = dxb + (H + kh) * D, *dv = dxb + (H + K + kh) * D;
            int64_t ks, qs;
            const float *k = att_rows(&rp, b, xb + (H + kh) * D, xs, T, D, Kr, &ks);
            att_transpose(k, ks, T, D, Kt);
            att_transpose(v, xs, T, D, Vt);
            for (int64_t g = 0; g < G; g++) {
                const int64_t h = kh * G + g;
                const float *yh = y + b * T * ys + h * D, *dyh = dy + b * T * ys + h * D;
                float *dq = dxb + h * D;
                const float *q = att_rows(&rp, b, xb + h * D, xs, T, D, Qr, &qs);
                att_probs(q, qs, Kt, T, D, Tp, scale, lse + (b * H + h) * T, NULL, P);
                for (int64_t j0 = 0; j0 < T; j0 += ATT_ROWS) { /* dv (+)= P^T dy */
                    const int nr = (int)(T - j0 < ATT_ROWS ? T - j0 : ATT_ROWS);
                    att_ptm(P, Tp, nr, j0, T, dyh, ys, D, dv + j0 * xs, xs, g > 0);
                }
                for (int64_t i = 0; i < T; i++) {
                    f32x16 acc = {0};
                    for (int64_t d = 0; d < D; d += 16) acc += load_f32(dyh + i * ys + d) * load_f32(yh + i * ys + d);
                    rowdot[i] = hsum(acc);
                }
                for (int64_t i0 = 0; i0 < T; i0 += ATT_ROWS) { /* P becomes dS, a row block at a time */
                    const int nr = (int)(T - i0 < ATT_ROWS ? T - i0 : ATT_ROWS);
                    const int64_t keys = i0 + nr;
                    att_scores(dyh + i0 * ys, ys, nr, Vt, Tp, D, keys, P + i0 * Tp, rowdot + i0, scale);
                    att_pm(P + i0 * Tp, Tp, nr, keys, k, ks, D, dq + i0 * xs, xs, 0); /* dq = dS k */
                }
                for (int64_t j0 = 0; j0 < T; j0 += ATT_ROWS) { /* dk (+)= dS^T q */
                    const int nr = (int)(T - j0 < ATT_ROWS ? T - j0 : ATT_ROWS);
                    att_ptm(P, Tp, nr, j0, T, q, qs, D, dk + j0 * xs, xs, g > 0);
                }
                if (rp.cos)
                    for (int64_t t = 0; t < T; t++) att_turn_row(&rp, b, t, dq + t * xs, D, 1, dq + t * xs);
            }
            if (rp.cos)
                for (int64_t t = 0; t < T; t++) att_turn_row(&rp, b, t, dk + t * xs, D, 1, dk + t * xs);
        }
        free(Kt);
    }
    return failed ? -1 : 0;
}


/* ------------------------------------------------------------------------ training's matmul gradients
 *
 * The two gradients of a Linear layer y = x W^T (+ b), for g = dL/dy (rows x out):
 *   the weight's   dW = g^T x  (out x in),  and the bias's db = the column sums of g;
 *   the input's    dx = g W    (rows x in).
 * Both are C = A' B with B row-major (k, j) and A' read as a[k * sak + i * sai]: dW has A' = g^T
 * (sak = out, sai = 1), dx has A' = g (sak = 1, sai = out). So neither operand is copied into a
 * packed layout: each k step of a tile reads GEMM_MR scalars of A' and 2 vectors (32 floats) of
 * one row of B, and adds their outer product into GEMM_MR x 32 sums held in registers (24 of
 * AVX-512's 32 vector registers). The k range goes in blocks (256 deep for dW, 512 for dx:
 * the faster of 128-768 for each on the EPYC), and each block's B panel (k block x GEMM_NC
 * floats, 256 or 512 KB) stays in the L2 cache while every row tile of the thread passes over
 * it. The threads split the row tiles (or the columns, where the rows are few).
 *
 * On an AMD EPYC (Zen 4), two threads, this ran at 195-215 GFLOP/s on the 10M models' shapes and
 * 205-225 at nanoGPT's baby shapes, where MKL's sgemm took 155-195 and 130-190 (its kernel for
 * this layout on AMD), and oneDNN's at 187-202 for dx. lmlab/fused.py times it against those per
 * shape, so it is used only where it is faster on the machine at hand. */

#ifndef GEMM_MR /* (each may be set with -D to try another: GEMM_MR up to 14) */
#if defined(__AVX512F__)
#define GEMM_MR 12 /* rows of C per tile: 12 x 2 vectors of sums, 2 of B, 1 broadcast */
#else
#define GEMM_MR 2 /* AVX2 (16 registers of 8 floats) and NEON: a vector of 16 floats takes 2 or 4 */
#endif
#endif
#ifndef GEMM_KC
#define GEMM_KC 256 /* k block of dW, whose A' rows are g's columns: 12 floats of each of 256 rows */
#endif
#ifndef GEMM_KC_DX
#define GEMM_KC_DX 512 /* k block of dx, whose A' rows are g's rows, read along: fewer passes over C */
#endif
#ifndef GEMM_NC
#define GEMM_NC 256
#endif
#ifndef GEMM_PREFETCH
#define GEMM_PREFETCH 16 /* k steps ahead that a tile asks for its operands' rows (gemm_tile) */
#endif
enum { GEMM_PF_B = 1, GEMM_PF_A = 2 };

/* C[i, j0 + 16 v] (+)= sum_{k < kc} a[k * sak + i * sai] b[k * ldb + j0 + 16 v], i < mr, v < nv.
 *
 * In a training step the operands come cold (the saved activations, the gradient another core
 * wrote), read down columns 2 KB and more apart, where the hardware's prefetchers do not follow.
 * So the tile asks for them GEMM_PREFETCH k steps ahead: prefetch & GEMM_PF_B, B's row (the first
 * row tile over a block of B; the others find it in the cache), and & GEMM_PF_A, A''s (dW: its
 * mr floats of g's row, two cache lines). On the EPYC, two threads, nanoGPT's baby shapes, cold:
 * dW 2.25 -> 1.90 ms, hot unchanged; a baby step ~2.5% faster, a 10M one ~1%. */
static inline __attribute__((always_inline)) void gemm_tile(int64_t kc, const float *a, int64_t sak, int64_t sai,
                                                             const float *b, int64_t ldb, float *c, int64_t ldc,
                                                             int first, const int mr, const int nv, const int prefetch) {
    f32x16 acc[GEMM_MR][2];
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < nv; v++) acc[i][v] = first ? (f32x16){0} : load_f32(c + i * ldc + 16 * v);
    for (int64_t k = 0; k < kc; k++) {
        f32x16 bv[2];
        if (prefetch & GEMM_PF_B)
            for (int v = 0; v < nv; v++) __builtin_prefetch(b + (k + GEMM_PREFETCH) * ldb + 16 * v);
        if (prefetch & GEMM_PF_A) {
            __builtin_prefetch(a + (k + GEMM_PREFETCH) * sak);
            __builtin_prefetch(a + (k + GEMM_PREFETCH) * sak + (mr - 1) * sai);
        }
        for (int v = 0; v < nv; v++) {
            bv[v] = load_f32(b + k * ldb + 16 * v);
            IN_REGISTER(bv[v]);
        }
        const float *ak = a + k * sak;
        for (int i = 0; i < mr; i++) {
            const float s = ak[i * sai];
            for (int v = 0; v < nv; v++) acc[i][v] += s * bv[v];
        }
    }
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < nv; v++) store_f32(c + i * ldc + 16 * v, acc[i][v]);
}

/* Rows [i0, i0 + mr) of C, columns [j0, j1) (a multiple of 16 wide), over one k block. mr and
 * prefetch are constants in each copy of the tile, so its loops unroll into registers. */
static inline __attribute__((always_inline)) void gemm_cols(int64_t kc, const float *a, int64_t sak, int64_t sai,
                                                             const float *b, int64_t ldb, float *c, int64_t ldc,
                                                             int64_t j0, int64_t j1, int first, const int mr,
                                                             const int prefetch) {
    int64_t j = j0;
    for (; j + 32 <= j1; j += 32) gemm_tile(kc, a, sak, sai, b + j, ldb, c + j, ldc, first, mr, 2, prefetch);
    if (j < j1) gemm_tile(kc, a, sak, sai, b + j, ldb, c + j, ldc, first, mr, 1, prefetch);
}

/* gemm_cols with a copy for each choice of prefetch, so the input's gradient (no A' prefetch) and
 * the tiles after a block's first (no B prefetch) carry no prefetch instructions. */
static inline __attribute__((always_inline)) void gemm_rows(int64_t kc, const float *a, int64_t sak, int64_t sai,
                                                             const float *b, int64_t ldb, float *c, int64_t ldc,
                                                             int64_t j0, int64_t j1, int first, const int mr,
                                                             int prefetch) {
    switch (prefetch) {
    case 0: gemm_cols(kc, a, sak, sai, b, ldb, c, ldc, j0, j1, first, mr, 0); break;
    case GEMM_PF_B: gemm_cols(kc, a, sak, sai, b, ldb, c, ldc, j0, j1, first, mr, GEMM_PF_B); break;
    case GEMM_PF_A: gemm_cols(kc, a, sak, sai, b, ldb, c, ldc, j0, j1, first, mr, GEMM_PF_A); break;
    default: gemm_cols(kc, a, sak, sai, b, ldb, c, ldc, j0, j1, first, mr, GEMM_PF_A | GEMM_PF_B); break;
    }
}

static void gemm_rows_tail(int64_t kc, const float *a, int64_t sak, int64_t sai, const float *b, int64_t ldb,
                           float *c, int64_t ldc, int64_t j0, int64_t j1, int first, int mr) {
    switch (mr) { /* the last rows of C, fewer than a tile */
#define GEMM_TAIL(n) case n: gemm_cols(kc, a, sak, sai, b, ldb, c, ldc, j0, j1, first, n, 0); break;
    GEMM_TAIL(1)
#if GEMM_MR > 2
    GEMM_TAIL(2) GEMM_TAIL(3) GEMM_TAIL(4) GEMM_TAIL(5) GEMM_TAIL(6) GEMM_TAIL(7) GEMM_TAIL(8) GEMM_TAIL(9)
    GEMM_TAIL(10) GEMM_TAIL(11)
#endif
#if GEMM_MR > 12
    GEMM_TAIL(12) GEMM_TAIL(13)
#endif
#undef GEMM_TAIL
    default: break;
    }
}

/* C (M x N, row-major) = A' B, A'[i, k] = a[k * sak + i * sai], B (K x N, row-major). N must be a
 * multiple of 16. colsum, when not NULL (and sai == 1), gets the sums over k of A' rows:
 * sum_k a[k * sak + i] (the bias's gradient, when A' = g^T). Returns -1 where it does not apply. */
int lmlab_gemm(const float *a, int64_t sak, int64_t sai, const float *b, float *c, int64_t M, int64_t N, int64_t K,
               float *colsum, int threads) {
    if (N % 16 || M < 1 || K < 1 || (colsum && sai != 1)) return -1;
    const int64_t tiles = M / GEMM_MR, tail = M % GEMM_MR, KC = sai == 1 ? GEMM_KC : GEMM_KC_DX;
#pragma omp parallel num_threads(threads < 1 ? 1 : threads)
    {
#ifdef _OPENMP
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
#else
        const int t = 0, T = 1;
#endif
        /* each thread's rectangle of C: a range of row tiles (and the tail rows, on the last),
         * all columns; or, with fewer than 4 row tiles a thread, all rows and a range of columns */
        const int by_rows = tiles >= 4 * T;
        const int64_t r0 = by_rows ? tiles * t / T : 0, r1 = by_rows ? tiles * (t + 1) / T : tiles;
        const int64_t cols = N / 16, c0 = by_rows ? 0 : 16 * (cols * t / T), c1 = by_rows ? N : 16 * (cols * (t + 1) / T);
        const int has_tail = tail && (!by_rows || t == T - 1);
        /* colsum's share of this thread: its own rows, or a range of them where it has all */
        const int64_t s0 = by_rows ? r0 * GEMM_MR : M * t / T;
        const int64_t s1 = by_rows ? (has_tail ? M : r1 * GEMM_MR) : M * (t + 1) / T;
        if (colsum)
            for (int64_t i = s0; i < s1; i++) colsum[i] = 0;
        for (int64_t jc = c0; jc < c1; jc += GEMM_NC) {
            const int64_t jn = jc + GEMM_NC < c1 ? jc + GEMM_NC : c1;
            for (int64_t pc = 0; pc < K; pc += KC) {
                const int64_t kc = K - pc < KC ? K - pc : KC;
                const float *ap = a + pc * sak, *bp = b + pc * N;
                for (int64_t r = r0; r < r1; r++) /* the first tile brings the block of B into the cache */
                    gemm_rows(kc, ap + r * GEMM_MR * sai, sak, sai, bp, N, c + r * GEMM_MR * N, N, jc, jn, pc == 0,
                              GEMM_MR, (r == r0 ? GEMM_PF_B : 0) | (sai == 1 ? GEMM_PF_A : 0));
                if (has_tail)
                    gemm_rows_tail(kc, ap + tiles * GEMM_MR * sai, sak, sai, bp, N, c + tiles * GEMM_MR * N, N, jc, jn,
                                   pc == 0, (int)tail);
                if (colsum && jc == c0) /* while this block of A is still in the cache */
                    for (int64_t k = 0; k < kc; k++) {
                        const float *ak = ap + k * sak;
                        int64_t i = s0;
                        for (; i + 16 <= s1; i += 16) store_f32(colsum + i, load_f32(colsum + i) + load_f32(ak + i));
                        for (; i < s1; i++) colsum[i] += ak[i];
                    }
            }
        }
        if (colsum && c1 <= c0) /* no columns left for this thread: its sums alone */
            for (int64_t k = 0; k < K; k++)
                for (int64_t i = s0; i < s1; i++) colsum[i] += a[k * sak + i];
    }
    return 0;
}

#else

int lmlab_openmp(void) { return 0; }
int lmlab_isa(void) { return 0; }
int lmlab_gemm(const float *a, int64_t sak, int64_t sai, const float *b, float *c, int64_t M, int64_t N, int64_t K,
               float *colsum, int threads) {
    (void)a, (void)sak, (void)sai, (void)b, (void)c, (void)M, (void)N, (void)K, (void)colsum, (void)threads;
    return -1;
}

int lmlab_linear(const void *x, int M, int K, const void *w, int N, const void *b, void *y, int bf16, int threads) {
    (void)x; (void)M; (void)K; (void)w; (void)N; (void)b; (void)y; (void)bf16; (void)threads;
    return -1;
}

int lmlab_decode_layers(const lmlab_model *m, lmlab_state *s, int B, const void *x_in, float *k_cache, float *v_cache,
                        int64_t max_len, int64_t length, const int64_t *first_slot, const float *cos, const float *sin,
                        int l0, int l1, float *x_out, void *logits, int threads) {
    (void)m; (void)s; (void)B; (void)x_in; (void)k_cache; (void)v_cache; (void)max_len; (void)length;
    (void)first_slot; (void)cos; (void)sin; (void)l0; (void)l1; (void)x_out; (void)logits; (void)threads;
    return -1;
}

int lmlab_decode_step(const lmlab_model *m, lmlab_state *s, int B, const void *embeddings, float *k_cache, float *v_cache,
                      int64_t max_len, int64_t length, const int64_t *first_slot, const float *cos, const float *sin,
                      void *logits, int threads) {
    (void)m; (void)s; (void)B; (void)embeddings; (void)k_cache; (void)v_cache; (void)max_len; (void)length;
    (void)first_slot; (void)cos; (void)sin; (void)logits; (void)threads;
    (void)state_reserve; /* lmlab_isa() is 0: native.py never makes a state here */
    return -1;
}


int lmlab_act_forward(const float *h, const float *bias, int64_t rows, int64_t F, int glu, int act, float *out,
                      int threads) {
    (void)h; (void)bias; (void)rows; (void)F; (void)glu; (void)act; (void)out; (void)threads;
    return -1;
}

int lmlab_act_backward(const float *h, const float *bias, const float *go, int64_t rows, int64_t F, int glu, int act,
                       float *dh, float *dbias, int threads) {
    (void)h; (void)bias; (void)go; (void)rows; (void)F; (void)glu; (void)act; (void)dh; (void)dbias; (void)threads;
    return -1;
}

int lmlab_rope_forward(const float *x, int64_t B, int64_t T, int64_t NH, int64_t D, int64_t n_rot, int64_t R,
                       const float *cos, const float *sin, int64_t cs_b, float *out, int threads) {
    (void)x; (void)B; (void)T; (void)NH; (void)D; (void)n_rot; (void)R; (void)cos; (void)sin; (void)cs_b;
    (void)out; (void)threads;
    return -1;
}

int lmlab_rope_backward(const float *const *g, const int64_t *st, const int64_t *heads, int64_t B, int64_t T,
                        int64_t D, int64_t R, const float *cos, const float *sin, int64_t cs_b, float *dx,
                        int threads) {
    (void)g; (void)st; (void)heads; (void)B; (void)T; (void)D; (void)R; (void)cos; (void)sin; (void)cs_b;
    (void)dx; (void)threads;
    return -1;
}

int lmlab_attn_forward(const float *x, int64_t B, int64_t T, int64_t H, int64_t K, int64_t D, float scale,
                       const float *cos, const float *sin, int64_t cs_b, int64_t R, float *y, float *lse,
                       int threads) {
    (void)x; (void)B; (void)T; (void)H; (void)K; (void)D; (void)scale; (void)cos; (void)sin; (void)cs_b; (void)R;
    (void)y; (void)lse; (void)threads;
    return -1;
}

int lmlab_attn_backward(const float *x, const float *y, const float *lse, const float *dy, int64_t B, int64_t T,
                        int64_t H, int64_t K, int64_t D, float scale, const float *cos, const float *sin, int64_t cs_b,
                        int64_t R, float *dx, int threads) {
    (void)x; (void)y; (void)lse; (void)dy; (void)B; (void)T; (void)H; (void)K; (void)D; (void)scale; (void)cos;
    (void)sin; (void)cs_b; (void)R; (void)dx; (void)threads;
    return -1;
}

int lmlab_rmsnorm_forward(const float *x, int64_t rows, int64_t C, const float *w, float eps, float *out, float *r,
                          int threads) {
    (void)x; (void)rows; (void)C; (void)w; (void)eps; (void)out; (void)r; (void)threads;
    return -1;
}

int lmlab_rmsnorm_backward(const float *x, const float *w, const float *r, const float *g, int64_t rows, int64_t C,
                           float *dx, float *dw, int threads) {
    (void)x; (void)w; (void)r; (void)g; (void)rows; (void)C; (void)dx; (void)dw; (void)threads;
    return -1;
}
#endif
