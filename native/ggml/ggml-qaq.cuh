// qaq3 / qaq2 and qaq4l / qaq3l / qaq2l CUDA device code (layouts, codebooks and the ue5m3 scale in ggml-qaq.h;
// design in docs/cache-types.md).
//
// Include after ggml-cuda's common.cuh (ggml_cuda_memcpy_1, ggml_cuda_dp4a, WARP_SIZE, QI8_1). Contents:
//   - ue5m3 and fp16 scale decode, codebook lookup with __byte_perm (4 indices -> 4 int8 values, ready for dp4a);
//   - dequantize_qaq{3,2}, dequantize_qaq{4,3,2}l: the dequantize_kernel_t of convert.cu / getrows.cu / cpy.cu (2 values
//     at a time);
//   - quantize_f32_qaq{3,2}_block, quantize_f32_qaq{4,3,2}l_block: the set_rows / cpy block quantizers, bit-exact with
//     quantize_row_qaq{3,2}_ref and quantize_row_qaq{4,3,2}l_ref;
//   - vec_dot_fattn_vec_KQ_qaq* and dequantize_V_qaq* for the flash-attention vector kernel.
#pragma once

#include "ggml-qaq.h"

#include <cstdint>

// ---------------------------------------------------------------------------------------------------------------------
// codebooks as packed bytes: qaq3 = bytes 0..3 in lo, 4..7 in hi (the 8-byte pool of __byte_perm(lo, hi, sel));
// qaq2 = bytes 0..3; qaq4 (qaq4l's 16 levels) = bytes 0..7 in TAB0, TAB1 and 8..15 in TAB2, TAB3

static constexpr __host__ __device__ uint32_t qaq_pack4(const int a, const int b, const int c, const int d) {
    return (uint32_t) (uint8_t) a | (uint32_t) (uint8_t) b << 8 | (uint32_t) (uint8_t) c << 16 | (uint32_t) (uint8_t) d << 24;
}
static constexpr __host__ __device__ uint32_t qaq_tab8_lo(const int a0, const int a1, const int a2, const int a3,
                                                          const int, const int, const int, const int) {
    return qaq_pack4(a0, a1, a2, a3);
}
static constexpr __host__ __device__ uint32_t qaq_tab8_hi(const int, const int, const int, const int,
                                                          const int a4, const int a5, const int a6, const int a7) {
    return qaq_pack4(a4, a5, a6, a7);
}
// word w (0..3) of a 16-entry codebook
static constexpr __host__ __device__ uint32_t qaq_tab16(const int w,
        const int a0, const int a1, const int a2,  const int a3,  const int a4,  const int a5,  const int a6,  const int a7,
        const int a8, const int a9, const int a10, const int a11, const int a12, const int a13, const int a14, const int a15) {
    return w == 0 ? qaq_pack4(a0,  a1,  a2,  a3)  : w == 1 ? qaq_pack4(a4,  a5,  a6,  a7) :
           w == 2 ? qaq_pack4(a8,  a9,  a10, a11) :          qaq_pack4(a12, a13, a14, a15);
}

#define QAQ3_TAB_LO qaq_tab8_lo(QAQ3_KVALUES)
#define QAQ3_TAB_HI qaq_tab8_hi(QAQ3_KVALUES)
#define QAQ2_TAB    qaq_pack4(QAQ2_KVALUES)
#define QAQ4_TAB0   qaq_tab16(0, QAQ4_KVALUES)
#define QAQ4_TAB1   qaq_tab16(1, QAQ4_KVALUES)
#define QAQ4_TAB2   qaq_tab16(2, QAQ4_KVALUES)
#define QAQ4_TAB3   qaq_tab16(3, QAQ4_KVALUES)

static_assert(QAQ3_TAB_LO == 0xF2D3B181u && QAQ3_TAB_HI == 0x7F4F2D0Eu, "qaq3 codebook changed: check the kernels");
static_assert(QAQ2_TAB    == 0x7F26DA81u,                               "qaq2 codebook changed: check the kernels");
static_assert(QAQ4_TAB0 == 0xC6B5A081u && QAQ4_TAB1 == 0xFAEEE1D4u &&
              QAQ4_TAB2 == 0x2C1F1206u && QAQ4_TAB3 == 0x7F604B3Au,     "qaq4 codebook changed: check the kernels");

// ue5m3 -> fp16 / fp32: the byte is the top of an fp16 without sign (exact, no table). The fp32 value is built from
// the bits as qaq_ue5m3_to_fp32 does (exponent 0: the fp16 subnormal m * 2^-17, a normal fp32), so that no
// flush-to-zero mode of an fp16 conversion can touch it.
static __device__ __forceinline__ half qaq_ue5m3_to_f16(const uint8_t b) {
    return __ushort_as_half((unsigned short) (b << 7));
}
static __device__ __forceinline__ float qaq_ue5m3_to_f32(const uint8_t b) {
    const uint32_t e = b >> 3;
    const uint32_t m = b & 7;
    return e == 0 ? (float) m * 7.62939453125e-06f : __uint_as_float((e + 112) << 23 | m << 20);
}

