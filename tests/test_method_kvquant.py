"""KVQuant (qaq_gguf.methods.kvquant): pre-RoPE per-channel keys with calibrated ranges, per-token values, the
per-layer Fisher-weighted nuqX codebooks, dense-and-sparse outliers and the fp16 first token; checked against a
loop-based reference written from the paper's description."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from conftest import synthetic_calibration

from qaq_gguf import methods
from qaq_gguf import rope as rope_mod
from qaq_gguf.methods import MethodError, kvquant


@pytest.fixture(scope="module")
def calib():
    return synthetic_calibration()


@pytest.fixture(scope="module")
def held_out():
    """Other activations of the same shapes (seed 1): what the fitted method is evaluated on."""
    return synthetic_calibration(seed=1)


def _fitted(setting, calib):
    m = kvquant.make(setting)
    m.fit(calib)
    return m


# --- a reference written from the paper (arXiv 2401.18079 sections 3.1-3.4, App. K), one value at a time -------------

def ref_rotate(x, pos, rp, sign):
    """RoPE of one (tokens, heads, dim) array, element by element: NeoX pairs (i, i + n_rot/2) or adjacent pairs,
    angle pos * freq_scale * base^(-2i / n_rot)."""
    out = np.array(x, np.float64, copy=True)
    half = rp.n_rot // 2
    for t in range(x.shape[0]):
        for h in range(x.shape[1]):
            for i in range(half):
                a, b = (i, i + half) if rp.neox else (2 * i, 2 * i + 1)
                th = pos[t] * rp.freq_scale * rp.freq_base ** (-2.0 * i / rp.n_rot)
                c, s = math.cos(th), sign * math.sin(th)
                xa, xb = float(x[t, h, a]), float(x[t, h, b])
                out[t, h, a] = xa * c - xb * s
                out[t, h, b] = xa * s + xb * c
    return out


def ref_nearest(a, levels):
    best = 0
    for j in range(len(levels)):
        if abs(a - levels[j]) < abs(a - levels[best]):
            best = j
    return float(levels[best])


def _near_midpoint(a, levels, tol=1e-4):
    mids = (np.asarray(levels[1:], np.float64) + np.asarray(levels[:-1], np.float64)) / 2
    return bool(np.min(np.abs(mids - a)) < tol)


def ref_keys(m, il, x, pos):
    """Un-rope, then per (head, channel): outside the calibrated [lower, upper] kept exact, else normalized with
    the calibrated offset/range, rounded to the nearest level, de-normalized; re-rope; the first token exact.
    Returns the reconstruction and a mask of elements whose pair had a value on a rounding boundary (where float32
    and float64 may round differently)."""
    f = m.layers[il]
    pre = ref_rotate(x, pos, f.rope, -1.0)
    rec = np.empty_like(pre)
    amb = np.zeros(pre.shape, bool)
    for t in range(pre.shape[0]):
        for h in range(pre.shape[1]):
            for c in range(pre.shape[2]):
                xv = pre[t, h, c]
                lo, hi = float(f.k_lo[h, c]), float(f.k_hi[h, c])
                if m.pct > 0 and (xv > hi or xv < lo):
                    rec[t, h, c] = xv
                    amb[t, h, c] = min(abs(xv - hi), abs(xv - lo)) < 1e-4
                else:
                    off, rng = float(f.k_off[h, c]), float(f.k_rng[h, c])
                    a = (xv - off) / rng
                    rec[t, h, c] = ref_nearest(a, f.cb_k) * rng + off
                    amb[t, h, c] = _near_midpoint(a, f.cb_k) or (m.pct > 0 and min(abs(xv - hi), abs(xv - lo)) < 1e-4)
    out = ref_rotate(rec, pos, f.rope, 1.0)
    idx = f.rope.pairs(pre.shape[2])
    pair_amb = amb.copy()
    pair_amb[..., idx[:, 0]] |= amb[..., idx[:, 1]]
    pair_amb[..., idx[:, 1]] |= amb[..., idx[:, 0]]
    for t in range(len(pos)):
        if pos[t] == 0:
            out[t] = x[t]
            pair_amb[t] = False
    return out, pair_amb


def ref_values(m, il, x, pos):
    """Per token over the layer row (all kv heads): outliers at or beyond the row's 99.5th / 0.5th quantile kept
    exact; offset/range from the min/max of the row with outliers replaced by its lower median; nearest level."""
    f = m.layers[il]
    n = x.shape[0]
    rows = x.reshape(n, -1).astype(np.float64)
    rec = np.empty_like(rows)
    amb = np.zeros(rows.shape, bool)
    t_hi = 1 - m.pct / 200
    for t in range(n):
        r = rows[t]
        if pos[t] == 0:
            rec[t] = r
            continue
        if m.pct > 0:
            up, lo = np.quantile(r, t_hi), np.quantile(r, 1 - t_hi)
            out = [(xv >= up or xv <= lo) for xv in r]
            med = sorted(r)[(len(r) - 1) // 2]
        else:
            out = [False] * len(r)
            med = 0.0
        inl = [med if o else xv for xv, o in zip(r, out)]
        mx, mn = max(inl), min(inl)
        off, rng = (mx + mn) / 2, (mx - mn) / 2
        for c, xv in enumerate(r):
            if out[c]:
                rec[t, c] = xv
            else:
                a = (xv - off) / rng
                rec[t, c] = ref_nearest(a, f.cb_v) * rng + off
                amb[t, c] = _near_midpoint(a, f.cb_v)
    return rec.reshape(x.shape), amb.reshape(x.shape)


def ref_weighted_lloyd(a, w, levels, iters):
    """Weighted Lloyd iterations one point at a time: assign each value to its nearest level, move each level to
    the weighted mean of its values."""
    c = [float(x) for x in levels]
    for _ in range(iters):
        num, den = [0.0] * len(c), [0.0] * len(c)
        for x, wt in zip(a, w):
            j = min(range(len(c)), key=lambda i: abs(x - c[i]))
            num[j] += wt * x
            den[j] += wt
        c = sorted(num[j] / den[j] if den[j] > 0 else c[j] for j in range(len(c)))
    return np.array(c)


# --- (a) round trips against the reference ---------------------------------------------------------------------------

def test_rope_reference_matches_the_port():
    """The test's RoPE loop reproduces rope.py (so the key reference below checks the pre-RoPE path)."""
    rp = synthetic_calibration().layers[0].rope
    x = np.random.default_rng(0).standard_normal((5, 2, 64)).astype(np.float32)
    pos = np.array([0, 1, 7, 100, 255])
    np.testing.assert_allclose(rope_mod.rope(x, pos, rp), ref_rotate(x, pos, rp, 1.0), atol=2e-5)
    np.testing.assert_allclose(rope_mod.unrope(x, pos, rp), ref_rotate(x, pos, rp, -1.0), atol=2e-5)


