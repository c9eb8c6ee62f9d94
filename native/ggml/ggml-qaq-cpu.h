// qaq CPU kernels: declarations for ggml-cpu's type_traits_cpu rows.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

void quantize_row_qaq3(const float * x, void * y, int64_t k);
void quantize_row_qaq2(const float * x, void * y, int64_t k);

void ggml_vec_dot_qaq3_q8_0(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc);
void ggml_vec_dot_qaq2_q8_0(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc);

void quantize_row_qaq4l(const float * x, void * y, int64_t k);
void quantize_row_qaq3l(const float * x, void * y, int64_t k);
void quantize_row_qaq2l(const float * x, void * y, int64_t k);
void quantize_row_qaq4h(const float * x, void * y, int64_t k);
void quantize_row_qaq3h(const float * x, void * y, int64_t k);
void quantize_row_qaq2h(const float * x, void * y, int64_t k);
void quantize_row_tcq3(const float * x, void * y, int64_t k);
void quantize_row_tcq2(const float * x, void * y, int64_t k);

void ggml_vec_dot_qaq4l_q8_0(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc);
void ggml_vec_dot_qaq3l_q8_0(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc);
void ggml_vec_dot_qaq2l_q8_0(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc);
void ggml_vec_dot_qaq4h_q8_0(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc);
void ggml_vec_dot_qaq3h_q8_0(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc);
void ggml_vec_dot_qaq2h_q8_0(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc);
void ggml_vec_dot_tcq3_q8_0(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc);
void ggml_vec_dot_tcq2_q8_0(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc);

// x against nq q8_0 rows (vy, by bytes apart): s[r] = x . y_r, each as the single-row vec_dot computes it; flash
// attention's query heads that read one K row share the decoding of its indices (ggml_cpu_vec_dot_rows)
void ggml_vec_dot_qaq3_q8_0_rows (int n, float * s, const void * x, const void * y, size_t by, int nq);
void ggml_vec_dot_qaq2_q8_0_rows (int n, float * s, const void * x, const void * y, size_t by, int nq);
void ggml_vec_dot_qaq4l_q8_0_rows(int n, float * s, const void * x, const void * y, size_t by, int nq);
void ggml_vec_dot_qaq3l_q8_0_rows(int n, float * s, const void * x, const void * y, size_t by, int nq);
void ggml_vec_dot_qaq2l_q8_0_rows(int n, float * s, const void * x, const void * y, size_t by, int nq);
void ggml_vec_dot_qaq4h_q8_0_rows(int n, float * s, const void * x, const void * y, size_t by, int nq);
void ggml_vec_dot_qaq3h_q8_0_rows(int n, float * s, const void * x, const void * y, size_t by, int nq);
void ggml_vec_dot_qaq2h_q8_0_rows(int n, float * s, const void * x, const void * y, size_t by, int nq);
void ggml_vec_dot_tcq3_q8_0_rows (int n, float * s, const void * x, const void * y, size_t by, int nq);
void ggml_vec_dot_tcq2_q8_0_rows (int n, float * s, const void * x, const void * y, size_t by, int nq);

// rows as f32 for flash attention's K and V (the same values as dequantize_row_*; AVX2 where available)
void dequantize_row_qaq3_cpu (const void * x, float * y, int64_t k);
void dequantize_row_qaq2_cpu (const void * x, float * y, int64_t k);
void dequantize_row_qaq4l_cpu(const void * x, float * y, int64_t k);
void dequantize_row_qaq3l_cpu(const void * x, float * y, int64_t k);
void dequantize_row_qaq2l_cpu(const void * x, float * y, int64_t k);
void dequantize_row_qaq4h_cpu(const void * x, float * y, int64_t k);
void dequantize_row_qaq3h_cpu(const void * x, float * y, int64_t k);
void dequantize_row_qaq2h_cpu(const void * x, float * y, int64_t k);
void dequantize_row_tcq3_cpu (const void * x, float * y, int64_t k);
void dequantize_row_tcq2_cpu (const void * x, float * y, int64_t k);

#ifdef __cplusplus
}
#endif
