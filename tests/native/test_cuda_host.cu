// The CUDA side of the qaq types, run on the CPU: ggml-qaq.cuh (and through it ggml-qaq-common.h) compiled by nvcc,
// its block quantizers and dequantizers called as __host__ functions, compared byte for byte with the C reference
// (native/ggml/ggml-qaq.c, compiled by a C compiler with -ffp-contract=off and linked in) on random rows and edge
// cases, for every qaq type. The device pass of the same functions differs only in the primitives of
// ggml-qaq-common.h (IEEE round-to-nearest PTX for each float operation, __byte_perm, CUDA's fp16 conversions).
//
// Built and run by tests/test_cuda_host.py (pytest -m cuda_host). By hand:
//   gcc -std=c11 -O2 -ffp-contract=off -Inative/ggml -c native/ggml/ggml-qaq.c -o /tmp/qaq-ref.o
//   nvcc -std=c++17 -O2 -Xcompiler -ffp-contract=off --fmad=false -Inative/ggml tests/native/test_cuda_host.cu \
//        /tmp/qaq-ref.o -o /tmp/qaq-cuda-host && /tmp/qaq-cuda-host [blocks per case]
// A directory placed before native/ggml on nvcc's include path (-I) that holds a copy of ggml-qaq.cuh and an edited
// ggml-qaq-common.h compiles the CUDA side from that copy: that is how the test shows it can fail.

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

// the few things ggml-qaq.cuh takes from ggml-cuda's common.cuh
#define WARP_SIZE 32
#define QI8_1 8
#define GGML_UNUSED(x) (void) (x)
__device__ int ggml_cuda_dp4a(const int a, const int b, int c) { return __dp4a(a, b, c); }

#include "ggml-qaq.cuh"

// the C reference (ggml-qaq.c), linked in
extern "C" {
void quantize_row_qaq3_ref (const float * x, block_qaq3  * y, int64_t k);
void quantize_row_qaq2_ref (const float * x, block_qaq2  * y, int64_t k);
void quantize_row_qaq4l_ref(const float * x, block_qaq4l * y, int64_t k);
void quantize_row_qaq3l_ref(const float * x, block_qaq3l * y, int64_t k);
void quantize_row_qaq2l_ref(const float * x, block_qaq2l * y, int64_t k);
void quantize_row_qaq4h_ref(const float * x, block_qaq4h * y, int64_t k);
void quantize_row_qaq3h_ref(const float * x, block_qaq3h * y, int64_t k);
void quantize_row_qaq2h_ref(const float * x, block_qaq2h * y, int64_t k);
void dequantize_row_qaq3 (const block_qaq3  * x, float * y, int64_t k);
void dequantize_row_qaq2 (const block_qaq2  * x, float * y, int64_t k);
void dequantize_row_qaq4l(const block_qaq4l * x, float * y, int64_t k);
void dequantize_row_qaq3l(const block_qaq3l * x, float * y, int64_t k);
void dequantize_row_qaq2l(const block_qaq2l * x, float * y, int64_t k);
void dequantize_row_qaq4h(const block_qaq4h * x, float * y, int64_t k);
void dequantize_row_qaq3h(const block_qaq3h * x, float * y, int64_t k);
void dequantize_row_qaq2h(const block_qaq2h * x, float * y, int64_t k);
void quantize_row_tcq3_ref (const float * x, block_tcq3  * y, int64_t k);
void quantize_row_tcq2_ref (const float * x, block_tcq2  * y, int64_t k);
void dequantize_row_tcq3 (const block_tcq3  * x, float * y, int64_t k);
void dequantize_row_tcq2 (const block_tcq2  * x, float * y, int64_t k);
}

