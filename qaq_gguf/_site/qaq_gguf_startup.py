"""Run at interpreter start by qaq_gguf.pth (both installed into site-packages by qaq-gguf's wheel).

llama-cpp-python is installed as bindings only (its own libllama is not built) and reads LLAMA_CPP_LIB_PATH when
`llama_cpp` is first imported. Setting it here, when it is unset, makes `import llama_cpp` find qaq-gguf's libllama
in any import order: apps built on llama-cpp-python (LangChain, LlamaIndex, `python -m llama_cpp.server`) need no
`import qaq_gguf` first. QAQ_GGUF_LIB_DIR, when set, is the folder used (a development build). Never raises.
"""
import os
import sys


def _point_bindings() -> None:
    if os.environ.get("LLAMA_CPP_LIB_PATH"):
        return
    name = {"darwin": "libllama.dylib", "win32": "llama.dll"}.get(sys.platform, "libllama.so")
    d = os.environ.get("QAQ_GGUF_LIB_DIR") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "qaq_gguf",
                                                           "lib")
    if os.path.isfile(os.path.join(d, name)):
        os.environ["LLAMA_CPP_LIB_PATH"] = os.path.realpath(d)


try:
    _point_bindings()
except Exception:  # a startup hook must never break the interpreter
    pass
