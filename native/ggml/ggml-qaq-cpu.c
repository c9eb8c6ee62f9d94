// qaq3 / qaq2 / qaq4l / qaq3l / qaq2l / qaq4h / qaq3h / qaq2h / tcq3 / tcq2 CPU kernels (compiled into ggml-cpu): from_float for set_rows/cpy, the dot
// product with a q8_0 row that flash attention's vector path uses for K.q (Q rounded to q8_0 blocks of 32 once per
// query row), and the row dequantization its V accumulation and the tiled path's K/V tiles use.

#include "ggml-qaq.h"
#include "ggml-qaq-cpu.h"

#define GGML_COMMON_DECL_C
#include "ggml-common.h"
#include "ggml-impl.h"
#include "simd-mappings.h"

#include <assert.h>
#include <stdbool.h>
#include <stddef.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define QAQ_DOT_ROWS 4 // q8_0 rows one pass over x serves (accumulators kept in registers)

#if defined(__AVX2__)
// the 2-bit low index of values 0..31 as 32 bytes: qs holds value j in byte j%8 at bits 2*(j/8)
static inline __m256i qaq_low2(const uint8_t * qs) {
    uint64_t q;
    memcpy(&q, qs, sizeof(q));
    const __m256i v = _mm256_srlv_epi64(_mm256_set1_epi64x((long long) q), _mm256_set_epi64x(6, 4, 2, 0));
    return _mm256_and_si256(v, _mm256_set1_epi8(3));
}

// the high bit of values 0..31 (bit j%8 of qh[j/8]) as 32 bytes of 0 or 4
static inline __m256i qaq_high4(const uint8_t * qh) {
    uint32_t h;
    memcpy(&h, qh, sizeof(h));
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL,
                                           0x0101010101010101LL, 0x0000000000000000LL);
    __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int) h), shuf);
    const __m256i bit = _mm256_set1_epi64x((long long) 0x8040201008040201ULL);
    b = _mm256_cmpeq_epi8(_mm256_and_si256(b, bit), bit);
    return _mm256_and_si256(b, _mm256_set1_epi8(4));
}

// the codebook of bits-bit indices (4: qaq4l; 3: qaq3, qaq3l; 2: qaq2, qaq2l) in both lanes, for _mm256_shuffle_epi8
static inline __m256i qaq_codebook(int bits) {
    return bits == 4
        ? _mm256_setr_epi8(QAQ4_KVALUES, QAQ4_KVALUES)
        : bits == 3
        ? _mm256_setr_epi8(QAQ3_KVALUES, 0, 0, 0, 0, 0, 0, 0, 0, QAQ3_KVALUES, 0, 0, 0, 0, 0, 0, 0, 0)
        : _mm256_setr_epi8(QAQ2_KVALUES, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                           QAQ2_KVALUES, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
}

// the codebook values (int8) of 32 values: 4-bit indices as q4_0's nibbles in qs (value j and j+16 in byte j), or
// the 2 low index bits in qs and, for 3-bit indices, the high bit in qh (NULL otherwise)
static inline __m256i qaq_values32(__m256i codebook, const uint8_t * qs, const uint8_t * qh, int bits) {
    __m256i idx;
    if (bits == 4) {
        const __m128i q = _mm_loadu_si128((const __m128i *) qs);
        idx = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(0xF));
    } else {
        idx = qaq_low2(qs);
        if (bits == 3) {
            idx = _mm256_or_si256(idx, qaq_high4(qh));
        }
    }
    return _mm256_shuffle_epi8(codebook, idx);
}

// the two ue5m3 scales of a qaq3/qaq2 block, d0 in the low four lanes and d1 in the high four: a ue5m3 byte b is
// the fp16 with bits b << 7 (subnormals included), which F16C converts exactly as qaq_ue5m3_to_fp32 does
static inline __m256 qaq_scales(const uint8_t * d) {
#if defined(__F16C__)
    const __m128 s = _mm_cvtph_ps(_mm_cvtsi32_si128((int) ((uint32_t) d[0] << 7 | (uint32_t) d[1] << 23)));
    return _mm256_set_m128(_mm_shuffle_ps(s, s, 0x55), _mm_shuffle_ps(s, s, 0x00));
#else
    return _mm256_set_m128(_mm_set1_ps(qaq_ue5m3_to_fp32(d[1])), _mm_set1_ps(qaq_ue5m3_to_fp32(d[0])));
#endif
}

// sum over one block of codebook values (int8, 32 bytes) times q8 values: two 16-value partial sums as floats,
// multiplied by the per-half scales (dd: the first half's in the low four lanes) and accumulated into acc
static inline __m256 qaq_block_acc(__m256 acc, __m256i xv, const block_q8_0 * y, __m256 dd) {
    const __m256i yv = _mm256_loadu_si256((const __m256i *) y->qs);
    const __m256i ax = _mm256_sign_epi8(xv, xv);
    const __m256i sy = _mm256_sign_epi8(yv, xv);
    const __m256i p16 = _mm256_maddubs_epi16(ax, sy);                      // |x|*sign(y,x) pairs (|x| <= 127)
    const __m256i p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));      // lane 0: values 0..15, lane 1: 16..31
    const __m256 sc = _mm256_mul_ps(dd, _mm256_set1_ps(GGML_CPU_FP16_TO_FP32(y->d)));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), sc, acc);
}

