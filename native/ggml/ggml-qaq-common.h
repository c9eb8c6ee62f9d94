// The per-block math of the qaq cache types, in one header for the C reference (ggml-qaq.c, via ggml-qaq.h) and the
// CUDA kernels (ggml-qaq.cuh): block layouts, codebooks and decision thresholds, the ue5m3 and fp16 scales, the
// quantizer and dequantizer of one block, the index decoders. Design: docs/cache-types.md.
//
// As llama.cpp's ggml-common.h shares upstream's blocks, one text compiles two ways:
//   - under a C or C++ compiler (QAQ_COMMON_GPU 0) the functions are plain `static inline`, float operations are the
//     language's (the C reference is compiled with -ffp-contract=off), codebook levels and thresholds are table loads;
//   - under nvcc / hipcc (QAQ_COMMON_GPU 1) they are `__host__ __device__`; codebook levels come from four packed
//     bytes through __byte_perm and thresholds from constant selects, the representations the kernels use. In the
//     device pass every float operation and comparison of the quantizer is an IEEE round-to-nearest instruction
//     without .ftz (ggml-cuda builds with -use_fast_math); in the host pass the same functions run on the CPU with
//     plain C++ operations and a software __byte_perm, which is how tests/native/test_cuda_host.cu checks them
//     against the C reference without a GPU.
// So the bytes are specified once: quantize_row_qaq*_ref (C), quantize_f32_qaq*_block (CUDA) and the numpy port
// (qaq_gguf/quants.py) agree to the last rounding. What differs between the two compilations is confined to the
// primitives (qaq_fadd .. qaq_byte_perm, the fp16 conversions) and to qaq_level / qaq_mid.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__) || defined(__MUSACC__)
#define QAQ_COMMON_GPU 1
#else
#define QAQ_COMMON_GPU 0
#endif

#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__) || defined(__MUSA_ARCH__)
#define QAQ_DEVICE_PASS 1  // the device side of a GPU compilation
#else
#define QAQ_DEVICE_PASS 0
#endif

#ifdef __cplusplus
#include <cstdint>
#include <cstddef>
#include <cstring>
#include <cmath>
#define QAQ_STATIC_ASSERT(c, msg) static_assert(c, msg)
#define QAQ_NULL nullptr
#else
#include <stdint.h>
#include <stdbool.h>
#include <stddef.h>
#include <string.h>
#include <math.h>
#define QAQ_STATIC_ASSERT(c, msg) _Static_assert(c, msg)
#define QAQ_NULL NULL
#endif

#if QAQ_COMMON_GPU
#if defined(__CUDACC__) && !defined(__HIPCC__) && !defined(GGML_USE_MUSA)
#include <cuda_fp16.h>
#endif
#define QAQ_FN static __host__ __device__ __forceinline__
#define QAQ_PRAGMA(x) _Pragma(#x)
#define QAQ_UNROLL(n) QAQ_PRAGMA(unroll n)
#define QAQ_UNROLL_FULL QAQ_PRAGMA(unroll)
#else
#define QAQ_FN static inline
#define QAQ_UNROLL(n)
#define QAQ_UNROLL_FULL
#endif

// ---------------------------------------------------------------------------------------------------------------------
// block layouts
//
// qaq3 / qaq2: 32 values per block with two 8-bit float scales (one per 16 values) and an index per value into a
// fixed, symmetric int8 codebook (Lloyd-Max levels for Gaussian data: llama.cpp Hadamard-rotates quantized K/V, which
// makes the rows Gaussian):
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

// The head-64 types (qaq4h, qaq3h, qaq2h): the lean types with 64 values per block, for head sizes that 128 does not
// divide (64: SmolLM2, most small Llama models). The same fields, half as many indices per scale:
//
//   qaq4h: 34 bytes / 64 values = 4.25 bits per value (packing as qaq4l)
//   qaq3h: 26 bytes / 64 values = 3.25 bits per value (qs[8g..8g+7], qh[4g..4g+3] as one qaq3 block, g = 0, 1)
//   qaq2h: 18 bytes / 64 values = 2.25 bits per value (qs[8g..8g+7] as one qaq2 block)
//
// Their quantizer and dequantizer are the lean types' with QK_QAQH values per block.
#define QK_QAQH 64

typedef struct {
    uint16_t d;              // fp16 scale
    uint8_t qs[QK_QAQH/2];   // 4-bit indices, 16 bytes per 32 values
} block_qaq4h;

typedef struct {
    uint16_t d;              // fp16 scale
    uint8_t qs[QK_QAQH/4];   // low 2 bits of each 3-bit index, 8 bytes per 32 values
    uint8_t qh[QK_QAQH/8];   // high bit of each index, 4 bytes per 32 values
} block_qaq3h;

typedef struct {
    uint16_t d;              // fp16 scale
    uint8_t qs[QK_QAQH/4];   // 2-bit indices, 8 bytes per 32 values
} block_qaq2h;

QAQ_STATIC_ASSERT(sizeof(block_qaq3) == 14, "wrong qaq3 block size/padding");
QAQ_STATIC_ASSERT(sizeof(block_qaq2) == 10, "wrong qaq2 block size/padding");
QAQ_STATIC_ASSERT(sizeof(block_qaq4l) == 66, "wrong qaq4l block size/padding");
QAQ_STATIC_ASSERT(sizeof(block_qaq3l) == 50, "wrong qaq3l block size/padding");
QAQ_STATIC_ASSERT(sizeof(block_qaq2l) == 34, "wrong qaq2l block size/padding");
QAQ_STATIC_ASSERT(sizeof(block_qaq4h) == 34, "wrong qaq4h block size/padding");
QAQ_STATIC_ASSERT(sizeof(block_qaq3h) == 26, "wrong qaq3h block size/padding");
QAQ_STATIC_ASSERT(sizeof(block_qaq2h) == 18, "wrong qaq2h block size/padding");

// ---------------------------------------------------------------------------------------------------------------------
// codebooks and decision thresholds
//
// Codebooks (int8, symmetric): Lloyd-Max levels of a unit Gaussian scaled to +-127. The thresholds between
// neighbouring levels are their midpoints; the index of a value is the number of thresholds below it.
// A test build may replace these lists (tests/native/test_cuda_host.cu's drift check does) by defining them first.
#ifndef QAQ4_KVALUES
#define QAQ4_KVALUES -127, -96, -75, -58, -44, -31, -18, -6, 6, 18, 31, 44, 58, 75, 96, 127
#endif
#ifndef QAQ3_KVALUES
#define QAQ3_KVALUES -127, -79, -45, -14, 14, 45, 79, 127
#endif
#ifndef QAQ2_KVALUES
#define QAQ2_KVALUES -127, -38, 38, 127
#endif
#ifndef QAQ4_KMID
#define QAQ4_KMID -111.5f, -85.5f, -66.5f, -51.0f, -37.5f, -24.5f, -12.0f, 0.0f, \
                    12.0f,  24.5f,  37.5f,  51.0f,  66.5f,  85.5f, 111.5f
#endif
#ifndef QAQ3_KMID
#define QAQ3_KMID -103.0f, -62.0f, -29.5f, 0.0f, 29.5f, 62.0f, 103.0f
#endif
#ifndef QAQ2_KMID
#define QAQ2_KMID -82.5f, 0.0f, 82.5f
#endif

// largest ue5m3 byte that decodes to a finite value (fp16 0x7B80 = 61440)
#define QAQ_UE5M3_MAX 0xF7

#define QAQ_HALF 16    // values per ue5m3 scale
#define QAQ_NTRY 11    // scale candidates amax * (0.45 + 0.07 i) / 127, i = 0..10

// the codebooks as packed bytes: qaq3 = bytes 0..3 in TAB_LO, 4..7 in TAB_HI (the 8-byte pool of
// __byte_perm(lo, hi, sel)); qaq2 = bytes 0..3; qaq4 (qaq4l's 16 levels) = bytes 0..7 in TAB0, TAB1 and 8..15 in
// TAB2, TAB3
#define QAQ_PACK4(a, b, c, d) \
    ((uint32_t) (uint8_t) (a) | (uint32_t) (uint8_t) (b) << 8 | (uint32_t) (uint8_t) (c) << 16 | (uint32_t) (uint8_t) (d) << 24)
#define QAQ_CALL(m, ...) m(__VA_ARGS__)
#define QAQ_W0_8(a0, a1, a2, a3, a4, a5, a6, a7) QAQ_PACK4(a0, a1, a2, a3)
#define QAQ_W1_8(a0, a1, a2, a3, a4, a5, a6, a7) QAQ_PACK4(a4, a5, a6, a7)
#define QAQ_W0_16(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15) QAQ_PACK4(a0,  a1,  a2,  a3)
#define QAQ_W1_16(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15) QAQ_PACK4(a4,  a5,  a6,  a7)
#define QAQ_W2_16(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15) QAQ_PACK4(a8,  a9,  a10, a11)
#define QAQ_W3_16(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15) QAQ_PACK4(a12, a13, a14, a15)

#define QAQ3_TAB_LO QAQ_CALL(QAQ_W0_8,  QAQ3_KVALUES)
#define QAQ3_TAB_HI QAQ_CALL(QAQ_W1_8,  QAQ3_KVALUES)
#define QAQ2_TAB    QAQ_CALL(QAQ_PACK4, QAQ2_KVALUES)
#define QAQ4_TAB0   QAQ_CALL(QAQ_W0_16, QAQ4_KVALUES)
#define QAQ4_TAB1   QAQ_CALL(QAQ_W1_16, QAQ4_KVALUES)
#define QAQ4_TAB2   QAQ_CALL(QAQ_W2_16, QAQ4_KVALUES)
#define QAQ4_TAB3   QAQ_CALL(QAQ_W3_16, QAQ4_KVALUES)

