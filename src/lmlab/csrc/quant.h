/* lmlab's quantized weights as the C code sees them (quant.c: the layouts and kernels). */
#ifndef LMLAB_QUANT_H
#define LMLAB_QUANT_H
#include <stdint.h>

enum { LMLAB_Q8 = 1, LMLAB_Q4 = 2 }; /* lmlab_qpart.type; lmlab/quant/__init__.py's Q8 and Q4 */
#define LMLAB_QPARTS 4                 /* parts one matrix may be stacked from (q, k, v: 3) */

typedef struct { /* rows of a matrix in one layout (see quant.c) */
    int64_t type;       /* LMLAB_Q8 or LMLAB_Q4 */
    int64_t rows;       /* rows of W in this part */
    int64_t group;      /* values per scale: 32, or 16 (LMLAB_Q8 only) */
    const void *q;      /* Q8: int8 (rows, K); Q4: uint8 (rows, K / 2) */
    const void *scale;  /* (rows, K / group): float, or float16 where scale16 */
    const void *min;    /* Q4: (rows, K / 32), the scales' type, or NULL for m = -8 d (Q4_0; -16 d with qh); Q8: NULL */
    int64_t scale16;    /* 1: scale and min are float16 (the file's own, exact); 0: float32 */
    const void *qh;     /* Q4 only, or NULL: uint32 (rows, K / 32), bit j the fifth bit of the
                           group's value j (GGUF's Q5_0: 0..31, min NULL for m = -16 d) */
    int64_t tile;       /* 0, or 16 for rows in blocks of 16 (LMLAB_QTILE, quant.c; Q4, or Q8 with group 32) */
} lmlab_qpart;

#define LMLAB_QTILE 16 /* rows per block of a tiled part */

typedef struct { /* a quantized weight matrix (N, K): its parts stacked by rows */
    int64_t n_parts;
    lmlab_qpart parts[LMLAB_QPARTS];
} lmlab_qmat;

typedef struct { /* M rows of K activations, quantized to int8 per group of 32 (held as int16) */
    int M, K;
    int16_t *x16;    /* (M, K) */
    float *sx;       /* (M, K / 32) scales */
    float *xsum;     /* (M, K / 32) sx * sum of the group's quants */
} lmlab_qx;

void lmlab_q_quantize_x(const float *x, int M, int K, lmlab_qx *qx);
void lmlab_q_matmul_range(const lmlab_qmat *w, const lmlab_qx *qx, int64_t n0, int64_t n1, float *y, int ldy);

#endif
