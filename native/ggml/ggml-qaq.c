// qaq3 / qaq2 / qaq4l / qaq3l / qaq2l reference quantizers and dequantizers (compiled into ggml-base; layouts in
// ggml-qaq.h).
//
// Built with -ffp-contract=off: the float operations below happen in the order written, so the numpy port
// (qaq_gguf/quants.py) and the CUDA quantizer produce the same bytes.

#include "ggml-qaq.h"
#include "ggml-impl.h"  // GGML_FP32_TO_FP16 / GGML_FP16_TO_FP32 (the lean types' fp16 scale)

#include <assert.h>
#include <math.h>
#include <stdbool.h>
#include <string.h>

static const int8_t kvalues_qaq4[16] = { QAQ4_KVALUES };
static const int8_t kvalues_qaq3[8]  = { QAQ3_KVALUES };
static const int8_t kvalues_qaq2[4]  = { QAQ2_KVALUES };

// decision thresholds between neighbouring levels (midpoints); index = number of thresholds below v
static const float kmid_qaq4[15] = { -111.5f, -85.5f, -66.5f, -51.0f, -37.5f, -24.5f, -12.0f, 0.0f,
                                     12.0f, 24.5f, 37.5f, 51.0f, 66.5f, 85.5f, 111.5f };
static const float kmid_qaq3[7]  = { -103.0f, -62.0f, -29.5f, 0.0f, 29.5f, 62.0f, 103.0f };
static const float kmid_qaq2[3]  = { -82.5f, 0.0f, 82.5f };

#define QAQ_HALF 16    // values per scale
#define QAQ_NTRY 11    // scale candidates amax * (0.45 + 0.07 i) / 127, i = 0..10

static inline int qaq_nearest(float v, const float * mid, int nmid) {
    int i = 0;
    for (int m = 0; m < nmid; ++m) {
        i += v > mid[m];
    }
    return i;
}

