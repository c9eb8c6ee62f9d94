"""KVQuant (Hooper et al., NeurIPS 2024, arXiv 2401.18079; official code ``SqueezeAILab/KVQuant``): per-channel
pre-RoPE keys, a per-layer non-uniform datatype, dense-and-sparse outliers, the first token in fp16.

What is followed (paper sections 3.1-3.5, App. K; the official simulation,
``quant/kvquant/simquant_module_quantizer.py``):

- **Per-channel keys, pre-RoPE** (sections 3.1-3.2): the cached (post-RoPE) keys are rotated back with the token
  positions (``rope.unrope``, the layer's RoPE from ``CalibLayer.rope``), quantized per channel, and rotated to
  their positions again (``rope.rope``): what a kernel that applies RoPE on the fly after dequantizing would see.
  Each (kv head, channel) has an offset ``(u + l) / 2`` and range ``(u - l) / 2`` **calibrated offline** on the
  calibration keys (``SimQuant.quantize``): ``u``, ``l`` are the channel's 99.5th and 0.5th percentiles with 1%
  outliers (``np.percentile``, linear), its max and min without outliers.
- **Per-token values** (section 3.1): offset and range computed **online** per token, over the whole layer row
  (all kv heads, as the official code quantizes the ``v_proj`` output row), from the token's inliers (outliers
  replaced by the row's median, ``torch.median``'s lower middle value, as ``quant_fn_nuq_recon`` does).
- **nuqX** (section 3.3): one codebook of ``2^b`` levels per layer, separately for K and V, on values normalized to
  ``[-1, 1]``, from a weighted 1-D k-means that minimises ``sum_i F_ii (A_i - Q(A_i))^2`` over the calibration
  inliers (sklearn ``KMeans(max_iter=50, sample_weight=fisher)`` in the official code); values are rounded to the
  nearest level.
- **Dense-and-sparse outliers** (section 3.4, per-vector): 1% per vector kept exact (fp16) with their indices:
  for keys the per-channel calibrated thresholds above (``x > u`` or ``x < l``: about 1% of each channel), for
  values per-token online thresholds, the row's 99.5th/0.5th quantiles with ``>=``/``<=`` (``get_outliers_dynamic``;
  on a 256-value row that is 2 + 2 values, 1.56%, not 1%, and bits() counts what was kept).
- **Attention sink** (App. K): the first token (position 0) is kept in fp16, and left out of the calibration
  statistics (thresholds, codebooks) since it is never quantized.
- Settings ``"2"``, ``"3"``, ``"4"`` with 1% outliers; ``"3:0%"`` (no outliers: calibrated min/max for keys, the row's
  min/max for values), ``"3:0.5%"`` etc.

Where it departs:

- **Fisher information.** The paper weights the k-means by the diagonal Fisher information, squared gradients of
  the language-model loss with respect to each activation. The lab has no backward pass; it uses
  ``CalibLayer.k_weight`` / ``v_weight`` instead: first-order sensitivities of the *attention output* to each key
  element / value (squared derivatives summed over the queries, ``lab._layer_stats``), not squared loss
  gradients. ``k_weight`` is per post-RoPE element; a rotation mixes the two dimensions of a RoPE pair, so the
  pre-RoPE weight of a dimension is the mean of its pair's two weights. ``v_weight`` is per token (the same for
  every channel).
- **Value codebook normalization.** The official calibration normalizes both K and V per channel (per-token
  calibration is ``assert(False)`` there) although values are quantized per token online; here the V codebook is
  fitted on calibration values normalized per token exactly as they are quantized.
- **k-means.** Weighted Lloyd iterations in 1-D (at most 50, like the official ``max_iter``) from weighted-quantile
  seeds, exact on sorted data, instead of sklearn's k-means++ seeding.
- **Q-Norm** (the paper's optional centroid renormalization, used at low bit widths) and the per-channel outlier
  *count* tuning are not implemented; the offline K statistics come from the lab's calibration text (WikiText-2
  validation by default), not from the paper's 16 x 2K-token Wikitext-2 training samples.

Simulation: the reconstruction is written into the lab's f16 cache (offsets, ranges and levels in float32, exact
outliers rounded to f16 by the cache, which is the fp16 they would be stored in). Nothing depends on the batch:
every token is quantized as it is written, except position 0.

Bits per value, per layer row of ``m = n_head_kv * head_dim`` values and ``n = n_ctx`` tokens (``bits()``; the
outlier fractions ``f`` measured over the tokens processed, nominal before any):
K = ``((n - 1) (b + 32 f_k) + 16) / n + 32 / m + 32 / n + 16 * 2^b / (n m)``: codes, outliers as an fp16 value and
a 16-bit index each (the paper's CSC/CSR widths), the fp16 first token, one 32-bit CSC pointer per token, the
calibrated fp16 offset and range of each channel and the fp16 codebook, both amortised over the n tokens.
V = ``((n - 1) (b + 32 f_v + 32 / m) + 16) / n + 32 / m + 16 * 2^b / (n m)``: the same with the per-token fp16
offset and range (32 bits per row) instead of the per-channel ones, and CSR pointers. Without outliers, no
pointers and f = 0.
"""
from __future__ import annotations

