"""numpy reference of qaq-gguf's own cache types, byte for byte what ggml writes.

``qaq3`` and ``qaq2`` store 32 values per block: two ue5m3 scales (the top byte of an fp16 without its sign, one
per 16 values) and an index per value into a fixed symmetric int8 codebook: 8 levels in 14 bytes (3.5 bits per
value), 4 levels in 10 bytes (2.5 bits). The lean types ``qaq4l``, ``qaq3l`` and ``qaq2l`` store 128 values per
block with one fp16 scale and 16, 8 or 4 levels: 66, 50 and 34 bytes (4.125, 3.125, 2.125 bits). Their head-64
siblings ``qaq4h``, ``qaq3h`` and ``qaq2h`` are the same with 64 values per block: 34, 26 and 18 bytes (4.25, 3.25,
2.25 bits), for head sizes that 128 does not divide. The C layouts
and the quantizer this module ports, operation for operation, are ``native/ggml/ggml-qaq.h`` and ``ggml-qaq.c``;
the design study behind them is ``docs/cache-types.md``.

Use :func:`quantize` / :func:`dequantize` for raw blocks and :func:`roundtrip` for the values the cache holds.
"""

from __future__ import annotations

import numpy as np

QK = 32          # values per block
HALF = 16        # values per scale
NTRY = 11        # scale candidates amax * (0.45 + 0.07 i) / 127
UE5M3_MAX = 0xF7  # largest scale byte with a finite value (61440)

_T4 = np.array([-127, -96, -75, -58, -44, -31, -18, -6, 6, 18, 31, 44, 58, 75, 96, 127], dtype=np.float32)
_T3 = np.array([-127, -79, -45, -14, 14, 45, 79, 127], dtype=np.float32)
_T2 = np.array([-127, -38, 38, 127], dtype=np.float32)
KVALUES = {"qaq3": _T3, "qaq2": _T2, "qaq4l": _T4, "qaq3l": _T3, "qaq2l": _T2, "qaq4h": _T4, "qaq3h": _T3,
           "qaq2h": _T2}
BLOCK_BYTES = {"qaq3": 14, "qaq2": 10, "qaq4l": 66, "qaq3l": 50, "qaq2l": 34, "qaq4h": 34, "qaq3h": 26, "qaq2h": 18}
BLOCK_VALUES = {"qaq3": 32, "qaq2": 32, "qaq4l": 128, "qaq3l": 128, "qaq2l": 128, "qaq4h": 64, "qaq3h": 64,
                "qaq2h": 64}
QKL = 128        # values per lean block
QKH = 64         # values per head-64 block
LEAN = ("qaq4l", "qaq3l", "qaq2l", "qaq4h", "qaq3h", "qaq2h")  # one fp16 scale per block


def _midpoints(t: np.ndarray) -> np.ndarray:
    return ((t[:-1] + t[1:]) / np.float32(2)).astype(np.float32)


MIDS = {name: _midpoints(t) for name, t in KVALUES.items()}


def ue5m3_to_float(b: np.ndarray) -> np.ndarray:
    """Decode ue5m3 scale bytes: the fp16 whose bits are ``b << 7``."""
    return (np.asarray(b, np.uint16) << 7).view(np.float16).astype(np.float32)


_UE5M3 = ue5m3_to_float(np.arange(UE5M3_MAX + 1, dtype=np.uint16))


def ue5m3_floor(v: np.ndarray) -> np.ndarray:
    """The largest scale byte whose value is <= v (0 where none, or where v is not positive)."""
    v = np.asarray(v, np.float32)
    b = np.searchsorted(_UE5M3, v, side="right") - 1
    return np.where(v > 0, np.clip(b, 0, UE5M3_MAX), 0).astype(np.int32)


def _nearest(v: np.ndarray, mids: np.ndarray) -> np.ndarray:
    """Index of the nearest level: the number of midpoints strictly below v (ties go down), as in C."""
    return (v[..., None] > mids).sum(axis=-1)


