"""AQUA-KV (Shutova et al., "Cache Me If You Must: Adaptive Key-Value Quantization for Large Language Models",
arXiv 2501.19392; code goodevening13/aquakv): each layer's keys and values are predicted from the previous layer's
reconstruction by a linear map, and only the residual is quantized.

What is followed (the mechanism of the paper's method section as summarised in the project's brief, section 2 of
``qaq-and-seeds.md``, and as the repository implements it: ``aquakv/cache_utils.py``, ``train_predictors.py``,
``linear_utils.py``, ``quantizers.py``; the paper's body itself was not available):

- Keys are un-RoPE'd with the layer's own RoPE and the token positions (:func:`qaq_gguf.rope.unrope`), and the
  kv heads are concatenated into one row of ``n_head_kv * head_dim`` values per token; values are concatenated
  likewise. The reconstruction of the keys is RoPE'd again before it is cached.
- Layer 0 (the first layer with a KV cache) is quantized directly with the 4-bit (256-point) grid.
- Layer l >= 1: ``K^_l = f^K_l(K^_{l-1}) + Q(K_l - f^K_l(K^_{l-1}))`` and
  ``V^_l = f^V_l([K^_l, V^_{l-1}]) + Q(V_l - f^V_l([K^_l, V^_{l-1}]))``; the f are linear with a bias.
- The predictors are fitted by ridge regression one layer at a time on *reconstructed* inputs: layer l-1 is
  reconstructed with its own predictor and quantizer before layer l's predictors are fitted (the calibration's
  keys and values of all layers over the same tokens, ``CalibLayer.k`` / ``.v``). The ridge term is the
  repository's ``percdamp`` default: ``1e-3 * mean(diag(X'X))`` added to the diagonal of ``X'X`` (the column of
  ones for the bias included, as ``fit_linear_regression`` does). Weights and bias are stored in fp16, and the
  fp16-rounded weights are the ones used, in the calibration chain and at run time alike.
- Residual quantizer, HIGGS (``HiggsQuantizer``): per token, groups of ``g`` values (the repository's
  ``hadamard_groupsize`` 1024; here ``g`` = the largest power of two <= 1024 that divides the row, so 256 on a
  256-wide row: the repository pads a shorter row to 1024, which would spend codes on zeros); the group's L2 norm is
  its scale (fp16); the group is Hadamard-transformed and normalised to unit variance per entry
  (``sqrt(g) * H x / ||x||``, H orthonormal); each pair of entries is replaced by the nearest point of a 2-D grid:
  16 points = 2 bits per value, 64 = 3, 256 = 4; dequantisation inverts the three steps.
- README defaults: the first 4 tokens (attention sinks, positions 0-3) and the last 128 tokens stay fp16.

Where it departs:

- **Grids.** The EDEN grids (EDEN2-16/64/256) are not bundled. In their place :func:`gaussian_grid` builds an
  MSE-optimal 2-D grid for a standard Gaussian with Lloyd's algorithm on 2^16 seeded samples (initialised from a
  spiral with the Gaussian's radial quantiles, deterministic): the objective the EDEN/HIGGS grids optimise, so the
  same kind of grid up to Lloyd's local optimum and sampling noise. Its MSE per value, about 0.107, 0.030 and
  0.0081 at 2, 3 and 4 bits, is below the scalar Lloyd-Max quantizer's at the same rate (0.1175, 0.0345, 0.0095).
- **Ridge, no Fisher weighting.** Plain least squares with the fixed small damping above; nothing in the fit is
  weighted by attention or output sensitivity. The paper's calibration (256 x 8192 RedPajama tokens) is far
  larger than the lab's (a few thousand tokens): with a 512-wide V predictor input the fit can overfit;
  ``fit_report`` records each predictor's relative MSE on the calibration tokens and, refitted on the first 80%,
  on the last 20% (a held-out diagnostic only; the predictors used are fitted on all tokens).
- **Sink tokens are left out of the fit** (they are never quantized at run time; the BOS key is an outlier that
  would pull the regression), whereas the repository fits on every token (its README: ``train_predictors``
  ignores the prefix and the buffer).
- **Window granularity.** The lab decodes in batches, and a cached cell holds one value for all queries of a
  batch. Every token is written exact (f16) when its batch is decoded; before the batch starting at ``p``
  (``refresh``) the tokens at positions ``< p - window`` are overwritten with their reconstruction
  (``rewrite.CacheUpdate``; the 4 sinks never are). A query thus sees at least the last ``window`` tokens
  exact, and up to ``window + n_batch - 1`` (the earlier tokens of its own batch and the window before it): a
  superset of the paper's per-token window. (The repository's own cache buffers tokens exact until at least 128
  have accumulated and then compresses the whole buffer, so its exact window varies between 1 and 128 in
  token-by-token decoding and covers a whole prefill chunk.) ``window=0`` quantizes every token as it is written.
- **Alternative residual quantizers.** ``N:TYPE`` (``2:qaq2``, ``3:qaq3``, ``4:q4_0``) quantizes the residuals with
  the lab's real block types (``scoring.quant_roundtrip``: Hadamard rotation as the llama.cpp cache applies it, per
  kv head row), and layer 0 with q4_0: what section 2(d) of the brief suggests ("the HIGGS residual could become a
  block type"). ``N`` is only the label.

Approximations: reconstructions are computed in float32 and rounded to f16 by the cache, while the next layer's
predictor reads the float32 reconstruction (the difference is far below the quantization error); the simulation
caches dequantized values (as the repository's ``FrozenCache`` evaluation does) and charges the storage the
codes would take.

Bits (``bits(n_ctx)``): residual codes (``log2(n_points) / 2`` per value) + one fp16 norm per group of ``g`` +
layer 0 at 4 bits + the fp16 sinks and window, all over ``n_ctx`` tokens, + the predictors (``(d_in + 1) x
d_out`` fp16 per layer) amortised over the ``n_ctx`` tokens of the sequence: model-constant side information,
which dominates at short context (on Gemma 3 270M about 7.6 bits per K value and 15 per V value at 512 tokens);
``detail`` also gives the figure at 32k tokens.

Settings: ``"2"``, ``"3"``, ``"4"`` (HIGGS grid bits); ``"N:TYPE"`` (block-type residual); optional further items
``r<window>`` (default r128), ``s<sinks>`` (default s4) and ``nopred`` (an ablation without predictors: layers
>= 1 quantized directly with the residual quantizer, layer 0 still at 4 bits), e.g. ``aquakv:2:r0``.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from .. import cachetypes, rope, scoring
from ..rewrite import CacheUpdate
from . import Bits, MethodError

DEFAULTS = ("2", "3", "4")

N_SINK = 4          # attention-sink tokens kept fp16 (README PREFIX_SIZE)
WINDOW = 128        # recent tokens kept fp16 (README RECENT_BUFFER_SIZE)
MAX_GROUP = 1024    # HIGGS group (README HADAMARD_GROUPSIZE)
RIDGE = 1e-3        # damping, relative to the mean diagonal of X'X (train_predictors.py --percdamp default)
GRID_SEED = 0
LAYER0_BITS = 4     # layer 0: the 256-point grid (train_predictors.py first_layer_quantizer)
LAYER0_TYPE = "q4_0"  # layer 0 for the block-type settings
LONG_CTX = 32768    # the context the detail also quotes the bits at
_FP16 = 16
_CHUNK = 1 << 15    # rows per nearest-point search (bounds the score matrix)


# --- the HIGGS residual quantizer -------------------------------------------------------------------------------

def _lloyd_init(n_points: int) -> np.ndarray:
    """A sunflower spiral with the radii of a 2-D standard Gaussian's quantiles (equal mass per point)."""
    r = np.sqrt(-2.0 * np.log(1.0 - (np.arange(n_points) + 0.5) / n_points))
    t = np.arange(n_points) * math.pi * (3.0 - math.sqrt(5.0))
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _nearest(y: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Index of the nearest grid point to each row of y (m, 2): argmax of 2 y.c - |c|^2, as quantizers.py does."""
    y = np.asarray(y, np.float32)
    g2 = (2.0 * grid.T).astype(np.float32)
    gn = np.sum(grid.astype(np.float32) ** 2, axis=1)
    out = np.empty(len(y), np.int64)
    for i in range(0, len(y), _CHUNK):
        out[i:i + _CHUNK] = np.argmax(y[i:i + _CHUNK] @ g2 - gn, axis=1)
    return out


def build_gaussian_grid(n_points: int, *, seed: int = GRID_SEED, n_samples: int = 1 << 16,
                        max_iter: int = 200, tol: float = 1e-5, n_cand: int = 10) -> np.ndarray:
    """An MSE-optimal 2-D grid of ``n_points`` for a standard Gaussian: Lloyd's algorithm on ``n_samples`` seeded
    samples from a Gaussian-quantile spiral, ``(n_points, 2)`` float32. Stands in for the EDEN grids of
    AQUA-KV/HIGGS. Between full searches each sample only compares the ``n_cand`` points nearest to its current
    one (Lloyd moves points little); the last assignment is a full search."""
    rng = np.random.default_rng([seed, n_points])
    x = rng.standard_normal((n_samples, 2))
    c = _lloyd_init(n_points)
    idx = _nearest(x, c)
    rows = np.arange(n_samples)
    k = min(n_cand, n_points)
    for it in range(max_iter + 1):
        cnt = np.bincount(idx, minlength=n_points)
        new = np.stack([np.bincount(idx, x[:, j], minlength=n_points) for j in range(2)], axis=1)
        new = np.where(cnt[:, None] > 0, new / np.maximum(cnt, 1)[:, None], c)
        shift = float(np.max(np.abs(new - c)))
        c = new
        if shift < tol or it == max_iter:
            break
        near = np.argsort(np.sum((c[:, None, :] - c[None, :, :]) ** 2, axis=-1), axis=1)[:, :k]
        cand = near[idx]                                        # (n_samples, k)
        d = (x[:, None, 0] - c[cand, 0]) ** 2 + (x[:, None, 1] - c[cand, 1]) ** 2
        idx = cand[rows, np.argmin(d, axis=1)]
    idx = _nearest(x, c)  # one exact Lloyd step to finish
    cnt = np.bincount(idx, minlength=n_points)
    new = np.stack([np.bincount(idx, x[:, j], minlength=n_points) for j in range(2)], axis=1)
    c = np.where(cnt[:, None] > 0, new / np.maximum(cnt, 1)[:, None], c)
    return c.astype(np.float32)


@lru_cache(maxsize=None)
def gaussian_grid(n_points: int) -> np.ndarray:
    """:func:`build_gaussian_grid` with the module's seed, built once per process (read-only)."""
    g = build_gaussian_grid(n_points)
    g.setflags(write=False)
    return g


def group_size(width: int) -> int:
    """HIGGS group for rows of ``width`` values: the largest power of two <= 1024 dividing it (at least 2)."""
    g = 1
    while g < MAX_GROUP and width % (2 * g) == 0:
        g *= 2
    if g < 2:
        raise MethodError(f"aquakv: rows of {width} values cannot be split into Hadamard groups of pairs")
    return g


def higgs_roundtrip(x: np.ndarray, grid: np.ndarray, group: int) -> np.ndarray:
    """HIGGS quantize-dequantize of the rows of x (m, d): per group of ``group`` values, L2 norm as scale (stored
    fp16), Hadamard transform, normalise (sqrt(group) H x / ||x||), nearest grid point per pair of entries, then
    back."""
    x = np.asarray(x, np.float32)
    m, d = x.shape
    xg = x.reshape(m, d // group, group)
    s = np.linalg.norm(xg, axis=-1, keepdims=True)
    safe = np.where(s > 0, s, np.float32(1))
    root = np.float32(math.sqrt(group))
    y = scoring.rotate(xg, group) * (root / safe)
    yq = grid[_nearest(y.reshape(-1, 2), grid)].reshape(y.shape)
    s16 = s.astype(np.float16).astype(np.float32)  # the norm is stored in fp16
    xq = scoring.rotate(yq, group) * (s16 / root)
    return xq.reshape(m, d).astype(np.float32)


# --- the ridge predictors ---------------------------------------------------------------------------------------

def _gram(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """X'X and X'Y in float64, X with a column of ones appended (the bias)."""
    xa = np.hstack([np.asarray(x, np.float64), np.ones((len(x), 1))])
    return xa.T @ xa, xa.T @ np.asarray(y, np.float64)


def _solve_ridge(cxx: np.ndarray, cxy: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    c = cxx.copy()
    c[np.diag_indices_from(c)] += lam * np.mean(np.abs(np.diag(c)))
    wa = np.linalg.solve(c, cxy).astype(np.float16).astype(np.float32)
    return wa[:-1], wa[-1]


def fit_ridge(x: np.ndarray, y: np.ndarray, lam: float = RIDGE) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) with y ~ x @ W + b by least squares, ``lam * mean(diag(X'X))`` on the diagonal of X'X (the bias
    column included, as the repository's fit_linear_regression); returned rounded to fp16 (stored form), as
    float32."""
    return _solve_ridge(*_gram(x, y), lam)


def _fit_with_heldout(x: np.ndarray, y: np.ndarray, n_train: int, lam: float = RIDGE):
    """fit_ridge on all rows, and the relative MSE on rows n_train: of a fit on rows :n_train (a diagnostic)."""
    c1, cy1 = _gram(x[:n_train], y[:n_train])
    c2, cy2 = _gram(x[n_train:], y[n_train:])
    w, b = _solve_ridge(c1, cy1, lam)
    return _solve_ridge(c1 + c2, cy1 + cy2, lam), _rel(x[n_train:] @ w + b - y[n_train:], y[n_train:])


def _rel(err: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sum(np.square(err, dtype=np.float64)) / max(np.sum(np.square(ref, dtype=np.float64)), 1e-30))


# --- the method -------------------------------------------------------------------------------------------------

class AquaKV:
    name = "aquakv"
    paper = ("Shutova et al., Cache Me If You Must: Adaptive Key-Value Quantization for Large Language Models "
             "(AQUA-KV), arXiv 2501.19392")
    headline = ("near-lossless on Llama-3.2 at 2-2.5 bits/value, <1% relative perplexity error (abstract; "
                "tables unverified)")
    rewrites = frozenset({"k", "v"})
    observes = frozenset({"k", "v"})

    def __init__(self, bits: int = 2, block_type: str | None = None, *, window: int = WINDOW, n_sink: int = N_SINK,
                 predict: bool = True, label_bits: int | None = None):
        if block_type is None and bits not in (2, 3, 4):
            raise MethodError(f"aquakv: HIGGS grids of 2, 3 or 4 bits per value, not {bits}")
        if window < 0 or n_sink < 0:
            raise MethodError("aquakv: window and sinks must be >= 0")
        self.code_bits = bits
        self.block_type = cachetypes.get(block_type).name if block_type else None
        if self.block_type and not cachetypes.get(self.block_type).is_quantized:
            raise MethodError(f"aquakv: {self.block_type} is not a quantized block type")
        self.window, self.n_sink, self.predict = int(window), int(n_sink), bool(predict)
        parts = [f"aquakv-{label_bits if label_bits is not None else bits}"]
        if self.block_type:
            parts.append(self.block_type)
        if self.window != WINDOW:
            parts.append(f"r{self.window}")
        if self.n_sink != N_SINK:
            parts.append(f"s{self.n_sink}")
        if not self.predict:
            parts.append("nopred")
        self.label = " ".join(parts)
        self.fingerprint: str | None = None
        self.layers: list[int] = []
        self.shape: dict[int, tuple[int, int, int]] = {}   # il -> (n_head_kv, head_dim_k, head_dim_v)
        self.rope: dict[int, rope.RopeParams] = {}
        self.wk: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.wv: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.fit_report: dict[int, dict[str, float]] = {}
        self.begin(0)

    # -- the quantizers ---------------------------------------------------------------------------------------------

    def _quantize(self, idx: int, il: int, kind: str, x: np.ndarray) -> np.ndarray:
        """Quantize-dequantize the rows (n, width) of layer il (position idx in the chain): layer 0 at 4 bits,
        the others with the residual quantizer."""
        hkv, dk, dv = self.shape[il]
        if self.block_type is not None:
            t = LAYER0_TYPE if idx == 0 else self.block_type
            hd = dk if kind == "k" else dv
            y = scoring.quant_roundtrip(x.reshape(len(x), hkv, hd), t, is_v=kind == "v")
            return y.reshape(x.shape)
        b = LAYER0_BITS if idx == 0 else self.code_bits
        return higgs_roundtrip(x, gaussian_grid(1 << (2 * b)), group_size(x.shape[1]))

    def _code_bits(self, idx: int, width: int) -> float:
        if self.block_type is not None:
            return cachetypes.bits(LAYER0_TYPE if idx == 0 else self.block_type)
        return (LAYER0_BITS if idx == 0 else self.code_bits) + _FP16 / group_size(width)

    def _predict_k(self, idx: int, il: int, prev_k: np.ndarray | None) -> np.ndarray | None:
        if idx == 0 or not self.predict:
            return None
        w, b = self.wk[il]
        return prev_k @ w + b

    def _predict_v(self, idx: int, il: int, khat: np.ndarray, prev_v: np.ndarray | None) -> np.ndarray | None:
        if idx == 0 or not self.predict:
            return None
        w, b = self.wv[il]
        return np.hstack([khat, prev_v]) @ w + b

    def _reconstruct(self, idx: int, il: int, kind: str, x: np.ndarray, pred: np.ndarray | None) -> np.ndarray:
        if pred is None:
            return self._quantize(idx, il, kind, x)
        return (pred + self._quantize(idx, il, kind, x - pred)).astype(np.float32)

    # -- fitting ----------------------------------------------------------------------------------------------------

    def fit(self, calib) -> None:
        layers = sorted(calib.layers)
        if not layers:
            raise MethodError("aquakv: the calibration has no layers")
        n = len(calib.layers[layers[0]].pos)
        shape, ropes = {}, {}
        for il in layers:
            cl = calib.layers[il]
            if cl.rope is None:
                raise MethodError(f"aquakv: layer {il} has no RoPE parameters this port reproduces (keys are "
                                  "quantized before RoPE)")
            if len(cl.pos) != n or not np.array_equal(cl.pos, calib.layers[layers[0]].pos):
                raise MethodError("aquakv: the calibration layers do not hold the same tokens")
            shape[il] = (cl.k.shape[1], cl.k.shape[2], cl.v.shape[2])
            ropes[il] = cl.rope
        self.layers, self.shape, self.rope = layers, shape, ropes
        self.wk, self.wv, self.fit_report = {}, {}, {}
        pos = calib.layers[layers[0]].pos
        use = pos >= self.n_sink  # sinks stay fp16: never quantized, left out of the fit
        if use.sum() < 2:
            raise MethodError("aquakv: no calibration tokens beyond the sinks")
        n_use = int(use.sum())
        n_train = max(1, int(0.8 * n_use))
        prev_k = prev_v = None
        for idx, il in enumerate(layers):
            cl = calib.layers[il]
            k = rope.unrope(cl.k, cl.pos, cl.rope)[use].reshape(n_use, -1).astype(np.float32)
            v = np.asarray(cl.v, np.float32)[use].reshape(n_use, -1)
            rep = {}
            if idx > 0 and self.predict:
                self.wk[il], rep["k_pred_heldout"] = _fit_with_heldout(prev_k, k, n_train)
            pk = self._predict_k(idx, il, prev_k)
            khat = self._reconstruct(idx, il, "k", k, pk)
            if idx > 0 and self.predict:
                xin = np.hstack([khat, prev_v])
                self.wv[il], rep["v_pred_heldout"] = _fit_with_heldout(xin, v, n_train)
            pv = self._predict_v(idx, il, khat, prev_v)
            vhat = self._reconstruct(idx, il, "v", v, pv)
            rep.update(k_pred=_rel(k - pk, k) if pk is not None else 1.0, k_err=_rel(khat - k, k),
                       v_pred=_rel(v - pv, v) if pv is not None else 1.0, v_err=_rel(vhat - v, v))
            self.fit_report[il] = rep
            prev_k, prev_v = khat, vhat
        self.fingerprint = calib.ident.fingerprint

    # -- running ----------------------------------------------------------------------------------------------------

    def begin(self, n_ctx: int) -> None:
        self._bpos: np.ndarray | None = None   # positions of the batch being decoded
        self._raw: dict[tuple[int, str], np.ndarray] = {}
        self._khat: dict[int, np.ndarray] = {}  # un-RoPE'd, heads concatenated: the chain's inputs
        self._vhat: dict[int, np.ndarray] = {}
        self._out: dict[tuple[int, str], np.ndarray] = {}  # what the cache would hold: (n, n_head_kv, head_dim)
        self._pending: list[tuple[int, str, np.ndarray, np.ndarray]] = []  # exact now, overwritten later

    def _exact(self, pos: np.ndarray) -> np.ndarray:
        """Tokens of the current batch written exact: the sinks and, with a window, the whole batch."""
        return (pos < self.n_sink) | (self.window > 0)

    def _finish_batch(self) -> None:
        if self._bpos is None or not self._raw:
            return
        missing = [il for il in self.layers if il not in self._khat or il not in self._vhat]
        if missing:
            raise MethodError(f"{self.label}: the batch at position {int(self._bpos[0])} gave no K/V "
                              f"reconstruction for layers {missing} (every layer's K and V must be handed over)")

    def _start_batch(self, pos: np.ndarray) -> None:
        if self._bpos is not None and len(self._bpos) == len(pos) and np.array_equal(self._bpos, pos):
            return
        self._finish_batch()
        self._bpos = np.array(pos, np.int64)
        self._raw, self._khat, self._vhat, self._out = {}, {}, {}, {}

    def _advance(self) -> None:
        """Reconstruct whatever the keys and values received so far allow, in layer order."""
        pos = self._bpos
        n = len(pos)
        keep = self._exact(pos) & (pos >= self.n_sink)
        for idx, il in enumerate(self.layers):
            prev = self.layers[idx - 1] if idx else None
            hkv, dk, dv = self.shape[il]
            if il not in self._khat and (il, "k") in self._raw and (idx == 0 or prev in self._khat):
                k = rope.unrope(self._raw[(il, "k")], pos, self.rope[il]).reshape(n, -1)
                khat = self._reconstruct(idx, il, "k", k, self._predict_k(idx, il, self._khat.get(prev)))
                self._khat[il] = khat
                self._out[(il, "k")] = rope.rope(khat.reshape(n, hkv, dk), pos, self.rope[il])
                if keep.any():
                    self._pending.append((il, "k", pos[keep], self._out[(il, "k")][keep]))
            if (il not in self._vhat and (il, "v") in self._raw and il in self._khat
                    and (idx == 0 or prev in self._vhat)):
                v = self._raw[(il, "v")].reshape(n, -1)
                vhat = self._reconstruct(idx, il, "v", v,
                                         self._predict_v(idx, il, self._khat[il], self._vhat.get(prev)))
                self._vhat[il] = vhat
                self._out[(il, "v")] = vhat.reshape(n, hkv, dv)
                if keep.any():
                    self._pending.append((il, "v", pos[keep], self._out[(il, "v")][keep]))

    def apply(self, il: int, kind: str, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        if kind not in ("k", "v") or il not in self.shape:
            return x
        if self.fingerprint is None:
            raise MethodError(f"{self.label}: not fitted")
        pos = np.asarray(pos, np.int64)
        self._start_batch(pos)
        x = np.asarray(x, np.float32)
        self._raw[(il, kind)] = x.copy()
        self._advance()
        exact = self._exact(pos)
        if np.all(exact):
            return x
        rec = self._out.get((il, kind))
        if rec is None:
            raise MethodError(f"{self.label}: layer {il} {kind.upper()} is needed before its inputs (layer "
                              f"{il}'s K or layer {il}-1's reconstruction) arrived; with window 0 the graph must "
                              "hand each layer's K before its V, layers in order")
        out = x.copy()
        out[~exact] = rec[~exact]
        return out

    def refresh(self, pos_next: int) -> list[CacheUpdate]:
        """Before the batch at pos_next: tokens now older than the window get their reconstruction."""
        self._finish_batch()
        cutoff = int(pos_next) - self.window
        due: dict[tuple[int, str], list] = {}
        keep = []
        for il, kind, p, val in self._pending:
            m = p < cutoff
            if m.any():
                due.setdefault((il, kind), []).append((p[m], val[m]))
            if not m.all():
                keep.append((il, kind, p[~m], val[~m]))
        self._pending = keep
        return [CacheUpdate(il, kind, np.concatenate([p for p, _ in parts]), np.concatenate([v for _, v in parts]))
                for (il, kind), parts in sorted(due.items())]

    # -- bits -------------------------------------------------------------------------------------------------------

    def _totals(self, n_ctx: int) -> dict:
        n_exact = min(n_ctx, self.n_sink + self.window)
        n_q = n_ctx - n_exact
        out = {"n_exact": n_exact, "n_q": n_q}
        for kind in ("k", "v"):
            width = {il: self.shape[il][0] * self.shape[il][1 if kind == "k" else 2] for il in self.layers}
            wk = {il: self.shape[il][0] * self.shape[il][1] for il in self.layers}
            store = sum(width[il] * (n_exact * _FP16 + n_q * self._code_bits(i, width[il]))
                        for i, il in enumerate(self.layers))
            params = 0
            if self.predict:
                for i, il in enumerate(self.layers[1:], 1):
                    prev = self.layers[i - 1]
                    d_in = wk[prev] if kind == "k" else wk[il] + width[prev]
                    params += (d_in + 1) * width[il]
            out[kind] = {"values": n_ctx * sum(width.values()), "store": store, "params": params}
        return out

    def bits(self, n_ctx: int) -> Bits:
        if not self.layers:
            raise MethodError(f"{self.label}: not fitted (the bits depend on the model's layer widths)")
        if n_ctx < 1:
            raise MethodError("aquakv: n_ctx must be positive")
        t, t_long = self._totals(n_ctx), self._totals(LONG_CTX)

        def per_value(tt, kind):
            x = tt[kind]
            return (x["store"] + _FP16 * x["params"]) / x["values"]

        bk, bv = per_value(t, "k"), per_value(t, "v")
        l0 = self.layers[0]
        width0 = self.shape[l0][0] * self.shape[l0][1]
        if self.block_type is None:
            codes = (f"HIGGS {self.code_bits} b/value (2-D {1 << (2 * self.code_bits)}-point grid) + fp16 norm "
                     f"per {group_size(width0)} values, layer {l0} {LAYER0_BITS}-bit grid")
        else:
            codes = f"residuals {self.block_type} ({cachetypes.bits(self.block_type):g} b), layer {l0} {LAYER0_TYPE}"
        fp = f"{t['n_exact']} fp16 tokens ({self.n_sink} sinks + last {self.window}) of {n_ctx}"
        pk = _FP16 * t["k"]["params"] / t["k"]["values"]
        pv = _FP16 * t["v"]["params"] / t["v"]["values"]
        pred = (f"predictors {t['k']['params'] + t['v']['params']:,} fp16 weights+biases, model-constant, amortised "
                f"over the {n_ctx} tokens: {pk:.2f} b/K + {pv:.2f} b/V value"
                if self.predict else "no predictors")
        win = (f"in the lab at least {self.window}, up to {self.window} + n_batch - 1 recent tokens exact (batch "
               "granularity)" if self.window else "no recent window")
        detail = (f"{codes}; {fp}; {pred}; at {LONG_CTX // 1024}k tokens: K {per_value(t_long, 'k'):.3f}, "
                  f"V {per_value(t_long, 'v'):.3f}; {win}")
        return Bits(bk, bv, detail)


def make(setting: str) -> AquaKV:
    items = [s.strip() for s in str(setting).split(":") if s.strip()]
    if not items:
        raise MethodError("aquakv: give the bits (2, 3 or 4), e.g. aquakv:2 or aquakv:2:qaq2")
    try:
        nbits = int(items[0])
    except ValueError:
        raise MethodError(f"aquakv:{setting}: the first item is the bits (2, 3 or 4), not {items[0]!r}") from None
    kw: dict = {}
    block = None
    for it in items[1:]:
        low = it.lower()
        if low == "nopred":
            kw["predict"] = False
        elif low[:1] in ("r", "s") and low[1:].isdigit():
            kw["window" if low[0] == "r" else "n_sink"] = int(low[1:])
        elif block is None and low in cachetypes.TYPES:
            block = low
        else:
            raise MethodError(f"aquakv:{setting}: unknown item {it!r} (a block type such as qaq2, r<window>, "
                              "s<sinks> or nopred)")
    if block is not None:
        return AquaKV(nbits, block, label_bits=nbits, **kw)
    return AquaKV(nbits, **kw)
