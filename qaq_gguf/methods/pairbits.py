"""Bits per RoPE pair by measured energy (issue 24's Block-GTQ-style candidate): a key's pairs, and a value's channels,
get different integer bit widths, chosen per layer and KV head from calibration, on top of a Lloyd-Max scalar code.

Why: after a Hadamard rotation every coordinate of a key carries the same error, so the logit error follows the
arithmetic mean of the pairs' weights; with bits per pair it follows their geometric mean (reverse water-filling).
RoPE keeps each pair's energy (it rotates within the pair), so an allocation fitted on calibration keys holds at
every position. On SmolLM2's calibration keys the geometric mean of ``a_p * b_p`` (query rms times key rms per
channel) is 0.45x the arithmetic mean squared (median over layers and heads; values: 0.92x, little to gain there).
Block-GTQ (arXiv 2606.24033, ``../shared/ref/low-bit-keys.md``) reports key logit MAE -32...-80% at 2-3 bits.

What is done (settings ``pairbits:3``, ``pairbits:2.5``: the average code bits per value; ``pairbits:3/vt``: keys
as below, values through the trellis code of the same bits, one walk, as the native ``tcq3``: values gain little
from bits by energy, and the trellis is the better code; ``/pN``: N width patterns shared by the model instead of
one allocation per head, each head taking the best of them over its groups in weight order, the layout a native type
could fix with a per-head permutation of the pairs; no widths stored then; ``/h``: the keys scaled by the profiles'
rebalancing and every group of equal width rotated before its code (:func:`quantize_rotated`), ``/t`` the trellis
inside those groups, ``/x`` position 0 exact as a profile's exact cell; docs/benchmarks.md has what each does):

- **Fit** (per layer and KV head, on calibration activations, as cached: post-RoPE keys): each group's scale
  ``sigma_g`` (rms of its values; a group is a RoPE pair of the keys, or one channel of the values or of key
  dimensions RoPE leaves alone) and weight ``w_g``: keys ``sum over the group of q_sq * sigma^2`` (the logit error
  a unit relative error of the group causes; ``q_sq`` includes the logit scale), values ``sigma_g^2``. Bits: start
  at 0 everywhere, then give one more bit to the group with the largest gain per stored bit, ``w_g * (D(b) -
  D(b + 1)) / size_g`` (``D``: the Lloyd-Max distortion of N(0, 1) at b bits), until the row holds ``round(B * d)``
  bits; at most 8 per value.
- **Code** (per row, i.e. token and KV head): ``u_c = x_c / sigma_c``, each coordinate to the nearest level of its
  ``b_c``-bit Lloyd-Max quantizer of N(0, 1) after dividing by the row's rms of ``u`` (0 bits: 0), then one
  least-squares scale per row in fp16 (16 bits per row, as the trellis and lean types). No rotation.
- **Bits**: ``B + 16 / d`` per value, plus the static side information (an fp16 sigma and a 4-bit width per group
  of every head and layer) spread over the cache's tokens at ``n_ctx``.

Departures / simulation: Q is not rounded (as the lattice and trellis rewrites); the reconstruction is stored in the
f16 cache.
"""
from __future__ import annotations

import heapq
import re
from functools import lru_cache

import numpy as np

from . import (Bits, MethodError, exact_first, exact_first_bits, layer_shapes, row_bits, tcq,
               without_first)
from .. import transforms
from ..trellis import STATE_BITS, codebook, viterbi
from .turboquant import lloyd_max

DEFAULTS = ("3", "2.5")
MAX_BITS = 8


@lru_cache(maxsize=None)
def distortions() -> tuple[float, ...]:
    """Mean squared error of the b-bit Lloyd-Max quantizer on N(0, 1), b = 0 (the variance, 1) to MAX_BITS, measured
    on 2^20 Gaussian samples (seed 0)."""
    x = np.random.default_rng(0).standard_normal(1 << 20)
    d = [1.0]
    for b in range(1, MAX_BITS + 1):
        levels, thr = lloyd_max(b)
        d.append(float(np.mean((levels[np.searchsorted(thr, x)] - x) ** 2)))
    return tuple(d)


