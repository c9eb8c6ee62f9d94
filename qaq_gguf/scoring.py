"""QAQ error model: how much one layer's attention output degrades when its K (or V)
cache is stored in a given type.

Inputs are activations of one layer over a calibration sample (numpy arrays):

- ``q``: queries as fed to attention, ``(n_q, n_head, head_dim)``;
- ``k``: keys as stored in the cache (post-RoPE), ``(n_kv, n_head_kv, head_dim)``;
- ``v``: values, ``(n_kv, n_head_kv, head_dim_v)``;
- ``attn``: attention probabilities ``(n_head, n_q, n_kv)``, causal, rows sum to 1.
  When ``None`` it is computed from ``q``/``k`` with :func:`attention_probs`.

Query row ``i`` sits at position ``n_kv - n_q + i`` (queries are the last ``n_q``
tokens; usually ``n_q == n_kv``). GQA: query head ``h`` reads kv head
``h // (n_head // n_head_kv)``. Logits are ``kq_scale * q . k`` (llama.cpp's Gemma 3
pre-scales Q and uses ``kq_scale = 1``).

Quantization error is measured with the real ggml quantizers (gguf-py's numpy ports),
including llama.cpp's Hadamard rotation of quantized K/V, and pushed through QAQ's
sensitivity analysis (arXiv 2403.04643 §3.1, §4.1). Scores are relative: expected
squared output error divided by the mean squared norm of the attention output.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
from gguf import GGMLQuantizationType
import gguf.quants

try:
    from . import cachetypes, quants
except ImportError:  # loaded as a top-level module
    import cachetypes  # type: ignore[no-redef]
    import quants  # type: ignore[no-redef]


# ---------------------------------------------------------------------------
# BLAS threads


def _openblas_thread_calls() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """(get, set) of the thread count of the OpenBLAS numpy uses, or None (another BLAS, or not found)."""
    import ctypes
    import glob
    import os

    root = os.path.dirname(os.path.dirname(np.__file__))
    libs = []
    try:  # the libraries this process has loaded (Linux)
        with open("/proc/self/maps") as f:
            libs = sorted({line.split()[-1] for line in f if "openblas" in line.rsplit("/", 1)[-1].lower()})
    except OSError:
        pass
    libs += sorted(glob.glob(os.path.join(root, "numpy.libs", "*openblas*"))
                   + glob.glob(os.path.join(root, "numpy", ".dylibs", "*openblas*")))
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"),
                               ("openblas", "")):
            get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if get is not None and put is not None:
                get.restype, put.restype, put.argtypes = ctypes.c_int, None, [ctypes.c_int]
                return get, put
    return None


_BLAS_CALLS: list = []


class single_thread_blas:
    """Context manager: numpy's OpenBLAS runs its matrix products on the calling thread only, then gets its thread
    count back. For work already spread over threads (calibration scores layers in parallel), where BLAS's own
    threads only compete for the same cores: on 2 busy cores they made the scoring's small products ~40x slower.
    A BLAS that is not OpenBLAS is left as it is. The results are the same: OpenBLAS splits a product's rows and
    columns among its threads, never a dot product's sum."""

    def __enter__(self):
        if not _BLAS_CALLS:
            try:
                _BLAS_CALLS.append(_openblas_thread_calls())
            except Exception:
                _BLAS_CALLS.append(None)
        self.calls, self.saved = _BLAS_CALLS[0], None
        if self.calls is not None:
            self.saved = self.calls[0]()
            self.calls[1](1)
        return self

    def __exit__(self, *exc) -> None:
        if self.calls is not None and self.saved:
            self.calls[1](self.saved)


# ---------------------------------------------------------------------------
# Hadamard rotation (llama.cpp attn_rot_k / attn_rot_v)