// the tcq quantizers' lanes (a warp on the device: quantize_f32_tcq*_block) run one after another here, in reverse order: within a step no
// lane may read what another writes
struct host_lanes {
    static constexpr int n = WARP_SIZE;
    template <typename F> void one(F f) const { f(); }
    template <typename F> void each(F f) const { for (int lane = n - 1; lane >= 0; --lane) f(lane); }
};
static qaq_tcq_scratch host_scratch;
static void quantize_f32_tcq3_block_host(const float * x, block_tcq3 * y) {
    qaq_tcq_quantize_block_lanes<3>(x, &y->d, y->qs, host_scratch, host_lanes());
}
static void quantize_f32_tcq2_block_host(const float * x, block_tcq2 * y) {
    qaq_tcq_quantize_block_lanes<2>(x, &y->d, y->qs, host_scratch, host_lanes());
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint32_t rnd() {
    rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
    return (uint32_t) (rng_state >> 16);
}
static float unif() { return (rnd() + 0.5f) * 2.3283064365386963e-10f; }
static float gauss() { return std::sqrt(-2.0f*std::log(unif())) * std::cos(6.2831853f*unif()); }
static float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

// the input cases, one per block: name and generator of value j of a block of qk values
enum { N_CASES = 16 };
static const char * case_name[N_CASES] = {
    "gaussian", "gaussian, scale 2^-40..2^20", "zeros", "-0 and one value", "level ties", "threshold ties",
    "huge (1e38)", "fp16 saturation (1e7)", "tiny (2^-130, subnormal)", "subnormal scales (2^-20)", "one inf",
    "one NaN", "random bits", "constant", "one nonzero", "mixed magnitudes",
};

static void gen_block(int c, float * x, int qk) {
    const float sc = std::ldexp(1.0f, (int) (rnd() % 61) - 40);
    for (int j = 0; j < qk; ++j) {
        float v = gauss();
        switch (c) {
            case 0:  break;
            case 1:  v *= sc; break;
            case 2:  v = 0.0f; break;
            case 3:  v = j == 5 ? gauss() : -0.0f; break;
            // values on the levels of a scale: the least-squares fits tie exactly
            case 4:  v = (float) (int) ((int) (rnd() % 255) - 127) * std::ldexp(1.0f, -7) * sc; break;
            // halfway between levels of the C tables: x*id on a threshold for scales that are powers of two
            case 5:  { static const float m[] = { QAQ3_KMID, QAQ2_KMID, QAQ4_KMID }; v = m[rnd() % 25] * std::ldexp(1.0f, -(int) (rnd() % 8)); } break;
            case 6:  v *= 1e38f; break;
            case 7:  v *= 1e7f; break;
            case 8:  v = std::ldexp(v, -130); break;
            case 9:  v = std::ldexp(v, -20); break;
            case 10: if (j == 3) v = (rnd() & 1) ? INFINITY : -INFINITY; break;
            case 11: if (j == 7) v = NAN; break;
            case 12: v = bits_f32(rnd() << 16 ^ rnd()); break;
            case 13: v = 0.37f * sc; break;
            case 14: v = j == qk - 1 ? 2.5f * sc : 0.0f; break;
            case 15: v *= std::ldexp(1.0f, (int) (rnd() % 40) - 20); break;
        }
        x[j] = v;
    }
}

struct result { long blocks = 0, bad = 0; };

// equal bits, or both NaN: a NaN fp16 scale (never written by the quantizers; only random bytes have one) gives NaN
// values whose payload depends on the fp16 conversion (F16C and the C reference keep it, CUDA's __half2float returns
// the canonical NaN), so NaN values are compared as NaN only
static bool same_values(const float * a, const float * b, int n, long & nan_values) {
    for (int j = 0; j < n; ++j) {
        if (std::isnan(a[j]) && std::isnan(b[j])) {
            ++nan_values;
            continue;
        }
        if (memcmp(&a[j], &b[j], sizeof(float)) != 0) {
            return false;
        }
    }
    return true;
}

static void report(const char * what, const result & r, int & fails) {
    printf("%-44s %8ld blocks  %s (%ld differ)\n", what, r.blocks, r.bad ? "FAIL" : "ok", r.bad);
    if (r.bad) {
        ++fails;
    }
}

static void dump(const char * tag, const void * p, size_t n) {
    printf("    %s:", tag);
    for (size_t i = 0; i < n; ++i) printf(" %02x", ((const uint8_t *) p)[i]);
    printf("\n");
}

// quantize nb blocks of each input case with both implementations; dequantize random bytes and the quantized
// blocks with the C row dequantizer, the CUDA 2-value dequantize_kernel_t and the flash-attention V dequantizer
template <typename block_t, int qk>
static int check_type(const char * name, int nb,
                      void (*quant_ref)(const float *, block_t *, int64_t),
                      void (*deq_ref)(const block_t *, float *, int64_t),
                      void (*quant_cuda)(const float *, block_t *),
                      void (*deq_cuda)(const void *, int64_t, int, float2 &),
                      void (*deq_v4)(const void *, void *, int64_t),
                      void (*deq_v2)(const void *, void *, int64_t)) {
    int fails = 0;
    std::vector<float> x(qk);
    block_t yr, yc;
    std::vector<block_t> blocks;
    char what[96];
    int shown = 0;
    for (int c = 0; c < N_CASES; ++c) {
        result r;
        for (int i = 0; i < nb; ++i) {
            gen_block(c, x.data(), qk);
            memset(&yr, 0xAA, sizeof(yr));
            memset(&yc, 0x55, sizeof(yc));
            quant_ref(x.data(), &yr, qk);
            quant_cuda(x.data(), &yc);
            ++r.blocks;
            if (memcmp(&yr, &yc, sizeof(block_t)) != 0) {
                ++r.bad;
                if (shown++ < 3) {
                    printf("  %s quantize, case '%s', block %d:\n", name, case_name[c], i);
                    dump("C reference", &yr, sizeof(yr));
                    dump("CUDA host  ", &yc, sizeof(yc));
                }
            }
            if (i % 4 == 0) {
                blocks.push_back(yr);
            }
        }
        snprintf(what, sizeof(what), "%s quantize: %s", name, case_name[c]);
        report(what, r, fails);
    }

    // dequantize: the quantized blocks, then random bytes (every scale byte, NaN/inf fp16 scales included)
    for (int i = 0; i < 4*nb; ++i) {
        block_t b;
        for (size_t k = 0; k < sizeof(b); ++k) ((uint8_t *) &b)[k] = (uint8_t) rnd();
        blocks.push_back(b);
    }
    result rd, rv;
    long nan_values = 0;
    std::vector<float> yref(qk), ycu(qk), yv4(qk), yv2(qk);
    shown = 0;
    for (size_t i = 0; i < blocks.size(); ++i) {
        deq_ref(&blocks[i], yref.data(), qk);
        for (int j = 0; j < qk; j += 2) {
            float2 v;
            deq_cuda(blocks.data(), (int64_t) i, j, v);
            ycu[j] = v.x;
            ycu[j + 1] = v.y;
        }
        for (int j = 0; j < qk; j += 4) deq_v4(&blocks[i], yv4.data() + j, j);
        for (int j = 0; j < qk; j += 2) deq_v2(&blocks[i], yv2.data() + j, j);
        ++rd.blocks;
        ++rv.blocks;
        if (!same_values(yref.data(), ycu.data(), qk, nan_values)) {
            ++rd.bad;
            if (shown++ < 3) {
                printf("  %s dequantize, block %zu:\n", name, i);
                dump("block", &blocks[i], sizeof(block_t));
                for (int j = 0; j < qk; ++j) {
                    if (memcmp(&yref[j], &ycu[j], 4) != 0) {
                        printf("    value %d: C %a, CUDA %a\n", j, yref[j], ycu[j]);
                        break;
                    }
                }
            }
        }
        if (!same_values(yref.data(), yv4.data(), qk, nan_values) || !same_values(yref.data(), yv2.data(), qk, nan_values)) {
            ++rv.bad;
        }
    }
    snprintf(what, sizeof(what), "%s dequantize (get_rows/cpy)", name);
    report(what, rd, fails);
    snprintf(what, sizeof(what), "%s dequantize_V (flash attention, f32)", name);
    report(what, rv, fails);
    if (nan_values) {
        printf("%-40s %8ld values compared as NaN only (NaN fp16 scales of random bytes)\n", name, nan_values);
    }
    return fails;
}

// the flash-attention K.Q core of the tcq types (qaq_tcq_dot4: 4 elements against an int of q8_1 values, times the
// block scale) against the C reference's dequantized values, on quantized and random blocks: equal to float rounding
template <typename block_t, int kbits>
static int check_tcq_dot(const char * name, int nb, void (*quant_ref)(const float *, block_t *, int64_t),
                         void (*deq_ref)(const block_t *, float *, int64_t)) {
    result r;
    std::vector<float> x(QK_TCQ), y(QK_TCQ);
    for (int i = 0; i < nb; ++i) {
        block_t b;
        if (i % 2 == 0) {
            gen_block(0, x.data(), QK_TCQ);
            quant_ref(x.data(), &b, QK_TCQ);
        } else {
            for (size_t k = 0; k < sizeof(b); ++k) ((uint8_t *) &b)[k] = (uint8_t) rnd();
            b.d = 0x3C00;  // 1.0: random scales would only test fp16 overflow
        }
        deq_ref(&b, y.data(), QK_TCQ);
        bool ok = true;
        for (int iqs = 0; iqs < QK_TCQ/4; ++iqs) {
            const int q = (int) rnd();
            double want = 0.0, mag = 0.0;
            for (int l = 0; l < 4; ++l) {
                want += (double) y[4*iqs + l] * (int8_t) (q >> 8*l);
                mag  += std::fabs((double) y[4*iqs + l] * (int8_t) (q >> 8*l));
            }
            const double got = (double) qaq_fp16_to_fp32(b.d) * qaq_tcq_dot4<kbits>(&b, iqs, q);
            ok = ok && std::fabs(got - want) <= 1e-6*mag + 1e-30;
        }
        ++r.blocks;
        r.bad += !ok;
    }
    int fails = 0;
    char what[96];
    snprintf(what, sizeof(what), "%s K.Q (flash attention, q8_1 Q)", name);
    report(what, r, fails);
    return fails;
}

#define CHECK(t, qk) check_type<block_##t, qk>(#t, nb, quantize_row_##t##_ref, dequantize_row_##t, \
    quantize_f32_##t##_block, dequantize_##t, dequantize_V_##t<float, 4>, dequantize_V_##t<float, 2>)

int main(int argc, char ** argv) {
    const int nb = argc > 1 ? atoi(argv[1]) : 2000;
    int fails = 0;
    fails += CHECK(qaq3,  QK_QAQ);
    fails += CHECK(qaq2,  QK_QAQ);
    fails += CHECK(qaq4l, QK_QAQL);
    fails += CHECK(qaq3l, QK_QAQL);
    fails += CHECK(qaq2l, QK_QAQL);
    fails += CHECK(qaq4h, QK_QAQH);
    fails += CHECK(qaq3h, QK_QAQH);
    fails += CHECK(qaq2h, QK_QAQH);
    fails += check_type<block_tcq3, QK_TCQ>("tcq3", nb, quantize_row_tcq3_ref, dequantize_row_tcq3,
        quantize_f32_tcq3_block_host, dequantize_tcq3, dequantize_V_tcq3<float, 4>, dequantize_V_tcq3<float, 2>);
    fails += check_type<block_tcq2, QK_TCQ>("tcq2", nb, quantize_row_tcq2_ref, dequantize_row_tcq2,
        quantize_f32_tcq2_block_host, dequantize_tcq2, dequantize_V_tcq2<float, 4>, dequantize_V_tcq2<float, 2>);
    fails += check_tcq_dot<block_tcq3, 3>("tcq3", nb, quantize_row_tcq3_ref, dequantize_row_tcq3);
    fails += check_tcq_dot<block_tcq2, 2>("tcq2", nb, quantize_row_tcq2_ref, dequantize_row_tcq2);
    printf("%s: %d check(s) failed\n", fails ? "FAIL" : "PASS", fails);
    return fails ? 1 : 0;
}
