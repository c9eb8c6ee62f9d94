"""Coupled Quantization (Zhang, Yi, Xu, Shrivastava, arXiv 2405.03917, "KV Cache is 1 Bit Per Channel").

What is followed (the paper's own text could not be read for this port: the mechanism below is as secondary
summaries of its §3 describe it, and the numbers in ``headline`` come from them, unverified):

- Each head's channels are split into groups of c adjacent channels; for each layer, for K and V separately, and
  for each kv head and group, 2^b centroids in R^c are learnt by k-means on calibration activations, and each
  token stores one centroid index per group: CQ-<c>c<b>b costs b/c bits per value plus the codebooks.
- Keys are quantized before RoPE: the cached (post-RoPE) key is un-rotated with its position (``rope.unrope``, the
  layer's own RoPE parameters from the GGUF), encoded, and the reconstruction rotated back (``rope.rope``).
  Values are quantized as they are.
- **Fisher-guided centroid learning**: the k-means objective weights each calibration vector's squared error by
  its sensitivity, sum_i w_i ||a_i - c(a_i)||^2, so the centroid update is the w-weighted mean of its cluster
  while the assignment (a scalar weight per vector does not change which centroid is nearest) is plain L2, the
  same nearest-centroid rule used at encoding time. The paper's weights are squared gradients of the loss (a
  diagonal Fisher); the lab has no loss gradients, so the proxy is the calibration's **first-order
  attention-output sensitivity** (``CalibLayer.k_weight`` / ``v_weight``: the squared derivatives of the layer's
  attention output with respect to each key / value element, summed over queries), summed over the group's c
  channels. For keys, whose weights are measured after RoPE, a pre-RoPE channel gets the mean of the weights of
  its RoPE pair (the rotation mixes the two; averaged over angles their squared gradients share equally).

k-means: seeded (``seed``), initialized at 2^b distinct calibration vectors, at most ``iters`` (12) Lloyd
iterations, stopped early once fewer than 0.1% of the assignments change; a cluster left empty is re-seeded at the
vector with the largest weighted error. At most ``max_points`` (4096) calibration tokens per layer are used (a
seeded subsample). Codebooks are stored in fp16 and encoding uses the fp16 centroids.

Settings: ``"1"`` = CQ-8c8b (1 bit per value), ``"2"`` = CQ-4c8b (2 bits), or explicit ``"<c>c<b>b"``.

Bits per value: b/c for the indices plus the codebooks, 2^b x c fp16 values per group, kv head and layer, charged to
a cache of n_ctx tokens holding n_ctx x c values per group: + 2^b * 16 / n_ctx bits. For 4c8b at n_ctx = 1024 that
is 2 + 256 * 16 / 1024 = 6 bits. The codebooks are a model constant, shared by every sequence: the charge falls
with longer contexts and with several sequences per cache, and ``bits`` reports both parts.

Departures and simulation approximations:

- The Fisher proxy above instead of squared loss gradients; its tokens come from the lab's calibration text, not
  the paper's 16 x 2048 WikiText-2 tokens (the lab's --calib-chunks x --calib-ctx; 2^8 centroids per group want many
  more than 1024 vectors, so short calibrations overfit).
- No fp16 window and no sink token (the paper's 1-bit results add a 128-token fp16 window in one variant).
- The reconstruction is stored in the f16 cache (rounding ~5e-4 relative).
"""
from __future__ import annotations

import re

import numpy as np

from .. import rope as rope_mod
from . import Bits, MethodError

DEFAULTS = ("1", "2")
NAMED = {"1": (8, 8), "2": (4, 8)}  # setting -> (c channels, b bits)
SEED = 0
ITERS = 12
MAX_POINTS = 4096
TOL = 1e-3  # stop once fewer than this fraction of assignments change