def groups(partner: np.ndarray) -> list[np.ndarray]:
    """The key dimensions coded with one width: each RoPE pair (``partner``: :func:`tcq.key_partner`), then each
    dimension RoPE leaves alone."""
    i = np.arange(len(partner))
    return ([np.array([c, partner[c]]) for c in np.flatnonzero(partner > i)]
            + [np.array([c]) for c in np.flatnonzero(partner == i)])


def allocate(weights: np.ndarray, sizes: np.ndarray, total: int) -> np.ndarray:
    """Integer bits per group: the greedy reverse water-filling of ``total`` stored bits (the widths times the group
    sizes) by gain per stored bit, ``w * (D(b) - D(b + 1)) / size``; groups whose next bit would overshoot are
    skipped. Returns the width of each group."""
    dist = distortions()
    b = np.zeros(len(weights), np.int64)
    heap = [(-w * (dist[0] - dist[1]) / s, i) for i, (w, s) in enumerate(zip(weights, sizes))]
    heapq.heapify(heap)
    left = total
    while heap and left > 0:
        _, i = heapq.heappop(heap)
        if sizes[i] > left:
            continue
        b[i] += 1
        left -= int(sizes[i])
        if b[i] < MAX_BITS:
            heapq.heappush(heap, (-weights[i] * (dist[b[i]] - dist[b[i] + 1]) / sizes[i], i))
    return b


