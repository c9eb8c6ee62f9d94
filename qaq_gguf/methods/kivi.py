"""KIVI (Liu et al., ICML 2024, arXiv 2402.02750; official code ``jy-yuan/KIVI``): keys quantized per channel,
values per token, the most recent tokens kept in fp16.

What is followed (paper sections 3-4 and the official ``models/llama_kivi.py`` / ``quant/new_pack.py``):

- **Keys per channel** (paper section 3.2, "per-channel key quantization"): each channel of a key head is quantized
  over groups of ``G = 32`` consecutive tokens, asymmetric min/max round-to-nearest: scale ``(max - min) /
  (2^b - 1)``, zero point ``min`` (``triton_quantize_and_pack_along_last_dim`` on the transposed keys). Keys are
  quantized **after** RoPE, as the official code does (the tensors the cache receives).
- **Values per token** (section 3.2): each token's value head in groups of ``G = 32`` channels, same grid.
- **Residual** (section 3.3, Algorithm 1): the most recent tokens stay fp16. The official code keeps them the way
  this module does: a key residual that fills up and is quantized as a whole once it holds ``R`` tokens (so the
  keys of positions ``[R * floor(t / R), t)`` are fp16 at position ``t``: between 0 and R - 1 of them; R is a
  multiple of G, so key groups stay aligned to multiples of 32 from position 0), and a sliding value residual of
  the last ``R`` tokens (each value is quantized when it falls out of the window). ``R = 128`` by default.
- Settings ``"2"``, ``"3"``, ``"4"`` (bits); ``"2:r32"`` sets R (paper section 4.3 ablates R = 32; ``"2:r0"``
  quantizes every token immediately, the paper's "fake quantization" of all tokens).

How the lab simulates the window (``rewrite.py``): the cache is f16, ``apply`` writes a batch's keys and values,
and ``refresh(pos_next)`` (called before each decode) overwrites cached tokens that have left the residual with
their quantized form (``rewrite.CacheUpdate``). Consequences, all at batch granularity (the lab decodes batches
of 256 tokens):

- **The window is positioned at the batch start.** Before the batch at ``p0`` the cache holds, in fp16, the keys of
  ``[R * floor(p0 / R), p0)`` and the values of ``[p0 - R, p0)``; everything older is quantized. The batch's own
  tokens are written exact (they are the newest, as in KIVI's prefill, which attends in full precision, and its
  decode, which attends to the current token in fp16), and are quantized only by a later ``refresh``.
- So **the queries of a batch see the window as of the batch start plus their own batch in fp16**: a query at
  ``p0 + i`` sees up to ``R + i + 1`` exact values and ``(p0 mod R) + i + 1`` exact keys, where token-by-token KIVI
  gives ``R + 1`` and ``(t mod R) + 1``. With 256-token batches and R = 128 that is about twice as many exact
  tokens on average as decoding one token at a time: the lab's KIVI numbers are optimistic in that respect.
  When ``p0`` is a multiple of R (the lab's 256-token batches with R = 32, 64, 128, 256) no key before the batch
  is exact, so R changes only the value window, and most of the gain over ``r0`` (nothing exact, nothing
  refreshed: the pessimistic bound) comes from the batch's own tokens being exact.
- With ``R = 0`` a batch whose positions do not start on a multiple of G quantizes its partial key groups over
  the tokens it has (the lab's batches are aligned).

Approximations: scale and zero point are kept in float32 (KIVI stores fp16; the difference is below the f16 cache
rounding the reconstruction then goes through). Nothing is calibrated (KIVI is tuning-free); ``fit`` only records
the model's fingerprint and head sizes.

Bits per value: ``b`` code bits + ``32 / G`` (an fp16 scale and an fp16 zero point per group of G values: +1 bit at
G = 32), for the quantized tokens; the fp16 residual (counted as R tokens for both K and V, the buffer KIVI
reserves, as the KVQuant paper counts KIVI-2 at 3.05 bits for 32K tokens) amortised over ``n_ctx``:
``((n_ctx - R) * (b + 1) + R * 16) / n_ctx``.
"""
from __future__ import annotations

import numpy as np

from ..rewrite import CacheUpdate
from . import Bits, MethodError, uniform_quantize

DEFAULTS = ("2", "3", "4")
GROUP = 32
RESIDUAL = 128