// the lean types' fp16 scale (stored as its bits): fp16 -> fp32 is exact for every fp16, subnormals included (the
// result is a normal fp32, out of reach of flush-to-zero), as GGML_FP16_TO_FP32; fp32 -> fp16 rounds to nearest even
// (cvt.rn.f16.f32, no .ftz), as GGML_FP32_TO_FP16
static __device__ __forceinline__ float qaq_f16_to_f32(const uint16_t h) {
    return __half2float(__ushort_as_half(h));
}
static __device__ __forceinline__ uint16_t qaq_f32_to_f16(const float f) {
    return __half_as_ushort(__float2half_rn(f));
}

// codebook value of index l as a float
static __device__ __forceinline__ float qaq3_level(const int l) {
    return (float) (int8_t) __byte_perm(QAQ3_TAB_LO, QAQ3_TAB_HI, l);
}
static __device__ __forceinline__ float qaq2_level(const int l) {
    return (float) (int8_t) __byte_perm(QAQ2_TAB, 0, l);
}
static __device__ __forceinline__ float qaq4_level(const int l) {
    return (float) (int8_t) __byte_perm(l & 8 ? QAQ4_TAB2 : QAQ4_TAB0, l & 8 ? QAQ4_TAB3 : QAQ4_TAB1, l & 7);
}

// four 3-bit (<= 7) indices, one per byte, -> __byte_perm selector, one per nibble (bits 3, 7, 11, 15 stay 0)
static __device__ __forceinline__ uint32_t qaq_bytes_to_selector(const uint32_t idx) {
    const uint32_t t = (idx | idx >> 4) & 0x00FF00FFu;  // nibbles 0,1 = bytes 0,1; nibbles 4,5 = bytes 2,3
    return t | t >> 8;                                 // only the low 16 bits are read
}

// four 4-bit indices, one per byte, -> their qaq4 codebook values (int8) packed into an int: the low 3 bits select
// within each half of the codebook, the 4th bit between the halves (as get_int_from_table_16, with constant tables)
static __device__ __forceinline__ int qaq4_lookup4(const uint32_t idx) {
    const uint32_t sel = qaq_bytes_to_selector(idx & 0x07070707u);
    const uint32_t lo  = __byte_perm(QAQ4_TAB0, QAQ4_TAB1, sel);
    const uint32_t hi  = __byte_perm(QAQ4_TAB2, QAQ4_TAB3, sel);
    const uint32_t b3  = (idx >> 3) & 0x01010101u;
    return (int) __byte_perm(lo, hi, qaq_bytes_to_selector(0x03020100u | b3 << 2));  // byte l: lo[l] or hi[l]
}

// the codebook values (int8) of values 4*iqs .. 4*iqs+3 of 32 values packed as one qaq3/qaq2 block, iqs = 0..7,
// packed into an int: value j's low 2 bits are bits 2*(j/8) of qs[j%8], so these 4 values sit in qs[4*(iqs%2) .. +3]
// at bits 2*(iqs/2); the high bits of values 0..31 are bits 0..31 of the little-endian qh word. qs and qh must be
// 2-byte aligned.
static __device__ __forceinline__ int qaq3_get_int32(const uint8_t * __restrict__ qs, const uint8_t * __restrict__ qh,
                                                     const int iqs) {
    int ql;
    int qhw;
    ggml_cuda_memcpy_1<sizeof(int), 2>(&ql, qs + 4*(iqs % 2));
    ggml_cuda_memcpy_1<sizeof(int), 2>(&qhw, qh);
    const uint32_t lo = ((uint32_t) ql >> 2*(iqs / 2)) & 0x03030303u;
    const uint32_t hi = ((((uint32_t) qhw >> 4*iqs) & 0xFu) * 0x00204081u) & 0x01010101u;  // bit l -> byte l
    return (int) __byte_perm(QAQ3_TAB_LO, QAQ3_TAB_HI, qaq_bytes_to_selector(lo | hi << 2));
}

static __device__ __forceinline__ int qaq2_get_int32(const uint8_t * __restrict__ qs, const int iqs) {
    int ql;
    ggml_cuda_memcpy_1<sizeof(int), 2>(&ql, qs + 4*(iqs % 2));
    const uint32_t lo = ((uint32_t) ql >> 2*(iqs / 2)) & 0x03030303u;
    return (int) __byte_perm(QAQ2_TAB, 0, qaq_bytes_to_selector(lo));
}

// qaq4l's 32 values: value j in nibble j/16 of qs[j%16] (as q4_0), so values 4*iqs .. +3 are the nibbles iqs/4 of
// qs[4*(iqs%4) .. +3]
static __device__ __forceinline__ int qaq4_get_int32(const uint8_t * __restrict__ qs, const int iqs) {
    int ql;
    ggml_cuda_memcpy_1<sizeof(int), 2>(&ql, qs + 4*(iqs % 4));
    return qaq4_lookup4(((uint32_t) ql >> 4*(iqs / 4)) & 0x0F0F0F0Fu);
}

