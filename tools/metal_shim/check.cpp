// Runs the Metal qaq code (compiled as C++ through shim.h) against qaq-gguf's C reference (ggml-qaq.c)
#include "shim.h"
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>
namespace mtl {
#include "deq_qaq.inc"
#include "q_qaq.inc"
}
extern "C" {
void quantize_row_qaq3_ref (const float * x, void * y, int64_t k);
void quantize_row_qaq2_ref (const float * x, void * y, int64_t k);
void quantize_row_qaq4l_ref(const float * x, void * y, int64_t k);
void quantize_row_qaq3l_ref(const float * x, void * y, int64_t k);
void quantize_row_qaq2l_ref(const float * x, void * y, int64_t k);
void quantize_row_qaq4h_ref(const float * x, void * y, int64_t k);
void quantize_row_qaq3h_ref(const float * x, void * y, int64_t k);
void quantize_row_qaq2h_ref(const float * x, void * y, int64_t k);
void dequantize_row_qaq3 (const void * x, float * y, int64_t k);
void dequantize_row_qaq2 (const void * x, float * y, int64_t k);
void dequantize_row_qaq4l(const void * x, float * y, int64_t k);
void dequantize_row_qaq3l(const void * x, float * y, int64_t k);
void dequantize_row_qaq2l(const void * x, float * y, int64_t k);
void dequantize_row_qaq4h(const void * x, float * y, int64_t k);
void dequantize_row_qaq3h(const void * x, float * y, int64_t k);
void dequantize_row_qaq2h(const void * x, float * y, int64_t k);
void quantize_row_tcq3_ref (const float * x, void * y, int64_t k);
void quantize_row_tcq2_ref (const float * x, void * y, int64_t k);
void dequantize_row_tcq3 (const void * x, float * y, int64_t k);
void dequantize_row_tcq2 (const void * x, float * y, int64_t k);
}

static std::mt19937_64 rng(1234);

// block generator: Gaussian over a wide range of scales, subnormal/saturating scales, zeros, sparse, constant,
// NaN/inf, random bits
static void gen(float * x, int n) {
    std::normal_distribution<float> N(0.0f, 1.0f);
    std::uniform_real_distribution<float> U(0.0f, 1.0f);
    const int kind = (int) (rng() % 10);
    const float sc = std::pow(10.0f, -9.0f + 16.0f*U(rng));
    for (int j = 0; j < n; ++j) {
        float v = N(rng)*sc;
        switch (kind) {
            case 0: v = 0.0f; break;
            case 1: v = (rng() % 8 == 0) ? v : 0.0f; break;
            case 2: v = sc; break;
            case 3: if (rng() % 32 == 0) v = (rng() & 1) ? INFINITY : NAN; break;
            case 4: { uint32_t b = (uint32_t) rng(); std::memcpy(&v, &b, 4); } break;
            case 5: v = N(rng)*std::pow(10.0f, -7.0f + 3.0f*U(rng)); break;          // fp16-subnormal scales
            case 6: v = N(rng)*1e6f; break;                                         // saturating scales
            default: break;
        }
        x[j] = v;
    }
}

static bool same_f(float a, float b) { return (std::isnan(a) && std::isnan(b)) || std::memcmp(&a, &b, 4) == 0; }

