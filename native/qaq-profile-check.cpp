// The profile validator (qaq-profile-check.h): every key of a qaq KV profile read through ggml's gguf API and
// checked against the model's shape. Messages name the file, the key and the problem, and say what to do.
#include "qaq-profile-check.h"
#include "qaq.h"  // QAQ_PROFILE_SCHEMA_VERSION

#include "gguf.h"

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <set>
#include <tuple>

namespace qaq {

std::string strfmt(const char * fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    return buf;
}

namespace {

// a string read from the profile, for a message: at most 48 characters, control characters replaced
std::string clip(const std::string & v) {
    std::string out;
    for (size_t i = 0; i < v.size() && out.size() < 48; ++i) {
        const unsigned char c = (unsigned char) v[i];
        out += c < 0x20 || c == 0x7f ? '?' : (char) c;
    }
    return v.size() > 48 ? "'" + out + "...' (" + std::to_string(v.size()) + " bytes)" : "'" + out + "'";
}

// the documented cache types, finest first (qaq_gguf/cachetypes.py holds the same list)
const ggml_type CACHE_TYPES[] = {
    GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0, GGML_TYPE_Q5_1, GGML_TYPE_Q5_0, GGML_TYPE_Q4_1,
    GGML_TYPE_Q4_0, GGML_TYPE_IQ4_NL, GGML_TYPE_QAQ4H, GGML_TYPE_QAQ4L, GGML_TYPE_QAQ3, GGML_TYPE_QAQ3H, GGML_TYPE_TCQ3,
    GGML_TYPE_QAQ3L, GGML_TYPE_QAQ2, GGML_TYPE_QAQ2H, GGML_TYPE_TCQ2, GGML_TYPE_QAQ2L,
};

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
    gguf_file(const gguf_file &) = delete;
    gguf_file & operator=(const gguf_file &) = delete;

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
            case GGUF_TYPE_INT32: {
                const int32_t v = gguf_get_val_i32(ctx, id);
                if (v < 0) {
                    throw profile_error(strfmt("%s: key %s is negative (%d)", path.c_str(), key, v));
                }
                return (uint32_t) v;
            }
            default: throw profile_error(strfmt("%s: key %s must be an unsigned integer", path.c_str(), key));
        }
    }

    void check_len(const char * key, size_t got, size_t n, const char * what) const {
        if (got != n) {
            throw profile_error(strfmt("%s: key %s has %zu entries, expected %zu (%s)", path.c_str(), key, got, n, what));
        }
    }

    std::vector<std::string> strs(const char * key, size_t n) const {
        const int64_t id = find(key, true);
        if (gguf_get_kv_type(ctx, id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(ctx, id) != GGUF_TYPE_STRING) {
            throw profile_error(strfmt("%s: key %s must be an array of strings", path.c_str(), key));
        }
        check_len(key, gguf_get_arr_n(ctx, id), n, "one per layer");
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
        check_len(key, gguf_get_arr_n(ctx, id), n, "one per layer");
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

    // an optional float32 array of exactly n finite values within [lo, hi]; empty when the key is absent
    std::vector<float> floats(const char * key, size_t n, float lo, float hi, const char * limit) const {
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
        std::vector<float> res(data, data + n);
        for (size_t i = 0; i < n; ++i) {
            if (!std::isfinite(res[i])) {
                throw profile_error(strfmt("%s: key %s holds a non-finite value at %zu (a corrupt profile?)",
                    path.c_str(), key, i));
            }
            if (!(res[i] >= lo && res[i] <= hi)) {
                throw profile_error(strfmt("%s: key %s holds %g at %zu, outside %s", path.c_str(), key,
                    (double) res[i], i, limit));
            }
        }
        return res;
    }
};

bool known_key(const std::string & k) {
    static const std::set<std::string> keys = {
        "qaq.schema_version", "qaq.model.architecture", "qaq.model.name", "qaq.model.n_layer", "qaq.model.n_head_kv",
        "qaq.model.head_dim_k", "qaq.model.head_dim_v", "qaq.model.is_swa", "qaq.model.n_swa", "qaq.model.fingerprint",
        "qaq.kv.type_k", "qaq.kv.type_v", "qaq.kv.k_mean", "qaq.kv.k_scale", "qaq.kv.v_mean", "qaq.kv.exact_cells",
        "qaq.stats.candidates",
        "qaq.stats.score_k", "qaq.stats.score_v", "qaq.stats.k_mean", "qaq.stats.v_mean", "qaq.stats.k_first",
        "qaq.stats.v_first", "qaq.stats.gain_k", "qaq.stats.gain_v",
    };
    return keys.count(k) || k.rfind("qaq.provenance.", 0) == 0;
}

} // namespace