// per block: iqs = 0..7 (qaq3 / qaq2, one block is 32 values), iqs = 0..31 (the lean types, 32 values per 8 ints)
static __device__ __forceinline__ int qaq3_get_int(const block_qaq3 * __restrict__ x, const int iqs) {
    return qaq3_get_int32(x->qs, x->qh, iqs);
}
static __device__ __forceinline__ int qaq2_get_int(const block_qaq2 * __restrict__ x, const int iqs) {
    return qaq2_get_int32(x->qs, iqs);
}
static __device__ __forceinline__ int qaq4l_get_int(const block_qaq4l * __restrict__ x, const int iqs) {
    return qaq4_get_int32(x->qs + (QK_QAQ/2)*(iqs / QI8_1), iqs % QI8_1);
}
static __device__ __forceinline__ int qaq3l_get_int(const block_qaq3l * __restrict__ x, const int iqs) {
    return qaq3_get_int32(x->qs + (QK_QAQ/4)*(iqs / QI8_1), x->qh + (QK_QAQ/8)*(iqs / QI8_1), iqs % QI8_1);
}
static __device__ __forceinline__ int qaq2l_get_int(const block_qaq2l * __restrict__ x, const int iqs) {
    return qaq2_get_int32(x->qs + (QK_QAQ/4)*(iqs / QI8_1), iqs % QI8_1);
}

// ---------------------------------------------------------------------------------------------------------------------
// dequantize_kernel_t (qk = QK_QAQ or QK_QAQL, qr = 1): values iqs and iqs + 1 of block ib (iqs even)

// values j and j + 1 (j even) of 32 values packed as one qaq3 (qh != nullptr) or qaq2 block, scale d
template <int nlev>
static __device__ __forceinline__ void qaq_dequantize2_32(const float d, const uint8_t * __restrict__ qs,
                                                          const uint8_t * __restrict__ qh, const int j, float2 & v) {
    const int sh = 2*(j / 8);
    int l0 = (qs[(j + 0) % 8] >> sh) & 3;
    int l1 = (qs[(j + 1) % 8] >> sh) & 3;
    if constexpr (nlev == 8) {
        const int h = qh[j / 8] >> (j % 8);  // j even: j and j + 1 share qh[j/8]
        l0 |= ((h >> 0) & 1) << 2;
        l1 |= ((h >> 1) & 1) << 2;
        v.x = d * qaq3_level(l0);
        v.y = d * qaq3_level(l1);
    } else {
        static_assert(nlev == 4, "bad nlev");
        GGML_UNUSED(qh);
        v.x = d * qaq2_level(l0);
        v.y = d * qaq2_level(l1);
    }
}

static __device__ __forceinline__ void dequantize_qaq3(const void * vx, const int64_t ib, const int iqs, float2 & v) {
    const block_qaq3 * x = (const block_qaq3 *) vx + ib;
    qaq_dequantize2_32<8>(qaq_ue5m3_to_f32(x->d[iqs / (QK_QAQ/2)]), x->qs, x->qh, iqs, v);
}

static __device__ __forceinline__ void dequantize_qaq2(const void * vx, const int64_t ib, const int iqs, float2 & v) {
    const block_qaq2 * x = (const block_qaq2 *) vx + ib;
    qaq_dequantize2_32<4>(qaq_ue5m3_to_f32(x->d[iqs / (QK_QAQ/2)]), x->qs, nullptr, iqs, v);
}

static __device__ __forceinline__ void dequantize_qaq4l(const void * vx, const int64_t ib, const int iqs, float2 & v) {
    const block_qaq4l * x = (const block_qaq4l *) vx + ib;

    const float   d  = qaq_f16_to_f32(x->d);
    const int     j  = iqs % QK_QAQ;                       // j even: j and j + 1 share the nibble half
    const uint8_t * q = x->qs + (QK_QAQ/2)*(iqs / QK_QAQ) + j % (QK_QAQ/2);
    const int     sh = 4*(j / (QK_QAQ/2));

    v.x = d * qaq4_level((q[0] >> sh) & 0xF);
    v.y = d * qaq4_level((q[1] >> sh) & 0xF);
}

static __device__ __forceinline__ void dequantize_qaq3l(const void * vx, const int64_t ib, const int iqs, float2 & v) {
    const block_qaq3l * x = (const block_qaq3l *) vx + ib;
    const int g = iqs / QK_QAQ;
    qaq_dequantize2_32<8>(qaq_f16_to_f32(x->d), x->qs + (QK_QAQ/4)*g, x->qh + (QK_QAQ/8)*g, iqs % QK_QAQ, v);
}

static __device__ __forceinline__ void dequantize_qaq2l(const void * vx, const int64_t ib, const int iqs, float2 & v) {
    const block_qaq2l * x = (const block_qaq2l *) vx + ib;
    const int g = iqs / QK_QAQ;
    qaq_dequantize2_32<4>(qaq_f16_to_f32(x->d), x->qs + (QK_QAQ/4)*g, nullptr, iqs % QK_QAQ, v);
}

