// qaq3 and qaq2, and the lean qaq4l, qaq3l and qaq2l: sub-4-bit KV-cache types (docs/cache-types.md has the design
// study behind every choice).
//
// Both store 32 values per block with two 8-bit float scales (one per 16 values) and an index per value into a
// fixed, symmetric int8 codebook (Lloyd-Max levels for Gaussian data: llama.cpp Hadamard-rotates quantized K/V,
// which makes the rows Gaussian):
//
//   x[j] = ue5m3(d[j/16]) * kvalues_qaq{3,2}[index(j)]
//
//   qaq3: 14 bytes / 32 values = 3.5 bits per value; 3-bit index = 2 low bits in qs, 1 high bit in qh
//   qaq2: 10 bytes / 32 values = 2.5 bits per value; 2-bit index in qs
//
// Index packing (as q3_K/q5_0: no field crosses a byte): value j's low 2 bits are bits 2*(j/8)..2*(j/8)+1 of
// qs[j%8]; qaq3's high bit is bit j%8 of qh[j/8].
//
// ue5m3 scale: an fp16 without its sign bit and its low 7 mantissa bits, i.e. fp16 bits = (uint16_t) d << 7.
// Range 2^-17 .. 61440 (byte 0xF7; 0xF8 and above would decode as inf/nan and are never written), 3 mantissa
// bits. Decoding is a shift: no table, no multiply by a super-scale.
//
// This header is plain C (structs of bytes, macros), shared by the CPU, CUDA and Metal implementations.
#pragma once

#include <stdint.h>
#include <stdbool.h>
#include <stddef.h>

#define QK_QAQ 32

typedef struct {
    uint8_t d[2];            // ue5m3 scales of values 0..15 and 16..31
    uint8_t qs[QK_QAQ/4];    // low 2 bits of each 3-bit index
    uint8_t qh[QK_QAQ/8];    // high bit of each index
} block_qaq3;

typedef struct {
    uint8_t d[2];            // ue5m3 scales of values 0..15 and 16..31
    uint8_t qs[QK_QAQ/4];    // 2-bit indices
} block_qaq2;

// The lean types (qaq4l, qaq3l, qaq2l): 128 values per block and one fp16 scale, the same codebooks (plus a
// 16-level one) and the same index packing per 32 values as qaq3 / qaq2. After llama.cpp's Hadamard rotation the
// values of a row have one spread, so a scale per 128 values loses little and frees the bits of the per-16 scales:
//
//   qaq4l: 66 bytes / 128 values = 4.125 bits per value (16 levels; value j of sub-block g: nibble j%16 of
//          qs[16g + j%16], low for j < 16, as q4_0)
//   qaq3l: 50 bytes / 128 values = 3.125 bits per value (8 levels: qs[8g..8g+7], qh[4g..4g+3] as one qaq3 block)
//   qaq2l: 34 bytes / 128 values = 2.125 bits per value (4 levels: qs[8g..8g+7] as one qaq2 block)
//
//   x[j] = fp16(d) * kvalues[index(j)]
#define QK_QAQL 128

typedef struct {
    uint16_t d;              // fp16 scale
    uint8_t qs[QK_QAQL/2];   // 4-bit indices, 16 bytes per 32 values
} block_qaq4l;

typedef struct {
    uint16_t d;              // fp16 scale
    uint8_t qs[QK_QAQL/4];   // low 2 bits of each 3-bit index, 8 bytes per 32 values
    uint8_t qh[QK_QAQL/8];   // high bit of each index, 4 bytes per 32 values
} block_qaq3l;

typedef struct {
    uint16_t d;              // fp16 scale
    uint8_t qs[QK_QAQL/4];   // 2-bit indices, 8 bytes per 32 values
} block_qaq2l;

