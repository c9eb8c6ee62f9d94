// Apply a qaq KV profile to a loaded model: describe the model (qaq::model_shape), run the one validator
// (qaq-profile-check.cpp), check that every GPU present runs the profile's K/V pairs, and set the per-layer types
// and transforms. The same code serves Python (qaq_gguf.Llama), llama-server, llama-perplexity and llama-bench.
#include "qaq.h"
#include "qaq-profile-check.h"

#include "ggml.h"
#include "ggml-backend.h"
#include "llama.h"
#include "llama-impl.h"  // LLAMA_LOG_WARN

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace {

using qaq::profile_error;
using qaq::strfmt;

// does every RPC server in use know these cache types? A server built from a ggml without them refuses the first
// tensor of such a type and drops the connection, which the client treats as a crash: refuse the profile by name
void check_rpc_servers(ggml_type tk, ggml_type tv) {
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
        if (reg == nullptr || std::strcmp(ggml_backend_reg_name(reg), "RPC") != 0) {
            continue;
        }
        using supports_type_t = bool (*)(const char * endpoint, ggml_type type);
        auto supports_type = (supports_type_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_rpc_supports_type");
        for (ggml_type t : { tk, tv }) {
            if (supports_type == nullptr || !supports_type(ggml_backend_dev_description(dev), t)) {
                throw profile_error(strfmt("the RPC server %s (%s) cannot hold %s cache tensors: it runs a ggml "
                    "without qaq-gguf's cache types; run the rpc-server qaq-gguf ships there (`qaq-gguf rpc-server`), "
                    "or use ggml's own types for this profile", ggml_backend_dev_description(dev),
                    ggml_backend_dev_name(dev), ggml_type_name(t)));
            }
        }
    }
}

// does this device run flash attention with this K/V type pair and head sizes?
bool fa_supported(ggml_backend_dev_t dev, ggml_type tk, ggml_type tv, int64_t head_k, int64_t head_v, int64_t n_head_kv) {
    ggml_init_params params = { /*.mem_size =*/ 8*ggml_tensor_overhead(), /*.mem_buffer =*/ nullptr, /*.no_alloc =*/ true };
    ggml_context * ctx = ggml_init(params);
    const int64_t n_kv = 256;
    ggml_tensor * q    = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, head_k, 1, n_head_kv, 1);
    ggml_tensor * k    = ggml_new_tensor_4d(ctx, tk, head_k, n_kv, n_head_kv, 1);
    ggml_tensor * v    = ggml_new_tensor_4d(ctx, tv, head_v, n_kv, n_head_kv, 1);
    ggml_tensor * mask = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, n_kv, 1, 1, 1);
    ggml_tensor * fa   = ggml_flash_attn_ext(ctx, q, k, v, mask, 1.0f, 0.0f, 0.0f);
    const bool ok = ggml_backend_dev_supports_op(dev, fa);
    ggml_free(ctx);
    return ok;
}

// does every GPU device present run flash attention with this K/V type pair and head size?
void check_backends(ggml_type tk, ggml_type tv, int64_t head_k, int64_t head_v, int64_t n_head_kv) {
    check_rpc_servers(tk, tv);
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        if (ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_GPU) {
            continue;
        }
        if (!fa_supported(dev, tk, tv, head_k, head_v, n_head_kv)) {
            throw profile_error(strfmt("the K/V cache type pair %s/%s (head size %lld) has no flash-attention kernel "
                "on %s (%s); use types this backend supports (`qaq-gguf info` lists them) or rebuild with the pair "
                "enabled", ggml_type_name(tk), ggml_type_name(tv), (long long) head_k, ggml_backend_dev_name(dev),
                ggml_backend_dev_description(dev)));
        }
    }
}

