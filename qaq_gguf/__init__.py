"""qaq-gguf: a quality-adaptive, mixed-precision KV cache for llama.cpp.

Importing this package points llama-cpp-python at qaq-gguf's patched llama.cpp build (it must be imported before
`llama_cpp`). Then `qaq_gguf.Llama(model_path, kv_profile="qaq.gguf")` runs a model with a per-layer K/V cache map.
"""
from __future__ import annotations

__version__ = "0.1.0"

from ._native import LibraryError, bind as _bind

LIB_DIR = _bind()


def __getattr__(name: str):
    # heavy imports (llama_cpp, numpy) only when used
    if name in ("Llama", "ProfileError", "kv_layer_info"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'qaq_gguf' has no attribute {name!r}")


__all__ = ["Llama", "ProfileError", "LibraryError", "LIB_DIR", "kv_layer_info", "__version__"]
