"""Trellis-coded quantization of K and V rows (issue 24 step 1): a bit-shift trellis with a computed codebook, as
QTIP does for weights (arXiv 2406.11235), small enough to think about encoding at cache-write time.

What is done (settings ``tcq:3``, ``tcq:2``, ``tcq:3/L12``, ``tcq:3/L6/w1``; ``L`` the trellis' state bits, default
8; ``w`` the walks tried per row, 1, 3 or 5, default 5):

- **Rotation.** As the lattice codes and llama.cpp's quantized caches: K and V rows in the Walsh-Hadamard rotation
  (``scoring.rotation_size``), coded, rotated back.
- **The trellis.** A row of d rotated values is one walk of d steps through 2^L states. Each step shifts k new
  bits (k = the bits per value) into an L-bit state, ``s_t = ((s_{t-1} << k) | b_t) mod 2^L``, and the value is
  reconstructed as ``scale * c[s_t]``: the stored code of a row is its d k-bit inputs, exactly k bits per value.
  The walk starts in state 0 (no start state is stored: the first L/k - 1 values choose among fewer codewords).
- **The codebook** ``c`` (2^L values) is computed, not learnt from the model: Gaussian quantiles in a fixed
  pseudo-random order (seed 0), refined by a few rounds of trellis Lloyd iterations on N(0, 1) rows (the rotated
  rows are near Gaussian). It is a function of (k, L) alone, so it costs no bits in the cache (a native type would
  hold it as a 2^L-entry table: 512 bytes at L = 8).
- **Encoding** is the Viterbi algorithm: the least squared error walk, 2^k predecessors per state, d steps:
  d * 2^L compare-adds per row and walk (16k at d = 64, L = 8). That is the cost a cache write would pay; decoding is a
  shift and a table lookup per value. The method measures its own numpy encode time per row (``Bits.detail``).
- **Scale.** One fp16 scale per head row. Walks are found at rms(x) / rho times 0.8, 0.9, 1.0, 1.1 and 1.2 (rho:
  the codebook's best rms on N(0, 1)); each gets the least-squares scale for its codewords, rounded to fp16, and
  the walk with the smallest squared error is kept (five walks: on SmolLM2's rotated keys and values, whose
  values have lighter tails than a Gaussian (kurtosis 2.6-2.9), this cuts the error 8% against one walk).

Bits per value: k + 16 / head_dim (the fp16 row scale). Departures / simulation: Q is not rounded (as the lattice
and TurboQuant rewrites); the reconstruction is stored in the f16 cache.

Distortion per value on N(0, 1) rows of 64 at the best scale (start state 0 included): 3 bits, L = 6 / 8 / 12:
0.0268 / 0.0247 / 0.0225 (the 3-bit Lloyd-Max scalar code: 0.0345, lattice D4: 0.0304); 2 bits, L = 8 / 12:
0.089 / 0.084 (scalar 0.1175, E8P 0.0914).
"""
from __future__ import annotations

import re
import time

import numpy as np

from .. import quants, scoring, transforms
from ..trellis import STATE_BITS, codebook, viterbi
from . import Bits, MethodError, exact_first, exact_first_bits, layer_shapes, row_bits, without_first

DEFAULTS = ("3", "2")
SCALE_FACTORS = (0.8, 0.9, 1.0, 1.1, 1.2)  # walks tried per row at rms / rho times these
WALKS = {1: (1.0,), 3: (0.9, 1.0, 1.1), 5: SCALE_FACTORS}  # the /wN settings: fewer walks, cheaper encode
MAX_STATE_BITS = 14


