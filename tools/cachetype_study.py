#!/usr/bin/env python3
"""Design study for sub-4-bit KV cache block types (`qaq3` <= 3.5 and `qaq2` <= 2.5 bits per value).

Collects real K, V, Q and attention probabilities of a model (default: the bundled Gemma 3 270M) on calibration
text through llama.cpp (`qaq_gguf.collect.iter_chunks`), then runs numpy quantize -> dequantize round trips of
candidate block layouts -- uniform asymmetric/symmetric, fixed non-uniform (Lloyd-Max) codebooks with a searched
block scale, 8-bit float scales, k-quant-like sub-block scales, in-block fp16 outliers, small vector codebooks --
inside llama.cpp's Hadamard rotation (and, for comparison, without it), and measures per layer, for K and for V:

- the relative MSE ||x^ - x||^2 / ||x||^2 of the cache;
- the attention-output error of `qaq_gguf.scoring`'s measured model (relative to the layer's mean ||X||^2):
  key:   dX_i = sum_t S_it e_it (v_t - X_i),  e_it = s (q^_i . k^_t - q_i . k_t)  (q^: Q rounded to q8_0, as
         ggml's flash attention does for every quantized K type; `score_exact_q` leaves Q exact);
  value: dX_i = sum_t S_it (v^_t - v_t).

The existing cache types (q8_0, q5_0, q4_0, iq4_nl) are scored the same way with `scoring.quant_roundtrip`.
Results go to a JSON file (default docs/results/cachetype_study.json) and a table on stdout. Nothing here is a
kernel: these are numpy models of block formats (docs/cache-types.md discusses layouts and kernels).

Run (about 3-4 minutes on one core):

    PYTHONPATH=/work/main python3 tools/cachetype_study.py
"""
from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # stay light on a shared machine
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import qaq_gguf  # noqa: E402,F401  (must come before anything imports llama_cpp)
from qaq_gguf import cachetypes, collect, scoring  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "wikitext-2-valid.txt"
DEFAULT_OUT = REPO / "docs" / "results" / "cachetype_study.json"
REFERENCE_TYPES = ("q8_0", "q5_0", "q4_0", "iq4_nl")
BASELINE = "q4_0"

# ---------------------------------------------------------------------------------------------------------------
# Codebooks. Every codebook is stored as int8 levels (like iq4_nl's kvalues_iq4nl), so a kernel can look the codes
# up in a 4/8/16-entry byte table (pshufb on AVX2, __byte_perm / a register table on CUDA) and feed int8 dot
# products against q8 queries.

# Lloyd-Max quantizer of a unit Gaussian (Max 1960): positive half of the levels.
LLOYD_MAX = {
    1: [0.7979],
    2: [0.4528, 1.5104],
    3: [0.2451, 0.7560, 1.3439, 2.1520],
    4: [0.1284, 0.3881, 0.6568, 0.9424, 1.2562, 1.6181, 2.0690, 2.7326],
}


def int8_table(pos_levels) -> np.ndarray:
    """Symmetric int8 table from positive levels, scaled so the largest is 127."""
    p = np.asarray(pos_levels, dtype=np.float64)
    p = np.round(p / p.max() * 127)
    return np.concatenate([-p[::-1], p]).astype(np.float32)