class _Grid:
    """Nearest-level lookup for one codebook whose midpoints are multiples of 1/2 (every table here): with
    ``c = ceil(2 v)``, a midpoint ``k / 2`` lies strictly below v exactly when ``k < c``, so the index
    :func:`_nearest` counts is a table entry of c clipped to the midpoints' range (NaN counts none, as in C's
    comparisons). Same indices as :func:`_nearest`, a few array passes instead of one per midpoint."""

    def __init__(self, table: np.ndarray, mids: np.ndarray):
        k = mids.astype(np.float64) * 2
        assert np.array_equal(k, np.round(k)), "midpoints must be multiples of 1/2"
        k = k.astype(np.int64)
        self.lo, self.hi = np.float32(k.min()), np.float32(k.max() + 1)
        idx = np.array([(k < c).sum() for c in range(int(k.min()), int(k.max()) + 2)])
        self.idx = idx.astype(np.uint8)
        self.level = table[idx].astype(np.float32)
        self.level2 = (self.level * self.level).astype(np.float32)

    def cell(self, v: np.ndarray) -> np.ndarray:
        """Table positions of v (float32, consumed): ceil(2 v) clipped to [lo, hi], minus lo."""
        np.multiply(v, np.float32(2), out=v)  # exact: doubling
        np.ceil(v, out=v)
        np.fmax(v, self.lo, out=v)  # NaN -> lo: no midpoint below
        np.fmin(v, self.hi, out=v)
        np.subtract(v, self.lo, out=v)
        return v.astype(np.intp)


GRIDS = {name: _Grid(KVALUES[name], MIDS[name]) for name in KVALUES}

_CHUNK = 1 << 16  # values per slice of the vectorised searches (keeps the temporaries in cache)


def _seqsum(p: np.ndarray) -> np.ndarray:
    """Sequential float32 sum over axis 0, from 0.0 in index order (the C loop's ``s += p[j]``)."""
    s = np.zeros(p.shape[1:], np.float32)
    for j in range(p.shape[0]):
        s += p[j]
    return s


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """amax, sequential float32 sum of squares and liveness of rows of x (n, m), as qaq_stats."""
    f32 = np.float32
    n = x.shape[0]
    amax = np.abs(x).max(axis=1) if n else np.zeros(0, f32)
    xt = np.ascontiguousarray(x.T)
    sumx2 = _seqsum(xt * xt)  # sequential float32 sums, as the C loop
    return amax, sumx2, (amax > 0) & np.isfinite(amax)


