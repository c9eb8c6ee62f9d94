"""Tests for qaq_gguf.methods.aquakv (AQUA-KV): numpy only, synthetic activations, no model."""
from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
from conftest import synthetic_calibration

from qaq_gguf import methods, rope
from qaq_gguf.methods import MethodError, aquakv
from qaq_gguf.rewrite import CacheUpdate


# --- helpers ----------------------------------------------------------------------------------------------------

def run_sequence(m, ks, vs, pos, n_batch, order="kv"):
    """Drive a method as the lab's rewriter does: refresh() before each batch (updates written into a simulated
    cache, cell = position), then every layer's K and V in layer order. Returns the final cache
    ({il: (k, v)}), what apply() returned per batch, and the updates per refresh."""
    n = len(pos)
    cache = {il: (np.zeros_like(ks[il]), np.zeros_like(vs[il])) for il in ks}
    returned, updates = [], []
    m.begin(n)
    for p0 in range(0, n, n_batch):
        sl = slice(p0, p0 + n_batch)
        ups = m.refresh(int(pos[p0]))
        updates.append(ups)
        for u in ups:
            assert isinstance(u, CacheUpdate)
            cache[u.il][0 if u.kind == "k" else 1][u.pos] = u.values
        got = {}
        for il in sorted(ks):
            for kind in order:
                x = (ks if kind == "k" else vs)[il][sl]
                y = m.apply(il, kind, x, pos[sl])
                assert y.shape == x.shape and y.dtype == np.float32
                cache[il][0 if kind == "k" else 1][sl] = y
                got[(il, kind)] = y
        returned.append(got)
    return cache, returned, updates


def rel_err(cache, ks, vs, rows):
    num = sum(np.sum((cache[il][0][rows] - ks[il][rows]) ** 2) + np.sum((cache[il][1][rows] - vs[il][rows]) ** 2)
              for il in ks)
    den = sum(np.sum(ks[il][rows] ** 2) + np.sum(vs[il][rows] ** 2) for il in ks)
    return float(num / den)


def correlated_calibration(n_layer=4, n_tok=2048, n_ctx=256, n_head_kv=2, head_dim=16, noise=0.1, seed=0,
                           token_seed=0):
    """Layers that follow each other: pre-RoPE K_l = K_{l-1} A_l + noise, V_l = [K_l, V_{l-1}] B_l + noise. The
    maps A_l, B_l depend on ``seed`` only; the tokens on ``token_seed``."""
    c = synthetic_calibration(n_layer=n_layer, n_tok=n_tok, n_ctx=n_ctx, n_head_kv=n_head_kv, head_dim=head_dim,
                              seed=seed)
    maps = np.random.default_rng([seed, 1])
    rng = np.random.default_rng([token_seed, 2])
    d = n_head_kv * head_dim
    k = rng.standard_normal((n_tok, d))
    v = rng.standard_normal((n_tok, d))
    for il in range(n_layer):
        if il:
            a = maps.standard_normal((d, d)) / math.sqrt(d)
            b = maps.standard_normal((2 * d, d)) / math.sqrt(2 * d)
            k = k @ a + noise * rng.standard_normal((n_tok, d)) + 0.3
            v = np.hstack([k, v]) @ b + noise * rng.standard_normal((n_tok, d))
        cl = c.layers[il]
        cl.k = rope.rope(k.reshape(n_tok, n_head_kv, head_dim).astype(np.float32), cl.pos, cl.rope)
        cl.v = v.reshape(n_tok, n_head_kv, head_dim).astype(np.float32)
    return c


def layers_of(calib, rows):
    ks = {il: calib.layers[il].k[rows].copy() for il in calib.layers}
    vs = {il: calib.layers[il].v[rows].copy() for il in calib.layers}
    return ks, vs, calib.layers[0].pos[rows]


# --- a loop-based reference from the paper ----------------------------------------------------------------------

def sylvester(n):
    h = [[1.0]]
    while len(h) < n:
        h = [row + row for row in h] + [row + [-x for x in row] for row in h]
    return [[x / math.sqrt(n) for x in row] for row in h]


def rope_loop(x, p, rp, sign):
    """NeoX RoPE of one head's vector at position p (theta_i = p * base^(-2i/n_rot)), sign -1 to undo it."""
    out = list(x)
    half = rp.n_rot // 2
    for i in range(half):
        th = p * rp.freq_scale * rp.freq_base ** (-2.0 * i / rp.n_rot)
        c, s = math.cos(th), sign * math.sin(th)
        a, b = x[i], x[i + half]
        out[i], out[i + half] = a * c - b * s, a * s + b * c
    return out


