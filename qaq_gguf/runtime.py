"""The runtime hook: run llama-cpp-python with a per-layer KV cache profile.

    from qaq_gguf import Llama
    llm = Llama("model.gguf", kv_profile="qaq.gguf", n_ctx=8192)

The profile is checked and applied by the native library (`qaq_model_apply_kv_profile`, the same code
`llama-server --kv-profile` runs) after the model is loaded and before its context is created.
"""
from __future__ import annotations

import contextlib
import sys
import threading
from pathlib import Path
from typing import Sequence

from . import _native, cachetypes
from .llama import as_cffi, llama_cpp_module, model_meta, quiet_llama_log
from .profile import NO_KV, ProfileError, key_positions_note, read_profile


def layer_devices(model_path: str | Path, n_gpu_layers: int) -> list[str]:
    """The device each layer of a model runs on (its K/V cache's home when offloaded) for n_gpu_layers, with the
    devices registered now (add_rpc_servers included): hyperparameters only, no weight data loaded."""
    lc = llama_cpp_module()
    ffi, lib = _native.ffi_lib()
    params = lc.llama_model_default_params()
    params.no_alloc = True
    params.load_mode = 0  # LLAMA_LOAD_MODE_NONE
    params.n_gpu_layers = n_gpu_layers
    lc.llama_backend_init()
    with quiet_llama_log() as errors:
        model = lc.llama_model_load_from_file(str(model_path).encode(), params)
    if not model:
        raise ProfileError(f"llama.cpp could not load {model_path}" + (": " + errors[-1] if errors else ""))
    try:
        m = as_cffi(model)
        out = []
        for il in range(lib.llama_model_n_layer_kv(m)):
            dev = lib.llama_model_layer_device(m, il)
            name = _native.c_str(lib.ggml_backend_dev_name(dev)) if dev != ffi.NULL else "CPU"
            if name.startswith("RPC"):
                name += f" ({_native.c_str(lib.ggml_backend_dev_description(dev))})"
            out.append(name)
        return out
    finally:
        lc.llama_model_free(model)


def apply_profile(model_ptr, model_path: str | Path, profile: str | Path) -> None:
    """Check `profile` against the loaded model (ctypes pointer) and set its per-layer K/V cache types."""
    ffi, lib = _native.ffi_lib()
    err = ffi.new("char[2048]")
    rc = lib.qaq_model_apply_kv_profile(as_cffi(model_ptr), str(model_path).encode(), str(profile).encode(),
                                        err, len(err))
    if rc != 0:
        raise ProfileError(ffi.string(err).decode(errors="replace"))


def check_profile(model_ptr, model_path: str | Path, profile: str | Path) -> None:
    """Every check apply_profile makes (the one native validator), without changing the model; ProfileError."""
    ffi, lib = _native.ffi_lib()
    err = ffi.new("char[2048]")
    if lib.qaq_profile_check(as_cffi(model_ptr), str(model_path).encode(), str(profile).encode(), err, len(err)) != 0:
        raise ProfileError(ffi.string(err).decode(errors="replace"))


def kv_layer_info(llm_or_ctx) -> list[dict]:
    """Per-layer K/V cache type and bytes of a live context (a Llama, or a llama_context pointer)."""
    ffi, lib = _native.ffi_lib()
    lc = llama_cpp_module()
    ctx = llm_or_ctx.ctx if hasattr(llm_or_ctx, "ctx") else llm_or_ctx
    cctx = as_cffi(ctx)
    model = lc.llama_get_model(ctx)
    out = []
    t = ffi.new("int32_t[2]")
    s = ffi.new("size_t[2]")
    cells = ffi.new("uint32_t *")
    for il in range(lib.llama_model_n_layer_kv(as_cffi(model))):
        if not lib.llama_kv_layer_info(cctx, il, t, t + 1, s, s + 1, cells):
            continue
        dev = lib.llama_kv_layer_device(cctx, il)
        out.append({"layer": il, "type_k": ggml_type_name(t[0]), "type_v": ggml_type_name(t[1]),
                    "bytes_k": int(s[0]), "bytes_v": int(s[1]), "n_cells": int(cells[0]),
                    "device": _native.c_str(lib.ggml_backend_dev_name(dev)) if dev != ffi.NULL else "",
                    "device_description": _native.c_str(lib.ggml_backend_dev_description(dev))
                    if dev != ffi.NULL else ""})
    return out


