"""K/V transforms (qaq_gguf/transforms.py): rebalancing scales and the exact first token, in numpy.

The runtime side (llama.cpp applying the transforms a profile carries) is tested in test_rebalance.py."""
from __future__ import annotations

import numpy as np
import pytest

from qaq_gguf import cachetypes, rope, scoring, transforms


def test_pair_partner_neox_and_norm():
    p = rope.pair_partner(8, 8, neox=True)
    np.testing.assert_array_equal(p, [4, 5, 6, 7, 0, 1, 2, 3])
    p = rope.pair_partner(8, 8, neox=False)
    np.testing.assert_array_equal(p, [1, 0, 3, 2, 5, 4, 7, 6])
    p = rope.pair_partner(8, 4, neox=True)  # partial RoPE: the last 4 dims rotate with nothing
    np.testing.assert_array_equal(p, [2, 3, 0, 1, 4, 5, 6, 7])


def test_rebalance_scales_are_pairwise_and_normalised():
    rng = np.random.default_rng(0)
    q_sq = rng.uniform(0.01, 4, (2, 16))
    k_var = rng.uniform(0.01, 4, (2, 16))
    partner = rope.pair_partner(16, 16, neox=True)
    d = transforms.rebalance_scales(q_sq, k_var, partner)
    np.testing.assert_array_equal(d, d[:, partner])               # one scale per RoPE pair
    np.testing.assert_allclose(np.exp(np.log(d).mean(axis=1)), 1.0, rtol=1e-5)  # geometric mean 1
    # d_p = sqrt(a_p / b_p) up to the normalisation, a_p / b_p the pair's rms
    a = np.sqrt((q_sq + q_sq[:, partner]) / 2)
    b = np.sqrt((k_var + k_var[:, partner]) / 2)
    r = d / np.sqrt(a / b)
    np.testing.assert_allclose(r, np.repeat(r[:, :1], r.shape[1], axis=1), rtol=1e-5)
    # clipping
    q_sq[0, 0] = q_sq[0, 8] = 1e12
    assert transforms.rebalance_scales(q_sq, k_var, partner).max() <= transforms.SCALE_MAX


def test_rebalancing_cuts_the_logit_error_of_a_rotated_quantizer():
    """First-order claim behind rebalancing, checked with the real q4_0 quantizer and Hadamard rotation:
    the logit error variance falls roughly by the predicted gain."""
    rng = np.random.default_rng(1)
    d_head, n = 64, 4096
    spread = np.exp(rng.normal(0, 1.0, d_head // 2))
    spread = np.concatenate([spread, spread])
    qspread = np.exp(rng.normal(0, 1.0, d_head // 2))
    qspread = np.concatenate([qspread, qspread])
    k = (rng.standard_normal((n, 1, d_head)) * spread).astype(np.float32)
    q = (rng.standard_normal((n, 1, d_head)) * qspread).astype(np.float32)
    partner = rope.pair_partner(d_head, d_head, neox=True)
    q_sq, k_var = (q[:, 0] ** 2).mean(0)[None], k[:, 0].var(0)[None]
    d = transforms.rebalance_scales(q_sq, k_var, partner)
    gain = float(transforms.rebalance_gain(q_sq, k_var, d)[0])

    def logit_err(scale):
        ks = k * scale
        e = scoring.quant_roundtrip(ks, "q4_0") - ks
        return float(np.mean(np.sum((q / scale) * e, axis=-1) ** 2))

    measured = logit_err(np.ones_like(d)) / logit_err(d)
    assert gain > 1.5
    assert 0.6 * gain < measured < 1.6 * gain, (gain, measured)


@pytest.mark.parametrize("t", ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl", "qaq3", "qaq2"])
def test_exact_centre_stores_the_first_token_exactly(t):
    rng = np.random.default_rng(2)
    first = (rng.standard_normal((1, 256)) * 8 + 20).astype(np.float32)  # a sink-like key: large, off-centre
    mean = rng.standard_normal((1, 256)).astype(np.float32)
    scale = np.exp(rng.normal(0, 0.5, (1, 128))).astype(np.float32)
    scale = np.concatenate([scale, scale], axis=1)
    for s in (None, scale):
        c, exact = transforms.exact_centre(first, mean, t, scale=s)
        assert exact, t
        d = np.ones_like(mean) if s is None else s
        stored = (first - c) * d  # what the cache is given (float32 rounding of the subtraction included)
        back = scoring.quant_roundtrip(stored[None], t)[0]
        np.testing.assert_allclose(back, stored, rtol=1e-5, atol=1e-5 * np.abs(stored).max())
        # whereas the plain mean leaves a real quantization error on that row
        plain = (first - mean) * d
        q_err = np.linalg.norm(scoring.quant_roundtrip(plain[None], t)[0] - plain)
        assert q_err > 1e-3 * np.linalg.norm(plain)
        # and c is the mean moved by about that one quantization error
        assert np.linalg.norm((c - mean) * d) <= 1.5 * q_err, t


def test_exact_centre_is_the_mean_for_unquantized_types():
    mean = np.ones((1, 64), np.float32)
    c, exact = transforms.exact_centre(np.zeros((1, 64), np.float32), mean, "f16")
    assert exact and np.array_equal(c, mean)


def test_scores_count_exact_rows_as_error_free():
    rng = np.random.default_rng(3)
    n, d = 64, 64
    q = rng.standard_normal((n, 2, d)).astype(np.float32)
    k = rng.standard_normal((n, 1, d)).astype(np.float32)
    k[0] *= 10
    v = rng.standard_normal((n, 1, d)).astype(np.float32)
    v[0] *= 10
    attn = scoring.attention_probs(q, k, kq_scale=0.125)
    plain = scoring.score_layer(q, k, v, attn, ["q4_0"], kq_scale=0.125)["q4_0"]
    exact = scoring.score_layer(q, k, v, attn, ["q4_0"], kq_scale=0.125, exact_rows=np.array([0]))["q4_0"]
    assert exact[0] < plain[0] and exact[1] < plain[1]
    # transforms that do not change what is stored do not change the score
    same = scoring.score_layer(q, k, v, attn, ["q4_0"], kq_scale=0.125, k_scale=np.ones((1, d), np.float32),
                               v_mean=np.zeros((1, d), np.float32), k_mean=np.zeros((1, d), np.float32))["q4_0"]
    np.testing.assert_allclose(same, plain, rtol=1e-6)
    assert cachetypes.get("q4_0").is_quantized