static inline float qaq_hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#if defined(__AVX2__)
// qaq_fit_ref, eight values at a time: x*id, the level index as the count of thresholds below (NaN: none, as
// qaq_nearest), the level by a permute, x*t. sum t*t adds integers below 2^24 exactly in any order; sum x*t runs in
// index order, the candidates interleaved. The same results bit for bit (this file is built without FP contraction).
static void qaq_fit_avx2(const float * GGML_RESTRICT x, int n, float sumx2, const float * GGML_RESTRICT id, int nid,
                         const int8_t * GGML_RESTRICT T, const float * GGML_RESTRICT mid, int nmid,
                         float * GGML_RESTRICT ds, float * GGML_RESTRICT err, bool * GGML_RESTRICT ok) {
    enum { NMAX = QK_QAQL, IDMAX = 16 };
    assert(n % 8 == 0 && n <= NMAX && nid <= IDMAX && nmid < 16);
    float tf[16] = { 0 };
    for (int l = 0; l <= nmid; ++l) {
        tf[l] = (float) T[l];
    }
    const __m256 t_lo = _mm256_loadu_ps(tf);
    const __m256 t_hi = _mm256_loadu_ps(tf + 8);
    float qx[IDMAX][NMAX];
    float sumq2[IDMAX];
    for (int i = 0; i < nid; ++i) {
        const __m256 vid = _mm256_set1_ps(id[i]);
        __m256 q2 = _mm256_setzero_ps();
        for (int j = 0; j < n; j += 8) {
            const __m256 xv = _mm256_loadu_ps(x + j);
            const __m256 v  = _mm256_mul_ps(xv, vid);
            __m256i l = _mm256_setzero_si256();
            for (int m = 0; m < nmid; ++m) {
                l = _mm256_sub_epi32(l, _mm256_castps_si256(_mm256_cmp_ps(v, _mm256_set1_ps(mid[m]), _CMP_GT_OQ)));
            }
            __m256 t = _mm256_permutevar8x32_ps(t_lo, l);
            if (nmid >= 8) {
                const __m256 hi = _mm256_castsi256_ps(_mm256_cmpgt_epi32(l, _mm256_set1_epi32(7)));
                t = _mm256_blendv_ps(t, _mm256_permutevar8x32_ps(t_hi, l), hi);
            }
            _mm256_storeu_ps(qx[i] + j, _mm256_mul_ps(xv, t));
            q2 = _mm256_add_ps(q2, _mm256_mul_ps(t, t));
        }
        sumq2[i] = qaq_hsum(q2);
    }
    float sumqx[IDMAX];
    for (int i = 0; i < nid; ++i) {
        sumqx[i] = 0.0f;
    }
    for (int j = 0; j < n; ++j) {
        for (int i = 0; i < nid; ++i) {
            sumqx[i] += qx[i][j];
        }
    }
    for (int i = 0; i < nid; ++i) {
        ok[i] = sumqx[i] > 0.0f && sumq2[i] > 0.0f;
        if (ok[i]) {
            ds[i]  = sumqx[i]/sumq2[i];
            err[i] = sumx2 - ds[i]*sumqx[i];
        }
    }
}
#define QAQ_FIT qaq_fit_avx2
#else
#define QAQ_FIT qaq_fit_ref
#endif

// from_float (set_rows, cpy): the reference quantizers with the vectorized scale search, the same bytes
void quantize_row_qaq3(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) {
    quantize_row_qaq3_fit(x, (block_qaq3 *) y, k, QAQ_FIT);
}

void quantize_row_qaq2(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) {
    quantize_row_qaq2_fit(x, (block_qaq2 *) y, k, QAQ_FIT);
}

void quantize_row_qaq4l(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) {
    quantize_row_qaq4l_fit(x, (block_qaq4l *) y, k, QAQ_FIT);
}

void quantize_row_qaq3l(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) {
    quantize_row_qaq3l_fit(x, (block_qaq3l *) y, k, QAQ_FIT);
}

void quantize_row_qaq2l(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) {
    quantize_row_qaq2l_fit(x, (block_qaq2l *) y, k, QAQ_FIT);
}

void quantize_row_qaq4h(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) {
    quantize_row_qaq4h_fit(x, (block_qaq4h *) y, k, QAQ_FIT);
}

void quantize_row_qaq3h(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) {
    quantize_row_qaq3h_fit(x, (block_qaq3h *) y, k, QAQ_FIT);
}

void quantize_row_qaq2h(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) {
    quantize_row_qaq2h_fit(x, (block_qaq2h *) y, k, QAQ_FIT);
}

// The dot products of n values of either type with nq q8_0 rows (y, by bytes apart): s[r] = x . y_r, each the same
// sum as for one row; flash attention's query heads that read one K row share the decoding of its indices. Both
// blocks start with d[2], qs[8]; a qaq3 block (has_qh) continues with qh[4]. bsize is the block's size in bytes.
// Inlined with constant arguments.
static inline void qaq_vec_dot_q8_0(int n, float * GGML_RESTRICT s, const uint8_t * GGML_RESTRICT x, size_t bsize,
                                    bool has_qh, const char * GGML_RESTRICT y, size_t by, int nq) {
    assert(n % QK_QAQ == 0);
    const int nb = n / QK_QAQ;
    const size_t o_qs = offsetof(block_qaq3, qs);
    const size_t o_qh = offsetof(block_qaq3, qh);
    _Static_assert(offsetof(block_qaq2, qs) == offsetof(block_qaq3, qs), "qaq2/qaq3 share the d, qs layout");

#if defined(__AVX2__)
    const __m256i table = qaq_codebook(has_qh ? 3 : 2);
    for (int r0 = 0; r0 < nq; r0 += QAQ_DOT_ROWS) {
        const int nr = nq - r0 < QAQ_DOT_ROWS ? nq - r0 : QAQ_DOT_ROWS;
        __m256 acc[QAQ_DOT_ROWS];
        for (int r = 0; r < nr; ++r) {
            acc[r] = _mm256_setzero_ps();
        }
        const uint8_t * xb = x;
        for (int ib = 0; ib < nb; ++ib, xb += bsize) {
            const __m256i xv = qaq_values32(table, xb + o_qs, has_qh ? xb + o_qh : NULL, has_qh ? 3 : 2);
            const __m256  dd = qaq_scales(xb);
            for (int r = 0; r < nr; ++r) {
                acc[r] = qaq_block_acc(acc[r], xv, (const block_q8_0 *) (y + (r0 + r)*by) + ib, dd);
            }
        }
        for (int r = 0; r < nr; ++r) {
            s[r0 + r] = qaq_hsum(acc[r]);
        }
    }
#else
    static const int8_t kvalues_qaq3[8] = { QAQ3_KVALUES };
    static const int8_t kvalues_qaq2[4] = { QAQ2_KVALUES };
    const int8_t * T = has_qh ? kvalues_qaq3 : kvalues_qaq2;
    for (int r = 0; r < nq; ++r) {
        const block_q8_0 * yr = (const block_q8_0 *) (y + r*by);
        const uint8_t * xb = x;
        float sumf = 0.0f;
        for (int ib = 0; ib < nb; ++ib, xb += bsize) {
            int sum[2] = { 0, 0 };
            for (int j = 0; j < QK_QAQ; ++j) {
                int l = xb[o_qs + j % 8] >> 2*(j / 8) & 3;
                if (has_qh) {
                    l |= (xb[o_qh + j / 8] >> (j % 8) & 1) << 2;
                }
                sum[j / 16] += T[l] * yr[ib].qs[j];
            }
            sumf += GGML_CPU_FP16_TO_FP32(yr[ib].d) *
                    (qaq_ue5m3_to_fp32(xb[0])*(float) sum[0] + qaq_ue5m3_to_fp32(xb[1])*(float) sum[1]);
        }
        s[r] = sumf;
    }
#endif
}

