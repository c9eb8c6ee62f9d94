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

// the 4 values of int iqs of a block (get_int: codebook levels as int8) against an int of Q's q8_1 values, unscaled
template <typename block_t, int (*get_int)(const block_t *, int)>
static __device__ __forceinline__ float qaq_dot4_levels(const block_t * __restrict__ x, const int iqs, const int q) {
    return (float) ggml_cuda_dp4a(get_int(x, iqs), q, 0);
}

// K types of qk-value blocks under one fp16 scale d (the lean, head-64 and trellis types): sum over the ints of a row
// of d * Q's scale * dot4(block, int, Q's int)
template <int D, int nthreads, typename block_t, float (*dot4)(const block_t *, int, int), int qk = QK_QAQL>
static __device__ __forceinline__ float vec_dot_fattn_vec_KQ_qaq_fp16_scale(
    const char * __restrict__ K_c, const void * __restrict__ Q_v, const int * __restrict__ Q_q8, const void * __restrict__ Q_ds_v) {

    static_assert(D % qk == 0, "a K type of blocks of qk values needs a head size that is a multiple of qk");
    const block_t * K = (const block_t *) K_c;
    GGML_UNUSED(Q_v);

    float sum = 0.0f;

#pragma unroll
    for (int k_KQ_0 = 0; k_KQ_0 < int(D/sizeof(int)); k_KQ_0 += nthreads) {
        const int k_KQ = k_KQ_0 + (nthreads == WARP_SIZE ? threadIdx.x : threadIdx.x % nthreads);

        const int ib  = k_KQ / (qk/sizeof(int));
        const int iqs = k_KQ % (qk/sizeof(int));

        const float dot = dot4(K + ib, iqs, Q_q8[k_KQ_0/nthreads]);

        const float2 Q_ds = ((const float2 *) Q_ds_v)[k_KQ_0/nthreads];
        sum += qaq_fp16_to_fp32(K[ib].d) * Q_ds.x * dot;
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
    return vec_dot_fattn_vec_KQ_qaq_fp16_scale<D, nthreads, block_qaq4l, qaq_dot4_levels<block_qaq4l, qaq4l_get_int>>(K_c, Q_v, Q_q8, Q_ds_v);
}

template <int D, int nthreads>
static __device__ __forceinline__ float vec_dot_fattn_vec_KQ_qaq3l(
    const char * __restrict__ K_c, const void * __restrict__ Q_v, const int * __restrict__ Q_q8, const void * __restrict__ Q_ds_v) {
    return vec_dot_fattn_vec_KQ_qaq_fp16_scale<D, nthreads, block_qaq3l, qaq_dot4_levels<block_qaq3l, qaq3l_get_int>>(K_c, Q_v, Q_q8, Q_ds_v);
}

template <int D, int nthreads>
static __device__ __forceinline__ float vec_dot_fattn_vec_KQ_qaq2l(
    const char * __restrict__ K_c, const void * __restrict__ Q_v, const int * __restrict__ Q_q8, const void * __restrict__ Q_ds_v) {
    return vec_dot_fattn_vec_KQ_qaq_fp16_scale<D, nthreads, block_qaq2l, qaq_dot4_levels<block_qaq2l, qaq2l_get_int>>(K_c, Q_v, Q_q8, Q_ds_v);
}

template <int D, int nthreads>
static __device__ __forceinline__ float vec_dot_fattn_vec_KQ_qaq4h(
    const char * __restrict__ K_c, const void * __restrict__ Q_v, const int * __restrict__ Q_q8, const void * __restrict__ Q_ds_v) {
    return vec_dot_fattn_vec_KQ_qaq_fp16_scale<D, nthreads, block_qaq4h, qaq_dot4_levels<block_qaq4h, qaq4h_get_int>, QK_QAQH>(K_c, Q_v, Q_q8, Q_ds_v);
}

template <int D, int nthreads>
static __device__ __forceinline__ float vec_dot_fattn_vec_KQ_qaq3h(
    const char * __restrict__ K_c, const void * __restrict__ Q_v, const int * __restrict__ Q_q8, const void * __restrict__ Q_ds_v) {
    return vec_dot_fattn_vec_KQ_qaq_fp16_scale<D, nthreads, block_qaq3h, qaq_dot4_levels<block_qaq3h, qaq3h_get_int>, QK_QAQH>(K_c, Q_v, Q_q8, Q_ds_v);
}

template <int D, int nthreads>
static __device__ __forceinline__ float vec_dot_fattn_vec_KQ_qaq2h(
    const char * __restrict__ K_c, const void * __restrict__ Q_v, const int * __restrict__ Q_q8, const void * __restrict__ Q_ds_v) {
    return vec_dot_fattn_vec_KQ_qaq_fp16_scale<D, nthreads, block_qaq2h, qaq_dot4_levels<block_qaq2h, qaq2h_get_int>, QK_QAQH>(K_c, Q_v, Q_q8, Q_ds_v);
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

// ---------------------------------------------------------------------------------------------------------------------
// tcq3 / tcq2 (trellis-coded, 64 values per block, kbits = 3 or 2): the value of element j is d * c[state_j], the
// state from the last inputs (qaq_tcq_state); the quantizer is a Viterbi walk, spread over a warp.

// the states of elements j0 .. j0 + 3 of a block (j0 a multiple of 4) from the inputs j0 - 3 .. j0 + 3, read once
template <int kbits>
static __host__ __device__ __forceinline__ void qaq_tcq_states4(const uint8_t * __restrict__ qs, const int j0, int * s) {
    int b[7];
#pragma unroll
    for (int i = 0; i < 7; ++i) {
        b[i] = j0 - 3 + i >= 0 ? qaq_tcq_input(kbits, qs, j0 - 3 + i) : 0;
    }
#pragma unroll
    for (int l = 0; l < 4; ++l) {
        s[l] = (b[l] << 3*kbits | b[l + 1] << 2*kbits | b[l + 2] << kbits | b[l + 3]) & (QAQ_TCQ_STATES - 1);
    }
}

// dequantize_kernel_t (qk = QK_TCQ, qr = 1): values iqs and iqs + 1 of block ib
template <int kbits, typename block_t>
static __host__ __device__ __forceinline__ void dequantize_tcq(const void * vx, const int64_t ib, const int iqs, float2 & v) {
    const block_t * x = (const block_t *) vx + ib;
    v.x = qaq_tcq_value(kbits, x->d, x->qs, iqs + 0);
    v.y = qaq_tcq_value(kbits, x->d, x->qs, iqs + 1);
}

static __host__ __device__ __forceinline__ void dequantize_tcq3(const void * vx, const int64_t ib, const int iqs, float2 & v) {
    dequantize_tcq<3, block_tcq3>(vx, ib, iqs, v);
}

static __host__ __device__ __forceinline__ void dequantize_tcq2(const void * vx, const int64_t ib, const int iqs, float2 & v) {
    dequantize_tcq<2, block_tcq2>(vx, ib, iqs, v);
}

// What the quantizer of one block keeps between its phases: shared memory, one per warp (5.3 KiB).
struct qaq_tcq_scratch {
    float   u[QK_TCQ];
    float   v[QK_TCQ];
    float   M[2][QAQ_TCQ_STATES >> 2];
    uint8_t bp[QK_TCQ][QAQ_TCQ_STATES >> 2];
    uint8_t b[QK_TCQ];
    float   amax;
    int     live;
};

// The quantizer of one tcq block by a group of lanes sharing a scratch, bit-exact with qaq_tcq_quantize_block and
// qaq_tcq_walk_ref: lane 0 starts the block (qaq_tcq_prepare) and ends it (qaq_tcq_walk_finish, qaq_tcq_pack); each
// step of the walk spreads its groups lo = lane, lane + n, ... over the lanes (qaq_tcq_walk_group: a group reads the
// previous step's costs only, so the lanes are independent within a step). lanes_t runs the phases: one(f) runs f on
// lane 0, each(f) runs f(lane) on every lane, both followed by a barrier of the group. On the device the group is a
// warp (qaq_warp_lanes); tests/native/test_cuda_host.cu runs this same function with the lanes one after another.
#if defined(__CUDACC__) && !defined(__HIPCC__)
#pragma nv_exec_check_disable  // lanes_t is host-only (the test) or device-only (a warp): each instance runs on its side
#endif
template <int kbits, typename lanes_t>
static __host__ __device__ void qaq_tcq_quantize_block_lanes(const float * __restrict__ x, uint16_t * d, uint8_t * qs,
                                                             qaq_tcq_scratch & sm, const lanes_t & lanes) {
    lanes.one([&]() {
        sm.live = qaq_tcq_prepare(kbits, x, d, qs, sm.u, sm.v, &sm.amax);
        qaq_tcq_walk_start(kbits, sm.M[0]);
    });
    if (!sm.live) {
        return;
    }
    for (int t = 0; t < QK_TCQ - 1; ++t) {
        lanes.each([&](const int lane) {
            for (int lo = lane; lo < (QAQ_TCQ_STATES >> kbits); lo += lanes_t::n) {
                qaq_tcq_walk_group(kbits, lo, sm.v[t], sm.M[t & 1], sm.M[(t + 1) & 1], sm.bp[t + 1]);
            }
        });
    }
    lanes.one([&]() {
        qaq_tcq_walk_finish(kbits, sm.v, sm.M[(QK_TCQ - 1) & 1], sm.bp, sm.b);
        qaq_tcq_pack(kbits, sm.amax, sm.u, sm.b, d, qs);
    });
}

#ifdef __CUDACC__
// the lanes of a warp: every lane of the warp calls the quantizer for the same block
struct qaq_warp_lanes {
    static constexpr int n = WARP_SIZE;
    template <typename F> __device__ __forceinline__ void one(F f) const {
        if (threadIdx.x % WARP_SIZE == 0) {
            f();
        }
        __syncwarp();
    }
    template <typename F> __device__ __forceinline__ void each(F f) const {
        f((int) (threadIdx.x % WARP_SIZE));
        __syncwarp();
    }
};

// set_rows / cpy block quantizers, the signature of the others (quantize_f32_qaq*_block), but called by all 32 lanes
// of a warp for the same block: the kernels that call them give each warp one block (their template parameter
// lanes = WARP_SIZE) and run at most QAQ_TCQ_WARPS warps per CUDA block, each with its scratch in shared memory
#define QAQ_TCQ_WARPS 8

static __device__ void quantize_f32_tcq3_block(const float * __restrict__ x, block_tcq3 * __restrict__ y) {
    __shared__ qaq_tcq_scratch sm[QAQ_TCQ_WARPS];
    qaq_tcq_quantize_block_lanes<3>(x, &y->d, y->qs, sm[threadIdx.x / WARP_SIZE], qaq_warp_lanes());
}

static __device__ void quantize_f32_tcq2_block(const float * __restrict__ x, block_tcq2 * __restrict__ y) {
    __shared__ qaq_tcq_scratch sm[QAQ_TCQ_WARPS];
    qaq_tcq_quantize_block_lanes<2>(x, &y->d, y->qs, sm[threadIdx.x / WARP_SIZE], qaq_warp_lanes());
}
#endif // __CUDACC__

// Flash attention, vector kernel: sum over elements 4 iqs .. 4 iqs + 3 of c[state] times the int8 values of q (one int
// of Q as q8_1), and ne (2 or 4) values of a V row from element i0 (a multiple of ne)
template <int kbits, typename block_t>
static __host__ __device__ __forceinline__ float qaq_tcq_dot4(const block_t * __restrict__ x, const int iqs, const int q) {
    const float * T = qaq_tcq_codebook(kbits);
    int s[4];
    qaq_tcq_states4<kbits>(x->qs, 4*iqs, s);
    float sum = 0.0f;
#pragma unroll
    for (int l = 0; l < 4; ++l) {
        sum += T[s[l]] * (float) (int8_t) (q >> 8*l);
    }
    return sum;
}

template <int D, int nthreads>
static __device__ __forceinline__ float vec_dot_fattn_vec_KQ_tcq3(
    const char * __restrict__ K_c, const void * __restrict__ Q_v, const int * __restrict__ Q_q8, const void * __restrict__ Q_ds_v) {
    return vec_dot_fattn_vec_KQ_qaq_fp16_scale<D, nthreads, block_tcq3, qaq_tcq_dot4<3, block_tcq3>, QK_TCQ>(K_c, Q_v, Q_q8, Q_ds_v);
}

template <int D, int nthreads>
static __device__ __forceinline__ float vec_dot_fattn_vec_KQ_tcq2(
    const char * __restrict__ K_c, const void * __restrict__ Q_v, const int * __restrict__ Q_q8, const void * __restrict__ Q_ds_v) {
    return vec_dot_fattn_vec_KQ_qaq_fp16_scale<D, nthreads, block_tcq2, qaq_tcq_dot4<2, block_tcq2>, QK_TCQ>(K_c, Q_v, Q_q8, Q_ds_v);
}

template <typename T, int ne, int kbits, typename block_t>
static __host__ __device__ __forceinline__ void dequantize_V_tcq_impl(const void * __restrict__ vx, void * __restrict__ dst, const int64_t i0) {
    static_assert(ne == 2 || ne == 4, "bad ne");
    const block_t * x = (const block_t *) vx + i0 / QK_TCQ;
    const int j0 = (int) (i0 % QK_TCQ);

    const float * C = qaq_tcq_codebook(kbits);
    const float   d = qaq_fp16_to_fp32(x->d);
    int s[4];
    qaq_tcq_states4<kbits>(x->qs, j0 & ~3, s);

#pragma unroll
    for (int l = 0; l < ne; ++l) {
        const float v = qaq_fmul(d, C[s[(j0 & 3) + l]]);
        if constexpr (std::is_same_v<T, float>) {
            ((float *) dst)[l] = v;
        } else {
#ifdef FP16_AVAILABLE
            static_assert(std::is_same_v<T, half>, "bad type");
            ((half *) dst)[l] = __float2half(v);
#else
            static_assert(std::is_same_v<T, void>, "bad type");
#endif // FP16_AVAILABLE
        }
    }
}

template <typename T, int ne>
static __host__ __device__ __forceinline__ void dequantize_V_tcq3(const void * __restrict__ vx, void * __restrict__ dst, const int64_t i0) {
    dequantize_V_tcq_impl<T, ne, 3, block_tcq3>(vx, dst, i0);
}

template <typename T, int ne>
static __host__ __device__ __forceinline__ void dequantize_V_tcq2(const void * __restrict__ vx, void * __restrict__ dst, const int64_t i0) {
    dequantize_V_tcq_impl<T, ne, 2, block_tcq2>(vx, dst, i0);
}
