"""Tests for qaq_gguf.cachetypes and qaq_gguf.scoring (numpy; the ggml reference check uses the built library)."""

import os

import gguf
import gguf.quants
import numpy as np
import pytest

from qaq_gguf import cachetypes, scoring

QUANTIZED = ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"]


def _mse(a, b):
    return float(np.mean((np.asarray(a, np.float64) - b) ** 2))


# ---------------------------------------------------------------------------
# cachetypes


def test_cachetypes_table():
    expected = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q5_1": 6, "q5_0": 5.5, "q4_1": 5, "q4_0": 4.5, "iq4_nl": 4.5}
    assert {n: cachetypes.bits(n) for n in expected} == expected
    assert cachetypes.get("Q4_0").type_id == int(gguf.GGMLQuantizationType.Q4_0)
    assert cachetypes.get("iq4_nl").type_id == 20
    assert not cachetypes.get("bf16").is_quantized and cachetypes.get("q8_0").is_quantized
    assert cachetypes.row_bytes("q4_0", 256) == 144
    assert cachetypes.row_bytes("f16", 3) == 6
    assert set(cachetypes.DEFAULT_CANDIDATES) <= set(cachetypes.names())


def test_cachetypes_errors():
    with pytest.raises(ValueError, match="q4_0"):  # message lists the known names
        cachetypes.get("q3_k")
    with pytest.raises(ValueError, match=r"q8_0.*100"):
        cachetypes.row_bytes("q8_0", 100)


# ---------------------------------------------------------------------------
# Hadamard rotation


@pytest.mark.parametrize("n", [1, 2, 64, 256])
def test_hadamard_is_symmetric_involution(n):
    h = scoring.hadamard(n)
    np.testing.assert_allclose(h @ h, np.eye(n), atol=1e-5)
    np.testing.assert_array_equal(h, h.T)
    np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n), rtol=1e-6)
    with pytest.raises(ValueError):
        scoring.hadamard(48)


def test_rotation_size_rule():
    assert scoring.rotation_size(256, is_v=False) == 256
    assert scoring.rotation_size(128, is_v=False) == 128
    assert scoring.rotation_size(192, is_v=False) == 64
    assert scoring.rotation_size(512, is_v=False) == 512
    assert scoring.rotation_size(256, is_v=True) == 64
    assert scoring.rotation_size(128, is_v=True) == 64
    assert scoring.rotation_size(96, is_v=False) is None
    assert scoring.rotation_size(80, is_v=True) is None


def test_rotate_is_block_diagonal():
    x = np.random.default_rng(0).standard_normal((3, 2, 128)).astype(np.float32)
    y = scoring.rotate(x, 64)
    h = scoring.hadamard(64)
    np.testing.assert_allclose(y[..., :64], x[..., :64] @ h, atol=1e-5)
    np.testing.assert_allclose(y[..., 64:], x[..., 64:] @ h, atol=1e-5)
    np.testing.assert_allclose(scoring.rotate(y, 64), x, atol=1e-5)
    with pytest.raises(ValueError):
        scoring.rotate(x, 256)