// the model as the validator sees it
qaq::model_shape describe(const llama_model * model, const char * model_path) {
    qaq::model_shape shape;
    char arch[128] = {0};
    llama_model_meta_val_str(model, "general.architecture", arch, sizeof(arch));
    shape.arch = arch;
    if (model_path && *model_path) {
        char hex[QAQ_FINGERPRINT_HEX_LEN + 1];
        char err[512];
        if (qaq_model_fingerprint(model_path, hex, err, sizeof(err)) != 0) {
            throw profile_error(err);
        }
        shape.fingerprint = hex;
    }
    const int32_t n_layer = llama_model_n_layer_kv(model);
    const llama_rope_type rt = llama_model_rope_type(model);
    shape.rope = rt == LLAMA_ROPE_TYPE_NONE ? -1 : rt == LLAMA_ROPE_TYPE_NORM ? 0 : 1;
    char rot[64] = {0};
    const int64_t n_rot_meta = llama_model_meta_val_str(model, (shape.arch + ".rope.dimension_count").c_str(), rot,
                                                         sizeof(rot)) > 0 ? atoll(rot) : -1;
    for (int32_t il = 0; il < n_layer; ++il) {
        int32_t h = 0, k = 0, v = 0;
        bool is_swa = false;
        if (!llama_model_layer_kv_shape(model, il, &h, &k, &v, &is_swa)) {
            h = k = v = 0;
        }
        shape.n_head_kv.push_back(h);
        shape.head_k.push_back(k);
        shape.head_v.push_back(v);
        shape.n_rot.push_back(n_rot_meta >= 0 ? n_rot_meta : k);
    }
    // what decides which transforms are exact (llama_model_set_kv_layer_k_mean and friends refuse the same)
    const uint32_t flags = llama_model_kv_attn_flags(model);
    shape.logit_softcap = flags & LLAMA_KV_ATTN_SOFTCAP;
    shape.attn_sinks    = flags & LLAMA_KV_ATTN_SINKS;
    shape.mla           = flags & LLAMA_KV_ATTN_MLA;
    return shape;
}

qaq::profile_data check(const llama_model * model, const char * model_path, const char * profile_path) {
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
    const qaq::model_shape shape = describe(model, model_path);
    qaq::profile_data prof = qaq::check_profile(embedded ? model_path : profile_path, embedded, shape);
    std::set<std::pair<int, int>> pairs_seen;
    for (size_t il = 0; il < shape.n_layer(); ++il) {
        if (prof.types_k[il] < 0) {
            continue;
        }
        if (pairs_seen.insert({ prof.types_k[il], prof.types_v[il] }).second) {
            check_backends((ggml_type) prof.types_k[il], (ggml_type) prof.types_v[il], shape.head_k[il],
                           shape.head_v[il], shape.n_head_kv[il]);
        }
    }
    return prof;
}

void clear_transforms(llama_model * model) {
    llama_model_set_kv_layer_k_mean (model, -1, nullptr, 0);
    llama_model_set_kv_layer_k_scale(model, -1, nullptr, 0);
    llama_model_set_kv_layer_v_mean (model, -1, nullptr, 0);
    llama_model_set_kv_exact_cells  (model, 0);
}

void apply(llama_model * model, const char * model_path, const char * profile_path) {
    const qaq::profile_data prof = check(model, model_path, profile_path);
    for (const auto & w : prof.warnings) {
        LLAMA_LOG_WARN("qaq-gguf: %s\n", w.c_str());
    }
    const int32_t n_layer = (int32_t) prof.types_k.size();

    clear_transforms(model);
    for (int32_t il = 0, off_k = 0, off_v = 0; il < n_layer; ++il) {
        int32_t h = 0, k = 0, v = 0;
        bool is_swa = false;
        if (!llama_model_layer_kv_shape(model, il, &h, &k, &v, &is_swa)) {
            h = k = v = 0;
        }
        const int32_t nk = h*k, nv = h*v;
        const bool ok =
            (nk == 0 || prof.k_mean.empty()  || llama_model_set_kv_layer_k_mean (model, il, prof.k_mean.data()  + off_k, nk) == 0) &&
            (nk == 0 || prof.k_scale.empty() || llama_model_set_kv_layer_k_scale(model, il, prof.k_scale.data() + off_k, nk) == 0) &&
            (nv == 0 || prof.v_mean.empty()  || llama_model_set_kv_layer_v_mean (model, il, prof.v_mean.data()  + off_v, nv) == 0);
        if (!ok) {
            clear_transforms(model);
            throw profile_error(strfmt("%s: llama.cpp refused the K/V transforms of layer %d", prof.path.c_str(), il));
        }
        off_k += nk;
        off_v += nv;
    }

    if (llama_model_set_kv_exact_cells(model, prof.exact_cells) != 0) {
        clear_transforms(model);
        throw profile_error(strfmt("%s: llama.cpp refused %u exact KV cells", prof.path.c_str(), prof.exact_cells));
    }

    if (llama_model_set_kv_layer_types(model, prof.types_k.data(), prof.types_v.data(), n_layer) != 0) {
        clear_transforms(model);
        throw profile_error("llama_model_set_kv_layer_types rejected the profile");
    }
}