void ggml_vec_dot_qaq3_q8_0(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx,
                            const void * GGML_RESTRICT vy, size_t by, int nrc) {
    assert(nrc == 1);
    (void) nrc; (void) bx; (void) by; (void) bs;
    qaq_vec_dot_q8_0(n, s, (const uint8_t *) vx, sizeof(block_qaq3), true, (const char *) vy, 0, 1);
}

void ggml_vec_dot_qaq2_q8_0(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx,
                            const void * GGML_RESTRICT vy, size_t by, int nrc) {
    assert(nrc == 1);
    (void) nrc; (void) bx; (void) by; (void) bs;
    qaq_vec_dot_q8_0(n, s, (const uint8_t *) vx, sizeof(block_qaq2), false, (const char *) vy, 0, 1);
}

// The lean types (qk = QK_QAQL) and the head-64 types (qk = QK_QAQH) against nq q8_0 rows (as qaq_vec_dot_q8_0): a
// block of qk values (one fp16 scale) is qk/32 q8_0 blocks. qaq3l/qaq2l (qaq3h/qaq2h) pack each 32 values as one
// qaq3/qaq2 block's qs (and qh); qaq4l (qaq4h) as q4_0's nibbles (value j and j+16 in byte j).
static inline void qaq_lean_vec_dot_q8_0(int n, float * GGML_RESTRICT s, const uint8_t * GGML_RESTRICT x, size_t bsize,
                                         int bits, int qk, const char * GGML_RESTRICT y, size_t by, int nq) {
    assert(n % qk == 0);
    const int nb = n / qk;
    const int ng = qk / 32;                   // q8_0 blocks per block
    const size_t o_qs = offsetof(block_qaq3l, qs);
    const size_t o_qh = o_qs + (size_t) qk/4;  // qaq3l / qaq3h: qh after qs[qk/4]
    _Static_assert(offsetof(block_qaq2l, qs) == offsetof(block_qaq3l, qs), "qaq2l/qaq3l share the d, qs layout");
    _Static_assert(offsetof(block_qaq4l, qs) == offsetof(block_qaq3l, qs), "qaq4l/qaq3l share the d offset");
    _Static_assert(offsetof(block_qaq4h, qs) == offsetof(block_qaq3l, qs) && offsetof(block_qaq3h, qs) ==
                   offsetof(block_qaq3l, qs) && offsetof(block_qaq2h, qs) == offsetof(block_qaq3l, qs),
                   "the head-64 types share the lean d, qs layout");
    _Static_assert(offsetof(block_qaq3l, qh) == offsetof(block_qaq3l, qs) + QK_QAQL/4 &&
                   offsetof(block_qaq3h, qh) == offsetof(block_qaq3h, qs) + QK_QAQH/4, "qh follows qs");

#if defined(__AVX2__)
    const __m256i table = qaq_codebook(bits);
    for (int r0 = 0; r0 < nq; r0 += QAQ_DOT_ROWS) {
        const int nr = nq - r0 < QAQ_DOT_ROWS ? nq - r0 : QAQ_DOT_ROWS;
        __m256 acc[QAQ_DOT_ROWS];
        for (int r = 0; r < nr; ++r) {
            acc[r] = _mm256_setzero_ps();
        }
        const uint8_t * xb = x;
        for (int ib = 0; ib < nb; ++ib, xb += bsize) {
            uint16_t h;
            memcpy(&h, xb, sizeof(h));
            const __m256 d = _mm256_set1_ps(GGML_CPU_FP16_TO_FP32(h));
            for (int g = 0; g < ng; ++g) {
                const __m256i xv = qaq_values32(table, xb + o_qs + (bits == 4 ? 16 : 8)*g,
                                                bits == 3 ? xb + o_qh + 4*g : NULL, bits);
                for (int r = 0; r < nr; ++r) {
                    acc[r] = qaq_block_acc(acc[r], xv, (const block_q8_0 *) (y + (r0 + r)*by) + ng*ib + g, d);
                }
            }
        }
        for (int r = 0; r < nr; ++r) {
            s[r0 + r] = qaq_hsum(acc[r]);
        }
    }
#else
    static const int8_t kvalues_qaq4[16] = { QAQ4_KVALUES };
    static const int8_t kvalues_qaq3[8]  = { QAQ3_KVALUES };
    static const int8_t kvalues_qaq2[4]  = { QAQ2_KVALUES };
    const int8_t * T = bits == 4 ? kvalues_qaq4 : bits == 3 ? kvalues_qaq3 : kvalues_qaq2;
    for (int r = 0; r < nq; ++r) {
        const block_q8_0 * yr = (const block_q8_0 *) (y + r*by);
        const uint8_t * xb = x;
        float sumf = 0.0f;
        for (int ib = 0; ib < nb; ++ib, xb += bsize) {
            uint16_t h;
            memcpy(&h, xb, sizeof(h));
            const float d = GGML_CPU_FP16_TO_FP32(h);
            for (int g = 0; g < ng; ++g) {
                const block_q8_0 * yb = &yr[ng*ib + g];
                int sum[2] = { 0, 0 };
                for (int j = 0; j < 32; ++j) {
                    int l;
                    if (bits == 4) {
                        l = xb[o_qs + 16*g + j % 16] >> (j < 16 ? 0 : 4) & 0xF;
                    } else {
                        l = xb[o_qs + 8*g + j % 8] >> 2*(j / 8) & 3;
                        if (bits == 3) {
                            l |= (xb[o_qh + 4*g + j / 8] >> (j % 8) & 1) << 2;
                        }
                    }
                    sum[j / 16] += T[l] * yb->qs[j];
                }
                sumf += GGML_CPU_FP16_TO_FP32(yb->d) * (d*(float) sum[0] + d*(float) sum[1]);
            }
        }
        s[r] = sumf;
    }
#endif
}

