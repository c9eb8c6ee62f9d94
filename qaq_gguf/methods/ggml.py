"""llama.cpp's own cache types as a rewrite: ``ggml:q4_0/q4_0`` stores K and V as the native cache does.

Keys and values go through the real block quantizers (gguf-py's ports, byte-exact with ggml, and ours for
qaq3/qaq2) inside llama.cpp's Hadamard rotation, and Q through the kernel's rounding to K's dot-product type
(q8_0 for a quantized K), exactly as ``scoring.quant_roundtrip`` / ``scoring.query_roundtrip`` model the native
cache. The lab runs it beside ``native:q4_0/q4_0`` to show that rewriting over an f16 cache reproduces a real
cache (the simulation's faithfulness test).

``ggml:q4_0/q4_0:qf16`` keeps Q as it is (f16, what the attention of an f16 cache reads) instead of rounding it to
q8_0: it measures what a kernel that keeps Q in f16 for quantized keys would win.
"""
from __future__ import annotations

import numpy as np

from .. import cachetypes, scoring
from . import Bits, MethodError

DEFAULTS = ("q8_0/q8_0", "q4_0/q4_0")


class GgmlTypes:
    name = "ggml"
    paper = "llama.cpp cache types (-ctk/-ctv)"

    def __init__(self, type_k: str, type_v: str, round_q: bool = True):
        self.type_k, self.type_v = cachetypes.get(type_k).name, cachetypes.get(type_v).name
        self.label = f"ggml:{self.type_k}/{self.type_v}" + ("" if round_q else ":qf16")
        quant_k = cachetypes.get(self.type_k).is_quantized
        self.rewrites = frozenset({"k", "v"} | ({"q"} if quant_k and round_q else set()))
        self.observes = self.rewrites
        self.fingerprint: str | None = None

    def fit(self, calib) -> None:
        self.fingerprint = calib.ident.fingerprint

    def begin(self, n_ctx: int) -> None:
        pass

    def apply(self, il: int, kind: str, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        if kind == "q":
            return scoring.query_roundtrip(x, self.type_k)
        if kind == "k":
            return scoring.quant_roundtrip(x, self.type_k)
        return scoring.quant_roundtrip(x, self.type_v, is_v=True)

    def bits(self, n_ctx: int) -> Bits:
        return Bits(cachetypes.bits(self.type_k), cachetypes.bits(self.type_v), "block scales included")


def make(setting: str) -> GgmlTypes:
    types, _, opt = setting.partition(":")
    if opt not in ("", "qf16"):
        raise MethodError(f"ggml:{setting}: unknown option {opt!r} (qf16: Q kept in f16)")
    tk, sep, tv = types.partition("/")
    if not sep:
        tv = tk
    try:
        return GgmlTypes(tk, tv, round_q=opt != "qf16")
    except ValueError as e:
        raise MethodError(f"ggml:{setting}: {e}") from None
