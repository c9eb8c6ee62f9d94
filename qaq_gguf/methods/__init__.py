"""KV-cache methods the lab runs through llama.cpp, one module each, behind one interface.

A method is fitted on calibration activations (:class:`Calibration`), then, inside a llama.cpp context
(``qaq_gguf.rewrite``), receives each layer's final queries, keys and values as the graph computes them and
returns its reconstruction of those it rewrites. Every method reports its true average bits per value with all
side information (:class:`Bits`).

The interface (a structural protocol: a module's class needs no base class):

- ``name``: the family (``"kivi"``); ``label``: this setting (``"kivi-2 r128"``); ``paper``: the citation;
- ``rewrites``: the kinds it replaces, a subset of ``{"q", "k", "v"}``; ``observes``: the kinds it reads
  (defaults to all three); ``values_need_attention`` (optional, default False): ``apply(il, "v", ...)`` comes
  after the batch's queries and keys of that layer even on graphs that compute V first (Llama's does);
- ``fit(calib)``: learn what the method learns (codebooks, predictors, thresholds) from calibration activations,
  never from evaluation text; records the model's fingerprint;
- ``begin(n_ctx)``: a new sequence starts at position 0 (per-sequence state is reset);
- ``apply(il, kind, x, pos)``: ``x`` is ``(n_tokens, n_heads, head_dim)`` float32 at positions ``pos``; returns
  the reconstruction (for kinds in ``rewrites``; the return value is ignored otherwise);
- ``refresh(pos_next)`` (optional): before the batch starting at ``pos_next``, updates to tokens already cached
  (``rewrite.CacheUpdate``), for methods whose stored form of a token changes later (full-precision windows);
- ``bits(n_ctx)``: :class:`Bits` for a cache of ``n_ctx`` tokens, measured over what the method processed when
  its bit width adapts to the data.

Modules: :data:`REGISTRY` names each method's module (``qaq_gguf.methods.<name>``) with one line on what it does
and its paper; the module provides ``DEFAULTS`` (the settings a bare name expands to, typically 2, 3 and 4 bits)
and ``make(setting)``.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..profile import ModelIdentity
from ..rope import RopeParams

# name (= module) -> one line: what it does, with its paper
REGISTRY: dict[str, str] = {
    "identity": "keys and values unchanged (the f16 cache through the rewrite path; KLD must be 0)",
    "ggml": "llama.cpp's block types (ggml:q4_0/q4_0, qaq3, ...) as a rewrite: Hadamard rotation, Q rounding",
    "qaq": "QAQ (arXiv 2403.04643): per-token key/value bits from attention-aware bounds, 1% outliers in fp16",
    "aquakv": "AQUA-KV (arXiv 2501.19392): each layer's K/V predicted from the previous layer, residual quantized",
    "qjl": "QJL (arXiv 2406.03482): JL projection + sign bits for keys with per-token norms, outlier channels apart",
    "cq": "Coupled Quantization (arXiv 2405.03917): k-means codebooks over groups of c channels, 1-2 bits",
    "kivi": "KIVI (arXiv 2402.02750): per-channel keys, per-token values, recent tokens in fp16",
    "kvquant": "KVQuant (arXiv 2401.18079): per-channel pre-RoPE keys, non-uniform datatype, 1% sparse outliers",
    "turboquant": "TurboQuant (arXiv 2504.19874): random rotation + Lloyd-Max scalar codes, optional QJL residual",
    "lattice": "E8 / D4 lattice vector codes (QuIP#'s E8P, arXiv 2402.04396) on rotated rows: lattice-e8:2, lattice-d4:3",
    "tcq": "trellis-coded quantization, a bit-shift trellis with a computed codebook (QTIP, arXiv 2406.11235): tcq:3",
    "pairbits": "bits per RoPE pair (keys) / channel (values) by calibrated energy, Lloyd-Max codes (Block-GTQ style)",
}

# the methods from papers (what `--methods all` runs); identity and ggml are the lab's own checks
PUBLISHED: tuple[str, ...] = ("qaq", "aquakv", "qjl", "cq", "kivi", "kvquant", "turboquant")


ATTN_LAST = 5  # queries CalibLayer.attn_last looks at (QAQ's attention window)


class MethodError(ValueError):
    """A method spec that cannot be made, or a fitted method used where it does not belong."""


@dataclass
class Bits:
    """Average stored bits per K and per V value, side information included, with how they add up."""

    k: float
    v: float
    detail: str = ""

    def average(self, n_k: int, n_v: int) -> float:
        """Over n_k key values and n_v value values."""
        return (self.k * n_k + self.v * n_v) / max(n_k + n_v, 1)


@dataclass
class CalibLayer:
    """One layer's calibration activations over all chunks (N tokens; per kv head)."""

    k: np.ndarray          # (N, n_head_kv, head_dim_k) post-RoPE keys, as cached
    v: np.ndarray          # (N, n_head_kv, head_dim_v)
    pos: np.ndarray        # (N,) position of each token in its chunk (0 = BOS)
    q_sq: np.ndarray       # (n_head_kv, head_dim_k) mean of (s q)^2 over tokens and the heads of each kv group
    q_norm2: np.ndarray    # (N, n_head) ||s q||^2 per token and query head (s: the logit scale)
    k_weight: np.ndarray   # (N, n_head_kv, head_dim_k) first-order sensitivity of the output to each key element
    v_weight: np.ndarray   # (N, n_head_kv) ... to each value (the same for every channel of a token)
    attn_recv: np.ndarray  # (N, n_head_kv) attention each token receives, averaged over later queries and heads
    attn_last: np.ndarray  # (N, n_head_kv) max attention each token gets from its chunk's last ATTN_LAST queries
    kq_scale: float        # s: logits are s * q.k
    n_head: int
    rope: RopeParams | None = None


