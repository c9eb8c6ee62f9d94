"""Find qaq-gguf's patched llama.cpp build and point llama-cpp-python's bindings at it.

`import qaq_gguf` calls `bind()` before anything imports `llama_cpp`: the bindings read LLAMA_CPP_LIB_PATH when
they are first imported, so the order matters. The C functions qaq-gguf adds (per-layer KV types, profiles) are
called through cffi on the same library file.
"""
from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path

LIB_NAMES = {"linux": "libllama.so", "darwin": "libllama.dylib", "win32": "llama.dll"}


class LibraryError(RuntimeError):
    """The patched llama.cpp library is missing, or another libllama was loaded first."""


def _lib_file_name() -> str:
    return LIB_NAMES.get(sys.platform, "libllama.so")


def lib_dir() -> Path:
    """The folder holding our libllama and libggml*: $QAQ_GGUF_LIB_DIR, else the installed package's lib/."""
    env = os.environ.get("QAQ_GGUF_LIB_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parent / "lib")
    try:  # an editable install, or tests run from a source checkout: the wheel's files sit in site-packages
        from importlib.metadata import distribution

        candidates.append(Path(str(distribution("qaq-gguf").locate_file("qaq_gguf/lib"))))
    except Exception:
        pass
    for c in candidates:
        if (c / _lib_file_name()).is_file():
            return c.resolve()
    raise LibraryError(
        "qaq-gguf's llama.cpp library was not found (looked in: " + ", ".join(str(c) for c in candidates) + "). "
        "Install the package with pip so that its build runs (see README.md), or set QAQ_GGUF_LIB_DIR to a folder "
        f"that holds {_lib_file_name()} built from qaq-gguf.")


def bin_dir() -> Path:
    """The folder of the bundled llama-server, llama-perplexity and llama-bench."""
    return lib_dir().parent / "bin"


def bind() -> Path:
    """Make llama-cpp-python load our libllama; fail clearly if it has already loaded another one."""
    d = lib_dir()
    loaded = sys.modules.get("llama_cpp.llama_cpp")
    if loaded is not None:
        lib = getattr(loaded, "_lib", None)
        path = Path(getattr(lib, "_name", "") or "")
        if path.resolve().parent != d:
            raise LibraryError(
                f"llama_cpp was imported before qaq_gguf and loaded {path or 'another libllama'}, not qaq-gguf's "
                f"patched build in {d}. Import qaq_gguf first (before llama_cpp), or set LLAMA_CPP_LIB_PATH={d} "
                "before starting Python.")
        return d
    current = os.environ.get("LLAMA_CPP_LIB_PATH")
    if current and Path(current).resolve() != d:
        raise LibraryError(
            f"LLAMA_CPP_LIB_PATH={current} points at another llama.cpp build; qaq-gguf needs its own ({d}). "
            "Unset LLAMA_CPP_LIB_PATH or point it there.")
    os.environ["LLAMA_CPP_LIB_PATH"] = str(d)
    return d


_CDEF = """
const char * qaq_version(void);
const char * qaq_llama_commit(void);
int32_t qaq_model_fingerprint(const char * model_path, char * out_hex, char * err, size_t err_size);
int32_t qaq_model_apply_kv_profile(void * model, const char * model_path, const char * profile_path,
                                   char * err, size_t err_size);
int32_t llama_model_n_layer_kv(const void * model);
bool llama_model_layer_kv_shape(const void * model, int32_t il, int32_t * n_head_kv, int32_t * n_embd_head_k,
                                int32_t * n_embd_head_v, bool * is_swa);
int32_t llama_model_set_kv_layer_types(void * model, const int32_t * types_k, const int32_t * types_v, int32_t n);
int32_t llama_model_kv_layer_type(const void * model, int32_t il, bool is_v);
bool llama_kv_layer_info(const void * ctx, int32_t il, int32_t * type_k, int32_t * type_v, size_t * size_k,
                         size_t * size_v, uint32_t * n_cells);
size_t ggml_backend_dev_count(void);
void * ggml_backend_dev_get(size_t index);
const char * ggml_backend_dev_name(void * device);
const char * ggml_backend_dev_description(void * device);
int ggml_backend_dev_type(void * device);
size_t ggml_backend_reg_count(void);
void * ggml_backend_reg_get(size_t index);
const char * ggml_backend_reg_name(void * reg);
struct gguf_init_params { bool no_alloc; void ** ctx; };
void * gguf_init_from_file(const char * fname, struct gguf_init_params params);
void gguf_free(void * ctx);
int64_t gguf_get_n_kv(const void * ctx);
const char * gguf_get_key(const void * ctx, int64_t key_id);
int gguf_get_kv_type(const void * ctx, int64_t key_id);
uint8_t gguf_get_val_u8(const void * ctx, int64_t key_id);
int8_t gguf_get_val_i8(const void * ctx, int64_t key_id);
uint16_t gguf_get_val_u16(const void * ctx, int64_t key_id);
int16_t gguf_get_val_i16(const void * ctx, int64_t key_id);
uint32_t gguf_get_val_u32(const void * ctx, int64_t key_id);
int32_t gguf_get_val_i32(const void * ctx, int64_t key_id);
float gguf_get_val_f32(const void * ctx, int64_t key_id);
uint64_t gguf_get_val_u64(const void * ctx, int64_t key_id);
int64_t gguf_get_val_i64(const void * ctx, int64_t key_id);
double gguf_get_val_f64(const void * ctx, int64_t key_id);
bool gguf_get_val_bool(const void * ctx, int64_t key_id);
const char * gguf_get_val_str(const void * ctx, int64_t key_id);
int64_t gguf_get_n_tensors(const void * ctx);
const char * gguf_get_tensor_name(const void * ctx, int64_t tensor_id);
"""


@lru_cache(maxsize=None)
def ffi_lib():
    """(ffi, lib): cffi handle on our libllama (the same file llama-cpp-python loads)."""
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    path = lib_dir() / _lib_file_name()
    try:
        lib = ffi.dlopen(str(path))
        lib.qaq_version  # noqa: B018 - resolves the symbol: a stock libllama has none
    except (OSError, AttributeError) as e:
        raise LibraryError(f"{path} is not a qaq-gguf build of llama.cpp (no qaq_version symbol): {e}") from e
    return ffi, lib


def c_str(ptr) -> str:
    ffi, _ = ffi_lib()
    return ffi.string(ptr).decode() if ptr != ffi.NULL else ""


def backend_names() -> list[str]:
    """Names of the ggml backends compiled into this build ("CPU", "CUDA", ...)."""
    _, lib = ffi_lib()
    return [c_str(lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i))) for i in range(lib.ggml_backend_reg_count())]


