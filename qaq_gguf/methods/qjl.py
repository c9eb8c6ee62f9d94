"""QJL (Zandieh, Daliri, Han, arXiv 2406.03482; code amirzandieh/QJL): keys as sign bits of a JL projection.

What is followed (paper §3, the repo's ``QJLSketch`` / ``QJLKeyQuantizer`` and its CUDA kernels):

- **Sketch.** ``S`` in R^{m x d}: a Gaussian (d x m) matrix whose columns are orthonormalized in chunks of d by QR
  and scaled by sqrt(d) (``QJLSketch.init_rot_dir``, ``rot=True``); its rows are the projection directions. One
  sketch (seeded, 42 as in the README) is shared by every layer and head of the same head size, as the repo shares
  one ``QJLSketch`` across layers.
- **Keys** (§3, Eq. 4; ``qjl_quant_kernel.cu`` / ``qjl_score_kernel.cu``). Within each group of 32 tokens
  (``group_size``), the 8 channels whose norm over the group is largest are the outliers (``build_sketch``:
  ``norms.topk``). Each key k = k_in + k_out (inlier and outlier channels) is stored as sign(S k_in) (m bits),
  sign(S_o k_out) (m_o bits, S_o the first m_o rows of S), ||k|| and ||k_out|| in fp16, and the group's outlier
  indices (uint8). The score the kernel computes is

      sqrt(pi/2)/m * ||k_in|| * <S P_in q, sign(S k_in)> + sqrt(pi/2)/m_o * ||k_out|| * <S_o P_out q, sign(S_o k_out)>

  with ||k_in|| = sqrt(||k||^2 - ||k_out||^2) from the two stored fp16 norms and P_in / P_out the channel masks
  (the kernel projects the query's outlier channels apart: ``q_sketch - q_outliers_sketch``). That score is linear
  in q, so it is simulated **exactly** by rewriting only the key:

      k~ = sqrt(pi/2)/m * ||k_in|| * P_in S^T sign(S k_in) + sqrt(pi/2)/m_o * ||k_out|| * P_out S_o^T sign(S_o k_out)

  and q.k~ is the estimator for every query head of the kv group (GQA included); no query rewrite is needed. The
  sign of 0 is -1 (the kernel stores the bit ``sketch > 0``).
- **Values** (``llama2_qjl.py``): per-token asymmetric 2-bit min/max quantization in groups of 32 channels
  (``triton_quantize_and_pack_along_last_dim``; :func:`methods.uniform_quantize`), the 128 newest tokens in fp16
  (``buffer_size``: a sliding window, each value quantized as it falls out).
- **Key residual** (``QJLKeyQuantizer.update_sketch``): the keys since the last full block of ``buffer_size`` = 128
  tokens stay unquantized, and a block is sketched (its four 32-token outlier groups) once it is full.

Settings: the target key bits per value, ``"2"``, ``"3"``, ``"4"`` (any number), or ``"mNNN"`` for an explicit
sketch size; optionally ``":r<R>"`` for the fp16 buffer (default 128, a multiple of 32; ``":r0"`` sketches every
key and quantizes every value as it is written, the pessimistic bound). For a target b and head size d, m = m_o
(the repo's general layers use ``dim_outlier`` = m = 256) is the multiple of 8 (bytes of packed bits) nearest to
(b*d - 32 - 8*8/32) / 2, so that key bits including both fp16 norms and the outlier indices are about b: for
d = 256, b = 3 gives m = 368 and (2*368 + 16 + 16 + 2)/256 = 3.008 bits. The README's m = 256 for d = 128 is,
counted this way, (256 + 256 + 34)/128 = 4.27 bits per key value (the paper's "3 bits" counts the inlier sketch
and the values only); it is setting ``"m256"`` on such a model.

Departures and simulation approximations:

- One m for every layer (the README doubles it, m = 512 with m_o = 128, in the first 15 of 32 layers).
- The fp16 buffers are kept at batch granularity, as ``kivi`` does in the lab: a batch's keys and values are
  written exact (they are the newest; the repo also attends the prompt with exact keys at prefill), and
  :meth:`QJL.refresh`, before the batch starting at p, sketches the cached keys below R * floor(p / R) and
  quantizes the cached values below p - R. A query at t in a batch starting at p therefore sees t - p + R + 1
  exact values (R + 1 when decoding one token at a time) and (p mod R) + t - p + 1 exact keys ((t mod R) + 1):
  with the lab's 256-token batches, about twice the exact tokens of one-token decoding. ``":r0"`` is the other
  bound. With R = 0 a 32-token group cut by a batch boundary picks its outliers for each part separately.
- Bits count the fp16 buffer as R tokens of K and of V (the buffers the method reserves), amortised over n_ctx.
- The rewritten key k~ is stored in the f16 cache, so the estimator is evaluated on k~ rounded to f16 (relative
  error ~5e-4, far below the sketch's); the query is not rounded as the kernel's fp16 sketch of it would be.
"""
from __future__ import annotations

