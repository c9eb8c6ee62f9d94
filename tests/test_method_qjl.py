"""QJL (qaq_gguf.methods.qjl): the rewritten key against a loop-by-loop reference of the paper's estimator and the
repo's kernel, the value window through refresh(), bits, fingerprint, and the estimator's statistics. numpy only."""
import dataclasses
import math

import numpy as np
import pytest

from conftest import synthetic_calibration
from qaq_gguf import methods
from qaq_gguf.methods import MethodError, qjl


def _reference_score(q, keys, pos, s, m_o, n_out=8, group=32):
    """QJL's score <q, k> for every key, loop by loop (qjl_score_kernel.cu, Eq. 4): per 32-token group the n_out
    channels of largest norm are outliers; inlier and outlier parts each get sign bits and a norm."""
    n, d = keys.shape
    m = s.shape[0]
    out = np.zeros(n)
    for t in range(n):
        g = pos[t] // group
        members = [u for u in range(n) if pos[u] // group == g]
        energy = [sum(keys[u, j] ** 2 for u in members) for j in range(d)]
        outl = sorted(range(d), key=lambda j: -energy[j])[:n_out]
        k = keys[t]
        k_out = np.array([k[j] if j in outl else 0.0 for j in range(d)])
        k_in = k - k_out
        q_out = np.array([q[j] if j in outl else 0.0 for j in range(d)])
        q_in = q - q_out
        norm = float(np.float16(math.sqrt(sum(v * v for v in k))))
        norm_out = float(np.float16(math.sqrt(sum(v * v for v in k_out))))
        norm_in = math.sqrt(max(norm ** 2 - norm_out ** 2, 0.0))
        acc_in = 0.0
        for r in range(m):
            sk = sum(s[r, j] * k_in[j] for j in range(d))
            sq = sum(s[r, j] * q_in[j] for j in range(d))
            acc_in += sq if sk > 0 else -sq
        acc_out = 0.0
        for r in range(m_o):
            sk = sum(s[r, j] * k_out[j] for j in range(d))
            sq = sum(s[r, j] * q_out[j] for j in range(d))
            acc_out += sq if sk > 0 else -sq
        out[t] = math.sqrt(math.pi / 2) / m * norm_in * acc_in + math.sqrt(math.pi / 2) / m_o * norm_out * acc_out
    return out


def test_sketch_matrix_rows_orthogonal_in_chunks():
    d, m = 16, 40
    s = qjl.sketch_matrix(d, m, seed=3)
    assert s.shape == (m, d)
    for start in range(0, m, d):
        blk = s[start:start + d]
        np.testing.assert_allclose(blk @ blk.T, d * np.eye(len(blk)), atol=1e-9)  # orthogonal rows, norm sqrt(d)
    np.testing.assert_array_equal(s, qjl.sketch_matrix(d, m, seed=3))  # seeded
    assert not np.allclose(s, qjl.sketch_matrix(d, m, seed=4))


def test_rewritten_key_gives_the_estimator_exactly():
    """q . k~ equals the QJL score computed loop by loop, for every key (two 32-token groups, two heads)."""
    rng = np.random.default_rng(0)
    n, h, d = 40, 2, 24
    scale = np.ones(d)
    scale[[3, 11]] = 5.0  # outlier channels
    keys = (rng.standard_normal((n, h, d)) * scale).astype(np.float32)
    pos = np.arange(20, 20 + n)  # groups [0, 32) and [32, 64) cut at 20 and 60
    m = 32
    s = qjl.sketch_matrix(d, m, seed=1)
    kt = qjl.sketch_keys(keys, pos, s, m, n_outliers=4)
    for head in range(h):
        q = rng.standard_normal(d)
        ref = _reference_score(q, keys[:, head].astype(np.float64), pos, s, m, n_out=4)
        np.testing.assert_allclose(kt[:, head].astype(np.float64) @ q, ref, rtol=1e-5, atol=1e-5)


def test_method_round_trip_and_value_window():
    """Through the interface: keys and values written exact, refresh() stores the keys of full 128-token blocks as
    sketches (== the reference estimator) and the values older than the window as 2-bit codes."""
    calib = synthetic_calibration(n_layer=1, n_tok=256, n_ctx=256, head_dim=64)
    meth = methods.make("qjl:3")[0]
    meth.fit(calib)
    layer = calib.layers[0]
    meth.begin(256)
    assert meth.refresh(0) == []
    pos0 = np.arange(160)
    k0, v0 = layer.k[:160], layer.v[:160]
    np.testing.assert_array_equal(meth.apply(0, "k", k0, pos0), k0)  # the newest tokens: exact
    np.testing.assert_array_equal(meth.apply(0, "v", v0, pos0), v0)
    ups = {u.kind: u for u in meth.refresh(160)}
    # keys: the full block [0, 128); values: older than 160 - 128 = 32
    np.testing.assert_array_equal(ups["k"].pos, np.arange(128))
    np.testing.assert_array_equal(ups["v"].pos, np.arange(32))
    s = meth.sketch(64)
    rng = np.random.default_rng(5)
    for head in range(2):
        q = rng.standard_normal(64)
        ref = _reference_score(q, k0[:128, head].astype(np.float64), pos0[:128], s, s.shape[0])
        np.testing.assert_allclose(ups["k"].values[:, head].astype(np.float64) @ q, ref, rtol=1e-5, atol=1e-5)
    # values: per token, per 32 channels, 2-bit asymmetric min/max (loop reference)
    ref_v = np.zeros((32, 2, 64))
    for t in range(32):
        for head in range(2):
            for g0 in range(0, 64, 32):
                x = v0[t, head, g0:g0 + 32].astype(np.float64)
                lo, hi = x.min(), x.max()
                step = (hi - lo) / 3
                ref_v[t, head, g0:g0 + 32] = [lo + step * min(max(round((xi - lo) / step), 0), 3) for xi in x]
    np.testing.assert_allclose(ups["v"].values, ref_v, atol=1e-5)
    # nothing is stored twice; the next window edge moves on
    ups2 = {u.kind: u for u in meth.refresh(192)}
    assert "k" not in ups2 and list(ups2["v"].pos) == list(range(32, 64))
    meth.begin(256)
    assert meth.refresh(256) == []  # a new sequence forgets the old one


def test_r0_sketches_on_write():
    calib = synthetic_calibration(n_layer=1, n_tok=64, n_ctx=64, head_dim=64)
    meth = methods.make("qjl:2:r0")[0]
    meth.fit(calib)
    meth.begin(64)
    k = calib.layers[0].k
    out = meth.apply(0, "k", k, np.arange(64))
    s = meth.sketch(64)
    np.testing.assert_allclose(out, qjl.sketch_keys(k, np.arange(64), s, s.shape[0]), atol=1e-6)
    v = meth.apply(0, "v", calib.layers[0].v, np.arange(64))
    assert not np.allclose(v, calib.layers[0].v)
    assert meth.refresh(64) == []


def test_bits_by_hand():
    calib = synthetic_calibration(n_layer=2, head_dim=64)
    meth = methods.make("qjl:3")[0]
    meth.fit(calib)
    # d = 64, target 3: m = nearest multiple of 8 to (3*64 - 16 - 16 - 8*8/32) / 2 = (192 - 34) / 2 = 79 -> 80;
    # key bits (80 + 80 + 16 + 16 + 2) / 64 = 194 / 64 = 3.03125
    assert meth.m_for(64) == 80
    assert qjl.key_bits(64, 80, 80) == pytest.approx(194 / 64)
    # n_ctx = 1024, 128 fp16 tokens: K (896 * 3.03125 + 128 * 16) / 1024 = (2716 + 2048) / 1024 = 4.65234375
    # V: 2 bits + (16 + 16)/32 = 3 bits; (896 * 3 + 128 * 16) / 1024 = (2688 + 2048) / 1024 = 4.625
    b = meth.bits(1024)
    assert b.k == pytest.approx(4764 / 1024)
    assert b.v == pytest.approx(4.625)
    # without the buffer: 3.03125 and 3
    b0 = methods.make("qjl:3:r0")[0]
    b0.fit(calib)
    assert (b0.bits(1024).k, b0.bits(1024).v) == (pytest.approx(3.03125), pytest.approx(3.0))
    # d = 256, target 3: (768 - 34) / 2 = 367 -> 368; (736 + 34) / 256 = 3.0078125
    assert qjl.sketch_size(3, 256) == 368 and qjl.key_bits(256, 368, 368) == pytest.approx(770 / 256)
    # the README's m = 256 at d = 128: (256 + 256 + 34) / 128 = 4.265625
    assert qjl.key_bits(128, 256, 256) == pytest.approx(546 / 128)


def test_fingerprint_refused():
    calib = synthetic_calibration(n_layer=1)
    meth = methods.make("qjl:3")[0]
    with pytest.raises(MethodError, match="not fitted"):
        methods.check_fitted(meth, calib.ident)
    meth.fit(calib)
    methods.check_fitted(meth, calib.ident)
    with pytest.raises(MethodError, match="fingerprint"):
        methods.check_fitted(meth, dataclasses.replace(calib.ident, fingerprint="another-model"))


def test_settings():
    assert [m.label for m in methods.make("qjl")] == ["qjl:2", "qjl:3", "qjl:4"]
    assert methods.make("qjl:m256:r32")[0].m_for(128) == 256
    for bad in ("qjl:x", "qjl:3:w5", "qjl:m12", "qjl:3:r40", "qjl:0.5"):
        with pytest.raises(MethodError):
            methods.make(bad)


def test_estimator_unbiased_and_error_shrinks_with_m():
    """Over independent sketches the score averages to <q, k> (the orthogonalized rows bias it by < 0.5% at
    d = 64), and its error falls as m grows, about as 1/sqrt(m)."""
    rng = np.random.default_rng(7)
    d, n = 64, 32
    keys = rng.standard_normal((n, 1, d)) * np.where(np.arange(d) < 4, 4.0, 1.0)
    q = rng.standard_normal(d)
    exact = keys[:, 0] @ q
    rms = {}
    for m in (64, 256, 1024):
        est = np.stack([qjl.sketch_keys(keys, np.arange(n), qjl.sketch_matrix(d, m, seed), m)[:, 0] @ q
                        for seed in range(60)])
        err = est - exact
        rms[m] = float(np.sqrt(np.mean(err ** 2)))
        # unbiased: the mean over sketches is within 4 standard errors (plus the small bias) of <q, k>
        se = err.std(axis=0) / math.sqrt(len(est))
        assert np.all(np.abs(err.mean(axis=0)) < 4 * se + 0.005 * np.abs(exact) + 1e-9)
    assert rms[64] > rms[256] > rms[1024]
    assert rms[64] / rms[1024] == pytest.approx(4.0, rel=0.35)  # 1/sqrt(m): sqrt(1024/64) = 4
