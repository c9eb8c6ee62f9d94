// Byte-for-byte check of a GPU backend's qaq quantizer and dequantizer against ggml's C reference.
//
// test-backend-ops compares SET_ROWS/CPY outputs through their dequantized values with a tolerance; this program
// compares the bytes: for every qaq type it copies f32 rows into the type on the backend (GGML_OP_CPY, the
// quantizer SET_ROWS runs too), reads the blocks back and compares them with ggml_quantize_chunk (the C reference
// quantize_row_qaq*_ref), then copies the reference blocks back to f32 on the backend and compares the values with
// the type's to_float bit for bit.
//
// Usage: qaq-test-backend-quant BACKEND [ROWS]   (e.g. Vulkan0, CUDA0). Exit 0: all equal; 1: differences (listed);
// 77: the backend is not available.
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

static const ggml_type qaq_types[] = {
    GGML_TYPE_QAQ3, GGML_TYPE_QAQ2, GGML_TYPE_QAQ4L, GGML_TYPE_QAQ3L, GGML_TYPE_QAQ2L,
    GGML_TYPE_QAQ4H, GGML_TYPE_QAQ3H, GGML_TYPE_QAQ2H, GGML_TYPE_TCQ3, GGML_TYPE_TCQ2,
};

// rows of n values: Gaussian at many scales (including ones that saturate or underflow the scales), plus edge rows
static std::vector<float> make_rows(int64_t n, int64_t nrows, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> gauss(0.0f, 1.0f);
    std::uniform_int_distribution<int> pick(0, 31);
    std::vector<float> x(n * nrows);
    const float scales[] = { 1.0f, 1e-3f, 1e-6f, 30.0f, 1e3f, 1e6f, 1e-30f, 3e4f };
    for (int64_t r = 0; r < nrows; ++r) {
        float * y = x.data() + r * n;
        const float s = scales[r % (sizeof(scales) / sizeof(scales[0]))];
        for (int64_t j = 0; j < n; ++j) {
            y[j] = gauss(rng) * s;
        }
        switch (r % 16) {
            case 3:  // all zeros
                std::fill(y, y + n, 0.0f);
                break;
            case 5:  // sparse: mostly zeros, a few values
                for (int64_t j = 0; j < n; ++j) {
                    if (pick(rng) != 0) {
                        y[j] = 0.0f;
                    }
                }
                break;
            case 7:  // one outlier per 32
                for (int64_t j = 0; j < n; j += 32) {
                    y[j + pick(rng)] *= 50.0f;
                }
                break;
            case 9:  // integers (ties against the thresholds are likelier)
                for (int64_t j = 0; j < n; ++j) {
                    y[j] = std::round(y[j] * 8.0f);
                }
                break;
            case 11:  // constant
                std::fill(y, y + n, 0.5f);
                break;
            default:
                break;
        }
    }
    return x;
}

// dst = cpy(src) on the backend; src_data is uploaded, dst's bytes are returned
static std::vector<uint8_t> backend_cpy(ggml_backend_t backend, ggml_type tsrc, ggml_type tdst, int64_t n,
                                        int64_t nrows, const void * src_data) {
    ggml_init_params ip = { 4 * ggml_tensor_overhead() + ggml_graph_overhead(), nullptr, true };
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * src = ggml_new_tensor_2d(ctx, tsrc, n, nrows);
    ggml_tensor * dst = ggml_new_tensor_2d(ctx, tdst, n, nrows);
    ggml_tensor * out = ggml_cpy(ctx, src, dst);
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, backend);
    ggml_backend_tensor_set(src, src_data, 0, ggml_nbytes(src));
    if (ggml_backend_graph_compute(backend, gf) != GGML_STATUS_SUCCESS) {
        fprintf(stderr, "graph compute failed\n");
        exit(2);
    }
    std::vector<uint8_t> res(ggml_nbytes(dst));
    ggml_backend_tensor_get(dst, res.data(), 0, res.size());
    ggml_backend_buffer_free(buf);
    ggml_free(ctx);
    return res;
}