def kv_bytes_by_device(layers: list[dict]) -> dict[str, int]:
    """K+V bytes per device ("RPC0 (127.0.0.1:50052)", "CPU", ...) of kv_layer_info's rows."""
    out: dict[str, int] = {}
    for r in layers:
        name = r["device"] + (f" ({r['device_description']})" if r["device"].startswith("RPC") else "")
        out[name] = out.get(name, 0) + r["bytes_k"] + r["bytes_v"]
    return out


_rpc_lock = threading.Lock()
_rpc_added: dict[str, list[str]] = {}


def add_rpc_servers(servers: str | Sequence[str], timeout: float = 10.0) -> list[str]:
    """Register llama.cpp RPC servers ("host:port", comma-separated or a list) as devices of this process, as
    `--rpc` does in llama.cpp's tools; returns their device names ("RPC0", ...). Models loaded afterwards with
    n_gpu_layers > 0 put layers, and their caches in each layer's own type, on them. Each server is reached over TCP
    first, so that an unreachable one is a ConnectionError here rather than an abort inside ggml."""
    import socket

    ffi, lib = _native.ffi_lib()
    eps = [x.strip() for x in (servers.split(",") if isinstance(servers, str) else servers) if x.strip()]
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    if reg == ffi.NULL:
        raise RuntimeError("this qaq-gguf build has no RPC backend (built without GGML_RPC)")
    add = ffi.cast("void * (*)(const char *)", lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server"))
    names: list[str] = []
    with _rpc_lock:
        for ep in eps:
            if ep not in _rpc_added:
                host, _, port = ep.rpartition(":")
                if not host or not port.isdigit():
                    raise ValueError(f"RPC server {ep!r}: expected host:port")
                try:
                    socket.create_connection((host, int(port)), timeout=timeout).close()
                except OSError as e:
                    raise ConnectionError(f"RPC server {ep} is not reachable: {e}") from None
                r = add(ep.encode())
                if r == ffi.NULL:
                    raise RuntimeError(f"RPC server {ep} has no devices")
                before = {lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())}
                lib.ggml_backend_register(r)
                _rpc_added[ep] = [_native.c_str(lib.ggml_backend_dev_name(d)) for d in
                                  (lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count()))
                                  if d not in before]
            names += _rpc_added[ep]
    return names


def ggml_type_name(t: int) -> str:
    from gguf import GGMLQuantizationType

    ct = cachetypes.by_id(t)
    if ct is not None:
        return ct.name
    try:
        return GGMLQuantizationType(t).name.lower()
    except ValueError:
        return NO_KV if t < 0 or t >= 1000 else f"type{t}"


_hook_lock = threading.Lock()


AUTO = "auto"  # kv_profile: what the model file carries (llama.cpp applies an embedded profile on load)


def clear_profile(model_ptr) -> None:
    """Remove every per-layer cache type and transform from a loaded model (ctypes pointer): an embedded profile
    llama.cpp applied on load included. For contexts that must be plain (the f16 reference, calibration)."""
    _, lib = _native.ffi_lib()
    lib.qaq_model_clear_kv_profile(as_cffi(model_ptr))


def exact_cells(model_ptr) -> int:
    """The first KV cells a profile keeps exact (llama_model_set_kv_exact_cells; 0: none)."""
    _, lib = _native.ffi_lib()
    return int(lib.llama_model_kv_exact_cells(as_cffi(model_ptr)))


def quantized_v_layers(model_ptr) -> list[int]:
    """Layers whose per-layer V cache type (set by a profile) is quantized: they need flash attention."""
    _, lib = _native.ffi_lib()
    m = as_cffi(model_ptr)
    out = []
    for il in range(lib.llama_model_n_layer_kv(m)):
        t = lib.llama_model_kv_layer_type(m, il, True)
        ct = cachetypes.by_id(t) if t >= 0 else None
        if ct is not None and ct.is_quantized:
            out.append(il)
    return out