#ifndef QAQ_NO_CODEBOOK_CHECK  // the drift check of the host test turns these off to reach the byte comparison
QAQ_STATIC_ASSERT(QAQ3_TAB_LO == 0xF2D3B181u && QAQ3_TAB_HI == 0x7F4F2D0Eu, "qaq3 codebook changed: check the kernels");
QAQ_STATIC_ASSERT(QAQ2_TAB    == 0x7F26DA81u,                               "qaq2 codebook changed: check the kernels");
QAQ_STATIC_ASSERT(QAQ4_TAB0 == 0xC6B5A081u && QAQ4_TAB1 == 0xFAEEE1D4u &&
                  QAQ4_TAB2 == 0x2C1F1206u && QAQ4_TAB3 == 0x7F604B3Au,     "qaq4 codebook changed: check the kernels");
#endif

// ---------------------------------------------------------------------------------------------------------------------
// primitives: the only places where the device pass differs from the host

// float arithmetic and comparisons, rounded to nearest, no flush to zero, never contracted into an FMA
QAQ_FN float qaq_fadd(const float a, const float b) {
#if QAQ_DEVICE_PASS && defined(__CUDA_ARCH__) && !defined(GGML_USE_HIP) && !defined(GGML_USE_MUSA)
    float r; asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r;
#elif QAQ_DEVICE_PASS
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}
QAQ_FN float qaq_fsub(const float a, const float b) {
#if QAQ_DEVICE_PASS && defined(__CUDA_ARCH__) && !defined(GGML_USE_HIP) && !defined(GGML_USE_MUSA)
    float r; asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r;
#elif QAQ_DEVICE_PASS
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}
QAQ_FN float qaq_fmul(const float a, const float b) {
#if QAQ_DEVICE_PASS && defined(__CUDA_ARCH__) && !defined(GGML_USE_HIP) && !defined(GGML_USE_MUSA)
    float r; asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r;
#elif QAQ_DEVICE_PASS
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}
QAQ_FN float qaq_fdiv(const float a, const float b) {
#if QAQ_DEVICE_PASS && defined(__CUDA_ARCH__) && !defined(GGML_USE_HIP) && !defined(GGML_USE_MUSA)
    float r; asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r;
#elif QAQ_DEVICE_PASS
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
}
QAQ_FN bool qaq_fgt(const float a, const float b) {  // a > b, false if either is NaN
#if QAQ_DEVICE_PASS && defined(__CUDA_ARCH__) && !defined(GGML_USE_HIP) && !defined(GGML_USE_MUSA)
    uint32_t r;
    asm("{\n\t.reg .pred p;\n\tsetp.gt.f32 p, %1, %2;\n\tselp.u32 %0, 1, 0, p;\n\t}" : "=r"(r) : "f"(a), "f"(b));
    return r != 0;
#else
    return a > b;
#endif
}
QAQ_FN bool qaq_fle(const float a, const float b) {  // a <= b, false if either is NaN
#if QAQ_DEVICE_PASS && defined(__CUDA_ARCH__) && !defined(GGML_USE_HIP) && !defined(GGML_USE_MUSA)
    uint32_t r;
    asm("{\n\t.reg .pred p;\n\tsetp.le.f32 p, %1, %2;\n\tselp.u32 %0, 1, 0, p;\n\t}" : "=r"(r) : "f"(a), "f"(b));
    return r != 0;
#else
    return a <= b;
#endif
}

QAQ_FN uint32_t qaq_f32_bits(const float f) {
#if QAQ_DEVICE_PASS
    return __float_as_uint(f);
#else
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    return u;
#endif
}
QAQ_FN float qaq_bits_f32(const uint32_t u) {
#if QAQ_DEVICE_PASS
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
#endif
}
QAQ_FN float qaq_fabs(const float x) {
    return qaq_bits_f32(qaq_f32_bits(x) & 0x7FFFFFFFu);
}
QAQ_FN bool qaq_isfinite(const float x) {
    return (qaq_f32_bits(x) & 0x7F800000u) != 0x7F800000u;
}

// result byte i = byte (s >> 4i) & 7 of the 8-byte pool y:x (CUDA's __byte_perm in its default mode)
QAQ_FN uint32_t qaq_byte_perm(const uint32_t x, const uint32_t y, const uint32_t s) {
#if QAQ_DEVICE_PASS
    return __byte_perm(x, y, s);
#else
    const uint64_t pool = (uint64_t) y << 32 | x;
    uint32_t r = 0;
    for (int i = 0; i < 4; ++i) {
        r |= (uint32_t) ((pool >> 8*((s >> 4*i) & 7)) & 0xFF) << 8*i;
    }
    return r;
#endif
}

// 4 bytes from a 2-byte aligned address, little-endian (as ggml_cuda_memcpy_1<4, 2>)
QAQ_FN uint32_t qaq_load_u32_a2(const uint8_t * p) {
#if QAQ_DEVICE_PASS
    const uint16_t * q = (const uint16_t *) p;
    return (uint32_t) q[0] | (uint32_t) q[1] << 16;
#else
    return (uint32_t) p[0] | (uint32_t) p[1] << 8 | (uint32_t) p[2] << 16 | (uint32_t) p[3] << 24;
#endif
}

// ue5m3 -> fp32, exactly: the fp16 (uint16_t) b << 7 as a float, built from its bits (exponent 0: the fp16
// subnormal m * 2^-17, a normal fp32, so no flush-to-zero mode can touch it)
QAQ_FN float qaq_ue5m3_to_fp32(const uint8_t b) {
    const uint32_t e = (uint32_t) b >> 3;
    const uint32_t m = (uint32_t) b & 7;
    return e == 0 ? qaq_fmul((float) m, 7.62939453125e-06f) : qaq_bits_f32((e + 112) << 23 | m << 20);
}

// the lean types' fp16 scale: fp16 -> fp32 exactly (subnormals included), fp32 -> fp16 to nearest even. Under nvcc
// (both passes) CUDA's own conversions; under a C compiler the same results in integer arithmetic (the values of
// GGML_FP16_TO_FP32 / GGML_FP32_TO_FP16 for every non-NaN input).
QAQ_FN float qaq_fp16_to_fp32(const uint16_t h) {
#if QAQ_COMMON_GPU
    return __half2float(__ushort_as_half(h));
#else
    const uint32_t sign = (uint32_t) (h & 0x8000) << 16;
    const uint32_t exp  = (h >> 10) & 0x1F;
    const uint32_t mant = h & 0x3FF;
    if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact
        return qaq_bits_f32(sign | qaq_f32_bits((float) mant * 5.9604644775390625e-8f));
    }
    if (exp == 31) {
        return qaq_bits_f32(sign | 0x7F800000u | mant << 13);
    }
    return qaq_bits_f32(sign | (exp + 112) << 23 | mant << 13);
#endif
}
QAQ_FN uint16_t qaq_fp32_to_fp16(const float f) {
#if QAQ_COMMON_GPU
    return __half_as_ushort(__float2half_rn(f));
#else
    const uint32_t x    = qaq_f32_bits(f);
    const uint32_t sign = (x >> 16) & 0x8000;
    const uint32_t a    = x & 0x7FFFFFFFu;
    if (a > 0x7F800000u) {  // NaN: quiet, top payload bits kept
        return (uint16_t) (sign | 0x7E00 | ((a >> 13) & 0x3FF));
    }
    if (a >= 0x477FF000u) {  // >= 65520 (and inf): inf
        return (uint16_t) (sign | 0x7C00);
    }
    if (a >= 0x38800000u) {  // normal fp16: rebias, round the 13 dropped bits to nearest even
        const uint32_t r = a - 0x38000000u;
        return (uint16_t) (sign | ((r + 0x0FFFu + ((r >> 13) & 1)) >> 13));
    }
    if (a < 0x33000000u) {  // below half the smallest subnormal: zero
        return (uint16_t) sign;
    }
    const uint32_t e     = a >> 23;                    // 102 .. 112
    const uint32_t m     = (a & 0x7FFFFF) | 0x800000;  // value = m * 2^(e - 150) = (m >> (126 - e)) * 2^-24
    const uint32_t shift = 126 - e;                    // 14 .. 24
    const uint32_t rem   = m & ((1u << shift) - 1);
    const uint32_t half  = 1u << (shift - 1);
    uint32_t q = m >> shift;
    q += rem > half || (rem == half && (q & 1));
    return (uint16_t) (sign | q);
#endif
}

// ---------------------------------------------------------------------------------------------------------------------
// levels and thresholds: nlev = 16 (qaq4l, qaq4h), 8 (qaq3, qaq3l, qaq3h), 4 (qaq2, qaq2l, qaq2h)

#if !QAQ_COMMON_GPU
QAQ_FN const int8_t * qaq_kvalues(const int nlev) {
    static const int8_t t4[16] = { QAQ4_KVALUES };
    static const int8_t t3[8]  = { QAQ3_KVALUES };
    static const int8_t t2[4]  = { QAQ2_KVALUES };
    return nlev == 16 ? t4 : nlev == 8 ? t3 : t2;
}
QAQ_FN const float * qaq_kmid(const int nlev) {
    static const float m4[15] = { QAQ4_KMID };
    static const float m3[7]  = { QAQ3_KMID };
    static const float m2[3]  = { QAQ2_KMID };
    return nlev == 16 ? m4 : nlev == 8 ? m3 : m2;
}
#else
QAQ_FN float qaq_pick15(const int i, const float a0, const float a1, const float a2, const float a3, const float a4,
                        const float a5, const float a6, const float a7, const float a8, const float a9, const float a10,
                        const float a11, const float a12, const float a13, const float a14) {
    return i ==  0 ? a0  : i ==  1 ? a1  : i ==  2 ? a2  : i ==  3 ? a3  : i ==  4 ? a4  : i ==  5 ? a5  : i == 6 ? a6 :
           i ==  7 ? a7  : i ==  8 ? a8  : i ==  9 ? a9  : i == 10 ? a10 : i == 11 ? a11 : i == 12 ? a12 :
           i == 13 ? a13 : a14;
}
QAQ_FN float qaq_pick7(const int i, const float a0, const float a1, const float a2, const float a3, const float a4,
                       const float a5, const float a6) {
    return i == 0 ? a0 : i == 1 ? a1 : i == 2 ? a2 : i == 3 ? a3 : i == 4 ? a4 : i == 5 ? a5 : a6;
}
QAQ_FN float qaq_pick3(const int i, const float a0, const float a1, const float a2) {
    return i == 0 ? a0 : i == 1 ? a1 : a2;
}
#endif

