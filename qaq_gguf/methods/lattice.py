"""Lattice vector codes for K and V (issue 24 step 1): groups of 8 values on a finite E8 codebook (QuIP#'s E8P
idea) or groups of 4 on a finite D4 codebook, inside llama.cpp's Hadamard rotation, with a scale per head row or
per block of values.

What is done (settings ``lattice-e8:2``, ``lattice-d4:3``, ...; ``/bN`` for a scale per N values):

- **Rotation.** K and V rows are rotated as llama.cpp rotates quantized caches (``scoring.rotation_size``: the
  Walsh-Hadamard block of K is the largest power of two >= 64 dividing the head size, V's is 64; none when the head
  size is not a multiple of 64), coded, and rotated back: attention sees the reconstruction in the model's space.
- **Groups.** The rotated row is cut into consecutive groups of n = 8 (E8) or n = 4 (D4) values; each group is
  coded as the nearest point ``s * c`` of a scaled finite codebook C with 2^(n b) points (b bits per value).
- **The codebooks** are sign-symmetric sets of lattice points. A *source* a is a vector of positive half-integers
  (1/2, 3/2, ...); its points are s (.) a for the sign patterns s with sum_i s_i a_i even (half of them: n - 1
  sign bits, the last sign is parity). These points lie in D^_n = D_n + 1/2 (half-integer vectors of even sum),
  a translate of D_n.

  * ``e8:2`` (16 bits per 8 values), QuIP#'s E8P construction: the 256 sources of smallest norm (the 227 with
    norm^2 <= 10, then 29 of norm^2 12), 7 sign bits, and one bit choosing a shift of +1/4 or -1/4 on every
    coordinate. D^_8 + 1/4 and D^_8 - 1/4 = D_8 + 1/4 together are exactly E8 + 1/4 (E8 = D_8 u D^_8), so every
    codeword is a point of the shifted E8 lattice: the 2^15 points of D^_8 of norm^2 <= 12 (all up to 10), moved
    by +1/4 and by -1/4 (norm^2 0.5 to 16.5; not a ball around 0 in the shifted space, one around +-1/4 1).
  * ``d4:b`` (4 b bits per 4 values; b = 2, 3, 4): the 2^(4b-3) sources of smallest norm, 3 sign bits, no shift
    (a +-1/4 shift would turn D4 into the cubic lattice D4+ ~ Z^4); the codebook is the 2^(4b) points of
    D^_4 = D_4 + 1/2 nearest the origin (``d4:3``: all 3992 of norm^2 < 41 and 104 of the 41 shell).
    (``e8:3``, 2^16 sources, would be built the same way; it is not offered: untried.)

  Where the last norm shell does not fit whole, its sources are taken with the smallest largest coordinate
  first, then in lexicographic order (a fixed, documented choice; QuIP#'s own pick of the 29 may differ).
  Off-ball groups are many at 2 bits: about a third of E8P's groups and 7% of D4's (3 bits) at the best scale on
  Gaussian rows, so the numpy encode costs ~1.5 ms per 256-value row (E8P) and ~0.75 ms (D4), 5 scales each.
- **Exact nearest point** (:meth:`Codebook.nearest`). First Conway & Sloane's decoder of the infinite lattice
  coset (D_n: round, and re-round the worst coordinate the other way when the sum is odd; E8 = the nearer of the
  D_8 and D_8 + 1/2 answers), shifted as the codebook is; when that lattice point is a codeword (a table lookup
  of its source), it is the nearest codeword, since the codebook is a subset of the coset. The rest (points far
  out, where the ball-shaped codebook ends) go through an exact search over the sources: for a source a the best
  signs are sign(y) (the best point is <|y|, a> - |a|^2/2 away in score), and when their parity is wrong the one
  flip that costs least, 2 min_i |y_i| a_i; the best source over all of them (and both shifts) wins.
- **Scale.** One scale per head row (fp16: 16 / head_dim bits per value) or per block of N values (``/bN``; an
  8-bit ue5m3 scale as the qaq cache types store, 8 / N bits per value). For each row or block, candidate scales
  rms(x) / rho * f (rho: the codebook's best rms for Gaussian data, :data:`SCALE_FACTORS` f) are tried: nearest
  codewords, then the least-squares scale for those codewords rounded to the stored format, and the candidate
  with the smallest squared error is kept.

Bits per value: b (the codeword index) + the scale's bits: 16 / head_dim per row, 8 / N per block. Nothing is
learnt from calibration (the code is data-oblivious, like TurboQuant); ``fit`` records the shapes and the model.

Departures / simulation: Q is not rounded (a native type would round Q to q8_0 for the dot product, as the
``ggml:`` rewrite does); the reconstruction is stored in the f16 cache (rounding ~5e-4 relative).
"""
from __future__ import annotations