@dataclass
class Calibration:
    """Activations a method is fitted on (``lab.collect_calibration``), and what they came from."""

    ident: ModelIdentity
    layers: dict[int, CalibLayer]
    n_ctx: int
    n_chunks: int
    text_sha256: str = ""
    settings: dict = field(default_factory=dict)


class Method(Protocol):
    name: str
    label: str
    paper: str
    rewrites: frozenset[str]

    def fit(self, calib: Calibration) -> None: ...
    def begin(self, n_ctx: int) -> None: ...
    def apply(self, il: int, kind: str, x: np.ndarray, pos: np.ndarray) -> np.ndarray: ...
    def bits(self, n_ctx: int) -> Bits: ...


def module(name: str):
    if name not in REGISTRY:
        raise MethodError(f"unknown method {name!r}; known: {', '.join(REGISTRY)} (and native:TYPE_K/TYPE_V or "
                          "native:PROFILE.gguf for a real cache)")
    return importlib.import_module(f"{__name__}.{name}")


def make(spec: str) -> list:
    """Methods for one spec: ``name`` (its DEFAULTS), or ``name:setting``; ``native:`` specs are not methods."""
    name, _, setting = spec.partition(":")
    name = name.strip()
    base, dash, variant = name.partition("-")
    if dash and name not in REGISTRY and base in REGISTRY:  # family-variant:setting, e.g. lattice-e8:2
        name, setting = base, f"{variant}:{setting}" if setting else variant
        mod = module(name)
        return [mod.make(setting)]
    mod = module(name)
    settings = [setting] if setting else list(mod.DEFAULTS)
    return [mod.make(s) for s in settings]


def check_fitted(method, ident: ModelIdentity) -> None:
    """Refuse a method fitted on another model (its fingerprint differs)."""
    fp = getattr(method, "fingerprint", None)
    if fp is None:
        raise MethodError(f"{method.label}: not fitted (call fit() on calibration activations first)")
    if fp != ident.fingerprint:
        raise MethodError(f"{method.label} was fitted on a model with fingerprint {fp[:12]}, not on this one "
                          f"({ident.fingerprint[:12]}): fit it on this model's calibration text")