def uniform_table(bits: int) -> np.ndarray:
    """Symmetric mid-rise uniform levels +-1, +-3, ... (no zero level), as int8."""
    n = 1 << bits
    return (2 * np.arange(n) - (n - 1)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Scale formats


def f16(a):
    return np.asarray(a, dtype=np.float32).astype(np.float16).astype(np.float32)


def ufloat_grid(d: np.ndarray, mbits: int) -> tuple[np.ndarray, np.ndarray]:
    """The two neighbours (below, above) of positive ``d`` on an unsigned 8-bit float grid that is the top byte of
    an fp16 (5 exponent bits, ``mbits`` mantissa bits, bias 15; decode: ``fp16_bits = byte << (10 - mbits)``).
    ``mbits = 3``: ue5m3 (one byte); ``mbits = 0``: a power of two (like MX's e8m0 but with fp16's range)."""
    shift = 10 - mbits
    h = np.asarray(d, dtype=np.float32).astype(np.float16)
    u = h.view(np.uint16).astype(np.int64) & 0x7FFF
    lo = (u >> shift) << shift
    hi = np.where(lo == u, lo, lo + (1 << shift))
    hi = np.minimum(hi, 0x7BFF >> shift << shift)  # stay finite
    cast = lambda v: v.astype(np.uint16).view(np.float16).astype(np.float32)  # noqa: E731
    return cast(lo), cast(hi)


# ---------------------------------------------------------------------------------------------------------------
# Quantizers. Each takes rows ``x`` (n, D) float32 and returns the dequantized rows.

SCALE_GRID = np.linspace(0.45, 1.15, 11)  # candidate d = amax * g / max|level|  (cf. iq4_nl's ntry search)
VQ_GRID = np.linspace(0.75, 1.25, 9)     # candidate d = rms * g / rms(codebook)


def q_ggml0(x: np.ndarray, bits: int, block: int) -> np.ndarray:
    """ggml's q4_0 recipe at ``bits``: d = (signed absmax) / -2^(b-1), codes 0..2^b-1, fp16 d."""
    xb = x.reshape(-1, block)
    half = 1 << (bits - 1)
    i = np.abs(xb).argmax(axis=1)
    mx = xb[np.arange(len(xb)), i]
    d = mx / -half
    inv = np.where(d != 0, 1 / np.where(d != 0, d, 1), 0)
    q = np.minimum((1 << bits) - 1, np.floor(xb * inv[:, None] + half + 0.5))
    return ((q - half) * f16(d)[:, None]).reshape(x.shape)


def q_ggml1(x: np.ndarray, bits: int, block: int) -> np.ndarray:
    """ggml's q4_1 recipe at ``bits`` (KIVI's per-token quantizer): min/max, d = (max-min)/(2^b-1), fp16 d and m."""
    xb = x.reshape(-1, block)
    mn, mx = xb.min(axis=1), xb.max(axis=1)
    d = (mx - mn) / ((1 << bits) - 1)
    inv = np.where(d != 0, 1 / np.where(d != 0, d, 1), 0)
    q = np.minimum((1 << bits) - 1, np.floor((xb - mn[:, None]) * inv[:, None] + 0.5))
    return (q * f16(d)[:, None] + f16(mn)[:, None]).reshape(x.shape)


def q_upstream_q2_0(x: np.ndarray) -> np.ndarray:
    """Port of ggml's quantize_row_q2_0_ref / dequantize_row_q2_0 (GGML_TYPE_Q2_0 = 42 in the pinned tree, a weight
    type not on the KV whitelist): block 64, fp16 d = absmax, codes round(x/d)+1 clamped to 0..3, value (q-1) d."""
    xb = x.reshape(-1, 64)
    d = np.abs(xb).max(axis=1)
    inv = np.where(d > 0, 1 / np.where(d > 0, d, 1), 0)
    t = xb * inv[:, None]
    q = np.clip(np.sign(t) * np.floor(np.abs(t) + 0.5) + 1, 0, 3)  # roundf: half away from zero
    return ((q - 1) * f16(d)[:, None]).reshape(x.shape)


def _nearest(y: np.ndarray, table: np.ndarray) -> np.ndarray:
    mids = (table[1:] + table[:-1]) / 2
    return np.searchsorted(mids, y)


def _ls(xb, w, q):
    """Least-squares scale for fixed levels q, and the weighted error it leaves."""
    sxq = np.sum(w * xb * q, axis=1)
    sqq = np.sum(w * q * q, axis=1)
    sxx = np.sum(w * xb * xb, axis=1)
    d = sxq / np.where(sqq > 0, sqq, 1)
    return d, sxx - sxq * d


def _err_at(xb, w, table, d):
    """Error of nearest-level assignment at fixed scale ``d`` (n,)."""
    ds = np.where(d > 0, d, 1)
    q = table[_nearest(xb / ds[:, None], table)]
    q = np.where((d > 0)[:, None], q, 0)
    return np.sum(w * (xb - d[:, None] * q) ** 2, axis=1), q


def search_scale(xb: np.ndarray, w: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Per-row float scale for a scalar codebook: try d = amax * g / max|level| on SCALE_GRID, assign each value to
    the nearest level, refit d by weighted least squares, keep the best, then one more assign + refit."""
    lmax = float(np.abs(table).max())
    amax = np.max(np.abs(xb) * (w > 0), axis=1)
    base = np.where(amax > 0, amax, 1) / lmax
    best_e = np.full(len(xb), np.inf)
    best_d = np.zeros(len(xb), dtype=np.float32)
    for g in SCALE_GRID:
        q = table[_nearest(xb / (base * g)[:, None], table)]
        d, e = _ls(xb, w, q)
        better = e < best_e
        best_e = np.where(better, e, best_e)
        best_d = np.where(better, d, best_d)
    q = table[_nearest(xb / np.where(best_d > 0, best_d, 1)[:, None], table)]
    d, e = _ls(xb, w, q)
    best_d = np.where(e < best_e, d, best_d)
    return np.where(amax > 0, np.maximum(best_d, 0), 0).astype(np.float32)


def q_codebook(x: np.ndarray, table: np.ndarray, block: int, *, scale: str = "f16", sub: int | None = None,
               outliers: int = 0, weight: str = "mse") -> np.ndarray:
    """Scalar codebook ``table`` (int8 levels) times a per-block scale.

    ``scale``: "f16"; "ue5m3"/"ue5m0" (8-bit unsigned float = fp16's top byte; the better of the two grid
    neighbours of the searched scale, with codes re-assigned); "k4": one fp16 super-scale per ``block`` and one
    4-bit multiplier (1..15) per sub-block of ``sub`` values (k-quant style). ``sub`` (with f16/ue5m*) gives each
    sub-block its own scale. ``outliers``: that many largest-|x| values per block are stored as exact fp16 (with an
    index) and left out of the scale fit. ``weight``: "mse" (plain squared error) or "x2" (errors weighted by
    x^2 + mean x^2 of the block, in the spirit of ggml's make_qx_quants / iq4_nl weights: large values, which
    dominate q.k for the queries that attend to this key, are fitted more closely)."""
    xb = x.reshape(-1, block).astype(np.float32)
    n = len(xb)
    if weight == "mse":
        w = np.ones_like(xb)
    elif weight == "x2":
        w = xb * xb + np.mean(xb * xb, axis=1, keepdims=True)
    else:
        raise ValueError(weight)
    out_mask = None
    if outliers:
        top = np.argsort(-np.abs(xb), axis=1)[:, :outliers]
        out_mask = np.zeros(xb.shape, dtype=bool)
        out_mask[np.arange(n)[:, None], top] = True
        w = np.where(out_mask, 0.0, w).astype(np.float32)
    g = sub or block
    xs, ws = xb.reshape(-1, g), w.reshape(-1, g)
    d = search_scale(xs, ws, table)
    if scale == "f16":
        _, q = _err_at(xs, ws, table, d)  # codes from the float scale, stored scale rounded (as ggml does)
        y = f16(d)[:, None] * q
    elif scale in ("ue5m3", "ue5m0"):
        lo, hi = ufloat_grid(d, 3 if scale == "ue5m3" else 0)
        e_lo, q_lo = _err_at(xs, ws, table, lo)
        e_hi, q_hi = _err_at(xs, ws, table, hi)
        pick = (e_hi < e_lo)[:, None]
        y = np.where(pick, hi[:, None] * q_hi, lo[:, None] * q_lo)
    elif scale == "k4":
        if not sub:
            raise ValueError("k4 needs sub")
        ds = d.reshape(n, block // g)
        dsup = f16(ds.max(axis=1) / 15)
        ratio = ds / np.where(dsup > 0, dsup, 1)[:, None]
        cands = [np.clip(np.floor(ratio), 1, 15), np.clip(np.ceil(ratio), 1, 15)]
        best_e, best_y = None, None
        for c in cands:
            eff = (c * dsup[:, None]).reshape(-1)
            e, q = _err_at(xs, ws, table, eff)
            yy = eff[:, None] * q
            if best_e is None:
                best_e, best_y = e, yy
            else:
                m = e < best_e
                best_e = np.where(m, e, best_e)
                best_y = np.where(m[:, None], yy, best_y)
        y = best_y
    else:
        raise ValueError(scale)
    y = y.reshape(n, block)
    if out_mask is not None:
        y = np.where(out_mask, f16(xb), y)
    return y.reshape(x.shape)


def vq_assign(y: np.ndarray, cb: np.ndarray) -> np.ndarray:
    """Nearest codeword (rows of ``cb``) for each row of ``y``."""
    return np.argmin(np.sum(cb * cb, axis=1)[None, :] - 2 * (y @ cb.T), axis=1)


def q_vq(x: np.ndarray, mag: np.ndarray, block: int) -> np.ndarray:
    """Sign-symmetric vector codebook: each group of ``dim`` values is stored as ``dim`` sign bits plus the index of
    the nearest entry of the magnitude grid ``mag`` (K, dim), int8 entries >= 0, to |x| / d (ggml's iq2/iq3 grids
    use the same "grid + signs" structure). One fp16 scale per block, searched on VQ_GRID around
    rms(block) / rms(grid) and refitted by least squares."""
    k, dim = mag.shape
    xb = x.reshape(-1, block).astype(np.float32)
    n = len(xb)
    sg = np.where(xb < 0, -1.0, 1.0).astype(np.float32)
    ax = np.abs(xb)
    rms = np.sqrt(np.mean(xb * xb, axis=1))
    base = np.where(rms > 0, rms, 1) / np.sqrt(np.mean(mag * mag))
    best_e = np.full(n, np.inf)
    best_d = np.zeros(n, dtype=np.float32)
    best_q = np.zeros_like(xb)
    for g in VQ_GRID:
        q = mag[vq_assign((ax / (base * g)[:, None]).reshape(-1, dim), mag)].reshape(n, block) * sg
        d, e = _ls(xb, 1.0, q)
        better = e < best_e
        best_e = np.where(better, e, best_e)
        best_d = np.where(better, d, best_d)
        best_q[better] = q[better]
    y = f16(np.where(rms > 0, best_d, 0))[:, None] * best_q
    return y.reshape(x.shape)


# ---------------------------------------------------------------------------------------------------------------
# Codebooks trained on synthetic Gaussian blocks (fixed seed: a shipping type would bake the table in).


def train_scalar_block_codebook(bits: int, block: int = 32, n_blocks: int = 6000, iters: int = 8,
                                seed: int = 1234) -> np.ndarray:
    """Lloyd iterations *with the block scale search in the loop*: starting from Lloyd-Max, alternate (scale search
    + assignment per block) and (level = sum d x / sum d^2 over its members), keeping the table symmetric. This
    is the best fixed table for Gaussian data quantized in blocks of ``block`` (not for one global Gaussian)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_blocks, block)).astype(np.float32)
    pos = np.asarray(LLOYD_MAX[bits], dtype=np.float64)
    w = np.ones_like(x)
    for _ in range(iters):
        table = np.concatenate([-pos[::-1], pos]).astype(np.float32)
        d = search_scale(x, w, table)
        idx = _nearest(x / np.where(d > 0, d, 1)[:, None], table)
        dd = np.broadcast_to(d[:, None], x.shape)
        num = np.bincount(idx.ravel(), weights=(dd * x).ravel(), minlength=len(table))
        den = np.bincount(idx.ravel(), weights=(dd * dd).ravel(), minlength=len(table))
        lv = num / np.maximum(den, 1e-12)
        pos = (lv[len(pos):] - lv[:len(pos)][::-1]) / 2
    return int8_table(pos)