def version() -> str:
    """qaq_version() from the loaded native library."""
    _, lib = ffi_lib()
    return c_str(lib.qaq_version())


_GGUF_SCALARS = {0: "u8", 1: "i8", 2: "u16", 3: "i16", 4: "u32", 5: "i32", 6: "f32", 7: "bool", 8: "str", 10: "u64",
                 11: "i64", 12: "f64"}


def gguf_header(path) -> tuple[dict, list[str]]:
    """A GGUF file's metadata ({key: value}, arrays as None: present, not read) and tensor names, read by ggml's C parser
    (gguf-py needs seconds for a large vocabulary). Raises ValueError for a file ggml cannot read."""
    ffi, lib = ffi_lib()
    params = ffi.new("struct gguf_init_params *", {"no_alloc": True, "ctx": ffi.NULL})
    ctx = lib.gguf_init_from_file(str(path).encode(), params[0])
    if ctx == ffi.NULL:
        raise ValueError(f"cannot read {path}: not a GGUF file, truncated, or unreadable")
    try:
        meta = {}
        for i in range(lib.gguf_get_n_kv(ctx)):
            kind = _GGUF_SCALARS.get(lib.gguf_get_kv_type(ctx, i))
            if kind is None:
                meta[c_str(lib.gguf_get_key(ctx, i))] = None
                continue
            v = getattr(lib, f"gguf_get_val_{kind}")(ctx, i)
            meta[c_str(lib.gguf_get_key(ctx, i))] = c_str(v) if kind == "str" else v
        names = [c_str(lib.gguf_get_tensor_name(ctx, i)) for i in range(lib.gguf_get_n_tensors(ctx))]
    finally:
        lib.gguf_free(ctx)
    return meta, names