// ---------------------------------------------------------------------------------------------------------------------
// Block quantizers (one thread per block), the algorithms of qaq_quantize_half and qaq_quantize_lean in ggml-qaq.c
// with the same float operations in the same order. ggml-cuda is built with -use_fast_math (FMA contraction,
// approximate division, flush-to-zero), so every float operation and comparison below is an explicit IEEE
// round-to-nearest PTX instruction without .ftz: the bytes match the CPU reference (compiled with -ffp-contract=off)
// even for subnormal inputs.

#if !defined(GGML_USE_HIP) && !defined(GGML_USE_MUSA)
static __device__ __forceinline__ float qaq_fadd(const float a, const float b) {
    float r; asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r;
}
static __device__ __forceinline__ float qaq_fsub(const float a, const float b) {
    float r; asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r;
}
static __device__ __forceinline__ float qaq_fmul(const float a, const float b) {
    float r; asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r;
}
static __device__ __forceinline__ float qaq_fdiv(const float a, const float b) {
    float r; asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r;
}
static __device__ __forceinline__ bool qaq_fgt(const float a, const float b) {  // a > b, false if either is NaN
    uint32_t r;
    asm("{\n\t.reg .pred p;\n\tsetp.gt.f32 p, %1, %2;\n\tselp.u32 %0, 1, 0, p;\n\t}" : "=r"(r) : "f"(a), "f"(b));
    return r != 0;
}
static __device__ __forceinline__ bool qaq_fle(const float a, const float b) {  // a <= b, false if either is NaN
    uint32_t r;
    asm("{\n\t.reg .pred p;\n\tsetp.le.f32 p, %1, %2;\n\tselp.u32 %0, 1, 0, p;\n\t}" : "=r"(r) : "f"(a), "f"(b));
    return r != 0;
}
#else
static __device__ __forceinline__ float qaq_fadd(const float a, const float b) { return __fadd_rn(a, b); }
static __device__ __forceinline__ float qaq_fsub(const float a, const float b) { return __fsub_rn(a, b); }
static __device__ __forceinline__ float qaq_fmul(const float a, const float b) { return __fmul_rn(a, b); }
static __device__ __forceinline__ float qaq_fdiv(const float a, const float b) { return __fdiv_rn(a, b); }
static __device__ __forceinline__ bool  qaq_fgt (const float a, const float b) { return a >  b; }
static __device__ __forceinline__ bool  qaq_fle (const float a, const float b) { return a <= b; }
#endif // !defined(GGML_USE_HIP) && !defined(GGML_USE_MUSA)

static __device__ __forceinline__ float qaq_fabs(const float x) {
    return __int_as_float(__float_as_int(x) & 0x7FFFFFFF);
}
static __device__ __forceinline__ bool qaq_isfinite(const float x) {
    return (__float_as_int(x) & 0x7F800000) != 0x7F800000;
}

// per type: number of levels, decision thresholds (midpoints, as kmid_qaq{4,3,2} in ggml-qaq.c), level values
template <int nlev> struct qaq_quant_traits;

template <> struct qaq_quant_traits<16> {
    static __device__ __forceinline__ float mid(const int m) {
        return m ==  0 ? -111.5f : m ==  1 ? -85.5f : m ==  2 ? -66.5f : m ==  3 ? -51.0f : m ==  4 ? -37.5f :
               m ==  5 ?  -24.5f : m ==  6 ? -12.0f : m ==  7 ?   0.0f : m ==  8 ?  12.0f : m ==  9 ?  24.5f :
               m == 10 ?   37.5f : m == 11 ?  51.0f : m == 12 ?  66.5f : m == 13 ?  85.5f : 111.5f;
    }
    static __device__ __forceinline__ float level(const int l) { return qaq4_level(l); }
};

template <> struct qaq_quant_traits<8> {
    static __device__ __forceinline__ float mid(const int m) {
        return m == 0 ? -103.0f : m == 1 ? -62.0f : m == 2 ? -29.5f : m == 3 ? 0.0f :
               m == 4 ?   29.5f : m == 5 ?  62.0f : 103.0f;
    }
    static __device__ __forceinline__ float level(const int l) { return qaq3_level(l); }
};

template <> struct qaq_quant_traits<4> {
    static __device__ __forceinline__ float mid(const int m) {
        return m == 0 ? -82.5f : m == 1 ? 0.0f : 82.5f;
    }
    static __device__ __forceinline__ float level(const int l) { return qaq2_level(l); }
};

// index of the nearest level = number of thresholds below v
template <int nlev>
static __device__ __forceinline__ int qaq_nearest(const float v) {
    int i = 0;
#pragma unroll
    for (int m = 0; m < nlev - 1; ++m) {
        i += qaq_fgt(v, qaq_quant_traits<nlev>::mid(m));
    }
    return i;
}