import math

import numpy as np

from .. import rope as rope_mod
from . import Bits, MethodError

DEFAULTS = ("2", "3", "4")
OUTLIER_PCT = 1.0
KMEANS_ITERS = 50

# App. O, Table 18: Wikitext-2 perplexity, LLaMA-7B (2K tokens), fp16 5.68
_TABLE18 = {(2, True): 6.01, (3, True): 5.75, (4, True): 5.69, (2, False): 7.23, (3, False): 5.87, (4, False): 5.72}


# --- the datatype ---------------------------------------------------------------------------------------------------

def weighted_kmeans_1d(a: np.ndarray, w: np.ndarray, k: int, iters: int = KMEANS_ITERS) -> np.ndarray:
    """Levels (sorted, k of them) minimising sum w (a - Q(a))^2 over the values a: Lloyd's algorithm on sorted data
    (cells are contiguous intervals between midpoints), seeded at the weighted (i + 1/2) / k quantiles."""
    a = np.asarray(a, np.float64).ravel()
    w = np.asarray(w, np.float64).ravel()
    if a.size == 0:
        return np.linspace(-1.0, 1.0, k).astype(np.float32)
    order = np.argsort(a, kind="stable")
    a, w = a[order], np.maximum(w[order], 0.0)
    if not np.isfinite(w).all() or w.sum() <= 0:
        w = np.ones_like(a)
    cw = np.concatenate([[0.0], np.cumsum(w)])
    cwa = np.concatenate([[0.0], np.cumsum(w * a)])
    seeds = np.searchsorted(cw[1:], (np.arange(k) + 0.5) / k * cw[-1])
    c = a[np.minimum(seeds, a.size - 1)]
    if np.unique(c).size < k:  # too few distinct values for k quantile seeds: spread them over the range
        c = np.linspace(a[0], a[-1], k) if a[-1] > a[0] else a[0] + np.linspace(-1e-3, 1e-3, k)
    for _ in range(iters):
        cut = np.searchsorted(a, (c[1:] + c[:-1]) / 2, side="right")  # cell j: a[cut[j-1]:cut[j]]
        b = np.concatenate([[0], cut, [a.size]])
        wsum = cw[b[1:]] - cw[b[:-1]]
        new = np.where(wsum > 0, (cwa[b[1:]] - cwa[b[:-1]]) / np.where(wsum > 0, wsum, 1.0), c)
        new = np.sort(new)
        if np.allclose(new, c, rtol=0, atol=1e-9):
            c = new
            break
        c = new
    return c.astype(np.float32)


