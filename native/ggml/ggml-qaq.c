// qaq3 / qaq2 reference quantizers and dequantizers (compiled into ggml-base; layout in ggml-qaq.h).
//
// Built with -ffp-contract=off: the float operations below happen in the order written, so the numpy port
// (qaq_gguf/quants.py) and the CUDA quantizer produce the same bytes.

#include "ggml-qaq.h"

#include <assert.h>
#include <math.h>
#include <stdbool.h>
#include <string.h>

static const int8_t kvalues_qaq3[8] = { QAQ3_KVALUES };
static const int8_t kvalues_qaq2[4] = { QAQ2_KVALUES };

// decision thresholds between neighbouring levels (midpoints); index = number of thresholds below v
static const float kmid_qaq3[7] = { -103.0f, -62.0f, -29.5f, 0.0f, 29.5f, 62.0f, 103.0f };
static const float kmid_qaq2[3] = { -82.5f, 0.0f, 82.5f };

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
static bool qaq_fit(const float * x, float sumx2, float id, const int8_t * T, const float * mid, int nmid,
                    float * ds, float * err) {
    float sumqx = 0.0f, sumq2 = 0.0f;
    for (int j = 0; j < QAQ_HALF; ++j) {
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

// Quantize QAQ_HALF values: scale search (as iq4_nl's, unweighted), one refit, then the better of the two
// neighbouring ue5m3 scales. Writes the indices to L, returns the scale byte.
static uint8_t qaq_quantize_half(const float * x, const int8_t * T, const float * mid, int nmid, uint8_t * L) {
    float amax  = 0.0f;
    float sumx2 = 0.0f;
    for (int j = 0; j < QAQ_HALF; ++j) {
        const float ax = fabsf(x[j]);
        amax   = ax > amax ? ax : amax;
        sumx2 += x[j]*x[j];
    }
    const int izero = qaq_nearest(0.0f, mid, nmid);
    if (!(amax > 0.0f) || !isfinite(amax)) {
        for (int j = 0; j < QAQ_HALF; ++j) {
            L[j] = (uint8_t) izero;
        }
        return 0;
    }

    float best_err = INFINITY;
    float best_d   = amax / 127.0f;
    float ds, err;
    for (int i = 0; i < QAQ_NTRY; ++i) {
        const float g = 0.45f + 0.07f*(float) i;
        const float d = amax*g/127.0f;
        if (qaq_fit(x, sumx2, 1.0f/d, T, mid, nmid, &ds, &err) && err < best_err) {
            best_err = err;
            best_d   = ds;
        }
    }
    // one refit with the best scale's assignment
    if (qaq_fit(x, sumx2, 1.0f/best_d, T, mid, nmid, &ds, &err) && err < best_err) {
        best_d = ds;
    }

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

// One block: both halves, then the 2 low index bits into qs and, for qaq3 (qh != NULL), the high bit into qh.
static void qaq_quantize_block(const float * x, const int8_t * T, const float * mid, int nmid,
                               uint8_t d[2], uint8_t qs[QK_QAQ/4], uint8_t * qh) {
    uint8_t L[QK_QAQ];
    d[0] = qaq_quantize_half(x,            T, mid, nmid, L);
    d[1] = qaq_quantize_half(x + QAQ_HALF, T, mid, nmid, L + QAQ_HALF);
    for (int b = 0; b < QK_QAQ/4; ++b) {
        qs[b] = (uint8_t) ((L[b] & 3) | (L[b + 8] & 3) << 2 | (L[b + 16] & 3) << 4 | (L[b + 24] & 3) << 6);
    }
    for (int b = 0; qh && b < QK_QAQ/8; ++b) {
        uint8_t h = 0;
        for (int j = 0; j < 8; ++j) {
            h |= (uint8_t) ((L[8*b + j] >> 2) << j);
        }
        qh[b] = h;
    }
}

void quantize_row_qaq3_ref(const float * x, block_qaq3 * y, int64_t k) {
    assert(k % QK_QAQ == 0);
    for (int64_t i = 0; i < k / QK_QAQ; ++i) {
        qaq_quantize_block(x + i*QK_QAQ, kvalues_qaq3, kmid_qaq3, 7, y[i].d, y[i].qs, y[i].qh);
    }
}

void quantize_row_qaq2_ref(const float * x, block_qaq2 * y, int64_t k) {
    assert(k % QK_QAQ == 0);
    for (int64_t i = 0; i < k / QK_QAQ; ++i) {
        qaq_quantize_block(x + i*QK_QAQ, kvalues_qaq2, kmid_qaq2, 3, y[i].d, y[i].qs, NULL);
    }
}

// Dequantizers run once per cached V row per query in CPU flash attention, so they are written for speed: the
// 8 (4) possible values of each half-block are tabulated first (d * level: one rounding, as d * T[l] would be),
// then every value is one table load. Value j = 8*g + b sits in qs[b] at bits 2g and in qh[g] at bit b.
static inline void qaq_dequantize_block(const uint8_t d[2], const uint8_t qs[QK_QAQ/4], const uint8_t * qh,
                                        const int8_t * T, int nlev, float * y) {
    float tab[2][8];
    for (int h = 0; h < 2; ++h) {
        const float dh = qaq_ue5m3_to_fp32(d[h]);
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
        qaq_dequantize_block(x[i].d, x[i].qs, x[i].qh, kvalues_qaq3, 8, y + i*QK_QAQ);
    }
}

void dequantize_row_qaq2(const block_qaq2 * x, float * y, int64_t k) {
    assert(k % QK_QAQ == 0);
    for (int64_t i = 0; i < k / QK_QAQ; ++i) {
        qaq_dequantize_block(x[i].d, x[i].qs, NULL, kvalues_qaq2, 4, y + i*QK_QAQ);
    }
}

size_t quantize_qaq3(const float * src, void * dst, int64_t nrows, int64_t n_per_row, const float * imatrix) {
    (void) imatrix;
    const size_t row_size = (size_t) (n_per_row / QK_QAQ) * sizeof(block_qaq3);
    for (int64_t r = 0; r < nrows; ++r) {
        quantize_row_qaq3_ref(src + r*n_per_row, (block_qaq3 *) ((char *) dst + r*row_size), n_per_row);
    }
    return nrows * row_size;
}

size_t quantize_qaq2(const float * src, void * dst, int64_t nrows, int64_t n_per_row, const float * imatrix) {
    (void) imatrix;
    const size_t row_size = (size_t) (n_per_row / QK_QAQ) * sizeof(block_qaq2);
    for (int64_t r = 0; r < nrows; ++r) {
        quantize_row_qaq2_ref(src + r*n_per_row, (block_qaq2 *) ((char *) dst + r*row_size), n_per_row);
    }
    return nrows * row_size;
}