void ggml_vec_dot_qaq4l_q8_0(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx,
                             const void * GGML_RESTRICT vy, size_t by, int nrc) {
    assert(nrc == 1);
    (void) nrc; (void) bx; (void) by; (void) bs;
    qaq_lean_vec_dot_q8_0(n, s, (const uint8_t *) vx, sizeof(block_qaq4l), 4, QK_QAQL, (const char *) vy, 0, 1);
}

void ggml_vec_dot_qaq3l_q8_0(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx,
                             const void * GGML_RESTRICT vy, size_t by, int nrc) {
    assert(nrc == 1);
    (void) nrc; (void) bx; (void) by; (void) bs;
    qaq_lean_vec_dot_q8_0(n, s, (const uint8_t *) vx, sizeof(block_qaq3l), 3, QK_QAQL, (const char *) vy, 0, 1);
}

void ggml_vec_dot_qaq2l_q8_0(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx,
                             const void * GGML_RESTRICT vy, size_t by, int nrc) {
    assert(nrc == 1);
    (void) nrc; (void) bx; (void) by; (void) bs;
    qaq_lean_vec_dot_q8_0(n, s, (const uint8_t *) vx, sizeof(block_qaq2l), 2, QK_QAQL, (const char *) vy, 0, 1);
}

void ggml_vec_dot_qaq4h_q8_0(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx,
                             const void * GGML_RESTRICT vy, size_t by, int nrc) {
    assert(nrc == 1);
    (void) nrc; (void) bx; (void) by; (void) bs;
    qaq_lean_vec_dot_q8_0(n, s, (const uint8_t *) vx, sizeof(block_qaq4h), 4, QK_QAQH, (const char *) vy, 0, 1);
}

void ggml_vec_dot_qaq3h_q8_0(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx,
                             const void * GGML_RESTRICT vy, size_t by, int nrc) {
    assert(nrc == 1);
    (void) nrc; (void) bx; (void) by; (void) bs;
    qaq_lean_vec_dot_q8_0(n, s, (const uint8_t *) vx, sizeof(block_qaq3h), 3, QK_QAQH, (const char *) vy, 0, 1);
}

void ggml_vec_dot_qaq2h_q8_0(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx,
                             const void * GGML_RESTRICT vy, size_t by, int nrc) {
    assert(nrc == 1);
    (void) nrc; (void) bx; (void) by; (void) bs;
    qaq_lean_vec_dot_q8_0(n, s, (const uint8_t *) vx, sizeof(block_qaq2h), 2, QK_QAQH, (const char *) vy, 0, 1);
}

// x against nq q8_0 rows by bytes apart, for flash attention's query heads reading one K row
void ggml_vec_dot_qaq3_q8_0_rows(int n, float * GGML_RESTRICT s, const void * GGML_RESTRICT vx,
                                 const void * GGML_RESTRICT vy, size_t by, int nq) {
    qaq_vec_dot_q8_0(n, s, (const uint8_t *) vx, sizeof(block_qaq3), true, (const char *) vy, by, nq);
}

void ggml_vec_dot_qaq2_q8_0_rows(int n, float * GGML_RESTRICT s, const void * GGML_RESTRICT vx,
                                 const void * GGML_RESTRICT vy, size_t by, int nq) {
    qaq_vec_dot_q8_0(n, s, (const uint8_t *) vx, sizeof(block_qaq2), false, (const char *) vy, by, nq);
}

void ggml_vec_dot_qaq4l_q8_0_rows(int n, float * GGML_RESTRICT s, const void * GGML_RESTRICT vx,
                                  const void * GGML_RESTRICT vy, size_t by, int nq) {
    qaq_lean_vec_dot_q8_0(n, s, (const uint8_t *) vx, sizeof(block_qaq4l), 4, QK_QAQL, (const char *) vy, by, nq);
}

void ggml_vec_dot_qaq3l_q8_0_rows(int n, float * GGML_RESTRICT s, const void * GGML_RESTRICT vx,
                                  const void * GGML_RESTRICT vy, size_t by, int nq) {
    qaq_lean_vec_dot_q8_0(n, s, (const uint8_t *) vx, sizeof(block_qaq3l), 3, QK_QAQL, (const char *) vy, by, nq);
}

void ggml_vec_dot_qaq2l_q8_0_rows(int n, float * GGML_RESTRICT s, const void * GGML_RESTRICT vx,
                                  const void * GGML_RESTRICT vy, size_t by, int nq) {
    qaq_lean_vec_dot_q8_0(n, s, (const uint8_t *) vx, sizeof(block_qaq2l), 2, QK_QAQL, (const char *) vy, by, nq);
}

void ggml_vec_dot_qaq4h_q8_0_rows(int n, float * GGML_RESTRICT s, const void * GGML_RESTRICT vx,
                                  const void * GGML_RESTRICT vy, size_t by, int nq) {
    qaq_lean_vec_dot_q8_0(n, s, (const uint8_t *) vx, sizeof(block_qaq4h), 4, QK_QAQH, (const char *) vy, by, nq);
}

void ggml_vec_dot_qaq3h_q8_0_rows(int n, float * GGML_RESTRICT s, const void * GGML_RESTRICT vx,
                                  const void * GGML_RESTRICT vy, size_t by, int nq) {
    qaq_lean_vec_dot_q8_0(n, s, (const uint8_t *) vx, sizeof(block_qaq3h), 3, QK_QAQH, (const char *) vy, by, nq);
}

