"""Bits per RoPE pair by energy (qaq_gguf.methods.pairbits): the allocation against brute force, the round trip against
a loop-by-loop numpy reference, what the fit gives on synthetic keys with high-energy channels, bits, settings and
the method through its public interface. numpy only."""
import dataclasses
import itertools

import numpy as np
import pytest

from conftest import synthetic_calibration
from qaq_gguf import methods
from qaq_gguf.methods import MethodError, pairbits, tcq
from qaq_gguf.methods.turboquant import lloyd_max


def test_distortions_are_lloyd_max_s():
    d = pairbits.distortions()
    assert d[0] == 1.0 and all(a > b for a, b in zip(d, d[1:]))
    # Max (1960): 0.3634, 0.1175, 0.03454, 0.009497 for 1-4 bits
    np.testing.assert_allclose(d[1:5], [0.3634, 0.1175, 0.03454, 0.009497], rtol=0.02)


def _cost(w, b):
    d = pairbits.distortions()
    return sum(wi * d[bi] for wi, bi in zip(w, b))


@pytest.mark.parametrize("seed", range(4))
def test_allocation_is_optimal_by_brute_force(seed):
    """Singletons and pairs: the greedy widths spend exactly the total and no other widths of that total (each at
    most 5) have a lower weighted distortion."""
    rng = np.random.default_rng(seed)
    sizes = np.array([2, 2, 1, 2, 1])
    w = rng.lognormal(0, 2, len(sizes))
    total = 14
    b = pairbits.allocate(w, sizes, total)
    assert int(np.sum(b * sizes)) == total
    best = min(_cost(w, c) for c in itertools.product(range(6), repeat=len(sizes))
               if int(np.dot(c, sizes)) == total)
    assert _cost(w, b) <= best * (1 + 1e-12)


def test_allocation_follows_energy():
    b = pairbits.allocate(np.array([1.0, 1.0, 16.0, 256.0]), np.ones(4, int), 12)
    assert list(b) == sorted(b) and b.sum() == 12 and b[0] == b[1]
    assert b[3] - b[2] == 2  # 4x the rms at 4+ bits (where D quarters per bit): two more bits
    assert np.all(pairbits.allocate(np.ones(4), np.ones(4, int), 0) == 0)


def _reference(x, sigma, width):
    """One row at a time: u = x / sigma at the row's rms, nearest level of each width, least-squares fp16 scale."""
    out = np.empty(x.shape, np.float32)
    for i, row in enumerate(x.reshape(-1, x.shape[-1]).astype(np.float64)):
        u = row / sigma
        rms = np.sqrt(np.mean(u * u))
        c = np.zeros_like(u)
        for j, (uj, bj) in enumerate(zip(u, width)):
            if bj and rms > 0:
                levels, _ = lloyd_max(int(bj))
                c[j] = levels[np.argmin(np.abs(levels - uj / rms))]
        r = c * sigma
        s = np.float16(np.dot(row, r) / np.dot(r, r)) if np.dot(r, r) > 0 else 0.0
        out.reshape(-1, x.shape[-1])[i] = float(s) * r
    return out


def test_round_trip_matches_the_reference():
    rng = np.random.default_rng(3)
    d = 16
    sigma = rng.uniform(0.2, 5.0, d)
    width = np.array([0, 1, 2, 3, 4, 5, 3, 3, 2, 2, 1, 0, 6, 3, 3, 2])
    x = (rng.standard_normal((5, 3, d)) * sigma).astype(np.float32)
    got = pairbits.quantize(x, sigma, width)
    np.testing.assert_allclose(got, _reference(x, sigma, width), rtol=1e-6, atol=1e-7)
    assert np.all(got[..., width == 0] == 0)
    z = np.zeros((2, d), np.float32)  # an all-zero row stays zero
    np.testing.assert_array_equal(pairbits.quantize(z, sigma, width), z)


def test_fit_gives_rope_pairs_one_width_and_the_loud_pairs_more():
    calib = synthetic_calibration(n_layer=2, head_dim=64, n_tok=256, n_ctx=64)
    m = methods.make("pairbits:3")[0]
    m.fit(calib)
    for il, layer in calib.layers.items():
        sigma, width = m.codes[(il, "k")]
        pairs = layer.rope.pairs(64)
        for h in range(width.shape[0]):
            assert int(width[h].sum()) == 3 * 64
            assert np.all(width[h, pairs[:, 0]] == width[h, pairs[:, 1]])
            w = np.array([np.sum(layer.q_sq[h, p] * sigma[h, p] ** 2) for p in pairs])
            assert np.corrcoef(w, width[h, pairs[:, 0]])[0, 1] > 0  # more weight, more bits
        _, wv = m.codes[(il, "v")]
        assert np.all(wv.sum(axis=1) == 3 * 64)
    # in sample, the keys' logit error (q_sq-weighted) is below the trellis code's at equal bits
    layer = calib.layers[0]
    y = m.apply(0, "k", layer.k, layer.pos)
    yt = tcq.quantize(layer.k, 3, 8, is_v=False, factors=(1.0,))
    assert np.sum(layer.q_sq * (y - layer.k) ** 2) < np.sum(layer.q_sq * (yt - layer.k) ** 2)


