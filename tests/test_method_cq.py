"""Coupled Quantization (qaq_gguf.methods.cq): weighted k-means and the encoding against loop-by-loop references
(RoPE included), bits, fingerprint and RoPE refusal, and error falling with bits. numpy only."""
import dataclasses
import math

import numpy as np
import pytest

from conftest import synthetic_calibration
from qaq_gguf import methods
from qaq_gguf.methods import MethodError, cq


def _rope_loop(x, pos, rp, sign):
    """NeoX RoPE (pairs i, i + n_rot/2), one rotation at a time, with llama.cpp's float32 angles."""
    out = np.array(x, np.float64)
    half = rp.n_rot // 2
    for t in range(x.shape[0]):
        for i in range(half):
            theta = float(np.float32(pos[t]) * np.float32(rp.freq_scale)
                          * np.power(np.float32(rp.freq_base), np.float32(-2.0 * i / rp.n_rot), dtype=np.float32))
            c, s = math.cos(theta), sign * math.sin(theta)
            a, b = x[t, ..., i].astype(np.float64), x[t, ..., i + half].astype(np.float64)
            out[t, ..., i] = a * c - b * s
            out[t, ..., i + half] = a * s + b * c
    return out


def _nearest_loop(vec, codebook):
    best, arg = math.inf, -1
    for j, c in enumerate(codebook):
        dist = sum((float(a) - float(b)) ** 2 for a, b in zip(vec, c))
        if dist < best:
            best, arg = dist, j
    return codebook[arg]


def _split(calib, lo, hi):
    """The calibration's tokens lo:hi (all layers)."""
    layers = {}
    for il, L in calib.layers.items():
        layers[il] = dataclasses.replace(L, k=L.k[lo:hi], v=L.v[lo:hi], pos=L.pos[lo:hi], q_norm2=L.q_norm2[lo:hi],
                                         k_weight=L.k_weight[lo:hi], v_weight=L.v_weight[lo:hi],
                                         attn_recv=L.attn_recv[lo:hi])
    return dataclasses.replace(calib, layers=layers)


def test_weighted_kmeans_matches_loop_reference():
    """Lloyd iterations with weighted means (Fisher-guided centroids), same start, loop by loop."""
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [5, 0], [0, 5], [5, 5]], float)
    x = np.concatenate([c + rng.standard_normal((30, 2)) for c in centres])[None].astype(np.float32)
    w = rng.uniform(0.1, 10.0, (1, 120))
    init = x[:, [0, 30, 60, 90]]
    got = cq.kmeans(x, w, 4, iters=4, init=init, tol=0)
    cent = [list(map(float, c)) for c in init[0]]
    for _ in range(4):
        num = [[0.0, 0.0] for _ in cent]
        den = [0.0] * len(cent)
        for p, wi in zip(x[0], w[0]):
            j = min(range(len(cent)), key=lambda j: (p[0] - cent[j][0]) ** 2 + (p[1] - cent[j][1]) ** 2)
            num[j][0] += wi * p[0]
            num[j][1] += wi * p[1]
            den[j] += wi
        cent = [[a / dj, b / dj] for (a, b), dj in zip(num, den)]
    np.testing.assert_allclose(got[0], cent, rtol=1e-5, atol=1e-5)


def test_kmeans_weights_pull_centroids():
    """A heavy point drags its centroid onto itself (the weighted mean), a light one does not."""
    x = np.array([[[0.0], [1.0], [10.0], [11.0]]], np.float32)
    got = cq.kmeans(x, np.array([[1.0, 1000.0, 1.0, 1.0]]), 2, iters=5, init=np.array([[[0.0], [10.0]]]), tol=0)
    np.testing.assert_allclose(sorted(got[0, :, 0]), [0.999, 10.5], atol=2e-3)