def higgs_loop(x, grid, g):
    """Per group of g: scale = L2 norm; y = sqrt(g) H x / scale; nearest grid point per pair; x^ = H y^ scale/sqrt(g)
    with the scale as stored (fp16)."""
    h = sylvester(g)
    out = []
    for s0 in range(0, len(x), g):
        grp = x[s0:s0 + g]
        scale = math.sqrt(sum(t * t for t in grp))
        y = [sum(h[i][j] * grp[j] for j in range(g)) * math.sqrt(g) / scale for i in range(g)]
        yq = []
        for i in range(0, g, 2):
            best = min(range(len(grid)), key=lambda c: (y[i] - grid[c][0]) ** 2 + (y[i + 1] - grid[c][1]) ** 2)
            yq += [float(grid[best][0]), float(grid[best][1])]
        scale16 = float(np.float16(scale))  # the norm is stored in fp16
        out += [sum(h[i][j] * yq[j] for j in range(g)) * scale16 / math.sqrt(g) for i in range(g)]
    return out


def linear_loop(x, w, b):
    return [sum(x[i] * float(w[i, j]) for i in range(len(x))) + float(b[j]) for j in range(len(b))]


def reference_token(m, ks, vs, t, p):
    """One token through every layer as the paper describes it: (K^ roped, V^) per layer."""
    out = {}
    prev_k = prev_v = None
    for idx, il in enumerate(m.layers):
        hkv, dk, dv = m.shape[il]
        rp = m.rope[il]
        k = [e for h in range(hkv) for e in rope_loop([float(z) for z in ks[il][t, h]], p, rp, -1.0)]
        v = [float(z) for z in vs[il][t].ravel()]
        if idx == 0:
            grid = aquakv.gaussian_grid(256).tolist()
            khat, vhat = higgs_loop(k, grid, len(k)), higgs_loop(v, grid, len(v))
        else:
            grid = aquakv.gaussian_grid(1 << (2 * m.code_bits)).tolist()
            pk = linear_loop(prev_k, *m.wk[il])
            khat = [a + b for a, b in zip(pk, higgs_loop([a - b for a, b in zip(k, pk)], grid, len(k)))]
            pv = linear_loop(khat + prev_v, *m.wv[il])
            vhat = [a + b for a, b in zip(pv, higgs_loop([a - b for a, b in zip(v, pv)], grid, len(v)))]
        kr = [rope_loop(khat[h * dk:(h + 1) * dk], p, rp, 1.0) for h in range(hkv)]
        out[il] = (np.array(kr), np.array(vhat).reshape(hkv, dv))
        prev_k, prev_v = khat, vhat
    return out


# --- (a) the round trip against the loop reference ---------------------------------------------------------------

def test_round_trip_matches_loop_reference():
    calib = synthetic_calibration(n_layer=3, n_tok=256, n_ctx=128, n_head_kv=2, head_dim=16, seed=0)
    m = aquakv.make("2:r0:s0")  # every token quantized as it is written
    m.fit(calib)
    ev = synthetic_calibration(n_layer=3, n_tok=256, n_ctx=128, n_head_kv=2, head_dim=16, seed=1)
    rows = np.arange(130, 136)  # positions 2..7 of the second chunk
    ks, vs, pos = layers_of(ev, rows)
    cache, returned, _ = run_sequence(m, ks, vs, pos, n_batch=6)
    for t in range(len(rows)):
        ref = reference_token(m, ks, vs, t, int(pos[t]))
        for il in m.layers:
            np.testing.assert_allclose(cache[il][0][t], ref[il][0], rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(cache[il][1][t], ref[il][1], rtol=1e-4, atol=1e-4)
    # and something was quantized: the reconstruction is close but not exact
    err = rel_err(cache, ks, vs, slice(None))
    assert 1e-4 < err < 0.2


def test_higgs_matches_loop_and_grids_beat_scalar_lloyd_max():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 32)).astype(np.float32) * 5
    for n in (16, 64, 256):
        grid = aquakv.gaussian_grid(n)
        got = aquakv.higgs_roundtrip(x, grid, 32)
        for r in range(3):
            np.testing.assert_allclose(got[r], higgs_loop([float(z) for z in x[r]], grid.tolist(), 32),
                                       rtol=1e-4, atol=1e-4)
    # MSE per value on a standard Gaussian: below the scalar Lloyd-Max quantizer at the same rate
    y = rng.standard_normal((100000, 2)).astype(np.float32)
    for n, scalar in ((16, 0.1175), (64, 0.03454), (256, 0.009497)):
        g = aquakv.gaussian_grid(n)
        assert g.shape == (n, 2)
        mse = float(np.mean((g[aquakv._nearest(y, g)] - y) ** 2))
        assert mse < scalar, (n, mse)
    # seeded: a fresh build is the same grid
    np.testing.assert_array_equal(aquakv.build_gaussian_grid(16), aquakv.gaussian_grid(16))
    assert aquakv.group_size(256) == 256 and aquakv.group_size(4096) == 1024 and aquakv.group_size(384) == 128