def nearest_level(a: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Each value rounded to its nearest level (levels sorted); values beyond the ends go to the end levels."""
    levels = np.asarray(levels, np.float32)
    mid = (levels[1:] + levels[:-1]) / 2
    return levels[np.searchsorted(mid, a, side="right")]


def _pair_mean(w: np.ndarray, rp: rope_mod.RopeParams) -> np.ndarray:
    """Per-dimension weights averaged over each RoPE pair (a rotation mixes the two)."""
    w = np.array(w, np.float32, copy=True)
    idx = rp.pairs(w.shape[-1])
    m = (w[..., idx[:, 0]] + w[..., idx[:, 1]]) / 2
    w[..., idx[:, 0]] = m
    w[..., idx[:, 1]] = m
    return w


def _row_quantile(s: np.ndarray, q: float) -> np.ndarray:
    """Linear-interpolation quantile of sorted rows (np.quantile / torch.quantile's default)."""
    n = s.shape[-1]
    p = q * (n - 1)
    lo = int(math.floor(p))
    hi = min(lo + 1, n - 1)
    frac = np.float32(p - lo)
    return s[..., lo] + frac * (s[..., hi] - s[..., lo])


def normalize_rows(x: np.ndarray, pct: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-token (per row of the last axis) normalization: (a, outlier mask, offset, range) with a = (x - offset) /
    range in [-1, 1] for the inliers. Outliers (pct > 0): at or beyond the row's 1 - pct/200 and pct/200 quantiles;
    offset and range from the min and max of the row with its outliers replaced by its (lower) median."""
    x = np.asarray(x, np.float32)
    if pct > 0:
        t = 1.0 - pct / 200.0
        s = np.sort(x, axis=-1)
        upper = _row_quantile(s, t)[..., None]
        lower = _row_quantile(s, 1.0 - t)[..., None]
        out = (x >= upper) | (x <= lower)
        med = s[..., (x.shape[-1] - 1) // 2][..., None]
        tmp = np.where(out, med, x)
    else:
        out = np.zeros(x.shape, bool)
        tmp = x
    mx = tmp.max(axis=-1, keepdims=True)
    mn = tmp.min(axis=-1, keepdims=True)
    off = (mx + mn) / 2
    rng = (mx - mn) / 2
    a = np.where(rng > 0, (x - off) / np.where(rng > 0, rng, 1), 0).astype(np.float32)
    return a, out, off, rng


def value_outlier_fraction(m: int, pct: float) -> float:
    """Outliers per row of m distinct values under normalize_rows (>= the upper, <= the lower quantile)."""
    if pct <= 0:
        return 0.0
    t = 1.0 - pct / 200.0
    top = m - math.ceil(t * (m - 1) - 1e-9)
    bottom = math.floor((1.0 - t) * (m - 1) + 1e-9) + 1
    return min(top + bottom, m) / m


# --- the method -------------------------------------------------------------------------------------------------

class _LayerFit:
    def __init__(self, rp, k_off, k_rng, k_lo, k_hi, cb_k, cb_v, n_head_kv, d_k, d_v):
        self.rope, self.k_off, self.k_rng, self.k_lo, self.k_hi = rp, k_off, k_rng, k_lo, k_hi
        self.cb_k, self.cb_v = cb_k, cb_v
        self.n_head_kv, self.d_k, self.d_v = n_head_kv, d_k, d_v


class KVQuant:
    name = "kvquant"
    paper = "KVQuant (Hooper et al., NeurIPS 2024, arXiv 2401.18079; code SqueezeAILab/KVQuant)"
    rewrites = frozenset({"k", "v"})
    observes = frozenset({"k", "v"})

    def __init__(self, bits: int, outlier_pct: float = OUTLIER_PCT):
        if not 1 <= bits <= 8:
            raise MethodError(f"kvquant: {bits} bits is not supported (1..8)")
        if not 0 <= outlier_pct < 50:
            raise MethodError(f"kvquant: an outlier share of {outlier_pct}% is not supported (0 <= pct < 50)")
        self.b, self.pct = bits, float(outlier_pct)
        self.label = f"kvquant-{bits} {self.pct:g}%"
        ppl = _TABLE18.get((bits, self.pct > 0)) if self.pct in (0.0, 1.0) else None
        name = f"KVQuant-{bits}{'-1%' if self.pct > 0 else ''}"
        self.headline = (f"Wikitext-2 PPL LLaMA-7B (arXiv 2401.18079 App. O, Table 18): fp16 5.68 / {name} {ppl}"
                         if ppl else "Wikitext-2 PPL LLaMA-7B (App. O, Table 18): fp16 5.68 / KVQuant-3-1% 5.75")
        self.fingerprint: str | None = None
        self.layers: dict[int, _LayerFit] = {}
        self._n_out = {"k": 0, "v": 0}   # outliers kept, over the quantized tokens processed
        self._n_val = {"k": 0, "v": 0}   # values quantized

    # -- fitting ------------------------------------------------------------------------------------------------

    def fit(self, calib) -> None:
        """Per layer: per-channel pre-RoPE key offsets/ranges (outlier thresholds) and the K and V codebooks, from
        the calibration activations without the first token of each chunk."""
        k_levels = 2 ** self.b
        fitted = {}
        for il, L in sorted(calib.layers.items()):
            if L.rope is None:
                raise MethodError(f"{self.label}: layer {il} has no RoPE parameters this port reproduces "
                                  "(KVQuant quantizes keys before RoPE)")
            keep = np.asarray(L.pos) != 0
            if not keep.any():
                raise MethodError(f"{self.label}: layer {il}: no calibration tokens after the first")
            kpre = rope_mod.unrope(L.k, L.pos, L.rope)[keep]            # (N, h, d)
            if self.pct > 0:
                hi = np.percentile(kpre, 100.0 - self.pct / 2, axis=0).astype(np.float32)
                lo = np.percentile(kpre, self.pct / 2, axis=0).astype(np.float32)
            else:
                hi, lo = kpre.max(axis=0), kpre.min(axis=0)
            off, rng = (hi + lo) / 2, (hi - lo) / 2
            rng = np.where(rng > 0, rng, np.float32(1e-6)).astype(np.float32)
            a = (kpre - off) / rng
            inl = (kpre <= hi) & (kpre >= lo)
            wk = _pair_mean(L.k_weight, L.rope)[keep]
            cb_k = weighted_kmeans_1d(a[inl], wk[inl], k_levels)
            n, h, dv = L.v.shape
            v = L.v[keep].reshape(-1, h * dv)
            av, outv, _, _ = normalize_rows(v, self.pct)
            wv = np.broadcast_to(np.repeat(L.v_weight[keep], dv, axis=1), av.shape)
            cb_v = weighted_kmeans_1d(av[~outv], wv[~outv], k_levels)
            fitted[il] = _LayerFit(L.rope, off.astype(np.float32), rng, lo, hi, cb_k, cb_v, h, L.k.shape[2], dv)
        self.layers = fitted
        self.fingerprint = calib.ident.fingerprint

    # -- the cache --------------------------------------------------------------------------------------------------

    def begin(self, n_ctx: int) -> None:
        pass  # nothing depends on the sequence: every token but the first is quantized as written

    def quantize_keys(self, il: int, x: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Post-RoPE keys -> (reconstruction, outlier mask in pre-RoPE coordinates); no sink handling."""
        f = self.layers[il]
        pre = rope_mod.unrope(x, pos, f.rope)
        out = (pre > f.k_hi) | (pre < f.k_lo) if self.pct > 0 else np.zeros(pre.shape, bool)
        q = nearest_level((pre - f.k_off) / f.k_rng, f.cb_k) * f.k_rng + f.k_off
        rec = np.where(out, pre, q)
        return rope_mod.rope(rec, pos, f.rope), out

    def quantize_values(self, il: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Values -> (reconstruction, outlier mask); per-token over the layer row (all kv heads); no sink handling."""
        f = self.layers[il]
        n = x.shape[0]
        row = np.asarray(x, np.float32).reshape(n, -1)
        a, out, off, rng = normalize_rows(row, self.pct)
        rec = np.where(out, row, nearest_level(a, f.cb_v) * rng + off)
        return rec.reshape(x.shape).astype(np.float32), out.reshape(x.shape)

    def apply(self, il: int, kind: str, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        pos = np.asarray(pos, np.int64)
        if kind not in ("k", "v"):
            return x
        if il not in self.layers:
            raise MethodError(f"{self.label}: layer {il} was not in the calibration activations")
        rec, out = self.quantize_keys(il, x, pos) if kind == "k" else self.quantize_values(il, x)
        sink = pos == 0
        rec[sink] = x[sink]  # the attention sink stays fp16
        self._n_out[kind] += int(out[~sink].sum())
        self._n_val[kind] += int(out[~sink].size)
        return rec

    # -- bits ---------------------------------------------------------------------------------------------------

    def outlier_fraction(self, kind: str, m: int | None = None) -> float:
        """Measured share of outliers among the quantized values of ``kind``; nominal before anything was processed
        (pct for keys; for values what the quantile rule keeps on a row of m values)."""
        if self._n_val[kind]:
            return self._n_out[kind] / self._n_val[kind]
        if kind == "k" or m is None:
            return self.pct / 100.0
        return value_outlier_fraction(m, self.pct)

    def bits(self, n_ctx: int) -> Bits:
        b, n = self.b, int(n_ctx)
        rows = [(f.n_head_kv * f.d_k, f.n_head_kv * f.d_v) for f in self.layers.values()] or [(256, 256)]
        ptr = 32.0 if self.pct > 0 else 0.0
        cb = 16.0 * 2 ** b
        mk_tot = sum(r[0] for r in rows)
        mv_tot = sum(r[1] for r in rows)
        fk = self.outlier_fraction("k")
        fv = self.outlier_fraction("v", rows[0][1])
        # value-weighted over the layers (rows of different sizes have different per-row side information)
        k = sum(mk * (((n - 1) * (b + 32 * fk) + 16) / n + ptr / mk + 32.0 / n + cb / (n * mk))
                for mk, _ in rows) / mk_tot
        v = sum(mv * (((n - 1) * (b + 32 * fv + 32.0 / mv) + 16) / n + ptr / mv + cb / (n * mv))
                for _, mv in rows) / mv_tot
        mk0, mv0 = rows[0]
        same = all(r == rows[0] for r in rows)
        row = f"m={mk0}" if same else f"m={mk0} (first layer; others differ)"
        detail = (f"n={n}, {row}: K ((n-1)*({b} + 32*{fk:.4f} outliers: fp16 value + 16-bit index) + 16 first "
                  f"token)/n + {ptr:g}/m CSC pointers + 32/n per-channel fp16 offset+range + {cb:g}/(n*m) "
                  f"codebook = {k:.4f}; V ((n-1)*({b} + 32*{fv:.4f} + 32/m per-token fp16 offset+range) + 16)/n"
                  f" + {ptr:g}/m CSR pointers + {cb:g}/(n*m) codebook = {v:.4f}")
        return Bits(k, v, detail)


def make(setting: str) -> KVQuant:
    """``"2"``, ``"3"``, ``"4"`` (bits, 1% outliers), optionally ``":<pct>%"``: ``"3:0%"`` (no outliers),
    ``"3:0.5%"``."""
    parts = [p.strip() for p in str(setting).split(":") if p.strip()]
    if not parts:
        raise MethodError("kvquant needs a bit width: kvquant:2, kvquant:3, kvquant:4 (kvquant:3:0% without "
                          "outliers)")
    try:
        bits = int(parts[0])
    except ValueError:
        raise MethodError(f"kvquant:{setting}: the bit width {parts[0]!r} is not an integer") from None
    pct = OUTLIER_PCT
    for p in parts[1:]:
        try:
            pct = float(p[:-1]) if p.endswith("%") else float("nan")
        except ValueError:
            pct = float("nan")
        if not math.isfinite(pct):
            raise MethodError(f"kvquant:{setting}: unknown option {p!r} (the outlier share: 1%, 0.5%, 0%)")
    return KVQuant(bits, pct)