def test_bits_settings_and_fingerprint():
    calib = synthetic_calibration(n_layer=2, head_dim=64, n_tok=64, n_ctx=64)
    m = methods.make("pairbits:2.5")[0]
    with pytest.raises(MethodError, match="not fitted"):
        m.bits(512)
    m.fit(calib)
    b512, b32k = m.bits(512), m.bits(32768)
    assert b32k.k == pytest.approx(2.5 + 0.25, abs=1e-3) and b32k.v == pytest.approx(2.75, abs=1e-3)
    # the static scales and widths: 20 bits per pair of the keys, per channel of the values, over the cache
    assert b512.k == pytest.approx(2.75 + 32 * 20 / (64 * 512)) and b512.v == pytest.approx(2.75 + 64 * 20 / (64 * 512))
    methods.check_fitted(m, calib.ident)
    with pytest.raises(MethodError, match="fingerprint"):
        methods.check_fitted(m, dataclasses.replace(calib.ident, fingerprint="another-model"))
    vt = methods.make("pairbits:3/vt")[0]
    vt.fit(calib)
    assert (0, "v") not in vt.codes and vt.bits(512).v == pytest.approx(3.25)
    x = calib.layers[1].v[:8]
    np.testing.assert_array_equal(vt.apply(1, "v", x, calib.layers[1].pos[:8]),
                                  tcq.quantize(x, 3, 8, is_v=True, factors=(1.0,)))
    assert [m.label for m in methods.make("pairbits")] == ["pairbits:3", "pairbits:2.5"]
    for bad in ("0.5", "9", "x", "2.5/vt", "3/w1"):
        with pytest.raises(MethodError, match="pairbits"):
            methods.make(f"pairbits:{bad}")


def test_shared_patterns():
    """/p1: every head's widths, in its groups' weight order, are one pattern of the right total; with as many
    patterns as heads each head keeps the distortion of its own allocation."""
    calib = synthetic_calibration(n_layer=3, head_dim=64, n_tok=256, n_ctx=64, n_head_kv=2)
    own = methods.make("pairbits:3")[0]
    own.fit(calib)
    one = methods.make("pairbits:3/p1")[0]
    one.fit(calib)
    many = methods.make("pairbits:3/p12")[0]
    many.fit(calib)
    d = np.array(pairbits.distortions())
    for kind in ("k", "v"):
        seen = set()
        for il, layer in calib.layers.items():
            sigma, width = one.codes[(il, kind)]
            for h in range(width.shape[0]):
                assert int(width[h].sum()) == 3 * 64
                if kind == "k":
                    p = layer.rope.pairs(64)
                    w = np.array([np.sum(layer.q_sq[h, g] * sigma[h, g] ** 2) for g in p])
                    seen.add(tuple(width[h, p[np.argsort(-w, kind="stable"), 0]]))
                    cost = lambda wid: float(np.sum(w * d[wid[h, p[:, 0]]]))  # noqa: E731
                    assert cost(many.codes[(il, kind)][1]) == pytest.approx(cost(own.codes[(il, kind)][1]))
        if kind == "k":
            assert len(seen) == 1
    # no widths stored per head: the static side information is the scales alone
    assert one.bits(512).k == pytest.approx(3.25 + 32 * 16 / (64 * 512))


def test_centred_keys():
    calib = synthetic_calibration(n_layer=2, head_dim=64, n_tok=128, n_ctx=64)
    m = methods.make("pairbits:3/vt/c/p1")[0]
    assert (m.centre, m.values_tcq, m.patterns) == (True, True, 1)
    m.fit(calib)
    layer = calib.layers[1]
    mean = m.key_mean[1]
    sigma, width = m.codes[(1, "k")]
    p0 = layer.rope.pairs(64)[0]
    np.testing.assert_allclose(sigma[0, p0[0]] ** 2, np.mean((layer.k[:, 0, p0] - mean[0, p0]) ** 2), rtol=1e-5)
    k = layer.k[:6]
    got = m.apply(1, "k", k, layer.pos[:6])
    want = np.stack([pairbits.quantize(k[:, h] - mean[h], sigma[h], width[h]) for h in range(k.shape[1])], axis=1)
    np.testing.assert_array_equal(got, want)