void ggml_vec_dot_qaq2h_q8_0_rows(int n, float * GGML_RESTRICT s, const void * GGML_RESTRICT vx,
                                  const void * GGML_RESTRICT vy, size_t by, int nq) {
    qaq_lean_vec_dot_q8_0(n, s, (const uint8_t *) vx, sizeof(block_qaq2h), 2, QK_QAQH, (const char *) vy, by, nq);
}

// Rows as f32. AVX2: the 32 codebook values of each 32 indices by one byte shuffle, times the block's scales (the
// same products as dequantize_row_*); the reference dequantizers otherwise.
#if defined(__AVX2__)
// 32 codebook values times the scales of their halves (dd as for qaq_block_acc)
static inline void qaq_store_32(__m256i v, __m256 dd, float * GGML_RESTRICT y) {
    const __m128i lo = _mm256_castsi256_si128(v);
    const __m128i hi = _mm256_extracti128_si256(v, 1);
    const __m256 s0 = _mm256_permute2f128_ps(dd, dd, 0x00);
    const __m256 s1 = _mm256_permute2f128_ps(dd, dd, 0x11);
    _mm256_storeu_ps(y +  0, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), s0));
    _mm256_storeu_ps(y +  8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), s0));
    _mm256_storeu_ps(y + 16, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), s1));
    _mm256_storeu_ps(y + 24, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), s1));
}
#endif

// qaq3 (has_qh) or qaq2
static inline void qaq_dequantize_row_cpu(const void * GGML_RESTRICT vx, float * GGML_RESTRICT y, int64_t k,
                                          bool has_qh) {
#if defined(__AVX2__)
    const uint8_t * x = (const uint8_t *) vx;
    const size_t bsize = has_qh ? sizeof(block_qaq3) : sizeof(block_qaq2);
    const __m256i table = qaq_codebook(has_qh ? 3 : 2);
    for (int64_t ib = 0; ib < k / QK_QAQ; ++ib, x += bsize) {
        const uint8_t * qh = has_qh ? x + offsetof(block_qaq3, qh) : NULL;
        const __m256i v = qaq_values32(table, x + offsetof(block_qaq3, qs), qh, has_qh ? 3 : 2);
        qaq_store_32(v, qaq_scales(x), y + ib*QK_QAQ);
    }
#else
    if (has_qh) {
        dequantize_row_qaq3((const block_qaq3 *) vx, y, k);
    } else {
        dequantize_row_qaq2((const block_qaq2 *) vx, y, k);
    }
#endif
}

// qaq4l, qaq3l or qaq2l (bits; qk = QK_QAQL), qaq4h, qaq3h or qaq2h (qk = QK_QAQH)
static inline void qaq_lean_dequantize_row_cpu(const void * GGML_RESTRICT vx, float * GGML_RESTRICT y, int64_t k,
                                               int bits, int qk) {
#if defined(__AVX2__)
    const uint8_t * x = (const uint8_t *) vx;
    const size_t bsize = sizeof(uint16_t) + (size_t) qk*bits/8;  // fp16 scale, then qk indices of bits bits
    const size_t o_qs = offsetof(block_qaq3l, qs);
    const size_t o_qh = o_qs + (size_t) qk/4;
    const __m256i table = qaq_codebook(bits);
    for (int64_t ib = 0; ib < k / qk; ++ib, x += bsize) {
        uint16_t h;
        memcpy(&h, x, sizeof(h));
        const __m256 d = _mm256_set1_ps(GGML_CPU_FP16_TO_FP32(h));
        for (int g = 0; g < qk/32; ++g) {
            const uint8_t * qh = bits == 3 ? x + o_qh + 4*g : NULL;
            const __m256i v = qaq_values32(table, x + o_qs + (bits == 4 ? 16 : 8)*g, qh, bits);
            qaq_store_32(v, d, y + ib*qk + 32*g);
        }
    }
#else
    if (qk == QK_QAQL) {
        if (bits == 4) {
            dequantize_row_qaq4l((const block_qaq4l *) vx, y, k);
        } else if (bits == 3) {
            dequantize_row_qaq3l((const block_qaq3l *) vx, y, k);
        } else {
            dequantize_row_qaq2l((const block_qaq2l *) vx, y, k);
        }
    } else {
        if (bits == 4) {
            dequantize_row_qaq4h((const block_qaq4h *) vx, y, k);
        } else if (bits == 3) {
            dequantize_row_qaq3h((const block_qaq3h *) vx, y, k);
        } else {
            dequantize_row_qaq2h((const block_qaq2h *) vx, y, k);
        }
    }
#endif
}

void dequantize_row_qaq3_cpu(const void * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k) {
    qaq_dequantize_row_cpu(x, y, k, true);
}

void dequantize_row_qaq2_cpu(const void * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k) {
    qaq_dequantize_row_cpu(x, y, k, false);
}

void dequantize_row_qaq4l_cpu(const void * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k) {
    qaq_lean_dequantize_row_cpu(x, y, k, 4, QK_QAQL);
}

void dequantize_row_qaq3l_cpu(const void * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k) {
    qaq_lean_dequantize_row_cpu(x, y, k, 3, QK_QAQL);
}

void dequantize_row_qaq2l_cpu(const void * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k) {
    qaq_lean_dequantize_row_cpu(x, y, k, 2, QK_QAQL);
}

void dequantize_row_qaq4h_cpu(const void * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k) {
    qaq_lean_dequantize_row_cpu(x, y, k, 4, QK_QAQH);
}

void dequantize_row_qaq3h_cpu(const void * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k) {
    qaq_lean_dequantize_row_cpu(x, y, k, 3, QK_QAQH);
}

void dequantize_row_qaq2h_cpu(const void * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k) {
    qaq_lean_dequantize_row_cpu(x, y, k, 2, QK_QAQH);
}

// ---------------------------------------------------------------------------------------------------------------------
// tcq3 / tcq2: the trellis-coded types (ggml-qaq-common.h)