int32_t report(const std::exception & e, char * err, size_t err_size) {
    if (err && err_size > 0) {
        snprintf(err, err_size, "%s", e.what());
    }
    return -1;
}

} // namespace

int32_t qaq_model_apply_kv_profile(llama_model * model, const char * model_path, const char * profile_path,
                                   char * err, size_t err_size) {
    try {
        apply(model, model_path, profile_path);
        return 0;
    } catch (const std::exception & e) {
        return report(e, err, err_size);
    }
}

void qaq_model_clear_kv_profile(llama_model * model) {
    if (model) {
        clear_transforms(model);
        llama_model_set_kv_layer_types(model, nullptr, nullptr, 0);
    }
}

int32_t qaq_model_apply_default_kv_profile(llama_model * model, const char * model_path, char * err,
                                           size_t err_size) {
    try {
        const char * env = getenv("QAQ_KV_PROFILE");
        const std::string choice = env ? env : "";
        if (choice == "none" || choice == "off" || choice == "0") {
            return 0;
        }
        if (!model_path || !*model_path) {
            return 0;
        }
        std::string source = "embedded";
        if (!choice.empty() && choice != "embedded") {
            source = choice;
            // a profile named for the whole process applies to the model it was made for (a draft model is another)
            const qaq::model_shape shape = describe(model, model_path);
            if (qaq::profile_fingerprint(source) != shape.fingerprint) {
                LLAMA_LOG_WARN("qaq-gguf: QAQ_KV_PROFILE=%s was made for another model file, not applied to %s\n",
                        source.c_str(), model_path);
                return 0;
            }
        } else {
            char v[32];
            if (llama_model_meta_val_str(model, "qaq.schema_version", v, sizeof(v)) < 0) {
                return 0; // the model file carries no profile
            }
        }
        apply(model, model_path, source.c_str());
        llama_model_set_kv_layer_types_yield(model, true);
        const std::string origin = source == "embedded" ? "embedded in the model" : "from QAQ_KV_PROFILE=" + source;
        llama_model_set_kv_layer_types_origin(model, origin.c_str());
        int n_q = 0, n_l = 0;
        for (int32_t il = 0; il < llama_model_n_layer_kv(model); ++il) {
            n_l += llama_model_kv_layer_type(model, il, false) >= 0;
            n_q += llama_model_kv_layer_type(model, il, false) >= 0 &&
                   ggml_is_quantized((ggml_type) llama_model_kv_layer_type(model, il, false));
        }
        LLAMA_LOG_INFO("qaq-gguf: KV cache profile %s applied to %s (%d of %d layers quantized K; QAQ_KV_PROFILE=none "
                "turns it off)\n", origin.c_str(), model_path, n_q, n_l);
        return 0;
    } catch (const std::exception & e) {
        return report(e, err, err_size);
    }
}

int32_t qaq_profile_check(const llama_model * model, const char * model_path, const char * profile_path,
                          char * err, size_t err_size) {
    try {
        check(model, model_path, profile_path);
        return 0;
    } catch (const std::exception & e) {
        return report(e, err, err_size);
    }
}

int32_t qaq_device_supports_kv_types(size_t dev_index, int32_t type_k, int32_t type_v, int64_t head_k, int64_t head_v) {
    if (dev_index >= ggml_backend_dev_count() || type_k < 0 || type_k >= GGML_TYPE_COUNT || type_v < 0 ||
        type_v >= GGML_TYPE_COUNT || head_k <= 0 || head_v <= 0) {
        return -1;
    }
    return fa_supported(ggml_backend_dev_get(dev_index), (ggml_type) type_k, (ggml_type) type_v, head_k, head_v, 1)
        ? 1 : 0;
}
