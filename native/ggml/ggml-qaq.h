// qaq3 and qaq2, the lean qaq4l, qaq3l and qaq2l, their head-64 siblings qaq4h, qaq3h and qaq2h, and the trellis-coded
// tcq3 and tcq2: sub-4-bit KV-cache types (docs/cache-types.md has the design
// study behind every choice). This header is the C API of the reference code in ggml-qaq.c; the block layouts,
// codebooks, scale formats and the per-block math are in ggml-qaq-common.h, which the CUDA code (ggml-qaq.cuh)
// shares.
#pragma once

#include "ggml-qaq-common.h"

#ifdef __cplusplus
extern "C" {
#endif

// reference quantizers (set_rows / cpy into the cache) and dequantizers (get_rows, V rows in flash attention)
void quantize_row_qaq3_ref(const float * x, block_qaq3 * y, int64_t k);
void quantize_row_qaq2_ref(const float * x, block_qaq2 * y, int64_t k);
void dequantize_row_qaq3(const block_qaq3 * x, float * y, int64_t k);
void dequantize_row_qaq2(const block_qaq2 * x, float * y, int64_t k);
void quantize_row_qaq4l_ref(const float * x, block_qaq4l * y, int64_t k);
void quantize_row_qaq3l_ref(const float * x, block_qaq3l * y, int64_t k);
void quantize_row_qaq2l_ref(const float * x, block_qaq2l * y, int64_t k);
void dequantize_row_qaq4l(const block_qaq4l * x, float * y, int64_t k);
void dequantize_row_qaq3l(const block_qaq3l * x, float * y, int64_t k);
void dequantize_row_qaq2l(const block_qaq2l * x, float * y, int64_t k);
void quantize_row_qaq4h_ref(const float * x, block_qaq4h * y, int64_t k);
void quantize_row_qaq3h_ref(const float * x, block_qaq3h * y, int64_t k);
void quantize_row_qaq2h_ref(const float * x, block_qaq2h * y, int64_t k);
void dequantize_row_qaq4h(const block_qaq4h * x, float * y, int64_t k);
void dequantize_row_qaq3h(const block_qaq3h * x, float * y, int64_t k);
void dequantize_row_qaq2h(const block_qaq2h * x, float * y, int64_t k);

void quantize_row_tcq3_ref(const float * x, block_tcq3 * y, int64_t k);
void quantize_row_tcq2_ref(const float * x, block_tcq2 * y, int64_t k);
void dequantize_row_tcq3(const block_tcq3 * x, float * y, int64_t k);
void dequantize_row_tcq2(const block_tcq2 * x, float * y, int64_t k);
// the trellis quantizers with a port of qaq_tcq_walk_ref that finds the same walks (ggml-cpu's AVX2 one): same bytes
void quantize_row_tcq3_walk(const float * x, block_tcq3 * y, int64_t k, qaq_tcq_walk_t walk);
void quantize_row_tcq2_walk(const float * x, block_tcq2 * y, int64_t k, qaq_tcq_walk_t walk);

// The least-squares fits of the quantizers' scale search, one per candidate inverse scale id[i]: the levels nearest
// to x*id[i], then ds[i] = sum x*t / sum t*t and err[i] = sumx2 - ds[i] * sum x*t with the sums in index order, ok[i]
// false when the fit is degenerate. qaq_fit_ref is the reference; the _fit quantizers take a port with the same
// results bit for bit (ggml-cpu's vectorized one) and write the same bytes as _ref. qaq_fit_t: ggml-qaq-common.h.
void qaq_fit_ref(const float * x, int n, float sumx2, const float * id, int nid, const int8_t * T, const float * mid,
                 int nmid, float * ds, float * err, bool * ok);
void quantize_row_qaq3_fit (const float * x, block_qaq3  * y, int64_t k, qaq_fit_t fit);
void quantize_row_qaq2_fit (const float * x, block_qaq2  * y, int64_t k, qaq_fit_t fit);
void quantize_row_qaq4l_fit(const float * x, block_qaq4l * y, int64_t k, qaq_fit_t fit);
void quantize_row_qaq3l_fit(const float * x, block_qaq3l * y, int64_t k, qaq_fit_t fit);
void quantize_row_qaq2l_fit(const float * x, block_qaq2l * y, int64_t k, qaq_fit_t fit);
void quantize_row_qaq4h_fit(const float * x, block_qaq4h * y, int64_t k, qaq_fit_t fit);
void quantize_row_qaq3h_fit(const float * x, block_qaq3h * y, int64_t k, qaq_fit_t fit);
void quantize_row_qaq2h_fit(const float * x, block_qaq2h * y, int64_t k, qaq_fit_t fit);

// ggml_quantize_chunk entry points (no importance matrix: the cache has none)
size_t quantize_qaq3(const float * src, void * dst, int64_t nrows, int64_t n_per_row, const float * imatrix);
size_t quantize_qaq2(const float * src, void * dst, int64_t nrows, int64_t n_per_row, const float * imatrix);
size_t quantize_qaq4l(const float * src, void * dst, int64_t nrows, int64_t n_per_row, const float * imatrix);
size_t quantize_qaq3l(const float * src, void * dst, int64_t nrows, int64_t n_per_row, const float * imatrix);
size_t quantize_qaq2l(const float * src, void * dst, int64_t nrows, int64_t n_per_row, const float * imatrix);
size_t quantize_qaq4h(const float * src, void * dst, int64_t nrows, int64_t n_per_row, const float * imatrix);
size_t quantize_qaq3h(const float * src, void * dst, int64_t nrows, int64_t n_per_row, const float * imatrix);
size_t quantize_qaq2h(const float * src, void * dst, int64_t nrows, int64_t n_per_row, const float * imatrix);
size_t quantize_tcq3(const float * src, void * dst, int64_t nrows, int64_t n_per_row, const float * imatrix);
size_t quantize_tcq2(const float * src, void * dst, int64_t nrows, int64_t n_per_row, const float * imatrix);

#ifdef __cplusplus
}
#endif