import itertools
import re
from functools import lru_cache

import numpy as np

from .. import quants, scoring
from . import Bits, MethodError, layer_shapes, row_bits

DEFAULTS = ("e8:2", "d4:3")
LATTICES = ("e8", "d4")
SCALE_FACTORS = np.array([0.85, 0.93, 1.0, 1.08, 1.17], np.float32)


# --- infinite-lattice decoders (Conway & Sloane, "Fast quantizing and decoding algorithms for lattice quantizers
#     and codes", 1982) -----------------------------------------------------------------------------------------

def nearest_dn(y: np.ndarray) -> np.ndarray:
    """Nearest point of D_n (integer vectors of even sum) to each row of y (..., n): round every coordinate; where
    the sum is odd, round the coordinate farthest from its integer the other way."""
    y = np.asarray(y, np.float64)
    f = np.round(y)
    odd = (np.sum(f, axis=-1) % 2) != 0
    if np.any(odd):
        err = y - f
        i = np.argmax(np.abs(err), axis=-1)
        adj = np.take_along_axis(err, i[..., None], -1)[..., 0]
        step = np.where(adj >= 0, 1.0, -1.0)  # round the other way: towards y
        fi = np.take_along_axis(f, i[..., None], -1)[..., 0] + np.where(odd, step, 0.0)
        np.put_along_axis(f, i[..., None], fi[..., None], -1)
    return f


def nearest_e8(y: np.ndarray) -> np.ndarray:
    """Nearest point of E8 = D_8 u (D_8 + 1/2) to each row of y (..., 8)."""
    a = nearest_dn(y)
    b = nearest_dn(y - 0.5) + 0.5
    da = np.sum((y - a) ** 2, axis=-1, keepdims=True)
    db = np.sum((y - b) ** 2, axis=-1, keepdims=True)
    return np.where(da <= db, a, b)


# --- finite sign-symmetric codebooks ------------------------------------------------------------------------------

