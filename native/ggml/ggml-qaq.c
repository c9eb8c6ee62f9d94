// qaq3 / qaq2 / qaq4l / qaq3l / qaq2l / qaq4h / qaq3h / qaq2h / tcq3 / tcq2 reference quantizers and dequantizers (compiled into
// ggml-base). The per-block math, layouts and codebooks are in ggml-qaq-common.h, shared with the CUDA kernels; this
// file runs it over rows.
//
// Built with -ffp-contract=off: the float operations happen in the order written, so the numpy port
// (qaq_gguf/quants.py) and the CUDA quantizer produce the same bytes.

#include "ggml-qaq.h"

#include <assert.h>
#include <stdbool.h>
#include <string.h>

void qaq_fit_ref(const float * x, int n, float sumx2, const float * id, int nid, const int8_t * T, const float * mid,
                 int nmid, float * ds, float * err, bool * ok) {
    // the shared fit reads the tables itself: T and mid are always the type's own (qaq_kvalues / qaq_kmid)
    const int nlev = nmid + 1;
    assert(memcmp(T, qaq_kvalues(nlev), (size_t) nlev) == 0 && memcmp(mid, qaq_kmid(nlev), sizeof(float)*nmid) == 0);
    (void) T;
    (void) mid;
    for (int i = 0; i < nid; ++i) {
        ok[i] = qaq_fit(nlev, x, n, sumx2, id[i], &ds[i], &err[i]);
    }
}

#define QAQ_ROW_FUNCS(name, qk)                                                                                     \
void quantize_row_##name##_ref(const float * x, block_##name * y, int64_t k) {                                     \
    quantize_row_##name##_fit(x, y, k, qaq_fit_ref);                                                                \
}                                                                                                                   \
void quantize_row_##name##_fit(const float * x, block_##name * y, int64_t k, qaq_fit_t fit) {                      \
    assert(k % (qk) == 0);                                                                                          \
    for (int64_t i = 0; i < k / (qk); ++i) {                                                                        \
        qaq_quantize_block_##name(x + i*(qk), y + i, fit);                                                          \
    }                                                                                                               \
}                                                                                                                   \
void dequantize_row_##name(const block_##name * x, float * y, int64_t k) {                                         \
    assert(k % (qk) == 0);                                                                                          \
    for (int64_t i = 0; i < k / (qk); ++i) {                                                                        \
        qaq_dequantize_block_##name(x + i, y + i*(qk));                                                             \
    }                                                                                                               \
}                                                                                                                   \
size_t quantize_##name(const float * src, void * dst, int64_t nrows, int64_t n_per_row, const float * imatrix) {  \
    (void) imatrix;                                                                                                 \
    const size_t row_size = (size_t) (n_per_row / (qk)) * sizeof(block_##name);                                    \
    for (int64_t r = 0; r < nrows; ++r) {                                                                           \
        quantize_row_##name##_ref(src + r*n_per_row, (block_##name *) ((char *) dst + r*row_size), n_per_row);     \
    }                                                                                                               \
    return nrows * row_size;                                                                                        \
}

QAQ_ROW_FUNCS(qaq3,  QK_QAQ)
QAQ_ROW_FUNCS(qaq2,  QK_QAQ)
QAQ_ROW_FUNCS(qaq4l, QK_QAQL)
QAQ_ROW_FUNCS(qaq3l, QK_QAQL)
QAQ_ROW_FUNCS(qaq2l, QK_QAQL)
QAQ_ROW_FUNCS(qaq4h, QK_QAQH)
QAQ_ROW_FUNCS(qaq3h, QK_QAQH)
QAQ_ROW_FUNCS(qaq2h, QK_QAQH)

#define TCQ_ROW_FUNCS(name, kbits)                                                                                  \
void quantize_row_##name##_ref(const float * x, block_##name * y, int64_t k) {                                     \
    quantize_row_##name##_walk(x, y, k, qaq_tcq_walk_ref);                                                          \
}                                                                                                                   \
void quantize_row_##name##_walk(const float * x, block_##name * y, int64_t k, qaq_tcq_walk_t walk) {               \
    assert(k % QK_TCQ == 0);                                                                                        \
    for (int64_t i = 0; i < k / QK_TCQ; ++i) {                                                                      \
        qaq_tcq_quantize_block(kbits, x + i*QK_TCQ, &y[i].d, y[i].qs, walk);                                        \
    }                                                                                                               \
}                                                                                                                   \
void dequantize_row_##name(const block_##name * x, float * y, int64_t k) {                                         \
    assert(k % QK_TCQ == 0);                                                                                        \
    for (int64_t i = 0; i < k / QK_TCQ; ++i) {                                                                      \
        qaq_tcq_dequantize_block(kbits, x[i].d, x[i].qs, y + i*QK_TCQ);                                             \
    }                                                                                                               \
}                                                                                                                   \
size_t quantize_##name(const float * src, void * dst, int64_t nrows, int64_t n_per_row, const float * imatrix) {  \
    (void) imatrix;                                                                                                 \
    const size_t row_size = (size_t) (n_per_row / QK_TCQ) * sizeof(block_##name);                                 \
    for (int64_t r = 0; r < nrows; ++r) {                                                                           \
        quantize_row_##name##_ref(src + r*n_per_row, (block_##name *) ((char *) dst + r*row_size), n_per_row);     \
    }                                                                                                               \
    return nrows * row_size;                                                                                        \
}

TCQ_ROW_FUNCS(tcq3, 3)
TCQ_ROW_FUNCS(tcq2, 2)