// largest ue5m3 byte whose value is <= v (0 if none), bisection as qaq_ue5m3_floor
static __device__ __forceinline__ uint8_t qaq_ue5m3_floor_dev(const float v) {
    if (!qaq_fgt(v, 0.0f)) {
        return 0;
    }
    if (qaq_fle(qaq_ue5m3_to_f32(QAQ_UE5M3_MAX), v)) {
        return QAQ_UE5M3_MAX;
    }
    int lo = 0;
    int hi = QAQ_UE5M3_MAX;
    while (hi - lo > 1) {  // invariant: dec(lo) <= v < dec(hi)
        const int mid = (lo + hi) / 2;
        if (qaq_fle(qaq_ue5m3_to_f32((uint8_t) mid), v)) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return (uint8_t) lo;
}

// loops over a half block (16 values, held in registers) unroll fully, loops over a lean block (128 values, read from
// global memory) by 8
template <int n> struct qaq_unroll { static constexpr int value = n <= QK_QAQ/2 ? n : 8; };

// amax and sum of squares of n values, as qaq_stats (sequential); false when there is nothing to quantize
template <int n>
static __device__ __forceinline__ bool qaq_stats_dev(const float * __restrict__ x, float & amax, float & sumx2) {
    float a  = 0.0f;
    float s2 = 0.0f;
#pragma unroll qaq_unroll<n>::value
    for (int j = 0; j < n; ++j) {
        const float ax = qaq_fabs(x[j]);
        a  = qaq_fgt(ax, a) ? ax : a;
        s2 = qaq_fadd(s2, qaq_fmul(x[j], x[j]));
    }
    amax  = a;
    sumx2 = s2;
    return qaq_fgt(a, 0.0f) && qaq_isfinite(a);
}

// Least-squares scale for the levels nearest to x/d (id = 1/d), as qaq_fit in ggml-qaq.c: sets ds and
// err = sum x^2 - ds*sum x*T; false when degenerate
template <int nlev, int n>
static __device__ __forceinline__ bool qaq_fit_dev(const float * __restrict__ x, const float sumx2, const float id,
                                                   float & ds, float & err) {
    typedef qaq_quant_traits<nlev> tr;
    float sumqx = 0.0f;
    float sumq2 = 0.0f;
#pragma unroll qaq_unroll<n>::value
    for (int j = 0; j < n; ++j) {
        const float t = tr::level(qaq_nearest<nlev>(qaq_fmul(x[j], id)));
        sumqx = qaq_fadd(sumqx, qaq_fmul(x[j], t));
        sumq2 = qaq_fadd(sumq2, qaq_fmul(t, t));
    }
    if (!(qaq_fgt(sumqx, 0.0f) && qaq_fgt(sumq2, 0.0f))) {
        return false;
    }
    ds  = qaq_fdiv(sumqx, sumq2);
    err = qaq_fsub(sumx2, qaq_fmul(ds, sumqx));
    return true;
}

// the least-squares scale of n values, as qaq_best_scale: 11 candidates amax * (0.45 + 0.07 i) / 127, then one refit
// with the best candidate's assignment
template <int nlev, int n>
static __device__ __forceinline__ float qaq_best_scale_dev(const float * __restrict__ x, const float amax,
                                                           const float sumx2) {
    float best_err = INFINITY;
    float best_d   = qaq_fdiv(amax, 127.0f);
    float ds, err;
#pragma unroll 1
    for (int i = 0; i < 11; ++i) {
        const float g = qaq_fadd(0.45f, qaq_fmul(0.07f, (float) i));
        const float d = qaq_fdiv(qaq_fmul(amax, g), 127.0f);
        if (qaq_fit_dev<nlev, n>(x, sumx2, qaq_fdiv(1.0f, d), ds, err) && qaq_fgt(best_err, err)) {
            best_err = err;
            best_d   = ds;
        }
    }
    // one refit with the best scale's assignment
    if (qaq_fit_dev<nlev, n>(x, sumx2, qaq_fdiv(1.0f, best_d), ds, err) && qaq_fgt(best_err, err)) {
        best_d = ds;
    }
    return best_d;
}

// QK_QAQ/2 values: returns the scale byte, writes the level indices to L
template <int nlev>
static __device__ __forceinline__ uint8_t qaq_quantize_half_dev(const float * __restrict__ x, uint8_t * __restrict__ L) {
    typedef qaq_quant_traits<nlev> tr;
    constexpr int nh = QK_QAQ/2;

    float amax;
    float sumx2;
    const int izero = qaq_nearest<nlev>(0.0f);
    if (!qaq_stats_dev<nh>(x, amax, sumx2)) {
#pragma unroll
        for (int j = 0; j < nh; ++j) {
            L[j] = (uint8_t) izero;
        }
        return 0;
    }

    const float best_d = qaq_best_scale_dev<nlev, nh>(x, amax, sumx2);

    // store: the ue5m3 neighbour (below or above) with the lower squared error
    const uint8_t b0 = qaq_ue5m3_floor_dev(best_d);
    uint8_t best_b = b0;
    float   best_e = INFINITY;
#pragma unroll
    for (int c = 0; c < 2; ++c) {
        const int b = b0 + c;
        if (b > QAQ_UE5M3_MAX) {
            break;
        }
        const float d = qaq_ue5m3_to_f32((uint8_t) b);
        float e = 0.0f;
        if (qaq_fgt(d, 0.0f)) {
            const float id = qaq_fdiv(1.0f, d);
#pragma unroll
            for (int j = 0; j < nh; ++j) {
                const float r = qaq_fsub(x[j], qaq_fmul(d, tr::level(qaq_nearest<nlev>(qaq_fmul(x[j], id)))));
                e = qaq_fadd(e, qaq_fmul(r, r));
            }
        } else {
            e = sumx2;
        }
        if (qaq_fgt(best_e, e)) {
            best_e = e;
            best_b = (uint8_t) b;
        }
    }
    const float d = qaq_ue5m3_to_f32(best_b);
    if (qaq_fgt(d, 0.0f)) {
        const float id = qaq_fdiv(1.0f, d);
#pragma unroll
        for (int j = 0; j < nh; ++j) {
            L[j] = (uint8_t) qaq_nearest<nlev>(qaq_fmul(x[j], id));
        }
    } else {
#pragma unroll
        for (int j = 0; j < nh; ++j) {
            L[j] = (uint8_t) izero;
        }
    }
    return best_b;
}

// 2 low index bits of 32 values into qs[8], the high bit (3-bit indices, qh != nullptr) into qh[4], as qaq_pack32
static __device__ __forceinline__ void qaq_pack32_dev(const uint8_t * __restrict__ L, uint8_t * __restrict__ qs,
                                                      uint8_t * __restrict__ qh) {
#pragma unroll
    for (int b = 0; b < QK_QAQ/4; ++b) {
        qs[b] = (uint8_t) ((L[b] & 3) | (L[b + 8] & 3) << 2 | (L[b + 16] & 3) << 4 | (L[b + 24] & 3) << 6);
    }
    if (qh) {
#pragma unroll
        for (int b = 0; b < QK_QAQ/8; ++b) {
            uint8_t h = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                h |= (uint8_t) ((L[8*b + j] >> 2) << j);
            }
            qh[b] = h;
        }
    }
}