@pytest.mark.parametrize("type_name", ["q4_0", "q8_0", "iq4_nl"])
def test_rotated_key_logits_equivalence(type_name):
    """What the runtime computes, (H q) . Q(H k), equals q . quant_roundtrip(k)."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((8, 256)).astype(np.float32)
    k = rng.standard_normal((16, 256)).astype(np.float32)
    k[:, 7] += 20  # outlier channel
    n = scoring.rotation_size(256, is_v=False)
    stored = scoring.quant_roundtrip(scoring.rotate(k, n), type_name, rotate=False)
    runtime = scoring.rotate(q, n) @ stored.T
    ours = q @ scoring.quant_roundtrip(k, type_name).T
    np.testing.assert_allclose(runtime, ours, rtol=1e-4, atol=1e-3)
    # unquantized: the rotation leaves the logits unchanged
    np.testing.assert_allclose(scoring.rotate(q, n) @ scoring.rotate(k, n).T, q @ k.T, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------------------
# Quantize / dequantize round trip


@pytest.mark.parametrize("type_name", ["f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"])
def test_roundtrip_matches_gguf_quants(type_name):
    x = np.random.default_rng(2).standard_normal((5, 3, 64)).astype(np.float32) * 3
    qtype = gguf.GGMLQuantizationType(cachetypes.get(type_name).type_id)
    ref = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype).reshape(x.shape)
    got = scoring.quant_roundtrip(x, type_name, rotate=False)
    assert got.shape == x.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got, ref)
    if type_name == "f16":
        np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))


def test_roundtrip_f32_is_exact_and_f16_not_rotated():
    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    np.testing.assert_array_equal(scoring.quant_roundtrip(x, "f32"), x)
    np.testing.assert_array_equal(scoring.quant_roundtrip(x, "f16"), x.astype(np.float16).astype(np.float32))


def test_iq4_nl_blocks_use_the_codebook():
    x = np.random.default_rng(4).standard_normal((64, 32)).astype(np.float32)
    y = scoring.quant_roundtrip(x, "iq4_nl", rotate=False)
    values = np.array(gguf.quants.IQ4_NL.kvalues, np.float32)
    assert np.all(np.isfinite(y))
    assert _mse(y, x) < 0.02
    # every dequantized value is d * codebook entry (d from the fp16 block scale)
    raw = scoring._quantize_iq4_nl(x)
    scale = raw[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
    ratios = y / scale[:, None]
    assert np.all(np.min(np.abs(ratios[..., None] - values), axis=-1) < 1e-3)
    zero = scoring.quant_roundtrip(np.zeros((2, 32), np.float32), "iq4_nl", rotate=False)
    np.testing.assert_array_equal(zero, 0)


def _ggml_base_lib() -> str:
    """libggml-base.so: QAQ_GGML_BASE_LIB, else the one qaq-gguf built."""
    from qaq_gguf import _native

    return os.environ.get("QAQ_GGML_BASE_LIB") or str(_native.lib_dir() / "libggml-base.so")


@pytest.mark.parametrize("type_name", QUANTIZED)
def test_roundtrip_matches_ggml_reference_quantizer(type_name):
    """Bit-exact against ggml's from_float_ref (what the CPU cache's set_rows uses)."""
    import ctypes

    from qaq_gguf import ggml_ctypes

    lib = ctypes.CDLL(_ggml_base_lib())
    lib.ggml_get_type_traits.restype = ctypes.POINTER(ggml_ctypes.Traits)
    ct = cachetypes.get(type_name)
    traits = lib.ggml_get_type_traits(ct.type_id).contents
    quantize_row = ggml_ctypes.ROW_FN(traits.from_float_ref)
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((300, 256)) * rng.uniform(0.01, 10, (300, 1))).astype(np.float32)
    x[::7, 3] *= 40
    out = np.zeros((300, 256 // ct.block_size * ct.type_size), np.uint8)
    for r in range(300):
        quantize_row(x[r].ctypes.data, out[r].ctypes.data, 256)
    ref = gguf.quants.dequantize(out, gguf.GGMLQuantizationType(ct.type_id))
    np.testing.assert_array_equal(scoring.quant_roundtrip(x, type_name, rotate=False), ref)


def test_error_ordering_on_gaussian_data():
    x = np.random.default_rng(6).standard_normal((512, 128)).astype(np.float32)
    err = {t: _mse(scoring.quant_roundtrip(x, t), x) for t in ["f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"]}
    assert err["f16"] < err["q8_0"] < err["q5_1"] < err["q5_0"] < err["q4_0"]
    assert err["q5_0"] < err["q4_1"] < err["q4_0"]
    assert err["iq4_nl"] < err["q4_0"]


@pytest.mark.parametrize("is_v", [False, True])
def test_rotation_reduces_error_with_outlier_channel(is_v):
    x = np.random.default_rng(7).standard_normal((256, 256)).astype(np.float32)
    x[:, 5] = 30 + x[:, 5]
    plain = _mse(scoring.quant_roundtrip(x, "q4_0", is_v=is_v, rotate=False), x)
    rotated = _mse(scoring.quant_roundtrip(x, "q4_0", is_v=is_v), x)
    assert rotated < 0.5 * plain


def test_roundtrip_errors():
    with pytest.raises(ValueError, match="block size"):
        scoring.quant_roundtrip(np.zeros((2, 48), np.float32), "q4_0")
    with pytest.raises(ValueError, match="64"):
        scoring.quant_roundtrip(np.zeros((2, 96), np.float32), "q4_0", rotate=True)
    with pytest.raises(ValueError, match="known types"):
        scoring.quant_roundtrip(np.zeros((2, 64), np.float32), "q2_k")


# ---------------------------------------------------------------------------
# Scores against a loop-based reference


def _layer(rng, n=12, n_head=4, n_head_kv=2, d=64, temp=1.0, k_offset=0.0, v_mean=0.0):
    q = (temp * rng.standard_normal((n, n_head, d)) / d**0.25).astype(np.float32)
    k = (rng.standard_normal((n, n_head_kv, d)) / d**0.25).astype(np.float32)
    k[:, :, 3] += k_offset
    v = (rng.standard_normal((n, n_head_kv, d)) + v_mean).astype(np.float32)
    return q, k, v


def _reference(q, k, v, k_hat, v_hat, window=5, q_hat=None):
    """Straightforward loops; returns (key measured, key qaq, value measured, value qaq).
    ``q_hat``: Q as the kernel rounds it (key measured then uses q_hat . k_hat - q . k)."""
    q_hat = q if q_hat is None else q_hat
    n_q, n_head, _ = q.shape
    n_kv, n_head_kv, _ = k.shape
    group = n_head // n_head_kv
    km = kq = vm = vq = xn = 0.0
    for h in range(n_head):
        g = h // group
        s = np.zeros((n_q, n_kv))
        for i in range(n_q):
            logits = np.array([q[i, h] @ k[t, g] for t in range(i + 1)], np.float64)
            p = np.exp(logits - logits.max())
            s[i, : i + 1] = p / p.sum()
        qn = np.percentile([q[i, h] @ q[i, h] for i in range(n_q)], 90)
        for i in range(n_q):
            x = sum(s[i, t] * v[t, g] for t in range(n_kv))
            xn += x @ x
            dx = sum(s[i, t] * (q_hat[i, h] @ k_hat[t, g] - q[i, h] @ k[t, g]) * (v[t, g] - x) for t in range(n_kv))
            km += dx @ dx
            dx = sum(s[i, t] * (v_hat[t, g] - v[t, g]) for t in range(n_kv))
            vm += dx @ dx
            n_vis = i + 1
            vbar = np.mean(v[: i + 1, g], axis=0)
            for t in range(i + 1):
                sigma2 = np.mean((k_hat[t, g] - k[t, g]) ** 2)
                var_s = (1 - 1 / n_vis) / n_vis**2 * np.expm1(qn * sigma2)
                kq += var_s * np.sum((v[t, g] - vbar) ** 2)
            for t in range(n_kv):
                s_hat = max(s[j, t] for j in range(max(0, i - window + 1), i + 1))
                vq += s_hat**2 * np.sum((v_hat[t, g] - v[t, g]) ** 2)
    return km / xn, kq / xn, vm / xn, vq / xn


@pytest.mark.parametrize("type_name", ["q4_0", "q8_0"])
def test_scores_match_loop_reference(type_name):
    rng = np.random.default_rng(8)
    q, k, v = _layer(rng, temp=2.0, v_mean=0.5)
    k_hat = scoring.quant_roundtrip(k, type_name)
    v_hat = scoring.quant_roundtrip(v, type_name, is_v=True)
    ref = _reference(q, k, v, k_hat, v_hat, window=3)
    attn = scoring.attention_probs(q, k)
    got = (
        scoring.key_score(q, k, v, attn, type_name),
        scoring.key_score(q, k, v, attn, type_name, method="qaq"),
        scoring.value_score(q, k, v, attn, type_name),
        scoring.value_score(q, k, v, attn, type_name, method="qaq", window=3),
    )
    np.testing.assert_allclose(got, ref, rtol=1e-3)
    assert all(r > 0 for r in ref)
    # attn=None computes the same causal attention
    np.testing.assert_allclose(scoring.key_score(q, k, v, None, type_name), ref[0], rtol=1e-3)
    both = scoring.score_layer(q, k, v, attn, [type_name], round_q=False)[type_name]
    np.testing.assert_allclose(both, (ref[0], ref[2]), rtol=1e-3)
    # with the kernel's rounding of Q to 8 bits (what score_layer does by default)
    q_hat = scoring.query_roundtrip(q, type_name)
    ref_q = _reference(q, k, v, k_hat, v_hat, window=3, q_hat=q_hat)
    both = scoring.score_layer(q, k, v, attn, [type_name])[type_name]
    np.testing.assert_allclose(both, (ref_q[0], ref_q[2]), rtol=2e-2)  # first order in the Q error
    both = scoring.score_layer(q, k, v, attn, [type_name], method="qaq", window=3)[type_name]
    np.testing.assert_allclose(both, (ref[1], ref[3]), rtol=1e-3)


def test_attention_probs_causal_and_sliding_window():
    rng = np.random.default_rng(9)
    q, k, _ = _layer(rng, n=10)
    a = scoring.attention_probs(q, k, n_swa=4)
    np.testing.assert_allclose(a.sum(axis=-1), 1, rtol=1e-5)
    assert np.all(np.triu(a[0], 1) == 0)
    assert a[0, 9, 5] == 0 and a[0, 9, 6] > 0
    # queries are the last n_q positions
    tail = scoring.attention_probs(q[-3:], k)
    np.testing.assert_allclose(tail, scoring.attention_probs(q, k)[:, -3:], rtol=1e-5)


def test_key_score_first_order_matches_exact_perturbation():
    """For a fine type the first-order estimate is close to re-running attention."""
    rng = np.random.default_rng(10)
    q, k, v = _layer(rng, n=64, temp=3.0)
    k_hat = scoring.quant_roundtrip(k, "q8_0")
    x = np.einsum("hqt,thd->hqd", scoring.attention_probs(q, k), np.repeat(v, 2, axis=1))
    x_hat = np.einsum("hqt,thd->hqd", scoring.attention_probs(q, k_hat), np.repeat(v, 2, axis=1))
    exact = np.mean(np.sum((x_hat - x) ** 2, -1)) / np.mean(np.sum(x**2, -1))
    est = scoring.key_score(q, k, v, None, "q8_0")
    assert 0.8 < est / exact < 1.25


def test_max_queries_subsamples_deterministically():
    rng = np.random.default_rng(11)
    q, k, v = _layer(rng, n=96)
    a = scoring.key_score(q, k, v, None, "q4_0", max_queries=32, seed=1)
    b = scoring.key_score(q, k, v, None, "q4_0", max_queries=32, seed=1)
    c = scoring.key_score(q, k, v, None, "q4_0", max_queries=32, seed=2)
    full = scoring.key_score(q, k, v, None, "q4_0")
    assert a == b and a != c
    assert 0.3 < a / full < 3


@pytest.mark.parametrize("method", ["measured", "qaq"])
def test_scores_grow_as_types_get_coarser(method):
    rng = np.random.default_rng(12)
    q, k, v = _layer(rng, n=48, temp=2.0, v_mean=0.3)
    s = scoring.score_layer(q, k, v, None, ["f32", "f16", "q8_0", "q5_0", "q4_0"], method=method)
    assert s["f32"] == (0.0, 0.0)
    for i in (0, 1):
        assert s["f16"][i] < s["q8_0"][i] < s["q5_0"][i] < s["q4_0"][i]


@pytest.mark.parametrize("method", ["measured", "qaq"])
def test_key_sensitive_layer_ranks_first(method):
    """A key outlier channel leaves attention unchanged (constant logit shift per query)
    but inflates the block scales, so that layer's K is the most sensitive."""
    rng = np.random.default_rng(13)
    layers = [_layer(rng, n=48, temp=2.0, k_offset=(12.0 if i == 2 else 0.0)) for i in range(4)]
    scores = [scoring.key_score(q, k, v, None, "q4_0", method=method, rotate=False) for q, k, v in layers]
    assert int(np.argmax(scores)) == 2