// codebook value of index l as a float (GPU: a __byte_perm of the packed codebook, C: a table load)
QAQ_FN float qaq_level(const int nlev, const int l) {
#if QAQ_COMMON_GPU
    const uint32_t v = nlev == 16 ? qaq_byte_perm(l & 8 ? QAQ4_TAB2 : QAQ4_TAB0, l & 8 ? QAQ4_TAB3 : QAQ4_TAB1, l & 7)
                     : nlev == 8  ? qaq_byte_perm(QAQ3_TAB_LO, QAQ3_TAB_HI, l)
                     :              qaq_byte_perm(QAQ2_TAB, 0, l);
    return (float) (int8_t) (uint8_t) v;
#else
    return (float) qaq_kvalues(nlev)[l];
#endif
}

// threshold m between levels m and m + 1 (GPU: constant selects, folded in unrolled loops; C: a table load)
QAQ_FN float qaq_mid(const int nlev, const int m) {
#if QAQ_COMMON_GPU
    return nlev == 16 ? QAQ_CALL(qaq_pick15, m, QAQ4_KMID) : nlev == 8 ? QAQ_CALL(qaq_pick7, m, QAQ3_KMID)
                      : QAQ_CALL(qaq_pick3, m, QAQ2_KMID);
#else
    return qaq_kmid(nlev)[m];
#endif
}

// index of the nearest level = number of thresholds below v
QAQ_FN int qaq_nearest(const int nlev, const float v) {
    int i = 0;
    QAQ_UNROLL_FULL
    for (int m = 0; m < nlev - 1; ++m) {
        i += qaq_fgt(v, qaq_mid(nlev, m));
    }
    return i;
}

// ---------------------------------------------------------------------------------------------------------------------
// index decoders

// index of value j (0..31) of 32 values packed as one qaq2 / qaq3 block (qaq2l / qaq3l: per 32 values)
QAQ_FN int qaq2_index(const uint8_t * qs, const int j) {
    return (qs[j % 8] >> 2*(j / 8)) & 3;
}
QAQ_FN int qaq3_index(const uint8_t * qs, const uint8_t * qh, const int j) {
    return qaq2_index(qs, j) | ((qh[j / 8] >> (j % 8)) & 1) << 2;
}
// index of value j (0..31) of 32 qaq4l values: nibble j/16 of qs[j%16], as q4_0
QAQ_FN int qaq4_index(const uint8_t * qs, const int j) {
    return (qs[j % 16] >> 4*(j / 16)) & 0xF;
}

// four 3-bit (<= 7) indices, one per byte, -> __byte_perm selector, one per nibble (bits 3, 7, 11, 15 stay 0)
QAQ_FN uint32_t qaq_bytes_to_selector(const uint32_t idx) {
    const uint32_t t = (idx | idx >> 4) & 0x00FF00FFu;  // nibbles 0,1 = bytes 0,1; nibbles 4,5 = bytes 2,3
    return t | t >> 8;                                 // only the low 16 bits are read
}

// four 4-bit indices, one per byte, -> their qaq4 codebook values (int8) packed into an int: the low 3 bits select
// within each half of the codebook, the 4th bit between the halves (as get_int_from_table_16, with constant tables)
QAQ_FN int qaq4_lookup4(const uint32_t idx) {
    const uint32_t sel = qaq_bytes_to_selector(idx & 0x07070707u);
    const uint32_t lo  = qaq_byte_perm(QAQ4_TAB0, QAQ4_TAB1, sel);
    const uint32_t hi  = qaq_byte_perm(QAQ4_TAB2, QAQ4_TAB3, sel);
    const uint32_t b3  = (idx >> 3) & 0x01010101u;
    return (int) qaq_byte_perm(lo, hi, qaq_bytes_to_selector(0x03020100u | b3 << 2));  // byte l: lo[l] or hi[l]
}

// the codebook values (int8) of values 4*iqs .. 4*iqs+3 of 32 values packed as one qaq3/qaq2 block, iqs = 0..7,
// packed into an int (the dp4a operand): value j's low 2 bits are bits 2*(j/8) of qs[j%8], so these 4 values sit in
// qs[4*(iqs%2) .. +3] at bits 2*(iqs/2); the high bits of values 0..31 are bits 0..31 of the little-endian qh word.
// qs and qh must be 2-byte aligned.
QAQ_FN int qaq3_get_int32(const uint8_t * qs, const uint8_t * qh, const int iqs) {
    const uint32_t ql  = qaq_load_u32_a2(qs + 4*(iqs % 2));
    const uint32_t qhw = qaq_load_u32_a2(qh);
    const uint32_t lo  = (ql >> 2*(iqs / 2)) & 0x03030303u;
    const uint32_t hi  = (((qhw >> 4*iqs) & 0xFu) * 0x00204081u) & 0x01010101u;  // bit l -> byte l
    return (int) qaq_byte_perm(QAQ3_TAB_LO, QAQ3_TAB_HI, qaq_bytes_to_selector(lo | hi << 2));
}

QAQ_FN int qaq2_get_int32(const uint8_t * qs, const int iqs) {
    const uint32_t ql = qaq_load_u32_a2(qs + 4*(iqs % 2));
    const uint32_t lo = (ql >> 2*(iqs / 2)) & 0x03030303u;
    return (int) qaq_byte_perm(QAQ2_TAB, 0, qaq_bytes_to_selector(lo));
}

// qaq4l's 32 values: value j in nibble j/16 of qs[j%16] (as q4_0), so values 4*iqs .. +3 are the nibbles iqs/4 of
// qs[4*(iqs%4) .. +3]
QAQ_FN int qaq4_get_int32(const uint8_t * qs, const int iqs) {
    const uint32_t ql = qaq_load_u32_a2(qs + 4*(iqs % 4));
    return qaq4_lookup4((ql >> 4*(iqs / 4)) & 0x0F0F0F0Fu);
}

// ---------------------------------------------------------------------------------------------------------------------
// dequantization of one block of 32 values: d0 for values 0..15, d1 for 16..31, qh = NULL for 2-bit indices. The
// 8 (4) possible values of each half are tabulated first (d * level: one rounding, as d * T[l] would be), then
// every value is one table load. Value j = 8*g + b sits in qs[b] at bits 2g and in qh[g] at bit b.
QAQ_FN void qaq_dequantize_block32(const float d0, const float d1, const uint8_t * qs, const uint8_t * qh,
                                   const int nlev, float * y) {
    float tab[2][8];
    for (int h = 0; h < 2; ++h) {
        const float dh = h ? d1 : d0;
        for (int l = 0; l < nlev; ++l) {
            tab[h][l] = qaq_fmul(dh, qaq_level(nlev, l));
        }
    }
    // 8 indices at a time in a 64-bit word (byte b = value 8g + b; ggml targets are little-endian)
    uint64_t q64;
    memcpy(&q64, qs, sizeof(q64));
    for (int g = 0; g < 4; ++g) {
        uint64_t id = (q64 >> 2*g) & 0x0303030303030303ULL;
        if (qh) {
            const uint64_t hi = ((uint64_t) qh[g] * 0x0101010101010101ULL) & 0x8040201008040201ULL;  // bit b in byte b
            id |= ((hi + 0x7F7F7F7F7F7F7F7FULL) & 0x8080808080808080ULL) >> 5;                      // -> 4 or 0
        }
        const float * t = tab[g >> 1];
        for (int b = 0; b < 8; ++b) {
            y[8*g + b] = t[(id >> 8*b) & 0xFF];
        }
    }
}

// qk values (QK_QAQL: qaq4l, QK_QAQH: qaq4h) of 4-bit indices qs under the fp16 scale h
QAQ_FN void qaq_dequantize_lean4(const uint16_t h, const uint8_t * qs, const int qk, float * y) {
    const float d = qaq_fp16_to_fp32(h);
    float tab[16];
    for (int l = 0; l < 16; ++l) {
        tab[l] = qaq_fmul(d, qaq_level(16, l));
    }
    for (int g = 0; g < qk/32; ++g) {
        for (int j = 0; j < 16; ++j) {
            y[32*g + j]      = tab[qs[16*g + j] & 0xF];
            y[32*g + j + 16] = tab[qs[16*g + j] >> 4];
        }
    }
}

// qk values of 3-bit (qh != NULL) or 2-bit indices under the fp16 scale h, each 32 packed as one qaq3 / qaq2 block
QAQ_FN void qaq_dequantize_lean32s(const uint16_t h, const uint8_t * qs, const uint8_t * qh, const int qk,
                                   const int nlev, float * y) {
    const float d = qaq_fp16_to_fp32(h);
    for (int g = 0; g < qk/32; ++g) {
        qaq_dequantize_block32(d, d, qs + 8*g, qh ? qh + 4*g : QAQ_NULL, nlev, y + 32*g);
    }
}

QAQ_FN void qaq_dequantize_block_qaq4l(const block_qaq4l * x, float * y) {
    qaq_dequantize_lean4(x->d, x->qs, QK_QAQL, y);
}
QAQ_FN void qaq_dequantize_block_qaq4h(const block_qaq4h * x, float * y) {
    qaq_dequantize_lean4(x->d, x->qs, QK_QAQH, y);
}

QAQ_FN void qaq_dequantize_block_qaq3(const block_qaq3 * x, float * y) {
    qaq_dequantize_block32(qaq_ue5m3_to_fp32(x->d[0]), qaq_ue5m3_to_fp32(x->d[1]), x->qs, x->qh, 8, y);
}
QAQ_FN void qaq_dequantize_block_qaq2(const block_qaq2 * x, float * y) {
    qaq_dequantize_block32(qaq_ue5m3_to_fp32(x->d[0]), qaq_ue5m3_to_fp32(x->d[1]), x->qs, QAQ_NULL, 4, y);
}
QAQ_FN void qaq_dequantize_block_qaq3l(const block_qaq3l * x, float * y) {
    qaq_dequantize_lean32s(x->d, x->qs, x->qh, QK_QAQL, 8, y);
}
QAQ_FN void qaq_dequantize_block_qaq2l(const block_qaq2l * x, float * y) {
    qaq_dequantize_lean32s(x->d, x->qs, QAQ_NULL, QK_QAQL, 4, y);
}
QAQ_FN void qaq_dequantize_block_qaq3h(const block_qaq3h * x, float * y) {
    qaq_dequantize_lean32s(x->d, x->qs, x->qh, QK_QAQH, 8, y);
}
QAQ_FN void qaq_dequantize_block_qaq2h(const block_qaq2h * x, float * y) {
    qaq_dequantize_lean32s(x->d, x->qs, QAQ_NULL, QK_QAQH, 4, y);
}