#if defined(__AVX2__) && !defined(__AVX512F__)
// qaq_tcq_walk_ref, 8 states per instruction: per step and group of 8 lo, the K candidate costs of each lo, tagged
// with their top in the low k bits, and one integer min (the float costs are >= 0: their bits order as int32). The
// same operations in the same order per state as the reference (built with -ffp-contract=off), so the same walks.
static inline __attribute__((always_inline)) void qaq_tcq_walk_avx2_k(const float * GGML_RESTRICT v,
                                                                      uint8_t * GGML_RESTRICT b, const int k) {
    const int K = 1 << k;
    const int H = QAQ_TCQ_STATES >> k;
    const float * T = qaq_tcq_codebook(k);
    float M[2][QAQ_TCQ_STATES >> 2];
    uint8_t bp[QK_TCQ][QAQ_TCQ_STATES >> 2];
    float * Mp = M[0];
    float * Mn = M[1];
    qaq_tcq_walk_start(k, Mp);
    const __m256i clear = _mm256_set1_epi32(~(K - 1));
    for (int t = 0; t < QK_TCQ - 1; ++t) {
        const __m256 vt = _mm256_set1_ps(v[t]);
        for (int lo = 0; lo < H; lo += 8) {
            __m256i best = _mm256_set1_epi32(0x7FFFFFFF);
            for (int top = 0; top < K; ++top) {
                const int s = top*H + lo;  // states s .. s+7 come from M[s >> k ..]
                const __m256 ms = k == 3 ? _mm256_broadcast_ss(Mp + (s >> 3))
                                         : _mm256_set_m128(_mm_broadcast_ss(Mp + (s >> 2) + 1),
                                                           _mm_broadcast_ss(Mp + (s >> 2)));
                const __m256 e = _mm256_sub_ps(vt, _mm256_loadu_ps(T + s));
                const __m256i c = _mm256_castps_si256(_mm256_add_ps(ms, _mm256_mul_ps(e, e)));
                best = _mm256_min_epi32(best, _mm256_or_si256(_mm256_and_si256(c, clear), _mm256_set1_epi32(top)));
            }
            _mm256_storeu_si256((__m256i *) (Mn + lo), best);
            const __m256i a = _mm256_and_si256(best, _mm256_set1_epi32(K - 1));
            const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
            _mm_storel_epi64((__m128i *) (bp[t + 1] + lo), _mm_packus_epi16(w, w));
        }
        float * tmp = Mp;
        Mp = Mn;
        Mn = tmp;
    }
    // qaq_tcq_walk_last per lane (the first least cost of states i = lane mod 8), then across the lanes
    const __m256 vl = _mm256_set1_ps(v[QK_TCQ - 1]);
    __m256  bc = _mm256_set1_ps(INFINITY);
    __m256i bi = _mm256_setzero_si256();
    for (int i = 0; i < QAQ_TCQ_STATES; i += 8) {
        const __m256 ms = k == 3 ? _mm256_broadcast_ss(Mp + (i >> 3))
                                 : _mm256_set_m128(_mm_broadcast_ss(Mp + (i >> 2) + 1), _mm_broadcast_ss(Mp + (i >> 2)));
        const __m256 e = _mm256_sub_ps(vl, _mm256_loadu_ps(T + i));
        const __m256 c = _mm256_add_ps(ms, _mm256_mul_ps(e, e));
        const __m256 lt = _mm256_cmp_ps(c, bc, _CMP_LT_OQ);
        bc = _mm256_blendv_ps(bc, c, lt);
        bi = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(bi),
            _mm256_castsi256_ps(_mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(i))), lt));
    }
    float lc[8];
    int   li[8];
    _mm256_storeu_ps(lc, bc);
    _mm256_storeu_si256((__m256i *) li, bi);
    int s = li[0];
    for (int l = 1; l < 8; ++l) {
        if (lc[l] < lc[0] || (lc[l] == lc[0] && li[l] < s)) {
            lc[0] = lc[l];
            s = li[l];
        }
    }
    qaq_tcq_walk_back(k, s, (const uint8_t (*)[QAQ_TCQ_STATES >> 2]) bp, b);
}

#endif

