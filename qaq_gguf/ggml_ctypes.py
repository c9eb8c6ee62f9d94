"""ggml and its CPU backend through ctypes: type traits, row functions and small graphs built and computed in one
context. What the kernel tests and tools/bench_fa.py run ggml's own ops with, without llama.cpp around them."""
from __future__ import annotations

import ctypes

import numpy as np

from . import _native

F32, F16, Q4_0, Q8_0, I32, I64 = 0, 1, 2, 8, 26, 27

P = ctypes.c_void_p


class Traits(ctypes.Structure):
    """The leading fields of ``struct ggml_type_traits`` (ggml.h)."""

    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", P),
                ("from_float_ref", P)]


class CpuTraits(ctypes.Structure):
    """``struct ggml_type_traits_cpu`` (ggml-cpu.h)."""

    _fields_ = [("from_float", P), ("vec_dot", P), ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]


class InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", P), ("no_alloc", ctypes.c_bool)]


class Cplan(ctypes.Structure):
    """``struct ggml_cplan`` (ggml-cpu.h): a graph's compute plan; the caller provides the work buffer."""

    _fields_ = [("work_size", ctypes.c_size_t), ("work_data", P), ("n_threads", ctypes.c_int), ("threadpool", P),
                ("abort_callback", P), ("abort_callback_data", P), ("use_ref", ctypes.c_bool)]


# to_float / from_float: (x, y, n)
ROW_FN = ctypes.CFUNCTYPE(None, P, P, ctypes.c_int64)
# vec_dot: (n, s, bs, x, bx, y, by, nrc)
DOT_FN = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t, P, ctypes.c_size_t, P,
                          ctypes.c_size_t, ctypes.c_int)
# ggml_cpu_vec_dot_rows(type): (n, s, x, y, by, nq)
ROWS_FN = ctypes.CFUNCTYPE(None, ctypes.c_int, P, P, P, ctypes.c_size_t, ctypes.c_int)


def load() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """(libggml-base, libggml-cpu) of the bundled build, argument types set, the CPU backend initialised."""
    base = ctypes.CDLL(str(_native.lib_dir() / "libggml-base.so"))
    cpu = ctypes.CDLL(str(_native.lib_dir() / "libggml-cpu.so"))
    sig = [
        (base.ggml_get_type_traits, ctypes.POINTER(Traits), [ctypes.c_int]),
        (base.ggml_type_name, ctypes.c_char_p, [ctypes.c_int]),
        (base.ggml_type_size, ctypes.c_size_t, [ctypes.c_int]),
        (base.ggml_init, P, [InitParams]),
        (base.ggml_free, None, [P]),
        (base.ggml_new_tensor_4d, P, [P, ctypes.c_int] + [ctypes.c_int64] * 4),
        (base.ggml_get_data, P, [P]),
        (base.ggml_nbytes, ctypes.c_size_t, [P]),
        (base.ggml_flash_attn_ext, P, [P, P, P, P, P, ctypes.c_float, ctypes.c_float, ctypes.c_float]),
        (base.ggml_set_rows, P, [P, P, P, P]),
        (base.ggml_get_rows, P, [P, P, P]),
        (base.ggml_cpy, P, [P, P, P]),
        (base.ggml_new_graph, P, [P]),
        (base.ggml_build_forward_expand, None, [P, P]),
        (base.ggml_quantize_chunk, ctypes.c_size_t, [ctypes.c_int, P, P, ctypes.c_int64, ctypes.c_int64,
                                                     ctypes.c_int64, P]),
        (base.ggml_validate_row_data, ctypes.c_bool, [ctypes.c_int, P, ctypes.c_size_t]),
        (cpu.ggml_get_type_traits_cpu, ctypes.POINTER(CpuTraits), [ctypes.c_int]),
        (cpu.ggml_graph_plan, Cplan, [P, ctypes.c_int, P]),
        (cpu.ggml_graph_compute, ctypes.c_int, [P, ctypes.POINTER(Cplan)]),
    ]
    for f, res, args in sig:
        f.restype, f.argtypes = res, args
    # patches/0022-0023 (absent from older builds, which tools/bench_fa.py can still time)
    for name, res, args in (("ggml_cpu_dequantize_row", None, [ctypes.c_int, P, P, ctypes.c_int64]),
                            ("ggml_cpu_vec_dot_rows", P, [ctypes.c_int])):
        if hasattr(cpu, name):
            getattr(cpu, name).restype, getattr(cpu, name).argtypes = res, args
    # patches/0031 (exact KV cells)
    if hasattr(base, "ggml_flash_attn_ext_set_exact_rows"):
        base.ggml_flash_attn_ext_set_exact_rows.restype = None
        base.ggml_flash_attn_ext_set_exact_rows.argtypes = [P, P, P]
    cpu.ggml_cpu_init()
    return base, cpu


class Graph:
    """A ggml context holding tensors and the graphs computed over them (freed on exit)."""

    def __init__(self, ggml: tuple[ctypes.CDLL, ctypes.CDLL], mem: int = 256 << 20):
        self.base, self.cpu = ggml
        self.ctx = self.base.ggml_init(InitParams(mem, None, False))
        self._plans: dict[tuple[int, int], tuple[Cplan, np.ndarray]] = {}

    def tensor(self, type_id: int, ne, data: np.ndarray | None = None) -> int:
        """A new tensor of ggml shape ne (innermost first), filled with data's bytes if given."""
        ne = list(ne) + [1] * (4 - len(ne))
        t = self.base.ggml_new_tensor_4d(self.ctx, type_id, *ne)
        if data is not None:
            data = np.ascontiguousarray(data)
            assert data.nbytes == self.base.ggml_nbytes(t)
            ctypes.memmove(self.base.ggml_get_data(t), data.ctypes.data, data.nbytes)
        return t

    def read(self, t: int, dtype, shape) -> np.ndarray:
        buf = np.empty(shape, dtype)
        ctypes.memmove(buf.ctypes.data, self.base.ggml_get_data(t), buf.nbytes)
        return buf

    def graph(self, out: int) -> int:
        gf = self.base.ggml_new_graph(self.ctx)
        self.base.ggml_build_forward_expand(gf, out)
        return gf

    def run(self, gf: int, n_threads: int = 2) -> None:
        """Compute a graph; its plan and work buffer are made on the first run and reused by the next ones."""
        if (gf, n_threads) not in self._plans:
            plan = self.cpu.ggml_graph_plan(gf, n_threads, None)
            work = np.zeros(max(plan.work_size, 1), np.uint8)
            plan.work_data = work.ctypes.data
            self._plans[(gf, n_threads)] = (plan, work)
        plan, _ = self._plans[(gf, n_threads)]
        assert self.cpu.ggml_graph_compute(gf, ctypes.byref(plan)) == 0

    def compute(self, out: int, n_threads: int = 2) -> None:
        self.run(self.graph(out), n_threads)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.base.ggml_free(self.ctx)
