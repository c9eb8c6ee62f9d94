"""QAQ (Dong et al., arXiv 2403.04643; code ClubieDong/KVCacheQuantization@f8d47e0): attention-aware per-token
bit widths, separate for keys and values, a uniform quantizer around the group mean, 1% outliers in fp16.

What is followed (paper §3-§4, code ``src/quantizer.py``):

- **Granularity** ``level="head"`` (L59-64): one bit width B and one (mean, step) per token per KV head, over
  head_dim.
- **Key bound** (§4.1, code L160): ``max_error_K = sqrt(12 / ||Q||^2 * ln(T^3 / (T-1) * eps^2 + 1))`` (that is
  sqrt(12) sigma_K with sigma_K^2 <= ln(T^3/(T-1) sigma_S,max^2 + 1) / ||Q||^2). ``||Q||^2`` is the paper's: the 90th
  percentile of the calibration query norms ``CalibLayer.q_norm2`` (logit scale included), pooled over the query
  heads of each KV head; the code's grid uses a constant ``q_norm=300`` instead. Key bits depend on attention only
  through T, not on the scores.
- **Value bound** (§4.1, code L162-172): ``max_error_V = sqrt(12 / T) * eps / A_t`` with A_t the largest attention
  token t received over the last ``n = 5`` queries (the attention window of §3.2/§4.2), the max also taken over
  the query heads that share its KV head (the code takes it over whatever heads share a group).
- **Bits** (the CODE's formula, L176-190, not the paper's ceil(log2(range / (2 sqrt(3) sigma)))):
  ``B = clamp(ceil(log2(range / (2 * max_error) + 1)), n_bits_min, n_bits_max)``, range = max - min of the group's
  non-outlier values; the newest n - 1 tokens get ``n_bits_max`` (L193-195). One eps is shared by K and V, as the
  code's grid zips the two quantizer lists (so eps is sigma_S,max for keys and sigma_X,max for values).
- **Quantizer** (``_normalize``/``_uniform_quantize``, L215-253): zero point = mean of the non-outliers,
  step = (max - min) / 2^B, ``q = clamp(round((x - mean) / step), -2^(B-1), 2^(B-1) - 1)``; B = 0 stores the mean
  only. Mean and step are fp16 (the code's dtype) and the reconstruction uses the fp16 values. Kept as the code
  has it, although a mean zero point clips the longer tail of a skewed group (on Gemma 3 270M's calibration
  activations at 7 bits, 3-10x the squared error of a mid-range zero point).
- **Outliers** (``_calc_outlier_mask``, L198-212): per group, values <= the ceil(alpha/2 N)-th smallest or > the
  floor((1 - alpha/2) N)-th are kept exactly (fp16), alpha = 1% split over both tails; at head_dim 256 that flags
  4 of 256 values (1.56%), at 128 two.
- **Re-quantization during generation** (§4.2): QAQ keeps an fp16 copy of the KV cache in host memory and
  re-quantizes every token whose bit width changes as new queries arrive, from that copy. The method keeps that
  shadow copy (the exact keys and values, rounded to fp16, plus the exact queries of the current chunk per layer)
  and computes the attention the value rule needs itself: causal (and, on sliding-window layers, windowed)
  softmax(kq_scale q.k) of the exact queries over the exact keys, as the repo's fp16 prefill with
  ``output_attentions`` does. ``refresh()`` rewrites the cached tokens whose bits changed.

Settings:

- ``"2"``, ``"3"``, ``"4"`` (any number): matched average bits. ``fit()`` bisects the shared eps on the calibration
  activations so that the average stored bits per K and V value, side information included, is the target;
  ``n_bits_min = 0``, ``n_bits_max = target + 2`` (4, 5, 6: the grid's widest range is 0..4, which cannot reach a
  4-bit average once 0.5 bits/value go to scales and outliers), alpha 1%, n = 5.
- ``"paper"``: a point of the code's grid search (``grid_search.py``): eps = 1, n_bits_min = 0, n_bits_max = 4,
  alpha 1%, n = 5, level head. Which grid point produced the paper's Table 1 is not stated; eps's meaning also
  depends on the model's query/value scales, so its bits on another model are whatever the formulas give.
- Overrides after a slash (a comma separates methods on the command line): ``"3/n=1"``,
  ``"paper/eps=3/min=1/max=4/alpha=0"``.

Departures and simulation approximations:

- **Batch granularity.** QAQ re-quantizes after every generated token. The lab decodes 256-token batches, and the
  cache holds one version of each token per batch. Cached tokens (before the batch) are stored at the state after
  the last query before the batch (refresh(); exact at batch size 1). A token t of the current batch is stored at
  state s_t = t + n - 1 (its window holds all of its first n scores, T = t + n: the version the first query after
  its forced window would read); the batch's newest n - 1 tokens are at n_bits_max. Queries inside the batch
  therefore read their own batch's tokens at one state rather than each at its own.
- **Sliding-window layers.** T is min(T, n_swa), the tokens one softmax covers; tokens no later query can see are
  neither re-quantized nor counted (a windowed cache drops them).
- **Fitting eps** uses the value rule's attention on calibration text at the final state of each calibration
  chunk: ``CalibLayer.attn_last``, the max attention each token gets from the chunk's last 5 queries (and the
  group's heads), with T = the chunk's length. The matched settings hit their target on calibration text; on the
  evaluation text (where bits() measures them) the average moves with n_ctx, since both bounds depend on T.
- **Sparse-outlier indices**, which the code never counts, are counted: each outlier costs an fp16 value plus a
  ceil(log2(head_dim))-bit position within its group (the count per group is fixed by the rule; ties aside).

bits(): measured on the final stored state of every evaluated sequence (all tokens re-quantized after its last
query), averaged over sequences: per group B * (N - n_outliers) code bits + 2 * 16 bits (mean, step) +
n_outliers * (16 + ceil(log2 N)). The host fp16 shadow copy (16 bits/value) is not counted; its size is in the
detail. Before any evaluation bits() reports what fit() measured on calibration.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import Bits, MethodError

DEFAULTS = ("2", "3", "4")

PAPER = {"eps": 1.0, "min": 0, "max": 4, "alpha": 0.01, "n": 5}
_FP16 = 16


# --- the pieces, shared by fit(), apply() and refresh() ----------------------------------------------------------

def outlier_thresholds(d: int, alpha: float) -> tuple[int, int]:
    """1-based ranks (k_lo, k_hi) of the code's thresholds: x <= k_lo-th smallest or x > k_hi-th are outliers."""
    return int(math.ceil(alpha / 2 * d)), int(math.floor((1.0 - alpha / 2) * d))


