// Read a qaq KV profile (GGUF metadata, docs/profile-format.md), check it against a loaded model and the backends
// present, and set the model's per-layer K/V cache types.
#include "qaq.h"

#include "ggml.h"
#include "ggml-backend.h"
#include "gguf.h"
#include "llama.h"

#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <cmath>
#include <set>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace {

struct profile_error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

std::string strfmt(const char * fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    return buf;
}

struct gguf_file {
    gguf_context * ctx = nullptr;
    std::string path;

    explicit gguf_file(const std::string & path) : path(path) {
        gguf_init_params params = { /*.no_alloc =*/ true, /*.ctx =*/ nullptr };
        ctx = gguf_init_from_file(path.c_str(), params);
        if (!ctx) {
            throw profile_error("cannot read " + path + ": not a GGUF file, truncated, or unreadable");
        }
    }
    ~gguf_file() { gguf_free(ctx); }

    int64_t find(const char * key, bool required) const {
        const int64_t id = gguf_find_key(ctx, key);
        if (id < 0 && required) {
            throw profile_error(strfmt("%s: missing key %s (a truncated or hand-edited profile?)", path.c_str(), key));
        }
        return id;
    }

    std::string str(const char * key) const {
        const int64_t id = find(key, true);
        if (gguf_get_kv_type(ctx, id) != GGUF_TYPE_STRING) {
            throw profile_error(strfmt("%s: key %s must be a string", path.c_str(), key));
        }
        return gguf_get_val_str(ctx, id);
    }

    uint32_t u32(const char * key) const {
        const int64_t id = find(key, true);
        switch (gguf_get_kv_type(ctx, id)) {
            case GGUF_TYPE_UINT32: return gguf_get_val_u32(ctx, id);
            case GGUF_TYPE_INT32:  return (uint32_t) gguf_get_val_i32(ctx, id);
            default: throw profile_error(strfmt("%s: key %s must be an integer", path.c_str(), key));
        }
    }

