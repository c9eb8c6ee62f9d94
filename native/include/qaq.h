// qaq-gguf C API: per-layer KV cache profiles for llama.cpp.
//
// A profile is a GGUF file of metadata only (keys under `qaq.`, see docs/profile-format.md) that maps each layer
// of one model to a K and a V cache type. It is bound to that model by its architecture, per-layer K/V shapes and
// a fingerprint of the model file's tensor layout.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct llama_model;

#define QAQ_PROFILE_SCHEMA_VERSION 3  // the newest version read (1 to 3 are)
#define QAQ_FINGERPRINT_HEX_LEN    64

// The qaq-gguf version this library was built from ("0.1.0"); also proves libllama is the qaq-gguf build.
const char * qaq_version(void);

// The llama.cpp commit the library was built from.
const char * qaq_llama_commit(void);

// Fingerprint of a GGUF model file: sha256 over its architecture, general.name and every tensor's name, type and
// shape, in file order (other metadata is left out, so a copy with an embedded profile keeps the fingerprint).
// out_hex receives QAQ_FINGERPRINT_HEX_LEN hex digits and a NUL. Returns 0, or -1 with a message in err.
int32_t qaq_model_fingerprint(const char * model_path, char * out_hex, char * err, size_t err_size);

// Validate the profile at profile_path against model (loaded from model_path) and the backends present, then set
// the model's per-layer K/V cache types for every context created from it afterwards.
// profile_path may be "embedded": the profile is then read from the model file itself.
// Returns 0; or -1, leaves the model unchanged and writes a message that names the problem into err.
int32_t qaq_model_apply_kv_profile(struct llama_model * model, const char * model_path, const char * profile_path,
                                   char * err, size_t err_size);

// Remove every per-layer cache type and K/V transform a profile set on the model (contexts created afterwards use
// their own type_k/type_v).
void qaq_model_clear_kv_profile(struct llama_model * model);

// The profile a model gets without being asked (llama_model_load_from_file calls this): the one embedded in the model
// file, if it carries one; or, with the environment variable QAQ_KV_PROFILE set to a profile path, that profile for
// the model it was made for; none with QAQ_KV_PROFILE=none. A profile applied this way yields to a context's explicit
// type_k/type_v (with a warning). Returns 0 (applied, or nothing to apply), or -1 with a message in err: an invalid
// embedded profile is refused, never skipped.
int32_t qaq_model_apply_default_kv_profile(struct llama_model * model, const char * model_path, char * err,
                                           size_t err_size);

// Run every check of qaq_model_apply_kv_profile (the profile's keys, types, transforms and limits against the model,
// and the backends present) without changing the model. Returns 0, or -1 with a message in err.
int32_t qaq_profile_check(const struct llama_model * model, const char * model_path, const char * profile_path,
                          char * err, size_t err_size);

// Does backend device dev_index (ggml_backend_dev_get's numbering) run flash attention with K cache type type_k and
// V cache type type_v (ggml_type values) at these head sizes? 1 yes, 0 no, -1 for a device index out of range. The
// same question qaq_model_apply_kv_profile asks every GPU present of each K/V pair a profile uses.
int32_t qaq_device_supports_kv_types(size_t dev_index, int32_t type_k, int32_t type_v, int64_t head_k, int64_t head_v);

#ifdef __cplusplus
}
#endif
