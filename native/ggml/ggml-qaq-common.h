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