def quantize(x: np.ndarray, k: int, state_bits: int, *, is_v: bool, stats: dict | None = None,
             factors: tuple[float, ...] = SCALE_FACTORS, scale8: bool = False, rule: str = "") -> np.ndarray:
    """K (is_v False) or V rows x (..., d): rotation, trellis code, fp16 row scale (``scale8``: a ue5m3 byte, the
    one of the two around the least-squares scale with the smaller error), rotated back (float32).

    ``rule`` picks each walk's scale from its codewords c: ``""`` least squares (``<x, c> / |c|^2``); ``"u"``
    unshrunk (``|x|^2 / <x, c>``: the reconstruction's component along x is x); ``"u<P>"`` unshrunk, at most P% above
    least squares; ``"n"`` norm-matched (``|x| / |c|``: ``|y| = |x|``, between the two)."""
    x = np.asarray(x, np.float32)
    d = x.shape[-1]
    r = scoring.rotation_size(d, is_v)
    xr = (scoring.rotate(x, r) if r else x).reshape(-1, d).astype(np.float64)
    table, rho = codebook(k, state_bits)
    xx = np.sum(xr * xr, axis=1)  # |x|^2 per row
    rms = np.sqrt(np.mean(xr * xr, axis=1))
    live = rms > 0
    best_err = np.full(len(xr), np.inf)
    best = np.zeros_like(xr)
    t0 = time.perf_counter()
    for f in factors:
        s0 = np.where(live, rms / rho * f, 1.0)
        c = table[viterbi(xr / s0[:, None], table, k)].astype(np.float64)
        cc = np.sum(c * c, axis=1)
        xc = np.sum(xr * c, axis=1)
        s = np.where(cc > 0, xc / np.where(cc > 0, cc, 1.0), 0.0)  # least squares
        if rule.startswith("u"):  # the reconstruction's component along x is x: <y, x> = |x|^2
            su = np.where(xc > 0, xx / np.where(xc > 0, xc, 1.0), 0.0)
            s = np.minimum(su, s * (1 + int(rule[1:]) / 100)) if len(rule) > 1 else su
        elif rule == "n":  # |y| = |x|
            s = np.where(xc > 0, np.sqrt(xx / np.where(cc > 0, cc, 1.0)), 0.0)
        if scale8:
            lo = quants.ue5m3_floor(s)
            cands = [quants.ue5m3_to_float(np.minimum(lo + j, quants.UE5M3_MAX)).astype(np.float64) for j in (0, 1)]
        else:
            cands = [s.astype(np.float16).astype(np.float64)]
        for sc in cands:
            y = sc[:, None] * c
            err = np.sum((y - xr) ** 2, axis=1)
            take = err < best_err
            best_err = np.where(take, err, best_err)
            best[take] = y[take]
    if stats is not None:
        stats["rows"] = stats.get("rows", 0) + len(xr)
        stats["seconds"] = stats.get("seconds", 0.0) + time.perf_counter() - t0
    y = np.where(live[:, None], best, 0.0).reshape(x.shape).astype(np.float32)
    return scoring.rotate(y, r) if r else y


def key_mean(layer) -> np.ndarray:
    """The mean key as cached (post-RoPE) per KV head, over the calibration tokens. (n_head_kv, head_dim)"""
    return np.mean(np.asarray(layer.k, np.float64), axis=0).astype(np.float32)


def key_partner(layer) -> np.ndarray:
    """For each key dimension of the layer, the one RoPE rotates it with (itself where there is no RoPE)."""
    d = layer.k.shape[2]
    return layer.rope.partner(d) if layer.rope is not None else np.arange(d)


def rebalance_scales(layer, mean: np.ndarray | None = None) -> np.ndarray:
    """The profiles' key scales per RoPE pair (:func:`qaq_gguf.transforms.rebalance_scales`) from the layer's
    calibration queries and keys (less ``mean`` when centred). (n_head_kv, head_dim)"""
    k = np.asarray(layer.k, np.float64) - (0.0 if mean is None else mean)
    return transforms.rebalance_scales(layer.q_sq, np.mean(k * k, axis=0), key_partner(layer))


