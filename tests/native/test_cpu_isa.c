// ggml-cpu's qaq and tcq kernels built for one instruction set against the C reference. The test compiles this file
// with ggml-qaq-cpu.c and ggml-qaq.c once per ISA (scalar, AVX2, AVX-512: each build takes the code paths its
// macros select, the one that runs on machines of that kind): from_float (the cache write: the scale search, the
// trellis walk) must write the reference's bytes and the row dequantizer its values, for random rows of several
// scales plus rows of zeros, ties, tiny and huge values and non-finite values. Prints "PASS <rows> rows" or the
// first difference and exits 1.

#include "ggml-qaq.h"
#include "ggml-qaq-cpu.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// ggml-cpu's fp16 table, which the vec_dot kernels (not tested here) read: filled in main
float ggml_table_f32_f16[1 << 16];

#define N 256  // values per row: every block size divides it

typedef void (*from_float_t)(const float * x, void * y, int64_t k);
typedef void (*to_float_t)(const void * x, float * y, int64_t k);

#define TYPE(name, qk) { #name, (N / (qk)) * sizeof(block_##name), (from_float_t) quantize_row_##name##_ref, \
                         quantize_row_##name, (to_float_t) dequantize_row_##name, dequantize_row_##name##_cpu }

static const struct {
    const char * name;
    size_t       row_bytes;
    from_float_t ref, cpu;
    to_float_t   deq_ref, deq_cpu;
} types[] = {
    TYPE(qaq3, QK_QAQ),   TYPE(qaq2, QK_QAQ),   TYPE(qaq4l, QK_QAQL), TYPE(qaq3l, QK_QAQL), TYPE(qaq2l, QK_QAQL),
    TYPE(qaq4h, QK_QAQH), TYPE(qaq3h, QK_QAQH), TYPE(qaq2h, QK_QAQH), TYPE(tcq3, QK_TCQ),   TYPE(tcq2, QK_TCQ),
};

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static float uniform(void) {  // [0, 1)
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float) (rng >> 40) / (float) (1 << 24);
}

static float gauss(void) {
    const float u = uniform() + 1e-7f, v = uniform();
    return sqrtf(-2.0f * logf(u)) * cosf(6.2831853f * v);
}

// row r: Gaussian at scales 1e-6 .. 1e4, heavy tails, then the special cases
static void make_row(int r, float * x) {
    const float scale = powf(10.0f, (float) (r % 11) - 6.0f);
    for (int i = 0; i < N; ++i) {
        x[i] = scale * gauss() * (r % 7 == 0 ? 1.0f + 30.0f * (uniform() < 0.02f) : 1.0f);
    }
    switch (r % 29) {
        case 1: memset(x, 0, sizeof(float) * N); break;                                 // all zeros
        case 2: for (int i = 0; i < N; ++i) x[i] = (i & 1) ? 1.0f : -1.0f; break;      // ties everywhere
        case 3: x[5] = INFINITY; break;
        case 4: x[70] = NAN; break;
        case 5: x[200] = 3.0e38f; break;                                                // near FLT_MAX
        case 6: for (int i = 0; i < N; ++i) x[i] = 1e-40f * (float) (i % 5); break;     // subnormals
        case 7: for (int i = 64; i < 128; ++i) x[i] = 0.0f; break;                      // one zero block
        default: break;
    }
}

int main(int argc, char ** argv) {
    const int rows = argc > 1 ? atoi(argv[1]) : 2000;
    for (int i = 0; i < (1 << 16); ++i) {
        ggml_table_f32_f16[i] = qaq_fp16_to_fp32((uint16_t) i);
    }
    float x[N], a[N], b[N];
    uint8_t qr[N * 4], qc[N * 4];
    for (size_t t = 0; t < sizeof(types) / sizeof(types[0]); ++t) {
        for (int r = 0; r < rows; ++r) {
            make_row(r, x);
            memset(qr, 0xA5, sizeof(qr));
            memset(qc, 0x5A, sizeof(qc));
            types[t].ref(x, qr, N);
            types[t].cpu(x, qc, N);
            if (memcmp(qr, qc, types[t].row_bytes) != 0) {
                size_t i = 0;
                while (qr[i] == qc[i]) ++i;
                printf("FAIL %s row %d: from_float byte %zu is %02x, the reference writes %02x\n", types[t].name, r, i,
                       qc[i], qr[i]);
                return 1;
            }
            types[t].deq_ref(qr, a, N);
            types[t].deq_cpu(qr, b, N);
            if (memcmp(a, b, sizeof(a)) != 0) {
                int i = 0;
                while (memcmp(a + i, b + i, sizeof(float)) == 0) ++i;
                printf("FAIL %s row %d: dequantized value %d is %g, the reference gives %g\n", types[t].name, r, i,
                       (double) b[i], (double) a[i]);
                return 1;
            }
        }
    }
    printf("PASS %d rows of %d values, %zu types\n", rows, N, sizeof(types) / sizeof(types[0]));
    return 0;
}
