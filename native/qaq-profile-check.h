// The profile validator: everything a qaq KV profile must satisfy before any of it reaches llama.cpp, checked
// against a description of the model (docs/profile-format.md, "Checks"). A profile is untrusted input: a file users
// download and share. This part needs only ggml and gguf (no llama_model), so the fuzz target links it alone.
#pragma once

#include "ggml.h"

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace qaq {

struct profile_error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// what a profile is checked against, from the loaded model (qaq-profile.cpp) or a fixed description (fuzzing)
struct model_shape {
    std::string arch;
    std::string fingerprint;          // empty: not checked (the caller has no model file)
    std::vector<int64_t> n_head_kv;   // per layer; 0 for a layer without its own KV cache
    std::vector<int64_t> head_k;
    std::vector<int64_t> head_v;
    int rope = -1;                    // -1 no RoPE, 0 pairs (2i, 2i+1), 1 NeoX pairs (i, i + n_rot/2)
    std::vector<int64_t> n_rot;       // per layer, dimensions RoPE rotates
    bool logit_softcap = false;       // attention is not invariant to a constant logit shift
    bool attn_sinks    = false;       // ... and its weights do not sum to one
    bool mla           = false;

    size_t n_layer() const { return n_head_kv.size(); }
};

// a profile that passed every check
struct profile_data {
    std::string path;
    uint32_t schema = 0;
    std::vector<int32_t> types_k, types_v;      // ggml types; -1 for a layer without KV cache
    std::vector<float> k_mean, k_scale, v_mean;  // empty when absent; else one value per cached dimension
    uint32_t exact_cells = 0;                    // the first KV cells kept exact (qaq.kv.exact_cells, schema 3); 0: none
    std::vector<std::string> warnings;           // unknown qaq.* keys
};

// The cache types a profile may name (docs/profile-format.md): what llama.cpp's -ctk/-ctv accept plus qaq-gguf's
// own. GGML_TYPE_COUNT for any other name.
ggml_type cache_type_from_name(const std::string & name);
std::string cache_type_names();  // "f32, f16, ..." for messages
std::string strfmt(const char * fmt, ...);  // printf into a std::string (messages: at most 1023 characters)

// Read the profile at path (a profile file, or a model file carrying one when embedded) and check it against
// shape; throws profile_error with a message that names the key or the problem.
profile_data check_profile(const std::string & path, bool embedded, const model_shape & shape);

// The model fingerprint a profile file names (qaq.model.fingerprint), "" when it names none; profile_error for a file
// that is not a readable GGUF.
std::string profile_fingerprint(const std::string & path);

// Documented limits on the numeric arrays.
constexpr float MEAN_LIMIT = 65504.0f;       // |k_mean|, |v_mean|: the cache stores k - mean (an f16 range)
constexpr float SCALE_MIN  = 1.0f/256.0f;    // k_scale
constexpr float SCALE_MAX  = 256.0f;
constexpr float GAIN_LIMIT = 1e6f;           // qaq.stats.gain_k / gain_v (one per layer): [0, GAIN_LIMIT]
constexpr uint32_t EXACT_CELLS_MAX = 1024;   // qaq.kv.exact_cells (LLAMA_KV_EXACT_CELLS_MAX)

} // namespace qaq