class Trellis:
    paper = ("Tseng et al., QTIP: quantization with trellises and incoherence processing (arXiv 2406.11235); "
             "Marcellin & Fischer, trellis coded quantization (1990)")
    headline = "QTIP (weights, Llama-2-70B, 2 bits): WikiText-2 PPL 3.78 vs fp16 3.12"
    rewrites = frozenset({"k", "v"})
    observes = frozenset({"k", "v"})
    name = "tcq"

    def __init__(self, bits: int, state_bits: int = STATE_BITS, walks: int = len(SCALE_FACTORS),
                 centre: bool = False, rebalance: bool = False, exact: bool = False, scale8: bool = False,
                 rule: str = ""):
        self.b, self.state_bits, self.walks, self.scale8, self.rule = bits, state_bits, walks, scale8, rule
        self.centre, self.rebalance, self.exact = centre, rebalance, exact
        self.setting = (f"{bits}" + (f"/L{state_bits}" if state_bits != STATE_BITS else "")
                        + ("/s8" if scale8 else "") + (f"/w{walks}" if walks != len(SCALE_FACTORS) else "")
                        + ("/c" if centre else "")
                        + ("/rb" if rebalance else "") + ("/x" if exact else "") + (f"/{rule}" if rule else ""))
        self.key_mean: dict[int, np.ndarray] = {}  # /c: layer -> (n_head_kv, head_dim) mean key, as cached
        if rebalance:  # keys scaled per RoPE pair, queries by the inverse: Q is rewritten too
            self.rewrites = self.observes = frozenset({"q", "k", "v"})
        self.pair_scale: dict[int, np.ndarray] = {}  # /rb: layer -> (n_head_kv, head_dim) key scales
        self.label = f"tcq:{self.setting}"
        self.fingerprint: str | None = None
        self._layers: dict[int, tuple[int, int, int]] = {}
        self.stats: dict = {}

    def fit(self, calib) -> None:
        """The codebook is computed, not learnt; /c and /rb take the keys' mean and pair scales from the calibration
        tokens (less those at position 0 with /x); records the shapes and the fingerprint."""
        codebook(self.b, self.state_bits)
        layers = {il: without_first(layer) if self.exact else layer for il, layer in calib.layers.items()}
        self.key_mean = {il: key_mean(layer) for il, layer in layers.items()} if self.centre else {}
        self.pair_scale = {il: rebalance_scales(layer, self.key_mean.get(il)) for il, layer in layers.items()} \
            if self.rebalance else {}
        self._layers = layer_shapes(calib)
        self.fingerprint = calib.ident.fingerprint

    def begin(self, n_ctx: int) -> None:
        pass

    def apply(self, il: int, kind: str, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        if self.centre and kind == "k":  # q.(k - m) = q.k - q.m: the same shift for every key of a query
            if il not in self.key_mean:
                raise MethodError(f"{self.label}: layer {il} was not calibrated")
            x = x - self.key_mean[il]
        if self.rebalance and kind in ("q", "k"):
            if il not in self.pair_scale:
                raise MethodError(f"{self.label}: layer {il} was not calibrated")
            d = self.pair_scale[il]
            if kind == "q":  # query head j reads KV head j // (n_head / n_head_kv)
                return (x / np.repeat(d, x.shape[1] // d.shape[0], axis=0)).astype(np.float32)
            x = x * d
        if kind not in ("k", "v"):
            return x
        y = quantize(x, self.b, self.state_bits, is_v=kind == "v", stats=self.stats, factors=WALKS[self.walks],
                     scale8=self.scale8, rule=self.rule)
        return exact_first(x, y, pos) if self.exact else y

    def bits(self, n_ctx: int) -> Bits:
        bk, bv = row_bits(self.label, self._layers, lambda d: self.b + (8 if self.scale8 else 16) / d)  # row scale
        if self.exact:
            bk, bv = bk + exact_first_bits(n_ctx), bv + exact_first_bits(n_ctx)
        cost = ""
        if self.stats.get("rows"):
            cost = f"; numpy Viterbi {1e6 * self.stats['seconds'] / self.stats['rows']:.0f} us per row"
        exact = f"; position 0 exact, {exact_first_bits(n_ctx):.4f} bits/value" if self.exact else ""
        return Bits(bk, bv, f"{1 << self.state_bits}-state bit-shift trellis, {self.b} bits/value + "
                            f"{'ue5m3' if self.scale8 else 'fp16'} scale per "
                            f"head row (codebook computed: 0 bits){exact}{cost}")


def make(setting: str) -> Trellis:
    """``3``, ``2``, ``3/L12``, ``3/L6/w1`` (bits per value; optionally the trellis' state bits L and the walks per
    row w); ``/s8``: the row scale a ue5m3 byte (qaq3's scale format) instead of fp16, 3 + 8/d bits; ``/c``: keys
    centred (their calibration mean, as cached, subtracted: attention is shift-invariant per query); ``/rb``: keys
    rebalanced against the queries per RoPE pair; ``/x``: the rows at position 0 kept exact (the exact cell); as
    calibrated profiles do: ``3/w1/c/rb/x``; the row scale's rule, last: ``/u`` each row's scale makes the
    reconstruction's component along the row the row itself (``|x|^2 / <x, c>``, no shrinkage; the native types'
    rule) instead of the least-squares scale, ``/u<P>`` the same at most P% above least squares, ``/n`` the
    reconstruction as long as the row (``|x| / |c|``)."""
    m = re.fullmatch(r"""\s*(\d+)\s* (?:/\s*L(\d+))?\s* (/\s*s8)?\s* (?:/\s*w(\d+))?\s* (/\s*c)?\s* (/\s*rb)?\s*
                         (/\s*x)?\s* (?:/\s*(u\d*|n))?\s*""", setting, flags=re.IGNORECASE | re.VERBOSE)
    if not m:
        raise MethodError(f"tcq:{setting}: settings are BITS, optionally /L<state bits>, /s8 (ue5m3 scale), "
                          "/w<walks>, /c (keys centred), /rb (keys rebalanced), /x (position 0 exact) and /u, /u<P> "
                          "or /n (the scale's rule), in that order, e.g. tcq:3, tcq:2/L12, tcq:3/L6/w1, "
                          "tcq:3/w1/c/rb/x")
    bits = int(m.group(1))
    L = int(m.group(2)) if m.group(2) else STATE_BITS
    walks = int(m.group(4)) if m.group(4) else len(SCALE_FACTORS)
    if bits not in (2, 3, 4):
        raise MethodError(f"tcq:{setting}: bits per value 2, 3 or 4")
    if not bits < L <= MAX_STATE_BITS:
        raise MethodError(f"tcq:{setting}: state bits L between {bits + 1} and {MAX_STATE_BITS}")
    if walks not in WALKS:
        raise MethodError(f"tcq:{setting}: walks per row {', '.join(map(str, WALKS))}")
    return Trellis(bits, L, walks, bool(m.group(5)), bool(m.group(6)), bool(m.group(7)), bool(m.group(3)),
                   (m.group(8) or "").lower())