// One block: both halves, then the 2 low index bits into qs and, for qaq3 (qh != nullptr), the high bit into qh.
template <int nlev>
static __device__ __forceinline__ void qaq_quantize_block_dev(const float * __restrict__ x, uint8_t * d, uint8_t * qs,
                                                              uint8_t * qh) {
    float   xh[QK_QAQ/2];
    uint8_t L[QK_QAQ];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int j = 0; j < QK_QAQ/2; ++j) {
            xh[j] = x[h*(QK_QAQ/2) + j];
        }
        d[h] = qaq_quantize_half_dev<nlev>(xh, L + h*(QK_QAQ/2));
    }
    qaq_pack32_dev(L, qs, qh);
}

static __device__ void quantize_f32_qaq3_block(const float * __restrict__ x, block_qaq3 * __restrict__ y) {
    qaq_quantize_block_dev<8>(x, y->d, y->qs, y->qh);
}

static __device__ void quantize_f32_qaq2_block(const float * __restrict__ x, block_qaq2 * __restrict__ y) {
    qaq_quantize_block_dev<4>(x, y->d, y->qs, nullptr);
}

// A lean block (QK_QAQL values), as qaq_quantize_lean: the least-squares scale over all of them, saturated at the
// largest fp16 and stored as fp16 (h). Returns 1/d for the indices, or 0 when every index is the one nearest zero
// (nothing to quantize, or a scale that rounds to fp16 zero; h is then 0).
template <int nlev>
static __device__ __forceinline__ float qaq_quantize_lean_dev(const float * __restrict__ x, uint16_t & h) {
    float amax;
    float sumx2;
    float d = 0.0f;
    h = 0;
    if (qaq_stats_dev<QK_QAQL>(x, amax, sumx2)) {
        const float best_d = qaq_best_scale_dev<nlev, QK_QAQL>(x, amax, sumx2);
        h = qaq_f32_to_f16(qaq_fgt(65504.0f, best_d) ? best_d : 65504.0f);  // best_d < 65504 ? best_d : 65504
        d = qaq_f16_to_f32(h);
    }
    if (qaq_fgt(d, 0.0f) && qaq_isfinite(d)) {
        return qaq_fdiv(1.0f, d);
    }
    h = 0;
    return 0.0f;
}

// index of value v of a lean block (id from qaq_quantize_lean_dev)
template <int nlev>
static __device__ __forceinline__ int qaq_lean_index(const float v, const float id) {
    return qaq_fgt(id, 0.0f) ? qaq_nearest<nlev>(qaq_fmul(v, id)) : qaq_nearest<nlev>(0.0f);
}

static __device__ void quantize_f32_qaq4l_block(const float * __restrict__ x, block_qaq4l * __restrict__ y) {
    uint16_t h;
    const float id = qaq_quantize_lean_dev<16>(x, h);
    y->d = h;
    // byte b of each 16: values b (low nibble) and b + 16 (high nibble) of its 32
#pragma unroll 4
    for (int b = 0; b < QK_QAQL/2; ++b) {
        const int j = QK_QAQ*(b / (QK_QAQ/2)) + b % (QK_QAQ/2);
        y->qs[b] = (uint8_t) (qaq_lean_index<16>(x[j], id) | qaq_lean_index<16>(x[j + QK_QAQ/2], id) << 4);
    }
}