def quantize(x: np.ndarray, sigma: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Rows x (..., d) coded with per-dimension scales sigma (d,) and widths (d,): Lloyd-Max levels of each
    dimension's width at the row's rms, one least-squares fp16 scale per row (float32 out)."""
    x = np.asarray(x, np.float64)
    shape = x.shape
    d = shape[-1]
    u = x.reshape(-1, d) / sigma
    rms = np.sqrt(np.mean(u * u, axis=1, keepdims=True))
    un = u / np.where(rms > 0, rms, 1.0)
    c = np.zeros_like(un)
    for b in np.unique(width):
        if b == 0:
            continue
        cols = width == b
        levels, thr = lloyd_max(int(b))
        c[:, cols] = levels[np.searchsorted(thr, un[:, cols])]
    r = c * sigma  # the reconstruction up to the row scale: y = s * c * sigma
    rr = np.sum(r * r, axis=1)
    s = np.where(rr > 0, np.sum(x.reshape(-1, d) * r, axis=1) / np.where(rr > 0, rr, 1.0), 0.0)
    s = s.astype(np.float16).astype(np.float64)
    return (s[:, None] * r).reshape(shape).astype(np.float32)


@lru_cache(maxsize=None)
def orthogonal(n: int) -> np.ndarray:
    """A fixed random orthogonal matrix of size n (QR of a Gaussian matrix, seed n): the rotation inside a group of
    equal width, whose size need not be a power of two (a native type would fix the sizes and use Hadamard)."""
    q, r = np.linalg.qr(np.random.default_rng(n).standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def quantize_rotated(x: np.ndarray, scale: np.ndarray, parts: list, trellis: bool = False) -> np.ndarray:
    """Rows x (..., d) coded in groups of equal width: ``y = scale * x``, each group ``(b, idx, sig)`` rotated by
    ``orthogonal(len(idx))`` and divided by its calibrated rms ``sig``, then at the rows' rms of those coordinates
    coded by the b-bit Lloyd-Max quantizer (``trellis``: widths 2-4 by the trellis code, one walk), rotated back; one
    least-squares fp16 scale per row in the ``y`` domain; returned as ``y / scale`` (float32). Dimensions in no group
    (0 bits) are 0."""
    x = np.asarray(x, np.float64)
    shape, d = x.shape, x.shape[-1]
    y = x.reshape(-1, d) * scale
    us = [(y[:, idx] @ orthogonal(len(idx)).T) / sig for _, idx, sig in parts]
    n = sum(u.shape[1] for u in us)
    rms = np.sqrt(sum(np.sum(u * u, axis=1) for u in us) / max(n, 1))[:, None] if us else np.ones((len(y), 1))
    rms = np.where(rms > 0, rms, 1.0)
    r = np.zeros_like(y)
    for (b, idx, sig), u in zip(parts, us):
        un = u / rms
        if trellis and 2 <= b <= 4:
            table, rho = codebook(int(b), STATE_BITS)
            c = table[viterbi(un * rho, table, int(b))].astype(np.float64) / rho
        else:
            levels, thr = lloyd_max(int(b))
            c = levels[np.searchsorted(thr, un)]
        r[:, idx] = (c * sig) @ orthogonal(len(idx))
    rr = np.sum(r * r, axis=1)
    s = np.where(rr > 0, np.sum(y * r, axis=1) / np.where(rr > 0, rr, 1.0), 0.0)
    s = s.astype(np.float16).astype(np.float64)
    return (s[:, None] * r / scale).reshape(shape).astype(np.float32)


class PairBits:
    paper = "Block-GTQ (arXiv 2606.24033): integer bits per RoPE pair by energy; Max (1960), Lloyd-Max quantizers"
    headline = "Block-GTQ: key logit MAE -32...-80% at 2-3 bits on 10 models"
    rewrites = frozenset({"k", "v"})
    observes = frozenset({"k", "v"})
    name = "pairbits"

    def __init__(self, bits: float, values_tcq: bool = False, patterns: int = 0, centre: bool = False,
                 rotated: bool = False, trellis: bool = False, exact: bool = False):
        self.b, self.values_tcq, self.patterns, self.centre = bits, values_tcq, patterns, centre
        self.rotated, self.trellis, self.exact = rotated, trellis, exact
        self.setting = (f"{bits:g}" + ("/vt" if values_tcq else "") + ("/c" if centre else "")
                        + ("/h" if rotated else "") + ("/t" if trellis else "") + ("/x" if exact else "")
                        + (f"/p{patterns}" if patterns else ""))
        self.key_mean: dict[int, np.ndarray] = {}  # /c: layer -> (n_head_kv, head_dim) mean key, as cached
        self.label = f"pairbits:{self.setting}"
        self.fingerprint: str | None = None
        self._layers: dict[int, tuple[int, int, int]] = {}
        # (layer, kind) -> (sigma (n_head_kv, d), width (n_head_kv, d))
        self.codes: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
        self._side_bits: dict[tuple[int, str], int] = {}  # (layer, kind) -> static bits (scales, widths)
        # /h: (layer, kind) -> per KV head (scale (d,), [(width, dims, group rms)])
        self.rot: dict[tuple[int, str], list[tuple[np.ndarray, list]]] = {}

    def fit(self, calib) -> None:
        """Per layer, kind and KV head: the groups' scales and weights from the calibration activations, then the
        widths for B bits per value (with /pN: the best of N width patterns shared by the whole model)."""
        self.codes.clear()
        self._side_bits.clear()
        layers = {il: without_first(layer) if self.exact else layer for il, layer in calib.layers.items()}
        self.key_mean = {il: tcq.key_mean(layer) for il, layer in layers.items()} if self.centre else {}
        heads = []  # (layer, kind, head, groups, sizes, weights, widths)
        for il, layer in layers.items():
            keys = layer.k - self.key_mean[il] if self.centre else layer.k
            for kind, x in (("k", keys),) + ((("v", layer.v),) if not self.values_tcq else ()):
                n_head_kv, d = x.shape[1], x.shape[2]
                grp = groups(tcq.key_partner(layer)) if kind == "k" else [np.array([c]) for c in range(d)]
                sizes = np.array([len(g) for g in grp])
                sig = np.sqrt(np.mean(np.asarray(x, np.float64) ** 2, axis=0))  # (n_head_kv, d)
                sigma = np.ones((n_head_kv, d))
                for h in range(n_head_kv):
                    s2 = np.array([np.mean(sig[h, g] ** 2) for g in grp])
                    if kind == "k":
                        w = np.array([np.sum(layer.q_sq[h, g] * sig[h, g] ** 2) for g in grp])
                    else:
                        w = s2 * sizes
                    for g, sg in zip(grp, np.sqrt(s2)):
                        sigma[h, g] = sg if sg > 0 else 1.0
                    heads.append((il, kind, h, grp, sizes, w, allocate(w, sizes, int(round(self.b * d)))))
                self.codes[(il, kind)] = (sigma, np.zeros((n_head_kv, d), np.int64))
                self._side_bits[(il, kind)] = n_head_kv * (16 + (0 if self.patterns else 4)) * len(grp)
        if self.patterns:
            heads = self._shared_patterns(heads)
        for il, kind, h, grp, _, _, wid in heads:
            for g, b in zip(grp, wid):
                self.codes[(il, kind)][1][h, g] = b
        self.rot.clear()
        if self.rotated:
            for (il, kind), (_, width) in self.codes.items():
                self.rot[(il, kind)] = self._rotated_parts(il, layers[il], kind, width)
        self._layers = layer_shapes(calib)
        self.fingerprint = calib.ident.fingerprint

    def _rotated_parts(self, il: int, layer, kind: str, width: np.ndarray) -> list[tuple[np.ndarray, list]]:
        """/h: per KV head, the keys' rebalancing scales (the profiles' own, of the centred keys with /c; values:
        1) and the groups of equal width with their calibrated rms after scaling."""
        x = np.asarray(layer.k if kind == "k" else layer.v, np.float64)
        if kind == "k" and self.centre:
            x = x - self.key_mean[il]
        scale = (transforms.rebalance_scales(layer.q_sq, np.mean(x * x, axis=0), tcq.key_partner(layer))
                 if kind == "k" else np.ones(x.shape[1:], np.float32)).astype(np.float64)
        out = []
        for h in range(x.shape[1]):
            y = x[:, h] * scale[h]
            groups_h = [(int(b), np.flatnonzero(width[h] == b)) for b in np.unique(width[h]) if b > 0]
            parts = [(b, idx, float(np.sqrt(np.mean(y[:, idx] ** 2))) or 1.0) for b, idx in groups_h]
            out.append((scale[h], parts))
        return out

    def _shared_patterns(self, heads: list) -> list:
        """Per kind, N width patterns over the groups sorted by weight (descending), picked greedily from the heads'
        own allocations to least total distortion; each head takes the best of them. What a native type with a
        fixed width layout over a per-head permutation could hold."""
        dist = np.array(distortions())
        out = []
        for kind in ("k", "v"):
            mine = [hd for hd in heads if hd[1] == kind]
            if not mine:
                continue
            if len({(len(hd[4]), tuple(hd[4])) for hd in mine}) > 1:
                raise MethodError(f"{self.label}: shared patterns need one group layout in every layer")
            order = [np.argsort(-hd[5], kind="stable") for hd in mine]
            ws = [hd[5][o] for hd, o in zip(mine, order)]
            cands = list(dict.fromkeys(tuple(hd[6][o]) for hd, o in zip(mine, order)))
            cost = np.array([[float(np.sum(w * dist[np.array(c)])) for c in cands] for w in ws])  # heads x cands
            chosen: list[int] = []
            for _ in range(min(self.patterns, len(cands))):
                base = cost[:, chosen].min(axis=1) if chosen else np.full(len(ws), np.inf)
                chosen.append(int(np.argmin(np.minimum(base[:, None], cost).sum(axis=0))))
            for hd, o, row in zip(mine, order, cost):
                pat = np.array(cands[chosen[int(np.argmin(row[chosen]))]])
                wid = np.empty_like(pat)
                wid[o] = pat
                out.append((*hd[:6], wid))
        return out

    def begin(self, n_ctx: int) -> None:
        pass

    def apply(self, il: int, kind: str, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        if kind not in ("k", "v"):
            return x
        if kind == "v" and self.values_tcq:
            y = tcq.quantize(x, int(self.b), STATE_BITS, is_v=True, factors=(1.0,))
            return exact_first(x, y, pos) if self.exact else y
        if (il, kind) not in self.codes:
            raise MethodError(f"{self.label}: layer {il} was not calibrated")
        if kind == "k" and self.centre:  # q.(k - m) = q.k - q.m: the same shift for every key of a query
            x = x - self.key_mean[il]
        sigma, width = self.codes[(il, kind)]
        y = np.empty_like(np.asarray(x, np.float32))
        for h in range(x.shape[1]):
            if self.rotated:
                scale, parts = self.rot[(il, kind)][h]
                y[:, h] = quantize_rotated(x[:, h], scale, parts, self.trellis)
            else:
                y[:, h] = quantize(x[:, h], sigma[h], width[h])
        return exact_first(x, y, pos) if self.exact else y

    def bits(self, n_ctx: int) -> Bits:
        bk, bv = row_bits(self.label, self._layers, lambda d: self.b + 16 / d)
        nk = sum(h * dk for h, dk, _ in self._layers.values())
        nv = sum(h * dv for h, _, dv in self._layers.values())
        side_k = sum(v for (_, kind), v in self._side_bits.items() if kind == "k") / (nk * max(n_ctx, 1))
        side_v = sum(v for (_, kind), v in self._side_bits.items() if kind == "v") / (nv * max(n_ctx, 1))
        values = "values by the trellis code" if self.values_tcq else "values by channel energy"
        ex = exact_first_bits(n_ctx) if self.exact else 0.0
        return Bits(bk + side_k + ex, bv + side_v + ex,
                    f"{self.b:g} bits/value, keys by pair energy, {values}, + fp16 scale per head row; static scales "
                    f"and widths {side_k:.4f} (K) / {side_v:.4f} (V) bits/value at {n_ctx} tokens")


def make(setting: str) -> PairBits:
    """``3``, ``2.5`` (average code bits per value, between 1 and 8); ``3/vt``: values by the trellis code (2, 3 or
    4 bits); ``/c``: keys centred (their calibration mean subtracted, as ``tcq:.../c``); ``/h``: keys rebalanced
    per RoPE pair (as profiles) and every group of equal width rotated (:func:`quantize_rotated`); ``/t`` (with
    ``/h``): widths 2-4 by the trellis code inside the groups; ``/x``: rows at position 0 exact (``tcq:.../x``);
    ``/pN``: N width patterns shared by the whole model, each head the best of them over its groups sorted by weight."""
    m = re.fullmatch(r"""\s*(\d+(?:\.\d+)?)\s* (/\s*vt)?\s* (/\s*c)?\s* (/\s*h)?\s* (/\s*t)?\s* (/\s*x)?\s*
                         (?:/\s*p(\d+))?\s*""", setting, flags=re.IGNORECASE | re.VERBOSE)
    if (not m or not 1 <= float(m.group(1)) <= MAX_BITS or (m.group(7) and int(m.group(7)) < 1)
            or (m.group(5) and not m.group(4))):
        raise MethodError(f"pairbits:{setting}: the setting is the average bits per value, 1 to {MAX_BITS}, "
                          "optionally /vt (values by the trellis code), /c (keys centred), /h (keys rebalanced, "
                          "groups of equal width rotated), /t (with /h: trellis inside the groups), /x (position 0 "
                          "exact) and /pN (N width patterns shared by the model), in that order, e.g. pairbits:3, "
                          "pairbits:2.5, pairbits:3/vt, pairbits:3/vt/c/h/t/x, pairbits:3/vt/p1")
    bits, vt = float(m.group(1)), bool(m.group(2))
    if vt and bits not in (2, 3, 4):
        raise MethodError(f"pairbits:{setting}: /vt codes values with the trellis of 2, 3 or 4 bits per value")
    return PairBits(bits, vt, int(m.group(7) or 0), bool(m.group(3)), bool(m.group(4)), bool(m.group(5)),
                    bool(m.group(6)))