def group_stats(x: np.ndarray, alpha: float):
    """Per group over the last axis: (outlier mask, fp16 mean of the non-outliers, range of the non-outliers,
    outlier count). ``x`` should already be fp16-exact."""
    d = x.shape[-1]
    if alpha > 0:
        k_lo, k_hi = outlier_thresholds(d, alpha)
        srt = np.sort(x, axis=-1)
        lo = srt[..., max(k_lo, 1) - 1:max(k_lo, 1)]
        hi = srt[..., k_hi - 1:k_hi]
        mask = (x <= lo) | (x > hi) if k_lo >= 1 else x > hi
    else:
        mask = np.zeros(x.shape, bool)
    keep = ~mask
    cnt = np.maximum(keep.sum(axis=-1), 1)
    mean = (np.where(keep, x, 0).sum(axis=-1, dtype=np.float64) / cnt).astype(np.float16).astype(np.float32)
    mx = np.where(keep, x, -np.inf).max(axis=-1)
    mn = np.where(keep, x, np.inf).min(axis=-1)
    rng = np.where(np.isfinite(mx) & np.isfinite(mn), mx - mn, 0).astype(np.float32)
    return mask, mean, rng, mask.sum(axis=-1).astype(np.int32)


def bits_from_ratio(ratio: np.ndarray, bmin: int, bmax: int) -> np.ndarray:
    """The code's B = clamp(ceil(log2(range / (2 max_error) + 1)), bmin, bmax), with ratio = range / (2 max_error)."""
    b = np.ceil(np.log2(np.asarray(ratio, np.float64) + 1.0))
    return np.clip(b, bmin, bmax).astype(np.int8)