@pytest.mark.parametrize("setting", ["3", "2:0%"])
def test_keys_match_reference(setting, calib, held_out):
    m = _fitted(setting, calib)
    L = held_out.layers[1]
    sel = np.r_[0:40, 256:296]  # two chunk starts (position 0: the sink) and their neighbours
    x, pos = L.k[sel], L.pos[sel]
    got = m.apply(1, "k", x, pos)
    want, amb = ref_keys(m, 1, x, pos)
    assert amb.mean() < 0.01
    np.testing.assert_allclose(got[~amb], want[~amb], rtol=0, atol=2e-4)
    np.testing.assert_array_equal(got[pos == 0], x[pos == 0])  # the first token stays fp16


@pytest.mark.parametrize("setting", ["3", "4:0%"])
def test_values_match_reference(setting, calib, held_out):
    m = _fitted(setting, calib)
    L = held_out.layers[2]
    sel = np.r_[0:40, 256:296]
    x, pos = L.v[sel], L.pos[sel]
    got = m.apply(2, "v", x, pos)
    want, amb = ref_values(m, 2, x, pos)
    assert amb.mean() < 0.01
    np.testing.assert_allclose(got[~amb], want[~amb], rtol=0, atol=2e-5)
    np.testing.assert_array_equal(got[pos == 0], x[pos == 0])


def test_codebook_is_fisher_weighted_kmeans(calib):
    """The levels are the weighted Lloyd fixed point on the normalized calibration inliers (checked one value at a
    time from the method's own levels), and the weights move them."""
    rng = np.random.default_rng(0)
    a = np.clip(rng.standard_normal(400) * 0.4, -1, 1)
    w = rng.uniform(0.1, 1.0, 400)
    c = kvquant.weighted_kmeans_1d(a, w, 8)
    assert np.all(np.diff(c) > 0) and len(c) == 8
    np.testing.assert_allclose(ref_weighted_lloyd(a, w, c, 1), c, atol=1e-5)
    w2 = w.copy()
    w2[a > 0.5] *= 1000.0  # heavy weight on the upper tail pulls levels there
    c2 = kvquant.weighted_kmeans_1d(a, w2, 8)
    assert np.sum(c2 > 0.5) > np.sum(c > 0.5)
    # the fitted codebooks: 2^b levels in [-1, 1] per layer, separately for K and V
    m = _fitted("3", calib)
    for f in m.layers.values():
        for cb in (f.cb_k, f.cb_v):
            assert cb.shape == (8,) and np.all(np.diff(cb) > 0) and cb.min() >= -1 and cb.max() <= 1
        assert not np.allclose(f.cb_k, f.cb_v)


