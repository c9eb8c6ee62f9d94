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


def _rotated_reference(x, scale, parts, trellis):
    """One row at a time: y = scale * x; each group rotated, over its rms, to the nearest level (or the trellis walk)
    at the row's rms, back; a least-squares fp16 scale in the y domain; y / scale."""
    from qaq_gguf.trellis import codebook, viterbi
    out = np.empty(x.shape, np.float32)
    flat = out.reshape(-1, x.shape[-1])
    for i, row in enumerate(x.reshape(-1, x.shape[-1]).astype(np.float64)):
        y = row * scale
        us = [pairbits.orthogonal(len(idx)) @ y[idx] / sig for _, idx, sig in parts]
        rms = np.sqrt(np.sum([np.sum(u * u) for u in us]) / sum(len(u) for u in us)) or 1.0
        r = np.zeros_like(y)
        for (b, idx, sig), u in zip(parts, us):
            if trellis and 2 <= b <= 4:
                table, rho = codebook(b)
                c = table[viterbi((u / rms * rho)[None], table, b)[0]] / rho
            else:
                levels, _ = lloyd_max(b)
                c = np.array([levels[np.argmin(np.abs(levels - v))] for v in u / rms])
            r[idx] = pairbits.orthogonal(len(idx)).T @ (c * sig)
        s = float(np.float16(np.dot(y, r) / np.dot(r, r))) if np.dot(r, r) > 0 else 0.0
        flat[i] = s * r / scale
    return out


@pytest.mark.parametrize("trellis", [False, True])
def test_rotated_round_trip_matches_the_reference(trellis):
    rng = np.random.default_rng(5)
    d = 16
    scale = rng.uniform(0.3, 3.0, d)
    width = np.array([0, 3, 3, 2, 5, 3, 1, 2, 3, 3, 4, 4, 0, 2, 3, 3])
    parts = [(int(b), np.flatnonzero(width == b), float(rng.uniform(0.5, 2))) for b in np.unique(width) if b]
    x = rng.standard_normal((7, d)).astype(np.float32)
    got = pairbits.quantize_rotated(x, scale, parts, trellis)
    np.testing.assert_allclose(got, _rotated_reference(x, scale, parts, trellis), rtol=1e-5, atol=1e-6)
    assert np.all(got[:, width == 0] == 0)
    q = pairbits.orthogonal(5)
    np.testing.assert_allclose(q @ q.T, np.eye(5), atol=1e-12)
    z = np.zeros((2, d), np.float32)
    np.testing.assert_array_equal(pairbits.quantize_rotated(z, scale, parts, trellis), z)


def test_rotated_groups_fit_and_beat_the_unrotated_code():
    """/h: the keys' scales are the profiles' rebalancing (of the centred keys with /c), the groups are the
    dimensions of each width with their rms after scaling; in sample the q_sq-weighted key error falls against the
    code without rotation at the same widths, and /t (trellis inside) below that."""
    calib = synthetic_calibration(n_layer=2, head_dim=64, n_tok=256, n_ctx=64)
    plain = methods.make("pairbits:3/vt/c")[0]
    rot = methods.make("pairbits:3/vt/c/h")[0]
    tr = methods.make("pairbits:3/vt/c/h/t")[0]
    for m in (plain, rot, tr):
        m.fit(calib)
    layer = calib.layers[1]
    kc = np.asarray(layer.k, np.float64) - rot.key_mean[1]
    from qaq_gguf import transforms
    want = transforms.rebalance_scales(layer.q_sq, np.mean(kc * kc, axis=0), tcq.key_partner(layer))
    width = rot.codes[(1, "k")][1]
    np.testing.assert_array_equal(width, plain.codes[(1, "k")][1])
    for h, (scale, parts) in enumerate(rot.rot[(1, "k")]):
        np.testing.assert_allclose(scale, want[h], rtol=1e-6)
        assert sorted(np.concatenate([idx for _, idx, _ in parts]).tolist()) == np.flatnonzero(width[h]).tolist()
        for b, idx, sig in parts:
            assert np.all(width[h, idx] == b)
            assert sig == pytest.approx(np.sqrt(np.mean((kc[:, h][:, idx] * scale[idx]) ** 2)), rel=1e-6)
    err = [np.sum(layer.q_sq * (m.apply(1, "k", layer.k, layer.pos) - layer.k) ** 2) for m in (plain, rot, tr)]
    assert err[2] < err[1] < err[0]
    assert tr.label == "pairbits:3/vt/c/h/t" and tr.bits(512).k == plain.bits(512).k
    for bad in ("3/t", "3/vt/t/h", "3/h/c"):
        with pytest.raises(MethodError, match="pairbits"):
            methods.make(f"pairbits:{bad}")


def test_exact_first_position():
    """/x: rows at position 0 exact for keys and values, left out of the scales, widths and mean, and counted."""
    calib = synthetic_calibration(n_layer=2, head_dim=64, n_tok=128, n_ctx=64)
    layer = calib.layers[0]
    m = methods.make("pairbits:3/vt/c/h/x")[0]
    m.fit(calib)
    ref = methods.make("pairbits:3/vt/c/h")[0]
    ref.fit(dataclasses.replace(calib, layers={il: methods.without_first(ly) for il, ly in calib.layers.items()}))
    np.testing.assert_array_equal(m.key_mean[0], ref.key_mean[0])
    np.testing.assert_array_equal(m.codes[(0, "k")][1], ref.codes[(0, "k")][1])
    k, v, pos = layer.k[60:70], layer.v[60:70], layer.pos[60:70]
    first = pos == 0
    got, want = m.apply(0, "k", k, pos), ref.apply(0, "k", k, pos)
    np.testing.assert_array_equal(got[~first], want[~first])
    np.testing.assert_array_equal(got[first], (k - m.key_mean[0])[first])
    np.testing.assert_array_equal(m.apply(0, "v", v, pos)[first], v[first])
    assert m.bits(512).k == pytest.approx(ref.bits(512).k + 2 * 16 / 512)
    assert m.label == "pairbits:3/vt/c/h/x"