import math
import re

import numpy as np

from . import Bits, MethodError, uniform_quantize

DEFAULTS = ("2", "3", "4")

GROUP = 32        # tokens per outlier group (group_size)
N_OUTLIERS = 8    # outlier channels per group and head (outlier_count_general)
V_BITS = 2        # value bits (value_quantization_bits)
V_GROUP = 32      # channels per value quantization group
WINDOW = 128      # newest values kept in fp16 (buffer_size)
SEED = 42
C = math.sqrt(math.pi / 2)


def sketch_matrix(d: int, m: int, seed: int = SEED) -> np.ndarray:
    """S (m, d), float64: a Gaussian (d, m) matrix, each chunk of d columns replaced by an orthonormal basis of its
    span (reduced QR) times sqrt(d), transposed (``QJLSketch.init_rot_dir``)."""
    rng = np.random.default_rng([seed, d, m])
    proj = rng.standard_normal((d, m))
    chunks = []
    for start in range(0, m, d):
        q, _ = np.linalg.qr(proj[:, start:start + d], mode="reduced")
        chunks.append(q)
    return (np.concatenate(chunks, axis=1) * math.sqrt(d)).T.copy()


def sketch_size(bits: float, d: int, n_outliers: int = N_OUTLIERS, group: int = GROUP) -> int:
    """m (= m_o) for about ``bits`` key bits per value with head size d (see the module docstring)."""
    budget = (bits * d - 32 - n_outliers * _index_bits(d) / group) / 2
    return max(8, int(round(budget / 8)) * 8)


def _index_bits(d: int) -> int:
    return 8 if d <= 256 else 16  # the repo stores outlier indices as uint8


def key_bits(d: int, m: int, m_o: int, n_outliers: int = N_OUTLIERS, group: int = GROUP) -> float:
    """Stored bits per key value: both sketches, the two fp16 norms and the group's outlier indices."""
    return (m + m_o + 16 + 16 + n_outliers * _index_bits(d) / group) / d


def value_bits(d: int) -> float:
    """Stored bits per quantized value: 2-bit codes plus an fp16 scale and an fp16 minimum per group of 32."""
    return V_BITS + 32 / (V_GROUP if d % V_GROUP == 0 else d)


def _f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(np.float16).astype(np.float64)


def sketch_keys(x: np.ndarray, pos: np.ndarray, s: np.ndarray, m_o: int, *, n_outliers: int = N_OUTLIERS,
                group: int = GROUP) -> np.ndarray:
    """The keys x (n, heads, d) as the estimator sees them: k~ with q.k~ equal to QJL's score (module docstring)."""
    x = np.asarray(x, np.float64)
    n, h, d = x.shape
    m = s.shape[0]
    s_o = s[:m_o]
    # outlier channels: per 32-token group (by position) and head, the n_outliers channels of largest norm
    gid = np.asarray(pos, np.int64) // group
    uniq, inv = np.unique(gid, return_inverse=True)
    onehot = np.zeros((len(uniq), n))
    onehot[inv, np.arange(n)] = 1.0
    energy = (onehot @ (x * x).reshape(n, h * d)).reshape(len(uniq), h, d)
    top = np.argpartition(-energy, n_outliers - 1, axis=-1)[..., :n_outliers]
    mask = np.zeros((len(uniq), h, d), bool)
    np.put_along_axis(mask, top, True, axis=-1)
    out = mask[inv]                                  # (n, h, d): outlier channels of each token's group
    k_out = np.where(out, x, 0.0)
    k_in = x - k_out
    norm = _f16(np.linalg.norm(x, axis=-1))          # stored fp16 norms
    norm_out = _f16(np.linalg.norm(k_out, axis=-1))
    norm_in = np.sqrt(np.maximum(norm ** 2 - norm_out ** 2, 0.0))
    sign_in = np.where(k_in @ s.T > 0, 1.0, -1.0)    # (n, h, m)
    sign_out = np.where(k_out @ s_o.T > 0, 1.0, -1.0)
    rec_in = (sign_in @ s) * (C / m * norm_in)[..., None]
    rec_out = (sign_out @ s_o) * (C / m_o * norm_out)[..., None]
    return np.where(out, rec_out, rec_in).astype(np.float32)