#if defined(__AVX512F__)
// the same walk, 16 states per instruction, the group costs kept in registers: step t's costs of the states
// top*H + lo .. +15 need M[(top*H + lo) >> k ..], one register of M permuted (k = 3: two costs, each 8 times;
// k = 2: four, each 4 times). The same operations in the same order per state as the reference, so the same walks.
static inline __attribute__((always_inline)) void qaq_tcq_walk_avx512_k(const float * GGML_RESTRICT v,
                                                                        uint8_t * GGML_RESTRICT b, const int k) {
    enum { R = (QAQ_TCQ_STATES >> 2) / 16 };  // registers of group costs at k = 2 (k = 3 uses half)
    const int K = 1 << k;
    const int H = QAQ_TCQ_STATES >> k;
    const float * T = qaq_tcq_codebook(k);
    float M[QAQ_TCQ_STATES >> 2];
    uint8_t bp[QK_TCQ][QAQ_TCQ_STATES >> 2];
    qaq_tcq_walk_start(k, M);
    __m512 Mp[R];
    for (int r = 0; r < H/16; ++r) {
        Mp[r] = _mm512_loadu_ps(M + 16*r);
    }
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i lane = _mm512_srlv_epi32(iota, _mm512_set1_epi32(k));
    const __m512i clear = _mm512_set1_epi32(~(K - 1));
    for (int t = 0; t < QK_TCQ - 1; ++t) {
        const __m512 vt = _mm512_set1_ps(v[t]);
        __m512 Mn[R];
        for (int lo = 0; lo < H; lo += 16) {
            __m512i best = _mm512_set1_epi32(0x7FFFFFFF);
            for (int top = 0; top < K; ++top) {
                const int s = top*H + lo;  // states s .. s+15 come from M[s >> k ..], in register (s >> k) / 16
                const __m512 ms = _mm512_permutexvar_ps(_mm512_add_epi32(lane, _mm512_set1_epi32((s >> k) & 15)),
                                                        Mp[(s >> k) >> 4]);
                const __m512 e = _mm512_sub_ps(vt, _mm512_loadu_ps(T + s));
                const __m512i c = _mm512_castps_si512(_mm512_add_ps(ms, _mm512_mul_ps(e, e)));
                // (c & clear) | top in one instruction (truth table 0xEA)
                best = _mm512_min_epi32(best, _mm512_ternarylogic_epi32(c, clear, _mm512_set1_epi32(top), 0xEA));
            }
            Mn[lo >> 4] = _mm512_castsi512_ps(best);
            _mm_storeu_si128((__m128i *) (bp[t + 1] + lo),
                             _mm512_cvtepi32_epi8(_mm512_and_si512(best, _mm512_set1_epi32(K - 1))));
        }
        for (int r = 0; r < H/16; ++r) {
            Mp[r] = Mn[r];
        }
    }
    // qaq_tcq_walk_last per lane (the first least cost of states i = lane mod 16), then across the lanes
    const __m512 vl = _mm512_set1_ps(v[QK_TCQ - 1]);
    __m512  bc = _mm512_set1_ps(INFINITY);
    __m512i bi = _mm512_setzero_si512();
    for (int i = 0; i < QAQ_TCQ_STATES; i += 16) {
        const __m512 ms = _mm512_permutexvar_ps(_mm512_add_epi32(lane, _mm512_set1_epi32((i >> k) & 15)),
                                                Mp[(i >> k) >> 4]);
        const __m512 e = _mm512_sub_ps(vl, _mm512_loadu_ps(T + i));
        const __m512 c = _mm512_add_ps(ms, _mm512_mul_ps(e, e));
        const __mmask16 lt = _mm512_cmp_ps_mask(c, bc, _CMP_LT_OQ);
        bc = _mm512_mask_mov_ps(bc, lt, c);
        bi = _mm512_mask_mov_epi32(bi, lt, _mm512_add_epi32(iota, _mm512_set1_epi32(i)));
    }
    const __mmask16 least = _mm512_cmp_ps_mask(bc, _mm512_set1_ps(_mm512_reduce_min_ps(bc)), _CMP_EQ_OQ);
    qaq_tcq_walk_back(k, _mm512_mask_reduce_min_epi32(least, bi), (const uint8_t (*)[QAQ_TCQ_STATES >> 2]) bp, b);
}
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
#if defined(__AVX512F__)
#define QAQ_TCQ_WALK_K qaq_tcq_walk_avx512_k
#else
#define QAQ_TCQ_WALK_K qaq_tcq_walk_avx2_k
#endif
// the vectorized walk with k a constant (the loops unroll)
static void qaq_tcq_walk_simd(int k, const float * v, uint8_t * b) {
    if (k == 3) {
        QAQ_TCQ_WALK_K(v, b, 3);
    } else {
        QAQ_TCQ_WALK_K(v, b, 2);
    }
}
#define QAQ_TCQ_WALK qaq_tcq_walk_simd
#else
#define QAQ_TCQ_WALK qaq_tcq_walk_ref
#endif

#if defined(__AVX2__)
// the states of values 8g..8g+7 of a tcq block (k = 3 or 2), as qaq_tcq_states: each lane from the 32-bit window of
// the input stream that ends with the group's last input (the byte before the group, 0 before the block, then the
// group's 3 or 2 bytes): s = b_j | b_{j-1} << k | b_{j-2} << 2k | b_{j-3} << 3k, low 8 bits
static inline __m256i qaq_tcq_states8(const uint8_t * GGML_RESTRICT qs, const int k, const int g) {
    if (k == 3) {
        const uint32_t w = (g ? (uint32_t) qs[3*g - 1] : 0) | (uint32_t) qs[3*g] << 8 | (uint32_t) qs[3*g + 1] << 16 |
                           (uint32_t) qs[3*g + 2] << 24;
        const __m256i W = _mm256_set1_epi32((int) w);
        const __m256i b0 = _mm256_srlv_epi32(W, _mm256_setr_epi32(8, 11, 14, 17, 20, 23, 26, 29));
        const __m256i b1 = _mm256_srlv_epi32(W, _mm256_setr_epi32(5, 8, 11, 14, 17, 20, 23, 26));
        const __m256i b2 = _mm256_srlv_epi32(W, _mm256_setr_epi32(2, 5, 8, 11, 14, 17, 20, 23));
        return _mm256_or_si256(_mm256_or_si256(_mm256_and_si256(b0, _mm256_set1_epi32(7)),
                                               _mm256_slli_epi32(_mm256_and_si256(b1, _mm256_set1_epi32(7)), 3)),
                               _mm256_slli_epi32(_mm256_and_si256(b2, _mm256_set1_epi32(3)), 6));
    }
    const uint32_t w = (g ? (uint32_t) qs[2*g - 1] : 0) | (uint32_t) qs[2*g] << 8 | (uint32_t) qs[2*g + 1] << 16;
    const __m256i W = _mm256_set1_epi32((int) w);
    const __m256i three = _mm256_set1_epi32(3);
    const __m256i b0 = _mm256_and_si256(_mm256_srlv_epi32(W, _mm256_setr_epi32(8, 10, 12, 14, 16, 18, 20, 22)), three);
    const __m256i b1 = _mm256_and_si256(_mm256_srlv_epi32(W, _mm256_setr_epi32(6, 8, 10, 12, 14, 16, 18, 20)), three);
    const __m256i b2 = _mm256_and_si256(_mm256_srlv_epi32(W, _mm256_setr_epi32(4, 6, 8, 10, 12, 14, 16, 18)), three);
    const __m256i b3 = _mm256_and_si256(_mm256_srlv_epi32(W, _mm256_setr_epi32(2, 4, 6, 8, 10, 12, 14, 16)), three);
    return _mm256_or_si256(_mm256_or_si256(b0, _mm256_slli_epi32(b1, 2)),
                           _mm256_or_si256(_mm256_slli_epi32(b2, 4), _mm256_slli_epi32(b3, 6)));
}
#endif

void quantize_row_tcq3(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) {
    quantize_row_tcq3_walk(x, (block_tcq3 *) y, k, QAQ_TCQ_WALK);
}

void quantize_row_tcq2(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) {
    quantize_row_tcq2_walk(x, (block_tcq2 *) y, k, QAQ_TCQ_WALK);
}

