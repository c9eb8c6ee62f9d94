// libFuzzer target for the profile validator (native/qaq-profile-check.cpp) and ggml's GGUF reader under it.
//
// Build on request (clang with libFuzzer; Debian: apt-get install clang libclang-rt-dev):
//   cmake -B build-fuzz -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DQAQ_BUILD_FUZZ=ON ...
//   cmake --build build-fuzz --target qaq-fuzz-profile
//   build-fuzz/bin/qaq-fuzz-profile -max_total_time=600 corpus/      # corpus: tools/fuzz_corpus.py writes seeds
//
// Every input is written to a file (the validator reads files, as llama.cpp does) and checked against a fixed
// model shape (Gemma 3 270M's: 18 layers, one KV head of 256, NeoX RoPE). A profile_error is the expected outcome
// for almost every input; anything else (a crash, a sanitizer report, another exception) is a finding.
#include "qaq-profile-check.h"

#include <cstdint>
#include <cstdio>
#include <string>
#include <unistd.h>

static qaq::model_shape gemma_like() {
    qaq::model_shape s;
    s.arch = "gemma3";
    s.fingerprint = "";
    for (int il = 0; il < 18; ++il) {
        s.n_head_kv.push_back(1);
        s.head_k.push_back(256);
        s.head_v.push_back(256);
        s.n_rot.push_back(256);
    }
    s.rope = 1;
    return s;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    static const qaq::model_shape shape = gemma_like();
    static const std::string path = "/tmp/qaq-fuzz-" + std::to_string(getpid()) + ".gguf";
    FILE * f = fopen(path.c_str(), "wb");
    if (!f) {
        return 0;
    }
    fwrite(data, 1, size, f);
    fclose(f);
    try {
        qaq::check_profile(path, false, shape);
    } catch (const qaq::profile_error &) {
        // refused with a message: the expected outcome
    }
    return 0;
}
