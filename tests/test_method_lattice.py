"""Lattice vector codes (qaq_gguf.methods.lattice): the codebooks' structure, the nearest-point search against brute
force over every codeword, Conway & Sloane's decoders against brute force over lattice patches, the round trip
against a loop-by-loop numpy reference, bits, settings, and the method through its public interface. numpy only."""
import dataclasses
import itertools

import numpy as np
import pytest

from conftest import synthetic_calibration
from qaq_gguf import methods, quants, scoring
from qaq_gguf.methods import MethodError, lattice as lat, turboquant as tq

CODES = [("e8", 2), ("d4", 3), ("d4", 2)]


def _brute(y, pts):
    """Nearest codeword (and squared distance) of each row of y by distance to every point."""
    out = np.empty_like(y)
    dist = np.empty(len(y))
    for i in range(0, len(y), 64):
        d = np.sum((y[i:i + 64, None, :] - pts[None]) ** 2, axis=2)
        j = np.argmin(d, axis=1)
        out[i:i + 64] = pts[j]
        dist[i:i + 64] = d[np.arange(len(j)), j]
    return out, dist


@pytest.mark.parametrize("name,bits", CODES)
def test_codebook_structure(name, bits):
    cb = lat.codebook(name, bits)
    pts = cb.points()
    assert cb.size == len(pts) == 2 ** (cb.n * bits)
    keys = np.unique((4 * pts).astype(np.int64), axis=0)  # 4 p is integer for both codebooks
    assert len(keys) == len(pts)
    # every codeword is on the lattice coset: E8 + 1/4 (integer coords even sum, or half-integer even sum) or D4 + 1/2
    z = pts - (0.25 if name == "e8" else 0.5)
    frac = z - np.floor(z)
    integer = np.all(frac == 0, axis=1)
    half = np.all(frac == 0.5, axis=1)
    assert np.all((np.sum(z, axis=1) % 2) == 0)
    assert np.all(integer | half) if name == "e8" else np.all(integer)
    # symmetric under negation (sign patterns of even parity times sources, both shifts)
    np.testing.assert_array_equal(np.unique((-4 * pts).astype(np.int64), axis=0), keys)


def test_e8p_sources_are_quip_sharp_shells():
    """227 sources of norm^2 <= 10 and 29 of norm^2 12 (QuIP#'s count), 7 sign bits and a shift bit."""
    cb = lat.codebook("e8", 2)
    nrm = np.sum(cb.sources ** 2, axis=1)
    assert len(cb.sources) == 256
    assert np.sum(nrm <= 10) == 227 and np.sum(nrm == 12) == 29