// ---------------------------------------------------------------------------------------------------------------------
// the quantizer (docs/cache-types.md, "Reference quantizer"): per 16 values (qaq3 / qaq2), per 128 (lean types) or
// per 64 (head-64 types)
//   1. amax and sum of squares; nothing to quantize (amax 0 or not finite): scale 0, every index the one nearest 0;
//   2. scale search: 11 candidates d = amax * (0.45 + 0.07 i) / 127, each with its least-squares refit (qaq_fit),
//      the lowest error wins; one more refit with the winner's assignment;
//   3. qaq3 / qaq2: the better of the two neighbouring ue5m3 scales; lean: the scale saturated at 65504 and rounded
//      to fp16; then the indices nearest to x / d.
// Every float operation is written out in the order the numpy port follows.
//
// The C reference passes the least-squares fits of step 2 through a qaq_fit_t (ggml-cpu plugs in an AVX2 port with
// the same results bit for bit); the GPU code calls qaq_fit directly, one candidate at a time.
#if QAQ_COMMON_GPU
#define QAQ_FIT_PARAM
#define QAQ_FIT_ARG
#else
// The least-squares fits of the scale search, one per candidate inverse scale id[i]: the levels nearest to x*id[i],
// then ds[i] = sum x*t / sum t*t and err[i] = sumx2 - ds[i] * sum x*t with the sums in index order, ok[i] false when
// the fit is degenerate. T and mid are qaq_kvalues(nlev) and qaq_kmid(nlev), nmid = nlev - 1.
typedef void (*qaq_fit_t)(const float * x, int n, float sumx2, const float * id, int nid, const int8_t * T,
                          const float * mid, int nmid, float * ds, float * err, bool * ok);
#define QAQ_FIT_PARAM , qaq_fit_t fit
#define QAQ_FIT_ARG   , fit
#endif

// amax and sum of squares of n values (sequential); false when there is nothing to quantize
QAQ_FN bool qaq_stats(const float * x, const int n, float * amax, float * sumx2) {
    float a  = 0.0f;
    float s2 = 0.0f;
    QAQ_UNROLL(16)
    for (int j = 0; j < n; ++j) {
        const float ax = qaq_fabs(x[j]);
        a  = qaq_fgt(ax, a) ? ax : a;
        s2 = qaq_fadd(s2, qaq_fmul(x[j], x[j]));
    }
    *amax  = a;
    *sumx2 = s2;
    return qaq_fgt(a, 0.0f) && qaq_isfinite(a);
}

// Least-squares scale for the levels nearest to x/d (id = 1/d): sets *ds and *err = sum x^2 - ds*sum x*T, and
// returns false when the fit is degenerate. Sums run in index order.
QAQ_FN bool qaq_fit(const int nlev, const float * x, const int n, const float sumx2, const float id, float * ds,
                    float * err) {
    float sumqx = 0.0f;
    float sumq2 = 0.0f;
    QAQ_UNROLL(16)
    for (int j = 0; j < n; ++j) {
        const float t = qaq_level(nlev, qaq_nearest(nlev, qaq_fmul(x[j], id)));
        sumqx = qaq_fadd(sumqx, qaq_fmul(x[j], t));
        sumq2 = qaq_fadd(sumq2, qaq_fmul(t, t));
    }
    if (!(qaq_fgt(sumqx, 0.0f) && qaq_fgt(sumq2, 0.0f))) {
        return false;
    }
    *ds  = qaq_fdiv(sumqx, sumq2);
    *err = qaq_fsub(sumx2, qaq_fmul(*ds, sumqx));
    return true;
}

// inverse of scale candidate i: 1 / (amax * (0.45 + 0.07 i) / 127)
QAQ_FN float qaq_try_id(const float amax, const int i) {
    const float g = qaq_fadd(0.45f, qaq_fmul(0.07f, (float) i));
    const float d = qaq_fdiv(qaq_fmul(amax, g), 127.0f);
    return qaq_fdiv(1.0f, d);
}

// The least-squares scale of n values: the scale search over QAQ_NTRY candidates (as iq4_nl's, unweighted), then one
// refit with the best candidate's assignment.
QAQ_FN float qaq_best_scale(const int nlev, const float * x, const int n, const float amax, const float sumx2
                            QAQ_FIT_PARAM) {
    float best_err = INFINITY;
    float best_d   = qaq_fdiv(amax, 127.0f);
#if !QAQ_COMMON_GPU
    float id[QAQ_NTRY], ds[QAQ_NTRY], err[QAQ_NTRY];
    bool  ok[QAQ_NTRY];
    for (int i = 0; i < QAQ_NTRY; ++i) {
        id[i] = qaq_try_id(amax, i);
    }
    fit(x, n, sumx2, id, QAQ_NTRY, qaq_kvalues(nlev), qaq_kmid(nlev), nlev - 1, ds, err, ok);
#endif
    QAQ_UNROLL(1)
    for (int i = 0; i < QAQ_NTRY; ++i) {
#if QAQ_COMMON_GPU
        float dsi  = 0.0f;
        float erri = 0.0f;
        const bool oki = qaq_fit(nlev, x, n, sumx2, qaq_try_id(amax, i), &dsi, &erri);
#else
        const bool  oki  = ok[i];
        const float dsi  = ds[i];
        const float erri = err[i];
#endif
        if (oki && qaq_fgt(best_err, erri)) {  // err < best_err
            best_err = erri;
            best_d   = dsi;
        }
    }
    // one refit with the best scale's assignment
    const float best_id = qaq_fdiv(1.0f, best_d);
#if QAQ_COMMON_GPU
    float dsr  = 0.0f;
    float errr = 0.0f;
    const bool okr = qaq_fit(nlev, x, n, sumx2, best_id, &dsr, &errr);
#else
    fit(x, n, sumx2, &best_id, 1, qaq_kvalues(nlev), qaq_kmid(nlev), nlev - 1, ds, err, ok);
    const bool  okr  = ok[0];
    const float dsr  = ds[0];
    const float errr = err[0];
#endif
    if (okr && qaq_fgt(best_err, errr)) {
        best_d = dsr;
    }
    return best_d;
}

