/* The quantized matmul (src/lmlab/csrc/quant.c) against its definition, as a program of its own:
 * for a build that Python cannot load, such as an Arm one cross-compiled and run under qemu
 * (tests/test_quant_arm.py). For every layout (Q8 in groups of 32 and 16, Q4 with a min, Q4_0's
 * -8 d, Q5_0's fifth bits; float32 and float16 scales; two parts stacked), random bytes and
 * 1 to 9 rows of x: lmlab_qlinear against x rounded to int8 per 32 values (scale max|x| / 127,
 * ties to even) times W as lmlab_q_dequant_rows reads it (the plain C loop), summed in double.
 * Only float rounding may differ. Prints the build's integer dot product and "ok", or the case
 * that failed (exit 1). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "quant.h"

int lmlab_qlinear(const float *x, int M, int K, const lmlab_qmat *w, int N, const float *bias, float *y, int threads);
void lmlab_q_dequant_rows(const lmlab_qmat *w, int K, int64_t r0, int64_t r1, float *out);
const char *lmlab_q_isa(void);

static uint64_t state = 88172645463325252ull;
static uint32_t rnd(void) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return (uint32_t)(state >> 16);
}
static float uniform(void) { return (float)(rnd() >> 8) / 16777216.0f; } /* [0, 1) */

enum { Q8G32, Q8G16, Q4MIN, Q4_0, Q5_0 };
static const char *NAMES[] = {"q8", "q8 groups of 16", "q4 with a min", "q4_0", "q5_0"};

/* a part of `rows` rows in layout `kind`; its buffers are never freed (a short-lived program) */
static lmlab_qpart make_part(int kind, int64_t rows, int K, int half) {
    lmlab_qpart p;
    memset(&p, 0, sizeof p);
    p.rows = rows;
    p.scale16 = half;
    if (kind == Q8G32 || kind == Q8G16) {
        p.type = LMLAB_Q8;
        p.group = kind == Q8G16 ? 16 : 32;
        int8_t *q = malloc((size_t)rows * K);
        for (size_t i = 0; i < (size_t)rows * K; i++) q[i] = (int8_t)(rnd() & 255);
        p.q = q;
    } else {
        p.type = LMLAB_Q4;
        p.group = 32;
        uint8_t *q = malloc((size_t)rows * K / 2);
        for (size_t i = 0; i < (size_t)rows * K / 2; i++) q[i] = (uint8_t)(rnd() & 255);
        p.q = q;
        if (kind == Q5_0) {
            uint32_t *qh = malloc(sizeof(uint32_t) * (size_t)rows * K / 32);
            for (size_t i = 0; i < (size_t)rows * K / 32; i++) qh[i] = rnd() ^ (rnd() << 16);
            p.qh = qh;
        }
    }
    const size_t ns = (size_t)rows * K / p.group;
    const int with_min = kind == Q4MIN;
    if (half) {
        _Float16 *d = malloc(sizeof(_Float16) * ns), *mn = with_min ? malloc(sizeof(_Float16) * ns) : NULL;
        for (size_t i = 0; i < ns; i++) d[i] = (_Float16)uniform();
        for (size_t i = 0; with_min && i < ns; i++) mn[i] = (_Float16)(2 * uniform() - 1);
        p.scale = d;
        p.min = mn;
    } else {
        float *d = malloc(sizeof(float) * ns), *mn = with_min ? malloc(sizeof(float) * ns) : NULL;
        for (size_t i = 0; i < ns; i++) d[i] = uniform();
        for (size_t i = 0; with_min && i < ns; i++) mn[i] = 2 * uniform() - 1;
        p.scale = d;
        p.min = mn;
    }
    return p;
}

/* one case: parts of kinds a (and b, when b >= 0) stacked, M rows of K; 0 when it agrees */
static int check(int a, int b, int M, int K, int half) {
    lmlab_qmat w;
    memset(&w, 0, sizeof w);
    w.n_parts = b >= 0 ? 2 : 1;
    w.parts[0] = make_part(a, 13, K, half);
    if (b >= 0) w.parts[1] = make_part(b, 7, K, !half);
    const int N = (int)(w.parts[0].rows + (b >= 0 ? w.parts[1].rows : 0));
    float *W = malloc(sizeof(float) * (size_t)N * K), *x = malloc(sizeof(float) * (size_t)M * K);
    float *xq = malloc(sizeof(float) * (size_t)M * K), *bias = malloc(sizeof(float) * N);
    float *y = malloc(sizeof(float) * (size_t)M * N);
    lmlab_q_dequant_rows(&w, K, 0, N, W);
    for (size_t i = 0; i < (size_t)M * K; i++) x[i] = 4 * uniform() - 2;
    if (M > 1) memset(x + K, 0, sizeof(float) * 32); /* a group of zeros: scale 0 */
    for (int i = 0; i < N; i++) bias[i] = 2 * uniform() - 1;
    for (size_t g = 0; g < (size_t)M * K / 32; g++) {
        float amax = 0;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(x[32 * g + i]));
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        for (int i = 0; i < 32; i++) xq[32 * g + i] = nearbyintf(x[32 * g + i] * id) * d;
    }
    int rc = lmlab_qlinear(x, M, K, &w, N, bias, y, 2);
    double err = 0, top = 0;
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double want = bias[n];
            for (int k = 0; k < K; k++) want += (double)xq[(size_t)m * K + k] * W[(size_t)n * K + k];
            err = fmax(err, fabs(y[(size_t)m * N + n] - want));
            top = fmax(top, fabs(want));
        }
    if (rc != 0 || !(err <= 1e-4 * (1 + top))) {
        printf("FAIL %s%s%s, %s scales, %d x %d: rc %d, max error %.3g of %.3g\n", NAMES[a], b >= 0 ? " + " : "",
               b >= 0 ? NAMES[b] : "", half ? "float16" : "float32", M, K, rc, err, top);
        return 1;
    }
    return 0;
}

int main(void) {
    static const int Ms[] = {1, 2, 3, 5, 8, 9}, Ks[] = {32, 64, 96, 160, 576};
    int cases = 0, failed = 0;
    for (int a = 0; a < 5; a++)
        for (int half = 0; half < 2; half++)
            for (int i = 0; i < 6; i++)
                for (int j = 0; j < 5; j++) {
                    failed += check(a, (a + i) % 5 == a ? -1 : (a + i) % 5, Ms[i], Ks[j], half);
                    cases++;
                }
    printf("%s: %d of %d cases %s\n", lmlab_q_isa(), cases - failed, cases, failed ? "agree" : "agree, ok");
    return failed != 0;
}