@lru_cache(maxsize=None)
def _hadamard_cached(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    h = (h / np.sqrt(n)).astype(np.float32)
    h.setflags(write=False)
    return h


def hadamard(n: int) -> np.ndarray:
    """Sylvester Hadamard matrix of order ``n`` scaled by ``1/sqrt(n)`` (``H @ H = I``).

    Same construction as llama.cpp's ``ggml_gen_hadamard``; ``n`` must be a power of two.
    The returned float32 array is read-only.
    """
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {n}")
    return _hadamard_cached(n)


def rotate(x: np.ndarray, n: int) -> np.ndarray:
    """Apply ``hadamard(n)`` block-diagonally along the last axis (blocks of ``n``).

    The matrix is symmetric and its own inverse, so ``rotate(rotate(x, n), n) == x``.
    """
    return _rotate(x, n)


def _rotate(x: np.ndarray, n: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    d = x.shape[-1]
    if d % n:
        raise ValueError(f"last dimension {d} is not a multiple of the rotation size {n}")
    y = x.reshape(*x.shape[:-1], d // n, n) @ hadamard(n)
    return y.reshape(x.shape)


def rotation_size(head_dim: int, is_v: bool) -> int | None:
    """Rotation block llama.cpp uses for a quantized K (``is_v=False``) or V cache.

    ``None`` when ``head_dim % 64 != 0`` (no rotation). K uses the largest power of two
    >= 64 that divides ``head_dim`` (256 -> 256, 128 -> 128, 192 -> 64); V always 64.
    """
    if head_dim <= 0 or head_dim % 64:
        return None
    if is_v:
        return 64
    n = 64
    while head_dim % (2 * n) == 0:
        n *= 2
    return n


# ---------------------------------------------------------------------------
# Quantize / dequantize round trip

_IQ4NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)


def _quantize_iq4_nl(x: np.ndarray) -> np.ndarray:
    """Port of ggml's ``quantize_row_iq4_nl_ref`` (what the CPU cache writes with
    ``set_rows``): one weighted least-squares pass, no scale search (``ntry = -1``).

    gguf-py 0.19.0 has only the iq4_nl dequantizer; its model quantizer (``ntry = 7``)
    would differ from the cache path anyway. Returns the raw 18-byte blocks.
    """
    blocks = x.reshape(-1, 32).astype(np.float32)
    n = blocks.shape[0]
    imax = np.abs(blocks).argmax(axis=1)
    vmax = blocks[np.arange(n), imax]
    live = np.abs(vmax) >= np.float32(1e-15)
    d = np.where(live, vmax / _IQ4NL_VALUES[0], np.float32(1)).astype(np.float32)
    al = (np.float32(1) / d)[:, None] * blocks
    # best_index_int8: nearest table value, ties to the upper one
    mu = np.clip(np.searchsorted(_IQ4NL_VALUES, al, side="right"), 1, 15)
    lo, hi = _IQ4NL_VALUES[mu - 1], _IQ4NL_VALUES[mu]
    idx = np.where(al - lo < hi - al, mu - 1, mu)
    idx = np.where(al <= _IQ4NL_VALUES[0], 0, np.where(al >= _IQ4NL_VALUES[15], 15, idx))
    qv = _IQ4NL_VALUES[idx]
    w = blocks * blocks
    # sequential float32 sums, as in the C loop
    sumqx = np.cumsum(w * qv * blocks, axis=1, dtype=np.float32)[:, -1]
    sumq2 = np.cumsum(w * qv * qv, axis=1, dtype=np.float32)[:, -1]
    scale = np.where(live & (sumq2 > 0), sumqx / np.where(sumq2 > 0, sumq2, 1), 0).astype(np.float16)
    idx = np.where(live[:, None], idx, 8).astype(np.uint8)
    qs = idx[:, :16] | (idx[:, 16:] << 4)
    out = np.concatenate([scale.reshape(n, 1).view(np.uint8), qs], axis=1)
    return out.reshape(*x.shape[:-1], x.shape[-1] // 32 * 18)


# Cache types whose quantizer is implemented here rather than taken from gguf.quants.
_LOCAL_QUANTIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "iq4_nl": _quantize_iq4_nl,
}


def _roundtrip_plain(x: np.ndarray, ct: cachetypes.CacheType) -> np.ndarray:
    if ct.name == "f32":
        return x.copy()
    if x.shape[-1] % ct.block_size:
        raise ValueError(f"{ct.name}: last dimension {x.shape[-1]} is not a multiple of the block size {ct.block_size}")
    if ct.name in quants.BLOCK_BYTES:  # our own types (qaq, tcq)
        return quants.roundtrip(x, ct.name)
    try:
        qtype = GGMLQuantizationType(ct.type_id)
    except ValueError:
        raise NotImplementedError(f"gguf-py does not know cache type {ct.name} (ggml type {ct.type_id})") from None
    local = _LOCAL_QUANTIZERS.get(ct.name)
    traits = getattr(gguf.quants, "_type_traits", {}).get(qtype)
    try:
        if traits is not None and not local:  # all rows in one call: gguf.quants.quantize goes 16 rows at a time
            rows = x.reshape(-1, x.shape[-1])  # through the same per-block functions
            traits.init_grid()
            y = traits.dequantize_rows(traits.quantize_rows(rows))
        else:
            data = local(x) if local else gguf.quants.quantize(x, qtype)
            y = gguf.quants.dequantize(data, qtype)
    except NotImplementedError:
        raise NotImplementedError(f"gguf.quants has no numpy quantize/dequantize for cache type {ct.name}") from None
    return np.asarray(y, dtype=np.float32).reshape(x.shape)


def quant_roundtrip(x: np.ndarray, type_name: str, *, is_v: bool = False, rotate: bool | None = None) -> np.ndarray:
    """Quantize and dequantize the rows (last axis, usually head_dim) of ``x`` as the
    KV cache stores them in ``type_name``; returns float32 in the original space.

    ``rotate=None`` follows llama.cpp: quantized types are stored Hadamard-rotated
    (block :func:`rotation_size` for K or, with ``is_v=True``, for V) when head_dim
    is a multiple of 64. The error is then measured after un-rotating, which is what
    attention sees: for K the runtime rotates Q too, and ``(Hq) . Q(Hk) = q . H Q(Hk)``.
    ``rotate=True`` forces the rotation (ValueError if head_dim % 64 != 0); ``False``
    disables it.
    """
    ct = cachetypes.get(type_name)
    x = np.asarray(x, dtype=np.float32)
    n = rotation_size(x.shape[-1], is_v)
    if rotate is None:
        rotate = ct.is_quantized and n is not None
    if rotate and n is None:
        raise ValueError(f"cannot rotate rows of length {x.shape[-1]}: not a multiple of 64")
    if not rotate:
        return _roundtrip_plain(x, ct)
    return _rotate(_roundtrip_plain(_rotate(x, n), ct), n)


# ---------------------------------------------------------------------------
# Attention helpers


def attention_probs(q: np.ndarray, k: np.ndarray, *, kq_scale: float = 1.0, n_swa: int | None = None) -> np.ndarray:
    """Causal softmax ``(n_head, n_q, n_kv)`` of ``kq_scale * q . k``; query ``i`` sits at
    position ``n_kv - n_q + i`` and, with ``n_swa``, sees only the last ``n_swa`` tokens."""
    n_q, n_head, _ = q.shape
    n_kv, n_head_kv, _ = k.shape
    group = n_head // n_head_kv
    pos = np.arange(n_q)[:, None] + (n_kv - n_q)
    t = np.arange(n_kv)[None, :]
    visible = t <= pos
    if n_swa is not None:
        visible &= pos - t < n_swa
    out = np.empty((n_head, n_q, n_kv), dtype=np.float32)
    for h in range(n_head):
        logits = kq_scale * (q[:, h, :].astype(np.float32) @ k[:, h // group, :].astype(np.float32).T)
        logits = np.where(visible, logits, -np.inf)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        out[h] = p / p.sum(axis=1, keepdims=True)
    return out


@dataclass
class _Layer:
    """Per-layer data shared by all candidates: sampled query rows and exact outputs."""

    q: np.ndarray  # (n_q, n_head, D) float32, all rows
    v: np.ndarray  # (n_kv, n_head_kv, Dv) float32
    attn: np.ndarray  # (n_head, n_q, n_kv)
    rows: np.ndarray  # sampled query rows
    x: np.ndarray  # (n_head, n_rows, Dv) exact attention output at the sampled rows
    x_norm: float  # mean ||X_i||^2 over sampled rows and heads
    group: int
    kq_scale: float
    _rows_cache: dict = None  # per-head sampled rows of attn and q, shared by all candidates

    def attn_rows(self, h: int) -> np.ndarray:
        """``attn[h][rows]`` (computed once)."""
        return self._rows(("attn", h), lambda: self.attn[h][self.rows])

    def q_rows(self, h: int) -> np.ndarray:
        """``q[rows, h, :]`` (computed once)."""
        return self._rows(("q", h), lambda: self.q[self.rows, h, :])

    def _rows(self, key, make) -> np.ndarray:
        if self._rows_cache is None:
            self._rows_cache = {}
        out = self._rows_cache.get(key)
        if out is None:
            out = self._rows_cache[key] = make()
        return out


def _prepare(q, k, v, attn, *, kq_scale: float, max_queries: int | None, seed: int, n_swa: int | None) -> _Layer:
    q = np.asarray(q, dtype=np.float32)
    k = np.asarray(k, dtype=np.float32)
    v = np.asarray(v, dtype=np.float32)
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError("q, k, v must be 3-D: (tokens, heads, head_dim)")
    n_q, n_head, d = q.shape
    n_kv, n_head_kv, dk = k.shape
    if dk != d or v.shape[:2] != (n_kv, n_head_kv):
        raise ValueError(f"inconsistent shapes q{q.shape} k{k.shape} v{v.shape}")
    if n_head % n_head_kv:
        raise ValueError(f"n_head {n_head} is not a multiple of n_head_kv {n_head_kv}")
    if attn is None:
        attn = attention_probs(q, k, kq_scale=kq_scale, n_swa=n_swa)
    attn = np.asarray(attn, dtype=np.float32)
    if attn.shape != (n_head, n_q, n_kv):
        raise ValueError(f"attn has shape {attn.shape}, expected {(n_head, n_q, n_kv)}")
    rows = np.arange(n_q)
    if max_queries is not None and max_queries < n_q:
        rows = np.sort(np.random.default_rng(seed).choice(n_q, size=max_queries, replace=False))
    group = n_head // n_head_kv
    x = np.stack([attn[h][rows] @ v[:, h // group, :] for h in range(n_head)])
    x_norm = float(np.mean(np.sum(x.astype(np.float64) ** 2, axis=-1)))
    return _Layer(q, v, attn, rows, x, x_norm, group, float(kq_scale))


def _relative(total: float, count: int, layer: _Layer) -> float:
    return total / count / max(layer.x_norm, np.finfo(np.float64).tiny)


# ---------------------------------------------------------------------------
# Error models, given the cache error dk = k_hat - k or dv = v_hat - v


def query_dot_type(k_type: str) -> str:
    """The type llama.cpp rounds Q to before the dot product with a K cache of ``k_type`` (ggml-cpu's flash
    attention converts Q to K's ``vec_dot_type``: q8_0 for the quantized cache types, q8_1 — the same rounding
    of the values — for q4_1/q5_1; f16 for an f16 cache). CUDA's vector kernel likewise quantizes Q to 8 bits."""
    ct = cachetypes.get(k_type)
    return "q8_0" if ct.is_quantized else ct.name


def query_roundtrip(q: np.ndarray, k_type: str, *, rotate: bool | None = None) -> np.ndarray:
    """Q as the attention kernel sees it for a K cache of ``k_type`` (rotated like K, rounded, un-rotated)."""
    ct = cachetypes.get(k_type)
    n = rotation_size(q.shape[-1], False)
    if rotate is None:
        rotate = ct.is_quantized and n is not None
    qt = cachetypes.get(query_dot_type(k_type))
    if not rotate:
        return _roundtrip_plain(np.asarray(q, np.float32), qt)
    return _rotate(_roundtrip_plain(_rotate(np.asarray(q, np.float32), n), qt), n)


def _key_measured(layer: _Layer, dk: np.ndarray, dq: np.ndarray | None = None,
                  k_hat: np.ndarray | None = None) -> float:
    """First-order output error: dX_i = sum_t S_it e_it (v_t - X_i), e_it = s (q_hat_i . k_hat_t - q_i . k_t),
    where q_hat = q + dq is Q as the kernel rounds it (``dq`` None: Q exact, e_it = s q_i . dk_t). ``dq`` is
    ``(n_q, n_head, D)``, or already the sampled rows per head (:func:`_dq_rows`)."""
    if dq is not None and not isinstance(dq, list):
        dq = _dq_rows(layer, dq)
    total = 0.0
    for h in range(layer.q.shape[1]):
        g = h // layer.group
        s = layer.attn_rows(h)
        e = layer.kq_scale * (layer.q_rows(h) @ dk[:, g, :].T)
        if dq is not None:
            e += layer.kq_scale * (dq[h] @ k_hat[:, g, :].T)
        p = s * e
        dx = p @ layer.v[:, g, :] - p.sum(axis=1, keepdims=True) * layer.x[h]
        total += float(np.sum(dx.astype(np.float64) ** 2))
    return _relative(total, layer.x.shape[0] * layer.x.shape[1], layer)


def _dq_rows(layer: _Layer, dq: np.ndarray) -> list[np.ndarray]:
    """``dq[rows, h, :]`` for each query head."""
    return [dq[layer.rows, h, :] for h in range(dq.shape[1])]


def _key_qaq(layer: _Layer, dk: np.ndarray) -> float:
    """QAQ §4.1: logit noise of variance ||q||^2 sigma_K,t^2 (||q||^2 at its 90th
    percentile), softmax noise sigma_S,t^2 = T^-2 (1 - 1/T) (exp(||q||^2 sigma_K,t^2) - 1),
    output error sum_t sigma_S,t^2 ||v_t - mean(v)||^2 over the T visible tokens.
    Uses the attention only to know which tokens are visible (attn > 0)."""
    total = 0.0
    sigma2 = np.mean(dk.astype(np.float64) ** 2, axis=-1)  # (n_kv, n_head_kv)
    for h in range(layer.q.shape[1]):
        g = h // layer.group
        qn = layer.kq_scale**2 * np.sum(layer.q[:, h, :].astype(np.float64) ** 2, axis=-1)
        f = np.expm1(np.percentile(qn, 90) * sigma2[:, g])  # (n_kv,)
        m = (layer.attn[h][layer.rows] > 0).astype(np.float64)
        vg = layer.v[:, g, :].astype(np.float64)
        n_vis = np.maximum(m.sum(axis=1), 1)
        vbar = (m @ vg) / n_vis[:, None]
        spread = m @ (f * np.sum(vg**2, axis=-1)) - 2 * np.sum(vbar * (m @ (f[:, None] * vg)), axis=1)
        spread += np.sum(vbar**2, axis=1) * (m @ f)
        total += float(np.sum((1 - 1 / n_vis) / n_vis**2 * spread))
    return _relative(total, layer.x.shape[0] * layer.x.shape[1], layer)


def _value_measured(layer: _Layer, dv: np.ndarray) -> float:
    """dX_i = sum_t S_it (v_hat_t - v_t) with the real attention."""
    total = 0.0
    for h in range(layer.x.shape[0]):
        dx = layer.attn_rows(h) @ dv[:, h // layer.group, :]
        total += float(np.sum(dx.astype(np.float64) ** 2))
    return _relative(total, layer.x.shape[0] * layer.x.shape[1], layer)


def _value_qaq(layer: _Layer, dv: np.ndarray, window: int) -> float:
    """QAQ §4.1 with the window rule (§3.2): sum_t S_hat_t^2 ||v_hat_t - v_t||^2, where
    S_hat_t is the max attention token t got over the last ``window`` query rows."""
    total = 0.0
    err = np.sum(dv.astype(np.float64) ** 2, axis=-1)  # (n_kv, n_head_kv)
    for h in range(layer.x.shape[0]):
        a = layer.attn[h]
        s_hat = a[layer.rows]
        for o in range(1, window):
            s_hat = np.maximum(s_hat, a[np.maximum(layer.rows - o, 0)])
        total += float(np.sum(s_hat.astype(np.float64) ** 2 @ err[:, h // layer.group]))
    return _relative(total, layer.x.shape[0] * layer.x.shape[1], layer)


def _check_method(method: str) -> None:
    if method not in ("measured", "qaq"):
        raise ValueError(f"unknown method {method!r}; use 'measured' or 'qaq'")


# ---------------------------------------------------------------------------
# Public scores


def key_score(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    attn: np.ndarray | None,
    type_name: str,
    *,
    method: str = "measured",
    kq_scale: float = 1.0,
    rotate: bool | None = None,
    max_queries: int | None = None,
    seed: int = 0,
    n_swa: int | None = None,
) -> float:
    """Relative attention-output error when this layer's K is stored in ``type_name``.

    ``method="measured"``: mean over (sampled query rows, heads) of
    ``||sum_t S_it e_it (v_t - X_i)||^2`` with ``e_it = kq_scale * q_i . (k_hat_t - k_t)``,
    the first-order effect of the real quantization error on ``X_i = sum_t S_it v_t``.
    ``method="qaq"``: QAQ's closed form (see ``_key_qaq``). Both are divided by the mean
    ``||X_i||^2``. ``max_queries`` subsamples query rows with ``seed``; ``n_swa`` only
    matters when ``attn`` is None.
    """
    _check_method(method)
    layer = _prepare(q, k, v, attn, kq_scale=kq_scale, max_queries=max_queries, seed=seed, n_swa=n_swa)
    k = np.asarray(k, dtype=np.float32)
    dk = quant_roundtrip(k, type_name, rotate=rotate) - k
    return _key_measured(layer, dk) if method == "measured" else _key_qaq(layer, dk)


def value_score(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    attn: np.ndarray | None,
    type_name: str,
    *,
    method: str = "measured",
    kq_scale: float = 1.0,
    rotate: bool | None = None,
    window: int = 5,
    max_queries: int | None = None,
    seed: int = 0,
    n_swa: int | None = None,
) -> float:
    """Relative attention-output error when this layer's V is stored in ``type_name``.

    ``method="measured"``: mean of ``||sum_t S_it (v_hat_t - v_t)||^2`` with the real
    attention. ``method="qaq"``: ``sum_t S_hat_it^2 ||v_hat_t - v_t||^2`` (independent
    noise), ``S_hat_it`` the max of ``S_jt`` over rows ``j`` in ``(i - window, i]``.
    Both are divided by the mean ``||X_i||^2``. ``q``/``k`` are needed only to compute
    ``attn`` when it is None.
    """
    _check_method(method)
    layer = _prepare(q, k, v, attn, kq_scale=kq_scale, max_queries=max_queries, seed=seed, n_swa=n_swa)
    v = np.asarray(v, dtype=np.float32)
    dv = quant_roundtrip(v, type_name, is_v=True, rotate=rotate) - v
    return _value_measured(layer, dv) if method == "measured" else _value_qaq(layer, dv, window)


def score_layer(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    attn: np.ndarray | None,
    candidates: Sequence[str] = cachetypes.DEFAULT_CANDIDATES,
    *,
    method: str = "measured",
    kq_scale: float = 1.0,
    rotate: bool | None = None,
    window: int = 5,
    max_queries: int | None = None,
    seed: int = 0,
    n_swa: int | None = None,
    round_q: bool = True,
    k_mean: np.ndarray | None = None,
    k_scale: np.ndarray | None = None,
    v_mean: np.ndarray | None = None,
    exact_rows: np.ndarray | None = None,
) -> dict[str, tuple[float, float]]:
    """``{type: (key_score, value_score)}`` for every candidate cache type of one layer.

    Same arguments as :func:`key_score` / :func:`value_score`; the attention output and
    the query sample are computed once and shared by all candidates. ``round_q`` (measured
    method) includes the kernel's rounding of Q to K's dot-product type
    (:func:`query_dot_type`): it is why 8-bit keys cost more than 8-bit values.

    The profile's K/V transforms (transforms.py), each exact for attention, change only what the cache has to
    represent: ``k_mean`` (``(n_head_kv, head_dim)``) keys stored centred, ``k - k_mean``; ``k_scale`` keys stored
    as ``k_scale * (k - k_mean)`` and queries read as ``q / k_scale``; ``v_mean`` values stored as ``v - v_mean``;
    ``exact_rows`` (cache rows, e.g. ``[0]`` for BOS) stored exactly (the centring vectors put them on the grid).
    """
    _check_method(method)
    q = np.asarray(q, dtype=np.float32)
    k = np.asarray(k, dtype=np.float32)
    v = np.asarray(v, dtype=np.float32)
    if k_mean is not None:
        k = k - np.asarray(k_mean, dtype=np.float32)  # what the cache stores; the logit error is the same
    if k_scale is not None:
        d = np.asarray(k_scale, dtype=np.float32)
        k = k * d
        q = q / np.repeat(d, q.shape[1] // d.shape[0], axis=0)  # query head h reads KV head h // group
    if v_mean is not None:
        v_stored = v - np.asarray(v_mean, dtype=np.float32)
    else:
        v_stored = v
    layer = _prepare(q, k, v, attn, kq_scale=kq_scale, max_queries=max_queries, seed=seed, n_swa=n_swa)
    k_rt, v_rt = _Roundtrips(k, rotate, False), _Roundtrips(v_stored, rotate, True)
    dq_cache: dict = {}
    scores: dict[str, tuple[float, float]] = {}
    for name in candidates:
        k_hat = k_rt(name)
        dk = k_hat - k
        dv = v_rt(name) - v_stored
        if exact_rows is not None and len(exact_rows):
            k_hat[exact_rows] = k[exact_rows]
            dk[exact_rows] = 0.0
            dv[exact_rows] = 0.0
        if method == "measured":
            dq = None
            if round_q:  # the same for every candidate with the same dot type and rotation: computed once
                key = (query_dot_type(name), _rotation_of(q.shape[-1], name, rotate, False))
                if key not in dq_cache:
                    dq_cache[key] = _dq_rows(layer, query_roundtrip(layer.q, name, rotate=rotate) - layer.q)
                dq = dq_cache[key]
            scores[name] = (_key_measured(layer, dk, dq, k_hat), _value_measured(layer, dv))
        else:
            scores[name] = (_key_qaq(layer, dk), _value_qaq(layer, dv, window))
    return scores


def _rotation_of(d: int, type_name: str, rotate: bool | None, is_v: bool) -> int | None:
    """The rotation block :func:`quant_roundtrip` uses for rows of ``d`` values in ``type_name`` (None: none)."""
    ct = cachetypes.get(type_name)
    n = rotation_size(d, is_v)
    if rotate is None:
        rotate = ct.is_quantized and n is not None
    if rotate and n is None:
        raise ValueError(f"cannot rotate rows of length {d}: not a multiple of 64")
    return n if rotate else None


class _Roundtrips:
    """:func:`quant_roundtrip` of one array under many types, the rotated input computed once per rotation."""

    def __init__(self, x: np.ndarray, rotate: bool | None, is_v: bool):
        self.x, self.rotate, self.is_v = x, rotate, is_v
        self.rotated: dict[int, np.ndarray] = {}

    def __call__(self, type_name: str) -> np.ndarray:
        ct = cachetypes.get(type_name)
        n = _rotation_of(self.x.shape[-1], type_name, self.rotate, self.is_v)
        if n is None:
            return _roundtrip_plain(self.x, ct)
        if n not in self.rotated:
            self.rotated[n] = _rotate(self.x, n)
        return _rotate(_roundtrip_plain(self.rotated[n], ct), n)
