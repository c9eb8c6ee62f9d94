"""ggml tensors as llama.cpp's eval callback hands them over: read them into numpy, write numpy back.

The callback (``cb_eval``) receives a ``struct ggml_tensor *`` for every graph node it asked for, after the node
was computed; :func:`read` copies its elements out through ``ggml_backend_tensor_get`` (any backend), and
:func:`write` replaces them before the rest of the graph runs.
"""
from __future__ import annotations

import ctypes

import numpy as np

from . import _native

GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1


class TensorError(RuntimeError):
    """A tensor the numpy side cannot read or write (another type, another shape)."""


class Tensor(ctypes.Structure):
    """The leading fields of ggml's ``struct ggml_tensor`` up to ``view_src`` (read through a pointer only)."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
                ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
                ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p), ("view_offs", ctypes.c_size_t)]


def ggml_lib():
    """libggml-base with the few functions the rewriter calls (argument types set)."""
    lib = ctypes.CDLL(str(_native.lib_dir() / "libggml-base.so"))
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    for f in (lib.ggml_backend_tensor_get, lib.ggml_backend_tensor_set):
        f.restype = None
        f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


def layout(ptr: int) -> tuple[type, list[int], list[int]]:
    t = Tensor.from_address(ptr)
    if t.type not in (GGML_TYPE_F32, GGML_TYPE_F16):
        raise TensorError(f"tensor has ggml type {t.type}; the rewriter handles f32 and f16")
    return (np.float32 if t.type == GGML_TYPE_F32 else np.float16), [int(x) for x in t.ne], [int(x) for x in t.nb]


def read(lib, ptr: int) -> np.ndarray:
    """A ggml tensor as float32, axes in ggml order reversed: (ne3, ne2, ne1, ne0)."""
    dtype, ne, nb = layout(ptr)
    span = sum((n - 1) * b for n, b in zip(ne, nb)) + np.dtype(dtype).itemsize
    raw = np.empty(span, np.uint8)
    lib.ggml_backend_tensor_get(ptr, raw.ctypes.data, 0, span)
    view = np.lib.stride_tricks.as_strided(raw.view(dtype), shape=ne[::-1], strides=nb[::-1])
    return np.array(view, dtype=np.float32)


def write(lib, ptr: int, values: np.ndarray) -> None:
    """Overwrite a ggml tensor's elements (shape as :func:`read` returns), keeping any padding between rows."""
    dtype, ne, nb = layout(ptr)
    if tuple(values.shape) != tuple(ne[::-1]):
        raise TensorError(f"rewrite of shape {values.shape} for a tensor of shape {tuple(ne[::-1])}")
    span = sum((n - 1) * b for n, b in zip(ne, nb)) + np.dtype(dtype).itemsize
    raw = np.empty(span, np.uint8)
    contiguous = nb[0] == np.dtype(dtype).itemsize and all(nb[i] == nb[i - 1] * ne[i - 1] for i in range(1, 4))
    if not contiguous:  # keep the bytes between the elements
        lib.ggml_backend_tensor_get(ptr, raw.ctypes.data, 0, span)
    view = np.lib.stride_tricks.as_strided(raw.view(dtype), shape=ne[::-1], strides=nb[::-1], writeable=True)
    view[...] = values
    lib.ggml_backend_tensor_set(ptr, raw.ctypes.data, 0, span)
