"""The llama.cpp binding helpers: llama-cpp-python's low-level module bound to our library, its pointers as our
cffi handles and back, a model's metadata and tokens, a hyperparameters-only load, llama.cpp's log silenced.

profile.py (a model's identity) and runtime.py (the `Llama` with a profile) both build on these; this module
imports neither.
"""
from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path
from typing import Iterator

from . import _native
from .errors import ProfileError


def llama_cpp_module():
    """The low-level llama_cpp bindings module, bound to our library (importing qaq_gguf did the binding)."""
    import llama_cpp

    return llama_cpp


def as_cffi(ptr):
    """A ctypes pointer (llama-cpp-python's handles) as a cffi void* for our C functions."""
    ffi, _ = _native.ffi_lib()
    addr = ctypes.cast(ptr, ctypes.c_void_p).value
    if not addr:
        raise ValueError("null pointer")
    return ffi.cast("void *", addr)


def as_ctypes_model(ptr):
    ffi, _ = _native.ffi_lib()
    return ctypes.c_void_p(int(ffi.cast("uintptr_t", ptr)))


def model_meta(model, key: str) -> str:
    """A string metadata value of a loaded model (cffi pointer), or '' when absent."""
    lc = llama_cpp_module()
    buf = ctypes.create_string_buffer(512)
    n = lc.llama_model_meta_val_str(as_ctypes_model(model), key.encode(), buf, len(buf))
    return buf.value.decode(errors="replace") if n >= 0 else ""


@contextlib.contextmanager
def quiet_llama_log(verbose: bool = False) -> Iterator[list[str]]:
    """Silence llama.cpp's log for the duration (unless verbose); yields the error lines it logged meanwhile,
    and puts the previous log callback back at the end."""
    lc = llama_cpp_module()
    errors: list[str] = []
    if verbose:
        yield errors
        return

    @lc.llama_log_callback
    def keep_errors(level, text, user_data):  # noqa: ARG001 - llama.cpp's callback signature
        if level == 4:  # GGML_LOG_LEVEL_ERROR (ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4)
            errors.append(text.decode("utf-8", errors="replace").rstrip())

    old_cb, old_ud = lc.llama_log_callback(), ctypes.c_void_p()
    lc.llama_log_get(ctypes.byref(old_cb), ctypes.byref(old_ud))
    lc.llama_log_set(keep_errors, None)
    try:
        yield errors
    finally:
        lc.llama_log_set(old_cb, old_ud)
        del keep_errors  # only after llama.cpp no longer points at it


def tokenize(model, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
    """Tokens of `text` for a loaded model (ctypes pointer). add_special: the vocabulary's BOS/EOS as it adds them;
    parse_special: text such as "<unk>" becomes the special token rather than characters."""
    lc = llama_cpp_module()
    vocab = lc.llama_model_get_vocab(model)
    data = text.encode("utf-8")
    n_max = len(data) + 8
    for _ in range(2):
        buf = (lc.llama_token * n_max)()
        n = lc.llama_tokenize(vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n >= 0:
            return list(buf[:n])
        n_max = -n
    raise RuntimeError("llama_tokenize failed")


@contextlib.contextmanager
def vocab_only_model(path: str | Path) -> Iterator[tuple]:
    """Load a model's hyperparameters and tensor metadata, no weight data; yields (model, lib, ffi)."""
    lc = llama_cpp_module()
    ffi, lib = _native.ffi_lib()
    if not Path(path).is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    params = lc.llama_model_default_params()
    params.no_alloc = True  # hyperparameters and tensor metadata, no weight data (as llama.cpp's -fit does)
    params.load_mode = 0    # LLAMA_LOAD_MODE_NONE
    params.n_gpu_layers = 0
    lc.llama_backend_init()
    with quiet_llama_log():
        model = lc.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ProfileError(f"llama.cpp could not load {path} (is it a GGUF model?)")
    try:
        yield as_cffi(model), lib, ffi
    finally:
        lc.llama_model_free(model)