// n values of a tcq row against nq q8_0 rows (by bytes apart): per q8_0 block of 32, the codewords times the q8
// values summed in float, times both scales. The codewords of each block are decoded once for QAQ_DOT_ROWS rows.
static inline void qaq_tcq_vec_dot_q8_0(int n, float * GGML_RESTRICT s, const uint8_t * GGML_RESTRICT x, int k,
                                        const char * GGML_RESTRICT y, size_t by, int nq) {
    assert(n % QK_TCQ == 0);
    const int nb = n / QK_TCQ;
    const size_t bsize = sizeof(uint16_t) + (size_t) QK_TCQ*k/8;
    const float * T = qaq_tcq_codebook(k);
#if defined(__AVX2__)
    for (int r0 = 0; r0 < nq; r0 += QAQ_DOT_ROWS) {
        const int nr = nq - r0 < QAQ_DOT_ROWS ? nq - r0 : QAQ_DOT_ROWS;
        __m256 acc[QAQ_DOT_ROWS];
        for (int r = 0; r < nr; ++r) {
            acc[r] = _mm256_setzero_ps();
        }
        const uint8_t * xb = x;
        for (int ib = 0; ib < nb; ++ib, xb += bsize) {
            uint16_t h;
            memcpy(&h, xb, sizeof(h));
            const float d = GGML_CPU_FP16_TO_FP32(h);
            __m256 c[QK_TCQ/8];
            for (int i = 0; i < QK_TCQ/8; ++i) {
                c[i] = _mm256_i32gather_ps(T, qaq_tcq_states8(xb + sizeof(uint16_t), k, i), 4);
            }
            for (int r = 0; r < nr; ++r) {
                const block_q8_0 * yb = (const block_q8_0 *) (y + (r0 + r)*by) + 2*ib;
                for (int g = 0; g < 2; ++g) {
                    __m256 p = _mm256_setzero_ps();
                    for (int i = 0; i < 4; ++i) {
                        const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                            _mm_loadl_epi64((const __m128i *) (yb[g].qs + 8*i))));
                        p = _mm256_fmadd_ps(c[4*g + i], q, p);
                    }
                    acc[r] = _mm256_fmadd_ps(p, _mm256_set1_ps(d * GGML_CPU_FP16_TO_FP32(yb[g].d)), acc[r]);
                }
            }
        }
        for (int r = 0; r < nr; ++r) {
            s[r0 + r] = qaq_hsum(acc[r]);
        }
    }
#else
    for (int r = 0; r < nq; ++r) {
        s[r] = 0.0f;
    }
    const uint8_t * xb = x;
    for (int ib = 0; ib < nb; ++ib, xb += bsize) {
        uint16_t h;
        memcpy(&h, xb, sizeof(h));
        const float d = GGML_CPU_FP16_TO_FP32(h);
        uint8_t st[QK_TCQ];
        qaq_tcq_states(k, xb + sizeof(uint16_t), st);
        for (int r = 0; r < nq; ++r) {
            const block_q8_0 * yb = (const block_q8_0 *) (y + r*by) + 2*ib;
            float sum = 0.0f;
            for (int g = 0; g < 2; ++g) {
                float acc = 0.0f;
                for (int j = 0; j < 32; ++j) {
                    acc += T[st[32*g + j]] * (float) yb[g].qs[j];
                }
                sum += GGML_CPU_FP16_TO_FP32(yb[g].d) * acc;
            }
            s[r] += d * sum;
        }
    }
#endif
}

void ggml_vec_dot_tcq3_q8_0(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx,
                            const void * GGML_RESTRICT vy, size_t by, int nrc) {
    assert(nrc == 1);
    (void) nrc; (void) bx; (void) by; (void) bs;
    qaq_tcq_vec_dot_q8_0(n, s, (const uint8_t *) vx, 3, (const char *) vy, 0, 1);
}

void ggml_vec_dot_tcq2_q8_0(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx,
                            const void * GGML_RESTRICT vy, size_t by, int nrc) {
    assert(nrc == 1);
    (void) nrc; (void) bx; (void) by; (void) bs;
    qaq_tcq_vec_dot_q8_0(n, s, (const uint8_t *) vx, 2, (const char *) vy, 0, 1);
}

void ggml_vec_dot_tcq3_q8_0_rows(int n, float * GGML_RESTRICT s, const void * GGML_RESTRICT vx,
                                 const void * GGML_RESTRICT vy, size_t by, int nq) {
    qaq_tcq_vec_dot_q8_0(n, s, (const uint8_t *) vx, 3, (const char *) vy, by, nq);
}

void ggml_vec_dot_tcq2_q8_0_rows(int n, float * GGML_RESTRICT s, const void * GGML_RESTRICT vx,
                                 const void * GGML_RESTRICT vy, size_t by, int nq) {
    qaq_tcq_vec_dot_q8_0(n, s, (const uint8_t *) vx, 2, (const char *) vy, by, nq);
}

// rows as f32: the states of each block without the serial walk (8 at a time from the input stream with AVX2), a
// gather of 8 codewords at a time, times d (the same products as dequantize_row_tcq*)
static inline void qaq_tcq_dequantize_row_cpu(const void * GGML_RESTRICT vx, float * GGML_RESTRICT y, int64_t n,
                                              int k) {
    const uint8_t * x = (const uint8_t *) vx;
    const size_t bsize = sizeof(uint16_t) + (size_t) QK_TCQ*k/8;
    for (int64_t ib = 0; ib < n / QK_TCQ; ++ib, x += bsize, y += QK_TCQ) {
        uint16_t h;
        memcpy(&h, x, sizeof(h));
#if defined(__AVX2__)
        const float * T = qaq_tcq_codebook(k);
        const __m256 dd = _mm256_set1_ps(GGML_CPU_FP16_TO_FP32(h));
        for (int i = 0; i < QK_TCQ/8; ++i) {
            const __m256 c = _mm256_i32gather_ps(T, qaq_tcq_states8(x + sizeof(uint16_t), k, i), 4);
            _mm256_storeu_ps(y + 8*i, _mm256_mul_ps(dd, c));
        }
#else
        qaq_tcq_dequantize_block(k, h, x + sizeof(uint16_t), y);
#endif
    }
}

void dequantize_row_tcq3_cpu(const void * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k) {
    qaq_tcq_dequantize_row_cpu(x, y, k, 3);
}

void dequantize_row_tcq2_cpu(const void * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k) {
    qaq_tcq_dequantize_row_cpu(x, y, k, 2);
}