# --- (b) bits ---------------------------------------------------------------------------------------------------

def test_bits_by_hand():
    calib = synthetic_calibration(n_layer=3, n_tok=256, n_ctx=128, n_head_kv=2, head_dim=64)
    m = aquakv.make("2")
    m.fit(calib)
    b = m.bits(1024)
    # rows of 2 x 64 = 128 values per layer and token, HIGGS group g = 128; n_ctx 1024: 4 sinks + 128 recent =
    # 132 fp16 tokens, 892 coded tokens.
    # codes per value: layer 0 4 + 16/128 = 4.125, layers 1-2 2 + 16/128 = 2.125
    # storage (K or V) = 128 * [(132*16 + 892*4.125) + 2 * (132*16 + 892*2.125)]
    #                  = 128 * [(2112 + 3679.5) + 2 * (2112 + 1895.5)] = 128 * 13806.5 = 1,767,232 bits
    # K predictors: 2 layers x (128 + 1) x 128 = 33,024 fp16 -> 528,384 bits
    # V predictors: 2 layers x (128 + 128 + 1) x 128 = 65,792 fp16 -> 1,052,672 bits
    # per value: / (1024 tokens * 3 layers * 128) = / 393,216
    # K = (1,767,232 + 528,384) / 393,216 = 2,295,616 / 393,216 = 5.838053...
    # V = (1,767,232 + 1,052,672) / 393,216 = 2,819,904 / 393,216 = 7.171387...
    assert b.k == pytest.approx(2295616 / 393216, rel=1e-12)
    assert b.v == pytest.approx(2819904 / 393216, rel=1e-12)
    assert "32k" in b.detail and "amortised" in b.detail
    # at 32k the model-constant predictors nearly vanish: close to the code rate (+ sinks and window)
    # K at 32768: (128 * [(2112 + 32636*4.125) + 2*(2112 + 32636*2.125)] + 528,384) / (32768 * 384)
    k32 = (128 * ((2112 + 32636 * 4.125) + 2 * (2112 + 32636 * 2.125)) + 528384) / (32768 * 384)
    assert f"K {k32:.3f}" in b.detail
    # no predictors: storage only
    m2 = aquakv.make("2:nopred")
    m2.fit(calib)
    assert m2.bits(1024).k == pytest.approx(1767232 / 393216) == m2.bits(1024).v
    # a block-type residual: qaq2 = 10 bytes / 32 values = 2.5 bits, layer 0 q4_0 = 4.5 bits
    m3 = aquakv.make("2:qaq2")
    m3.fit(calib)
    store = 128 * ((2112 + 892 * 4.5) + 2 * (2112 + 892 * 2.5))
    assert m3.bits(1024).k == pytest.approx((store + 528384) / 393216)
    # the trellis residual (issue 24's long-context runs): tcq2 = 18 bytes / 64 values = 2.25 bits
    m4 = aquakv.make("2:tcq2:r16")
    m4.fit(calib)
    store = 128 * ((20 * 16 + 1004 * 4.5) + 2 * (20 * 16 + 1004 * 2.25))
    assert m4.bits(1024).k == pytest.approx((store + 528384) / 393216)
    # a context shorter than sinks + window is all fp16 (+ predictors)
    assert m2.bits(100).k == pytest.approx(16.0)


# --- (c) fingerprint ----------------------------------------------------------------------------------------------

def test_refuses_another_model():
    calib = synthetic_calibration(n_layer=2, n_tok=256, n_ctx=128, n_head_kv=1, head_dim=16)
    m = aquakv.make("3")
    with pytest.raises(MethodError, match="not fitted"):
        methods.check_fitted(m, calib.ident)
    m.fit(calib)
    assert m.fingerprint == calib.ident.fingerprint
    methods.check_fitted(m, calib.ident)
    other = dataclasses.replace(calib.ident, fingerprint="another-model")
    with pytest.raises(MethodError, match="fingerprint"):
        methods.check_fitted(m, other)


# --- (d) the predictor helps on correlated layers; more bits, less error -----------------------------------------