@pytest.mark.parametrize("name,bits", CODES)
def test_nearest_is_exact_against_brute_force(name, bits):
    cb = lat.codebook(name, bits)
    pts = cb.points()
    rng = np.random.default_rng(bits)
    # inside, around and far outside the codebook's ball
    y = rng.standard_normal((240, cb.n)) * cb.rho * rng.choice([0.3, 1.0, 2.0, 5.0], size=(240, 1))
    stats = {}
    got = cb.nearest(y, stats=stats)
    ref, dist = _brute(y, pts)
    np.testing.assert_allclose(np.sum((y - got) ** 2, axis=1), dist, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(got, ref)  # random data: no ties
    assert 0 < stats["searched"] < stats["groups"]  # both paths taken
    # the exact search over sources alone (the fallback) is exact everywhere too
    np.testing.assert_array_equal(cb._search(y), ref)


def test_conway_sloane_decoders():
    rng = np.random.default_rng(5)
    g4 = np.array(list(itertools.product(range(-3, 4), repeat=4)), float)
    d4 = g4[(g4.sum(1) % 2) == 0]
    y = rng.uniform(-1.5, 1.5, (400, 4))
    np.testing.assert_allclose(np.sum((y - lat.nearest_dn(y)) ** 2, 1), _brute(y, d4)[1], atol=1e-12)
    # |y_i| <= 0.4 and the covering radius 1: the nearest point's coordinates are in [-1.4, 1.4]
    g8 = np.array(list(itertools.product(range(-1, 2), repeat=8)), float)
    h8 = np.array(list(itertools.product((-0.5, 0.5), repeat=8)))
    e8 = np.concatenate([g8[(g8.sum(1) % 2) == 0], h8[(h8.sum(1) % 2) == 0]])
    y = rng.uniform(-0.4, 0.4, (300, 8))
    np.testing.assert_allclose(np.sum((y - lat.nearest_e8(y)) ** 2, 1), _brute(y, e8)[1], atol=1e-12)


def test_gaussian_distortion_beats_lloyd_max():
    """MSE per value on N(0, 1) at the best scale: E8P 2 bits ~0.091 (Lloyd-Max 0.1175), D4 3 bits ~0.030
    (Lloyd-Max 0.0345)."""
    x = np.random.default_rng(9).standard_normal((4000, 8))
    for (name, bits), top in (((("e8", 2)), 0.095), (("d4", 3), 0.0315)):
        cb = lat.codebook(name, bits)
        xs = x.reshape(-1, cb.n)
        mse = float(np.mean((cb.nearest(xs * cb.rho) / cb.rho - xs) ** 2))
        assert mse < top


# --- the round trip against a loop-by-loop reference ---------------------------------------------------------------

def _ref_unit(x, pts, rho, fmt):
    """One row or block x (L,): each candidate scale, every group to its brute-force nearest codeword, the
    least-squares scale rounded to the format, the smallest squared error kept."""
    n = pts.shape[1]
    rms = np.sqrt(np.mean(x * x))
    if rms == 0:
        return np.zeros_like(x)
    best, out = np.inf, None
    for f in lat.SCALE_FACTORS:
        s0 = rms / rho * float(f)
        c = np.concatenate([pts[np.argmin(np.sum((x[i:i + n] / s0 - pts) ** 2, 1))] for i in range(0, len(x), n)])
        s = float(np.dot(x, c) / np.dot(c, c))
        if fmt == "f16":
            s = float(np.float16(s))
        else:  # nearest ue5m3 value
            vals = quants.ue5m3_to_float(np.arange(quants.UE5M3_MAX + 1)).astype(np.float64)
            s = float(vals[np.argmin(np.abs(vals - s))])
        err = float(np.sum((s * c - x) ** 2))
        if err < best:
            best, out = err, s * c
    return out


def _reference(x, name, bits, block, is_v):
    cb = lat.codebook(name, bits)
    pts = cb.points()
    d = x.shape[-1]
    r = scoring.rotation_size(d, is_v)
    h = scoring.hadamard(r).astype(np.float64)
    out = np.empty(x.shape)
    for idx in np.ndindex(x.shape[:-1]):
        row = x[idx].astype(np.float32).reshape(-1, r) @ h  # llama.cpp's rotation, block by block
        row = row.astype(np.float32).astype(np.float64).reshape(-1)
        L = block or d
        y = np.concatenate([_ref_unit(row[i:i + L], pts, cb.rho, "ue5m3" if block else "f16")
                            for i in range(0, d, L)])
        out[idx] = (y.astype(np.float32).reshape(-1, r) @ h).reshape(-1)
    return out


@pytest.mark.parametrize("name,bits,block", [("e8", 2, None), ("d4", 3, None), ("d4", 3, 32), ("e8", 2, 32)])
def test_round_trip_matches_reference(name, bits, block):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((2, 2, 64)) * np.linspace(0.3, 4, 64) + 0.2).astype(np.float32)
    x[1, 1] = 0  # a zero row stays zero
    if name == "e8":
        x = x[:, :1] if block else x[1:]  # the brute-force reference is slow over 65536 points
    for is_v in (False, True):
        got = lat.quantize(x, lat.codebook(name, bits), block=block, is_v=is_v)
        np.testing.assert_allclose(got, _reference(x, name, bits, block, is_v), rtol=2e-5, atol=2e-5)
    zero = np.all(x == 0, axis=-1)
    assert np.all(got[zero] == 0)