def _fit(xt: np.ndarray, inv_d: np.ndarray, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """sum_j x_j t_j and sum_j t_j^2 (sequential float32) for rows xt (m, n) (one per column) under each
    inverse scale of inv_d (K, n), t_j the level nearest x_j * inv_d: two (K, n) arrays."""
    v = xt[:, None, :] * inv_d[None, :, :]  # (m, K, n), float32 products as C's x[j] * id
    c = grid.cell(v)
    t = grid.level[c]
    np.multiply(t, xt[:, None, :], out=v)
    return _seqsum(v), _seqsum(grid.level2[c])


def _best_scale(x: np.ndarray, name: str, amax: np.ndarray, sumx2: np.ndarray, live: np.ndarray) -> np.ndarray:
    """Port of ``qaq_best_scale`` for rows of x (n, m): the least-squares scale after the candidate search and one
    refit (rows that are not live get garbage, masked by the caller). All candidate scales of a slice of rows are
    evaluated at once; the sums and the choice (first best on ties) are the C loop's, value for value."""
    n, m = x.shape
    out = np.empty(n, np.float32)
    step = max(1, _CHUNK // (m * NTRY))
    for s0 in range(0, n, step):
        sl = slice(s0, min(n, s0 + step))
        out[sl] = _best_scale_rows(np.ascontiguousarray(x[sl].T), GRIDS[name], amax[sl], sumx2[sl], live[sl])
    return out


_TRY = np.array([np.float32(0.45) + np.float32(0.07) * np.float32(i) for i in range(NTRY)], np.float32)


def _best_scale_rows(xt: np.ndarray, grid: _Grid, amax: np.ndarray, sumx2: np.ndarray,
                     live: np.ndarray) -> np.ndarray:
    f32 = np.float32
    a = np.where(live, amax, f32(1)).astype(f32)

    def fit(inv_d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sqx, sq2 = _fit(xt, inv_d, grid)
        ok = (sqx > 0) & (sq2 > 0)
        ds = (sqx / np.where(ok, sq2, f32(1))).astype(f32)
        err = (sumx2 - ds * sqx).astype(f32)
        return ok, ds, err

    best_err = np.full(a.shape, np.inf, f32)
    best_d = (a / f32(127)).astype(f32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = (a[None, :] * _TRY[:, None] / f32(127)).astype(f32)  # (NTRY, n): a * g / 127, as C
        ok, ds, err = fit((f32(1) / d).astype(f32))
        for i in range(NTRY):  # the C loop's updates, in its order
            upd = ok[i] & (err[i] < best_err)
            best_err = np.where(upd, err[i], best_err)
            best_d = np.where(upd, ds[i], best_d)
        ok, ds, err = fit((f32(1) / best_d).astype(f32)[None, :])
        best_d = np.where(ok[0] & (err[0] < best_err), ds[0], best_d).astype(f32)
    return best_d


def _nearest_index(x: np.ndarray, inv: np.ndarray, name: str) -> np.ndarray:
    """:func:`_nearest` of x * inv[:, None] for rows x (n, m): uint8 (n, m)."""
    g = GRIDS[name]
    return g.idx[g.cell((x * inv[:, None]).astype(np.float32))]


def _quantize_halves(x: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Port of ``qaq_quantize_half`` for many 16-value halves at once: x (n, 16) float32 ->
    (scale bytes (n,), indices (n, 16))."""
    mids = MIDS[name]
    grid = GRIDS[name]
    f32 = np.float32
    n = x.shape[0]
    amax, sumx2, live = _stats(x)
    izero = int(_nearest(np.zeros(1, f32), mids)[0])
    best_d = _best_scale(x, name, amax, sumx2, live)
    xt = np.ascontiguousarray(x.T)  # (16, n)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        b0 = ue5m3_floor(best_d)
        best_b = b0.copy()
        best_e = np.full(n, np.inf, f32)
        for c in range(2):
            b = b0 + c
            valid = b <= UE5M3_MAX
            d = _UE5M3[np.minimum(b, UE5M3_MAX)]
            inv = np.where(d > 0, f32(1) / np.where(d > 0, d, f32(1)), f32(0)).astype(f32)
            r = grid.level[grid.cell(xt * inv)]  # t_j
            r *= d
            np.subtract(xt, r, out=r)  # x_j - d * t_j
            r *= r
            e = _seqsum(r)
            e = np.where(d > 0, e, sumx2)
            upd = valid & (e < best_e)
            best_e = np.where(upd, e, best_e)
            best_b = np.where(upd, b, best_b)
        d = _UE5M3[best_b]
        inv = np.where(d > 0, f32(1) / np.where(d > 0, d, f32(1)), f32(0)).astype(f32)
        idx = _nearest_index(x, inv, name)
    idx = np.where((d > 0)[:, None] & live[:, None], idx, izero)
    best_b = np.where(live, best_b, 0)
    return best_b.astype(np.uint8), idx.astype(np.uint8)


def _pack_low2(idx: np.ndarray) -> np.ndarray:
    """qs bytes of (n, 32) indices: value j's low 2 bits at bits 2*(j/8) of byte j%8."""
    lo = idx & 3
    return (lo[:, 0:8] | lo[:, 8:16] << 2 | lo[:, 16:24] << 4 | lo[:, 24:32] << 6).astype(np.uint8)


def _pack_high1(idx: np.ndarray) -> np.ndarray:
    """qh bytes of (n, 32) 3-bit indices: value j's high bit at bit j%8 of byte j/8."""
    hi = (idx >> 2).reshape(idx.shape[0], 4, 8)
    return (hi << np.arange(8, dtype=np.uint8)).sum(axis=2).astype(np.uint8)


def _quantize_lean(blocks: np.ndarray, name: str) -> np.ndarray:
    """Port of ``quantize_row_qaq{4,3,2}{l,h}_ref``: (nb, 128 or 64) float32 -> (nb, block bytes) uint8."""
    f32 = np.float32
    qk = blocks.shape[1]
    mids = MIDS[name]
    nb = blocks.shape[0]
    amax, sumx2, live = _stats(blocks)
    best_d = _best_scale(blocks, name, amax, sumx2, live)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        h = np.where(live, np.minimum(best_d, f32(65504)), f32(0)).astype(np.float16)  # saturate, as C
        d = h.astype(f32)
        ok = (d > 0) & np.isfinite(d)
        h = np.where(ok, h, np.float16(0))
        inv = np.where(ok, f32(1) / np.where(ok, d, f32(1)), f32(0)).astype(f32)
        idx = _nearest_index(blocks, inv, name)
    izero = int(_nearest(np.zeros(1, f32), mids)[0])
    idx = np.where(ok[:, None], idx, izero).astype(np.uint8)
    sub = idx.reshape(nb * (qk // 32), 32)
    if name in ("qaq4l", "qaq4h"):
        codes = (sub[:, :16] | sub[:, 16:] << 4).astype(np.uint8).reshape(nb, qk // 2)
        parts = [codes]
    else:
        parts = [_pack_low2(sub).reshape(nb, qk // 4)]
        if name in ("qaq3l", "qaq3h"):
            parts.append(_pack_high1(sub).reshape(nb, qk // 8))
    return np.concatenate([h.reshape(nb, 1).view(np.uint8)] + parts, axis=1)


def quantize(x: np.ndarray, name: str) -> np.ndarray:
    """Quantize rows (last axis a multiple of the block size) to raw ``name`` blocks: uint8 (..., blocks * bytes)."""
    if name not in KVALUES:
        raise ValueError(f"unknown qaq type {name!r}; known: {', '.join(KVALUES)}")
    x = np.asarray(x, np.float32)
    qk = BLOCK_VALUES[name]
    if x.shape[-1] % qk:
        raise ValueError(f"{name}: last dimension {x.shape[-1]} is not a multiple of {qk}")
    if name in LEAN:
        out = _quantize_lean(x.reshape(-1, qk), name)
        return out.reshape(*x.shape[:-1], x.shape[-1] // qk * BLOCK_BYTES[name])
    blocks = x.reshape(-1, QK)
    nb = blocks.shape[0]
    d, idx = _quantize_halves(blocks.reshape(-1, HALF), name)
    d = d.reshape(nb, 2)
    idx = idx.reshape(nb, QK).astype(np.uint8)
    parts = [d, _pack_low2(idx)]
    if name == "qaq3":
        parts.append(_pack_high1(idx))
    out = np.concatenate(parts, axis=1).astype(np.uint8)
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK * BLOCK_BYTES[name])


def dequantize(data: np.ndarray, name: str) -> np.ndarray:
    """Raw ``name`` blocks (uint8, last axis a multiple of the block size) -> float32 values."""
    bb = BLOCK_BYTES[name]
    data = np.asarray(data, np.uint8)
    if data.shape[-1] % bb:
        raise ValueError(f"{name}: {data.shape[-1]} bytes is not a whole number of {bb}-byte blocks")
    blk = data.reshape(-1, bb)
    if name in LEAN:
        qk = BLOCK_VALUES[name]
        ng = qk // 32  # 32-value groups per block
        d = np.ascontiguousarray(blk[:, 0:2]).view(np.float16).astype(np.float32)  # (nb, 1)
        nb = blk.shape[0]
        j = np.arange(32)
        if name in ("qaq4l", "qaq4h"):
            qs = blk[:, 2:2 + qk // 2].reshape(nb, ng, 16)
            idx = np.where(j < 16, qs[:, :, j % 16] & 0xF, qs[:, :, j % 16] >> 4)
        else:
            qs = blk[:, 2:2 + qk // 4].reshape(nb, ng, 8)
            idx = (qs[:, :, j % 8] >> (2 * (j // 8))) & 3
            if name in ("qaq3l", "qaq3h"):
                qh = blk[:, 2 + qk // 4:2 + qk // 4 + qk // 8].reshape(nb, ng, 4)
                idx = idx | ((qh[:, :, j // 8] >> (j % 8)) & 1) << 2
        y = (d[:, :, None] * KVALUES[name][idx]).reshape(nb, qk)
        return y.astype(np.float32).reshape(*data.shape[:-1], data.shape[-1] // bb * qk)
    d = ue5m3_to_float(blk[:, 0:2])
    qs = blk[:, 2:10]
    j = np.arange(QK)
    idx = (qs[:, j % 8] >> (2 * (j // 8))) & 3
    if name == "qaq3":
        qh = blk[:, 10:14]
        idx = idx | ((qh[:, j // 8] >> (j % 8)) & 1) << 2
    y = d[:, j // HALF] * KVALUES[name][idx]
    return y.astype(np.float32).reshape(*data.shape[:-1], data.shape[-1] // bb * QK)


def roundtrip(x: np.ndarray, name: str) -> np.ndarray:
    """The values a ``name`` cache holds for x (same shape, float32)."""
    x = np.asarray(x, np.float32)
    return dequantize(quantize(x, name), name).reshape(x.shape)