def help_lines() -> list[str]:
    """One line per method: name, what it does, its paper."""
    return [f"{name:<11} {what}" for name, what in REGISTRY.items()]


# --- helpers several methods share -------------------------------------------------------------------------------

def layer_shapes(calib: Calibration) -> dict[int, tuple[int, int, int]]:
    """(n_head_kv, head_dim_k, head_dim_v) of each calibrated layer: what a data-oblivious code's bits depend on."""
    return {il: (layer.k.shape[1], layer.k.shape[2], layer.v.shape[2]) for il, layer in calib.layers.items()}


def row_bits(label: str, layers: dict[int, tuple[int, int, int]], per_value_k, per_value_v=None) -> tuple[float, float]:
    """Average bits per K and per V value over ``layers`` (``layer_shapes``) when a row of head size d costs
    ``per_value_k(d)`` / ``per_value_v(d)`` bits per value (V as K when not given); refuses a method not fitted yet
    (no shapes)."""
    per_value_v = per_value_v or per_value_k
    if not layers:
        raise MethodError(f"{label}: not fitted (bits depend on the model's head sizes)")
    nk = sum(h * dk for h, dk, _ in layers.values())
    nv = sum(h * dv for h, _, dv in layers.values())
    bk = sum(h * dk * per_value_k(dk) for h, dk, _ in layers.values()) / nk
    bv = sum(h * dv * per_value_v(dv) for h, _, dv in layers.values()) / nv
    return bk, bv


EXACT_FIRST_ROWS = 2  # the profiles' exact cell for position 0 and its scratch row, f16 (patches/0031)


def exact_first(x: np.ndarray, y: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """``y`` (rows coded from ``x``, (n_tok, ...)) with the rows at position 0 as they came: what a calibrated
    profile's exact cell keeps (the attention sink, whatever token it holds; docs/calibration.md)."""
    first = np.asarray(pos) == 0
    if not first.any():
        return y
    y = np.array(y, np.float32)
    y[first] = np.asarray(x, np.float32)[first]
    return y


def without_first(layer: CalibLayer) -> CalibLayer:
    """The layer's calibration tokens less those at position 0: statistics for a code whose position 0 is exact."""
    keep = np.asarray(layer.pos) != 0
    per_token = ("k", "v", "pos", "q_norm2", "k_weight", "v_weight", "attn_recv", "attn_last")
    return dataclasses.replace(layer, **{f: getattr(layer, f)[keep] for f in per_token})


def exact_first_bits(n_ctx: int) -> float:
    """Bits per value the exact cell costs at ``n_ctx`` cells: EXACT_FIRST_ROWS f16 rows beside the cache."""
    return 16 * EXACT_FIRST_ROWS / max(n_ctx, 1)


def uniform_quantize(x: np.ndarray, bits: int, axis: int, *, group: int | None = None) -> np.ndarray:
    """Asymmetric min/max round-to-nearest quantization along ``axis`` in groups of ``group`` (None: the whole
    axis), dequantized: scale (max - min) / (2^bits - 1), zero point min (KIVI's and KVQuant's integer grid)."""
    x = np.asarray(x, np.float32)
    xm = np.moveaxis(x, axis, -1)
    n = xm.shape[-1]
    g = n if group is None else group
    if n % g:
        raise ValueError(f"axis of {n} values is not a multiple of the group size {g}")
    xg = xm.reshape(*xm.shape[:-1], n // g, g)
    lo = xg.min(axis=-1, keepdims=True)
    hi = xg.max(axis=-1, keepdims=True)
    levels = np.float32(2 ** bits - 1)
    scale = (hi - lo) / levels
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.round((xg - lo) / safe), 0, levels)
    y = np.where(scale > 0, q * scale + lo, xg)
    return np.moveaxis(y.reshape(xm.shape), -1, axis).astype(np.float32)