# --- the method ------------------------------------------------------------------------------------------------------

def test_method_round_trip_beats_scalar_code_at_same_bits():
    """Through the interface: keys and values of a synthetic model, each reconstructed as quantize() does, with a
    smaller error than TurboQuant's Lloyd-Max scalar code at the same code bits."""
    calib = synthetic_calibration(n_layer=1, n_tok=48, n_ctx=48, head_dim=64)
    layer = calib.layers[0]
    pos = np.arange(48)
    for spec, bits in (("lattice-e8:2", 2), ("lattice-d4:3", 3)):
        m = methods.make(spec)[0]
        m.fit(calib)
        m.begin(48)
        k = m.apply(0, "k", layer.k, pos)
        v = m.apply(0, "v", layer.v, pos)
        np.testing.assert_array_equal(k, lat.quantize(layer.k, m.cb, block=None, is_v=False))
        np.testing.assert_allclose(v[:2], _reference(layer.v[:2], m.lattice, bits, None, True), rtol=2e-5,
                                   atol=2e-5)
        assert k.shape == layer.k.shape and k.dtype == np.float32
        for x, y in ((layer.k, k), (layer.v, v)):
            err = np.mean((y - x) ** 2) / np.mean(x ** 2)
            err_tq = np.mean((tq.quantize(x, bits) - x) ** 2) / np.mean(x ** 2)
            assert err < err_tq
        assert m.apply(0, "q", layer.k, pos) is layer.k
        assert "groups" in m.stats


def test_bits_by_hand():
    calib = synthetic_calibration(n_layer=2, head_dim=64)
    for spec, expect in (("lattice-e8:2", 2 + 16 / 64), ("lattice-d4:3", 3 + 16 / 64), ("lattice-e8:2/b32", 2.25),
                         ("lattice-d4:3/b64", 3 + 8 / 64)):
        m = methods.make(spec)[0]
        with pytest.raises(MethodError, match="not fitted"):
            m.bits(512)
        m.fit(calib)
        b = m.bits(512)
        assert (b.k, b.v) == (pytest.approx(expect), pytest.approx(expect))
    calib = synthetic_calibration(n_layer=1, head_dim=256, n_tok=16, n_ctx=16)
    m = methods.make("lattice-e8:2")[0]
    m.fit(calib)
    assert m.bits(1024).k == pytest.approx(2 + 16 / 256)  # Gemma 3's head of 256: 2.0625


def test_settings_and_fingerprint():
    assert [m.label for m in methods.make("lattice")] == ["lattice-e8:2", "lattice-d4:3"]
    assert [m.label for m in methods.make("lattice-d4:3/b32")] == ["lattice-d4:3/b32"]
    assert [m.label for m in methods.make("lattice:e8:2")] == ["lattice-e8:2"]
    assert methods.make("lattice-d4")[0].label == "lattice-d4:3"
    for bad in ("lattice-e8:3", "lattice-d4:5", "lattice-z8:2", "lattice-d4:3/b6", "lattice:x"):
        with pytest.raises(MethodError):
            methods.make(bad)
    calib = synthetic_calibration(n_layer=1, n_tok=16, n_ctx=16)
    m = methods.make("lattice-d4:2")[0]
    m.fit(calib)
    methods.check_fitted(m, calib.ident)
    with pytest.raises(MethodError, match="fingerprint"):
        methods.check_fitted(m, dataclasses.replace(calib.ident, fingerprint="another-model"))
    with pytest.raises(MethodError, match="multiple"):
        lat.quantize(np.zeros((2, 60), np.float32), lat.codebook("e8", 2), block=None, is_v=False)
