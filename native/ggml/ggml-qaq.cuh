// qaq3 / qaq2, qaq4l / qaq3l / qaq2l and qaq4h / qaq3h / qaq2h CUDA device code (design in docs/cache-types.md).
//
// The per-block math (layouts, codebooks, ue5m3 and fp16 scales, the block quantizers and dequantizers, the index
// decoders) is in ggml-qaq-common.h, shared with the C reference; this file holds what is CUDA's own:
//   - dequantize_qaq{3,2}, dequantize_qaq{4,3,2}{l,h}: the dequantize_kernel_t of convert.cu / getrows.cu / cpy.cu (2
//     values at a time);
//   - quantize_f32_qaq{3,2}_block, quantize_f32_qaq{4,3,2}{l,h}_block: the set_rows / cpy block quantizers (the shared
//     qaq_quantize_block_*, bit-exact with quantize_row_qaq*_ref);
//   - vec_dot_fattn_vec_KQ_qaq* and dequantize_V_qaq* for the flash-attention vector kernel.
// The functions other than the flash-attention K.Q products are __host__ __device__, so that
// tests/native/test_cuda_host.cu can run them on the CPU against the C reference.
//
// Include after ggml-cuda's common.cuh (WARP_SIZE, QI8_1, ggml_cuda_dp4a, GGML_UNUSED, FP16_AVAILABLE).
#pragma once

#include "ggml-qaq-common.h"

#include <cstdint>

// ue5m3 -> fp16: the byte is the top of an fp16 without sign (exact, no table)
static __device__ __forceinline__ half qaq_ue5m3_to_f16(const uint8_t b) {
    return __ushort_as_half((unsigned short) (b << 7));
}

// per block: iqs = 0..7 (qaq3 / qaq2, one block is 32 values), iqs = 0..31 (the lean types, 32 values per 8 ints),
// iqs = 0..15 (the head-64 types)
static __host__ __device__ __forceinline__ int qaq3_get_int(const block_qaq3 * __restrict__ x, const int iqs) {
    return qaq3_get_int32(x->qs, x->qh, iqs);
}
static __host__ __device__ __forceinline__ int qaq2_get_int(const block_qaq2 * __restrict__ x, const int iqs) {
    return qaq2_get_int32(x->qs, iqs);
}
static __host__ __device__ __forceinline__ int qaq4l_get_int(const block_qaq4l * __restrict__ x, const int iqs) {
    return qaq4_get_int32(x->qs + (QK_QAQ/2)*(iqs / QI8_1), iqs % QI8_1);
}
static __host__ __device__ __forceinline__ int qaq3l_get_int(const block_qaq3l * __restrict__ x, const int iqs) {
    return qaq3_get_int32(x->qs + (QK_QAQ/4)*(iqs / QI8_1), x->qh + (QK_QAQ/8)*(iqs / QI8_1), iqs % QI8_1);
}
static __host__ __device__ __forceinline__ int qaq2l_get_int(const block_qaq2l * __restrict__ x, const int iqs) {
    return qaq2_get_int32(x->qs + (QK_QAQ/4)*(iqs / QI8_1), iqs % QI8_1);
}
static __host__ __device__ __forceinline__ int qaq4h_get_int(const block_qaq4h * __restrict__ x, const int iqs) {
    return qaq4_get_int32(x->qs + (QK_QAQ/2)*(iqs / QI8_1), iqs % QI8_1);
}
static __host__ __device__ __forceinline__ int qaq3h_get_int(const block_qaq3h * __restrict__ x, const int iqs) {
    return qaq3_get_int32(x->qs + (QK_QAQ/4)*(iqs / QI8_1), x->qh + (QK_QAQ/8)*(iqs / QI8_1), iqs % QI8_1);
}
static __host__ __device__ __forceinline__ int qaq2h_get_int(const block_qaq2h * __restrict__ x, const int iqs) {
    return qaq2_get_int32(x->qs + (QK_QAQ/4)*(iqs / QI8_1), iqs % QI8_1);
}

// ---------------------------------------------------------------------------------------------------------------------
// dequantize_kernel_t (qk = QK_QAQ, QK_QAQL or QK_QAQH, qr = 1): values iqs and iqs + 1 of block ib (iqs even)