class Llama(llama_cpp_module().Llama):
    """llama_cpp.Llama with a per-layer KV cache profile.

    kv_profile: ``"auto"`` (default): what llama.cpp gives the model on load, the profile embedded in the model file
    if it carries one (or the one QAQ_KV_PROFILE names); a path of a qaq profile (.gguf); ``"embedded"``: the
    profile stored in the model file, required; ``None``: no profile, not even an embedded one. Every other argument
    keeps its llama-cpp-python meaning (rpc_servers, "host:port,...", registers llama.cpp RPC servers as devices
    of the process, add_rpc_servers, for layers offloaded with n_gpu_layers); type_k/type_v cannot be combined with
    a profile file (an embedded profile yields to them, with a warning). A profile that stores V quantized needs flash attention: it is turned on (and
    said so) unless flash_attn=False was passed, which is an error.
    """

    def __init__(self, model_path: str, *args, kv_profile: str | Path | None = AUTO,
                 rpc_servers: str | Sequence[str] | None = None, **kwargs):
        if rpc_servers:
            add_rpc_servers(rpc_servers)  # llama-cpp-python 0.3.36 accepts rpc_servers= and ignores it
        self.kv_profile = str(kv_profile) if kv_profile is not None else None
        self._stack = contextlib.ExitStack()  # llama_cpp.Llama.__del__ needs it if a check below raises
        quiet = quiet_llama_log() if kwargs.get("verbose") is False else contextlib.nullcontext()
        explicit = self.kv_profile not in (None, AUTO)
        if explicit:
            for k in ("type_k", "type_v"):
                if kwargs.get(k) is not None:
                    raise ProfileError(f"kv_profile sets every layer's cache type; drop {k}= or the profile")
        if explicit and self.kv_profile != "embedded":
            if not Path(self.kv_profile).is_file():
                raise ProfileError(f"profile file not found: {self.kv_profile}")
            note = key_positions_note(read_profile(self.kv_profile), kwargs.get("n_ctx", 512))
            if note:  # the reader's friendlier messages first; the native check follows
                print(f"qaq-gguf: {note}", file=sys.stderr)
        fa_off = kwargs.get("flash_attn") is False

        # llama-cpp-python loads the model and creates the context inside Llama.__init__: the profile goes in
        # between, by wrapping the context constructor for the duration of this call.
        from llama_cpp import llama as llama_mod

        internals = llama_mod.internals
        make_context = internals.LlamaContext
        profile = self.kv_profile
        lc = llama_cpp_module()

        def context_with_profile(*, model, params, verbose):
            if profile is None:
                clear_profile(model.model)
            elif profile != AUTO:
                if profile == "embedded" and not model_meta(as_cffi(model.model), "qaq.schema_version"):
                    raise ProfileError(f"{model_path} has no embedded qaq profile (embed one with "
                                       "`qaq-gguf profile embed`)")
                apply_profile(model.model, model_path, profile)
            needs = ("stores V quantized, which llama.cpp supports" if quantized_v_layers(model.model) else
                     "keeps the first KV cells exact, which llama.cpp reads" if exact_cells(model.model) else None)
            if needs and params.flash_attn_type == lc.LLAMA_FLASH_ATTN_TYPE_DISABLED:
                if fa_off:
                    raise ProfileError(f"this profile {needs} only with flash attention; pass flash_attn=True (or "
                                       "leave it out), or use another profile")
                params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
                if verbose:
                    print(f"qaq-gguf: flash attention turned on: the profile {needs.split(',')[0]}", file=sys.stderr)
            return make_context(model=model, params=params, verbose=verbose)

        with _hook_lock, quiet as errors:
            internals.LlamaContext = context_with_profile
            try:
                super().__init__(model_path, *args, **kwargs)
            except ValueError as e:
                # llama.cpp refuses a model whose embedded profile is invalid, and logs why
                why = [x.split("KV profile refused: ", 1)[1] for x in errors or [] if "KV profile refused: " in x]
                # ... and a context the profile's exact cells cannot live in (flash attention off, a GPU cache)
                why += [x[x.index("the KV profile keeps"):].strip() for x in errors or [] if "the KV profile keeps" in x]
                if why:
                    raise ProfileError(why[-1]) from e
                raise
            finally:
                internals.LlamaContext = make_context

    def kv_layer_info(self) -> list[dict]:
        return kv_layer_info(self)

    def __getstate__(self):
        state = super().__getstate__()
        state["kv_profile"] = self.kv_profile
        return state