template <typename B, int QK, int NL16, int NL4>
static int check_type(const char * name, void (*qref)(const float *, void *, int64_t), void (*dref)(const void *, float *, int64_t),
                      void (*qm)(const float *, B &),
                      void (*dm)(const B *, short, float4x4 &), void (*dm4)(const B *, short, float4 &), int nblocks) {
    static_assert(QK == 16*NL16 && QK == 4*NL4, "nl");
    int bad_q = 0, bad_d = 0, bad_dr = 0;
    std::vector<float> x(QK), y(QK), z(QK);
    for (int ib = 0; ib < nblocks; ++ib) {
        gen(x.data(), QK);
        B ref, got;
        std::memset(&ref, 0, sizeof ref); std::memset(&got, 0x5a, sizeof got);
        qref(x.data(), &ref, QK);
        qm(x.data(), got);
        if (std::memcmp(&ref, &got, sizeof(B)) != 0) ++bad_q;
        // dequantize the reference block and a block of random bytes
        for (int pass = 0; pass < 2; ++pass) {
            B b = ref;
            if (pass == 1) { uint8_t * p = (uint8_t *) &b; for (size_t i = 0; i < sizeof b; ++i) p[i] = (uint8_t) rng(); }
            dref(&b, y.data(), QK);
            for (short il = 0; il < NL16; ++il) { float4x4 r; dm(&b, il, r); for (int i = 0; i < 16; ++i) z[16*il + i] = r[i/4][i%4]; }
            for (int j = 0; j < QK; ++j) if (!same_f(y[j], z[j])) { ++(pass ? bad_dr : bad_d); break; }
            for (short il = 0; il < NL4; ++il) { float4 r; dm4(&b, il, r); for (int i = 0; i < 4; ++i) z[4*il + i] = r[i]; }
            for (int j = 0; j < QK; ++j) if (!same_f(y[j], z[j])) { ++(pass ? bad_dr : bad_d); break; }
        }
    }
    std::printf("%-6s %d blocks: quantize differs in %d, dequantize (ref blocks) %d, dequantize (random bytes) %d\n",
                name, nblocks, bad_q, bad_d, bad_dr);
    return bad_q + bad_d + bad_dr;
}

int main(int argc, char ** argv) {
    const int n = argc > 1 ? std::atoi(argv[1]) : 20000;
    int bad = 0;
    using namespace mtl;
    bad += check_type<block_qaq4h, 64, 4, 16>("qaq4h", quantize_row_qaq4h_ref, dequantize_row_qaq4h, quantize_qaq4h,
        dequantize_qaq4h<float4x4>, dequantize_qaq4h_t4<float4>, n);
    bad += check_type<block_qaq3h, 64, 4, 16>("qaq3h", quantize_row_qaq3h_ref, dequantize_row_qaq3h, quantize_qaq3h,
        dequantize_qaq3h<float4x4>, dequantize_qaq3h_t4<float4>, n);
    bad += check_type<block_qaq2h, 64, 4, 16>("qaq2h", quantize_row_qaq2h_ref, dequantize_row_qaq2h, quantize_qaq2h,
        dequantize_qaq2h<float4x4>, dequantize_qaq2h_t4<float4>, n);
    bad += check_type<block_tcq3, 64, 4, 16>("tcq3", quantize_row_tcq3_ref, dequantize_row_tcq3, quantize_tcq3,
        dequantize_tcq3<float4x4>, dequantize_tcq3_t4<float4>, n);
    bad += check_type<block_tcq2, 64, 4, 16>("tcq2", quantize_row_tcq2_ref, dequantize_row_tcq2, quantize_tcq2,
        dequantize_tcq2<float4x4>, dequantize_tcq2_t4<float4>, n);
    bad += check_type<block_qaq4l, 128, 8, 32>("qaq4l", quantize_row_qaq4l_ref, dequantize_row_qaq4l, quantize_qaq4l,
        dequantize_qaq4l<float4x4>, dequantize_qaq4l_t4<float4>, n);
    bad += check_type<block_qaq3l, 128, 8, 32>("qaq3l", quantize_row_qaq3l_ref, dequantize_row_qaq3l, quantize_qaq3l,
        dequantize_qaq3l<float4x4>, dequantize_qaq3l_t4<float4>, n);
    bad += check_type<block_qaq2l, 128, 8, 32>("qaq2l", quantize_row_qaq2l_ref, dequantize_row_qaq2l, quantize_qaq2l,
        dequantize_qaq2l<float4x4>, dequantize_qaq2l_t4<float4>, n);
    bad += check_type<block_qaq3, 32, 2, 8>("qaq3", quantize_row_qaq3_ref, dequantize_row_qaq3, quantize_qaq3,
        dequantize_qaq3<float4x4>, dequantize_qaq3_t4<float4>, n);
    bad += check_type<block_qaq2, 32, 2, 8>("qaq2", quantize_row_qaq2_ref, dequantize_row_qaq2, quantize_qaq2,
        dequantize_qaq2<float4x4>, dequantize_qaq2_t4<float4>, n);
    std::printf(bad ? "FAIL\n" : "OK\n");
    return bad != 0;
}