template <int nlev>
static __device__ __forceinline__ void qaq_quantize_lean_block_dev(const float * __restrict__ x, uint16_t & d,
                                                                   uint8_t * __restrict__ qs, uint8_t * __restrict__ qh) {
    uint16_t h;
    const float id = qaq_quantize_lean_dev<nlev>(x, h);
    d = h;
    // each 32 values packed as one qaq3 / qaq2 block
#pragma unroll 1
    for (int g = 0; g < QK_QAQL/QK_QAQ; ++g) {
        uint8_t L[QK_QAQ];
#pragma unroll
        for (int j = 0; j < QK_QAQ; ++j) {
            L[j] = (uint8_t) qaq_lean_index<nlev>(x[QK_QAQ*g + j], id);
        }
        qaq_pack32_dev(L, qs + (QK_QAQ/4)*g, qh ? qh + (QK_QAQ/8)*g : nullptr);
    }
}

static __device__ void quantize_f32_qaq3l_block(const float * __restrict__ x, block_qaq3l * __restrict__ y) {
    qaq_quantize_lean_block_dev<8>(x, y->d, y->qs, y->qh);
}

static __device__ void quantize_f32_qaq2l_block(const float * __restrict__ x, block_qaq2l * __restrict__ y) {
    qaq_quantize_lean_block_dev<4>(x, y->d, y->qs, nullptr);
}

// ---------------------------------------------------------------------------------------------------------------------
// Flash attention, vector kernel (fattn-vec.cuh): K.Q against Q as q8_1 (one int of 4 values per k_KQ, QI8_1 ints per
// block of q8_1), and V rows. A block of qaq3/qaq2 is one block of q8_1 and each int lies inside one half, i.e. one
// scale; a lean block is four blocks of q8_1 under one scale.

template <int D, int nthreads, typename block_t, int (*get_int)(const block_t *, int)>
static __device__ __forceinline__ float vec_dot_fattn_vec_KQ_qaq(
    const char * __restrict__ K_c, const void * __restrict__ Q_v, const int * __restrict__ Q_q8, const void * __restrict__ Q_ds_v) {

    const block_t * K = (const block_t *) K_c;
    GGML_UNUSED(Q_v);

    float sum = 0.0f;

#pragma unroll
    for (int k_KQ_0 = 0; k_KQ_0 < int(D/sizeof(int)); k_KQ_0 += nthreads) {
        const int k_KQ = k_KQ_0 + (nthreads == WARP_SIZE ? threadIdx.x : threadIdx.x % nthreads);

        const int ib  = k_KQ / QI8_1;
        const int iqs = k_KQ % QI8_1;

        const int v    = get_int(K + ib, iqs);
        const int sumi = ggml_cuda_dp4a(v, Q_q8[k_KQ_0/nthreads], 0);

        const float2 Q_ds = ((const float2 *) Q_ds_v)[k_KQ_0/nthreads];
        sum += qaq_ue5m3_to_f32(K[ib].d[iqs / (QI8_1/2)]) * Q_ds.x * sumi;
    }

    return sum;
}

template <int D, int nthreads, typename block_t, int (*get_int)(const block_t *, int)>
static __device__ __forceinline__ float vec_dot_fattn_vec_KQ_qaq_lean(
    const char * __restrict__ K_c, const void * __restrict__ Q_v, const int * __restrict__ Q_q8, const void * __restrict__ Q_ds_v) {

    static_assert(D % QK_QAQL == 0, "lean K types need a head size that is a multiple of 128");
    const block_t * K = (const block_t *) K_c;
    GGML_UNUSED(Q_v);

    float sum = 0.0f;

#pragma unroll
    for (int k_KQ_0 = 0; k_KQ_0 < int(D/sizeof(int)); k_KQ_0 += nthreads) {
        const int k_KQ = k_KQ_0 + (nthreads == WARP_SIZE ? threadIdx.x : threadIdx.x % nthreads);

        const int ib  = k_KQ / (QK_QAQL/sizeof(int));
        const int iqs = k_KQ % (QK_QAQL/sizeof(int));

        const int v    = get_int(K + ib, iqs);
        const int sumi = ggml_cuda_dp4a(v, Q_q8[k_KQ_0/nthreads], 0);

        const float2 Q_ds = ((const float2 *) Q_ds_v)[k_KQ_0/nthreads];
        sum += qaq_f16_to_f32(K[ib].d) * Q_ds.x * sumi;
    }

    return sum;
}

template <int D, int nthreads>
static __device__ __forceinline__ float vec_dot_fattn_vec_KQ_qaq3(
    const char * __restrict__ K_c, const void * __restrict__ Q_v, const int * __restrict__ Q_q8, const void * __restrict__ Q_ds_v) {
    return vec_dot_fattn_vec_KQ_qaq<D, nthreads, block_qaq3, qaq3_get_int>(K_c, Q_v, Q_q8, Q_ds_v);
}

template <int D, int nthreads>
static __device__ __forceinline__ float vec_dot_fattn_vec_KQ_qaq2(
    const char * __restrict__ K_c, const void * __restrict__ Q_v, const int * __restrict__ Q_q8, const void * __restrict__ Q_ds_v) {
    return vec_dot_fattn_vec_KQ_qaq<D, nthreads, block_qaq2, qaq2_get_int>(K_c, Q_v, Q_q8, Q_ds_v);
}