# the paper's own numbers (official repo docs/long_bench.md, LongBench average); 3 bits has none
_HEADLINE = {
    2: "LongBench avg (jy-yuan/KIVI docs/long_bench.md): LongChat-7B-32K fp16 38.72 / KIVI-2 38.30; "
       "Mistral-7B-Instruct-v0.2 43.54 / 42.43",
    4: "LongBench avg (jy-yuan/KIVI docs/long_bench.md): LongChat-7B-32K fp16 38.72 / KIVI-4 38.79; "
       "Mistral-7B-Instruct-v0.2 43.54 / 43.53",
}
_HEADLINE_OTHER = ("no number published at this width; LongBench avg (jy-yuan/KIVI docs/long_bench.md) "
                   "LongChat-7B-32K fp16 38.72 / KIVI-2 38.30 / KIVI-4 38.79")


def quantize_keys(x: np.ndarray, pos: np.ndarray, bits: int, group: int = GROUP) -> np.ndarray:
    """Per-channel keys: each channel quantized over the tokens of each aligned group of ``group`` positions
    (``pos // group``); x (n_tokens, n_heads, head_dim)."""
    x = np.asarray(x, np.float32)
    pos = np.asarray(pos, np.int64)
    n = len(pos)
    if n == 0:
        return x.copy()
    if pos[0] % group == 0 and n % group == 0 and np.all(np.diff(pos) == 1):
        return uniform_quantize(x, bits, axis=0, group=group)
    out = np.empty_like(x)
    gid = pos // group
    for g in np.unique(gid):  # unaligned or partial groups: rare (R = 0 with unaligned batches, tests)
        m = gid == g
        out[m] = uniform_quantize(x[m], bits, axis=0)
    return out


def quantize_values(x: np.ndarray, bits: int, group: int = GROUP) -> np.ndarray:
    """Per-token values: each token's head in groups of ``group`` channels (the whole head when its size is not a
    multiple of ``group``)."""
    x = np.asarray(x, np.float32)
    d = x.shape[-1]
    return uniform_quantize(x, bits, axis=-1, group=group if d % group == 0 else d)


class _Layer:
    """One layer's exact keys and values of the current sequence (row = position) and, per kind, how far they are
    written and how far they are stored quantized."""

    def __init__(self, n_ctx: int):
        self.n_ctx = n_ctx
        self.buf: dict[str, np.ndarray] = {}
        self.written = {"k": 0, "v": 0}  # 1 + the highest position written
        self.done = {"k": 0, "v": 0}     # positions below are stored quantized

    def put(self, kind: str, x: np.ndarray, pos: np.ndarray) -> None:
        hi = int(pos.max()) + 1
        buf = self.buf.get(kind)
        if buf is None or buf.shape[1:] != x.shape[1:]:
            buf = np.zeros((max(self.n_ctx, hi),) + x.shape[1:], np.float32)
        elif hi > buf.shape[0]:  # a longer sequence than begin() announced
            buf = np.concatenate([buf, np.zeros((hi - buf.shape[0],) + buf.shape[1:], np.float32)])
        buf[pos] = x
        self.buf[kind] = buf
        self.written[kind] = max(self.written[kind], hi)


