"""Find qaq-gguf's patched llama.cpp build and point llama-cpp-python's bindings at it.

The bindings read LLAMA_CPP_LIB_PATH when `llama_cpp` is first imported. The wheel installs a startup hook
(qaq_gguf.pth, qaq_gguf_startup.py in site-packages) that sets it to our library when it is unset, so `import
llama_cpp` works in any order; `import qaq_gguf` calls `bind()`, which sets it too (a source checkout has no hook)
and names a stock libllama that was loaded instead. The C functions qaq-gguf adds (per-layer KV types, profiles) are
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
                f"llama_cpp has loaded {path or 'another libllama'}, not qaq-gguf's patched build in {d} "
                f"(LLAMA_CPP_LIB_PATH={os.environ.get('LLAMA_CPP_LIB_PATH', '(unset)')}; qaq-gguf's startup hook "
                f"qaq_gguf.pth points it at {d} when it is unset). Unset LLAMA_CPP_LIB_PATH or set it to {d} before "
                "starting Python, or import qaq_gguf before llama_cpp.")
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
int32_t qaq_profile_check(const void * model, const char * model_path, const char * profile_path,
                          char * err, size_t err_size);
void qaq_model_clear_kv_profile(void * model);
int32_t llama_model_n_layer_kv(const void * model);
bool llama_model_layer_kv_shape(const void * model, int32_t il, int32_t * n_head_kv, int32_t * n_embd_head_k,
                                int32_t * n_embd_head_v, bool * is_swa);
int32_t llama_model_set_kv_layer_types(void * model, const int32_t * types_k, const int32_t * types_v, int32_t n);
int32_t llama_model_kv_layer_type(const void * model, int32_t il, bool is_v);
uint32_t llama_model_kv_exact_cells(const void * model);
bool llama_kv_layer_info(const void * ctx, int32_t il, int32_t * type_k, int32_t * type_v, size_t * size_k,
                         size_t * size_v, uint32_t * n_cells);
int32_t qaq_device_supports_kv_types(size_t dev_index, int32_t type_k, int32_t type_v, int64_t head_k, int64_t head_v);
size_t ggml_backend_dev_count(void);
void * ggml_backend_dev_get(size_t index);
const char * ggml_backend_dev_name(void * device);
const char * ggml_backend_dev_description(void * device);
int ggml_backend_dev_type(void * device);
void * ggml_backend_dev_backend_reg(void * device);
void * ggml_backend_reg_by_name(const char * name);
void * ggml_backend_reg_get_proc_address(void * reg, const char * name);
void ggml_backend_register(void * reg);
void * llama_kv_layer_device(const void * ctx, int32_t il);
void * llama_model_layer_device(const void * model, int32_t il);
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
enum gguf_type { GGUF_TYPE_DUMMY = 0 };
int gguf_get_arr_type(const void * ctx, int64_t key_id);
size_t gguf_get_arr_n(const void * ctx, int64_t key_id);
const void * gguf_get_arr_data(const void * ctx, int64_t key_id);
const char * gguf_get_arr_str(const void * ctx, int64_t key_id, size_t i);
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
_GGUF_DTYPES = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "u1", 10: "<u8", 11: "<i8",
                12: "<f8"}
GGUF_STRING, GGUF_ARRAY = 8, 9


def gguf_read(path) -> tuple[dict, list[str]]:
    """Every key of a GGUF file as {key: (gguf type, element type of an array or None, value)} (arrays as lists of
    str or numpy arrays), and the tensor names, read by ggml's C parser: it checks every count and length against the
    file before anything is allocated, so a hostile file costs no more memory than its size (gguf-py's reader would
    build a 2^32-element array from an 8 kB file), and a large vocabulary takes milliseconds, not seconds. Strings
    read up to their first NUL, as llama.cpp reads them. Raises ValueError for a file ggml cannot read."""
    import numpy as np

    ffi, lib = ffi_lib()
    params = ffi.new("struct gguf_init_params *", {"no_alloc": True, "ctx": ffi.NULL})
    ctx = lib.gguf_init_from_file(str(path).encode(), params[0])
    if ctx == ffi.NULL:
        raise ValueError(f"cannot read {path}: not a GGUF file, truncated, or unreadable")
    try:
        meta = {}
        for i in range(lib.gguf_get_n_kv(ctx)):
            key = c_str(lib.gguf_get_key(ctx, i))
            t = lib.gguf_get_kv_type(ctx, i)
            if t == GGUF_ARRAY:
                sub, n = lib.gguf_get_arr_type(ctx, i), lib.gguf_get_arr_n(ctx, i)
                if sub == GGUF_STRING:
                    val = [c_str(lib.gguf_get_arr_str(ctx, i, j)) for j in range(n)]
                elif sub in _GGUF_DTYPES:
                    dt = np.dtype(_GGUF_DTYPES[sub])
                    val = np.frombuffer(ffi.buffer(lib.gguf_get_arr_data(ctx, i), n * dt.itemsize), dt).copy() \
                        if n else np.zeros(0, dt)
                else:
                    val = None  # arrays of arrays: not part of any format qaq-gguf reads
                meta[key] = (t, sub, val)
            elif t in _GGUF_SCALARS:
                v = getattr(lib, f"gguf_get_val_{_GGUF_SCALARS[t]}")(ctx, i)
                meta[key] = (t, None, c_str(v) if t == GGUF_STRING else v)
        names = [c_str(lib.gguf_get_tensor_name(ctx, i)) for i in range(lib.gguf_get_n_tensors(ctx))]
    finally:
        lib.gguf_free(ctx)
    return meta, names


def gguf_header(path) -> tuple[dict, list[str]]:
    """A GGUF file's metadata as {key: value} (arrays as lists or numpy arrays) and tensor names (gguf_read)."""
    meta, names = gguf_read(path)
    return {k: v for k, (_, _, v) in meta.items()}, names