// values j and j + 1 (j even) of 32 values packed as one qaq3 (qh != nullptr) or qaq2 block, scale d
template <int nlev>
static __host__ __device__ __forceinline__ void qaq_dequantize2_32(const float d, const uint8_t * __restrict__ qs,
                                                                   const uint8_t * __restrict__ qh, const int j, float2 & v) {
    if constexpr (nlev == 8) {
        v.x = d * qaq_level(8, qaq3_index(qs, qh, j + 0));
        v.y = d * qaq_level(8, qaq3_index(qs, qh, j + 1));
    } else {
        static_assert(nlev == 4, "bad nlev");
        GGML_UNUSED(qh);
        v.x = d * qaq_level(4, qaq2_index(qs, j + 0));
        v.y = d * qaq_level(4, qaq2_index(qs, j + 1));
    }
}

static __host__ __device__ __forceinline__ void dequantize_qaq3(const void * vx, const int64_t ib, const int iqs, float2 & v) {
    const block_qaq3 * x = (const block_qaq3 *) vx + ib;
    qaq_dequantize2_32<8>(qaq_ue5m3_to_fp32(x->d[iqs / (QK_QAQ/2)]), x->qs, x->qh, iqs, v);
}

static __host__ __device__ __forceinline__ void dequantize_qaq2(const void * vx, const int64_t ib, const int iqs, float2 & v) {
    const block_qaq2 * x = (const block_qaq2 *) vx + ib;
    qaq_dequantize2_32<4>(qaq_ue5m3_to_fp32(x->d[iqs / (QK_QAQ/2)]), x->qs, nullptr, iqs, v);
}

// values j and j + 1 (j even) of a qaq4l / qaq4h block: d, 4-bit indices qs
static __host__ __device__ __forceinline__ void qaq_dequantize2_lean4(const float d, const uint8_t * __restrict__ qs,
                                                                      const int iqs, float2 & v) {
    const uint8_t * q = qs + (QK_QAQ/2)*(iqs / QK_QAQ);
    const int       j = iqs % QK_QAQ;                       // j even: j and j + 1 share the nibble half

    v.x = d * qaq_level(16, qaq4_index(q, j + 0));
    v.y = d * qaq_level(16, qaq4_index(q, j + 1));
}

static __host__ __device__ __forceinline__ void dequantize_qaq4l(const void * vx, const int64_t ib, const int iqs, float2 & v) {
    const block_qaq4l * x = (const block_qaq4l *) vx + ib;
    qaq_dequantize2_lean4(qaq_fp16_to_fp32(x->d), x->qs, iqs, v);
}

static __host__ __device__ __forceinline__ void dequantize_qaq4h(const void * vx, const int64_t ib, const int iqs, float2 & v) {
    const block_qaq4h * x = (const block_qaq4h *) vx + ib;
    qaq_dequantize2_lean4(qaq_fp16_to_fp32(x->d), x->qs, iqs, v);
}

static __host__ __device__ __forceinline__ void dequantize_qaq3l(const void * vx, const int64_t ib, const int iqs, float2 & v) {
    const block_qaq3l * x = (const block_qaq3l *) vx + ib;
    const int g = iqs / QK_QAQ;
    qaq_dequantize2_32<8>(qaq_fp16_to_fp32(x->d), x->qs + (QK_QAQ/4)*g, x->qh + (QK_QAQ/8)*g, iqs % QK_QAQ, v);
}

static __host__ __device__ __forceinline__ void dequantize_qaq2l(const void * vx, const int64_t ib, const int iqs, float2 & v) {
    const block_qaq2l * x = (const block_qaq2l *) vx + ib;
    const int g = iqs / QK_QAQ;
    qaq_dequantize2_32<4>(qaq_fp16_to_fp32(x->d), x->qs + (QK_QAQ/4)*g, nullptr, iqs % QK_QAQ, v);
}

static __host__ __device__ __forceinline__ void dequantize_qaq3h(const void * vx, const int64_t ib, const int iqs, float2 & v) {
    const block_qaq3h * x = (const block_qaq3h *) vx + ib;
    const int g = iqs / QK_QAQ;
    qaq_dequantize2_32<8>(qaq_fp16_to_fp32(x->d), x->qs + (QK_QAQ/4)*g, x->qh + (QK_QAQ/8)*g, iqs % QK_QAQ, v);
}

static __host__ __device__ __forceinline__ void dequantize_qaq2h(const void * vx, const int64_t ib, const int iqs, float2 & v) {
    const block_qaq2h * x = (const block_qaq2h *) vx + ib;
    const int g = iqs / QK_QAQ;
    qaq_dequantize2_32<4>(qaq_fp16_to_fp32(x->d), x->qs + (QK_QAQ/4)*g, nullptr, iqs % QK_QAQ, v);
}