def test_key_thresholds_are_calibrated_per_channel_pre_rope(calib):
    m = _fitted("3", calib)
    L = calib.layers[0]
    pre = rope_mod.unrope(L.k, L.pos, L.rope)[L.pos != 0]
    f = m.layers[0]
    np.testing.assert_allclose(f.k_hi, np.percentile(pre, 99.5, axis=0), rtol=1e-5)
    np.testing.assert_allclose(f.k_lo, np.percentile(pre, 0.5, axis=0), rtol=1e-5, atol=1e-6)
    # about 1% of the calibration keys of each channel fall outside
    share = np.mean((pre > f.k_hi) | (pre < f.k_lo), axis=0)
    assert 0.005 < share.mean() < 0.015


# --- (b) bits -----------------------------------------------------------------------------------------------------

def test_bits_by_hand(calib):
    # KVQuant-3-1%, synthetic model: n_head_kv 2 x head_dim 64 -> rows of m = 128 values; n_ctx n = 1024; nothing
    # processed yet, so the nominal outlier shares: keys 1%; values: the quantile rule on 128 values keeps
    # 1 (>= the 99.5th) + 1 (<= the 0.5th) = 2/128 = 1.5625%.
    # K = ((n-1)(3 + 32*0.01) + 16)/n + 32/m (CSC pointers) + 32/n (fp16 offset+range per channel) + 16*8/(n*m)
    #   = (1023*3.32 + 16)/1024 + 0.25 + 0.03125 + 128/131072 = 3412.36/1024 + 0.2822265625 = 3.614609375
    # V = ((n-1)(3 + 32*0.015625 + 32/128) + 16)/n + 32/128 + 128/131072
    #   = (1023*3.75 + 16)/1024 + 0.2509765625 = 3852.25/1024 + 0.2509765625 = 4.012939453125
    m = _fitted("3", calib)
    b = m.bits(1024)
    assert b.k == pytest.approx(3.614609375)
    assert b.v == pytest.approx(4.012939453125)
    assert "m=128" in b.detail and "3.6146" in b.detail and "4.0129" in b.detail
    # without outliers: no outliers, no pointers:
    # K = (1023*3 + 16)/1024 + 32/1024 + 128/131072 = 3085/1024 + 0.0322265625 = 3.044921875
    # V = (1023*(3 + 0.25) + 16)/1024 + 128/131072 = 3340.75/1024 + 0.0009765625 = 3.263427734375
    b0 = _fitted("3:0%", calib).bits(1024)
    assert b0.k == pytest.approx(3.044921875) and b0.v == pytest.approx(3.263427734375)
    # after processing, the shares are measured: values exactly 2/128 per token on distinct values, keys ~1% on
    # fresh keys of the calibration's distribution (layer 0 of the same seed with more tokens: the same outlier
    # channels, new tokens after the first 512)
    L = synthetic_calibration(n_tok=1024).layers[0]
    k, v, pos = L.k[512:], L.v[512:], L.pos[512:]
    m.apply(0, "k", k, pos)
    m.apply(0, "v", v, pos)
    assert m.outlier_fraction("v") == pytest.approx(2 / 128)
    assert 0.003 < m.outlier_fraction("k") < 0.03
    assert kvquant.value_outlier_fraction(256, 1.0) == pytest.approx(4 / 256)  # 253.725 -> 2 top, 1.275 -> 2 bottom


# --- (c) fingerprint ------------------------------------------------------------------------------------------------

def test_refused_on_another_model(calib):
    m = _fitted("3", calib)
    methods.check_fitted(m, calib.ident)
    with pytest.raises(MethodError, match="fingerprint"):
        methods.check_fitted(m, dataclasses.replace(calib.ident, fingerprint="another-model"))
    with pytest.raises(MethodError, match="not fitted"):
        methods.check_fitted(kvquant.make("3"), calib.ident)


def test_refuses_a_model_without_ported_rope():
    c = synthetic_calibration(n_layer=1)
    c.layers[0] = dataclasses.replace(c.layers[0], rope=None)
    with pytest.raises(MethodError, match="RoPE"):
        kvquant.make("3").fit(c)


# --- (d) more bits, less error ----------------------------------------------------------------------------------

def test_more_bits_lower_error(calib, held_out):
    L = held_out.layers[0]
    err = {}
    for b in (2, 3, 4):
        m = _fitted(str(b), calib)
        err[b] = [np.mean((m.apply(0, kind, x, L.pos) - x) ** 2) for kind, x in (("k", L.k), ("v", L.v))]
    for j in (0, 1):
        assert err[2][j] > err[3][j] > err[4][j] > 0


# --- settings -------------------------------------------------------------------------------------------------------

def test_settings():
    ms = methods.make("kvquant")
    assert [m.label for m in ms] == ["kvquant-2 1%", "kvquant-3 1%", "kvquant-4 1%"]
    assert "5.75" in ms[1].headline and "5.68" in ms[1].headline
    assert kvquant.make("3:0%").label == "kvquant-3 0%" and "5.87" in kvquant.make("3:0%").headline
    assert kvquant.make("3:0.5%").pct == 0.5
    for bad in ("", "x", "3:1", "3:abc%", "3:60%", "0"):
        with pytest.raises(MethodError):
            kvquant.make(bad)