def key_max_error(T, q_norm2, eps: float):
    """sqrt(12 / ||Q||^2 * ln(T^3 / (T - 1) * eps^2 + 1)); infinite for T <= 1 (a single token's softmax is 1)."""
    T = np.asarray(T, np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        a = np.log(T ** 3 / np.maximum(T - 1, 1e-300)) + 2.0 * math.log(eps)     # ln(T^3/(T-1) eps^2)
        inner = np.where(a > 30, np.logaddexp(a, 0.0), np.log1p(np.exp(np.minimum(a, 30))))
        e = np.sqrt(12.0 / np.asarray(q_norm2, np.float64) * inner)
    return np.where(T > 1, e, np.inf)


def key_bits(rng, T, q_norm2, eps, bmin, bmax):
    err = key_max_error(T, q_norm2, eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(np.isfinite(err), np.asarray(rng, np.float64) / (2 * err), 0.0)
    return bits_from_ratio(np.nan_to_num(ratio, nan=0.0, posinf=1e300), bmin, bmax)


def value_bits(rng, A, T, eps, bmin, bmax):
    """max_error_V = sqrt(12 / T) eps / A; ratio = range * A / (2 sqrt(12 / T) eps) (A = 0: no error bound)."""
    T = np.asarray(T, np.float64)
    return bits_from_ratio(np.asarray(rng, np.float64) * A / (2.0 * np.sqrt(12.0 / T) * eps), bmin, bmax)


def reconstruct(x: np.ndarray, mask: np.ndarray, mean: np.ndarray, rng: np.ndarray, B: np.ndarray) -> np.ndarray:
    """The code's uniform quantizer, dequantized: step = fp16(range / 2^B), q = clamp(round((x - mean) / step),
    -2^(B-1), 2^(B-1) - 1), y = q step + mean; B = 0: the mean; outliers as they are."""
    B = np.asarray(B, np.int32)
    step = (rng / np.exp2(B).astype(np.float32)).astype(np.float16).astype(np.float32)[..., None]
    half = np.exp2(np.maximum(B, 1) - 1).astype(np.float32)[..., None]
    m = mean[..., None]
    safe = np.where(step > 0, step, np.float32(1))
    q = np.clip(np.round((x - m) / safe), -half, half - 1)
    q = np.where((step > 0) & (B[..., None] > 0), q, 0)
    return np.where(mask, x, q * step + m).astype(np.float32)


def group_cost(B: np.ndarray, n_out: np.ndarray, d: int) -> np.ndarray:
    """Stored bits of each group: codes for the non-outliers, fp16 mean and step, outliers as fp16 + index."""
    idx = max(int(math.ceil(math.log2(d))), 1)
    return B.astype(np.int64) * (d - n_out) + 2 * _FP16 + n_out.astype(np.int64) * (_FP16 + idx)


def parse_setting(setting: str) -> dict:
    """``"3"`` / ``"2.5"`` (matched average bits) or ``"paper"``, then ``/key=value`` overrides of eps, min, max,
    alpha, n."""
    parts = [p.strip() for p in setting.split("/") if p.strip()]
    if not parts:
        raise MethodError("qaq needs a setting: qaq:2, qaq:3, qaq:4 (matched average bits) or qaq:paper")
    head, rest = parts[0], parts[1:]
    if head == "paper":
        cfg = dict(PAPER, target=None)
    else:
        try:
            target = float(head)
        except ValueError:
            raise MethodError(f"qaq:{setting}: the setting starts with a bit target (2, 3, 4) or 'paper'") from None
        if not 0.5 < target <= 16:
            raise MethodError(f"qaq:{setting}: target of {target} bits per value is out of range")
        cfg = {"eps": None, "min": 0, "max": int(min(16, math.ceil(target) + 2)), "alpha": 0.01, "n": 5,
               "target": target}
    for p in rest:
        key, sep, val = p.partition("=")
        key = key.strip()
        if not sep or key not in ("eps", "min", "max", "alpha", "n"):
            raise MethodError(f"qaq:{setting}: unknown override {p!r} (eps=, min=, max=, alpha=, n=)")
        if key == "eps" and cfg["target"] is not None:
            raise MethodError(f"qaq:{setting}: eps is fitted for a bit target; give eps with 'paper' only")
        try:
            cfg[key] = float(val) if key in ("eps", "alpha") else int(val)
        except ValueError:
            raise MethodError(f"qaq:{setting}: {key}={val!r} is not a number") from None
    if not 0 <= cfg["min"] <= cfg["max"] <= 16:
        raise MethodError(f"qaq:{setting}: need 0 <= min <= max <= 16 bits")
    if not 0 <= cfg["alpha"] < 0.5 or cfg["n"] < 1 or (cfg["eps"] is not None and cfg["eps"] <= 0):
        raise MethodError(f"qaq:{setting}: need 0 <= alpha < 0.5, n >= 1, eps > 0")
    return cfg


# --- per-sequence state ------------------------------------------------------------------------------------------

@dataclass
class _Kind:
    """The shadow copy of one kind (k or v) of one layer, with its group statistics and stored bits."""

    x: np.ndarray       # (cap, hkv, d) fp16-exact values
    mask: np.ndarray    # (cap, hkv, d) outliers
    mean: np.ndarray    # (cap, hkv)
    rng: np.ndarray     # (cap, hkv)
    n_out: np.ndarray   # (cap, hkv)
    B: np.ndarray       # (cap, hkv) bits of the version in the cache
    n: int = 0

    @classmethod
    def empty(cls, cap: int, hkv: int, d: int) -> "_Kind":
        return cls(np.zeros((cap, hkv, d), np.float32), np.zeros((cap, hkv, d), bool), np.zeros((cap, hkv), np.float32),
                   np.zeros((cap, hkv), np.float32), np.zeros((cap, hkv), np.int32), np.zeros((cap, hkv), np.int8))

    def grow(self, cap: int) -> None:
        if cap <= len(self.x):
            return
        for name in ("x", "mask", "mean", "rng", "n_out", "B"):
            a = getattr(self, name)
            b = np.zeros((cap,) + a.shape[1:], a.dtype)
            b[:len(a)] = a
            setattr(self, name, b)


@dataclass
class _Layer:
    q: np.ndarray
    k: _Kind
    v: _Kind
    nq: int = 0


@dataclass
class _Tally:
    """Stored bits summed over the final states of sequences."""

    bits: dict = field(default_factory=lambda: {"k": 0, "v": 0})
    values: dict = field(default_factory=lambda: {"k": 0, "v": 0})
    code: dict = field(default_factory=lambda: {"k": 0, "v": 0})      # code bits only
    outl: dict = field(default_factory=lambda: {"k": 0, "v": 0})      # outlier values
    groups: dict = field(default_factory=lambda: {"k": 0, "v": 0})
    n_seq: int = 0
    n_tok: int = 0

    def add(self, kind: str, B: np.ndarray, n_out: np.ndarray, d: int) -> None:
        self.bits[kind] += int(group_cost(B, n_out, d).sum())
        self.values[kind] += int(B.size) * d
        self.code[kind] += int((B.astype(np.int64) * (d - n_out)).sum())
        self.outl[kind] += int(n_out.sum())
        self.groups[kind] += int(B.size)

    def merged(self, other: "_Tally") -> "_Tally":
        t = _Tally()
        for name in ("bits", "values", "code", "outl", "groups"):
            getattr(t, name).update({k: getattr(self, name)[k] + getattr(other, name)[k] for k in ("k", "v")})
        t.n_seq, t.n_tok = self.n_seq + other.n_seq, self.n_tok + other.n_tok
        return t


def _softmax_rows(logits: np.ndarray, visible: np.ndarray) -> np.ndarray:
    z = np.where(visible, logits, -np.inf)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# --- the method -------------------------------------------------------------------------------------------------

class QAQ:
    name = "qaq"
    paper = "QAQ, arXiv 2403.04643"
    headline = ("LLaMA-2-7B: 7.5-9.0x KV compression at <1% accuracy drop (HellaSwag 7.48x, PIQA 9.02x, "
                "MathQA 7.48x; zero-shot)")
    rewrites = frozenset({"k", "v"})
    observes = frozenset({"q", "k", "v"})
    values_need_attention = True  # the value rule reads this batch's attention: the rewriter hands V over last

    def __init__(self, setting: str):
        self.setting = setting
        self.label = f"qaq:{setting}"
        cfg = parse_setting(setting)
        self.target = cfg["target"]
        self.eps = cfg["eps"]
        self.bmin, self.bmax = cfg["min"], cfg["max"]
        self.alpha, self.n_win = cfg["alpha"], cfg["n"]
        self.fingerprint: str | None = None
        self._layers_meta: dict[int, dict] = {}
        self._state: dict[int, _Layer] = {}
        self._cap = 0
        self._tally = _Tally()
        self._calib_tally: _Tally | None = None
        self._calib_ctx = 0
        self._ident = None

    # -- fitting -------------------------------------------------------------------------------------------------

    def fit(self, calib) -> None:
        ident = calib.ident
        self._ident = ident
        self._layers_meta = {}
        prep = []
        for il, cl in sorted(calib.layers.items()):
            hkv, dk = cl.k.shape[1], cl.k.shape[2]
            dv = cl.v.shape[2]
            grp = cl.n_head // hkv
            qn = np.array([np.percentile(cl.q_norm2[:, g * grp:(g + 1) * grp], 90) for g in range(hkv)])
            swa = bool(ident.is_swa[il]) and ident.n_swa > 0 if il < len(ident.is_swa) else False
            self._layers_meta[il] = {"hkv": hkv, "dk": dk, "dv": dv, "n_head": cl.n_head, "grp": grp,
                                     "q_norm2": np.maximum(qn, 1e-12), "kq_scale": float(cl.kq_scale),
                                     "n_swa": int(ident.n_swa) if swa else 0}
            prep.append(self._calib_layer(il, cl))
        if not prep:
            raise MethodError(f"{self.label}: the calibration has no layers")
        self._calib_ctx = calib.n_ctx
        if self.target is not None:
            self.eps = self._bisect(prep)
        self._calib_tally = self._calib_measure(prep, self.eps)
        self.fingerprint = ident.fingerprint

    def _calib_layer(self, il: int, cl) -> dict:
        """What the calibration bits need, at the final state of each calibration chunk."""
        meta = self._layers_meta[il]
        k16 = cl.k.astype(np.float16).astype(np.float32)
        v16 = cl.v.astype(np.float16).astype(np.float32)
        _, _, rk, ok = group_stats(k16, self.alpha)
        _, _, rv, ov = group_stats(v16, self.alpha)
        pos = np.asarray(cl.pos, np.int64)
        chunk = np.cumsum(pos == 0) - 1 if len(pos) and pos[0] == 0 else np.zeros(len(pos), np.int64)
        L = np.bincount(chunk)[chunk]              # each token's chunk length
        T = L.astype(np.float64)
        keep = np.ones(len(pos), bool)
        if meta["n_swa"]:
            T = np.minimum(T, meta["n_swa"])
            keep = pos >= L - meta["n_swa"]         # what the last query still sees
        forced = pos >= L - self.n_win + 1 if self.n_win > 1 else np.zeros(len(pos), bool)
        A = np.asarray(cl.attn_last, np.float64)    # the max over the chunk's last n queries (see the docstring)
        return {"rk": rk[keep], "ok": ok[keep], "rv": rv[keep], "ov": ov[keep], "T": T[keep, None],
                "forced": forced[keep, None], "A": A[keep], "meta": meta, "n_tok": int(keep.sum())}

    def _calib_measure(self, prep: list[dict], eps: float) -> _Tally:
        t = _Tally()
        for p in prep:
            m = p["meta"]
            bk = key_bits(p["rk"], p["T"], m["q_norm2"][None, :], eps, self.bmin, self.bmax)
            bv = value_bits(p["rv"], p["A"], p["T"], eps, self.bmin, self.bmax)
            bk = np.where(p["forced"], self.bmax, bk).astype(np.int8)
            bv = np.where(p["forced"], self.bmax, bv).astype(np.int8)
            t.add("k", bk, p["ok"], m["dk"])
            t.add("v", bv, p["ov"], m["dv"])
            t.n_tok += p["n_tok"]
        t.n_seq = 1
        return t

    @staticmethod
    def _avg(t: _Tally) -> float:
        return (t.bits["k"] + t.bits["v"]) / max(t.values["k"] + t.values["v"], 1)

    def _bisect(self, prep: list[dict]) -> float:
        """The shared eps whose calibration average (K and V, side information included) is the target: the
        average falls as eps grows, in integer steps, so bisect log(eps) and keep the closer end."""
        lo, hi = -30.0, 60.0
        f_lo, f_hi = self._avg(self._calib_measure(prep, 10 ** lo)), self._avg(self._calib_measure(prep, 10 ** hi))
        if self.target >= f_lo:
            return 10 ** lo
        if self.target <= f_hi:
            return 10 ** hi
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            f = self._avg(self._calib_measure(prep, 10 ** mid))
            if f > self.target:
                lo, f_lo = mid, f
            else:
                hi, f_hi = mid, f
            if hi - lo < 1e-6:
                break
        return 10 ** (lo if abs(f_lo - self.target) < abs(f_hi - self.target) else hi)

    # -- a sequence ----------------------------------------------------------------------------------------------

    def _require_fit(self) -> None:
        if self.fingerprint is None or self.eps is None:
            raise MethodError(f"{self.label}: not fitted (call fit() on calibration activations first)")

    def begin(self, n_ctx: int) -> None:
        self._require_fit()
        self._finish()
        self._cap = int(n_ctx)
        self._state = {}

    def _finish(self) -> None:
        if self._state:
            t = self._final_tally()
            if t.n_tok:
                self._tally = self._tally.merged(t)
        self._state = {}

    def _layer(self, il: int) -> _Layer:
        st = self._state.get(il)
        if st is None:
            meta = self._layers_meta.get(il)
            if meta is None:
                raise MethodError(f"{self.label}: layer {il} was not in the calibration it was fitted on")
            cap = max(self._cap, 1)
            st = _Layer(np.zeros((cap, meta["n_head"], meta["dk"]), np.float32),
                        _Kind.empty(cap, meta["hkv"], meta["dk"]), _Kind.empty(cap, meta["hkv"], meta["dv"]))
            self._state[il] = st
        return st

    def _grow(self, st: _Layer, need: int) -> None:
        if need > len(st.q):
            cap = max(need, 2 * len(st.q))
            q = np.zeros((cap,) + st.q.shape[1:], np.float32)
            q[:len(st.q)] = st.q
            st.q = q
        st.k.grow(need)
        st.v.grow(need)

    # -- attention from the shadow copy ---------------------------------------------------------------------------

    def _attention(self, il: int, st: _Layer, rows: np.ndarray, n_keys: int) -> np.ndarray:
        """softmax(kq_scale q_j . k_t) of the exact queries at positions ``rows`` over keys 0..n_keys-1, causal and
        windowed as the layer is: (n_head, len(rows), n_keys)."""
        meta = self._layers_meta[il]
        s = meta["kq_scale"]
        grp, r = meta["grp"], len(rows)
        logits = np.empty((meta["n_head"], r, n_keys), np.float32)
        for g in range(meta["hkv"]):                                    # one BLAS product per KV head
            q = np.ascontiguousarray(st.q[rows, g * grp:(g + 1) * grp].transpose(1, 0, 2)).reshape(grp * r, -1)
            k = np.ascontiguousarray(st.k.x[:n_keys, g])                # (n_keys, d)
            logits[g * grp:(g + 1) * grp] = (q @ k.T).reshape(grp, r, n_keys)
        logits *= np.float32(s)
        t = np.arange(n_keys)
        vis = t[None, :] <= rows[:, None]
        if meta["n_swa"]:
            vis &= rows[:, None] - t[None, :] < meta["n_swa"]
        return _softmax_rows(logits, vis[None])

    def _group_max(self, il: int, S: np.ndarray) -> np.ndarray:
        """(n_head, r, ...) -> max over the rows and the heads of each KV group: (..., hkv)."""
        meta = self._layers_meta[il]
        S = S.reshape((meta["hkv"], meta["grp"] * S.shape[1]) + S.shape[2:]).max(axis=1)
        return np.moveaxis(S, 0, -1)

    def _T(self, il: int, T):
        n_swa = self._layers_meta[il]["n_swa"]
        T = np.asarray(T, np.float64)
        return np.minimum(T, n_swa) if n_swa else T

    def _state_bits(self, il: int, st: _Layer, end: int, lo: int):
        """K and V bits of tokens lo..end-1 at the state after query end-1 (T = end, window: queries end-n..end-1)."""
        meta = self._layers_meta[il]
        T = self._T(il, end)
        bk = key_bits(st.k.rng[lo:end], T, meta["q_norm2"][None, :], self.eps, self.bmin, self.bmax)
        rows = np.arange(max(0, end - self.n_win), end)
        A = self._group_max(il, self._attention(il, st, rows, end))[lo:end]   # (end-lo, hkv)
        bv = value_bits(st.v.rng[lo:end], A, T, self.eps, self.bmin, self.bmax)
        if self.n_win > 1:
            forced = np.arange(lo, end) >= end - self.n_win + 1
            bk[forced] = self.bmax
            bv[forced] = self.bmax
        return bk, bv

    # -- the rewrite ---------------------------------------------------------------------------------------------

    def apply(self, il: int, kind: str, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        self._require_fit()
        x = np.asarray(x, np.float32)
        pos = np.asarray(pos, np.int64)
        st = self._layer(il)
        n_b = x.shape[0]
        p0 = int(pos[0]) if n_b else 0
        if n_b and not np.array_equal(pos, np.arange(p0, p0 + n_b)):
            raise MethodError(f"{self.label}: positions of a batch must be consecutive")
        end = p0 + n_b
        self._grow(st, end)
        if kind == "q":
            if p0 != st.nq:
                raise MethodError(f"{self.label}: layer {il}: queries at {p0} after {st.nq} (call begin() for a "
                                  "new sequence)")
            st.q[p0:end] = x
            st.nq = end
            return x
        if kind not in ("k", "v"):
            raise MethodError(f"{self.label}: unknown kind {kind!r}")
        kd = st.k if kind == "k" else st.v
        if p0 != kd.n:
            raise MethodError(f"{self.label}: layer {il}: {kind} at {p0} after {kd.n} (call begin() for a new "
                              "sequence)")
        x16 = x.astype(np.float16).astype(np.float32)
        mask, mean, rng, n_out = group_stats(x16, self.alpha)
        kd.x[p0:end], kd.mask[p0:end], kd.mean[p0:end], kd.rng[p0:end], kd.n_out[p0:end] = x16, mask, mean, rng, n_out
        kd.n = end
        meta = self._layers_meta[il]
        t = np.arange(p0, end)
        forced = t + self.n_win - 1 > end - 1          # the batch's newest n-1 tokens
        T = self._T(il, t + self.n_win)[:, None]        # state s_t = t + n - 1 for the others
        if kind == "k":
            B = key_bits(rng, T, meta["q_norm2"][None, :], self.eps, self.bmin, self.bmax)
        else:
            if st.nq < end or st.k.n < end:
                raise MethodError(f"{self.label}: layer {il}: values before the batch's queries and keys (the "
                                  "value rule needs this batch's attention)")
            S = self._attention(il, st, t, end)          # (n_head, n_b, end)
            u = np.arange(n_b)
            r = u[:, None] + np.arange(self.n_win)[None, :]          # query rows t..t+n-1 of each token
            band = S[:, np.minimum(r, n_b - 1), (p0 + u)[:, None]]    # (n_head, n_b, n)
            band = np.where((r < n_b)[None], band, 0.0)
            A = self._group_max(il, band.transpose(0, 2, 1))          # (n_b, hkv)
            B = value_bits(rng, A, T, self.eps, self.bmin, self.bmax)
        B[forced] = self.bmax
        kd.B[p0:end] = B
        return reconstruct(x16, mask, mean, rng, B)

    def refresh(self, pos_next: int):
        """Before the batch at pos_next: re-quantize, from the shadow copy, every cached token whose bit width
        changed with the queries seen since it was stored (QAQ §4.2, at batch granularity)."""
        from ..rewrite import CacheUpdate

        out = []
        if pos_next <= 0 or self.eps is None:
            return out
        for il, st in sorted(self._state.items()):
            end = min(pos_next, st.k.n, st.v.n, st.nq)
            if end <= 0:
                continue
            n_swa = self._layers_meta[il]["n_swa"]
            lo = max(0, end - n_swa + 1) if n_swa else 0   # tokens a later query can still see
            bk, bv = self._state_bits(il, st, end, lo)
            for kind, kd, B in (("k", st.k, bk), ("v", st.v, bv)):
                changed = np.nonzero(np.any(B != kd.B[lo:end], axis=1))[0]
                if len(changed) == 0:
                    continue
                idx = lo + changed
                kd.B[idx] = B[changed]
                vals = reconstruct(kd.x[idx], kd.mask[idx], kd.mean[idx], kd.rng[idx], kd.B[idx])
                out.append(CacheUpdate(il, kind, idx.astype(np.int64), vals))
        return out

    # -- accounting ----------------------------------------------------------------------------------------------

    def _final_tally(self) -> _Tally:
        """The sequence's final stored state: every token re-quantized after the last query."""
        t = _Tally()
        n_tok = 0
        for il, st in sorted(self._state.items()):
            end = min(st.k.n, st.v.n, st.nq)
            if end <= 0:
                continue
            meta = self._layers_meta[il]
            lo = max(0, end - meta["n_swa"]) if meta["n_swa"] else 0   # the last query's window
            bk, bv = self._state_bits(il, st, end, lo)
            t.add("k", bk, st.k.n_out[lo:end], meta["dk"])
            t.add("v", bv, st.v.n_out[lo:end], meta["dv"])
            n_tok = max(n_tok, end)
        t.n_seq, t.n_tok = (1, n_tok) if n_tok else (0, 0)
        return t

    def stored(self, il: int, kind: str) -> np.ndarray:
        """The current sequence's cached reconstruction of one layer's keys or values (what the cache holds after
        the last apply/refresh): for tests and inspection."""
        st = self._state[il]
        kd = st.k if kind == "k" else st.v
        return reconstruct(kd.x[:kd.n], kd.mask[:kd.n], kd.mean[:kd.n], kd.rng[:kd.n], kd.B[:kd.n])

    def bits(self, n_ctx: int) -> Bits:
        self._require_fit()
        cur = self._final_tally() if self._state else _Tally()
        t = self._tally.merged(cur) if cur.n_tok else self._tally
        source = f"measured over {t.n_seq} sequence(s), final state"
        if t.n_seq == 0:
            t = self._calib_tally
            source = f"measured on calibration ({self._calib_ctx}-token chunks, attention proxy); no evaluation yet"
        bk = t.bits["k"] / max(t.values["k"], 1)
        bv = t.bits["v"] / max(t.values["v"], 1)
        parts = []
        for kind in ("k", "v"):
            nv = max(t.values[kind], 1)
            side = 2 * _FP16 * t.groups[kind]
            parts.append(f"{kind.upper()} codes {t.code[kind] / nv:.3f} + mean/step {side / nv:.3f} + outliers "
                         f"{(t.bits[kind] - t.code[kind] - side) / nv:.3f} ({100 * t.outl[kind] / nv:.2f}%)")
        shadow = ""
        if self._ident is not None:
            n_val = sum(m["hkv"] * (m["dk"] + m["dv"]) for m in self._layers_meta.values())
            shadow = f" ({n_ctx * n_val * 2 / 2 ** 20:.1f} MiB at n_ctx {n_ctx})"
        tgt = f"target {self.target:g}, " if self.target is not None else ""
        detail = (f"{tgt}eps {self.eps:.4g}, bits {self.bmin}-{self.bmax}, window {self.n_win}, "
                  f"alpha {self.alpha:g}; {source}; " + "; ".join(parts) +
                  f"; per token-head: 2 fp16, outliers fp16 + ceil(log2 head_dim)-bit index; host fp16 shadow copy "
                  f"(16 bits/value){shadow} not counted")
        return Bits(bk, bv, detail)


def make(setting: str) -> QAQ:
    return QAQ(setting)