def test_encoding_matches_loop_reference():
    """apply(): keys un-roped, nearest fp16 centroid per group of c channels (plain L2), roped back; values
    directly. Checked token by token against the fitted codebooks."""
    calib = synthetic_calibration(n_layer=1, n_tok=512, n_ctx=256, head_dim=16)
    meth = methods.make("cq:4c6b")[0]
    meth.fit(calib)
    L = calib.layers[0]
    assert meth.codebooks[(0, "k")].shape == (2 * 16 // 4, 64, 4)  # (kv heads x groups, 2^b, c)
    cb = meth.codebooks
    assert np.array_equal(cb[(0, "k")], cb[(0, "k")].astype(np.float16).astype(np.float32))  # fp16 codebooks
    pos = np.arange(100, 110)
    keys, vals = L.k[pos], L.v[pos]
    meth.begin(256)
    got_k = meth.apply(0, "k", keys, pos)
    got_v = meth.apply(0, "v", vals, pos)
    pre = _rope_loop(keys, pos, L.rope, -1.0)
    rec = np.zeros_like(pre)
    rec_v = np.zeros(vals.shape)
    for t in range(len(pos)):
        for h in range(2):
            for g in range(4):
                sl = slice(4 * g, 4 * g + 4)
                rec[t, h, sl] = _nearest_loop(pre[t, h, sl], cb[(0, "k")][h * 4 + g])
                rec_v[t, h, sl] = _nearest_loop(vals[t, h, sl], cb[(0, "v")][h * 4 + g])
    np.testing.assert_allclose(got_k, _rope_loop(rec, pos, L.rope, 1.0), atol=1e-4)
    np.testing.assert_allclose(got_v, rec_v, atol=1e-6)


def test_bits_by_hand():
    calib = synthetic_calibration(n_layer=1, head_dim=16)
    m = methods.make("cq:2")[0]  # CQ-4c8b
    m.fit(calib)
    # 8 bits per 4 channels = 2 bits per value; codebooks 2^8 x 4 fp16 per group of 4 channels over 1024 tokens
    # x 4 values: 256 * 4 * 16 / (1024 * 4) = 4 bits per value; total 6
    b = m.bits(1024)
    assert (b.k, b.v) == (pytest.approx(6.0), pytest.approx(6.0))
    # CQ-8c8b at 4096 tokens: 8/8 = 1 + 256 * 16 / 4096 = 1 + 1 = 2
    m1 = methods.make("cq:1")[0]
    m1.fit(calib)
    assert m1.bits(4096).k == pytest.approx(2.0) and m1.label == "cq:8c8b"


def test_fingerprint_and_rope_refused():
    calib = synthetic_calibration(n_layer=1, head_dim=16)
    m = methods.make("cq:4c4b")[0]
    with pytest.raises(MethodError, match="not fitted"):
        methods.check_fitted(m, calib.ident)
    m.fit(calib)
    methods.check_fitted(m, calib.ident)
    with pytest.raises(MethodError, match="fingerprint"):
        methods.check_fitted(m, dataclasses.replace(calib.ident, fingerprint="another-model"))
    no_rope = dataclasses.replace(calib, layers={0: dataclasses.replace(calib.layers[0], rope=None)})
    with pytest.raises(MethodError, match="RoPE"):
        methods.make("cq:4c4b")[0].fit(no_rope)
    with pytest.raises(MethodError, match="multiple"):
        methods.make("cq:3c4b")[0].fit(calib)


def test_settings():
    assert [m.label for m in methods.make("cq")] == ["cq:8c8b", "cq:4c8b"]
    assert methods.make("cq:2c8b")[0].c == 2
    for bad in ("cq:3", "cq:4c", "cq:x", "cq:0c8b"):
        with pytest.raises(MethodError):
            methods.make(bad)


def test_more_bits_lower_error_on_held_out_tokens():
    calib = synthetic_calibration(n_layer=1, n_tok=1024, n_ctx=256, head_dim=32)
    fit, test = _split(calib, 0, 768), _split(calib, 768, 1024)
    L = test.layers[0]
    err = {}
    for spec in ("cq:8c8b", "cq:4c8b", "cq:2c8b"):
        m = methods.make(spec)[0]
        m.fit(fit)
        m.begin(256)
        ek = np.mean((m.apply(0, "k", L.k, L.pos) - L.k) ** 2) / np.mean(L.k ** 2)
        ev = np.mean((m.apply(0, "v", L.v, L.pos) - L.v) ** 2) / np.mean(L.v ** 2)
        err[spec] = (ek, ev)
    assert err["cq:8c8b"][0] > err["cq:4c8b"][0] > err["cq:2c8b"][0]
    assert err["cq:8c8b"][1] > err["cq:4c8b"][1] > err["cq:2c8b"][1]
    assert err["cq:2c8b"][1] < 0.1