#ifdef __cplusplus
static_assert(sizeof(block_qaq3) == 14, "wrong qaq3 block size/padding");
static_assert(sizeof(block_qaq2) == 10, "wrong qaq2 block size/padding");
static_assert(sizeof(block_qaq4l) == 66, "wrong qaq4l block size/padding");
static_assert(sizeof(block_qaq3l) == 50, "wrong qaq3l block size/padding");
static_assert(sizeof(block_qaq2l) == 34, "wrong qaq2l block size/padding");
#else
_Static_assert(sizeof(block_qaq3) == 14, "wrong qaq3 block size/padding");
_Static_assert(sizeof(block_qaq2) == 10, "wrong qaq2 block size/padding");
_Static_assert(sizeof(block_qaq4l) == 66, "wrong qaq4l block size/padding");
_Static_assert(sizeof(block_qaq3l) == 50, "wrong qaq3l block size/padding");
_Static_assert(sizeof(block_qaq2l) == 34, "wrong qaq2l block size/padding");
#endif

// Codebooks (int8, symmetric): Lloyd-Max levels of a unit Gaussian scaled to +-127.
#define QAQ4_KVALUES -127, -96, -75, -58, -44, -31, -18, -6, 6, 18, 31, 44, 58, 75, 96, 127
#define QAQ3_KVALUES -127, -79, -45, -14, 14, 45, 79, 127
#define QAQ2_KVALUES -127, -38, 38, 127

// largest ue5m3 byte that decodes to a finite value (fp16 0x7B80 = 61440)
#define QAQ_UE5M3_MAX 0xF7

#if !defined(__CUDACC__) && !defined(__METAL_VERSION__)
#include <string.h>

// ue5m3 -> fp32, exactly (the fp16 (uint16_t) b << 7 as a float, built from its bits)
static inline float qaq_ue5m3_to_fp32(uint8_t b) {
    const uint32_t h    = (uint32_t) b << 7;  // fp16 bits, sign 0
    const uint32_t exp  = h >> 10;
    const uint32_t mant = h & 0x3ff;
    if (exp == 0) {
        return (float) mant * 5.9604644775390625e-8f;  // fp16 subnormal: mant * 2^-24
    }
    const uint32_t bits = ((exp + 112) << 23) | (mant << 13);  // rebias 15 -> 127
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}
#endif

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

// The least-squares fits of the quantizers' scale search, one per candidate inverse scale id[i]: the levels nearest
// to x*id[i], then ds[i] = sum x*t / sum t*t and err[i] = sumx2 - ds[i] * sum x*t with the sums in index order, ok[i]
// false when the fit is degenerate. qaq_fit_ref is the reference; the _fit quantizers take a port with the same
// results bit for bit (ggml-cpu's vectorized one) and write the same bytes as _ref.
typedef void (*qaq_fit_t)(const float * x, int n, float sumx2, const float * id, int nid, const int8_t * T,
                          const float * mid, int nmid, float * ds, float * err, bool * ok);
void qaq_fit_ref(const float * x, int n, float sumx2, const float * id, int nid, const int8_t * T, const float * mid,
                 int nmid, float * ds, float * err, bool * ok);
void quantize_row_qaq3_fit (const float * x, block_qaq3  * y, int64_t k, qaq_fit_t fit);
void quantize_row_qaq2_fit (const float * x, block_qaq2  * y, int64_t k, qaq_fit_t fit);
void quantize_row_qaq4l_fit(const float * x, block_qaq4l * y, int64_t k, qaq_fit_t fit);
void quantize_row_qaq3l_fit(const float * x, block_qaq3l * y, int64_t k, qaq_fit_t fit);
void quantize_row_qaq2l_fit(const float * x, block_qaq2l * y, int64_t k, qaq_fit_t fit);

// ggml_quantize_chunk entry points (no importance matrix: the cache has none)
size_t quantize_qaq3(const float * src, void * dst, int64_t nrows, int64_t n_per_row, const float * imatrix);
size_t quantize_qaq2(const float * src, void * dst, int64_t nrows, int64_t n_per_row, const float * imatrix);
size_t quantize_qaq4l(const float * src, void * dst, int64_t nrows, int64_t n_per_row, const float * imatrix);
size_t quantize_qaq3l(const float * src, void * dst, int64_t nrows, int64_t n_per_row, const float * imatrix);
size_t quantize_qaq2l(const float * src, void * dst, int64_t nrows, int64_t n_per_row, const float * imatrix);

#ifdef __cplusplus
}
#endif