def test_predictor_lowers_residual_and_bits_lower_error():
    calib = correlated_calibration(seed=0)
    ev = correlated_calibration(seed=0, token_seed=1, n_tok=512)  # the same maps A_l, B_l, other tokens
    ks, vs, pos = layers_of(ev, np.arange(512))
    errs = {}
    for setting in ("2:r0", "3:r0", "4:r0", "2:r0:nopred"):
        m = aquakv.make(setting)
        m.fit(calib)
        if "nopred" not in setting:
            for il in m.layers[1:]:
                r = m.fit_report[il]
                # the residual keeps a small part of the layer's energy, also on held-out tokens
                assert r["k_pred"] < 0.2 and r["v_pred"] < 0.2, r
                assert r["k_pred_heldout"] < 0.2 and r["v_pred_heldout"] < 0.2, r
        cache, _, _ = run_sequence(m, ks, vs, pos, n_batch=128)
        errs[setting] = rel_err(cache, ks, vs, pos >= 4)
    assert errs["2:r0"] < 0.5 * errs["2:r0:nopred"], errs
    assert errs["2:r0"] > errs["3:r0"] > errs["4:r0"], errs


# --- (e) sinks and the recent window ------------------------------------------------------------------------------

def test_sinks_and_window_exact():
    calib = correlated_calibration(n_tok=1024, seed=2)
    m = aquakv.make("2:r32")
    m.fit(calib)
    m0 = copy.deepcopy(m)
    m0.window = 0  # the same fitted method, every token quantized when written
    ev = correlated_calibration(n_tok=256, seed=2, token_seed=3)
    ks, vs, pos = layers_of(ev, np.arange(192))
    assert pos[0] == 0
    n_batch = 64
    cache, returned, updates = run_sequence(m, ks, vs, pos, n_batch)
    rec, _, _ = run_sequence(m0, ks, vs, pos, n_batch)
    # every batch is written exact
    for b, got in enumerate(returned):
        sl = slice(b * n_batch, (b + 1) * n_batch)
        for il in m.layers:
            np.testing.assert_array_equal(got[(il, "k")], ks[il][sl])
            np.testing.assert_array_equal(got[(il, "v")], vs[il][sl])
    # before the batch at p, tokens [4, p - 32) not yet flushed are overwritten with their reconstruction
    assert updates[0] == []
    flushed = set()
    for b, ups in enumerate(updates[1:], 1):
        p = b * n_batch
        for u in ups:
            assert sorted(u.pos.tolist()) == list(range(max(4, p - n_batch - 32), p - 32))
            assert np.all((u.pos >= 4) & (u.pos < p - 32))
            ref = rec[u.il][0 if u.kind == "k" else 1][u.pos]
            np.testing.assert_allclose(u.values, ref, rtol=1e-6, atol=1e-6)
            flushed |= {(u.il, u.kind, t) for t in u.pos.tolist()}
    last = (len(pos) - 1) // n_batch * n_batch
    assert {t for _, _, t in flushed} == set(range(4, last - 32))
    for il in m.layers:
        for j, full in ((0, ks), (1, vs)):
            np.testing.assert_array_equal(cache[il][j][:4], full[il][:4])              # sinks
            np.testing.assert_array_equal(cache[il][j][last - 32:], full[il][last - 32:])  # window + batch
            np.testing.assert_allclose(cache[il][j][4:last - 32], rec[il][j][4:last - 32], rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(rec[il][j][:4], full[il][:4])                # sinks even with r0
            assert not np.allclose(rec[il][j][4:], full[il][4:])


def test_order_within_a_layer_and_errors():
    calib = correlated_calibration(n_tok=512, seed=4)
    m = aquakv.make("3")
    m.fit(calib)
    ev = correlated_calibration(n_tok=256, seed=4, token_seed=5)
    ks, vs, pos = layers_of(ev, np.arange(256))
    a, _, _ = run_sequence(m, ks, vs, pos, 64, order="kv")
    b, _, _ = run_sequence(m, ks, vs, pos, 64, order="vk")  # V before K: reconstructed once K arrives
    for il in m.layers:
        np.testing.assert_array_equal(a[il][0], b[il][0])
        np.testing.assert_array_equal(a[il][1], b[il][1])
    m0 = copy.deepcopy(m)
    m0.window = 0
    with pytest.raises(MethodError, match="before its inputs"):
        run_sequence(m0, ks, vs, pos, 64, order="vk")
    with pytest.raises(MethodError):
        aquakv.make("5")
    with pytest.raises(MethodError):
        aquakv.make("2:zz")
    assert [x.label for x in methods.make("aquakv")] == ["aquakv-2", "aquakv-3", "aquakv-4"]
    assert aquakv.make("2:qaq2").label == "aquakv-2 qaq2" and aquakv.make("2:r0").label == "aquakv-2 r0"
    with pytest.raises(MethodError, match="not fitted"):
        aquakv.make("2").bits(512)