// largest ue5m3 byte whose value is <= v (0 if none), by bisection over the monotonic codes 0..QAQ_UE5M3_MAX
static uint8_t qaq_ue5m3_floor(float v) {
    int lo = 0, hi = QAQ_UE5M3_MAX;
    if (!(v > 0.0f)) {
        return 0;
    }
    if (qaq_ue5m3_to_fp32(QAQ_UE5M3_MAX) <= v) {
        return QAQ_UE5M3_MAX;
    }
    while (hi - lo > 1) {  // invariant: dec(lo) <= v < dec(hi)
        const int mid = (lo + hi) / 2;
        if (qaq_ue5m3_to_fp32((uint8_t) mid) <= v) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return (uint8_t) lo;
}

// Least-squares scale for the indices nearest to x/d (id = 1/d): sets *ds and *err = sum x^2 - ds*sum x*T, and
// returns false when the fit is degenerate. Sums run in index order (the numpy port and CUDA follow it).
static bool qaq_fit(const float * x, int n, float sumx2, float id, const int8_t * T, const float * mid, int nmid,
                    float * ds, float * err) {
    float sumqx = 0.0f, sumq2 = 0.0f;
    for (int j = 0; j < n; ++j) {
        const float t = (float) T[qaq_nearest(x[j]*id, mid, nmid)];
        sumqx += x[j]*t;
        sumq2 += t*t;
    }
    if (!(sumqx > 0.0f && sumq2 > 0.0f)) {
        return false;
    }
    *ds  = sumqx/sumq2;
    *err = sumx2 - *ds*sumqx;
    return true;
}

void qaq_fit_ref(const float * x, int n, float sumx2, const float * id, int nid, const int8_t * T, const float * mid,
                 int nmid, float * ds, float * err, bool * ok) {
    for (int i = 0; i < nid; ++i) {
        ok[i] = qaq_fit(x, n, sumx2, id[i], T, mid, nmid, &ds[i], &err[i]);
    }
}

// amax and sum of squares of n values (sequential, the order the ports follow); false when nothing to quantize
static bool qaq_stats(const float * x, int n, float * amax, float * sumx2) {
    float a = 0.0f, s2 = 0.0f;
    for (int j = 0; j < n; ++j) {
        const float ax = fabsf(x[j]);
        a   = ax > a ? ax : a;
        s2 += x[j]*x[j];
    }
    *amax  = a;
    *sumx2 = s2;
    return a > 0.0f && isfinite(a);
}

// The least-squares scale of n values: scale search over QAQ_NTRY candidates (as iq4_nl's, unweighted), then one
// refit with the best candidate's assignment.
static float qaq_best_scale(const float * x, int n, float amax, float sumx2, const int8_t * T, const float * mid,
                            int nmid, qaq_fit_t fit) {
    float id[QAQ_NTRY], ds[QAQ_NTRY], err[QAQ_NTRY];
    bool  ok[QAQ_NTRY];
    for (int i = 0; i < QAQ_NTRY; ++i) {
        const float g = 0.45f + 0.07f*(float) i;
        const float d = amax*g/127.0f;
        id[i] = 1.0f/d;
    }
    fit(x, n, sumx2, id, QAQ_NTRY, T, mid, nmid, ds, err, ok);
    float best_err = INFINITY;
    float best_d   = amax / 127.0f;
    for (int i = 0; i < QAQ_NTRY; ++i) {
        if (ok[i] && err[i] < best_err) {
            best_err = err[i];
            best_d   = ds[i];
        }
    }
    // one refit with the best scale's assignment
    const float best_id = 1.0f/best_d;
    fit(x, n, sumx2, &best_id, 1, T, mid, nmid, ds, err, ok);
    if (ok[0] && err[0] < best_err) {
        best_d = ds[0];
    }
    return best_d;
}

// Quantize QAQ_HALF values: the least-squares scale, then the better of the two neighbouring ue5m3 scales.
// Writes the indices to L, returns the scale byte.
static uint8_t qaq_quantize_half(const float * x, const int8_t * T, const float * mid, int nmid, uint8_t * L,
                                 qaq_fit_t fit) {
    float amax, sumx2;
    const int izero = qaq_nearest(0.0f, mid, nmid);
    if (!qaq_stats(x, QAQ_HALF, &amax, &sumx2)) {
        for (int j = 0; j < QAQ_HALF; ++j) {
            L[j] = (uint8_t) izero;
        }
        return 0;
    }

    const float best_d = qaq_best_scale(x, QAQ_HALF, amax, sumx2, T, mid, nmid, fit);

    // store: the ue5m3 neighbour (below or above) with the lower squared error
    const uint8_t b0 = qaq_ue5m3_floor(best_d);
    uint8_t best_b = b0;
    float   best_e = INFINITY;
    for (int c = 0; c < 2; ++c) {
        const int b = b0 + c;
        if (b > QAQ_UE5M3_MAX) {
            break;
        }
        const float d = qaq_ue5m3_to_fp32((uint8_t) b);
        float e = 0.0f;
        if (d > 0.0f) {
            const float id = 1.0f/d;
            for (int j = 0; j < QAQ_HALF; ++j) {
                const float r = x[j] - d*(float) T[qaq_nearest(x[j]*id, mid, nmid)];
                e += r*r;
            }
        } else {
            e = sumx2;
        }
        if (e < best_e) {
            best_e = e;
            best_b = (uint8_t) b;
        }
    }
    const float d = qaq_ue5m3_to_fp32(best_b);
    if (d > 0.0f) {
        const float id = 1.0f/d;
        for (int j = 0; j < QAQ_HALF; ++j) {
            L[j] = (uint8_t) qaq_nearest(x[j]*id, mid, nmid);
        }
    } else {
        for (int j = 0; j < QAQ_HALF; ++j) {
            L[j] = (uint8_t) izero;
        }
    }
    return best_b;
}

// 2 low index bits of 32 values into qs[8], the high bit (3-bit indices, qh != NULL) into qh[4]
static void qaq_pack32(const uint8_t * L, uint8_t * qs, uint8_t * qh) {
    for (int b = 0; b < QK_QAQ/4; ++b) {
        qs[b] = (uint8_t) ((L[b] & 3) | (L[b + 8] & 3) << 2 | (L[b + 16] & 3) << 4 | (L[b + 24] & 3) << 6);
    }
    for (int b = 0; qh && b < QK_QAQ/8; ++b) {
        uint8_t hb = 0;
        for (int j = 0; j < 8; ++j) {
            hb |= (uint8_t) ((L[8*b + j] >> 2) << j);
        }
        qh[b] = hb;
    }
}

// One block: both halves, then the 2 low index bits into qs and, for qaq3 (qh != NULL), the high bit into qh.
static void qaq_quantize_block(const float * x, const int8_t * T, const float * mid, int nmid,
                               uint8_t d[2], uint8_t qs[QK_QAQ/4], uint8_t * qh, qaq_fit_t fit) {
    uint8_t L[QK_QAQ];
    d[0] = qaq_quantize_half(x,            T, mid, nmid, L,            fit);
    d[1] = qaq_quantize_half(x + QAQ_HALF, T, mid, nmid, L + QAQ_HALF, fit);
    qaq_pack32(L, qs, qh);
}

// A lean block (QK_QAQL values): the least-squares scale over all of them, stored as fp16; indices for that scale.
// Writes the indices to L, returns the fp16 bits.
static uint16_t qaq_quantize_lean(const float * x, const int8_t * T, const float * mid, int nmid, uint8_t * L,
                                  qaq_fit_t fit) {
    float amax, sumx2;
    const int izero = qaq_nearest(0.0f, mid, nmid);
    float d = 0.0f;
    uint16_t h = 0;
    if (qaq_stats(x, QK_QAQL, &amax, &sumx2)) {
        const float best_d = qaq_best_scale(x, QK_QAQL, amax, sumx2, T, mid, nmid, fit);
        h = GGML_FP32_TO_FP16(best_d < 65504.0f ? best_d : 65504.0f);  // saturate at the largest fp16, as qaq3 does
        d = GGML_FP16_TO_FP32(h);
    }
    if (d > 0.0f && isfinite(d)) {
        const float id = 1.0f/d;
        for (int j = 0; j < QK_QAQL; ++j) {
            L[j] = (uint8_t) qaq_nearest(x[j]*id, mid, nmid);
        }
    } else {
        h = 0;
        for (int j = 0; j < QK_QAQL; ++j) {
            L[j] = (uint8_t) izero;
        }
    }
    return h;
}

void quantize_row_qaq4l_ref(const float * x, block_qaq4l * y, int64_t k) {
    quantize_row_qaq4l_fit(x, y, k, qaq_fit_ref);
}

void quantize_row_qaq4l_fit(const float * x, block_qaq4l * y, int64_t k, qaq_fit_t fit) {
    assert(k % QK_QAQL == 0);
    uint8_t L[QK_QAQL];
    for (int64_t i = 0; i < k / QK_QAQL; ++i) {
        y[i].d = qaq_quantize_lean(x + i*QK_QAQL, kvalues_qaq4, kmid_qaq4, 15, L, fit);
        for (int g = 0; g < QK_QAQL/32; ++g) {
            for (int j = 0; j < 16; ++j) {
                y[i].qs[16*g + j] = (uint8_t) (L[32*g + j] | L[32*g + j + 16] << 4);
            }
        }
    }
}

void quantize_row_qaq3l_ref(const float * x, block_qaq3l * y, int64_t k) {
    quantize_row_qaq3l_fit(x, y, k, qaq_fit_ref);
}

void quantize_row_qaq3l_fit(const float * x, block_qaq3l * y, int64_t k, qaq_fit_t fit) {
    assert(k % QK_QAQL == 0);
    uint8_t L[QK_QAQL];
    for (int64_t i = 0; i < k / QK_QAQL; ++i) {
        y[i].d = qaq_quantize_lean(x + i*QK_QAQL, kvalues_qaq3, kmid_qaq3, 7, L, fit);
        for (int g = 0; g < QK_QAQL/32; ++g) {
            qaq_pack32(L + 32*g, y[i].qs + 8*g, y[i].qh + 4*g);
        }
    }
}

void quantize_row_qaq2l_ref(const float * x, block_qaq2l * y, int64_t k) {
    quantize_row_qaq2l_fit(x, y, k, qaq_fit_ref);
}

void quantize_row_qaq2l_fit(const float * x, block_qaq2l * y, int64_t k, qaq_fit_t fit) {
    assert(k % QK_QAQL == 0);
    uint8_t L[QK_QAQL];
    for (int64_t i = 0; i < k / QK_QAQL; ++i) {
        y[i].d = qaq_quantize_lean(x + i*QK_QAQL, kvalues_qaq2, kmid_qaq2, 3, L, fit);
        for (int g = 0; g < QK_QAQL/32; ++g) {
            qaq_pack32(L + 32*g, y[i].qs + 8*g, NULL);
        }
    }
}

void quantize_row_qaq3_ref(const float * x, block_qaq3 * y, int64_t k) {
    quantize_row_qaq3_fit(x, y, k, qaq_fit_ref);
}

void quantize_row_qaq3_fit(const float * x, block_qaq3 * y, int64_t k, qaq_fit_t fit) {
    assert(k % QK_QAQ == 0);
    for (int64_t i = 0; i < k / QK_QAQ; ++i) {
        qaq_quantize_block(x + i*QK_QAQ, kvalues_qaq3, kmid_qaq3, 7, y[i].d, y[i].qs, y[i].qh, fit);
    }
}

void quantize_row_qaq2_ref(const float * x, block_qaq2 * y, int64_t k) {
    quantize_row_qaq2_fit(x, y, k, qaq_fit_ref);
}

void quantize_row_qaq2_fit(const float * x, block_qaq2 * y, int64_t k, qaq_fit_t fit) {
    assert(k % QK_QAQ == 0);
    for (int64_t i = 0; i < k / QK_QAQ; ++i) {
        qaq_quantize_block(x + i*QK_QAQ, kvalues_qaq2, kmid_qaq2, 3, y[i].d, y[i].qs, NULL, fit);
    }
}

// The reference dequantizers (get_rows, and flash attention where ggml-cpu has no vectorized dequantize_row_*_cpu):
// the 8 (4) possible values of each half-block are tabulated first (d * level: one rounding, as d * T[l] would be),
// then every value is one table load. Value j = 8*g + b sits in qs[b] at bits 2g and in qh[g] at bit b.
static inline void qaq_dequantize_block(float d0, float d1, const uint8_t qs[QK_QAQ/4], const uint8_t * qh,
                                        const int8_t * T, int nlev, float * y) {
    float tab[2][8];
    for (int h = 0; h < 2; ++h) {
        const float dh = h ? d1 : d0;
        for (int l = 0; l < nlev; ++l) {
            tab[h][l] = dh*(float) T[l];
        }
    }
    // 8 indices at a time in a 64-bit word (byte b = value 8g + b; ggml targets are little-endian)
    uint64_t q64;
    memcpy(&q64, qs, sizeof(q64));
    for (int g = 0; g < 4; ++g) {
        uint64_t id = (q64 >> 2*g) & 0x0303030303030303ULL;
        if (qh) {
            uint64_t hi = ((uint64_t) qh[g] * 0x0101010101010101ULL) & 0x8040201008040201ULL;  // bit b in byte b
            id |= ((hi + 0x7F7F7F7F7F7F7F7FULL) & 0x8080808080808080ULL) >> 5;                // -> 4 or 0
        }
        const float * t = tab[g >> 1];
        for (int b = 0; b < 8; ++b) {
            y[8*g + b] = t[(id >> 8*b) & 0xFF];
        }
    }
}

void dequantize_row_qaq3(const block_qaq3 * x, float * y, int64_t k) {
    assert(k % QK_QAQ == 0);
    for (int64_t i = 0; i < k / QK_QAQ; ++i) {
        qaq_dequantize_block(qaq_ue5m3_to_fp32(x[i].d[0]), qaq_ue5m3_to_fp32(x[i].d[1]), x[i].qs, x[i].qh,
                             kvalues_qaq3, 8, y + i*QK_QAQ);
    }
}

void dequantize_row_qaq2(const block_qaq2 * x, float * y, int64_t k) {
    assert(k % QK_QAQ == 0);
    for (int64_t i = 0; i < k / QK_QAQ; ++i) {
        qaq_dequantize_block(qaq_ue5m3_to_fp32(x[i].d[0]), qaq_ue5m3_to_fp32(x[i].d[1]), x[i].qs, NULL,
                             kvalues_qaq2, 4, y + i*QK_QAQ);
    }
}

void dequantize_row_qaq4l(const block_qaq4l * x, float * y, int64_t k) {
    assert(k % QK_QAQL == 0);
    for (int64_t i = 0; i < k / QK_QAQL; ++i) {
        const float d = GGML_FP16_TO_FP32(x[i].d);
        float tab[16];
        for (int l = 0; l < 16; ++l) {
            tab[l] = d*(float) kvalues_qaq4[l];
        }
        for (int g = 0; g < QK_QAQL/32; ++g) {
            for (int j = 0; j < 16; ++j) {
                y[i*QK_QAQL + 32*g + j]      = tab[x[i].qs[16*g + j] & 0xF];
                y[i*QK_QAQL + 32*g + j + 16] = tab[x[i].qs[16*g + j] >> 4];
            }
        }
    }
}

void dequantize_row_qaq3l(const block_qaq3l * x, float * y, int64_t k) {
    assert(k % QK_QAQL == 0);
    for (int64_t i = 0; i < k / QK_QAQL; ++i) {
        const float d = GGML_FP16_TO_FP32(x[i].d);
        for (int g = 0; g < QK_QAQL/32; ++g) {
            qaq_dequantize_block(d, d, x[i].qs + 8*g, x[i].qh + 4*g, kvalues_qaq3, 8, y + i*QK_QAQL + 32*g);
        }
    }
}

void dequantize_row_qaq2l(const block_qaq2l * x, float * y, int64_t k) {
    assert(k % QK_QAQL == 0);
    for (int64_t i = 0; i < k / QK_QAQL; ++i) {
        const float d = GGML_FP16_TO_FP32(x[i].d);
        for (int g = 0; g < QK_QAQL/32; ++g) {
            qaq_dequantize_block(d, d, x[i].qs + 8*g, NULL, kvalues_qaq2, 4, y + i*QK_QAQL + 32*g);
        }
    }
}

#define QAQ_QUANTIZE_ROWS(name, block, qk)                                                                          \
size_t quantize_##name(const float * src, void * dst, int64_t nrows, int64_t n_per_row, const float * imatrix) {  \
    (void) imatrix;                                                                                                 \
    const size_t row_size = (size_t) (n_per_row / (qk)) * sizeof(block);                                           \
    for (int64_t r = 0; r < nrows; ++r) {                                                                           \
        quantize_row_##name##_ref(src + r*n_per_row, (block *) ((char *) dst + r*row_size), n_per_row);            \
    }                                                                                                               \
    return nrows * row_size;                                                                                        \
}

QAQ_QUANTIZE_ROWS(qaq3,  block_qaq3,  QK_QAQ)
QAQ_QUANTIZE_ROWS(qaq2,  block_qaq2,  QK_QAQ)
QAQ_QUANTIZE_ROWS(qaq4l, block_qaq4l, QK_QAQL)
QAQ_QUANTIZE_ROWS(qaq3l, block_qaq3l, QK_QAQL)
QAQ_QUANTIZE_ROWS(qaq2l, block_qaq2l, QK_QAQL)