static bool supports_cpy(ggml_backend_t backend, ggml_type tsrc, ggml_type tdst, int64_t n) {
    ggml_init_params ip = { 4 * ggml_tensor_overhead(), nullptr, true };
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * out = ggml_cpy(ctx, ggml_new_tensor_2d(ctx, tsrc, n, 1), ggml_new_tensor_2d(ctx, tdst, n, 1));
    const bool ok = ggml_backend_supports_op(backend, out);
    ggml_free(ctx);
    return ok;
}

int main(int argc, char ** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s BACKEND [ROWS]\n", argv[0]);
        return 2;
    }
    const char * name = argv[1];
    const int64_t nrows = argc > 2 ? atoll(argv[2]) : 256;
    ggml_backend_load_all();
    ggml_backend_dev_t dev = ggml_backend_dev_by_name(name);
    if (dev == nullptr) {
        printf("backend %s not available\n", name);
        return 77;
    }
    ggml_backend_t backend = ggml_backend_dev_init(dev, nullptr);
    if (backend == nullptr) {
        printf("backend %s failed to initialize\n", name);
        return 77;
    }
    printf("backend %s: %s\n", name, ggml_backend_dev_description(dev));

    const int64_t n = 1024;  // whole blocks of 32, 64 and 128
    const std::vector<float> x = make_rows(n, nrows, 1234);
    int failures = 0;
    for (ggml_type t : qaq_types) {
        const char * tn = ggml_type_name(t);
        if (!supports_cpy(backend, GGML_TYPE_F32, t, n) || !supports_cpy(backend, t, GGML_TYPE_F32, n)) {
            printf("%-6s  not supported by %s: FAIL\n", tn, name);
            ++failures;
            continue;
        }
        const size_t row_size = ggml_row_size(t, n);
        const int64_t bs = ggml_blck_size(t);
        const size_t block_bytes = ggml_type_size(t);

        // quantize: backend bytes against the C reference
        std::vector<uint8_t> ref(row_size * nrows);
        ggml_quantize_chunk(t, x.data(), ref.data(), 0, nrows, n, nullptr);
        const std::vector<uint8_t> got = backend_cpy(backend, GGML_TYPE_F32, t, n, nrows, x.data());
        int64_t bad_blocks = 0;
        const int64_t nblocks = nrows * n / bs;
        for (int64_t b = 0; b < nblocks; ++b) {
            if (memcmp(ref.data() + b * block_bytes, got.data() + b * block_bytes, block_bytes) != 0) {
                if (bad_blocks < 3) {
                    const int64_t row = b / (n / bs);
                    printf("%-6s  block %lld (row %lld) differs:\n   ref", tn, (long long) b, (long long) row);
                    for (size_t k = 0; k < block_bytes; ++k) printf(" %02x", ref[b * block_bytes + k]);
                    printf("\n   got");
                    for (size_t k = 0; k < block_bytes; ++k) printf(" %02x", got[b * block_bytes + k]);
                    printf("\n");
                }
                ++bad_blocks;
            }
        }

        // dequantize: backend values (from the reference bytes) against to_float, bit for bit
        std::vector<float> yref(n * nrows);
        ggml_get_type_traits(t)->to_float(ref.data(), yref.data(), n * nrows);
        const std::vector<uint8_t> ygot_b = backend_cpy(backend, t, GGML_TYPE_F32, n, nrows, ref.data());
        const float * ygot = (const float *) ygot_b.data();
        int64_t bad_values = 0;
        for (int64_t i = 0; i < n * nrows; ++i) {
            uint32_t a, c;
            memcpy(&a, &yref[i], 4);
            memcpy(&c, &ygot[i], 4);
            if (a != c) {
                if (bad_values < 3) {
                    printf("%-6s  value %lld: ref %.9g got %.9g\n", tn, (long long) i, yref[i], ygot[i]);
                }
                ++bad_values;
            }
        }
        const bool ok = bad_blocks == 0 && bad_values == 0;
        printf("%-6s  quantize: %lld/%lld blocks differ; dequantize: %lld/%lld values differ: %s\n", tn,
               (long long) bad_blocks, (long long) nblocks, (long long) bad_values, (long long) (n * nrows),
               ok ? "OK" : "FAIL");
        failures += !ok;
    }
    ggml_backend_free(backend);
    printf("%s\n", failures ? "FAILED" : "ALL OK");
    return failures ? 1 : 0;
}