// ---------------------------------------------------------------------------------------------------------------------
// Block quantizers (one thread per block): the shared qaq_quantize_block_* of ggml-qaq-common.h. ggml-cuda is built
// with -use_fast_math (FMA contraction, approximate division, flush-to-zero); the shared code's device pass spells
// every float operation and comparison as an IEEE round-to-nearest PTX instruction without .ftz, so the bytes match
// the CPU reference (compiled with -ffp-contract=off) even for subnormal inputs.

static __host__ __device__ void quantize_f32_qaq3_block(const float * __restrict__ x, block_qaq3 * __restrict__ y) {
    qaq_quantize_block_qaq3(x, y);
}

static __host__ __device__ void quantize_f32_qaq2_block(const float * __restrict__ x, block_qaq2 * __restrict__ y) {
    qaq_quantize_block_qaq2(x, y);
}

static __host__ __device__ void quantize_f32_qaq4l_block(const float * __restrict__ x, block_qaq4l * __restrict__ y) {
    qaq_quantize_block_qaq4l(x, y);
}

static __host__ __device__ void quantize_f32_qaq3l_block(const float * __restrict__ x, block_qaq3l * __restrict__ y) {
    qaq_quantize_block_qaq3l(x, y);
}

static __host__ __device__ void quantize_f32_qaq2l_block(const float * __restrict__ x, block_qaq2l * __restrict__ y) {
    qaq_quantize_block_qaq2l(x, y);
}

static __host__ __device__ void quantize_f32_qaq4h_block(const float * __restrict__ x, block_qaq4h * __restrict__ y) {
    qaq_quantize_block_qaq4h(x, y);
}

static __host__ __device__ void quantize_f32_qaq3h_block(const float * __restrict__ x, block_qaq3h * __restrict__ y) {
    qaq_quantize_block_qaq3h(x, y);
}

static __host__ __device__ void quantize_f32_qaq2h_block(const float * __restrict__ x, block_qaq2h * __restrict__ y) {
    qaq_quantize_block_qaq2h(x, y);
}

// ---------------------------------------------------------------------------------------------------------------------
// Flash attention, vector kernel (fattn-vec.cuh): K.Q against Q as q8_1 (one int of 4 values per k_KQ, QI8_1 ints per
// block of q8_1), and V rows. A block of qaq3/qaq2 is one block of q8_1 and each int lies inside one half, i.e. one
// scale; a lean (head-64) block is four (two) blocks of q8_1 under one scale.

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
        sum += qaq_ue5m3_to_fp32(K[ib].d[iqs / (QI8_1/2)]) * Q_ds.x * sumi;
    }

    return sum;
}