def _augment(x: np.ndarray) -> np.ndarray:
    """[x, 1]: with :func:`_augment_centroids`, one matmul gives ||c||^2 - 2 x.c (the L2 ranking)."""
    return np.concatenate([x, np.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)


def _augment_centroids(c: np.ndarray) -> np.ndarray:
    """(B, K, c) -> (B, c + 1, K): [-2 c, ||c||^2] transposed."""
    a = np.concatenate([-2.0 * c, np.sum(c * c, axis=-1, keepdims=True)], axis=-1)
    return np.ascontiguousarray(a.transpose(0, 2, 1)).astype(np.float32)


def nearest(x: np.ndarray, centroids: np.ndarray, *, tile: int = 512) -> np.ndarray:
    """Index of the nearest centroid (plain L2) of each vector: x (B, N, c), centroids (B, K, c) -> (B, N)."""
    xa = _augment(np.asarray(x, np.float32))
    ca = _augment_centroids(np.asarray(centroids, np.float32))
    b_, n = xa.shape[:2]
    out = np.empty((b_, n), np.int64)
    for b in range(b_):
        for n0 in range(0, n, tile):
            out[b, n0:n0 + tile] = np.argmin(xa[b, n0:n0 + tile] @ ca[b], axis=-1)
    return out


def kmeans(x: np.ndarray, w: np.ndarray, k: int, *, iters: int = ITERS, seed: int = SEED,
           init: np.ndarray | None = None, tol: float = TOL) -> np.ndarray:
    """Weighted k-means of B independent sets: x (B, N, c) vectors, w (B, N) non-negative weights -> (B, k, c)
    centroids minimizing sum_i w_i ||x_i - c(x_i)||^2 (Lloyd iterations: nearest centroid, weighted mean)."""
    x = np.asarray(x, np.float32)
    b_, n, c = x.shape
    w = np.asarray(w, np.float64)
    w = w + 1e-9 * np.maximum(w.mean(axis=1, keepdims=True), 1e-30)  # a cluster of zero weight keeps a mean
    rng = np.random.default_rng(seed)
    if init is None:
        if n >= k:
            pick = np.argsort(rng.random((b_, n)), axis=1)[:, :k]
        else:
            pick = np.stack([rng.permutation(np.resize(np.arange(n), k)) for _ in range(b_)])
        cent = np.take_along_axis(x, pick[..., None], axis=1).astype(np.float64)
    else:
        cent = np.array(init, np.float64)
    offs = (np.arange(b_) * k)[:, None]
    prev = None
    xf = x.astype(np.float64)
    for _ in range(iters):
        assign = nearest(x, cent)
        flat = (assign + offs).ravel()
        wsum = np.bincount(flat, w.ravel(), b_ * k)
        sums = np.stack([np.bincount(flat, (w * xf[..., j]).ravel(), b_ * k) for j in range(c)], axis=-1)
        filled = wsum > 0
        new = cent.reshape(b_ * k, c).copy()
        new[filled] = sums[filled] / wsum[filled, None]
        new = new.reshape(b_, k, c)
        empty = ~filled.reshape(b_, k)
        if empty.any():  # re-seed each empty cluster at the vector with the largest weighted error
            err = w * np.sum((xf - np.take_along_axis(new, assign[..., None], axis=1)) ** 2, axis=-1)
            for b in np.nonzero(empty.any(axis=1))[0]:
                slots = np.nonzero(empty[b])[0]
                far = np.argsort(-err[b])[:len(slots)]
                new[b, slots[:len(far)]] = xf[b, far]
        cent = new
        if prev is not None and np.mean(assign != prev) < tol and not empty.any():
            break
        prev = assign
    return cent.astype(np.float32)


def _groups(x: np.ndarray, c: int) -> np.ndarray:
    """(N, h, d) -> (h * d/c, N, c): one set of vectors per kv head and channel group."""
    n, h, d = x.shape
    return np.ascontiguousarray(x.reshape(n, h, d // c, c).transpose(1, 2, 0, 3).reshape(h * (d // c), n, c))


def _ungroup(g: np.ndarray, h: int) -> np.ndarray:
    b_, n, c = g.shape
    return g.reshape(h, b_ // h, n, c).transpose(2, 0, 1, 3).reshape(n, h, (b_ // h) * c)


def pre_rope_weights(w: np.ndarray, rp: rope_mod.RopeParams) -> np.ndarray:
    """Per-element key weights measured after RoPE, moved before it: each rotated pair shares its mean."""
    w = np.array(w, np.float64)
    idx = rp.pairs(w.shape[-1])
    m = (w[..., idx[:, 0]] + w[..., idx[:, 1]]) / 2
    w[..., idx[:, 0]] = m
    w[..., idx[:, 1]] = m
    return w


class CoupledQuantization:
    name = "cq"
    paper = ("Zhang, Yi, Xu, Shrivastava: KV cache is 1 bit per channel, efficient LLM inference with coupled "
             "quantization (arXiv 2405.03917)")
    headline = ("LLaMA-7B WikiText-2 PPL: fp16 5.68, CQ-4c8b (2 bits) 5.97, CQ-8c8b (1 bit) 8.09 "
                "(secondary sources, unverified)")
    rewrites = frozenset({"k", "v"})
    observes = frozenset({"k", "v"})

    def __init__(self, c: int, b: int, setting: str, *, seed: int = SEED, iters: int = ITERS,
                 max_points: int = MAX_POINTS):
        self.c, self.b = c, b
        self.setting = setting
        self.label = f"cq:{c}c{b}b"
        self.seed, self.iters, self.max_points = seed, iters, max_points
        self.fingerprint: str | None = None
        self.codebooks: dict[tuple[int, str], np.ndarray] = {}  # (il, kind) -> (h * d/c, 2^b, c), fp16 values
        self._rope: dict[int, rope_mod.RopeParams] = {}
        self._layers: dict[int, tuple[int, int, int]] = {}

    def fit(self, calib) -> None:
        self.codebooks, self._rope, self._layers = {}, {}, {}
        k = 2 ** self.b
        for il in sorted(calib.layers):
            layer = calib.layers[il]
            n, h, dk = layer.k.shape
            dv = layer.v.shape[2]
            for kind, d in (("k", dk), ("v", dv)):
                if d % self.c:
                    raise MethodError(f"{self.label}: layer {il} {kind.upper()} head size {d} is not a multiple "
                                      f"of {self.c} channels")
            if layer.rope is None:
                raise MethodError(f"{self.label}: CQ quantizes keys before RoPE, and this model's RoPE (layer {il}) "
                                  "is not one qaq_gguf.rope reproduces")
            rng = np.random.default_rng([self.seed, il])
            sel = np.sort(rng.choice(n, self.max_points, replace=False)) if n > self.max_points else np.arange(n)
            pre = rope_mod.unrope(layer.k[sel], layer.pos[sel], layer.rope)
            wk = pre_rope_weights(layer.k_weight[sel], layer.rope)
            wk = wk.reshape(len(sel), h, dk // self.c, self.c).sum(-1)           # (N, h, G)
            wv = np.repeat(layer.v_weight[sel].astype(np.float64)[:, :, None], dv // self.c, axis=2) * self.c
            for kind, x, w in (("k", pre, wk), ("v", layer.v[sel], wv)):
                wg = w.transpose(1, 2, 0).reshape(-1, len(sel))                 # (h * G, N)
                cent = kmeans(_groups(x, self.c), wg, k, iters=self.iters, seed=self.seed * 1000 + il * 2 +
                              (kind == "v"))
                self.codebooks[(il, kind)] = cent.astype(np.float16).astype(np.float32)
            self._rope[il] = layer.rope
            self._layers[il] = (h, dk, dv)
        self.fingerprint = calib.ident.fingerprint

    def begin(self, n_ctx: int) -> None:
        pass

    def encode(self, il: int, kind: str, x: np.ndarray) -> np.ndarray:
        """Nearest-centroid reconstruction of x (n, h, d) with layer il's codebooks (pre-RoPE x for keys)."""
        cb = self.codebooks.get((il, kind))
        if cb is None:
            raise MethodError(f"{self.label}: no codebook for layer {il} {kind.upper()} (fit on this model first)")
        g = _groups(np.asarray(x, np.float32), self.c)
        idx = nearest(g, cb)
        return _ungroup(np.take_along_axis(cb, idx[..., None], axis=1), x.shape[1])

    def apply(self, il: int, kind: str, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        if kind == "k":
            rp = self._rope.get(il)
            if rp is None:
                raise MethodError(f"{self.label}: layer {il} was not fitted (fit on this model first)")
            return rope_mod.rope(self.encode(il, "k", rope_mod.unrope(x, pos, rp)), pos, rp)
        if kind == "v":
            return self.encode(il, "v", x)
        return x

    def codebook_bits(self, n_ctx: int) -> float:
        return 2 ** self.b * 16 / max(n_ctx, 1)

    def bits(self, n_ctx: int) -> Bits:
        if not self._layers:
            raise MethodError(f"{self.label}: not fitted")
        per = self.b / self.c + self.codebook_bits(n_ctx)
        return Bits(per, per, f"{self.b}/{self.c} index + codebooks ({2 ** self.b}x{self.c} fp16 per {self.c} "
                              f"channels, kv head, layer) over {n_ctx} tokens: +{self.codebook_bits(n_ctx):.3f}")


def make(setting: str) -> CoupledQuantization:
    s = setting.strip()
    if s in NAMED:
        c, b = NAMED[s]
    else:
        m = re.fullmatch(r"(\d+)c(\d+)b", s)
        if not m:
            raise MethodError(f"cq:{setting}: settings are 1 (CQ-8c8b), 2 (CQ-4c8b) or <c>c<b>b, e.g. 4c8b")
        c, b = int(m.group(1)), int(m.group(2))
    if not (1 <= c <= 64 and 1 <= b <= 12):
        raise MethodError(f"cq:{setting}: 1-64 channels per group and 1-12 bits per code")
    return CoupledQuantization(c, b, s)