// largest ue5m3 byte whose value is <= v (0 if none), by bisection over the monotonic codes 0..QAQ_UE5M3_MAX
QAQ_FN uint8_t qaq_ue5m3_floor(const float v) {
    if (!qaq_fgt(v, 0.0f)) {
        return 0;
    }
    if (qaq_fle(qaq_ue5m3_to_fp32(QAQ_UE5M3_MAX), v)) {
        return QAQ_UE5M3_MAX;
    }
    int lo = 0;
    int hi = QAQ_UE5M3_MAX;
    while (hi - lo > 1) {  // invariant: dec(lo) <= v < dec(hi)
        const int mid = (lo + hi) / 2;
        if (qaq_fle(qaq_ue5m3_to_fp32((uint8_t) mid), v)) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return (uint8_t) lo;
}

// QAQ_HALF values: the least-squares scale, then the better of the two neighbouring ue5m3 scales. Writes the indices
// to L, returns the scale byte.
QAQ_FN uint8_t qaq_quantize_half(const int nlev, const float * x, uint8_t * L QAQ_FIT_PARAM) {
    float amax  = 0.0f;
    float sumx2 = 0.0f;
    const int izero = qaq_nearest(nlev, 0.0f);
    if (!qaq_stats(x, QAQ_HALF, &amax, &sumx2)) {
        QAQ_UNROLL_FULL
        for (int j = 0; j < QAQ_HALF; ++j) {
            L[j] = (uint8_t) izero;
        }
        return 0;
    }

    const float best_d = qaq_best_scale(nlev, x, QAQ_HALF, amax, sumx2 QAQ_FIT_ARG);

    // store: the ue5m3 neighbour (below or above) with the lower squared error
    const uint8_t b0 = qaq_ue5m3_floor(best_d);
    uint8_t best_b = b0;
    float   best_e = INFINITY;
    QAQ_UNROLL_FULL
    for (int c = 0; c < 2; ++c) {
        const int b = b0 + c;
        if (b > QAQ_UE5M3_MAX) {
            break;
        }
        const float d = qaq_ue5m3_to_fp32((uint8_t) b);
        float e = 0.0f;
        if (qaq_fgt(d, 0.0f)) {
            const float id = qaq_fdiv(1.0f, d);
            QAQ_UNROLL_FULL
            for (int j = 0; j < QAQ_HALF; ++j) {
                const float r = qaq_fsub(x[j], qaq_fmul(d, qaq_level(nlev, qaq_nearest(nlev, qaq_fmul(x[j], id)))));
                e = qaq_fadd(e, qaq_fmul(r, r));
            }
        } else {
            e = sumx2;
        }
        if (qaq_fgt(best_e, e)) {  // e < best_e
            best_e = e;
            best_b = (uint8_t) b;
        }
    }
    const float d = qaq_ue5m3_to_fp32(best_b);
    if (qaq_fgt(d, 0.0f)) {
        const float id = qaq_fdiv(1.0f, d);
        QAQ_UNROLL_FULL
        for (int j = 0; j < QAQ_HALF; ++j) {
            L[j] = (uint8_t) qaq_nearest(nlev, qaq_fmul(x[j], id));
        }
    } else {
        QAQ_UNROLL_FULL
        for (int j = 0; j < QAQ_HALF; ++j) {
            L[j] = (uint8_t) izero;
        }
    }
    return best_b;
}

// 2 low index bits of 32 values into qs[8], the high bit (3-bit indices, qh != NULL) into qh[4]
QAQ_FN void qaq_pack32(const uint8_t * L, uint8_t * qs, uint8_t * qh) {
    QAQ_UNROLL_FULL
    for (int b = 0; b < QK_QAQ/4; ++b) {
        qs[b] = (uint8_t) ((L[b] & 3) | (L[b + 8] & 3) << 2 | (L[b + 16] & 3) << 4 | (L[b + 24] & 3) << 6);
    }
    if (qh) {
        QAQ_UNROLL_FULL
        for (int b = 0; b < QK_QAQ/8; ++b) {
            uint8_t h = 0;
            QAQ_UNROLL_FULL
            for (int j = 0; j < 8; ++j) {
                h |= (uint8_t) ((L[8*b + j] >> 2) << j);
            }
            qh[b] = h;
        }
    }
}

// One block of 32 values: both halves (each copied first, so that GPU code keeps it in registers), then the 2 low
// index bits into qs and, for 3-bit indices (qh != NULL), the high bit into qh.
QAQ_FN void qaq_quantize_block32(const int nlev, const float * x, uint8_t * d, uint8_t * qs, uint8_t * qh
                                 QAQ_FIT_PARAM) {
    float   xh[QAQ_HALF];
    uint8_t L[QK_QAQ];
    QAQ_UNROLL_FULL
    for (int h = 0; h < 2; ++h) {
        QAQ_UNROLL_FULL
        for (int j = 0; j < QAQ_HALF; ++j) {
            xh[j] = x[h*QAQ_HALF + j];
        }
        d[h] = qaq_quantize_half(nlev, xh, L + h*QAQ_HALF QAQ_FIT_ARG);
    }
    qaq_pack32(L, qs, qh);
}

// A lean block (qk values: QK_QAQL, or QK_QAQH for the head-64 types): the least-squares scale over all of them,
// saturated at the largest fp16 and stored as fp16 (*h). Returns 1/d for the indices, or 0 when every index is the
// one nearest zero (nothing to quantize, or a scale that rounds to fp16 zero; *h is then 0).
QAQ_FN float qaq_quantize_lean_scale(const int nlev, const float * x, const int qk, uint16_t * h QAQ_FIT_PARAM) {
    float amax  = 0.0f;
    float sumx2 = 0.0f;
    float d     = 0.0f;
    *h = 0;
    if (qaq_stats(x, qk, &amax, &sumx2)) {
        const float best_d = qaq_best_scale(nlev, x, qk, amax, sumx2 QAQ_FIT_ARG);
        *h = qaq_fp32_to_fp16(qaq_fgt(65504.0f, best_d) ? best_d : 65504.0f);  // best_d < 65504 ? best_d : 65504
        d  = qaq_fp16_to_fp32(*h);
    }
    if (qaq_fgt(d, 0.0f) && qaq_isfinite(d)) {
        return qaq_fdiv(1.0f, d);
    }
    *h = 0;
    return 0.0f;
}

// index of value v of a lean block (id from qaq_quantize_lean_scale)
QAQ_FN int qaq_lean_index(const int nlev, const float v, const float id) {
    return qaq_fgt(id, 0.0f) ? qaq_nearest(nlev, qaq_fmul(v, id)) : qaq_nearest(nlev, 0.0f);
}

// each 32 values of a qaq3l / qaq2l (qaq3h / qaq2h) block of qk values packed as one qaq3 / qaq2 block
QAQ_FN void qaq_quantize_lean_block32s(const int nlev, const float * x, const int qk, uint16_t * d, uint8_t * qs,
                                       uint8_t * qh QAQ_FIT_PARAM) {
    uint16_t h = 0;
    const float id = qaq_quantize_lean_scale(nlev, x, qk, &h QAQ_FIT_ARG);
    *d = h;
    QAQ_UNROLL(1)
    for (int g = 0; g < qk/QK_QAQ; ++g) {
        uint8_t L[QK_QAQ];
        QAQ_UNROLL_FULL
        for (int j = 0; j < QK_QAQ; ++j) {
            L[j] = (uint8_t) qaq_lean_index(nlev, x[QK_QAQ*g + j], id);
        }
        qaq_pack32(L, qs + (QK_QAQ/4)*g, qh ? qh + (QK_QAQ/8)*g : QAQ_NULL);
    }
}

// qaq4l / qaq4h: the 4-bit indices of a block of qk values, byte b of each 16 holding values b (low nibble) and
// b + 16 (high nibble) of its 32
QAQ_FN void qaq_quantize_lean4(const float * x, const int qk, uint16_t * d, uint8_t * qs QAQ_FIT_PARAM) {
    uint16_t h = 0;
    const float id = qaq_quantize_lean_scale(16, x, qk, &h QAQ_FIT_ARG);
    *d = h;
    QAQ_UNROLL(4)
    for (int b = 0; b < qk/2; ++b) {
        const int j = QK_QAQ*(b / (QK_QAQ/2)) + b % (QK_QAQ/2);
        qs[b] = (uint8_t) (qaq_lean_index(16, x[j], id) | qaq_lean_index(16, x[j + QK_QAQ/2], id) << 4);
    }
}

// the block quantizers of the eight types (CUDA: one thread per block)
QAQ_FN void qaq_quantize_block_qaq3(const float * x, block_qaq3 * y QAQ_FIT_PARAM) {
    qaq_quantize_block32(8, x, y->d, y->qs, y->qh QAQ_FIT_ARG);
}
QAQ_FN void qaq_quantize_block_qaq2(const float * x, block_qaq2 * y QAQ_FIT_PARAM) {
    qaq_quantize_block32(4, x, y->d, y->qs, QAQ_NULL QAQ_FIT_ARG);
}
QAQ_FN void qaq_quantize_block_qaq4l(const float * x, block_qaq4l * y QAQ_FIT_PARAM) {
    qaq_quantize_lean4(x, QK_QAQL, &y->d, y->qs QAQ_FIT_ARG);
}
QAQ_FN void qaq_quantize_block_qaq3l(const float * x, block_qaq3l * y QAQ_FIT_PARAM) {
    qaq_quantize_lean_block32s(8, x, QK_QAQL, &y->d, y->qs, y->qh QAQ_FIT_ARG);
}
QAQ_FN void qaq_quantize_block_qaq2l(const float * x, block_qaq2l * y QAQ_FIT_PARAM) {
    qaq_quantize_lean_block32s(4, x, QK_QAQL, &y->d, y->qs, QAQ_NULL QAQ_FIT_ARG);
}
QAQ_FN void qaq_quantize_block_qaq4h(const float * x, block_qaq4h * y QAQ_FIT_PARAM) {
    qaq_quantize_lean4(x, QK_QAQH, &y->d, y->qs QAQ_FIT_ARG);
}
QAQ_FN void qaq_quantize_block_qaq3h(const float * x, block_qaq3h * y QAQ_FIT_PARAM) {
    qaq_quantize_lean_block32s(8, x, QK_QAQH, &y->d, y->qs, y->qh QAQ_FIT_ARG);
}
QAQ_FN void qaq_quantize_block_qaq2h(const float * x, block_qaq2h * y QAQ_FIT_PARAM) {
    qaq_quantize_lean_block32s(4, x, QK_QAQH, &y->d, y->qs, QAQ_NULL QAQ_FIT_ARG);
}

// ---------------------------------------------------------------------------------------------------------------------
// the trellis-coded types tcq3 and tcq2 (design: docs/cache-types.md, "Trellis-coded types")
//
// 64 values per block, one fp16 scale, and k bits per value (k = 3: tcq3, k = 2: tcq2) that drive a bit-shift
// trellis of 256 states, s_j = ((s_{j-1} << k) | b_j) & 255 from s_{-1} = 0; value j is d * c_k[s_j], with c_k a
// fixed 256-entry float codebook: Gaussian quantiles refined by trellis Lloyd iterations on N(0, 1) rows, computed
// once (qaq_gguf/methods/tcq.py, codebook(k, 8)), no side information. QTIP's construction (arXiv 2406.11235) for
// K and V rows in llama.cpp's Hadamard rotation.
//
//   tcq3: 26 bytes / 64 values = 3.25 bits per value; b_j = bits 3*(j%8) .. +2 of the 24-bit little-endian word
//         qs[3*(j/8)] | qs[3*(j/8)+1] << 8 | qs[3*(j/8)+2] << 16
//   tcq2: 18 bytes / 64 values = 2.25 bits per value; b_j = bits 2*(j%4) .. +1 of qs[j/4]
//
// The quantizer: u = x / amax; the walk that minimises sum_j (u_j g - c[s_j])^2 for g = rho / rms(u) (the Viterbi
// algorithm, in the tagged form of qaq_tcq_walk_ref); then the unshrunk scale d = amax * (sum u u / sum u c): the
// block's reconstruction has x itself as its component along x (the least-squares scale, sum u c / sum c c, would
// shrink every row by about the code's relative error, 2.4% at 3 bits and 9% at 2, and a logit reads a key's
// norm directly; docs/benchmarks.md, "The unshrunk scale"), saturated at 65504 and stored as fp16 (0 when the fit
// is degenerate). A block with a NaN or an infinity, or all
// zeros, is stored as d = 0 with all inputs 0. The walk is the only costly part (256 states x 2^k predecessors per
// value); decoding is a shift and a table load per value.
#define QK_TCQ 64
#define QAQ_TCQ_STATE_BITS 8
#define QAQ_TCQ_STATES (1 << QAQ_TCQ_STATE_BITS)

typedef struct {
    uint16_t d;              // fp16 scale
    uint8_t qs[QK_TCQ*3/8];  // 3-bit trellis inputs, 3 bytes per 8 values
} block_tcq3;

typedef struct {
    uint16_t d;              // fp16 scale
    uint8_t qs[QK_TCQ*2/8];  // 2-bit trellis inputs, 4 per byte
} block_tcq2;

QAQ_STATIC_ASSERT(sizeof(block_tcq3) == 26, "wrong tcq3 block size/padding");
QAQ_STATIC_ASSERT(sizeof(block_tcq2) == 18, "wrong tcq2 block size/padding");

// the codebooks (float32, exact: hex literals) and the rms of a walk's values on N(0, 1) rows per unit scale
#define QAQ_TCQ3_CODEBOOK \
    -0x1.2bb4bp-2f, -0x1.fc37bap-3f, 0x1.f3afd8p+0f, -0x1.820dacp+0f, 0x1.61644ep-1f, 0x1.ebb468p-3f, 0x1.3d22cep+0f, -0x1.90eaecp-1f, \
    -0x1.e47ec2p-2f, 0x1.955386p+0f, -0x1.7a8af2p+1f, -0x1.2c93e6p+0f, 0x1.db0be2p-3f, -0x1.5a6868p-1f, 0x1.b74d7cp-2f, -0x1.90e32ep-3f, \
    0x1.e79136p-1f, -0x1.6ec7bap-1f, 0x1.35d6eep-2f, -0x1.1ae584p+1f, 0x1.424578p+1f, -0x1.6f3ef6p+0f, 0x1.537a58p+0f, -0x1.004a9p-7f, \
    0x1.278526p-1f, -0x1.0cb95ap-1f, 0x1.8534ep-2f, 0x1.9f0532p-7f, -0x1.12fafep+0f, 0x1.1bf1cp+1f, 0x1.a5f40ap-1f, -0x1.97f5fcp+0f, \
    -0x1.1ee93ap+0f, -0x1.4c6066p-4f, -0x1.2b0fc2p-1f, 0x1.351568p-1f, 0x1.d373b6p+0f, 0x1.5dff8p+0f, -0x1.067d16p+1f, 0x1.06c426p+0f, \
    0x1.c9c984p+0f, 0x1.562cfep-2f, -0x1.465548p-2f, 0x1.94f18ep-2f, -0x1.abb20ap-5f, -0x1.4081bep-3f, -0x1.ddecd6p-2f, 0x1.dcd716p-1f, \
    0x1.8774c6p-1f, -0x1.8aa62cp+0f, -0x1.93ddfep-2f, 0x1.6a7c54p+0f, 0x1.33898ep-2f, -0x1.3d932ep-1f, 0x1.b1fc8p-2f, 0x1.c724c8p-1f, \
    -0x1.d2165cp-1f, 0x1.ead6d8p-1f, -0x1.1a3838p-8f, -0x1.598358p-1f, 0x1.655e0ep-2f, -0x1.f654e2p-3f, 0x1.471662p-3f, 0x1.0e30dep+0f, \
    -0x1.60ab54p-1f, 0x1.a73662p-3f, -0x1.5626e2p-2f, 0x1.9e2724p-3f, 0x1.436164p-1f, 0x1.f2f4d2p-1f, 0x1.45ff8ap+0f, 0x1.410468p-1f, \
    0x1.550fap-2f, -0x1.8af5dap-2f, -0x1.c5177ep+0f, 0x1.92c27p+0f, -0x1.a3036ap-3f, -0x1.14762p-5f, 0x1.7912cap-3f, -0x1.2e1448p+0f, \
    0x1.92d48cp-2f, 0x1.3d4436p-1f, -0x1.14115ap-3f, -0x1.3c8548p-1f, 0x1.4056a4p+0f, 0x1.e450ccp-2f, 0x1.0b3e8ep-11f, -0x1.7d33e4p-2f, \
    -0x1.818286p+0f, -0x1.7a3d4ep-5f, -0x1.0b05eap-1f, -0x1.f59566p-1f, 0x1.3a9016p+0f, 0x1.696dcap-2f, -0x1.417a92p-2f, 0x1.a71e2ap-1f, \
    -0x1.7ca35ep-1f, 0x1.16c8e2p-3f, -0x1.d87ba8p-1f, 0x1.10cb94p-1f, 0x1.93d4cep+0f, 0x1.7ae78p-6f, 0x1.e76b9p-1f, -0x1.f8b1e4p+0f, \
    -0x1.166afcp-5f, -0x1.381e26p+0f, -0x1.e2b99ap-2f, -0x1.5c193p-3f, 0x1.f179bap-1f, -0x1.b945b8p-2f, -0x1.9e67cep+0f, -0x1.efbf08p-1f, \
    0x1.703f52p+0f, 0x1.8da3fcp-1f, 0x1.34807p-3f, -0x1.952eep+0f, -0x1.e94ad8p-1f, -0x1.7715e4p-3f, -0x1.11ab8ap+0f, -0x1.f6f802p-1f, \
    -0x1.0b2274p+1f, 0x1.2f0dfcp-1f, -0x1.898d42p-1f, 0x1.4be524p+0f, -0x1.a7ecbcp-4f, -0x1.db6848p-2f, 0x1.d494e8p+0f, -0x1.33f908p+0f, \
    0x1.3f1936p-7f, -0x1.0d4f62p-2f, 0x1.ff35f4p+0f, 0x1.c4dddap-2f, -0x1.6c73cap+1f, 0x1.58140ep-1f, -0x1.2191bp+1f, 0x1.1a82a8p+0f, \
    0x1.4b4b3p+0f, 0x1.9b2664p-1f, -0x1.f8ef94p-4f, -0x1.b169dcp+0f, 0x1.3db89p-3f, -0x1.cffc72p-1f, 0x1.fd76a2p-1f, 0x1.a52de2p-2f, \
    -0x1.99f86cp-2f, -0x1.41e0f4p-5f, -0x1.4cfacp+0f, 0x1.0bddep-1f, 0x1.20791ap-2f, -0x1.06d614p+0f, -0x1.893feap-1f, -0x1.8bb45ap+0f, \
    -0x1.436cf6p-8f, -0x1.0fdf7cp+0f, -0x1.536216p+0f, -0x1.222764p-2f, -0x1.6f7e4cp-1f, 0x1.38b012p-2f, 0x1.9603cp-2f, 0x1.931cfp-5f, \
    -0x1.eec26cp-1f, 0x1.e753eep-2f, 0x1.457ff2p+0f, -0x1.71b5aep+0f, -0x1.885a2ep+0f, 0x1.06b776p+0f, 0x1.4e4aeep-1f, -0x1.b4470ap-3f, \
    0x1.303e98p-1f, -0x1.101078p+1f, 0x1.017c2ep+0f, -0x1.fcce24p-2f, -0x1.224e72p-1f, 0x1.b589e8p-3f, -0x1.833e16p-2f, -0x1.3b954ep+1f, \
    0x1.02ad9ap-1f, 0x1.ed674ap-1f, 0x1.b06112p-5f, 0x1.170d88p-2f, -0x1.46e18p-1f, 0x1.5f9fb6p-3f, 0x1.213986p+1f, -0x1.297226p-2f, \
    0x1.72cbc6p+0f, 0x1.94cf58p-2f, 0x1.2c6ff8p-3f, 0x1.5f3a4ap-5f, -0x1.0352e2p-1f, 0x1.82c8cp-1f, -0x1.69105cp+0f, 0x1.e65adp+0f, \
    0x1.1e1f8ep-1f, -0x1.78a378p+0f, 0x1.bc36eap-1f, 0x1.6bfb4p-1f, 0x1.0b31fcp+0f, 0x1.90917ep-2f, -0x1.74b3c4p-6f, 0x1.23fa3ep-1f, \
    0x1.a25b1ep-1f, -0x1.493d2p-1f, -0x1.04c036p+0f, -0x1.25d7ecp-2f, -0x1.754ff8p-1f, 0x1.f91456p-5f, -0x1.502868p+0f, -0x1.8d5e56p-1f, \
    -0x1.c7a728p-4f, -0x1.025bf8p+0f, 0x1.146fe4p+0f, 0x1.64f75p-1f, 0x1.071846p+1f, 0x1.6ac436p-2f, -0x1.a8d97cp-2f, 0x1.6c9766p+0f, \
    -0x1.19a93p-1f, -0x1.daf92ep+0f, 0x1.5513dep+1f, -0x1.60c43p+0f, -0x1.799344p-1f, 0x1.1eda82p+0f, -0x1.cf9522p-1f, -0x1.936082p-1f, \
    -0x1.c2bdcap+0f, -0x1.55e1a8p-1f, 0x1.51c50cp-2f, 0x1.544134p+0f, 0x1.dbb2c4p+0f, -0x1.213068p-3f, -0x1.1bc11cp+0f, 0x1.9a46dp+0f, \
    -0x1.04770ep-3f, 0x1.c26d76p-2f, -0x1.15c6b6p-1f, -0x1.63087ep-1f, -0x1.020658p+1f, 0x1.941bb8p+0f, 0x1.4da1e2p+0f, 0x1.71cb3ep-1f, \
    0x1.8ecc2p+1f, -0x1.0ff1b2p-1f, -0x1.364decp-2f, 0x1.93e7d6p-4f, -0x1.127b3ep-4f, -0x1.191934p-1f, 0x1.1a851p-4f, -0x1.97e8a4p-1f, \
    0x1.51611p-1f, -0x1.325052p+0f, 0x1.70a8bep-2f, 0x1.291ecap-1f, 0x1.01fa08p+1f, -0x1.1ed964p+0f, 0x1.f1c982p-1f, -0x1.379056p-2f

#define QAQ_TCQ3_RHO 0x1.ccccccp-1f  // rms(x) / scale of a walk on N(0, 1) rows (0.8999999761581421)

#define QAQ_TCQ2_CODEBOOK \
    -0x1.1f05eap-4f, 0x1.0faec4p-8f, 0x1.55db78p+0f, -0x1.4b0e1ap+0f, 0x1.752ff8p-1f, 0x1.b51ec8p-4f, 0x1.6d48d8p+0f, -0x1.82485p-1f, \
    -0x1.361bdcp-4f, 0x1.63453cp+0f, -0x1.57da46p+1f, -0x1.053176p+0f, 0x1.e0c172p-2f, -0x1.ea04e2p-1f, 0x1.fac054p-2f, -0x1.4cc096p-2f, \
    0x1.2f565cp+0f, -0x1.1fb9aep-1f, 0x1.156a9cp-4f, -0x1.1357fep+1f, 0x1.2b78ap+1f, -0x1.886b7ep+0f, 0x1.30d38ep+0f, -0x1.6bafa8p-6f, \
    0x1.7420f8p-1f, -0x1.63468p-1f, 0x1.89b4bp-2f, -0x1.43e6e2p-3f, -0x1.02dbdap+0f, 0x1.0ea2dcp+1f, 0x1.a762cap-1f, -0x1.96b224p+0f, \
    -0x1.0f2096p+0f, -0x1.190f86p-5f, -0x1.1874e8p-1f, 0x1.36d27ap-1f, 0x1.ccd732p+0f, 0x1.0d7f48p+0f, -0x1.ecc384p+0f, 0x1.38abdep-1f, \
    0x1.f9a0fep+0f, 0x1.3a61aep-2f, -0x1.37c69p-1f, 0x1.baa78p-2f, 0x1.7b41ecp-3f, -0x1.83e082p-2f, -0x1.e89c18p-2f, 0x1.09725ap+0f, \
    0x1.5cc694p-1f, -0x1.a76c96p+0f, -0x1.19381cp-1f, 0x1.7cb4aep+0f, 0x1.46ae9ep-2f, -0x1.7c3decp-1f, 0x1.e77966p-2f, 0x1.0b5cd2p+0f, \
    -0x1.d9514p-1f, 0x1.0b29ecp+0f, 0x1.0ed078p-3f, -0x1.470f12p-1f, 0x1.89946p-2f, -0x1.a82fc6p-2f, 0x1.0b478cp-4f, 0x1.e0ec5cp-1f, \
    -0x1.e67b2cp-1f, 0x1.551f58p-3f, -0x1.a9c12cp-2f, 0x1.551a62p-2f, 0x1.ea5ecp-2f, 0x1.1bb0c8p+0f, 0x1.3342a6p+0f, 0x1.99542ep-2f, \
    0x1.f213cp-3f, -0x1.aca4e4p-3f, -0x1.defd4ep+0f, 0x1.88463ap+0f, -0x1.45acfep-2f, 0x1.453eb6p-9f, 0x1.15e92p-2f, -0x1.1a861ap+0f, \
    0x1.67dbb2p-1f, 0x1.dc87aap-1f, -0x1.3a36a8p-6f, -0x1.ff3986p-2f, 0x1.4086eep+0f, 0x1.177332p-1f, -0x1.2e25a4p-3f, -0x1.c13facp-2f, \
    -0x1.8b0912p+0f, 0x1.06351cp-6f, -0x1.06eedp-1f, -0x1.0548ap+0f, 0x1.52ba8ep+0f, 0x1.2b3c8p-2f, -0x1.534c36p-2f, 0x1.92e85cp-1f, \
    -0x1.52281ap-1f, 0x1.a4c878p-3f, -0x1.ebf44p-1f, 0x1.de633ep-2f, 0x1.b5848ep+0f, -0x1.2e8edcp-5f, 0x1.cba746p-1f, -0x1.e0de76p+0f, \
    -0x1.3100d6p-4f, -0x1.3ed33p+0f, -0x1.49e2fap-2f, -0x1.ab6364p-4f, 0x1.db4642p-1f, -0x1.a55564p-2f, -0x1.7f2c62p+0f, -0x1.04f906p+0f, \
    0x1.66baaep+0f, 0x1.6ae75cp-1f, 0x1.98cd6ap-5f, -0x1.6bc14ep+0f, -0x1.a86706p-1f, -0x1.1b5656p-3f, -0x1.28e7e4p+0f, -0x1.da9264p-1f, \
    -0x1.fef334p+0f, 0x1.da0e6ep-2f, -0x1.77e008p-1f, 0x1.8e73dep+0f, 0x1.9e63a4p-7f, -0x1.faed66p-2f, 0x1.01e6cap+1f, -0x1.5b57f8p+0f, \
    -0x1.0cb708p-4f, -0x1.bdd604p-3f, 0x1.f95c82p+0f, 0x1.35dfa6p-1f, -0x1.664bc4p+1f, 0x1.5c2998p-1f, -0x1.12adep+1f, 0x1.34e322p+0f, \
    0x1.3df784p+0f, 0x1.77ccd6p-1f, -0x1.e6dd3ep-3f, -0x1.9c68f8p+0f, -0x1.3f7fd4p-4f, -0x1.e6df02p-1f, 0x1.3d2894p+0f, 0x1.1dae9p-1f, \
    -0x1.d207e4p-2f, 0x1.ba0922p-7f, -0x1.69f57ep+0f, 0x1.455244p-1f, 0x1.c89e24p-3f, -0x1.bdf25ep-1f, -0x1.6daa62p-1f, -0x1.8b811p+0f, \
    0x1.22090cp-4f, -0x1.293cbcp+0f, -0x1.4b8604p+0f, -0x1.04615ep-2f, -0x1.9de32ep-1f, 0x1.a98c06p-2f, 0x1.e49328p-2f, -0x1.fd17b2p-4f, \
    -0x1.ab5ac2p-1f, 0x1.9a1416p-2f, 0x1.414036p+0f, -0x1.518beep+0f, -0x1.7020a6p+0f, 0x1.2d091ep+0f, 0x1.45b49ep-1f, -0x1.214b74p-3f, \
    0x1.908abap-2f, -0x1.03ed04p+1f, 0x1.fc3a7ep-1f, -0x1.f3ac86p-2f, -0x1.17decep-1f, 0x1.390f3ep-2f, -0x1.4c5806p-2f, -0x1.3a0968p+1f, \
    0x1.18e18ep-1f, 0x1.16a014p+0f, -0x1.95a658p-5f, 0x1.4541cp-2f, -0x1.802574p-1f, 0x1.f49344p-2f, 0x1.03f9d4p+1f, -0x1.a8500ep-3f, \
    0x1.813aep+0f, 0x1.351d2p-2f, 0x1.cda08cp-3f, -0x1.2f2fdp-4f, -0x1.5ccdp-1f, 0x1.608f42p-1f, -0x1.24ff54p+0f, 0x1.08e166p+1f, \
    0x1.7a57b2p-2f, -0x1.4e994ap+0f, 0x1.0421aap+0f, 0x1.5b94d8p-1f, 0x1.00d5e4p+0f, 0x1.63f326p-2f, -0x1.667d16p-3f, 0x1.40d0bcp-1f, \
    0x1.b94dd2p-1f, -0x1.a70d6ep-1f, -0x1.131626p+0f, -0x1.da77ccp-3f, -0x1.472a64p-1f, 0x1.dd8498p-4f, -0x1.85b7d8p+0f, -0x1.85e8f6p-1f, \
    -0x1.cbd0fep-4f, -0x1.d9b4eep-1f, 0x1.3b633cp+0f, 0x1.178a54p-1f, 0x1.047f7cp+1f, 0x1.717716p-2f, -0x1.4bbc8p-2f, 0x1.4546c2p+0f, \
    -0x1.766fb8p-1f, -0x1.ea933cp+0f, 0x1.4ffc5ap+1f, -0x1.55a392p+0f, -0x1.3c5ca8p-1f, 0x1.06370cp+0f, -0x1.3de2e6p+0f, -0x1.24f6bcp-1f, \
    -0x1.a5434ap+0f, -0x1.779682p-1f, 0x1.569fd4p-2f, 0x1.72aebcp+0f, 0x1.e7c49ep+0f, -0x1.4e7e3p-3f, -0x1.10dabap+0f, 0x1.7d511p+0f, \
    -0x1.08c314p-2f, 0x1.12fb6ep-1f, -0x1.f1066cp-2f, -0x1.5ce252p-1f, -0x1.04f634p+1f, 0x1.c3e23cp+0f, 0x1.3124c8p+0f, 0x1.000474p-1f, \
    0x1.65f568p+1f, -0x1.510a1p-1f, -0x1.8df0c8p-3f, 0x1.ad934ep-5f, 0x1.8c92f6p-4f, -0x1.dfb5aep-2f, -0x1.b569p-4f, -0x1.c3aa68p-1f, \
    0x1.29b46ep-1f, -0x1.2e361ep+0f, 0x1.143872p-1f, 0x1.570704p-1f, 0x1.b5abc4p+0f, -0x1.2cf012p+0f, 0x1.ac6e64p-1f, -0x1.c793c2p-3f

#define QAQ_TCQ2_RHO 0x1p+0f  // rms(x) / scale of a walk on N(0, 1) rows (1.0)

// sqrt, correctly rounded (IEEE 754), as numpy's float32 sqrt
QAQ_FN float qaq_fsqrt(const float x) {
#if QAQ_DEVICE_PASS && defined(__CUDA_ARCH__) && !defined(GGML_USE_HIP) && !defined(GGML_USE_MUSA)
    float r; asm("sqrt.rn.f32 %0, %1;" : "=f"(r) : "f"(x)); return r;
#elif QAQ_DEVICE_PASS
    return __fsqrt_rn(x);
#else
    return sqrtf(x);
#endif
}

#if QAQ_COMMON_GPU
// the device reads its copies from global memory (cached); the host pass (tests/native/test_cuda_host.cu) its own
static const __device__ float qaq_tcq3_codebook_dev[QAQ_TCQ_STATES] = { QAQ_TCQ3_CODEBOOK };
static const __device__ float qaq_tcq2_codebook_dev[QAQ_TCQ_STATES] = { QAQ_TCQ2_CODEBOOK };
static const float qaq_tcq3_codebook_host[QAQ_TCQ_STATES] = { QAQ_TCQ3_CODEBOOK };
static const float qaq_tcq2_codebook_host[QAQ_TCQ_STATES] = { QAQ_TCQ2_CODEBOOK };
#endif

QAQ_FN const float * qaq_tcq_codebook(const int k) {
#if QAQ_DEVICE_PASS
    return k == 3 ? qaq_tcq3_codebook_dev : qaq_tcq2_codebook_dev;
#elif QAQ_COMMON_GPU
    return k == 3 ? qaq_tcq3_codebook_host : qaq_tcq2_codebook_host;
#else
    static const float c3[QAQ_TCQ_STATES] = { QAQ_TCQ3_CODEBOOK };
    static const float c2[QAQ_TCQ_STATES] = { QAQ_TCQ2_CODEBOOK };
    return k == 3 ? c3 : c2;
#endif
}

// input b_j of a block's qs
QAQ_FN int qaq_tcq_input(const int k, const uint8_t * qs, const int j) {
    if (k == 3) {
        const uint8_t * p = qs + 3*(j/8);
        const uint32_t w = (uint32_t) p[0] | (uint32_t) p[1] << 8 | (uint32_t) p[2] << 16;
        return (int) (w >> 3*(j%8)) & 7;
    }
    return (qs[j/4] >> 2*(j%4)) & 3;
}

// The least squared error walk of the QK_TCQ values v through the trellis of k bits per step: writes its inputs b.
// Tagged rule (what a vectorized encoder computes, and numpy's tcq.viterbi(..., tagged=True)): with H = 256 >> k,
// the states top*H + lo (top < 2^k) all lead to the states lo*2^k + b, so each step keeps per lo only
// M[lo] = min over top of cost(top*H + lo), the cost carrying its top in its low k bits: costs are floats >= 0,
// whose bits order as uint32, so one integer min picks the cost and its argmin (ties cannot happen). cost(s) =
// M[s >> k] + (v - c[s])^2 (float, rounded per operation); unreachable states start at 1e30 (qaq_tcq_walk_start).
// The last value's state is the first of the least cost; the walk is read back from the tops (qaq_tcq_walk_finish).
// The pieces below are the walk's parts every implementation shares: the reference runs the groups of a step one
// after another (qaq_tcq_walk_ref), CUDA spreads them over a warp (ggml-qaq.cuh), AVX2 computes 8 at once.
typedef void (*qaq_tcq_walk_t)(int k, const float * v, uint8_t * b);

// the block's start: false when it is stored as zeros (all zeros, an infinity or a NaN: d = 0, inputs 0); else
// true with u = x / amax, v = u * rho / rms(u) (what the walk follows) and amax
QAQ_FN bool qaq_tcq_prepare(const int k, const float * x, uint16_t * d, uint8_t * qs, float * u, float * v,
                            float * amax) {
    float sumx2 = 0.0f;
    *d = 0;
    for (int i = 0; i < QK_TCQ*k/8; ++i) {
        qs[i] = 0;
    }
    if (!qaq_stats(x, QK_TCQ, amax, &sumx2) || !qaq_fle(sumx2, INFINITY)) {  // zeros, an infinity or a NaN
        return false;
    }
    float su2 = 0.0f;
    for (int j = 0; j < QK_TCQ; ++j) {
        u[j] = qaq_fdiv(x[j], *amax);
        su2  = qaq_fadd(su2, qaq_fmul(u[j], u[j]));
    }
    const float g = qaq_fdiv(k == 3 ? QAQ_TCQ3_RHO : QAQ_TCQ2_RHO, qaq_fsqrt(qaq_fdiv(su2, (float) QK_TCQ)));
    for (int j = 0; j < QK_TCQ; ++j) {
        v[j] = qaq_fmul(u[j], g);
    }
    return true;
}

// the walks' state before value 0: only state 0 reachable (the others at 1e30)
QAQ_FN void qaq_tcq_walk_start(const int k, float * M) {
    for (int lo = 0; lo < (QAQ_TCQ_STATES >> k); ++lo) {
        M[lo] = 1e30f;
    }
    M[0] = 0.0f;
}

// one step of one group: from the group costs Mp after the previous value, the least cost of the states
// top*H + lo with the value vt (tagged with its top) into Mn[lo], its top into bpt[lo]
QAQ_FN void qaq_tcq_walk_group(const int k, const int lo, const float vt, const float * Mp, float * Mn,
                               uint8_t * bpt) {
    const int K = 1 << k;
    const int H = QAQ_TCQ_STATES >> k;
    const float * T = qaq_tcq_codebook(k);
    uint32_t best = 0x7FFFFFFFu;
    for (int top = 0; top < K; ++top) {
        const int s = top*H + lo;
        const float e = qaq_fsub(vt, T[s]);
        const uint32_t c = (qaq_f32_bits(qaq_fadd(Mp[s >> k], qaq_fmul(e, e))) & ~(uint32_t) (K - 1)) |
                           (uint32_t) top;
        best = c < best ? c : best;
    }
    Mn[lo] = qaq_bits_f32(best);
    bpt[lo] = (uint8_t) (best & (uint32_t) (K - 1));
}

// the walk's last state: with M the group costs after value QK_TCQ - 2, the first state of the least cost of the
// last value (what a vectorized port computes per lane, then across lanes: the least cost, then the lowest state)
QAQ_FN int qaq_tcq_walk_last(const int k, const float * v, const float * M) {
    const float * T = qaq_tcq_codebook(k);
    int s = 0;
    float bc = INFINITY;
    for (int i = 0; i < QAQ_TCQ_STATES; ++i) {
        const float e = qaq_fsub(v[QK_TCQ - 1], T[i]);
        const float c = qaq_fadd(M[i >> k], qaq_fmul(e, e));
        if (qaq_fgt(bc, c)) {
            bc = c;
            s = i;
        }
    }
    return s;
}

// the walk read back from its last state s: bp[t][lo] holds the top chosen for group lo at value t; writes the
// walk's inputs b
QAQ_FN void qaq_tcq_walk_back(const int k, int s, const uint8_t (*bp)[QAQ_TCQ_STATES >> 2], uint8_t * b) {
    const int H = QAQ_TCQ_STATES >> k;
    for (int t = QK_TCQ - 1; t >= 0; --t) {
        b[t] = (uint8_t) (s & ((1 << k) - 1));
        if (t == 0) {
            break;
        }
        const int lo = s >> k;
        s = bp[t][lo]*H + lo;
    }
}

// the walk's end: its last state, then the walk read back into its inputs b
QAQ_FN void qaq_tcq_walk_finish(const int k, const float * v, const float * M,
                                const uint8_t (*bp)[QAQ_TCQ_STATES >> 2], uint8_t * b) {
    qaq_tcq_walk_back(k, qaq_tcq_walk_last(k, v, M), bp, b);
}

// the block's end: the least-squares scale of the walk's values (saturated at 65504; 0 when degenerate) and the
// packed inputs
QAQ_FN void qaq_tcq_pack(const int k, const float amax, const float * u, const uint8_t * b, uint16_t * d,
                         uint8_t * qs) {
    const float * T = qaq_tcq_codebook(k);
    float suc = 0.0f;
    float suu = 0.0f;
    int s = 0;
    for (int j = 0; j < QK_TCQ; ++j) {
        s = ((s << k) | b[j]) & (QAQ_TCQ_STATES - 1);
        suc = qaq_fadd(suc, qaq_fmul(u[j], T[s]));
        suu = qaq_fadd(suu, qaq_fmul(u[j], u[j]));
        if (k == 3) {
            const int bit = 3*(j%8);
            qs[3*(j/8) + bit/8] |= (uint8_t) (b[j] << (bit%8));
            if (bit%8 > 5) {  // the input straddles two bytes
                qs[3*(j/8) + bit/8 + 1] |= (uint8_t) (b[j] >> (8 - bit%8));
            }
        } else {
            qs[j/4] |= (uint8_t) (b[j] << 2*(j%4));
        }
    }
    *d = 0;
    if (qaq_fgt(suc, 0.0f)) {
        const float ds = qaq_fmul(qaq_fdiv(suu, suc), amax);
        *d = qaq_fp32_to_fp16(qaq_fgt(65504.0f, ds) ? ds : 65504.0f);
    }
}

#if !QAQ_COMMON_GPU  // the GPU's quantizer spreads the groups over a warp instead (ggml-qaq.cuh)

QAQ_FN void qaq_tcq_walk_ref(const int k, const float * v, uint8_t * b) {
    const int H = QAQ_TCQ_STATES >> k;
    float M[2][QAQ_TCQ_STATES >> 2];
    uint8_t bp[QK_TCQ][QAQ_TCQ_STATES >> 2];
    qaq_tcq_walk_start(k, M[0]);
    for (int t = 0; t < QK_TCQ - 1; ++t) {
        for (int lo = 0; lo < H; ++lo) {
            qaq_tcq_walk_group(k, lo, v[t], M[t & 1], M[(t + 1) & 1], bp[t + 1]);
        }
    }
    qaq_tcq_walk_finish(k, v, M[(QK_TCQ - 1) & 1], (const uint8_t (*)[QAQ_TCQ_STATES >> 2]) bp, b);
}

// one block: the scale, the walk (walk: qaq_tcq_walk_ref or a port with the same results), the packed inputs
QAQ_FN void qaq_tcq_quantize_block(const int k, const float * x, uint16_t * d, uint8_t * qs, qaq_tcq_walk_t walk) {
    float u[QK_TCQ];
    float v[QK_TCQ];
    uint8_t b[QK_TCQ];
    float amax = 0.0f;
    if (!qaq_tcq_prepare(k, x, d, qs, u, v, &amax)) {
        return;
    }
    walk(k, v, b);
    qaq_tcq_pack(k, amax, u, b, d, qs);
}

#endif // !QAQ_COMMON_GPU

// the state of value j from its input and the inputs before it (no serial walk): the low 8 bits of
// b_j | b_{j-1} << k | b_{j-2} << 2k | b_{j-3} << 3k (inputs before value 0 are 0)
QAQ_FN int qaq_tcq_state(const int k, const uint8_t * qs, const int j) {
    int s = 0;
    for (int i = j - (k == 3 ? 2 : 3); i <= j; ++i) {
        s = (s << k) | (i >= 0 ? qaq_tcq_input(k, qs, i) : 0);
    }
    return s & (QAQ_TCQ_STATES - 1);
}

// the states of a block's values
QAQ_FN void qaq_tcq_states(const int k, const uint8_t * qs, uint8_t * s) {
    for (int j = 0; j < QK_TCQ; ++j) {
        s[j] = (uint8_t) qaq_tcq_state(k, qs, j);
    }
}

// value j of a block
QAQ_FN float qaq_tcq_value(const int k, const uint16_t h, const uint8_t * qs, const int j) {
    return qaq_fmul(qaq_fp16_to_fp32(h), qaq_tcq_codebook(k)[qaq_tcq_state(k, qs, j)]);
}

QAQ_FN void qaq_tcq_dequantize_block(const int k, const uint16_t h, const uint8_t * qs, float * y) {
    for (int j = 0; j < QK_TCQ; ++j) {
        y[j] = qaq_tcq_value(k, h, qs, j);
    }
}