template <int D, int nthreads, typename block_t, int (*get_int)(const block_t *, int), int qk = QK_QAQL>
static __device__ __forceinline__ float vec_dot_fattn_vec_KQ_qaq_lean(
    const char * __restrict__ K_c, const void * __restrict__ Q_v, const int * __restrict__ Q_q8, const void * __restrict__ Q_ds_v) {

    static_assert(D % qk == 0, "lean (head-64) K types need a head size that is a multiple of 128 (64)");
    const block_t * K = (const block_t *) K_c;
    GGML_UNUSED(Q_v);

    float sum = 0.0f;

#pragma unroll
    for (int k_KQ_0 = 0; k_KQ_0 < int(D/sizeof(int)); k_KQ_0 += nthreads) {
        const int k_KQ = k_KQ_0 + (nthreads == WARP_SIZE ? threadIdx.x : threadIdx.x % nthreads);

        const int ib  = k_KQ / (qk/sizeof(int));
        const int iqs = k_KQ % (qk/sizeof(int));

        const int v    = get_int(K + ib, iqs);
        const int sumi = ggml_cuda_dp4a(v, Q_q8[k_KQ_0/nthreads], 0);

        const float2 Q_ds = ((const float2 *) Q_ds_v)[k_KQ_0/nthreads];
        sum += qaq_fp16_to_fp32(K[ib].d) * Q_ds.x * sumi;
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

template <int D, int nthreads>
static __device__ __forceinline__ float vec_dot_fattn_vec_KQ_qaq4h(
    const char * __restrict__ K_c, const void * __restrict__ Q_v, const int * __restrict__ Q_q8, const void * __restrict__ Q_ds_v) {
    return vec_dot_fattn_vec_KQ_qaq_lean<D, nthreads, block_qaq4h, qaq4h_get_int, QK_QAQH>(K_c, Q_v, Q_q8, Q_ds_v);
}

template <int D, int nthreads>
static __device__ __forceinline__ float vec_dot_fattn_vec_KQ_qaq3h(
    const char * __restrict__ K_c, const void * __restrict__ Q_v, const int * __restrict__ Q_q8, const void * __restrict__ Q_ds_v) {
    return vec_dot_fattn_vec_KQ_qaq_lean<D, nthreads, block_qaq3h, qaq3h_get_int, QK_QAQH>(K_c, Q_v, Q_q8, Q_ds_v);
}

template <int D, int nthreads>
static __device__ __forceinline__ float vec_dot_fattn_vec_KQ_qaq2h(
    const char * __restrict__ K_c, const void * __restrict__ Q_v, const int * __restrict__ Q_q8, const void * __restrict__ Q_ds_v) {
    return vec_dot_fattn_vec_KQ_qaq_lean<D, nthreads, block_qaq2h, qaq2h_get_int, QK_QAQH>(K_c, Q_v, Q_q8, Q_ds_v);
}

// ne (2 or 4) consecutive values of a V row from element i0 (a multiple of ne), as half or float; qk values per block
// (QK_QAQ: two ue5m3 scales, QK_QAQL or QK_QAQH: one fp16 scale)
template <typename T, int ne, typename block_t, int (*get_int)(const block_t *, int), int qk>
static __host__ __device__ __forceinline__ void dequantize_V_qaq_impl(const void * __restrict__ vx, void * __restrict__ dst, const int64_t i0) {
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
            d = qaq_ue5m3_to_fp32(x[ib].d[iqs / 4]);
        } else {
            d = qaq_fp16_to_fp32(x[ib].d);
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
static __host__ __device__ __forceinline__ void dequantize_V_qaq3(const void * __restrict__ vx, void * __restrict__ dst, const int64_t i0) {
    dequantize_V_qaq_impl<T, ne, block_qaq3, qaq3_get_int, QK_QAQ>(vx, dst, i0);
}

template <typename T, int ne>
static __host__ __device__ __forceinline__ void dequantize_V_qaq2(const void * __restrict__ vx, void * __restrict__ dst, const int64_t i0) {
    dequantize_V_qaq_impl<T, ne, block_qaq2, qaq2_get_int, QK_QAQ>(vx, dst, i0);
}

template <typename T, int ne>
static __host__ __device__ __forceinline__ void dequantize_V_qaq4l(const void * __restrict__ vx, void * __restrict__ dst, const int64_t i0) {
    dequantize_V_qaq_impl<T, ne, block_qaq4l, qaq4l_get_int, QK_QAQL>(vx, dst, i0);
}

template <typename T, int ne>
static __host__ __device__ __forceinline__ void dequantize_V_qaq3l(const void * __restrict__ vx, void * __restrict__ dst, const int64_t i0) {
    dequantize_V_qaq_impl<T, ne, block_qaq3l, qaq3l_get_int, QK_QAQL>(vx, dst, i0);
}

template <typename T, int ne>
static __host__ __device__ __forceinline__ void dequantize_V_qaq2l(const void * __restrict__ vx, void * __restrict__ dst, const int64_t i0) {
    dequantize_V_qaq_impl<T, ne, block_qaq2l, qaq2l_get_int, QK_QAQL>(vx, dst, i0);
}

template <typename T, int ne>
static __host__ __device__ __forceinline__ void dequantize_V_qaq4h(const void * __restrict__ vx, void * __restrict__ dst, const int64_t i0) {
    dequantize_V_qaq_impl<T, ne, block_qaq4h, qaq4h_get_int, QK_QAQH>(vx, dst, i0);
}

template <typename T, int ne>
static __host__ __device__ __forceinline__ void dequantize_V_qaq3h(const void * __restrict__ vx, void * __restrict__ dst, const int64_t i0) {
    dequantize_V_qaq_impl<T, ne, block_qaq3h, qaq3h_get_int, QK_QAQH>(vx, dst, i0);
}

template <typename T, int ne>
static __host__ __device__ __forceinline__ void dequantize_V_qaq2h(const void * __restrict__ vx, void * __restrict__ dst, const int64_t i0) {
    dequantize_V_qaq_impl<T, ne, block_qaq2h, qaq2h_get_int, QK_QAQH>(vx, dst, i0);
}