@pytest.mark.parametrize("method", ["measured", "qaq"])
def test_value_sensitive_layer_ranks_first(method):
    """Sharp attention averages V's quantization noise over few tokens."""
    rng = np.random.default_rng(14)
    layers = [_layer(rng, n=48, temp=(8.0 if i == 1 else 1.0), v_mean=1.0) for i in range(4)]
    scores = [scoring.value_score(q, k, v, None, "q4_0", method=method) for q, k, v in layers]
    assert int(np.argmax(scores)) == 1


def test_gqa_and_shape_checks():
    rng = np.random.default_rng(15)
    q, k, v = _layer(rng, n=8, n_head=4, n_head_kv=1)
    assert scoring.value_score(q, k, v, None, "q4_0") > 0
    with pytest.raises(ValueError, match="attn"):
        scoring.key_score(q, k, v, np.zeros((4, 8, 7), np.float32), "q4_0")
    with pytest.raises(ValueError, match="method"):
        scoring.key_score(q, k, v, None, "q4_0", method="nope")


def test_query_rounding_is_modelled_for_quantized_keys():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((64, 2, 64)).astype(np.float32)
    k = rng.standard_normal((64, 1, 64)).astype(np.float32)
    v = rng.standard_normal((64, 1, 64)).astype(np.float32)
    with_q = scoring.score_layer(q, k, v, None, ["f16", "q8_0", "q4_0"], kq_scale=0.3)
    without = scoring.score_layer(q, k, v, None, ["f16", "q8_0", "q4_0"], kq_scale=0.3, round_q=False)
    assert scoring.query_dot_type("q4_1") == "q8_0" and scoring.query_dot_type("f16") == "f16"
    # 8-bit Q rounding is comparable to 8-bit K rounding: it roughly doubles q8_0's key error ...
    assert 1.3 < with_q["q8_0"][0] / without["q8_0"][0] < 4
    # ... and barely moves q4_0's, whose own error dominates; values are unaffected
    assert with_q["q4_0"][0] / without["q4_0"][0] < 1.2
    assert with_q["q8_0"][1] == without["q8_0"][1]