    std::vector<std::string> strs(const char * key, size_t n) const {
        const int64_t id = find(key, true);
        if (gguf_get_kv_type(ctx, id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(ctx, id) != GGUF_TYPE_STRING) {
            throw profile_error(strfmt("%s: key %s must be an array of strings", path.c_str(), key));
        }
        check_len(key, gguf_get_arr_n(ctx, id), n);
        std::vector<std::string> res;
        for (size_t i = 0; i < n; ++i) {
            res.emplace_back(gguf_get_arr_str(ctx, id, i));
        }
        return res;
    }

    std::vector<int64_t> ints(const char * key, size_t n) const {
        const int64_t id = find(key, true);
        if (gguf_get_kv_type(ctx, id) != GGUF_TYPE_ARRAY) {
            throw profile_error(strfmt("%s: key %s must be an array", path.c_str(), key));
        }
        check_len(key, gguf_get_arr_n(ctx, id), n);
        const void * data = gguf_get_arr_data(ctx, id);
        std::vector<int64_t> res(n);
        for (size_t i = 0; i < n; ++i) {
            switch (gguf_get_arr_type(ctx, id)) {
                case GGUF_TYPE_INT32:  res[i] = ((const int32_t  *) data)[i]; break;
                case GGUF_TYPE_UINT32: res[i] = ((const uint32_t *) data)[i]; break;
                case GGUF_TYPE_BOOL:   res[i] = ((const int8_t   *) data)[i] != 0; break;
                default: throw profile_error(strfmt("%s: key %s must be an array of integers", path.c_str(), key));
            }
        }
        return res;
    }

    // an optional float32 array of exactly n values; empty when the key is absent
    std::vector<float> floats(const char * key, size_t n) const {
        const int64_t id = find(key, false);
        if (id < 0) {
            return {};
        }
        if (gguf_get_kv_type(ctx, id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(ctx, id) != GGUF_TYPE_FLOAT32) {
            throw profile_error(strfmt("%s: key %s must be an array of float32", path.c_str(), key));
        }
        if (gguf_get_arr_n(ctx, id) != n) {
            throw profile_error(strfmt("%s: key %s has %zu values, expected %zu (n_head_kv * head_dim summed over "
                "layers)", path.c_str(), key, gguf_get_arr_n(ctx, id), n));
        }
        const float * data = (const float *) gguf_get_arr_data(ctx, id);
        return std::vector<float>(data, data + n);
    }

    void check_len(const char * key, size_t got, size_t n) const {
        if (got != n) {
            throw profile_error(strfmt("%s: key %s has %zu entries, expected one per layer (%zu)", path.c_str(), key, got, n));
        }
    }
};

ggml_type type_from_name(const std::string & name) {
    for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
        const char * tn = ggml_type_size((ggml_type) t) ? ggml_type_name((ggml_type) t) : nullptr;
        if (tn && name == tn) {
            return (ggml_type) t;
        }
    }
    return GGML_TYPE_COUNT;
}

// does every GPU device present run flash attention with this K/V type pair and head size?
void check_backends(ggml_type tk, ggml_type tv, int64_t head_k, int64_t head_v, int64_t n_head_kv) {
    ggml_init_params params = { /*.mem_size =*/ 8*ggml_tensor_overhead(), /*.mem_buffer =*/ nullptr, /*.no_alloc =*/ true };
    ggml_context * ctx = ggml_init(params);
    const int64_t n_kv = 256;
    ggml_tensor * q    = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, head_k, 1, n_head_kv, 1);
    ggml_tensor * k    = ggml_new_tensor_4d(ctx, tk, head_k, n_kv, n_head_kv, 1);
    ggml_tensor * v    = ggml_new_tensor_4d(ctx, tv, head_v, n_kv, n_head_kv, 1);
    ggml_tensor * mask = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, n_kv, 1, 1, 1);
    ggml_tensor * fa   = ggml_flash_attn_ext(ctx, q, k, v, mask, 1.0f, 0.0f, 0.0f);
    std::string bad;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        if (ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_GPU) {
            continue;
        }
        if (!ggml_backend_dev_supports_op(dev, fa)) {
            bad = ggml_backend_dev_name(dev);
            break;
        }
    }
    ggml_free(ctx);
    if (!bad.empty()) {
        throw profile_error(strfmt("the K/V cache type pair %s/%s (head size %lld) has no flash-attention kernel on %s; "
            "use types this backend supports (see `qaq-gguf info`) or rebuild with the pair enabled",
            ggml_type_name(tk), ggml_type_name(tv), (long long) head_k, bad.c_str()));
    }
}