class Codebook:
    """Points s (.) a + t d 1: sources a (J, n) of positive half-integers, signs s with sum s_i a_i even, t in
    {+1, -1} when the shift d is not 0 (else t = 0). Index bits: shift (1 if d), source (log2 J), n - 1 signs."""

    def __init__(self, lattice: str, bits: int):
        if lattice == "e8":
            n, shift = 8, 0.25
        elif lattice == "d4":
            n, shift = 4, 0.0
        else:
            raise ValueError(f"unknown lattice {lattice!r}")
        self.lattice, self.bits, self.n, self.shift = lattice, bits, n, shift
        n_src = 2 ** (n * bits - (n - 1) - (1 if shift else 0))
        self.sources = _sources(n, n_src)                       # (J, n) float64, positive half-integers
        self.half_norm = 0.5 * np.sum(self.sources ** 2, axis=1)
        self.min_src = self.sources.min(axis=1)
        k = (self.sources - 0.5).astype(np.int64)               # 0, 1, 2, ... per coordinate
        self.base = int(k.max()) + 1
        self._pow = self.base ** np.arange(n)
        self.table = np.full(self.base ** n, -1, np.int64)      # source key -> source index (-1: not a source)
        self.table[k @ self._pow] = np.arange(len(k))
        self.rho = _best_rms(self)

    @property
    def size(self) -> int:
        return len(self.sources) * 2 ** (self.n - 1) * (2 if self.shift else 1)

    def points(self) -> np.ndarray:
        """All codewords (size, n), for tests and brute force."""
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=self.n)))
        out = []
        for a in self.sources:
            p = signs * a
            p = p[(np.sum(p, axis=1) % 2) == 0]
            out.append(p)
        p = np.concatenate(out)
        if self.shift:
            p = np.concatenate([p + self.shift, p - self.shift])
        return p

    def _coset_nearest(self, y: np.ndarray) -> np.ndarray:
        """Nearest point of the infinite coset the codebook lies in: E8 + d (e8) or D_n + 1/2 (d4)."""
        if self.lattice == "e8":
            return nearest_e8(y - self.shift) + self.shift
        return nearest_dn(y - 0.5) + 0.5

    def _lookup(self, p: np.ndarray) -> np.ndarray:
        """Whether each coset point p (G, n) is a codeword."""
        z = p
        if self.shift:  # p - d has half-integer coordinates (t = +1) or integer ones (t = -1: p + d is in D^_n)
            half = np.abs((p[:, :1] - self.shift) % 1.0 - 0.5) < 1e-6
            z = np.where(half, p - self.shift, p + self.shift)
        k = np.round(np.abs(z) - 0.5).astype(np.int64)
        ok = np.all(k < self.base, axis=1)
        key = np.where(ok[:, None], k, 0) @ self._pow
        return ok & (self.table[key] >= 0)

    def _search(self, y: np.ndarray) -> np.ndarray:
        """Exact nearest codeword of each row of y (G, n) over all sources (and both shifts)."""
        best = np.full(len(y), -np.inf)
        out = np.zeros_like(y)
        a2 = 2 * self.sources                                  # odd integers
        for t in ((1.0, -1.0) if self.shift else (0.0,)):
            z = y - t * self.shift
            az = np.abs(z)
            sz = np.where(z < 0, -1.0, 1.0)
            step = max(1, (1 << 21) // len(self.sources))
            for c0 in range(0, len(y), step):
                aa, ss = az[c0:c0 + step], sz[c0:c0 + step]
                g = np.arange(len(aa))
                # -|y - p|^2 / 2 = <z, s a> - |a|^2 / 2 - |z|^2 / 2 (z = y - t d; the last term differs with t)
                score = aa @ self.sources.T - self.half_norm - 0.5 * np.sum(aa * aa, axis=1, keepdims=True)
                viol = ((ss @ a2.T) % 4) != 0                   # sum s_i a_i odd: one sign must flip
                # the flip's cost 2 min_i |z_i| a_i lies between 2 |z|_min min(a) and 2 |z_m| a_m (m = argmin |z|,
                # itself a valid flip): bound first, the exact minimum only where the bounds leave it open
                m = np.argmin(aa, axis=1)
                zmin = aa[g, m]
                hi = 2 * zmin[:, None] * self.sources.T[m]
                lo = 2 * zmin[:, None] * self.min_src[None, :]
                score -= np.where(viol, hi, 0.0)                # achievable scores
                floor = np.max(score, axis=1, keepdims=True)
                open_ = viol & (hi > lo) & (score + (hi - lo) > floor)
                if np.any(open_):
                    gi, ji = np.nonzero(open_)
                    exact = 2 * np.min(aa[gi] * self.sources[ji], axis=1)
                    score[gi, ji] += hi[gi, ji] - exact
                j = np.argmax(score, axis=1)
                sc = score[g, j]
                a = self.sources[j]
                s = ss.copy()
                v = viol[g, j]
                if np.any(v):
                    i = np.argmin(aa[v] * a[v], axis=1)
                    s[np.flatnonzero(v), i] *= -1
                p = s * a + t * self.shift
                better = sc > best[c0:c0 + step]
                best[c0:c0 + step] = np.where(better, sc, best[c0:c0 + step])
                out[c0:c0 + step] = np.where(better[:, None], p, out[c0:c0 + step])
        return out

    def nearest(self, y: np.ndarray, *, stats: dict | None = None) -> np.ndarray:
        """Nearest codeword of each row of y (G, n) (float64): the coset's nearest point where it is a codeword,
        the exact search over sources elsewhere."""
        y = np.asarray(y, np.float64)
        p = self._coset_nearest(y)
        ok = self._lookup(p)
        if not np.all(ok):
            bad = np.flatnonzero(~ok)
            p[bad] = self._search(y[bad])
        if stats is not None:
            stats["groups"] = stats.get("groups", 0) + len(y)
            stats["searched"] = stats.get("searched", 0) + int(np.sum(~ok))
        return p


def _sources(n: int, count: int) -> np.ndarray:
    """The ``count`` vectors of positive half-integers of smallest norm; in the last shell, smallest largest
    coordinate first, then lexicographic."""
    kmax = 2
    while True:
        k = np.array(list(itertools.product(range(kmax + 1), repeat=n)), np.int64)
        a = k + 0.5
        nrm = np.sum(a * a, axis=1)
        order = np.lexsort((*(k[:, i] for i in range(n - 1, -1, -1)), k.max(axis=1), nrm))
        if len(order) >= count and nrm[order[count - 1]] < (kmax + 1.5) ** 2 + (n - 1) * 0.25:
            return a[order[:count]]  # complete: a coordinate above kmax would cost more norm than the last taken
        kmax += 1


def _best_rms(cb: Codebook) -> float:
    """rms(x) / scale that minimises the squared error on N(0, 1) data (coarse grid search, fixed seed)."""
    x = np.random.default_rng(0).standard_normal((16000 // cb.n, cb.n))
    best, arg = np.inf, 1.0
    for rho in np.linspace(0.4, 3.0, 27):
        y = cb.nearest(x * rho) / rho
        e = float(np.mean((y - x) ** 2))
        if e < best:
            best, arg = e, rho
    # refine around the best
    for rho in np.linspace(arg - 0.05, arg + 0.05, 11):
        y = cb.nearest(x * rho) / rho
        e = float(np.mean((y - x) ** 2))
        if e < best:
            best, arg = e, rho
    return float(arg)


@lru_cache(maxsize=None)
def codebook(lattice: str, bits: int) -> Codebook:
    return Codebook(lattice, bits)


# --- rows ---------------------------------------------------------------------------------------------------------

def _round_scale(s: np.ndarray, fmt: str) -> np.ndarray:
    if fmt == "f16":
        return s.astype(np.float16).astype(np.float64)
    # ue5m3: the nearer of the two neighbouring representable values
    lo = quants.ue5m3_floor(s.astype(np.float32))
    hi = np.minimum(lo + 1, quants.UE5M3_MAX)
    vlo = quants.ue5m3_to_float(lo).astype(np.float64)
    vhi = quants.ue5m3_to_float(hi).astype(np.float64)
    return np.where(np.abs(s - vlo) <= np.abs(vhi - s), vlo, vhi)


def quantize_units(x: np.ndarray, cb: Codebook, fmt: str, *, stats: dict | None = None) -> np.ndarray:
    """Code units x (U, L) (L a multiple of n) each with one scale in ``fmt`` ('f16' or 'ue5m3'): returns the
    reconstruction (U, L), float64."""
    x = np.asarray(x, np.float64)
    u, L = x.shape
    rms = np.sqrt(np.mean(x * x, axis=1))
    live = rms > 0
    best_err = np.full(u, np.inf)
    best = np.zeros_like(x)
    for f in SCALE_FACTORS:
        s0 = np.where(live, rms / cb.rho * f, 1.0)
        c = cb.nearest((x / s0[:, None]).reshape(-1, cb.n), stats=stats).reshape(u, L)
        cc = np.sum(c * c, axis=1)
        s = _round_scale(np.where(cc > 0, np.sum(x * c, axis=1) / np.where(cc > 0, cc, 1), 0.0), fmt)
        y = s[:, None] * c
        err = np.sum((y - x) ** 2, axis=1)
        take = err < best_err
        best_err = np.where(take, err, best_err)
        best[take] = y[take]
    best[~live] = 0.0
    return best


def quantize(x: np.ndarray, cb: Codebook, *, block: int | None, is_v: bool,
             stats: dict | None = None) -> np.ndarray:
    """K (is_v False) or V rows x (..., d) through rotation, lattice code and scale (per row: fp16; per block of
    ``block`` values: ue5m3), rotated back: the reconstruction, float32."""
    x = np.asarray(x, np.float32)
    d = x.shape[-1]
    if d % cb.n or (block and (d % block or block % cb.n)):
        raise MethodError(f"lattice-{cb.lattice}: head size {d} is not a multiple of the group ({cb.n}) "
                          f"and block ({block})")
    r = scoring.rotation_size(d, is_v)
    xr = scoring.rotate(x, r) if r else x
    L = block or d
    y = quantize_units(xr.reshape(-1, L), cb, "ue5m3" if block else "f16", stats=stats)
    y = y.reshape(x.shape).astype(np.float32)
    return scoring.rotate(y, r) if r else y


# --- the method ---------------------------------------------------------------------------------------------------

class Lattice:
    paper = ("Conway & Sloane, fast quantizing for lattice quantizers (1982); Tseng et al., QuIP#: E8P lattice "
             "codebooks (arXiv 2402.04396)")
    headline = "QuIP# (weights, Llama-2-70B, 2 bits): WikiText-2 PPL 3.91 vs fp16 3.12"
    rewrites = frozenset({"k", "v"})
    observes = frozenset({"k", "v"})

    def __init__(self, lattice: str, bits: int, block: int | None = None):
        self.cb = codebook(lattice, bits)
        self.lattice, self.b, self.block = lattice, bits, block
        self.name = f"lattice-{lattice}"
        self.setting = f"{bits}" + (f"/b{block}" if block else "")
        self.label = f"{self.name}:{self.setting}"
        self.fingerprint: str | None = None
        self._layers: dict[int, tuple[int, int, int]] = {}
        self.stats: dict = {}

    def fit(self, calib) -> None:
        """Nothing is learnt; records the layers' shapes (for the bits) and the fingerprint."""
        self._layers = layer_shapes(calib)
        self.fingerprint = calib.ident.fingerprint

    def begin(self, n_ctx: int) -> None:
        pass

    def apply(self, il: int, kind: str, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        if kind not in ("k", "v"):
            return x
        return quantize(x, self.cb, block=self.block, is_v=kind == "v", stats=self.stats)

    def _side(self, d: int) -> float:
        return 8 / self.block if self.block else 16 / d

    def bits(self, n_ctx: int) -> Bits:
        bk, bv = row_bits(self.label, self._layers, lambda d: self.b + self._side(d))
        scale = f"ue5m3 scale per {self.block} values" if self.block else "fp16 scale per head row"
        searched = ""
        if self.stats.get("groups"):
            searched = f"; {100 * self.stats['searched'] / self.stats['groups']:.2f}% of groups off the lattice ball"
        return Bits(bk, bv, f"{self.lattice.upper()} {self.cb.size}-point codebook ({self.b} bits/value) + "
                            f"{scale}{searched}")


def make(setting: str) -> Lattice:
    """``e8:2``, ``d4:3``, ``d4:3/b32`` (the lattice, bits per value, optional block of one ue5m3 scale)."""
    m = re.fullmatch(r"\s*(e8|d4)\s*(?::\s*(\d+))?\s*(?:/\s*b(\d+))?\s*", setting.lower())
    if not m:
        raise MethodError(f"lattice:{setting}: settings are e8:BITS or d4:BITS, optionally /bN (a scale per N "
                          "values), e.g. lattice-e8:2, lattice-d4:3/b32")
    lat = m.group(1)
    bits = int(m.group(2)) if m.group(2) else (2 if lat == "e8" else 3)
    ok = {"e8": (2,), "d4": (2, 3, 4)}[lat]  # e8:3 (2^16 sources) would work the same way, untried
    if bits not in ok:
        raise MethodError(f"lattice-{lat}:{bits}: bits per value {', '.join(map(str, ok))}")
    block = int(m.group(3)) if m.group(3) else None
    n = 8 if lat == "e8" else 4
    if block is not None and (block <= 0 or block % n):
        raise MethodError(f"lattice-{lat}: the block ({block}) must be a positive multiple of {n}")
    return Lattice(lat, bits, block)
