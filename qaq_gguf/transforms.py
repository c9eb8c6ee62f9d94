"""The K/V transforms a profile carries, each exact for attention, each making a quantized cache lose less.

- **Centred keys** (``qaq.kv.k_mean``): the cache stores ``k - c``; every query's logits move by ``q.c``, which
  softmax ignores.
- **Rebalanced keys** (``qaq.kv.k_scale``): the cache stores ``d * k`` and attention reads ``q / d`` (per
  dimension, one ``d`` per RoPE pair, so it commutes with RoPE and K-shift): ``q.k`` is unchanged while the
  quantization error moves to the dimensions the queries barely read. With ``a_p``, ``b_p`` the rms of ``q`` and of
  the centred ``k`` in pair ``p``, a rotated block quantizer's logit error falls, to first order, by
  ``(sum a^2)(sum b^2) / (sum a b)^2`` at ``d_p = sqrt(a_p / b_p)`` (:func:`rebalance_scales`).
- **Centred values** (``qaq.kv.v_mean``): the cache stores ``v - c_v`` and the attention output gets ``c_v`` back,
  exact because attention weights sum to one.
- **An exact first token**: the first token (BOS at position 0) receives up to half of all attention in some
  layers, and its K and V are the same in every sequence. Choosing the centring vectors so that the BOS row's
  stored form is a point of the cache type's grid (:func:`exact_centre`) makes the quantized cache reproduce that
  row exactly, at no cost at run time: ``c = k_bos - d^-1 H^T Q(H d (k_bos - mean))``.

The runtime applies them in llama.cpp (``llama_model_set_kv_layer_k_mean``, ``_k_scale``, ``_v_mean``;
patches/0010 and 0011); calibration measures the statistics (calibrate.py) and the solver's scores include them
(scoring.py).
"""
from __future__ import annotations

import numpy as np

from . import cachetypes, scoring

SCALE_MIN, SCALE_MAX = 1.0 / 64, 64.0   # calibration's range for d (the runtime accepts [1/256, 256])


def rebalance_scales(q_sq: np.ndarray, k_var: np.ndarray, partner: np.ndarray) -> np.ndarray:
    """Per-dimension key scales d (shape of ``q_sq``: (n_head_kv, head_dim)) from the mean squared query (over the
    query heads of each KV head) and the variance of the centred keys; one value per RoPE pair
    (``d_p = sqrt(a_p / b_p)`` with ``a_p``, ``b_p`` the pair's rms), geometric mean 1 per head, clipped to
    [SCALE_MIN, SCALE_MAX]."""
    q_sq = np.asarray(q_sq, np.float64)
    k_var = np.asarray(k_var, np.float64)
    a2 = (q_sq + q_sq[:, partner]) / 2
    b2 = (k_var + k_var[:, partner]) / 2
    a2 = np.maximum(a2, 1e-6 * a2.mean(axis=1, keepdims=True) + 1e-30)
    b2 = np.maximum(b2, 1e-6 * b2.mean(axis=1, keepdims=True) + 1e-30)
    d = (a2 / b2) ** 0.25
    d /= np.exp(np.log(d).mean(axis=1, keepdims=True))
    return np.clip(d, SCALE_MIN, SCALE_MAX).astype(np.float32)


def rebalance_gain(q_sq: np.ndarray, k_var: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Predicted first-order factor by which scales d cut the logit error of a rotated quantizer, per KV head:
    (sum a^2)(sum b^2) / ((sum a^2/d^2)(sum b^2 d^2)); at d = sqrt(a/b), (sum a^2)(sum b^2) / (sum a b)^2."""
    a2, b2, d2 = (np.asarray(x, np.float64) for x in (q_sq, k_var, np.asarray(d, np.float64) ** 2))
    return (a2.sum(1) * b2.sum(1)) / ((a2 / d2).sum(1) * (b2 * d2).sum(1))


def exact_centre(x_first: np.ndarray, mean: np.ndarray, type_name: str, *, scale: np.ndarray | None = None,
                 is_v: bool = False, max_iter: int = 8) -> tuple[np.ndarray, bool]:
    """The centring vector near ``mean`` for which the cache stores the first token's row ``x_first`` exactly
    in ``type_name`` (rows of (n_head, head_dim)): the stored row ``s = d (x_first - c)`` is a fixed point of the
    quantize/dequantize round trip. Returns (c, exact); for an unquantized type, (mean, True)."""
    mean = np.asarray(mean, np.float32)
    if not cachetypes.get(type_name).is_quantized:
        return mean, True
    d = np.ones_like(mean) if scale is None else np.asarray(scale, np.float32)
    g = (np.asarray(x_first, np.float32) - mean) * d
    exact = False
    for _ in range(max_iter):
        g2 = scoring.quant_roundtrip(g[None], type_name, is_v=is_v)[0]
        if np.array_equal(g2, g):
            exact = True
            break
        g = g2
    return (np.asarray(x_first, np.float32) - g / d).astype(np.float32), exact
