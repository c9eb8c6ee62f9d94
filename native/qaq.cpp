// qaq-gguf library identity.
#include "qaq.h"

#ifndef QAQ_VERSION
#define QAQ_VERSION "unknown"
#endif
#ifndef QAQ_LLAMA_COMMIT
#define QAQ_LLAMA_COMMIT "unknown"
#endif

const char * qaq_version(void) {
    return QAQ_VERSION;
}

const char * qaq_llama_commit(void) {
    return QAQ_LLAMA_COMMIT;
}