template <int D, int nthreads>
static __device__ __forceinline__ float vec_dot_fattn_vec_KQ_qaq4l(
    const char * __restrict__ K_c, const void * __restrict__ Q_v, const int * __restrict__ Q_q8, const void * __restrict__ Q_ds_v) {
    return vec_dot_fattn_vec_KQ_qaq_lean<D, nthreads, block_qaq4l, qaq4l_get_int>(K_c, Q_v, Q_q8, Q_ds_v);
}

template <int D, int nthreads>
static __device__ __forceinline__ float vec_dot_fattn_vec_KQ_qaq3l(
    const char * __restrict__ K_c, const void * __restrict__ Q_v, const int * __restrict__ Q_q8, const void * __restrict__ Q_ds_v) {
    return vec_dot_fattn_vec_KQ_qaq_lean<D, nthreads, block_qaq3l, qaq3l_get_int>(K_c, Q_v, Q_q8, Q_ds_v);
}

template <int D, int nthreads>
static __device__ __forceinline__ float vec_dot_fattn_vec_KQ_qaq2l(
    const char * __restrict__ K_c, const void * __restrict__ Q_v, const int * __restrict__ Q_q8, const void * __restrict__ Q_ds_v) {
    return vec_dot_fattn_vec_KQ_qaq_lean<D, nthreads, block_qaq2l, qaq2l_get_int>(K_c, Q_v, Q_q8, Q_ds_v);
}

// ne (2 or 4) consecutive values of a V row from element i0 (a multiple of ne), as half or float; qk values per block
// (QK_QAQ: two ue5m3 scales, QK_QAQL: one fp16 scale)
template <typename T, int ne, typename block_t, int (*get_int)(const block_t *, int), int qk>
static __device__ __forceinline__ void dequantize_V_qaq_impl(const void * __restrict__ vx, void * __restrict__ dst, const int64_t i0) {
    const block_t * x = (const block_t *) vx;

    const int64_t ib  =  i0 / qk;
    const int     iqs = (i0 % qk) / 4;

    static_assert(ne == 2 || ne == 4, "bad ne");
    int q = get_int(x + ib, iqs);
    if constexpr (ne == 2) {
        q >>= 16*((i0 % 4) / 2);
    }

    const int8_t * q8 = (const int8_t *) &q;

#ifdef FP16_AVAILABLE
    if constexpr (std::is_same_v<T, half>) {
        half2 d;
        if constexpr (qk == QK_QAQ) {
            d = __half2half2(qaq_ue5m3_to_f16(x[ib].d[iqs / 4]));
        } else {
            d = __half2half2(__ushort_as_half(x[ib].d));
        }

#pragma unroll
        for (int l0 = 0; l0 < ne; l0 += 2) {
            ((half2 *) dst)[l0/2] = d * make_half2(q8[l0 + 0], q8[l0 + 1]);
        }
    } else
#endif // FP16_AVAILABLE
    if constexpr (std::is_same_v<T, float>) {
        float d;
        if constexpr (qk == QK_QAQ) {
            d = qaq_ue5m3_to_f32(x[ib].d[iqs / 4]);
        } else {
            d = qaq_f16_to_f32(x[ib].d);
        }

#pragma unroll
        for (int l = 0; l < ne; ++l) {
            ((float *) dst)[l] = d * q8[l];
        }
    } else {
        static_assert(std::is_same_v<T, void>, "bad type");
    }
}

template <typename T, int ne>
static __device__ __forceinline__ void dequantize_V_qaq3(const void * __restrict__ vx, void * __restrict__ dst, const int64_t i0) {
    dequantize_V_qaq_impl<T, ne, block_qaq3, qaq3_get_int, QK_QAQ>(vx, dst, i0);
}

template <typename T, int ne>
static __device__ __forceinline__ void dequantize_V_qaq2(const void * __restrict__ vx, void * __restrict__ dst, const int64_t i0) {
    dequantize_V_qaq_impl<T, ne, block_qaq2, qaq2_get_int, QK_QAQ>(vx, dst, i0);
}

template <typename T, int ne>
static __device__ __forceinline__ void dequantize_V_qaq4l(const void * __restrict__ vx, void * __restrict__ dst, const int64_t i0) {
    dequantize_V_qaq_impl<T, ne, block_qaq4l, qaq4l_get_int, QK_QAQL>(vx, dst, i0);
}

template <typename T, int ne>
static __device__ __forceinline__ void dequantize_V_qaq3l(const void * __restrict__ vx, void * __restrict__ dst, const int64_t i0) {
    dequantize_V_qaq_impl<T, ne, block_qaq3l, qaq3l_get_int, QK_QAQL>(vx, dst, i0);
}

template <typename T, int ne>
static __device__ __forceinline__ void dequantize_V_qaq2l(const void * __restrict__ vx, void * __restrict__ dst, const int64_t i0) {
    dequantize_V_qaq_impl<T, ne, block_qaq2l, qaq2l_get_int, QK_QAQL>(vx, dst, i0);
}