def train_vq_codebook(dim: int, k: int, block: int = 32, n: int = 60000, iters: int = 20, loop_iters: int = 3,
                      seed: int = 1234) -> np.ndarray:
    """Magnitude grid of ``k`` entries for a sign-symmetric ``dim``-D codebook (``k * 2^dim`` codewords): k-means on
    |unit-Gaussian| ``dim``-vectors, then a few iterations with the per-block scale search in the loop; returned as
    int8 entries (largest coordinate = 127)."""
    rng = np.random.default_rng(seed)
    pts = np.abs(rng.standard_normal((n, dim))).astype(np.float32)
    cb = pts[rng.choice(n, k, replace=False)].copy()

    def update(points, weights, a, cb):
        den = np.bincount(a, weights=weights * weights, minlength=k)
        for j in range(dim):
            num = np.bincount(a, weights=weights * points[:, j], minlength=k)
            cb[:, j] = np.where(den > 0, num / np.maximum(den, 1e-12), cb[:, j])
        return cb

    ones = np.ones(n, dtype=np.float32)
    for _ in range(iters):
        cb = update(pts, ones, vq_assign(pts, cb), cb)
    xb = pts[: n // (block // dim) * (block // dim)].reshape(-1, block)  # |x| of Gaussian blocks
    for _ in range(loop_iters):
        nb = len(xb)
        base = np.sqrt(np.mean(xb * xb, axis=1)) / np.sqrt(np.mean(cb * cb))
        best_e, best_d = np.full(nb, np.inf), np.zeros(nb, dtype=np.float32)
        for g in VQ_GRID:
            q = cb[vq_assign((xb / (base * g)[:, None]).reshape(-1, dim), cb)].reshape(nb, block)
            d, e = _ls(xb, 1.0, q)
            m = e < best_e
            best_e, best_d = np.where(m, e, best_e), np.where(m, d, best_d)
        a = vq_assign((xb / best_d[:, None]).reshape(-1, dim), cb)
        cb = update(xb.reshape(-1, dim), np.repeat(best_d, block // dim).astype(np.float32), a, cb)
    return np.round(cb / np.abs(cb).max() * 127).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Designs


@dataclass
class Design:
    name: str
    target: str          # "qaq3", "qaq2", "over" (over the budget, for reference) or "ref" (an existing type)
    block: int
    nbytes: int
    layout: str
    note: str
    fn: Callable[[np.ndarray], np.ndarray] | None = None
    results: dict = field(default_factory=dict)

    @property
    def bits(self) -> float:
        return self.nbytes * 8 / self.block


def make_designs(tables: dict[str, np.ndarray]) -> list[Design]:
    L2, L3, L4 = tables["lm2"], tables["lm3"], tables["lm4"]
    B2, B3 = tables["lmb2"], tables["lmb3"]
    U2, U3 = uniform_table(2), uniform_table(3)
    V2, V3, V8 = tables["vq2"], tables["vq3"], tables["vq2_8d"]
    D: list[Design] = []
    add = D.append
    for t in REFERENCE_TYPES:
        ct = cachetypes.get(t)
        add(Design(t, "ref", ct.block_size, ct.type_size, f"existing ggml type ({ct.type_size} B / {ct.block_size})",
                   "existing type, gguf-py / scoring.quant_roundtrip"))
    add(Design("lm4_b32", "ref", 32, 18, "f16 d; u8 qs[16] (4-bit idx)",
               "4-bit Lloyd-Max codebook + scale search: iq4_nl's layout with a symmetric table and a real search",
               lambda x: q_codebook(x, L4, 32)))
    # --- 3 bits ---
    add(Design("int3_sym_b32", "qaq3", 32, 14, "f16 d; u8 qs[12] (3-bit codes, d = signed absmax / -4)",
               "ggml q4_0 recipe at 3 bits (no search)", lambda x: q_ggml0(x, 3, 32)))
    add(Design("int3_asym_b64", "qaq3", 64, 28, "f16 d, m; u8 qs[24]", "q4_1 recipe at 3 bits, block 64 (min/max)",
               lambda x: q_ggml1(x, 3, 64)))
    add(Design("int3_asym_b32", "over", 32, 16, "f16 d, m; u8 qs[12]", "q4_1 recipe at 3 bits, block 32 (KIVI-3-like)",
               lambda x: q_ggml1(x, 3, 32)))
    add(Design("u3_b32", "qaq3", 32, 14, "f16 d; u8 qs[12]", "uniform +-1..+-7 (x d/2) with the scale search",
               lambda x: q_codebook(x, U3, 32)))
    add(Design("lm3_b32", "qaq3", 32, 14, "f16 d; u8 qs[8] (low 2 bits); u8 qh[4] (high bit)",
               "Lloyd-Max 8-level int8 table + scale search", lambda x: q_codebook(x, L3, 32)))
    add(Design("lmb3_b32", "qaq3", 32, 14, "f16 d; u8 qs[8]; u8 qh[4]",
               "8-level table trained for block-32 Gaussian data (scale search in the loop)",
               lambda x: q_codebook(x, B3, 32)))
    add(Design("lm3_b32_x2", "qaq3", 32, 14, "f16 d; u8 qs[8]; u8 qh[4]",
               "as lm3_b32, scale fitted with x^2-weighted error (iq4_nl / imatrix style)",
               lambda x: q_codebook(x, L3, 32, weight="x2")))
    add(Design("lm3_b64", "qaq3", 64, 26, "f16 d; u8 qs[16]; u8 qh[8]", "Lloyd-Max 8 levels, block 64",
               lambda x: q_codebook(x, L3, 64)))
    add(Design("lm3_b32_e5m3", "qaq3", 32, 13, "u8 d (ue5m3); u8 qs[8]; u8 qh[4]",
               "Lloyd-Max 8 levels, one 8-bit float scale", lambda x: q_codebook(x, L3, 32, scale="ue5m3")))
    add(Design("lm3_b32_e5m0", "qaq3", 32, 13, "u8 d (power of two); u8 qs[8]; u8 qh[4]",
               "Lloyd-Max 8 levels, power-of-two scale (MX-like)", lambda x: q_codebook(x, L3, 32, scale="ue5m0")))
    add(Design("lm3_b32_2e5m3", "qaq3", 32, 14, "u8 d[2] (ue5m3, per 16); u8 qs[8]; u8 qh[4]",
               "Lloyd-Max 8 levels, two 8-bit float sub-scales (per 16 values)",
               lambda x: q_codebook(x, L3, 32, scale="ue5m3", sub=16)))
    add(Design("lm3_b64_k4", "qaq3", 64, 28, "f16 d; u8 sc[2] (4 x 4-bit, per 16); u8 qs[16]; u8 qh[8]",
               "Lloyd-Max 8 levels, k-quant-like 4-bit sub-scales", lambda x: q_codebook(x, L3, 64, scale="k4", sub=16)))
    add(Design("lm3_b128_o2", "qaq3", 128, 56, "f16 d; f16 ov[2]; u8 oi[2]; u8 qs[32]; u8 qh[16]",
               "Lloyd-Max 8 levels, block 128 with 2 exact fp16 outliers",
               lambda x: q_codebook(x, L3, 128, outliers=2)))
    add(Design("lm3_b64_o1_e5m3", "qaq3", 64, 28, "u8 d (ue5m3); u8 oi; f16 ov; u8 qs[16]; u8 qh[8]",
               "Lloyd-Max 8 levels, block 64, 8-bit float scale, 1 exact fp16 outlier",
               lambda x: q_codebook(x, L3, 64, scale="ue5m3", outliers=1)))
    add(Design("lm3_b128_4e5m3_o1", "qaq3", 128, 56,
               "u8 d[4] (ue5m3, per 32); f16 ov; u8 oi; u8 pad; u8 qs[32]; u8 qh[16]",
               "Lloyd-Max 8 levels, block 128: 8-bit float scale per 32 and 1 exact fp16 outlier",
               lambda x: q_codebook(x, L3, 128, scale="ue5m3", sub=32, outliers=1)))
    add(Design("vq3_2d_b32", "qaq3", 32, 14, "f16 d; u8 qs[8] (16 x 4-bit pair index); u8 signs[4]",
               "2-D sign-symmetric vector codebook: 16-entry magnitude grid of int8 pairs + 2 sign bits per pair",
               lambda x: q_vq(x, V3, 32)))
    # --- 2 bits ---
    add(Design("q2_0_upstream", "ref", 64, 18, "f16 d; u8 qs[16] (levels -1, 0, 1, 2 times d = absmax)",
               "upstream GGML_TYPE_Q2_0 (weight type, not a KV type), for reference", q_upstream_q2_0))
    add(Design("int2_sym_b32", "qaq2", 32, 10, "f16 d; u8 qs[8] (d = signed absmax / -2)", "ggml q4_0 recipe at 2 bits",
               lambda x: q_ggml0(x, 2, 32)))
    add(Design("int2_asym_b64", "qaq2", 64, 20, "f16 d, m; u8 qs[16]", "q4_1 recipe at 2 bits, block 64",
               lambda x: q_ggml1(x, 2, 64)))
    add(Design("int2_asym_b32", "over", 32, 12, "f16 d, m; u8 qs[8]", "q4_1 recipe at 2 bits, block 32 (KIVI-2-like)",
               lambda x: q_ggml1(x, 2, 32)))
    add(Design("u2_b32", "qaq2", 32, 10, "f16 d; u8 qs[8]", "uniform +-1, +-3 (x d/2) with the scale search",
               lambda x: q_codebook(x, U2, 32)))
    add(Design("lm2_b32", "qaq2", 32, 10, "f16 d; u8 qs[8]", "Lloyd-Max 4-level int8 table + scale search",
               lambda x: q_codebook(x, L2, 32)))
    add(Design("lmb2_b32", "qaq2", 32, 10, "f16 d; u8 qs[8]", "4-level table trained for block-32 Gaussian data",
               lambda x: q_codebook(x, B2, 32)))
    add(Design("lm2_b64", "qaq2", 64, 18, "f16 d; u8 qs[16]", "Lloyd-Max 4 levels, block 64",
               lambda x: q_codebook(x, L2, 64)))
    add(Design("lm2_b32_e5m3", "qaq2", 32, 9, "u8 d (ue5m3); u8 qs[8]", "Lloyd-Max 4 levels, 8-bit float scale",
               lambda x: q_codebook(x, L2, 32, scale="ue5m3")))
    add(Design("lm2_b32_2e5m3", "qaq2", 32, 10, "u8 d[2] (ue5m3, per 16); u8 qs[8]",
               "Lloyd-Max 4 levels, two 8-bit float sub-scales (per 16)",
               lambda x: q_codebook(x, L2, 32, scale="ue5m3", sub=16)))
    add(Design("lm2_b64_k4", "qaq2", 64, 20, "f16 d; u8 sc[2] (4 x 4-bit); u8 qs[16]",
               "Lloyd-Max 4 levels, k-quant-like 4-bit sub-scales per 16",
               lambda x: q_codebook(x, L2, 64, scale="k4", sub=16)))
    add(Design("lm2_b128_o2", "qaq2", 128, 40, "f16 d; f16 ov[2]; u8 oi[2]; u8 qs[32]",
               "Lloyd-Max 4 levels, block 128 with 2 exact fp16 outliers",
               lambda x: q_codebook(x, L2, 128, outliers=2)))
    add(Design("lm2_b64_o1_e5m3", "qaq2", 64, 20, "u8 d (ue5m3); u8 oi; f16 ov; u8 qs[16]",
               "Lloyd-Max 4 levels, block 64, 8-bit float scale, 1 exact fp16 outlier",
               lambda x: q_codebook(x, L2, 64, scale="ue5m3", outliers=1)))
    add(Design("lm2_b128_4e5m3_o1", "qaq2", 128, 40, "u8 d[4] (ue5m3, per 32); f16 ov; u8 oi; u8 pad; u8 qs[32]",
               "Lloyd-Max 4 levels, block 128: 8-bit float scale per 32 and 1 exact fp16 outlier",
               lambda x: q_codebook(x, L2, 128, scale="ue5m3", sub=32, outliers=1)))
    add(Design("vq2_4d_b32", "qaq2", 32, 10, "f16 d; u8 qs[4] (8 x 4-bit quad index); u8 signs[4]",
               "4-D sign-symmetric vector codebook: 16-entry magnitude grid of int8 quads + 4 sign bits per quad",
               lambda x: q_vq(x, V2, 32)))
    add(Design("vq2_8d_b32", "qaq2", 32, 10, "f16 d; u8 qs[4] (4 x 8-bit octet index); u8 signs[4]",
               "8-D sign-symmetric vector codebook: 256-entry magnitude grid (2 KiB, like iq2_xs) + 8 sign bits",
               lambda x: q_vq(x, V8, 32)))
    return D


def roundtrip(d: Design, x: np.ndarray, *, is_v: bool, rotate: bool) -> np.ndarray:
    """x: (n_tok, n_head_kv, D) -> dequantized, in the original (un-rotated) space."""
    if d.target == "ref" and d.fn is None:
        return scoring.quant_roundtrip(x, d.name, is_v=is_v, rotate=rotate)
    n = scoring.rotation_size(x.shape[-1], is_v)
    y = scoring._rotate(x, n) if rotate else np.asarray(x, dtype=np.float32)
    yh = d.fn(y.reshape(-1, x.shape[-1])).reshape(x.shape).astype(np.float32)
    return scoring._rotate(yh, n) if rotate else yh


# ---------------------------------------------------------------------------------------------------------------
# Error model (scoring's measured model; see the module docstring)


def key_scores(layer, dk: np.ndarray, dq: np.ndarray, k_hat: np.ndarray) -> tuple[float, float]:
    """(score with Q rounded as the kernel does, score with exact Q): scoring._key_measured, both at once."""
    tot_q = tot_x = 0.0
    for h in range(layer.q.shape[1]):
        g = h // layer.group
        s = layer.attn[h][layer.rows]
        e = layer.kq_scale * (layer.q[layer.rows, h, :] @ dk[:, g, :].T)
        eq = e + layer.kq_scale * (dq[layer.rows, h, :] @ k_hat[:, g, :].T)
        vg = layer.v[:, g, :]
        for ee, acc in ((e, "x"), (eq, "q")):
            p = s * ee
            dx = p @ vg - p.sum(axis=1, keepdims=True) * layer.x[h]
            val = float(np.sum(dx.astype(np.float64) ** 2))
            if acc == "x":
                tot_x += val
            else:
                tot_q += val
    return scoring._relative(tot_q, layer.x.shape[0] * layer.x.shape[1], layer), \
        scoring._relative(tot_x, layer.x.shape[0] * layer.x.shape[1], layer)


def rel_mse(xh, x) -> float:
    x64 = x.astype(np.float64)
    return float(np.sum((xh.astype(np.float64) - x64) ** 2) / np.sum(x64 ** 2))


def block_kurtosis(x: np.ndarray, block: int = 32) -> float:
    """Mean of z^4 with z = value / rms(its block of ``block``): 3 x (block/(block+2)) = 2.82 for Gaussian data."""
    xb = x.reshape(-1, block).astype(np.float64)
    r = np.sqrt(np.mean(xb * xb, axis=1, keepdims=True))
    z = xb / np.where(r > 0, r, 1)
    return float(np.mean(z ** 4))


def max_ratio(x: np.ndarray, block: int = 32) -> float:
    """Mean over blocks of max|x| / rms(block) (Gaussian, block 32: about 2.37)."""
    xb = x.reshape(-1, block).astype(np.float64)
    r = np.sqrt(np.mean(xb * xb, axis=1))
    return float(np.mean(np.abs(xb).max(axis=1) / np.where(r > 0, r, 1)))


# ---------------------------------------------------------------------------------------------------------------


def load_chunks(args) -> list[dict[int, collect.LayerActivations]]:
    cache = Path(args.activations) if args.activations else None
    if cache is not None and cache.exists():
        z = np.load(cache)
        chunks: dict[int, dict[int, collect.LayerActivations]] = {}
        for key in z.files:
            if key.startswith("q_"):
                _, c, il = key.split("_")
                c, il = int(c), int(il)
                get = lambda n: z[f"{n}_{c}_{il}"].astype(np.float32)  # noqa: E731
                chunks.setdefault(c, {})[il] = collect.LayerActivations(get("q"), get("k"), get("v"), get("attn"))
        print(f"loaded activations of {len(chunks)} chunks from {cache}", file=sys.stderr)
        return [chunks[c] for c in sorted(chunks)][: args.chunks]
    text_path = Path(args.text)
    if "test" in text_path.name.lower() and not args.allow_test_text:
        raise SystemExit(f"{text_path} looks like a test split; design decisions must be made on calibration text "
                         "(pass --allow-test-text to override)")
    from qaq_gguf import models

    model = args.model or models.gemma3_270m()
    text = text_path.read_text(encoding="utf-8")
    out = []
    for ch in collect.iter_chunks(model, text, n_ctx=args.n_ctx, n_chunks=args.chunks, n_threads=args.threads):
        out.append(ch)
    if cache is not None:
        save = {}
        for c, ch in enumerate(out):
            for il, a in ch.items():
                save.update({f"q_{c}_{il}": a.q, f"k_{c}_{il}": a.k, f"v_{c}_{il}": a.v, f"attn_{c}_{il}": a.attn})
        np.savez(cache, **save)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Designs are numpy models of block formats; no kernel is implemented.")
    ap.add_argument("--model", default=None, help="GGUF model (default: bundled Gemma 3 270M)")
    ap.add_argument("--text", default=str(DEFAULT_TEXT), help="calibration text (default: %(default)s)")
    ap.add_argument("--allow-test-text", action="store_true", help="permit a file named like a test split")
    ap.add_argument("--n-ctx", type=int, default=512, help="tokens per chunk (default: %(default)s)")
    ap.add_argument("--chunks", type=int, default=2, help="chunks of text (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads for collection (default: %(default)s)")
    ap.add_argument("--max-queries", type=int, default=128,
                    help="query rows sampled per chunk and layer for the attention scores (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="query sampling seed (default: %(default)s)")
    ap.add_argument("--layers", default=None, help="comma-separated layer subset (default: all)")
    ap.add_argument("--designs", default=None, help="comma-separated design names (default: all; --list shows them)")
    ap.add_argument("--list", action="store_true", help="list the designs with their layouts and exit")
    ap.add_argument("--no-unrotated", action="store_true", help="skip the comparison without Hadamard rotation")
    ap.add_argument("--activations", default=None,
                    help="npz cache of the collected activations: loaded if it exists, else written")
    ap.add_argument("-o", "--out", default=str(DEFAULT_OUT), help="JSON output (default: %(default)s)")
    args = ap.parse_args(argv)

    t0 = time.time()
    tables = {
        "lm2": int8_table(LLOYD_MAX[2]), "lm3": int8_table(LLOYD_MAX[3]), "lm4": int8_table(LLOYD_MAX[4]),
        "lmb2": train_scalar_block_codebook(2), "lmb3": train_scalar_block_codebook(3),
        "vq2": train_vq_codebook(4, 16), "vq3": train_vq_codebook(2, 16),
        "vq2_8d": train_vq_codebook(8, 256, n=100000, iters=15),
    }
    designs = make_designs(tables)
    if args.list:
        for d in designs:
            print(f"{d.name:18s} {d.target:5s} block {d.block:3d} {d.nbytes:3d} B {d.bits:6.4g} b/v  {d.layout}  -- {d.note}")
        return 0
    if args.designs:
        want = set(args.designs.split(",")) | {BASELINE}
        unknown = want - {d.name for d in designs}
        if unknown:
            raise SystemExit(f"unknown designs: {', '.join(sorted(unknown))}")
        designs = [d for d in designs if d.name in want]
    print(f"codebooks ready ({time.time() - t0:.1f}s)", file=sys.stderr)

    chunks = load_chunks(args)
    layers = sorted(chunks[0]) if args.layers is None else [int(s) for s in args.layers.split(",")]
    print(f"{len(chunks)} chunks x {len(layers)} layers collected ({time.time() - t0:.1f}s)", file=sys.stderr)
    rots = (True,) if args.no_unrotated else (True, False)
    nL = len(layers)
    acc = {d.name: {r: {kv: {m: np.zeros(nL) for m in ("rel_mse", "score", "score_exact_q", "score_no_sink")}
                        for kv in "kv"}
                    for r in rots} for d in designs}
    dist = {r: {kv: {"kurtosis_b32": np.zeros(nL), "max_over_rms_b32": np.zeros(nL)} for kv in "kv"} for r in rots}
    kq_scales = np.zeros(nL)
    checked = False
    for c, chunk in enumerate(chunks):
        for j, il in enumerate(layers):
            act = chunk[il]
            s = collect.estimate_kq_scale(act)
            kq_scales[j] += s / len(chunks)
            layer = scoring._prepare(act.q, act.k, act.v, act.attn, kq_scale=s, max_queries=args.max_queries,
                                     seed=args.seed + c, n_swa=None)
            k = np.asarray(act.k, np.float32)
            v = np.asarray(act.v, np.float32)
            for r in rots:
                dq = scoring.query_roundtrip(layer.q, "q4_0", rotate=r) - layer.q
                for kv, x in (("k", k), ("v", v)):
                    xr = scoring._rotate(x, scoring.rotation_size(x.shape[-1], kv == "v")) if r else x
                    dist[r][kv]["kurtosis_b32"][j] += block_kurtosis(xr) / len(chunks)
                    dist[r][kv]["max_over_rms_b32"][j] += max_ratio(xr) / len(chunks)
                for d in designs:
                    k_hat = roundtrip(d, k, is_v=False, rotate=r)
                    v_hat = roundtrip(d, v, is_v=True, rotate=r)
                    dk = k_hat - k
                    sq, sx = key_scores(layer, dk, dq, k_hat)
                    dk0 = dk.copy()
                    dk0[0] = 0  # the BOS / attention-sink cell (every chunk starts with BOS) stored exactly
                    k0 = k_hat.copy()
                    k0[0] = k[0]
                    sn, _ = key_scores(layer, dk0, dq, k0)
                    if not checked and r:
                        ref = scoring._key_measured(layer, k_hat - k, dq, k_hat)
                        assert np.isclose(sq, ref, rtol=1e-6), (sq, ref)
                        checked = True
                    a = acc[d.name][r]
                    a["k"]["rel_mse"][j] += rel_mse(k_hat, k) / len(chunks)
                    a["k"]["score"][j] += sq / len(chunks)
                    a["k"]["score_exact_q"][j] += sx / len(chunks)
                    a["k"]["score_no_sink"][j] += sn / len(chunks)
                    vs = scoring._value_measured(layer, v_hat - v)
                    dv0 = v_hat - v
                    dv0[0] = 0
                    a["v"]["score_no_sink"][j] += scoring._value_measured(layer, dv0) / len(chunks)
                    a["v"]["rel_mse"][j] += rel_mse(v_hat, v) / len(chunks)
                    a["v"]["score"][j] += vs / len(chunks)
                    a["v"]["score_exact_q"][j] += vs / len(chunks)
        print(f"chunk {c} scored ({time.time() - t0:.1f}s)", file=sys.stderr)

    def summary(d, r):
        a = acc[d.name][r]
        b = acc[BASELINE][True]  # ratios are against q4_0 as llama.cpp stores it (rotated)
        out = {}
        for kv in "kv":
            m = {f"mean_{k}": float(np.mean(vv)) for k, vv in a[kv].items()}
            m.update({f"{k}_per_layer": [float(t) for t in vv] for k, vv in a[kv].items()})
            for met in ("score", "rel_mse"):
                m[f"{met}_vs_q4_0"] = float(np.mean(a[kv][met]) / np.mean(b[kv][met]))
                m[f"{met}_gmean_vs_q4_0"] = float(np.exp(np.mean(np.log(a[kv][met] / b[kv][met]))))
            if kv == "k":
                m["score_exact_q_vs_q4_0"] = float(np.mean(a[kv]["score_exact_q"]) / np.mean(b[kv]["score_exact_q"]))
            else:
                del m["mean_score_exact_q"], m["score_exact_q_per_layer"]
            out[kv] = m
        return out

    cmd = "PYTHONPATH=/work/main python3 tools/cachetype_study.py" + "".join(
        " " + shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    result = {
        "command": cmd,
        "settings": {"model": str(args.model or "bundled Gemma 3 270M (qaq_gguf.models.gemma3_270m)"),
                     "text": str(args.text), "n_ctx": args.n_ctx, "chunks": len(chunks), "layers": layers,
                     "max_queries": args.max_queries, "seed": args.seed,
                     "rotation": {"k": scoring.rotation_size(chunks[0][layers[0]].k.shape[-1], False),
                                  "v": scoring.rotation_size(chunks[0][layers[0]].v.shape[-1], True)},
                     "query_rounding": "Q rounded to q8_0 (the vec_dot type of every quantized K type)",
                     "kq_scale_mean": float(np.mean(kq_scales)),
                     "scale_grid": [float(g) for g in SCALE_GRID], "vq_grid": [float(g) for g in VQ_GRID],
                     "runtime_s": None},
        "codebooks": {k: [int(t) for t in np.ravel(v)] if v.ndim == 1 else [[int(t) for t in row] for row in v]
                      for k, v in tables.items()},
        "distribution": {("rotated" if r else "unrotated"): {kv: {k: [float(t) for t in vv] for k, vv in m.items()}
                                                             for kv, m in dd.items()} for r, dd in dist.items()},
        "designs": [{"name": d.name, "target": d.target, "block": d.block, "bytes": d.nbytes, "bits": d.bits,
                     "layout": d.layout, "note": d.note,
                     "results": {("rotated" if r else "unrotated"): summary(d, r) for r in rots}}
                    for d in designs],
    }
    result["settings"]["runtime_s"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")

    print(f"\nmean over {nL} layers x {len(chunks)} chunks; K rotation {result['settings']['rotation']['k']}, "
          f"V rotation {result['settings']['rotation']['v']}. score: attention-output error (relative); "
          f"xq4: mean score / mean score of q4_0; gx: geometric mean over layers of score / q4_0's score")
    hdr = (f"{'design':17s} {'tgt':4s} {'blk':>3s} {'B':>3s} {'bits':>5s} | {'K mse':>7s} {'K score':>7s} "
           f"{'xq4':>5s} {'gx':>5s} | {'V mse':>7s} {'V score':>7s} {'xq4':>5s} {'gx':>5s}")
    if not args.no_unrotated:
        hdr += f" | {'unrotated: K xq4':>16s} {'V xq4':>5s}"
    print(hdr)
    print("-" * len(hdr))
    for i, d in enumerate(designs):
        a = result["designs"][i]["results"]["rotated"]
        line = (f"{d.name:17s} {d.target:4s} {d.block:3d} {d.nbytes:3d} {d.bits:5.3g} | "
                f"{a['k']['mean_rel_mse']:7.1e} {a['k']['mean_score']:7.1e} {a['k']['score_vs_q4_0']:5.2f} "
                f"{a['k']['score_gmean_vs_q4_0']:5.2f} | {a['v']['mean_rel_mse']:7.1e} {a['v']['mean_score']:7.1e} "
                f"{a['v']['score_vs_q4_0']:5.2f} {a['v']['score_gmean_vs_q4_0']:5.2f}")
        if not args.no_unrotated:
            u = result["designs"][i]["results"]["unrotated"]
            line += f" | {u['k']['score_vs_q4_0']:16.2f} {u['v']['score_vs_q4_0']:5.2f}"
        print(line)
    for r, dd in result["distribution"].items():
        print(f"{r:9s} block-32 E[z^4] (Gaussian 2.82): K {np.mean(dd['k']['kurtosis_b32']):.2f}, "
              f"V {np.mean(dd['v']['kurtosis_b32']):.2f}; max/rms (Gaussian 2.37): "
              f"K {np.mean(dd['k']['max_over_rms_b32']):.2f}, V {np.mean(dd['v']['max_over_rms_b32']):.2f}")
    print(f"\nwrote {out} ({result['settings']['runtime_s']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