class QJL:
    name = "qjl"
    paper = "Zandieh, Daliri, Han: QJL, 1-bit quantized JL transform for KV cache quantization (arXiv 2406.03482)"
    headline = ("LongBench, longchat-7b-v1.5-32k, '3 bits': QJL 21.83/29.44/41.52/34.42/35.62/23.60 vs fp16 "
                "20.79/29.42/42.83/34.33/33.05/24.14 (NarrativeQA/Qasper/MF-en/MF-zh/HotpotQA/2Wiki), i.e. about fp16")
    rewrites = frozenset({"k", "v"})
    observes = frozenset({"k", "v"})

    def __init__(self, setting: str, *, target: float | None = None, m: int | None = None, seed: int = SEED,
                 window: int = WINDOW):
        if window < 0 or window % GROUP:
            raise MethodError(f"qjl:{setting}: the fp16 buffer must be a multiple of {GROUP} tokens")
        self.setting = setting
        self.label = f"qjl:{setting}"
        self.target, self.m_fixed, self.seed, self.window = target, m, seed, window
        self.fingerprint: str | None = None
        self._layers: dict[int, tuple[int, int, int]] = {}  # il -> (n_head_kv, head_dim_k, head_dim_v)
        self._sizes: dict[int, int] = {}                    # head_dim -> m
        self._sketch: dict[int, np.ndarray] = {}
        # (il, kind) -> exact tokens not yet stored quantized: [(pos, values)]
        self._pending: dict[tuple[int, str], list[tuple[np.ndarray, np.ndarray]]] = {}

    # -- sizes ------------------------------------------------------------------------------------------------------

    def m_for(self, d: int) -> int:
        if d not in self._sizes:
            if d <= N_OUTLIERS:
                raise MethodError(f"{self.label}: head size {d} leaves no inlier channels beside {N_OUTLIERS} outliers")
            self._sizes[d] = self.m_fixed if self.m_fixed else sketch_size(self.target, d)
        return self._sizes[d]

    def sketch(self, d: int) -> np.ndarray:
        if d not in self._sketch:
            self._sketch[d] = sketch_matrix(d, self.m_for(d), self.seed)
        return self._sketch[d]

    def store_keys(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Keys (n, heads, d) as stored: k~, whose dot product with any query is QJL's score."""
        s = self.sketch(x.shape[-1])
        return sketch_keys(x, pos, s, s.shape[0])

    @staticmethod
    def store_values(x: np.ndarray) -> np.ndarray:
        d = x.shape[-1]
        return uniform_quantize(x, V_BITS, axis=-1, group=V_GROUP if d % V_GROUP == 0 else d)

    # -- the interface ----------------------------------------------------------------------------------------------

    def fit(self, calib) -> None:
        """Nothing is learnt (the sketch is data-oblivious); records the layers' shapes and the fingerprint."""
        self._layers = {}
        for il, layer in calib.layers.items():
            hkv, dk = layer.k.shape[1:]
            self.sketch(dk)
            self._layers[il] = (hkv, dk, layer.v.shape[2])
        self.fingerprint = calib.ident.fingerprint

    def begin(self, n_ctx: int) -> None:
        self._pending = {}

    def apply(self, il: int, kind: str, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        if kind not in ("k", "v"):
            return x
        if self.window == 0:
            return self.store_keys(x, pos) if kind == "k" else self.store_values(x)
        # the batch's tokens are the newest: written exact, stored quantized by a later refresh()
        self._pending.setdefault((il, kind), []).append((np.asarray(pos, np.int64).copy(), np.array(x, np.float32)))
        return x

    def refresh(self, pos_next: int) -> list:
        """Before the batch at pos_next: sketch the keys below R * floor(pos_next / R) (full key blocks) and quantize
        the values below pos_next - R; returns them as cache updates."""
        from ..rewrite import CacheUpdate

        updates = []
        if self.window == 0:
            return updates
        edge = {"k": self.window * (pos_next // self.window), "v": pos_next - self.window}
        for (il, kind), parts in self._pending.items():
            if not parts:
                continue
            pos = np.concatenate([p for p, _ in parts])
            vals = np.concatenate([v for _, v in parts])
            old = pos < edge[kind]
            if not old.any():
                continue
            q = self.store_keys(vals[old], pos[old]) if kind == "k" else self.store_values(vals[old])
            updates.append(CacheUpdate(il, kind, pos[old], q))
            self._pending[(il, kind)] = [(pos[~old], vals[~old])] if (~old).any() else []
        return updates

    def _amortised(self, quant_bits: float, n_ctx: int) -> float:
        n_fp16 = min(self.window, n_ctx)
        return (quant_bits * (n_ctx - n_fp16) + 16.0 * n_fp16) / max(n_ctx, 1)

    def bits(self, n_ctx: int) -> Bits:
        if not self._layers:
            raise MethodError(f"{self.label}: not fitted (bits depend on the model's head sizes)")
        nk = sum(h * dk for h, dk, _ in self._layers.values())
        nv = sum(h * dv for h, _, dv in self._layers.values())
        bk = sum(h * dk * self._amortised(key_bits(dk, self.m_for(dk), self.m_for(dk)), n_ctx)
                 for h, dk, _ in self._layers.values()) / nk
        bv = sum(h * dv * self._amortised(value_bits(dv), n_ctx) for h, _, dv in self._layers.values()) / nv
        ms = sorted({(dk, self.m_for(dk)) for _, dk, _ in self._layers.values()})
        sizes = ", ".join(f"d={d}: m=m_o={m} ({key_bits(d, m, m):.3f})" for d, m in ms)
        detail = (f"K {sizes} = (m + m_o + 2 fp16 norms + {N_OUTLIERS} uint8 outlier indices/{GROUP} tokens)/d; "
                  f"V {V_BITS}-bit + fp16 scale and min per {V_GROUP}; {self.window} newest K and V fp16 of {n_ctx}")
        return Bits(bk, bv, detail)


def make(setting: str) -> QJL:
    parts = [p.strip() for p in str(setting).split(":") if p.strip()]
    if not parts:
        raise MethodError("qjl needs a setting: qjl:2, qjl:3, qjl:4 (key bits), qjl:m256 (sketch size), "
                          "optionally :r<R> (fp16 buffer)")
    window = WINDOW
    for p in parts[1:]:
        if p[:1] == "r" and p[1:].isdigit():
            window = int(p[1:])
        else:
            raise MethodError(f"qjl:{setting}: unknown option {p!r} (r<R>: the fp16 buffer, e.g. r0)")
    label = ":".join(parts)
    mm = re.fullmatch(r"m(\d+)", parts[0])
    if mm:
        m = int(mm.group(1))
        if m < 8 or m % 8:
            raise MethodError(f"qjl:{setting}: the sketch size must be a positive multiple of 8")
        return QJL(label, m=m, window=window)
    try:
        target = float(parts[0])
    except ValueError:
        raise MethodError(f"qjl:{setting}: a setting is the key bits per value (2, 3, 4) or mNNN, a sketch "
                          "size") from None
    if not 1.0 <= target <= 16.0:
        raise MethodError(f"qjl:{setting}: key bits between 1 and 16")
    return QJL(label, target=target, window=window)