ggml_type cache_type_from_name(const std::string & name) {
    for (const ggml_type t : CACHE_TYPES) {
        if (name == ggml_type_name(t)) {
            return t;
        }
    }
    return GGML_TYPE_COUNT;
}

std::string cache_type_names() {
    std::string res;
    for (const ggml_type t : CACHE_TYPES) {
        res += (res.empty() ? "" : ", ") + std::string(ggml_type_name(t));
    }
    return res;
}

std::string profile_fingerprint(const std::string & path) {
    const gguf_file prof(path);
    const int64_t id = prof.find("qaq.model.fingerprint", false);
    return id >= 0 && gguf_get_kv_type(prof.ctx, id) == GGUF_TYPE_STRING ? gguf_get_val_str(prof.ctx, id) : "";
}

profile_data check_profile(const std::string & path, bool embedded, const model_shape & shape) {
    const gguf_file prof(path);
    profile_data res;
    res.path = path;

    if (prof.find("qaq.schema_version", false) < 0) {
        throw profile_error(embedded
            ? path + " has no embedded qaq profile (embed one with `qaq-gguf profile embed`)"
            : path + " is a GGUF file but not a qaq KV profile (no qaq.schema_version key)");
    }
    res.schema = prof.u32("qaq.schema_version");
    if (res.schema < 1 || res.schema > QAQ_PROFILE_SCHEMA_VERSION) {
        throw profile_error(strfmt("%s: profile schema version %u, this build reads versions 1 to %d; upgrade qaq-gguf "
            "or recalibrate", path.c_str(), res.schema, QAQ_PROFILE_SCHEMA_VERSION));
    }

    const std::string p_arch = prof.str("qaq.model.architecture");
    if (p_arch != shape.arch) {
        throw profile_error(strfmt("%s: qaq.model.architecture is %s, but this model is %s: the profile belongs to "
            "another model", path.c_str(), clip(p_arch).c_str(), shape.arch.c_str()));
    }

    const size_t n_layer = shape.n_layer();
    const uint32_t p_n_layer = prof.u32("qaq.model.n_layer");
    if (p_n_layer != n_layer) {
        throw profile_error(strfmt("%s has %u layers, but this model has %zu: the profile belongs to another model",
            path.c_str(), p_n_layer, n_layer));
    }

    const auto n_head_kv = prof.ints("qaq.model.n_head_kv",  n_layer);
    const auto head_k    = prof.ints("qaq.model.head_dim_k", n_layer);
    const auto head_v    = prof.ints("qaq.model.head_dim_v", n_layer);
    for (size_t il = 0; il < n_layer; ++il) {
        if (n_head_kv[il] != shape.n_head_kv[il] || head_k[il] != shape.head_k[il] || head_v[il] != shape.head_v[il]) {
            throw profile_error(strfmt("%s: layer %zu has %lld KV heads of size %lld/%lld in the profile but %lld of "
                "size %lld/%lld in this model: the profile belongs to another model", path.c_str(), il,
                (long long) n_head_kv[il], (long long) head_k[il], (long long) head_v[il],
                (long long) shape.n_head_kv[il], (long long) shape.head_k[il], (long long) shape.head_v[il]));
        }
    }

    if (!shape.fingerprint.empty()) {
        const std::string p_fp = prof.str("qaq.model.fingerprint");
        if (p_fp != shape.fingerprint) {
            throw profile_error(strfmt("%s: qaq.model.fingerprint is %s, but this model file's is %.12s... (same "
                "architecture and shape, different weights or quantization): recalibrate for this file",
                path.c_str(), clip(p_fp).c_str(), shape.fingerprint.c_str()));
        }
    }

    const auto names_k = prof.strs("qaq.kv.type_k", n_layer);
    const auto names_v = prof.strs("qaq.kv.type_v", n_layer);
    res.types_k.assign(n_layer, -1);
    res.types_v.assign(n_layer, -1);
    for (size_t il = 0; il < n_layer; ++il) {
        if (shape.head_k[il] == 0) {
            continue; // no KV cache in this layer: its entries are not read
        }
        for (const auto & [name, head, what, dst] : { std::tuple(names_k[il], shape.head_k[il], "K", &res.types_k),
                                                      std::tuple(names_v[il], shape.head_v[il], "V", &res.types_v) }) {
            const ggml_type t = cache_type_from_name(name);
            if (t == GGML_TYPE_COUNT) {
                throw profile_error(strfmt("%s: layer %zu: %s is not a KV cache type (%s cache; the cache types are: "
                    "%s)", path.c_str(), il, clip(name).c_str(), what, cache_type_names().c_str()));
            }
            if (head % ggml_blck_size(t) != 0) {
                throw profile_error(strfmt("%s: layer %zu: %s cache type %s has blocks of %lld values, which do not "
                    "divide this layer's head size %lld", path.c_str(), il, what, clip(name).c_str(),
                    (long long) ggml_blck_size(t), (long long) head));
            }
            (*dst)[il] = t;
        }
    }

    size_t n_k = 0, n_v = 0;
    for (size_t il = 0; il < n_layer; ++il) {
        n_k += (size_t) (shape.n_head_kv[il] * shape.head_k[il]);
        n_v += (size_t) (shape.n_head_kv[il] * shape.head_v[il]);
    }
    if (res.schema < 2 && (prof.find("qaq.kv.k_scale", false) >= 0 || prof.find("qaq.kv.v_mean", false) >= 0)) {
        throw profile_error(path + ": qaq.kv.k_scale / qaq.kv.v_mean need schema version 2, the profile says 1 "
            "(a hand-edited profile?)");
    }
    const std::string mean_limit = strfmt("[-%g, %g] (the cache stores x - mean)", (double) MEAN_LIMIT, (double) MEAN_LIMIT);
    const std::string scale_limit = strfmt("[1/%g, %g]", (double) (1.0f/SCALE_MIN), (double) SCALE_MAX);
    res.k_mean  = prof.floats("qaq.kv.k_mean",  n_k, -MEAN_LIMIT, MEAN_LIMIT, mean_limit.c_str());
    res.k_scale = prof.floats("qaq.kv.k_scale", n_k, SCALE_MIN, SCALE_MAX, scale_limit.c_str());
    res.v_mean  = prof.floats("qaq.kv.v_mean",  n_v, -MEAN_LIMIT, MEAN_LIMIT, mean_limit.c_str());

    if (!res.k_mean.empty() && (shape.logit_softcap || shape.attn_sinks || shape.mla)) {
        throw profile_error(path + ": the profile stores keys centred (qaq.kv.k_mean), which this model's attention "
            "does not allow (logit soft-capping, attention sinks or MLA): recalibrate with "
            "`qaq-gguf calibrate --no-center-keys`");
    }
    if (!res.v_mean.empty() && (shape.attn_sinks || shape.mla)) {
        throw profile_error(path + ": the profile stores values centred (qaq.kv.v_mean), which this model's attention "
            "does not allow (attention sinks or MLA): recalibrate with `qaq-gguf calibrate --no-center-values`");
    }
    if (!res.k_scale.empty() && shape.mla) {
        throw profile_error(path + ": the profile rebalances keys (qaq.kv.k_scale), which MLA models cannot take: "
            "recalibrate with `qaq-gguf calibrate --no-rebalance-keys`");
    }
    // a key scale must be one value per RoPE pair, or it would not commute with RoPE and K-shift
    for (size_t il = 0, off = 0; il < n_layer && !res.k_scale.empty(); ++il) {
        const int64_t head = shape.head_k[il];
        const int64_t n_rot = shape.rope < 0 ? 0 : std::min<int64_t>(shape.n_rot[il], head);
        for (int64_t h = 0; h < shape.n_head_kv[il]; ++h) {
            for (int64_t j = 0; j < n_rot/2; ++j) {
                const int64_t a = shape.rope == 0 ? 2*j : j;
                const int64_t b = shape.rope == 0 ? 2*j + 1 : j + n_rot/2;
                if (res.k_scale[off + h*head + a] != res.k_scale[off + h*head + b]) {
                    throw profile_error(strfmt("%s: qaq.kv.k_scale of layer %zu: dimensions %lld and %lld are rotated "
                        "together by RoPE but have different scales (a hand-edited profile?)", path.c_str(), il,
                        (long long) (h*head + a), (long long) (h*head + b)));
                }
            }
        }
        off += (size_t) (shape.n_head_kv[il] * head);
    }

    // exact cells: the first KV cells kept in f16 (schema 3)
    if (prof.find("qaq.kv.exact_cells", false) >= 0) {
        if (res.schema < 3) {
            throw profile_error(strfmt("%s: qaq.kv.exact_cells needs schema version 3, the profile says %u "
                "(a hand-edited profile?)", path.c_str(), res.schema));
        }
        res.exact_cells = prof.u32("qaq.kv.exact_cells");
        if (res.exact_cells < 1 || res.exact_cells > EXACT_CELLS_MAX) {
            throw profile_error(strfmt("%s: qaq.kv.exact_cells is %u, outside [1, %u]", path.c_str(), res.exact_cells,
                EXACT_CELLS_MAX));
        }
        if (shape.mla) {
            throw profile_error(path + ": the profile keeps the first KV cells exact (qaq.kv.exact_cells), which MLA "
                "models cannot take: recalibrate with `qaq-gguf calibrate --exact-cells 0`");
        }
    }

    // the statistics are read by qaq-gguf's Python side only; untrusted all the same
    const std::string any = "any finite value";
    prof.floats("qaq.stats.k_mean",  n_k, -INFINITY, INFINITY, any.c_str());
    prof.floats("qaq.stats.k_first", n_k, -INFINITY, INFINITY, any.c_str());
    prof.floats("qaq.stats.v_mean",  n_v, -INFINITY, INFINITY, any.c_str());
    prof.floats("qaq.stats.v_first", n_v, -INFINITY, INFINITY, any.c_str());
    const std::string gain_limit = strfmt("[0, %g]", (double) GAIN_LIMIT);
    prof.floats("qaq.stats.gain_k", n_layer, 0.0f, GAIN_LIMIT, gain_limit.c_str());
    prof.floats("qaq.stats.gain_v", n_layer, 0.0f, GAIN_LIMIT, gain_limit.c_str());

    for (int64_t i = 0; i < gguf_get_n_kv(prof.ctx); ++i) {
        const std::string key = gguf_get_key(prof.ctx, i);
        if (key.rfind("qaq.", 0) == 0 && !known_key(key)) {
            res.warnings.push_back(strfmt("%s: unknown key %s ignored (made by a newer qaq-gguf?)", path.c_str(),
                clip(key).c_str()));
        }
    }
    return res;
}

} // namespace qaq