class Kivi:
    name = "kivi"
    paper = "KIVI (Liu et al., ICML 2024, arXiv 2402.02750; code jy-yuan/KIVI)"
    rewrites = frozenset({"k", "v"})
    observes = frozenset({"k", "v"})

    def __init__(self, bits: int, residual: int = RESIDUAL, group: int = GROUP):
        if not 1 <= bits <= 8:
            raise MethodError(f"kivi: {bits} bits is not supported (1..8)")
        if residual < 0 or residual % group:
            raise MethodError(f"kivi: the residual R={residual} must be a non-negative multiple of the group "
                              f"size {group} (keys leave the residual in whole groups)")
        self.b, self.residual, self.group = bits, residual, group
        self.label = f"kivi-{bits} r{residual}"
        self.headline = _HEADLINE.get(bits, _HEADLINE_OTHER)
        self.fingerprint: str | None = None
        self._dims: dict[int, tuple[int, int, int]] = {}  # il -> (n_head_kv, head_dim_k, head_dim_v)
        self._layers: dict[int, _Layer] = {}
        self._n_ctx = 0

    # -- the interface --------------------------------------------------------------------------------------------

    def fit(self, calib) -> None:
        """Nothing to learn (KIVI is tuning-free): the fingerprint and each layer's head sizes (for bits())."""
        self._dims = {il: (L.k.shape[1], L.k.shape[2], L.v.shape[2]) for il, L in calib.layers.items()}
        self.fingerprint = calib.ident.fingerprint

    def begin(self, n_ctx: int) -> None:
        self._n_ctx = int(n_ctx)
        self._layers = {}

    def apply(self, il: int, kind: str, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        pos = np.asarray(pos, np.int64)
        if kind not in ("k", "v"):
            return x
        if self.residual == 0:  # nothing kept in fp16: quantize as written
            return quantize_keys(x, pos, self.b, self.group) if kind == "k" else quantize_values(x, self.b,
                                                                                                  self.group)
        st = self._layers.get(il)
        if st is None:
            st = self._layers[il] = _Layer(self._n_ctx)
        st.put(kind, x, pos)
        return x  # the newest tokens are in the residual: stored exact until a refresh quantizes them

    def refresh(self, pos_next: int) -> list[CacheUpdate]:
        """Before the batch at ``pos_next``: quantize the keys of positions below ``R * floor(pos_next / R)`` and the
        values below ``pos_next - R`` that are still exact, and return them as cache updates."""
        if self.residual == 0:
            return []
        r = self.residual
        target_k = (pos_next // r) * r
        target_v = max(0, pos_next - r)
        out = []
        for il, st in sorted(self._layers.items()):
            for kind, target in (("k", target_k), ("v", target_v)):
                hi = min(target, st.written[kind])
                lo = st.done[kind]
                if hi <= lo:
                    continue
                p = np.arange(lo, hi)
                x = st.buf[kind][p]
                q = quantize_keys(x, p, self.b, self.group) if kind == "k" else quantize_values(x, self.b,
                                                                                               self.group)
                out.append(CacheUpdate(il, kind, p, q))
                st.done[kind] = hi
        return out

    def bits(self, n_ctx: int) -> Bits:
        b, g, n = self.b, self.group, int(n_ctx)
        w = min(self.residual, n)
        side_k = 32.0 / g
        # values: groups of g channels, or the whole head where head_dim is not a multiple of g (value-weighted)
        dims = list(self._dims.values())
        if dims and any(dv % g for _, _, dv in dims):
            tot = sum(h * dv for h, _, dv in dims)
            side_v = sum(h * dv * 32.0 / (g if dv % g == 0 else dv) for h, _, dv in dims) / tot
        else:
            side_v = 32.0 / g
        qk, qv = b + side_k, b + side_v
        k = ((n - w) * qk + w * 16.0) / n
        v = ((n - w) * qv + w * 16.0) / n
        detail = (f"K: {b}-bit codes + 32/{g} (fp16 scale+zero per {g} tokens of a channel) = {qk:g}; "
                  f"V: {b} + {side_v:g} (fp16 scale+zero per {g} channels of a token) = {qv:g}; "
                  f"fp16 residual R={w} of {n} tokens: K ({n - w}*{qk:g} + {w}*16)/{n} = {k:.4f}, "
                  f"V ({n - w}*{qv:g} + {w}*16)/{n} = {v:.4f}")
        return Bits(k, v, detail)


def make(setting: str) -> Kivi:
    """``"2"``, ``"3"``, ``"4"`` (bits), optionally ``":r<R>"`` for the fp16 residual (default 128)."""
    parts = [p.strip() for p in str(setting).split(":") if p.strip()]
    if not parts:
        raise MethodError("kivi needs a bit width: kivi:2, kivi:3, kivi:4 (kivi:2:r32 for a 32-token residual)")
    try:
        bits = int(parts[0])
    except ValueError:
        raise MethodError(f"kivi:{setting}: the bit width {parts[0]!r} is not an integer") from None
    residual = RESIDUAL
    for p in parts[1:]:
        if p[:1] == "r" and p[1:].isdigit():
            residual = int(p[1:])
        else:
            raise MethodError(f"kivi:{setting}: unknown option {p!r} (r<R>: the fp16 residual, e.g. r32)")
    return Kivi(bits, residual)