void apply(llama_model * model, const char * model_path, const char * profile_path) {
    if (!model) {
        throw profile_error("no model given");
    }
    if (!profile_path || !*profile_path) {
        throw profile_error("no profile path given");
    }
    const bool embedded = strcmp(profile_path, "embedded") == 0;
    if (embedded && (!model_path || !*model_path)) {
        throw profile_error("'embedded' needs the model path to read the profile from");
    }
    const gguf_file prof(embedded ? model_path : profile_path);

    if (prof.find("qaq.schema_version", false) < 0) {
        throw profile_error(embedded
            ? std::string(model_path) + " has no embedded qaq profile (embed one with `qaq-gguf profile embed`)"
            : prof.path + " is a GGUF file but not a qaq KV profile (no qaq.schema_version key)");
    }
    const uint32_t schema = prof.u32("qaq.schema_version");
    if (schema < 1 || schema > QAQ_PROFILE_SCHEMA_VERSION) {
        throw profile_error(strfmt("%s: profile schema version %u, this build reads versions 1 to %d; upgrade qaq-gguf "
            "or recalibrate", prof.path.c_str(), schema, QAQ_PROFILE_SCHEMA_VERSION));
    }

    char arch[128] = {0};
    llama_model_meta_val_str(model, "general.architecture", arch, sizeof(arch));
    const std::string p_arch = prof.str("qaq.model.architecture");
    if (p_arch != arch) {
        throw profile_error(strfmt("%s was made for a %s model, but this model is %s", prof.path.c_str(), p_arch.c_str(), arch));
    }

    const int32_t n_layer = llama_model_n_layer_kv(model);
    const uint32_t p_n_layer = prof.u32("qaq.model.n_layer");
    if ((int32_t) p_n_layer != n_layer) {
        throw profile_error(strfmt("%s has %u layers, but this model has %d: the profile belongs to another model",
            prof.path.c_str(), p_n_layer, n_layer));
    }

    const auto n_head_kv = prof.ints("qaq.model.n_head_kv",  n_layer);
    const auto head_k    = prof.ints("qaq.model.head_dim_k", n_layer);
    const auto head_v    = prof.ints("qaq.model.head_dim_v", n_layer);
    for (int32_t il = 0; il < n_layer; ++il) {
        int32_t m_head_kv = 0, m_head_k = 0, m_head_v = 0;
        bool is_swa = false;
        if (!llama_model_layer_kv_shape(model, il, &m_head_kv, &m_head_k, &m_head_v, &is_swa)) {
            m_head_kv = m_head_k = m_head_v = 0;
        }
        if (n_head_kv[il] != m_head_kv || head_k[il] != m_head_k || head_v[il] != m_head_v) {
            throw profile_error(strfmt("%s: layer %d has %lld KV heads of size %lld/%lld in the profile but %d of size "
                "%d/%d in this model: the profile belongs to another model", prof.path.c_str(), il,
                (long long) n_head_kv[il], (long long) head_k[il], (long long) head_v[il], m_head_kv, m_head_k, m_head_v));
        }
    }

    if (model_path && *model_path) {
        char hex[QAQ_FINGERPRINT_HEX_LEN + 1];
        char err[512];
        if (qaq_model_fingerprint(model_path, hex, err, sizeof(err)) != 0) {
            throw profile_error(err);
        }
        const std::string p_fp = prof.str("qaq.model.fingerprint");
        if (p_fp != hex) {
            throw profile_error(strfmt("%s was calibrated for a model file with fingerprint %.12s, but %s has %.12s "
                "(same architecture and shape, different weights or quantization): recalibrate for this file",
                prof.path.c_str(), p_fp.c_str(), model_path, hex));
        }
    }

    const auto names_k = prof.strs("qaq.kv.type_k", n_layer);
    const auto names_v = prof.strs("qaq.kv.type_v", n_layer);
    std::vector<int32_t> types_k(n_layer, -1), types_v(n_layer, -1);
    std::set<std::pair<int, int>> pairs_seen;
    for (int32_t il = 0; il < n_layer; ++il) {
        if (head_k[il] == 0) {
            continue; // no KV cache in this layer
        }
        const ggml_type tk = type_from_name(names_k[il]);
        const ggml_type tv = type_from_name(names_v[il]);
        for (const auto & [t, name, head, what] : { std::tuple(tk, names_k[il], head_k[il], "K"), std::tuple(tv, names_v[il], head_v[il], "V") }) {
            if (t == GGML_TYPE_COUNT) {
                throw profile_error(strfmt("%s: layer %d: unknown %s cache type '%s' (known to this build: f32, f16, "
                    "bf16, q8_0, q5_1, q5_0, q4_1, q4_0, iq4_nl, qaq4l, qaq3, qaq3l, qaq2, qaq2l)", prof.path.c_str(), il, what, name.c_str()));
            }
            if (head % ggml_blck_size(t) != 0) {
                throw profile_error(strfmt("%s: layer %d: %s cache type %s has blocks of %lld values, which do not "
                    "divide this layer's head size %lld", prof.path.c_str(), il, what, name.c_str(),
                    (long long) ggml_blck_size(t), (long long) head));
            }
        }
        if (pairs_seen.insert({ (int) tk, (int) tv }).second) {
            check_backends(tk, tv, head_k[il], head_v[il], n_head_kv[il]);
        }
        types_k[il] = tk;
        types_v[il] = tv;
    }

    // optional per-layer K/V transforms (docs/profile-format.md): key means, key scales (schema 2), value means
    // (schema 2); each a float32 array of the layer's n_head_kv * head_dim values, layer after layer
    size_t n_k = 0, n_v = 0;
    for (int32_t il = 0; il < n_layer; ++il) {
        n_k += (size_t) (n_head_kv[il] * head_k[il]);
        n_v += (size_t) (n_head_kv[il] * head_v[il]);
    }
    const std::vector<float> k_mean  = prof.floats("qaq.kv.k_mean", n_k);
    const std::vector<float> k_scale = schema >= 2 ? prof.floats("qaq.kv.k_scale", n_k) : std::vector<float>();
    const std::vector<float> v_mean  = schema >= 2 ? prof.floats("qaq.kv.v_mean", n_v) : std::vector<float>();
    if (schema < 2 && (prof.find("qaq.kv.k_scale", false) >= 0 || prof.find("qaq.kv.v_mean", false) >= 0)) {
        throw profile_error(prof.path + ": qaq.kv.k_scale / qaq.kv.v_mean need schema version 2, the profile says 1 "
            "(a hand-edited profile?)");
    }
    for (const auto & [vec, key] : { std::pair(&k_mean, "qaq.kv.k_mean"), std::pair(&k_scale, "qaq.kv.k_scale"),
                                     std::pair(&v_mean, "qaq.kv.v_mean") }) {
        for (const float x : *vec) {
            if (!std::isfinite(x)) {
                throw profile_error(prof.path + ": " + key + " holds a non-finite value (a corrupt profile?)");
            }
        }
    }

    const auto clear = [&]() {
        llama_model_set_kv_layer_k_mean (model, -1, nullptr, 0);
        llama_model_set_kv_layer_k_scale(model, -1, nullptr, 0);
        llama_model_set_kv_layer_v_mean (model, -1, nullptr, 0);
    };
    clear();
    for (int32_t il = 0, off_k = 0, off_v = 0; il < n_layer; ++il) {
        const int32_t nk = (int32_t) (n_head_kv[il] * head_k[il]);
        const int32_t nv = (int32_t) (n_head_kv[il] * head_v[il]);
        if (nk > 0 && !k_mean.empty() && llama_model_set_kv_layer_k_mean(model, il, k_mean.data() + off_k, nk) != 0) {
            clear();
            throw profile_error(prof.path + ": the profile stores keys centred (qaq.kv.k_mean), which this model's "
                "attention does not allow (logit soft-capping, attention sinks or MLA): recalibrate with "
                "`qaq-gguf calibrate --no-center-keys`");
        }
        if (nk > 0 && !k_scale.empty() && llama_model_set_kv_layer_k_scale(model, il, k_scale.data() + off_k, nk) != 0) {
            clear();
            throw profile_error(strfmt("%s: qaq.kv.k_scale of layer %d is refused (each scale must lie in [1/256, 256] "
                "and the two dimensions RoPE rotates together must share one; MLA models take none): recalibrate",
                prof.path.c_str(), il));
        }
        if (nv > 0 && !v_mean.empty() && llama_model_set_kv_layer_v_mean(model, il, v_mean.data() + off_v, nv) != 0) {
            clear();
            throw profile_error(prof.path + ": the profile stores values centred (qaq.kv.v_mean), which this model's "
                "attention does not allow (attention sinks or MLA): recalibrate with `qaq-gguf calibrate --no-center-values`");
        }
        off_k += nk;
        off_v += nv;
    }

    if (llama_model_set_kv_layer_types(model, types_k.data(), types_v.data(), n_layer) != 0) {
        clear();
        throw profile_error("llama_model_set_kv_layer_types rejected the profile");
    }
}

} // namespace

int32_t qaq_model_apply_kv_profile(llama_model * model, const char * model_path, const char * profile_path,
                                   char * err, size_t err_size) {
    try {
        apply(model, model_path, profile_path);
        return 0;
    } catch (const std::exception & e) {
        if (err && err_size > 0) {
            snprintf(err, err_size, "%s", e.what());
        }
        return -1;
    }
}
