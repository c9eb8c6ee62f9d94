// Model fingerprint: sha256 over a GGUF file's architecture and tensor layout (docs/profile-format.md).
#include "qaq.h"

#include "ggml.h"
#include "gguf.h"

#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <string>

namespace {

// FIPS 180-4 SHA-256, enough for hashing a few kilobytes of text.
struct sha256_state {
    uint32_t h[8] = { 0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19 };
    uint8_t  buf[64];
    size_t   n_buf = 0;
    uint64_t n_bits = 0;
};

const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

void sha256_block(sha256_state & s, const uint8_t * p) {
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) {
        w[i] = (uint32_t) p[4*i] << 24 | (uint32_t) p[4*i + 1] << 16 | (uint32_t) p[4*i + 2] << 8 | p[4*i + 3];
    }
    for (int i = 16; i < 64; ++i) {
        const uint32_t s0 = rotr(w[i-15], 7) ^ rotr(w[i-15], 18) ^ (w[i-15] >> 3);
        const uint32_t s1 = rotr(w[i-2], 17) ^ rotr(w[i-2], 19) ^ (w[i-2] >> 10);
        w[i] = w[i-16] + s0 + w[i-7] + s1;
    }
    uint32_t a = s.h[0], b = s.h[1], c = s.h[2], d = s.h[3], e = s.h[4], f = s.h[5], g = s.h[6], h = s.h[7];
    for (int i = 0; i < 64; ++i) {
        const uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + K256[i] + w[i];
        const uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    s.h[0] += a; s.h[1] += b; s.h[2] += c; s.h[3] += d; s.h[4] += e; s.h[5] += f; s.h[6] += g; s.h[7] += h;
}

void sha256_update(sha256_state & s, const void * data, size_t n) {
    const uint8_t * p = (const uint8_t *) data;
    s.n_bits += (uint64_t) n * 8;
    while (n > 0) {
        const size_t take = std::min(n, sizeof(s.buf) - s.n_buf);
        memcpy(s.buf + s.n_buf, p, take);
        s.n_buf += take; p += take; n -= take;
        if (s.n_buf == sizeof(s.buf)) {
            sha256_block(s, s.buf);
            s.n_buf = 0;
        }
    }
}

std::string sha256_hex(const std::string & text) {
    sha256_state s;
    sha256_update(s, text.data(), text.size());
    const uint64_t n_bits = s.n_bits;
    const uint8_t one = 0x80, zero = 0;
    sha256_update(s, &one, 1);
    while (s.n_buf != 56) {
        sha256_update(s, &zero, 1);
    }
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) {
        len[i] = (uint8_t) (n_bits >> (56 - 8*i));
    }
    sha256_update(s, len, 8);
    char hex[65];
    for (int i = 0; i < 8; ++i) {
        snprintf(hex + 8*i, 9, "%08x", s.h[i]);
    }
    return std::string(hex, 64);
}

} // namespace

// the canonical text that is hashed; kept in step with qaq_gguf/profile.py:fingerprint_text
static bool fingerprint_text(const char * model_path, std::string & text, std::string & err) {
    ggml_context * meta = nullptr;
    gguf_init_params params = { /*.no_alloc =*/ true, /*.ctx =*/ &meta };
    gguf_context * gctx = gguf_init_from_file(model_path, params);
    if (!gctx) {
        err = std::string("cannot read ") + model_path + ": not a GGUF file, truncated, or unreadable";
        return false;
    }
    const int64_t i_arch = gguf_find_key(gctx, "general.architecture");
    text = "qaq-fingerprint-1\n";
    text += "arch=";
    text += i_arch >= 0 && gguf_get_kv_type(gctx, i_arch) == GGUF_TYPE_STRING ? gguf_get_val_str(gctx, i_arch) : "";
    text += "\n";
    const int64_t i_name = gguf_find_key(gctx, "general.name");
    text += "name=";
    text += i_name >= 0 && gguf_get_kv_type(gctx, i_name) == GGUF_TYPE_STRING ? gguf_get_val_str(gctx, i_name) : "";
    text += "\n";
    const int64_t n_tensors = gguf_get_n_tensors(gctx);
    for (int64_t i = 0; i < n_tensors; ++i) {
        const char * name = gguf_get_tensor_name(gctx, i);
        const ggml_tensor * t = ggml_get_tensor(meta, name);
        char line[512];
        snprintf(line, sizeof(line), "%s\t%d\t%lldx%lldx%lldx%lld\n", name, (int) gguf_get_tensor_type(gctx, i),
                 (long long) t->ne[0], (long long) t->ne[1], (long long) t->ne[2], (long long) t->ne[3]);
        text += line;
    }
    gguf_free(gctx);
    ggml_free(meta);
    return true;
}

static void set_err(char * err, size_t err_size, const std::string & msg) {
    if (err && err_size > 0) {
        snprintf(err, err_size, "%s", msg.c_str());
    }
}

int32_t qaq_model_fingerprint(const char * model_path, char * out_hex, char * err, size_t err_size) {
    std::string text, msg;
    if (!model_path || !fingerprint_text(model_path, text, msg)) {
        set_err(err, err_size, model_path ? msg : "no model path given");
        return -1;
    }
    const std::string hex = sha256_hex(text);
    memcpy(out_hex, hex.c_str(), hex.size() + 1);
    return 0;
}
